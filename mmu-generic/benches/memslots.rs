//! Memslot lookup by gfn against vm-memory's `find_region`, on the same
//! layout: n slots of 4 pages with a 4-page hole between neighbours.
#![allow(missing_docs)] // criterion's macros generate undocumented items

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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("memslot_lookup");
    for n in [2u64, 8, 32, 512, 32767] {
        let slots = ours(n);
        let mem = theirs(n);
        for locality in [false, true] {
            let gfns = pattern(n, locality);
            let tag = if locality { "local90" } else { "random" };
            g.bench_with_input(BenchmarkId::new(format!("vmmu_{tag}"), n), &gfns, |b, gfns| {
                b.iter(|| {
                    let mut hint = SlotHint::default();
                    let mut sum = 0u64;
                    for &gfn in gfns {
                        sum += slots.lookup_hinted(Gfn(gfn), &mut hint).map_or(0, |s| s.npages());
                    }
                    black_box(sum)
                })
            });
            g.bench_with_input(BenchmarkId::new(format!("vm_memory_{tag}"), n), &gfns, |b, gfns| {
                b.iter(|| {
                    let mut sum = 0u64;
                    for &gfn in gfns {
                        sum += mem.find_region(GuestAddress(gfn << 12)).map_or(0, |r| r.len());
                    }
                    black_box(sum)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
