//! Zaps: MMU-notifier invalidation of host ranges, single leaves for the
//! back end, zap-all by generation with batched reclaim, memslot changes.

use super::*;

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> ShadowMmu<M, G, H> {
    /// An MMU notifier invalidates `range`: zaps every shadow leaf backed by
    /// it, following the invalidation protocol. Returns the leaves zapped.
    pub fn zap_hva_range(&mut self, range: HvaRange, mut on_leaf: impl FnMut(SlotId, Leaf)) -> usize {
        self.invalidation.start(range);
        let hits: Vec<(SlotId, GfnRange)> = self.slots.lookup_hva(range).map(|(s, r)| (s.id(), r)).collect();
        let mut n = 0;
        for (slot, gfns) in hits {
            let mut leaves = Vec::new();
            self.rmap.for_each_in(slot, gfns, |_, h| leaves.push(h));
            for h in leaves {
                if let Some(leaf) = self.zap_handle(h) {
                    n += 1;
                    on_leaf(slot, leaf);
                }
            }
        }
        self.invalidation.end();
        n
    }

    /// Zaps the leaf `h` names.
    pub(crate) fn zap_handle(&mut self, h: PteHandle) -> Option<Leaf> {
        let (frame, j) = unhandle(h);
        let i = self.cache.of_frame(frame)?;
        if self.cache.get(i).role.level != 1 {
            return None;
        }
        let leaf = self.drop_leaf(i, j)?;
        // The caller gets the leaf with its D bit; do not report it twice.
        if leaf.dirty && self.track_zapped_dirty {
            self.zapped_dirty.pop();
        }
        Some(leaf)
    }

    /// Zap-all by generation: every shadow page becomes obsolete at once,
    /// roots are dropped (the next access faults into fresh tables), and
    /// [`ShadowMmu::reclaim_obsolete`] frees the old pages in batches.
    pub fn invalidate_all(&mut self) -> u64 {
        let gen = self.generation.invalidate_all();
        let roots = self.roots.take_all();
        for r in roots {
            self.release_root(r);
        }
        self.unsync.clear();
        self.flush.add_all();
        gen
    }

    /// Frees obsolete pages, `batch` at a time; between batches
    /// `yield_lock` may drop and retake the lock and return `false` to stop.
    /// Zapping an obsolete page syncs nothing and reads no guest memory.
    pub fn reclaim_obsolete(&mut self, batch: usize, yield_lock: impl FnMut() -> bool) -> ReclaimReport {
        let mut active = core::mem::take(&mut self.cache.active);
        let gens: alloc::collections::BTreeMap<PageIdx, u64> =
            active.iter().map(|&i| (i, self.cache.get(i).generation)).collect();
        // The driver reads the generation while the free callback zaps
        // (which never looks at the generation): lend it out for the pass.
        let generation = core::mem::take(&mut self.generation);
        let report = reclaim_obsolete(
            &mut active,
            &generation,
            batch,
            |i| gens.get(i).copied().unwrap_or(0),
            |i, reason| self.zap_page(i, reason),
            yield_lock,
        );
        self.generation = generation;
        self.cache.set_active(active);
        report
    }

    /// The memslots changed: every shadow page goes (tables and leaves may
    /// point into slots that moved or vanished) and the reverse map follows.
    pub fn set_memslots(&mut self, slots: Memslots) {
        let roots = self.roots.take_all();
        for r in roots {
            self.release_root(r);
        }
        let all: Vec<PageIdx> = self.cache.active.clone();
        for i in all {
            if self.cache.is_live(i) {
                self.zap_page(i, ZapReason::Range);
            }
        }
        self.unsync.clear();
        self.slots = slots;
        self.rmap.sync_slots(&self.slots);
    }
}
