//! Address and frame-number newtypes.
//!
//! A guest chooses most of these values, so arithmetic that can overflow is
//! checked and returns `Option`. Frame numbers count 4 KiB pages; addresses
//! count bytes. No bare `u64` crosses a crate boundary as an address.

use core::fmt;

/// log2 of the base page size every frame number counts in.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// Wraps a raw value.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - n`, or `None` on underflow.
            #[inline]
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// How far `self` lies above `base`, or `None` if it lies below.
            #[inline]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

newtype!(
    /// A guest frame number: a guest-physical address shifted right by 12.
    Gfn,
    "Gfn"
);
newtype!(
    /// A host frame number: a host-physical address shifted right by 12.
    Pfn,
    "Pfn"
);
newtype!(
    /// A guest-physical address.
    Gpa,
    "Gpa"
);
newtype!(
    /// A guest-virtual (effective) address.
    Gva,
    "Gva"
);
newtype!(
    /// A host-virtual address (the hypervisor's view of guest memory).
    Hva,
    "Hva"
);

/// `(1 << shift) - 1`, all ones for a shift of 64 or more: a caller-chosen
/// shift never overflows.
#[inline]
const fn low_mask(shift: u32) -> u64 {
    if shift >= 64 {
        u64::MAX
    } else {
        (1u64 << shift) - 1
    }
}

macro_rules! byte_address {
    ($name:ident) => {
        impl $name {
            /// The byte offset inside the 4 KiB page.
            #[inline]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// Rounds down to a multiple of `1 << shift` (to 0 for a shift of
            /// 64 or more).
            #[inline]
            pub const fn align_down(self, shift: u32) -> Self {
                Self(self.0 & !low_mask(shift))
            }

            /// Whether the address is a multiple of `1 << shift` (only 0 is,
            /// for a shift of 64 or more).
            #[inline]
            pub const fn is_aligned(self, shift: u32) -> bool {
                self.0 & low_mask(shift) == 0
            }
        }
    };
}

byte_address!(Gpa);
byte_address!(Gva);
byte_address!(Hva);

impl Gpa {
    /// The guest frame that holds this address.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl Gfn {
    /// The first byte of the frame, or `None` if it does not fit 64 bits.
    #[inline]
    pub const fn gpa(self) -> Option<Gpa> {
        if self.0 >> (64 - PAGE_SHIFT) != 0 {
            None
        } else {
            Some(Gpa(self.0 << PAGE_SHIFT))
        }
    }
}

impl Pfn {
    /// The first byte of the host frame, or `None` if it does not fit 64 bits.
    #[inline]
    pub const fn hpa(self) -> Option<u64> {
        if self.0 >> (64 - PAGE_SHIFT) != 0 {
            None
        } else {
            Some(self.0 << PAGE_SHIFT)
        }
    }
}

impl Hva {
    /// The host-virtual page number (`hva >> 12`).
    #[inline]
    pub const fn page(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

/// A half-open range of guest frames `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct GfnRange {
    /// First frame in the range.
    pub start: Gfn,
    /// First frame past the range.
    pub end: Gfn,
}

impl GfnRange {
    /// `[start, start + npages)`, or `None` on overflow.
    pub const fn from_len(start: Gfn, npages: u64) -> Option<Self> {
        match start.checked_add(npages) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Number of frames in the range (0 if `end <= start`).
    #[inline]
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the range holds no frame.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }

    /// Whether `gfn` lies in the range.
    #[inline]
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.start.0 && gfn.0 < self.end.0
    }

    /// Whether the two ranges share a frame.
    #[inline]
    pub const fn overlaps(&self, other: &GfnRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// The frames both ranges hold, or `None` if they are disjoint.
    pub fn intersect(&self, other: &GfnRange) -> Option<GfnRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(GfnRange { start, end })
    }
}

/// A half-open range of host-virtual addresses `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct HvaRange {
    /// First byte in the range.
    pub start: Hva,
    /// First byte past the range.
    pub end: Hva,
}

impl HvaRange {
    /// `[start, start + len)`, or `None` on overflow.
    pub const fn from_len(start: Hva, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    /// Whether the two ranges share a byte.
    #[inline]
    pub const fn overlaps(&self, other: &HvaRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// Whether the range holds no byte.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gfn_to_gpa_rejects_frames_that_do_not_fit_64_bits() {
        assert_eq!(Gfn(1).gpa(), Some(Gpa(0x1000)));
        assert_eq!(Gfn(1 << 52).gpa(), None);
        assert_eq!(Gfn((1 << 52) - 1).gpa(), Some(Gpa(0xffff_ffff_ffff_f000)));
    }

    #[test]
    fn alignment_with_any_shift_never_panics() {
        for shift in [0, 12, 63, 64, 65, u32::MAX] {
            let a = Gpa(0x1234_5000);
            let _ = a.align_down(shift);
            let _ = a.is_aligned(shift);
        }
        assert_eq!(Gpa(u64::MAX).align_down(64), Gpa(0));
        assert!(Gpa(0).is_aligned(u32::MAX));
        assert!(!Hva(1 << 63).is_aligned(64));
        assert_eq!(Hva(0x7fff).align_down(12), Hva(0x7000));
    }

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(Gfn(u64::MAX).checked_add(1), None);
        assert_eq!(Hva(0).checked_sub(1), None);
        assert_eq!(GfnRange::from_len(Gfn(u64::MAX - 1), 2), None);
        assert_eq!(Gfn(5).offset_from(Gfn(7)), None);
        assert_eq!(Gfn(7).offset_from(Gfn(5)), Some(2));
    }

    #[test]
    fn ranges_intersect_and_overlap_half_open() {
        let a = GfnRange { start: Gfn(0), end: Gfn(10) };
        let b = GfnRange { start: Gfn(10), end: Gfn(20) };
        assert!(!a.overlaps(&b));
        assert_eq!(a.intersect(&b), None);
        let c = GfnRange { start: Gfn(5), end: Gfn(15) };
        assert_eq!(a.intersect(&c), Some(GfnRange { start: Gfn(5), end: Gfn(10) }));
        assert_eq!(Gpa(0x1234).gfn(), Gfn(1));
        assert_eq!(Gpa(0x1234).page_offset(), 0x234);
        assert!(Hva(0x20_0000).is_aligned(21));
    }
}
