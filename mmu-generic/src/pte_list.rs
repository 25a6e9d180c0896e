//! A compact list of PTE handles: the building block of the reverse map and of
//! shadow pages' parent lists.
//!
//! Most guest frames are mapped once (always, under EPT/NPT), so a list is one
//! 64-bit head word that stores a single handle inline: no allocation at all.
//! More mappings go into descriptors of one cache line each, 15 handles and a
//! link, chained from the head; the head word keeps its inline handle and
//! names the first descriptor with the number of handles in it. A list of 16
//! mappings is the head and one line: 72 bytes, 4.5 bytes a mapping.
//!
//! Only the first descriptor of a chain may be partly full, so an add touches
//! the head word and at most one line, and a removal fills its hole with the
//! last handle of the first descriptor: up to 16 mappings a removal reads the
//! head word and one line, and never follows a link.
//!
//! Descriptors come from a [`PteListPool`] whose reserve the caller tops up
//! before taking the MMU lock ([`PteListPool::reserve`]); an add that finds the
//! reserve empty fails with [`RmapError::ReserveEmpty`] instead of allocating
//! under the lock. Handles are indices chosen by the back end, never pointers.

use alloc::vec::Vec;
use core::fmt;

/// Names one hardware PTE. The back end chooses the encoding (for example
/// table frame index × 512 + entry index); the core only stores and returns it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PteHandle(pub u32);

/// Handles per descriptor: 15 × 4 bytes plus the link fill 64 bytes.
pub const DESC_HANDLES: usize = 15;

/// Most descriptors one pool holds: the head word names a descriptor in 28
/// bits (16 GiB of descriptors, more handles than a `u32` can name).
pub const MAX_DESCS: usize = (1 << 28) - 1;

/// One cache line of handles.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Desc {
    /// Every slot is in use, except in the first descriptor of a chain,
    /// whose count the head word holds.
    handles: [u32; DESC_HANDLES],
    /// Next descriptor index + 1, 0 at the end; the free list reuses it.
    next: u32,
}

const EMPTY_DESC: Desc = Desc { handles: [0; DESC_HANDLES], next: 0 };

/// Why a reverse-map update failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RmapError {
    /// The descriptor reserve is empty: call [`PteListPool::reserve`] before
    /// taking the lock and retry.
    ReserveEmpty,
    /// The handle is not in the list.
    NotFound(PteHandle),
    /// The frame lies outside the slot the reverse map covers.
    OutOfSlot,
}

impl fmt::Display for RmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReserveEmpty => f.write_str("reverse-map descriptor reserve is empty"),
            Self::NotFound(h) => write!(f, "PTE handle {} is not in the list", h.0),
            Self::OutOfSlot => f.write_str("frame is outside the slot"),
        }
    }
}

/// The head word of one list.
///
/// Encoding: the high 32 bits hold the inline handle; the low 32 bits are 0
/// for an empty list (the whole word is then 0), 1 for a list of the inline
/// handle alone, and otherwise `(first descriptor index + 1) << 4 | n` with
/// `n` in `1..=15` the handles in that descriptor.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PteList(u64);

impl fmt::Debug for PteList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Head::Empty => f.write_str("PteList(empty)"),
            Head::One(h) => write!(f, "PteList(one {})", h),
            Head::Many { inline, desc, n } => write!(f, "PteList(one {inline}, desc {desc} holding {n})"),
        }
    }
}

enum Head {
    Empty,
    One(u32),
    /// The inline handle, the first descriptor and its handle count (1..=15).
    Many {
        inline: u32,
        desc: u32,
        n: u32,
    },
}

impl PteList {
    /// An empty list.
    pub const EMPTY: Self = Self(0);

    #[inline]
    fn decode(self) -> Head {
        let link = self.0 as u32;
        let inline = (self.0 >> 32) as u32;
        match link {
            0 => Head::Empty,
            1 => Head::One(inline),
            _ => Head::Many { inline, desc: (link >> 4) - 1, n: link & 0xf },
        }
    }

    #[inline]
    fn one(h: u32) -> Self {
        Self(((h as u64) << 32) | 1)
    }

    #[inline]
    fn many(inline: u32, desc: u32, n: u32) -> Self {
        debug_assert!((1..=DESC_HANDLES as u32).contains(&n) && (desc as usize) < MAX_DESCS);
        Self(((inline as u64) << 32) | (((desc + 1) << 4) | n) as u64)
    }

    /// Whether the list holds no handle.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The single handle, if the list holds exactly one inline.
    #[inline]
    pub fn single(self) -> Option<PteHandle> {
        match self.decode() {
            Head::One(h) => Some(PteHandle(h)),
            _ => None,
        }
    }
}

/// Storage for the descriptors of many lists, with a reserve of free ones.
#[derive(Clone, Default)]
pub struct PteListPool {
    descs: Vec<Desc>,
    /// Free descriptor index + 1, 0 when the reserve is empty.
    free_head: u32,
    free_count: u32,
}

impl fmt::Debug for PteListPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PteListPool")
            .field("descriptors", &self.descs.len())
            .field("free", &self.free_count)
            .finish()
    }
}

impl PteListPool {
    /// An empty pool with no reserve.
    pub const fn new() -> Self {
        Self { descs: Vec::new(), free_head: 0, free_count: 0 }
    }

    /// Ensures at least `n` free descriptors (at most [`MAX_DESCS`] in all),
    /// allocating now (outside the MMU lock) so that later adds never
    /// allocate. One descriptor serves up to 15 adds, so `n` = the number of
    /// adds planned suffices.
    pub fn reserve(&mut self, n: usize) {
        let room = MAX_DESCS - self.descs.len();
        let Some(more) = n.checked_sub(self.free_count as usize).map(|m| m.min(room)).filter(|&m| m > 0)
        else {
            return;
        };
        // Link the new descriptors in ascending order, so that lists built
        // one after another get ascending addresses: a later walk in the
        // same order streams through memory instead of jumping backwards.
        let first = self.descs.len() as u32;
        let last = first + more as u32 - 1;
        self.descs.extend(
            (first..=last)
                .map(|i| Desc { next: if i == last { self.free_head } else { i + 2 }, ..EMPTY_DESC }),
        );
        self.free_head = first + 1;
        self.free_count += more as u32;
    }

    /// Free descriptors in the reserve.
    pub fn reserve_len(&self) -> usize {
        self.free_count as usize
    }

    /// Bytes of descriptor storage in use by lists (not counting the reserve
    /// or the head words).
    pub fn bytes_in_use(&self) -> usize {
        (self.descs.len() - self.free_count as usize) * core::mem::size_of::<Desc>()
    }

    /// Takes a descriptor from the reserve and links it before `next`
    /// (index + 1, 0 for none). Its handles are left as they were: only the
    /// slots the head word counts are ever read.
    #[inline]
    fn alloc(&mut self, next: u32) -> Result<u32, RmapError> {
        let i = self.free_head.checked_sub(1).ok_or(RmapError::ReserveEmpty)?;
        let d = &mut self.descs[i as usize];
        self.free_head = d.next;
        self.free_count -= 1;
        d.next = next;
        Ok(i)
    }

    #[inline]
    fn free(&mut self, i: u32) {
        self.descs[i as usize].next = self.free_head;
        self.free_head = i + 1;
        self.free_count += 1;
    }

    /// Adds `h` to `list`. Fails only when a descriptor is needed and the
    /// reserve is empty; the list is then unchanged.
    #[inline]
    pub fn add(&mut self, list: &mut PteList, h: PteHandle) -> Result<(), RmapError> {
        *list = match list.decode() {
            Head::Empty => PteList::one(h.0),
            Head::One(inline) => {
                let d = self.alloc(0)?;
                self.descs[d as usize].handles[0] = h.0;
                PteList::many(inline, d, 1)
            }
            Head::Many { inline, desc, n } if (n as usize) < DESC_HANDLES => {
                self.descs[desc as usize].handles[n as usize] = h.0;
                PteList::many(inline, desc, n + 1)
            }
            Head::Many { inline, desc, .. } => {
                let d = self.alloc(desc + 1)?;
                self.descs[d as usize].handles[0] = h.0;
                PteList::many(inline, d, 1)
            }
        };
        Ok(())
    }

    /// Removes one occurrence of `h` from `list`. The hole is filled with the
    /// last handle of the first descriptor, so only that one is ever partly
    /// full; a list left with one handle keeps it inline, without descriptor.
    #[inline]
    pub fn remove(&mut self, list: &mut PteList, h: PteHandle) -> Result<(), RmapError> {
        match list.decode() {
            Head::Empty => Err(RmapError::NotFound(h)),
            Head::One(x) => {
                if x != h.0 {
                    return Err(RmapError::NotFound(h));
                }
                *list = PteList::EMPTY;
                Ok(())
            }
            Head::Many { inline, desc, n } => {
                let first = &self.descs[desc as usize];
                let last = first.handles[n as usize - 1];
                let mut inline = inline;
                if inline == h.0 {
                    inline = last;
                } else {
                    let (d, slot) = self.find(desc, n, h.0).ok_or(RmapError::NotFound(h))?;
                    self.descs[d as usize].handles[slot] = last;
                }
                *list = if n > 1 {
                    PteList::many(inline, desc, n - 1)
                } else {
                    let next = self.descs[desc as usize].next;
                    self.free(desc);
                    match next.checked_sub(1) {
                        Some(next) => PteList::many(inline, next, DESC_HANDLES as u32),
                        None => PteList::one(inline),
                    }
                };
                Ok(())
            }
        }
    }

    /// The descriptor and slot of `h`, searching from the first descriptor
    /// `d` (holding `n`) down the chain of full ones.
    #[inline]
    fn find(&self, mut d: u32, n: u32, h: u32) -> Option<(u32, usize)> {
        let mut used = (1u32 << n) - 1;
        loop {
            let desc = &self.descs[d as usize];
            // Compare the whole line without an early exit: a fixed-length
            // loop the compiler turns into vector compares, and no branch
            // whose outcome depends on where in the line `h` sits (a random
            // removal would mispredict it nearly every time).
            let hits =
                desc.handles.iter().enumerate().fold(0u32, |m, (i, &x)| m | (u32::from(x == h) << i)) & used;
            if hits != 0 {
                return Some((d, hits.trailing_zeros() as usize));
            }
            d = desc.next.checked_sub(1)?;
            used = (1 << DESC_HANDLES) - 1;
        }
    }

    /// The handles of `list`, in no promised order.
    #[inline]
    pub fn iter(&self, list: PteList) -> PteListIter<'_> {
        match list.decode() {
            Head::Empty => PteListIter { pool: self, one: None, desc: 0, pos: 0, end: 0 },
            Head::One(h) => PteListIter { pool: self, one: Some(h), desc: 0, pos: 0, end: 0 },
            Head::Many { inline, desc, n } => {
                PteListIter { pool: self, one: Some(inline), desc: desc + 1, pos: 0, end: n as usize }
            }
        }
    }

    /// Number of handles in `list`.
    pub fn len(&self, list: PteList) -> usize {
        match list.decode() {
            Head::Empty => 0,
            Head::One(_) => 1,
            Head::Many { desc, n, .. } => {
                let mut count = 1 + n as usize;
                let mut next = self.descs[desc as usize].next;
                while let Some(d) = next.checked_sub(1) {
                    count += DESC_HANDLES;
                    next = self.descs[d as usize].next;
                }
                count
            }
        }
    }

    /// Empties `list`, calling `f` on each handle, and returns its descriptors
    /// to the reserve.
    pub fn drain(&mut self, list: &mut PteList, mut f: impl FnMut(PteHandle)) {
        match core::mem::take(list).decode() {
            Head::Empty => {}
            Head::One(h) => f(PteHandle(h)),
            Head::Many { inline, desc, n } => {
                f(PteHandle(inline));
                let mut d = desc;
                let mut len = n as usize;
                loop {
                    let desc = self.descs[d as usize];
                    desc.handles[..len].iter().for_each(|&h| f(PteHandle(h)));
                    self.free(d);
                    match desc.next.checked_sub(1) {
                        Some(next) => d = next,
                        None => break,
                    }
                    len = DESC_HANDLES;
                }
            }
        }
    }
}

/// Iterator over one list's handles.
#[derive(Clone)]
pub struct PteListIter<'a> {
    pool: &'a PteListPool,
    one: Option<u32>,
    /// Current descriptor index + 1, 0 when done.
    desc: u32,
    pos: usize,
    /// Handles in use in the current descriptor.
    end: usize,
}

impl Iterator for PteListIter<'_> {
    type Item = PteHandle;

    #[inline]
    fn next(&mut self) -> Option<PteHandle> {
        if let Some(h) = self.one.take() {
            return Some(PteHandle(h));
        }
        loop {
            let desc = &self.pool.descs[self.desc.checked_sub(1)? as usize];
            if self.pos < self.end {
                self.pos += 1;
                return Some(PteHandle(desc.handles[self.pos - 1]));
            }
            self.desc = desc.next;
            self.pos = 0;
            self.end = DESC_HANDLES;
        }
    }

    /// Internal iteration a descriptor at a time, over plain slices: what
    /// `for_each`, `sum` and the reverse-map walks use.
    #[inline]
    fn fold<B, F: FnMut(B, PteHandle) -> B>(mut self, init: B, mut f: F) -> B {
        let mut acc = init;
        if let Some(h) = self.one.take() {
            acc = f(acc, PteHandle(h));
        }
        let (mut next, mut pos, mut end) = (self.desc, self.pos, self.end);
        while let Some(d) = next.checked_sub(1) {
            let desc = &self.pool.descs[d as usize];
            for &h in &desc.handles[pos.min(end)..end] {
                acc = f(acc, PteHandle(h));
            }
            (next, pos, end) = (desc.next, 0, DESC_HANDLES);
        }
        acc
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sorted(pool: &PteListPool, l: PteList) -> Vec<u32> {
        let mut v: Vec<u32> = pool.iter(l).map(|h| h.0).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn descriptor_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<Desc>(), 64);
        assert_eq!(core::mem::size_of::<PteList>(), 8);
    }

    #[test]
    fn single_mapping_is_stored_inline_without_allocating() {
        let mut pool = PteListPool::new();
        let mut l = PteList::EMPTY;
        pool.add(&mut l, PteHandle(u32::MAX)).unwrap();
        assert_eq!(l.single(), Some(PteHandle(u32::MAX)));
        assert_eq!(pool.bytes_in_use(), 0);
        pool.remove(&mut l, PteHandle(u32::MAX)).unwrap();
        assert!(l.is_empty());
    }

    #[test]
    fn add_without_reserve_fails_and_leaves_list_unchanged() {
        let mut pool = PteListPool::new();
        let mut l = PteList::EMPTY;
        pool.add(&mut l, PteHandle(1)).unwrap();
        assert_eq!(pool.add(&mut l, PteHandle(2)), Err(RmapError::ReserveEmpty));
        assert_eq!(l.single(), Some(PteHandle(1)));
        pool.reserve(1);
        pool.add(&mut l, PteHandle(2)).unwrap();
        assert_eq!(sorted(&pool, l), vec![1, 2]);
    }

    #[test]
    fn sixteen_mappings_cost_the_head_and_one_line() {
        let mut pool = PteListPool::new();
        pool.reserve(4);
        let mut l = PteList::EMPTY;
        for h in 0..16 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(pool.bytes_in_use(), 64);
        assert_eq!(pool.len(l), 16);
        assert_eq!(sorted(&pool, l), (0..16).collect::<Vec<_>>());
        // The seventeenth mapping takes a second line; 31 still fit in two.
        pool.add(&mut l, PteHandle(16)).unwrap();
        assert_eq!(pool.bytes_in_use(), 128);
        for h in 17..31 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(pool.bytes_in_use(), 128);
        assert_eq!(pool.len(l), 31);
        assert_eq!(sorted(&pool, l), (0..31).collect::<Vec<_>>());
    }

    #[test]
    fn removing_the_inline_handle_or_a_full_descriptors_handle_keeps_the_rest() {
        let mut pool = PteListPool::new();
        pool.reserve(4);
        let mut l = PteList::EMPTY;
        // Inline 0; a full descriptor 1..=15; a first descriptor holding 16, 17.
        for h in 0..18 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        pool.remove(&mut l, PteHandle(0)).unwrap();
        pool.remove(&mut l, PteHandle(3)).unwrap();
        assert_eq!(pool.len(l), 16);
        assert_eq!(pool.bytes_in_use(), 64, "the emptied first descriptor went back");
        let want: Vec<u32> = (1..18).filter(|&h| h != 3).collect();
        assert_eq!(sorted(&pool, l), want);
        // The full descriptor became the first one: adds go to a new line.
        pool.add(&mut l, PteHandle(100)).unwrap();
        assert_eq!(pool.bytes_in_use(), 128);
        assert_eq!(pool.iter(l).count(), 17);
        assert_eq!(pool.remove(&mut l, PteHandle(3)), Err(RmapError::NotFound(PteHandle(3))));
    }

    #[test]
    fn handles_of_every_bit_pattern_survive_descriptors() {
        let mut pool = PteListPool::new();
        pool.reserve(2);
        let mut l = PteList::EMPTY;
        let hs = [u32::MAX, 0, 1, 0xf, 0x8000_0000, u32::MAX - 1];
        for &h in &hs {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        let mut want = hs.to_vec();
        want.sort_unstable();
        assert_eq!(sorted(&pool, l), want);
        for &h in &hs[..5] {
            pool.remove(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(l.single(), Some(PteHandle(u32::MAX - 1)));
    }

    #[test]
    fn remove_refills_holes_and_returns_to_inline() {
        let mut pool = PteListPool::new();
        pool.reserve(8);
        let mut l = PteList::EMPTY;
        for h in 0..40 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(pool.remove(&mut l, PteHandle(99)), Err(RmapError::NotFound(PteHandle(99))));
        for h in (1..40).rev().step_by(3) {
            pool.remove(&mut l, PteHandle(h)).unwrap();
        }
        let want: Vec<u32> = (0..40).filter(|h| !(1..40).rev().step_by(3).any(|x| x == *h)).collect();
        assert_eq!(sorted(&pool, l), want);
        for &h in &want[1..] {
            pool.remove(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(l.single(), Some(PteHandle(want[0])));
        assert_eq!(pool.bytes_in_use(), 0);
    }

    #[test]
    fn drain_visits_all_and_frees_descriptors() {
        let mut pool = PteListPool::new();
        pool.reserve(3);
        let mut l = PteList::EMPTY;
        for h in 0..30 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        let mut seen = Vec::new();
        pool.drain(&mut l, |h| seen.push(h.0));
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
        assert!(l.is_empty());
        assert_eq!(pool.bytes_in_use(), 0);
        assert_eq!(pool.reserve_len(), 3);
    }
}
