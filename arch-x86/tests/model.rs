//! Model-based random tests: random sequences of faults, explicit maps,
//! unmaps, zaps, splits, write protection, access tracking and zap-all, on
//! EPT (with and without A/D) and NPT, 4- and 5-level, compared after every
//! step with a plain interval map gfn → (pfn, access), translated through
//! the software walker as the processor would.

use std::collections::BTreeMap;

use arch_x86::exit::Origin;
use arch_x86::format::ept::Ept;
use arch_x86::format::npt::Npt;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, TdpFormat, WalkFault, WalkLength};
use arch_x86::frame::SimMemory;
use arch_x86::tdp::{FaultOutcome, MapKind, TdpError, TdpMmu};
use arch_x86::testing::{FlushRecorder, LinearHost};
use arch_x86::walk::{translate, WalkError};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Hva, Pfn};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{FaultCtx, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One translation the model holds for an interval of guest frames.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Entry {
    end: u64,
    pfn: u64,
    access: Access,
    tracked: bool,
}

/// Guest frame intervals → the host frames they translate to.
#[derive(Default, Debug)]
struct Model {
    map: BTreeMap<u64, Entry>,
}

impl Model {
    /// Cuts the interval holding `at` in two, so `at` starts one.
    fn cut(&mut self, at: u64) {
        let hit = self.map.range(..at).next_back().map(|(&s, &e)| (s, e));
        if let Some((s, e)) = hit {
            if e.end > at {
                self.map.insert(s, Entry { end: at, ..e });
                self.map.insert(at, Entry { pfn: e.pfn + (at - s), ..e });
            }
        }
    }

    fn remove(&mut self, start: u64, end: u64) {
        self.cut(start);
        self.cut(end);
        let keys: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.map.remove(&k);
        }
    }

    fn set(&mut self, start: u64, end: u64, pfn: u64, access: Access) {
        self.remove(start, end);
        self.map.insert(start, Entry { end, pfn, access, tracked: false });
    }

    fn modify(&mut self, start: u64, end: u64, f: impl Fn(&mut Entry)) {
        self.cut(start);
        self.cut(end);
        for (_, e) in self.map.range_mut(start..end) {
            f(e);
        }
    }

    fn get(&self, gfn: u64) -> Option<(u64, Access, bool)> {
        let (&s, e) = self.map.range(..=gfn).next_back()?;
        (gfn < e.end).then_some((e.pfn + (gfn - s), e.access, e.tracked))
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.map.range(..end).next_back().is_some_and(|(_, e)| e.end > start)
    }
}

const GIB: u64 = 1 << 18;

struct Run<F: TdpFormat> {
    mmu: TdpMmu<F, SimMemory>,
    model: Model,
    host: LinearHost,
    slots: Memslots,
    rng: SmallRng,
    inv: InvalidationSeq,
    probes: Vec<u64>,
    /// The write-protect log of slot 1 while it is flagged for logging (the
    /// engine logs before it grants, so a flagged slot needs one).
    logs: BTreeMap<SlotId, SlotDirtyLog>,
}

fn slot_set(five: bool, log_b: bool) -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(GIB), 2 * GIB, Hva(0x40_0000_0000), SlotFlags::empty())).unwrap();
    let fb = if log_b { SlotFlags::DIRTY_LOG } else { SlotFlags::empty() };
    b.create(Memslot::new(SlotId(1), Gfn(4 * GIB + 0x10), 0x3000, Hva(0x80_0001_0000), fb)).unwrap();
    b.create(Memslot::new(SlotId(2), Gfn(5 * GIB), 0x400, Hva(0x90_0000_0000), SlotFlags::READONLY)).unwrap();
    if five {
        b.create(Memslot::new(SlotId(3), Gfn(1 << 44), GIB, Hva(0xc0_0000_0000), SlotFlags::empty()))
            .unwrap();
    }
    b.build().unwrap()
}

impl<F: TdpFormat> Run<F> {
    fn new(format: F, seed: u64) -> Self {
        let five = format.walk_length() == WalkLength::Five;
        let mem = SimMemory::with_stride(Pfn(0x1_0000_0000 + seed), 3, 1 << 20);
        let mut mmu = TdpMmu::new(format, mem).unwrap();
        let slots = slot_set(five, false);
        mmu.set_memslots(&slots, &mut FlushRecorder::default(), |_| {});
        let mut rng = SmallRng::seed_from_u64(seed);
        let size = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][rng.gen_range(0..3)];
        Self {
            mmu,
            model: Model::default(),
            host: LinearHost::new(0x100 * GIB, size),
            slots,
            rng,
            inv: InvalidationSeq::new(),
            probes: Vec::new(),
            logs: BTreeMap::new(),
        }
    }

    fn random_gfn(&mut self) -> u64 {
        let five = self.mmu.format().walk_length() == WalkLength::Five;
        match self.rng.gen_range(0..20) {
            0..=9 => GIB + self.rng.gen_range(0..2 * GIB),
            10..=13 => 4 * GIB + self.rng.gen_range(0..0x3100),
            14 => 5 * GIB + self.rng.gen_range(0..0x500),
            15 | 16 if five => (1 << 44) + self.rng.gen_range(0..GIB),
            _ => self.rng.gen_range(0..8 * GIB),
        }
    }

    fn random_size(&mut self) -> PageSize {
        [PageSize::Size4K, PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][self.rng.gen_range(0..4)]
    }

    fn probe(&mut self, gfn: u64) {
        for g in [gfn.wrapping_sub(1), gfn, gfn + 1] {
            self.probes.push(g);
        }
    }

    fn handles(&self) -> Vec<PteHandle> {
        let mut hs = Vec::new();
        for s in self.slots.iter() {
            self.mmu.for_each_leaf(s, s.gfns(), &mut |h| hs.push(h));
        }
        hs
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=39 => self.op_fault(),
            40..=54 => self.op_map(),
            55..=64 => self.op_unmap(),
            65..=69 => self.op_zap(),
            70..=77 => self.op_split(),
            78..=85 => self.op_write_protect(),
            86..=91 => self.op_track(),
            92..=94 => self.op_harvest(),
            95 => self.op_zap_all(),
            _ => self.op_toggle_logging(),
        }
    }

    fn op_fault(&mut self) {
        let gfn = self.random_gfn();
        let access = [Access::READ, Access::WRITE, Access::EXEC][self.rng.gen_range(0..3)];
        let gpa = Gpa((gfn << 12) | self.rng.gen_range(0..4096));
        let mut flush = FlushToken::new();
        let ctx = FaultCtx::new(&self.logs, None);
        let r = self.mmu.handle_fault_logged(gpa, access, &mut self.host, &self.inv, &ctx, &mut flush);
        flush.flush(&mut FlushRecorder::default());
        self.probe(gfn);
        let slot = self.slots.lookup(Gfn(gfn)).copied();
        match r {
            Ok(FaultOutcome::Mapped(m)) => {
                let slot = slot.expect("mapped frames lie in a slot");
                assert_eq!(m.slot, slot.id());
                assert!(m.access.contains(access));
                let end = m.gfn.0 + m.size.frames();
                if m.kind == MapKind::Installed {
                    let hva = slot.gfn_to_hva(m.gfn).unwrap();
                    assert_eq!(m.pfn, self.host.pfn_of(hva), "leaf maps the host frame of its first gfn");
                    assert!(slot.allows_page(m.gfn, m.size.shift()) || m.size == PageSize::Size4K);
                    if slot.flags().contains(SlotFlags::DIRTY_LOG) {
                        assert_eq!(m.size, PageSize::Size4K);
                    }
                    self.model.set(m.gfn.0, end, m.pfn.0, m.access);
                } else {
                    // Spurious or restored: the leaf was there (maybe an
                    // explicit map to any frame) and is unchanged.
                    let (pfn, access, tracked) = self.model.get(m.gfn.0).expect("a leaf was there");
                    assert_eq!((pfn, access), (m.pfn.0, m.access));
                    assert_eq!(tracked, m.kind == MapKind::Restored);
                    self.model.modify(m.gfn.0, end, |e| e.tracked = false);
                }
                self.probe(m.gfn.0);
                self.probe(m.gfn.0 + m.size.frames());
            }
            Ok(FaultOutcome::Mmio { .. }) => assert!(slot.is_none()),
            Ok(FaultOutcome::Denied(_)) => {
                let s = slot.expect("denied frames lie in a slot");
                assert!(s.flags().contains(SlotFlags::READONLY) && access == Access::WRITE);
            }
            Ok(FaultOutcome::Retry) => panic!("no invalidation ran"),
            Err(e) => panic!("fault at {gfn:#x}: {e}"),
        }
    }

    fn op_map(&mut self) {
        let size = self.random_size();
        let n = size.frames();
        let gfn = self.random_gfn() & !(n - 1);
        let pfn = self.rng.gen_range(0..1u64 << 30) & !(n - 1);
        let mut access = Access::READ;
        access.set(Access::WRITE, self.rng.gen());
        access.set(Access::EXEC, self.rng.gen());
        self.probe(gfn);
        self.probe(gfn + n);
        match self.mmu.map(Gfn(gfn), Pfn(pfn), size, access) {
            Ok(()) => {
                assert!(!self.model.overlaps(gfn, gfn + n), "map over a mapping at {gfn:#x}");
                self.model.set(gfn, gfn + n, pfn, access);
            }
            Err(TdpError::AlreadyMapped(_)) => {
                // A 4 KiB map fails only on a mapping; a huge one also on a
                // table that split leaves or zapped leaves left behind.
                assert!(size != PageSize::Size4K || self.model.overlaps(gfn, gfn + n));
            }
            Err(TdpError::CrossesSlot { .. }) => {
                let range = GfnRange { start: Gfn(gfn), end: Gfn(gfn + n) };
                assert!(self.slots.iter().any(|s| s.gfns().overlaps(&range)));
            }
            Err(TdpError::GfnTooWide(_)) => assert!(!self.mmu.format().walk_length().covers(gfn + n - 1)),
            Err(e) => panic!("map {gfn:#x} {size:?}: {e}"),
        }
    }

    fn random_range(&mut self) -> (u64, u64) {
        let start = self.random_gfn();
        let len = match self.rng.gen_range(0..4) {
            0 => 1,
            1 => self.rng.gen_range(1..600),
            2 => self.rng.gen_range(1..3 * 512 * 512),
            _ => 512,
        };
        (start, start + len)
    }

    fn op_unmap(&mut self) {
        let (start, end) = self.random_range();
        self.probe(start);
        self.probe(end);
        let range = GfnRange { start: Gfn(start), end: Gfn(end) };
        self.mmu.unmap_range(range, &mut FlushRecorder::default(), |_| {}).expect("frames to split");
        self.model.remove(start, end);
    }

    fn op_zap(&mut self) {
        let (start, end) = self.random_range();
        self.probe(start);
        self.probe(end);
        let range = GfnRange { start: Gfn(start), end: Gfn(end) };
        let mut gone = Vec::new();
        self.mmu.zap_range(range, &mut FlushRecorder::default(), |l| gone.push(l));
        for l in gone {
            assert!(l.gfns().overlaps(&range), "zapped {l:?} outside {range:?}");
            self.model.remove(l.gfn.0, l.gfn.0 + l.npages);
        }
        // Whole huge leaves may go beyond the range, never anything inside it stays.
        self.model.remove(start, end);
    }

    fn pick(&mut self) -> Option<PteHandle> {
        let hs = self.handles();
        (!hs.is_empty()).then(|| hs[self.rng.gen_range(0..hs.len())])
    }

    fn op_split(&mut self) {
        let Some(h) = self.pick() else { return };
        let leaf = self.mmu.leaf(h).expect("the reverse map names live leaves");
        self.probe(leaf.gfn.0);
        let mut flush = FlushToken::new();
        self.mmu.split_huge(h, &mut flush).expect("frames to split");
        flush.flush(&mut FlushRecorder::default());
        if leaf.access_tracked && leaf.npages > 1 {
            // A tracked huge leaf is zapped instead: nothing to keep mapped.
            self.model.remove(leaf.gfn.0, leaf.gfn.0 + leaf.npages);
        }
    }

    fn op_write_protect(&mut self) {
        let Some(h) = self.pick() else { return };
        let leaf = self.mmu.leaf(h).unwrap();
        self.probe(leaf.gfn.0);
        let mut flush = FlushToken::new();
        let was = self.mmu.write_protect(h, &mut flush);
        flush.flush(&mut FlushRecorder::default());
        assert_eq!(was, leaf.writable);
        self.model.modify(leaf.gfn.0, leaf.gfn.0 + leaf.npages, |e| e.access.remove(Access::WRITE));
    }

    fn op_track(&mut self) {
        let Some(h) = self.pick() else { return };
        let leaf = self.mmu.leaf(h).unwrap();
        self.probe(leaf.gfn.0);
        let mut flush = FlushToken::new();
        let tracked = self.mmu.mark_access_tracked(h, &mut flush);
        flush.flush(&mut FlushRecorder::default());
        assert_eq!(tracked, !self.mmu.caps().accessed_bit && !leaf.access_tracked);
        if tracked {
            self.model.modify(leaf.gfn.0, leaf.gfn.0 + leaf.npages, |e| e.tracked = true);
        }
    }

    fn op_harvest(&mut self) {
        let caps = self.mmu.caps();
        let mut flush = FlushToken::new();
        for h in self.handles() {
            let before = self.mmu.leaf(h).unwrap();
            if caps.dirty_bit {
                assert_eq!(self.mmu.clear_dirty(h, &mut flush), before.dirty && !before.access_tracked);
            }
            if caps.accessed_bit {
                self.mmu.clear_young(h, &mut flush);
                assert!(!self.mmu.leaf(h).unwrap().young);
            }
        }
        flush.flush(&mut FlushRecorder::default());
    }

    fn op_zap_all(&mut self) {
        let mut rec = FlushRecorder::default();
        self.mmu.zap_all(&mut rec, |_| {});
        assert_eq!(rec.alls, 1);
        assert!(self.mmu.lookup(Gfn(GIB)).is_none());
        while self.mmu.reclaim_obsolete(7, |_| {}).remaining {}
        assert_eq!(self.mmu.tables_in_use(), 1);
        self.model = Model::default();
    }

    fn op_toggle_logging(&mut self) {
        let logging = self.slots.get(SlotId(1)).unwrap().flags().contains(SlotFlags::DIRTY_LOG);
        let five = self.mmu.format().walk_length() == WalkLength::Five;
        let new = slot_set(five, !logging);
        self.mmu
            .set_memslots(&new, &mut FlushRecorder::default(), |_| panic!("a dirty-log toggle zaps nothing"));
        self.logs.clear();
        if !logging {
            // A log object for the fault path, started on a blank engine so
            // the model's mappings stay as they are.
            let width = PhysAddrWidth::new(46).unwrap();
            let mut blank =
                TdpMmu::new(Npt::new(WalkLength::Five, width), SimMemory::new(Pfn(0x10_0000), 4)).unwrap();
            blank.set_memslots(&new, &mut FlushRecorder::default(), |_| {});
            let slot = *new.get(SlotId(1)).unwrap();
            let mut flush = FlushToken::new();
            let log =
                SlotDirtyLog::start(&slot, Tracking::WriteProtect, LogMode::Bitmap, &mut blank, &mut flush)
                    .expect("write-protect logging of an empty engine");
            flush.flush(&mut FlushRecorder::default());
            self.logs.insert(SlotId(1), log);
        }
        self.slots = new;
    }

    /// Compares every probed frame (and a few random ones) with the model.
    fn check(&mut self) {
        let mut probes = std::mem::take(&mut self.probes);
        for _ in 0..6 {
            probes.push(self.random_gfn());
        }
        let keys: Vec<u64> = self.model.map.keys().copied().collect();
        for _ in 0..4 {
            if !keys.is_empty() {
                let k = keys[self.rng.gen_range(0..keys.len())];
                probes.extend([k, self.model.map[&k].end - 1]);
            }
        }
        let walk = self.mmu.format().walk_length();
        for gfn in probes.into_iter().filter(|&g| walk.covers(g)) {
            self.check_gfn(gfn);
        }
    }

    fn check_gfn(&mut self, gfn: u64) {
        let f = self.mmu.format().clone();
        let gpa = Gpa((gfn << 12) | 0x7f8);
        let walk = |mmu: &TdpMmu<F, SimMemory>, access| {
            translate(mmu.format(), mmu.memory(), mmu.root(), gpa, access, Origin::Final)
        };
        let expect = self.model.get(gfn);
        match (walk(&self.mmu, Access::READ), expect) {
            (Ok(t), Some((pfn, access, false))) => {
                assert_eq!(t.hpa, (pfn << 12) | 0x7f8, "gfn {gfn:#x}");
                assert_eq!(t.allowed, access, "gfn {gfn:#x}");
                for a in [Access::WRITE, Access::EXEC] {
                    assert_eq!(walk(&self.mmu, a).is_ok(), access.contains(a), "gfn {gfn:#x} {a:?}");
                }
                if access.contains(Access::WRITE) && f.dirty_mask() != 0 {
                    self.assert_leaf_dirty(gfn);
                }
            }
            (Err(WalkError::Exit { fault: WalkFault::NotPresent { .. }, .. }), None | Some((_, _, true))) => {
            }
            (got, want) => panic!("gfn {gfn:#x}: walker {got:?}, model {want:?}"),
        }
        let looked = self.mmu.lookup(Gfn(gfn)).map(|l| (l.pfn.0, l.access, l.tracked));
        assert_eq!(looked, expect, "lookup of gfn {gfn:#x}");
        if let Some(slot) = self.slots.lookup(Gfn(gfn)) {
            let mut n = 0;
            self.mmu.for_each_leaf(slot, GfnRange { start: Gfn(gfn), end: Gfn(gfn + 1) }, &mut |h| {
                let l = self.mmu.leaf(h).expect("filed handles are leaves");
                assert!(l.gfns().contains(Gfn(gfn)));
                n += 1;
            });
            // Explicit maps may put a huge leaf... never across a slot edge, so
            // every leaf on a slot frame is filed exactly once.
            assert_eq!(n, expect.is_some() as usize, "reverse map of gfn {gfn:#x}");
        }
    }

    fn assert_leaf_dirty(&self, gfn: u64) {
        let Some(slot) = self.slots.lookup(Gfn(gfn)) else { return };
        let mut dirty = false;
        self.mmu.for_each_leaf(slot, GfnRange { start: Gfn(gfn), end: Gfn(gfn + 1) }, &mut |h| {
            dirty |= self.mmu.leaf(h).unwrap().dirty;
        });
        assert!(dirty, "a write through the walker sets D on gfn {gfn:#x}");
    }

    /// Re-faults access-tracked frames so the sequence keeps exercising them.
    fn restore_some(&mut self) {
        let tracked: Vec<u64> =
            self.model.map.iter().filter(|(_, e)| e.tracked).map(|(&k, _)| k).take(2).collect();
        for gfn in tracked {
            let mut flush = FlushToken::new();
            let ctx = FaultCtx::new(&self.logs, None);
            let o = self.mmu.handle_fault_logged(
                Gpa(gfn << 12),
                Access::READ,
                &mut self.host,
                &self.inv,
                &ctx,
                &mut flush,
            );
            flush.flush(&mut FlushRecorder::default());
            match o {
                Ok(FaultOutcome::Mapped(m)) => {
                    self.model.modify(m.gfn.0, m.gfn.0 + m.size.frames(), |e| e.tracked = false);
                    self.probe(gfn);
                }
                other => panic!("refault of tracked {gfn:#x}: {other:?}"),
            }
        }
    }
}

fn run<F: TdpFormat>(format: F, seeds: u64, steps: usize) {
    for seed in 0..seeds {
        let mut r = Run::new(format.clone(), seed);
        for _ in 0..steps {
            r.step();
            if r.rng.gen_range(0..8) == 0 {
                r.restore_some();
            }
            r.check();
        }
    }
}

fn width() -> PhysAddrWidth {
    PhysAddrWidth::new(46).unwrap()
}

const SEEDS: u64 = 6;
const STEPS: usize = 300;

#[test]
fn ept_with_ad_4_level_matches_the_model() {
    run(Ept::new(WalkLength::Four, width(), true), SEEDS, STEPS);
}

#[test]
fn ept_with_ad_5_level_matches_the_model() {
    run(Ept::new(WalkLength::Five, PhysAddrWidth::MAX, true), SEEDS, STEPS);
}

#[test]
fn ept_without_ad_uses_access_tracking_and_matches_the_model() {
    run(Ept::new(WalkLength::Four, width(), false), SEEDS, STEPS);
    run(Ept::new(WalkLength::Five, width(), false), SEEDS / 2, STEPS);
}

#[test]
fn npt_4_level_matches_the_model() {
    run(Npt::new(WalkLength::Four, width()), SEEDS, STEPS);
}

#[test]
fn npt_5_level_matches_the_model() {
    run(Npt::new(WalkLength::Five, PhysAddrWidth::new(52).unwrap()), SEEDS, STEPS);
}
