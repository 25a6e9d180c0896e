//! Console on the first virtual terminal through H_PUT_TERM_CHAR.
//!
//! QEMU treats terminal number 0 as "the default vty", so no device-tree lookup is
//! needed to print (and printing works before the tree has been walked).

use crate::hcall::{hcall, H_PUT_TERM_CHAR};
use core::fmt;

/// A writer that sends bytes in 16-byte hypercalls.
pub struct Console;

fn put(chunk: &[u8]) {
    let mut buf = [0u8; 16];
    buf[..chunk.len()].copy_from_slice(chunk);
    let hi = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(buf[8..].try_into().expect("8 bytes"));
    // A console failure has nowhere to be reported; the verdict comes from RTAS.
    let _ = hcall(H_PUT_TERM_CHAR, &[0, chunk.len() as u64, hi, lo]);
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(16) {
            put(chunk);
        }
        Ok(())
    }
}

/// Prints formatted text on the console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Prints formatted text and a newline on the console.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::kprint!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
