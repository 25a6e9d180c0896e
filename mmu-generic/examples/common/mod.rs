//! A minimal back end: the smallest page-table format the generic drivers can
//! run on, written the way a real one is (shared by the mmu-generic examples).
//!
//! The "hardware" is an array of one-level leaf entries, one per mapped 4 KiB
//! guest page, in whatever order they were created: bit 0 present, bit 1
//! writable, bit 5 accessed, bit 6 dirty, the guest frame in bits 12 and up.
//! [`FlatMmu::cpu_access`] plays the CPU: it uses an entry only if it permits
//! the access and sets A (and D on a write) atomically, as hardware does
//! while the hypervisor clears them. The core's [`Rmap`] finds the entries
//! that map a guest frame, so the drivers never scan the array.

#![allow(dead_code)] // each example uses part of it

use std::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, GfnRange, PAGE_SHIFT};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend, TlbFlush};
use mmu_generic::dirty_log::SlotDirtyLog;
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags};
use mmu_generic::pte_list::PteHandle;
use mmu_generic::rmap::Rmap;

const P: u64 = 1 << 0;
const W: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;

/// The leaf entries, their reverse map, and the slots they map.
pub struct FlatMmu {
    entries: Vec<AtomicU64>,
    free: Vec<u32>,
    rmap: Rmap,
    slots: Memslots,
}

/// What the CPU did with an access.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// The entry permitted it; A (and D) are set.
    Done,
    /// No entry, or a write to a read-only one: the hypervisor must serve a fault.
    Fault,
}

impl FlatMmu {
    /// An empty table for `slots`.
    pub fn new(slots: &Memslots) -> Self {
        let mut rmap = Rmap::new(&[PAGE_SHIFT]);
        rmap.sync_slots(slots);
        Self { entries: Vec::new(), free: Vec::new(), rmap, slots: slots.clone() }
    }

    /// The slots the table maps.
    pub fn memslots(&self) -> &Memslots {
        &self.slots
    }

    /// Number of present entries.
    pub fn mapped(&self) -> usize {
        self.entries.iter().filter(|e| e.load(Ordering::Relaxed) & P != 0).count()
    }

    fn handle_of(&self, gfn: Gfn) -> Option<PteHandle> {
        let slot = self.slots.lookup(gfn)?;
        self.rmap.list(slot.id(), gfn, 0).next()
    }

    fn entry(&self, h: PteHandle) -> Option<&AtomicU64> {
        self.entries.get(h.0 as usize)
    }

    /// The CPU's access to `gfn`.
    pub fn cpu_access(&self, gfn: Gfn, write: bool) -> Access {
        let Some(e) = self.handle_of(gfn).and_then(|h| self.entry(h)) else { return Access::Fault };
        let v = e.load(Ordering::Acquire);
        if v & P == 0 || (write && v & W == 0) {
            return Access::Fault;
        }
        e.fetch_or(if write { A | D } else { A }, Ordering::AcqRel);
        Access::Done
    }

    /// The hypervisor's fault handler: maps `gfn` (read-only in a
    /// dirty-logged slot unless the fault is a write, so that write
    /// protection sees the first write), or makes its entry writable. A leaf
    /// made writable is reported to the slot's dirty log, if it has one.
    pub fn fault(&mut self, gfn: Gfn, write: bool, log: Option<&SlotDirtyLog>) -> Option<PteHandle> {
        let slot = *self.slots.lookup(gfn)?;
        if write && slot.flags().contains(SlotFlags::READONLY) {
            return None;
        }
        let logged = slot.flags().contains(SlotFlags::DIRTY_LOG);
        let writable = !slot.flags().contains(SlotFlags::READONLY) && (write || !logged);
        let h = match self.handle_of(gfn) {
            Some(h) => {
                if writable {
                    self.entries[h.0 as usize].fetch_or(W, Ordering::AcqRel);
                }
                h
            }
            None => {
                let new = (gfn.0 << PAGE_SHIFT) | P | if writable { W } else { 0 };
                let h = match self.free.pop() {
                    Some(i) => {
                        self.entries[i as usize].store(new, Ordering::Release);
                        PteHandle(i)
                    }
                    None => {
                        self.entries.push(AtomicU64::new(new));
                        PteHandle(self.entries.len() as u32 - 1)
                    }
                };
                // A real hypervisor tops up the reserve before taking its MMU lock.
                self.rmap.reserve(1);
                self.rmap.add(slot.id(), gfn, 0, h).expect("the reserve was topped up");
                h
            }
        };
        if writable {
            if let Some(log) = log {
                log.note_writable(gfn, h, None).expect("the frame is in the logged slot");
            }
        }
        Some(h)
    }

    /// Clears `bits` in entry `h`, recording a flush when one was set.
    fn clear_bits(&self, h: PteHandle, bits: u64, flush: &mut FlushToken) -> bool {
        let Some(e) = self.entry(h) else { return false };
        let old = e.fetch_and(!bits, Ordering::AcqRel);
        let hit = old & P != 0 && old & bits != 0;
        if hit {
            flush.add_range(one_page(Gfn(old >> PAGE_SHIFT)));
        }
        hit
    }
}

fn one_page(gfn: Gfn) -> GfnRange {
    GfnRange { start: gfn, end: Gfn(gfn.0 + 1) }
}

impl MmuBackend for FlatMmu {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.rmap.for_each_in(slot.id(), gfns, |_level, h| f(h));
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        let v = self.entry(h)?.load(Ordering::Acquire);
        (v & P != 0).then_some(Leaf {
            gfn: Gfn(v >> PAGE_SHIFT),
            npages: 1,
            writable: v & W != 0,
            young: v & A != 0,
            dirty: v & D != 0,
            access_tracked: false,
        })
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_bits(h, W, flush)
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_bits(h, D, flush)
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        self.clear_bits(h, A, flush)
    }

    /// This format has no huge leaves; a format that cannot split zaps.
    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        self.zap(h, flush).map(|_| ()).ok_or(BackendError::NotALeaf(h))
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        let leaf = self.leaf(h)?;
        // The swap returns the final A/D bits the CPU set.
        let old = self.entries[h.0 as usize].swap(0, Ordering::AcqRel);
        let slot = self.slots.lookup(leaf.gfn).expect("leaves map slot memory").id();
        self.rmap.remove(slot, leaf.gfn, 0, h).expect("every leaf is in the reverse map");
        self.free.push(h.0);
        flush.add_range(leaf.gfns());
        Some(Leaf { young: old & A != 0, dirty: old & D != 0, ..leaf })
    }
}

/// A TLB that counts what it is asked to flush.
#[derive(Default, Debug)]
pub struct CountingTlb {
    /// Range flushes.
    pub ranges: u64,
    /// Pages covered by range flushes.
    pub pages: u64,
    /// Full flushes.
    pub alls: u64,
}

impl TlbFlush for CountingTlb {
    fn flush_range(&mut self, range: GfnRange) {
        self.ranges += 1;
        self.pages += range.len();
    }

    fn flush_all(&mut self) {
        self.alls += 1;
    }
}
