//! What the generic drivers need from a page-table format.
//!
//! The dirty-log, ageing and zap drivers are written once against
//! [`MmuBackend`]; x86 TDP (EPT, NPT), x86 shadow paging and the Book3s hashed
//! page table implement it. A back end names its leaf PTEs by [`PteHandle`]s
//! (indices it chooses) and finds the leaves that map a guest frame through its
//! reverse map: the core's [`Rmap`](crate::rmap::Rmap) for x86, the per-HPTE
//! reverse-map chain for Book3s.
//!
//! Every method that changes what the TLB may cache takes a [`FlushToken`] and
//! records what must be flushed in it; the caller ends the batch by passing
//! the token to [`FlushToken::flush`]. The token is `#[must_use]`, so a batch
//! whose flush was forgotten is a compiler warning; a token that recorded a
//! change and is dropped without `flush` panics in debug builds and is
//! counted in release builds ([`FlushToken::unflushed_drops`]). A caller that
//! knows the recorded changes need no flush says so with
//! [`FlushToken::discard`].
//!
//! [`for_each_leaf_batched`] visits the leaves of a range in small batches
//! collected on the stack, so the drivers that must change leaves while
//! walking the reverse map (write protection, access tracking, zapping,
//! splitting) never allocate under the MMU lock.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gfn, GfnRange};
use crate::memslot::Memslot;
use crate::pte_list::PteHandle;

/// Tokens dropped with a recorded change and no flush (release builds; a
/// debug build panics instead). Not a lock-free protocol of the core, so a
/// plain `core` atomic, also under `loom`.
static UNFLUSHED_DROPS: AtomicU64 = AtomicU64::new(0);

/// What a format can record in hardware.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Caps {
    /// The hardware sets an accessed (referenced) bit: x86 A, EPT A with A/D
    /// enabled, Book3s R.
    pub accessed_bit: bool,
    /// The hardware sets a dirty (changed) bit: x86 D, EPT D with A/D
    /// enabled, Book3s C.
    pub dirty_bit: bool,
}

/// A present leaf PTE as the drivers see it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaf {
    /// First guest frame the leaf maps.
    pub gfn: Gfn,
    /// Number of 4 KiB frames it maps (1, 16, 512, 4096, 262144, ...).
    pub npages: u64,
    /// The leaf grants write access.
    pub writable: bool,
    /// The accessed bit is set (always false where the format has none).
    pub young: bool,
    /// The dirty bit is set (always false where the format has none).
    pub dirty: bool,
    /// The leaf is in the access-tracked state (not present, restorable).
    pub access_tracked: bool,
}

impl Leaf {
    /// The guest frames the leaf maps.
    pub fn gfns(&self) -> GfnRange {
        GfnRange { start: self.gfn, end: Gfn(self.gfn.0.saturating_add(self.npages)) }
    }
}

/// The TLB invalidation an embedder performs (INVEPT, an NPT ASID flush,
/// `tlbie`, or nothing where the back end's own update already flushed).
pub trait TlbFlush {
    /// Flushes cached translations of the guest frames in `range`.
    fn flush_range(&mut self, range: GfnRange);
    /// Flushes every cached translation of the guest.
    fn flush_all(&mut self);
}

/// The TLB of a host test whose simulated CPU caches nothing (its walker
/// reads the tables on every access): flushing it does nothing. Not for an
/// embedder whose CPU has a TLB.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlb;

impl TlbFlush for NoTlb {
    fn flush_range(&mut self, _: GfnRange) {}
    fn flush_all(&mut self) {}
}

/// A record of the TLB flushes a batch of PTE changes requires.
///
/// Collect changes into it, then call [`FlushToken::flush`] before relying on
/// the change (before copying a page reported dirty, before freeing a frame
/// unmapped). Ranges are merged into one covering range; beyond
/// [`FlushToken::MAX_RANGE_PAGES`] the flush becomes a full flush.
#[must_use = "PTE changes are not visible to the CPU until the TLB is flushed: call FlushToken::flush"]
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FlushToken {
    range: Option<GfnRange>,
    all: bool,
}

impl FlushToken {
    /// Covering ranges larger than this become a flush of everything.
    pub const MAX_RANGE_PAGES: u64 = 1 << 18;

    /// A token that needs no flush yet.
    pub const fn new() -> Self {
        Self { range: None, all: false }
    }

    /// Records that translations of `range` changed.
    #[inline]
    pub fn add_range(&mut self, range: GfnRange) {
        if self.all || range.is_empty() {
            return;
        }
        let merged = match self.range {
            None => range,
            Some(r) => GfnRange { start: r.start.min(range.start), end: r.end.max(range.end) },
        };
        if merged.len() > Self::MAX_RANGE_PAGES {
            self.all = true;
            self.range = None;
        } else {
            self.range = Some(merged);
        }
    }

    /// Records that every translation may have changed.
    pub fn add_all(&mut self) {
        self.all = true;
        self.range = None;
    }

    /// Adds everything another token recorded (which is consumed).
    pub fn merge(&mut self, mut other: FlushToken) {
        let (all, range) = other.take();
        if all {
            self.add_all();
        } else if let Some(r) = range {
            self.add_range(r);
        }
    }

    /// Whether any flush is needed.
    pub fn is_needed(&self) -> bool {
        self.all || self.range.is_some()
    }

    /// The range to flush, `None` when nothing or everything is to be flushed.
    pub fn range(&self) -> Option<GfnRange> {
        self.range
    }

    /// Performs the recorded flush (nothing if none is needed).
    pub fn flush(mut self, tlb: &mut impl TlbFlush) {
        let (all, range) = self.take();
        if all {
            tlb.flush_all();
        } else if let Some(r) = range {
            tlb.flush_range(r);
        }
    }

    /// Drops the record without flushing. Only for a caller that knows the
    /// recorded changes need no TLB flush: nothing any CPU may cache changed
    /// (tables no vCPU can reach yet), or the caller flushed the same
    /// translations by other means. Anywhere else, call [`flush`](Self::flush).
    pub fn discard(mut self) {
        let _ = self.take();
    }

    /// Number of tokens dropped, in release builds, with a recorded change
    /// and neither [`flush`](Self::flush) nor [`discard`](Self::discard)
    /// (each a TLB flush forgotten). Debug builds panic at the drop instead.
    pub fn unflushed_drops() -> u64 {
        UNFLUSHED_DROPS.load(Ordering::Relaxed)
    }

    fn take(&mut self) -> (bool, Option<GfnRange>) {
        (core::mem::take(&mut self.all), self.range.take())
    }
}

impl Drop for FlushToken {
    fn drop(&mut self) {
        if self.is_needed() {
            UNFLUSHED_DROPS.fetch_add(1, Ordering::Relaxed);
            // A second panic while unwinding would abort the process and
            // hide the first one.
            #[cfg(feature = "std")]
            if std::thread::panicking() {
                return;
            }
            debug_assert!(
                false,
                "FlushToken dropped without flush(): the TLB may still hold {:?}",
                if self.all { None } else { self.range }
            );
        }
    }
}

/// One word of a slot's writable chain, as a dirty-log round hands it to
/// [`MmuBackend::round_chain_words`]: the 64 guest frames from `first`, of
/// which bit `i` of `mask` chains `first + i`. Every chained frame lies in
/// the slot (the word of a slot's last, partial 64 pages has no bit past its
/// end).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChainWord {
    /// Guest frame of bit 0.
    pub first: Gfn,
    /// The chained frames.
    pub mask: u64,
}

/// What a round does to the leaves of the chained frames it hands over.
pub enum ChainRound<'a> {
    /// Write-protect every leaf that maps a chained frame (present leaves,
    /// and the saved permissions of access-tracked ones).
    WriteProtect,
    /// Test and clear the dirty bit of every live leaf that maps a chained
    /// frame, writable or not, calling the function with the whole range of
    /// each leaf whose bit was set (a huge leaf's range reaches past the
    /// word), and report which chained frames still have a writable leaf.
    HarvestDirty(&'a mut dyn FnMut(GfnRange)),
}

impl fmt::Debug for ChainRound<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WriteProtect => "WriteProtect",
            Self::HarvestDirty(_) => "HarvestDirty",
        })
    }
}

/// How a back end answered [`MmuBackend::round_chain_words`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[must_use = "NotHandled leaves the words untouched: the caller must take its own path"]
pub enum ChainWords {
    /// The back end did nothing: the caller visits the frames' leaves through
    /// the reverse map.
    NotHandled,
    /// Every leaf of every chained frame was protected or harvested.
    Done,
}

/// Why a back-end operation on a leaf failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BackendError {
    /// The handle names no present leaf.
    NotALeaf(PteHandle),
    /// A table or reverse-map allocation needed a reserve that was empty;
    /// top up and retry.
    ReserveEmpty,
    /// The page-table memory has no free frame for a new table.
    OutOfFrames,
}

/// The page-table format and reverse map, as the generic drivers use them.
///
/// Methods that only read or atomically clear hardware-set bits take `&self`,
/// so ageing may run under a read lock while the CPU sets bits concurrently;
/// methods that change permissions or structure take `&mut self` (the MMU
/// lock held for writing).
pub trait MmuBackend {
    /// What the format records in hardware.
    fn caps(&self) -> Caps;

    /// Calls `f` once for each leaf PTE that maps any frame of `gfns` inside
    /// `slot`, huge leaves included (once each, not once per frame).
    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle));

    /// The leaf `h` names, or `None` if it is not (any more) a present or
    /// access-tracked leaf.
    fn leaf(&self, h: PteHandle) -> Option<Leaf>;

    /// Clears write permission. Returns whether the leaf was writable.
    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool;

    /// Atomically tests and clears the hardware dirty bit. Returns whether it
    /// was set. Never called when `caps().dirty_bit` is false.
    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool;

    /// Atomically tests and clears the accessed bit. Returns whether it was
    /// set. Never called when `caps().accessed_bit` is false.
    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool;

    /// Access tracking for formats without an accessed bit: makes the leaf
    /// not-present while keeping what is needed to restore it on the next
    /// fault. Returns whether it was present (so, accessed since it was last
    /// tracked). The default answers `false` and changes nothing.
    fn mark_access_tracked(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let _ = (h, flush);
        false
    }

    /// Splits a huge leaf into next-size leaves with the same permissions,
    /// with no window where the range is unmapped; or, where the format cannot
    /// split, zaps it so the next fault maps small pages.
    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError>;

    /// Removes the leaf and its reverse-map entry. Returns the leaf as it was
    /// (with its final accessed and dirty bits), or `None` if `h` names none.
    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf>;

    /// Write-protects every leaf that maps a frame of `gfns` in `slot`.
    /// Returns whether any was writable. The default visits the leaves in
    /// stack batches ([`for_each_leaf_batched`]): nothing is allocated.
    fn write_protect_gfns(&mut self, slot: &Memslot, gfns: GfnRange, flush: &mut FlushToken) -> bool {
        let mut any = false;
        for_each_leaf_batched(self, slot, gfns, |b, h| {
            any |= b.write_protect(h, flush);
            false
        });
        any
    }

    /// Hands over the dirty bits that left the hardware without passing
    /// through the drivers, for the guest frames in `gfns`: leaves the back
    /// end removed on its own (a paravirtual guest's H_REMOVE, an eviction
    /// from a full PTEG) while the CPU had set their dirty bit. Calls `f` on
    /// each such range once and forgets it; ranges outside `gfns` are kept
    /// for the log that covers them. A dirty-bit harvest calls this every
    /// round, since its writable chain cannot see leaves that are gone. The
    /// default has nothing to report: back ends whose leaves only go through
    /// [`MmuBackend::zap`] hand the final bits to its caller instead.
    fn drain_lost_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        let _ = (gfns, f);
    }

    /// One step of a dirty-log round over whole words of the writable chain
    /// of `slot` at once ([`ChainWord`]): write-protect, or harvest the dirty
    /// bits of, every leaf that maps a chained frame, recording the flushes
    /// in `flush`. Under [`ChainRound::HarvestDirty`] `writable[i]` receives
    /// the frames of `words[i].mask` that still have a writable leaf (those
    /// stay chained); under write protection it is left as it is. `writable`
    /// is as long as `words`.
    ///
    /// A back end whose tables can be walked by guest frame answers from a
    /// walk (one table line per eight 4 KiB leaves, the upper levels hot in
    /// cache) instead of a reverse-map look-up per frame. It must reach every
    /// leaf the reverse map would: where some of them are outside the walk
    /// (tables of an obsolete generation that vCPUs may still use), it answers
    /// [`ChainWords::NotHandled`] and changes nothing. The default always
    /// answers so, and the round then visits each frame's leaves through
    /// [`MmuBackend::for_each_leaf`].
    fn round_chain_words(
        &mut self,
        slot: &Memslot,
        words: &[ChainWord],
        round: ChainRound<'_>,
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) -> ChainWords {
        let _ = (slot, words, round, writable, flush);
        ChainWords::NotHandled
    }

    /// A dirty-bit log starts (`on`) or stops on one slot: what
    /// [`MmuBackend::drain_lost_dirty`] reports must be kept from the first
    /// call on, and need not be once the last log has stopped (nobody drains
    /// it any more). [`crate::dirty_log::SlotDirtyLog::start`] and
    /// [`crate::dirty_log::SlotDirtyLog::stop`] call it under dirty-bit
    /// tracking, so an embedder never has to switch this on by hand; back ends
    /// count the calls, since several slots may be logged at once. The
    /// default keeps nothing, for back ends whose leaves only leave through
    /// [`MmuBackend::zap`].
    fn track_lost_dirty(&mut self, on: bool) {
        let _ = on;
    }
}

/// Pages per window of [`for_each_leaf_batched`].
const BATCH_WINDOW: u64 = 64;
/// Handles collected on the stack per pass.
const BATCH: usize = 64;

/// Calls `f(backend, h)` for each leaf that maps a frame of `gfns` in
/// `slot` (a huge leaf in the window holding its first frame inside `gfns`),
/// with `&mut` access to the back end, and without allocating: the range is
/// walked in windows of 64 pages, and each window's leaves are collected on
/// the stack in batches of 64.
///
/// `f` returns whether it removed `h` from the reverse map (a zap). It may
/// not add entries to the window being walked (a split adds entries for
/// another level: re-walk until nothing is left to do). `f` must be
/// idempotent: in the rare window with more than 64 leaves that `f` both
/// keeps and removes, a kept leaf can be offered again (every visitor of the
/// core is: a second write-protect, clear or zap of a leaf reports `false`).
pub fn for_each_leaf_batched<B: MmuBackend + ?Sized>(
    backend: &mut B,
    slot: &Memslot,
    gfns: GfnRange,
    mut f: impl FnMut(&mut B, PteHandle) -> bool,
) {
    let Some(gfns) = gfns.intersect(&slot.gfns()) else { return };
    let mut start = gfns.start.0;
    while start < gfns.end.0 {
        let end = start.saturating_add(BATCH_WINDOW).min(gfns.end.0);
        visit_window(backend, slot, gfns.start.0, start, end, &mut f);
        start = end;
    }
}

/// One window of [`for_each_leaf_batched`]: pass after pass, skip the first
/// `skip` leaves `f` kept and visit the next batch. Without removals the
/// reverse map's order is stable, so each leaf is visited once; a pass that
/// removed something starts over (removal may reorder the list).
fn visit_window<B: MmuBackend + ?Sized>(
    backend: &mut B,
    slot: &Memslot,
    range_start: u64,
    start: u64,
    end: u64,
    f: &mut impl FnMut(&mut B, PteHandle) -> bool,
) {
    let window = GfnRange { start: Gfn(start), end: Gfn(end) };
    let mut skip = 0usize;
    loop {
        let mut batch = [PteHandle(0); BATCH];
        let mut n = 0usize;
        let mut seen = 0usize;
        let shared: &B = backend;
        shared.for_each_leaf(slot, window, &mut |h| {
            // A huge leaf is visited in the window of its first frame
            // inside the range.
            let first = shared.leaf(h).map_or(start, |l| l.gfn.0.max(range_start));
            if first < start || first >= end {
                return;
            }
            if seen >= skip && n < BATCH {
                batch[n] = h;
                n += 1;
            }
            seen += 1;
        });
        let mut removed = 0usize;
        for &h in &batch[..n] {
            if f(backend, h) {
                removed += 1;
            }
        }
        if skip + n >= seen {
            return;
        }
        skip = if removed == 0 { skip + n } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        ranges: alloc::vec::Vec<GfnRange>,
        alls: usize,
    }

    impl TlbFlush for Recorder {
        fn flush_range(&mut self, range: GfnRange) {
            self.ranges.push(range);
        }
        fn flush_all(&mut self) {
            self.alls += 1;
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "FlushToken dropped without flush()")]
    fn a_token_dropped_with_a_change_and_no_flush_panics_in_debug_builds() {
        let mut t = FlushToken::new();
        t.add_range(GfnRange { start: Gfn(1), end: Gfn(2) });
        drop(t);
    }

    #[test]
    fn flushed_discarded_merged_and_empty_tokens_drop_quietly() {
        let before = FlushToken::unflushed_drops();
        drop(FlushToken::new());
        let mut t = FlushToken::new();
        t.add_all();
        t.discard();
        let mut a = FlushToken::new();
        let mut b = FlushToken::new();
        b.add_range(GfnRange { start: Gfn(5), end: Gfn(6) });
        a.merge(b);
        a.flush(&mut NoTlb);
        assert_eq!(FlushToken::unflushed_drops(), before);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn a_token_dropped_with_a_change_is_counted_in_release_builds() {
        let before = FlushToken::unflushed_drops();
        let mut t = FlushToken::new();
        t.add_range(GfnRange { start: Gfn(1), end: Gfn(2) });
        drop(t);
        assert_eq!(FlushToken::unflushed_drops(), before + 1);
    }

    #[test]
    fn flush_token_merges_ranges_and_escalates_to_all() {
        let mut rec = Recorder::default();
        FlushToken::new().flush(&mut rec);
        assert!(rec.ranges.is_empty() && rec.alls == 0);

        let mut t = FlushToken::new();
        t.add_range(GfnRange { start: Gfn(10), end: Gfn(11) });
        t.add_range(GfnRange { start: Gfn(3), end: Gfn(4) });
        assert_eq!(t.range(), Some(GfnRange { start: Gfn(3), end: Gfn(11) }));
        t.flush(&mut rec);
        assert_eq!(rec.ranges, [GfnRange { start: Gfn(3), end: Gfn(11) }]);

        let mut t = FlushToken::new();
        t.add_range(GfnRange { start: Gfn(0), end: Gfn(1) });
        t.add_range(GfnRange {
            start: Gfn(FlushToken::MAX_RANGE_PAGES),
            end: Gfn(FlushToken::MAX_RANGE_PAGES + 1),
        });
        assert!(t.is_needed() && t.range().is_none());
        t.flush(&mut rec);
        assert_eq!(rec.alls, 1);
    }
}
