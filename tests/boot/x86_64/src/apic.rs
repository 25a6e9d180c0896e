//! The local APIC in xAPIC mode (SDM Vol. 3A chapter 11), for the two-CPU race: start
//! the second CPU (INIT, then STARTUP IPIs) and kick the vCPU out of guest mode with a
//! fixed IPI (the INTR intercept turns it into a #VMEXIT).
//!
//! The registers are memory-mapped at the base IA32_APIC_BASE gives (0xFEE0_0000 after
//! reset), which the boot page tables identity-map.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::port::rdmsr;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;

const SVR_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x5 << 8;
const ICR_STARTUP: u32 = 0x6 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;

/// Vector of the kick IPI (the host handler only acknowledges it).
pub const KICK_VECTOR: u8 = 0xf0;
/// Vector of the APIC's spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Kick IPIs this CPU's handler has taken (counted by the assembly stub in `idt`).
pub static KICKS_TAKEN: AtomicU32 = AtomicU32::new(0);

/// Why the local APIC cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// IA32_APIC_BASE has the global enable bit clear.
    Disabled,
    /// The APIC runs in x2APIC mode (MSR interface), which this module does not drive.
    X2Apic,
    /// The base is not where the identity map and the IPI stub expect it.
    UnexpectedBase(u64),
    /// An IPI stayed in "send pending" state.
    SendStuck,
}

/// The APIC base the kick stub in `idt` acknowledges through (EOI at base + 0xb0).
pub const EXPECTED_BASE: u64 = 0xfee0_0000;

fn reg(off: usize) -> *mut u32 {
    (EXPECTED_BASE as usize + off) as *mut u32
}

fn read(off: usize) -> u32 {
    // SAFETY: `check` verified the xAPIC page is at EXPECTED_BASE (identity-mapped); the
    // registers read here have no read side effects.
    unsafe { reg(off).read_volatile() }
}

fn write(off: usize, v: u32) {
    // SAFETY: as in `read`; the registers written (EOI, SVR, ICR) act on this CPU's APIC
    // and, for the ICR, send the IPIs the caller asked for.
    unsafe { reg(off).write_volatile(v) }
}

/// Checks the APIC is globally enabled, in xAPIC mode, at the expected base.
pub fn check() -> Result<(), ApicError> {
    let base = rdmsr(MSR_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0 {
        return Err(ApicError::Disabled);
    }
    if base & APIC_BASE_X2APIC != 0 {
        return Err(ApicError::X2Apic);
    }
    if base & !0xfff & 0x000f_ffff_ffff_f000 != EXPECTED_BASE {
        return Err(ApicError::UnexpectedBase(base));
    }
    Ok(())
}

/// Software-enables this CPU's APIC (SVR), keeping its LVT programming (the firmware's
/// virtual-wire LINT0 carries the PIC's IRQ0 that the SVM run budget uses).
pub fn enable() -> Result<(), ApicError> {
    check()?;
    write(REG_SVR, read(REG_SVR) | SVR_ENABLE | SPURIOUS_VECTOR as u32);
    Ok(())
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

fn send(dest: u32, low: u32) -> Result<(), ApicError> {
    write(REG_ICR_HIGH, dest << 24);
    write(REG_ICR_LOW, low);
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(ApicError::SendStuck)
}

/// Sends INIT to the CPU with APIC ID `dest`.
pub fn send_init(dest: u32) -> Result<(), ApicError> {
    send(dest, ICR_INIT | ICR_LEVEL_ASSERT)
}

/// Sends STARTUP with the real-mode entry page `page` (entry at `page << 12`).
pub fn send_startup(dest: u32, page: u8) -> Result<(), ApicError> {
    send(dest, ICR_STARTUP | ICR_LEVEL_ASSERT | page as u32)
}

/// Sends the kick IPI to the CPU with APIC ID `dest`.
pub fn send_kick(dest: u32) -> Result<(), ApicError> {
    send(dest, KICK_VECTOR as u32)
}

/// Address of the EOI register (the kick stub in `idt` writes it).
pub const EOI_ADDRESS: u64 = EXPECTED_BASE + REG_EOI as u64;

/// Kicks taken so far by this CPU.
pub fn kicks_taken() -> u32 {
    KICKS_TAKEN.load(Ordering::SeqCst)
}
