//! Zapping the leaves a host range backs: the MMU-notifier invalidation,
//! written once against [`MmuBackend`].
//!
//! The caller brackets it with [`InvalidationSeq::start`] and `end` (so a
//! fault resolving a pfn in the range meanwhile retries), and hands each
//! zapped leaf's final bits to the slot's dirty log
//! ([`SlotDirtyLog::note_zapped`]): under dirty-bit tracking the D bit a
//! zapped leaf carried is the only record of its writes.
//!
//! [`InvalidationSeq::start`]: crate::invalidate::InvalidationSeq::start
//! [`SlotDirtyLog::note_zapped`]: crate::dirty_log::SlotDirtyLog::note_zapped

use crate::addr::HvaRange;
use crate::backend::{for_each_leaf_batched, FlushToken, Leaf, MmuBackend};
use crate::memslot::{Memslot, Memslots};

/// Zaps every leaf backed by host range `range` in every slot that maps it
/// (aliases included), recording the flushes in `flush` and calling
/// `zapped(slot, leaf)` with each leaf as it was. Returns the number of
/// leaves zapped. Flush the token before the host page is freed.
pub fn zap_hva_range<B: MmuBackend + ?Sized>(
    slots: &Memslots,
    backend: &mut B,
    range: HvaRange,
    flush: &mut FlushToken,
    mut zapped: impl FnMut(&Memslot, &Leaf),
) -> usize {
    let mut count = 0;
    for (slot, gfns) in slots.lookup_hva(range) {
        // Stack batches: nothing is allocated under the MMU lock.
        for_each_leaf_batched(backend, slot, gfns, |b, h| match b.zap(h, flush) {
            Some(leaf) => {
                count += 1;
                zapped(slot, &leaf);
                true
            }
            None => false,
        });
    }
    count
}
