//! A compact list of PTE handles: the building block of the reverse map and of
//! shadow pages' parent lists.
//!
//! Most guest frames are mapped once (always, under EPT/NPT), so a list is one
//! 64-bit head word that stores a single handle inline: no allocation at all.
//! A second mapping moves the list into descriptors of one cache line each,
//! 14 handles a line, chained from the head; a list of 16 mappings costs two
//! lines plus the head, 8.5 bytes a mapping.
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

/// Handles per descriptor: 14 × 4 bytes plus the count and the link fill 64 bytes.
pub const DESC_HANDLES: usize = 14;

/// One cache line of handles.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Desc {
    handles: [u32; DESC_HANDLES],
    /// Handles in use. Only the head descriptor of a list may be partly full.
    len: u32,
    /// Next descriptor index + 1, 0 at the end; the free list reuses it.
    next: u32,
}

const EMPTY_DESC: Desc = Desc { handles: [0; DESC_HANDLES], len: 0, next: 0 };

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
/// Encoding: 0 is empty; bit 0 set means one handle inline in bits 1..33;
/// otherwise the word is `(descriptor index + 1) << 1`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PteList(u64);

impl fmt::Debug for PteList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.decode() {
            Head::Empty => f.write_str("PteList(empty)"),
            Head::One(h) => write!(f, "PteList(one {})", h),
            Head::Desc(d) => write!(f, "PteList(desc {})", d),
        }
    }
}

enum Head {
    Empty,
    One(u32),
    Desc(u32),
}

impl PteList {
    /// An empty list.
    pub const EMPTY: Self = Self(0);

    #[inline]
    fn decode(self) -> Head {
        if self.0 == 0 {
            Head::Empty
        } else if self.0 & 1 != 0 {
            Head::One((self.0 >> 1) as u32)
        } else {
            Head::Desc((self.0 >> 1) as u32 - 1)
        }
    }

    #[inline]
    fn one(h: u32) -> Self {
        Self(((h as u64) << 1) | 1)
    }

    #[inline]
    fn desc(i: u32) -> Self {
        Self(((i as u64) + 1) << 1)
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

    /// Ensures at least `n` free descriptors, allocating now (outside the MMU
    /// lock) so that later adds never allocate. One descriptor serves up to 14
    /// adds, so `n` = the number of adds planned suffices.
    pub fn reserve(&mut self, n: usize) {
        let Some(more) = n.checked_sub(self.free_count as usize).filter(|&m| m > 0) else { return };
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

    fn alloc(&mut self) -> Result<u32, RmapError> {
        let i = self.free_head.checked_sub(1).ok_or(RmapError::ReserveEmpty)?;
        let d = &mut self.descs[i as usize];
        self.free_head = d.next;
        self.free_count -= 1;
        *d = EMPTY_DESC;
        Ok(i)
    }

    fn free(&mut self, i: u32) {
        self.descs[i as usize].next = self.free_head;
        self.free_head = i + 1;
        self.free_count += 1;
    }

    /// Adds `h` to `list`. Fails only when a descriptor is needed and the
    /// reserve is empty; the list is then unchanged.
    pub fn add(&mut self, list: &mut PteList, h: PteHandle) -> Result<(), RmapError> {
        match list.decode() {
            Head::Empty => {
                *list = PteList::one(h.0);
            }
            Head::One(old) => {
                let d = self.alloc()?;
                let desc = &mut self.descs[d as usize];
                desc.handles[0] = old;
                desc.handles[1] = h.0;
                desc.len = 2;
                *list = PteList::desc(d);
            }
            Head::Desc(head) => {
                let desc = &mut self.descs[head as usize];
                if (desc.len as usize) < DESC_HANDLES {
                    desc.handles[desc.len as usize] = h.0;
                    desc.len += 1;
                } else {
                    let d = self.alloc()?;
                    let desc = &mut self.descs[d as usize];
                    desc.handles[0] = h.0;
                    desc.len = 1;
                    desc.next = head + 1;
                    *list = PteList::desc(d);
                }
            }
        }
        Ok(())
    }

    /// Removes one occurrence of `h` from `list`. The hole is filled with the
    /// last handle of the head descriptor, so only the head is ever partly
    /// full; a list left with one handle goes back inline.
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
            Head::Desc(head) => {
                let (d, slot) = self.find(head, h.0).ok_or(RmapError::NotFound(h))?;
                let hd = &mut self.descs[head as usize];
                hd.len -= 1;
                let last = hd.handles[hd.len as usize];
                let head_len = hd.len;
                let head_next = hd.next;
                self.descs[d as usize].handles[slot] = last;
                if head_len == 0 {
                    self.free(head);
                    *list = if head_next == 0 { PteList::EMPTY } else { PteList::desc(head_next - 1) };
                } else if head_len == 1 && head_next == 0 {
                    let only = self.descs[head as usize].handles[0];
                    self.free(head);
                    *list = PteList::one(only);
                }
                Ok(())
            }
        }
    }

    fn find(&self, mut d: u32, h: u32) -> Option<(u32, usize)> {
        loop {
            let desc = &self.descs[d as usize];
            if let Some(pos) = desc.handles[..desc.len as usize].iter().position(|&x| x == h) {
                return Some((d, pos));
            }
            d = desc.next.checked_sub(1)?;
        }
    }

    /// The handles of `list`, in no promised order.
    pub fn iter(&self, list: PteList) -> PteListIter<'_> {
        match list.decode() {
            Head::Empty => PteListIter { pool: self, one: None, desc: None, pos: 0 },
            Head::One(h) => PteListIter { pool: self, one: Some(h), desc: None, pos: 0 },
            Head::Desc(d) => PteListIter { pool: self, one: None, desc: Some(d), pos: 0 },
        }
    }

    /// Number of handles in `list`.
    pub fn len(&self, list: PteList) -> usize {
        match list.decode() {
            Head::Empty => 0,
            Head::One(_) => 1,
            Head::Desc(mut d) => {
                let mut n = 0;
                loop {
                    let desc = &self.descs[d as usize];
                    n += desc.len as usize;
                    match desc.next.checked_sub(1) {
                        Some(next) => d = next,
                        None => return n,
                    }
                }
            }
        }
    }

    /// Empties `list`, calling `f` on each handle, and returns its descriptors
    /// to the reserve.
    pub fn drain(&mut self, list: &mut PteList, mut f: impl FnMut(PteHandle)) {
        match core::mem::take(list).decode() {
            Head::Empty => {}
            Head::One(h) => f(PteHandle(h)),
            Head::Desc(mut d) => loop {
                let desc = self.descs[d as usize];
                desc.handles[..desc.len as usize].iter().for_each(|&h| f(PteHandle(h)));
                self.free(d);
                match desc.next.checked_sub(1) {
                    Some(next) => d = next,
                    None => break,
                }
            },
        }
    }
}

/// Iterator over one list's handles.
#[derive(Clone)]
pub struct PteListIter<'a> {
    pool: &'a PteListPool,
    one: Option<u32>,
    desc: Option<u32>,
    pos: usize,
}

impl Iterator for PteListIter<'_> {
    type Item = PteHandle;

    #[inline]
    fn next(&mut self) -> Option<PteHandle> {
        if let Some(h) = self.one.take() {
            return Some(PteHandle(h));
        }
        loop {
            let desc = &self.pool.descs[self.desc? as usize];
            if self.pos < desc.len as usize {
                self.pos += 1;
                return Some(PteHandle(desc.handles[self.pos - 1]));
            }
            self.desc = desc.next.checked_sub(1);
            self.pos = 0;
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
        let mut next = self.desc;
        let mut pos = self.pos;
        while let Some(d) = next {
            let desc = &self.pool.descs[d as usize];
            for &h in &desc.handles[pos.min(desc.len as usize)..desc.len as usize] {
                acc = f(acc, PteHandle(h));
            }
            pos = 0;
            next = desc.next.checked_sub(1);
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
    fn sixteen_mappings_cost_two_lines() {
        let mut pool = PteListPool::new();
        pool.reserve(4);
        let mut l = PteList::EMPTY;
        for h in 0..16 {
            pool.add(&mut l, PteHandle(h)).unwrap();
        }
        assert_eq!(pool.bytes_in_use(), 128);
        assert_eq!(pool.len(l), 16);
        assert_eq!(sorted(&pool, l), (0..16).collect::<Vec<_>>());
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
