//! The scenario suite over every back end: one table ([`backends!`] at the
//! end of the generic half) and one `#[test]` per (scenario, back end), named
//! `BACKEND::SCENARIO`.
//!
//! The back ends: the simulated back end (with and without accessed/dirty
//! bits, with and without 2 MiB pages), arch-x86's TDP engine (EPT with and
//! without A/D flags, NPT; 4- and 5-level walks; 4 KiB and 2 MiB host pages),
//! arch-x86's shadow paging in every guest mode (32-bit, PAE, 4-level,
//! 5-level), and arch-ppc-book3s's `GuestHpt` in both HPTE layouts. Each
//! back end says what it checks after every scenario ([`Backend::check`]:
//! the sim's and the TDP adapter's TLB audits, the TDP adapter's engine
//! errors, the hashed table's invariants) and what it counts.
//!
//! Back-end-specific tests that do not fit the table follow, named.

#![cfg(all(feature = "x86", feature = "ppc"))]

use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::pagesize::PageSizes;
use arch_x86::format::{PageSize, TdpFormat, WalkLength};
use arch_x86::shadow::GuestMode;
use mmu_generic::addr::{Gfn, Hva, HvaRange, PAGE_SIZE};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::backend::{Caps, FlushToken, MmuBackend};
use mmu_generic::dirty_log::{DirtyLogError, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{
    ageing, demand_faults, dirty_rounds, dirty_rounds_with, invalidation, outside_slots_is_mmio, touch,
    DirtyLogs, DirtyReport, GuestMmu, RingSize, Touch,
};
use vmmu_tests::ppc::PpcGuest;
use vmmu_tests::sim::SimMmu;
use vmmu_tests::x86::{ept_ad, ept_no_ad, npt, ShadowGuest, TdpGuest};

const AD: Caps = Caps { accessed_bit: true, dirty_bit: true };
const NO_AD: Caps = Caps { accessed_bit: false, dirty_bit: false };
const FORMATS: [HpteFormat; 2] = [HpteFormat::PreIsa300, HpteFormat::Isa300];
const WALKS: [WalkLength; 2] = [WalkLength::Four, WalkLength::Five];

/// The common layout: slot 0 is two 2 MiB pages, slot 1 is too small for
/// one, slot 2 (read-only) aliases the first 16 pages of slot 1's host
/// memory. (The shadow guest adds slot 3, its own page tables.)
fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY)).unwrap();
    b.build().unwrap()
}

// ----- the generic half: one scenario, any back end -----

/// What a back end adds to the generic scenarios: its own checks and counts.
trait Backend: GuestMmu + Sized {
    /// Checked after every scenario.
    fn check(&self) -> Result<(), String>;
    /// Pages beyond the common slots (the shadow guest's tables).
    fn extra_pages(&self) -> u64 {
        0
    }
    /// Leaves installed by faults, where the adapter counts them.
    fn mapped(&self) -> Option<u64>;
    /// The gfns outside every slot that must be MMIO exits.
    fn mmio_gfns(&self) -> &'static [u64] {
        &[5000, u64::MAX]
    }
    /// The dirty-log (tracking, mode) pairs the core accepts for the format.
    fn dirty_modes(&self) -> Vec<(Tracking, LogMode)> {
        let mut v = vec![
            (Tracking::WriteProtect, LogMode::Bitmap),
            (Tracking::WriteProtect, LogMode::ManualProtect),
            (Tracking::WriteProtect, LogMode::Ring),
        ];
        if self.backend().caps().dirty_bit {
            v.extend([
                (Tracking::HardwareDirty, LogMode::Bitmap),
                (Tracking::HardwareDirty, LogMode::ManualProtect),
            ]);
        }
        v
    }
    /// Before a dirty-logging run.
    fn prepare_dirty(&mut self, _tracking: Tracking) {}
    /// After demand faults.
    fn after_demand(&self, _huge: bool) {}
    /// After the MMIO scenario.
    fn after_mmio(&self) {}
    /// After a dirty-logging run.
    fn after_dirty(&self, _tracking: Tracking, _mode: LogMode, _r: &DirtyReport) {}
    /// After an ageing run that found `young` pages.
    fn after_ageing(&self, _policy: NoAccessedBit, _young: u64) {}
    /// After `pages` pages of slot 1 were invalidated, `zapped` leaves went.
    fn after_invalidation(&mut self, _pages: u64, _zapped: usize) {}
    /// After part of a huge page was invalidated.
    fn after_huge_invalidation(&self) {}
}

fn checked<B: Backend>(what: &str, g: &B) {
    g.check().unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn demand<B: Backend>(make: fn() -> B, huge: bool) {
    let mut g = make();
    let want = if huge { 2 + 300 + 16 } else { 1024 + 300 + 16 } + g.extra_pages();
    let faults = demand_faults(&mut g).unwrap_or_else(|e| panic!("demand faults: {e}"));
    assert_eq!(faults, want);
    if let Some(m) = g.mapped() {
        assert_eq!(m, want, "leaves installed");
    }
    g.after_demand(huge);
    checked("demand faults", &g);
}

fn mmio<B: Backend>(make: fn() -> B) {
    let mut g = make();
    for &gfn in g.mmio_gfns() {
        outside_slots_is_mmio(&mut g, Gfn(gfn)).unwrap_or_else(|e| panic!("MMIO {gfn:#x}: {e}"));
    }
    if let Some(m) = g.mapped() {
        assert_eq!(m, 0, "an MMIO exit maps nothing");
    }
    g.after_mmio();
    checked("MMIO", &g);
}

fn dirty<B: Backend>(make: fn() -> B, seeds: u64) {
    for (tracking, mode) in make().dirty_modes() {
        for seed in 1..=seeds {
            let mut g = make();
            g.prepare_dirty(tracking);
            let what = format!("{tracking:?}/{mode:?} seed {seed}");
            let r = dirty_rounds(&mut g, SlotId(0), tracking, mode, 12, seed)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(r.rounds, 12, "{what}");
            assert_eq!(r.written, r.reported, "{what}");
            g.after_dirty(tracking, mode, &r);
            checked(&what, &g);
        }
    }
}

fn ageing_case<B: Backend>(make: fn() -> B, huge: bool, seeds: u64) {
    // Slot 0 holds 2 MiB leaves on huge back ends: one young leaf makes 512
    // pages young, so only slot 1 (too small for one) is aged there.
    let slots: &[SlotId] = if huge { &[SlotId(1)] } else { &[SlotId(1), SlotId(0)] };
    for policy in [NoAccessedBit::ReportOld, NoAccessedBit::AccessTracking] {
        for seed in (1..=seeds).chain([7]) {
            for &slot in slots {
                let mut g = make();
                let what = format!("{policy:?} slot {} seed {seed}", slot.0);
                let young = ageing(&mut g, slot, policy, seed).unwrap_or_else(|e| panic!("{what}: {e}"));
                if g.backend().caps().accessed_bit || policy == NoAccessedBit::AccessTracking {
                    assert!(young > 0, "{what}: the touched pages are young");
                } else {
                    assert_eq!(young, 0, "{what}: report-old never reports young");
                }
                g.after_ageing(policy, young);
                checked(&what, &g);
            }
        }
    }
}

fn invalidation_case<B: Backend>(make: fn() -> B, huge: bool) {
    if huge {
        let mut g = make();
        let z = invalidation(&mut g, SlotId(0), 600, 3, true).unwrap_or_else(|e| panic!("huge: {e}"));
        assert_eq!(z, 1, "one 2 MiB leaf covers pages 600..603");
        if let Some(m) = g.mapped() {
            assert_eq!(m, 2 + 1, "the first huge page was untouched by the zap; the second refaulted whole");
        }
        g.after_huge_invalidation();
        checked("huge invalidation", &g);
        return;
    }
    // Slot 1's first pages are aliased by slot 2: both are zapped.
    for (first, pages, want) in [(4, 20, 20 + 12), (0, 20, 20 + 16)] {
        let mut g = make();
        demand_faults(&mut g).unwrap();
        let z = invalidation(&mut g, SlotId(1), first, pages, false)
            .unwrap_or_else(|e| panic!("slot 1 from {first}: {e}"));
        assert_eq!(z, want, "slot 1 from {first}");
        g.after_invalidation(pages, z);
        checked("invalidation", &g);
    }
    let mut g = make();
    assert_eq!(invalidation(&mut g, SlotId(0), 100, 50, false).unwrap(), 50);
    checked("invalidation", &g);
}

// ----- the back ends -----

impl Backend for SimMmu {
    fn check(&self) -> Result<(), String> {
        match self.stale_tlb_entries() {
            0 => Ok(()),
            n => Err(format!("{n} stale TLB entries")),
        }
    }
    fn mapped(&self) -> Option<u64> {
        Some(self.faults_mapped)
    }
    fn after_dirty(&self, _: Tracking, mode: LogMode, r: &DirtyReport) {
        if mode != LogMode::Ring {
            assert!(r.in_flight_writes > 0, "writes between harvest and flush ran: {r:?}");
        }
    }
}

impl<F: TdpFormat> Backend for TdpGuest<F> {
    fn check(&self) -> Result<(), String> {
        self.check_clean()
            .map_err(|e| format!("on {:?}: {e}; adapter: {:?}", self.engine().format(), self.errors()))
    }
    fn mapped(&self) -> Option<u64> {
        Some(self.stats().faults_mapped)
    }
    fn mmio_gfns(&self) -> &'static [u64] {
        // Between slots, beyond a 4-level walk, beyond a 5-level walk, beyond
        // 64-bit addresses.
        &[5000, 0x15000, 1 << 36, 1 << 45, u64::MAX]
    }
    fn after_demand(&self, huge: bool) {
        let l = self.engine().lookup(Gfn(700)).expect("mapped");
        if huge {
            assert_eq!(
                (l.size, l.pfn.0),
                (PageSize::Size2M, 0x1_0000 + 700 + vmmu_tests::x86::HOST_PFN_OFFSET)
            );
            // Slot 1 starts 2 MiB aligned but holds less than 2 MiB.
            assert_eq!(self.engine().lookup(Gfn(0x10000)).map(|l| l.size), Some(PageSize::Size4K));
        } else {
            assert_eq!(l.size, PageSize::Size4K);
        }
    }
    fn after_mmio(&self) {
        assert_eq!(self.engine().tables_in_use(), 1, "an MMIO exit builds no table");
    }
    fn after_dirty(&self, tracking: Tracking, mode: LogMode, _: &DirtyReport) {
        // Logged memory is mapped with 4 KiB leaves only.
        for gfn in (0..1024).step_by(97) {
            if let Some(l) = self.engine().lookup(Gfn(gfn)) {
                assert_eq!(l.size, PageSize::Size4K, "{tracking:?}/{mode:?}: gfn {gfn}");
            }
        }
    }
    fn after_ageing(&self, policy: NoAccessedBit, young: u64) {
        if !self.backend().caps().accessed_bit && policy == NoAccessedBit::AccessTracking {
            // Every touched page came back through the fault that restores it.
            assert_eq!(self.stats().faults_restored, young);
            assert_eq!(self.engine().stats().restores, young);
        } else {
            assert_eq!(self.stats().faults_restored, 0);
        }
    }
    fn after_invalidation(&mut self, _: u64, _: usize) {
        assert!(self.engine().lookup(Gfn(0x10000 + 3)).is_some());
    }
    fn after_huge_invalidation(&self) {
        for gfn in [0, 600, 1023] {
            assert_eq!(self.engine().lookup(Gfn(gfn)).map(|l| l.size), Some(PageSize::Size2M));
        }
    }
}

impl Backend for ShadowGuest {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
    fn extra_pages(&self) -> u64 {
        ShadowGuest::tables(self.cpu.mode).1
    }
    fn mapped(&self) -> Option<u64> {
        None
    }
    fn mmio_gfns(&self) -> &'static [u64] {
        // Between slots; above the slots, inside the guest's own mapping.
        &[5000, 0x4_0000]
    }
    fn prepare_dirty(&mut self, tracking: Tracking) {
        self.mmu.set_track_zapped_dirty(tracking == Tracking::HardwareDirty);
    }
}

impl Backend for PpcGuest {
    fn check(&self) -> Result<(), String> {
        self.hpt().check_invariants().map_err(|v| format!("table invariant broken: {v:?}"))
    }
    fn mapped(&self) -> Option<u64> {
        Some(self.counters.entered)
    }
    fn after_dirty(&self, tracking: Tracking, _: LogMode, _: &DirtyReport) {
        if tracking == Tracking::WriteProtect {
            assert!(self.counters.unprotected > 0, "stores were resolved by unprotect");
        }
    }
    fn after_invalidation(&mut self, pages: u64, zapped: usize) {
        assert_eq!(self.counters.faulted_in, pages, "absent entries came back by fault_in, not H_ENTER");
        // The zapped aliases in slot 2 come back on their first access too.
        demand_faults(self).unwrap();
        assert_eq!(self.counters.faulted_in, zapped as u64);
        assert_eq!(self.counters.entered, 1340);
    }
}

fn shadow(mode: GuestMode) -> ShadowGuest {
    ShadowGuest::new(mode)
}

fn tdp<F: TdpFormat>(format: F, host_page: PageSize) -> TdpGuest<F> {
    TdpGuest::new(format, &slots(), host_page).expect("an empty root fits the table memory")
}

fn hpt(format: HpteFormat) -> PpcGuest {
    PpcGuest::new(slots(), 18, format, PageSizes::qemu_pseries_default(), 12).unwrap()
}

fn sim(caps: Caps, huge: bool) -> SimMmu {
    let mut m = SimMmu::new(slots(), caps);
    m.huge_pages = huge;
    m
}

/// The table: `name: constructor, huge pages, dirty-log seeds;`. 5-level
/// walks get two seeds (the tables differ from 4-level only above the
/// leaves), everything else the sim suite's three.
macro_rules! backends {
    ($($name:ident: $make:expr, $huge:expr, $seeds:expr;)*) => {$(
        mod $name {
            use super::*;
            fn make() -> impl Backend {
                $make
            }
            #[test]
            fn demand_faults_map_each_page_once() {
                demand(make, $huge);
            }
            #[test]
            fn gfn_outside_every_slot_is_an_mmio_exit_never_mapped() {
                mmio(make);
            }
            #[test]
            fn dirty_rounds_report_each_written_page_once() {
                dirty(make, $seeds);
            }
            #[test]
            fn ageing_reports_exactly_the_touched_pages() {
                ageing_case(make, $huge, $seeds);
            }
            #[test]
            fn invalidation_zaps_the_range_and_the_guest_refaults() {
                invalidation_case(make, $huge);
            }
        }
    )*};
}

backends! {
    sim_ad: sim(AD, false), false, 3;
    sim_ad_huge: sim(AD, true), true, 3;
    sim_no_ad: sim(NO_AD, false), false, 3;
    sim_no_ad_huge: sim(NO_AD, true), true, 3;
    ept_ad_4level: tdp(ept_ad(WalkLength::Four), PageSize::Size4K), false, 3;
    ept_ad_4level_huge: tdp(ept_ad(WalkLength::Four), PageSize::Size2M), true, 3;
    ept_ad_5level: tdp(ept_ad(WalkLength::Five), PageSize::Size4K), false, 2;
    ept_ad_5level_huge: tdp(ept_ad(WalkLength::Five), PageSize::Size2M), true, 2;
    ept_4level: tdp(ept_no_ad(WalkLength::Four), PageSize::Size4K), false, 3;
    ept_4level_huge: tdp(ept_no_ad(WalkLength::Four), PageSize::Size2M), true, 3;
    ept_5level: tdp(ept_no_ad(WalkLength::Five), PageSize::Size4K), false, 2;
    ept_5level_huge: tdp(ept_no_ad(WalkLength::Five), PageSize::Size2M), true, 2;
    npt_4level: tdp(npt(WalkLength::Four), PageSize::Size4K), false, 3;
    npt_4level_huge: tdp(npt(WalkLength::Four), PageSize::Size2M), true, 3;
    npt_5level: tdp(npt(WalkLength::Five), PageSize::Size4K), false, 2;
    npt_5level_huge: tdp(npt(WalkLength::Five), PageSize::Size2M), true, 2;
    shadow_32bit: shadow(GuestMode::Bits32), false, 3;
    shadow_pae: shadow(GuestMode::Pae), false, 3;
    shadow_4level: shadow(GuestMode::Four), false, 3;
    shadow_5level: shadow(GuestMode::Five), false, 3;
    hpt_pre_isa300: hpt(HpteFormat::PreIsa300), false, 3;
    hpt_isa300: hpt(HpteFormat::Isa300), false, 3;
}

// ----- back-end-specific tests -----

/// The simulated back end.
mod sim_only {
    use super::*;

    #[test]
    fn rings_smaller_than_the_writes_exit_to_the_harvester_and_lose_nothing() {
        for (size, reserve) in [(16, 4), (8, 0), (2, 1), (4, 3)] {
            for seed in 1..4 {
                let mut mmu = SimMmu::new(slots(), NO_AD);
                let ring = RingSize { size, reserve };
                let r = dirty_rounds_with(
                    &mut mmu,
                    SlotId(0),
                    Tracking::WriteProtect,
                    LogMode::Ring,
                    10,
                    seed,
                    ring,
                )
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
                SlotDirtyLog::start(&s, Tracking::HardwareDirty, mode, mmu.backend_mut(), &mut flush)
                    .unwrap();
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

    /// Found by the dirty-log fuzz target: a page written, zapped by an
    /// invalidation and written again before the harvest is in the ring once.
    #[test]
    fn a_page_refaulted_after_a_zap_is_pushed_to_the_ring_once() {
        use mmu_generic::addr::HvaRange;
        use mmu_generic::dirty_ring::DirtyRing;
        let mut mmu = SimMmu::new(slots(), NO_AD);
        let s = *mmu.memslots().get(SlotId(0)).unwrap();
        let mut flush = FlushToken::new();
        let log =
            SlotDirtyLog::start(&s, Tracking::WriteProtect, LogMode::Ring, mmu.backend_mut(), &mut flush)
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
}

/// arch-x86's TDP engine and shadow paging.
mod x86_only {
    use super::*;

    fn guest<F: TdpFormat>(format: F, host_page: PageSize) -> TdpGuest<F> {
        TdpGuest::new(format, &slots(), host_page).expect("an empty root fits the table memory")
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
                assert_eq!(
                    touch(&mut g, gfn, i % 2 == 0, &mut logs).unwrap(),
                    Touch::Done(u32::from(i == 0))
                );
            }
            assert_eq!(g.stats().faults_mapped, 1);
            assert_eq!(g.engine().lookup(Gfn(gib + 12345)).map(|l| l.size), Some(PageSize::Size1G));
            g.check_clean().unwrap();
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
        let log =
            SlotDirtyLog::start(&s, Tracking::HardwareDirty, LogMode::Bitmap, g.backend_mut(), &mut flush)
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
        let log = SlotDirtyLog::start(&s, Tracking::WriteProtect, LogMode::Ring, g.backend_mut(), &mut flush)
            .unwrap();
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

    #[test]
    fn memslot_changes_drop_every_shadow_page_and_deleted_memory_becomes_mmio() {
        let mut g = ShadowGuest::new(GuestMode::Four);
        demand_faults(&mut g).unwrap();
        assert!(g.mmu.pages() > 0);
        let mut b = ShadowGuest::scenario_slots(GuestMode::Four).to_builder();
        b.delete(SlotId(1)).unwrap();
        g.mmu.set_memslots(b.build().unwrap());
        assert_eq!(g.mmu.pages(), 0);
        assert_eq!(g.mmu.rmap().pool().bytes_in_use(), 0);
        let cpu = g.cpu;
        g.mmu.load_cr3(&cpu).unwrap();
        let mut logs = DirtyLogs::default();
        assert_eq!(touch(&mut g, Gfn(0x10005), false, &mut logs), Ok(Touch::Mmio));
        assert_eq!(touch(&mut g, Gfn(5), true, &mut logs), Ok(Touch::Done(1)));
        let mut outside = 0;
        g.mmu.for_each_mapping(|gfn, _, _| outside += u32::from(g.mmu.memslots().lookup(gfn).is_none()));
        assert_eq!(outside, 0);
    }
}

/// arch-ppc-book3s's hashed page table.
mod hpt_only {
    use super::*;

    fn invariants(mmu: &PpcGuest) {
        mmu.hpt().check_invariants().unwrap_or_else(|v| panic!("table invariant broken: {v:?}"));
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
    fn invalidation_of_16m_pages_zaps_the_whole_page() {
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0x4_0000), 8192, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
        let slots = b.build().unwrap();
        let mut mmu =
            PpcGuest::new(slots, 20, HpteFormat::Isa300, PageSizes::qemu_pseries_16m(), 24).unwrap();
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
            let r =
                dirty_rounds(&mut mmu, SlotId(8), Tracking::HardwareDirty, LogMode::Bitmap, 6, 5).unwrap();
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
                    assert!(
                        mmu.hpt().lost_dirty_pages() > 0,
                        "written pages were evicted: {:?}",
                        mmu.counters
                    );
                }
                invariants(&mmu);
            }
        }
    }
}

/// An engine error ends the access at once with the error, instead of being
/// retried until the harness gives up.
#[test]
fn an_engine_error_fails_the_access_at_once() {
    use mmu_generic::backend::FlushToken as Token;
    use vmmu_tests::harness::{FaultOutcome, HwFault};

    /// The sim, with a fault handler that fails.
    struct Failing(SimMmu, u32);
    impl GuestMmu for Failing {
        type Backend = <SimMmu as GuestMmu>::Backend;
        fn memslots(&self) -> &Memslots {
            self.0.memslots()
        }
        fn backend(&self) -> &Self::Backend {
            self.0.backend()
        }
        fn backend_mut(&mut self) -> &mut Self::Backend {
            self.0.backend_mut()
        }
        fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
            self.0.hw_access(gfn, write)
        }
        fn handle_fault(&mut self, _: Gfn, _: bool, _: &mut DirtyLogs) -> FaultOutcome {
            self.1 += 1;
            FaultOutcome::Failed
        }
        fn flush(&mut self, token: Token) {
            self.0.flush(token)
        }
        fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize {
            self.0.zap_hva_range(range, logs)
        }
    }
    let mut g = Failing(sim(AD, false), 0);
    let e = touch(&mut g, Gfn(3), true, &mut DirtyLogs::default()).unwrap_err();
    assert!(e.contains("the fault handler failed"), "{e}");
    assert_eq!(g.1, 1, "no retry after the failure");
    assert!(demand_faults(&mut g).is_err());
}
