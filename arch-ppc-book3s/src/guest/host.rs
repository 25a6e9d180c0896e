//! The host's side of an entry: taking the hardware entry away (a zap leaves
//! it absent for the guest), mapping it again on the guest's storage
//! interrupt, and giving back write permission after a write-protect.

use mmu_generic::backend::FlushToken;
use mmu_generic::memslot::SlotFlags;

use super::translate::HwEntry;
use super::{GuestHpt, PageResolver};
use crate::hpte::{
    is_writable, Hpte, HPTE_R_C, HPTE_R_PPP, HPTE_R_R, HPTE_V_ABSENT, HPTE_V_HVLOCK, HPTE_V_VALID,
};
use crate::papr::HptError;

impl<R: PageResolver> GuestHpt<R> {
    // ---- hardware entry helpers ---------------------------------------------------------------

    /// Invalidates the hardware entry and unlinks it; returns its final
    /// dword 1 (R/C read after V went off).
    pub(super) fn take_hw(&mut self, ptex: u64, flush: &mut FlushToken, fold: bool) -> u64 {
        let Some(h) = self.hpt.load(ptex) else { return 0 };
        if !h.valid() {
            return h.r;
        }
        // V off first; R/C can still change until the invalidation completes,
        // so dword 1 is read afterwards.
        let absent = Hpte::new((h.v & !(HPTE_V_VALID | HPTE_V_HVLOCK)) | HPTE_V_ABSENT, h.r);
        let _ = self.hpt.store(ptex, absent);
        let r = self.hpt.clear_r_bits(ptex, HPTE_R_R | HPTE_R_C);
        let view = Hpte::new(h.v, self.gr(ptex as usize));
        if let Some((range, _)) = self.guest_range(view) {
            flush.add_range(range);
        }
        if fold {
            self.fold(ptex, r, true);
        }
        self.unlink(ptex as u32);
        r
    }

    // ---- host side ----------------------------------------------------------------------------

    /// Maps again an entry a zap left absent (call it on the guest's storage
    /// interrupt for that entry). H_NOT_FOUND if the entry is not absent;
    /// H_PARAMETER if its page is no longer guest memory.
    pub fn fault_in(&mut self, ptex: u64) -> Result<(), HptError> {
        let i = self.in_range(ptex)?;
        let hw = self.hpt.load(ptex).unwrap_or_default();
        if hw.v & HPTE_V_ABSENT == 0 {
            return Err(HptError::NotFound);
        }
        let v = (hw.v & !(HPTE_V_ABSENT | HPTE_V_HVLOCK)) | HPTE_V_VALID;
        let guest_r = self.gr(i);
        let HwEntry { mut r, idx, ro, .. } = self.hardware_r(v, guest_r)?;
        // R/C were folded into the guest view at the zap; the new mapping starts clean.
        r &= !(HPTE_R_R | HPTE_R_C);
        self.rev[i].hv_ro = ro;
        self.link(idx, ptex as u32);
        let _ = self.hpt.store(ptex, Hpte::new(v, r));
        Ok(())
    }

    /// Gives back write permission the host took with
    /// [`MmuBackend::write_protect`](mmu_generic::backend::MmuBackend::write_protect), as far as the guest's PP and the
    /// slot allow (call it on the guest's protection fault). Returns whether
    /// the entry became writable.
    pub fn unprotect(&mut self, ptex: u64, flush: &mut FlushToken) -> bool {
        let Ok(i) = self.in_range(ptex) else { return false };
        let hw = self.hpt.load(ptex).unwrap_or_default();
        let guest_r = self.gr(i);
        if !hw.valid() || !self.rev[i].hv_ro || !is_writable(guest_r) {
            return false;
        }
        let view = Hpte::new(hw.v, guest_r);
        let Some((range, _)) = self.guest_range(view) else { return false };
        if self.slots.lookup(range.start).is_none_or(|s| s.flags().contains(SlotFlags::READONLY)) {
            return false;
        }
        self.hpt.update_r(ptex, HPTE_R_PPP, guest_r);
        self.rev[i].hv_ro = false;
        flush.add_range(range);
        true
    }
}
