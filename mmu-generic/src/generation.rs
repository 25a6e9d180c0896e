//! Fast "zap everything" by generation.
//!
//! Zapping every page table of a large guest at once would hold the MMU lock
//! for as long as the walk takes. Instead the valid generation is bumped
//! ([`MmuGeneration::invalidate_all`]): every table page carries the
//! generation it was made in, pages of an older one are *obsolete*, lookups
//! skip them (so the next fault builds fresh tables at once) and a reclaimer
//! frees them in batches between which the caller really drops the lock
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
    #[inline]
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
    #[inline]
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

/// What one [`ObsoleteReclaimer::step`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReclaimStep {
    /// Pages freed by this step.
    pub freed: usize,
    /// The pass reached the end of the list: every obsolete page listed
    /// when the step ran is freed. (A zap-all while the lock was dropped
    /// makes more pages obsolete; a new pass frees them.)
    pub done: bool,
}

/// A reclaim pass over the caller's list of pages that survives dropping
/// the MMU lock between batches.
///
/// The list stays the caller's (under its lock): each [`step`](Self::step)
/// takes the lock's `&mut`, frees at most one batch in place (no
/// allocation) and returns, so the caller can drop the lock, let vCPUs
/// fault, and retake it. Pages added meanwhile are appended to the same
/// list and examined by a later step; none is lost. The pass remembers
/// only a position, which stays valid because freed pages are removed by
/// swapping in the list's last element.
///
/// ```
/// use mmu_generic::generation::{MmuGeneration, ObsoleteReclaimer};
/// let gen = MmuGeneration::new();
/// let mut pages: Vec<u64> = vec![0; 5];
/// gen.invalidate_all();
/// let mut r = ObsoleteReclaimer::new();
/// let mut freed = 0;
/// loop {
///     // lock
///     let step = r.step(&mut pages, &gen, 2, |g| *g, |_, _| freed += 1);
///     // unlock: a vCPU builds a page meanwhile
///     pages.push(gen.current());
///     if step.done { break; }
/// }
/// assert_eq!(freed, 5);
/// assert!(pages.iter().all(|&g| g == gen.current()));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ObsoleteReclaimer {
    next: usize,
}

impl ObsoleteReclaimer {
    /// A pass starting at the head of the list.
    pub const fn new() -> Self {
        Self { next: 0 }
    }

    /// Under the MMU lock: frees up to `batch` obsolete pages of `pages`,
    /// calling `free(page, ZapReason::Obsolete)` on each (it must not sync
    /// children), and returns. `page_gen` reads a page's generation.
    pub fn step<T>(
        &mut self,
        pages: &mut Vec<T>,
        generation: &MmuGeneration,
        batch: usize,
        mut page_gen: impl FnMut(&T) -> u64,
        mut free: impl FnMut(T, ZapReason),
    ) -> ReclaimStep {
        let batch = batch.max(1);
        let mut freed = 0;
        while self.next < pages.len() {
            if generation.is_obsolete(page_gen(&pages[self.next])) {
                // The last page moves here and is examined next.
                let page = pages.swap_remove(self.next);
                free(page, ZapReason::Obsolete);
                freed += 1;
                if freed == batch {
                    let done = self.next >= pages.len();
                    if done {
                        self.next = 0;
                    }
                    return ReclaimStep { freed, done };
                }
            } else {
                self.next += 1;
            }
        }
        self.next = 0;
        ReclaimStep { freed, done: true }
    }
}

/// Frees the obsolete pages of `pages` in batches of `batch`, for a caller
/// that keeps the lock for the whole pass: `yield_lock` runs between batches
/// (a scheduling point; return `false` to stop, leaving the remaining
/// obsolete pages listed for the next pass). To drop the lock between
/// batches, call [`ObsoleteReclaimer::step`] instead. Works in place
/// (valid pages are kept, not necessarily in order) and never allocates.
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
    let mut pass = ObsoleteReclaimer::new();
    loop {
        let step = pass.step(pages, generation, batch, &mut page_gen, &mut free);
        report.freed += step.freed;
        if step.freed > 0 {
            report.batches += 1;
        }
        // A scheduling point after every full batch.
        if step.freed == batch && !yield_lock() {
            report.interrupted = true;
            return report;
        }
        if step.done {
            return report;
        }
    }
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
        freed.sort_unstable();
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

    /// The lock is really dropped between steps: pages built meanwhile (valid
    /// ones, and obsolete ones after a second zap-all) are neither lost nor
    /// freed while valid, and every obsolete page is freed exactly once.
    #[test]
    fn reclaim_steps_keep_pages_added_while_the_lock_was_dropped() {
        let gen = MmuGeneration::new();
        let mut pages: Vec<(u32, u64)> = (0..9).map(|i| (i, 0)).collect();
        gen.invalidate_all();
        let mut r = ObsoleteReclaimer::new();
        let mut freed = vec![];
        let mut next_id = 100;
        let mut steps = 0;
        loop {
            let step = r.step(&mut pages, &gen, 2, |p| p.1, |p, _| freed.push(p.0));
            steps += 1;
            assert!(step.freed <= 2);
            // Lock dropped: a vCPU builds a page of the current generation.
            pages.push((next_id, gen.current()));
            next_id += 1;
            if steps == 2 {
                // A second zap-all while the lock is free.
                gen.invalidate_all();
            }
            if step.done {
                break;
            }
        }
        // A second pass frees what the second zap-all made obsolete.
        while !r.step(&mut pages, &gen, 2, |p| p.1, |p, _| freed.push(p.0)).done {}
        freed.sort_unstable();
        let mut want: Vec<u32> = (0..9).chain(100..102).collect();
        want.sort_unstable();
        assert_eq!(freed, want, "each obsolete page freed once");
        assert!(pages.iter().all(|p| p.1 == gen.current()));
        assert_eq!(pages.len() + freed.len(), 9 + (next_id - 100) as usize);
    }
}
