//! Removing translations: one leaf, a range (whole huge leaves, or exactly,
//! splitting those the range cuts), a memslot change, and everything at once
//! by generation.
//!
//! A table detached from the tree may still sit in the processor's
//! paging-structure caches, so it is freed only after the TLB flush; the
//! range operations therefore take the embedder's [`TlbFlush`] and flush
//! before they free. Entries of a detached table are still exchanged to zero
//! one by one: until the flush the processor may set a dirty bit in them, and
//! the exchange captures the final value.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, GfnRange};
use mmu_generic::backend::{FlushToken, Leaf, TlbFlush};
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags};

use super::{Pos, TdpError, TdpMmu};
use crate::format::{level_frames, Access, TdpFormat, ENTRIES};
use crate::frame::{FrameId, FrameMemory};

/// How far a [`TdpMmu::reclaim_obsolete`] call got.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Reclaimed {
    /// Table frames freed by this call.
    pub freed: usize,
    /// Obsolete tables remain: call again (after yielding the lock).
    pub remaining: bool,
}

/// Everything a range zap carries down the tree.
struct ZapCtx<'a> {
    range: GfnRange,
    exact: bool,
    flush: FlushToken,
    retired: Vec<FrameId>,
    on_leaf: &'a mut dyn FnMut(Leaf),
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// The driver's view of leaf value `e` at `pos`.
    pub(super) fn leaf_from(&self, pos: Pos, e: u64) -> Leaf {
        let f = &self.format;
        let tracked = !f.is_present(e);
        let access = if tracked { f.tracked_access(e) } else { f.leaf_access(e) };
        let a = f.accessed_mask();
        let d = f.dirty_mask();
        Leaf {
            gfn: self.entry_gfn(pos),
            npages: level_frames(pos.level),
            writable: access.contains(Access::WRITE),
            young: a != 0 && e & a != 0,
            dirty: d != 0 && e & d != 0,
            access_tracked: tracked,
        }
    }

    /// Whether `e` at `level` is a leaf, present or access-tracked.
    pub(super) fn is_any_leaf(&self, e: u64, level: u8) -> bool {
        if self.format.is_present(e) {
            self.format.is_leaf(e, level)
        } else {
            level <= 3 && self.format.is_tracked(e)
        }
    }

    /// Removes the leaf at `pos` and its reverse-map entry; `None` if there
    /// is no leaf there.
    pub(super) fn zap_leaf(&mut self, pos: Pos, flush: &mut FlushToken) -> Option<Leaf> {
        let e = self.entry(pos).load(Ordering::Acquire);
        if !self.is_any_leaf(e, pos.level) {
            return None;
        }
        // The processor can only add A/D to a leaf, never unmake it: the
        // exchange returns the same leaf with its final bits.
        let old = self.entry(pos).swap(0, Ordering::AcqRel);
        let leaf = self.leaf_from(pos, old);
        self.unfile(pos, leaf.gfn);
        if self.format.is_present(old) {
            flush.add_range(leaf.gfns());
        }
        Some(leaf)
    }

    /// Removes the reverse-map entry of the leaf at `pos`.
    fn unfile(&mut self, pos: Pos, gfn: Gfn) {
        if let Some(slot) = self.slot_of(gfn) {
            // NotFound: the leaf was mapped outside the slot set that holds
            // it now (its slot changed since): nothing is filed.
            let _ = self.rmap.remove(slot, gfn, pos.level as usize - 1, pos.handle());
        }
    }

    /// Zaps every leaf that maps a frame of `range`, huge leaves whole (an
    /// MMU-notifier invalidation, a memslot deletion). Tables left empty are
    /// freed after the flush. Never allocates, never fails. `on_leaf` sees
    /// each removed leaf with its final accessed and dirty bits; the host
    /// pages may be released once this returns.
    pub fn zap_range(&mut self, range: GfnRange, tlb: &mut impl TlbFlush, mut on_leaf: impl FnMut(Leaf)) {
        let mut ctx = ZapCtx {
            range,
            exact: false,
            flush: FlushToken::new(),
            retired: Vec::new(),
            on_leaf: &mut on_leaf,
        };
        let r = self.zap_in(self.root, self.format.walk_length().levels(), &mut ctx);
        debug_assert!(r.is_ok(), "a whole-leaf zap never splits");
        self.finish(ctx, tlb);
    }

    /// Unmaps exactly the frames of `range`: huge leaves the range cuts are
    /// split first, so frames outside it stay mapped. Fails only if a split
    /// finds no frame; what was unmapped until then stays unmapped (and
    /// flushed).
    pub fn unmap_range(
        &mut self,
        range: GfnRange,
        tlb: &mut impl TlbFlush,
        mut on_leaf: impl FnMut(Leaf),
    ) -> Result<(), TdpError> {
        let mut ctx = ZapCtx {
            range,
            exact: true,
            flush: FlushToken::new(),
            retired: Vec::new(),
            on_leaf: &mut on_leaf,
        };
        let r = self.zap_in(self.root, self.format.walk_length().levels(), &mut ctx);
        self.finish(ctx, tlb);
        r
    }

    /// Flushes, then frees the tables detached by the zap.
    fn finish(&mut self, ctx: ZapCtx<'_>, tlb: &mut impl TlbFlush) {
        ctx.flush.flush(tlb);
        for frame in ctx.retired {
            self.free_table(frame);
        }
    }

    fn zap_in(&mut self, frame: FrameId, level: u8, ctx: &mut ZapCtx<'_>) -> Result<(), TdpError> {
        let base = self.meta(frame).base;
        let span = level_frames(level);
        let start = ctx.range.start.0.max(base);
        let end = ctx.range.end.0.min(base.saturating_add(span * ENTRIES as u64));
        if start >= end {
            return Ok(());
        }
        let first = ((start - base) / span) as usize;
        let last = ((end - 1 - base) / span) as usize;
        for idx in first..=last {
            let pos = Pos { frame, idx, level };
            let er = self.pos_range(pos);
            let covered = ctx.range.start <= er.start && er.end <= ctx.range.end;
            let mut e = self.entry(pos).load(Ordering::Acquire);
            if e == 0 {
                continue;
            }
            if self.is_any_leaf(e, level) {
                if covered || !ctx.exact {
                    if let Some(leaf) = self.zap_leaf(pos, &mut ctx.flush) {
                        (ctx.on_leaf)(leaf);
                    }
                    continue;
                }
                self.split_pos(pos, &mut ctx.flush)?;
                e = self.entry(pos).load(Ordering::Acquire);
            }
            if !self.format.is_present(e) {
                continue;
            }
            let child = self.child(e, level);
            if covered {
                self.entry(pos).swap(0, Ordering::AcqRel);
                ctx.flush.add_range(er);
                self.drain_subtree(child, level - 1, ctx);
            } else {
                self.zap_in(child, level - 1, ctx)?;
                if self.table(child).iter().all(|x| x.load(Ordering::Relaxed) == 0) {
                    self.entry(pos).swap(0, Ordering::AcqRel);
                    ctx.flush.add_range(er);
                    ctx.retired.push(child);
                }
            }
        }
        Ok(())
    }

    /// Empties a detached subtree, reporting its leaves and retiring its frames.
    fn drain_subtree(&mut self, frame: FrameId, level: u8, ctx: &mut ZapCtx<'_>) {
        for idx in 0..ENTRIES {
            let pos = Pos { frame, idx, level };
            let e = self.entry(pos).swap(0, Ordering::AcqRel);
            if e == 0 {
                continue;
            }
            if self.is_any_leaf(e, level) {
                let leaf = self.leaf_from(pos, e);
                self.unfile(pos, leaf.gfn);
                (ctx.on_leaf)(leaf);
            } else if self.format.is_present(e) {
                let child = self.child(e, level);
                self.drain_subtree(child, level - 1, ctx);
            }
        }
        ctx.retired.push(frame);
    }

    /// Zaps everything by generation: a fresh empty root replaces the current
    /// one, which becomes obsolete, and the TLB is flushed. Obsolete tables
    /// are unreachable from the new root; they keep their leaves (and reverse-
    /// map entries, so the dirty log still sees their dirty bits) until
    /// [`reclaim_obsolete`](Self::reclaim_obsolete) frees them in batches.
    ///
    /// The embedder must load the new [`root`](Self::root) into every vCPU
    /// (EPTP / nCR3) before reclaiming. If no frame is left for a new root,
    /// everything is zapped in place instead.
    pub fn zap_all(&mut self, tlb: &mut impl TlbFlush, on_leaf: impl FnMut(Leaf)) {
        self.generation = self.generation.wrapping_add(1);
        match self.new_table(self.format.walk_length().levels(), 0) {
            Ok(root) => {
                let old = core::mem::replace(&mut self.root, root);
                self.obsolete.push(old);
                tlb.flush_all();
                drop(on_leaf);
            }
            Err(_) => {
                let all = GfnRange { start: Gfn(0), end: Gfn(u64::MAX) };
                self.zap_range(all, tlb, on_leaf);
            }
        }
    }

    /// Frees up to `budget` obsolete table frames, reporting the leaves they
    /// held. Call after every vCPU runs on the current root.
    pub fn reclaim_obsolete(&mut self, budget: usize, mut on_leaf: impl FnMut(Leaf)) -> Reclaimed {
        let mut freed = 0;
        while freed < budget {
            let Some(frame) = self.obsolete.pop() else { break };
            let level = self.meta(frame).level;
            for idx in 0..ENTRIES {
                let pos = Pos { frame, idx, level };
                let e = self.entry(pos).swap(0, Ordering::AcqRel);
                if e == 0 {
                    continue;
                }
                if self.is_any_leaf(e, level) {
                    let leaf = self.leaf_from(pos, e);
                    self.unfile(pos, leaf.gfn);
                    on_leaf(leaf);
                } else if self.format.is_present(e) {
                    let child = self.child(e, level);
                    self.obsolete.push(child);
                }
            }
            self.free_table(frame);
            freed += 1;
        }
        Reclaimed { freed, remaining: !self.obsolete.is_empty() }
    }

    /// Whether the table frame belongs to an obsolete generation.
    pub(super) fn is_obsolete(&self, frame: FrameId) -> bool {
        self.meta(frame).generation != self.generation
    }

    /// Installs a new memslot set. Leaves of slots deleted, moved, resized,
    /// rebacked or made read-only (and anything mapped where a new slot
    /// appears) are zapped first; a change of the dirty-log flag alone keeps
    /// the mappings (the dirty-log driver write-protects or splits them).
    pub fn set_memslots(&mut self, new: &Memslots, tlb: &mut impl TlbFlush, mut on_leaf: impl FnMut(Leaf)) {
        let same = |a: &Memslot, b: Option<&Memslot>| {
            b.is_some_and(|b| {
                a.base_gfn() == b.base_gfn()
                    && a.npages() == b.npages()
                    && a.hva() == b.hva()
                    && (a.flags() ^ b.flags()).difference(SlotFlags::DIRTY_LOG).is_empty()
            })
        };
        let mut stale: Vec<GfnRange> = Vec::new();
        for s in self.slots.iter() {
            if !same(s, new.get(s.id())) {
                stale.push(s.gfns());
            }
        }
        for s in new.iter() {
            if !same(s, self.slots.get(s.id())) {
                stale.push(s.gfns());
            }
        }
        for range in stale {
            self.zap_range(range, tlb, &mut on_leaf);
        }
        self.rmap.sync_slots(new);
        self.slots = new.clone();
    }
}
