//! Age a host range: the host's reclaim asks which pages of a host-virtual
//! range the guest used lately (KVM's `test_young`/`clear_young`). The core
//! maps the range to every (slot, gfn range) it backs, aliases included,
//! and tests or clears accessed bits through the back end's reverse map.
//!
//! Run with `cargo run -p mmu-generic --example age_host_range`.

mod common;

use common::{Access, CountingTlb, FlatMmu};
use mmu_generic::addr::{Gfn, Hva, HvaRange};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::FlushToken;
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

const HOST: u64 = 0x7f00_0000_0000;

fn main() {
    // Two slots alias the same 256 host pages (a ROM shadowed at two guest
    // addresses), a third has host memory of its own.
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0x000), 256, Hva(HOST), SlotFlags::empty())).expect("valid");
    b.create(Memslot::new(SlotId(1), Gfn(0x400), 256, Hva(HOST), SlotFlags::empty())).expect("valid");
    b.create(Memslot::new(SlotId(2), Gfn(0x800), 256, Hva(HOST + (1 << 20)), SlotFlags::empty()))
        .expect("valid");
    let slots = b.build().expect("no overlap in guest-physical space");
    let mut mmu = FlatMmu::new(&slots);
    let mut tlb = CountingTlb::default();

    let touch = |mmu: &mut FlatMmu, gfns: &[u64]| {
        for &g in gfns {
            while mmu.cpu_access(Gfn(g), false) == Access::Fault {
                mmu.fault(Gfn(g), false, None).expect("inside a slot");
            }
        }
    };
    // The guest reads host page 7 through both aliases, and pages of slot 2.
    touch(&mut mmu, &[0x007, 0x407, 0x800, 0x801, 0x8ff]);

    let page = |p: u64| HvaRange { start: Hva(HOST + p * 4096), end: Hva(HOST + (p + 1) * 4096) };
    let first_mib = HvaRange { start: Hva(HOST), end: Hva(HOST + (1 << 20)) };
    let all = HvaRange { start: Hva(HOST), end: Hva(HOST + (2 << 20)) };

    let r = test_age(&slots, &mmu, page(7), NoAccessedBit::ReportOld);
    println!(
        "age_host_range: host page 7 is young: {} ({} leaves through its two aliases)",
        r.young, r.leaves
    );
    assert!(r.young && r.leaves == 2);
    let r = test_age(&slots, &mmu, page(8), NoAccessedBit::ReportOld);
    println!("age_host_range: host page 8 is young: {} (never touched)", r.young);
    assert!(!r.young);

    let mut flush = FlushToken::new();
    let r = age(&slots, &mut mmu, all, NoAccessedBit::ReportOld, &mut flush);
    flush.flush(&mut tlb);
    println!("age_host_range: aged 2 MiB of host memory: {} leaves, {} were young", r.leaves, r.young_leaves);
    assert_eq!((r.leaves, r.young_leaves), (5, 5));
    let r = test_age(&slots, &mmu, all, NoAccessedBit::ReportOld);
    println!("age_host_range: right after: {} young", r.young_leaves);
    assert_eq!(r.young_leaves, 0);

    // The guest touches one alias again: the host page is young once more,
    // the untouched memory stays old and may be reclaimed.
    touch(&mut mmu, &[0x407]);
    let r7 = test_age(&slots, &mmu, page(7), NoAccessedBit::ReportOld);
    let rest = test_age(
        &slots,
        &mmu,
        HvaRange { start: Hva(HOST + (1 << 20)), end: all.end },
        NoAccessedBit::ReportOld,
    );
    let low = test_age(&slots, &mmu, first_mib, NoAccessedBit::ReportOld);
    println!(
        "age_host_range: after a read through gfn 0x407: page 7 young {} ({} of {} leaves), slot 2 young {}, first MiB young leaves {}",
        r7.young, r7.young_leaves, r7.leaves, rest.young, low.young_leaves
    );
    assert!(r7.young && r7.young_leaves == 1 && !rest.young);
    println!("age_host_range: TLB range flushes {} ({} pages)", tlb.ranges, tlb.pages);
}
