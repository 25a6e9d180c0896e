//! H_ENTER: every argument checked, no second translation of a virtual page
//! in the PTEG pair, the first free slot (or H_EXACT's).

use core::sync::atomic::AtomicU64;

use crate::guest::revmap::RevEntry;
use crate::guest::translate::HwEntry;
use crate::guest::{GuestHpt, PageResolver};
use crate::hash::avpn_ignored;
use crate::hpte::{
    Hpte, HpteFormat, HPTE_R_TS, HPTE_V_ABSENT, HPTE_V_AVPN, HPTE_V_B, HPTE_V_COMMON_BITS, HPTE_V_HVLOCK,
    HPTE_V_SECONDARY, HPTE_V_VALID,
};
use crate::pagesize::PageSizePair;
use crate::papr::{HptError, H_COALESCE_CAND, H_EXACT, H_ICACHE_INVALIDATE, H_ICACHE_SYNCHRONIZE};

/// H_ENTER flags accepted: H_EXACT and the hints the table need not act on.
pub const H_ENTER_FLAGS: u64 = H_EXACT | H_ICACHE_INVALIDATE | H_ICACHE_SYNCHRONIZE | H_COALESCE_CAND;

/// The group index of the primary hash of the entry at `ptex`.
const fn primary_group(ptex: u64, v: u64, mask: u64) -> u64 {
    let g = ptex >> 3;
    if v & HPTE_V_SECONDARY != 0 {
        g ^ mask
    } else {
        g
    }
}

/// Whether two valid entries of one PTEG pair translate the same virtual
/// page: same base page size, same primary hash group, and the same B and
/// AVPN once the bits inside the larger page are ignored. (With at least 2^11
/// PTEGs, the group fixes every VA bit the AVPN omits.)
pub fn same_virtual_page(mask: u64, a: (u64, Hpte, PageSizePair), b: (u64, Hpte, PageSizePair)) -> bool {
    if a.2.base_shift != b.2.base_shift || primary_group(a.0, a.1.v, mask) != primary_group(b.0, b.1.v, mask)
    {
        return false;
    }
    let ign = avpn_ignored(a.2.actual_shift.max(b.2.actual_shift)) << 7;
    (a.1.v ^ b.1.v) & (HPTE_V_B | HPTE_V_AVPN) & !ign == 0
}

/// The dword-0 bits H_ENTER refuses with H_PARAMETER for a table in
/// `format`: B = 0b10 or 0b11 (reserved, LoPAPR 14.5.4.1.1; B's high bit),
/// and for ISA 3.0 the AVPN bits above a 68-bit virtual address, which its
/// narrower field cannot hold.
pub(in crate::guest) const fn pteh_reserved(format: HpteFormat) -> u64 {
    let b_reserved = 1 << 63;
    match format {
        HpteFormat::PreIsa300 => b_reserved,
        HpteFormat::Isa300 => b_reserved | (HPTE_V_AVPN & !HPTE_V_COMMON_BITS),
    }
}

impl<R: PageResolver> GuestHpt<R> {
    // ---- the hypercalls -----------------------------------------------------------------------

    /// H_ENTER(flags, ptex, pteh, ptel): returns the slot used.
    ///
    /// H_PARAMETER: unknown flags, `ptex` outside the table, a reserved B,
    /// dword-1 bit 1 set, an AVPN wider than an ISA 3.0 table holds, a
    /// page-size encoding the machine lacks, a page not wholly inside one
    /// memslot, WIMG other than M (under [`WimgPolicy::RequireM`](crate::guest::WimgPolicy::RequireM)), or a
    /// second translation of a virtual page already in the PTEG pair.
    /// H_PTEG_FULL: no free slot in the group, or H_EXACT's slot is in use.
    pub fn h_enter(&mut self, flags: u64, ptex: u64, pteh: u64, ptel: u64) -> Result<u64, HptError> {
        // What the arguments alone show wrong, in one test.
        if flags & !H_ENTER_FLAGS != 0 || pteh & self.pteh_reserved != 0 || ptel & HPTE_R_TS != 0 {
            return Err(HptError::Parameter);
        }
        // `ptex` is in the table exactly when its group is; then so is the
        // secondary group. The primary group's occupancy also picks the slot.
        let mask = self.hpt.geometry().pteg_mask();
        let g = ptex >> 3;
        let (Some(&taken), Some(&other)) = (self.busy.get(g as usize), self.busy.get((g ^ mask) as usize))
        else {
            return Err(HptError::Parameter);
        };
        let v = (pteh & !(HPTE_V_HVLOCK | HPTE_V_ABSENT)) | HPTE_V_VALID;
        let HwEntry { idx, ro, ps, table: hw, .. } = self.hardware_r(v, ptel)?;

        // No second translation of the same virtual page in the PTEG pair:
        // the MMU would find two matches (a machine check on real hardware).
        if taken | other != 0 && self.translates_in_pair((ptex, Hpte::new(v, ptel), ps), taken, other) {
            return Err(HptError::Parameter);
        }

        let k = if flags & H_EXACT != 0 {
            if taken & (1 << (ptex & 7)) != 0 {
                return Err(HptError::PtegFull);
            }
            ptex & 7
        } else {
            // The first free slot of the group.
            if taken == 0xff {
                return Err(HptError::PtegFull);
            }
            u64::from(taken.trailing_ones())
        };
        let slot = (ptex & !7) | k;
        let entry = RevEntry {
            guest_r: AtomicU64::new(ptel),
            hv_ro: ro,
            shift: ps.actual_shift as u8,
            ..RevEntry::default()
        };
        self.link_new(idx, slot as u32, entry);
        self.hpt.store_encoded(slot, hw);
        self.max_npages = self.max_npages.max(ps.npages());
        Ok(slot)
    }

    /// Whether an entry the guest sees as valid (valid or absent) in the
    /// PTEG pair of `new` translates its virtual page; `taken` and `other`
    /// are the occupancy of its primary and secondary group. Only those
    /// entries are read and decoded. Out of line: H_ENTER's own path then
    /// keeps its values in registers.
    #[inline(never)]
    fn translates_in_pair(&self, new: (u64, Hpte, PageSizePair), taken: u8, other: u8) -> bool {
        let mask = self.hpt.geometry().pteg_mask();
        let g = new.0 >> 3;
        // Every entry was made by H_ENTER, so none maps a page larger than
        // `max_npages` frames: an entry whose B and AVPN differ from the new
        // one's above what the largest page ignores cannot be the same page,
        // and is passed over on its hardware dword 0 alone (B and AVPN are
        // the guest's own there), without reading its guest dword 1.
        let largest = new.2.actual_shift.max(12 + self.max_npages.trailing_zeros());
        let differs = (HPTE_V_B | HPTE_V_AVPN) & !(avpn_ignored(largest) << 7);
        for (grp, mut busy) in [(g, taken), (g ^ mask, other)] {
            while busy != 0 {
                let i = grp * 8 + u64::from(busy.trailing_zeros());
                busy &= busy - 1;
                let Some(hw) = self.hpt.load(i) else { continue };
                if (hw.v ^ new.1.v) & differs != 0 {
                    continue;
                }
                let e = self.view_of(i, hw);
                if let Some(eps) = self.sizes.decode(e.v, e.r) {
                    if same_virtual_page(mask, new, (i, e, eps)) {
                        return true;
                    }
                }
            }
        }
        false
    }
}
