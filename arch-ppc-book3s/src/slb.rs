//! Segment lookaside buffer entries and the lookup of an effective address.
//!
//! An entry is the pair of words `slbmte RS, RB` takes (Power ISA 2.07B Book
//! III-S 5.7.7.1 / 5.9.3.x "slbmte"):
//!
//! * RB (ESID word): ESID in bits 0:35 (EA bits 0:35, or 0:23 for 1 TB),
//!   V in bit 36 (`0x0800_0000`), the SLB index in bits 52:63;
//! * RS (VSID word): B in bits 0:1, VSID from bit 2 (shifted left 12 for
//!   256 MB, 24 for 1 TB), Ks `0x800`, Kp `0x400`, N `0x200`, L `0x100`,
//!   C `0x80`, LP `0x30`.

use crate::hash::{SegmentSize, VirtAddr};
use crate::pagesize::{PageSizes, SegmentPageSize, SLB_LLP_MASK};

/// ESID word: V, the entry is valid.
pub const SLB_ESID_V: u64 = 0x0800_0000;
/// ESID word: the SLB index field.
pub const SLB_ESID_INDEX: u64 = 0xfff;
/// VSID word: the B field.
pub const SLB_VSID_B: u64 = 0xc000_0000_0000_0000;
/// VSID word: shift of the B field.
pub const SLB_VSID_B_SHIFT: u32 = 62;
/// VSID word: shift of a 256 MB segment's VSID.
pub const SLB_VSID_SHIFT_256M: u32 = 12;
/// VSID word: shift of a 1 TB segment's VSID.
pub const SLB_VSID_SHIFT_1T: u32 = 24;

bitflags::bitflags! {
    /// The key, no-execute and class bits of an SLB VSID word.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
    pub struct SlbFlags: u64 {
        /// Ks: supervisor-state storage key.
        const KS = 0x800;
        /// Kp: problem-state storage key.
        const KP = 0x400;
        /// N: no-execute segment.
        const N = 0x200;
        /// C: class (for `slbie` selection).
        const C = 0x80;
    }
}

/// Why an SLB entry could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlbError {
    /// The VSID does not fit the segment size's field.
    VsidTooWide(u64),
    /// The machine has no segment with this base page size.
    NoSuchBasePageSize(u32),
    /// The index does not fit the 12-bit field.
    IndexTooLarge(u64),
}

/// One SLB entry, as the two `slbmte` operands.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct SlbEntry {
    /// RB: ESID, V and index.
    pub esid_word: u64,
    /// RS: B, VSID, Ks, Kp, N, L, C, LP.
    pub vsid_word: u64,
}

impl SlbEntry {
    /// A valid entry mapping the segment holding `ea` to `vsid`, with the
    /// base page size `1 << base_shift` encoded as `sizes` describes.
    pub fn new(
        ea: u64,
        vsid: u64,
        ssize: SegmentSize,
        base_shift: u32,
        flags: SlbFlags,
        index: u64,
        sizes: &PageSizes,
    ) -> Result<Self, SlbError> {
        if vsid >> ssize.vsid_bits() != 0 {
            return Err(SlbError::VsidTooWide(vsid));
        }
        if index > SLB_ESID_INDEX {
            return Err(SlbError::IndexTooLarge(index));
        }
        let seg = sizes.segment(base_shift).ok_or(SlbError::NoSuchBasePageSize(base_shift))?;
        let esid = ea & !((1u64 << ssize.shift()) - 1);
        let vsid_shift = match ssize {
            SegmentSize::S256M => SLB_VSID_SHIFT_256M,
            SegmentSize::S1T => SLB_VSID_SHIFT_1T,
        };
        Ok(Self {
            esid_word: esid | SLB_ESID_V | index,
            vsid_word: (ssize.b() << SLB_VSID_B_SHIFT)
                | (vsid << vsid_shift)
                | flags.bits()
                | seg.slb_enc as u64,
        })
    }

    /// V: the entry is valid.
    pub const fn valid(&self) -> bool {
        self.esid_word & SLB_ESID_V != 0
    }

    /// The segment size, `None` for a reserved B.
    pub const fn segment_size(&self) -> Option<SegmentSize> {
        SegmentSize::from_b(self.vsid_word >> SLB_VSID_B_SHIFT)
    }

    /// The VSID.
    pub fn vsid(&self) -> Option<u64> {
        Some(match self.segment_size()? {
            SegmentSize::S256M => (self.vsid_word & !SLB_VSID_B) >> SLB_VSID_SHIFT_256M,
            SegmentSize::S1T => (self.vsid_word & !SLB_VSID_B) >> SLB_VSID_SHIFT_1T,
        })
    }

    /// The segment's first effective address.
    pub fn esid_base(&self) -> Option<u64> {
        let s = self.segment_size()?.shift();
        Some(self.esid_word & !((1u64 << s) - 1))
    }

    /// The index field of the ESID word.
    pub const fn index(&self) -> u64 {
        self.esid_word & SLB_ESID_INDEX
    }

    /// Ks, Kp, N and C.
    pub const fn flags(&self) -> SlbFlags {
        SlbFlags::from_bits_truncate(self.vsid_word)
    }

    /// The L||LP bits.
    pub const fn llp(&self) -> u64 {
        self.vsid_word & SLB_LLP_MASK as u64
    }

    /// The segment page size entry the L||LP bits select.
    pub fn page_size<'a>(&self, sizes: &'a PageSizes) -> Option<&'a SegmentPageSize> {
        sizes.segment_for_slb(self.vsid_word)
    }

    /// Whether the valid entry covers `ea`.
    pub fn matches(&self, ea: u64) -> bool {
        match (self.valid(), self.segment_size()) {
            (true, Some(ss)) => (ea ^ self.esid_word) >> ss.shift() == 0,
            _ => false,
        }
    }
}

/// The translation of an effective address to a virtual address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SegmentTranslation {
    /// The virtual address.
    pub va: VirtAddr,
    /// log2 of the segment's base page size.
    pub base_shift: u32,
    /// The entry's Ks, Kp, N, C.
    pub flags: SlbFlags,
}

/// A software SLB of `N` entries.
#[derive(Clone, Copy, Debug)]
pub struct Slb<const N: usize = 64> {
    entries: [SlbEntry; N],
}

impl<const N: usize> Default for Slb<N> {
    fn default() -> Self {
        Self { entries: [SlbEntry::default(); N] }
    }
}

impl<const N: usize> Slb<N> {
    /// An SLB with every entry invalid.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `e` at its index (as `slbmte` does); `None` if the index is out of range.
    /// An entry whose segment another valid entry already covers replaces nothing:
    /// it is refused with `None`, since the ISA leaves overlapping entries undefined.
    pub fn insert(&mut self, e: SlbEntry) -> Option<()> {
        let idx = e.index() as usize;
        if idx >= N {
            return None;
        }
        if e.valid() {
            let base = e.esid_base()?;
            let size = 1u64 << e.segment_size()?.shift();
            let clash = self.entries.iter().enumerate().any(|(i, o)| {
                i != idx && o.valid() && {
                    let (ob, os) = match (o.esid_base(), o.segment_size()) {
                        (Some(b), Some(s)) => (b, 1u64 << s.shift()),
                        _ => return false,
                    };
                    base < ob.wrapping_add(os) && ob < base.wrapping_add(size)
                }
            });
            if clash {
                return None;
            }
        }
        self.entries[idx] = e;
        Some(())
    }

    /// Invalidates every entry covering `ea` (as `slbie` does).
    pub fn invalidate(&mut self, ea: u64) {
        for e in self.entries.iter_mut().filter(|e| e.matches(ea)) {
            e.esid_word &= !SLB_ESID_V;
        }
    }

    /// The valid entry that covers `ea`.
    pub fn lookup(&self, ea: u64) -> Option<&SlbEntry> {
        self.entries.iter().find(|e| e.matches(ea))
    }

    /// Translates `ea` to its virtual address and segment page size.
    pub fn translate(&self, ea: u64, sizes: &PageSizes) -> Option<SegmentTranslation> {
        let e = self.lookup(ea)?;
        let ss = e.segment_size()?;
        let va = VirtAddr::new(e.vsid()?, ss, ea)?;
        let base_shift = e.page_size(sizes)?.base_shift;
        Some(SegmentTranslation { va, base_shift, flags: e.flags() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_words_follow_slbmte_layout() {
        let ps = PageSizes::qemu_pseries_default();
        let e = SlbEntry::new(0xc000_0000_1234_5678, 0x1_2345, SegmentSize::S256M, 16, SlbFlags::KP, 3, &ps)
            .expect("valid");
        assert_eq!(e.esid_word, 0xc000_0000_1000_0000 | SLB_ESID_V | 3);
        assert_eq!(e.vsid_word, (0x1_2345 << 12) | 0x400 | 0x110);
        assert_eq!(e.vsid(), Some(0x1_2345));
        assert_eq!(e.flags(), SlbFlags::KP);
        assert_eq!(e.llp(), 0x110);
        assert_eq!(e.page_size(&ps).map(|s| s.base_shift), Some(16));

        let t = SlbEntry::new(0x0000_0300_0000_0000, 0x77, SegmentSize::S1T, 12, SlbFlags::empty(), 0, &ps)
            .expect("valid");
        assert_eq!(t.vsid_word, (1 << 62) | (0x77 << 24));
        assert_eq!(t.esid_word, 0x0000_0300_0000_0000 | SLB_ESID_V);
        assert_eq!(t.vsid(), Some(0x77));
        assert!(SlbEntry::new(0, 1 << 38, SegmentSize::S1T, 12, SlbFlags::empty(), 0, &ps).is_err());
        assert_eq!(
            SlbEntry::new(0, 1, SegmentSize::S256M, 24, SlbFlags::empty(), 0, &ps),
            Err(SlbError::NoSuchBasePageSize(24))
        );
    }

    #[test]
    fn lookup_finds_the_segment_and_translates() {
        let ps = PageSizes::qemu_pseries_default();
        let mut slb: Slb<8> = Slb::new();
        let e0 = SlbEntry::new(0x1000_0000, 0x42, SegmentSize::S256M, 12, SlbFlags::KP, 0, &ps).expect("ok");
        let e1 = SlbEntry::new(1 << 40, 0x43, SegmentSize::S1T, 16, SlbFlags::empty(), 1, &ps).expect("ok");
        slb.insert(e0).expect("fits");
        slb.insert(e1).expect("fits");
        let t = slb.translate(0x1234_5678, &ps).expect("mapped");
        assert_eq!(t.va, VirtAddr { vsid: 0x42, ssize: SegmentSize::S256M, offset: 0x0234_5678 });
        assert_eq!(t.base_shift, 12);
        let t = slb.translate((1 << 40) + 0x1234_5678, &ps).expect("mapped");
        assert_eq!(t.va.offset, 0x1234_5678);
        assert_eq!(t.base_shift, 16);
        assert!(slb.lookup(0x2000_0000).is_none());
        // An overlapping 256M entry inside the 1T segment is refused.
        let clash =
            SlbEntry::new(1 << 40, 0x44, SegmentSize::S256M, 12, SlbFlags::empty(), 2, &ps).expect("ok");
        assert!(slb.insert(clash).is_none());
        slb.invalidate(0x1000_0000);
        assert!(slb.lookup(0x1234_5678).is_none());
    }
}
