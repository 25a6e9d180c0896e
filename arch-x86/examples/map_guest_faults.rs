//! Map a guest and serve its faults: EPT (with accessed/dirty flags) over
//! simulated memory. The software walker plays the processor: each guest
//! access walks the tables our engine built, and an access the tables do not
//! permit becomes the EPT violation the processor would report, which the
//! engine serves (map, MMIO exit, denial). Then the host invalidates part of
//! guest RAM (an MMU notifier), and the next access faults it back in.
//!
//! Run with `cargo run -p arch-x86 --example map_guest_faults`.

use arch_x86::exit::Origin;
use arch_x86::format::ept::Ept;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, WalkLength};
use arch_x86::frame::SimMemory;
use arch_x86::tdp::{FaultOutcome, TdpError, TdpMmu};
use arch_x86::testing::{FlushRecorder, LinearHost};
use arch_x86::walk::{translate, WalkError};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Hva, Pfn};
use mmu_generic::backend::FlushToken;
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

const MIB: u64 = 256; // frames per MiB

/// One guest access as the processor performs it: walk, and on an EPT
/// violation exit to the engine and retry, as a vCPU loop does.
fn guest_access(
    mmu: &mut TdpMmu<Ept, SimMemory>,
    host: &mut LinearHost,
    inv: &InvalidationSeq,
    tlb: &mut FlushRecorder,
    gpa: u64,
    access: Access,
) -> Result<String, TdpError> {
    let mut exits = 0;
    loop {
        match translate(mmu.format(), mmu.memory(), mmu.root(), Gpa(gpa), access, Origin::Final) {
            Ok(t) => return Ok(format!("hpa {:#x} via a {:?} page after {exits} exit(s)", t.hpa, t.size)),
            Err(WalkError::Exit { exit, .. }) => {
                exits += 1;
                let mut flush = FlushToken::new();
                let outcome = mmu.handle_exit(exit, Gpa(gpa), host, inv, &mut flush)?;
                flush.flush(tlb);
                match outcome {
                    FaultOutcome::Mapped(_) | FaultOutcome::Retry => continue,
                    FaultOutcome::Mmio { gpa, access } => {
                        return Ok(format!("MMIO exit at {gpa} ({access:?}): the VMM emulates a device"))
                    }
                    FaultOutcome::Denied(d) => return Ok(format!("denied: {d:?}")),
                }
            }
            Err(e) => panic!("the engine only builds tables in its own memory: {e:?}"),
        }
    }
}

fn main() -> Result<(), TdpError> {
    // 64 MiB of RAM at gpa 0 and a 1 MiB read-only flash at 4 GiB - 1 MiB;
    // everything else is MMIO. The host backs RAM with 2 MiB pages.
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 64 * MIB, Hva(0x10_0000_0000), SlotFlags::empty()))
        .expect("valid");
    b.create(Memslot::new(SlotId(1), Gfn(4096 * MIB - MIB), MIB, Hva(0x20_0000_0000), SlotFlags::READONLY))
        .expect("valid");
    let slots = b.build().expect("disjoint");

    let width = PhysAddrWidth::new(46).expect("46 bits is a valid MAXPHYADDR");
    let mut mmu = TdpMmu::new(Ept::new(WalkLength::Four, width, true), SimMemory::new(Pfn(0x10_0000), 4096))?;
    let mut tlb = FlushRecorder::default();
    mmu.set_memslots(&slots, &mut tlb, |_| {});
    let mut host = LinearHost::new(0x40_0000, PageSize::Size2M);
    let inv = InvalidationSeq::new();

    let accesses: [(u64, Access, &str); 8] = [
        (0x0010_0000, Access::EXEC, "fetch the kernel entry"),
        (0x0010_2000, Access::READ, "read the next page (same 2 MiB leaf)"),
        (0x0020_0040, Access::WRITE, "write the next 2 MiB"),
        (0x03ff_f000, Access::WRITE, "write the last page of RAM"),
        (0xfff0_0000, Access::READ, "read the flash"),
        (0xfff0_0000, Access::WRITE, "write the flash"),
        (0xfee0_0000, Access::WRITE, "write the local APIC page"),
        (0x0010_0000, Access::WRITE, "write the kernel image"),
    ];
    for (gpa, access, what) in accesses {
        let r = guest_access(&mut mmu, &mut host, &inv, &mut tlb, gpa, access)?;
        println!("map_guest_faults: {what} at {gpa:#x}: {r}");
    }
    let stats = mmu.stats();
    println!(
        "map_guest_faults: {} leaves installed, {} table frames in use, {} spurious faults",
        stats.leaves_installed,
        mmu.tables_in_use(),
        stats.spurious
    );
    assert_eq!(mmu.lookup(Gfn(0x100)).map(|l| l.size), Some(PageSize::Size2M));

    // The host reclaims 4 KiB inside the first 2 MiB leaf: the invalidation
    // splits the leaf so only that page goes, and the guest faults it back.
    inv.start(mmu_generic::addr::HvaRange { start: Hva(0x10_0010_1000), end: Hva(0x10_0010_2000) });
    let mut dirty_zapped = 0;
    mmu.unmap_range(GfnRange { start: Gfn(0x101), end: Gfn(0x102) }, &mut tlb, |leaf| {
        dirty_zapped += u64::from(leaf.dirty)
    })?;
    inv.end();
    println!(
        "map_guest_faults: host invalidated gfn 0x101: mapped now {:?}, its neighbour {:?} ({} dirty leaf handed back)",
        mmu.lookup(Gfn(0x101)).map(|l| l.size),
        mmu.lookup(Gfn(0x102)).map(|l| l.size),
        dirty_zapped
    );
    assert!(mmu.lookup(Gfn(0x101)).is_none());
    let r = guest_access(&mut mmu, &mut host, &inv, &mut tlb, 0x0010_1008, Access::READ)?;
    println!("map_guest_faults: the guest reads gfn 0x101 again: {r}");
    println!(
        "map_guest_faults: {} TLB range flushes, {} full; {} host resolutions",
        tlb.ranges.len(),
        tlb.alls,
        host.resolves
    );
    Ok(())
}
