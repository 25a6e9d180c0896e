//! [`MmuBackend`] for shadow leaves, so the core's dirty-log, writable-chain
//! and ageing drivers drive shadow paging unchanged.
//!
//! Shadow leaves are long-mode entries the processor walks: it sets their A
//! and D bits, which are cleared with `fetch_and`. Every shadow leaf maps
//! 4 KiB, so there is nothing to split. The reverse map files each leaf
//! under its slot and guest frame; a guest frame may be mapped by several
//! leaves (several linear addresses, several address spaces), and the
//! drivers visit each.

use core::sync::atomic::Ordering;

use mmu_generic::addr::GfnRange;
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend};
use mmu_generic::memslot::Memslot;
use mmu_generic::pte_list::PteHandle;

use super::guest_walk::PhysMemory;
use super::mmu::ShadowMmu;
use super::mode::{A, D, P, RW};
use crate::frame::FrameMemory;
use crate::tdp::HostMemory;

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> ShadowMmu<M, G, H> {
    fn present_leaf(&self, h: PteHandle) -> Option<(u64, Leaf)> {
        let (i, j) = self.leaf_at(h)?;
        let e = self.entry(i, j).load(Ordering::Acquire);
        if e & P == 0 {
            return None;
        }
        let leaf = Leaf {
            gfn: self.leaf_gfn(i, j),
            npages: 1,
            writable: e & RW != 0,
            young: e & A != 0,
            dirty: e & D != 0,
            access_tracked: false,
        };
        Some((e, leaf))
    }

    fn clear_leaf_bits(&self, h: PteHandle, mask: u64, flush: &mut FlushToken) -> bool {
        let Some((_, leaf)) = self.present_leaf(h) else { return false };
        let (i, j) = self.leaf_at(h).expect("present_leaf found it");
        let old = self.entry(i, j).fetch_and(!mask, Ordering::AcqRel);
        let was = old & mask != 0;
        if was {
            // A cached translation would let the processor write (or access)
            // without the bit being set again.
            flush.add_range(leaf.gfns());
        }
        was
    }
}

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> MmuBackend for ShadowMmu<M, G, H> {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.rmap_for_each(slot.id(), gfns, f);
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        self.present_leaf(h).map(|(_, l)| l)
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_leaf_bits(h, RW, flush)
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_leaf_bits(h, D, flush)
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_leaf_bits(h, A, flush)
    }

    fn split_huge(&mut self, h: PteHandle, _flush: &mut FlushToken) -> Result<(), BackendError> {
        // Shadow leaves are all 4 KiB.
        self.present_leaf(h).map(|_| ()).ok_or(BackendError::NotALeaf(h))
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        let leaf = self.zap_handle(h)?;
        flush.add_range(leaf.gfns());
        Some(leaf)
    }

    fn drain_lost_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        self.drain_zapped_dirty(gfns, f);
    }

    fn track_lost_dirty(&mut self, on: bool) {
        self.count_lost_dirty_log(on);
    }
}
