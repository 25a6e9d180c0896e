//! Hashed-page-table benchmarks, each beside its neighbour:
//!
//! * `hcall/*`: H_ENTER + H_REMOVE per pair of calls on the guest table (full
//!   argument checking, host translation, reverse map) against the raw
//!   in-memory table (no checks, no reverse map);
//! * `hcall_half_full_groups/*`: the same, into PTEGs already holding four
//!   entries, so the duplicate check and the slot search have work;
//! * `rc_harvest/*`: one dirty-log round over 1 GiB of 4 KiB HPTEs with 1 %
//!   written, through `MmuBackend` (reverse-map walk) against a scan of every
//!   HPTE of the table;
//! * `pr_flush/*`: removing 256 virtual pages from a 64 Ki-entry PR cache by
//!   the indexed range flush against a scan of the whole cache.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, WimgPolicy};
use arch_ppc_book3s::hash::HptGeometry;
use arch_ppc_book3s::hpte::{Hpte, HpteFormat, HPTE_R_C, HPTE_R_M, HPTE_V_VALID};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::RemoveCond;
use arch_ppc_book3s::pr_cache::{PrCache, ShadowPte};
use arch_ppc_book3s::table::{HashTable, InMemoryHpt};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const GIB_PAGES: u64 = 1 << 18;

fn guest(pft_shift: u32, npages: u64) -> GuestHpt {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), npages, Hva(0x1_0000_0000), SlotFlags::DIRTY_LOG))
        .expect("slot");
    let cfg = GuestConfig {
        geometry: HptGeometry::from_pft_size(pft_shift).expect("size"),
        format: HpteFormat::Isa300,
        sizes: PageSizes::qemu_pseries_default(),
        wimg: WimgPolicy::RequireM,
    };
    GuestHpt::new(cfg, b.build().expect("slots"), HvaIdentity).expect("table")
}

fn hcalls(c: &mut Criterion) {
    enter_remove_pairs(c, "hcall", 0);
}

/// The same pairs into groups already half full: H_ENTER's duplicate
/// check decodes the four entries of the primary group (the secondary is
/// empty), and both tables pick the fifth slot.
fn hcalls_occupied(c: &mut Criterion) {
    enter_remove_pairs(c, "hcall_half_full_groups", 4);
}

/// H_ENTER + H_REMOVE pairs on the guest table against insert + remove on
/// the raw table, both with `filled` entries already in every group, in one
/// criterion group so that both rows come from the same run.
fn enter_remove_pairs(c: &mut Criterion, name: &str, filled: u64) {
    let mut g = guest(24, 1 << 16);
    let groups = 1u64 << (24 - 7);
    let mut t = InMemoryHpt::new(HptGeometry::from_pft_size(24).expect("size"), HpteFormat::Isa300);
    for grp in 0..groups {
        for k in 0..filled {
            // AVPNs above the loop's 16 bits, so no pair ever duplicates.
            let avpn = (1 << 20) | (grp << 2) | k;
            let gfn = (grp * filled + k) & 0xffff;
            g.h_enter(0, grp * 8, avpn << 7, (gfn << 12) | HPTE_R_M).expect("fill guest");
            t.enter(grp * 8, Hpte::new(avpn << 7, gfn << 12), false).expect("fill raw");
        }
    }
    let mut i = 0u64;
    let mut f = FlushToken::new();
    let mut grp = c.benchmark_group(name);
    grp.bench_function("guest_enter_remove", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ptex = (i % groups) * 8;
            let slot = g.h_enter(0, ptex, (i & 0xffff) << 7, ((i & 0xffff) << 12) | HPTE_R_M).expect("enter");
            black_box(g.h_remove(0, slot, 0, &mut f).expect("remove"));
        })
    });
    grp.bench_function("raw_table_enter_remove", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ptex = (i % groups) * 8;
            let slot = t.enter(ptex, Hpte::new((i & 0xffff) << 7, (i & 0xffff) << 12), false).expect("enter");
            black_box(t.remove(slot, RemoveCond::Absolute).expect("remove"));
        })
    });
    grp.finish();
    black_box(f.is_needed());
}

fn rc_harvest(c: &mut Criterion) {
    // 1 GiB of 4 KiB pages in a table twice as large as needed.
    let mut g = guest(23, GIB_PAGES);
    let groups = 1u64 << (23 - 7);
    let mut slots = Vec::with_capacity(GIB_PAGES as usize);
    for p in 0..GIB_PAGES {
        let ptex = (p % groups) * 8;
        slots.push(g.h_enter(0, ptex, p << 7, (p << 12) | HPTE_R_M | 2).expect("room"));
    }
    let slot = *g.memslots().get(SlotId(0)).expect("slot");
    let mut rng = SmallRng::seed_from_u64(1);
    let written: Vec<u64> = (0..GIB_PAGES / 100).map(|_| slots[rng.gen_range(0..slots.len())]).collect();
    c.bench_function("rc_harvest/backend_1GiB_1pct", |b| {
        b.iter(|| {
            for &p in &written {
                g.table().hardware_access(p, true);
            }
            let mut f = FlushToken::new();
            let mut n = 0u32;
            g.for_each_leaf(&slot, slot.gfns(), &mut |h| {
                if g.clear_dirty(h, &mut f) {
                    n += 1;
                }
            });
            black_box((n, f.is_needed()))
        })
    });
    let t = g.table();
    c.bench_function("rc_harvest/table_scan_1GiB_1pct", |b| {
        b.iter(|| {
            for &p in &written {
                t.hardware_access(p, true);
            }
            let mut n = 0u32;
            for p in 0..t.len() {
                let h = t.load(p).expect("in range");
                if h.v & HPTE_V_VALID != 0 && h.r & HPTE_R_C != 0 {
                    t.clear_r_bits(p, HPTE_R_C);
                    n += 1;
                }
            }
            black_box(n)
        })
    });
}

fn pr_flush(c: &mut Criterion) {
    let mut cache = PrCache::new(1 << 16);
    let mut rng = SmallRng::seed_from_u64(2);
    for i in 0..(1u64 << 16) {
        let vpn = rng.gen_range(0..1u64 << 24);
        cache.insert(ShadowPte { ea: vpn << 12, vpn, host_ptex: i, pfn: i, writable: true }).expect("room");
    }
    let start = 1u64 << 23;
    c.bench_function("pr_flush/indexed_range_256", |b| {
        b.iter_batched(
            || cache.clone(),
            |mut k| black_box(k.flush_vpn_range(start, start + 256, &mut |_| {})),
            BatchSize::LargeInput,
        )
    });
    c.bench_function("pr_flush/full_scan_256", |b| {
        b.iter_batched(
            || cache.clone(),
            |mut k| black_box(k.flush_scan(|p| p.vpn >= start && p.vpn < start + 256, &mut |_| {})),
            BatchSize::LargeInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = hcalls, hcalls_occupied, rc_harvest, pr_flush
}
criterion_main!(benches);
