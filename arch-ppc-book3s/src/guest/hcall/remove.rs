//! H_REMOVE and H_BULK_REMOVE: the entry leaves the table with its final R
//! and C, which the host keeps.

use mmu_generic::addr::{Gfn, GfnRange};
use mmu_generic::backend::FlushToken;

use crate::guest::{GuestHpt, PageResolver};
use crate::hpte::{Hpte, HPTE_R_C, HPTE_R_R, HPTE_V_VALID};
use crate::papr::{
    HptError, RemoveCond, BULK_END, BULK_FLAGS, BULK_MAX, BULK_NOT_FOUND, BULK_PARM, BULK_PTEX, BULK_REQUEST,
    BULK_RESPONSE, BULK_SUCCESS, BULK_TYPE, H_ANDCOND, H_AVPN,
};

impl<R: PageResolver> GuestHpt<R> {
    fn remove_one(&mut self, ptex: u64, cond: RemoveCond, flush: &mut FlushToken) -> Result<Hpte, HptError> {
        let hw = self.hpt.load(ptex).unwrap_or_default();
        let v = Self::guest_v(hw.v);
        if v & HPTE_V_VALID == 0 || !cond.matches(v) {
            return Err(HptError::NotFound);
        }
        Ok(self.remove_viewed(ptex, hw, v, flush))
    }

    /// Removes the entry at `ptex` (in the table; hardware entry `hw`, guest
    /// dword 0 `v`, valid for the guest, both read by the caller); returns it
    /// as the guest saw it, with its final R and C.
    fn remove_viewed(&mut self, ptex: u64, hw: Hpte, v: u64, flush: &mut FlushToken) -> Hpte {
        // The reverse-map entry is read once and left reset.
        let mut e = core::mem::take(&mut self.rev[ptex as usize]);
        if let Some(b) = self.busy.get_mut((ptex >> 3) as usize) {
            *b &= !(1 << (ptex & 7));
        }
        let gr = *e.guest_r.get_mut();
        let rc = if hw.valid() {
            // V off first; R/C can still change until the invalidation
            // completes, so dword 1 is taken afterwards (and the entry is
            // empty once it is).
            let r = self.hpt.invalidate_take_r(ptex);
            let shift = u32::from(e.shift);
            let page = Hpte::new(v, gr);
            debug_assert_eq!(self.sizes.decode(page.v, page.r).map(|ps| ps.actual_shift), Some(shift));
            if let Some(range) = GfnRange::from_len(Gfn(page.real_address(shift) >> 12), 1 << (shift - 12)) {
                flush.add_range(range);
            }
            // R and C stay the host's: folded into the chain's word as it
            // is unlinked (one write of the word).
            let fold = self.fold_bits(ptex, Some(hw.v), gr, r, true);
            self.unlink_taken(ptex as u32, &e, fold);
            r
        } else {
            // Absent: already invalid and unlinked, its R/C already taken.
            self.hpt.clear(ptex);
            hw.r
        };
        Hpte::new(v, gr | (rc & (HPTE_R_R | HPTE_R_C)))
    }

    /// H_REMOVE(flags, ptex, avpn): returns the removed entry (guest view,
    /// final R and C). H_PARAMETER: unknown flags or `ptex` outside the
    /// table. H_NOT_FOUND: no valid entry, or the H_AVPN / H_ANDCOND test failed.
    pub fn h_remove(
        &mut self,
        flags: u64,
        ptex: u64,
        avpn: u64,
        flush: &mut FlushToken,
    ) -> Result<Hpte, HptError> {
        if flags & !(H_AVPN | H_ANDCOND) != 0 {
            return Err(HptError::Parameter);
        }
        // Only an entry outside the table has no hardware entry.
        let hw = self.hpt.load(ptex).ok_or(HptError::Parameter)?;
        let v = Self::guest_v(hw.v);
        let avpn_ok = flags & H_AVPN == 0 || RemoveCond::Avpn(avpn).matches(v);
        let and_ok = flags & H_ANDCOND == 0 || RemoveCond::AndCond(avpn).matches(v);
        if !(v & HPTE_V_VALID != 0 && avpn_ok && and_ok) {
            return Err(HptError::NotFound);
        }
        Ok(self.remove_viewed(ptex, hw, v, flush))
    }

    /// H_READ(flags, ptex): the entry, or with H_READ_4 the four of the
    /// H_BULK_REMOVE: up to four (request, AVPN/mask) pairs in `args`, each
    /// request word rewritten in place as its response (PAPR: type 0b10,
    /// code 0 removed with R/C at [`BULK_RC`](crate::papr::BULK_RC), 1 not
    /// found, 2 parameter). Processing stops at an end marker, or with
    /// H_PARAMETER at the first request that is not a request, has both
    /// AVPN and ANDCOND, or names an entry outside the table.
    pub fn h_bulk_remove(&mut self, args: &mut [u64; 8], flush: &mut FlushToken) -> Result<(), HptError> {
        for i in 0..BULK_MAX {
            let (tsh, tsl) = (args[2 * i], args[2 * i + 1]);
            if tsh & BULK_TYPE == BULK_END {
                break;
            }
            let flags = tsh & BULK_FLAGS;
            let ptex = tsh & BULK_PTEX;
            let base = BULK_RESPONSE | flags | ptex;
            if tsh & BULK_TYPE != BULK_REQUEST || flags == BULK_FLAGS || !self.hpt.geometry().contains(ptex) {
                args[2 * i] = base | BULK_PARM;
                return Err(HptError::Parameter);
            }
            let cond = match flags >> 56 {
                1 => RemoveCond::AndCond(tsl),
                2 => RemoveCond::Avpn(tsl),
                _ => RemoveCond::Absolute,
            };
            args[2 * i] = match self.remove_one(ptex, cond, flush) {
                Ok(old) => base | BULK_SUCCESS | ((old.r & (HPTE_R_R | HPTE_R_C)) << 51),
                Err(_) => base | BULK_NOT_FOUND,
            };
        }
        Ok(())
    }
}
