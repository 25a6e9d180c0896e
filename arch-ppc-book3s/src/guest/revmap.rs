//! The reverse map: one entry per HPTE beside the table, and one word per
//! guest page holding the head of the circular chain of every HPTE that maps
//! it (KVM Book3s HV's `revmap` and `rmap`).

use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::Gfn;
use mmu_generic::memslot::Memslot;

use super::{GuestHpt, PageResolver};

/// Per-gfn word: the index of the chain's head HPTE.
pub const RMAP_INDEX: u64 = 0xffff_ffff;
/// Per-gfn word: the chain is not empty.
pub const RMAP_PRESENT: u64 = 1 << 32;
/// Per-gfn word: R folded in from an HPTE that no longer holds it.
pub const RMAP_REFERENCED: u64 = 1 << 33;
/// Per-gfn word: C folded in from an HPTE that no longer holds it.
pub const RMAP_CHANGED: u64 = 1 << 34;
/// Per-gfn word: lock bit, reserved for an editor that shares the table.
/// [`GuestHpt`] edits chains under `&mut self` and never sets it;
/// [`GuestHpt::check_invariants`] reports it set.
pub const RMAP_LOCK: u64 = 1 << 63;
/// Handle bit naming a per-gfn word rather than an HPTE.
pub const RMAP_HANDLE_BIT: u32 = 1 << 31;

pub(super) const NO_RMAP: u32 = u32::MAX;

#[derive(Debug)]
pub(super) struct RevEntry {
    /// dword 1 as the guest entered it (guest-real RPN), with the R/C the host
    /// took away (harvest, zap) folded in: the guest never sees them vanish.
    pub(super) guest_r: AtomicU64,
    pub(super) forw: u32,
    pub(super) back: u32,
    /// Index of the per-gfn word whose chain holds the entry, or NO_RMAP.
    pub(super) rmap: u32,
    /// The host made the hardware entry read-only (read-only slot or write-protect).
    pub(super) hv_ro: bool,
    /// log2 of the page size H_ENTER decoded (the L/LP bits never change
    /// afterwards), so that a removal finds the page to flush without
    /// decoding again.
    pub(super) shift: u8,
}

impl Default for RevEntry {
    fn default() -> Self {
        Self { guest_r: AtomicU64::new(0), forw: 0, back: 0, rmap: NO_RMAP, hv_ro: false, shift: 12 }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct SlotIndex {
    pub(super) base: u64,
    pub(super) npages: u64,
    pub(super) first: u32,
    /// The slot itself, so that H_ENTER finds slot and per-gfn words in one
    /// search.
    pub(super) slot: Memslot,
}

impl<R: PageResolver> GuestHpt<R> {
    // ---- the per-gfn word and its chain ------------------------------------------------------

    // Chains change only under `&mut self`, so no other thread can hold the
    // table meanwhile: the word is edited with plain loads and stores (no
    // lock bit, no atomic read-modify-write), keeping the folded R/C bits.

    /// Stores the head/present bits of per-gfn word `idx`, keeping R/C.
    fn set_head(&mut self, idx: u32, head: Option<u32>) {
        let w = self.rmap[idx as usize].get_mut();
        let set = match head {
            Some(h) => RMAP_PRESENT | u64::from(h),
            None => 0,
        };
        *w = (*w & (RMAP_REFERENCED | RMAP_CHANGED)) | set;
    }

    #[inline]
    pub(super) fn link(&mut self, idx: u32, ptex: u32) {
        let w = *self.rmap[idx as usize].get_mut();
        let me = ptex as usize;
        if w & RMAP_PRESENT != 0 {
            // Append at the tail of the circular list; the head stays.
            let head = (w & RMAP_INDEX) as u32;
            let tail = self.rev[head as usize].back;
            self.rev[me].forw = head;
            self.rev[me].back = tail;
            self.rev[tail as usize].forw = ptex;
            self.rev[head as usize].back = ptex;
            self.rev[me].rmap = idx;
        } else {
            self.rev[me].forw = ptex;
            self.rev[me].back = ptex;
            self.rev[me].rmap = idx;
            self.set_head(idx, Some(ptex));
        }
    }

    /// Writes the reverse-map entry `e` of a new entry at `ptex` (which the
    /// caller has checked is in the table), links it on chain `idx` (`e`'s
    /// links and chain are set here) and marks its slot busy: one write of
    /// the entry, where [`GuestHpt::link`] edits an entry already written.
    // Always inlined: H_ENTER is its hot caller, and the entry is then built in place.
    #[inline(always)]
    pub(super) fn link_new(&mut self, idx: u32, ptex: u32, mut e: RevEntry) {
        let w = self.rmap[idx as usize].get_mut();
        e.rmap = idx;
        if *w & RMAP_PRESENT != 0 {
            // Append at the tail of the circular list; the head stays.
            let head = (*w & RMAP_INDEX) as u32;
            let tail = self.rev[head as usize].back;
            (e.forw, e.back) = (head, tail);
            self.rev[tail as usize].forw = ptex;
            self.rev[head as usize].back = ptex;
        } else {
            *w = (*w & (RMAP_REFERENCED | RMAP_CHANGED)) | RMAP_PRESENT | u64::from(ptex);
            (e.forw, e.back) = (ptex, ptex);
        }
        self.rev[ptex as usize] = e;
        if let Some(b) = self.busy.get_mut((ptex >> 3) as usize) {
            *b |= 1 << (ptex & 7);
        }
    }

    /// Unlinks the entry at `ptex` whose reverse-map entry `e` the caller
    /// has already taken out of the table (and reset), ORing `fold`
    /// ([`RMAP_REFERENCED`], [`RMAP_CHANGED`]) into the chain's word in the
    /// same write.
    #[inline]
    pub(super) fn unlink_taken(&mut self, ptex: u32, e: &RevEntry, fold: u64) {
        let (next, prev) = (e.forw, e.back);
        // NO_RMAP (an entry on no chain) is past every word.
        let Some(word) = self.rmap.get_mut(e.rmap as usize) else { return };
        let w = word.get_mut();
        let head = (*w & RMAP_INDEX) as u32;
        let set = if next == ptex {
            // The only entry of its chain.
            0
        } else {
            RMAP_PRESENT | u64::from(if head == ptex { next } else { head })
        };
        *w = (*w & (RMAP_REFERENCED | RMAP_CHANGED)) | fold | set;
        if next != ptex {
            self.rev[next as usize].back = prev;
            self.rev[prev as usize].forw = next;
        }
    }

    #[inline]
    pub(super) fn unlink(&mut self, ptex: u32) {
        let me = ptex as usize;
        let idx = self.rev[me].rmap;
        if idx == NO_RMAP {
            return;
        }
        let head = (*self.rmap[idx as usize].get_mut() & RMAP_INDEX) as u32;
        let (next, prev) = (self.rev[me].forw, self.rev[me].back);
        self.rev[next as usize].back = prev;
        self.rev[prev as usize].forw = next;
        self.rev[me].rmap = NO_RMAP;
        if next == ptex {
            self.set_head(idx, None);
        } else if head == ptex {
            self.set_head(idx, Some(next));
        }
    }

    /// ORs an HPTE's R and C into the per-gfn word of its chain. `lost`: the
    /// hardware entry no longer holds them (removed, or C cleared for the
    /// guest); with [`GuestHpt::queue_folded_dirty`] on, such a C goes to the
    /// The chain of per-gfn word `idx`, head first.
    pub fn chain(&self, gfn: Gfn) -> ChainIter<'_, R> {
        let w = self.gfn_index(gfn).map(|i| self.rmap[i as usize].load(Ordering::Acquire)).unwrap_or(0);
        let head = (w & RMAP_PRESENT != 0).then_some((w & RMAP_INDEX) as u32);
        ChainIter { hpt: self, head, next: head, left: self.rev.len() }
    }
}

/// Iterator over the HPTE indices chained on one guest page.
#[derive(Debug)]
pub struct ChainIter<'a, R: PageResolver> {
    hpt: &'a GuestHpt<R>,
    head: Option<u32>,
    next: Option<u32>,
    left: usize,
}

impl<R: PageResolver> Iterator for ChainIter<'_, R> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let cur = self.next?;
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let forw = self.hpt.rev.get(cur as usize)?.forw;
        self.next = (Some(forw) != self.head).then_some(forw);
        Some(u64::from(cur))
    }
}
