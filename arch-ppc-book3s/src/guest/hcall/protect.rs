//! H_PROTECT: new PP0, PP, N and key for an entry, never more than the host
//! allows.

use mmu_generic::backend::FlushToken;

use crate::guest::{GuestHpt, PageResolver};
use crate::hpte::make_readonly;
use crate::papr::{HptError, RemoveCond, H_AVPN, H_PROTECT_BITS};
use crate::table::Protection;

impl<R: PageResolver> GuestHpt<R> {
    /// H_PROTECT(flags, ptex, avpn): replaces PP0, PP, N and the key.
    /// H_PARAMETER: flag bits outside H_AVPN and the protection bits, or
    /// `ptex` outside the table. H_NOT_FOUND: no valid entry or AVPN mismatch.
    pub fn h_protect(
        &mut self,
        flags: u64,
        ptex: u64,
        avpn: u64,
        flush: &mut FlushToken,
    ) -> Result<(), HptError> {
        if flags & !(H_AVPN | H_PROTECT_BITS) != 0 {
            return Err(HptError::Parameter);
        }
        let i = self.in_range(ptex)?;
        let view = self.guest_view(ptex);
        if !view.valid() || (flags & H_AVPN != 0 && !RemoveCond::Avpn(avpn).matches(view.v)) {
            return Err(HptError::NotFound);
        }
        let bits = Protection::from_h_protect_flags(flags).r_bits();
        self.set_gr(i, (self.gr(i) & !Protection::R_MASK) | bits);
        let hw = self.hpt.load(ptex).unwrap_or_default();
        if hw.valid() {
            let mut new = (hw.r & !Protection::R_MASK) | bits;
            if self.rev[i].hv_ro {
                new = make_readonly(new);
            }
            let old = self.hpt.update_r(ptex, Protection::R_MASK, new);
            // R/C stay in the hardware entry too.
            self.fold(ptex, old, false);
            if let Some((range, _)) = self.guest_range(view) {
                flush.add_range(range);
            }
        }
        Ok(())
    }
}
