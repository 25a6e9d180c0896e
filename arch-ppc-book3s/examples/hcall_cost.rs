//! The loop of the `hcall` bench group, run a given number of times, for an
//! instruction count under `valgrind --tool=callgrind` (independent of load):
//!
//! ```text
//! cargo build --release -p arch-ppc-book3s --example hcall_cost
//! valgrind --tool=callgrind target/release/examples/hcall_cost guest 100000
//! valgrind --tool=callgrind target/release/examples/hcall_cost guest 200000
//! ```
//!
//! The difference of two runs divided by the difference of their counts is
//! the cost of one pair, set-up excluded. `guest` is H_ENTER + H_REMOVE on
//! the guest table (the bench's `hcall/guest_enter_remove`), `raw` the
//! unchecked insert + remove on the in-memory table
//! (`hcall/raw_table_enter_remove`). Run bare, it runs both loops 10,000
//! times (as `ci/test` runs every example).

use std::hint::black_box;

use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, WimgPolicy};
use arch_ppc_book3s::hash::HptGeometry;
use arch_ppc_book3s::hpte::{Hpte, HpteFormat, HPTE_R_M};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::RemoveCond;
use arch_ppc_book3s::table::{HashTable, InMemoryHpt};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::{FlushToken, NoTlb};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next();
    let n = args.next().and_then(|s| s.parse::<u64>().ok());
    match (which.as_deref(), n) {
        (Some("guest"), Some(n)) => guest(n),
        (Some("raw"), Some(n)) => raw(n),
        // Run bare (as ci/test runs every example): both loops, briefly.
        (None, _) => {
            guest(10_000);
            raw(10_000);
        }
        _ => {
            eprintln!("usage: hcall_cost [guest|raw COUNT]");
            std::process::exit(2);
        }
    }
}

const GROUPS: u64 = 1 << (24 - 7);

/// `n` H_ENTER + H_REMOVE pairs on the guest table; the table ends empty.
fn guest(n: u64) {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), 1 << 16, Hva(0x1_0000_0000), SlotFlags::DIRTY_LOG))
        .expect("slot");
    let cfg = GuestConfig {
        geometry: HptGeometry::from_pft_size(24).expect("size"),
        format: HpteFormat::Isa300,
        sizes: PageSizes::qemu_pseries_default(),
        wimg: WimgPolicy::RequireM,
    };
    let mut g = GuestHpt::new(cfg, b.build().expect("slots"), HvaIdentity).expect("table");
    let mut f = FlushToken::new();
    for i in 1..=n {
        let ptex = (i % GROUPS) * 8;
        let slot = g.h_enter(0, ptex, (i & 0xffff) << 7, ((i & 0xffff) << 12) | HPTE_R_M).expect("enter");
        black_box(g.h_remove(0, slot, 0, &mut f).expect("remove"));
    }
    let needed = f.is_needed();
    f.flush(&mut NoTlb);
    println!("hcall_cost: {n} H_ENTER + H_REMOVE pairs on the guest table, flush needed: {needed}");
}

/// `n` unchecked inserts and removes on the in-memory table.
fn raw(n: u64) {
    let mut t = InMemoryHpt::new(HptGeometry::from_pft_size(24).expect("size"), HpteFormat::Isa300);
    for i in 1..=n {
        let ptex = (i % GROUPS) * 8;
        let slot = t.enter(ptex, Hpte::new((i & 0xffff) << 7, (i & 0xffff) << 12), false).expect("enter");
        black_box(t.remove(slot, RemoveCond::Absolute).expect("remove"));
    }
    println!("hcall_cost: {n} raw inserts and removes on the in-memory table");
}
