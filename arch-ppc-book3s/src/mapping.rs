//! Building HPTEs for guest RAM, placing them (primary group, then the
//! secondary on H_PTEG_FULL), and finding them again as the MMU does.
//!
//! What a kernel does to map a page, in one place: the HPTE builder keeps the
//! "RAM is WIMG = M exactly" rule (QEMU refuses anything else, DESIGN.md
//! section 8), [`insert`] owns the secondary-hash fallback on any
//! [`HashTable`], and [`search`] (re-exported from [`crate::search`], which
//! the table itself uses) is the MMU's hashed lookup.

use crate::hash::{pteg_index, VirtAddr};
use crate::hpte::{Hpte, HPTE_R_M, HPTE_V_SECONDARY, HPTE_V_VALID};
use crate::pagesize::{PageSizePair, PageSizes};
use crate::papr::HptError;
pub use crate::search::{search, Found};
use crate::table::HashTable;

/// One virtual page: its virtual address and its (base, actual) page size.
///
/// The base size is the segment's (it selects the hash and the SLB L||LP);
/// the actual size is the page's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VirtPage {
    /// The virtual address (any address inside the page).
    pub va: VirtAddr,
    /// Base and actual page size.
    pub size: PageSizePair,
}

impl VirtPage {
    /// The page of `va` with sizes `base_shift` / `actual_shift`.
    pub const fn new(va: VirtAddr, base_shift: u32, actual_shift: u32) -> Self {
        Self { va, size: PageSizePair { base_shift, actual_shift } }
    }

    /// The primary hash, before masking.
    pub const fn hash(&self) -> u64 {
        self.va.hash(self.size.base_shift)
    }

    /// The PTEG index of the primary or the secondary hash.
    pub const fn group(&self, pteg_mask: u64, secondary: bool) -> u64 {
        pteg_index(self.hash(), pteg_mask, secondary)
    }

    /// The HPTE (pre-3.0 layout, as the PAPR calls take it) mapping this page
    /// to RAM at real address `pa` with protection `pp` (PP0||PP, see
    /// [`hpte::pp`](crate::hpte::pp)): B, AVPN, L, H (when `secondary`) and V
    /// in dword 0; RPN with the LP encoding, WIMG = M, PP0 and PP in dword 1.
    /// `None` if the machine lacks the page size or `pa` is misaligned.
    pub fn ram_hpte(&self, sizes: &PageSizes, pa: u64, pp: u64, secondary: bool) -> Option<Hpte> {
        let (l, rpn) = sizes.encode(self.size.base_shift, self.size.actual_shift, pa)?;
        let h = if secondary { HPTE_V_SECONDARY } else { 0 };
        let pp = (pp & 3) | ((pp >> 2) << 63);
        Some(Hpte::new(self.va.avpn_v(self.size.actual_shift) | l | h | HPTE_V_VALID, rpn | HPTE_R_M | pp))
    }
}

/// Where [`insert`] put an entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Inserted {
    /// The slot (HPTE index).
    pub slot: u64,
    /// The entry as entered (H set when it went to the secondary group).
    pub hpte: Hpte,
    /// Whether the primary group was full.
    pub secondary: bool,
}

/// Enters the RAM mapping of `page` → `pa` with protection `pp` into the
/// first free slot of its primary group, or, when the platform answers
/// H_PTEG_FULL, of its secondary group with H set (the one's complement of
/// the hash). H_PARAMETER if the machine lacks the page size or `pa` is
/// misaligned; H_PTEG_FULL only when both groups are full.
pub fn insert<T: HashTable + ?Sized>(
    table: &mut T,
    page: &VirtPage,
    sizes: &PageSizes,
    pa: u64,
    pp: u64,
) -> Result<Inserted, HptError> {
    let mask = table.pteg_mask();
    let h = page.ram_hpte(sizes, pa, pp, false).ok_or(HptError::Parameter)?;
    match table.enter(page.group(mask, false) * 8, h, false) {
        Err(HptError::PtegFull) => {
            let h2 = page.ram_hpte(sizes, pa, pp, true).ok_or(HptError::Parameter)?;
            let slot = table.enter(page.group(mask, true) * 8, h2, false)?;
            Ok(Inserted { slot, hpte: h2, secondary: true })
        }
        other => other.map(|slot| Inserted { slot, hpte: h, secondary: false }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{HptGeometry, SegmentSize};
    use crate::hpte::{avpn_arg, pp, HpteFormat, HPTE_R_PP0, HPTE_R_WIMG, HPTE_V_B};
    use crate::table::InMemoryHpt;

    fn table() -> InMemoryHpt {
        InMemoryHpt::new(HptGeometry::from_pft_size(18).expect("ok"), HpteFormat::PreIsa300)
    }

    #[test]
    fn ram_hpte_sets_m_pp0_and_the_large_encoding() {
        let sizes = PageSizes::qemu_pseries_default();
        let va = VirtAddr::new(0x1234, SegmentSize::S1T, 0x0567_0000).expect("fits");
        let h = VirtPage::new(va, 16, 16).ram_hpte(&sizes, 0x40_0000, pp::R_NONE, true).expect("listed");
        assert_eq!(h.v & HPTE_V_B, 1 << 62, "B = 1 TB");
        assert!(h.valid() && h.secondary() && h.large());
        assert_eq!(h.r & HPTE_R_WIMG, HPTE_R_M);
        assert_eq!(h.r & HPTE_R_PP0, HPTE_R_PP0);
        assert_eq!(h.pp(), pp::R_NONE);
        assert_eq!(sizes.decode(h.v, h.r).map(|p| p.actual_shift), Some(16));
        assert_eq!(avpn_arg(h.v) & HPTE_V_B, 1 << 62, "the AVPN argument keeps B");
        assert!(VirtPage::new(va, 16, 16).ram_hpte(&sizes, 0x1000, 2, false).is_none(), "misaligned");
    }

    #[test]
    fn insert_overflows_into_the_secondary_group_and_search_finds_it() {
        let sizes = PageSizes::qemu_pseries_default();
        let mut t = table();
        let mask = t.pteg_mask();
        // Nine pages whose primary hash is the same group: VSID ^ page index constant.
        let pages: [VirtPage; 9] = core::array::from_fn(|i| {
            let vsid = 0x100 + i as u64;
            let ea = ((0x77 ^ vsid) & 0xffff) << 12;
            VirtPage::new(VirtAddr::new(vsid, SegmentSize::S256M, ea).expect("fits"), 12, 12)
        });
        for (i, p) in pages.iter().enumerate() {
            let ins = insert(&mut t, p, &sizes, (i as u64 + 1) << 12, pp::RW_RW).expect("room");
            assert_eq!(ins.secondary, i == 8);
            assert_eq!(ins.slot / 8, p.group(mask, i == 8));
        }
        for (i, p) in pages.iter().enumerate() {
            let f = search(mask, &sizes, &p.va, 12, |x| t.load(x)).expect("found");
            assert_eq!(f.real_address(&p.va), (i as u64 + 1) << 12);
            assert_eq!(f.hpte.secondary(), i == 8);
            // The wrong base size finds nothing.
            assert!(search(mask, &sizes, &p.va, 16, |x| t.load(x)).is_none());
        }
        // Both groups full for a tenth page of the same hash.
        for k in 0..7u64 {
            let vsid = 0x200 + k;
            let ea = (((!0x77u64 & mask) ^ vsid) & 0xffff) << 12;
            let p = VirtPage::new(VirtAddr::new(vsid, SegmentSize::S256M, ea).expect("fits"), 12, 12);
            insert(&mut t, &p, &sizes, 0x10_0000, pp::RW_RW).expect("room in its primary");
        }
        let vsid = 0x300;
        let ea = ((0x77 ^ vsid) & 0xffff) << 12;
        let p = VirtPage::new(VirtAddr::new(vsid, SegmentSize::S256M, ea).expect("fits"), 12, 12);
        assert_eq!(insert(&mut t, &p, &sizes, 0x2000, pp::RW_RW), Err(HptError::PtegFull));
    }

    #[test]
    fn search_ignores_va_bits_inside_a_16m_page() {
        let sizes = PageSizes::qemu_pseries_16m();
        let mut t = table();
        let va = VirtAddr::new(0x4321, SegmentSize::S256M, 0x0300_0000).expect("fits");
        let p = VirtPage::new(va, 24, 24);
        insert(&mut t, &p, &sizes, 0x0100_0000, pp::RW_RW).expect("room");
        let inside = VirtAddr::new(0x4321, SegmentSize::S256M, 0x03ab_c123).expect("fits");
        let f = search(t.pteg_mask(), &sizes, &inside, 24, |x| t.load(x)).expect("same 16M page");
        assert_eq!(f.real_address(&inside), 0x01ab_c123);
        let other = VirtAddr::new(0x4321, SegmentSize::S256M, 0x0400_0000).expect("fits");
        assert!(search(t.pteg_mask(), &sizes, &other, 24, |x| t.load(x)).is_none());
    }
}
