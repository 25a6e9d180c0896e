//! Dirty logging of one memslot, written once against [`MmuBackend`].
//!
//! Two ways to learn of writes ([`Tracking`]):
//! - **write protection**: logged pages are mapped read-only; the write fault
//!   marks the page and makes the leaf writable ([`SlotDirtyLog::note_writable`]);
//! - **hardware dirty bit**: leaves stay writable and the CPU sets D (x86,
//!   EPT with A/D) or C (Book3s); a round harvests and clears it.
//!
//! Three ways to hand the log over ([`LogMode`]): KVM's classic
//! get-and-clear of the whole bitmap, manual protect (get, then clear a
//! 64-page-aligned range, so a huge slot is re-protected piecewise), and the
//! per-vCPU [`DirtyRing`].
//!
//! **The writable chain.** The slot keeps the handles of the leaves it made
//! writable. A write-protect round walks only that chain, so it costs what is
//! writable, not the slot's size; a D-bit round likewise harvests only the
//! writable leaves (a read-only leaf cannot become dirty). A chained handle
//! may have gone stale (the leaf was zapped, or the handle reused): each is
//! checked against the back end, and only writable leaves inside the slot are
//! acted on.
//!
//! A leaf can also leave without the drivers' help (a paravirtual guest's
//! own H_REMOVE, an eviction from a full PTEG) while its dirty bit is set;
//! the chain cannot see it any more, so a dirty-bit round also takes what
//! the back end kept of such bits ([`MmuBackend::drain_lost_dirty`]).
//!
//! **No write is ever lost**, given the rule every mode states: copy a page
//! reported dirty only after the round's [`FlushToken`] has been flushed. A
//! write either happened before the leaf was protected (or its D bit
//! cleared), and the page is reported this round and copied after the flush;
//! or it happens after the flush, faults (or sets D again), and is reported
//! next round.
//!
//! **Huge pages.** Starting to log a slot splits its huge leaves eagerly,
//! down to 4 KiB, before the first round. Lazily zapping them instead would
//! make the first write to each huge page take a fault, a table allocation
//! and a refill of 512 entries in the vCPU's path while the migration is
//! running, which is exactly when vCPU latency matters most; KVM made eager
//! splitting its default for the same reason. A back end that cannot split
//! zaps, and the next fault maps 4 KiB pages because the slot is logged.

use alloc::vec::Vec;
use core::fmt;

use crate::addr::{Gfn, GfnRange};
use crate::backend::{BackendError, FlushToken, Leaf, MmuBackend};
use crate::dirty_bitmap::DirtyBitmap;
use crate::dirty_ring::{DirtyRing, RingFull, RingPush};
use crate::memslot::{Memslot, SlotId};
use crate::pte_list::PteHandle;

/// How writes are learned of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Tracking {
    /// Map read-only and take the write fault.
    WriteProtect,
    /// Let the CPU set the dirty bit and harvest it.
    HardwareDirty,
}

/// How the log is handed to the migration thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum LogMode {
    /// [`SlotDirtyLog::get_and_clear`] returns and re-protects everything.
    Bitmap,
    /// [`SlotDirtyLog::get`], then [`SlotDirtyLog::clear`] range by range.
    ManualProtect,
    /// Writes go to per-vCPU rings; [`SlotDirtyLog::reset_ring_entry`]
    /// re-protects each collected page.
    Ring,
}

/// Why a dirty-log operation was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DirtyLogError {
    /// Hardware dirty tracking on a format without a dirty bit.
    NoDirtyBit,
    /// The ring reports writes at fault time, which hardware D-bit tracking
    /// does not have: rings need write protection.
    RingNeedsWriteProtect,
    /// The operation does not belong to this slot's mode.
    WrongMode(LogMode),
    /// A manual clear range that does not start on a 64-page boundary.
    MisalignedClear(u64),
    /// The page offset lies outside the slot.
    OutOfSlot(u64),
    /// The back end failed (for example a split found its reserve empty).
    Backend(BackendError),
    /// The vCPU's ring is full: the write was not logged.
    RingFull,
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDirtyBit => f.write_str("the page-table format has no dirty bit"),
            Self::RingNeedsWriteProtect => f.write_str("a dirty ring needs write-protect tracking"),
            Self::WrongMode(m) => write!(f, "operation not available in {m:?} mode"),
            Self::MisalignedClear(o) => write!(f, "clear at page {o} is not 64-page aligned"),
            Self::OutOfSlot(o) => write!(f, "page {o} is outside the slot"),
            Self::Backend(e) => write!(f, "back end: {e:?}"),
            Self::RingFull => f.write_str("dirty ring full"),
        }
    }
}

impl From<BackendError> for DirtyLogError {
    fn from(e: BackendError) -> Self {
        Self::Backend(e)
    }
}

impl From<RingFull> for DirtyLogError {
    fn from(_: RingFull) -> Self {
        Self::RingFull
    }
}

/// The dirty log of one slot.
#[derive(Debug)]
pub struct SlotDirtyLog {
    slot: SlotId,
    gfns: GfnRange,
    tracking: Tracking,
    mode: LogMode,
    bitmap: DirtyBitmap,
    /// Handles of leaves made writable since the last round (write-protect
    /// tracking) or of all writable leaves (dirty-bit tracking).
    chain: Vec<PteHandle>,
    /// Chain length after the last compaction, to bound stale growth.
    chain_compacted: usize,
}

impl SlotDirtyLog {
    /// Starts logging `slot`: splits its huge leaves, then write-protects
    /// every leaf (write-protect tracking) or clears every D bit and chains
    /// the writable leaves (dirty-bit tracking). This one pass costs the
    /// slot's mapped size; every round after costs what is writable.
    pub fn start<B: MmuBackend + ?Sized>(
        slot: &Memslot,
        tracking: Tracking,
        mode: LogMode,
        backend: &mut B,
        flush: &mut FlushToken,
    ) -> Result<Self, DirtyLogError> {
        if tracking == Tracking::HardwareDirty && !backend.caps().dirty_bit {
            return Err(DirtyLogError::NoDirtyBit);
        }
        if tracking == Tracking::HardwareDirty && mode == LogMode::Ring {
            return Err(DirtyLogError::RingNeedsWriteProtect);
        }
        let gfns = slot.gfns();
        split_all_huge(slot, backend, flush)?;
        let mut log = Self {
            slot: slot.id(),
            gfns,
            tracking,
            mode,
            bitmap: DirtyBitmap::new(slot.npages()),
            chain: Vec::new(),
            chain_compacted: 0,
        };
        let mut leaves = Vec::new();
        backend.for_each_leaf(slot, gfns, &mut |h| leaves.push(h));
        for h in leaves {
            let Some(leaf) = backend.leaf(h) else { continue };
            match tracking {
                Tracking::WriteProtect => {
                    backend.write_protect(h, flush);
                }
                Tracking::HardwareDirty => {
                    backend.clear_dirty(h, flush);
                    if leaf.writable {
                        log.chain.push(h);
                    }
                }
            }
        }
        if tracking == Tracking::HardwareDirty {
            // Dirty bits lost before logging started predate it, as do the
            // D bits just cleared.
            backend.drain_lost_dirty(gfns, &mut |_| {});
        }
        log.chain_compacted = log.chain.len();
        Ok(log)
    }

    /// The slot logged.
    pub fn slot(&self) -> SlotId {
        self.slot
    }

    /// How writes are learned of.
    pub fn tracking(&self) -> Tracking {
        self.tracking
    }

    /// How the log is handed over.
    pub fn mode(&self) -> LogMode {
        self.mode
    }

    /// The bitmap (bitmap and manual-protect modes).
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// Handles now on the writable chain (stale ones included).
    pub fn chain_len(&self) -> usize {
        self.chain.len()
    }

    /// Fault path: leaf `h`, mapping `gfn` of this slot, was just made
    /// writable (a write fault under write protection, or any writable leaf
    /// installed under dirty-bit tracking). Under write protection the page
    /// is marked now: in the bitmap, or pushed to the vCPU's `ring`. A full
    /// ring refuses the write: the caller must not make the leaf writable and
    /// must exit to the harvester.
    pub fn note_writable(
        &mut self,
        gfn: Gfn,
        h: PteHandle,
        ring: Option<&DirtyRing>,
    ) -> Result<RingPush, DirtyLogError> {
        let idx = gfn.offset_from(self.gfns.start).filter(|&i| i < self.gfns.len());
        let idx = idx.ok_or(DirtyLogError::OutOfSlot(gfn.0.wrapping_sub(self.gfns.start.0)))?;
        let mut status = RingPush::Ok;
        if self.tracking == Tracking::WriteProtect {
            match (self.mode, ring) {
                (LogMode::Ring, Some(ring)) => status = ring.push(self.slot, idx)?,
                (LogMode::Ring, None) => return Err(DirtyLogError::WrongMode(self.mode)),
                _ => {
                    self.bitmap.set(idx);
                }
            }
        }
        if self.mode != LogMode::Ring {
            self.chain.push(h);
            self.maybe_compact_chain();
        }
        Ok(status)
    }

    /// A leaf of this slot was zapped (invalidation, eviction): under
    /// dirty-bit tracking its final D bit is the only record of the write,
    /// so fold it into the log. (Under write protection the page was marked
    /// when the leaf was made writable.) Call with the leaf
    /// [`MmuBackend::zap`] returned.
    pub fn note_zapped(&self, leaf: &Leaf) {
        if self.tracking == Tracking::HardwareDirty && leaf.dirty {
            self.mark_leaf(leaf);
        }
    }

    fn mark_leaf(&self, leaf: &Leaf) {
        self.mark_range(leaf.gfns());
    }

    #[inline]
    fn mark_range(&self, gfns: GfnRange) {
        if gfns.len() == 1 {
            // The common case (4 KiB leaves under logging): one atomic OR.
            if let Some(i) = gfns.start.offset_from(self.gfns.start) {
                self.bitmap.set(i);
            }
        } else if let Some(r) = gfns.intersect(&self.gfns) {
            self.bitmap.set_range(r.start.0 - self.gfns.start.0, r.len());
        }
    }

    /// Visits the chain: under write protection protects each writable leaf
    /// and marks its pages, emptying the chain; under dirty-bit tracking
    /// harvests each writable leaf's D bit into the bitmap, keeping the chain.
    fn walk_chain<B: MmuBackend + ?Sized>(&mut self, backend: &mut B, flush: &mut FlushToken) {
        let mut chain = core::mem::take(&mut self.chain);
        match self.tracking {
            Tracking::WriteProtect => {
                for &h in &chain {
                    if let Some(leaf) = self.live_leaf(backend, h) {
                        if backend.write_protect(h, flush) {
                            self.mark_leaf(&leaf);
                        }
                    }
                }
                chain.clear();
                self.chain_compacted = 0;
                // Under write protection the fault marked those pages: what
                // the back end lost is already logged.
                backend.drain_lost_dirty(self.gfns, &mut |_| {});
            }
            Tracking::HardwareDirty => {
                chain.retain(|&h| match self.live_leaf(backend, h) {
                    Some(leaf) => {
                        if backend.clear_dirty(h, flush) {
                            self.mark_leaf(&leaf);
                        }
                        true
                    }
                    None => false,
                });
                // Leaves the back end dropped on its own took their D bit
                // with them: the chain cannot see them any more.
                backend.drain_lost_dirty(self.gfns, &mut |r| self.mark_range(r));
            }
        }
        self.chain = chain;
        self.maybe_compact_chain();
    }

    /// The leaf `h` names, if it is a writable leaf inside this slot.
    fn live_leaf<B: MmuBackend + ?Sized>(&self, backend: &B, h: PteHandle) -> Option<Leaf> {
        backend.leaf(h).filter(|l| l.writable && self.gfns.overlaps(&l.gfns()))
    }

    /// Stale and duplicate handles accumulate between rounds (a leaf zapped
    /// and refaulted is chained again). Once the chain doubles, dedupe it:
    /// amortized O(log n) per entry, and the chain stays within twice the
    /// writable set.
    fn maybe_compact_chain(&mut self) {
        if self.chain.len() > 2 * self.chain_compacted + 64 {
            self.chain.sort_unstable();
            self.chain.dedup();
            self.chain_compacted = self.chain.len();
        }
    }

    /// Classic mode: returns the dirty bitmap in `out` (one `u64` per 64
    /// pages) and leaves the slot re-protected. Flush the token before
    /// copying the pages reported.
    pub fn get_and_clear<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        out: &mut Vec<u64>,
    ) -> Result<FlushToken, DirtyLogError> {
        if self.mode != LogMode::Bitmap {
            return Err(DirtyLogError::WrongMode(self.mode));
        }
        let mut flush = FlushToken::new();
        // Protect (or harvest) first, so every write up to the protection is
        // in the bitmap we take next.
        self.walk_chain(backend, &mut flush);
        out.clear();
        out.extend((0..self.bitmap.words()).map(|i| self.bitmap.take_word(i)));
        Ok(flush)
    }

    /// Manual-protect mode, step 1: copies the bitmap into `out` without
    /// clearing it. Under dirty-bit tracking this is where D bits are
    /// harvested, so flush the token before copying pages.
    pub fn get<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        out: &mut Vec<u64>,
    ) -> Result<FlushToken, DirtyLogError> {
        if self.mode != LogMode::ManualProtect {
            return Err(DirtyLogError::WrongMode(self.mode));
        }
        let mut flush = FlushToken::new();
        if self.tracking == Tracking::HardwareDirty {
            self.walk_chain(backend, &mut flush);
        }
        out.clear();
        out.extend((0..self.bitmap.words()).map(|i| self.bitmap.word(i)));
        Ok(flush)
    }

    /// Manual-protect mode, step 2: clears the bits of `mask` (one bit per
    /// page from `first_page`, which must be 64-page aligned) and
    /// re-protects those pages. Only pages whose bit was set are touched, so
    /// a huge slot is re-protected piecewise, in proportion to what was
    /// dirty. Flush the token before copying the pages.
    pub fn clear<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        slot: &Memslot,
        first_page: u64,
        mask: u64,
    ) -> Result<FlushToken, DirtyLogError> {
        if self.mode != LogMode::ManualProtect {
            return Err(DirtyLogError::WrongMode(self.mode));
        }
        if first_page % 64 != 0 {
            return Err(DirtyLogError::MisalignedClear(first_page));
        }
        if first_page >= self.bitmap.npages() {
            return Err(DirtyLogError::OutOfSlot(first_page));
        }
        let was = self.bitmap.clear_mask((first_page / 64) as usize, mask);
        let mut flush = FlushToken::new();
        if self.tracking == Tracking::WriteProtect {
            let mut bits = was;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.protect_page(backend, slot, first_page + bit, &mut flush);
            }
        }
        Ok(flush)
    }

    fn protect_page<B: MmuBackend + ?Sized>(
        &self,
        backend: &mut B,
        slot: &Memslot,
        offset: u64,
        flush: &mut FlushToken,
    ) {
        let gfn = Gfn(self.gfns.start.0 + offset);
        let mut leaves: [Option<PteHandle>; 8] = [None; 8];
        let mut more = Vec::new();
        let mut n = 0;
        backend.for_each_leaf(slot, GfnRange { start: gfn, end: Gfn(gfn.0 + 1) }, &mut |h| {
            if n < leaves.len() {
                leaves[n] = Some(h);
                n += 1;
            } else {
                more.push(h);
            }
        });
        for h in leaves.iter().flatten().chain(more.iter()) {
            backend.write_protect(*h, flush);
        }
    }

    /// Ring mode, MMU side of a reset: re-protects page `offset`, which a
    /// harvester collected from a ring. Pass as the callback of
    /// [`DirtyRing::reset`] for the entries of this slot.
    pub fn reset_ring_entry<B: MmuBackend + ?Sized>(
        &self,
        backend: &mut B,
        slot: &Memslot,
        offset: u64,
        flush: &mut FlushToken,
    ) -> Result<(), DirtyLogError> {
        if self.mode != LogMode::Ring {
            return Err(DirtyLogError::WrongMode(self.mode));
        }
        if offset >= self.gfns.len() {
            return Err(DirtyLogError::OutOfSlot(offset));
        }
        self.protect_page(backend, slot, offset, flush);
        Ok(())
    }
}

/// Splits every huge leaf of `slot` down to 4 KiB.
fn split_all_huge<B: MmuBackend + ?Sized>(
    slot: &Memslot,
    backend: &mut B,
    flush: &mut FlushToken,
) -> Result<(), BackendError> {
    loop {
        let mut huge = Vec::new();
        backend.for_each_leaf(slot, slot.gfns(), &mut |h| huge.push(h));
        huge.retain(|&h| backend.leaf(h).is_some_and(|l| l.npages > 1));
        if huge.is_empty() {
            return Ok(());
        }
        for h in huge {
            backend.split_huge(h, flush)?;
        }
    }
}
