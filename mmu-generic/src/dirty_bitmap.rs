//! An atomic bitmap with one bit per 4 KiB page of a slot.
//!
//! Bits are set by fault paths and harvest passes (possibly on several CPUs)
//! and taken by the harvester with word-wide swaps, so a bit set concurrently
//! with a harvest lands either in this round or in the next, never nowhere.

use alloc::vec::Vec;

use crate::sync::{AtomicU64, Ordering};

/// One bit per page, in 64-bit atomic words.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    npages: u64,
}

impl DirtyBitmap {
    /// A clear bitmap for `npages` pages.
    pub fn new(npages: u64) -> Self {
        let n = npages.div_ceil(64) as usize;
        Self { words: (0..n).map(|_| AtomicU64::new(0)).collect(), npages }
    }

    /// Number of pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Number of 64-bit words.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Sets the bit of page `idx`. Returns whether it was clear. Out-of-range
    /// pages are ignored (and reported as not newly set).
    #[inline]
    pub fn set(&self, idx: u64) -> bool {
        if idx >= self.npages {
            return false;
        }
        let bit = 1u64 << (idx % 64);
        self.words[(idx / 64) as usize].fetch_or(bit, Ordering::Release) & bit == 0
    }

    /// Sets the bits of pages `[first, first + n)` clipped to the bitmap.
    pub fn set_range(&self, first: u64, n: u64) {
        for_each_word_mask(first, n, self.npages, |w, mask| {
            self.words[w].fetch_or(mask, Ordering::Release);
        });
    }

    /// Whether page `idx` is marked.
    pub fn test(&self, idx: u64) -> bool {
        idx < self.npages && self.words[(idx / 64) as usize].load(Ordering::Acquire) >> (idx % 64) & 1 != 0
    }

    /// Word `i` as it is now.
    #[inline]
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    /// Takes word `i`, leaving it clear.
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        // Cheap test first: most words of a large slot are clear, and a load
        // does not take the cache line exclusive.
        if self.words[i].load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.words[i].swap(0, Ordering::AcqRel)
    }

    /// Clears the bits of `mask` in word `i`; returns those that were set.
    #[inline]
    pub fn clear_mask(&self, i: usize, mask: u64) -> u64 {
        self.words[i].fetch_and(!mask, Ordering::AcqRel) & mask
    }

    /// Sets the bit of page `idx` (ignored out of range, as [`set`](Self::set)).
    /// Returns whether its word was all clear before: the first page of its
    /// 64 to be marked, so a caller keeping a summary of non-empty words
    /// marks it there once per word, not once per page.
    #[inline]
    pub fn set_first_of_word(&self, idx: u64) -> bool {
        if idx >= self.npages {
            return false;
        }
        self.words[(idx / 64) as usize].fetch_or(1u64 << (idx % 64), Ordering::Release) == 0
    }

    /// Takes word `i` with exclusive access: a plain read, and a plain write
    /// only if the word was not clear (no atomic operation, no cache line
    /// taken exclusive for a clear word).
    #[inline]
    pub fn take_word_mut(&mut self, i: usize) -> u64 {
        with_mut(&mut self.words[i], |w| {
            let v = *w;
            if v != 0 {
                *w = 0;
            }
            v
        })
    }

    /// Appends words `[start, end)` to `out` and clears them, with exclusive
    /// access: plain reads and writes, a loop the compiler can vectorize.
    #[inline]
    pub fn take_words_into(&mut self, start: usize, end: usize, out: &mut Vec<u64>) {
        out.extend(self.words[start..end].iter_mut().map(|w| with_mut(w, core::mem::take)));
    }

    /// Appends words `[start, end)` to `out`, with exclusive access (plain
    /// reads).
    #[inline]
    pub fn copy_words_into(&mut self, start: usize, end: usize, out: &mut Vec<u64>) {
        out.extend(self.words[start..end].iter_mut().map(|w| with_mut(w, |v| *v)));
    }

    /// Word `i`, read with exclusive access (a plain read).
    #[inline]
    pub fn word_mut(&mut self, i: usize) -> u64 {
        with_mut(&mut self.words[i], |w| *w)
    }

    /// Sets the bits of `mask` in word `i` with exclusive access.
    #[inline]
    pub fn or_word_mut(&mut self, i: usize, mask: u64) {
        with_mut(&mut self.words[i], |w| *w |= mask);
    }

    /// Clears the bits of `mask` in word `i` with exclusive access.
    #[inline]
    pub fn clear_mask_mut(&mut self, i: usize, mask: u64) {
        with_mut(&mut self.words[i], |w| *w &= !mask);
    }

    /// Sets the bits of pages `[first, first + n)` clipped to the bitmap,
    /// with exclusive access.
    pub fn set_range_mut(&mut self, first: u64, n: u64) {
        for_each_word_mask(first, n, self.npages, |w, mask| self.or_word_mut(w, mask));
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// Calls `f(word, mask)` for each word that pages `[first, first + n)`,
/// clipped to `npages`, touch, with the mask of those pages in it.
#[inline]
pub(crate) fn for_each_word_mask(first: u64, n: u64, npages: u64, mut f: impl FnMut(usize, u64)) {
    let end = first.saturating_add(n).min(npages);
    let mut i = first;
    while i < end {
        let w = i / 64;
        let lo = i % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        f(w as usize, mask);
        i = (w + 1) * 64;
    }
}

/// Plain access to an atomic word the caller holds exclusively.
#[inline]
fn with_mut<R>(w: &mut AtomicU64, f: impl FnOnce(&mut u64) -> R) -> R {
    #[cfg(loom)]
    {
        w.with_mut(f)
    }
    #[cfg(not(loom))]
    {
        f(w.get_mut())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn set_range_marks_exactly_the_range() {
        for (first, n) in [(0, 1), (3, 70), (63, 2), (64, 64), (10, 300), (250, 100)] {
            let b = DirtyBitmap::new(300);
            b.set_range(first, n);
            for i in 0..300 {
                assert_eq!(b.test(i), i >= first && i < first + n, "page {i} of {first}+{n}");
            }
        }
    }

    #[test]
    fn take_word_returns_and_clears() {
        let b = DirtyBitmap::new(128);
        assert!(b.set(65));
        assert!(!b.set(65));
        assert!(!b.set(128), "out of range is ignored");
        assert_eq!(b.take_word(1), 2);
        assert_eq!(b.take_word(1), 0);
        b.set(0);
        b.set(1);
        assert_eq!(b.clear_mask(0, 1), 1);
        assert_eq!(b.word(0), 2);
    }

    #[test]
    fn words_handed_over_in_bulk_are_appended_and_cleared_only_when_taken() {
        let mut b = DirtyBitmap::new(64 * 5);
        for p in [1, 64, 130, 200, 319] {
            b.set(p);
        }
        let mut out = alloc::vec![7];
        b.copy_words_into(1, 4, &mut out);
        assert_eq!(out, [7, 1, 1 << 2, 1 << 8], "copied after what `out` held");
        assert_eq!(b.count(), 5, "a copy clears nothing");
        out.clear();
        b.take_words_into(1, 4, &mut out);
        assert_eq!(out, [1, 1 << 2, 1 << 8]);
        assert_eq!((b.word(0), b.word(1), b.word(2), b.word(3), b.word(4)), (2, 0, 0, 0, 1 << 63));
        b.take_words_into(2, 2, &mut out);
        assert_eq!(out.len(), 3, "an empty range appends nothing");
    }
}
