//! A plain simulated back end: one atomic word per leaf PTE with software
//! accessed and dirty bits, 4 KiB and 2 MiB leaves, filed in the core's
//! reverse map. It plays both the page-table format (implementing
//! [`MmuBackend`]) and, through [`SimMmu`], the CPU that walks it and the
//! hypervisor's fault handler, so every core driver runs before any arch
//! crate exists.
//!
//! **A real TLB.** [`SimMmu::hw_access`] goes through a simulated TLB that
//! caches each 4 KiB frame's translation with its write permission and
//! whether D was set when it was cached, and forgets only on a flush
//! ([`SimTlb`], through the drivers' [`FlushToken`]s): a hit that permits the
//! access completes without touching the PTE (A and D are not set again); a
//! write hit cached before D was set re-walks to set D, faulting if the PTE
//! no longer allows it; a hit that does not permit the access faults and
//! drops the entry. So a driver that forgets an `add_range`, or a harness
//! that copies a page before the flush, lets a write through a stale entry
//! go unlogged, and the scenarios fail.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, GfnRange, HvaRange};
use mmu_generic::backend::{
    for_each_leaf_batched, BackendError, Caps, FlushToken, Leaf, MmuBackend, TlbFlush,
};
use mmu_generic::dirty_log::Tracking;
use mmu_generic::dirty_ring::RingPush;
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;
use mmu_generic::rmap::{Rmap, X86_LEVEL_SHIFTS};
use mmu_generic::zap::zap_hva_range;

use crate::harness::{DirtyLogs, FaultOutcome, GuestMmu, HwFault};

const P: u64 = 1 << 0;
const W: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;
/// Access-tracked: not present, restorable.
const TRACKED: u64 = 1 << 9;
/// The write permission a tracked leaf had.
const SAVED_W: u64 = 1 << 10;
const GFN_SHIFT: u32 = 12;

/// Pages per 2 MiB leaf.
const HUGE_PAGES: u64 = 512;

/// The simulated page-table format.
#[derive(Debug)]
pub struct SimBackend {
    ptes: Vec<AtomicU64>,
    slot_of: Vec<u16>,
    free: Vec<u32>,
    rmap: Rmap,
    caps: Caps,
    /// The forward table: first gfn of a leaf → its handle.
    table: BTreeMap<u64, u32>,
}

impl SimBackend {
    /// An empty table whose format has the given hardware bits.
    pub fn new(caps: Caps) -> Self {
        Self {
            ptes: Vec::new(),
            slot_of: Vec::new(),
            free: Vec::new(),
            rmap: Rmap::new(X86_LEVEL_SHIFTS),
            caps,
            table: BTreeMap::new(),
        }
    }

    /// Follows a memslot change.
    pub fn sync_slots(&mut self, slots: &Memslots) {
        self.rmap.sync_slots(slots);
    }

    /// The leaf mapping `gfn`, if any (present or tracked).
    pub fn lookup(&self, gfn: Gfn) -> Option<PteHandle> {
        let (&first, &h) = self.table.range(..=gfn.0).next_back()?;
        let w = self.ptes[h as usize].load(Ordering::Acquire);
        let n = if w & HUGE != 0 { HUGE_PAGES } else { 1 };
        (gfn.0 < first + n).then_some(PteHandle(h))
    }

    /// Number of leaves installed.
    pub fn leaf_count(&self) -> usize {
        self.table.len()
    }

    fn word(&self, h: PteHandle) -> &AtomicU64 {
        &self.ptes[h.0 as usize]
    }

    /// Installs a leaf and files it in the reverse map.
    pub fn install(&mut self, slot: SlotId, gfn: Gfn, huge: bool, writable: bool) -> PteHandle {
        let word = (gfn.0 << GFN_SHIFT) | P | if writable { W } else { 0 } | if huge { HUGE } else { 0 };
        let h = match self.free.pop() {
            Some(h) => {
                self.ptes[h as usize].store(word, Ordering::Release);
                self.slot_of[h as usize] = slot.0;
                h
            }
            None => {
                self.ptes.push(AtomicU64::new(word));
                self.slot_of.push(slot.0);
                (self.ptes.len() - 1) as u32
            }
        };
        self.rmap.reserve(1);
        self.rmap.add(slot, gfn, usize::from(huge), PteHandle(h)).expect("leaf inside its slot");
        self.table.insert(gfn.0, h);
        PteHandle(h)
    }

    /// The CPU's access: sets A (and D on a write) where the format has them.
    pub fn hw_access(&self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
        let h = self.lookup(gfn).ok_or(HwFault::NotPresent)?;
        let w = self.word(h).load(Ordering::Acquire);
        if w & P == 0 {
            return Err(HwFault::NotPresent);
        }
        if write && w & W == 0 {
            return Err(HwFault::WriteProtected);
        }
        let mut set = if self.caps.accessed_bit { A } else { 0 };
        if write && self.caps.dirty_bit {
            set |= D;
        }
        self.word(h).fetch_or(set, Ordering::AcqRel);
        Ok(())
    }

    /// Restores an access-tracked leaf; the refault is the access.
    pub fn restore_tracked(&self, h: PteHandle) -> bool {
        let w = self.word(h).load(Ordering::Acquire);
        if w & TRACKED == 0 {
            return false;
        }
        let restored = (w & !(TRACKED | SAVED_W)) | P | if w & SAVED_W != 0 { W } else { 0 };
        self.word(h).compare_exchange(w, restored, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Grants write permission to a present leaf.
    pub fn make_writable(&self, h: PteHandle) {
        self.word(h).fetch_or(W, Ordering::AcqRel);
    }
}

impl MmuBackend for SimBackend {
    fn caps(&self) -> Caps {
        self.caps
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.rmap.for_each_in(slot.id(), gfns, |_, h| f(h));
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        let w = self.ptes.get(h.0 as usize)?.load(Ordering::Acquire);
        if w & (P | TRACKED) == 0 {
            return None;
        }
        Some(Leaf {
            gfn: Gfn(w >> GFN_SHIFT),
            npages: if w & HUGE != 0 { HUGE_PAGES } else { 1 },
            writable: w & W != 0,
            young: w & A != 0,
            dirty: w & D != 0,
            access_tracked: w & TRACKED != 0,
        })
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let old = self.word(h).fetch_and(!W, Ordering::AcqRel);
        let was = old & W != 0 && old & P != 0;
        if was {
            flush.add_range(self.leaf(h).map(|l| l.gfns()).unwrap_or_default());
        }
        was
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let old = self.word(h).fetch_and(!D, Ordering::AcqRel);
        if old & D != 0 {
            flush.add_range(self.leaf(h).map(|l| l.gfns()).unwrap_or_default());
        }
        old & D != 0
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let old = self.word(h).fetch_and(!A, Ordering::AcqRel);
        if old & A != 0 {
            flush.add_range(self.leaf(h).map(|l| l.gfns()).unwrap_or_default());
        }
        old & A != 0
    }

    fn mark_access_tracked(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let mut w = self.word(h).load(Ordering::Acquire);
        loop {
            if w & P == 0 {
                return false;
            }
            let tracked = (w & !(P | W)) | TRACKED | if w & W != 0 { SAVED_W } else { 0 };
            match self.word(h).compare_exchange(w, tracked, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        flush.add_range(self.leaf(h).map(|l| l.gfns()).unwrap_or_default());
        true
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        let leaf = self.leaf(h).ok_or(BackendError::NotALeaf(h))?;
        if leaf.npages == 1 {
            return Ok(());
        }
        let w = self.word(h).load(Ordering::Acquire);
        let slot = SlotId(self.slot_of[h.0 as usize]);
        self.zap(h, flush);
        for i in 0..HUGE_PAGES {
            let small = self.install(slot, Gfn(leaf.gfn.0 + i), false, leaf.writable);
            // Children keep the parent's hardware bits, D included: a write
            // the huge leaf recorded must not vanish in the split.
            self.word(small).fetch_or(w & (A | D), Ordering::AcqRel);
        }
        Ok(())
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        self.leaf(h)?;
        // Swap, so the final A/D bits the CPU set reach the caller.
        let w = self.word(h).swap(0, Ordering::AcqRel);
        let leaf = Leaf {
            gfn: Gfn(w >> GFN_SHIFT),
            npages: if w & HUGE != 0 { HUGE_PAGES } else { 1 },
            writable: w & W != 0,
            young: w & A != 0,
            dirty: w & D != 0,
            access_tracked: w & TRACKED != 0,
        };
        let slot = SlotId(self.slot_of[h.0 as usize]);
        let level = usize::from(leaf.npages > 1);
        self.rmap.remove(slot, leaf.gfn, level, h).expect("every leaf is in the reverse map");
        self.table.remove(&leaf.gfn.0);
        self.free.push(h.0);
        flush.add_range(leaf.gfns());
        Some(leaf)
    }
}

/// One cached translation of a 4 KiB frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TlbEntry {
    /// The PTE allowed writes when cached.
    writable: bool,
    /// D was set when cached (or the format has no D bit): a write hit
    /// needs no walk.
    dirty: bool,
}

/// The simulated TLB: never evicts (the strictest model of a missing
/// flush), keyed by 4 KiB guest frame, forgets only on a flush.
#[derive(Debug, Default)]
pub struct SimTlb {
    entries: BTreeMap<u64, TlbEntry>,
    /// Range flushes performed.
    pub ranges: u64,
    /// Full flushes performed.
    pub alls: u64,
}

impl SimTlb {
    /// Number of cached translations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl TlbFlush for SimTlb {
    fn flush_range(&mut self, range: GfnRange) {
        self.ranges += 1;
        let doomed: Vec<u64> = self.entries.range(range.start.0..range.end.0).map(|(&g, _)| g).collect();
        for g in doomed {
            self.entries.remove(&g);
        }
    }
    fn flush_all(&mut self) {
        self.alls += 1;
        self.entries.clear();
    }
}

/// The simulated guest MMU: memslots, the table, its fault handler.
#[derive(Debug)]
pub struct SimMmu {
    slots: Memslots,
    backend: SimBackend,
    tlb: SimTlb,
    /// Map with 2 MiB leaves where the slot allows.
    pub huge_pages: bool,
    /// Faults that installed a new leaf.
    pub faults_mapped: u64,
    /// Accesses the TLB served without a walk.
    pub tlb_hits: u64,
}

impl SimMmu {
    /// A guest over `slots` whose format has `caps`.
    pub fn new(slots: Memslots, caps: Caps) -> Self {
        let mut backend = SimBackend::new(caps);
        backend.sync_slots(&slots);
        Self { slots, backend, tlb: SimTlb::default(), huge_pages: false, faults_mapped: 0, tlb_hits: 0 }
    }

    /// The simulated TLB.
    pub fn tlb(&self) -> &SimTlb {
        &self.tlb
    }

    /// Installs a new memslot set. Every old slot whose mappings cannot
    /// survive ([`Memslots::stale_slots`]: deleted, moved, backed by other
    /// host memory, made read-only) has its leaves zapped first, through the
    /// old slot's reverse map, with their final D bits folded into its log;
    /// then the reverse map follows the new set. Returns the leaves zapped.
    pub fn set_memslots(&mut self, new: Memslots, logs: &DirtyLogs) -> usize {
        let mut flush = FlushToken::new();
        let mut zapped = 0;
        let stale: Vec<Memslot> = self.slots.stale_slots(&new).map(|(s, _)| *s).collect();
        for old in stale {
            let log = logs.logs.get(&old.id());
            for_each_leaf_batched(&mut self.backend, &old, old.gfns(), |b, h| match b.zap(h, &mut flush) {
                Some(leaf) => {
                    zapped += 1;
                    if let Some(log) = log {
                        log.note_zapped(&leaf);
                    }
                    true
                }
                None => false,
            });
        }
        self.flush(flush);
        self.backend.sync_slots(&new);
        self.slots = new;
        zapped
    }

    /// Cached translations that grant more than the tables: a write through a
    /// non-writable PTE, or a D bit cached as set that the tables cleared on
    /// a writable leaf (the CPU would skip setting it), or a frame no present
    /// leaf maps. Zero after every correct flush.
    pub fn stale_tlb_entries(&self) -> usize {
        self.tlb
            .entries
            .iter()
            .filter(|(&g, e)| match self.backend.lookup(Gfn(g)).and_then(|h| self.backend.leaf(h)) {
                None => true,
                Some(l) if l.access_tracked => true,
                Some(l) => {
                    (e.writable && !l.writable)
                        || (e.writable && e.dirty && self.backend.caps.dirty_bit && !l.dirty)
                }
            })
            .count()
    }
}

impl GuestMmu for SimMmu {
    type Backend = SimBackend;

    fn memslots(&self) -> &Memslots {
        &self.slots
    }

    fn backend(&self) -> &SimBackend {
        &self.backend
    }

    fn backend_mut(&mut self) -> &mut SimBackend {
        &mut self.backend
    }

    fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
        let denied = if write { HwFault::WriteProtected } else { HwFault::NotPresent };
        if let Some(e) = self.tlb.entries.get(&gfn.0).copied() {
            if write && !e.writable {
                // The fault drops the translation it faulted on.
                self.tlb.entries.remove(&gfn.0);
                return Err(denied);
            }
            if !write || e.dirty {
                self.tlb_hits += 1;
                return Ok(());
            }
            // A write through a translation cached before D was set walks
            // the tables to set D, faulting if they no longer allow it.
        }
        self.tlb.entries.remove(&gfn.0);
        self.backend.hw_access(gfn, write)?;
        let leaf = self.backend.lookup(gfn).and_then(|h| self.backend.leaf(h)).ok_or(HwFault::NotPresent)?;
        let dirty = write || !self.backend.caps.dirty_bit;
        self.tlb.entries.insert(gfn.0, TlbEntry { writable: leaf.writable, dirty });
        Ok(())
    }

    fn handle_fault(&mut self, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> FaultOutcome {
        let Some(slot) = self.slots.lookup(gfn).copied() else { return FaultOutcome::Mmio };
        if write && slot.flags().contains(SlotFlags::READONLY) {
            return FaultOutcome::Denied;
        }
        let readonly = slot.flags().contains(SlotFlags::READONLY);
        let log = logs.logs.get_mut(&slot.id());
        let h = match self.backend.lookup(gfn) {
            Some(h) => {
                if self.backend.restore_tracked(h) {
                    return FaultOutcome::Mapped;
                }
                h
            }
            None => {
                let huge = self.huge_pages && log.is_none() && slot.allows_page(gfn, 21);
                let first = if huge { Gfn(gfn.0 & !(HUGE_PAGES - 1)) } else { gfn };
                self.faults_mapped += 1;
                // Unlogged memory is mapped writable at once; logged memory
                // becomes writable below, through the log.
                self.backend.install(slot.id(), first, huge, !readonly && log.is_none())
            }
        };
        let leaf = self.backend.leaf(h).expect("a leaf was found or installed");
        let wants_write = write || log.as_ref().is_some_and(|l| l.tracking() == Tracking::HardwareDirty);
        if !leaf.writable && !readonly && wants_write {
            if let Some(log) = log {
                match log.note_writable(gfn, h, logs.ring.as_ref()) {
                    Ok(RingPush::SoftFull) => logs.soft_full_exits += 1,
                    Ok(RingPush::Ok) => {}
                    // A full ring: the write is not logged, so not allowed.
                    Err(_) => return FaultOutcome::Retry,
                }
            }
            self.backend.make_writable(h);
        }
        FaultOutcome::Mapped
    }

    fn flush(&mut self, token: FlushToken) {
        token.flush(&mut self.tlb);
    }

    fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize {
        let mut flush = FlushToken::new();
        let zapped = zap_hva_range(&self.slots, &mut self.backend, range, &mut flush, |slot, leaf| {
            if let Some(log) = logs.logs.get(&slot.id()) {
                log.note_zapped(leaf);
            }
        });
        self.flush(flush);
        zapped
    }
}
