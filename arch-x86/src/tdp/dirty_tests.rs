//! The dirty-log round through the engine's table walk (`dirty.rs`) against
//! the reverse-map path on the same operations, and both against a plain
//! model of what must and may be reported.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, GfnRange, Gpa, Hva, Pfn};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend, NoTlb};
use mmu_generic::dirty_log::{FaultCtx, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;
use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::{FaultOutcome, TdpMmu};
use crate::exit::Origin;
use crate::format::ept::Ept;
use crate::format::npt::Npt;
use crate::format::{Access, PageSize, PhysAddrWidth, TdpFormat, WalkLength};
use crate::frame::SimMemory;
use crate::testing::{FlushRecorder, LinearHost};
use crate::walk::translate;

/// The engine as the round sees a back end without a walk: every call but
/// [`MmuBackend::round_chain_words`] goes to the engine, and that one keeps
/// the trait's default (the reverse-map path).
struct RmapOnly<'a, B>(&'a mut B);

impl<B: MmuBackend> MmuBackend for RmapOnly<'_, B> {
    fn caps(&self) -> Caps {
        self.0.caps()
    }
    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.0.for_each_leaf(slot, gfns, f)
    }
    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        self.0.leaf(h)
    }
    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.0.write_protect(h, flush)
    }
    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.0.clear_dirty(h, flush)
    }
    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.0.clear_young(h, flush)
    }
    fn mark_access_tracked(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.0.mark_access_tracked(h, flush)
    }
    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        self.0.split_huge(h, flush)
    }
    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        self.0.zap(h, flush)
    }
    fn write_protect_gfns(&mut self, slot: &Memslot, gfns: GfnRange, flush: &mut FlushToken) -> bool {
        self.0.write_protect_gfns(slot, gfns, flush)
    }
    fn drain_lost_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        self.0.drain_lost_dirty(gfns, f)
    }
    fn track_lost_dirty(&mut self, on: bool) {
        self.0.track_lost_dirty(on)
    }
}

/// Host frame of guest frame `g` is `g + PFN_OFFSET` (the slot's host-virtual
/// page of `g` is `g`), so 2 MiB guest pages have aligned host frames.
const PFN_OFFSET: u64 = 0x20_0000;

fn width() -> PhysAddrWidth {
    PhysAddrWidth::new(46).expect("46 is a valid width")
}

/// One engine and its log of slot 0.
struct Side<F: TdpFormat> {
    mmu: TdpMmu<F, SimMemory>,
    logs: BTreeMap<SlotId, SlotDirtyLog>,
    /// The root before the last `zap_all`, while its tables are not reclaimed.
    old_root: Option<Pfn>,
}

impl<F: TdpFormat> Side<F> {
    fn new(format: F, slot: Memslot, tracking: Tracking) -> Self {
        let mut b = MemslotsBuilder::new();
        b.create(slot).expect("one slot");
        let slots = b.build().expect("one slot");
        let mut mmu = TdpMmu::new(format, SimMemory::new(Pfn(0x100_0000), 1 << 14)).expect("a root");
        mmu.set_memslots(&slots, &mut FlushRecorder::default(), |_| {});
        let mut flush = FlushToken::new();
        let log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut mmu, &mut flush).expect("log");
        flush.flush(&mut NoTlb);
        Self { mmu, logs: BTreeMap::from([(SlotId(0), log)]), old_root: None }
    }

    fn fault(&mut self, gfn: u64, access: Access) -> FaultOutcome {
        self.mmu.reserve(TdpMmu::<F, SimMemory>::FAULT_RESERVE);
        // Host frame = guest frame + PFN_OFFSET, as the explicit maps use.
        let mut host = LinearHost::new(PFN_OFFSET, PageSize::Size4K);
        let inv = InvalidationSeq::new();
        let ctx = FaultCtx::new(&self.logs, None);
        let mut flush = FlushToken::new();
        let r = self.mmu.handle_fault_logged(Gpa(gfn << 12), access, &mut host, &inv, &ctx, &mut flush);
        flush.flush(&mut NoTlb);
        r.expect("the slot maps every frame")
    }

    /// The guest accesses `gfn` through `root` as the processor would.
    fn hw(&self, root: Pfn, gfn: u64, access: Access) -> Option<PageSize> {
        translate(self.mmu.format(), self.mmu.memory(), root, Gpa(gfn << 12), access, Origin::Final)
            .ok()
            .map(|t| t.size)
    }

    /// Every leaf the reverse map files under the slot, with its state.
    fn leaves(&self, slot: &Memslot) -> Vec<(PteHandle, Leaf)> {
        let mut out = Vec::new();
        self.mmu.for_each_leaf(slot, slot.gfns(), &mut |h| out.extend(self.mmu.leaf(h).map(|l| (h, l))));
        out.sort_by_key(|&(h, _)| h.0);
        out
    }
}

/// What a round must and may report, from the guest's writes alone.
#[derive(Default)]
struct Model {
    must: BTreeSet<u64>,
    may: BTreeSet<u64>,
}

impl Model {
    fn wrote(&mut self, gfn: u64, leaf: GfnRange) {
        self.must.insert(gfn);
        self.may.extend(leaf.start.0..leaf.end.0);
    }
}

fn leaf_range(gfn: u64, size: PageSize) -> GfnRange {
    let start = gfn & !(size.frames() - 1);
    GfnRange { start: Gfn(start), end: Gfn(start + size.frames()) }
}

/// Random guest writes and reads (through the tables, faulting when they
/// refuse), explicit 2 MiB maps, access tracking, zap-all with the old root
/// still in use (writes through it) and its reclaim, and rounds. Engine A
/// rounds through its walk, engine B through the reverse map: every round
/// reports the same bitmap on both, leaves them in the same state, reports
/// every page written (no lost write) and, where the leaf was 4 KiB, nothing
/// else.
/// What the rounds of the cases met (so a test can show it reached them).
#[derive(Default, Debug)]
struct Seen {
    huge: usize,
    tracked: usize,
    obsolete_rounds: usize,
}

fn run_case<F: TdpFormat + Clone>(format: F, tracking: Tracking, base: u64, seed: u64, seen: &mut Seen) {
    let npages = 4 * 512 + 100; // the last chain word is partial
    let slot = Memslot::new(SlotId(0), Gfn(base), npages, Hva(base << 12), SlotFlags::DIRTY_LOG);
    let mut a = Side::new(format.clone(), slot, tracking);
    let mut b = Side::new(format, slot, tracking);
    let mut model = Model::default();
    let mut rng = SmallRng::seed_from_u64(seed);
    let tracked_ok = a.mmu.format().accessed_mask() == 0;
    let mut rounds = 0;
    let mut touched = Vec::new();
    for step in 0..400 {
        // Half the operations go to a page touched before: tracking,
        // rewriting and re-protecting the same leaves.
        let gfn = match touched.len() {
            n if n > 0 && rng.gen_bool(0.5) => touched[rng.gen_range(0..n)],
            _ => base + rng.gen_range(0..npages),
        };
        touched.push(gfn);
        let ctx = |what: &str| {
            alloc::format!("seed {seed} step {step} {tracking:?} base {base:#x}: {what} {gfn:#x}")
        };
        match rng.gen_range(0..100) {
            0..=44 => {
                // A write, through the old root while one is in use.
                let old = a.old_root.filter(|_| rng.gen_bool(0.3));
                let mut done = None;
                let mut faulted = false;
                for side in [&mut a, &mut b] {
                    let root = old.map(|_| side.old_root.expect("both zapped")).unwrap_or(side.mmu.root());
                    let size = match side.hw(root, gfn, Access::WRITE) {
                        Some(size) => size,
                        None => match side.fault(gfn, Access::WRITE) {
                            FaultOutcome::Mapped(m) if m.access.contains(Access::WRITE) => {
                                faulted = true;
                                side.hw(side.mmu.root(), gfn, Access::WRITE).expect("just mapped")
                            }
                            other => panic!("{}: {other:?}", ctx("write fault")),
                        },
                    };
                    assert!(done.is_none_or(|d| d == size), "{}", ctx("sides differ on write"));
                    done = Some(size);
                }
                let size = done.expect("two sides");
                if tracking == Tracking::WriteProtect {
                    // A leaf is writable only once its page is logged: a
                    // write that did not fault went to a logged page.
                    assert!(
                        faulted || model.must.contains(&gfn),
                        "{}",
                        ctx("write through an unlogged leaf")
                    );
                    model.must.insert(gfn);
                    model.may.insert(gfn);
                } else {
                    model.wrote(gfn, leaf_range(gfn, size));
                }
            }
            45..=69 => {
                for side in [&mut a, &mut b] {
                    if side.hw(side.mmu.root(), gfn, Access::READ).is_none() {
                        let _ = side.fault(gfn, Access::READ);
                    }
                }
            }
            70..=77 => {
                // An explicit 2 MiB map where nothing is mapped; writable
                // ones log, then grant, every page.
                let head = (gfn & !511).max(base.next_multiple_of(512));
                let writable = rng.gen_bool(0.5);
                let access = if writable { Access::all() } else { Access::READ | Access::EXEC };
                let mut mapped = Vec::new();
                for side in [&mut a, &mut b] {
                    let pfn = Pfn(PFN_OFFSET + head);
                    side.mmu.reserve(TdpMmu::<F, SimMemory>::FAULT_RESERVE);
                    let ok = side.mmu.map(Gfn(head), pfn, PageSize::Size2M, access).is_ok();
                    mapped.push(ok);
                    if ok && writable {
                        let log = side.logs.get(&SlotId(0)).expect("logged");
                        for g in head..head + 512 {
                            log.note_writable(Gfn(g), PteHandle(0), None).expect("in the slot");
                        }
                    }
                }
                assert_eq!(mapped[0], mapped[1], "{}", ctx("sides differ on a 2 MiB map"));
                if mapped[0] && writable && tracking == Tracking::WriteProtect {
                    model.must.extend(head..head + 512);
                    model.may.extend(head..head + 512);
                }
            }
            78..=83 if tracked_ok => {
                for side in [&mut a, &mut b] {
                    let mut hs = Vec::new();
                    side.mmu.for_each_leaf(&slot, leaf_range(gfn, PageSize::Size4K), &mut |h| hs.push(h));
                    let mut flush = FlushToken::new();
                    for h in hs {
                        side.mmu.mark_access_tracked(h, &mut flush);
                    }
                    flush.flush(&mut NoTlb);
                }
            }
            84..=86 => {
                for side in [&mut a, &mut b] {
                    if side.old_root.is_none() {
                        side.old_root = Some(side.mmu.root());
                        side.mmu.zap_all(&mut FlushRecorder::default(), |_| {});
                    }
                }
            }
            87..=88 => {
                for side in [&mut a, &mut b] {
                    let log = side.logs.get(&SlotId(0)).expect("logged");
                    let _ = side.mmu.reclaim_obsolete(usize::MAX, |l| log.note_zapped(&l));
                    side.old_root = None;
                }
            }
            _ => {
                rounds += 1;
                // The present leaves a write-protect round takes write from,
                // each of which the walked round's flush must cover.
                let protected: Vec<GfnRange> = match tracking {
                    Tracking::WriteProtect => a
                        .leaves(&slot)
                        .into_iter()
                        .filter(|(_, l)| l.writable && !l.access_tracked)
                        .map(|(_, l)| l.gfns())
                        .collect(),
                    Tracking::HardwareDirty => Vec::new(),
                };
                let mut outs = Vec::new();
                let mut flushed = FlushRecorder::default();
                for (i, side) in [&mut a, &mut b].into_iter().enumerate() {
                    let mut out = Vec::new();
                    let log = side.logs.get_mut(&SlotId(0)).expect("logged");
                    if i == 0 {
                        let flush = log.get_and_clear(&mut side.mmu, &mut out);
                        flush.expect("bitmap mode").flush(&mut flushed);
                    } else {
                        let flush = log.get_and_clear(&mut RmapOnly(&mut side.mmu), &mut out);
                        flush.expect("bitmap mode").flush(&mut NoTlb);
                    }
                    outs.push(out);
                }
                for r in &protected {
                    let covered = flushed.alls > 0
                        || flushed.ranges.iter().any(|f| f.start <= r.start && r.end <= f.end);
                    assert!(
                        covered,
                        "{}: {:?}",
                        ctx(&alloc::format!("leaf {r:?} protected unflushed")),
                        flushed
                    );
                }
                let differ = outs[0].iter().zip(&outs[1]).position(|(x, y)| x != y);
                assert!(
                    outs[0].len() == outs[1].len() && differ.is_none(),
                    "{}: bitmap word {differ:?}",
                    ctx("walk and reverse map report differently")
                );
                let (la, lb) = (a.leaves(&slot), b.leaves(&slot));
                let differ = la.iter().zip(&lb).find(|(x, y)| x != y);
                assert!(
                    la.len() == lb.len() && differ.is_none(),
                    "{}: {differ:?}",
                    ctx("walk and reverse map leave different leaves")
                );
                seen.huge += la.iter().filter(|(_, l)| l.npages > 1).count();
                seen.tracked += la.iter().filter(|(_, l)| l.access_tracked).count();
                seen.obsolete_rounds += usize::from(a.old_root.is_some());
                for p in 0..npages {
                    let g = base + p;
                    let reported = outs[0].get((p / 64) as usize).is_some_and(|w| w >> (p % 64) & 1 != 0);
                    assert!(
                        !model.must.contains(&g) || reported,
                        "{}",
                        ctx(&alloc::format!("written {g:#x} not reported"))
                    );
                    assert!(
                        !reported || model.may.contains(&g),
                        "{}",
                        ctx(&alloc::format!("unwritten {g:#x} reported"))
                    );
                }
                for (h, l) in a.leaves(&slot) {
                    match tracking {
                        Tracking::WriteProtect => {
                            assert!(!l.writable, "{}", ctx(&alloc::format!("leaf {h:?} still writable")))
                        }
                        Tracking::HardwareDirty => {
                            assert!(!l.dirty, "{}", ctx(&alloc::format!("leaf {h:?} kept D")))
                        }
                    }
                }
                model = Model::default();
            }
        }
    }
    assert!(rounds > 5, "seed {seed}: only {rounds} rounds");
}

fn npt() -> Npt {
    Npt::new(WalkLength::Four, width())
}

#[test]
fn the_walked_round_reports_and_protects_as_the_reverse_map_round_does() {
    let (mut npt_seen, mut ept_seen) = (Seen::default(), Seen::default());
    for seed in 0..24 {
        // Slots from an aligned frame, from an unaligned one, and across a
        // 1 GiB boundary (a level-2 table of its own on each side).
        let base = [0x1000, 0x100d, 0x1000, 0x3_fe0d][seed as usize % 4];
        run_case(npt(), Tracking::WriteProtect, base, seed, &mut npt_seen);
        run_case(npt(), Tracking::HardwareDirty, base, seed, &mut npt_seen);
        let ept = Ept::new(WalkLength::Four, width(), false);
        run_case(ept, Tracking::WriteProtect, base, seed, &mut ept_seen);
    }
    // The rounds met huge leaves, access-tracked ones and obsolete roots.
    assert!(npt_seen.huge > 0 && npt_seen.obsolete_rounds > 0, "{npt_seen:?}");
    assert!(ept_seen.tracked > 0 && ept_seen.obsolete_rounds > 0, "{ept_seen:?}");
}

/// A write fault before `zap_all`, then a round while the old root is still
/// there (vCPUs may run on it): the walk from the new root cannot see the
/// old leaves, so the round must still reach them (through the reverse map).
/// Write protection leaves the old leaf read-only; a dirty-bit round reports
/// the page written before the zap and a page written through the old root
/// after it.
#[test]
fn a_round_with_an_obsolete_root_still_in_use_reaches_its_leaves() {
    for tracking in [Tracking::WriteProtect, Tracking::HardwareDirty] {
        let base = 0x1000;
        let slot = Memslot::new(SlotId(0), Gfn(base), 1024, Hva(base << 12), SlotFlags::DIRTY_LOG);
        let mut side = Side::new(npt(), slot, tracking);
        let (g, g2) = (base + 5, base + 700);
        let FaultOutcome::Mapped(m) = side.fault(g, Access::WRITE) else {
            panic!("{tracking:?}: no mapping")
        };
        // Under dirty-bit tracking a read maps writable with D clear.
        side.fault(g2, Access::READ);
        let old = side.mmu.root();
        side.mmu.zap_all(&mut FlushRecorder::default(), |_| {});
        assert!(!side.mmu.obsolete.is_empty());
        let through_old = tracking == Tracking::HardwareDirty;
        if through_old {
            assert!(side.hw(old, g2, Access::WRITE).is_some(), "the old root still maps {g2:#x} writable");
        }
        let mut out = Vec::new();
        let log = side.logs.get_mut(&SlotId(0)).expect("logged");
        log.get_and_clear(&mut side.mmu, &mut out).expect("bitmap mode").flush(&mut NoTlb);
        let reported = |p: u64| out[(p / 64) as usize] >> (p % 64) & 1 != 0;
        assert!(reported(g - base), "{tracking:?}: the page written before zap_all is not reported");
        assert_eq!(reported(g2 - base), through_old, "{tracking:?}: the write through the old root");
        let leaf = side.mmu.leaf(m.handle).expect("the obsolete leaf stays until reclaimed");
        match tracking {
            Tracking::WriteProtect => {
                assert!(!leaf.writable, "the obsolete leaf is still writable");
                assert!(side.hw(old, g, Access::WRITE).is_none(), "a vCPU on the old root writes unlogged");
            }
            Tracking::HardwareDirty => assert!(!leaf.dirty, "the obsolete leaf kept its D bit"),
        }
    }
}
