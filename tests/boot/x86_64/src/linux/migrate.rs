//! The live phases under the running Linux guest, driven between exits once the test
//! program says its workload runs:
//!
//! 1. **Live migration**, once with write protection and once with the NPT D bit: dirty
//!    logging on the RAM slot (huge leaves split), a bulk copy of all of RAM to a
//!    destination buffer, copy rounds of the pages each round reports while the guest keeps
//!    working, then the guest is held for the final round and the destination is compared
//!    with guest memory page by page: every differing page is a write the log lost.
//! 2. **Ageing**: passes over all of RAM with the guest running between them; each pass
//!    reports the leaves found young (accessed since the last pass) and old.
//! 3. **Invalidation**: a host range behind guest RAM is zapped as an MMU notifier would;
//!    the guest must refault it and keep running.
//!
//! On one CPU the copy rounds run between guest slices (the guest is stopped while a round
//! harvests and copies, and runs between rounds): the classic single-threaded pre-copy.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, GfnRange, Hva, HvaRange};
use mmu_generic::dirty_log::Tracking;
use mmu_generic::memslot::SlotId;

use super::mmu::GuestMmu;
use super::run::{End, Vm};
use super::vcpu::VCpu;
use crate::port::rdtsc;
use crate::vendor::Vendor;

/// The RAM slot.
pub const RAM_SLOT: SlotId = SlotId(0);
/// Guest time between two rounds or passes (ms of host time, in which the guest runs).
const ROUND_MS: u64 = 150;
/// Copy rounds before the final one.
const ROUNDS: usize = 4;
/// Ageing passes.
const AGE_PASSES: usize = 3;
/// The zapped range: guest-physical 16-32 MiB (the kernel's image: hot pages).
const ZAP_GPA: (u64, u64) = (16 << 20, 32 << 20);
/// How long the guest runs after the zap before the phase is judged.
const ZAP_MS: u64 = 300;

/// One phase's result line.
pub type Line = (String, Result<String, String>);

/// One migration's figures.
#[derive(Clone, Debug, Default)]
struct Migration {
    split: usize,
    bulk: u64,
    rounds: Vec<u64>,
    final_round: u64,
    lost: u64,
    written: u64,
    /// When logging started (ms into the run).
    started_ms: u64,
    /// Nested faults when logging started.
    npf_at_start: u64,
}

#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Migrate { mode: usize, m: Migration, next: u64 },
    Age { pass: usize, next: u64, reports: Vec<(u64, u64)> },
    Zap { until: u64, pages: u64, npf_before: u64 },
    Done,
}

/// The live phases' state and results.
pub struct Live {
    phase: Phase,
    /// Host address of the migration's destination (as large as guest RAM).
    dest: u64,
    /// Finished phases' lines.
    pub lines: Vec<Line>,
}

const MODES: [(Tracking, &str); 2] =
    [(Tracking::WriteProtect, "write-protect"), (Tracking::HardwareDirty, "D bit")];

impl Live {
    /// Phases not started; `dest` is a host block as large as guest RAM.
    pub fn new(dest: u64) -> Self {
        Live { phase: Phase::Idle, dest, lines: Vec::new() }
    }

    fn copy_page<C: VCpu + Vendor, M: GuestMmu>(&self, vm: &Vm<C, M>, gfn: u64) -> bool {
        let Ok(src) = vm.ram.page(gfn) else { return false };
        // SAFETY: `dest` is a host block of the size of guest RAM, owned by the VMM; `gfn`
        // lies in RAM (checked by `page`), so the 4 KiB at gfn * 4096 lie in the block.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), (self.dest + (gfn << 12)) as *mut u8, 4096) };
        true
    }

    fn same_page<C: VCpu + Vendor, M: GuestMmu>(&self, vm: &Vm<C, M>, gfn: u64) -> bool {
        let Ok(src) = vm.ram.page(gfn) else { return false };
        // SAFETY: as in `copy_page` (a read of the destination).
        let dst = unsafe { core::slice::from_raw_parts((self.dest + (gfn << 12)) as *const u8, 4096) };
        src == dst
    }

    fn round<C: VCpu + Vendor, M: GuestMmu>(&self, vm: &mut Vm<C, M>) -> Result<u64, String> {
        let gfns: Vec<Gfn> = vm.mmu.harvest(RAM_SLOT, &mut vm.cpu).map_err(|e| format!("harvest: {e:?}"))?;
        for g in &gfns {
            if !self.copy_page(vm, g.0) {
                return Err(format!("dirty log reported gfn {:#x} outside RAM", g.0));
            }
        }
        Ok(gfns.len() as u64)
    }

    fn finish(&mut self, name: String, r: Result<String, String>) {
        self.lines.push((name, r));
    }

    /// Advances the phases; called between exits with the guest stopped.
    pub fn step<C: VCpu + Vendor, M: GuestMmu>(&mut self, vm: &mut Vm<C, M>) -> Option<End> {
        let now = vm.ms();
        let npages = vm.ram.bytes >> 12;
        match core::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Idle if vm.test.started.is_some() => self.start_migration(vm, 0),
            Phase::Idle => self.phase = Phase::Idle,
            Phase::Migrate { mode, mut m, next } if now >= next => {
                let pause_from = rdtsc();
                let r = match self.round(vm) {
                    Ok(n) => n,
                    Err(e) => {
                        self.finish(format!("linux migration ({})", MODES[mode].1), Err(e));
                        return self.next_after_migration(vm, mode);
                    }
                };
                if m.rounds.len() < ROUNDS {
                    m.rounds.push(r);
                    self.phase = Phase::Migrate { mode, m, next: now + ROUND_MS };
                    return None;
                }
                // The final round: the guest is held (this runs between exits) until the
                // destination has been compared with guest memory.
                m.final_round = r;
                // The guest stayed stopped from the final harvest through its copy.
                let pause_us = rdtsc().saturating_sub(pause_from) * 1000 / vm.tsc_per_ms.max(1);
                let faults = vm.exits.faults() - m.npf_at_start;
                m.written = m.rounds.iter().sum::<u64>() + r;
                m.lost = (0..npages).filter(|&g| !self.same_page(vm, g)).count() as u64;
                let copied = m.bulk + m.written;
                let line = format!(
                    "rounds over {} ms after the bulk copy, split huge pages {}, {} rounds + final, pages copied {} (bulk {}, rounds {:?}, final {}), final-round pause {} us, {} {} while logging, {} lost writes",
                    now - m.started_ms,
                    m.split,
                    m.rounds.len(),
                    copied,
                    m.bulk,
                    m.rounds,
                    m.final_round,
                    pause_us,
                    faults,
                    vm.mmu.fault_kind(),
                    m.lost
                );
                let r = if m.lost != 0 {
                    Err(line)
                } else if m.rounds.iter().all(|&n| n == 0) {
                    Err(format!("{line}: the guest wrote nothing during the rounds, nothing was shown"))
                } else {
                    Ok(line)
                };
                self.finish(format!("linux migration ({})", MODES[mode].1), r);
                return self.next_after_migration(vm, mode);
            }
            Phase::Age { pass, next, mut reports } if now >= next => {
                let all = GfnRange { start: Gfn(0), end: Gfn(npages) };
                let Some(rep) = vm.mmu.age(all) else {
                    self.finish(String::from("linux ageing"), Err(String::from("RAM slot not found")));
                    return self.start_zap(vm);
                };
                reports.push((rep.young_leaves, rep.leaves - rep.young_leaves));
                if reports.len() < AGE_PASSES {
                    self.phase = Phase::Age { pass: pass + 1, next: now + ROUND_MS, reports };
                    return None;
                }
                let figures: Vec<String> = reports
                    .iter()
                    .enumerate()
                    .map(|(i, (y, o))| format!("pass {} young {} old {}", i + 1, y, o))
                    .collect();
                let line = figures.join(", ");
                // After the first pass every young leaf was accessed since the previous one.
                let ok = reports[1..].iter().all(|&(y, o)| y > 0 && o > 0);
                self.finish(
                    String::from("linux ageing"),
                    if ok { Ok(line) } else { Err(format!("{line}: a pass found no young or no old leaf")) },
                );
                return self.start_zap(vm);
            }
            Phase::Zap { until, pages, npf_before } if now >= until => {
                let refaults = vm.exits.faults() - npf_before;
                let line = format!(
                    "host range gpa {:#x}-{:#x}: {} pages unmapped, {} {} in the {} ms after, guest running",
                    ZAP_GPA.0,
                    ZAP_GPA.1,
                    pages,
                    refaults,
                    vm.mmu.fault_kind(),
                    ZAP_MS
                );
                let ok = pages > 0 && refaults > 0;
                self.finish(String::from("linux zap"), if ok { Ok(line) } else { Err(line) });
                vm.test.phases_done = true;
                self.phase = Phase::Done;
            }
            other => self.phase = other,
        }
        None
    }

    fn start_migration<C: VCpu + Vendor, M: GuestMmu>(&mut self, vm: &mut Vm<C, M>, mode: usize) {
        let name = format!("linux migration ({})", MODES[mode].1);
        let split = match vm.mmu.start_dirty_log(RAM_SLOT, MODES[mode].0, &mut vm.cpu) {
            Ok(n) => n,
            Err(e) => {
                self.finish(name, Err(format!("dirty logging refused: {e:?}")));
                self.next_after_migration(vm, mode);
                return;
            }
        };
        // The bulk copy, after logging started: a write from now on is either in the copy
        // or reported by a round.
        let npages = vm.ram.bytes >> 12;
        for g in 0..npages {
            self.copy_page(vm, g);
        }
        let m = Migration {
            split,
            bulk: npages,
            started_ms: vm.ms(),
            npf_at_start: vm.exits.faults(),
            ..Migration::default()
        };
        self.phase = Phase::Migrate { mode, m, next: vm.ms() + ROUND_MS };
    }

    fn next_after_migration<C: VCpu + Vendor, M: GuestMmu>(
        &mut self,
        vm: &mut Vm<C, M>,
        mode: usize,
    ) -> Option<End> {
        if mode + 1 < MODES.len() {
            self.start_migration(vm, mode + 1);
        } else {
            self.phase = Phase::Age { pass: 0, next: vm.ms(), reports: Vec::new() };
        }
        None
    }

    fn start_zap<C: VCpu + Vendor, M: GuestMmu>(&mut self, vm: &mut Vm<C, M>) -> Option<End> {
        let range = HvaRange { start: Hva(vm.ram.hva + ZAP_GPA.0), end: Hva(vm.ram.hva + ZAP_GPA.1) };
        let npf_before = vm.exits.faults();
        let pages = vm.mmu.invalidate(range, &mut vm.cpu);
        self.phase = Phase::Zap { until: vm.ms() + ZAP_MS, pages, npf_before };
        None
    }

    /// Whether every phase ran.
    pub fn done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }
}
