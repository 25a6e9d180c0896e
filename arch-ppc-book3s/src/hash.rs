//! The hash functions that place a virtual page in the table.
//!
//! Power ISA 2.07B Book III-S 5.7.7.2 "Page Table Search" (same in 3.0B):
//! with `b` the segment's base page size and `s` the segment size,
//!
//! * 256 MB segments: the low 39 bits of `vsid ^ (ea_offset >> b)`;
//! * 1 TB segments: the low 39 bits of `vsid ^ (vsid << 25) ^ (ea_offset >> b)`;
//! * the secondary hash is the one's complement of the primary;
//! * the PTEG index is `hash & pteg_mask`, the table holding `pteg_mask + 1`
//!   groups of eight 16-byte HPTEs.
//!
//! The AVPN kept in dword 0 is VA bits 0:54 (`VA >> 23`), with the bits that
//! fall inside a page of 16 MB or more ignored by the compare.

// The segment size is the B field of the HPTE format; kept there, named here too.
pub use crate::hpte::SegmentSize;
use crate::hpte::{HPTE_V_AVPN, HPTE_V_AVPN_SHIFT, HPTE_V_B_SHIFT};

/// The hash keeps 39 bits.
pub const HASH_MASK: u64 = (1 << 39) - 1;
/// `ibm,pft-size` values the table accepts: 2^18 bytes (the ISA minimum) to
/// 2^46 bytes (the largest HTABSIZE).
pub const MIN_HTAB_SHIFT: u32 = 18;
/// See [`MIN_HTAB_SHIFT`].
pub const MAX_HTAB_SHIFT: u32 = 46;

/// A virtual address: a VSID and the offset inside its segment.
///
/// The 78-bit virtual address does not fit a `u64`, so it is kept in parts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct VirtAddr {
    /// The virtual segment id.
    pub vsid: u64,
    /// The segment size.
    pub ssize: SegmentSize,
    /// Byte offset inside the segment (below `1 << ssize.shift()`).
    pub offset: u64,
}

impl VirtAddr {
    /// The address of `ea` in segment `vsid`, or `None` if the VSID is wider
    /// than the segment size allows.
    pub const fn new(vsid: u64, ssize: SegmentSize, ea: u64) -> Option<Self> {
        if vsid >> ssize.vsid_bits() != 0 {
            return None;
        }
        Some(Self { vsid, ssize, offset: ea & ((1u64 << ssize.shift()) - 1) })
    }

    /// The primary hash for a segment of base page size `1 << base_shift`.
    pub const fn hash(&self, base_shift: u32) -> u64 {
        let page = self.offset >> base_shift;
        let h = match self.ssize {
            SegmentSize::S256M => self.vsid ^ page,
            SegmentSize::S1T => self.vsid ^ (self.vsid << 25) ^ page,
        };
        h & HASH_MASK
    }

    /// VA bits 0:54 (`VA >> 23`), the AVPN before page-size masking.
    pub const fn va_high(&self) -> u64 {
        (self.vsid << (self.ssize.shift() - 23)) | (self.offset >> 23)
    }

    /// Dword 0's B and AVPN fields for a page of `1 << actual_shift` bytes:
    /// VA bits that lie inside the page are cleared (as Linux's
    /// `hpte_encode_avpn` and KVM's search do).
    pub const fn avpn_v(&self, actual_shift: u32) -> u64 {
        let avpn = self.va_high() & !avpn_ignored(actual_shift);
        ((avpn << HPTE_V_AVPN_SHIFT) & HPTE_V_AVPN) | (self.ssize.b() << HPTE_V_B_SHIFT)
    }

    /// The 64-bit virtual page number `VA >> 12`, or `None` when the VA needs
    /// more than 76 bits. Used as a key by the PR shadow cache.
    pub const fn vpn(&self) -> Option<u64> {
        let s = self.ssize.shift();
        if self.vsid >> (76 - s) != 0 {
            return None;
        }
        Some((self.vsid << (s - 12)) | (self.offset >> 12))
    }
}

/// The low AVPN bits the compare ignores for a page of `1 << shift` bytes.
pub const fn avpn_ignored(shift: u32) -> u64 {
    if shift > 23 {
        (1u64 << (shift - 23)) - 1
    } else {
        0
    }
}

/// The PTEG a hash selects: `(primary or complemented hash) & pteg_mask`.
pub const fn pteg_index(hash: u64, pteg_mask: u64, secondary: bool) -> u64 {
    if secondary {
        !hash & pteg_mask
    } else {
        hash & pteg_mask
    }
}

/// The table's size and mask.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HptGeometry {
    shift: u32,
}

impl HptGeometry {
    /// A table of `1 << shift` bytes (the second cell of `ibm,pft-size`), or
    /// `None` outside 2^18..=2^46 bytes.
    pub const fn from_pft_size(shift: u32) -> Option<Self> {
        if shift < MIN_HTAB_SHIFT || shift > MAX_HTAB_SHIFT {
            None
        } else {
            Some(Self { shift })
        }
    }

    /// log2 of the table's size in bytes.
    pub const fn shift(&self) -> u32 {
        self.shift
    }

    /// Number of PTEGs (128 bytes each).
    pub const fn ptegs(&self) -> u64 {
        1 << (self.shift - 7)
    }

    /// Number of HPTEs.
    pub const fn hptes(&self) -> u64 {
        1 << (self.shift - 4)
    }

    /// The PTEG index mask (`ptegs - 1`).
    pub const fn pteg_mask(&self) -> u64 {
        self.ptegs() - 1
    }

    /// Whether HPTE index `ptex` lies in the table.
    pub const fn contains(&self, ptex: u64) -> bool {
        ptex < self.hptes()
    }

    /// The index of the first HPTE of the PTEG `va` hashes to.
    pub const fn group_of(&self, va: &VirtAddr, base_shift: u32, secondary: bool) -> u64 {
        pteg_index(va.hash(base_shift), self.pteg_mask(), secondary) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_256m_is_vsid_xor_page_index() {
        // VSID 0x123456, EA offset 0x0abc_d000, 4K pages: page index 0xabcd.
        let va = VirtAddr::new(0x123456, SegmentSize::S256M, 0x1_0abc_d123).expect("fits");
        assert_eq!(va.offset, 0x0abc_d123);
        assert_eq!(va.hash(12), 0x123456 ^ 0xabcd);
        // 64K pages: page index 0xabc.
        assert_eq!(va.hash(16), 0x123456 ^ 0xabc);
        // 16M pages: page index 0xa.
        assert_eq!(va.hash(24), 0x123456 ^ 0xa);
    }

    #[test]
    fn hash_1t_folds_the_vsid_shifted_by_25() {
        let vsid = 0x3_ffff_ffff; // 34 bits
        let va = VirtAddr::new(vsid, SegmentSize::S1T, 0x12_3456_7000).expect("fits");
        let expect = (vsid ^ (vsid << 25) ^ 0x1234567) & HASH_MASK;
        assert_eq!(va.hash(12), expect);
    }

    #[test]
    fn hash_matches_linux_hpt_hash_on_the_vpn() {
        // Linux: hash = (vpn >> 16) ^ ((vpn & 0xffff) >> (shift - 12)) for 256M.
        let vsid = 0x0fed_cba9_8765u64;
        let ea = 0x0765_4321u64;
        let vpn = (vsid << 16) | (ea >> 12);
        let linux = ((vpn >> 16) ^ ((vpn & 0xffff) >> (16 - 12))) & HASH_MASK;
        let va = VirtAddr::new(vsid, SegmentSize::S256M, ea).expect("fits");
        assert_eq!(va.hash(16), linux);
        assert_eq!(va.vpn(), Some(vpn));
    }

    #[test]
    fn secondary_pteg_is_the_complement_under_the_mask() {
        assert_eq!(pteg_index(0x1234, 0x7fff, false), 0x1234);
        assert_eq!(pteg_index(0x1234, 0x7fff, true), 0x7fff ^ 0x1234);
        // Bits above the mask never leak in.
        assert_eq!(pteg_index(0x7f_ffff_ffff, 0xff, false), 0xff);
        assert_eq!(pteg_index(0x7f_ffff_ffff, 0xff, true), 0);
    }

    #[test]
    fn avpn_is_va_bits_0_to_54_with_large_page_bits_cleared() {
        let va = VirtAddr::new(0x123, SegmentSize::S256M, 0x0f80_0000).expect("fits");
        // VA >> 23 = (0x123 << 5) | 0x1f.
        assert_eq!(va.va_high(), (0x123 << 5) | 0x1f);
        assert_eq!(va.avpn_v(12), ((0x123 << 5) | 0x1f) << 7);
        // 16M page: VA bit 23 (the AVPN's lowest) is inside the page.
        assert_eq!(va.avpn_v(24), ((0x123 << 5) | 0x1e) << 7);
        let t = VirtAddr::new(0x5, SegmentSize::S1T, 0).expect("fits");
        assert_eq!(t.avpn_v(12), (1 << 62) | ((0x5 << 17) << 7));
    }

    #[test]
    fn vsid_wider_than_the_segment_allows_is_rejected() {
        assert!(VirtAddr::new(1 << 50, SegmentSize::S256M, 0).is_none());
        assert!(VirtAddr::new((1 << 50) - 1, SegmentSize::S256M, 0).is_some());
        assert!(VirtAddr::new(1 << 38, SegmentSize::S1T, 0).is_none());
    }

    #[test]
    fn geometry_follows_pft_size() {
        // QEMU: ibm,pft-size 0x16 at 512M gives PTEG mask 0x7fff.
        let g = HptGeometry::from_pft_size(0x16).expect("valid");
        assert_eq!(g.pteg_mask(), 0x7fff);
        assert_eq!(HptGeometry::from_pft_size(0x18).expect("valid").pteg_mask(), 0x1ffff);
        assert_eq!(g.hptes(), 0x40000);
        assert!(g.contains(0x3ffff) && !g.contains(0x40000));
        assert!(HptGeometry::from_pft_size(17).is_none());
        assert!(HptGeometry::from_pft_size(47).is_none());
    }
}
