//! H_CLEAR_REF and H_CLEAR_MOD: the guest clears R or C; the host keeps it.

use core::sync::atomic::Ordering;

use mmu_generic::backend::FlushToken;

use crate::guest::{GuestHpt, PageResolver};
use crate::hpte::{HPTE_R_C, HPTE_R_R};
use crate::papr::HptError;

impl<R: PageResolver> GuestHpt<R> {
    fn clear_bit(
        &mut self,
        flags: u64,
        ptex: u64,
        bit: u64,
        flush: &mut FlushToken,
    ) -> Result<u64, HptError> {
        if flags != 0 {
            return Err(HptError::Parameter);
        }
        let i = self.in_range(ptex)?;
        let view = self.guest_view(ptex);
        if !view.valid() {
            return Err(HptError::NotFound);
        }
        self.rev[i].guest_r.fetch_and(!bit, Ordering::AcqRel);
        if self.hpt.load(ptex).is_some_and(|h| h.valid()) {
            let old = self.hpt.clear_r_bits(ptex, bit);
            if old & bit != 0 {
                // The host keeps what the guest clears; the TLB may cache the
                // bit as set, so the translation is flushed.
                self.fold(ptex, old & bit, true);
                if let Some((range, _)) = self.guest_range(view) {
                    flush.add_range(range);
                }
            }
        }
        Ok(view.r)
    }

    /// H_CLEAR_REF(flags, ptex): clears R; returns dword 1 as it was.
    /// H_PARAMETER: non-zero flags or `ptex` outside the table. H_NOT_FOUND: no valid entry.
    pub fn h_clear_ref(&mut self, flags: u64, ptex: u64, flush: &mut FlushToken) -> Result<u64, HptError> {
        self.clear_bit(flags, ptex, HPTE_R_R, flush)
    }

    /// H_CLEAR_MOD(flags, ptex): clears C; returns dword 1 as it was.
    /// H_PARAMETER: non-zero flags or `ptex` outside the table. H_NOT_FOUND: no valid entry.
    pub fn h_clear_mod(&mut self, flags: u64, ptex: u64, flush: &mut FlushToken) -> Result<u64, HptError> {
        self.clear_bit(flags, ptex, HPTE_R_C, flush)
    }
}
