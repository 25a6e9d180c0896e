//! Frame memory: where page-table pages live.
//!
//! The TDP engine allocates its tables as 4 KiB frames from a
//! [`FrameMemory`] and reads and writes their entries as [`AtomicU64`]s,
//! because the processor sets accessed and dirty bits concurrently. Frames
//! are named by a dense [`FrameId`] (so per-table metadata is an array and a
//! PTE handle is `frame id × 512 + index`) and by their host frame number
//! (what entries and the EPTP / nCR3 hold).
//!
//! Two implementations: [`SimMemory`] simulates sparse host-physical memory
//! for host tests (tables anywhere below MAXPHYADDR, only allocated frames
//! cost memory), and [`IdentityMemory`] hands out frames of identity-mapped
//! RAM for a bare-metal hypervisor, whose processor walks them for real. The
//! latter holds the crate's `unsafe` pointer code (the dirty-log round's
//! cache prefetch is the one other `unsafe` block).

mod identity;
mod sim;

use core::fmt;
use core::sync::atomic::AtomicU64;

use mmu_generic::addr::Pfn;

pub use identity::IdentityMemory;
pub use sim::SimMemory;

use crate::format::ENTRIES;

/// A 4 KiB table frame, as its memory numbers it (dense, from 0).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FrameId(pub u32);

/// The 512 entries of one table frame.
pub type Table = [AtomicU64; ENTRIES];

/// No frame could be allocated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OutOfFrames;

impl fmt::Display for OutOfFrames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no free page-table frame")
    }
}

/// Memory that page tables are built in.
///
/// Memory safety never depends on how frames are used: `table` is valid for
/// any id the memory handed out, allocated or freed since. What the caller
/// owes is correctness towards the processor: a frame is freed only once no
/// entry and no TLB or paging-structure cache refers to it.
pub trait FrameMemory {
    /// Allocates a frame whose 512 entries are zero.
    fn alloc_zeroed(&mut self) -> Result<FrameId, OutOfFrames>;

    /// Allocates a zeroed frame whose host frame number is below `limit`: a
    /// PAE shadow root must sit where a 32-bit CR3 can point. The default
    /// takes what [`alloc_zeroed`](Self::alloc_zeroed) gives and refuses it
    /// if it lies too high; memories that can choose where a frame lands
    /// override it.
    fn alloc_zeroed_below(&mut self, limit: Pfn) -> Result<FrameId, OutOfFrames> {
        let frame = self.alloc_zeroed()?;
        if self.pfn(frame) < limit {
            Ok(frame)
        } else {
            self.free(frame);
            Err(OutOfFrames)
        }
    }

    /// Returns a frame for reuse.
    fn free(&mut self, frame: FrameId);

    /// The host frame number of a frame.
    fn pfn(&self, frame: FrameId) -> Pfn;

    /// The frame at host frame `pfn`, if it is one of this memory's.
    fn frame_of(&self, pfn: Pfn) -> Option<FrameId>;

    /// The entries of a frame this memory handed out.
    ///
    /// # Panics
    /// If `frame` was never handed out by this memory.
    fn table(&self, frame: FrameId) -> &Table;

    /// The entries of the frame at host frame `pfn`, if it is one of this
    /// memory's: [`frame_of`](Self::frame_of) and [`table`](Self::table) in
    /// one step, the per-level step of a walk. Memories override it when they
    /// can go from the frame number to the entries directly.
    #[inline]
    fn table_at(&self, pfn: Pfn) -> Option<&Table> {
        self.frame_of(pfn).map(|f| self.table(f))
    }

    /// Frames currently allocated.
    fn frames_in_use(&self) -> usize;
}
