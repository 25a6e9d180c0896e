//! Page sizes and their SLB and HPTE encodings, as the device tree's
//! `ibm,segment-page-sizes` property describes them (LoPAPR "Segment page
//! sizes": for each segment base page size, its shift, its SLB L||LP
//! encoding, and the actual page sizes that segment may hold with their
//! HPTE LP encodings).
//!
//! An HPTE with L = 0 maps a 4 KiB page. With L = 1 the page size is in the
//! low bits of dword 1's RPN field: for an actual page of `1 << s` bytes, RPN
//! bits `12..s` hold the encoding (Power ISA 2.07B Book III-S 5.7.7.1,
//! "LP" encodings; QEMU's `hpte_page_shift`, Linux's `hpte_encode_r`).
//! Mixed sizes (a 4 KiB base segment holding a 16 MiB page, encoding 0x38)
//! come from the same table.
//!
//! Read the property; never hard-code it. [`PageSizes::qemu_pseries_default`]
//! and [`PageSizes::qemu_pseries_16m`] are what QEMU 7.2's pseries machine
//! publishes, for tests.

use crate::hpte::{HPTE_R_RPN, HPTE_R_RPN_SHIFT, HPTE_V_LARGE};

/// Segment base sizes a description may hold.
pub const MAX_SEGMENT_SIZES: usize = 8;
/// Actual page sizes per segment base size.
pub const MAX_ENCODINGS: usize = 8;
/// SLB VSID-word bits that carry the base page size (L and LP).
pub const SLB_LLP_MASK: u32 = 0x130;
/// Largest page shift accepted (16 GiB pages).
pub const MAX_PAGE_SHIFT: u32 = 34;

/// One actual page size a segment may hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageEncoding {
    /// log2 of the page size.
    pub shift: u32,
    /// The LP value stored in RPN bits `12..shift` (ignored for 4 KiB pages).
    pub pte_enc: u32,
}

/// One segment base page size and what it can hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SegmentPageSize {
    /// log2 of the base page size (what the hash uses).
    pub base_shift: u32,
    /// The SLB VSID-word L||LP bits selecting it (0x000, 0x110, 0x100, ...).
    pub slb_enc: u32,
    encs: [PageEncoding; MAX_ENCODINGS],
    n: usize,
}

impl SegmentPageSize {
    /// The actual page sizes the segment may hold.
    pub fn encodings(&self) -> &[PageEncoding] {
        &self.encs[..self.n]
    }

    /// The encoding of actual size `1 << shift` in this segment.
    pub fn encoding(&self, shift: u32) -> Option<PageEncoding> {
        self.encodings().iter().copied().find(|e| e.shift == shift)
    }

    /// Whether an HPTE's L bit and dword 1 name a page of this segment;
    /// returns its actual shift.
    fn decode(&self, v: u64, r: u64) -> Option<u32> {
        if v & HPTE_V_LARGE == 0 {
            return (self.base_shift == 12 && self.encoding(12).is_some()).then_some(12);
        }
        self.encodings().iter().find_map(|e| {
            if e.shift == 12 {
                return None;
            }
            let mask = ((1u64 << e.shift) - 1) & HPTE_R_RPN;
            (r & mask == (e.pte_enc as u64) << HPTE_R_RPN_SHIFT).then_some(e.shift)
        })
    }
}

/// The base and actual page size of one HPTE.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PageSizePair {
    /// log2 of the segment's base page size (hash and AVPN use it).
    pub base_shift: u32,
    /// log2 of the page the entry maps.
    pub actual_shift: u32,
}

impl PageSizePair {
    /// Number of 4 KiB frames the page covers.
    pub const fn npages(&self) -> u64 {
        1 << (self.actual_shift - 12)
    }
}

/// Why an `ibm,segment-page-sizes` description was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageSizeError {
    /// The cells end in the middle of an entry.
    Truncated,
    /// More segment sizes or encodings than this crate keeps.
    TooMany,
    /// A page shift below 12, above [`MAX_PAGE_SHIFT`], or an actual size
    /// below its segment's base size.
    BadShift(u32),
    /// An SLB encoding with bits outside L||LP, or L = 0 for a large base.
    BadSlbEncoding(u32),
    /// An LP encoding that does not fit below the page size.
    BadPteEncoding {
        /// The actual page shift.
        shift: u32,
        /// The encoding.
        enc: u32,
    },
}

/// A machine's page sizes: the parsed `ibm,segment-page-sizes`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageSizes {
    segs: [SegmentPageSize; MAX_SEGMENT_SIZES],
    n: usize,
    /// What [`PageSizes::decode`] answers for every entry with L = 0 (a
    /// 4 KiB page, or nothing if the machine lacks it): the answer depends
    /// on the table alone, so it is worked out once, when the table is built.
    small: Option<PageSizePair>,
}

impl PageSizes {
    /// Parses the property's cells (already converted from big-endian).
    pub fn from_cells(cells: &[u32]) -> Result<Self, PageSizeError> {
        let mut out = PageSizes::default();
        let mut it = cells.iter().copied();
        while let Some(base_shift) = it.next() {
            let slb_enc = it.next().ok_or(PageSizeError::Truncated)?;
            let count = it.next().ok_or(PageSizeError::Truncated)? as usize;
            if !(12..=MAX_PAGE_SHIFT).contains(&base_shift) {
                return Err(PageSizeError::BadShift(base_shift));
            }
            if slb_enc & !SLB_LLP_MASK != 0 || (base_shift != 12) != (slb_enc & 0x100 != 0) {
                return Err(PageSizeError::BadSlbEncoding(slb_enc));
            }
            if out.n == MAX_SEGMENT_SIZES || count > MAX_ENCODINGS {
                return Err(PageSizeError::TooMany);
            }
            let mut seg = SegmentPageSize { base_shift, slb_enc, ..Default::default() };
            for _ in 0..count {
                let shift = it.next().ok_or(PageSizeError::Truncated)?;
                let enc = it.next().ok_or(PageSizeError::Truncated)?;
                if shift < base_shift || shift > MAX_PAGE_SHIFT {
                    return Err(PageSizeError::BadShift(shift));
                }
                // The encoding lives in RPN bits 12..shift (at most 8 LP bits).
                let room = (shift - 12).min(8);
                if (shift == 12 && enc != 0) || (enc as u64) >> room != 0 {
                    return Err(PageSizeError::BadPteEncoding { shift, enc });
                }
                seg.encs[seg.n] = PageEncoding { shift, pte_enc: enc };
                seg.n += 1;
            }
            out.segs[out.n] = seg;
            out.n += 1;
        }
        out.small = out.decode_scan(0, 0);
        Ok(out)
    }

    /// Parses the property's raw big-endian bytes.
    pub fn from_be_bytes(bytes: &[u8]) -> Result<Self, PageSizeError> {
        if bytes.len() % 4 != 0 {
            return Err(PageSizeError::Truncated);
        }
        let mut cells = [0u32; 3 * MAX_SEGMENT_SIZES + 2 * MAX_SEGMENT_SIZES * MAX_ENCODINGS];
        let n = bytes.len() / 4;
        if n > cells.len() {
            return Err(PageSizeError::TooMany);
        }
        for (c, b) in cells.iter_mut().zip(bytes.chunks_exact(4)) {
            *c = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        }
        Self::from_cells(&cells[..n])
    }

    /// QEMU 7.2 pseries default: 4K segment [4K: 0], 64K segment (SLB 0x110) [64K: 1].
    pub fn qemu_pseries_default() -> Self {
        Self::from_cells(&[12, 0, 1, 12, 0, 16, 0x110, 1, 16, 1]).expect("well-formed")
    }

    /// QEMU 7.2 pseries with `cap-hpt-max-page-size=16M`: 4K segment [4K 0,
    /// 16M 0x38], 64K segment [64K 1, 16M 0x8], 16M segment (SLB 0x100) [16M 0].
    pub fn qemu_pseries_16m() -> Self {
        Self::from_cells(&[12, 0, 2, 12, 0, 24, 0x38, 16, 0x110, 2, 16, 1, 24, 0x8, 24, 0x100, 1, 24, 0])
            .expect("well-formed")
    }

    /// The segment base sizes.
    pub fn segments(&self) -> &[SegmentPageSize] {
        &self.segs[..self.n]
    }

    /// The segment of base size `1 << base_shift`.
    pub fn segment(&self, base_shift: u32) -> Option<&SegmentPageSize> {
        self.segments().iter().find(|s| s.base_shift == base_shift)
    }

    /// The segment an SLB VSID word's L||LP bits select.
    pub fn segment_for_slb(&self, vsid_word: u64) -> Option<&SegmentPageSize> {
        let llp = (vsid_word & SLB_LLP_MASK as u64) as u32;
        self.segments().iter().find(|s| s.slb_enc == llp)
    }

    /// The base and actual page size of an HPTE (pre-3.0 dword 0, dword 1),
    /// or `None` for an encoding the machine does not have. The first
    /// segment whose encoding matches wins, as on QEMU.
    #[inline]
    pub fn decode(&self, v: u64, r: u64) -> Option<PageSizePair> {
        if v & HPTE_V_LARGE == 0 {
            return self.small;
        }
        self.decode_scan(v, r)
    }

    /// [`PageSizes::decode`] by a scan of every segment's encodings.
    fn decode_scan(&self, v: u64, r: u64) -> Option<PageSizePair> {
        self.segments().iter().find_map(|s| {
            s.decode(v, r).map(|actual_shift| PageSizePair { base_shift: s.base_shift, actual_shift })
        })
    }

    /// The L bit and the dword-1 RPN/LP bits for a page of actual size
    /// `1 << actual_shift` at real address `pa` in a segment of base size
    /// `1 << base_shift`: `(v_bits, r_bits)`. `None` if the machine lacks the
    /// combination or `pa` is misaligned.
    pub fn encode(&self, base_shift: u32, actual_shift: u32, pa: u64) -> Option<(u64, u64)> {
        let e = self.segment(base_shift)?.encoding(actual_shift)?;
        if pa & ((1u64 << actual_shift) - 1) != 0 || pa & !HPTE_R_RPN & !0xfff != 0 {
            return None;
        }
        if actual_shift == 12 {
            return Some((0, pa));
        }
        Some((HPTE_V_LARGE, pa | ((e.pte_enc as u64) << HPTE_R_RPN_SHIFT)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_default_property_bytes() {
        let cells: [u32; 10] = [12, 0, 1, 12, 0, 16, 0x110, 1, 16, 1];
        let mut bytes = [0u8; 40];
        for (b, c) in bytes.chunks_exact_mut(4).zip(cells) {
            b.copy_from_slice(&c.to_be_bytes());
        }
        let ps = PageSizes::from_be_bytes(&bytes).expect("valid");
        assert_eq!(ps, PageSizes::qemu_pseries_default());
        assert_eq!(ps.segments().len(), 2);
        assert_eq!(ps.segment_for_slb(0x110 | (0x1234 << 12)).map(|s| s.base_shift), Some(16));
        assert_eq!(ps.segment_for_slb(0).map(|s| s.base_shift), Some(12));
        assert!(ps.segment_for_slb(0x100).is_none());
    }

    #[test]
    fn decodes_4k_64k_and_mixed_16m() {
        let ps = PageSizes::qemu_pseries_16m();
        let pair = |b, a| Some(PageSizePair { base_shift: b, actual_shift: a });
        assert_eq!(ps.decode(0, 0x1234_5000), pair(12, 12));
        assert_eq!(ps.decode(HPTE_V_LARGE, 0x1234_1000), pair(16, 16));
        // 16M in a 4K segment: LP 0x38.
        assert_eq!(ps.decode(HPTE_V_LARGE, 0x0100_0000 | (0x38 << 12)), pair(12, 24));
        // 16M in a 64K segment: LP 0x8.
        assert_eq!(ps.decode(HPTE_V_LARGE, 0x0100_0000 | (0x8 << 12)), pair(16, 24));
        // 16M in a 16M segment: LP 0.
        assert_eq!(ps.decode(HPTE_V_LARGE, 0x0100_0000), pair(24, 24));
        // An encoding nobody listed.
        assert_eq!(ps.decode(HPTE_V_LARGE, 0x0100_0000 | (0x3 << 12)), None);
        // Without the 16M cap, a 16M encoding is refused.
        assert_eq!(PageSizes::qemu_pseries_default().decode(HPTE_V_LARGE, 0x0100_0000), None);
    }

    #[test]
    fn small_page_decode_answers_what_the_scan_does() {
        let tables = [
            PageSizes::qemu_pseries_default(),
            PageSizes::qemu_pseries_16m(),
            // No 4 KiB segment: an L = 0 entry names no page.
            PageSizes::from_cells(&[16, 0x110, 1, 16, 1]).expect("well-formed"),
            // A 4 KiB segment that holds only 16 MiB pages.
            PageSizes::from_cells(&[12, 0, 1, 24, 0x38]).expect("well-formed"),
            // The 4 KiB segment listed after the 64 KiB one.
            PageSizes::from_cells(&[16, 0x110, 1, 16, 1, 12, 0, 1, 12, 0]).expect("well-formed"),
            PageSizes::default(),
        ];
        let expect = [Some(12), Some(12), None, None, Some(12), None];
        for (t, want) in tables.iter().zip(expect) {
            let mut r = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..64 {
                r = r.rotate_left(17).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let v = r & !HPTE_V_LARGE;
                assert_eq!(t.decode(v, r), t.decode_scan(v, r), "{t:?} v {v:#x} r {r:#x}");
                assert_eq!(t.decode(v, r).map(|p| p.actual_shift), want, "{t:?}");
            }
        }
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let ps = PageSizes::qemu_pseries_16m();
        for seg in ps.segments() {
            for e in seg.encodings() {
                let pa = 0x4_0000_0000u64;
                let (l, r) = ps.encode(seg.base_shift, e.shift, pa).expect("listed");
                let got = ps.decode(l, r).expect("decodes");
                assert_eq!(got.actual_shift, e.shift);
                assert_eq!(r & HPTE_R_RPN & !((1u64 << e.shift) - 1), pa);
            }
        }
        assert_eq!(ps.encode(16, 16, 0x1000), None, "misaligned");
        assert_eq!(ps.encode(16, 12, 0), None, "not listed");
    }

    #[test]
    fn malformed_descriptions_are_refused() {
        assert_eq!(PageSizes::from_cells(&[12, 0]), Err(PageSizeError::Truncated));
        assert_eq!(PageSizes::from_cells(&[12, 0, 1, 12]), Err(PageSizeError::Truncated));
        assert_eq!(PageSizes::from_cells(&[11, 0, 0]), Err(PageSizeError::BadShift(11)));
        assert_eq!(PageSizes::from_cells(&[16, 0x1, 0]), Err(PageSizeError::BadSlbEncoding(1)));
        assert_eq!(PageSizes::from_cells(&[16, 0, 0]), Err(PageSizeError::BadSlbEncoding(0)));
        assert_eq!(PageSizes::from_cells(&[16, 0x110, 1, 12, 0]), Err(PageSizeError::BadShift(12)));
        assert_eq!(
            PageSizes::from_cells(&[16, 0x110, 1, 16, 0x10]),
            Err(PageSizeError::BadPteEncoding { shift: 16, enc: 0x10 })
        );
        assert_eq!(PageSizes::from_be_bytes(&[0, 0, 0]), Err(PageSizeError::Truncated));
    }
}
