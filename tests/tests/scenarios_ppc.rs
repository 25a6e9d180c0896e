//! The scenario suite against arch-ppc-book3s's in-memory hashed page table
//! (`GuestHpt` over the big-endian `InMemoryHpt`), in both table layouts, the
//! CPU played by the crate's software MMU (R and C set in the table).

use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::pagesize::PageSizes;
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::dirty_log::{LogMode, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{ageing, demand_faults, dirty_rounds, invalidation, outside_slots_is_mmio};
use vmmu_tests::ppc::PpcGuest;

const FORMATS: [HpteFormat; 2] = [HpteFormat::PreIsa300, HpteFormat::Isa300];

/// The simulated back end's layout: slot 2 aliases the first 16 pages of
/// slot 1's host memory, read-only.
fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY)).unwrap();
    b.build().unwrap()
}

fn guest(format: HpteFormat) -> PpcGuest {
    PpcGuest::new(slots(), 18, format, PageSizes::qemu_pseries_default(), 12).unwrap()
}

fn invariants(mmu: &PpcGuest) {
    mmu.hpt().check_invariants().unwrap_or_else(|v| panic!("table invariant broken: {v:?}"));
}

#[test]
fn demand_faults_enter_each_page_once() {
    for format in FORMATS {
        let mut mmu = guest(format);
        assert_eq!(demand_faults(&mut mmu).unwrap(), 1024 + 300 + 16);
        assert_eq!(mmu.counters.entered, 1340);
        invariants(&mmu);
    }
}

#[test]
fn demand_faults_with_64k_pages_enter_each_64k_page_once() {
    let mut mmu =
        PpcGuest::new(slots(), 18, HpteFormat::Isa300, PageSizes::qemu_pseries_default(), 16).unwrap();
    demand_faults(&mut mmu).unwrap();
    // Slot 0 is 64 pages of 64 KiB, slot 2 one; slot 1 (300 frames) stays 4 KiB.
    assert_eq!(mmu.counters.entered, 64 + 300 + 1);
    invariants(&mmu);
}

#[test]
fn gfn_outside_every_slot_is_an_mmio_exit_never_entered() {
    let mut mmu = guest(HpteFormat::PreIsa300);
    outside_slots_is_mmio(&mut mmu, Gfn(5000)).unwrap();
    outside_slots_is_mmio(&mut mmu, Gfn(u64::MAX)).unwrap();
    assert_eq!(mmu.counters.entered, 0);
    invariants(&mmu);
}

fn dirty_case(tracking: Tracking, mode: LogMode) {
    for format in FORMATS {
        for seed in 1..4 {
            let mut mmu = guest(format);
            let r = dirty_rounds(&mut mmu, SlotId(0), tracking, mode, 12, seed)
                .unwrap_or_else(|e| panic!("{format:?} {tracking:?}/{mode:?} seed {seed}: {e}"));
            assert_eq!(r.rounds, 12);
            assert_eq!(r.written, r.reported);
            invariants(&mmu);
            if tracking == Tracking::WriteProtect {
                assert!(mmu.counters.unprotected > 0, "stores were resolved by unprotect");
            }
        }
    }
}

#[test]
fn dirty_rounds_by_write_protection_report_each_written_page_once() {
    dirty_case(Tracking::WriteProtect, LogMode::Bitmap);
}

#[test]
fn dirty_rounds_by_c_bit_report_each_written_page_once() {
    dirty_case(Tracking::HardwareDirty, LogMode::Bitmap);
}

#[test]
fn manual_protect_rounds_report_each_written_page_once() {
    dirty_case(Tracking::WriteProtect, LogMode::ManualProtect);
    dirty_case(Tracking::HardwareDirty, LogMode::ManualProtect);
}

#[test]
fn dirty_ring_rounds_report_each_written_page_once() {
    // A ring needs write protection (the core refuses C-bit tracking there).
    dirty_case(Tracking::WriteProtect, LogMode::Ring);
}

#[test]
fn ageing_by_r_bit_reports_exactly_the_touched_pages() {
    for format in FORMATS {
        for seed in 1..4 {
            let mut mmu = guest(format);
            assert!(ageing(&mut mmu, SlotId(1), NoAccessedBit::ReportOld, seed).unwrap() > 0);
            assert!(ageing(&mut mmu, SlotId(0), NoAccessedBit::ReportOld, seed + 10).unwrap() > 0);
            invariants(&mmu);
        }
    }
}

#[test]
fn invalidation_leaves_entries_absent_and_the_hypervisor_faults_them_in() {
    for format in FORMATS {
        let mut mmu = guest(format);
        demand_faults(&mut mmu).unwrap();
        // Slot 1's first pages are aliased by slot 2: both are zapped.
        let z = invalidation(&mut mmu, SlotId(1), 4, 20, false).unwrap();
        assert_eq!(z, 20 + 12);
        assert_eq!(mmu.counters.faulted_in, 20, "absent entries came back by fault_in, not H_ENTER");
        // The zapped aliases in slot 2 come back on their first access too.
        demand_faults(&mut mmu).unwrap();
        assert_eq!(mmu.counters.faulted_in, 32);
        assert_eq!(mmu.counters.entered, 1340);
        invariants(&mmu);
    }
}

#[test]
fn invalidation_of_16m_pages_zaps_the_whole_page() {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0x4_0000), 8192, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
    let slots = b.build().unwrap();
    let mut mmu = PpcGuest::new(slots, 20, HpteFormat::Isa300, PageSizes::qemu_pseries_16m(), 24).unwrap();
    demand_faults(&mut mmu).unwrap();
    assert_eq!(mmu.counters.entered, 2, "two 16 MiB pages");
    assert_eq!(invalidation(&mut mmu, SlotId(0), 600, 3, true).unwrap(), 1);
    assert_eq!(mmu.counters.faulted_in, 1);
    invariants(&mmu);
}

/// Nine 256-page slots in nine segments whose VSIDs differ only in their low
/// four bits: every page of segment 0's 256 primary groups has eight
/// namesakes, so the ninth of each goes to its secondary group.
fn crowded_slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    for s in 0..9u64 {
        b.create(Memslot::new(
            SlotId(s as u16),
            Gfn(s << 16),
            256,
            Hva(0x1_0000_0000 + (s << 20)),
            SlotFlags::empty(),
        ))
        .unwrap();
    }
    b.build().unwrap()
}

#[test]
fn full_ptegs_overflow_into_the_secondary_group_and_the_suite_still_holds() {
    for format in FORMATS {
        let mut mmu =
            PpcGuest::new(crowded_slots(), 18, format, PageSizes::qemu_pseries_default(), 12).unwrap();
        assert_eq!(demand_faults(&mut mmu).unwrap(), 9 * 256);
        assert_eq!(mmu.counters.secondary, 256, "one page in nine per group");
        assert_eq!(mmu.counters.evicted, 0);
        let r = dirty_rounds(&mut mmu, SlotId(8), Tracking::HardwareDirty, LogMode::Bitmap, 6, 5).unwrap();
        assert_eq!(r.written, r.reported);
        let z = invalidation(&mut mmu, SlotId(8), 10, 30, false).unwrap();
        assert_eq!(z, 30);
        invariants(&mmu);
    }
}

/// One slot of 17 × 2048 pages in one segment: pages `i` and `i + 2048` share
/// a primary group, so every group pair receives 17 pages for its 16 slots and
/// the guest evicts its own entries (H_REMOVE), written ones included.
fn overcrowded_slot() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 17 * 2048, Hva(0x1_0000_0000), SlotFlags::empty())).unwrap();
    b.build().unwrap()
}

#[test]
fn guest_evictions_during_dirty_rounds_lose_no_written_page() {
    // An evicted entry's C bit leaves the hardware: the hypervisor queues it
    // (`GuestHpt::queue_folded_dirty`) and the core's C-bit harvest drains it
    // (`MmuBackend::drain_lost_dirty`): its chain walk would never see it.
    for (tracking, mode) in [
        (Tracking::HardwareDirty, LogMode::Bitmap),
        (Tracking::HardwareDirty, LogMode::ManualProtect),
        (Tracking::WriteProtect, LogMode::Bitmap),
        (Tracking::WriteProtect, LogMode::Ring),
    ] {
        for seed in 1..3 {
            let mut mmu = PpcGuest::new(
                overcrowded_slot(),
                18,
                HpteFormat::Isa300,
                PageSizes::qemu_pseries_default(),
                12,
            )
            .unwrap();
            let r = dirty_rounds(&mut mmu, SlotId(0), tracking, mode, 12, seed)
                .unwrap_or_else(|e| panic!("{tracking:?}/{mode:?} seed {seed}: {e}"));
            assert_eq!(r.written, r.reported);
            assert!(mmu.counters.evicted > 0, "the table overflowed");
            if tracking == Tracking::HardwareDirty {
                assert!(mmu.hpt().lost_dirty_pages() > 0, "written pages were evicted: {:?}", mmu.counters);
            }
            invariants(&mmu);
        }
    }
}
