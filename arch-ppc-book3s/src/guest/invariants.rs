//! The table's invariants, checked by tests and fuzz targets.

use core::sync::atomic::Ordering;

use super::hcall::same_virtual_page;
use super::revmap::{NO_RMAP, RMAP_INDEX, RMAP_LOCK, RMAP_PRESENT};
use super::{GuestHpt, PageResolver};
use crate::hpte::HPTE_V_HVLOCK;

/// A broken invariant found by [`GuestHpt::check_invariants`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Violation {
    /// Two valid HPTEs translate the same virtual page in one PTEG pair.
    DuplicateTranslation(u64, u64),
    /// A valid HPTE maps guest memory outside every memslot, or its page
    /// does not lie wholly in one slot.
    OutsideGuestMemory(u64),
    /// A valid HPTE has a page-size encoding the machine lacks.
    BadPageSize(u64),
    /// A hardware-valid HPTE is not on the chain of its guest page.
    NotInChain(u64),
    /// A chain holds an HPTE that is not hardware-valid, or of another page.
    StrayInChain(u64),
    /// A chain's forward and back links disagree.
    BrokenLinks(u64),
    /// A per-gfn word's present bit disagrees with its chain.
    PresentBit(u64),
    /// A lock bit was left set.
    LockHeld(u64),
    /// The occupancy summary of a PTEG disagrees with the table.
    Occupancy(u64),
}

impl<R: PageResolver> GuestHpt<R> {
    /// Checks the table's invariants: no two valid translations of one
    /// virtual page in a PTEG pair; every valid entry inside guest memory
    /// with a known page size; every hardware-valid entry on exactly the
    /// chain of its page, chains well linked, present bits right, no lock
    /// bit held.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        let n = self.hpt.len();
        let mask = self.hpt.geometry().pteg_mask();
        let mut chained = 0u64;
        let mut valid_hw = 0u64;
        for (g, &busy) in self.busy.iter().enumerate() {
            if busy != self.hpt.group_occupancy(g as u64) {
                return Err(Violation::Occupancy(g as u64));
            }
        }
        for ptex in 0..n {
            let hw = self.hpt.load(ptex).unwrap_or_default();
            if hw.v & HPTE_V_HVLOCK != 0 {
                return Err(Violation::LockHeld(ptex));
            }
            let view = self.guest_view(ptex);
            if !view.valid() {
                continue;
            }
            let (range, ps) = self.guest_range(view).ok_or(Violation::BadPageSize(ptex))?;
            let inside =
                self.slots.lookup(range.start).is_some_and(|s| s.allows_page(range.start, ps.actual_shift));
            if !inside {
                return Err(Violation::OutsideGuestMemory(ptex));
            }
            // Duplicates: compare with later entries of the pair only.
            let g = ptex >> 3;
            for grp in [g, g ^ mask] {
                for j in (grp * 8..grp * 8 + 8).filter(|&j| j > ptex) {
                    let e = self.guest_view(j);
                    if !e.valid() {
                        continue;
                    }
                    if let Some(eps) = self.sizes.decode(e.v, e.r) {
                        if same_virtual_page(mask, (ptex, view, ps), (j, e, eps)) {
                            return Err(Violation::DuplicateTranslation(ptex, j));
                        }
                    }
                }
            }
            if hw.valid() {
                valid_hw += 1;
                let idx = self.rev[ptex as usize].rmap;
                if idx == NO_RMAP || Some(idx) != self.gfn_index(range.start) {
                    return Err(Violation::NotInChain(ptex));
                }
            } else if self.rev[ptex as usize].rmap != NO_RMAP {
                return Err(Violation::StrayInChain(ptex));
            }
        }
        for (idx, w) in self.rmap.iter().enumerate() {
            let w = w.load(Ordering::Acquire);
            let gfn = self.index_gfn(idx as u32);
            if w & RMAP_LOCK != 0 {
                return Err(Violation::LockHeld(gfn.0));
            }
            if w & RMAP_PRESENT == 0 {
                if w & RMAP_INDEX != 0 {
                    return Err(Violation::PresentBit(gfn.0));
                }
                continue;
            }
            let head = (w & RMAP_INDEX) as u32;
            let mut cur = head;
            let mut steps = 0u64;
            loop {
                let e = self.rev.get(cur as usize).ok_or(Violation::BrokenLinks(u64::from(cur)))?;
                let hw = self.hpt.load(u64::from(cur)).unwrap_or_default();
                if !hw.valid() || e.rmap != idx as u32 {
                    return Err(Violation::StrayInChain(u64::from(cur)));
                }
                if self.rev.get(e.forw as usize).map(|f| f.back) != Some(cur) {
                    return Err(Violation::BrokenLinks(u64::from(cur)));
                }
                chained += 1;
                steps += 1;
                if steps > n {
                    return Err(Violation::BrokenLinks(u64::from(head)));
                }
                cur = e.forw;
                if cur == head {
                    break;
                }
            }
        }
        if chained != valid_hw {
            return Err(Violation::PresentBit(chained));
        }
        Ok(())
    }
}
