//! Serve a guest's H_ENTER/H_REMOVE: a pseries guest manages its hashed
//! page table by hypercall, and the hypervisor checks every argument, keeps
//! the reverse map, and makes sure a page the guest wrote and then removed
//! stays dirty for a live migration. The in-memory table's software MMU
//! plays the processor (hashed search, PP check, R and C set atomically).
//!
//! Run with `cargo run -p arch-ppc-book3s --example serve_hcalls`.

use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, WimgPolicy};
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HpteFormat, HPTE_R_I, HPTE_R_M};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::{
    HcallReturn, H_AVPN, H_ENTER, H_EXACT, H_NOT_FOUND, H_PARAMETER, H_PTEG_FULL, H_REMOVE,
};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::{FlushToken, NoTlb};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

const VSID: u64 = 0x1234;
const EA: u64 = 0x1000_0000; // the guest maps its pages at this effective address
const PP_RW: u64 = 2;

fn status(code: i64) -> &'static str {
    match code {
        0 => "H_SUCCESS",
        H_PARAMETER => "H_PARAMETER",
        H_PTEG_FULL => "H_PTEG_FULL",
        H_NOT_FOUND => "H_NOT_FOUND",
        _ => "another code",
    }
}

fn main() {
    // 32 MiB of guest RAM at guest-real 0, dirty-logged; a 256 KiB table
    // (ibm,pft-size 18) in the pre-ISA-3.0 layout PAPR uses.
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 0x2000, Hva(0x4000_0000), SlotFlags::DIRTY_LOG)).expect("valid");
    let slots = b.build().expect("one slot");
    let slot = *slots.get(SlotId(0)).expect("built");
    let sizes = PageSizes::qemu_pseries_default();
    let geometry = HptGeometry::from_pft_size(18).expect("a valid table size");
    let cfg = GuestConfig { geometry, format: HpteFormat::PreIsa300, sizes, wimg: WimgPolicy::RequireM };
    let mut hpt = GuestHpt::new(cfg, slots, HvaIdentity).expect("small enough");

    let call = |hpt: &mut GuestHpt, op: u64, args: &[u64]| -> HcallReturn {
        let mut flush = FlushToken::new();
        let r = hpt.hcall(op, args, &mut flush);
        // A real hypervisor issues its tlbie here; this example has no TLB.
        flush.flush(&mut NoTlb);
        r
    };

    // The guest maps four 4 KiB pages, EA 0x1000_0000.. -> guest-real 0x10_0000..
    let va = |i: u64| VirtAddr::new(VSID, SegmentSize::S256M, EA + i * 4096).expect("the VSID fits");
    let mut ptex = [0u64; 4];
    for i in 0..4 {
        let group = geometry.group_of(&va(i), 12, false);
        let ptel = ((0x100 + i) << 12) | HPTE_R_M | PP_RW;
        let r = call(&mut hpt, H_ENTER, &[0, group, va(i).avpn_v(12), ptel]);
        ptex[i as usize] = r.ret[0];
        println!(
            "serve_hcalls: H_ENTER ea {:#x} -> gfn {:#x}: {} in slot {}",
            EA + i * 4096,
            0x100 + i,
            status(r.status),
            r.ret[0]
        );
        assert_eq!(r.status, 0);
    }

    // What a guest may not do, with the code PAPR gives it. The entry is
    // for a page of another segment, so only the named field is wrong.
    let other = VirtAddr::new(VSID + 1, SegmentSize::S256M, EA).expect("the VSID fits");
    let (group, pteh) = (geometry.group_of(&other, 12, false), other.avpn_v(12));
    let good = (0x200 << 12) | HPTE_R_M | PP_RW;
    let outside = call(&mut hpt, H_ENTER, &[0, group, pteh, (0x2000 << 12) | HPTE_R_M | PP_RW]);
    let cache_inhibited = call(&mut hpt, H_ENTER, &[0, group, pteh, (0x200 << 12) | HPTE_R_I | PP_RW]);
    let exact = call(&mut hpt, H_ENTER, &[H_EXACT, ptex[0], pteh, good]);
    let twice = call(&mut hpt, H_ENTER, &[0, geometry.group_of(&va(0), 12, false), va(0).avpn_v(12), good]);
    let fine = call(&mut hpt, H_ENTER, &[0, group, pteh, good]);
    println!(
        "serve_hcalls: H_ENTER past guest memory: {}; WIMG=I on RAM: {}; H_EXACT on a used slot: {}; \
         a second translation of a mapped page: {}; the same entry done right: {}",
        status(outside.status),
        status(cache_inhibited.status),
        status(exact.status),
        status(twice.status),
        status(fine.status)
    );
    assert_eq!(
        [outside.status, cache_inhibited.status, exact.status, twice.status, fine.status],
        [H_PARAMETER, H_PARAMETER, H_PTEG_FULL, H_PARAMETER, 0]
    );

    // Migration starts: the generic driver logs the slot through the C bit.
    // A dirty-bit log harvests only its chain of writable entries, so the C
    // bits the guest takes away (H_REMOVE of a changed entry) must be
    // queued for the driver's `drain_lost_dirty` instead of the per-gfn word.
    hpt.queue_folded_dirty(true);
    let mut flush = FlushToken::new();
    let mut log = SlotDirtyLog::start(&slot, Tracking::HardwareDirty, LogMode::Bitmap, &mut hpt, &mut flush)
        .expect("Book3s has a changed bit");
    flush.flush(&mut NoTlb);

    // The guest stores to pages 0 and 2 and loads page 1; the MMU sets R and C.
    for (i, store) in [(0, true), (1, false), (2, true)] {
        let t = hpt.table().translate(&va(i), 12, &sizes, store, true).expect("mapped, PP allows it");
        println!(
            "serve_hcalls: guest {} ea {:#x}: real address {:#x} through slot {}",
            if store { "stores to" } else { "loads from" },
            EA + i * 4096,
            t.real_address,
            t.ptex
        );
    }

    // The guest removes page 2 (with the AVPN check) and tries again.
    let avpn = va(2).avpn_v(12) & !0x7f;
    let removed = call(&mut hpt, H_REMOVE, &[H_AVPN, ptex[2], avpn]);
    let again = call(&mut hpt, H_REMOVE, &[H_AVPN, ptex[2], avpn]);
    println!(
        "serve_hcalls: H_REMOVE slot {}: {} (old dword 1 {:#x}, C {}); again: {}",
        ptex[2],
        status(removed.status),
        removed.ret[1],
        removed.ret[1] & 0x80 != 0,
        status(again.status)
    );
    assert_eq!((removed.status, again.status), (0, H_NOT_FOUND));

    // The round reports both written pages: page 2's C bit left the table
    // with H_REMOVE, and the reverse map kept it.
    let mut words = Vec::new();
    let flush = log.get_and_clear(&mut hpt, &mut words).expect("bitmap mode");
    flush.flush(&mut NoTlb);
    let dirty: Vec<u64> =
        (0..words.len() as u64 * 64).filter(|&p| words[p as usize / 64] >> (p % 64) & 1 != 0).collect();
    let shown: Vec<String> = dirty.iter().map(|g| format!("{g:#x}")).collect();
    println!(
        "serve_hcalls: dirty-log round: dirty gfns {} (0x102 was written, then removed by the guest)",
        shown.join(", ")
    );
    assert_eq!(dirty, [0x100, 0x102]);
    hpt.check_invariants().expect("the table and its reverse map agree");
    println!("serve_hcalls: table and reverse map invariants hold");
}
