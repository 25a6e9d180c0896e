//! Write your own back end: the minimal `MmuBackend` of `common/mod.rs` (a
//! one-level table of 4 KiB leaves, the core's reverse map, a CPU that sets
//! A and D atomically), exercised method by method, then driven by the
//! core's ageing and zap paths without any format-specific code.
//!
//! Run with `cargo run -p mmu-generic --example own_backend`.

mod common;

use common::{Access, CountingTlb, FlatMmu};
use mmu_generic::addr::{Gfn, GfnRange, Hva, HvaRange};
use mmu_generic::age::{self, NoAccessedBit};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::memslot::{Memslot, MemslotError, MemslotsBuilder, SlotFlags, SlotId};

fn main() -> Result<(), MemslotError> {
    // 1 MiB of guest RAM at gpa 0, backed at host-virtual 0x7f00_0000_0000.
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 256, Hva(0x7f00_0000_0000), SlotFlags::empty()))?;
    let slots = b.build()?;
    let slot = *slots.get(SlotId(0)).expect("just created");
    let mut mmu = FlatMmu::new(&slots);
    let mut tlb = CountingTlb::default();

    // The guest touches 16 pages; each first access faults and is mapped.
    let mut faults = 0;
    for i in 0..16u64 {
        let gfn = Gfn(i * 3);
        let write = i % 2 == 0;
        while mmu.cpu_access(gfn, write) == Access::Fault {
            mmu.fault(gfn, write, None).expect("inside the slot");
            faults += 1;
        }
    }
    println!("own_backend: guest touched 16 pages, {faults} faults, {} leaves mapped", mmu.mapped());

    // The trait as the drivers see it: the reverse map finds the leaves.
    let mut leaves = Vec::new();
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |h| leaves.push(h));
    let dirty = leaves.iter().filter(|&&h| mmu.leaf(h).is_some_and(|l| l.dirty)).count();
    println!("own_backend: for_each_leaf found {} leaves, {dirty} dirty (the written ones)", leaves.len());
    assert_eq!((leaves.len(), dirty), (16, 8));

    // Test-and-clear is atomic and reports each bit once; the token records
    // what must be flushed before the cleared bit means anything.
    let mut flush = FlushToken::new();
    let h = leaves[0];
    let (first, second) = (mmu.clear_dirty(h, &mut flush), mmu.clear_dirty(h, &mut flush));
    println!(
        "own_backend: clear_dirty on {:?}: {first} then {second}; flush needed: {}",
        h,
        flush.is_needed()
    );
    assert!(first && !second && flush.is_needed());
    flush.flush(&mut tlb);

    // Ageing through the core driver: every touched page is young once.
    let range = HvaRange { start: slot.hva(), end: Hva(slot.hva().0 + 256 * 4096) };
    let mut flush = FlushToken::new();
    let aged = age::age(&slots, &mut mmu, range, NoAccessedBit::ReportOld, &mut flush);
    flush.flush(&mut tlb);
    let again = age::test_age(&slots, &mmu, range, NoAccessedBit::ReportOld);
    println!(
        "own_backend: age saw {} leaves, {} young; test_age right after: {} young",
        aged.leaves, aged.young_leaves, again.young_leaves
    );
    assert_eq!((aged.young_leaves, again.young_leaves), (16, 0));

    // A zap hands back the final accessed and dirty bits.
    let mut flush = FlushToken::new();
    mmu.cpu_access(Gfn(6), true);
    let zapped = mmu.zap(leaves[2], &mut flush).expect("present");
    flush.flush(&mut tlb);
    println!(
        "own_backend: zapped gfn {} (dirty {}), {} leaves left, the reverse map agrees: {}",
        zapped.gfn,
        zapped.dirty,
        mmu.mapped(),
        {
            let mut n = 0;
            mmu.for_each_leaf(&slot, GfnRange { start: zapped.gfn, end: Gfn(zapped.gfn.0 + 1) }, &mut |_| {
                n += 1
            });
            n == 0
        }
    );
    assert!(zapped.dirty && mmu.mapped() == 15);
    println!("own_backend: TLB flushed {} ranges ({} pages), {} full", tlb.ranges, tlb.pages, tlb.alls);
    Ok(())
}
