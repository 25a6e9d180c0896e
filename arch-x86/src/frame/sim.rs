//! Simulated host-physical memory for host tests.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::Pfn;

use super::{FrameId, FrameMemory, OutOfFrames, Table};

/// Sparse simulated host-physical memory: only allocated table frames exist.
///
/// Frame `i` sits at host frame `base + i × stride`, so tests can place
/// tables at high physical addresses (exercising every address bit below
/// MAXPHYADDR) while a 1 TiB guest's tables cost only the frames they use;
/// guest memory itself is never simulated, its frame numbers are just values
/// in the leaves. Entries are `AtomicU64` values, never byte arrays, so the
/// simulation behaves the same on big-endian hosts.
#[derive(Debug)]
pub struct SimMemory {
    frames: Vec<Box<Table>>,
    free: Vec<u32>,
    base: u64,
    stride: u64,
    limit: usize,
}

impl SimMemory {
    /// Frames at host frames `base, base + 1, ...`, at most `limit` of them.
    pub fn new(base: Pfn, limit: usize) -> Self {
        Self::with_stride(base, 1, limit)
    }

    /// Frames at host frames `base + i × stride` (a stride above 1 scatters
    /// tables over the physical address space).
    pub fn with_stride(base: Pfn, stride: u64, limit: usize) -> Self {
        let limit = limit.min(u32::MAX as usize);
        Self { frames: Vec::new(), free: Vec::new(), base: base.0, stride: stride.max(1), limit }
    }

    /// The frame index host frame `pfn` would have, if it lies on the
    /// stride. Walks ask once a level: with the usual stride of 1 that is a
    /// subtraction, no division.
    #[inline]
    fn index_of(&self, pfn: Pfn) -> Option<u64> {
        let off = pfn.0.checked_sub(self.base)?;
        if self.stride == 1 {
            return Some(off);
        }
        (off % self.stride == 0).then(|| off / self.stride)
    }

    /// Host frame number of the highest frame this memory can hand out.
    pub fn highest_pfn(&self) -> Pfn {
        Pfn(self.base + (self.limit.saturating_sub(1) as u64) * self.stride)
    }
}

impl FrameMemory for SimMemory {
    fn alloc_zeroed(&mut self) -> Result<FrameId, OutOfFrames> {
        if let Some(id) = self.free.pop() {
            for e in self.frames[id as usize].iter() {
                e.store(0, Ordering::Relaxed);
            }
            return Ok(FrameId(id));
        }
        if self.frames.len() >= self.limit {
            return Err(OutOfFrames);
        }
        self.frames.push(Box::new(core::array::from_fn(|_| AtomicU64::new(0))));
        Ok(FrameId((self.frames.len() - 1) as u32))
    }

    fn alloc_zeroed_below(&mut self, limit: Pfn) -> Result<FrameId, OutOfFrames> {
        // A freed frame low enough, else the next new one if it is.
        if let Some(k) = self.free.iter().rposition(|&id| self.base + id as u64 * self.stride < limit.0) {
            let id = self.free.swap_remove(k);
            for e in self.frames[id as usize].iter() {
                e.store(0, Ordering::Relaxed);
            }
            return Ok(FrameId(id));
        }
        let next = self.frames.len() as u64;
        if self.frames.len() >= self.limit || self.base + next * self.stride >= limit.0 {
            return Err(OutOfFrames);
        }
        self.frames.push(Box::new(core::array::from_fn(|_| AtomicU64::new(0))));
        Ok(FrameId(next as u32))
    }

    fn free(&mut self, frame: FrameId) {
        debug_assert!((frame.0 as usize) < self.frames.len());
        debug_assert!(!self.free.contains(&frame.0), "frame {frame:?} freed twice");
        self.free.push(frame.0);
    }

    #[inline]
    fn pfn(&self, frame: FrameId) -> Pfn {
        Pfn(self.base + frame.0 as u64 * self.stride)
    }

    #[inline]
    fn frame_of(&self, pfn: Pfn) -> Option<FrameId> {
        let i = self.index_of(pfn)?;
        (i < self.frames.len() as u64).then_some(FrameId(i as u32))
    }

    #[inline]
    fn table(&self, frame: FrameId) -> &Table {
        &self.frames[frame.0 as usize]
    }

    #[inline]
    fn table_at(&self, pfn: Pfn) -> Option<&Table> {
        let i = usize::try_from(self.index_of(pfn)?).ok()?;
        self.frames.get(i).map(|t| &**t)
    }

    fn frames_in_use(&self) -> usize {
        self.frames.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_below_a_limit_come_from_the_free_list_or_fresh_and_never_above() {
        // Frames at 4 GiB - 2 pages, 4 GiB - 1 page, 4 GiB, 4 GiB + 1 page.
        let limit = Pfn(1 << 20);
        let mut m = SimMemory::new(Pfn((1 << 20) - 2), 4);
        let low = m.alloc_zeroed_below(limit).unwrap();
        let low2 = m.alloc_zeroed_below(limit).unwrap();
        assert!(m.pfn(low) < limit && m.pfn(low2) < limit);
        assert_eq!(m.alloc_zeroed_below(limit), Err(OutOfFrames), "the next frame is at 4 GiB");
        let high = m.alloc_zeroed().unwrap();
        assert!(m.pfn(high) >= limit);
        m.table(low)[5].store(7, Ordering::Relaxed);
        m.free(high);
        m.free(low);
        // The freed high frame is skipped; the freed low one comes back zeroed.
        let again = m.alloc_zeroed_below(limit).unwrap();
        assert_eq!(again, low);
        assert_eq!(m.table(again)[5].load(Ordering::Relaxed), 0);
        assert_eq!(m.alloc_zeroed_below(limit), Err(OutOfFrames));
        assert_eq!(m.frames_in_use(), 2);
    }

    #[test]
    fn freed_frames_come_back_zeroed_and_pfns_map_both_ways() {
        let mut m = SimMemory::with_stride(Pfn(0xf_0000_0000), 3, 2);
        let a = m.alloc_zeroed().unwrap();
        let b = m.alloc_zeroed().unwrap();
        assert_eq!(m.alloc_zeroed(), Err(OutOfFrames));
        assert_eq!(m.pfn(b), Pfn(0xf_0000_0003));
        assert_eq!(m.frame_of(Pfn(0xf_0000_0003)), Some(b));
        assert_eq!(m.frame_of(Pfn(0xf_0000_0001)), None);
        assert_eq!(m.frame_of(Pfn(0xf_0000_0006)), None);
        m.table(a)[7].store(99, Ordering::Relaxed);
        m.free(a);
        assert_eq!(m.frames_in_use(), 1);
        let c = m.alloc_zeroed().unwrap();
        assert_eq!(c, a);
        assert_eq!(m.table(c)[7].load(Ordering::Relaxed), 0);
    }
}
