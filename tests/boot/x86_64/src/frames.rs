//! Host-physical memory for guest RAM and for the TDP engine's table region.
//!
//! All RAM below 4 GiB is identity-mapped by the trampoline, so a physical address is
//! also a pointer. Memory is handed out in 2 MiB-aligned blocks (so a slot can be backed
//! by huge host pages) from one region after the kernel and the heap, and never returned:
//! the image runs one guest and then ends.

/// Size of a block.
pub const FRAME_2M: u64 = 2 << 20;

/// Allocation failed: the region is exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfFrames;

/// The pool.
pub struct FramePool {
    next: u64,
    end: u64,
}

impl FramePool {
    /// A pool over `[start, end)` (identity-mapped RAM used by nothing else).
    pub const fn new(start: u64, end: u64) -> Self {
        FramePool { next: start, end }
    }

    /// A zeroed, 2 MiB-aligned 2 MiB block.
    pub fn alloc_2m(&mut self) -> Result<u64, OutOfFrames> {
        let pa = (self.next + FRAME_2M - 1) & !(FRAME_2M - 1);
        if pa + FRAME_2M > self.end {
            return Err(OutOfFrames);
        }
        self.next = pa + FRAME_2M;
        // SAFETY: `pa..pa+2M` lies in the pool's region, identity-mapped RAM that the pool
        // hands out once; nothing references it yet.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, FRAME_2M as usize) };
        Ok(pa)
    }

    /// A zeroed, physically contiguous region of `bytes` (rounded up to 2 MiB blocks).
    pub fn alloc_contiguous(&mut self, bytes: u64) -> Result<u64, OutOfFrames> {
        let first = self.alloc_2m()?;
        for i in 1..bytes.div_ceil(FRAME_2M) {
            // Blocks are handed out in address order, so consecutive ones are adjacent.
            if self.alloc_2m()? != first + i * FRAME_2M {
                return Err(OutOfFrames);
            }
        }
        Ok(first)
    }
}
