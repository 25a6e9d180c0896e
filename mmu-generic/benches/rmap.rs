//! The reverse map's PTE lists against the two designs argued in KVM,
//! built here: fixed 4-entry descriptors (`RMAP_EXT = 4`) and a per-PTE
//! sibling link (a doubly linked list threaded through an array beside the
//! PTEs). Handles are scattered over a large PTE array, as EPT and shadow
//! leaves are, and a cache scrub precedes each timed pass of removes and
//! walks (the working sets of EPT and shadow tables do not fit in cache).
//! Removes come in a random order, as a zap by host address meets them.
//!
//! The machine this runs on is shared: another process may take the core
//! for a time slice in the middle of a pass, and a pass that lost one counts
//! milliseconds it did not run. So each pass is timed in [`CHUNKS`] pieces,
//! and a sample's figure is the sum over pieces of the piece's median over
//! the sample's passes: a slice lost in one pass does not count, a slow piece
//! that every pass shares does. All three designs are timed the same way.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
};
use mmu_generic::pte_list::{PteHandle, PteList, PteListPool};
use rand::{rngs::SmallRng, seq::SliceRandom, SeedableRng};

/// Total mappings per run.
const MAPPINGS: usize = 1 << 18;
/// The PTE array handles point into (sibling links live beside it).
const PTE_SPACE: u32 = 1 << 24;
/// Pieces a timed pass is cut into: each piece lasts well under a scheduler
/// time slice, so most pieces of most passes run undisturbed.
const CHUNKS: usize = 16;

/// A zeroed array whose pages are touched now: the per-gfn heads exist from
/// the slot's creation, so a timed add must not pay their first-touch faults.
fn touched<T: Clone + Default>(n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    let step = (4096 / core::mem::size_of::<T>().max(1)).max(1);
    v.iter_mut().step_by(step).for_each(|x| *x = black_box(T::default()));
    v
}

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
        Self { heads: touched(gfns), pool }
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
        Self { heads: touched(gfns), descs: Vec::new(), free: Vec::new() }
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

thread_local! {
    /// Link arrays of dropped `Sibling`s, for the next one to reuse.
    static SPARE_LINKS: RefCell<Vec<Vec<(u32, u32)>>> = const { RefCell::new(Vec::new()) };
}

impl Drop for Sibling {
    fn drop(&mut self) {
        let links = core::mem::take(&mut self.links);
        SPARE_LINKS.with(|s| s.borrow_mut().push(links));
    }
}

impl Design for Sibling {
    fn new(gfns: usize) -> Self {
        // The links live beside the PTEs, whose pages are in use already:
        // reuse a dropped list's array, or touch every page of a new one now
        // (untimed), so that a timed add does not pay first-touch page
        // faults. Stale links are harmless: an add writes a PTE's links
        // before any walk or remove reads them.
        let links = SPARE_LINKS.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| touched(PTE_SPACE as usize));
        Self { heads: touched(gfns), links, mapped: 0 }
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

/// Times `iters` passes, each on a state fresh from `setup` (untimed) and
/// run as [`CHUNKS`] calls of `piece(state, c)`, each timed alone. Returns
/// `iters` times the sum over pieces of each piece's median time.
fn timed<S>(iters: u64, mut setup: impl FnMut() -> S, mut piece: impl FnMut(&mut S, usize)) -> Duration {
    let mut times: Vec<Vec<Duration>> = (0..CHUNKS).map(|_| Vec::with_capacity(iters as usize)).collect();
    for _ in 0..iters {
        let mut state = setup();
        for (c, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            piece(&mut state, c);
            t.push(start.elapsed());
        }
        drop(black_box(state));
    }
    let pass: Duration = times
        .iter_mut()
        .map(|t| {
            t.sort_unstable();
            t[t.len() / 2]
        })
        .sum();
    pass * u32::try_from(iters).expect("criterion asks for fewer than 2^32 passes")
}

/// The `c`-th of [`CHUNKS`] equal pieces of `0..len`.
fn piece_range(len: usize, c: usize) -> core::ops::Range<usize> {
    let n = len.div_ceil(CHUNKS);
    (c * n).min(len)..((c + 1) * n).min(len)
}

/// The `c`-th of [`CHUNKS`] equal pieces of `items`.
fn piece<T>(items: &[T], c: usize) -> &[T] {
    &items[piece_range(items.len(), c)]
}

// The timed loops are functions of their own, for
// `valgrind --tool=callgrind --toggle-collect='*add_all*'` and the like.
#[inline(never)]
fn add_all<D: Design>(d: &mut D, adds: &[(usize, u32)]) {
    for &(g, h) in adds {
        d.add(g, h);
    }
}

#[inline(never)]
fn remove_all<D: Design>(d: &mut D, removes: &[(usize, u32)]) {
    for &(g, h) in removes {
        d.remove(g, h);
    }
}

#[inline(never)]
fn walk_all<D: Design>(d: &D, gfns: core::ops::Range<usize>) -> u64 {
    gfns.fold(0u64, |sum, gfn| sum.wrapping_add(d.walk(gfn)))
}

fn add<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str) {
    g.bench_function(BenchmarkId::new("add", name), |b| {
        b.iter_custom(|iters| timed(iters, || D::new(w.gfns), |d, c| add_all(d, piece(&w.adds, c))))
    });
}

fn remove<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str, scrub_buf: &mut [u64]) {
    g.bench_function(BenchmarkId::new("remove", name), |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || {
                    let d = built::<D>(w);
                    scrub(scrub_buf);
                    d
                },
                |d, c| remove_all(d, piece(&w.removes, c)),
            )
        })
    });
}

fn walk<D: Design>(g: &mut BenchmarkGroup<'_, WallTime>, w: &Workload, name: &str, scrub_buf: &mut [u64]) {
    let d: D = built(w);
    g.bench_function(BenchmarkId::new("walk", name), |b| {
        b.iter_custom(|iters| {
            timed(
                iters,
                || scrub(scrub_buf),
                |_, c| {
                    black_box(walk_all(&d, piece_range(w.gfns, c)));
                },
            )
        })
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
        // Every sample the same number of passes, so that each piece's
        // median is taken over several passes in every sample.
        g.sampling_mode(SamplingMode::Flat);
        add::<Ours>(&mut g, &w, "vmmu");
        add::<Ext4>(&mut g, &w, "ext4");
        add::<Sibling>(&mut g, &w, "sibling");
        remove::<Ours>(&mut g, &w, "vmmu", &mut scrub_buf);
        remove::<Ext4>(&mut g, &w, "ext4", &mut scrub_buf);
        remove::<Sibling>(&mut g, &w, "sibling", &mut scrub_buf);
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
