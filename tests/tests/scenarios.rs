//! The scenario suite against the simulated back end, for every combination
//! of hardware bits and dirty-log mode.

use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::backend::Caps;
use mmu_generic::dirty_log::{LogMode, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{ageing, demand_faults, dirty_rounds, invalidation, outside_slots_is_mmio};
use vmmu_tests::sim::SimMmu;

const AD: Caps = Caps { accessed_bit: true, dirty_bit: true };
const NO_AD: Caps = Caps { accessed_bit: false, dirty_bit: false };

fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty())).unwrap();
    // Slot 2 aliases the first 16 pages of slot 1's host memory.
    b.create(Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY)).unwrap();
    b.build().unwrap()
}

#[test]
fn demand_faults_map_each_page_once() {
    let mut mmu = SimMmu::new(slots(), AD);
    assert_eq!(demand_faults(&mut mmu).unwrap(), 1024 + 300 + 16);
    assert_eq!(mmu.faults_mapped, 1340);
}

#[test]
fn demand_faults_with_huge_pages_map_each_2m_once() {
    let mut mmu = SimMmu::new(slots(), AD);
    mmu.huge_pages = true;
    demand_faults(&mut mmu).unwrap();
    // Slot 0 is two 2 MiB pages; slots 1 and 2 are too small.
    assert_eq!(mmu.faults_mapped, 2 + 300 + 16);
}

#[test]
fn gfn_outside_every_slot_is_an_mmio_exit_never_mapped() {
    let mut mmu = SimMmu::new(slots(), AD);
    outside_slots_is_mmio(&mut mmu, Gfn(5000)).unwrap();
    outside_slots_is_mmio(&mut mmu, Gfn(u64::MAX)).unwrap();
}

fn dirty_case(caps: Caps, huge: bool, tracking: Tracking, mode: LogMode) {
    for seed in 1..4 {
        let mut mmu = SimMmu::new(slots(), caps);
        mmu.huge_pages = huge;
        let r = dirty_rounds(&mut mmu, SlotId(0), tracking, mode, 12, seed)
            .unwrap_or_else(|e| panic!("{tracking:?}/{mode:?} seed {seed}: {e}"));
        assert_eq!(r.rounds, 12);
        assert_eq!(r.written, r.reported);
    }
}

#[test]
fn dirty_rounds_by_write_protection_report_each_written_page_once() {
    dirty_case(NO_AD, false, Tracking::WriteProtect, LogMode::Bitmap);
    dirty_case(AD, true, Tracking::WriteProtect, LogMode::Bitmap);
}

#[test]
fn dirty_rounds_by_dirty_bit_report_each_written_page_once() {
    dirty_case(AD, false, Tracking::HardwareDirty, LogMode::Bitmap);
    dirty_case(AD, true, Tracking::HardwareDirty, LogMode::Bitmap);
}

#[test]
fn manual_protect_rounds_report_each_written_page_once() {
    dirty_case(NO_AD, true, Tracking::WriteProtect, LogMode::ManualProtect);
    dirty_case(AD, false, Tracking::HardwareDirty, LogMode::ManualProtect);
}

#[test]
fn dirty_ring_rounds_report_each_written_page_once() {
    dirty_case(NO_AD, true, Tracking::WriteProtect, LogMode::Ring);
}

#[test]
fn ageing_reports_exactly_the_touched_pages() {
    for seed in 1..4 {
        let mut mmu = SimMmu::new(slots(), AD);
        assert!(ageing(&mut mmu, SlotId(1), NoAccessedBit::ReportOld, seed).unwrap() > 0);
    }
}

#[test]
fn ageing_without_accessed_bit_uses_access_tracking() {
    let mut mmu = SimMmu::new(slots(), NO_AD);
    assert!(ageing(&mut mmu, SlotId(1), NoAccessedBit::AccessTracking, 7).unwrap() > 0);
}

#[test]
fn ageing_without_accessed_bit_reports_old_never_young() {
    let mut mmu = SimMmu::new(slots(), NO_AD);
    assert_eq!(ageing(&mut mmu, SlotId(1), NoAccessedBit::ReportOld, 7).unwrap(), 0);
}

#[test]
fn invalidation_zaps_the_range_and_the_guest_refaults() {
    let mut mmu = SimMmu::new(slots(), AD);
    demand_faults(&mut mmu).unwrap();
    // Slot 1's first pages are aliased by slot 2: both are zapped.
    let z = invalidation(&mut mmu, SlotId(1), 4, 20, false).unwrap();
    assert_eq!(z, 20 + 12);
    let mut mmu = SimMmu::new(slots(), AD);
    mmu.huge_pages = true;
    invalidation(&mut mmu, SlotId(0), 600, 3, true).unwrap();
}
