//! The scenario suite against the simulated back end, for every combination
//! of hardware bits and dirty-log mode.

use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::backend::{Caps, FlushToken, MmuBackend};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{
    ageing, demand_faults, dirty_rounds, dirty_rounds_with, invalidation, outside_slots_is_mmio, touch,
    DirtyLogs, GuestMmu, RingSize, Touch,
};
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
        if mode != LogMode::Ring {
            assert!(r.in_flight_writes > 0, "writes between harvest and flush ran: {r:?}");
        }
        assert_eq!(mmu.stale_tlb_entries(), 0);
    }
}

#[test]
fn rings_smaller_than_the_writes_exit_to_the_harvester_and_lose_nothing() {
    for (size, reserve) in [(16, 4), (8, 0), (2, 1), (4, 3)] {
        for seed in 1..4 {
            let mut mmu = SimMmu::new(slots(), NO_AD);
            let ring = RingSize { size, reserve };
            let r =
                dirty_rounds_with(&mut mmu, SlotId(0), Tracking::WriteProtect, LogMode::Ring, 10, seed, ring)
                    .unwrap_or_else(|e| panic!("ring {size}/{reserve} seed {seed}: {e}"));
            assert!(r.ring_exits > 10, "the ring filled mid-round: {r:?}");
            assert_eq!(r.written, r.reported);
        }
    }
}

/// A leaf the guest dirtied and that another path then write-protected
/// (shadow paging protecting a guest table, H_PROTECT) keeps its D bit:
/// the dirty-bit round must harvest it before the leaf leaves the chain.
#[test]
fn dirty_bit_round_reports_a_page_write_protected_by_another_path() {
    for mode in [LogMode::Bitmap, LogMode::ManualProtect] {
        let mut mmu = SimMmu::new(slots(), AD);
        let s = *mmu.memslots().get(SlotId(0)).unwrap();
        let mut flush = FlushToken::new();
        let mut log =
            SlotDirtyLog::start(&s, Tracking::HardwareDirty, mode, mmu.backend_mut(), &mut flush).unwrap();
        mmu.flush(flush);
        let mut logs = DirtyLogs::default();
        assert_eq!(touch(&mut mmu, Gfn(7), true, &mut logs).unwrap(), Touch::Done(1));
        // Log the write fault's page through the log the harness holds.
        logs.logs.insert(SlotId(0), log);
        assert_eq!(touch(&mut mmu, Gfn(9), true, &mut logs).unwrap(), Touch::Done(1));
        log = logs.logs.remove(&SlotId(0)).unwrap();
        for gfn in [7, 9] {
            let h = mmu.backend().lookup(Gfn(gfn)).unwrap();
            let mut f = FlushToken::new();
            assert!(mmu.backend_mut().write_protect(h, &mut f), "writable before");
            mmu.flush(f);
        }
        let mut words = Vec::new();
        let f = match mode {
            LogMode::Bitmap => log.get_and_clear(mmu.backend_mut(), &mut words).unwrap(),
            _ => log.get(mmu.backend_mut(), &mut words).unwrap(),
        };
        mmu.flush(f);
        assert_eq!(words[0] & (1 << 9), 1 << 9, "{mode:?}: page 9 was written and is reported");
        assert_eq!(log.chain_len(), 0, "no writable leaf is left on the chain");
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

/// Found by the dirty-log fuzz target: a page written, zapped by an
/// invalidation and written again before the harvest is in the ring once.
#[test]
fn a_page_refaulted_after_a_zap_is_pushed_to_the_ring_once() {
    use mmu_generic::addr::HvaRange;
    use mmu_generic::dirty_ring::DirtyRing;
    let mut mmu = SimMmu::new(slots(), NO_AD);
    let s = *mmu.memslots().get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&s, Tracking::WriteProtect, LogMode::Ring, mmu.backend_mut(), &mut flush)
        .unwrap();
    mmu.flush(flush);
    let mut logs = DirtyLogs { ring: Some(DirtyRing::new(8, 0).unwrap()), ..DirtyLogs::default() };
    logs.logs.insert(SlotId(0), log);
    touch(&mut mmu, Gfn(5), true, &mut logs).unwrap();
    let start = Hva(s.hva().0 + 5 * 4096);
    mmu.zap_hva_range(HvaRange { start, end: Hva(start.0 + 4096) }, &logs);
    assert_eq!(touch(&mut mmu, Gfn(5), true, &mut logs).unwrap(), Touch::Done(1));
    let mut got = Vec::new();
    let mut fetch = 0;
    logs.ring.as_ref().unwrap().harvest(&mut fetch, |_, off| got.push(off));
    assert_eq!(got, [5]);
}

/// Replacing a slot (same gfns, other host memory; or deleted and recreated
/// under another number in one build) zaps every leaf of the old slot
/// through its reverse map: nothing maps the old host range afterwards, so
/// its invalidation has nothing left to find, and the guest refaults onto
/// the new backing.
#[test]
fn a_replaced_slot_leaves_no_leaf_mapping_its_old_host_range() {
    use mmu_generic::addr::HvaRange;
    for recreate in [false, true] {
        let mut mmu = SimMmu::new(slots(), AD);
        demand_faults(&mut mmu).unwrap();
        let old = *mmu.memslots().get(SlotId(0)).unwrap();
        let mut b = mmu.memslots().to_builder();
        b.delete(SlotId(0)).unwrap();
        let id = if recreate { SlotId(7) } else { SlotId(0) };
        b.create(Memslot::new(id, old.base_gfn(), old.npages(), Hva(0x5000_0000), SlotFlags::empty()))
            .unwrap();
        let new = b.build().unwrap();
        assert!(new.generation() > mmu.memslots().generation());
        let logs = DirtyLogs::default();
        assert_eq!(mmu.set_memslots(new, &logs), 1024, "every leaf of the old slot is zapped");
        assert_eq!(mmu.stale_tlb_entries(), 0);
        // The old host range: nothing maps it any more.
        assert_eq!(mmu.zap_hva_range(old.hvas(), &logs), 0);
        let mut logs = DirtyLogs::default();
        for g in [0, 511, 1023] {
            assert_eq!(
                touch(&mut mmu, Gfn(g), false, &mut logs).unwrap(),
                Touch::Done(1),
                "refaults onto the new backing"
            );
        }
        let fresh = HvaRange { start: Hva(0x5000_0000), end: Hva(0x5000_0000 + 1024 * 4096) };
        assert_eq!(mmu.zap_hva_range(fresh, &logs), 3);
        // Other slots kept their leaves.
        assert_eq!(touch(&mut mmu, Gfn(0x10000), false, &mut logs).unwrap(), Touch::Done(0));
    }
}
