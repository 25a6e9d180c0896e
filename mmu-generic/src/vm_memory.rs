//! rust-vmm interop (feature `vm-memory`, which needs `std`).
//!
//! A VMM built on [`vm_memory`] keeps guest RAM in a
//! [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) and emulates devices by
//! writing it through [`GuestMemory`]; the MMU's view of the same RAM is a
//! [`Memslots`] set. This module joins the two:
//!
//! - **Addresses**: [`Gpa`] and [`GuestAddress`] convert both ways with
//!   `From`; [`gfn_of`] and [`guest_address_of`] go between a guest address
//!   and its frame.
//! - **Memslots from regions**: [`memslots_from_guest_memory`] (or
//!   [`add_regions`] into an existing builder) makes one slot per region,
//!   with the region's host mapping as the slot's host-virtual address, so
//!   a fault resolves the same host byte the VMM writes.
//! - **A shared dirty bitmap**: [`VmDirtyBitmap`] is a
//!   [`vm_memory::bitmap::Bitmap`] (and [`NewBitmap`], so
//!   `GuestMemoryMmap::<VmDirtyBitmap>::from_ranges` gives every region one)
//!   backed by this crate's [`DirtyBitmap`]. Writes the VMM makes through
//!   `GuestMemory` (virtio queues, DMA emulation) never fault in the MMU, so
//!   the MMU's dirty log cannot see them: they land in this bitmap instead,
//!   and a migration round folds it into the slot's harvest
//!   ([`VmDirtyBitmap::fold_into`]) before copying. Page `i` of a region is
//!   bit `i` in both, because a slot made from the region starts where the
//!   region starts.
//!
//! ```
//! use mmu_generic::addr::{Gfn, Gpa};
//! use mmu_generic::memslot::{SlotFlags, SlotId};
//! use mmu_generic::vm_memory::{memslots_from_guest_memory, VmDirtyBitmap};
//! use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
//!
//! // The VMM's guest RAM: 1 MiB at 0 and 1 MiB at 4 GiB, one dirty bitmap per region.
//! let mem: GuestMemoryMmap<VmDirtyBitmap> =
//!     GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
//!         .expect("anonymous memory");
//! let slots = memslots_from_guest_memory(&mem, SlotFlags::DIRTY_LOG).expect("page-aligned regions");
//! let high = slots.lookup(Gpa(1 << 32).gfn()).expect("the second region");
//! assert_eq!((high.id(), high.base_gfn(), high.npages()), (SlotId(1), Gfn(0x10_0000), 256));
//!
//! // A device model writes guest memory: the page is logged for the migration.
//! mem.write_obj(0xabcd_u16, GuestAddress((1 << 32) + 0x5008)).expect("inside guest memory");
//! let region = mem.find_region(GuestAddress(1 << 32)).expect("the second region");
//! let mut harvest = vec![0u64; 4]; // the MMU's own round of slot 1 (nothing dirty there)
//! assert_eq!(region.bitmap().fold_into(&mut harvest), 1);
//! assert_eq!(harvest[0], 1 << 5);
//! ```

extern crate std;

use alloc::vec::Vec;
use core::fmt;
use core::ops::Deref;
use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion, MemoryRegionAddress};

use crate::addr::{Gfn, Gpa, Hva, PAGE_SHIFT, PAGE_SIZE};
use crate::dirty_bitmap::DirtyBitmap;
use crate::memslot::{Memslot, MemslotError, Memslots, MemslotsBuilder, SlotFlags, SlotId, MAX_SLOTS};

impl From<Gpa> for GuestAddress {
    fn from(gpa: Gpa) -> Self {
        GuestAddress(gpa.0)
    }
}

impl From<GuestAddress> for Gpa {
    fn from(addr: GuestAddress) -> Self {
        Gpa(addr.0)
    }
}

/// The guest frame holding `addr`.
pub fn gfn_of(addr: GuestAddress) -> Gfn {
    Gpa::from(addr).gfn()
}

/// The first byte of `gfn`, or `None` if it does not fit 64 bits.
pub fn guest_address_of(gfn: Gfn) -> Option<GuestAddress> {
    gfn.gpa().map(GuestAddress::from)
}

/// Why a `GuestMemory`'s regions could not become memslots.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmMemoryError {
    /// Region `index` starts at a guest address that is not 4 KiB aligned.
    MisalignedRegion {
        /// Position of the region in the `GuestMemory`'s iteration order.
        index: usize,
        /// Its start.
        start: GuestAddress,
    },
    /// Region `index` is not a whole number of 4 KiB pages long.
    PartialPage {
        /// Position of the region.
        index: usize,
        /// Its length in bytes.
        len: u64,
    },
    /// Region `index` has no host mapping to back a slot.
    NoHostMapping {
        /// Position of the region.
        index: usize,
    },
    /// More regions than slot numbers from the first one asked for.
    TooManyRegions {
        /// The first slot number.
        first: SlotId,
        /// Number of regions.
        regions: usize,
    },
    /// The slots were refused (overlap with a slot already in the builder,
    /// a host address that does not fit, ...).
    Memslot(MemslotError),
}

impl fmt::Display for VmMemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MisalignedRegion { index, start } => {
                write!(f, "guest memory region {index} starts at {:#x}, not on a 4 KiB page", start.0)
            }
            Self::PartialPage { index, len } => {
                write!(f, "guest memory region {index} is {len:#x} bytes, not a whole number of 4 KiB pages")
            }
            Self::NoHostMapping { index } => write!(f, "guest memory region {index} has no host mapping"),
            Self::TooManyRegions { first, regions } => {
                write!(f, "{regions} regions do not fit slot numbers {} to {}", first.0, MAX_SLOTS - 1)
            }
            Self::Memslot(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for VmMemoryError {}

impl From<MemslotError> for VmMemoryError {
    fn from(e: MemslotError) -> Self {
        Self::Memslot(e)
    }
}

/// Adds one slot per region of `mem` to `builder`, numbered from `first`
/// in the order `mem` iterates its regions (by guest address for a
/// `GuestMemoryMmap`), each with `flags`. Returns the slot numbers given.
///
/// Nothing is added unless every region qualifies; the builder's own checks
/// (overlaps with the slots it already holds) run at
/// [`MemslotsBuilder::build`].
pub fn add_regions<M: GuestMemory>(
    builder: &mut MemslotsBuilder,
    mem: &M,
    first: SlotId,
    flags: SlotFlags,
) -> Result<Vec<SlotId>, VmMemoryError> {
    let regions = mem.num_regions();
    if first.0 as usize + regions > MAX_SLOTS {
        return Err(VmMemoryError::TooManyRegions { first, regions });
    }
    let mut slots = Vec::with_capacity(regions);
    for (index, region) in mem.iter().enumerate() {
        let start = region.start_addr();
        let len = region.len();
        if Gpa::from(start).page_offset() != 0 {
            return Err(VmMemoryError::MisalignedRegion { index, start });
        }
        if len % PAGE_SIZE != 0 {
            return Err(VmMemoryError::PartialPage { index, len });
        }
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| VmMemoryError::NoHostMapping { index })?;
        let id = SlotId(first.0 + index as u16);
        slots.push(Memslot::new(id, gfn_of(start), len >> PAGE_SHIFT, Hva(host as usize as u64), flags));
    }
    for slot in &slots {
        builder.create(*slot)?;
    }
    Ok(slots.iter().map(|s| s.id()).collect())
}

/// The memslot set of `mem`: slot `i` is its `i`-th region, with `flags`.
pub fn memslots_from_guest_memory<M: GuestMemory>(
    mem: &M,
    flags: SlotFlags,
) -> Result<Memslots, VmMemoryError> {
    let mut builder = MemslotsBuilder::new();
    add_regions(&mut builder, mem, SlotId(0), flags)?;
    Ok(builder.build()?)
}

/// The pages `[first, first + n)` that the bytes `[offset, offset + len)`
/// touch, or `None` for an empty or overflowing range.
fn pages_of(offset: usize, len: usize) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let last = (offset as u64).checked_add(len as u64 - 1)?;
    let first = offset as u64 >> PAGE_SHIFT;
    Some((first, (last >> PAGE_SHIFT) - first + 1))
}

/// A region's dirty bitmap for vm-memory, one bit per 4 KiB page, shared
/// with the hypervisor's migration code.
///
/// Cloning makes another handle to the same bits (vm-memory's own
/// `AtomicBitmapArc` deep-copies instead); [`VmDirtyBitmap::shared`] hands
/// out the underlying [`DirtyBitmap`]. vm-memory marks after each write
/// through `GuestMemory`; the harvester takes words with an atomic swap, so
/// a write lands in this round or the next.
#[derive(Clone, Debug)]
pub struct VmDirtyBitmap {
    bits: Arc<DirtyBitmap>,
}

impl VmDirtyBitmap {
    /// A clear bitmap of `npages` pages.
    pub fn new(npages: u64) -> Self {
        Self { bits: Arc::new(DirtyBitmap::new(npages)) }
    }

    /// A handle to an existing bitmap.
    pub fn from_shared(bits: Arc<DirtyBitmap>) -> Self {
        Self { bits }
    }

    /// The bitmap itself, to keep beside the slot's dirty log.
    pub fn shared(&self) -> Arc<DirtyBitmap> {
        Arc::clone(&self.bits)
    }

    /// Takes every word, leaving the bitmap clear, and ORs it into `words`
    /// (a slot's harvest: one `u64` per 64 pages, page 0 in bit 0 of word 0).
    /// Words beyond either length are left alone. Returns the number of
    /// pages taken.
    pub fn fold_into(&self, words: &mut [u64]) -> u64 {
        let mut taken = 0;
        for (i, out) in words.iter_mut().enumerate().take(self.bits.words()) {
            let w = self.bits.take_word(i);
            taken += u64::from(w.count_ones());
            *out |= w;
        }
        taken
    }
}

impl Default for VmDirtyBitmap {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Deref for VmDirtyBitmap {
    type Target = DirtyBitmap;

    fn deref(&self) -> &DirtyBitmap {
        &self.bits
    }
}

impl<'a> WithBitmapSlice<'a> for VmDirtyBitmap {
    type S = VmDirtySlice<'a>;
}

impl Bitmap for VmDirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((first, n)) = pages_of(offset, len) {
            self.bits.set_range(first, n);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.test(offset as u64 >> PAGE_SHIFT)
    }

    fn slice_at(&self, offset: usize) -> VmDirtySlice<'_> {
        VmDirtySlice { bits: &self.bits, base: offset }
    }
}

impl NewBitmap for VmDirtyBitmap {
    fn with_len(len: usize) -> Self {
        Self::new((len as u64).div_ceil(PAGE_SIZE))
    }
}

/// The part of a [`VmDirtyBitmap`] from byte `base` of its region on, as
/// vm-memory hands it to a `VolatileSlice`: offsets are relative to `base`.
#[derive(Clone, Copy, Debug)]
pub struct VmDirtySlice<'a> {
    bits: &'a DirtyBitmap,
    base: usize,
}

impl<'a> WithBitmapSlice<'_> for VmDirtySlice<'a> {
    type S = Self;
}

impl BitmapSlice for VmDirtySlice<'_> {}

impl Bitmap for VmDirtySlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((first, n)) = self.base.checked_add(offset).and_then(|o| pages_of(o, len)) {
            self.bits.set_range(first, n);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.base.checked_add(offset).is_some_and(|o| self.bits.test(o as u64 >> PAGE_SHIFT))
    }

    fn slice_at(&self, offset: usize) -> Self {
        Self { bits: self.bits, base: self.base.saturating_add(offset) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    use alloc::vec;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MIB: usize = 1 << 20;

    #[test]
    fn addresses_convert_both_ways() {
        let a = GuestAddress(0x1234_5678);
        assert_eq!(Gpa::from(a), Gpa(0x1234_5678));
        assert_eq!(GuestAddress::from(Gpa(0xdead_b000)), GuestAddress(0xdead_b000));
        assert_eq!(gfn_of(a), Gfn(0x12345));
        assert_eq!(guest_address_of(Gfn(0x12345)), Some(GuestAddress(0x1234_5000)));
        assert_eq!(guest_address_of(Gfn(1 << 52)), None, "a frame past 64-bit addresses");
    }

    #[test]
    fn slots_from_regions_resolve_the_host_bytes_vm_memory_resolves() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(0x1_0000_0000), 2 * MIB)])
                .expect("anonymous mappings");
        let slots = memslots_from_guest_memory(&mem, SlotFlags::DIRTY_LOG).expect("aligned regions");
        assert_eq!(slots.len(), 2);
        let high = slots.get(SlotId(1)).expect("second region");
        assert_eq!((high.base_gfn(), high.npages()), (Gfn(0x10_0000), 512));
        assert!(high.flags().contains(SlotFlags::DIRTY_LOG));
        for gpa in [0u64, 0x1000, 0xf_f000, 0x1_0000_0000, 0x1_0012_3000, 0x1_001f_f000] {
            let slot = slots.lookup(Gpa(gpa).gfn()).expect("inside a region");
            let ours = slot.gfn_to_hva(Gpa(gpa).gfn()).expect("inside the slot");
            let theirs = mem.get_host_address(GuestAddress(gpa)).expect("inside a region");
            assert_eq!(ours, Hva(theirs as usize as u64), "gpa {gpa:#x}");
        }
        assert!(slots.lookup(Gfn(0x100)).is_none(), "the hole between the regions");
    }

    #[test]
    fn regions_that_are_not_whole_pages_are_refused() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1800), 0x2000)]).expect("mapping");
        assert_eq!(
            memslots_from_guest_memory(&mem, SlotFlags::empty()).unwrap_err(),
            VmMemoryError::MisalignedRegion { index: 0, start: GuestAddress(0x1800) }
        );
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x4000), 0x1800)])
                .expect("mapping");
        assert_eq!(
            memslots_from_guest_memory(&mem, SlotFlags::empty()).unwrap_err(),
            VmMemoryError::PartialPage { index: 1, len: 0x1800 }
        );
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mapping");
        let mut b = MemslotsBuilder::new();
        assert_eq!(
            add_regions(&mut b, &mem, SlotId(MAX_SLOTS as u16), SlotFlags::empty()).unwrap_err(),
            VmMemoryError::TooManyRegions { first: SlotId(MAX_SLOTS as u16), regions: 1 }
        );
    }

    #[test]
    fn region_slots_join_an_existing_set_and_overlaps_are_refused() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), MIB)]).expect("mapping");
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), 0x100, Hva(0x7f00_0000_0000), SlotFlags::empty()))
            .expect("new");
        assert_eq!(add_regions(&mut b, &mem, SlotId(5), SlotFlags::READONLY), Ok(vec![SlotId(5)]));
        let slots = b.build().expect("disjoint");
        assert_eq!(slots.lookup(Gfn(0x100)).map(|s| s.id()), Some(SlotId(5)));

        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0xff), 2, Hva(0x7f00_0000_0000), SlotFlags::empty()))
            .expect("new");
        add_regions(&mut b, &mem, SlotId(1), SlotFlags::empty()).expect("regions qualify");
        assert_eq!(b.build().unwrap_err(), MemslotError::Overlap { slot: SlotId(0), other: SlotId(1) });
    }

    /// Every page the VMM writes through vm-memory, and no other, is in our
    /// bitmap: object writes across a page boundary, slices taken inside a
    /// region (vm-memory hands those a bitmap slice at an offset), and a
    /// buffer that spans two regions.
    #[test]
    fn writes_through_guest_memory_are_logged_in_our_bitmap() {
        let mem: GuestMemoryMmap<VmDirtyBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(MIB as u64), MIB)])
                .expect("mapping");
        let regions: Vec<_> = mem.iter().collect();
        let (low, high) = (regions[0].bitmap(), regions[1].bitmap());
        assert_eq!((low.npages(), high.npages()), (256, 256));

        mem.write_obj(0x1122_3344u32, GuestAddress(0x3ffe)).expect("inside");
        let mut read = [0u8; 64];
        mem.read_slice(&mut read, GuestAddress(0x8000)).expect("inside");
        assert_eq!((low.count(), low.test(3), low.test(4)), (2, true, true), "u32 across pages 3 and 4");

        let slice = mem.get_slice(GuestAddress(0x2_0000), 0x3000).expect("inside");
        slice.write_obj(7u64, 0x1ff8).expect("inside the slice");
        let sub = slice.offset(0x2000).expect("inside the slice");
        sub.write_obj(9u8, 0xfff).expect("inside");
        assert!(low.test(0x21) && low.test(0x22), "slice-relative offsets land at the slice's pages");
        assert_eq!(low.count(), 4);
        assert!(low.dirty_at(0x2_1000) && !low.dirty_at(0x2_3000));

        // Last page of the low region and first of the high one.
        mem.write_slice(&[0xaa; 0x20], GuestAddress(MIB as u64 - 0x10)).expect("spans two regions");
        assert!(low.test(255) && high.test(0));
        assert_eq!((low.count(), high.count()), (5, 1));
        assert!(mem.get_slice(GuestAddress(0x2_2800), 64).expect("inside").bitmap().dirty_at(0));
        assert!(!low.test(8), "reads mark nothing");
    }

    #[test]
    fn a_migration_round_folds_the_vmm_writes_into_the_slot_harvest() {
        let mem: GuestMemoryMmap<VmDirtyBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 * 4096)]).expect("mapping");
        let slots = memslots_from_guest_memory(&mem, SlotFlags::DIRTY_LOG).expect("aligned");
        let region = mem.iter().next().expect("one region");
        let vmm = region.bitmap().clone();
        assert!(Arc::ptr_eq(&vmm.shared(), &region.bitmap().shared()), "clones share the bits");
        assert_eq!(slots.get(SlotId(0)).map(|s| s.npages()), Some(vmm.npages()));

        mem.write_obj(1u8, GuestAddress(5 * 4096)).expect("inside");
        mem.write_obj(1u8, GuestAddress(200 * 4096 + 17)).expect("inside");
        // The MMU's harvest of the same slot (as `get_and_clear` returns it)
        // already has page 5 and page 70.
        let mut harvest = vec![1u64 << 5, 1 << 6, 0, 0];
        assert_eq!(vmm.fold_into(&mut harvest), 2);
        assert_eq!(harvest, [1 << 5, 1 << 6, 0, 1 << 8]);
        assert_eq!(region.bitmap().count(), 0, "taken");
        assert_eq!(vmm.fold_into(&mut harvest), 0);
    }

    #[test]
    fn empty_and_overflowing_marks_change_nothing() {
        let b = VmDirtyBitmap::new(4);
        b.mark_dirty(0x1000, 0);
        b.slice_at(usize::MAX - 3).mark_dirty(8, 1);
        b.mark_dirty(usize::MAX, 2);
        b.mark_dirty(0x3fff, 0x10_0000);
        assert_eq!(b.count(), 1, "only page 3: the rest is clipped to the bitmap");
        assert!(b.dirty_at(0x3000) && !b.slice_at(usize::MAX).dirty_at(1));
    }
}
