//! Scenario bookkeeping and the verdict: one line per scenario, then `N passed, M failed`.

use core::sync::atomic::{AtomicU32, Ordering::SeqCst};

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Records and prints a scenario's outcome with its figures.
pub fn scenario(name: &str, ok: bool, figures: core::fmt::Arguments) {
    if ok {
        PASSED.fetch_add(1, SeqCst);
    } else {
        FAILED.fetch_add(1, SeqCst);
    }
    crate::kprintln!("{} {}: {}", if ok { "PASS" } else { "FAIL" }, name, figures);
}

/// Prints the summary line and ends the run: power-off on pass, os-term on any failure.
pub fn finish() -> ! {
    // A release build counts a FlushToken dropped without its flush instead of
    // panicking: each such drop is a TLB flush the run forgot.
    let drops = mmu_generic::backend::FlushToken::unflushed_drops();
    scenario(
        "flush tokens",
        drops == 0,
        format_args!("{} dropped with a recorded change and no flush", drops),
    );
    let (p, f) = (PASSED.load(SeqCst), FAILED.load(SeqCst));
    crate::kprintln!("{} passed, {} failed", p, f);
    if f == 0 && p > 0 {
        crate::rtas::power_off()
    } else {
        crate::rtas::os_term(b"vmmu boot: scenarios failed\0")
    }
}

/// Ends the run at once with a failure (unexpected interrupt, panic).
pub fn fatal(why: &str) -> ! {
    FAILED.fetch_add(1, SeqCst);
    crate::kprintln!("FAIL fatal: {}", why);
    finish()
}
