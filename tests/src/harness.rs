//! The scenario harness: one generic sequence per capability, run against
//! every back end that implements [`GuestMmu`].
//!
//! A [`GuestMmu`] is a guest's translation as seen from outside: the CPU's
//! access ([`GuestMmu::hw_access`], which sets accessed and dirty bits as the
//! hardware would, or faults) and the hypervisor's fault handler. Scenarios
//! play the guest and the migration or reclaim thread, and compare what the
//! core's drivers report with what the guest really did.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, Hva, HvaRange, PAGE_SIZE};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::dirty_ring::DirtyRing;
use mmu_generic::memslot::{Memslots, SlotId};

/// Why the CPU's access did not complete.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HwFault {
    /// No present leaf maps the frame.
    NotPresent,
    /// A write to a leaf without write permission.
    WriteProtected,
}

/// What the fault handler did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// A leaf now allows the access.
    Mapped,
    /// Nothing was installed; run the guest again (invalidation race, full
    /// dirty ring).
    Retry,
    /// The frame lies outside every memslot: an MMIO / emulation exit.
    Mmio,
    /// The access is not allowed (a write to a read-only slot).
    Denied,
}

/// The dirty-log state of a guest: one log per logged slot, and the vCPU's
/// ring for slots in ring mode.
#[derive(Debug, Default)]
pub struct DirtyLogs {
    /// Logs by slot.
    pub logs: BTreeMap<SlotId, SlotDirtyLog>,
    /// The (single) vCPU's ring.
    pub ring: Option<DirtyRing>,
    /// Pushes that reported the ring soft-full.
    pub soft_full_exits: u64,
}

/// A guest's translation, driven by the scenarios.
pub trait GuestMmu {
    /// The page-table format.
    type Backend: MmuBackend;
    /// The current memslot set.
    fn memslots(&self) -> &Memslots;
    /// The format, for the read-only drivers.
    fn backend(&self) -> &Self::Backend;
    /// The format, for the drivers that change it.
    fn backend_mut(&mut self) -> &mut Self::Backend;
    /// The CPU accesses `gfn`: sets A (and D on a write) or faults.
    fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault>;
    /// The hypervisor's fault handler.
    fn handle_fault(&mut self, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> FaultOutcome;
    /// Performs a batch's TLB flush.
    fn flush(&mut self, token: FlushToken);
    /// An MMU notifier: zaps every leaf backed by `range`. Returns the
    /// number of leaves zapped.
    fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize;
}

/// How a guest access ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Touch {
    /// Completed after this many faults.
    Done(u32),
    /// An MMIO exit.
    Mmio,
    /// Denied by the hypervisor.
    Denied,
}

/// The guest accesses `gfn`, faulting as often as it takes (bounded).
pub fn touch<M: GuestMmu>(mmu: &mut M, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> Result<Touch, String> {
    for faults in 0..8 {
        match mmu.hw_access(gfn, write) {
            Ok(()) => return Ok(Touch::Done(faults)),
            Err(_) => match mmu.handle_fault(gfn, write, logs) {
                FaultOutcome::Mapped | FaultOutcome::Retry => {}
                FaultOutcome::Mmio => return Ok(Touch::Mmio),
                FaultOutcome::Denied => return Ok(Touch::Denied),
            },
        }
    }
    Err(format!("access to {gfn:?} (write {write}) still faults after 8 faults"))
}

fn touch_ok<M: GuestMmu>(mmu: &mut M, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> Result<u32, String> {
    match touch(mmu, gfn, write, logs)? {
        Touch::Done(n) => Ok(n),
        other => Err(format!("access to {gfn:?} ended in {other:?}")),
    }
}

/// A tiny deterministic generator, so scenarios need no dependency.
#[derive(Clone, Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    /// A value below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Demand faults: every page of every slot is touched once and faulted in
/// at most once; a second pass faults nothing. Returns the faults taken.
pub fn demand_faults<M: GuestMmu>(mmu: &mut M) -> Result<u64, String> {
    let mut logs = DirtyLogs::default();
    let gfns: Vec<Gfn> =
        mmu.memslots().iter().flat_map(|s| (s.gfns().start.0..s.gfns().end.0).map(Gfn)).collect();
    let mut faults = 0u64;
    for &g in &gfns {
        let n = touch_ok(mmu, g, false, &mut logs)?;
        if n > 1 {
            return Err(format!("{g:?} took {n} faults to map"));
        }
        faults += n as u64;
    }
    for &g in &gfns {
        if touch_ok(mmu, g, false, &mut logs)? != 0 {
            return Err(format!("{g:?} faulted again after it was mapped"));
        }
    }
    Ok(faults)
}

/// A gfn outside every slot is an MMIO exit and maps nothing.
pub fn outside_slots_is_mmio<M: GuestMmu>(mmu: &mut M, gfn: Gfn) -> Result<(), String> {
    if mmu.memslots().lookup(gfn).is_some() {
        return Err(format!("{gfn:?} is inside a slot"));
    }
    let mut logs = DirtyLogs::default();
    for write in [false, true] {
        match touch(mmu, gfn, write, &mut logs)? {
            Touch::Mmio => {}
            other => return Err(format!("{gfn:?} ended in {other:?}, not an MMIO exit")),
        }
        if mmu.hw_access(gfn, write).is_ok() {
            return Err(format!("{gfn:?} became accessible"));
        }
    }
    Ok(())
}

/// What a dirty-logging run observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyReport {
    /// Rounds run.
    pub rounds: u32,
    /// Pages written by the guest, summed over rounds.
    pub written: u64,
    /// Pages reported, summed over rounds.
    pub reported: u64,
}

/// Live-migration dirty rounds on `slot`: before logging starts the guest
/// touches part of the slot; then each round it writes a random set (and
/// reads another), and the harvester collects the log in `mode`. Every
/// written page must be reported in its round and no other page.
pub fn dirty_rounds<M: GuestMmu>(
    mmu: &mut M,
    slot: SlotId,
    tracking: Tracking,
    mode: LogMode,
    rounds: u32,
    seed: u64,
) -> Result<DirtyReport, String> {
    let mut rng = Lcg(seed);
    let s = *mmu.memslots().get(slot).ok_or("no such slot")?;
    let n = s.npages();
    let mut logs = DirtyLogs::default();
    if mode == LogMode::Ring {
        logs.ring = Some(DirtyRing::new(1024, 16).map_err(|e| format!("{e:?}"))?);
    }
    // Before logging: writes and reads that must not show up in round 1.
    for _ in 0..n / 2 {
        let g = Gfn(s.base_gfn().0 + rng.below(n));
        touch_ok(mmu, g, rng.below(2) == 0, &mut logs)?;
    }
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&s, tracking, mode, mmu.backend_mut(), &mut flush)
        .map_err(|e| format!("start: {e}"))?;
    mmu.flush(flush);
    logs.logs.insert(slot, log);

    let mut report = DirtyReport::default();
    let mut fetch = 0u32;
    let mut words = Vec::new();
    for round in 0..rounds {
        let mut written = BTreeSet::new();
        let writes = 1 + rng.below(n.min(200));
        for _ in 0..writes {
            let off = rng.below(n);
            touch_ok(mmu, Gfn(s.base_gfn().0 + off), true, &mut logs)?;
            written.insert(off);
            let read = rng.below(n);
            touch_ok(mmu, Gfn(s.base_gfn().0 + read), false, &mut logs)?;
        }
        let mut reported = BTreeSet::new();
        let log = logs.logs.get_mut(&slot).expect("inserted above");
        match mode {
            LogMode::Bitmap => {
                let f = log.get_and_clear(mmu.backend_mut(), &mut words).map_err(|e| e.to_string())?;
                mmu.flush(f);
                collect_bits(&words, 0, &mut reported);
            }
            LogMode::ManualProtect => {
                let f = log.get(mmu.backend_mut(), &mut words).map_err(|e| e.to_string())?;
                mmu.flush(f);
                collect_bits(&words, 0, &mut reported);
                let mut flush = FlushToken::new();
                for (i, &w) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
                    let f = log.clear(mmu.backend_mut(), &s, i as u64 * 64, w).map_err(|e| e.to_string())?;
                    flush.merge(f);
                }
                mmu.flush(flush);
            }
            LogMode::Ring => {
                let ring = logs.ring.as_ref().expect("ring mode has a ring");
                ring.harvest(&mut fetch, |sl, off| {
                    if sl == slot {
                        reported.insert(off);
                    }
                });
                let mut flush = FlushToken::new();
                let backend = mmu.backend_mut();
                let mut err = None;
                ring.reset(|_, off| {
                    if let Err(e) = log.reset_ring_entry(backend, &s, off, &mut flush) {
                        err = Some(e);
                    }
                });
                if let Some(e) = err {
                    return Err(format!("ring reset: {e}"));
                }
                mmu.flush(flush);
            }
        }
        if let Some(missed) = written.difference(&reported).next() {
            return Err(format!("round {round}: page {missed} was written but not reported"));
        }
        if let Some(extra) = reported.difference(&written).next() {
            return Err(format!("round {round}: page {extra} was reported but not written"));
        }
        report.rounds += 1;
        report.written += written.len() as u64;
        report.reported += reported.len() as u64;
    }
    Ok(report)
}

fn collect_bits(words: &[u64], base: u64, out: &mut BTreeSet<u64>) {
    for (i, &w) in words.iter().enumerate() {
        let mut bits = w;
        while bits != 0 {
            out.insert(base + i as u64 * 64 + bits.trailing_zeros() as u64);
            bits &= bits - 1;
        }
    }
}

fn page_hvas(mmu: &impl GuestMmu, slot: SlotId, off: u64) -> HvaRange {
    let s = mmu.memslots().get(slot).expect("slot exists");
    let start = Hva(s.hva().0 + off * PAGE_SIZE);
    HvaRange { start, end: Hva(start.0 + PAGE_SIZE) }
}

/// Ageing over host-virtual ranges: after `age`, exactly the pages the guest
/// touched are young (under `policy` where the format has no accessed bit:
/// access tracking reports the touched pages, report-old reports none), and
/// after a second `age` none is. Returns the pages found young.
pub fn ageing<M: GuestMmu>(
    mmu: &mut M,
    slot: SlotId,
    policy: NoAccessedBit,
    seed: u64,
) -> Result<u64, String> {
    let mut rng = Lcg(seed);
    let s = *mmu.memslots().get(slot).ok_or("no such slot")?;
    let n = s.npages();
    let mut logs = DirtyLogs::default();
    for off in 0..n {
        touch_ok(mmu, Gfn(s.base_gfn().0 + off), false, &mut logs)?;
    }
    let all = s.hvas();
    let slots = mmu.memslots().clone();
    let mut flush = FlushToken::new();
    age(&slots, mmu.backend_mut(), all, policy, &mut flush);
    mmu.flush(flush);
    let touched: BTreeSet<u64> = (0..n / 4).map(|_| rng.below(n)).collect();
    for &off in &touched {
        touch_ok(mmu, Gfn(s.base_gfn().0 + off), rng.below(2) == 0, &mut logs)?;
    }
    let caps = mmu.backend().caps();
    let reports = !(caps.accessed_bit || policy == NoAccessedBit::AccessTracking);
    let mut young = 0;
    for off in 0..n {
        let r = test_age(&slots, mmu.backend(), page_hvas(mmu, slot, off), policy);
        let want = !reports && touched.contains(&off);
        if r.young != want {
            return Err(format!("page {off}: test_age says young={}, touched={}", r.young, want));
        }
        young += u64::from(r.young);
    }
    let mut flush = FlushToken::new();
    let aged = age(&slots, mmu.backend_mut(), all, policy, &mut flush);
    mmu.flush(flush);
    if aged.young_leaves != young {
        return Err(format!("age found {} young leaves, test_age {}", aged.young_leaves, young));
    }
    if test_age(&slots, mmu.backend(), all, policy).young {
        return Err("a page is still young after age".into());
    }
    Ok(young)
}

/// An MMU-notifier invalidation between guest runs: the range's leaves are
/// zapped, the guest's next access refaults and succeeds, other pages do not
/// fault. Returns the leaves zapped.
pub fn invalidation<M: GuestMmu>(
    mmu: &mut M,
    slot: SlotId,
    first: u64,
    pages: u64,
    huge_leaves: bool,
) -> Result<usize, String> {
    let s = *mmu.memslots().get(slot).ok_or("no such slot")?;
    let mut logs = DirtyLogs::default();
    for off in 0..s.npages() {
        touch_ok(mmu, Gfn(s.base_gfn().0 + off), true, &mut logs)?;
    }
    let start = Hva(s.hva().0 + first * PAGE_SIZE);
    let zapped = mmu.zap_hva_range(HvaRange { start, end: Hva(start.0 + pages * PAGE_SIZE) }, &logs);
    if zapped == 0 {
        return Err("the invalidation zapped nothing".into());
    }
    for off in first..first + pages {
        if mmu.hw_access(Gfn(s.base_gfn().0 + off), false).is_ok() {
            return Err(format!("page {off} is still mapped after its invalidation"));
        }
    }
    for off in 0..s.npages() {
        let faults = touch_ok(mmu, Gfn(s.base_gfn().0 + off), false, &mut logs)?;
        let inside = off >= first && off < first + pages;
        // A huge leaf that straddles the range goes whole; only then may a
        // page outside it refault.
        if !inside && faults != 0 && !huge_leaves {
            return Err(format!("page {off} outside the range refaulted"));
        }
    }
    Ok(zapped)
}
