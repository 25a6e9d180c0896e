//! A per-vCPU dirty ring of (slot, page offset) entries.
//!
//! The protocol is KVM's: the vCPU (on its write faults) pushes entries and
//! flags each `DIRTY`; the harvester (the migration thread) collects `DIRTY`
//! entries in order and flags each `RESET`; the MMU then re-protects the
//! collected pages and frees their entries ([`DirtyRing::reset`]). Each entry
//! changes hands through its flag word with release/acquire ordering, so the
//! three parties never share any other write.
//!
//! The ring reports "soft full" when only `reserve` entries are left: the
//! vCPU must then exit to let the harvester run, and the reserve absorbs the
//! writes it makes on its way out. A push into a truly full ring is refused,
//! never silently dropped.

use alloc::boxed::Box;

use crate::memslot::SlotId;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

const FREE: u32 = 0;
const DIRTY: u32 = 1;
const RESET: u32 = 2;

#[derive(Debug)]
struct Entry {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// What a successful push means for the vCPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RingPush {
    /// Room remains.
    Ok,
    /// The ring reached its soft limit: exit to the harvester now.
    SoftFull,
}

/// A push found no free entry: the write was not logged and the vCPU must
/// not proceed with it until the harvester has reset the ring.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RingFull;

/// Why a ring could not be made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RingSizeError {
    /// The size must be a power of two of at least 2.
    NotPowerOfTwo(u32),
    /// The reserve must leave at least one usable entry.
    ReserveTooLarge(u32),
}

/// One vCPU's dirty ring.
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[Entry]>,
    mask: u32,
    soft_limit: u32,
    /// Next entry the vCPU pushes (written by the vCPU only).
    dirty_index: AtomicU32,
    /// Next entry `reset` frees (written by the MMU only).
    reset_index: AtomicU32,
}

impl DirtyRing {
    /// A ring of `size` entries (a power of two) that reports soft-full when
    /// `reserve` free entries remain.
    pub fn new(size: u32, reserve: u32) -> Result<Self, RingSizeError> {
        if size < 2 || !size.is_power_of_two() {
            return Err(RingSizeError::NotPowerOfTwo(size));
        }
        if reserve >= size {
            return Err(RingSizeError::ReserveTooLarge(reserve));
        }
        let entries = (0..size)
            .map(|_| Entry {
                flags: AtomicU32::new(FREE),
                slot: AtomicU32::new(0),
                offset: AtomicU64::new(0),
            })
            .collect();
        Ok(Self {
            entries,
            mask: size - 1,
            soft_limit: size - reserve,
            dirty_index: AtomicU32::new(0),
            reset_index: AtomicU32::new(0),
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        self.mask + 1
    }

    /// Entries pushed and not yet reset.
    pub fn used(&self) -> u32 {
        self.dirty_index.load(Ordering::Acquire).wrapping_sub(self.reset_index.load(Ordering::Acquire))
    }

    /// Whether the ring is at or past its soft limit.
    pub fn is_soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// vCPU side: logs a write to page `offset` of `slot`.
    pub fn push(&self, slot: SlotId, offset: u64) -> Result<RingPush, RingFull> {
        let idx = self.dirty_index.load(Ordering::Relaxed);
        let e = &self.entries[(idx & self.mask) as usize];
        // Acquire: the reset that freed this entry happened before we reuse it.
        if e.flags.load(Ordering::Acquire) != FREE {
            return Err(RingFull);
        }
        e.slot.store(slot.0 as u32, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: the harvester that sees DIRTY sees slot and offset.
        e.flags.store(DIRTY, Ordering::Release);
        self.dirty_index.store(idx.wrapping_add(1), Ordering::Release);
        Ok(if self.is_soft_full() { RingPush::SoftFull } else { RingPush::Ok })
    }

    /// Harvester side: collects the `DIRTY` entries from `*fetch_index` on,
    /// in order, calling `f(slot, offset)` and flagging each `RESET`. The
    /// harvester keeps `fetch_index` between calls (it starts at 0). Returns
    /// the number collected.
    pub fn harvest(&self, fetch_index: &mut u32, mut f: impl FnMut(SlotId, u64)) -> u32 {
        let mut n = 0;
        loop {
            let e = &self.entries[(*fetch_index & self.mask) as usize];
            // Acquire pairs with push's release of DIRTY.
            if e.flags.load(Ordering::Acquire) != DIRTY {
                return n;
            }
            f(SlotId(e.slot.load(Ordering::Relaxed) as u16), e.offset.load(Ordering::Relaxed));
            e.flags.store(RESET, Ordering::Release);
            *fetch_index = fetch_index.wrapping_add(1);
            n += 1;
        }
    }

    /// MMU side (under the MMU lock): frees the collected entries in order,
    /// calling `f(slot, offset)` on each so the page can be re-protected
    /// before the vCPU may log it again. Returns the number freed.
    pub fn reset(&self, mut f: impl FnMut(SlotId, u64)) -> u32 {
        let mut n = 0;
        let mut idx = self.reset_index.load(Ordering::Relaxed);
        loop {
            let e = &self.entries[(idx & self.mask) as usize];
            if e.flags.load(Ordering::Acquire) != RESET {
                break;
            }
            f(SlotId(e.slot.load(Ordering::Relaxed) as u16), e.offset.load(Ordering::Relaxed));
            // Release: the vCPU that sees FREE sees the re-protection done.
            e.flags.store(FREE, Ordering::Release);
            idx = idx.wrapping_add(1);
            n += 1;
        }
        self.reset_index.store(idx, Ordering::Release);
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn ring_sizes_are_checked() {
        assert_eq!(DirtyRing::new(6, 1).unwrap_err(), RingSizeError::NotPowerOfTwo(6));
        assert_eq!(DirtyRing::new(8, 8).unwrap_err(), RingSizeError::ReserveTooLarge(8));
    }

    #[test]
    fn push_harvest_reset_in_order_with_soft_full_signal() {
        let ring = DirtyRing::new(4, 1).unwrap();
        assert_eq!(ring.push(SlotId(1), 10), Ok(RingPush::Ok));
        assert_eq!(ring.push(SlotId(1), 11), Ok(RingPush::Ok));
        assert_eq!(ring.push(SlotId(2), 12), Ok(RingPush::SoftFull));
        assert_eq!(ring.push(SlotId(2), 13), Ok(RingPush::SoftFull));
        assert_eq!(ring.push(SlotId(2), 14), Err(RingFull));
        let mut fetch = 0;
        let mut got = Vec::new();
        assert_eq!(ring.harvest(&mut fetch, |s, o| got.push((s.0, o))), 4);
        assert_eq!(got, [(1, 10), (1, 11), (2, 12), (2, 13)]);
        // Collected but not reset: still full.
        assert_eq!(ring.push(SlotId(2), 14), Err(RingFull));
        let mut reset = Vec::new();
        assert_eq!(ring.reset(|s, o| reset.push((s.0, o))), 4);
        assert_eq!(reset, got);
        assert_eq!(ring.used(), 0);
        assert_eq!(ring.push(SlotId(3), 15), Ok(RingPush::Ok));
        assert_eq!(ring.harvest(&mut fetch, |s, o| assert_eq!((s.0, o), (3, 15))), 1);
    }
}
