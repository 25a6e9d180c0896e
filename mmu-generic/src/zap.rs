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

use alloc::vec::Vec;

use crate::addr::HvaRange;
use crate::backend::{FlushToken, Leaf, MmuBackend};
use crate::memslot::{Memslot, Memslots};
use crate::pte_list::PteHandle;

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
    let mut leaves: Vec<PteHandle> = Vec::new();
    for (slot, gfns) in slots.lookup_hva(range) {
        leaves.clear();
        backend.for_each_leaf(slot, gfns, &mut |h| leaves.push(h));
        for &h in &leaves {
            if let Some(leaf) = backend.zap(h, flush) {
                count += 1;
                zapped(slot, &leaf);
            }
        }
    }
    count
}
