//! Nested page-table formats: what the TDP engine and the software walker
//! need to know about an entry, written once per format.
//!
//! Section numbers follow the Intel SDM (order no. 325462, 2023 editions:
//! Vol. 3A chapter 4 for paging, Vol. 3C chapter 29 for EPT) and the AMD APM
//! Vol. 2 (rev. 3.4x: chapter 5 for long-mode paging, §15.25 for nested
//! paging).
//!
//! Levels are numbered as the manuals' tables are: 1 is the page table (PTE,
//! 4 KiB leaves), 2 the page directory (2 MiB leaves), 3 the page-directory
//! pointer table (1 GiB leaves), 4 the PML4 and 5 the PML5.

pub mod ept;
pub mod npt;

use core::fmt;

use mmu_generic::addr::Pfn;

// `Access` lives with the exits, which decode to it; format builds on both.
pub use crate::exit::Access;
use crate::exit::{NestedExit, Origin};

/// Entries per table: every x86 paging structure is 4 KiB of 8-byte entries.
pub const ENTRIES: usize = 512;

/// Bits of the guest-physical address each level translates.
pub const LEVEL_BITS: u32 = 9;

/// A page size a leaf can map.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// 4 KiB, a PTE (level 1).
    Size4K,
    /// 2 MiB, a PDE with the page-size / large-page bit (level 2).
    Size2M,
    /// 1 GiB, a PDPTE with the page-size / large-page bit (level 3).
    Size1G,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// Number of 4 KiB frames the page covers.
    pub const fn frames(self) -> u64 {
        1 << (self.shift() - 12)
    }

    /// The table level whose entries map pages of this size.
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The size a leaf at `level` maps, `None` above level 3.
    pub const fn at_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// The next smaller size, `None` for 4 KiB.
    pub const fn smaller(self) -> Option<PageSize> {
        match self {
            PageSize::Size4K => None,
            PageSize::Size2M => Some(PageSize::Size4K),
            PageSize::Size1G => Some(PageSize::Size2M),
        }
    }
}

/// log2 of the bytes one entry of `level` covers.
#[inline]
pub const fn level_shift(level: u8) -> u32 {
    12 + LEVEL_BITS * (level as u32 - 1)
}

/// Number of 4 KiB frames one entry of `level` covers.
#[inline]
pub const fn level_frames(level: u8) -> u64 {
    1 << (LEVEL_BITS * (level as u32 - 1))
}

/// The index into a table of `level` that translates guest frame `gfn`.
#[inline]
pub const fn level_index(gfn: u64, level: u8) -> usize {
    ((gfn >> (LEVEL_BITS * (level as u32 - 1))) & (ENTRIES as u64 - 1)) as usize
}

/// The page-walk length: how many levels translate a guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalkLength {
    /// PML4 root, 48-bit guest-physical addresses.
    Four,
    /// PML5 root, 57-bit guest-physical addresses (SDM Vol. 3C §29.3.2; APM
    /// Vol. 2 §5.3 for 5-level paging, which nested paging follows).
    Five,
}

impl WalkLength {
    /// The level of the root table (4 or 5).
    pub const fn levels(self) -> u8 {
        match self {
            WalkLength::Four => 4,
            WalkLength::Five => 5,
        }
    }

    /// Number of guest-physical address bits translated (48 or 57).
    pub const fn gpa_bits(self) -> u32 {
        level_shift(self.levels()) + LEVEL_BITS
    }

    /// Whether guest frame `gfn` lies inside the translated address space.
    pub const fn covers(self, gfn: u64) -> bool {
        gfn >> (self.gpa_bits() - 12) == 0
    }
}

/// The processor's physical-address width (CPUID.80000008H:EAX\[7:0\],
/// "MAXPHYADDR", SDM Vol. 3A §4.1.4; APM Vol. 2 §5.3.1), from 36 to 52 bits.
///
/// Address bits of an entry at and above this width are reserved: an entry
/// with one of them set causes an EPT misconfiguration (SDM Vol. 3C
/// §29.3.3.1) or a nested page fault with RSV set (APM Vol. 2 §15.25.6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PhysAddrWidth(u8);

/// The width is outside 36..=52.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadPhysAddrWidth(pub u8);

impl fmt::Display for BadPhysAddrWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MAXPHYADDR {} is outside 36..=52", self.0)
    }
}

impl PhysAddrWidth {
    /// The architectural maximum, 52 bits.
    pub const MAX: PhysAddrWidth = PhysAddrWidth(52);

    /// A width of `bits` bits.
    pub const fn new(bits: u8) -> Result<Self, BadPhysAddrWidth> {
        if bits < 36 || bits > 52 {
            Err(BadPhysAddrWidth(bits))
        } else {
            Ok(PhysAddrWidth(bits))
        }
    }

    /// The number of bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The address field of an entry: bits `MAXPHYADDR-1:12`.
    pub const fn addr_mask(self) -> u64 {
        ((1u64 << self.0) - 1) & !0xfff
    }

    /// Bits `51:MAXPHYADDR`, reserved in every entry.
    pub const fn reserved_mask(self) -> u64 {
        ((1u64 << 52) - 1) & !((1u64 << self.0) - 1)
    }

    /// Whether host frame `pfn` is addressable.
    pub const fn fits(self, pfn: Pfn) -> bool {
        pfn.0 >> (self.0 - 12) == 0
    }
}

/// Why the walker stopped: the architectural cause, before a format encodes
/// it as an exit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalkFault {
    /// The entry at `level` is not present.
    NotPresent {
        /// Level of the entry.
        level: u8,
    },
    /// Every entry was present but together they deny the access; `allowed`
    /// is what they permit (the AND over the walk).
    Permission {
        /// What the entries together permit.
        allowed: Access,
    },
    /// The entry at `level` has a reserved bit set or an illegal combination
    /// (EPT misconfiguration; NPT RSV).
    Reserved {
        /// Level of the entry.
        level: u8,
    },
    /// The guest-physical address has bits above what the walk translates.
    AddressTooWide,
}

/// A nested page-table format, as the TDP engine and the walker use it.
///
/// Entries are plain `u64` values; the engine reads and updates them through
/// atomics. Every method is pure.
pub trait TdpFormat: Clone + fmt::Debug {
    /// The page-walk length.
    fn walk_length(&self) -> WalkLength;

    /// The physical-address width entries are checked against.
    fn phys_width(&self) -> PhysAddrWidth;

    /// The largest leaf the processor supports (1 GiB when the CPU reports it).
    fn largest_page(&self) -> PageSize;

    /// The accessed bit, 0 if the hardware records none.
    fn accessed_mask(&self) -> u64;

    /// The dirty bit, 0 if the hardware records none.
    fn dirty_mask(&self) -> u64;

    /// Whether a present entry exists (any level).
    fn is_present(&self, e: u64) -> bool;

    /// Whether a present entry at `level` maps a page rather than a table.
    fn is_leaf(&self, e: u64, level: u8) -> bool;

    /// A non-leaf entry pointing to the table in frame `table`, granting
    /// every access (the leaf decides).
    fn table_entry(&self, table: Pfn) -> u64;

    /// A leaf of `size` mapping host frame `pfn` with `access` (A and D clear).
    fn leaf_entry(&self, pfn: Pfn, size: PageSize, access: Access) -> u64;

    /// The frame a present entry at `level` points to (for a leaf, its first
    /// frame).
    fn entry_pfn(&self, e: u64, level: u8) -> Pfn;

    /// What a present leaf permits.
    fn leaf_access(&self, e: u64) -> Access;

    /// The leaf with its permissions replaced, everything else kept.
    fn with_leaf_access(&self, e: u64, access: Access) -> u64;

    /// Leaf `i` of the table that replaces huge leaf `huge` of `size`: same
    /// permissions, attributes and A/D, the `i`-th smaller page.
    fn split_child(&self, huge: u64, size: PageSize, i: usize) -> u64;

    /// The access-tracked form of a present leaf (not present, restorable),
    /// or `None` if the format does not use access tracking.
    fn to_tracked(&self, e: u64) -> Option<u64>;

    /// Whether a not-present entry is an access-tracked leaf.
    fn is_tracked(&self, e: u64) -> bool;

    /// The permissions an access-tracked leaf will get back.
    fn tracked_access(&self, e: u64) -> Access;

    /// An access-tracked leaf with its saved permissions replaced.
    fn with_tracked_access(&self, e: u64, access: Access) -> u64;

    /// The present leaf an access-tracked entry restores to.
    fn restore_tracked(&self, e: u64) -> u64;

    /// What the processor lets this present entry at `level` permit on the
    /// way down (for the walker: the permissions are ANDed over the walk).
    fn entry_rights(&self, e: u64, level: u8) -> Access;

    /// Whether the processor rejects this present entry at `level` (reserved
    /// bits, illegal permission or memory-type combinations).
    fn is_reserved(&self, e: u64, level: u8) -> bool;

    /// Whether the processor treats `access` from `origin` as a write for
    /// permissions and the dirty bit (EPT with A/D treats guest paging-structure
    /// accesses as writes, SDM Vol. 3C §29.3.3.2).
    fn effective_access(&self, access: Access, origin: Origin) -> Access {
        let _ = origin;
        access
    }

    /// The VM exit the processor reports for `fault` of `access`.
    fn exit_for(&self, fault: WalkFault, access: Access, origin: Origin) -> NestedExit;
}
