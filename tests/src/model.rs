//! Plain models of the core's structures and `arbitrary` operation enums,
//! shared by the model-based tests and the fuzz targets. Each `run_*`
//! function applies a sequence to the real structure and to its model and
//! returns the first disagreement.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use mmu_generic::addr::{Gfn, Hva, HvaRange, PAGE_SHIFT};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::{Caps, FlushToken};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::dirty_ring::DirtyRing;
use mmu_generic::invalidate::{FaultSnapshot, InvalidationSeq};
use mmu_generic::memslot::{
    Memslot, MemslotError, MemslotGenerations, Memslots, MemslotsBuilder, SlotFlags, SlotHint, SlotId,
};
use mmu_generic::pte_list::{PteHandle, PteList, PteListPool, RmapError};

use crate::harness::{touch, DirtyLogs, FaultOutcome, GuestMmu, Touch};
use crate::sim::SimMmu;

/// One change or query of a memslot set. Small fields make collisions
/// (overlaps, aliases, duplicate ids) common.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum MemslotOp {
    /// Create a slot (applied to a builder of the next generation).
    Create {
        /// Slot number (some above the limit).
        id: u16,
        /// Base gfn, in units of 16 pages.
        base: u8,
        /// Pages (0 is invalid).
        npages: u8,
        /// Host page, in units of 4 pages (aliases are common).
        hva_page: u8,
        /// Misalign the hva.
        misalign: bool,
        /// Place the slot near the top of the gfn space.
        high: bool,
    },
    /// Delete a slot.
    Delete(u8),
    /// Move a slot to base * 16.
    Move(u8, u8),
    /// Toggle a slot's flags.
    SetFlags(u8, bool, bool),
    /// Look a gfn up: `g * 4 + g % 3`, or near the top of the gfn space
    /// (`2^52 - 64 + g % 320`), through the vCPU's hint or without.
    Lookup {
        /// The gfn's seed.
        g: u16,
        /// Near the top of the gfn space.
        high: bool,
        /// Through the [`SlotHint`].
        hinted: bool,
    },
    /// Look any gfn up (the whole 64-bit space).
    LookupRaw(u64),
    /// Query a host-virtual range (start page, pages), low or at the top of
    /// the address space.
    LookupHva(u16, u8, bool),
    /// Build two sets from the current one and one from scratch with the
    /// VM's counter (kept only for the generation check).
    Rebuild,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ModelSlot {
    base: u64,
    npages: u64,
    hva: u64,
    flags: SlotFlags,
}

fn model_check(slots: &BTreeMap<u16, ModelSlot>) -> Result<(), &'static str> {
    let v: Vec<_> = slots.iter().collect();
    for (id, s) in &v {
        if **id as usize >= mmu_generic::memslot::MAX_SLOTS {
            return Err("id");
        }
        if s.npages == 0 {
            return Err("zero");
        }
        if s.base.checked_add(s.npages).is_none_or(|e| (e - 1) >> 52 != 0) {
            return Err("gfn");
        }
        if s.hva & 0xfff != 0 {
            return Err("hva-align");
        }
        if s.npages.checked_mul(4096).and_then(|b| s.hva.checked_add(b)).is_none() {
            return Err("hva");
        }
    }
    for (i, (_, a)) in v.iter().enumerate() {
        for (_, b) in &v[i + 1..] {
            if a.base < b.base + b.npages && b.base < a.base + a.npages {
                return Err("overlap");
            }
        }
    }
    Ok(())
}

fn error_kind(e: &MemslotError) -> &'static str {
    match e {
        MemslotError::Overlap { .. } => "overlap",
        MemslotError::ZeroSize(_) => "zero",
        MemslotError::GfnOverflow(_) => "gfn",
        MemslotError::HvaOverflow(_) => "hva",
        MemslotError::MisalignedHva { .. } => "hva-align",
        MemslotError::DuplicateId(_) => "dup",
        MemslotError::IdOutOfRange(_) => "id",
        MemslotError::NoSuchSlot(_) => "none",
    }
}

/// Applies memslot operations to [`Memslots`] (rebuilt after each change)
/// and to a `BTreeMap` model; compares build verdicts and every query.
pub fn run_memslots(ops: &[MemslotOp]) -> Result<(), String> {
    let vm = MemslotGenerations::new();
    let mut real = Memslots::empty_in(&vm);
    let mut model: BTreeMap<u16, ModelSlot> = BTreeMap::new();
    let mut hint = SlotHint::default();
    // Every generation ever built from the VM's counter only goes up.
    let mut newest = 0u64;
    let mut check_gen = |step: usize, set: &Memslots| -> Result<(), String> {
        if set.generation() <= newest {
            return Err(format!("step {step}: generation {} not above {newest}", set.generation()));
        }
        newest = set.generation();
        Ok(())
    };
    for (step, op) in ops.iter().enumerate() {
        let mut b = real.to_builder();
        let mut next = model.clone();
        let change: Result<(), MemslotError> = match *op {
            MemslotOp::Create { id, base, npages, hva_page, misalign, high } => {
                let base = if high { (1u64 << 52) - 64 + base as u64 } else { base as u64 * 16 };
                let hva = if high {
                    u64::MAX - 0xfff - (hva_page as u64) * 0x4000
                } else {
                    hva_page as u64 * 0x4000
                } + u64::from(misalign) * 8;
                let s = ModelSlot { base, npages: npages as u64, hva, flags: SlotFlags::empty() };
                if next.insert(id, s).is_some() {
                    // The builder refuses a duplicate before building.
                    next = model.clone();
                }
                b.create(Memslot::new(SlotId(id), Gfn(base), npages as u64, Hva(hva), SlotFlags::empty()))
                    .map(|_| ())
            }
            MemslotOp::Delete(id) => {
                next.remove(&(id as u16));
                b.delete(SlotId(id as u16)).map(|_| ())
            }
            MemslotOp::Move(id, base) => {
                if let Some(s) = next.get_mut(&(id as u16)) {
                    s.base = base as u64 * 16;
                }
                b.move_to(SlotId(id as u16), Gfn(base as u64 * 16)).map(|_| ())
            }
            MemslotOp::SetFlags(id, log, ro) => {
                let mut f = SlotFlags::empty();
                f.set(SlotFlags::DIRTY_LOG, log);
                f.set(SlotFlags::READONLY, ro);
                if let Some(s) = next.get_mut(&(id as u16)) {
                    s.flags = f;
                }
                b.set_flags(SlotId(id as u16), f).map(|_| ())
            }
            MemslotOp::Lookup { .. } | MemslotOp::LookupRaw(_) => {
                let (gfn, hinted) = match *op {
                    MemslotOp::Lookup { g, high: true, hinted } => {
                        ((1u64 << 52) - 64 + g as u64 % 320, hinted)
                    }
                    MemslotOp::Lookup { g, high: false, hinted } => (g as u64 * 4 + (g as u64 % 3), hinted),
                    MemslotOp::LookupRaw(g) => (g, g % 2 == 0),
                    _ => unreachable!("matched above"),
                };
                let want =
                    model.iter().find(|(_, s)| gfn >= s.base && gfn - s.base < s.npages).map(|(id, _)| *id);
                let got =
                    if hinted { real.lookup_hinted(Gfn(gfn), &mut hint) } else { real.lookup(Gfn(gfn)) };
                let got = got.map(|s| s.id().0);
                if want != got {
                    return Err(format!(
                        "step {step}: lookup {gfn:#x} (hint {hinted}): model {want:?}, real {got:?}"
                    ));
                }
                continue;
            }
            MemslotOp::Rebuild => {
                let a = real.to_builder().build().map_err(|e| format!("step {step}: rebuild: {e:?}"))?;
                check_gen(step, &a)?;
                let b = real.to_builder().build().map_err(|e| format!("step {step}: rebuild: {e:?}"))?;
                check_gen(step, &b)?;
                let c = MemslotsBuilder::with_generations(&vm).build().map_err(|e| format!("{e:?}"))?;
                check_gen(step, &c)?;
                // The hint of the current set must not carry over to a
                // sibling that holds other slots.
                if c.lookup_hinted(Gfn(0), &mut hint).is_some() {
                    return Err(format!("step {step}: an empty set found a slot through a stale hint"));
                }
                // Continue on a sibling, so later steps use a set whose
                // generation an older hint must not match.
                real = b;
                continue;
            }
            MemslotOp::LookupHva(page, len, high) => {
                let start = if high { u64::MAX - 0xfff - page as u64 * 0x1000 } else { page as u64 * 0x1000 };
                let end = start.saturating_add((len as u64 + 1) * 0x1000);
                let range = HvaRange { start: Hva(start), end: Hva(end) };
                let mut want: Vec<(u16, u64, u64)> = model
                    .iter()
                    .filter_map(|(id, s)| {
                        let (hs, he) = (s.hva, s.hva.saturating_add(s.npages << PAGE_SHIFT));
                        (hs < end && start < he).then(|| {
                            let first = (start.max(hs) - hs) >> PAGE_SHIFT;
                            let last = (end.min(he) - hs).div_ceil(4096);
                            (*id, s.base + first, s.base + last)
                        })
                    })
                    .collect();
                let mut got: Vec<(u16, u64, u64)> =
                    real.lookup_hva(range).map(|(s, r)| (s.id().0, r.start.0, r.end.0)).collect();
                if got.windows(2).any(|w| {
                    let a = real.get(SlotId(w[0].0)).expect("listed").hva();
                    let b = real.get(SlotId(w[1].0)).expect("listed").hva();
                    (a, w[0].0) > (b, w[1].0)
                }) {
                    return Err(format!("step {step}: hva query out of order: {got:?}"));
                }
                want.sort_unstable();
                got.sort_unstable();
                if want != got {
                    return Err(format!(
                        "step {step}: hva {start:#x}..{end:#x}: model {want:?}, real {got:?}"
                    ));
                }
                continue;
            }
        };
        let verdict = change.and_then(|_| b.build());
        let model_verdict = if matches!(op, MemslotOp::Create { id, .. } if model.contains_key(id)) {
            Err("dup")
        } else if let MemslotOp::Delete(id) | MemslotOp::Move(id, _) | MemslotOp::SetFlags(id, ..) = op {
            if model.contains_key(&(*id as u16)) {
                model_check(&next)
            } else {
                Err("none")
            }
        } else {
            model_check(&next)
        };
        match (verdict, model_verdict) {
            (Ok(set), Ok(())) => {
                check_gen(step, &set)?;
                real = set;
                model = next;
            }
            (Err(e), Err(kind)) if error_kind(&e) == kind => {}
            (Err(e), Err(kind)) if kind == "overlap" || error_kind(&e) == "overlap" => {
                // Several faults at once: either may be named first.
                if model_check(&next).is_ok() {
                    return Err(format!("step {step}: real refused {e:?}, model accepts"));
                }
            }
            (v, m) => return Err(format!("step {step}: {op:?}: real {:?}, model {m:?}", v.map(|_| ()))),
        }
    }
    Ok(())
}

/// One operation on a set of PTE lists.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RmapOp {
    /// Add handle to list.
    Add(u8, u16),
    /// Remove handle from list (maybe absent).
    Remove(u8, u16),
    /// Remove the n-th handle of the list (present).
    RemoveNth(u8, u8),
    /// Drain a list.
    Drain(u8),
    /// Top up the reserve.
    Reserve(u8),
}

/// Applies list operations to [`PteListPool`] lists and to a `Vec<Vec<_>>`
/// model (multisets); compares contents after every step.
pub fn run_rmap(ops: &[RmapOp]) -> Result<(), String> {
    const LISTS: usize = 8;
    let mut pool = PteListPool::new();
    let mut heads = [PteList::EMPTY; LISTS];
    let mut model: Vec<Vec<u32>> = vec![Vec::new(); LISTS];
    for (step, op) in ops.iter().enumerate() {
        match *op {
            RmapOp::Add(l, h) => {
                let l = l as usize % LISTS;
                match pool.add(&mut heads[l], PteHandle(h as u32)) {
                    Ok(()) => model[l].push(h as u32),
                    Err(RmapError::ReserveEmpty) => {
                        if model[l].is_empty() {
                            return Err(format!("step {step}: an empty list needed a descriptor"));
                        }
                    }
                    Err(e) => return Err(format!("step {step}: add: {e}")),
                }
            }
            RmapOp::Remove(l, h) => {
                let l = l as usize % LISTS;
                let pos = model[l].iter().position(|&x| x == h as u32);
                match (pool.remove(&mut heads[l], PteHandle(h as u32)), pos) {
                    (Ok(()), Some(p)) => {
                        model[l].swap_remove(p);
                    }
                    (Err(RmapError::NotFound(_)), None) => {}
                    (r, p) => return Err(format!("step {step}: remove: real {r:?}, model {p:?}")),
                }
            }
            RmapOp::RemoveNth(l, n) => {
                let l = l as usize % LISTS;
                if model[l].is_empty() {
                    continue;
                }
                let i = n as usize % model[l].len();
                let h = model[l].swap_remove(i);
                pool.remove(&mut heads[l], PteHandle(h)).map_err(|e| format!("step {step}: {e}"))?;
            }
            RmapOp::Drain(l) => {
                let l = l as usize % LISTS;
                let mut got = Vec::new();
                pool.drain(&mut heads[l], |h| got.push(h.0));
                got.sort_unstable();
                let mut want = std::mem::take(&mut model[l]);
                want.sort_unstable();
                if got != want {
                    return Err(format!("step {step}: drain: real {got:?}, model {want:?}"));
                }
            }
            RmapOp::Reserve(n) => pool.reserve(n as usize % 16),
        }
        for l in 0..LISTS {
            let mut got: Vec<u32> = pool.iter(heads[l]).map(|h| h.0).collect();
            got.sort_unstable();
            let mut want = model[l].clone();
            want.sort_unstable();
            if got != want || pool.len(heads[l]) != want.len() {
                return Err(format!("step {step}: list {l}: real {got:?}, model {want:?}"));
            }
            if want.len() == 1 && heads[l].single().is_none() {
                return Err(format!("step {step}: a single mapping is not inline"));
            }
        }
    }
    let live: usize = model.iter().filter(|l| l.len() > 1).map(|l| l.len().div_ceil(14)).sum();
    if pool.bytes_in_use() > live * 64 {
        return Err(format!("descriptors leak: {} bytes for {live} lists' worth", pool.bytes_in_use()));
    }
    Ok(())
}

/// One step of a guest under dirty logging.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum DirtyOp {
    /// The guest writes a page.
    Write(u16),
    /// The guest reads a page.
    Read(u16),
    /// The harvester runs a round.
    Harvest,
    /// An MMU notifier invalidates pages (start page, count).
    Invalidate(u16, u8),
}

/// How a dirty-log fuzz run is set up.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct DirtySetup {
    /// Write protection or hardware dirty bit.
    pub tracking: Tracking,
    /// Classic, manual protect or ring.
    pub mode: LogMode,
    /// Map 2 MiB leaves before logging starts.
    pub huge: bool,
    /// Ring mode: the ring has `2 << (ring_shift % 6)` entries (2 to 64),
    /// fewer than the writes, so it fills.
    pub ring_shift: u8,
    /// Ring mode: the soft-full reserve (modulo the size).
    pub ring_reserve: u8,
}

/// Runs a guest under dirty logging on the simulated back end and checks
/// that every page written since the previous harvest is reported exactly
/// once in the next round, and nothing else. Setups the core refuses (a
/// ring with D-bit tracking) must be refused with a typed error.
pub fn run_dirty(setup: DirtySetup, ops: &[DirtyOp]) -> Result<(), String> {
    const PAGES: u64 = 1024;
    let slots = {
        let mut b = mmu_generic::memslot::MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0x200), PAGES, Hva(0x4000_0000), SlotFlags::DIRTY_LOG))
            .map_err(|e| e.to_string())?;
        b.build().map_err(|e| e.to_string())?
    };
    let slot = *slots.get(SlotId(0)).ok_or("slot")?;
    let mut mmu = SimMmu::new(slots, Caps { accessed_bit: true, dirty_bit: true });
    mmu.huge_pages = setup.huge;
    let mut logs = DirtyLogs::default();
    // Pre-fault half the slot before logging starts.
    for off in (0..PAGES).step_by(2) {
        touch(&mut mmu, Gfn(0x200 + off), off % 4 == 0, &mut logs)?;
    }
    let mut flush = FlushToken::new();
    let log = match SlotDirtyLog::start(&slot, setup.tracking, setup.mode, mmu.backend_mut(), &mut flush) {
        Ok(log) => log,
        Err(mmu_generic::dirty_log::DirtyLogError::RingNeedsWriteProtect)
            if setup.mode == LogMode::Ring && setup.tracking == Tracking::HardwareDirty =>
        {
            mmu.flush(flush);
            return Ok(());
        }
        Err(e) => return Err(format!("start: {e}")),
    };
    mmu.flush(flush);
    logs.logs.insert(SlotId(0), log);
    if setup.mode == LogMode::Ring {
        let size = 2u32 << (setup.ring_shift % 6);
        let reserve = u32::from(setup.ring_reserve) % size;
        logs.ring = Some(DirtyRing::new(size, reserve).map_err(|e| format!("{e:?}"))?);
    }
    let mut written = BTreeSet::new();
    let mut fetch = 0u32;
    let mut words = Vec::new();
    // A harvest: exactly the pages written since the last one, each once.
    let check = |step: usize, written: &mut BTreeSet<u64>, reported: BTreeSet<u64>| -> Result<(), String> {
        if let Some(p) = written.difference(&reported).next() {
            return Err(format!("step {step}: page {p} written but not reported"));
        }
        if let Some(p) = reported.difference(written).next() {
            return Err(format!("step {step}: page {p} reported but not written"));
        }
        written.clear();
        Ok(())
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            DirtyOp::Read(p) => {
                let off = p as u64 % PAGES;
                match touch(&mut mmu, Gfn(0x200 + off), false, &mut logs)? {
                    Touch::Done(_) => {}
                    other => return Err(format!("step {step}: access ended in {other:?}")),
                }
            }
            DirtyOp::Write(p) => {
                // The vCPU's write: a full ring exits to the harvester and
                // the write is retried; a soft-full ring lets the write
                // complete, then exits.
                let gfn = Gfn(0x200 + p as u64 % PAGES);
                let mut exit_after = false;
                let mut tries = 0;
                while mmu.hw_access(gfn, true).is_err() {
                    tries += 1;
                    if tries > 8 {
                        return Err(format!("step {step}: write to {gfn:?} never completed"));
                    }
                    let soft = logs.soft_full_exits;
                    match mmu.handle_fault(gfn, true, &mut logs) {
                        FaultOutcome::Mapped => exit_after |= logs.soft_full_exits != soft,
                        FaultOutcome::Retry => {
                            if logs.ring.as_ref().is_some_and(|r| r.used() >= r.size()) {
                                let reported = harvest(&mut mmu, &mut logs, &slot, &mut fetch, &mut words)?;
                                check(step, &mut written, reported)?;
                            }
                        }
                        other => return Err(format!("step {step}: write ended in {other:?}")),
                    }
                }
                written.insert(p as u64 % PAGES);
                if exit_after {
                    let reported = harvest(&mut mmu, &mut logs, &slot, &mut fetch, &mut words)?;
                    check(step, &mut written, reported)?;
                }
            }
            DirtyOp::Invalidate(p, n) => {
                let start = Hva(slot.hva().0 + (p as u64 % PAGES) * 4096);
                let range = HvaRange { start, end: Hva(start.0 + (n as u64 + 1) * 4096) };
                mmu.zap_hva_range(range, &logs);
            }
            DirtyOp::Harvest => {
                let reported = harvest(&mut mmu, &mut logs, &slot, &mut fetch, &mut words)?;
                check(step, &mut written, reported)?;
            }
        }
    }
    Ok(())
}

fn harvest(
    mmu: &mut SimMmu,
    logs: &mut DirtyLogs,
    slot: &Memslot,
    fetch: &mut u32,
    words: &mut Vec<u64>,
) -> Result<BTreeSet<u64>, String> {
    let mut reported = BTreeSet::new();
    let log = logs.logs.get_mut(&slot.id()).ok_or("log")?;
    let bits = |words: &[u64], out: &mut BTreeSet<u64>| {
        for (i, &w) in words.iter().enumerate() {
            (0..64).filter(|b| w >> b & 1 != 0).for_each(|b| {
                out.insert(i as u64 * 64 + b);
            });
        }
    };
    match log.mode() {
        LogMode::Bitmap => {
            let f = log.get_and_clear(mmu.backend_mut(), words).map_err(|e| e.to_string())?;
            mmu.flush(f);
            bits(words, &mut reported);
        }
        LogMode::ManualProtect => {
            let f = log.get(mmu.backend_mut(), words).map_err(|e| e.to_string())?;
            mmu.flush(f);
            bits(words, &mut reported);
            let mut flush = FlushToken::new();
            for (i, &w) in words.iter().enumerate() {
                flush.merge(log.clear(mmu.backend_mut(), slot, i as u64 * 64, w).map_err(|e| e.to_string())?);
            }
            mmu.flush(flush);
        }
        LogMode::Ring => {
            let ring = logs.ring.as_ref().ok_or("ring")?;
            let mut twice = None;
            ring.harvest(fetch, |_, off| {
                if !reported.insert(off) {
                    twice = Some(off);
                }
            });
            if let Some(off) = twice {
                return Err(format!("page {off} reported twice in one harvest"));
            }
            let mut flush = FlushToken::new();
            let backend = mmu.backend_mut();
            let mut err = Ok(());
            ring.reset(|_, off| {
                if let Err(e) = log.reset_ring_entry(backend, slot, off, &mut flush) {
                    err = Err(e.to_string());
                }
            });
            mmu.flush(flush);
            err?;
        }
    }
    Ok(reported)
}

/// One step of the ageing model.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum AgeOp {
    /// The guest accesses a page (write or read).
    Touch(u16, bool),
    /// Age a host range (start page, pages).
    Age(u16, u8),
    /// Test a host range.
    TestAge(u16, u8),
    /// Invalidate a host range.
    Invalidate(u16, u8),
}

/// Runs ageing against a model of "accessed since last aged" per leaf, on a
/// format with an accessed bit or (under access tracking) without, with
/// 4 KiB leaves or 2 MiB leaves (`huge`: a leaf is young as a whole, and an
/// invalidation of one page zaps all of it). After each `age` and each
/// `test_age`, every page of the range is tested on its own and compared
/// with the model: pages, not only counts.
pub fn run_ageing(accessed_bit: bool, huge: bool, ops: &[AgeOp]) -> Result<(), String> {
    const PAGES: u64 = 2048;
    const BASE: u64 = 0x1000;
    const HVA: u64 = 0x8000_0000;
    let slots = {
        let mut b = mmu_generic::memslot::MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(BASE), PAGES, Hva(HVA), SlotFlags::empty()))
            .map_err(|e| e.to_string())?;
        b.build().map_err(|e| e.to_string())?
    };
    let policy = NoAccessedBit::AccessTracking;
    let mut mmu = SimMmu::new(slots.clone(), Caps { accessed_bit, dirty_bit: accessed_bit });
    mmu.huge_pages = huge;
    let leaf = if huge { 512 } else { 1 };
    let mut logs = DirtyLogs::default();
    // young[l]: leaf l accessed since last aged, while mapped.
    let mut young = vec![false; (PAGES / leaf) as usize];
    let hvas = |p: u16, n: u8| {
        let first = p as u64 % PAGES;
        let last = (first + n as u64 * 8 + 1).min(PAGES);
        (first..last, HvaRange { start: Hva(HVA + first * 4096), end: Hva(HVA + last * 4096) })
    };
    let page_range = |q: u64| HvaRange { start: Hva(HVA + q * 4096), end: Hva(HVA + (q + 1) * 4096) };
    let leaves_of = |pages: core::ops::Range<u64>| (pages.start / leaf)..pages.end.div_ceil(leaf);
    let per_page = |step: usize, mmu: &SimMmu, young: &[bool], pages: core::ops::Range<u64>| {
        for q in pages {
            let got = test_age(&slots, mmu.backend(), page_range(q), policy).young;
            if got != young[(q / leaf) as usize] {
                return Err(format!(
                    "step {step}: page {q}: test_age {got}, model {}",
                    young[(q / leaf) as usize]
                ));
            }
        }
        Ok(())
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            AgeOp::Touch(p, w) => {
                let off = p as u64 % PAGES;
                touch(&mut mmu, Gfn(BASE + off), w, &mut logs)?;
                young[(off / leaf) as usize] = true;
            }
            AgeOp::Age(p, n) => {
                let (pages, range) = hvas(p, n);
                let want = leaves_of(pages.clone()).filter(|&l| young[l as usize]).count() as u64;
                let mut flush = FlushToken::new();
                let r = age(&slots, mmu.backend_mut(), range, policy, &mut flush);
                mmu.flush(flush);
                if r.young_leaves != want {
                    return Err(format!("step {step}: age found {} young, model {want}", r.young_leaves));
                }
                leaves_of(pages.clone()).for_each(|l| young[l as usize] = false);
                per_page(step, &mmu, &young, pages)?;
            }
            AgeOp::TestAge(p, n) => {
                let (pages, range) = hvas(p, n);
                let want = leaves_of(pages.clone()).any(|l| young[l as usize]);
                let got = test_age(&slots, mmu.backend(), range, policy).young;
                if got != want {
                    return Err(format!("step {step}: test_age {got}, model {want}"));
                }
                per_page(step, &mmu, &young, pages)?;
            }
            AgeOp::Invalidate(p, n) => {
                let (pages, range) = hvas(p, n);
                mmu.zap_hva_range(range, &logs);
                // An unmapped leaf is old: nothing maps it (a huge leaf
                // goes whole).
                leaves_of(pages).for_each(|l| young[l as usize] = false);
            }
        }
    }
    Ok(())
}

/// One step of the invalidation-versus-fault model.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum InvalidateOp {
    /// Fault `n` (of 4) snapshots the sequence for page `page`.
    Snapshot(u8, u8),
    /// A notifier starts invalidating pages [first, first + len].
    Start(u8, u8),
    /// The oldest notifier in progress ends.
    End,
    /// Fault `n` asks whether it must retry.
    Check(u8),
}

/// Checks [`InvalidationSeq::must_retry`] against the rule: retry if any
/// invalidation ended after the snapshot, or one in progress covers the
/// page. (The real structure may retry more, covering the union of ranges in
/// progress; it must never retry less.)
pub fn run_invalidation(ops: &[InvalidateOp]) -> Result<(), String> {
    let seq = InvalidationSeq::new();
    let mut faults: [Option<(FaultSnapshot, u64, u64)>; 4] = [None; 4];
    let mut ended = 0u64;
    let mut in_progress: Vec<(u64, u64)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            InvalidateOp::Snapshot(n, page) => {
                faults[n as usize % 4] = Some((seq.snapshot(), page as u64, ended));
            }
            InvalidateOp::Start(first, len) => {
                let (s, e) = (first as u64, first as u64 + len as u64 + 1);
                seq.start(HvaRange { start: Hva(s << 12), end: Hva(e << 12) });
                in_progress.push((s, e));
            }
            InvalidateOp::End => {
                if !in_progress.is_empty() {
                    in_progress.remove(0);
                    seq.end();
                    ended += 1;
                }
            }
            InvalidateOp::Check(n) => {
                let Some((snap, page, ended_then)) = faults[n as usize % 4] else { continue };
                let must = ended != ended_then || in_progress.iter().any(|&(s, e)| page >= s && page < e);
                let may = must || !in_progress.is_empty();
                let got = seq.must_retry(snap, Hva(page << 12));
                if must && !got {
                    return Err(format!("step {step}: fault on page {page} would commit a stale pfn"));
                }
                if got && !may {
                    return Err(format!("step {step}: fault on page {page} retried for nothing"));
                }
            }
        }
    }
    Ok(())
}
