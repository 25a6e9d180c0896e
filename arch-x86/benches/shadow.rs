//! Shadow-paging benchmarks, each beside a neighbour:
//! - fault cost per 4 KiB page (a guest fault resolved into a shadow leaf),
//!   beside the NPT engine's fault on the same number of pages;
//! - one guest walk per paging mode, beside the TDP software walker over
//!   4-level NPT tables;
//! - a CR3 switch with 1, 8 and 64 cached roots, beside a switch to a root
//!   with no root cache (the root page found again through the page hash);
//! - memory per shadowed guest table, parent lists included, with one
//!   parent and with 16 (printed, not timed).
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;

use arch_x86::exit::Origin;
use arch_x86::format::npt::Npt;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, WalkLength};
use arch_x86::frame::SimMemory;
use arch_x86::shadow::guest_walk::{load_pdptrs, walk_any};
use arch_x86::shadow::mode::{A, D, P, RW, US};
use arch_x86::shadow::{
    AccessKind, AccessOp, CpuFeatures, GuestCpu, GuestMode, NoDirtyLog, PhysMemory, ShadowConfig,
    ShadowFault, ShadowMmu, SimGuestRam,
};
use arch_x86::tdp::TdpMmu;
use arch_x86::testing::{FlushRecorder, LinearHost};
use arch_x86::walk::translate;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mmu_generic::addr::{Gfn, Gpa, Gva, Hva, Pfn};
use mmu_generic::backend::FlushToken;
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};

const RAM: u64 = 0x4000; // 64 MiB of guest memory
const TABLE_BASE: u64 = 0x100; // guest tables from gfn 0x100
const DATA: u64 = 0x1000; // data from gfn 0x1000
const ENTRY: u64 = P | RW | US | A | D;

fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), RAM, Hva(0x4000_0000), SlotFlags::empty())).expect("slot");
    b.build().expect("slots")
}

fn mmu<G: PhysMemory>(ram: G, cached_roots: usize) -> ShadowMmu<SimMemory, G, LinearHost> {
    let config = ShadowConfig { features: CpuFeatures::typical(), max_pages: 1 << 16, cached_roots };
    ShadowMmu::new(
        config,
        SimMemory::new(Pfn(0x8_0000), 1 << 18),
        ram,
        LinearHost::new(0x10_0000, PageSize::Size4K),
        slots(),
    )
}

fn ram() -> SimGuestRam {
    SimGuestRam::new(&[(Gfn(0), RAM)])
}

fn w(ram: &SimGuestRam, gpa: u64, bytes: u64, e: u64) {
    ram.write(Gpa(gpa), bytes, e).expect("table in RAM");
}

/// A 4-level address space at PML4 gfn `pml4`: gva `i << 12` maps data page
/// `DATA + i` for `i < pages`, through PTs `first_pt, first_pt + 1, ...`.
fn four_level(ram: &SimGuestRam, pml4: u64, pdpt: u64, pd: u64, first_pt: u64, pages: u64) -> GuestCpu {
    w(ram, pml4 << 12, 8, (pdpt << 12) | ENTRY);
    w(ram, pdpt << 12, 8, (pd << 12) | ENTRY);
    for t in 0..pages.div_ceil(512) {
        w(ram, (pd << 12) + 8 * t, 8, ((first_pt + t) << 12) | ENTRY);
    }
    for i in 0..pages {
        w(ram, ((first_pt + i / 512) << 12) + 8 * (i % 512), 8, ((DATA + i) << 12) | ENTRY);
    }
    GuestCpu::new(GuestMode::Four, pml4 << 12)
}

fn fault_cost(c: &mut Criterion) {
    const PAGES: u64 = 4096;
    let mut g = c.benchmark_group("fault_4k");
    g.throughput(Throughput::Elements(PAGES));
    // The guest's RAM and tables exist before the hypervisor faults on
    // them, as a real guest's do: built once, and each iteration gets a
    // fresh MMU over them, as the NPT row gets a fresh TdpMmu. (The tables
    // have A and D set, so the faults write no guest memory.) Zeroing
    // 64 MiB of simulated RAM before every timed batch evicted the caches
    // the timed faults then refilled: after the same zeroing the NPT row
    // itself went from 48 to 60-78 ns a fault.
    let ram = ram();
    let cpu = four_level(&ram, TABLE_BASE, TABLE_BASE + 1, TABLE_BASE + 2, TABLE_BASE + 3, PAGES);
    g.bench_function("shadow_4level_fresh_tables", |b| {
        b.iter_batched(
            || {
                let mut m = mmu(&ram, 3);
                m.load_cr3(&cpu).expect("root");
                m
            },
            |mut m| {
                let access = AccessKind::user(AccessOp::Write);
                for i in 0..PAGES {
                    let r = m.page_fault(&cpu, Gva(i << 12), access, &mut NoDirtyLog);
                    assert_eq!(black_box(r), Ok(ShadowFault::Fixed));
                }
                // As the NPT row does: the batch's flush reaches a TLB.
                m.take_flush().flush(&mut FlushRecorder::default());
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("npt_fresh_tables", |b| {
        b.iter_batched(
            || {
                let npt = Npt::new(WalkLength::Four, PhysAddrWidth::new(48).expect("width"));
                let mut m = TdpMmu::new(npt, SimMemory::new(Pfn(0x100_0000), 1 << 16)).expect("root");
                m.set_memslots(&slots(), &mut FlushRecorder::default(), |_| {});
                m.set_max_page_size(PageSize::Size4K);
                m
            },
            |mut m| {
                let inv = InvalidationSeq::new();
                let mut host = LinearHost::new(0x10_0000, PageSize::Size4K);
                let mut flush = FlushToken::new();
                for i in 0..PAGES {
                    let gpa = Gpa((DATA + i) << 12);
                    black_box(m.handle_fault(gpa, Access::WRITE, &mut host, &inv, &mut flush).expect("maps"));
                }
                flush.flush(&mut FlushRecorder::default());
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// Tables in every mode translating gva 0x0040_3000 (user read) to a data page.
fn mode_tables(ram: &SimGuestRam, mode: GuestMode) -> GuestCpu {
    let t = TABLE_BASE << 12;
    let va: u64 = 0x0040_3000;
    match mode {
        GuestMode::Bits32 => {
            w(ram, t + 4 * (va >> 22), 4, (t + 0x1000) | ENTRY);
            w(ram, t + 0x1000 + 4 * ((va >> 12) & 0x3ff), 4, (DATA << 12) | ENTRY);
            GuestCpu::new(mode, t)
        }
        GuestMode::Pae => {
            w(ram, t, 8, (t + 0x1000) | P);
            w(ram, t + 0x1000 + 8 * ((va >> 21) & 0x1ff), 8, (t + 0x2000) | ENTRY);
            w(ram, t + 0x2000 + 8 * ((va >> 12) & 0x1ff), 8, (DATA << 12) | ENTRY);
            let mut cpu = GuestCpu::new(mode, t);
            cpu.pdptrs = load_pdptrs(ram, t, &CpuFeatures::typical()).expect("valid PDPTEs");
            cpu
        }
        GuestMode::Four | GuestMode::Five => {
            let levels = mode.root_level() as u64;
            for l in (2..=levels).rev() {
                let table = t + 0x1000 * (levels - l);
                let idx = (va >> (12 + 9 * (l - 1))) & 0x1ff;
                w(ram, table + 8 * idx, 8, (table + 0x1000) | ENTRY);
            }
            let pt = t + 0x1000 * (levels - 1);
            w(ram, pt + 8 * ((va >> 12) & 0x1ff), 8, (DATA << 12) | ENTRY);
            GuestCpu::new(mode, t)
        }
    }
}

fn guest_walk(c: &mut Criterion) {
    let mut g = c.benchmark_group("guest_walk");
    let feat = CpuFeatures::typical();
    let access = AccessKind::user(AccessOp::Read);
    for mode in GuestMode::ALL {
        let ram = ram();
        let cpu = mode_tables(&ram, mode);
        walk_any(&ram, &cpu, &feat, Gva(0x0040_3000), access, true).expect("translates");
        g.bench_function(format!("{mode:?}"), |b| {
            b.iter(|| black_box(walk_any(&ram, &cpu, &feat, black_box(Gva(0x0040_3123)), access, true)))
        });
    }
    // The neighbour: the TDP walker over 4-level NPT tables.
    let npt = Npt::new(WalkLength::Four, PhysAddrWidth::new(48).expect("width"));
    let mut tdp = TdpMmu::new(npt, SimMemory::new(Pfn(0x100_0000), 64)).expect("root");
    tdp.map(Gfn(0x403), Pfn(0x8_0000), PageSize::Size4K, Access::READ).expect("maps");
    g.bench_function("tdp_npt_4level", |b| {
        b.iter(|| {
            black_box(translate(
                tdp.format(),
                tdp.memory(),
                tdp.root(),
                black_box(Gpa(0x0040_3123)),
                Access::READ,
                Origin::Final,
            ))
        })
    });
    g.finish();
}

/// `n` address spaces sharing their PDPT, PD and PTs, each with its own PML4.
fn address_spaces(ram: &SimGuestRam, n: u64) -> Vec<GuestCpu> {
    let shared = four_level(ram, TABLE_BASE, TABLE_BASE + 1, TABLE_BASE + 2, TABLE_BASE + 3, 512);
    let mut cpus = vec![shared];
    for k in 1..n {
        let pml4 = TABLE_BASE + 0x100 + k;
        w(ram, pml4 << 12, 8, ((TABLE_BASE + 1) << 12) | ENTRY);
        cpus.push(GuestCpu::new(GuestMode::Four, pml4 << 12));
    }
    cpus
}

fn cr3_switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("cr3_switch");
    for n in [1u64, 8, 64] {
        let ram = ram();
        let cpus = address_spaces(&ram, n);
        let mut m = mmu(ram, n as usize);
        let access = AccessKind::user(AccessOp::Read);
        for cpu in &cpus {
            m.load_cr3(cpu).expect("root");
            for i in 0..16 {
                let r = m.page_fault(cpu, Gva(i << 12), access, &mut NoDirtyLog).expect("fault");
                assert_eq!(r, ShadowFault::Fixed);
            }
        }
        // Every address space is now cached: one more round is all hits
        // (checked here, not after the bench, which a filter may skip).
        let hits = m.stats().root_hits;
        for cpu in &cpus {
            m.load_cr3(cpu).expect("cached root");
        }
        assert_eq!(m.stats().root_hits - hits, n, "each switch is served by the cache");
        let mut k = 0;
        let mut tlb = FlushRecorder::default();
        g.bench_function(format!("cached_{n}"), |b| {
            b.iter(|| {
                k = (k + 1) % cpus.len();
                black_box(m.load_cr3(&cpus[k]).expect("cached root"));
                m.take_flush().flush(&mut tlb);
            })
        });
    }
    // The neighbour: no root cache (only the current root is kept); the
    // root page is found again through the shadow-page hash.
    let ram = ram();
    let cpus = address_spaces(&ram, 8);
    let mut m = mmu(ram, 0);
    let mut k = 0;
    let mut tlb = FlushRecorder::default();
    g.bench_function("no_root_cache_8", |b| {
        b.iter(|| {
            k = (k + 1) % cpus.len();
            black_box(m.load_cr3(&cpus[k]).expect("root"));
            m.take_flush().flush(&mut tlb);
        })
    });
    g.finish();
}

/// Prints the memory one shadowed guest page table costs.
fn memory_per_table(_: &mut Criterion) {
    for parents in [1u64, 16] {
        let ram = ram();
        // `parents` PDs, each in its own address space, all pointing at the
        // same 16 PTs: each shadowed PT gets `parents` parent entries.
        let tables = 16u64;
        let mut cpus = Vec::new();
        for k in 0..parents {
            let base = TABLE_BASE + 0x100 + 4 * k;
            cpus.push(four_level(&ram, base, base + 1, base + 2, TABLE_BASE, tables * 512));
        }
        let mut m = mmu(ram, parents as usize);
        let access = AccessKind::user(AccessOp::Read);
        for cpu in &cpus {
            m.load_cr3(cpu).expect("root");
            for t in 0..tables {
                let r = m.page_fault(cpu, Gva(t << 21), access, &mut NoDirtyLog).expect("fault");
                assert_eq!(r, ShadowFault::Fixed);
            }
        }
        let u = m.memory_use();
        let per = (u.table_bytes + u.meta_bytes + u.parent_list_bytes) as f64 / u.pages as f64;
        println!(
            "memory per shadowed guest table, {parents} parent(s): {per:.0} bytes \
             ({} pages: {} B frames, {} B bookkeeping, {} B parent lists)",
            u.pages, u.table_bytes, u.meta_bytes, u.parent_list_bytes
        );
        m.take_flush().flush(&mut FlushRecorder::default());
    }
}

criterion_group!(benches, memory_per_table, fault_cost, guest_walk, cr3_switch);
criterion_main!(benches);
