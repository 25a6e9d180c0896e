//! Invalidation sequencing: a fault must never install a pfn that an MMU
//! notifier invalidated while the fault was resolving it.
//!
//! The protocol (KVM's `mmu_invalidate_seq`):
//! 1. the fault takes a [`FaultSnapshot`] *before* resolving hva → pfn (which
//!    may sleep and is done without the MMU lock);
//! 2. a notifier calls [`InvalidationSeq::start`] (MMU lock held), zaps the
//!    range, and later [`InvalidationSeq::end`], which bumps the sequence;
//! 3. the fault, back under the MMU lock, asks
//!    [`InvalidationSeq::must_retry`]: `true` if any invalidation ended since
//!    the snapshot, or one in progress covers its hva. Then it drops the pfn
//!    and retries.
//!
//! `start`/`end`/`must_retry` run under the MMU lock; only `snapshot` runs
//! without it. The range fields are atomics anyway, so a `&self` is enough
//! and loom can check the lock-free half.

use crate::addr::{Hva, HvaRange};
use crate::sync::{AtomicU64, Ordering};

/// The sequence a fault read before resolving its pfn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[must_use = "a fault must check its snapshot with must_retry before committing"]
pub struct FaultSnapshot(u64);

/// The invalidation sequence and the hva range of invalidations in progress.
#[derive(Debug)]
pub struct InvalidationSeq {
    seq: AtomicU64,
    in_progress: AtomicU64,
    /// Union of the ranges of invalidations in progress (valid while
    /// `in_progress > 0`).
    range_start: AtomicU64,
    range_end: AtomicU64,
}

impl Default for InvalidationSeq {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidationSeq {
    /// No invalidation has happened.
    pub fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            range_start: AtomicU64::new(u64::MAX),
            range_end: AtomicU64::new(0),
        }
    }

    /// Step 1: read before resolving hva → pfn, without the MMU lock.
    #[inline]
    pub fn snapshot(&self) -> FaultSnapshot {
        // Acquire: the pfn lookup that follows must not be ordered before the
        // read, or an invalidation that completed first could be missed.
        FaultSnapshot(self.seq.load(Ordering::Acquire))
    }

    /// A notifier begins invalidating `range` (MMU lock held). The caller
    /// zaps the range's leaves after this call.
    pub fn start(&self, range: HvaRange) {
        if self.in_progress.fetch_add(1, Ordering::AcqRel) == 0 {
            self.range_start.store(range.start.0, Ordering::Release);
            self.range_end.store(range.end.0, Ordering::Release);
        } else {
            self.range_start.fetch_min(range.start.0, Ordering::AcqRel);
            self.range_end.fetch_max(range.end.0, Ordering::AcqRel);
        }
    }

    /// The notifier finished invalidating (MMU lock held): the host page may
    /// now be gone, so every fault that snapshotted earlier must retry.
    pub fn end(&self) {
        // Bump first: a fault checking between the two must still retry.
        self.seq.fetch_add(1, Ordering::AcqRel);
        let before = self.in_progress.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "invalidation end without start");
        if before == 1 {
            self.range_start.store(u64::MAX, Ordering::Release);
            self.range_end.store(0, Ordering::Release);
        }
    }

    /// Step 3, under the MMU lock: whether the fault for `hva` must drop its
    /// pfn and retry.
    #[inline]
    pub fn must_retry(&self, snap: FaultSnapshot, hva: Hva) -> bool {
        if self.in_progress.load(Ordering::Acquire) > 0 {
            let start = self.range_start.load(Ordering::Acquire);
            let end = self.range_end.load(Ordering::Acquire);
            if hva.0 >= start && hva.0 < end {
                return true;
            }
        }
        self.seq.load(Ordering::Acquire) != snap.0
    }

    /// Number of invalidations that have ended.
    #[inline]
    pub fn sequence(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> HvaRange {
        HvaRange { start: Hva(a), end: Hva(b) }
    }

    #[test]
    fn fault_retries_when_an_invalidation_ended_after_its_snapshot() {
        let inv = InvalidationSeq::new();
        let snap = inv.snapshot();
        assert!(!inv.must_retry(snap, Hva(0x5000)));
        inv.start(r(0x100000, 0x200000));
        inv.end();
        // Even a fault elsewhere retries: the sequence is global, as in KVM.
        assert!(inv.must_retry(snap, Hva(0x5000)));
        assert!(!inv.must_retry(inv.snapshot(), Hva(0x5000)));
    }

    #[test]
    fn fault_inside_a_range_in_progress_retries_even_with_a_fresh_snapshot() {
        let inv = InvalidationSeq::new();
        inv.start(r(0x1000, 0x3000));
        inv.start(r(0x8000, 0x9000));
        let snap = inv.snapshot();
        assert!(inv.must_retry(snap, Hva(0x2000)));
        assert!(inv.must_retry(snap, Hva(0x8fff)));
        assert!(!inv.must_retry(snap, Hva(0x9000)));
        inv.end();
        inv.end();
        let snap = inv.snapshot();
        assert!(!inv.must_retry(snap, Hva(0x2000)));
    }
}
