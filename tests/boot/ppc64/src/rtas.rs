//! RTAS calls for the verdict, made directly through QEMU's KVMPPC_H_RTAS hypercall with the
//! tokens read from /rtas (no instantiate-rtas blob is needed for these two calls).
//!
//! `power-off` ends QEMU with status 0 (pass); `ibm,os-term` reports a guest panic, which
//! `-action panic=exit-failure` turns into status 1 (fail).

use crate::hcall::{hcall, KVMPPC_H_RTAS};
use core::sync::atomic::{AtomicU32, Ordering};

static POWER_OFF: AtomicU32 = AtomicU32::new(0);
static OS_TERM: AtomicU32 = AtomicU32::new(0);

/// RTAS argument block (PAPR 7.2.7): token, nargs, nret, then args and returns, all
/// 32-bit big-endian cells at a real address.
#[repr(C, align(16))]
struct RtasArgs {
    token: u32,
    nargs: u32,
    nret: u32,
    cells: [u32; 16],
}

/// Records the tokens found in the device tree.
pub fn set_tokens(power_off: Option<u32>, os_term: Option<u32>) {
    POWER_OFF.store(power_off.unwrap_or(0), Ordering::Relaxed);
    OS_TERM.store(os_term.unwrap_or(0), Ordering::Relaxed);
}

fn call(token: u32, args: &[u32], nret: u32) -> i64 {
    let mut a = RtasArgs { token, nargs: args.len() as u32, nret, cells: [0; 16] };
    a.cells[..args.len()].copy_from_slice(args);
    // The stack is identity mapped (or relocation is off), so the EA is the real address.
    hcall(KVMPPC_H_RTAS, &[&mut a as *mut RtasArgs as u64]).status
}

/// Stops the machine with a pass verdict. Never returns.
pub fn power_off() -> ! {
    let t = POWER_OFF.load(Ordering::Relaxed);
    if t != 0 {
        call(t, &[0, 0], 1);
    }
    crate::kprintln!("power-off token unknown or call failed: spinning (the run's timeout fails it)");
    halt()
}

/// Stops the machine with a fail verdict, passing `msg` (NUL-terminated) to the platform.
pub fn os_term(msg: &'static [u8]) -> ! {
    let t = OS_TERM.load(Ordering::Relaxed);
    if t != 0 {
        call(t, &[msg.as_ptr() as usize as u32], 1);
    }
    crate::kprintln!("ibm,os-term token unknown or call failed: spinning (the run's timeout fails it)");
    halt()
}

fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}
