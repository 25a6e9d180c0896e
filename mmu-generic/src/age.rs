//! Referenced-bit ageing over a host-virtual range, for host memory reclaim
//! (KVM's `test_young` / `clear_young` MMU-notifier callbacks).
//!
//! The range is mapped to (slot, gfn range) pairs through
//! [`Memslots::lookup_hva`], aliases included, and each leaf found through the
//! back end's reverse map is tested or aged. The CPU sets accessed bits
//! concurrently, so clearing is the back end's atomic test-and-clear.
//!
//! Where the format has no accessed bit (EPT without A/D), answering "young"
//! would pin the page forever, since nothing could ever make it old. The
//! [`NoAccessedBit`] policy chooses between answering "old" and access
//! tracking: `age` makes each leaf not-present but restorable, the next
//! access refaults and the fault restores the leaf, and a present leaf is
//! therefore one accessed since the last `age`.

use crate::addr::HvaRange;
use crate::backend::{for_each_leaf_batched, FlushToken, MmuBackend};
use crate::memslot::Memslots;

/// What to do where the format has no accessed bit.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum NoAccessedBit {
    /// Report every page old: reclaim may evict a hot page (it will be
    /// faulted back), but never pins one.
    #[default]
    ReportOld,
    /// Make leaves not-present on `age`; the refault restores them and is
    /// the access.
    AccessTracking,
}

/// What an ageing pass found.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AgeReport {
    /// At least one leaf in the range was young.
    pub young: bool,
    /// Leaves examined.
    pub leaves: u64,
    /// Leaves found young.
    pub young_leaves: u64,
}

/// Whether any page of `range` was accessed since it was last aged, without
/// changing anything.
pub fn test_age<B: MmuBackend + ?Sized>(
    slots: &Memslots,
    backend: &B,
    range: HvaRange,
    policy: NoAccessedBit,
) -> AgeReport {
    let caps = backend.caps();
    let mut report = AgeReport::default();
    if !caps.accessed_bit && policy == NoAccessedBit::ReportOld {
        return report;
    }
    for (slot, gfns) in slots.lookup_hva(range) {
        backend.for_each_leaf(slot, gfns, &mut |h| {
            report.leaves += 1;
            let young = match backend.leaf(h) {
                Some(l) if caps.accessed_bit => l.young,
                // Access tracking: a present leaf was refaulted since `age`.
                Some(l) => !l.access_tracked,
                None => false,
            };
            if young {
                report.young_leaves += 1;
                report.young = true;
            }
        });
    }
    report
}

/// Tests and clears the accessed state of every page of `range`: each leaf
/// found young becomes old. Flush the token before relying on the pages
/// being old (a cached translation lets the CPU access without setting the
/// bit again).
pub fn age<B: MmuBackend + ?Sized>(
    slots: &Memslots,
    backend: &mut B,
    range: HvaRange,
    policy: NoAccessedBit,
    flush: &mut FlushToken,
) -> AgeReport {
    let caps = backend.caps();
    let mut report = AgeReport::default();
    if caps.accessed_bit {
        // Clearing the bit is an atomic operation of its own: this pass
        // could run under a read lock.
        let shared: &B = backend;
        for (slot, gfns) in slots.lookup_hva(range) {
            shared.for_each_leaf(slot, gfns, &mut |h| {
                report.leaves += 1;
                if shared.clear_young(h, flush) {
                    report.young_leaves += 1;
                }
            });
        }
    } else if policy == NoAccessedBit::AccessTracking {
        // Changes permissions (write lock); the leaves are visited in stack
        // batches, so nothing is allocated under the lock.
        for (slot, gfns) in slots.lookup_hva(range) {
            for_each_leaf_batched(backend, slot, gfns, |b, h| {
                report.leaves += 1;
                if b.mark_access_tracked(h, flush) {
                    report.young_leaves += 1;
                }
                false
            });
        }
    }
    report.young = report.young_leaves > 0;
    report
}
