//! Memslot lookup by gfn against vm-memory's `find_region`, on the same
//! layout: n slots of 4 pages with a 4-page hole between neighbours.
//!
//! The machine this runs on is shared, and a sample of many passes that
//! another process preempted for a time slice counts the slice. So each pass
//! (4096 lookups) is timed alone and a sample's figure is its median pass:
//! a pass that lost the core, or ran just after it came back with cold
//! caches, does not count. Both lookups are timed the same way.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotHint, SlotId};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const PAGES: u64 = 4;
const STRIDE: u64 = 8;
const LOOKUPS: usize = 4096;

fn ours(n: u64) -> Memslots {
    let mut b = MemslotsBuilder::new();
    for i in 0..n {
        b.create(Memslot::new(
            SlotId(i as u16),
            Gfn(i * STRIDE),
            PAGES,
            Hva(0x1000_0000 + i * 0x10000),
            SlotFlags::empty(),
        ))
        .expect("distinct ids");
    }
    b.build().expect("no overlap")
}

fn theirs(n: u64) -> GuestMemoryMmap<()> {
    let ranges: Vec<_> = (0..n).map(|i| (GuestAddress((i * STRIDE) << 12), (PAGES << 12) as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("mmap the regions")
}

/// Gfns inside slots: uniformly random, or 90 % in the same slot as the last.
fn pattern(n: u64, locality: bool) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(n);
    let mut slot = 0;
    (0..LOOKUPS)
        .map(|_| {
            if !locality || rng.gen_range(0..10) == 0 {
                slot = rng.gen_range(0..n);
            }
            slot * STRIDE + rng.gen_range(0..PAGES)
        })
        .collect()
}

/// Runs `pass` `iters` times, timing each run alone; returns `iters` times
/// the median run.
fn median_timed(iters: u64, mut pass: impl FnMut() -> u64) -> Duration {
    let mut times: Vec<Duration> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            black_box(pass());
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2] * u32::try_from(iters).expect("criterion asks for fewer than 2^32 passes")
}

// The timed loops are functions of their own, for
// `valgrind --tool=callgrind --toggle-collect='*ours_pass*'` and the like.
#[inline(never)]
fn ours_pass(slots: &Memslots, gfns: &[u64]) -> u64 {
    let mut hint = SlotHint::default();
    let mut sum = 0u64;
    for &gfn in gfns {
        sum += slots.lookup_hinted(Gfn(gfn), &mut hint).map_or(0, |s| s.npages());
    }
    sum
}

#[inline(never)]
fn theirs_pass(mem: &GuestMemoryMmap<()>, gfns: &[u64]) -> u64 {
    let mut sum = 0u64;
    for &gfn in gfns {
        sum += mem.find_region(GuestAddress(gfn << 12)).map_or(0, |r| r.len());
    }
    sum
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("memslot_lookup");
    for n in [2u64, 8, 32, 512, 32767] {
        let slots = ours(n);
        let mem = theirs(n);
        for locality in [false, true] {
            let gfns = pattern(n, locality);
            let tag = if locality { "local90" } else { "random" };
            g.bench_with_input(BenchmarkId::new(format!("vmmu_{tag}"), n), &gfns, |b, gfns| {
                b.iter_custom(|iters| median_timed(iters, || ours_pass(&slots, gfns)))
            });
            g.bench_with_input(BenchmarkId::new(format!("vm_memory_{tag}"), n), &gfns, |b, gfns| {
                b.iter_custom(|iters| median_timed(iters, || theirs_pass(&mem, gfns)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
