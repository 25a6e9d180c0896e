//! OPAL, skiboot's runtime interface: the console and power-off.
//!
//! Token numbers from skiboot's `include/opal-api.h`.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::entry::opal_gate;

const OPAL_CONSOLE_WRITE: u64 = 1;
const OPAL_CEC_POWER_DOWN: u64 = 5;
const OPAL_POLL_EVENTS: u64 = 10;
const OPAL_SUCCESS: i64 = 0;
const OPAL_BUSY: i64 = -2;
const OPAL_BUSY_EVENT: i64 = -12;

static BASE: AtomicU64 = AtomicU64::new(0);
static ENTRY: AtomicU64 = AtomicU64::new(0);

/// Records where OPAL lives (from the registers skiboot entered us with).
pub fn init(base: u64, entry: u64) {
    BASE.store(base, Ordering::Relaxed);
    ENTRY.store(entry, Ordering::Relaxed);
}

fn call(token: u64, args: &[u64]) -> i64 {
    let mut a = [0u64; 8];
    a[..args.len()].copy_from_slice(args);
    let (base, entry) = (BASE.load(Ordering::Relaxed), ENTRY.load(Ordering::Relaxed));
    if entry == 0 {
        return -1;
    }
    // SAFETY: `entry` and `base` are the OPAL entry point and base skiboot handed
    // over; we are in hypervisor real mode with interrupts off as OPAL requires, the
    // gate keeps every register the ABI wants kept, and the pointers in `args` point
    // to live memory for the duration of the call.
    unsafe { opal_gate(token, &a, base, entry) }
}

/// Writes `bytes` to OPAL terminal 0, waiting while its buffer is full.
fn console_write(mut bytes: &[u8]) {
    let mut spins = 0;
    while !bytes.is_empty() && spins < 100_000 {
        let mut len: u64 = bytes.len() as u64;
        let rc = call(OPAL_CONSOLE_WRITE, &[0, &mut len as *mut u64 as u64, bytes.as_ptr() as u64]);
        match rc {
            OPAL_SUCCESS => {
                let n = (len as usize).min(bytes.len());
                bytes = &bytes[n..];
                if n == 0 {
                    call(OPAL_POLL_EVENTS, &[0]);
                    spins += 1;
                }
            }
            OPAL_BUSY | OPAL_BUSY_EVENT => {
                call(OPAL_POLL_EVENTS, &[0]);
                spins += 1;
            }
            _ => return,
        }
    }
}

/// Powers the machine off (QEMU exits 0); returns only if OPAL refused.
pub fn power_down() -> i64 {
    let mut rc = call(OPAL_CEC_POWER_DOWN, &[0]);
    for _ in 0..1_000_000 {
        if rc != OPAL_BUSY && rc != OPAL_BUSY_EVENT && rc != OPAL_SUCCESS {
            break;
        }
        call(OPAL_POLL_EVENTS, &[0]);
        if rc != OPAL_SUCCESS {
            rc = call(OPAL_CEC_POWER_DOWN, &[0]);
        }
    }
    rc
}

/// A writer to the OPAL console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        console_write(s.as_bytes());
        Ok(())
    }
}

/// Prints formatted text on the console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::opal::Console, $($arg)*);
    }};
}

/// Prints formatted text and a newline on the console.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::kprint!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::opal::Console, $($arg)*);
    }};
}
