//! The reverse map: for every guest frame of every slot, and every page-size
//! level, the [`PteList`] of leaf PTEs that map it.
//!
//! A leaf of level `L` (page size `1 << shift[L]`) is filed under the list of
//! its first frame at that level, so walking a range visits each huge leaf
//! once. The per-slot arrays are created and dropped as the memslot set
//! changes ([`Rmap::sync_slots`]); descriptors for multi-mapping lists come
//! from one shared [`PteListPool`] whose reserve is topped up before the MMU
//! lock is taken.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{Gfn, GfnRange, PAGE_SHIFT};
use crate::memslot::{Memslot, Memslots, SlotId};
use crate::pte_list::{PteHandle, PteList, PteListPool, RmapError};

/// The page-size shifts of x86 paging levels: 4 KiB, 2 MiB, 1 GiB.
pub const X86_LEVEL_SHIFTS: &[u32] = &[12, 21, 30];

#[derive(Clone, Debug)]
struct SlotRmap {
    base_gfn: Gfn,
    npages: u64,
    /// `levels[l][i]`: leaves of level `l` whose first frame is the `i`-th
    /// level-`l`-aligned frame at or below the slot's base.
    levels: Vec<Vec<PteList>>,
}

/// The reverse map of every slot.
#[derive(Clone, Debug)]
pub struct Rmap {
    shifts: &'static [u32],
    slots: Vec<Option<SlotRmap>>,
    pool: PteListPool,
}

impl Rmap {
    /// An empty reverse map for levels of the given page-size shifts
    /// (ascending, the first 12).
    pub fn new(shifts: &'static [u32]) -> Self {
        debug_assert!(shifts.first() == Some(&PAGE_SHIFT));
        Self { shifts, slots: Vec::new(), pool: PteListPool::new() }
    }

    /// The page-size shifts of the levels.
    pub fn shifts(&self) -> &'static [u32] {
        self.shifts
    }

    /// Creates arrays for new or moved slots and drops those of deleted ones.
    /// A moved or resized slot starts empty: the caller zaps its leaves first.
    pub fn sync_slots(&mut self, slots: &Memslots) {
        let mut keep = vec![false; self.slots.len()];
        for s in slots.iter() {
            let id = s.id().0 as usize;
            if id >= self.slots.len() {
                self.slots.resize_with(id + 1, || None);
                keep.resize(id + 1, false);
            }
            keep[id] = true;
            let same =
                matches!(&self.slots[id], Some(r) if r.base_gfn == s.base_gfn() && r.npages == s.npages());
            if !same {
                self.drop_slot(id);
                self.slots[id] = Some(self.new_slot(s));
            }
        }
        for (id, keep) in keep.into_iter().enumerate() {
            if !keep {
                self.drop_slot(id);
            }
        }
    }

    fn new_slot(&self, s: &Memslot) -> SlotRmap {
        let first = s.base_gfn().0;
        let last = first + s.npages() - 1;
        let levels = self
            .shifts
            .iter()
            .map(|&shift| {
                let k = shift - PAGE_SHIFT;
                vec![PteList::EMPTY; ((last >> k) - (first >> k) + 1) as usize]
            })
            .collect();
        SlotRmap { base_gfn: s.base_gfn(), npages: s.npages(), levels }
    }

    fn drop_slot(&mut self, id: usize) {
        if let Some(mut r) = self.slots.get_mut(id).and_then(Option::take) {
            for level in &mut r.levels {
                for list in level.iter_mut().filter(|l| !l.is_empty()) {
                    self.pool.drain(list, |_| {});
                }
            }
        }
    }

    /// Ensures the descriptor reserve can serve `n` adds without allocating.
    pub fn reserve(&mut self, n: usize) {
        self.pool.reserve(n);
    }

    /// The descriptor pool (for memory accounting).
    pub fn pool(&self) -> &PteListPool {
        &self.pool
    }

    fn index(&self, slot: SlotId, gfn: Gfn, level: usize) -> Result<(usize, usize), RmapError> {
        let r = self.slots.get(slot.0 as usize).and_then(Option::as_ref).ok_or(RmapError::OutOfSlot)?;
        let k = self.shifts.get(level).ok_or(RmapError::OutOfSlot)? - PAGE_SHIFT;
        if gfn.0.wrapping_sub(r.base_gfn.0) >= r.npages {
            return Err(RmapError::OutOfSlot);
        }
        Ok((slot.0 as usize, ((gfn.0 >> k) - (r.base_gfn.0 >> k)) as usize))
    }

    /// Files leaf `h` of level `level` mapping `gfn` (any frame of the leaf).
    pub fn add(&mut self, slot: SlotId, gfn: Gfn, level: usize, h: PteHandle) -> Result<(), RmapError> {
        let (s, i) = self.index(slot, gfn, level)?;
        let list = &mut self.slots[s].as_mut().expect("index checked the slot").levels[level][i];
        self.pool.add(list, h)
    }

    /// Removes leaf `h` of level `level` mapping `gfn`.
    pub fn remove(&mut self, slot: SlotId, gfn: Gfn, level: usize, h: PteHandle) -> Result<(), RmapError> {
        let (s, i) = self.index(slot, gfn, level)?;
        let list = &mut self.slots[s].as_mut().expect("index checked the slot").levels[level][i];
        self.pool.remove(list, h)
    }

    /// The leaves of level `level` filed under `gfn`.
    pub fn list(&self, slot: SlotId, gfn: Gfn, level: usize) -> impl Iterator<Item = PteHandle> + '_ {
        let list = self
            .index(slot, gfn, level)
            .map(|(s, i)| self.slots[s].as_ref().expect("index checked the slot").levels[level][i])
            .unwrap_or(PteList::EMPTY);
        self.pool.iter(list)
    }

    /// Calls `f(level, handle)` for every leaf of any level that maps a frame
    /// of `gfns` in `slot`, each leaf once.
    pub fn for_each_in(&self, slot: SlotId, gfns: GfnRange, mut f: impl FnMut(usize, PteHandle)) {
        let Some(r) = self.slots.get(slot.0 as usize).and_then(Option::as_ref) else { return };
        let slot_range = GfnRange { start: r.base_gfn, end: Gfn(r.base_gfn.0 + r.npages) };
        let Some(range) = slot_range.intersect(&gfns) else { return };
        for (level, lists) in r.levels.iter().enumerate() {
            let k = self.shifts[level] - PAGE_SHIFT;
            let base = r.base_gfn.0 >> k;
            let first = (range.start.0 >> k) - base;
            let last = ((range.end.0 - 1) >> k) - base;
            for list in &lists[first as usize..=last as usize] {
                if !list.is_empty() {
                    self.pool.iter(*list).for_each(|h| f(level, h));
                }
            }
        }
    }

    /// Empties every list of `gfns` in `slot`, calling `f(level, handle)` on
    /// each leaf (for zapping a range).
    pub fn drain_range(&mut self, slot: SlotId, gfns: GfnRange, mut f: impl FnMut(usize, PteHandle)) {
        let Some(r) = self.slots.get_mut(slot.0 as usize).and_then(Option::as_mut) else { return };
        let slot_range = GfnRange { start: r.base_gfn, end: Gfn(r.base_gfn.0 + r.npages) };
        let Some(range) = slot_range.intersect(&gfns) else { return };
        for (level, lists) in r.levels.iter_mut().enumerate() {
            let k = self.shifts[level] - PAGE_SHIFT;
            let base = r.base_gfn.0 >> k;
            let first = (range.start.0 >> k) - base;
            let last = ((range.end.0 - 1) >> k) - base;
            for list in &mut lists[first as usize..=last as usize] {
                if !list.is_empty() {
                    self.pool.drain(list, |h| f(level, h));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Hva;
    use crate::memslot::{MemslotsBuilder, SlotFlags};

    fn slots() -> Memslots {
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0x100), 0x400, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
        b.create(Memslot::new(SlotId(7), Gfn(0x10_0000), 0x40000, Hva(0x8000_0000), SlotFlags::empty()))
            .unwrap();
        b.build().unwrap()
    }

    #[test]
    fn huge_leaves_are_visited_once_per_range_walk() {
        let mut rmap = Rmap::new(X86_LEVEL_SHIFTS);
        rmap.sync_slots(&slots());
        rmap.add(SlotId(0), Gfn(0x200), 1, PteHandle(5)).unwrap();
        rmap.add(SlotId(0), Gfn(0x105), 0, PteHandle(6)).unwrap();
        let mut seen = Vec::new();
        rmap.for_each_in(SlotId(0), GfnRange { start: Gfn(0x100), end: Gfn(0x500) }, |l, h| {
            seen.push((l, h.0))
        });
        seen.sort();
        assert_eq!(seen, [(0, 6), (1, 5)]);
        // A range touching one frame of the 2 MiB leaf still finds it.
        let mut n = 0;
        rmap.for_each_in(SlotId(0), GfnRange { start: Gfn(0x3ff), end: Gfn(0x400) }, |_, _| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn frames_outside_the_slot_are_refused() {
        let mut rmap = Rmap::new(X86_LEVEL_SHIFTS);
        rmap.sync_slots(&slots());
        assert_eq!(rmap.add(SlotId(0), Gfn(0x500), 0, PteHandle(1)), Err(RmapError::OutOfSlot));
        assert_eq!(rmap.add(SlotId(3), Gfn(0x100), 0, PteHandle(1)), Err(RmapError::OutOfSlot));
        assert_eq!(rmap.add(SlotId(0), Gfn(0x100), 3, PteHandle(1)), Err(RmapError::OutOfSlot));
    }

    #[test]
    fn deleting_a_slot_returns_its_descriptors() {
        let mut rmap = Rmap::new(X86_LEVEL_SHIFTS);
        let s = slots();
        rmap.sync_slots(&s);
        rmap.reserve(2);
        for h in 0..20 {
            rmap.add(SlotId(7), Gfn(0x10_0001), 0, PteHandle(h)).unwrap();
        }
        assert_eq!(rmap.pool().bytes_in_use(), 128, "20 mappings: the head and two lines");
        let mut b = s.to_builder();
        b.delete(SlotId(7)).unwrap();
        rmap.sync_slots(&b.build().unwrap());
        assert_eq!(rmap.pool().bytes_in_use(), 0);
        assert_eq!(rmap.list(SlotId(7), Gfn(0x10_0001), 0).count(), 0);
    }
}
