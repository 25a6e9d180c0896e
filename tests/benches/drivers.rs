//! The core drivers on a 64 GiB slot (16 Mi pages of 4 KiB):
//! - harvest (classic get-and-clear under write protection) at 0.1 %, 1 %,
//!   10 % dirty, against the floor: a plain atomic scan-and-clear of the
//!   same bitmap;
//! - a write-protect round with 1 % writable: the writable chain against
//!   walking every page of the slot;
//! - ageing throughput (PTEs aged per second).
//!
//! The back end here is a flat array of leaf words, one per page (handle =
//! page index), so the measurement is the drivers' own cost.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mmu_generic::addr::{Gfn, GfnRange, Hva};
use mmu_generic::age::{age, NoAccessedBit};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend};
use mmu_generic::dirty_bitmap::DirtyBitmap;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;

const PAGES: u64 = 16 << 20;
const W: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;

struct Flat {
    ptes: Vec<AtomicU64>,
}

impl Flat {
    fn new(bits: u64) -> Self {
        Self { ptes: (0..PAGES).map(|_| AtomicU64::new(bits)).collect() }
    }
}

impl MmuBackend for Flat {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }
    fn for_each_leaf(&self, _: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        (gfns.start.0..gfns.end.0.min(PAGES)).for_each(|g| f(PteHandle(g as u32)));
    }
    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        let w = self.ptes[h.0 as usize].load(Ordering::Relaxed);
        Some(Leaf {
            gfn: Gfn(h.0 as u64),
            npages: 1,
            writable: w & W != 0,
            young: w & A != 0,
            dirty: w & D != 0,
            access_tracked: false,
        })
    }
    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let was = self.ptes[h.0 as usize].fetch_and(!W, Ordering::AcqRel) & W != 0;
        if was {
            flush.add_range(GfnRange { start: Gfn(h.0 as u64), end: Gfn(h.0 as u64 + 1) });
        }
        was
    }
    fn clear_dirty(&self, h: PteHandle, _: &mut FlushToken) -> bool {
        self.ptes[h.0 as usize].fetch_and(!D, Ordering::AcqRel) & D != 0
    }
    fn clear_young(&self, h: PteHandle, _: &mut FlushToken) -> bool {
        // Test first: an old PTE costs a load, not a locked operation.
        let p = &self.ptes[h.0 as usize];
        p.load(Ordering::Relaxed) & A != 0 && p.fetch_and(!A, Ordering::AcqRel) & A != 0
    }
    fn split_huge(&mut self, _: PteHandle, _: &mut FlushToken) -> Result<(), BackendError> {
        Ok(())
    }
    fn zap(&mut self, h: PteHandle, _: &mut FlushToken) -> Option<Leaf> {
        let l = self.leaf(h);
        self.ptes[h.0 as usize].store(0, Ordering::Release);
        l
    }
}

struct NoTlb;

impl mmu_generic::backend::TlbFlush for NoTlb {
    fn flush_range(&mut self, _: GfnRange) {}
    fn flush_all(&mut self) {}
}

fn slot() -> (Memslots, Memslot) {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), PAGES, Hva(1 << 40), SlotFlags::DIRTY_LOG)).expect("id");
    let s = b.build().expect("valid");
    let m = *s.get(SlotId(0)).expect("created");
    (s, m)
}

/// Pages spread evenly: every `1 / fraction`-th page.
fn spread(permille: u64) -> Vec<u64> {
    let step = 1000 / permille;
    (0..PAGES).step_by(step as usize).collect()
}

/// A logged slot whose `dirty` pages were write-faulted this round.
fn logged(backend: &mut Flat, slot: &Memslot, dirty: &[u64]) -> SlotDirtyLog {
    let mut flush = FlushToken::new();
    // Start with nothing writable: the start pass then has nothing to do
    // beyond its walk.
    let log = SlotDirtyLog::start(slot, Tracking::WriteProtect, LogMode::Bitmap, backend, &mut flush)
        .expect("start");
    // The bench's back end has no TLB.
    flush.flush(&mut NoTlb);
    for &p in dirty {
        backend.ptes[p as usize].fetch_or(W | D, Ordering::Relaxed);
        log.note_writable(Gfn(p), PteHandle(p as u32), None).expect("in slot");
    }
    log
}

/// Times `routine` alone, running `setup` untimed before each call.
fn timed<S>(b: &mut criterion::Bencher<'_>, mut setup: impl FnMut() -> S, mut routine: impl FnMut(S)) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let input = setup();
            let t = Instant::now();
            routine(input);
            total += t.elapsed();
        }
        total
    })
}

fn harvest(c: &mut Criterion) {
    let (_, slot) = slot();
    let mut g = c.benchmark_group("harvest_64g");
    g.sample_size(10);
    let backend = RefCell::new(Flat::new(0));
    let mut out = Vec::with_capacity(PAGES as usize / 64);
    for permille in [1u64, 10, 100] {
        let dirty = spread(permille);
        let label = format!("{:.1}%", permille as f64 / 10.0);
        g.bench_function(BenchmarkId::new("vmmu_get_and_clear", &label), |b| {
            timed(
                b,
                || logged(&mut backend.borrow_mut(), &slot, &dirty),
                |mut log| {
                    let flush = log.get_and_clear(&mut *backend.borrow_mut(), &mut out).expect("bitmap mode");
                    black_box(flush.is_needed());
                },
            )
        });
        // The bitmap phase alone: the same pages marked in one log reused
        // across rounds (as the floor reuses its bitmap), nothing writable
        // left to re-protect.
        let log = RefCell::new(logged(&mut backend.borrow_mut(), &slot, &[]));
        g.bench_function(BenchmarkId::new("vmmu_bitmap_phase", &label), |b| {
            timed(
                b,
                || {
                    dirty.iter().for_each(|&p| {
                        log.borrow().bitmap().set(p);
                    })
                },
                |()| {
                    let flush = log
                        .borrow_mut()
                        .get_and_clear(&mut *backend.borrow_mut(), &mut out)
                        .expect("bitmap mode");
                    black_box(flush.is_needed());
                },
            )
        });
        let bitmap = DirtyBitmap::new(PAGES);
        g.bench_function(BenchmarkId::new("floor_bitmap_scan", &label), |b| {
            timed(
                b,
                || {
                    dirty.iter().for_each(|&p| {
                        bitmap.set(p);
                    })
                },
                |()| {
                    out.clear();
                    out.extend((0..bitmap.words()).map(|i| bitmap.take_word(i)));
                    black_box(out.len());
                },
            )
        });
    }
    g.finish();
}

fn protect_round(c: &mut Criterion) {
    let (_, slot) = slot();
    let writable = spread(10);
    let mut g = c.benchmark_group("write_protect_round_64g_1pct");
    g.sample_size(10);
    let backend = RefCell::new(Flat::new(0));
    let mut out = Vec::with_capacity(PAGES as usize / 64);
    g.bench_function("writable_chain", |b| {
        timed(
            b,
            || logged(&mut backend.borrow_mut(), &slot, &writable),
            |mut log| {
                let flush = log.get_and_clear(&mut *backend.borrow_mut(), &mut out).expect("bitmap mode");
                black_box(flush.is_needed());
            },
        )
    });
    let bitmap = DirtyBitmap::new(PAGES);
    g.bench_function("walk_every_page", |b| {
        timed(
            b,
            || {
                writable.iter().for_each(|&p| {
                    backend.borrow().ptes[p as usize].fetch_or(W, Ordering::Relaxed);
                })
            },
            |()| {
                let mut backend = backend.borrow_mut();
                let mut flush = FlushToken::new();
                for g in slot.gfns().start.0..slot.gfns().end.0 {
                    let h = PteHandle(g as u32);
                    if backend.leaf(h).is_some_and(|l| l.writable) && backend.write_protect(h, &mut flush) {
                        bitmap.set(g);
                    }
                }
                black_box(flush.is_needed());
            },
        )
    });
    g.finish();
}

fn ageing(c: &mut Criterion) {
    let (slots, slot) = slot();
    let backend = RefCell::new(Flat::new(A));
    let mut g = c.benchmark_group("ageing");
    g.sample_size(10);
    g.throughput(Throughput::Elements(PAGES));
    for young in [true, false] {
        g.bench_function(if young { "all_young_64g" } else { "all_old_64g" }, |b| {
            timed(
                b,
                || {
                    if young {
                        backend.borrow().ptes.iter().for_each(|p| {
                            p.fetch_or(A, Ordering::Relaxed);
                        })
                    }
                },
                |()| {
                    let mut flush = FlushToken::new();
                    let r = age(
                        &slots,
                        &mut *backend.borrow_mut(),
                        slot.hvas(),
                        NoAccessedBit::ReportOld,
                        &mut flush,
                    );
                    black_box((r.leaves, flush.is_needed()));
                },
            )
        });
    }
    g.finish();
}

criterion_group!(benches, harvest, protect_round, ageing);
criterion_main!(benches);
