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
//! **The writable chain.** The slot keeps the set of its pages whose
//! leaves were made writable: since the last round under write protection,
//! or all of them under dirty-bit tracking. A round walks only that set, so
//! it costs what is writable, not the slot's size. The chain is a bitmap
//! with one bit per page, set with an atomic OR: [`SlotDirtyLog::note_writable`]
//! takes `&self`, so vCPUs faulting at once (under the MMU lock held for
//! reading) chain pages without serialising, the chain never allocates and
//! can never be full. A summary bit per 64-page word of the chain (set by
//! the word's first page) lets a round skip the chain's clear words, and the
//! round hands the bitmap over in the same sweep. A round reaches a chained page's leaves through the
//! back end's reverse map, so a leaf zapped and refaulted with a new handle
//! is not missed, and every leaf mapping the page (shadow paging may have
//! several) is protected or harvested. A back end whose tables can be walked
//! by guest frame may take whole chain words instead
//! ([`MmuBackend::round_chain_words`]: x86 TDP walks its current root, one
//! table line per eight pages instead of a reverse-map head per page), and
//! declines whenever the walk could miss a leaf the reverse map knows.
//!
//! Under dirty-bit tracking a round harvests the dirty bit of **every** live
//! leaf of a chained page, writable or not, before the page leaves the
//! chain: a leaf the guest dirtied and that another path then write-protected
//! (shadow paging protecting a new guest table, H_PROTECT on Book3s, which
//! keeps C) still carries the write in its D/C bit.
//!
//! **Log, then grant.** A leaf becomes writable only after its page is
//! logged: [`SlotDirtyLog::note_writable`] runs before the back end stores
//! the writable leaf, and a full ring ([`DirtyLogError::RingFull`]) maps
//! read-only. [`FaultCtx`] carries what a fault path needs for that rule
//! (the slots' logs and the vCPU's ring) into an engine.
//!
//! **Writes by the hypervisor.** A hypervisor writing guest memory itself
//! (emulated instructions, guest A/D updates by shadow paging, device
//! models) logs each page with [`SlotDirtyLog::mark`], which marks without
//! chaining (no leaf became writable).
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

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::addr::{Gfn, GfnRange};
use crate::backend::{
    for_each_leaf_batched, BackendError, ChainRound, ChainWord, ChainWords, FlushToken, Leaf, MmuBackend,
};
use crate::dirty_bitmap::{for_each_word_mask, DirtyBitmap};
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
///
/// Fault-side operations ([`note_writable`](Self::note_writable),
/// [`mark`](Self::mark), [`note_zapped`](Self::note_zapped)) take `&self`
/// and may run on several vCPUs at once; a round (`get_and_clear`, `get`,
/// `clear`, `reset_ring_entry`) changes leaf permissions and takes `&mut
/// self`, with the MMU lock held for writing.
#[derive(Debug)]
pub struct SlotDirtyLog {
    slot: Memslot,
    gfns: GfnRange,
    tracking: Tracking,
    mode: LogMode,
    bitmap: DirtyBitmap,
    /// One bit per page whose leaves may be writable: made writable since
    /// the last round (write protection), or writable at all (dirty bit).
    /// In ring mode: the page is in a ring and not yet reset (so a refault
    /// of the page, after a zap, does not push it twice).
    chain: DirtyBitmap,
    /// One bit per word of `chain` that may hold a page: set by the first
    /// page chained into the word, so a round reads only these words of the
    /// chain. A superset: a word emptied outside a round (a manual clear, a
    /// ring reset) keeps its bit until a round finds it empty.
    chain_words: DirtyBitmap,
}

impl SlotDirtyLog {
    /// Starts logging `slot`: splits its huge leaves, then write-protects
    /// every leaf (write-protect tracking) or clears every D bit and chains
    /// the pages of writable leaves (dirty-bit tracking). This one pass
    /// costs the slot's mapped size; every round after costs what is
    /// writable. Splitting needs reverse-map and table reserves: a
    /// [`BackendError::ReserveEmpty`] comes back as
    /// [`DirtyLogError::Backend`]; top up and call again (what was split
    /// stays split).
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
        let log = Self {
            slot: *slot,
            gfns,
            tracking,
            mode,
            bitmap: DirtyBitmap::new(slot.npages()),
            chain: DirtyBitmap::new(slot.npages()),
            chain_words: DirtyBitmap::new(slot.npages().div_ceil(64)),
        };
        let chained = &log;
        for_each_leaf_batched(backend, slot, gfns, |b, h| {
            let Some(leaf) = b.leaf(h) else { return false };
            match tracking {
                Tracking::WriteProtect => {
                    b.write_protect(h, flush);
                }
                Tracking::HardwareDirty => {
                    b.clear_dirty(h, flush);
                    if leaf.writable {
                        if let Some(r) = leaf.gfns().intersect(&gfns) {
                            chained.chain_range(r.start.0 - gfns.start.0, r.len());
                        }
                    }
                }
            }
            false
        });
        if tracking == Tracking::HardwareDirty {
            // From now on the back end keeps the dirty bits that leave the
            // hardware without the drivers; those lost before logging started
            // predate it, as do the D bits just cleared.
            backend.track_lost_dirty(true);
            backend.drain_lost_dirty(gfns, &mut |_| {});
        }
        Ok(log)
    }

    /// Stops logging: under dirty-bit tracking the back end may stop keeping
    /// lost dirty bits for this log ([`MmuBackend::track_lost_dirty`]). Leaves
    /// keep the permissions they have; the next fault maps as the slot's
    /// flags then say.
    pub fn stop<B: MmuBackend + ?Sized>(self, backend: &mut B) {
        if self.tracking == Tracking::HardwareDirty {
            backend.track_lost_dirty(false);
        }
    }

    /// The slot logged.
    pub fn slot(&self) -> SlotId {
        self.slot.id()
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

    /// Pages now on the writable chain.
    pub fn chain_len(&self) -> usize {
        self.chain.count() as usize
    }

    fn offset_of(&self, gfn: Gfn) -> Result<u64, DirtyLogError> {
        gfn.offset_from(self.gfns.start)
            .filter(|&i| i < self.gfns.len())
            .ok_or(DirtyLogError::OutOfSlot(gfn.0.wrapping_sub(self.gfns.start.0)))
    }

    /// Logs the page (bitmap, or the vCPU's `ring` in ring mode). A page
    /// already in a ring and not yet reset is not pushed again: it will be
    /// re-protected at its reset, and copied after it. (Two vCPUs faulting
    /// on the page at once may both push it: the bit is set only after a
    /// push succeeded, so a refused push never hides another's.)
    fn log_page(&self, idx: u64, ring: Option<&DirtyRing>) -> Result<RingPush, DirtyLogError> {
        match (self.mode, ring) {
            (LogMode::Ring, Some(ring)) => {
                if self.chain.test(idx) {
                    return Ok(if ring.is_soft_full() { RingPush::SoftFull } else { RingPush::Ok });
                }
                let push = ring.push(self.slot.id(), idx)?;
                self.chain.set(idx);
                Ok(push)
            }
            (LogMode::Ring, None) => Err(DirtyLogError::WrongMode(self.mode)),
            _ => {
                self.bitmap.set(idx);
                Ok(RingPush::Ok)
            }
        }
    }

    /// Fault path, **before** leaf `h`, mapping `gfn` of this slot, is made
    /// writable (a write fault under write protection, or any writable leaf
    /// under dirty-bit tracking). Under write protection the page is logged
    /// now: in the bitmap, or pushed to the vCPU's `ring`. The page joins the
    /// writable chain. A full ring refuses the write
    /// ([`DirtyLogError::RingFull`]): the caller must map the leaf read-only
    /// and exit to the harvester. Takes `&self`: vCPUs fault concurrently.
    ///
    /// `h` names the leaf for the caller's benefit only: the chain records
    /// the page, and a round reaches all of the page's leaves through the
    /// reverse map.
    pub fn note_writable(
        &self,
        gfn: Gfn,
        h: PteHandle,
        ring: Option<&DirtyRing>,
    ) -> Result<RingPush, DirtyLogError> {
        let _ = h;
        let idx = self.offset_of(gfn)?;
        let mut status = RingPush::Ok;
        if self.tracking == Tracking::WriteProtect {
            status = self.log_page(idx, ring)?;
        }
        if self.mode != LogMode::Ring {
            // Ring mode re-protects page by page at reset: no chain.
            self.chain_page(idx);
        }
        Ok(status)
    }

    /// Puts page `idx` on the chain: one atomic OR, and a second one for the
    /// word's summary bit only when the page is the first of its word.
    #[inline]
    fn chain_page(&self, idx: u64) {
        if self.chain.set_first_of_word(idx) {
            self.chain_words.set(idx / 64);
        }
    }

    /// Puts pages `[first, first + n)` on the chain.
    fn chain_range(&self, first: u64, n: u64) {
        self.chain.set_range(first, n);
        if n != 0 {
            let (w0, w1) = (first / 64, (first + n - 1) / 64);
            self.chain_words.set_range(w0, w1 - w0 + 1);
        }
    }

    /// The hypervisor wrote page `gfn` itself (an emulated write, a guest
    /// A/D update by shadow paging, a device model): logs it without
    /// chaining, since no leaf became writable. In ring mode the entry goes
    /// to the writing vCPU's `ring`; a full ring returns
    /// [`DirtyLogError::RingFull`] and the write must wait for the harvester.
    pub fn mark(&self, gfn: Gfn, ring: Option<&DirtyRing>) -> Result<RingPush, DirtyLogError> {
        let idx = self.offset_of(gfn)?;
        self.log_page(idx, ring)
    }

    /// A leaf of this slot was zapped (invalidation, eviction): under
    /// dirty-bit tracking its final D bit is the only record of the write,
    /// so fold it into the log. (Under write protection the page was marked
    /// when the leaf was made writable.) Call with the leaf
    /// [`MmuBackend::zap`] returned.
    pub fn note_zapped(&self, leaf: &Leaf) {
        if self.tracking == Tracking::HardwareDirty && leaf.dirty {
            self.mark_range(leaf.gfns());
        }
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

    /// A round in one sweep over the slot: visits the chain and hands the
    /// bitmap over into `out`, word by word (taking each word, or copying it
    /// if `!take`). Under write protection each chained page's leaves are
    /// protected and the chain empties (the fault logged those pages); under
    /// dirty-bit tracking the D bit of every live leaf of each chained page
    /// is harvested, and a page stays chained while one of its leaves is
    /// still writable. The chain's non-empty words go to the back end in
    /// batches ([`MmuBackend::round_chain_words`]); if it declines, the rest
    /// of the round visits each page's leaves through its reverse map.
    ///
    /// Word `w` of the bitmap is handed over only after every chained page
    /// of words up to `w` was visited, so what a visit marks is in it; a mark
    /// that lands in a word already handed over (a huge leaf reaching back,
    /// the dirty bits the back end kept) goes into `out` directly. The round
    /// holds the log exclusively (`&mut self`), so the bitmaps are read and
    /// cleared with plain loads and stores: the only atomic operations left
    /// are the back end's, one per leaf that changes.
    fn sweep<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        flush: &mut FlushToken,
        out: &mut Vec<u64>,
        take: bool,
    ) {
        let harvest = self.tracking == Tracking::HardwareDirty;
        let slot = self.slot;
        let gfns = self.gfns;
        let Self { bitmap, chain, chain_words, .. } = self;
        out.clear();
        let mut sink = Sink { bitmap, out, take, emitted: 0, gfns };
        let mut batch = Batch::new();
        let mut words = WordBatch {
            slot,
            gfns,
            harvest,
            rmap: false,
            n: 0,
            words: [ChainWord { first: gfns.start, mask: 0 }; BATCH_WORDS],
        };
        for sw in 0..chain_words.words() {
            let mut summary = if harvest { chain_words.word_mut(sw) } else { chain_words.take_word_mut(sw) };
            while summary != 0 {
                let sbit = summary.trailing_zeros();
                summary &= summary - 1;
                let w = sw * 64 + sbit as usize;
                let bits = if harvest { chain.word_mut(w) } else { chain.take_word_mut(w) };
                if bits == 0 {
                    // Emptied outside a round: forget the word.
                    chain_words.clear_mask_mut(sw, 1 << sbit);
                    continue;
                }
                if words.push(w, bits) {
                    words.visit(backend, &mut batch, chain, &mut sink, flush);
                }
            }
        }
        words.visit(backend, &mut batch, chain, &mut sink, flush);
        batch.visit(backend, harvest, gfns, chain, &mut sink, flush);
        sink.emit_upto(sink.bitmap.words());
        if harvest {
            // Leaves the back end dropped on its own took their D bit with
            // them: the chain cannot see them any more.
            backend.drain_lost_dirty(gfns, &mut |r| sink.mark(r));
        } else {
            // Under write protection the fault marked those pages: what the
            // back end lost is already logged.
            backend.drain_lost_dirty(gfns, &mut |_| {});
        }
    }

    /// Classic mode: returns the dirty bitmap in `out` (one `u64` per 64
    /// pages) and leaves the slot re-protected. Flush the token before
    /// copying the pages reported. Give `out` its capacity before taking the
    /// MMU lock (one word per 64 pages) so the copy does not allocate.
    pub fn get_and_clear<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        out: &mut Vec<u64>,
    ) -> Result<FlushToken, DirtyLogError> {
        if self.mode != LogMode::Bitmap {
            return Err(DirtyLogError::WrongMode(self.mode));
        }
        let mut flush = FlushToken::new();
        self.sweep(backend, &mut flush, out, true);
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
            self.sweep(backend, &mut flush, out, false);
        } else {
            // The chain is re-protected by `clear`, range by range.
            let bitmap = &mut self.bitmap;
            out.clear();
            bitmap.copy_words_into(0, bitmap.words(), out);
        }
        Ok(flush)
    }

    /// The single page `offset` of the slot.
    fn page(&self, offset: u64) -> GfnRange {
        page_of(self.gfns, offset)
    }
    /// Manual-protect mode, step 2: clears the bits of `mask` (one bit per
    /// page from `first_page`, which must be 64-page aligned) and
    /// re-protects those pages. Only pages whose bit was set are touched, so
    /// a huge slot is re-protected piecewise, in proportion to what was
    /// dirty. Flush the token before copying the pages.
    ///
    /// A guest write between `get` and `clear` to a page of `mask` is not
    /// lost: under write protection it faulted and set the bit again before
    /// this clear, and the page is copied after this clear's flush, so the
    /// copy holds the write; under dirty-bit tracking the write set D, which
    /// the next `get` harvests.
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
        let w = (first_page / 64) as usize;
        let mut flush = FlushToken::new();
        if self.tracking == Tracking::WriteProtect {
            // Clear, then protect: a guest write through a still-writable
            // leaf in between sets no bit, but lands before the flush that
            // precedes the copy; one after the protection faults and sets
            // the bit again for the next round.
            let was = self.bitmap.clear_mask(w, mask);
            self.chain.clear_mask(w, was);
            let mut bits = was;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let one = self.page(first_page + bit);
                backend.write_protect_gfns(slot, one, &mut flush);
            }
        } else {
            self.bitmap.clear_mask(w, mask);
        }
        Ok(flush)
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
        // Out of the ring, then protected: the next write faults and pushes.
        self.chain.clear_mask((offset / 64) as usize, 1 << (offset % 64));
        backend.write_protect_gfns(slot, self.page(offset), flush);
        Ok(())
    }
}

/// The single page `offset` of `gfns`.
fn page_of(gfns: GfnRange, offset: u64) -> GfnRange {
    let gfn = Gfn(gfns.start.0 + offset);
    GfnRange { start: gfn, end: Gfn(gfn.0 + 1) }
}

/// Where a round's sweep hands the bitmap over: `out`, filled word by word
/// up to `emitted`, from the log's bitmap (taken, or copied if `!take`).
struct Sink<'a> {
    bitmap: &'a mut DirtyBitmap,
    out: &'a mut Vec<u64>,
    take: bool,
    emitted: usize,
    gfns: GfnRange,
}

impl Sink<'_> {
    /// Hands over the bitmap words before `end`.
    #[inline]
    fn emit_upto(&mut self, end: usize) {
        if end <= self.emitted {
            return;
        }
        if self.take {
            self.bitmap.take_words_into(self.emitted, end, self.out);
        } else {
            self.bitmap.copy_words_into(self.emitted, end, self.out);
        }
        self.emitted = end;
    }

    /// Logs the frames of `r` inside the slot: in the bitmap for the words
    /// still to hand over; in `out` for those already handed over (and in
    /// the bitmap too when it is copied, not taken, so it keeps the page
    /// until the caller clears it).
    fn mark(&mut self, r: GfnRange) {
        let Some(r) = r.intersect(&self.gfns) else { return };
        let first = r.start.0 - self.gfns.start.0;
        let npages = self.bitmap.npages();
        for_each_word_mask(first, r.len(), npages, |w, mask| {
            if w < self.emitted {
                self.out[w] |= mask;
                if self.take {
                    return;
                }
            }
            self.bitmap.or_word_mut(w, mask);
        });
    }
}

/// Chain words a round hands the back end per call of
/// [`MmuBackend::round_chain_words`]: enough for a walk to keep several
/// table lines in flight before its atomics. The batch and the back end's
/// walk live on the stack of a round under the MMU lock: 64 words keep them
/// near 5 KiB; 256 measured 3-4 % faster for four times the stack.
const BATCH_WORDS: usize = 64;

/// Non-empty words of the chain, gathered for the back end's walk
/// ([`MmuBackend::round_chain_words`]), or for the reverse-map path when it
/// answers [`ChainWords::NotHandled`].
struct WordBatch {
    slot: Memslot,
    gfns: GfnRange,
    harvest: bool,
    /// The back end declined a batch: this round takes the reverse-map path.
    rmap: bool,
    n: usize,
    /// The words gathered, ascending (word `w` of the chain starts at frame
    /// `gfns.start + 64 w`).
    words: [ChainWord; BATCH_WORDS],
}

impl WordBatch {
    /// Adds chain word `w` with its chained pages `bits`. Returns whether the
    /// batch is now full.
    #[inline]
    fn push(&mut self, w: usize, bits: u64) -> bool {
        self.words[self.n] = ChainWord { first: Gfn(self.gfns.start.0 + w as u64 * 64), mask: bits };
        self.n += 1;
        self.n == BATCH_WORDS
    }

    /// The index in the chain of `word`, one of those gathered.
    #[inline]
    fn index(&self, word: &ChainWord) -> usize {
        ((word.first.0 - self.gfns.start.0) / 64) as usize
    }

    /// Protects or harvests the leaves of the words gathered, then empties
    /// the batch: through the back end's walk, or page by page through the
    /// reverse map in `batch`.
    fn visit<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        batch: &mut Batch,
        chain: &mut DirtyBitmap,
        sink: &mut Sink<'_>,
        flush: &mut FlushToken,
    ) {
        let n = core::mem::take(&mut self.n);
        if n == 0 {
            return;
        }
        let (slot, gfns, harvest) = (self.slot, self.gfns, self.harvest);
        let mut writable = [0u64; BATCH_WORDS];
        // Once the back end declined, the rest of the round takes the
        // reverse-map path without asking again (it is always correct), so
        // its page batches fill across word batches. Until then nothing was
        // gathered for it.
        let answer = if self.rmap {
            ChainWords::NotHandled
        } else if harvest {
            let mut mark = |r: GfnRange| sink.mark(r);
            let round = ChainRound::HarvestDirty(&mut mark);
            backend.round_chain_words(&slot, &self.words[..n], round, &mut writable[..n], flush)
        } else {
            backend.round_chain_words(
                &slot,
                &self.words[..n],
                ChainRound::WriteProtect,
                &mut writable[..n],
                flush,
            )
        };
        match answer {
            ChainWords::Done => {
                if harvest {
                    // A page stays chained while a leaf of it is writable.
                    for (word, &keep) in self.words[..n].iter().zip(&writable[..n]) {
                        chain.clear_mask_mut(self.index(word), word.mask & !keep);
                    }
                }
                sink.emit_upto(self.index(&self.words[n - 1]) + 1);
            }
            ChainWords::NotHandled => {
                self.rmap = true;
                for word in &self.words[..n] {
                    let w = self.index(word);
                    let mut bits = word.mask;
                    while bits != 0 {
                        let offset = w as u64 * 64 + bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        if batch.gather(backend, &slot, gfns, offset) {
                            continue;
                        }
                        // Full: visit what was gathered; every page before
                        // this word is then done, and its bitmap words can go.
                        batch.visit(backend, harvest, gfns, chain, sink, flush);
                        sink.emit_upto(w);
                        if !batch.gather(backend, &slot, gfns, offset) {
                            // More leaves than a batch holds: this page alone.
                            visit_page(backend, &slot, gfns, harvest, offset, chain, sink, flush);
                        }
                    }
                }
            }
        }
    }
}

/// Chained pages a round gathers per batch.
const BATCH_PAGES: usize = 32;
/// Leaf handles a round gathers per batch (one bit each in a `u64`).
const BATCH_LEAVES: usize = 64;

/// A batch of chained pages and the handles of their leaves, on the stack.
///
/// A round first asks the reverse map for the leaves of many pages, then
/// visits the leaves: each reverse-map read and each leaf read is then
/// independent of the one before it, so the processor keeps several cache
/// misses in flight, where visiting page by page waits for two misses in a
/// row per page (the chained pages of a large slot are far apart).
struct Batch {
    /// Offsets in the slot of the pages gathered.
    pages: [u64; BATCH_PAGES],
    /// `handles[ends[i - 1]..ends[i]]` are the leaves of `pages[i]`.
    ends: [u8; BATCH_PAGES],
    handles: [PteHandle; BATCH_LEAVES],
    npages: usize,
    nleaves: usize,
}

impl Batch {
    fn new() -> Self {
        Self {
            pages: [0; BATCH_PAGES],
            ends: [0; BATCH_PAGES],
            handles: [PteHandle(0); BATCH_LEAVES],
            npages: 0,
            nleaves: 0,
        }
    }

    /// Adds page `offset` of `gfns` with its leaves. Returns `false`, adding
    /// nothing, if the page or its leaves do not fit.
    #[inline]
    fn gather<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &B,
        slot: &Memslot,
        gfns: GfnRange,
        offset: u64,
    ) -> bool {
        if self.npages == BATCH_PAGES {
            return false;
        }
        let start = self.nleaves;
        let mut n = start;
        let mut fits = true;
        let handles = &mut self.handles;
        backend.for_each_leaf(slot, page_of(gfns, offset), &mut |h| match handles.get_mut(n) {
            Some(slot) => {
                *slot = h;
                n += 1;
            }
            None => fits = false,
        });
        if !fits {
            return false;
        }
        self.nleaves = n;
        self.pages[self.npages] = offset;
        self.ends[self.npages] = n as u8;
        self.npages += 1;
        true
    }

    /// Protects (or harvests) the leaves gathered, then empties the batch.
    /// Nothing here removes a leaf, so the handles gathered stay valid.
    ///
    /// Two passes: the first only reads each leaf, the second changes those
    /// that need it. An atomic read-modify-write waits for its cache line
    /// and holds back the loads after it, so changing leaves as they are
    /// read would take their misses one at a time; the plain reads of the
    /// first pass overlap, and the second pass finds the lines in cache.
    fn visit<B: MmuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        harvest: bool,
        gfns: GfnRange,
        chain: &mut DirtyBitmap,
        sink: &mut Sink<'_>,
        flush: &mut FlushToken,
    ) {
        let handles = &self.handles[..self.nleaves];
        // Bit i: leaf i needs the second pass (writable, under write
        // protection; live, under dirty-bit tracking). Write permission only
        // changes under `&mut` on the back end, which the round holds.
        let mut todo = 0u64;
        for (i, &h) in handles.iter().enumerate() {
            let need = backend.leaf(h).is_some_and(|l| harvest || l.writable);
            todo |= (need as u64) << i;
        }
        if !harvest {
            while todo != 0 {
                let i = todo.trailing_zeros() as usize;
                todo &= todo - 1;
                backend.write_protect(handles[i], flush);
            }
        } else {
            let mut start = 0;
            for (&offset, &end) in self.pages[..self.npages].iter().zip(&self.ends[..self.npages]) {
                let end = end as usize;
                let mut writable = false;
                for (i, &h) in handles.iter().enumerate().take(end).skip(start) {
                    if todo >> i & 1 != 0 {
                        writable |= harvest_leaf(backend, gfns, h, sink, flush);
                    }
                }
                start = end;
                if !writable {
                    chain.clear_mask_mut((offset / 64) as usize, 1 << (offset % 64));
                }
            }
        }
        self.npages = 0;
        self.nleaves = 0;
    }
}

/// Harvests the D bit of leaf `h` (writable or not: a leaf write-protected
/// by another path keeps its D/C bit) into `sink`. Returns whether the leaf
/// is writable.
#[inline]
fn harvest_leaf<B: MmuBackend + ?Sized>(
    backend: &B,
    gfns: GfnRange,
    h: PteHandle,
    sink: &mut Sink<'_>,
    flush: &mut FlushToken,
) -> bool {
    let Some(leaf) = backend.leaf(h) else { return false };
    if !gfns.overlaps(&leaf.gfns()) {
        return false;
    }
    if backend.clear_dirty(h, flush) {
        sink.mark(leaf.gfns());
    }
    leaf.writable || backend.leaf(h).is_some_and(|l| l.writable)
}

/// A page with more leaves than a [`Batch`] holds, visited alone through
/// [`for_each_leaf_batched`].
#[allow(clippy::too_many_arguments)]
fn visit_page<B: MmuBackend + ?Sized>(
    backend: &mut B,
    slot: &Memslot,
    gfns: GfnRange,
    harvest: bool,
    offset: u64,
    chain: &mut DirtyBitmap,
    sink: &mut Sink<'_>,
    flush: &mut FlushToken,
) {
    let one = page_of(gfns, offset);
    if !harvest {
        backend.write_protect_gfns(slot, one, flush);
        return;
    }
    let mut writable = false;
    for_each_leaf_batched(backend, slot, one, |b, h| {
        writable |= harvest_leaf(b, gfns, h, sink, flush);
        false
    });
    if !writable {
        chain.clear_mask_mut((offset / 64) as usize, 1 << (offset % 64));
    }
}

/// The dirty logs a fault path consults, by slot.
pub trait SlotLogs {
    /// The log of `slot`, if it is logged.
    fn log(&self, slot: SlotId) -> Option<&SlotDirtyLog>;
}

impl SlotLogs for BTreeMap<SlotId, SlotDirtyLog> {
    fn log(&self, slot: SlotId) -> Option<&SlotDirtyLog> {
        self.get(&slot)
    }
}

/// Logs indexed by slot number.
impl SlotLogs for Vec<Option<SlotDirtyLog>> {
    fn log(&self, slot: SlotId) -> Option<&SlotDirtyLog> {
        self.get(slot.0 as usize).and_then(Option::as_ref)
    }
}

/// No slot is logged.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLogs;

impl SlotLogs for NoLogs {
    fn log(&self, _: SlotId) -> Option<&SlotDirtyLog> {
        None
    }
}

/// What a fault path needs to follow "log, then grant": the slots' dirty
/// logs (and so each logged slot's tracking) and the faulting vCPU's ring.
/// An engine (x86 TDP today; shadow paging and Book3s can take the same)
/// calls [`FaultCtx::before_grant`] before it stores a writable leaf.
#[derive(Clone, Copy)]
pub struct FaultCtx<'a> {
    logs: &'a dyn SlotLogs,
    ring: Option<&'a DirtyRing>,
}

impl fmt::Debug for FaultCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultCtx").field("ring", &self.ring.is_some()).finish_non_exhaustive()
    }
}

/// Whether a fault may store its leaf writable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WriteGrant {
    /// Logged (or not logged at all): map writable. `SoftFull` asks the vCPU
    /// to exit to the harvester soon.
    Writable(RingPush),
    /// The vCPU's ring is full: the write was not logged, so map read-only
    /// and exit to the harvester; the guest's write refaults after the reset.
    RingFull,
}

static NO_LOGS: NoLogs = NoLogs;

impl<'a> FaultCtx<'a> {
    /// A context over `logs`, for a vCPU with `ring` (ring mode only).
    pub fn new(logs: &'a dyn SlotLogs, ring: Option<&'a DirtyRing>) -> Self {
        Self { logs, ring }
    }

    /// A context where nothing is logged.
    pub fn unlogged() -> FaultCtx<'static> {
        FaultCtx { logs: &NO_LOGS, ring: None }
    }

    /// The log of `slot`.
    pub fn log(&self, slot: SlotId) -> Option<&'a SlotDirtyLog> {
        self.logs.log(slot)
    }

    /// The vCPU's ring.
    pub fn ring(&self) -> Option<&'a DirtyRing> {
        self.ring
    }

    /// How `slot`'s writes are learned of, if it is logged.
    pub fn tracking(&self, slot: SlotId) -> Option<Tracking> {
        self.log(slot).map(SlotDirtyLog::tracking)
    }

    /// Whether a fault (a write fault if `write`) in `slot` may map the leaf
    /// writable at all: not a read fault under write-protect logging (the
    /// first write must fault); any fault otherwise, dirty-bit tracking
    /// included (the leaf is mapped with D clear and the CPU sets it).
    pub fn may_map_writable(&self, slot: SlotId, write: bool) -> bool {
        write || self.tracking(slot) != Some(Tracking::WriteProtect)
    }

    /// Log, then grant: call **before** storing leaf `h` (mapping `gfn` of
    /// `slot`) writable. An unlogged slot is always granted.
    pub fn before_grant(&self, slot: SlotId, gfn: Gfn, h: PteHandle) -> Result<WriteGrant, DirtyLogError> {
        let Some(log) = self.log(slot) else { return Ok(WriteGrant::Writable(RingPush::Ok)) };
        match log.note_writable(gfn, h, self.ring) {
            Ok(push) => Ok(WriteGrant::Writable(push)),
            Err(DirtyLogError::RingFull) => Ok(WriteGrant::RingFull),
            Err(e) => Err(e),
        }
    }

    /// The hypervisor writes `gfn` of `slot` itself: [`SlotDirtyLog::mark`]
    /// if the slot is logged.
    pub fn mark(&self, slot: SlotId, gfn: Gfn) -> Result<RingPush, DirtyLogError> {
        match self.log(slot) {
            Some(log) => log.mark(gfn, self.ring),
            None => Ok(RingPush::Ok),
        }
    }
}

/// Splits every huge leaf of `slot` down to 4 KiB, visiting the leaves in
/// stack batches (no allocation). A split that finds its reserve empty
/// returns [`BackendError::ReserveEmpty`]: top up and call again.
pub fn split_all_huge<B: MmuBackend + ?Sized>(
    slot: &Memslot,
    backend: &mut B,
    flush: &mut FlushToken,
) -> Result<(), BackendError> {
    loop {
        let mut split = 0usize;
        let mut err = None;
        for_each_leaf_batched(backend, slot, slot.gfns(), |b, h| {
            if err.is_some() || b.leaf(h).is_none_or(|l| l.npages <= 1) {
                return false;
            }
            match b.split_huge(h, flush) {
                Ok(()) => {
                    split += 1;
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if split == 0 {
            return Ok(());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::addr::Hva;
    use crate::backend::{Caps, NoTlb};
    use crate::memslot::SlotFlags;
    use crate::sync::{AtomicU64, Ordering};

    const W: u64 = 1;
    const D: u64 = 2;

    /// Leaf `i` maps page `pages[i]`; several leaves may map one page.
    struct Leaves {
        pages: Vec<u64>,
        bits: Vec<AtomicU64>,
    }

    impl MmuBackend for Leaves {
        fn caps(&self) -> Caps {
            Caps { accessed_bit: false, dirty_bit: true }
        }
        fn for_each_leaf(&self, _: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
            for (i, &p) in self.pages.iter().enumerate() {
                if gfns.contains(Gfn(p)) {
                    f(PteHandle(i as u32));
                }
            }
        }
        fn leaf(&self, h: PteHandle) -> Option<Leaf> {
            let b = self.bits.get(h.0 as usize)?.load(Ordering::Acquire);
            Some(Leaf {
                gfn: Gfn(self.pages[h.0 as usize]),
                npages: 1,
                writable: b & W != 0,
                young: false,
                dirty: b & D != 0,
                access_tracked: false,
            })
        }
        fn write_protect(&mut self, h: PteHandle, _: &mut FlushToken) -> bool {
            self.bits[h.0 as usize].fetch_and(!W, Ordering::AcqRel) & W != 0
        }
        fn clear_dirty(&self, h: PteHandle, _: &mut FlushToken) -> bool {
            self.bits[h.0 as usize].fetch_and(!D, Ordering::AcqRel) & D != 0
        }
        fn clear_young(&self, _: PteHandle, _: &mut FlushToken) -> bool {
            false
        }
        fn split_huge(&mut self, _: PteHandle, _: &mut FlushToken) -> Result<(), BackendError> {
            Ok(())
        }
        fn zap(&mut self, _: PteHandle, _: &mut FlushToken) -> Option<Leaf> {
            None
        }
    }

    /// 200 chained pages (several batches), page 7 mapped by 70 leaves (more
    /// than a batch holds): a write-protect round protects every leaf and
    /// reports every page once; a dirty-bit round harvests every D bit.
    #[test]
    fn a_round_reaches_every_leaf_across_batches_and_of_a_page_with_many_leaves() {
        for tracking in [Tracking::WriteProtect, Tracking::HardwareDirty] {
            let npages = 4096u64;
            let chained: Vec<u64> = (0..200).map(|i| i * 20 + 7).collect();
            let mut pages: Vec<u64> = chained.clone();
            pages.extend(core::iter::repeat_n(7, 69));
            let mut b = Leaves { bits: pages.iter().map(|_| AtomicU64::new(0)).collect(), pages };
            let slot = Memslot::new(SlotId(0), Gfn(0), npages, Hva(1 << 30), SlotFlags::DIRTY_LOG);
            let mut flush = FlushToken::new();
            let log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut b, &mut flush).unwrap();
            flush.flush(&mut NoTlb);
            let mut log = log;
            for (i, &p) in b.pages.iter().enumerate() {
                b.bits[i].store(W | D, Ordering::Release);
                log.note_writable(Gfn(p), PteHandle(i as u32), None).unwrap();
            }
            let mut out = Vec::new();
            log.get_and_clear(&mut b, &mut out).unwrap().flush(&mut NoTlb);
            for p in 0..npages {
                let reported = out[(p / 64) as usize] >> (p % 64) & 1 != 0;
                assert_eq!(reported, chained.contains(&p), "{tracking:?}: page {p}");
            }
            for (i, bits) in b.bits.iter().enumerate() {
                let v = bits.load(Ordering::Acquire);
                match tracking {
                    Tracking::WriteProtect => assert_eq!(v & W, 0, "leaf {i} left writable"),
                    Tracking::HardwareDirty => assert_eq!(v & D, 0, "leaf {i} kept its D bit"),
                }
            }
        }
    }
}
