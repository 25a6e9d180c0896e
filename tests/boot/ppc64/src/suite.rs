//! Dirty-log rounds (hardware C bit, and write protection) and ageing on the platform's
//! table, through mmu-generic's drivers and a [`Machine`] that maps pages and performs
//! accesses: `machine_papr` accesses through this CPU's MMU and QEMU's table, write
//! faults taken at the real DSI vector. (The in-memory HPT runs `vmmu-tests`' harness
//! instead, `scen_harness`: its `GuestMmu` plays the CPU in software, which a real MMU
//! behind the DSI vector cannot be made to fit.)

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use mmu_generic::addr::{Gfn, Hva, HvaRange};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots};

/// Pages in the slot each scenario uses (one bitmap word).
pub const NPAGES: u64 = 64;

/// A back end with a CPU in front of it.
pub trait Machine {
    /// The back end the drivers work on.
    type Backend: MmuBackend;
    /// The back end.
    fn backend(&mut self) -> &mut Self::Backend;
    /// The memslots and the slot under test (NPAGES pages, all mapped writable).
    fn slots(&self) -> (&Memslots, Memslot);
    /// Stores `val` at byte `off` of page `page` through the translation. With `log`
    /// (write-protect tracking), a protection fault is resolved through the log
    /// (`note_writable`) and the back end, and the store retried; returns whether that
    /// happened.
    fn store(
        &mut self,
        page: u64,
        off: u64,
        val: u64,
        log: Option<&mut SlotDirtyLog>,
    ) -> Result<bool, &'static str>;
    /// Loads from byte `off` of page `page` through the translation.
    fn load(&mut self, page: u64, off: u64) -> Result<u64, &'static str>;
    /// Performs a flush token's flush.
    fn flush(&mut self, token: FlushToken);
    /// Back-end figures for the scenario line.
    fn figures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
    /// Removes every mapping; returns how many removals failed.
    fn teardown(&mut self) -> u32;
}

/// xorshift64: a reproducible choice of pages.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A subset of `0..n` as a bitmask, each page with probability 1/`inv`.
    pub fn subset(&mut self, n: u64, inv: u64) -> u64 {
        (0..n).filter(|_| self.next().is_multiple_of(inv)).fold(0, |m, i| m | 1 << i)
    }
}

/// Result of a suite scenario, printed as one line.
pub struct Outcome {
    /// Passed.
    pub ok: bool,
    /// The figures.
    pub line: alloc::string::String,
}

struct Figures<'a, M: Machine>(&'a M);
impl<M: Machine> fmt::Display for Figures<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.figures(f)
    }
}

fn outcome(ok: bool, args: fmt::Arguments) -> Outcome {
    let mut line = alloc::string::String::new();
    let _ = fmt::write(&mut line, args);
    Outcome { ok, line }
}

/// Live-migration rounds: each round writes a chosen set of pages (and reads others),
/// harvests with `get_and_clear`, and compares: every written page reported, none other.
pub fn dirty_rounds<M: Machine>(m: &mut M, tracking: Tracking) -> Outcome {
    let slot = m.slots().1;
    let mut flush = FlushToken::new();
    let mut log = match SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, m.backend(), &mut flush) {
        Ok(l) => l,
        Err(e) => return outcome(false, format_args!("start: {}", e)),
    };
    m.flush(flush);
    let mut rng =
        Rng(if tracking == Tracking::HardwareDirty { 0x9e37_79b9_7f4a_7c15 } else { 0xd1b5_4a32_d192_ed03 });
    let (mut written, mut missed, mut spurious, mut faults, mut bad_faults, mut rounds) =
        (0u32, 0u32, 0u32, 0u32, 0u32, 0u32);
    let mut last = vec![(0u64, 0u64); NPAGES as usize];
    let mut out = Vec::new();
    let wp = tracking == Tracking::WriteProtect;
    for round in 0..8u64 {
        let set = match round {
            0 => u64::MAX,
            3 => 0,
            _ => rng.subset(NPAGES, 4),
        };
        let reads = rng.subset(NPAGES, 2) & !set;
        for i in 0..NPAGES {
            if set & (1 << i) != 0 {
                let val = (round << 32) | i;
                let off = 8 * round;
                match m.store(i, off, val, if wp { Some(&mut log) } else { None }) {
                    Ok(f) => {
                        // Under write protection the first write of a round faults, always.
                        if f == wp {
                            faults += f as u32;
                        } else {
                            bad_faults += 1;
                        }
                    }
                    Err(e) => return outcome(false, format_args!("round {} page {}: {}", round, i, e)),
                }
                // A second write in the same round never faults.
                match m.store(i, off + 8, !val, if wp { Some(&mut log) } else { None }) {
                    Ok(false) => {}
                    _ => bad_faults += 1,
                }
                last[i as usize] = (off, val);
            } else if reads & (1 << i) != 0 {
                let _ = m.load(i, 0);
            }
        }
        let token = match log.get_and_clear(m.backend(), &mut out) {
            Ok(t) => t,
            Err(e) => return outcome(false, format_args!("round {}: {}", round, e)),
        };
        // Copy the pages reported only after the flush.
        m.flush(token);
        let reported = out.first().copied().unwrap_or(0);
        missed += (set & !reported).count_ones();
        spurious += (reported & !set).count_ones();
        written += set.count_ones();
        rounds += 1;
    }
    // Harvesting never lost data or mappings.
    let mut intact = 0;
    for (i, &(off, val)) in last.iter().enumerate() {
        if m.load(i as u64, off) == Ok(val) {
            intact += 1;
        }
    }
    let leftover = m.teardown();
    let ok = missed == 0
        && spurious == 0
        && bad_faults == 0
        && intact == NPAGES
        && leftover == 0
        && (!wp || faults == written);
    let how = if wp { "write-protect faults" } else { "C bits" };
    outcome(
        ok,
        format_args!(
            "{} rounds on {} pages, {} page writes learnt from {} ({} faults): missed {}, spurious {}, {}/{} pages intact; {}",
            rounds,
            NPAGES,
            written,
            how,
            faults,
            missed,
            spurious,
            intact,
            NPAGES,
            Figures(m)
        ),
    )
}

/// Ageing: touch a known set; per-page `test_age` finds exactly that set young, `age`
/// clears exactly that many, and nothing is young afterwards.
pub fn ageing<M: Machine>(m: &mut M) -> Outcome {
    let (_, slot) = m.slots();
    let all = slot.hvas();
    let page_range =
        |i: u64| HvaRange { start: Hva(slot.hva().0 + (i << 12)), end: Hva(slot.hva().0 + ((i + 1) << 12)) };
    let mut flush = FlushToken::new();
    let (slots_ptr, _) = m.slots();
    let slots = slots_ptr.clone();
    let initial = age(&slots, m.backend(), all, NoAccessedBit::ReportOld, &mut flush);
    m.flush(flush);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut wrong, mut rounds, mut touched, mut aged) = (0u32, 0u32, 0u32, 0u64);
    for _ in 0..4 {
        let touch = rng.subset(NPAGES, 3);
        for i in 0..NPAGES {
            if touch & (1 << i) != 0 && m.load(i, 16).is_err() {
                wrong += 1;
            }
        }
        let mut young = 0u64;
        for i in 0..NPAGES {
            if test_age(&slots, m.backend(), page_range(i), NoAccessedBit::ReportOld).young {
                young |= 1 << i;
            }
        }
        let mut flush = FlushToken::new();
        let rep = age(&slots, m.backend(), all, NoAccessedBit::ReportOld, &mut flush);
        m.flush(flush);
        let after = test_age(&slots, m.backend(), all, NoAccessedBit::ReportOld);
        wrong += (young ^ touch).count_ones();
        if rep.young_leaves != touch.count_ones() as u64 || after.young || rep.leaves != NPAGES {
            wrong += 1;
        }
        touched += touch.count_ones();
        aged += rep.young_leaves;
        rounds += 1;
    }
    let leftover = m.teardown();
    outcome(
        wrong == 0 && leftover == 0,
        format_args!(
            "{} rounds on {} pages: {} touched, {} found young by test_age and cleared by age ({} young at start), none young after: {}; {}",
            rounds,
            NPAGES,
            touched,
            aged,
            initial.young_leaves,
            if wrong == 0 { "yes" } else { "NO" },
            Figures(m)
        ),
    )
}

/// The guest frame of page `i` of `slot`.
pub fn gfn_of(slot: &Memslot, i: u64) -> Gfn {
    Gfn(slot.base_gfn().0 + i)
}
