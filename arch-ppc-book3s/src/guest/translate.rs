//! From the guest's entry to the hardware's: the memslot that holds the page,
//! the host frames behind it ([`PageResolver`]), WIMG and protection.

use mmu_generic::addr::{Gfn, Hva, Pfn, PAGE_SHIFT};
use mmu_generic::memslot::{Memslot, SlotFlags};

use super::revmap::SlotIndex;
use super::{GuestHpt, WimgPolicy};
use crate::hpte::{make_readonly, Hpte, HpteFormat, HPTE_R_M, HPTE_R_RPN, HPTE_R_RPN_3_0, HPTE_R_WIMG};
use crate::pagesize::PageSizePair;
use crate::papr::HptError;

/// The host frames behind guest memory.
pub trait PageResolver {
    /// The first host frame of `npages` host-contiguous frames backing guest
    /// frames `gfn..gfn + npages` of `slot` (the whole range is in the slot,
    /// and `hva` is the host-virtual address of `gfn` there), or `None` if
    /// they are not resident or not contiguous.
    fn resolve(&mut self, slot: &Memslot, gfn: Gfn, hva: Hva, npages: u64) -> Option<Pfn>;
}

/// A resolver for a hypervisor whose host-virtual addresses equal host-real
/// addresses (a bare-metal hypervisor with an identity map; host tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct HvaIdentity;

impl PageResolver for HvaIdentity {
    #[inline]
    fn resolve(&mut self, _slot: &Memslot, _gfn: Gfn, hva: Hva, _npages: u64) -> Option<Pfn> {
        Some(Pfn(hva.page()))
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

/// The frame-number bits of a host page the table's layout cannot hold: past
/// the 64-bit address space (`Pfn::hpa` fails) or past the RPN field (the
/// ISA 3.0 field is narrower, Power ISA 3.0B Book III 5.7.7.1).
pub(super) const fn pfn_unfit(format: HpteFormat) -> u64 {
    let rpn = match format {
        HpteFormat::PreIsa300 => HPTE_R_RPN,
        HpteFormat::Isa300 => HPTE_R_RPN_3_0,
    };
    !(rpn >> PAGE_SHIFT) | !(u64::MAX >> PAGE_SHIFT)
}

impl<R: PageResolver> GuestHpt<R> {
    /// The slot index entry that holds `gfn`: the last one found first,
    /// then a binary search (which updates it).
    #[inline]
    fn slot_index(&mut self, gfn: u64) -> Option<&SlotIndex> {
        let hint = self.last_slot;
        match self.index.get(hint) {
            Some(s) if gfn.wrapping_sub(s.base) < s.npages => Some(s),
            _ => {
                let pos = self.index.partition_point(|s| s.base <= gfn).checked_sub(1)?;
                let s = self.index.get(pos)?;
                if gfn - s.base >= s.npages {
                    return None;
                }
                self.last_slot = pos;
                Some(s)
            }
        }
    }

    /// Computes the hardware dword 1 for the guest's `guest_r`, and the
    /// per-gfn index; `None` if the page is not wholly inside guest memory.
    #[inline]
    pub(super) fn hardware_r(&mut self, v: u64, guest_r: u64) -> Result<HwEntry, HptError> {
        let ps = self.sizes.decode(v, guest_r).ok_or(HptError::Parameter)?;
        let (wimg, format, unfit) = (self.wimg, self.hpt.format(), self.pfn_unfit);
        let size_mask = (1u64 << ps.actual_shift) - 1;
        let gfn = Hpte::new(v, guest_r).real_address(ps.actual_shift) >> PAGE_SHIFT;
        let s = self.slot_index(gfn).ok_or(HptError::Parameter)?;
        let (off, pages) = (gfn - s.base, ps.npages());
        // The whole page in the slot, its host-virtual address aligned to
        // the page (what `Memslot::allows_page` asks; `off` is in the slot).
        let hva = s.slot.hva().0.checked_add(off << PAGE_SHIFT).ok_or(HptError::Parameter)?;
        if s.npages - off < pages || hva & size_mask != 0 {
            return Err(HptError::Parameter);
        }
        let mut r = guest_r;
        match wimg {
            WimgPolicy::RequireM if guest_r & HPTE_R_WIMG != HPTE_R_M => return Err(HptError::Parameter),
            WimgPolicy::RequireM => {}
            WimgPolicy::ForceM => r = (r & !HPTE_R_WIMG) | HPTE_R_M,
        }
        let ro = s.slot.flags().contains(SlotFlags::READONLY);
        // Inside the slot (checked above), so the word exists.
        let idx = s.first + off as u32;
        let slot = s.slot;
        let pfn = self.resolver.resolve(&slot, Gfn(gfn), Hva(hva), pages).ok_or(HptError::Parameter)?;
        // One test: an address, aligned to the page, that the layout holds.
        if pfn.0 & (unfit | (pages - 1)) != 0 {
            return Err(HptError::Parameter);
        }
        r = (r & !(HPTE_R_RPN & !size_mask)) | (pfn.0 << PAGE_SHIFT);
        if ro {
            r = make_readonly(r);
        }
        // B, AVPN (H_ENTER's mask) and RPN (above) fit the layout.
        let table = format.encode_fitting(Hpte::new(v, r));
        debug_assert_eq!(Ok(table), format.encode(Hpte::new(v, r)));
        Ok(HwEntry { r, idx, ro, ps, table })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{GuestConfig, HvaIdentity};
    use crate::hash::HptGeometry;
    use crate::hpte::HpteFormat;
    use crate::pagesize::PageSizes;
    use mmu_generic::addr::Hva;
    use mmu_generic::memslot::{MemslotsBuilder, SlotId};

    /// Two slots and a hole: each H_ENTER after a hit in the other slot must
    /// take its own slot's host address and per-gfn word, and a page in the
    /// hole after a hit must still be refused.
    #[test]
    fn the_last_slot_hint_is_checked_before_it_is_used() {
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), 0x100, Hva(0x1000_0000), SlotFlags::empty())).expect("ok");
        b.create(Memslot::new(SlotId(1), Gfn(0x200), 0x100, Hva(0x8000_0000), SlotFlags::empty()))
            .expect("ok");
        let cfg = GuestConfig {
            geometry: HptGeometry::from_pft_size(18).expect("ok"),
            format: HpteFormat::PreIsa300,
            sizes: PageSizes::qemu_pseries_default(),
            wimg: WimgPolicy::RequireM,
        };
        let mut g = GuestHpt::new(cfg, b.build().expect("ok"), HvaIdentity).expect("ok");
        let cases =
            [(0x10u64, 0x1000_0000 + 0x10_000u64), (0x210, 0x8000_0000 + 0x10_000), (0x11, 0x1001_1000)];
        for (k, (gfn, hpa)) in cases.into_iter().enumerate() {
            let ptex = 8 * (k as u64 + 1);
            let slot = g.h_enter(0, ptex, (gfn << 7) | 0x80, (gfn << 12) | HPTE_R_M).expect("inside a slot");
            let hw = g.table().load(slot).expect("in range");
            assert_eq!(hw.r & HPTE_R_RPN, hpa, "gfn {gfn:#x} maps its own slot's host page");
            assert_eq!(
                g.chain(Gfn(gfn)).collect::<alloc::vec::Vec<_>>(),
                [slot],
                "on the chain of gfn {gfn:#x}"
            );
        }
        // Right after a hit in slot 1: its neighbours in the hole and past its end.
        g.h_enter(0, 0x40, 0x2ff << 7, (0x2ff << 12) | HPTE_R_M).expect("last page of slot 1");
        for gfn in [0x1ffu64, 0x300, 0x100] {
            assert_eq!(
                g.h_enter(0, 0x48, gfn << 7, (gfn << 12) | HPTE_R_M),
                Err(HptError::Parameter),
                "{gfn:#x}"
            );
        }
        g.check_invariants().expect("consistent");
    }
}
