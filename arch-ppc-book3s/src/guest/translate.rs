//! From the guest's entry to the hardware's: the memslot that holds the page,
//! the host frames behind it ([`PageResolver`]), WIMG and protection.

use mmu_generic::addr::{Gfn, Pfn};
use mmu_generic::memslot::{Memslot, SlotFlags};

use super::{GuestHpt, WimgPolicy};
use crate::hpte::{make_readonly, Hpte, HPTE_R_M, HPTE_R_RPN, HPTE_R_WIMG};
use crate::pagesize::PageSizePair;
use crate::papr::HptError;

/// The host frames behind guest memory.
pub trait PageResolver {
    /// The first host frame of `npages` host-contiguous frames backing guest
    /// frames `gfn..gfn + npages` of `slot` (the whole range is in the slot),
    /// or `None` if they are not resident or not contiguous.
    fn resolve(&mut self, slot: &Memslot, gfn: Gfn, npages: u64) -> Option<Pfn>;
}

/// A resolver for a hypervisor whose host-virtual addresses equal host-real
/// addresses (a bare-metal hypervisor with an identity map; host tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct HvaIdentity;

impl PageResolver for HvaIdentity {
    fn resolve(&mut self, slot: &Memslot, gfn: Gfn, _npages: u64) -> Option<Pfn> {
        slot.gfn_to_hva(gfn).map(|h| Pfn(h.page()))
    }
}

/// What [`GuestHpt::hardware_r`] makes of a guest entry.
pub(super) struct HwEntry {
    /// The hardware dword 1 (host-real RPN, WIMG and protection applied).
    pub(super) r: u64,
    /// The per-gfn word of the page's first frame.
    pub(super) idx: u32,
    /// The slot is read-only, so the hardware entry is.
    pub(super) ro: bool,
    pub(super) ps: PageSizePair,
    /// The hardware entry in the table's layout.
    pub(super) table: (u64, u64),
}

impl<R: PageResolver> GuestHpt<R> {
    /// Computes the hardware dword 1 for the guest's `guest_r`, and the
    /// per-gfn index; `None` if the page is not wholly inside guest memory.
    pub(super) fn hardware_r(&mut self, v: u64, guest_r: u64) -> Result<HwEntry, HptError> {
        let ps = self.sizes.decode(v, guest_r).ok_or(HptError::Parameter)?;
        let gpa = Hpte::new(v, guest_r).real_address(ps.actual_shift);
        let gfn = Gfn(gpa >> 12);
        let slot = *self.slots.lookup(gfn).ok_or(HptError::Parameter)?;
        if !slot.allows_page(gfn, ps.actual_shift) {
            return Err(HptError::Parameter);
        }
        let mut r = guest_r;
        match self.wimg {
            WimgPolicy::RequireM if guest_r & HPTE_R_WIMG != HPTE_R_M => return Err(HptError::Parameter),
            WimgPolicy::RequireM => {}
            WimgPolicy::ForceM => r = (r & !HPTE_R_WIMG) | HPTE_R_M,
        }
        let size = 1u64 << ps.actual_shift;
        let pfn = self.resolver.resolve(&slot, gfn, ps.npages()).ok_or(HptError::Parameter)?;
        let hpa = pfn.hpa().ok_or(HptError::Parameter)?;
        if hpa & (size - 1) != 0 || hpa & !HPTE_R_RPN != 0 {
            return Err(HptError::Parameter);
        }
        r = (r & !(HPTE_R_RPN & !(size - 1))) | hpa;
        let ro = slot.flags().contains(SlotFlags::READONLY);
        if ro {
            r = make_readonly(r);
        }
        let idx = self.gfn_index(gfn).ok_or(HptError::Parameter)?;
        // The hardware layout must be able to hold it (ISA 3.0's narrower RPN).
        let table = self.hpt.format().encode(Hpte::new(v, r)).map_err(|_| HptError::Parameter)?;
        Ok(HwEntry { r, idx, ro, ps, table })
    }
}
