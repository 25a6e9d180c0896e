//! Memslots: guest-physical ranges backed by host-virtual ranges.
//!
//! A [`Memslots`] set is immutable. Changing it (create, delete, move, a flag
//! change) builds a whole new set with the next generation through
//! [`MemslotsBuilder`], which is where every invariant is checked: no two slots
//! share a gfn, no slot is empty, no range overflows, every hva is page
//! aligned. Readers hold a set and never see it change under them.
//!
//! Lookup by gfn is the hottest path of a fault. The set is a sorted array:
//! with a handful of slots a scan wins; beyond that a direct index of about
//! two buckets a slot names each bucket's first candidate; and beyond 1024
//! slots the index keeps, per bucket, copies of its first two candidate
//! slots on one cache line, so a lookup reads that line and returns a copy
//! from it (a bucket word per bucket settles the rare bucket with more
//! candidates); and a caller-owned [`SlotHint`] (one per vCPU) remembers the
//! line of the last hit without any shared write, so concurrent lookups
//! never contend on a cache line. The copies cost 64 bytes a bucket (two to
//! four buckets a slot) and 32 bytes a slot for a gfn-ordered copy: 5 MiB
//! for 32767 evenly spread slots.
//!
//! **Generations only go up.** A set's generation comes from a counter
//! shared by every set and builder that descends from the same
//! [`MemslotGenerations`] (the VM owns one): two builders made from the same
//! set, or a builder made from scratch with the VM's counter, never build
//! two sets with one generation, so nothing keyed on a generation (a
//! [`SlotHint`], a cached translation) can mistake one set for another.
//! [`MemslotsBuilder::new`] without a counter draws from one process-wide
//! counter, so even unrelated sets never share a generation.
//!
//! Lookup by host-virtual range serves MMU-notifier invalidation and ageing.
//! Host ranges may alias (two slots backed by the same host memory), so the
//! query yields every overlapping slot, not the first.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gfn, GfnRange, Hva, HvaRange, PAGE_SHIFT, PAGE_SIZE};

/// The largest number of slots a set may hold (KVM's `KVM_MEM_SLOTS_NUM`).
pub const MAX_SLOTS: usize = 32767;

/// Below this many slots a lookup scans instead of bisecting.
const LINEAR_SCAN_MAX: usize = 8;

/// Above this many slots lookups return copies from the bucket lines: the
/// bucket words and slots of a smaller set stay in the first-level cache,
/// where the lines (four times the bytes) would not.
const LINES_MIN: usize = 1024;

/// A slot's user-chosen number, below [`MAX_SLOTS`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SlotId(pub u16);

bitflags::bitflags! {
    /// Per-slot behaviour.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct SlotFlags: u32 {
        /// Writes to the slot are logged for live migration.
        const DIRTY_LOG = 1 << 0;
        /// The guest may not write the slot: a write fault is refused with a
        /// typed outcome (the VMM typically emulates it as MMIO, as KVM does).
        const READONLY = 1 << 1;
    }
}

/// One guest-physical range and the host-virtual memory behind it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Memslot {
    id: SlotId,
    base_gfn: Gfn,
    npages: u64,
    hva: Hva,
    flags: SlotFlags,
}

impl Memslot {
    /// Describes a slot; [`MemslotsBuilder::build`] validates it.
    pub const fn new(id: SlotId, base_gfn: Gfn, npages: u64, hva: Hva, flags: SlotFlags) -> Self {
        Self { id, base_gfn, npages, hva, flags }
    }

    /// Holds no gfn and starts above every valid one: fills an index
    /// line's unused half.
    const NONE: Self = Self::new(SlotId(0), Gfn(u64::MAX), 0, Hva(0), SlotFlags::empty());

    /// The slot's number.
    pub const fn id(&self) -> SlotId {
        self.id
    }

    /// First guest frame.
    pub const fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }

    /// Number of 4 KiB pages.
    pub const fn npages(&self) -> u64 {
        self.npages
    }

    /// Host-virtual address of the first page.
    pub const fn hva(&self) -> Hva {
        self.hva
    }

    /// The slot's flags.
    pub const fn flags(&self) -> SlotFlags {
        self.flags
    }

    /// The guest frames the slot covers. Valid slots never overflow; an
    /// unvalidated one is clipped at the top of the gfn space.
    pub const fn gfns(&self) -> GfnRange {
        GfnRange { start: self.base_gfn, end: Gfn(self.base_gfn.0.saturating_add(self.npages)) }
    }

    /// The host-virtual bytes behind the slot. Valid slots never overflow;
    /// an unvalidated one is clipped at the top of the address space.
    pub const fn hvas(&self) -> HvaRange {
        let bytes = if self.npages > u64::MAX >> PAGE_SHIFT { u64::MAX } else { self.npages << PAGE_SHIFT };
        HvaRange { start: self.hva, end: Hva(self.hva.0.saturating_add(bytes)) }
    }

    /// Whether `gfn` lies in the slot.
    #[inline]
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0.wrapping_sub(self.base_gfn.0) < self.npages
    }

    /// The page index of `gfn` inside the slot.
    #[inline]
    pub const fn page_index(&self, gfn: Gfn) -> Option<u64> {
        let idx = gfn.0.wrapping_sub(self.base_gfn.0);
        if idx < self.npages {
            Some(idx)
        } else {
            None
        }
    }

    /// The host-virtual address that backs `gfn` (`None` outside the slot,
    /// or past the top of the address space in an unvalidated slot).
    #[inline]
    pub const fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        match self.page_index(gfn) {
            Some(idx) if idx <= u64::MAX >> PAGE_SHIFT => match self.hva.0.checked_add(idx << PAGE_SHIFT) {
                Some(a) => Some(Hva(a)),
                None => None,
            },
            _ => None,
        }
    }

    /// The guest frames whose backing overlaps `range`, or `None` if none do.
    pub fn gfns_for_hvas(&self, range: &HvaRange) -> Option<GfnRange> {
        let mine = self.hvas();
        if !mine.overlaps(range) || range.start.0 >= range.end.0 {
            return None;
        }
        let first = range.start.0.max(mine.start.0) - mine.start.0;
        let last = range.end.0.min(mine.end.0) - mine.start.0;
        // Partially covered pages count: a notifier for one byte invalidates the page.
        let start = first >> PAGE_SHIFT;
        let end = last.div_ceil(PAGE_SIZE);
        Some(GfnRange {
            start: Gfn(self.base_gfn.0.saturating_add(start)),
            end: Gfn(self.base_gfn.0.saturating_add(end)),
        })
    }

    /// Whether the slot's memory is written through the host mapping for
    /// `size_shift`-sized pages: both the gfn and the hva must be aligned to the
    /// page and the whole page must lie in the slot. A shift below 12 (no
    /// page is smaller than 4 KiB) or of 64 and more is never allowed.
    #[inline]
    pub fn allows_page(&self, gfn: Gfn, size_shift: u32) -> bool {
        if !(PAGE_SHIFT..64).contains(&size_shift) {
            return false;
        }
        let pages = 1u64 << (size_shift - PAGE_SHIFT);
        let head = Gfn(gfn.0 & !(pages - 1));
        let Some(idx) = self.page_index(head) else { return false };
        let Some(hva) = self.gfn_to_hva(head) else { return false };
        idx.checked_add(pages).is_some_and(|end| end <= self.npages)
            && hva.0 & ((1u64 << size_shift) - 1) == 0
    }
}

/// Why a memslot set could not be built or changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemslotError {
    /// Two slots share at least one guest frame.
    Overlap {
        /// The slot with the lower base gfn.
        slot: SlotId,
        /// The slot that starts inside it.
        other: SlotId,
    },
    /// A slot has no pages.
    ZeroSize(SlotId),
    /// `base_gfn + npages` does not fit, or the slot's gpa range does not fit 64 bits.
    GfnOverflow(SlotId),
    /// `hva + npages * 4 KiB` does not fit 64 bits.
    HvaOverflow(SlotId),
    /// The slot's host-virtual address is not 4 KiB aligned.
    MisalignedHva {
        /// The offending slot.
        slot: SlotId,
        /// Its host-virtual address.
        hva: Hva,
    },
    /// Two slots have the same number.
    DuplicateId(SlotId),
    /// The slot number is not below [`MAX_SLOTS`].
    IdOutOfRange(SlotId),
    /// The change names a slot the set does not hold.
    NoSuchSlot(SlotId),
}

impl fmt::Display for MemslotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overlap { slot, other } => {
                write!(f, "memslot {} overlaps memslot {}", slot.0, other.0)
            }
            Self::ZeroSize(s) => write!(f, "memslot {} has no pages", s.0),
            Self::GfnOverflow(s) => write!(f, "memslot {} runs past the guest-physical space", s.0),
            Self::HvaOverflow(s) => write!(f, "memslot {} runs past the host-virtual space", s.0),
            Self::MisalignedHva { slot, hva } => {
                write!(f, "memslot {} has a misaligned host address {}", slot.0, hva)
            }
            Self::DuplicateId(s) => write!(f, "memslot number {} is used twice", s.0),
            Self::IdOutOfRange(s) => write!(f, "memslot number {} is not below {}", s.0, MAX_SLOTS),
            Self::NoSuchSlot(s) => write!(f, "there is no memslot {}", s.0),
        }
    }
}

/// A per-vCPU memory of the last slot a lookup found.
///
/// Owned by the caller (one per vCPU), so a hit costs no shared write. A hint
/// from an older generation is ignored.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotHint {
    generation: u64,
    /// In a set of more than [`LINES_MIN`] slots, where the copy the
    /// last lookup returned is, as `2 * line + half` (the line that lookup
    /// left in the cache); in a smaller one, the slot's place in gfn order.
    index: u32,
}

/// The VM's memslot generation counter: every set built through a builder
/// that holds it (or descends from one that did) gets a larger generation
/// than every set built before. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct MemslotGenerations(Option<Arc<AtomicU64>>);

/// The counter of builders made without one.
static PROCESS_GENERATIONS: AtomicU64 = AtomicU64::new(0);

impl MemslotGenerations {
    /// A counter of the VM's own, starting at 0 (its first set is 1).
    pub fn new() -> Self {
        Self(Some(Arc::new(AtomicU64::new(0))))
    }

    /// The latest generation handed out.
    pub fn last(&self) -> u64 {
        self.counter().load(Ordering::Acquire)
    }

    fn counter(&self) -> &AtomicU64 {
        self.0.as_deref().unwrap_or(&PROCESS_GENERATIONS)
    }

    /// The next generation; never the same twice.
    fn next(&self) -> u64 {
        self.counter().fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// An immutable set of memslots with a generation number.
#[derive(Clone, Default)]
pub struct Memslots {
    generation: u64,
    generations: MemslotGenerations,
    /// Sorted by base gfn; slots never overlap, so also by end gfn.
    by_gfn: Vec<Memslot>,
    /// `by_gfn[i]`'s base gfn and page count, packed apart so the search
    /// touches 8 slots a cache line instead of one and a half.
    starts: Vec<u64>,
    sizes: Vec<u64>,
    /// A direct index over the covered gfn span, one [`Bucket`] word per
    /// `1 << bucket_shift` gfns (and one past the last).
    buckets: Vec<Bucket>,
    /// The copies of slots that lookups return, two to a cache line: first
    /// a [`Line`] per bucket (not the one past the last) with its first two
    /// candidates, then from line `ordered` every slot in gfn order.
    lines: Vec<Line>,
    ordered: usize,
    bucket_base: u64,
    bucket_shift: u32,
    /// Indices into `by_gfn`, sorted by hva start then slot id.
    by_hva: Vec<u32>,
    /// `hva_max_end[i]`: the largest hva end among `by_hva[..=i]`. Monotonic,
    /// so the first candidate of a range query is found by bisection.
    hva_max_end: Vec<u64>,
    /// Indices into `by_gfn`, sorted by slot id.
    by_id: Vec<u32>,
}

/// The generation and the slots in gfn order: the lookup indexes (bucket
/// words, lines of copies, megabytes at 32767 slots) say nothing a reader
/// needs.
impl core::fmt::Debug for Memslots {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Memslots")
            .field("generation", &self.generation)
            .field("slots", &self.by_gfn)
            .finish_non_exhaustive()
    }
}

impl Memslots {
    /// An empty set at generation 0 (drawing later generations from the
    /// process-wide counter).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set at generation 0 whose descendants draw from `generations`.
    pub fn empty_in(generations: &MemslotGenerations) -> Self {
        Self { generations: generations.clone(), ..Self::default() }
    }

    /// The set's generation; each change builds a set with a larger one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The counter this set's descendants draw their generations from.
    pub fn generations(&self) -> &MemslotGenerations {
        &self.generations
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.by_gfn.len()
    }

    /// Whether the set has no slot.
    pub fn is_empty(&self) -> bool {
        self.by_gfn.is_empty()
    }

    /// The slots in gfn order.
    pub fn iter(&self) -> core::slice::Iter<'_, Memslot> {
        self.by_gfn.iter()
    }

    /// The slot with number `id`.
    pub fn get(&self, id: SlotId) -> Option<&Memslot> {
        let pos = self.by_id.binary_search_by_key(&id, |&i| self.by_gfn[i as usize].id).ok()?;
        Some(&self.by_gfn[self.by_id[pos] as usize])
    }

    /// The slot that holds `gfn`.
    #[inline]
    pub fn lookup(&self, gfn: Gfn) -> Option<&Memslot> {
        let n = self.starts.len();
        if n <= LINEAR_SCAN_MAX {
            self.by_gfn.get(self.scan(gfn)?)
        } else if n <= LINES_MIN {
            self.by_gfn.get(self.bucket_search(gfn)?)
        } else {
            self.find(gfn).map(|(_, slot)| slot)
        }
    }

    /// The slot that holds `gfn`, trying the hint's slot first and updating it.
    #[inline]
    pub fn lookup_hinted(&self, gfn: Gfn, hint: &mut SlotHint) -> Option<&Memslot> {
        let n = self.starts.len();
        if n <= LINES_MIN {
            // Index and slots fit the first-level cache: the hint names a
            // slot, and a scan or the bucket words find the others.
            if hint.generation == self.generation {
                if let Some(slot) = self.by_gfn.get(hint.index as usize) {
                    if slot.contains(gfn) {
                        return Some(slot);
                    }
                }
            }
            let i = if n <= LINEAR_SCAN_MAX { self.scan(gfn)? } else { self.bucket_search(gfn)? };
            *hint = SlotHint { generation: self.generation, index: i as u32 };
            return self.by_gfn.get(i);
        }
        if hint.generation == self.generation {
            let at = hint.index as usize;
            if let Some(line) = self.lines.get(at >> 1) {
                let slot = &line.0[at & 1];
                if slot.contains(gfn) {
                    return Some(slot);
                }
            }
        }
        let (at, slot) = self.find(gfn)?;
        // Fewer than 2^32 copies: four a slot, and one per slot.
        *hint = SlotHint { generation: self.generation, index: at as u32 };
        Some(slot)
    }

    /// The slot that holds `gfn` in a set of more than [`LINES_MIN`]
    /// slots, and where the copy returned is: its line and half, as
    /// `2 * line + half`.
    #[inline]
    fn find(&self, gfn: Gfn) -> Option<(usize, &Memslot)> {
        // Bucket `b`'s line. A gfn past the buckets (or below them,
        // wrapped) may land on another line, which is as good.
        let b =
            usize::try_from(gfn.0.wrapping_sub(self.bucket_base) >> self.bucket_shift).unwrap_or(usize::MAX);
        if let Some(line) = self.lines.get(b) {
            // A line's first slot ends before its second starts, so only the
            // one starting at or below `gfn` can hold it: one is checked,
            // without a branch on which (a coin toss for the predictor).
            // Every copy is a slot of the set, so one that holds `gfn` is
            // the answer, whatever line it is on.
            let half = usize::from(gfn.0 >= line.0[1].base_gfn.0);
            let slot = &line.0[half];
            if slot.contains(gfn) {
                return Some((2 * b + half, slot));
            }
        }
        // A third candidate in the bucket, or a gfn outside every slot:
        // the bucket words decide, and the ordered copy answers.
        let i = self.search(gfn)?;
        let line = self.ordered + i / 2;
        Some((2 * line + (i & 1), &self.lines.get(line)?.0[i & 1]))
    }

    /// The slot that holds `gfn` in a set of at most [`LINEAR_SCAN_MAX`].
    #[inline]
    fn scan(&self, gfn: Gfn) -> Option<usize> {
        // A handful of slots: a scan of one cache line wins.
        let starts = &self.starts;
        let i = starts.iter().rposition(|&s| s <= gfn.0)?;
        (gfn.0.wrapping_sub(starts[i]) < self.sizes[i]).then_some(i)
    }

    /// The slot that holds `gfn` in a larger set, from the bucket words.
    ///
    /// Out of line: the pair of copies answers most lookups, and this
    /// path's state would crowd the registers of a caller's loop.
    #[inline(never)]
    fn search(&self, gfn: Gfn) -> Option<usize> {
        self.bucket_search(gfn)
    }

    /// [`Memslots::search`], inline: the whole lookup of a mid-sized set.
    #[inline]
    fn bucket_search(&self, gfn: Gfn) -> Option<usize> {
        let starts = &self.starts;
        let off = gfn.0.checked_sub(self.bucket_base)?;
        let b = (off >> self.bucket_shift) as usize;
        let e = *self.buckets.get(b)?;
        let lo = e.first();
        let i = match e.split() {
            // The rule: one or two candidates, told apart by where the
            // second starts inside the bucket, without a branch (which one
            // holds a random gfn is a coin toss for the predictor) and
            // without reading either slot: a lookup touches the bucket's
            // word and the one slot it returns.
            Some(split) => lo + usize::from(off & ((1 << self.bucket_shift) - 1) >= split),
            None => {
                let hi = (self.buckets.get(b + 1)?.first()).min(starts.len() - 1);
                lo + starts[lo..=hi].partition_point(|&s| s <= gfn.0).checked_sub(1)?
            }
        };
        self.by_gfn.get(i)?.contains(gfn).then_some(i)
    }

    /// Every slot whose host memory overlaps `range`, with the guest frames
    /// that overlap, aliases included, in order of host-virtual start (ties by
    /// slot number).
    pub fn lookup_hva(&self, range: HvaRange) -> HvaOverlaps<'_> {
        // Candidates start below range.end ...
        let end = self.by_hva.partition_point(|&i| self.by_gfn[i as usize].hva.0 < range.end.0);
        // ... and some slot at or before them ends after range.start.
        let start = self.hva_max_end[..end].partition_point(|&e| e <= range.start.0);
        HvaOverlaps { slots: self, range, next: start, end }
    }

    /// A builder holding this set's slots, for a later generation (drawn
    /// from the same counter when the builder builds).
    pub fn to_builder(&self) -> MemslotsBuilder {
        MemslotsBuilder { generations: self.generations.clone(), slots: self.by_gfn.clone() }
    }

    /// How `self` (the old set) became `new`, slot by slot: every slot of
    /// the old set whose mappings cannot survive (deleted, moved, resized,
    /// backed by other host memory, made read-only, or a different slot now
    /// at its gfns), each with the reason. A VMM zaps each such old slot's
    /// leaves (through the old slot, whose reverse map holds them) before it
    /// installs the new set: an invalidation of the old host range then has
    /// nothing left to find, and the new set's slots start empty. Changes of
    /// the dirty-log flag alone keep the mappings and are not listed.
    pub fn stale_slots<'a>(
        &'a self,
        new: &'a Memslots,
    ) -> impl Iterator<Item = (&'a Memslot, SlotChange)> + 'a {
        self.by_gfn.iter().filter_map(move |old| {
            let change = match new.get(old.id) {
                None => SlotChange::Deleted,
                Some(n) if n.base_gfn != old.base_gfn || n.npages != old.npages => SlotChange::Moved,
                Some(n) if n.hva != old.hva => SlotChange::Rebacked,
                Some(n)
                    if !old.flags.contains(SlotFlags::READONLY) && n.flags.contains(SlotFlags::READONLY) =>
                {
                    SlotChange::MadeReadOnly
                }
                Some(_) => return None,
            };
            Some((old, change))
        })
    }
}

/// Why an old slot's mappings must go when a new set replaces its set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlotChange {
    /// The slot is not in the new set (deleted, or deleted and recreated
    /// under another number).
    Deleted,
    /// Its base gfn or size changed.
    Moved,
    /// Same gfns, other host memory: leaves point at the old host pages.
    Rebacked,
    /// It became read-only: writable leaves must go.
    MadeReadOnly,
}

/// Iterator over the slots overlapping a host-virtual range.
#[derive(Clone, Debug)]
pub struct HvaOverlaps<'a> {
    slots: &'a Memslots,
    range: HvaRange,
    next: usize,
    end: usize,
}

impl<'a> Iterator for HvaOverlaps<'a> {
    type Item = (&'a Memslot, GfnRange);

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.end {
            let slot = &self.slots.by_gfn[self.slots.by_hva[self.next] as usize];
            self.next += 1;
            if let Some(gfns) = slot.gfns_for_hvas(&self.range) {
                return Some((slot, gfns));
            }
        }
        None
    }
}

/// Builds the next generation of a [`Memslots`] set.
#[derive(Clone, Debug, Default)]
pub struct MemslotsBuilder {
    generations: MemslotGenerations,
    slots: Vec<Memslot>,
}

impl MemslotsBuilder {
    /// An empty builder drawing its generation from the process-wide
    /// counter: its set's generation is larger than any built before.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder drawing from the VM's counter.
    pub fn with_generations(generations: &MemslotGenerations) -> Self {
        Self { generations: generations.clone(), slots: Vec::new() }
    }

    /// Adds a slot. Its number must not be in use.
    pub fn create(&mut self, slot: Memslot) -> Result<&mut Self, MemslotError> {
        if self.slots.iter().any(|s| s.id == slot.id) {
            return Err(MemslotError::DuplicateId(slot.id));
        }
        self.slots.push(slot);
        Ok(self)
    }

    /// Removes slot `id`.
    pub fn delete(&mut self, id: SlotId) -> Result<&mut Self, MemslotError> {
        let pos = self.position(id)?;
        self.slots.swap_remove(pos);
        Ok(self)
    }

    /// Moves slot `id` to a new base gfn (its host memory stays).
    pub fn move_to(&mut self, id: SlotId, base_gfn: Gfn) -> Result<&mut Self, MemslotError> {
        let pos = self.position(id)?;
        self.slots[pos].base_gfn = base_gfn;
        Ok(self)
    }

    /// Replaces slot `id`'s flags.
    pub fn set_flags(&mut self, id: SlotId, flags: SlotFlags) -> Result<&mut Self, MemslotError> {
        let pos = self.position(id)?;
        self.slots[pos].flags = flags;
        Ok(self)
    }

    fn position(&self, id: SlotId) -> Result<usize, MemslotError> {
        self.slots.iter().position(|s| s.id == id).ok_or(MemslotError::NoSuchSlot(id))
    }

    /// Checks every invariant and builds the set with the next generation.
    pub fn build(&self) -> Result<Memslots, MemslotError> {
        if self.slots.len() > MAX_SLOTS {
            // Ids are unique and below MAX_SLOTS, so this is caught per slot
            // below; keep the check for clarity of the bound.
            return Err(MemslotError::IdOutOfRange(SlotId(MAX_SLOTS as u16)));
        }
        for s in &self.slots {
            validate(s)?;
        }
        let mut by_gfn = self.slots.clone();
        by_gfn.sort_unstable_by_key(|s| s.base_gfn);
        for pair in by_gfn.windows(2) {
            if pair[0].gfns().overlaps(&pair[1].gfns()) {
                return Err(MemslotError::Overlap { slot: pair[0].id, other: pair[1].id });
            }
        }
        let n = by_gfn.len() as u32;
        let mut by_id: Vec<u32> = (0..n).collect();
        by_id.sort_unstable_by_key(|&i| by_gfn[i as usize].id);
        if let Some(w) = by_id.windows(2).find(|w| by_gfn[w[0] as usize].id == by_gfn[w[1] as usize].id) {
            return Err(MemslotError::DuplicateId(by_gfn[w[0] as usize].id));
        }
        let mut by_hva: Vec<u32> = (0..n).collect();
        by_hva.sort_unstable_by_key(|&i| (by_gfn[i as usize].hva, by_gfn[i as usize].id));
        let mut hva_max_end = Vec::with_capacity(by_hva.len());
        let mut max = 0;
        for &i in &by_hva {
            max = max.max(by_gfn[i as usize].hvas().end.0);
            hva_max_end.push(max);
        }
        let starts: Vec<u64> = by_gfn.iter().map(|s| s.base_gfn.0).collect();
        let sizes: Vec<u64> = by_gfn.iter().map(|s| s.npages).collect();
        let (buckets, bucket_base, bucket_shift) = bucket_index(&starts, &sizes);
        let copy = |i: usize| by_gfn.get(i).copied().unwrap_or(Memslot::NONE);
        // A smaller set's lookups read `by_gfn`.
        let ordered = buckets.len().saturating_sub(1);
        let lines = buckets[..ordered]
            .iter()
            .map(|b| Line([copy(b.first()), copy(b.first() + 1)]))
            .chain((0..by_gfn.len()).step_by(2).map(|i| Line([copy(i), copy(i + 1)])))
            .take(if by_gfn.len() > LINES_MIN { usize::MAX } else { 0 })
            .collect();
        Ok(Memslots {
            generation: self.generations.next(),
            generations: self.generations.clone(),
            by_gfn,
            starts,
            sizes,
            buckets,
            lines,
            ordered,
            bucket_base,
            bucket_shift,
            by_hva,
            hva_max_end,
            by_id,
        })
    }
}

/// One cache line of copies: two slots of the set, the first ending before
/// the second starts, or [`Memslot::NONE`] in place of either.
///
/// A bucket's line holds its first two candidates (slots `lo` and `lo + 1`
/// of its [`Bucket`] word). Most buckets have no third (about two buckets a
/// slot), so a lookup reads that line and returns a copy from it, and the
/// [`SlotHint`] it leaves names that copy: the next lookup's try of the hint
/// reads the same line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([Memslot; 2]);

// Two slots fill a line exactly.
const _: () = assert!(core::mem::size_of::<Line>() == 64);

/// One word of the direct index over the gfn span: the first slot that ends
/// above the bucket's first gfn (`lo`), and where the slot after it starts.
///
/// The slot holding a gfn of the bucket lies in `lo..=hi`, where `hi` is the
/// next bucket's `lo`: slots between them end inside the bucket. When that is
/// one or two candidates (the rule, with two buckets a slot), the word holds
/// the offset from the bucket's first gfn at which slot `lo + 1` starts, so
/// the lookup picks without reading a slot. Otherwise the lookup bisects the
/// candidates' starts.
///
/// Layout: bits 0..16 `lo` (below [`MAX_SLOTS`]); bits 16..64 the split
/// offset, or [`Bucket::SEARCH`] for a bisection. An offset at or beyond the
/// bucket's width (one candidate, or a second that starts in a later bucket)
/// is stored as [`Bucket::PAST`], which no offset reaches.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket(u64);

impl Bucket {
    const SEARCH: u64 = (1 << 48) - 1;
    const PAST: u64 = Self::SEARCH - 1;
    /// Widest bucket whose offsets all stay below [`Bucket::PAST`].
    const MAX_SHIFT: u32 = 47;

    fn new(first: usize, split: u64) -> Self {
        Self(first as u64 | (split.min(Self::SEARCH) << 16))
    }

    #[inline]
    fn first(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    #[inline]
    fn split(self) -> Option<u64> {
        let s = self.0 >> 16;
        (s != Self::SEARCH).then_some(s)
    }
}

/// Builds the direct index: about two buckets a slot over the covered span,
/// each naming the first slot that ends above the bucket's first gfn and
/// where the next one starts (one past the last bucket: the slot count).
fn bucket_index(starts: &[u64], sizes: &[u64]) -> (Vec<Bucket>, u64, u32) {
    let n = starts.len();
    if n <= LINEAR_SCAN_MAX {
        return (Vec::new(), 0, 0);
    }
    let base = starts[0];
    let span = starts[n - 1] + sizes[n - 1] - base;
    let want = (2 * n).next_power_of_two() as u64;
    // The smallest shift that covers the span with at most `want` buckets.
    let shift = (64 - (span.div_ceil(want)).saturating_sub(1).leading_zeros()).min(63);
    let count = (span.saturating_sub(1) >> shift) + 1;
    let mut firsts = Vec::with_capacity(count as usize + 1);
    let mut i = 0;
    for b in 0..=count {
        let first = base.saturating_add(b << shift);
        while i < n && starts[i] + sizes[i] <= first {
            i += 1;
        }
        firsts.push(i);
    }
    let buckets = (0..=count as usize)
        .map(|b| {
            let lo = firsts[b];
            // The word one past the last bucket ends the span: a lookup
            // there reads beyond the index and finds nothing.
            let Some(&next) = firsts.get(b + 1) else { return Bucket::new(lo, Bucket::SEARCH) };
            let hi = next.min(n - 1);
            let split = if shift > Bucket::MAX_SHIFT || hi > lo + 1 {
                Bucket::SEARCH
            } else if hi == lo {
                Bucket::PAST
            } else {
                // Slot `hi` starts after slot `lo` ends, above the bucket's first gfn.
                (starts[hi] - (base + ((b as u64) << shift))).min(Bucket::PAST)
            };
            Bucket::new(lo, split)
        })
        .collect();
    (buckets, base, shift)
}

fn validate(s: &Memslot) -> Result<(), MemslotError> {
    if s.id.0 as usize >= MAX_SLOTS {
        return Err(MemslotError::IdOutOfRange(s.id));
    }
    if s.npages == 0 {
        return Err(MemslotError::ZeroSize(s.id));
    }
    let end = s.base_gfn.checked_add(s.npages).ok_or(MemslotError::GfnOverflow(s.id))?;
    // The last frame must have a 64-bit guest-physical address.
    if Gfn(end.0 - 1).gpa().is_none() {
        return Err(MemslotError::GfnOverflow(s.id));
    }
    if !s.hva.is_aligned(PAGE_SHIFT) {
        return Err(MemslotError::MisalignedHva { slot: s.id, hva: s.hva });
    }
    let bytes = s.npages.checked_mul(PAGE_SIZE).ok_or(MemslotError::HvaOverflow(s.id))?;
    s.hva.checked_add(bytes).ok_or(MemslotError::HvaOverflow(s.id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u16, gfn: u64, n: u64, hva: u64) -> Memslot {
        Memslot::new(SlotId(id), Gfn(gfn), n, Hva(hva), SlotFlags::empty())
    }

    fn set(slots: &[Memslot]) -> Result<Memslots, MemslotError> {
        let mut b = MemslotsBuilder::new();
        for s in slots {
            b.create(*s)?;
        }
        b.build()
    }

    #[test]
    fn overlapping_slots_are_rejected_naming_both() {
        let err = set(&[slot(1, 0, 10, 0), slot(2, 9, 10, 0x100000)]).unwrap_err();
        assert_eq!(err, MemslotError::Overlap { slot: SlotId(1), other: SlotId(2) });
        // Touching is fine.
        assert!(set(&[slot(1, 0, 10, 0), slot(2, 10, 10, 0x100000)]).is_ok());
    }

    #[test]
    fn bad_slots_get_their_typed_error() {
        assert_eq!(set(&[slot(3, 0, 0, 0)]).unwrap_err(), MemslotError::ZeroSize(SlotId(3)));
        assert_eq!(set(&[slot(3, u64::MAX, 2, 0)]).unwrap_err(), MemslotError::GfnOverflow(SlotId(3)));
        assert_eq!(set(&[slot(3, 1 << 52, 1, 0)]).unwrap_err(), MemslotError::GfnOverflow(SlotId(3)));
        assert_eq!(set(&[slot(3, 0, 2, !0xfff)]).unwrap_err(), MemslotError::HvaOverflow(SlotId(3)));
        assert_eq!(set(&[slot(3, 0, 1 << 51, 1 << 63)]).unwrap_err(), MemslotError::HvaOverflow(SlotId(3)));
        assert_eq!(
            set(&[slot(3, 0, 1, 0x1001)]).unwrap_err(),
            MemslotError::MisalignedHva { slot: SlotId(3), hva: Hva(0x1001) }
        );
        assert_eq!(set(&[slot(40000, 0, 1, 0)]).unwrap_err(), MemslotError::IdOutOfRange(SlotId(40000)));
        let mut b = MemslotsBuilder::new();
        b.create(slot(1, 0, 1, 0)).unwrap();
        assert_eq!(b.create(slot(1, 5, 1, 0)).unwrap_err(), MemslotError::DuplicateId(SlotId(1)));
        assert_eq!(b.delete(SlotId(9)).unwrap_err(), MemslotError::NoSuchSlot(SlotId(9)));
    }

    #[test]
    fn generations_only_go_up_across_builders_of_one_set_and_from_scratch() {
        let vm = MemslotGenerations::new();
        let mut b = MemslotsBuilder::with_generations(&vm);
        b.create(slot(1, 0, 10, 0)).unwrap();
        let a = b.build().unwrap();
        assert_eq!(a.generation(), 1);
        // Two builders made from the same set: different generations.
        let x = a.to_builder().build().unwrap();
        let y = a.to_builder().build().unwrap();
        assert!(x.generation() > a.generation() && y.generation() > x.generation());
        // A set built from scratch with the VM's counter: newer still.
        let z = MemslotsBuilder::with_generations(&vm).build().unwrap();
        assert!(z.generation() > y.generation());
        assert_eq!(vm.last(), z.generation());
        // Without a counter: the process-wide one, never a repeat.
        let p = set(&[slot(1, 0, 10, 0)]).unwrap();
        let q = set(&[slot(1, 0, 10, 0)]).unwrap();
        assert_ne!(p.generation(), q.generation());
        assert!(p.to_builder().build().unwrap().generation() > p.generation());
        // A hint taken on one set is not trusted on a sibling set.
        let mut hint = SlotHint::default();
        let mut b = a.to_builder();
        b.delete(SlotId(1)).unwrap();
        b.create(slot(2, 0, 5, 0x100000)).unwrap();
        let sib = b.build().unwrap();
        assert_eq!(x.lookup_hinted(Gfn(7), &mut hint).map(|s| s.id()), Some(SlotId(1)));
        assert_eq!(sib.lookup_hinted(Gfn(7), &mut hint), None);
        assert_eq!(sib.lookup_hinted(Gfn(3), &mut hint).map(|s| s.id()), Some(SlotId(2)));
    }

    #[test]
    fn each_change_builds_a_newer_generation() {
        let a = set(&[slot(1, 0, 10, 0)]).unwrap();
        let mut b = a.to_builder();
        b.move_to(SlotId(1), Gfn(100)).unwrap();
        let b = b.build().unwrap();
        assert!(b.generation() > a.generation());
        assert!(b.lookup(Gfn(5)).is_none());
        assert_eq!(b.lookup(Gfn(105)).map(|s| s.id()), Some(SlotId(1)));
        // The old set is unchanged.
        assert_eq!(a.lookup(Gfn(5)).map(|s| s.id()), Some(SlotId(1)));
    }

    #[test]
    fn lookup_finds_the_slot_or_nothing_at_every_size() {
        for n in [1u64, 2, 8, 9, 100] {
            let slots: Vec<_> = (0..n).map(|i| slot(i as u16, i * 20, 10, i << 30)).collect();
            let s = set(&slots).unwrap();
            let mut hint = SlotHint::default();
            for g in 0..n * 20 + 5 {
                let want = (g % 20 < 10 && g / 20 < n).then_some(SlotId((g / 20) as u16));
                assert_eq!(s.lookup(Gfn(g)).map(|s| s.id()), want, "gfn {g} of {n}");
                assert_eq!(s.lookup_hinted(Gfn(g), &mut hint).map(|s| s.id()), want);
            }
        }
    }

    #[test]
    fn lookup_matches_a_scan_on_skewed_layouts() {
        // One huge slot and many tiny ones, gaps of every size, the top of
        // the gfn space: the direct index must never miss or misplace.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..40 {
            let n = 9 + (next() % 200) as usize;
            let mut gfn = if round % 4 == 0 { (1u64 << 52) - (1 << 40) } else { next() % 1000 };
            let mut slots = Vec::new();
            for i in 0..n {
                let size = match next() % 4 {
                    0 => 1 << (next() % 28),
                    _ => 1 + next() % 16,
                };
                slots.push(slot(i as u16, gfn, size, (i as u64) << 32));
                gfn += size + next() % 3 * (next() % 1000);
            }
            let s = set(&slots).unwrap();
            for _ in 0..2000 {
                let m = &slots[(next() % n as u64) as usize];
                let probe = match next() % 4 {
                    0 => m.base_gfn().0,
                    1 => m.base_gfn().0 + m.npages() - 1,
                    2 => m.base_gfn().0 + m.npages(),
                    _ => m.base_gfn().0.wrapping_sub(1 + next() % 3),
                };
                let want = slots.iter().find(|s| s.contains(Gfn(probe))).map(|s| s.id());
                assert_eq!(s.lookup(Gfn(probe)).map(|s| s.id()), want, "gfn {probe:#x} round {round}");
            }
        }
    }

    #[test]
    fn lookup_matches_a_scan_on_adversarial_layouts() {
        // Adjacent one-page slots from gfn 0, one-page gaps, a run of many
        // slots inside one bucket, and a slot ending at the top of the
        // valid gfn space: every frame at and around each edge is probed.
        let top = 1u64 << 52;
        let layouts: [Vec<(u64, u64)>; 6] = [
            (0..40).map(|i| (i, 1)).collect(),
            (0..40).map(|i| (2 * i, 1)).collect(),
            (0..30).map(|i| (i, 1)).chain([(1000, 1 << 20), (top - 3, 3)]).collect(),
            (0..12).map(|i| (i * 3, 2)).chain((0..20).map(|i| (top - 100 + 5 * i, 1 + i % 4))).collect(),
            // Pairs of touching slots wider than a bucket, then a gap: the
            // second of two candidates starts inside a bucket.
            (0..16u64).map(|i| if i % 2 == 0 { (i * 32, 20) } else { (i * 32 - 12, 30) }).collect(),
            // Enough slots for the lines of copies: runs of one-page slots
            // (many candidates a bucket), touching pairs, gaps, and a slot
            // at the top of the gfn space.
            (0..1200u64)
                .map(|i| match i % 4 {
                    0 | 1 => (i * 16, 1 + i % 3),
                    2 => (i * 16, 16),
                    _ => (i * 16 + 3, 9),
                })
                .chain([(top - 7, 7)])
                .collect(),
        ];
        for (l, layout) in layouts.iter().enumerate() {
            // Every field differs from slot to slot, so a lookup that
            // returns a copy of the wrong slot, or a stale copy, is caught.
            let slots: Vec<Memslot> = layout
                .iter()
                .enumerate()
                .map(|(i, &(g, n))| {
                    let flags = if i % 3 == 1 { SlotFlags::READONLY } else { SlotFlags::DIRTY_LOG };
                    Memslot::new(SlotId(i as u16 ^ 0x55), Gfn(g), n, Hva((i as u64) << 32), flags)
                })
                .collect();
            let s = set(&slots).unwrap();
            let mut hint = SlotHint::default();
            for m in &slots {
                let (b, e) = (m.base_gfn().0, m.base_gfn().0 + m.npages());
                for probe in [b.wrapping_sub(2), b.wrapping_sub(1), b, b + 1, e - 1, e, e + 1, u64::MAX] {
                    let want = slots.iter().find(|s| s.contains(Gfn(probe))).copied();
                    assert_eq!(s.lookup(Gfn(probe)).copied(), want, "layout {l} gfn {probe:#x}");
                    // Twice: a lookup through the index, then one through
                    // the hint it left.
                    for pass in 0..2 {
                        assert_eq!(
                            s.lookup_hinted(Gfn(probe), &mut hint).copied(),
                            want,
                            "layout {l} hinted {probe:#x} pass {pass}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn debug_shows_the_slots_not_the_lookup_indexes() {
        let slots: Vec<Memslot> = (0..1200u64)
            .map(|i| Memslot::new(SlotId(i as u16), Gfn(i * 16), 8, Hva(i << 32), SlotFlags::empty()))
            .collect();
        let text = alloc::format!("{:?}", set(&slots).unwrap());
        assert!(text.starts_with("Memslots { generation: "), "{}", &text[..40]);
        assert_eq!(text.matches("Memslot {").count(), 1200);
        assert!(!text.contains("buckets") && !text.contains("lines"));
    }

    #[test]
    fn lookup_spans_the_whole_gfn_space_with_the_widest_buckets() {
        // Nine slots spread over 2^52 frames: buckets of 2^47 frames, whose
        // split offsets are the largest a bucket word holds.
        let top = (1u64 << 52) - 16;
        let slots: Vec<Memslot> = (0..9u64)
            .map(|i| {
                let base = if i == 8 { top } else { i << 49 | (i * 0x1234_5678) };
                slot(i as u16, base, 16, i << 32)
            })
            .collect();
        let s = set(&slots).unwrap();
        for m in &slots {
            for probe in
                [m.base_gfn().0, m.base_gfn().0 + 15, m.base_gfn().0 + 16, m.base_gfn().0.wrapping_sub(1)]
            {
                let want = slots.iter().find(|s| s.contains(Gfn(probe))).map(|s| s.id());
                assert_eq!(s.lookup(Gfn(probe)).map(|s| s.id()), want, "gfn {probe:#x}");
            }
        }
        assert!(s.lookup(Gfn(u64::MAX)).is_none());
    }

    #[test]
    fn hva_query_yields_every_alias() {
        // Slots 1 and 2 share host memory; slot 3 is elsewhere.
        let s = set(&[slot(1, 0, 16, 0x10000), slot(2, 100, 16, 0x10000), slot(3, 200, 4, 0x80000)]).unwrap();
        let hits: Vec<_> = s
            .lookup_hva(HvaRange { start: Hva(0x12000), end: Hva(0x13001) })
            .map(|(slot, r)| (slot.id(), r))
            .collect();
        assert_eq!(
            hits,
            [
                (SlotId(1), GfnRange { start: Gfn(2), end: Gfn(4) }),
                (SlotId(2), GfnRange { start: Gfn(102), end: Gfn(104) }),
            ]
        );
        assert_eq!(s.lookup_hva(HvaRange { start: Hva(0x20000), end: Hva(0x80000) }).count(), 0);
        assert_eq!(s.lookup_hva(HvaRange { start: Hva(0), end: Hva(u64::MAX) }).count(), 3);
    }

    #[test]
    fn huge_page_allowed_only_when_gfn_and_hva_align_inside_the_slot() {
        let s = slot(1, 512, 1024, 0x4000_0000);
        assert!(s.allows_page(Gfn(512 + 3), 21));
        assert!(s.allows_page(Gfn(1024 + 511), 21));
        assert!(!s.allows_page(Gfn(1536), 21));
        let skew = slot(1, 512, 1024, 0x4000_1000);
        assert!(!skew.allows_page(Gfn(512), 21));
        assert!(skew.allows_page(Gfn(512), 12));
    }

    #[test]
    fn caller_chosen_numbers_never_panic() {
        // Unvalidated slots at the top of both spaces, every shift.
        let slots = [
            slot(1, 512, 1024, 0x4000_0000),
            slot(2, u64::MAX - 3, 100, !0xfff),
            slot(3, 0, u64::MAX, 0x1000),
            Memslot::new(SlotId(4), Gfn(1 << 40), 1 << 60, Hva(1 << 63), SlotFlags::empty()),
        ];
        for s in slots {
            for shift in [0, 1, 11, 12, 21, 30, 52, 63, 64, 65, u32::MAX] {
                for gfn in [0, 512, 1 << 40, u64::MAX - 3, u64::MAX] {
                    let ok = s.allows_page(Gfn(gfn), shift);
                    if !(12..64).contains(&shift) {
                        assert!(!ok, "shift {shift}");
                    }
                    let _ = s.gfn_to_hva(Gfn(gfn));
                    let _ = s.page_index(Gfn(gfn));
                }
            }
            let _ = s.gfns();
            let _ = s.hvas();
            for (a, b) in [(0, u64::MAX), (u64::MAX, 0), (u64::MAX - 1, u64::MAX), (0x4000_0000, 0x4000_0001)]
            {
                let _ = s.gfns_for_hvas(&HvaRange { start: Hva(a), end: Hva(b) });
            }
        }
        assert_eq!(slots[1].gfn_to_hva(Gfn(u64::MAX - 3 + 2)), None, "past the top of the hva space");
    }

    #[test]
    fn a_replaced_slot_is_listed_stale_with_its_reason() {
        let old =
            set(&[slot(1, 0, 16, 0x10000), slot(2, 100, 16, 0x80000), slot(3, 200, 4, 0x90000)]).unwrap();
        let mut b = old.to_builder();
        // Slot 1: same gfns, new host memory. Slot 2: deleted and recreated
        // as slot 4 at the same gfns in one build. Slot 3: logging only.
        b.delete(SlotId(1)).unwrap();
        b.create(slot(1, 0, 16, 0x40000)).unwrap();
        b.delete(SlotId(2)).unwrap();
        b.create(slot(4, 100, 16, 0x80000)).unwrap();
        b.set_flags(SlotId(3), SlotFlags::DIRTY_LOG).unwrap();
        let new = b.build().unwrap();
        let stale: Vec<_> = old.stale_slots(&new).map(|(s, c)| (s.id(), s.hva(), c)).collect();
        assert_eq!(
            stale,
            [(SlotId(1), Hva(0x10000), SlotChange::Rebacked), (SlotId(2), Hva(0x80000), SlotChange::Deleted)]
        );
    }
}
