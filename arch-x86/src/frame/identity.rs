//! Frames of identity-mapped RAM, for a bare-metal hypervisor.

use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::Pfn;

use super::{FrameId, FrameMemory, OutOfFrames, Table};
use crate::format::ENTRIES;

/// Page-table frames carved from a region of RAM that is identity-mapped
/// (virtual address = physical address) in the hypervisor, as the QEMU and
/// Bochs boot images map the low 4 GiB.
///
/// Frames are handed out by a bump pointer and recycled through a free list
/// threaded through the free frames themselves (entry 0 holds the next free
/// id + 1), so the allocator needs no heap.
#[derive(Debug)]
pub struct IdentityMemory {
    start: u64,
    nframes: u32,
    next: u32,
    /// Id + 1 of the first free frame, 0 if none.
    free_head: u32,
    in_use: usize,
}

impl IdentityMemory {
    /// Frames `[start, start + nframes)` of identity-mapped RAM.
    ///
    /// # Safety
    /// For as long as the value lives, the region must be RAM that is mapped
    /// readable and writable at the virtual address equal to its physical
    /// address, and nothing but this value (and the processor walking the
    /// tables built in it) may access it.
    pub unsafe fn new(start: Pfn, nframes: u32) -> Self {
        Self { start: start.0, nframes, next: 0, free_head: 0, in_use: 0 }
    }

    /// Number of frames in the region.
    pub fn capacity(&self) -> u32 {
        self.nframes
    }
}

impl FrameMemory for IdentityMemory {
    fn alloc_zeroed(&mut self) -> Result<FrameId, OutOfFrames> {
        let id = if let Some(id) = self.free_head.checked_sub(1) {
            self.free_head = self.table(FrameId(id))[0].load(Ordering::Relaxed) as u32;
            id
        } else if self.next < self.nframes {
            self.next += 1;
            self.next - 1
        } else {
            return Err(OutOfFrames);
        };
        for e in self.table(FrameId(id)).iter() {
            e.store(0, Ordering::Relaxed);
        }
        self.in_use += 1;
        Ok(FrameId(id))
    }

    fn free(&mut self, frame: FrameId) {
        debug_assert!(frame.0 < self.next);
        self.table(frame)[0].store(self.free_head as u64, Ordering::Relaxed);
        self.free_head = frame.0 + 1;
        self.in_use -= 1;
    }

    #[inline]
    fn pfn(&self, frame: FrameId) -> Pfn {
        Pfn(self.start + frame.0 as u64)
    }

    #[inline]
    fn frame_of(&self, pfn: Pfn) -> Option<FrameId> {
        let i = pfn.0.checked_sub(self.start)?;
        (i < self.next as u64).then_some(FrameId(i as u32))
    }

    #[inline]
    fn table(&self, frame: FrameId) -> &Table {
        assert!(frame.0 < self.nframes, "frame {frame:?} is outside the region");
        let addr = (self.start + frame.0 as u64) << 12;
        let ptr = addr as usize as *const [AtomicU64; ENTRIES];
        // SAFETY: `frame` lies inside the region (checked above), which the
        // caller of `new` promised is identity-mapped, readable and writable
        // RAM used by nothing else while `self` lives; the address is 4 KiB
        // aligned, more than `AtomicU64` needs; `AtomicU64` has the layout of
        // `u64`, and every bit pattern is a valid `u64`. The reference's
        // lifetime is that of `&self`. Shared references are fine: all access
        // is atomic.
        unsafe { &*ptr }
    }

    #[inline]
    fn table_at(&self, pfn: Pfn) -> Option<&Table> {
        // The frame's address comes straight from `pfn` (identity mapping),
        // so a walk's next load does not wait for the range check.
        if pfn.0.wrapping_sub(self.start) >= self.next as u64 {
            return None;
        }
        let ptr = (pfn.0 << 12) as usize as *const [AtomicU64; ENTRIES];
        // SAFETY: `pfn` is one of the first `next` frames of the region
        // (checked above; `next <= nframes`), which the caller of `new`
        // promised is identity-mapped, readable and writable RAM used by
        // nothing else while `self` lives, so its virtual address is
        // `pfn << 12`; the address is 4 KiB aligned, more than `AtomicU64`
        // needs; `AtomicU64` has the layout of `u64`, and every bit pattern is
        // a valid `u64`. The reference's lifetime is that of `&self`. Shared
        // references are fine: all access is atomic.
        Some(unsafe { &*ptr })
    }

    fn frames_in_use(&self) -> usize {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::alloc::{alloc_zeroed, dealloc, Layout};

    use super::*;

    #[test]
    fn the_tdp_engine_builds_and_walks_tables_in_identity_mapped_memory() {
        use crate::format::npt::Npt;
        use crate::format::{Access, PageSize, PhysAddrWidth, WalkLength};
        use crate::tdp::TdpMmu;
        use crate::testing::FlushRecorder;
        use crate::walk::translate;
        use mmu_generic::addr::{Gfn, GfnRange, Gpa};

        // Miri's target for the pointer work: tables built, walked (with the
        // walker's A/D compare-exchange) and torn down through `table_at`.
        const FRAMES: usize = 8;
        let layout = Layout::from_size_align(FRAMES * 4096, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null());
        // SAFETY: as in the test below: the block is ours, "identity-mapped"
        // at its own address, and only `mem` (moved into the engine) uses it
        // until it is freed at the end.
        let mem = unsafe { IdentityMemory::new(Pfn(base as u64 >> 12), FRAMES as u32) };
        let format = Npt::new(WalkLength::Four, PhysAddrWidth::new(52).unwrap());
        let mut mmu = TdpMmu::new(format, mem).unwrap();
        let mapped = mmu.map_range(Gfn(0x100), Pfn(0x5000), 600, Access::all(), PageSize::Size4K).unwrap();
        assert_eq!(mapped, 600);
        for g in [0x100u64, 0x1ff, 0x200, 0x357] {
            assert_eq!(mmu.lookup(Gfn(g)).map(|l| l.pfn), Some(Pfn(0x5000 + g - 0x100)));
            let t = translate(
                &format,
                mmu.memory(),
                mmu.root(),
                Gpa(g << 12),
                Access::WRITE,
                crate::exit::Origin::Final,
            )
            .unwrap();
            assert_eq!(t.hpa >> 12, 0x5000 + g - 0x100);
        }
        let mut tlb = FlushRecorder::default();
        let mut zapped = 0;
        mmu.zap_range(GfnRange { start: Gfn(0x100), end: Gfn(0x400) }, &mut tlb, |_| zapped += 1);
        assert_eq!(zapped, 600);
        assert!(mmu.lookup(Gfn(0x100)).is_none());
        drop(mmu);
        // SAFETY: allocated above with this layout; the engine that used it is gone.
        unsafe { dealloc(base, layout) };
    }

    #[test]
    fn frames_are_carved_from_the_region_and_recycled() {
        let layout = Layout::from_size_align(4 * 4096, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null());
        // In a host process the heap block's virtual address stands in for
        // the physical address: "identity-mapped" holds trivially.
        // SAFETY: the block is ours, mapped at its own address, 4 frames long,
        // and only `mem` touches it until it is dropped below.
        let mut mem = unsafe { IdentityMemory::new(Pfn(base as u64 >> 12), 4) };
        let a = mem.alloc_zeroed().unwrap();
        let b = mem.alloc_zeroed().unwrap();
        assert_eq!(mem.pfn(b).0 << 12, base as u64 + 4096);
        assert_eq!(mem.frame_of(mem.pfn(b)), Some(b));
        mem.table(a)[3].store(0xdead, Ordering::Relaxed);
        mem.free(a);
        mem.free(b);
        assert_eq!(mem.alloc_zeroed(), Ok(b));
        assert_eq!(mem.alloc_zeroed(), Ok(a));
        assert_eq!(mem.table(a)[3].load(Ordering::Relaxed), 0, "reused frames are zeroed");
        assert!(mem.alloc_zeroed().is_ok() && mem.alloc_zeroed().is_ok());
        assert_eq!(mem.alloc_zeroed(), Err(OutOfFrames));
        assert_eq!(mem.frames_in_use(), 4);
        // SAFETY: allocated above with this layout; `mem` is not used again.
        unsafe { dealloc(base, layout) };
    }
}
