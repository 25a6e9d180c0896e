//! Console output and the end of a run, for both boot paths.
//!
//! * PVH (QEMU): COM1 at 0x3f8; the verdict leaves through `isa-debug-exit` at 0xf4
//!   (QEMU exits with status `(v << 1) | 1`: 0x10 → 33 pass, 0x11 → 35 fail).
//! * multiboot2 (Bochs): every byte to port 0xE9 (`port_e9_hack`); the run ends by writing
//!   "Shutdown" to port 0x8900. Bochs' exit status says nothing; the printed verdict does.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot::{PROTO_MULTIBOOT2, PROTO_PVH};
use crate::port;

static PROTOCOL: AtomicU32 = AtomicU32::new(0);

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
const BOCHS_E9: u16 = 0xe9;
const BOCHS_SHUTDOWN: u16 = 0x8900;

/// Value written to isa-debug-exit for a passing run (QEMU exits with 33).
pub const EXIT_PASS: u8 = 0x10;
/// Value written to isa-debug-exit for a failing run (QEMU exits with 35).
pub const EXIT_FAIL: u8 = 0x11;

/// Records the boot protocol and programs COM1 when QEMU booted us.
pub fn init(protocol: u32) {
    PROTOCOL.store(protocol, Ordering::Relaxed);
    if protocol == PROTO_PVH {
        port::outb(COM1 + 1, 0x00); // no interrupts
        port::outb(COM1 + 3, 0x80); // DLAB
        port::outb(COM1, 0x01); // 115200 baud
        port::outb(COM1 + 1, 0x00);
        port::outb(COM1 + 3, 0x03); // 8N1
        port::outb(COM1 + 2, 0xc7); // FIFO
        port::outb(COM1 + 4, 0x03);
    }
}

/// Which loader started the image.
pub fn protocol() -> u32 {
    PROTOCOL.load(Ordering::Relaxed)
}

fn put_byte(b: u8) {
    if protocol() == PROTO_MULTIBOOT2 {
        port::outb(BOCHS_E9, b);
    } else {
        let mut spins = 0u32;
        while port::inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        port::outb(COM1, b);
    }
}

/// Unit type implementing `fmt::Write` over the console.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' && protocol() != PROTO_MULTIBOOT2 {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

/// Formats to the console (used by the `println!` macro).
pub fn print(args: fmt::Arguments<'_>) {
    let _ = Console.write_fmt(args);
}

/// Prints a formatted line on the console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => {{
        $crate::console::print(format_args!($($arg)*));
        $crate::console::print(format_args!("\n"));
    }};
}

/// Ends the run: pass or fail is told to the emulator where it can hear it.
pub fn exit(pass: bool) -> ! {
    match protocol() {
        PROTO_MULTIBOOT2 => {
            for b in b"Shutdown" {
                port::outb(BOCHS_SHUTDOWN, *b);
            }
        }
        _ => port::outb(DEBUG_EXIT, if pass { EXIT_PASS } else { EXIT_FAIL }),
    }
    loop {
        port::halt();
    }
}
