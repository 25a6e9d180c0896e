//! [`MmuBackend`] over the guest's table, for the core's dirty-log, ageing
//! and invalidation drivers: each HPTE is a leaf, and a per-gfn word holding
//! folded R/C is a one-page leaf of its own.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, GfnRange};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend};
use mmu_generic::memslot::Memslot;
use mmu_generic::pte_list::PteHandle;

use super::revmap::{NO_RMAP, RMAP_CHANGED, RMAP_HANDLE_BIT, RMAP_INDEX, RMAP_PRESENT, RMAP_REFERENCED};
use super::{GuestHpt, PageResolver};
use crate::hpte::{is_writable, make_readonly, Hpte, HPTE_R_C, HPTE_R_PPP, HPTE_R_R};

impl<R: PageResolver> GuestHpt<R> {
    // ---- MmuBackend helpers -------------------------------------------------------------------

    pub(super) fn hpte_leaf(&self, ptex: u64) -> Option<Leaf> {
        let hw = self.hpt.load(ptex)?;
        let e = self.rev.get(ptex as usize)?;
        if !hw.valid() || e.rmap == NO_RMAP {
            return None;
        }
        let (range, _) = self.guest_range(Hpte::new(hw.v, e.guest_r.load(Ordering::Acquire)))?;
        Some(Leaf {
            gfn: range.start,
            npages: range.len(),
            writable: is_writable(hw.r),
            young: hw.r & HPTE_R_R != 0,
            dirty: hw.r & HPTE_R_C != 0,
            access_tracked: false,
        })
    }

    fn word_leaf(&self, idx: u32) -> Option<Leaf> {
        let w = self.rmap.get(idx as usize)?.load(Ordering::Acquire);
        if w & (RMAP_REFERENCED | RMAP_CHANGED) == 0 {
            return None;
        }
        Some(Leaf {
            gfn: self.index_gfn(idx),
            npages: 1,
            writable: false,
            young: w & RMAP_REFERENCED != 0,
            dirty: w & RMAP_CHANGED != 0,
            access_tracked: false,
        })
    }

    fn clear_hw_bit(&self, ptex: u64, bit: u64, flush: &mut FlushToken) -> bool {
        let Some(hw) = self.hpt.load(ptex) else { return false };
        if !hw.valid() || hw.r & bit == 0 || self.rev[ptex as usize].rmap == NO_RMAP {
            // Nothing to clear (hardware only ever sets the bit).
            return false;
        }
        let Some(leaf) = self.hpte_leaf(ptex) else { return false };
        self.hpt.lock(ptex);
        let old = self.hpt.clear_r_bits(ptex, bit);
        // The guest must not see the host's harvest: keep the bit in its view.
        self.or_gr(ptex as usize, old & bit);
        self.hpt.unlock(ptex);
        if old & bit != 0 {
            flush.add_range(leaf.gfns());
            true
        } else {
            false
        }
    }

    fn clear_word_bit(&self, idx: u32, bit: u64) -> bool {
        match self.rmap.get(idx as usize) {
            Some(w) => w.fetch_and(!bit, Ordering::AcqRel) & bit != 0,
            None => false,
        }
    }
}

impl<R: PageResolver> MmuBackend for GuestHpt<R> {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        let Some(range) = slot.gfns().intersect(&gfns) else { return };
        // A large page is chained on its first frame, which may lie before the range.
        let start = Gfn((range.start.0 & !(self.max_npages - 1)).max(slot.base_gfn().0));
        let (Some(first), Some(last)) = (self.gfn_index(start), self.gfn_index(Gfn(range.end.0 - 1))) else {
            return;
        };
        // The slot's words are contiguous: walk them without further lookups.
        for (k, w) in self.rmap[first as usize..=last as usize].iter().enumerate() {
            let w = w.load(Ordering::Acquire);
            if w & (RMAP_REFERENCED | RMAP_CHANGED | RMAP_PRESENT) == 0 {
                continue;
            }
            let idx = first + k as u32;
            let gfn = Gfn(start.0 + k as u64);
            if w & (RMAP_REFERENCED | RMAP_CHANGED) != 0 && range.contains(gfn) {
                f(PteHandle(RMAP_HANDLE_BIT | idx));
            }
            if w & RMAP_PRESENT == 0 {
                continue;
            }
            let head = (w & RMAP_INDEX) as u32;
            let (mut cur, mut left) = (head, self.rev.len());
            loop {
                // Small pages that start in the range need no decode.
                let inside = gfn >= range.start
                    || self.hpte_leaf(u64::from(cur)).is_some_and(|l| l.gfns().overlaps(&range));
                if inside {
                    f(PteHandle(cur));
                }
                cur = self.rev[cur as usize].forw;
                left -= 1;
                if cur == head || left == 0 {
                    break;
                }
            }
        }
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.word_leaf(h.0 & !RMAP_HANDLE_BIT)
        } else {
            self.hpte_leaf(u64::from(h.0))
        }
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            return false;
        }
        let ptex = u64::from(h.0);
        let Some(leaf) = self.hpte_leaf(ptex) else { return false };
        if !leaf.writable {
            return false;
        }
        let r = self.hpt.load(ptex).unwrap_or_default().r;
        self.hpt.update_r(ptex, HPTE_R_PPP, make_readonly(r));
        self.rev[ptex as usize].hv_ro = true;
        flush.add_range(leaf.gfns());
        true
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.clear_word_bit(h.0 & !RMAP_HANDLE_BIT, RMAP_CHANGED)
        } else {
            self.clear_hw_bit(u64::from(h.0), HPTE_R_C, flush)
        }
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.clear_word_bit(h.0 & !RMAP_HANDLE_BIT, RMAP_REFERENCED)
        } else {
            self.clear_hw_bit(u64::from(h.0), HPTE_R_R, flush)
        }
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            return Ok(());
        }
        let ptex = u64::from(h.0);
        match self.hpte_leaf(ptex) {
            // The guest chose the page size, so the host cannot split it: the
            // entry goes absent (R/C kept in the per-gfn word) and faults back.
            Some(l) if l.npages > 1 => {
                let r = self.take_hw(ptex, flush, true);
                self.or_gr(ptex as usize, r & (HPTE_R_R | HPTE_R_C));
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(BackendError::NotALeaf(h)),
        }
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            let idx = h.0 & !RMAP_HANDLE_BIT;
            let leaf = self.word_leaf(idx)?;
            self.rmap[idx as usize].fetch_and(!(RMAP_REFERENCED | RMAP_CHANGED), Ordering::AcqRel);
            return Some(leaf);
        }
        let ptex = u64::from(h.0);
        let mut leaf = self.hpte_leaf(ptex)?;
        // The driver receives R/C in the returned leaf, so they are not folded.
        let r = self.take_hw(ptex, flush, false);
        self.or_gr(ptex as usize, r & (HPTE_R_R | HPTE_R_C));
        leaf.young = r & HPTE_R_R != 0;
        leaf.dirty = r & HPTE_R_C != 0;
        Some(leaf)
    }

    /// Counts the dirty-bit logs: the first turns the folded-dirty queue on,
    /// the last one's stop turns it off ([`GuestHpt::queue_folded_dirty`]).
    fn track_lost_dirty(&mut self, on: bool) {
        if on {
            self.lost_dirty_logs += 1;
            self.queue_folded_dirty(true);
        } else if self.lost_dirty_logs > 0 {
            self.lost_dirty_logs -= 1;
            if self.lost_dirty_logs == 0 {
                self.queue_folded_dirty(false);
            }
        }
    }

    fn drain_lost_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        let Some(queue) = self.folded_dirty.as_mut() else { return };
        queue.retain(|r| match r.intersect(&gfns) {
            Some(mine) => {
                f(mine);
                // Keep what lies outside `gfns` for the log that covers it.
                r.start < gfns.start || r.end > gfns.end
            }
            None => true,
        });
    }
}
