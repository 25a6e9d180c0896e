//! The dirty-log round through a table walk: [`MmuBackend::round_chain_words`]
//! for the TDP engine, as KVM's `kvm_tdp_mmu_clear_dirty_pt_masked` does it.
//!
//! The generic round hands over words of the writable chain (64 guest frames
//! and a mask of those chained). Asking the reverse map for each chained
//! frame costs a miss on its list head (one word per frame, far apart in a
//! large slot) before the miss on the leaf; walking the tables from the root
//! instead finds the leaf table of a whole 2 MiB region once, with the upper
//! levels hot in cache, and eight 4 KiB leaves share each of its lines.
//!
//! Two passes, as the reverse-map path does ([`mmu_generic::dirty_log`]'s
//! batches): the walk only reads, collecting the leaves that need a change;
//! then one atomic per such leaf. A locked read-modify-write waits for its
//! line and holds back the loads after it, so the reads of a batch of words
//! are issued first and their misses overlap.
//!
//! **Obsolete roots.** [`TdpMmu::zap_all`] leaves the old tables in place
//! until [`TdpMmu::reclaim_obsolete`]; vCPUs may still run on them, and their
//! leaves keep write permission and dirty bits that a walk from the current
//! root cannot see (the reverse map still files them). While any obsolete
//! table remains the walk declines and the round takes the reverse-map path.

use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, GfnRange, Pfn};
use mmu_generic::backend::{ChainRound, ChainWord, ChainWords, FlushToken};

use super::TdpMmu;
use crate::format::{level_frames, level_index, Access, TdpFormat, ENTRIES};
use crate::frame::{FrameMemory, Table};

/// Leaf entries a walk finds before it reads and changes them.
const HITS: usize = 64;

/// An entry where the leaf of some chained frames is (or was): the entry,
/// the first guest frame and level it maps at, and the word (index in the
/// call) and frames of that word it covers.
#[derive(Clone, Copy)]
struct Found<'a> {
    entry: &'a AtomicU64,
    gfn: u64,
    level: u8,
    word: usize,
    covered: u64,
}

/// What a `Found` holds before the walk fills it (never changed).
static UNUSED: AtomicU64 = AtomicU64::new(0);

/// The leaf table the walk reached last and the first guest frame it maps.
#[derive(Clone, Copy)]
struct LastTable<'a> {
    table: &'a Table,
    base: u64,
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// [`MmuBackend::round_chain_words`](mmu_generic::backend::MmuBackend::round_chain_words)
    /// for this engine, over the words of the slot of frames `slot`.
    ///
    /// Three passes over up to [`HITS`] entries at a time: find each chained
    /// frame's entry (the walk reads only the upper levels, hot in cache,
    /// and a 4 KiB leaf table is reused for every frame it maps); read the
    /// entries, independent loads whose misses overlap; then change those
    /// that need it, each line now in cache.
    pub(super) fn round_words(
        &self,
        slot: GfnRange,
        words: &[ChainWord],
        mut round: ChainRound<'_>,
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) -> ChainWords {
        if !self.obsolete.is_empty() || writable.len() < words.len() {
            return ChainWords::NotHandled;
        }
        if matches!(round, ChainRound::HarvestDirty(_)) {
            writable[..words.len()].fill(0);
        }
        let mut found = [Found { entry: &UNUSED, gfn: 0, level: 1, word: 0, covered: 0 }; HITS];
        let mut n = 0usize;
        let mut last: Option<LastTable<'_>> = None;
        for (i, word) in words.iter().enumerate() {
            // Only the slot's frames, whatever the caller passed (a word
            // inside the slot needs no clipping).
            let inside =
                word.first >= slot.start && word.first.0.checked_add(64).is_some_and(|e| e <= slot.end.0);
            let mut bits = if inside {
                word.mask
            } else {
                word.mask & word_bits(word.first.0, slot.start.0, slot.len())
            };
            while bits != 0 {
                let gfn = word.first.0.wrapping_add(bits.trailing_zeros() as u64);
                let Some((entry, level)) = self.round_entry(gfn, &mut last) else {
                    bits &= bits - 1;
                    continue;
                };
                // The chained frames of this word the entry maps: one for a
                // 4 KiB entry (the common case, in the leaf table reached
                // before), all of them for a huge leaf covering the word.
                let span = level_frames(level);
                let start = gfn & !(span - 1);
                let covered = if level == 1 {
                    bits & bits.wrapping_neg()
                } else {
                    word_bits(word.first.0, start, span) & bits
                };
                bits &= !covered;
                found[n] = Found { entry, gfn: start, level, word: i, covered };
                n += 1;
                if n == HITS {
                    self.change(&found[..n], &mut round, writable, flush);
                    n = 0;
                }
            }
        }
        self.change(&found[..n], &mut round, writable, flush);
        ChainWords::Done
    }

    /// Reads the entries found, then changes each leaf that needs it with one
    /// atomic. Write protection takes the permission away with a
    /// compare-exchange (the processor may set A/D meanwhile: then again
    /// from the new value); a harvest clears D with `fetch_and`, reports the
    /// leaf's frames if it was set, and notes in `writable` the chained
    /// frames whose leaf stays writable.
    fn change(
        &self,
        found: &[Found<'_>],
        round: &mut ChainRound<'_>,
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) {
        let mut seen = [0u64; HITS];
        for (e, x) in seen.iter_mut().zip(found) {
            *e = x.entry.load(Ordering::Acquire);
        }
        let f = &self.format;
        let d = f.dirty_mask();
        // A huge leaf met again from the next word: changed once, and its
        // write permission as the first meeting found it.
        let mut prev: Option<(&AtomicU64, bool)> = None;
        for (x, &e) in found.iter().zip(&seen) {
            if !self.is_any_leaf(e, x.level) {
                continue;
            }
            let present = f.is_present(e);
            let access = if present { f.leaf_access(e) } else { f.tracked_access(e) };
            let w = access.contains(Access::WRITE);
            let again = prev.filter(|&(p, _)| core::ptr::eq(p, x.entry));
            prev = Some((x.entry, again.map_or(w, |(_, w)| w)));
            let range = GfnRange { start: Gfn(x.gfn), end: Gfn(x.gfn + level_frames(x.level)) };
            match round {
                ChainRound::WriteProtect => {
                    if w && again.is_none() {
                        self.take_write(x.entry, e, range, flush);
                    }
                }
                ChainRound::HarvestDirty(report) => {
                    if again.map_or(w, |(_, w)| w) {
                        writable[x.word] |= x.covered;
                    }
                    if again.is_none()
                        && present
                        && e & d != 0
                        && x.entry.fetch_and(!d, Ordering::AcqRel) & d != 0
                    {
                        // A cached translation would let the processor skip
                        // setting the bit again.
                        flush.add_range(range);
                        report(range);
                    }
                }
            }
        }
    }

    /// Takes write permission from the leaf `entry` (present, or the saved
    /// permissions of an access-tracked one), read as `cur`, mapping `range`.
    fn take_write(&self, entry: &AtomicU64, mut cur: u64, range: GfnRange, flush: &mut FlushToken) {
        let f = &self.format;
        loop {
            let present = f.is_present(cur);
            let access = if present { f.leaf_access(cur) } else { f.tracked_access(cur) };
            if !access.contains(Access::WRITE) {
                return;
            }
            let next = if present {
                f.with_leaf_access(cur, access - Access::WRITE)
            } else {
                f.with_tracked_access(cur, access - Access::WRITE)
            };
            match entry.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if present {
                        flush.add_range(range);
                    }
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// The entry of the current root where the leaf mapping `gfn` is, if
    /// the tables reach that far, with its level: a 4 KiB entry is not read
    /// here (it may be empty), a huge or access-tracked one above was.
    /// Reuses `last` when `gfn` lies in the 4 KiB leaf table reached before,
    /// and records there a leaf table the walk reaches.
    #[inline]
    fn round_entry<'a>(&'a self, gfn: u64, last: &mut Option<LastTable<'a>>) -> Option<(&'a AtomicU64, u8)> {
        if let Some(t) = *last {
            if gfn.wrapping_sub(t.base) < ENTRIES as u64 {
                return Some((&t.table[level_index(gfn, 1)], 1));
            }
        }
        let f = &self.format;
        if !f.walk_length().covers(gfn) {
            return None;
        }
        let addr_mask = f.phys_width().addr_mask();
        let mut table = self.table(self.root);
        let mut level = f.walk_length().levels();
        loop {
            let entry = &table[level_index(gfn, level)];
            if level == 1 {
                *last = Some(LastTable { table, base: gfn & !(ENTRIES as u64 - 1) });
                return Some((entry, 1));
            }
            let e = entry.load(Ordering::Acquire);
            if !f.is_present(e) {
                return (level <= 3 && f.is_tracked(e)).then_some((entry, level));
            }
            if f.is_leaf(e, level) {
                return Some((entry, level));
            }
            // A non-leaf entry holds its table's 4 KiB-aligned address.
            table = self.mem.table_at(Pfn((e & addr_mask) >> 12))?;
            level -= 1;
        }
    }
}

/// The bits of the word from guest frame `first` that the `span` frames from
/// `start` cover.
#[inline]
fn word_bits(first: u64, start: u64, span: u64) -> u64 {
    let lo = start.saturating_sub(first);
    let hi = start.saturating_add(span).saturating_sub(first).min(64);
    if lo >= hi {
        return 0;
    }
    let n = hi - lo;
    let ones = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones << lo
}
