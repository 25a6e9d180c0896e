//! TDP benchmarks: translate and map against the `x86_64` crate's
//! `OffsetPageTable` on the same 4-level tables, fault-in cost per page,
//! splitting a 1 GiB page, and a dirty-log round over a large slot (the
//! core's write-protect round against protecting every leaf, and a D-bit
//! harvest of every leaf).
//!
//! Tables for the comparison live in a 4 KiB-aligned heap region used as
//! identity-mapped "physical" memory, so both walkers read the very same
//! frames. `ARCH_X86_BENCH_GIB` sets the dirty-log slot size (default 64).
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::alloc::{alloc_zeroed, Layout};
use std::hint::black_box;

use arch_x86::exit::Origin;
use arch_x86::format::npt::Npt;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, WalkLength};
use arch_x86::frame::{IdentityMemory, SimMemory};
use arch_x86::tdp::{FaultOutcome, TdpMmu};
use arch_x86::testing::{FlushRecorder, LinearHost};
use arch_x86::walk::translate;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mmu_generic::addr::{Gfn, Gpa, Hva, Pfn};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{FaultCtx, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

const PAGES: u64 = 4096;
const GIB: u64 = 1 << 18;

fn npt() -> Npt {
    Npt::new(WalkLength::Four, PhysAddrWidth::new(48).expect("48 is a valid width"))
}

/// A leaked, zeroed, 4 KiB-aligned region of `frames` frames: the heap
/// address stands in for the physical address.
fn region(frames: u32) -> Pfn {
    let layout = Layout::from_size_align(frames as usize * 4096, 4096).expect("a valid layout");
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null());
    Pfn(p as u64 >> 12)
}

fn identity(frames: u32) -> IdentityMemory {
    // SAFETY: the region is fresh heap memory, leaked, so it lives for the
    // program, mapped at its own address in this process, and used only by
    // this memory (and the comparison walker reading the same tables).
    unsafe { IdentityMemory::new(region(frames), frames) }
}

/// Hands out frames of a region to the `x86_64` mapper.
struct RegionFrames {
    next: u64,
    end: u64,
}

// SAFETY: every frame handed out is a distinct, unused 4 KiB frame of a leaked
// heap region mapped at its own address.
unsafe impl FrameAllocator<Size4KiB> for RegionFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        (self.next < self.end).then(|| {
            self.next += 1;
            PhysFrame::containing_address(PhysAddr::new((self.next - 1) << 12))
        })
    }
}

fn translate_vs_x86_64(c: &mut Criterion) {
    let mut mmu = TdpMmu::new(npt(), identity(64)).expect("a root frame");
    let base = Gfn(0x1_0000);
    mmu.map_range(base, Pfn(0x20_0000), PAGES, Access::all(), PageSize::Size4K).expect("tables fit");
    let root = mmu.root().0 << 12;
    // SAFETY: the root is a live table frame of the identity region; the
    // mapper only reads it below (translate), and our tables are left alone
    // meanwhile.
    let pml4 = unsafe { &mut *(root as *mut PageTable) };
    // SAFETY: physical memory is mapped at offset 0 (the identity region).
    let x86 = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(0)) };
    // Like for like: `arch_x86_lookup` and the `x86_64` crate's
    // `translate_addr` both do a pure 4-level walk (no permission check
    // beyond presence, no A/D update). `arch_x86_walker` plays the processor
    // (reserved bits, permissions ANDed over the levels, A/D checked and set
    // by compare-exchange), so it does more work per page: a separate line,
    // not the comparison.
    let mut g = c.benchmark_group("translate_4k_x4096");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("arch_x86_walker", |b| {
        b.iter(|| {
            let mut sum = 0;
            for i in 0..PAGES {
                let gpa = Gpa((base.0 + i) << 12 | 0x10);
                let t = translate(mmu.format(), mmu.memory(), mmu.root(), gpa, Access::READ, Origin::Final);
                sum += t.map_or(0, |t| t.hpa);
            }
            black_box(sum)
        })
    });
    g.bench_function("arch_x86_lookup", |b| {
        b.iter(|| {
            let mut sum = 0;
            for i in 0..PAGES {
                sum += mmu.lookup(Gfn(base.0 + i)).map_or(0, |l| l.pfn.0);
            }
            black_box(sum)
        })
    });
    g.bench_function("x86_64_offset_page_table", |b| {
        b.iter(|| {
            let mut sum = 0;
            for i in 0..PAGES {
                let va = VirtAddr::new((base.0 + i) << 12 | 0x10);
                sum += x86.translate_addr(va).map_or(0, |p| p.as_u64());
            }
            black_box(sum)
        })
    });
    g.finish();
}

fn map_vs_x86_64(c: &mut Criterion) {
    // Like for like: no memslot, so neither side keeps a reverse map; both
    // start from an empty root in zeroed memory and zero every table they
    // create.
    let mut g = c.benchmark_group("map_4k_x4096");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("arch_x86_map_range", |b| {
        b.iter_batched(
            || TdpMmu::new(npt(), identity(16)).expect("a root frame"),
            |mut mmu| {
                mmu.map_range(Gfn(0x1_0000), Pfn(0x20_0000), PAGES, Access::all(), PageSize::Size4K)
                    .expect("tables fit");
                mmu
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("x86_64_offset_page_table", |b| {
        b.iter_batched(
            || {
                let start = region(16).0;
                RegionFrames { next: start, end: start + 16 }
            },
            |mut frames| {
                let pml4_frame = frames.allocate_frame().expect("a frame");
                // SAFETY: a fresh zeroed frame of the region, used only here.
                let pml4 = unsafe { &mut *(pml4_frame.start_address().as_u64() as *mut PageTable) };
                // SAFETY: physical memory is mapped at offset 0.
                let mut mapper = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(0)) };
                let flags =
                    PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::USER_ACCESSIBLE;
                for i in 0..PAGES {
                    let page = Page::<Size4KiB>::containing_address(VirtAddr::new((0x1_0000 + i) << 12));
                    let frame = PhysFrame::containing_address(PhysAddr::new((0x20_0000 + i) << 12));
                    // SAFETY: the frames mapped are plain numbers nobody
                    // dereferences; the tables are ours alone.
                    unsafe { mapper.map_to(page, frame, flags, &mut frames) }
                        .expect("frames suffice")
                        .ignore();
                }
                frames
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn one_slot(npages: u64, flags: SlotFlags) -> mmu_generic::memslot::Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(GIB), npages, Hva(0x40_0000_0000), flags)).expect("a fresh id");
    b.build().expect("a valid slot")
}

fn fault_in(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_in_4k");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("npt_fresh_tables", |b| {
        b.iter_batched(
            || {
                let mut mmu = TdpMmu::new(npt(), SimMemory::new(Pfn(0x100_0000), 1 << 16)).expect("root");
                mmu.set_memslots(&one_slot(PAGES, SlotFlags::empty()), &mut FlushRecorder::default(), |_| {});
                mmu.set_max_page_size(PageSize::Size4K);
                mmu
            },
            |mut mmu| {
                let inv = InvalidationSeq::new();
                let mut host = LinearHost::new(0x100 * GIB, PageSize::Size4K);
                let mut flush = FlushToken::new();
                for i in 0..PAGES {
                    let gpa = Gpa((GIB + i) << 12);
                    black_box(
                        mmu.handle_fault(gpa, Access::WRITE, &mut host, &inv, &mut flush).expect("maps"),
                    );
                }
                flush.flush(&mut FlushRecorder::default());
                mmu
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn split_1g(c: &mut Criterion) {
    c.bench_function("split_1g_into_2m", |b| {
        b.iter_batched(
            || {
                let mut mmu = TdpMmu::new(npt(), SimMemory::new(Pfn(0x100_0000), 1 << 10)).expect("root");
                mmu.set_memslots(&one_slot(GIB, SlotFlags::empty()), &mut FlushRecorder::default(), |_| {});
                mmu.map(Gfn(GIB), Pfn(4 * GIB), PageSize::Size1G, Access::all()).expect("maps");
                let slot = *mmu.memslots().get(SlotId(0)).expect("slot 0");
                let mut h = None;
                mmu.for_each_leaf(&slot, slot.gfns(), &mut |x| h = Some(x));
                (mmu, h.expect("one leaf"))
            },
            |(mut mmu, h)| {
                let mut flush = FlushToken::new();
                mmu.split_huge(h, &mut flush).expect("a frame");
                flush.flush(&mut FlushRecorder::default());
                mmu
            },
            BatchSize::LargeInput,
        )
    });
}

/// The timed part of `write_protect_all_leaves`: every leaf of the slot,
/// found through the reverse map and write-protected. Not inlined, so that
/// `valgrind --tool=callgrind --toggle-collect=*protect_every_leaf*` counts
/// exactly this.
#[inline(never)]
fn protect_every_leaf(mmu: &mut TdpMmu<Npt, SimMemory>, slot: &Memslot) -> u64 {
    let mut flush = FlushToken::new();
    let mut hits = Vec::new();
    mmu.for_each_leaf(slot, slot.gfns(), &mut |h| hits.push(h));
    let mut n = 0u64;
    for h in hits {
        n += mmu.write_protect(h, &mut flush) as u64;
    }
    flush.flush(&mut FlushRecorder::default());
    n
}

/// The timed part of `writable_chain_round`: the log's round (protect what
/// the chain holds, hand the bitmap over). Not inlined, for callgrind's
/// `--toggle-collect=*chain_round*`.
#[inline(never)]
fn chain_round(log: &mut SlotDirtyLog, mmu: &mut TdpMmu<Npt, SimMemory>, out: &mut Vec<u64>) {
    let flush = log.get_and_clear(mmu, out).expect("bitmap mode");
    flush.flush(&mut FlushRecorder::default());
}

fn dirty_log_round(c: &mut Criterion) {
    let gib: u64 = std::env::var("ARCH_X86_BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let npages = gib * GIB;
    let slots = one_slot(npages, SlotFlags::empty());
    let slot = *slots.get(SlotId(0)).expect("slot 0");
    let mut mmu = TdpMmu::new(npt(), SimMemory::new(Pfn(0x100_0000), 1 << 23)).expect("root");
    mmu.set_memslots(&slots, &mut FlushRecorder::default(), |_| {});
    mmu.map_range(Gfn(GIB), Pfn(0x400_0000), npages, Access::all(), PageSize::Size4K).expect("tables fit");
    let written: Vec<u64> = (0..npages).step_by(100).map(|i| GIB + i).collect();
    let write_all = |mmu: &TdpMmu<Npt, SimMemory>| {
        for &g in &written {
            let _ =
                translate(mmu.format(), mmu.memory(), mmu.root(), Gpa(g << 12), Access::WRITE, Origin::Final);
        }
    };
    let mut g = c.benchmark_group(format!("dirty_log_round_{gib}gib_1pct"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(npages));
    g.bench_function("d_bit_harvest", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                write_all(&mmu);
                let t = std::time::Instant::now();
                let mut flush = FlushToken::new();
                let mut n = 0u64;
                mmu.for_each_leaf(&slot, slot.gfns(), &mut |h| n += mmu.clear_dirty(h, &mut flush) as u64);
                flush.flush(&mut FlushRecorder::default());
                total += t.elapsed();
                assert_eq!(n, written.len() as u64);
            }
            total
        })
    });
    g.bench_function("write_protect_all_leaves", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let mut hs = Vec::with_capacity(written.len());
                for &gfn in &written {
                    mmu.rmap().list(SlotId(0), Gfn(gfn), 0).for_each(|h| hs.push(h));
                }
                // Untimed: the guest's first writes after a round made these
                // writable again (what the fault path does).
                let t = std::time::Instant::now();
                let n = protect_every_leaf(&mut mmu, &slot);
                total += t.elapsed();
                black_box(n);
                for h in hs {
                    let mut f = FlushToken::new();
                    // Restore write access for the next round.
                    let _ = mmu.zap(h, &mut f);
                    f.flush(&mut FlushRecorder::default());
                }
                for &gfn in &written {
                    mmu.map(Gfn(gfn), Pfn(0x400_0000 + gfn - GIB), PageSize::Size4K, Access::all())
                        .expect("just unmapped");
                }
            }
            total
        })
    });
    // The real round an embedder runs: the slot logged by write protection
    // (starting the log protects every leaf, once), 1 % of the pages made
    // writable between rounds by write faults through the fault path
    // (untimed, as the guest's writes are), then `get_and_clear`: protect
    // what the chain holds and hand over the bitmap. Last in the group: the
    // rows above need their leaves writable.
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&slot, Tracking::WriteProtect, LogMode::Bitmap, &mut mmu, &mut flush)
        .expect("nothing to split");
    flush.flush(&mut FlushRecorder::default());
    let mut logs = vec![Some(log)];
    let mut out = Vec::with_capacity(npages.div_ceil(64) as usize);
    let inv = InvalidationSeq::new();
    // Host frame = host-virtual page, as `map_range` mapped them.
    let mut host = LinearHost::new(0, PageSize::Size4K);
    g.bench_function("writable_chain_round", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let mut flush = FlushToken::new();
                let ctx = FaultCtx::new(&logs, None);
                for &gfn in &written {
                    let done = mmu
                        .handle_fault_logged(Gpa(gfn << 12), Access::WRITE, &mut host, &inv, &ctx, &mut flush)
                        .expect("the slot maps it");
                    assert!(matches!(done, FaultOutcome::Mapped(m) if m.access.contains(Access::WRITE)));
                }
                flush.flush(&mut FlushRecorder::default());
                let log = logs[0].as_mut().expect("logged");
                let t = std::time::Instant::now();
                chain_round(log, &mut mmu, &mut out);
                total += t.elapsed();
                let reported: u64 = out.iter().map(|w| w.count_ones() as u64).sum();
                assert_eq!(reported, written.len() as u64);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, translate_vs_x86_64, map_vs_x86_64, fault_in, split_1g, dirty_log_round);
criterion_main!(benches);
