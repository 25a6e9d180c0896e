//! R and C the guest takes away from the hardware entry, kept for the host:
//! folded into the per-gfn word, or queued for the core's dirty-bit harvest
//! while a dirty log runs.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, GfnRange};

use super::revmap::{NO_RMAP, RMAP_CHANGED, RMAP_REFERENCED};
use super::{GuestHpt, PageResolver};
use crate::hpte::{Hpte, HPTE_R_C, HPTE_R_R};

impl<R: PageResolver> GuestHpt<R> {
    /// queue instead of the word.
    pub(super) fn fold(&mut self, ptex: u64, r: u64, lost: bool) {
        self.fold_from(ptex, None, r, lost);
    }

    /// [`GuestHpt::fold`] for an entry whose dword 0 (pre-3.0 layout) was
    /// `v` before the caller emptied it; `None`: read it from the table.
    #[inline]
    pub(super) fn fold_from(&mut self, ptex: u64, v: Option<u64>, r: u64, lost: bool) {
        let e = &self.rev[ptex as usize];
        let (idx, guest_r) = (e.rmap, e.guest_r.load(Ordering::Acquire));
        self.fold_entry(ptex, idx, v, guest_r, r, lost);
    }

    /// [`GuestHpt::fold_from`] for an entry of chain `idx` whose guest dword 1
    /// is `guest_r` (its reverse-map entry already taken by the caller).
    #[inline]
    pub(super) fn fold_entry(
        &mut self,
        ptex: u64,
        idx: u32,
        v: Option<u64>,
        guest_r: u64,
        r: u64,
        lost: bool,
    ) {
        let bits = self.fold_bits(ptex, v, guest_r, r, lost);
        if bits != 0 && idx != NO_RMAP {
            // Words change only under `&mut self` (see `revmap`): a plain OR.
            if let Some(w) = self.rmap.get_mut(idx as usize) {
                *w.get_mut() |= bits;
            }
        }
    }

    /// The per-gfn bits ([`RMAP_REFERENCED`], [`RMAP_CHANGED`]) that keep an
    /// HPTE's R and C `r` for the host; a C that is `lost` to the hardware
    /// goes to the dirty-log queue instead while one runs.
    #[inline]
    pub(super) fn fold_bits(&mut self, ptex: u64, v: Option<u64>, guest_r: u64, r: u64, lost: bool) -> u64 {
        let mut bits = 0;
        if r & HPTE_R_R != 0 {
            bits |= RMAP_REFERENCED;
        }
        if r & HPTE_R_C != 0 {
            if let Some(q) = self.folded_dirty.as_mut() {
                if lost {
                    let v = v.unwrap_or_else(|| self.hpt.load(ptex).unwrap_or_default().v);
                    let view = Hpte::new(v, guest_r);
                    if let Some(ps) = self.sizes.decode(view.v, view.r) {
                        let gfn = Gfn(view.real_address(ps.actual_shift) >> 12);
                        q.push(GfnRange { start: gfn, end: Gfn(gfn.0 + ps.npages()) });
                        self.lost_dirty_pages += ps.npages();
                    }
                }
            } else {
                bits |= RMAP_CHANGED;
            }
        }
        bits
    }

    /// Routes the C bits the guest takes away from the hardware (H_REMOVE,
    /// H_BULK_REMOVE and H_CLEAR_MOD of a changed entry, and a host
    /// `split_huge`) to a queue of guest-frame ranges instead of the per-gfn
    /// word, where a dirty log that harvests only its writable chain
    /// (mmu-generic's `Tracking::HardwareDirty`) would never look. The core's
    /// dirty-bit harvest drains it every round through
    /// `MmuBackend::drain_lost_dirty`, so a page the guest wrote and then
    /// unmapped is still reported; [`GuestHpt::take_folded_dirty`] drains it
    /// by hand. The queue covers the whole page, where the per-gfn word names
    /// only its first frame. mmu-generic's `SlotDirtyLog::start` turns it on
    /// (through `MmuBackend::track_lost_dirty`) and the last log's `stop`
    /// off; turning it off folds what is queued into the words.
    pub fn queue_folded_dirty(&mut self, on: bool) {
        match (on, self.folded_dirty.take()) {
            (true, q) => self.folded_dirty = Some(q.unwrap_or_default()),
            (false, Some(q)) => {
                for r in q {
                    if let Some(i) = self.gfn_index(r.start) {
                        self.rmap[i as usize].fetch_or(RMAP_CHANGED, Ordering::AcqRel);
                    }
                }
            }
            (false, None) => {}
        }
    }

    /// Pages queued by [`GuestHpt::queue_folded_dirty`] since the table was
    /// made (a statistic: the queue itself drains).
    pub fn lost_dirty_pages(&self) -> u64 {
        self.lost_dirty_pages
    }

    /// Drains the queue of [`GuestHpt::queue_folded_dirty`]: the guest
    /// frames whose C bit left the hardware since the last call.
    pub fn take_folded_dirty(&mut self) -> Vec<GfnRange> {
        self.folded_dirty.as_mut().map(core::mem::take).unwrap_or_default()
    }
}
