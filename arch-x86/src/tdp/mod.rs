//! The two-dimensional-paging engine, generic over [`TdpFormat`] (EPT, NPT)
//! and [`FrameMemory`].
//!
//! One [`TdpMmu`] owns a guest's nested tables, their per-frame metadata, the
//! reverse map of every leaf and a copy of the memslot set. `&mut self`
//! stands for the MMU lock held for writing; the processor may set accessed
//! and dirty bits at any time, so every entry that can be present is changed
//! with an atomic read-modify-write or compare-exchange, never a blind store.
//!
//! | module | what it does |
//! |---|---|
//! | [`fault`](self) (`fault.rs`) | faults from EPT violations / nested page faults |
//! | `map.rs` | installing leaves, explicit maps, splitting huge pages |
//! | `zap.rs` | zapping ranges, unmapping, zap-all by generation |
//! | `backend.rs` | [`MmuBackend`](mmu_generic::backend::MmuBackend) for the generic drivers |
//! | `dirty.rs` | the dirty-log round over chain words through a table walk |
//!
//! A leaf is named by the [`PteHandle`] `frame id × 512 + index`; the reverse
//! map files it under its slot, its first guest frame and its level.
//!
//! ## Decisions an embedder should know
//!
//! - **Freeing detached tables.** A table unlinked by a range zap can stay in
//!   the processor's paging-structure caches until the TLB flush, so it may
//!   only be freed after it. The range zaps (`zap_range`, `unmap_range`,
//!   `set_memslots`, `zap_all`) therefore take `&mut impl TlbFlush` and flush
//!   before they free, instead of handing back a token and a receipt: the
//!   engine frees nothing the caller could still reach through a stale
//!   translation, and no caller can free early. Faults never free tables.
//! - **Reverse-map descriptors.** Faults and splits take descriptors only
//!   from the reserve and answer `ReserveEmpty` when it runs dry; they never
//!   allocate. Topping up ([`TdpMmu::reserve`], [`TdpMmu::FAULT_RESERVE`] for
//!   any one fault) is the only allocation, and it needs `&mut self`: an
//!   embedder whose engine sits behind its MMU lock tops up at the start of
//!   the vCPU's fault path, where the lock is held for nothing else, and
//!   retries a fault that came back `ReserveEmpty`. A reserve fillable from
//!   outside the lock (a per-vCPU cache of descriptors handed to the fault, as
//!   KVM's memory caches are) would need the descriptor pool to grow in chunks
//!   that are allocated outside the lock; it is not built.
//! - **Writes to read-only slots** come back as
//!   `FaultOutcome::Denied(Denied::ReadOnlySlot { .. })`, the same "denied"
//!   the core's harness and the other back ends use for
//!   `SlotFlags::READONLY`; the VMM emulates such a write as MMIO, as KVM
//!   reports it.

mod backend;
mod dirty;
mod fault;
mod map;
mod zap;

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, Pfn};
use mmu_generic::dirty_log::DirtyLogError;
use mmu_generic::memslot::{Memslots, SlotId};
use mmu_generic::pte_list::{PteHandle, RmapError};
use mmu_generic::rmap::{Rmap, X86_LEVEL_SHIFTS};

pub use fault::{Denied, FaultOutcome, HostFault, HostMemory, HostPage, MapKind, Mapping};
pub use zap::Reclaimed;

use crate::format::{level_frames, level_index, Access, PageSize, TdpFormat, WalkLength, ENTRIES};
use crate::frame::{FrameId, FrameMemory, OutOfFrames, Table};

/// Frame ids must fit a handle: `id × 512 + index < 2^32`.
const MAX_FRAMES: u32 = 1 << 23;

/// Why a TDP operation failed. Nothing is left half-built: a failed operation
/// either changed nothing or completed the steps it reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TdpError {
    /// No frame for a table (or more than 2^23 table frames).
    OutOfFrames,
    /// The host frame does not fit the physical-address width.
    PfnTooWide {
        /// The frame.
        pfn: Pfn,
        /// MAXPHYADDR.
        width: u8,
    },
    /// The guest frame lies beyond what the page walk translates.
    GfnTooWide(Gfn),
    /// A huge mapping whose guest or host frame is not aligned to its size.
    Misaligned {
        /// Guest frame.
        gfn: Gfn,
        /// Host frame.
        pfn: Pfn,
        /// Requested size.
        size: PageSize,
    },
    /// The format cannot map this size (1 GiB pages not supported).
    SizeUnsupported(PageSize),
    /// A mapping must be readable: neither format can map write- or
    /// execute-only pages portably.
    AccessUnsupported(Access),
    /// A huge mapping would cover frames of more than one memslot, or of a
    /// memslot and no memslot (the reverse map could not track it).
    CrossesSlot {
        /// First guest frame of the mapping.
        gfn: Gfn,
        /// Its size.
        size: PageSize,
    },
    /// Something is already mapped where the explicit mapping goes.
    AlreadyMapped(Gfn),
    /// The embedder could not resolve the host page behind a guest frame.
    HostFault(Gfn),
    /// The exit reports a misconfigured entry (EPT misconfiguration or NPF
    /// with RSV), which the engine never writes.
    Misconfigured(Gfn),
    /// The reverse map refused an update; `ReserveEmpty`: top up with
    /// [`TdpMmu::reserve`] and retry.
    Rmap(RmapError),
    /// The dirty log refused the page (out of the slot, wrong mode).
    DirtyLog(DirtyLogError),
    /// The slot is flagged for dirty logging but the fault's context holds
    /// no log for it: the write could not be logged before it is granted.
    NoDirtyLog(SlotId),
}

impl From<OutOfFrames> for TdpError {
    fn from(_: OutOfFrames) -> Self {
        TdpError::OutOfFrames
    }
}

impl From<RmapError> for TdpError {
    fn from(e: RmapError) -> Self {
        TdpError::Rmap(e)
    }
}

impl fmt::Display for TdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames => f.write_str("no frame left for a page table"),
            Self::PfnTooWide { pfn, width } => write!(f, "host frame {pfn} is above MAXPHYADDR {width}"),
            Self::GfnTooWide(g) => write!(f, "guest frame {g} is beyond the page walk"),
            Self::Misaligned { gfn, pfn, size } => {
                write!(f, "{size:?} mapping of guest frame {gfn} to host frame {pfn} is misaligned")
            }
            Self::SizeUnsupported(s) => write!(f, "the format cannot map {s:?} pages"),
            Self::AccessUnsupported(a) => write!(f, "cannot map with access {a:?} (not readable)"),
            Self::CrossesSlot { gfn, size } => write!(f, "{size:?} mapping at {gfn} crosses a memslot edge"),
            Self::AlreadyMapped(g) => write!(f, "guest frame {g} is already mapped"),
            Self::HostFault(g) => write!(f, "no host page behind guest frame {g}"),
            Self::Misconfigured(g) => write!(f, "misconfigured nested entry for guest frame {g}"),
            Self::Rmap(e) => write!(f, "reverse map: {e}"),
            Self::DirtyLog(e) => write!(f, "dirty log: {e}"),
            Self::NoDirtyLog(s) => {
                write!(f, "memslot {} is flagged for logging, but the fault has no log for it", s.0)
            }
        }
    }
}

/// What the engine knows about each table frame.
#[derive(Clone, Copy, Default, Debug)]
struct TableMeta {
    /// 1..=5; 0 while the frame is not one of our tables.
    level: u8,
    /// The root generation the table was built under.
    generation: u32,
    /// First guest frame the table translates.
    base: u64,
}

/// A leaf position: table frame, index, level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Pos {
    frame: FrameId,
    idx: usize,
    level: u8,
}

impl Pos {
    fn handle(self) -> PteHandle {
        PteHandle(self.frame.0 * ENTRIES as u32 + self.idx as u32)
    }

    fn of(h: PteHandle) -> (FrameId, usize) {
        (FrameId(h.0 / ENTRIES as u32), (h.0 % ENTRIES as u32) as usize)
    }
}

/// A leaf as a lookup finds it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafInfo {
    /// Host frame of the looked-up guest frame.
    pub pfn: Pfn,
    /// Size of the leaf.
    pub size: PageSize,
    /// Permissions (saved ones for an access-tracked leaf).
    pub access: Access,
    /// The leaf is access-tracked (not present, restorable).
    pub tracked: bool,
    /// The raw entry.
    pub entry: u64,
}

/// Counters for tests and benchmarks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TdpStats {
    /// Leaves installed by faults or explicit maps.
    pub leaves_installed: u64,
    /// Huge leaves split.
    pub splits: u64,
    /// Access-tracked leaves restored by a fault.
    pub restores: u64,
    /// Faults that found the access already permitted.
    pub spurious: u64,
    /// Table frames freed.
    pub tables_freed: u64,
}

/// The TDP engine for one guest.
pub struct TdpMmu<F: TdpFormat, M: FrameMemory> {
    format: F,
    mem: M,
    root: FrameId,
    generation: u32,
    meta: Vec<TableMeta>,
    /// Tables of obsolete generations still to free.
    obsolete: Vec<FrameId>,
    rmap: Rmap,
    slots: Memslots,
    max_size: PageSize,
    stats: TdpStats,
}

impl<F: TdpFormat, M: FrameMemory> fmt::Debug for TdpMmu<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TdpMmu")
            .field("format", &self.format)
            .field("root", &self.mem.pfn(self.root))
            .field("generation", &self.generation)
            .field("tables", &self.mem.frames_in_use())
            .field("obsolete", &self.obsolete.len())
            .finish_non_exhaustive()
    }
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// An engine with an empty root table and no memslot.
    pub fn new(format: F, mut mem: M) -> Result<Self, TdpError> {
        let root = mem.alloc_zeroed()?;
        let max_size = format.largest_page();
        let mut mmu = Self {
            format,
            mem,
            root,
            generation: 0,
            meta: Vec::new(),
            obsolete: Vec::new(),
            rmap: Rmap::new(X86_LEVEL_SHIFTS),
            slots: Memslots::new(),
            max_size,
            stats: TdpStats::default(),
        };
        if root.0 >= MAX_FRAMES {
            return Err(TdpError::OutOfFrames);
        }
        let top = mmu.format.walk_length().levels();
        mmu.set_meta(root, TableMeta { level: top, generation: 0, base: 0 });
        Ok(mmu)
    }

    /// The format.
    pub fn format(&self) -> &F {
        &self.format
    }

    /// The frame memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The root table's host frame (for the EPTP or nCR3).
    pub fn root(&self) -> Pfn {
        self.mem.pfn(self.root)
    }

    /// The current root generation (bumped by [`zap_all`](Self::zap_all)).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The memslot set faults resolve through.
    pub fn memslots(&self) -> &Memslots {
        &self.slots
    }

    /// The reverse map.
    pub fn rmap(&self) -> &Rmap {
        &self.rmap
    }

    /// Counters.
    pub fn stats(&self) -> TdpStats {
        self.stats
    }

    /// Limits the page size faults choose (for example 4 KiB to test without
    /// huge pages). Clamped to what the format supports.
    pub fn set_max_page_size(&mut self, size: PageSize) {
        self.max_size = size.min(self.format.largest_page());
    }

    /// Tops up the reverse map's descriptor reserve (call before taking the
    /// MMU lock when the engine sits behind one). Faults and splits never
    /// allocate: they take descriptors from this reserve and report
    /// `ReserveEmpty` when it runs dry. [`FAULT_RESERVE`](Self::FAULT_RESERVE)
    /// covers any single fault (one leaf, or a split of one huge leaf).
    pub fn reserve(&mut self, n: usize) {
        self.rmap.reserve(n);
    }

    /// Descriptors that cover any single fault or split.
    pub const FAULT_RESERVE: usize = ENTRIES + 1;

    fn set_meta(&mut self, frame: FrameId, m: TableMeta) {
        let i = frame.0 as usize;
        if i >= self.meta.len() {
            self.meta.resize(i + 1, TableMeta::default());
        }
        self.meta[i] = m;
    }

    fn meta(&self, frame: FrameId) -> TableMeta {
        self.meta.get(frame.0 as usize).copied().unwrap_or_default()
    }

    #[inline]
    fn table(&self, frame: FrameId) -> &Table {
        self.mem.table(frame)
    }

    #[inline]
    fn entry(&self, pos: Pos) -> &AtomicU64 {
        &self.mem.table(pos.frame)[pos.idx]
    }

    /// A new, empty table of `level` translating from guest frame `base`.
    fn new_table(&mut self, level: u8, base: u64) -> Result<FrameId, TdpError> {
        let frame = self.mem.alloc_zeroed()?;
        if frame.0 >= MAX_FRAMES {
            self.mem.free(frame);
            return Err(TdpError::OutOfFrames);
        }
        self.set_meta(frame, TableMeta { level, generation: self.generation, base });
        Ok(frame)
    }

    fn free_table(&mut self, frame: FrameId) {
        self.set_meta(frame, TableMeta::default());
        self.mem.free(frame);
        self.stats.tables_freed += 1;
    }

    /// The child table a present non-leaf entry points to.
    fn child(&self, e: u64, level: u8) -> FrameId {
        self.mem
            .frame_of(self.format.entry_pfn(e, level))
            .expect("non-leaf entries only point to table frames of this memory")
    }

    /// First guest frame of the entry at `pos`.
    fn entry_gfn(&self, pos: Pos) -> Gfn {
        Gfn(self.meta(pos.frame).base + pos.idx as u64 * level_frames(pos.level))
    }

    /// The slot that holds `gfn`, if any.
    fn slot_of(&self, gfn: Gfn) -> Option<SlotId> {
        self.slots.lookup(gfn).map(|s| s.id())
    }

    /// Walks the current root to the leaf (present or access-tracked) that
    /// maps `gfn`, without side effects.
    fn find_leaf(&self, gfn: Gfn) -> Option<(Pos, u64)> {
        let mut frame = self.root;
        let mut level = self.format.walk_length().levels();
        loop {
            let idx = level_index(gfn.0, level);
            let e = self.table(frame)[idx].load(Ordering::Acquire);
            let pos = Pos { frame, idx, level };
            if !self.format.is_present(e) {
                return (level <= 3 && self.format.is_tracked(e)).then_some((pos, e));
            }
            if self.format.is_leaf(e, level) {
                return Some((pos, e));
            }
            frame = self.child(e, level);
            level -= 1;
        }
    }

    /// The walk of [`find_leaf`](Self::find_leaf) for a walk of `TOP`
    /// levels, returning the leaf's level and entry but no position: it
    /// follows entries from table to table by host frame number (one step per
    /// level instead of two through the frame id), and with the walk length a
    /// constant the levels unroll into straight-line code.
    #[inline(always)]
    fn leaf_entry_at<const TOP: u8>(&self, gfn: Gfn) -> Option<(u8, u64)> {
        let f = &self.format;
        let addr_mask = f.phys_width().addr_mask();
        let mut table = self.table(self.root);
        let mut level = TOP;
        loop {
            let e = table[level_index(gfn.0, level)].load(Ordering::Acquire);
            if !f.is_present(e) {
                return (level <= 3 && f.is_tracked(e)).then_some((level, e));
            }
            if level == 1 || f.is_leaf(e, level) {
                return Some((level, e));
            }
            // A non-leaf entry holds the full 4 KiB-aligned address of its
            // table (what `entry_pfn` returns for it at every level it can
            // be a non-leaf in); masking directly keeps the size test of a
            // huge leaf off the walk's dependency chain.
            let next = Pfn((e & addr_mask) >> 12);
            debug_assert_eq!(next, f.entry_pfn(e, level));
            table =
                self.mem.table_at(next).expect("non-leaf entries only point to table frames of this memory");
            level -= 1;
        }
    }

    /// The leaf that maps `gfn` in the current tables, read without setting
    /// any bit (the walker in [`crate::walk`] plays the processor).
    #[inline]
    pub fn lookup(&self, gfn: Gfn) -> Option<LeafInfo> {
        let f = &self.format;
        if !f.walk_length().covers(gfn.0) {
            return None;
        }
        let (level, e) = match f.walk_length() {
            WalkLength::Four => self.leaf_entry_at::<4>(gfn)?,
            WalkLength::Five => self.leaf_entry_at::<5>(gfn)?,
        };
        let size = PageSize::at_level(level)?;
        let offset = gfn.0 & (size.frames() - 1);
        let tracked = !f.is_present(e);
        let access = if tracked { f.tracked_access(e) } else { f.leaf_access(e) };
        Some(LeafInfo { pfn: Pfn(f.entry_pfn(e, level).0 + offset), size, access, tracked, entry: e })
    }

    /// Number of page-table frames in use, obsolete ones included.
    pub fn tables_in_use(&self) -> usize {
        self.mem.frames_in_use()
    }
}

#[cfg(test)]
mod dirty_tests;
#[cfg(test)]
mod tests;
