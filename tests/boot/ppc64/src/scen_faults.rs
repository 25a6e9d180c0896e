//! Invalidation paths and their faults: H_REMOVE, H_BULK_REMOVE and H_PROTECT, with the
//! data storage and data segment interrupts caught at their real-mode vectors and DAR and
//! DSISR checked; resumption both by skipping the access and by repairing the translation
//! (in the handler) and retrying it.

use crate::env::Env;
use crate::hcall::{self, H_BULK_REMOVE, H_PROTECT, H_REMOVE};
use crate::hpt::{self, Spapr, Table, Vpage};
use crate::mmu;
use crate::report::scenario;
use crate::trap::{
    self, probe_load, probe_store, Caught, Resume, DSISR_NOPTE, DSISR_PROTFAULT, DSISR_STORE, VEC_DSEG,
    VEC_DSI,
};
use crate::vectors::TrapFrame;
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::hpte::Hpte;
use arch_ppc_book3s::papr::{BulkOutcome, BulkRequest, HptError, RemoveCond};
use arch_ppc_book3s::table::{HashTable, Protection};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

const SENTINEL: u64 = 0xdead_beef_dead_beef;

/// Counts checks; remembers the first one that failed.
struct Checks {
    done: u32,
    failed: u32,
    first: Option<&'static str>,
}

impl Checks {
    fn new() -> Self {
        Self { done: 0, failed: 0, first: None }
    }
    fn check(&mut self, what: &'static str, ok: bool) {
        self.done += 1;
        if !ok {
            self.failed += 1;
            if self.first.is_none() {
                self.first = Some(what);
            }
            crate::kprintln!("  check failed: {}", what);
        }
    }
    fn fault(&mut self, what: &'static str, c: Option<Caught>, vector: u64, dar: u64, dsisr: Option<u64>) {
        let ok = c.is_some_and(|c| c.vector == vector && c.dar == dar && dsisr.is_none_or(|d| c.dsisr == d));
        if !ok {
            crate::kprintln!(
                "  {}: expected vector {:#x} dar {:#x} dsisr {:x?}, got {:x?}",
                what,
                vector,
                dar,
                dsisr,
                c
            );
        }
        self.check(what, ok);
    }
}

/// Load and store to `ea` must both take a DSI "no translation" at DAR = `ea`.
fn expect_unmapped(c: &mut Checks, what: &'static str, ea: u64) {
    trap::expect(VEC_DSI, Resume::Skip);
    let v = probe_load(ea, SENTINEL);
    c.fault(what, trap::take(), VEC_DSI, ea, Some(DSISR_NOPTE));
    c.check(what, v == SENTINEL);
    trap::expect(VEC_DSI, Resume::Skip);
    probe_store(ea + 8, 1);
    c.fault(what, trap::take(), VEC_DSI, ea + 8, Some(DSISR_NOPTE | DSISR_STORE));
}

// The entry the retry fixer re-enters, and the segment it reloads.
static FIX_V: AtomicU64 = AtomicU64::new(0);
static FIX_R: AtomicU64 = AtomicU64::new(0);
static FIX_PTEX: AtomicU64 = AtomicU64::new(0);
static FIX_MASK: AtomicU64 = AtomicU64::new(0);
static FIX_SLB_RB: AtomicU64 = AtomicU64::new(0);
static FIX_SLB_RS: AtomicU64 = AtomicU64::new(0);
static FIXES: AtomicU64 = AtomicU64::new(0);

/// Runs in the DSI handler: puts the removed HPTE back (same slot, H_EXACT).
fn fix_hpte(_f: &TrapFrame) {
    let mut t = Table::new(Spapr, FIX_MASK.load(SeqCst));
    let h = Hpte::new(FIX_V.load(SeqCst), FIX_R.load(SeqCst));
    if t.enter(FIX_PTEX.load(SeqCst), h, true).is_ok() {
        FIXES.fetch_add(1, SeqCst);
    }
}

/// Runs in the data-segment handler: reloads the SLB entry.
fn fix_slb(_f: &TrapFrame) {
    mmu::slbmte(FIX_SLB_RB.load(SeqCst), FIX_SLB_RS.load(SeqCst));
    FIXES.fetch_add(1, SeqCst);
}

fn protection(pp: u64) -> Protection {
    Protection { pp: pp as u8, no_execute: false, key: 0 }
}

/// The whole invalidation scenario on eight 4K pages in one 256 MB segment.
pub fn invalidation(env: &mut Env) {
    let ps = env.ps4k;
    let ea = 0x5000_0000u64;
    let n = 8;
    let vsid = env.vsid();
    let pa = env.frames(12, n);
    let maps = match env.enter_range(Vpage { vsid, ssize: SegmentSize::S256M, ea, ps }, pa, n, hpt::PP_RW) {
        Ok(m) => m,
        Err(e) => return scenario("invalidate", false, format_args!("H_ENTER failed: {}", e)),
    };
    env.load_segment(ea, vsid, SegmentSize::S256M, ps.base_shift);
    let avpn = |k: usize| RemoveCond::Avpn(hpt::avpn_arg(maps[k].1));
    let page = |i: u64| ea + (i << 12);
    let mut c = Checks::new();
    for i in 0..n {
        probe_store(page(i), 0x1000 + i);
    }
    let faults0 = trap::total_caught();
    let calls0 = [H_REMOVE, H_BULK_REMOVE, H_PROTECT].map(hcall::count);
    let t = &mut env.table;

    // H_REMOVE: returns the entry with R|C, then the page faults; a second remove is H_NOT_FOUND.
    let removed = t.remove(maps[0].0, avpn(0));
    c.check("H_REMOVE returns the entry", removed.is_ok_and(|h| h.valid() && h.referenced() && h.changed()));
    expect_unmapped(&mut c, "removed page faults", page(0));
    c.check("second H_REMOVE is H_NOT_FOUND", t.remove(maps[0].0, avpn(0)) == Err(HptError::NotFound));
    // AVPN mismatch must not remove.
    c.check(
        "H_REMOVE with a wrong AVPN is H_NOT_FOUND",
        t.remove(maps[1].0, RemoveCond::Avpn(hpt::avpn_arg(maps[1].1) ^ 0x80)) == Err(HptError::NotFound),
    );

    // H_BULK_REMOVE of pages 1..4: each removed with R|C; then again: each not found.
    let req: [BulkRequest; 4] =
        core::array::from_fn(|k| BulkRequest { ptex: maps[1 + k].0, cond: avpn(1 + k) });
    let bulk = t.bulk_remove(&req);
    c.check(
        "H_BULK_REMOVE removes four, reporting R|C",
        bulk.status.is_ok() && bulk.outcomes.iter().all(|o| *o == BulkOutcome::Removed { rc: 0x180 }),
    );
    for i in 1..5 {
        expect_unmapped(&mut c, "bulk-removed page faults", page(i));
    }
    let again = t.bulk_remove(&req[..2]);
    c.check(
        "H_BULK_REMOVE again: not found",
        again.outcomes[..2].iter().all(|o| *o == BulkOutcome::NotFound),
    );

    // H_PROTECT to read-only: loads work, stores fault with a protection DSISR and change nothing.
    let p5 = maps[5];
    c.check(
        "H_PROTECT read-only",
        t.protect(p5.0, protection(hpt::PP_RO), Some(hpt::avpn_arg(p5.1))).is_ok(),
    );
    c.check("read-only page still reads", probe_load(page(5), 0) == 0x1005);
    trap::expect(VEC_DSI, Resume::Skip);
    probe_store(page(5), 0xbad);
    c.fault("store to read-only faults", trap::take(), VEC_DSI, page(5), Some(DSISR_PROTFAULT | DSISR_STORE));
    c.check("faulting store changed nothing", probe_load(page(5), 0) == 0x1005);
    c.check(
        "H_PROTECT read-write",
        t.protect(p5.0, protection(hpt::PP_RW), Some(hpt::avpn_arg(p5.1))).is_ok(),
    );
    probe_store(page(5), 0x2005);
    c.check("store after H_PROTECT rw", probe_load(page(5), 0) == 0x2005);
    c.check(
        "H_PROTECT of a removed entry is H_NOT_FOUND",
        t.protect(maps[0].0, protection(hpt::PP_RW), Some(hpt::avpn_arg(maps[0].1)))
            == Err(HptError::NotFound),
    );

    // Repair in the handler: remove page 6, fault, re-enter it from the DSI handler, retry.
    let fixes0 = FIXES.load(SeqCst);
    match t.remove(maps[6].0, avpn(6)) {
        Ok(h) => {
            FIX_V.store(h.v, SeqCst);
            FIX_R.store(h.r & !0x180, SeqCst);
            FIX_PTEX.store(maps[6].0, SeqCst);
            FIX_MASK.store(t.pteg_mask(), SeqCst);
            trap::expect(VEC_DSI, Resume::Retry(fix_hpte));
            let val = probe_load(page(6), SENTINEL);
            c.fault("DSI repaired in handler", trap::take(), VEC_DSI, page(6), Some(DSISR_NOPTE));
            c.check("retried load reads the page", val == 0x1006);
        }
        Err(_) => c.check("H_REMOVE page 6", false),
    }
    // Segment fault: drop the SLB entry, fault at 0x380, reload it from the handler, retry.
    let e = hpt::slb_entry(&env.sizes, ea, vsid, SegmentSize::S256M, ps.base_shift, 1);
    FIX_SLB_RB.store(e.esid_word, SeqCst);
    FIX_SLB_RS.store(e.vsid_word, SeqCst);
    env.unload_segment(ea, SegmentSize::S256M);
    trap::expect(VEC_DSEG, Resume::Retry(fix_slb));
    let val = probe_load(page(7) + 16, SENTINEL);
    c.fault("data segment interrupt repaired", trap::take(), VEC_DSEG, page(7) + 16, None);
    c.check("retried load after SLB reload", val == 0);
    c.check("segment reloaded", probe_load(page(7), 0) == 0x1007);
    let fixes = FIXES.load(SeqCst) - fixes0;
    let faults = trap::total_caught() - faults0;
    let calls = [H_REMOVE, H_BULK_REMOVE, H_PROTECT].map(hcall::count);

    // Remaining entries: 5, 6 (re-entered), 7.
    let leftover = crate::scen_translate::remove_all(env, &maps[5..]);
    env.unload_segment(ea, SegmentSize::S256M);
    env.reset_slb();
    scenario(
        "invalidate",
        c.failed == 0 && leftover == 0 && fixes == 2,
        format_args!(
            "ra {:#x}: {}/{} checks, {} faults caught (DSI/DSegI with DAR+DSISR), {} repaired in handler; {} H_REMOVE, {} H_BULK_REMOVE, {} H_PROTECT{}",
            pa,
            c.done - c.failed,
            c.done,
            faults,
            fixes,
            calls[0] - calls0[0],
            calls[1] - calls0[1],
            calls[2] - calls0[2],
            c.first.map_or("", |_| " (see check failed above)")
        ),
    );
}
