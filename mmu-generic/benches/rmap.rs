//! The reverse map's PTE lists against the two designs argued in KVM,
//! built here: fixed 4-entry descriptors (`RMAP_EXT = 4`) and a per-PTE
//! sibling link (a doubly linked list threaded through an array beside the
//! PTEs). Handles are scattered over a large PTE array, as EPT and shadow
//! leaves are, and a cache scrub precedes each timed walk.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use criterion::measurement::WallTime;
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion,
};
use mmu_generic::pte_list::{PteHandle, PteList, PteListPool};
use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};

/// Total mappings per run.
const MAPPINGS: usize = 1 << 18;
/// The PTE array handles point into (sibling links live beside it).
const PTE_SPACE: u32 = 1 << 24;

/// A list design under test.
trait Design {
    fn new(gfns: usize) -> Self;
    fn add(&mut self, gfn: usize, h: u32);
    fn remove(&mut self, gfn: usize, h: u32);
    fn walk(&self, gfn: usize) -> u64;
    fn bytes(&self) -> usize;
}

struct Ours {
    heads: Vec<PteList>,
    pool: PteListPool,
}

impl Design for Ours {
    fn new(gfns: usize) -> Self {
        let mut pool = PteListPool::new();
        pool.reserve(MAPPINGS / 8);
        Self { heads: vec![PteList::EMPTY; gfns], pool }
    }
    fn add(&mut self, gfn: usize, h: u32) {
        if self.pool.reserve_len() == 0 {
            self.pool.reserve(1024);
        }
        self.pool.add(&mut self.heads[gfn], PteHandle(h)).expect("reserve topped up");
    }
    fn remove(&mut self, gfn: usize, h: u32) {
        self.pool.remove(&mut self.heads[gfn], PteHandle(h)).expect("present");
    }
    fn walk(&self, gfn: usize) -> u64 {
        self.pool.iter(self.heads[gfn]).map(|h| h.0 as u64).sum()
    }
    fn bytes(&self) -> usize {
        self.heads.len() * 8 + self.pool.bytes_in_use()
    }
}

/// KVM's original design: one inline entry, else a chain of 4-entry
/// descriptors (each 4 handles + count + link), filled from the head.
struct Ext4 {
    heads: Vec<u64>,
    descs: Vec<([u32; 4], u32, u32)>,
    free: Vec<u32>,
}

impl Design for Ext4 {
    fn new(gfns: usize) -> Self {
        Self { heads: vec![0; gfns], descs: Vec::new(), free: Vec::new() }
    }
    fn add(&mut self, gfn: usize, h: u32) {
        let head = self.heads[gfn];
        if head == 0 {
            self.heads[gfn] = (h as u64) << 1 | 1;
            return;
        }
        let alloc = |descs: &mut Vec<([u32; 4], u32, u32)>, free: &mut Vec<u32>| match free.pop() {
            Some(i) => i,
            None => {
                descs.push(([0; 4], 0, 0));
                descs.len() as u32 - 1
            }
        };
        if head & 1 == 1 {
            let d = alloc(&mut self.descs, &mut self.free);
            self.descs[d as usize] = ([(head >> 1) as u32, h, 0, 0], 2, 0);
            self.heads[gfn] = (d as u64 + 1) << 1;
            return;
        }
        let d = (head >> 1) as u32 - 1;
        if self.descs[d as usize].1 < 4 {
            let e = &mut self.descs[d as usize];
            e.0[e.1 as usize] = h;
            e.1 += 1;
        } else {
            let n = alloc(&mut self.descs, &mut self.free);
            self.descs[n as usize] = ([h, 0, 0, 0], 1, d + 1);
            self.heads[gfn] = (n as u64 + 1) << 1;
        }
    }
    fn remove(&mut self, gfn: usize, h: u32) {
        let head = self.heads[gfn];
        if head & 1 == 1 {
            self.heads[gfn] = 0;
            return;
        }
        let hd = (head >> 1) as u32 - 1;
        let mut d = hd;
        loop {
            let (e, len, next) = self.descs[d as usize];
            if let Some(p) = e[..len as usize].iter().position(|&x| x == h) {
                let h_len = self.descs[hd as usize].1 - 1;
                let last = self.descs[hd as usize].0[h_len as usize];
                self.descs[d as usize].0[p] = last;
                self.descs[hd as usize].1 = h_len;
                if h_len == 0 {
                    let nx = self.descs[hd as usize].2;
                    self.free.push(hd);
                    self.heads[gfn] = if nx == 0 { 0 } else { (nx as u64) << 1 };
                }
                return;
            }
            d = next - 1;
        }
    }
    fn walk(&self, gfn: usize) -> u64 {
        let head = self.heads[gfn];
        if head == 0 {
            return 0;
        }
        if head & 1 == 1 {
            return head >> 1;
        }
        let mut sum = 0;
        let mut d = (head >> 1) as u32;
        while d != 0 {
            let (e, len, next) = &self.descs[d as usize - 1];
            sum += e[..*len as usize].iter().map(|&x| x as u64).sum::<u64>();
            d = *next;
        }
        sum
    }
    fn bytes(&self) -> usize {
        self.heads.len() * 8 + (self.descs.len() - self.free.len()) * 24
    }
}

/// The sibling-link design: each PTE carries prev/next handles; the head is
/// the first handle + 1.
struct Sibling {
    heads: Vec<u32>,
    links: Vec<(u32, u32)>,
    mapped: usize,
}

impl Design for Sibling {
    fn new(gfns: usize) -> Self {
        // The links live beside the PTEs, whose pages are in use already:
        // touch every page now (untimed) so that a timed add does not pay
        // the first-touch page faults of a fresh zeroed allocation.
        let mut links = vec![(0u32, 0u32); PTE_SPACE as usize];
        links.iter_mut().step_by(512).for_each(|l| *l = black_box((0, 0)));
        Self { heads: vec![0; gfns], links, mapped: 0 }
    }
    fn add(&mut self, gfn: usize, h: u32) {
        let old = self.heads[gfn];
        self.links[h as usize] = (0, old);
        if old != 0 {
            self.links[old as usize - 1].0 = h + 1;
        }
        self.heads[gfn] = h + 1;
        self.mapped += 1;
    }
    fn remove(&mut self, gfn: usize, h: u32) {
        let (prev, next) = self.links[h as usize];
        if prev == 0 {
            self.heads[gfn] = next;
        } else {
            self.links[prev as usize - 1].1 = next;
        }
        if next != 0 {
            self.links[next as usize - 1].0 = prev;
        }
        self.mapped -= 1;
    }
    fn walk(&self, gfn: usize) -> u64 {
        let mut sum = 0;
        let mut h = self.heads[gfn];
        while h != 0 {
            sum += (h - 1) as u64;
            h = self.links[h as usize - 1].1;
        }
        sum
    }
    fn bytes(&self) -> usize {
        // Every PTE pays for its links (8 bytes), mapped or not in a real
        // table; count only mapped ones here, the kindest reading.
        self.heads.len() * 4 + self.mapped * 8
    }
}

struct Workload {
    gfns: usize,
    /// (gfn, handle) pairs in insertion order.
    adds: Vec<(usize, u32)>,
    /// The same pairs in removal order.
    removes: Vec<(usize, u32)>,
}

fn workload(per_gfn: usize) -> Workload {
    let mut rng = SmallRng::seed_from_u64(per_gfn as u64);
    let gfns = MAPPINGS / per_gfn;
    let mut handles: Vec<u32> = (0..PTE_SPACE).step_by((PTE_SPACE as usize) / MAPPINGS).collect();
    handles.shuffle(&mut rng);
    let adds: Vec<(usize, u32)> = handles.iter().enumerate().map(|(i, &h)| (i % gfns, h)).collect();
    let mut removes = adds.clone();
    removes.shuffle(&mut rng);
    Workload { gfns, adds, removes }
}

fn built<D: Design>(w: &Workload) -> D {
    let mut d = D::new(w.gfns);
    for &(g, h) in &w.adds {
        d.add(g, h);
    }
    d
}

/// Evicts the caches: the working sets of EPT and shadow tables do not fit.
fn scrub(buf: &mut [u64]) {
    for (i, x) in buf.iter_mut().enumerate().step_by(8) {
        *x = x.wrapping_add(i as u64);
    }
    black_box(&buf);
}

fn report<D: Design>(w: &Workload, per_gfn: usize, name: &str, head_bytes: f64) {
    let d: D = built(w);
    eprintln!(
        "rmap {name} {per_gfn}/gfn: {:.2} bytes per mapping (heads included), {:.2} beyond the heads",
        d.bytes() as f64 / MAPPINGS as f64,
        (d.bytes() as f64 - w.gfns as f64 * head_bytes) / MAPPINGS as f64
    );
}

fn add<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str) {
    g.bench_function(BenchmarkId::new("add", name), |b| {
        b.iter_batched(
            || D::new(w.gfns),
            |mut d| {
                for &(g, h) in &w.adds {
                    d.add(g, h);
                }
                d
            },
            BatchSize::LargeInput,
        )
    });
}

fn remove<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str) {
    g.bench_function(BenchmarkId::new("remove", name), |b| {
        b.iter_batched(
            || built::<D>(w),
            |mut d| {
                for &(g, h) in &w.removes {
                    d.remove(g, h);
                }
                d
            },
            BatchSize::LargeInput,
        )
    });
}

fn walk<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str, scrub_buf: &mut [u64]) {
    let d: D = built(w);
    g.bench_function(BenchmarkId::new("walk", name), |b| {
        b.iter_batched(
            || scrub(scrub_buf),
            |_| {
                let mut sum = 0u64;
                for gfn in 0..w.gfns {
                    sum = sum.wrapping_add(d.walk(gfn));
                }
                black_box(sum)
            },
            BatchSize::PerIteration,
        )
    });
}

/// Each operation runs the three designs back to back, so that a ratio
/// compares figures taken seconds apart on this shared machine, not minutes.
fn bench(c: &mut Criterion) {
    let mut scrub_buf = vec![0u64; 8 << 20];
    for per_gfn in [1usize, 16] {
        let w = workload(per_gfn);
        report::<Ours>(&w, per_gfn, "vmmu", 8.0);
        report::<Ext4>(&w, per_gfn, "ext4", 8.0);
        report::<Sibling>(&w, per_gfn, "sibling", 4.0);
        let mut g = c.benchmark_group(format!("rmap_{per_gfn}_per_gfn"));
        g.throughput(criterion::Throughput::Elements(MAPPINGS as u64));
        add::<Ours>(&mut g, &w, "vmmu");
        add::<Ext4>(&mut g, &w, "ext4");
        add::<Sibling>(&mut g, &w, "sibling");
        remove::<Ours>(&mut g, &w, "vmmu");
        remove::<Ext4>(&mut g, &w, "ext4");
        remove::<Sibling>(&mut g, &w, "sibling");
        walk::<Ours>(&mut g, &w, "vmmu", &mut scrub_buf);
        walk::<Ext4>(&mut g, &w, "ext4", &mut scrub_buf);
        walk::<Sibling>(&mut g, &w, "sibling", &mut scrub_buf);
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
