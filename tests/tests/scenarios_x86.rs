//! The scenario suite against arch-x86's TDP engine: EPT with A/D flags, EPT
//! without them, and NPT, at 4 and 5 levels, through [`TdpGuest`] (the real
//! fault path, the software walker behind a simulated TLB).
#![cfg(feature = "x86")]

use arch_x86::format::{PageSize, TdpFormat, WalkLength};
use mmu_generic::addr::{Gfn, Hva, HvaRange, PAGE_SIZE};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{DirtyLogError, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{
    ageing, demand_faults, dirty_rounds, invalidation, outside_slots_is_mmio, touch, DirtyLogs, GuestMmu,
    Touch,
};
use vmmu_tests::x86::{ept_ad, ept_no_ad, npt, TdpGuest};

const WALKS: [WalkLength; 2] = [WalkLength::Four, WalkLength::Five];

/// The sim suite's slots: slot 0 is two 2 MiB pages, slot 1 is too small for
/// one, slot 2 (read-only) aliases slot 1's first 16 host pages.
fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY)).unwrap();
    b.build().unwrap()
}

fn guest<F: TdpFormat>(format: F, host_page: PageSize) -> TdpGuest<F> {
    TdpGuest::new(format, &slots(), host_page).expect("an empty root fits the table memory")
}

/// Runs `scenario`, then checks that nothing went wrong underneath it.
fn run<F: TdpFormat, T>(
    what: &str,
    g: &mut TdpGuest<F>,
    scenario: impl FnOnce(&mut TdpGuest<F>) -> Result<T, String>,
) -> T {
    let name = format!("{what} on {:?}", g.engine().format());
    let r = scenario(g).unwrap_or_else(|e| panic!("{name}: {e}\n  adapter: {:?}", g.errors()));
    g.check_clean().unwrap_or_else(|e| panic!("{name}: {e}"));
    r
}

/// Calls `f` with each of the six formats: EPT A/D, EPT, NPT × 4, 5 levels.
macro_rules! each_format {
    (|$fmt:ident| $body:expr) => {
        for walk in WALKS {
            {
                let $fmt = ept_ad(walk);
                $body
            }
            {
                let $fmt = ept_no_ad(walk);
                $body
            }
            {
                let $fmt = npt(walk);
                $body
            }
        }
    };
}

#[test]
fn demand_faults_map_each_page_once() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size4K);
        assert_eq!(run("demand faults", &mut g, demand_faults), 1024 + 300 + 16);
        assert_eq!(g.stats().faults_mapped, 1340);
        assert_eq!(g.engine().lookup(Gfn(700)).map(|l| l.size), Some(PageSize::Size4K));
    });
}

#[test]
fn demand_faults_with_huge_pages_map_each_2m_once() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size2M);
        assert_eq!(run("huge demand faults", &mut g, demand_faults), 2 + 300 + 16);
        assert_eq!(g.stats().faults_mapped, 2 + 300 + 16);
        let l = g.engine().lookup(Gfn(700)).expect("mapped");
        assert_eq!((l.size, l.pfn.0), (PageSize::Size2M, 0x1_0000 + 700 + vmmu_tests::x86::HOST_PFN_OFFSET));
        // Slot 1 starts 2 MiB aligned but holds less than 2 MiB.
        assert_eq!(g.engine().lookup(Gfn(0x10000)).map(|l| l.size), Some(PageSize::Size4K));
    });
}

#[test]
fn a_1g_slot_on_1g_host_pages_is_one_leaf() {
    let gib = 1 << 18;
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(gib), gib, Hva(0x40_0000_0000), SlotFlags::empty())).unwrap();
    let slots = b.build().unwrap();
    each_format!(|f| {
        let mut g = TdpGuest::new(f, &slots, PageSize::Size1G).unwrap();
        let mut logs = DirtyLogs::default();
        for i in 0..64u64 {
            let gfn = Gfn(gib + (i * 4099) % gib);
            assert_eq!(touch(&mut g, gfn, i % 2 == 0, &mut logs).unwrap(), Touch::Done(u32::from(i == 0)));
        }
        assert_eq!(g.stats().faults_mapped, 1);
        assert_eq!(g.engine().lookup(Gfn(gib + 12345)).map(|l| l.size), Some(PageSize::Size1G));
        g.check_clean().unwrap();
    });
}

#[test]
fn gfn_outside_every_slot_is_an_mmio_exit_never_mapped() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size2M);
        // Between slots, beyond a 4-level walk, beyond a 5-level walk, beyond
        // 64-bit addresses.
        for gfn in [5000, 0x15000, 1 << 36, 1 << 45, u64::MAX] {
            run("MMIO", &mut g, |g| outside_slots_is_mmio(g, Gfn(gfn)));
        }
        assert_eq!(g.stats().faults_mapped, 0);
        assert_eq!(g.engine().tables_in_use(), 1, "an MMIO exit builds no table");
    });
}

#[test]
fn a_write_to_a_read_only_slot_is_denied_and_a_read_is_mapped() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size4K);
        let mut logs = DirtyLogs::default();
        assert_eq!(touch(&mut g, Gfn(0x20003), true, &mut logs).unwrap(), Touch::Denied);
        assert_eq!(touch(&mut g, Gfn(0x20003), false, &mut logs).unwrap(), Touch::Done(1));
        assert_eq!(touch(&mut g, Gfn(0x20003), true, &mut logs).unwrap(), Touch::Denied);
        g.check_clean().unwrap();
    });
}

fn dirty_case<F: TdpFormat>(format: F, walk_seeds: u64, tracking: Tracking, mode: LogMode) {
    for huge in [false, true] {
        for seed in 1..=walk_seeds {
            let host = if huge { PageSize::Size2M } else { PageSize::Size4K };
            let mut g = guest(format.clone(), host);
            let what = format!("{tracking:?}/{mode:?} huge {huge} seed {seed}");
            let r = run(&what, &mut g, |g| dirty_rounds(g, SlotId(0), tracking, mode, 12, seed));
            assert_eq!(r.rounds, 12);
            assert_eq!(r.written, r.reported);
            // Logged memory is mapped with 4 KiB leaves only.
            for gfn in (0..1024).step_by(97) {
                if let Some(l) = g.engine().lookup(Gfn(gfn)) {
                    assert_eq!(l.size, PageSize::Size4K, "{what}: gfn {gfn}");
                }
            }
        }
    }
}

/// 4-level walks get the sim suite's three seeds; 5-level walks two (the
/// tables differ only above the leaves).
fn seeds(walk: WalkLength) -> u64 {
    match walk {
        WalkLength::Four => 3,
        WalkLength::Five => 2,
    }
}

#[test]
fn dirty_rounds_by_write_protection_report_each_written_page_once() {
    each_format!(|f| dirty_case(f, seeds(f.walk), Tracking::WriteProtect, LogMode::Bitmap));
}

#[test]
fn manual_protect_rounds_by_write_protection_report_each_written_page_once() {
    each_format!(|f| dirty_case(f, seeds(f.walk), Tracking::WriteProtect, LogMode::ManualProtect));
}

#[test]
fn dirty_ring_rounds_report_each_written_page_once() {
    each_format!(|f| dirty_case(f, seeds(f.walk), Tracking::WriteProtect, LogMode::Ring));
}

#[test]
fn dirty_rounds_by_dirty_bit_report_each_written_page_once() {
    for walk in WALKS {
        dirty_case(ept_ad(walk), seeds(walk), Tracking::HardwareDirty, LogMode::Bitmap);
        dirty_case(npt(walk), seeds(walk), Tracking::HardwareDirty, LogMode::Bitmap);
    }
}

#[test]
fn manual_protect_rounds_by_dirty_bit_report_each_written_page_once() {
    for walk in WALKS {
        dirty_case(ept_ad(walk), seeds(walk), Tracking::HardwareDirty, LogMode::ManualProtect);
        dirty_case(npt(walk), seeds(walk), Tracking::HardwareDirty, LogMode::ManualProtect);
    }
}

fn start_refused<F: TdpFormat>(format: F, tracking: Tracking, mode: LogMode) -> DirtyLogError {
    let mut g = guest(format, PageSize::Size4K);
    demand_faults(&mut g).unwrap();
    let s = *g.memslots().get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let r = SlotDirtyLog::start(&s, tracking, mode, g.backend_mut(), &mut flush);
    g.flush(flush);
    r.expect_err("the core must refuse this log")
}

#[test]
fn dirty_bit_tracking_is_refused_by_the_core_where_the_format_has_no_dirty_bit() {
    for walk in WALKS {
        for mode in [LogMode::Bitmap, LogMode::ManualProtect] {
            assert_eq!(
                start_refused(ept_no_ad(walk), Tracking::HardwareDirty, mode),
                DirtyLogError::NoDirtyBit
            );
        }
        // And rings need write protection whatever the format.
        let ring = LogMode::Ring;
        assert_eq!(
            start_refused(ept_ad(walk), Tracking::HardwareDirty, ring),
            DirtyLogError::RingNeedsWriteProtect
        );
        assert_eq!(
            start_refused(npt(walk), Tracking::HardwareDirty, ring),
            DirtyLogError::RingNeedsWriteProtect
        );
    }
}

#[test]
fn ageing_by_accessed_bit_reports_exactly_the_touched_pages() {
    for walk in WALKS {
        for seed in 1..=seeds(walk) {
            for policy in [NoAccessedBit::ReportOld, NoAccessedBit::AccessTracking] {
                let mut g = guest(ept_ad(walk), PageSize::Size4K);
                assert!(run("ageing", &mut g, |g| ageing(g, SlotId(1), policy, seed)) > 0);
                assert_eq!(g.stats().faults_restored, 0);
                let mut g = guest(npt(walk), PageSize::Size4K);
                assert!(run("ageing", &mut g, |g| ageing(g, SlotId(1), policy, seed)) > 0);
            }
        }
    }
}

#[test]
fn ageing_without_accessed_bit_uses_access_tracking() {
    for walk in WALKS {
        let mut g = guest(ept_no_ad(walk), PageSize::Size4K);
        let young =
            run("access tracking", &mut g, |g| ageing(g, SlotId(1), NoAccessedBit::AccessTracking, 7));
        assert!(young > 0);
        // Every touched page came back through the fault that restores it.
        assert_eq!(g.stats().faults_restored, young);
        assert_eq!(g.engine().stats().restores, young);
    }
}

#[test]
fn ageing_without_accessed_bit_reports_old_never_young() {
    for walk in WALKS {
        let mut g = guest(ept_no_ad(walk), PageSize::Size4K);
        assert_eq!(run("report old", &mut g, |g| ageing(g, SlotId(1), NoAccessedBit::ReportOld, 7)), 0);
        assert_eq!(g.stats().faults_restored, 0);
    }
}

#[test]
fn invalidation_zaps_the_range_and_the_guest_refaults() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size4K);
        run("demand faults", &mut g, demand_faults);
        // Slot 1's first pages are aliased by slot 2: both are zapped.
        let z = run("invalidation", &mut g, |g| invalidation(g, SlotId(1), 4, 20, false));
        assert_eq!(z, 20 + 12);
        assert!(g.engine().lookup(Gfn(0x10000 + 3)).is_some());
    });
}

#[test]
fn invalidation_of_part_of_a_huge_page_zaps_it_whole_and_the_guest_refaults() {
    each_format!(|f| {
        let mut g = guest(f, PageSize::Size2M);
        let z = run("huge invalidation", &mut g, |g| invalidation(g, SlotId(0), 600, 3, true));
        assert_eq!(z, 1, "one 2 MiB leaf covers pages 600..603");
        // The first huge page was untouched by the zap; the second was
        // refaulted whole.
        for gfn in [0, 600, 1023] {
            assert_eq!(g.engine().lookup(Gfn(gfn)).map(|l| l.size), Some(PageSize::Size2M));
        }
        assert_eq!(g.stats().faults_mapped, 2 + 1);
    });
}

/// A leaf zapped between rounds takes its D bit with it; `note_zapped` folds
/// it into the log, so the write is still reported.
fn zapped_dirty_leaf_is_still_reported<F: TdpFormat>(f: F) {
    let mut g = guest(f, PageSize::Size4K);
    let mut logs = DirtyLogs::default();
    for gfn in 0..64 {
        touch(&mut g, Gfn(gfn), true, &mut logs).unwrap();
    }
    let s = *g.memslots().get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&s, Tracking::HardwareDirty, LogMode::Bitmap, g.backend_mut(), &mut flush)
        .unwrap();
    g.flush(flush);
    logs.logs.insert(SlotId(0), log);
    for gfn in [3, 40] {
        touch(&mut g, Gfn(gfn), true, &mut logs).unwrap();
    }
    let start = Hva(s.hva().0 + 40 * PAGE_SIZE);
    assert_eq!(g.zap_hva_range(HvaRange { start, end: Hva(start.0 + 8 * PAGE_SIZE) }, &logs), 8);
    let mut words = Vec::new();
    let log = logs.logs.get_mut(&SlotId(0)).unwrap();
    let fl = log.get_and_clear(g.backend_mut(), &mut words).unwrap();
    g.flush(fl);
    assert_eq!(words[0], (1 << 3) | (1 << 40));
    g.check_clean().unwrap();
}

#[test]
fn invalidation_under_dirty_bit_logging_keeps_the_writes_of_zapped_leaves() {
    for walk in WALKS {
        zapped_dirty_leaf_is_still_reported(ept_ad(walk));
        zapped_dirty_leaf_is_still_reported(npt(walk));
    }
}

/// A write fault in a ring-logged slot whose ring is full: the embedder
/// answers `Retry` and leaves the page write-protected, until the harvester
/// has collected and reset the ring.
fn full_ring_holds_the_write_back<F: TdpFormat>(f: F) {
    use mmu_generic::dirty_ring::DirtyRing;
    use vmmu_tests::harness::{FaultOutcome, HwFault};
    let mut g = guest(f, PageSize::Size4K);
    let mut logs = DirtyLogs { ring: Some(DirtyRing::new(4, 1).unwrap()), ..DirtyLogs::default() };
    let s = *g.memslots().get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let log =
        SlotDirtyLog::start(&s, Tracking::WriteProtect, LogMode::Ring, g.backend_mut(), &mut flush).unwrap();
    g.flush(flush);
    logs.logs.insert(SlotId(0), log);
    for gfn in 0..4 {
        assert_eq!(touch(&mut g, Gfn(gfn), true, &mut logs).unwrap(), Touch::Done(1));
    }
    assert_eq!(logs.soft_full_exits, 2);
    // A read maps page 9 read-only; the write the full ring cannot log waits.
    assert_eq!(touch(&mut g, Gfn(9), false, &mut logs).unwrap(), Touch::Done(1));
    assert_eq!(g.handle_fault(Gfn(9), true, &mut logs), FaultOutcome::Retry);
    assert_eq!(g.hw_access(Gfn(9), true), Err(HwFault::WriteProtected));
    let ring = logs.ring.as_ref().unwrap();
    let mut fetch = 0;
    assert_eq!(ring.harvest(&mut fetch, |_, _| {}), 4);
    let log = logs.logs.get(&SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    ring.reset(|_, off| log.reset_ring_entry(g.backend_mut(), &s, off, &mut flush).unwrap());
    g.flush(flush);
    // The collected pages are write-protected again; page 9 may now be written.
    assert_eq!(g.hw_access(Gfn(2), true), Err(HwFault::WriteProtected));
    assert_eq!(touch(&mut g, Gfn(9), true, &mut logs).unwrap(), Touch::Done(1));
    g.check_clean().unwrap();
}

#[test]
fn a_full_dirty_ring_holds_the_write_back_until_reset() {
    each_format!(|f| full_ring_holds_the_write_back(f));
}

/// Shadow paging's guest A/D updates are hypervisor writes to guest table
/// pages: the fault marks each table page whose entry it changed (and only
/// those), and an emulated write marks its page before writing. A refused
/// mark (full ring) makes the fault retry with the mark kept.
#[test]
fn shadow_guest_ad_updates_and_emulated_writes_are_marked() {
    use arch_x86::frame::SimMemory;
    use arch_x86::shadow::mode::{A, P, RW, US};
    use arch_x86::shadow::{
        AccessKind, AccessOp, CpuFeatures, DirtyTracker, GuestCpu, GuestMode, ShadowConfig, ShadowError,
        ShadowFault, ShadowMmu, SimGuestRam,
    };
    use arch_x86::testing::LinearHost;
    use mmu_generic::addr::{Gpa, Gva, Pfn};
    use mmu_generic::pte_list::PteHandle;

    #[derive(Default)]
    struct Marks {
        marked: Vec<u64>,
        refuse: bool,
    }
    impl DirtyTracker for Marks {
        fn write_protected(&self, _: SlotId) -> bool {
            false
        }
        fn note_writable(&mut self, _: SlotId, _: Gfn, _: PteHandle) -> bool {
            true
        }
        fn mark(&mut self, _: SlotId, gfn: Gfn) -> bool {
            if self.refuse {
                return false;
            }
            self.marked.push(gfn.0);
            true
        }
    }

    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 512, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
    let ram = SimGuestRam::new(&[(Gfn(0), 512)]);
    // PD at 0x1000 (A already set), page table at 0x2000 (A clear).
    ram.write(Gpa(0x1000), 4, 0x2000 | P | RW | US | A).unwrap();
    ram.write(Gpa(0x2000 + 4 * 5), 4, 0x9000 | P | RW | US).unwrap();
    let mut mmu = ShadowMmu::new(
        ShadowConfig::new(CpuFeatures::typical()),
        SimMemory::new(Pfn(0x8_0000), 64),
        ram,
        LinearHost::new(0x10_0000, arch_x86::format::PageSize::Size4K),
        b.build().unwrap(),
    );
    let cpu = GuestCpu::new(GuestMode::Bits32, 0x1000);
    mmu.load_cr3(&cpu).unwrap();
    let read = AccessKind::user(AccessOp::Read);
    let mut t = Marks { refuse: true, ..Marks::default() };
    assert_eq!(
        mmu.page_fault(&cpu, Gva(0x5123), read, &mut t),
        Ok(ShadowFault::Retry),
        "a refused mark retries"
    );
    t.refuse = false;
    assert_eq!(mmu.page_fault(&cpu, Gva(0x5123), read, &mut t), Ok(ShadowFault::Fixed));
    assert_eq!(t.marked, [2], "the kept mark of the table page whose A bit the walk set, and no other");
    // An emulated write marks its page first; refused, it writes nothing.
    let mut t = Marks { refuse: true, ..Marks::default() };
    assert_eq!(
        mmu.emulated_write_logged(Gpa(0x3008), 4, 7, &mut t),
        Err(ShadowError::DirtyRingFull(Gpa(0x3008)))
    );
    t.refuse = false;
    mmu.emulated_write_logged(Gpa(0x3008), 4, 7, &mut t).unwrap();
    assert_eq!(t.marked, [3]);
    mmu.take_flush().flush(&mut mmu_generic::backend::NoTlb);
}

mod shadow {
    use super::*;
    use arch_x86::shadow::GuestMode;
    use vmmu_tests::harness::{self as h};
    use vmmu_tests::x86::ShadowGuest;

    #[test]
    fn scenario_demand_faults_map_each_page_once() {
        let mut g = ShadowGuest::new(GuestMode::Four);
        assert_eq!(h::demand_faults(&mut g).unwrap(), 1024 + 300 + 16 + 2);
    }

    #[test]
    fn scenario_outside_slots_is_mmio() {
        let mut g = ShadowGuest::new(GuestMode::Four);
        h::outside_slots_is_mmio(&mut g, Gfn(5000)).unwrap();
        h::outside_slots_is_mmio(&mut g, Gfn(0x4_0000)).unwrap();
    }

    #[test]
    fn scenario_dirty_rounds_in_every_mode() {
        for (tracking, mode) in [
            (Tracking::WriteProtect, LogMode::Bitmap),
            (Tracking::WriteProtect, LogMode::ManualProtect),
            (Tracking::WriteProtect, LogMode::Ring),
            (Tracking::HardwareDirty, LogMode::Bitmap),
            (Tracking::HardwareDirty, LogMode::ManualProtect),
        ] {
            for seed in 1..4 {
                let mut g = ShadowGuest::new(GuestMode::Four);
                g.mmu.set_track_zapped_dirty(tracking == Tracking::HardwareDirty);
                let r = h::dirty_rounds(&mut g, SlotId(0), tracking, mode, 12, seed)
                    .unwrap_or_else(|e| panic!("{tracking:?}/{mode:?} seed {seed}: {e}"));
                assert_eq!(r.rounds, 12);
                assert_eq!(r.written, r.reported);
            }
        }
    }

    #[test]
    fn scenario_ageing_reports_exactly_the_touched_pages() {
        for seed in 1..4 {
            let mut g = ShadowGuest::new(GuestMode::Four);
            let young =
                h::ageing(&mut g, SlotId(1), mmu_generic::age::NoAccessedBit::ReportOld, seed).unwrap();
            assert!(young > 0);
        }
    }

    #[test]
    fn scenario_invalidation_zaps_the_range_only() {
        let mut g = ShadowGuest::new(GuestMode::Four);
        assert_eq!(h::invalidation(&mut g, SlotId(0), 100, 50, false).unwrap(), 50);
        // Slots 1 and 2 alias: invalidating slot 1's first pages zaps both.
        let mut g = ShadowGuest::new(GuestMode::Four);
        h::demand_faults(&mut g).unwrap();
        let n = h::invalidation(&mut g, SlotId(1), 0, 20, false).unwrap();
        assert_eq!(n, 20 + 16);
    }

    #[test]
    fn memslot_changes_drop_every_shadow_page_and_deleted_memory_becomes_mmio() {
        let mut g = ShadowGuest::new(GuestMode::Four);
        h::demand_faults(&mut g).unwrap();
        assert!(g.mmu.pages() > 0);
        let mut b = ShadowGuest::scenario_slots(GuestMode::Four).to_builder();
        b.delete(SlotId(1)).unwrap();
        g.mmu.set_memslots(b.build().unwrap());
        assert_eq!(g.mmu.pages(), 0);
        assert_eq!(g.mmu.rmap().pool().bytes_in_use(), 0);
        let cpu = g.cpu;
        g.mmu.load_cr3(&cpu).unwrap();
        let mut logs = h::DirtyLogs::default();
        assert_eq!(touch(&mut g, Gfn(0x10005), false, &mut logs), Ok(h::Touch::Mmio));
        assert_eq!(touch(&mut g, Gfn(5), true, &mut logs), Ok(h::Touch::Done(1)));
        let mut outside = 0;
        g.mmu.for_each_mapping(|gfn, _, _| outside += u32::from(g.mmu.memslots().lookup(gfn).is_none()));
        assert_eq!(outside, 0);
    }
}
