//! The scenario harness: one generic sequence per capability, run against
//! every back end that implements [`GuestMmu`].
//!
//! A [`GuestMmu`] is a guest's translation as seen from outside: the CPU's
//! access ([`GuestMmu::hw_access`], which sets accessed and dirty bits as the
//! hardware would, or faults) and the hypervisor's fault handler. Scenarios
//! play the guest and the migration or reclaim thread, and compare what the
//! core's drivers report with what the guest really did.
//!
//! ## Decisions
//!
//! - **Starting a log changes no memslot.** [`dirty_rounds_with`] starts a
//!   [`SlotDirtyLog`] and puts it in [`DirtyLogs`]; it does not install a
//!   memslot set with [`SlotFlags::DIRTY_LOG`](mmu_generic::memslot::SlotFlags)
//!   and [`GuestMmu`] has no "log started" hook. An engine that reads the
//!   flag (arch-x86's TDP engine, as KVM reads `KVM_MEM_LOG_DIRTY_PAGES`)
//!   gets it from its adapter, which derives the flags from the
//!   [`DirtyLogs`] it is handed at every fault (`TdpGuest`: a flag-only
//!   memslot change, which keeps every mapping). A hook would miss the logs
//!   that tests start and insert by hand; deriving them at the fault cannot.
//! - **An engine error is [`FaultOutcome::Failed`]**, not `Retry`: [`touch`]
//!   fails the access at once and the adapter keeps the error's text
//!   (`TdpGuest::errors`, checked by `TdpGuest::check_clean`). A walk that
//!   meets a reserved bit is a fault to the guest, not an engine error, so
//!   [`HwFault`] stays two-valued and the TDP adapter counts such walks
//!   (`GuestStats::misconfigs`, also checked by `check_clean`).
//! - **Messages are built without `alloc::format!`** (the `msg!` macro
//!   writes through `core::fmt::Write` into a `String`), so a
//!   `panic = "abort"` boot image running the harness needs no
//!   `_Unwind_Resume` for `alloc::fmt::format`'s landing pad on the harness's
//!   account.
//! - **A missing TLB flush is caught by the adapters' TLBs**, not here: the
//!   sim and the TDP adapter cache translations and audit them at every
//!   flush; the ppc adapter's CPU reads the hashed table directly (`NoTlb`).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, Hva, HvaRange, PAGE_SIZE};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::dirty_ring::DirtyRing;
use mmu_generic::memslot::{Memslot, Memslots, SlotId};

/// Builds a message with `core::fmt::Write` into a `String`, not
/// `alloc::format!`: the prebuilt `alloc` of the ppc64 boot image's target
/// is compiled with `panic = "unwind"`, and `alloc::fmt::format`'s landing
/// pad needs `_Unwind_Resume`, which a `panic = "abort"` kernel lacks.
/// Writing into a `String` cannot fail, so the result is ignored.
macro_rules! msg {
    ($($arg:tt)*) => {{
        let mut s = String::new();
        let _ = core::fmt::Write::write_fmt(&mut s, format_args!($($arg)*));
        s
    }};
}

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
    /// The engine returned an error (the adapter keeps its text): the
    /// access fails at once instead of being retried.
    Failed,
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
                FaultOutcome::Failed => {
                    return Err(msg!("access to {gfn:?} (write {write}): the fault handler failed"))
                }
            },
        }
    }
    Err(msg!("access to {gfn:?} (write {write}) still faults after 8 faults"))
}

fn touch_ok<M: GuestMmu>(mmu: &mut M, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> Result<u32, String> {
    match touch(mmu, gfn, write, logs)? {
        Touch::Done(n) => Ok(n),
        other => Err(msg!("access to {gfn:?} ended in {other:?}")),
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
            return Err(msg!("{g:?} took {n} faults to map"));
        }
        faults += n as u64;
    }
    for &g in &gfns {
        if touch_ok(mmu, g, false, &mut logs)? != 0 {
            return Err(msg!("{g:?} faulted again after it was mapped"));
        }
    }
    Ok(faults)
}

/// A gfn outside every slot is an MMIO exit and maps nothing.
pub fn outside_slots_is_mmio<M: GuestMmu>(mmu: &mut M, gfn: Gfn) -> Result<(), String> {
    if mmu.memslots().lookup(gfn).is_some() {
        return Err(msg!("{gfn:?} is inside a slot"));
    }
    let mut logs = DirtyLogs::default();
    for write in [false, true] {
        match touch(mmu, gfn, write, &mut logs)? {
            Touch::Mmio => {}
            other => return Err(msg!("{gfn:?} ended in {other:?}, not an MMIO exit")),
        }
        if mmu.hw_access(gfn, write).is_ok() {
            return Err(msg!("{gfn:?} became accessible"));
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
    /// Writes that went through a translation still cached between a
    /// harvest and its flush (a vCPU on another CPU): only the copy after
    /// the flush holds them.
    pub in_flight_writes: u64,
    /// Times the vCPU exited to the harvester because its ring was full or
    /// soft-full.
    pub ring_exits: u64,
}

/// The ring a [`dirty_rounds_with`] run gives the vCPU in ring mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSize {
    /// Entries (a power of two).
    pub size: u32,
    /// Soft-full reserve.
    pub reserve: u32,
}

impl Default for RingSize {
    fn default() -> Self {
        Self { size: 1024, reserve: 16 }
    }
}

/// Live-migration dirty rounds on `slot` with a large ring; see
/// [`dirty_rounds_with`].
pub fn dirty_rounds<M: GuestMmu>(
    mmu: &mut M,
    slot: SlotId,
    tracking: Tracking,
    mode: LogMode,
    rounds: u32,
    seed: u64,
) -> Result<DirtyReport, String> {
    dirty_rounds_with(mmu, slot, tracking, mode, rounds, seed, RingSize::default())
}

/// The migration's view of guest memory: a version per page, bumped by each
/// guest write, and the destination's copy.
#[derive(Default)]
struct Migration {
    memory: BTreeMap<u64, u64>,
    dest: BTreeMap<u64, u64>,
    writes: u64,
}

impl Migration {
    fn write(&mut self, off: u64) {
        self.writes += 1;
        self.memory.insert(off, self.writes);
    }

    /// Copies the pages reported dirty; call only after the round's flush.
    fn copy(&mut self, pages: &BTreeSet<u64>) {
        for &off in pages {
            if let Some(&v) = self.memory.get(&off) {
                self.dest.insert(off, v);
            }
        }
    }

    fn first_difference(&self) -> Option<(u64, u64, Option<u64>)> {
        self.memory
            .iter()
            .find(|(off, v)| self.dest.get(off) != Some(v))
            .map(|(&o, &v)| (o, v, self.dest.get(&o).copied()))
    }
}

/// Ring mode: collects the ring, checks each page is reported once per
/// harvest and exactly the pages written since the previous harvest, resets
/// (re-protects) and flushes, then copies.
fn ring_exit<M: GuestMmu>(
    mmu: &mut M,
    logs: &mut DirtyLogs,
    s: &Memslot,
    fetch: &mut u32,
    since: &mut BTreeSet<u64>,
    mig: &mut Migration,
) -> Result<BTreeSet<u64>, String> {
    let slot = s.id();
    let log = logs.logs.get(&slot).expect("the slot is logged");
    let ring = logs.ring.as_ref().expect("ring mode has a ring");
    let mut reported = BTreeSet::new();
    let mut twice = None;
    ring.harvest(fetch, |sl, off| {
        if sl == slot && !reported.insert(off) {
            twice = Some(off);
        }
    });
    if let Some(off) = twice {
        return Err(msg!("page {off} was reported twice in one harvest"));
    }
    if let Some(missed) = since.difference(&reported).next() {
        return Err(msg!("page {missed} was written but not in the ring"));
    }
    if let Some(extra) = reported.difference(since).next() {
        return Err(msg!("page {extra} is in the ring but was not written"));
    }
    let mut flush = FlushToken::new();
    let backend = mmu.backend_mut();
    let mut err = None;
    ring.reset(|_, off| {
        if let Err(e) = log.reset_ring_entry(backend, s, off, &mut flush) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        flush.discard();
        return Err(msg!("ring reset: {e}"));
    }
    mmu.flush(flush);
    mig.copy(&reported);
    since.clear();
    Ok(reported)
}

/// Live-migration dirty rounds on `slot`: before logging starts the guest
/// touches part of the slot; then each round it writes a random set (and
/// reads another), and the harvester collects the log in `mode`. Every
/// written page must be reported in its round and no other page (ring
/// mode: in the harvest that follows it, once).
///
/// The migration copies what is reported only after the round's flush.
/// Between the harvest and that flush a vCPU on another CPU keeps writing
/// (accesses that fault are dropped, not retried): those writes can only go
/// through translations still cached, and only the copy after the flush
/// holds them. After the last round the guest stops, a final round runs,
/// and the destination must equal guest memory page for page; a copy taken
/// before a flush, or a flush that misses a range, fails here or in a round.
///
/// In ring mode the vCPU has a ring of `ring` entries; when a write finds it
/// full (or soft-full) the vCPU exits to the harvester mid-round, so rings
/// smaller than a round's writes run the full, soft-full and retry paths.
pub fn dirty_rounds_with<M: GuestMmu>(
    mmu: &mut M,
    slot: SlotId,
    tracking: Tracking,
    mode: LogMode,
    rounds: u32,
    seed: u64,
    ring: RingSize,
) -> Result<DirtyReport, String> {
    let mut rng = Lcg(seed);
    let s = *mmu.memslots().get(slot).ok_or("no such slot")?;
    let n = s.npages();
    let mut logs = DirtyLogs::default();
    if mode == LogMode::Ring {
        logs.ring = Some(DirtyRing::new(ring.size, ring.reserve).map_err(|e| msg!("{e:?}"))?);
    }
    let mut mig = Migration::default();
    // Before logging: writes and reads that must not show up in round 1.
    // The first full copy (below) takes them.
    for _ in 0..n / 2 {
        let off = rng.below(n);
        let write = rng.below(2) == 0;
        touch_ok(mmu, Gfn(s.base_gfn().0 + off), write, &mut logs)?;
        if write {
            mig.write(off);
        }
    }
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&s, tracking, mode, mmu.backend_mut(), &mut flush)
        .map_err(|e| msg!("start: {e}"))?;
    mmu.flush(flush);
    logs.logs.insert(slot, log);
    // The first pass copies everything, after logging started.
    let all: BTreeSet<u64> = (0..n).collect();
    mig.copy(&all);

    let mut report = DirtyReport::default();
    let mut fetch = 0u32;
    let mut words = Vec::new();
    // In-flight pages of the last harvest: may be reported next round.
    let mut in_flight = BTreeSet::new();
    for round in 0..=rounds {
        let last = round == rounds;
        let mut written = BTreeSet::new();
        let mut since_harvest = BTreeSet::new();
        let mut reported = BTreeSet::new();
        let writes = if last { 0 } else { 1 + rng.below(n.min(200)) };
        for _ in 0..writes {
            let off = rng.below(n);
            let gfn = Gfn(s.base_gfn().0 + off);
            let mut tries = 0;
            let mut exit_after = false;
            loop {
                tries += 1;
                if tries > 16 {
                    return Err(msg!("round {round}: write to page {off} never completed"));
                }
                if mmu.hw_access(gfn, true).is_ok() {
                    break;
                }
                let soft_before = logs.soft_full_exits;
                let outcome = mmu.handle_fault(gfn, true, &mut logs);
                let ring_full = logs.ring.as_ref().is_some_and(|r| r.used() >= r.size());
                let soft = logs.soft_full_exits != soft_before;
                match outcome {
                    FaultOutcome::Mapped | FaultOutcome::Retry => {}
                    other => return Err(msg!("round {round}: write to page {off} ended in {other:?}")),
                }
                if mode == LogMode::Ring && soft && outcome == FaultOutcome::Mapped {
                    // Soft-full: the write completes, then the vCPU exits.
                    exit_after = true;
                } else if mode == LogMode::Ring && ring_full {
                    // Full: the write waits; exit to the harvester now.
                    report.ring_exits += 1;
                    let got = ring_exit(mmu, &mut logs, &s, &mut fetch, &mut since_harvest, &mut mig)?;
                    report.written += got.len() as u64;
                    report.reported += got.len() as u64;
                    reported.extend(got);
                }
            }
            mig.write(off);
            written.insert(off);
            since_harvest.insert(off);
            if exit_after {
                report.ring_exits += 1;
                let got = ring_exit(mmu, &mut logs, &s, &mut fetch, &mut since_harvest, &mut mig)?;
                report.written += got.len() as u64;
                report.reported += got.len() as u64;
                reported.extend(got);
            }
            let read = rng.below(n);
            touch_ok(mmu, Gfn(s.base_gfn().0 + read), false, &mut logs)?;
        }
        let log = logs.logs.get_mut(&slot).expect("inserted above");
        let mut new_in_flight = BTreeSet::new();
        // The harvest; its flush is handed back for after the in-flight
        // writes.
        let pending = match mode {
            LogMode::Bitmap => {
                let f = log.get_and_clear(mmu.backend_mut(), &mut words).map_err(|e| msg!("{e}"))?;
                collect_bits(&words, 0, &mut reported);
                f
            }
            LogMode::ManualProtect => {
                let f = log.get(mmu.backend_mut(), &mut words).map_err(|e| msg!("{e}"))?;
                mmu.flush(f);
                let mut got = BTreeSet::new();
                collect_bits(&words, 0, &mut got);
                let mut flush = FlushToken::new();
                for (i, &w) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
                    // A guest write lands between get and clear of the same
                    // range: it must not be lost (it is copied after the
                    // clear's flush, or reported next round).
                    let off = i as u64 * 64 + u64::from(w.trailing_zeros());
                    if !last && rng.below(2) == 0 {
                        let gfn = Gfn(s.base_gfn().0 + off);
                        touch_ok(mmu, gfn, true, &mut logs)?;
                        mig.write(off);
                        report.in_flight_writes += 1;
                        new_in_flight.insert(off);
                    }
                    let log = logs.logs.get_mut(&slot).expect("inserted above");
                    let f = log.clear(mmu.backend_mut(), &s, i as u64 * 64, w).map_err(|e| msg!("{e}"))?;
                    flush.merge(f);
                }
                reported.extend(got);
                flush
            }
            LogMode::Ring => {
                let got = ring_exit(mmu, &mut logs, &s, &mut fetch, &mut since_harvest, &mut mig)?;
                report.written += got.len() as u64;
                report.reported += got.len() as u64;
                reported.extend(got);
                FlushToken::new()
            }
        };
        // A vCPU on another CPU writes before the flush lands: only cached
        // translations let it through.
        if !last {
            for _ in 0..1 + rng.below(8) {
                let off = rng.below(n);
                if mmu.hw_access(Gfn(s.base_gfn().0 + off), true).is_ok() {
                    mig.write(off);
                    report.in_flight_writes += 1;
                    new_in_flight.insert(off);
                }
            }
        }
        mmu.flush(pending);
        if mode != LogMode::Ring {
            mig.copy(&reported);
        }
        if let Some(missed) = written.difference(&reported).next() {
            return Err(msg!("round {round}: page {missed} was written but not reported"));
        }
        if let Some(extra) = reported.difference(&written).find(|p| !in_flight.contains(*p)) {
            return Err(msg!("round {round}: page {extra} was reported but not written"));
        }
        if !last {
            report.rounds += 1;
        }
        if mode != LogMode::Ring {
            // Pages reported for an in-flight write of the last harvest
            // alone are not this round's.
            let carried = reported.iter().filter(|p| in_flight.contains(*p) && !written.contains(*p)).count();
            report.written += written.len() as u64;
            report.reported += (reported.len() - carried) as u64;
        }
        in_flight = new_in_flight;
    }
    if let Some((off, want, got)) = mig.first_difference() {
        return Err(msg!(
            "after the final round page {off} holds write {want} in the guest but {got:?} at the destination"
        ));
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
            return Err(msg!("page {off}: test_age says young={}, touched={}", r.young, want));
        }
        young += u64::from(r.young);
    }
    let mut flush = FlushToken::new();
    let aged = age(&slots, mmu.backend_mut(), all, policy, &mut flush);
    mmu.flush(flush);
    if aged.young_leaves != young {
        return Err(msg!("age found {} young leaves, test_age {}", aged.young_leaves, young));
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
            return Err(msg!("page {off} is still mapped after its invalidation"));
        }
    }
    for off in 0..s.npages() {
        let faults = touch_ok(mmu, Gfn(s.base_gfn().0 + off), false, &mut logs)?;
        let inside = off >= first && off < first + pages;
        // A huge leaf that straddles the range goes whole; only then may a
        // page outside it refault.
        if !inside && faults != 0 && !huge_leaves {
            return Err(msg!("page {off} outside the range refaulted"));
        }
    }
    Ok(zapped)
}
