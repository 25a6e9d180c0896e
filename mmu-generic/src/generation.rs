//! Fast "zap everything" by generation.
//!
//! Zapping every page table of a large guest at once would hold the MMU lock
//! for as long as the walk takes. Instead the valid generation is bumped
//! ([`MmuGeneration::invalidate_all`]): every table page carries the
//! generation it was made in, pages of an older one are *obsolete*, lookups
//! skip them (so the next fault builds fresh tables at once) and a reclaimer
//! frees them in batches, offering to drop the lock between batches
//! ([`reclaim_obsolete`]).
//!
//! Zapping an obsolete page never syncs its unsync children (shadow paging):
//! their contents are about to be freed, and syncing them would read guest
//! tables for nothing, with the lock held. The reclaimer therefore tells the
//! back end why a page goes ([`ZapReason::Obsolete`]).

use alloc::vec::Vec;

use crate::sync::{AtomicU64, Ordering};

/// The MMU's valid generation.
#[derive(Debug, Default)]
pub struct MmuGeneration(AtomicU64);

impl MmuGeneration {
    /// Generation 0.
    pub fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// The valid generation: new table pages take it.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Makes every existing page obsolete. Returns the new generation. The
    /// caller flushes all TLBs (the obsolete tables may still be walked until
    /// the roots are switched).
    pub fn invalidate_all(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether a page made in generation `page_gen` is obsolete.
    pub fn is_obsolete(&self, page_gen: u64) -> bool {
        page_gen != self.current()
    }
}

/// Why a page is being zapped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ZapReason {
    /// The page's generation is obsolete: free it, do not sync children.
    Obsolete,
    /// An ordinary zap (range invalidation, memslot change).
    Range,
}

/// What a reclaim pass did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReclaimReport {
    /// Pages freed.
    pub freed: usize,
    /// Batches run (the lock could be dropped between each).
    pub batches: usize,
    /// Whether the pass stopped early because `yield_lock` asked it to.
    pub interrupted: bool,
}

/// Frees the obsolete pages of `pages` in batches of `batch`.
///
/// `page_gen` reads a page's generation; `free` zaps one obsolete page (it
/// receives [`ZapReason::Obsolete`] so it does not sync children). Between
/// batches `yield_lock` runs: the caller may drop and retake the MMU lock
/// there, and return `false` to stop (the remaining obsolete pages stay
/// listed for the next pass). Valid pages are kept, in order.
pub fn reclaim_obsolete<T>(
    pages: &mut Vec<T>,
    generation: &MmuGeneration,
    batch: usize,
    mut page_gen: impl FnMut(&T) -> u64,
    mut free: impl FnMut(T, ZapReason),
    mut yield_lock: impl FnMut() -> bool,
) -> ReclaimReport {
    let batch = batch.max(1);
    let mut report = ReclaimReport::default();
    let mut kept = Vec::with_capacity(pages.len());
    let mut in_batch = 0;
    let mut drain = core::mem::take(pages).into_iter();
    for page in drain.by_ref() {
        if !generation.is_obsolete(page_gen(&page)) {
            kept.push(page);
            continue;
        }
        free(page, ZapReason::Obsolete);
        report.freed += 1;
        in_batch += 1;
        if in_batch == batch {
            in_batch = 0;
            report.batches += 1;
            if !yield_lock() {
                report.interrupted = true;
                break;
            }
        }
    }
    if in_batch > 0 {
        report.batches += 1;
    }
    kept.extend(drain);
    *pages = kept;
    report
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn reclaim_frees_only_obsolete_pages_in_batches() {
        let gen = MmuGeneration::new();
        let mut pages: Vec<(u32, u64)> = (0..10).map(|i| (i, 0)).collect();
        assert_eq!(gen.invalidate_all(), 1);
        pages.push((100, 1));
        let mut freed = vec![];
        let mut yields = 0;
        let r = reclaim_obsolete(
            &mut pages,
            &gen,
            4,
            |p| p.1,
            |p, why| {
                assert_eq!(why, ZapReason::Obsolete);
                freed.push(p.0)
            },
            || {
                yields += 1;
                true
            },
        );
        assert_eq!(r, ReclaimReport { freed: 10, batches: 3, interrupted: false });
        assert_eq!(yields, 2);
        assert_eq!(freed, (0..10).collect::<Vec<_>>());
        assert_eq!(pages, [(100, 1)]);
    }

    #[test]
    fn reclaim_stops_when_asked_and_keeps_the_rest() {
        let gen = MmuGeneration::new();
        let mut pages: Vec<u64> = vec![0; 10];
        gen.invalidate_all();
        let r = reclaim_obsolete(&mut pages, &gen, 3, |g| *g, |_, _| {}, || false);
        assert_eq!(r, ReclaimReport { freed: 3, batches: 1, interrupted: true });
        assert_eq!(pages.len(), 7);
    }
}
