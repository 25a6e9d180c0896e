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
//! batches): the walk only finds the leaves of a batch of words and starts
//! loading their lines (a software prefetch); then one atomic per leaf that
//! needs a change. A locked read-modify-write waits for its line and holds
//! back the loads after it, so the lines of the whole batch are requested
//! first and their misses overlap.
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

/// A table the walk reached last and the first guest frame it maps.
#[derive(Clone, Copy)]
struct LastTable<'a> {
    table: &'a Table,
    base: u64,
}

/// Where a walk for one frame ended: in the 4 KiB leaf table mapping it
/// (its entry may be empty), or at a huge or access-tracked leaf above,
/// with its level.
enum Reach<'a> {
    LeafTable(&'a Table),
    Above(&'a AtomicU64, u8),
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// [`MmuBackend::round_chain_words`](mmu_generic::backend::MmuBackend::round_chain_words)
    /// for this engine, over the words of the slot of frames `slot`.
    ///
    /// Two passes over up to [`HITS`] entries at a time: find each chained
    /// frame's entry (the walk reads only the upper levels, hot in cache,
    /// and a 4 KiB leaf table is reused for every frame it maps) and start
    /// loading its line, so the misses of the batch overlap; then read and
    /// change those that need it, each line in cache or on its way.
    pub(super) fn round_words(
        &self,
        slot: GfnRange,
        words: &[ChainWord],
        round: ChainRound<'_>,
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) -> ChainWords {
        if !self.obsolete.is_empty() || writable.len() < words.len() {
            return ChainWords::NotHandled;
        }
        match round {
            ChainRound::WriteProtect => self.find::<false>(slot, words, |found| self.protect(found, flush)),
            ChainRound::HarvestDirty(report) => {
                writable[..words.len()].fill(0);
                self.find::<true>(slot, words, |found| self.harvest(found, report, writable, flush));
            }
        }
        ChainWords::Done
    }

    /// Finds the entries of the chained frames of `words` inside `slot` and
    /// hands them to `change`, up to [`HITS`] at a time, in frame order;
    /// with their word and the frames of it they cover if `WORDS` (a
    /// harvest needs them, write protection does not).
    #[inline]
    fn find<'a, const WORDS: bool>(
        &'a self,
        slot: GfnRange,
        words: &[ChainWord],
        mut change: impl FnMut(&[Found<'a>]),
    ) {
        let mut found = [Found { entry: &UNUSED, gfn: 0, level: 1, word: 0, covered: 0 }; HITS];
        let mut n = 0usize;
        // The 4 KiB leaf table reached last (reused for every frame it
        // maps) and the level-2 table above it (a walk to the next leaf
        // table starts there, one level to read, while the frame is in the
        // same 1 GiB).
        let mut leaf: Option<LastTable<'_>> = None;
        let mut dir: Option<LastTable<'_>> = None;
        // A word from a frame at most `room` past the slot's first lies
        // inside the slot.
        let room = slot.len().checked_sub(64);
        for (i, word) in words.iter().enumerate() {
            // Only the slot's frames, whatever the caller passed (a word
            // inside the slot needs no clipping).
            let inside = room.is_some_and(|r| word.first.0.wrapping_sub(slot.start.0) <= r);
            let mut bits = if inside {
                word.mask
            } else {
                word.mask & word_bits(word.first.0, slot.start.0, slot.len())
            };
            while bits != 0 {
                let low = bits & bits.wrapping_neg();
                let gfn = word.first.0.wrapping_add(low.trailing_zeros() as u64);
                // The common case: a 4 KiB entry of the leaf table reached
                // before, one chained frame.
                let hit = match leaf {
                    Some(t) if gfn.wrapping_sub(t.base) < ENTRIES as u64 => {
                        bits ^= low;
                        Found { entry: &t.table[level_index(gfn, 1)], gfn, level: 1, word: i, covered: low }
                    }
                    _ => match self.round_entry(gfn, &mut dir) {
                        None => {
                            bits ^= low;
                            continue;
                        }
                        Some(Reach::LeafTable(table)) => {
                            leaf = Some(LastTable { table, base: gfn & !(ENTRIES as u64 - 1) });
                            bits ^= low;
                            Found { entry: &table[level_index(gfn, 1)], gfn, level: 1, word: i, covered: low }
                        }
                        Some(Reach::Above(entry, level)) => {
                            // All the chained frames of this word the huge
                            // leaf covers.
                            let span = level_frames(level);
                            let start = gfn & !(span - 1);
                            let covered = word_bits(word.first.0, start, span) & bits;
                            bits &= !covered;
                            Found { entry, gfn: start, level, word: i, covered }
                        }
                    },
                };
                prefetch(hit.entry);
                found[n] = if WORDS { hit } else { Found { word: 0, covered: 0, ..hit } };
                n += 1;
                if n == HITS {
                    change(&found);
                    n = 0;
                }
            }
        }
        change(&found[..n]);
    }

    /// Write protection of the entries found: takes the permission from
    /// each writable leaf with a compare-exchange (the processor may set A/D
    /// meanwhile: then again from the new value). The entries are read one
    /// by one here: their lines were requested as the walk found them.
    fn protect(&self, found: &[Found<'_>], flush: &mut FlushToken) {
        let f = &self.format;
        // The frames of the 4 KiB leaves protected here, from the lowest to
        // the highest: one range for the token at the end, as adding each
        // leaf's frame would come to.
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        // A huge leaf met again from the next word: protected once.
        let mut prev: Option<&AtomicU64> = None;
        for x in found {
            let e = x.entry.load(Ordering::Acquire);
            if x.level == 1 {
                // The common case: a 4 KiB entry, met once in a round.
                if (f.is_present(e) || f.is_tracked(e)) && self.take_write(x.entry, e) == Some(true) {
                    lo = lo.min(x.gfn);
                    hi = hi.max(x.gfn);
                }
                continue;
            }
            if !self.is_any_leaf(e, x.level) || prev.is_some_and(|p| core::ptr::eq(p, x.entry)) {
                continue;
            }
            prev = Some(x.entry);
            if self.take_write(x.entry, e) == Some(true) {
                flush.add_range(GfnRange { start: Gfn(x.gfn), end: Gfn(x.gfn + level_frames(x.level)) });
            }
        }
        if lo <= hi {
            flush.add_range(GfnRange { start: Gfn(lo), end: Gfn(hi + 1) });
        }
    }

    /// D-bit harvest of the entries found (their lines requested as the walk
    /// found them): clears D with
    /// `fetch_and` where it is set, reports the leaf's frames if it was, and
    /// notes in `writable` the chained frames whose leaf stays writable.
    fn harvest(
        &self,
        found: &[Found<'_>],
        report: &mut dyn FnMut(GfnRange),
        writable: &mut [u64],
        flush: &mut FlushToken,
    ) {
        let f = &self.format;
        let d = f.dirty_mask();
        // A huge leaf met again from the next word: harvested once, and its
        // write permission as the first meeting found it.
        let mut prev: Option<(&AtomicU64, bool)> = None;
        for x in found {
            let e = x.entry.load(Ordering::Acquire);
            if !self.is_any_leaf(e, x.level) {
                continue;
            }
            let present = f.is_present(e);
            let access = if present { f.leaf_access(e) } else { f.tracked_access(e) };
            let again = prev.filter(|&(p, _)| core::ptr::eq(p, x.entry));
            let w = again.map_or(access.contains(Access::WRITE), |(_, w)| w);
            prev = Some((x.entry, w));
            if w {
                writable[x.word] |= x.covered;
            }
            if again.is_none() && present && e & d != 0 && x.entry.fetch_and(!d, Ordering::AcqRel) & d != 0 {
                let range = GfnRange { start: Gfn(x.gfn), end: Gfn(x.gfn + level_frames(x.level)) };
                // A cached translation would let the processor skip setting
                // the bit again.
                flush.add_range(range);
                report(range);
            }
        }
    }

    /// Takes write permission from the leaf `entry` (present, or the saved
    /// permissions of an access-tracked one), read as `cur`. Returns `None`
    /// when it had none, else whether the leaf was present (its translations
    /// need a flush).
    pub(super) fn take_write(&self, entry: &AtomicU64, mut cur: u64) -> Option<bool> {
        let f = &self.format;
        loop {
            let present = f.is_present(cur);
            let access = if present { f.leaf_access(cur) } else { f.tracked_access(cur) };
            if !access.contains(Access::WRITE) {
                return None;
            }
            let next = if present {
                f.with_leaf_access(cur, access - Access::WRITE)
            } else {
                f.with_tracked_access(cur, access - Access::WRITE)
            };
            match entry.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(present),
                Err(now) => cur = now,
            }
        }
    }

    /// Where the leaf mapping `gfn` is under the current root, if the
    /// tables reach that far: the 4 KiB leaf table (its entry is not read
    /// here, it may be empty), or a huge or access-tracked entry above,
    /// which was. Starts from the level-2 table `dir` when `gfn` lies in it,
    /// and records there the level-2 table the walk reaches. Not inlined:
    /// the round's loop reuses the leaf table for most frames and keeps its
    /// registers for that.
    #[inline(never)]
    fn round_entry<'a>(&'a self, gfn: u64, dir: &mut Option<LastTable<'a>>) -> Option<Reach<'a>> {
        let f = &self.format;
        let addr_mask = f.phys_width().addr_mask();
        // The common case: the next leaf table under the same level-2 table
        // (the walk reached `gfn`'s 1 GiB before, so its address is covered).
        if let Some(t) = *dir {
            if gfn.wrapping_sub(t.base) < level_frames(3) {
                let e = t.table[level_index(gfn, 2)].load(Ordering::Acquire);
                if f.is_present(e) && !f.is_leaf(e, 2) {
                    return self.mem.table_at(Pfn((e & addr_mask) >> 12)).map(Reach::LeafTable);
                }
            }
        }
        if !f.walk_length().covers(gfn) {
            return None;
        }
        let (mut table, mut level) = match *dir {
            Some(t) if gfn.wrapping_sub(t.base) < level_frames(3) => (t.table, 2),
            _ => (self.table(self.root), f.walk_length().levels()),
        };
        loop {
            if level == 1 {
                return Some(Reach::LeafTable(table));
            }
            if level == 2 {
                *dir = Some(LastTable { table, base: gfn & !(level_frames(3) - 1) });
            }
            let entry = &table[level_index(gfn, level)];
            let e = entry.load(Ordering::Acquire);
            if !f.is_present(e) {
                return (level <= 3 && f.is_tracked(e)).then_some(Reach::Above(entry, level));
            }
            if f.is_leaf(e, level) {
                return Some(Reach::Above(entry, level));
            }
            // A non-leaf entry holds its table's 4 KiB-aligned address.
            table = self.mem.table_at(Pfn((e & addr_mask) >> 12))?;
            level -= 1;
        }
    }
}

/// Starts moving the line of `entry` into the cache, so that the read pass
/// finds it in flight. Only a hint: what any load returns is unchanged.
#[inline(always)]
fn prefetch(entry: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault,
    // whatever the address; SSE, which defines it, is part of the x86_64
    // baseline, so every processor this code runs on has it.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(entry.as_ptr().cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = entry;
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
