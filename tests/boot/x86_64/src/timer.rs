//! The run budget on SVM: a one-shot PIT countdown on IRQ0 (legacy PIC remapped to
//! vectors 0x20-0x2f, everything else masked). The INTR intercept turns its expiry into a
//! #VMEXIT, so a guest that never exits still stops. (VMX uses its preemption timer.)
//!
//! Also the time-stamp counter, calibrated once against PIT channel 2, for deadlines
//! that must hold on a CPU that takes no interrupts (the two-CPU race).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

use core::sync::atomic::AtomicU64;

use crate::port::{inb, outb, rdtsc};

/// Vector of IRQ0 after the PIC remap.
pub const IRQ0_VECTOR: u8 = 0x20;
/// Vector of the master PIC's spurious IRQ7.
pub const SPURIOUS_VECTOR: u8 = 0x27;
/// PIT input clock in Hz.
const PIT_HZ: u64 = 1_193_182;

/// Number of IRQ0 interrupts the host has taken.
pub static TICKS: AtomicU32 = AtomicU32::new(0);

global_asm!(
    r#"
    .text
    .global irq0_stub
irq0_stub:
    push %rax
    lock incl {ticks}(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq
    .global spurious_stub
spurious_stub:
    iretq
"#,
    ticks = sym TICKS,
    options(att_syntax)
);

/// Remaps the PIC and masks every line.
pub fn init() {
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, IRQ0_VECTOR);
    outb(0xa1, IRQ0_VECTOR + 8);
    outb(0x21, 4);
    outb(0xa1, 2);
    outb(0x21, 1);
    outb(0xa1, 1);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    // Channel 0 stopped: mode 0 with no count loaded does not count.
    outb(0x43, 0x30);
}

/// Starts a one-shot countdown of `ms` milliseconds (at most 54) and unmasks IRQ0.
pub fn arm(ms: u32) {
    let count = ((PIT_HZ * ms.min(54) as u64) / 1000).clamp(1, 0xffff);
    outb(0x43, 0x30);
    outb(0x40, count as u8);
    outb(0x40, (count >> 8) as u8);
    outb(0x21, 0xfe);
}

/// Stops the countdown, takes any IRQ0 already raised (so none is left pending for the
/// next run) and masks the line again. Returns whether IRQ0 fired since `arm`.
pub fn disarm(ticks_before: u32) -> bool {
    outb(0x43, 0x30);
    // SAFETY: the IDT has gates for IRQ0 and the spurious vector; opening the interrupt
    // window for two instructions lets a pending IRQ0 be acknowledged by its handler.
    unsafe { asm!("sti", "nop", "nop", "cli", options(nomem, nostack)) };
    outb(0x21, 0xff);
    TICKS.load(Ordering::SeqCst) != ticks_before
}

/// Current tick count (pass to [`disarm`]).
pub fn ticks() -> u32 {
    TICKS.load(Ordering::SeqCst)
}

/// TSC ticks per millisecond, once calibrated (0 before).
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC rate over a 10 ms one-shot countdown of PIT channel 2 (its output
/// is visible in bit 5 of port 0x61). Returns ticks per millisecond, or `None` if the
/// countdown did not end (no PIT channel 2).
pub fn calibrate_tsc() -> Option<u64> {
    const MS: u64 = 10;
    let saved = inb(0x61);
    // Gate of channel 2 on, speaker off.
    outb(0x61, (saved & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0 (output rises at the terminal count).
    outb(0x43, 0xb0);
    let count = PIT_HZ * MS / 1000;
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    let mut polls = 0u64;
    let done = loop {
        if inb(0x61) & 0x20 != 0 {
            break true;
        }
        polls += 1;
        if polls > 50_000_000 {
            break false;
        }
    };
    let t1 = rdtsc();
    outb(0x61, saved);
    if !done || t1 <= t0 {
        return None;
    }
    let per_ms = ((t1 - t0) / MS).max(1);
    TSC_PER_MS.store(per_ms, Ordering::SeqCst);
    Some(per_ms)
}

/// A point in time after which a wait gives up (TSC based; usable on any CPU).
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now. Before calibration 1 GHz is assumed (a faster clock
    /// makes the wait shorter than asked, never a hang).
    pub fn after_ms(ms: u64) -> Self {
        let per_ms = match TSC_PER_MS.load(Ordering::SeqCst) {
            0 => 1_000_000,
            v => v,
        };
        Deadline(rdtsc().saturating_add(ms.saturating_mul(per_ms)))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Milliseconds between two TSC readings (0 before calibration).
pub fn tsc_ms(from: u64, to: u64) -> u64 {
    match TSC_PER_MS.load(Ordering::SeqCst) {
        0 => 0,
        v => to.saturating_sub(from) / v,
    }
}
