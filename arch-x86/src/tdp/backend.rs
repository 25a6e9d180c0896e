//! [`MmuBackend`] for the TDP engine, so the core's dirty-log and ageing
//! drivers drive EPT and NPT unchanged.
//!
//! Accessed and dirty bits are cleared with `fetch_and`, write permission
//! with a compare-exchange loop: the processor sets A/D concurrently and a
//! plain store could erase a dirty bit it set after our read. EPT without
//! A/D flags ages by access tracking: the leaf's permissions move to ignored
//! bits and the entry becomes not present; the next access faults and
//! [`TdpMmu::handle_fault`] restores it, which counts as the access.

use core::sync::atomic::Ordering;

use mmu_generic::addr::GfnRange;
use mmu_generic::backend::{
    BackendError, Caps, ChainRound, ChainWord, ChainWords, FlushToken, Leaf, MmuBackend,
};
use mmu_generic::memslot::Memslot;
use mmu_generic::pte_list::PteHandle;

use super::{Pos, TdpError, TdpMmu};
use crate::format::TdpFormat;
use crate::frame::FrameMemory;

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// The leaf position a handle names, if its frame is one of our tables
    /// at a leaf level.
    fn pos_of(&self, h: PteHandle) -> Option<Pos> {
        let (frame, idx) = Pos::of(h);
        let level = self.meta(frame).level;
        (1..=3).contains(&level).then_some(Pos { frame, idx, level })
    }

    /// The position and current value of the leaf `h` names.
    fn leaf_pos(&self, h: PteHandle) -> Option<(Pos, u64)> {
        let pos = self.pos_of(h)?;
        let e = self.entry(pos).load(Ordering::Acquire);
        self.is_any_leaf(e, pos.level).then_some((pos, e))
    }

    /// Atomically clears `mask` in the leaf `h`; returns whether any of it was set.
    fn clear_bits(&self, h: PteHandle, mask: u64, flush: &mut FlushToken) -> bool {
        if mask == 0 {
            return false;
        }
        let Some((pos, e)) = self.leaf_pos(h) else { return false };
        if e & mask == 0 || !self.format.is_present(e) {
            return false;
        }
        let old = self.entry(pos).fetch_and(!mask, Ordering::AcqRel);
        let was = old & mask != 0;
        if was {
            // A cached translation would let the processor skip setting the
            // bit again.
            flush.add_range(self.pos_range(pos));
        }
        was
    }
}

impl<F: TdpFormat, M: FrameMemory> MmuBackend for TdpMmu<F, M> {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: self.format.accessed_mask() != 0, dirty_bit: self.format.dirty_mask() != 0 }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.rmap.for_each_in(slot.id(), gfns, |_, h| f(h));
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        let (pos, e) = self.leaf_pos(h)?;
        Some(self.leaf_from(pos, e))
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let Some((pos, cur)) = self.leaf_pos(h) else { return false };
        let Some(present) = self.take_write(self.entry(pos), cur) else { return false };
        if present {
            flush.add_range(self.pos_range(pos));
        }
        true
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_bits(h, self.format.dirty_mask(), flush)
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_bits(h, self.format.accessed_mask(), flush)
    }

    fn mark_access_tracked(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let Some((pos, e)) = self.leaf_pos(h) else { return false };
        if !self.format.is_present(e) {
            return false;
        }
        let Some(tracked) = self.format.to_tracked(e) else { return false };
        // Without A/D flags the processor never writes the entry, but a
        // compare-exchange keeps the rule of never storing over a live leaf.
        if self.entry(pos).compare_exchange(e, tracked, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        flush.add_range(self.pos_range(pos));
        true
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        let Some((pos, e)) = self.leaf_pos(h) else { return Err(BackendError::NotALeaf(h)) };
        if pos.level == 1 {
            return Ok(());
        }
        // An obsolete table is unreachable: splitting it is wasted work, and
        // a not-present tracked leaf has nothing to keep mapped.
        if self.is_obsolete(pos.frame) || !self.format.is_present(e) {
            self.zap_leaf(pos, flush);
            return Ok(());
        }
        self.split_pos(pos, flush).map_err(|e| match e {
            TdpError::OutOfFrames => BackendError::OutOfFrames,
            _ => BackendError::ReserveEmpty,
        })
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        let pos = self.pos_of(h)?;
        self.zap_leaf(pos, flush)
    }

    /// Walks the current root (`dirty.rs`); declines while obsolete tables,
    /// which the walk cannot see, remain, and for a slot the engine does not
    /// hold as it is (the reverse map files nothing under it then).
    fn round_chain_words(
        &mut self,
        slot: &Memslot,
        words: &[ChainWord],
        round: ChainRound<'_>,
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) -> ChainWords {
        if self.slots.get(slot.id()).map(|s| s.gfns()) != Some(slot.gfns()) {
            return ChainWords::NotHandled;
        }
        self.round_words(slot.gfns(), words, round, writable, flush)
    }
}
