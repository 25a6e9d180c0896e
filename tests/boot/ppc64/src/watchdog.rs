//! A watchdog on the decrementer: if the scenarios have not finished within the budget,
//! the decrementer interrupt (0x900) prints a FAIL line and ends the run through
//! `ibm,os-term`, so a hang inside the kernel is a failure with a message, not only a
//! timeout of the runner.
//!
//! The decrementer is 32 bits wide (no large-decrementer mode is requested), so the
//! budget is counted down in ticks of at most one second, re-armed from the handler.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

static TICK: AtomicU64 = AtomicU64::new(0);
static REMAINING: AtomicU64 = AtomicU64::new(0);
static BUDGET: AtomicU64 = AtomicU64::new(0);

const MSR_EE: u64 = 0x8000;

fn set_dec(ticks: u64) {
    // SAFETY: writing the decrementer only schedules the next 0x900 interrupt.
    unsafe { asm!("mtdec {0}", in(reg) ticks, options(nostack, nomem)) };
}

/// Starts the watchdog: `seconds` of budget at `timebase_hz`. Enables MSR[EE] (no device
/// raises external interrupts here; the decrementer is the only source).
pub fn arm(seconds: u64, timebase_hz: u64) {
    if timebase_hz == 0 || seconds == 0 {
        return;
    }
    TICK.store(timebase_hz.min(0x7fff_ffff), SeqCst);
    REMAINING.store(seconds, SeqCst);
    BUDGET.store(seconds, SeqCst);
    set_dec(TICK.load(SeqCst));
    let msr = crate::mmu::mfmsr() | MSR_EE;
    // SAFETY: enabling external/decrementer interrupts; the vectors are installed.
    unsafe { asm!("mtmsrd {0}, 1", in(reg) msr, options(nostack)) };
}

/// Stops the watchdog (MSR[EE] off).
pub fn disarm() {
    let msr = crate::mmu::mfmsr() & !MSR_EE;
    // SAFETY: disabling interrupts has no other effect.
    unsafe { asm!("mtmsrd {0}, 1", in(reg) msr, options(nostack)) };
    REMAINING.store(0, SeqCst);
}

/// Called by the trap handler for 0x900: re-arm, or fail the run when the budget is spent.
pub fn tick(srr0: u64) {
    let left = REMAINING.load(SeqCst);
    if left <= 1 {
        crate::kprintln!(
            "watchdog: scenarios still running after {} s (at {:#x})",
            BUDGET.load(SeqCst),
            srr0
        );
        crate::report::fatal("watchdog expired");
    }
    REMAINING.store(left - 1, SeqCst);
    set_dec(TICK.load(SeqCst));
}
