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

/// Leaves a walk collects before it changes them.
const HITS: usize = 64;

/// A leaf the walk found that needs an atomic: its entry, the value read, its
/// first guest frame and level.
#[derive(Clone, Copy)]
struct Hit<'a> {
    entry: &'a AtomicU64,
    seen: u64,
    gfn: u64,
    level: u8,
}

/// What a hit's slot holds before the walk fills it (never changed).
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
        let harvest = matches!(round, ChainRound::HarvestDirty(_));
        let f = &self.format;
        let dirty = f.dirty_mask();
        let mut hits = [Hit { entry: &UNUSED, seen: 0, gfn: 0, level: 1 }; HITS];
        let mut n = 0usize;
        let mut last: Option<LastTable<'_>> = None;
        for (word, keep) in words.iter().zip(writable.iter_mut()) {
            if harvest {
                *keep = 0;
            }
            // Only the slot's frames, whatever the caller passed.
            let mut bits = word.mask & word_bits(word.first.0, slot.start.0, slot.len());
            while bits != 0 {
                let gfn = word.first.0.wrapping_add(bits.trailing_zeros() as u64);
                let Some((entry, e, level)) = self.round_leaf(gfn, &mut last) else {
                    bits &= bits - 1;
                    continue;
                };
                // The chained frames of this word the leaf maps (all of them
                // for a huge leaf covering the word).
                let span = level_frames(level);
                let start = gfn & !(span - 1);
                let covered = word_bits(word.first.0, start, span) & bits;
                bits &= !covered;
                let present = f.is_present(e);
                let access = if present { f.leaf_access(e) } else { f.tracked_access(e) };
                let w = access.contains(Access::WRITE);
                let need = if harvest {
                    *keep |= if w { covered } else { 0 };
                    present && e & dirty != 0
                } else {
                    w
                };
                // A huge leaf reached again from the next word: once is enough.
                if !need || n > 0 && core::ptr::eq(hits[n - 1].entry, entry) {
                    continue;
                }
                hits[n] = Hit { entry, seen: e, gfn: start, level };
                n += 1;
                if n == HITS {
                    self.change(&hits[..n], &mut round, flush);
                    n = 0;
                }
            }
        }
        self.change(&hits[..n], &mut round, flush);
        ChainWords::Done
    }

    /// The second pass: one atomic per hit. Write protection takes the
    /// permission away with a compare-exchange (the processor may set A/D
    /// meanwhile; then again from the new value); a harvest clears D with
    /// `fetch_and` and reports the leaf's frames if it was set.
    fn change(&self, hits: &[Hit<'_>], round: &mut ChainRound<'_>, flush: &mut FlushToken) {
        let f = &self.format;
        for hit in hits {
            let range = GfnRange { start: Gfn(hit.gfn), end: Gfn(hit.gfn + level_frames(hit.level)) };
            match round {
                ChainRound::WriteProtect => {
                    let mut cur = hit.seen;
                    loop {
                        let present = f.is_present(cur);
                        let access = if present { f.leaf_access(cur) } else { f.tracked_access(cur) };
                        if !access.contains(Access::WRITE) {
                            break;
                        }
                        let next = if present {
                            f.with_leaf_access(cur, access - Access::WRITE)
                        } else {
                            f.with_tracked_access(cur, access - Access::WRITE)
                        };
                        match hit.entry.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                            Ok(_) => {
                                if present {
                                    flush.add_range(range);
                                }
                                break;
                            }
                            Err(now) => cur = now,
                        }
                    }
                }
                ChainRound::HarvestDirty(report) => {
                    let d = f.dirty_mask();
                    if hit.entry.fetch_and(!d, Ordering::AcqRel) & d != 0 {
                        // A cached translation would let the processor skip
                        // setting the bit again.
                        flush.add_range(range);
                        report(range);
                    }
                }
            }
        }
    }

    /// The leaf (present or access-tracked) of the current root that maps
    /// `gfn`: its entry, value and level. Reuses `last` when `gfn` lies in
    /// the leaf table reached before; a walk that reaches a 4 KiB leaf
    /// table records it there.
    #[inline]
    fn round_leaf<'a>(
        &'a self,
        gfn: u64,
        last: &mut Option<LastTable<'a>>,
    ) -> Option<(&'a AtomicU64, u64, u8)> {
        if let Some(t) = *last {
            if gfn.wrapping_sub(t.base) < ENTRIES as u64 {
                let entry = &t.table[level_index(gfn, 1)];
                let e = entry.load(Ordering::Acquire);
                return self.is_any_leaf(e, 1).then_some((entry, e, 1));
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
            let e = entry.load(Ordering::Acquire);
            if !f.is_present(e) {
                return (level <= 3 && f.is_tracked(e)).then_some((entry, e, level));
            }
            if level == 1 || f.is_leaf(e, level) {
                return Some((entry, e, level));
            }
            // A non-leaf entry holds its table's 4 KiB-aligned address.
            table = self.mem.table_at(Pfn((e & addr_mask) >> 12))?;
            level -= 1;
            if level == 1 {
                *last = Some(LastTable { table, base: gfn & !(ENTRIES as u64 - 1) });
            }
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
