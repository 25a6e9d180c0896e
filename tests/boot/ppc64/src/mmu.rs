//! The kernel's own translation: SLB loads, MSR[IR|DR], and the identity map of the
//! kernel's real memory (vectors, image, heap) so that it keeps running with relocation
//! on. Interrupts run with relocation off at the same addresses.

use core::arch::asm;

/// MSR[IR]: instruction relocation.
pub const MSR_IR: u64 = 0x20;
/// MSR[DR]: data relocation.
pub const MSR_DR: u64 = 0x10;

/// Writes SLB entry (`rb` = ESID|V|index, `rs` = VSID|B|flags).
pub fn slbmte(rb: u64, rs: u64) {
    // SAFETY: loads one SLB entry; the callers never replace the entry covering the
    // kernel's identity segment while relocation is on. `isync` orders it before later
    // accesses.
    unsafe { asm!("slbmte {rs}, {rb}", "isync", rs = in(reg) rs, rb = in(reg) rb, options(nostack)) };
}

/// Invalidates the SLB entry translating `ea` (segment size given by `b`: 0 = 256M, 1 = 1T).
pub fn slbie(ea: u64, b: u64) {
    let rb = (ea & !0x0fff_ffff) | (b << 8);
    // SAFETY: removes a translation the caller no longer needs; never the kernel's own.
    unsafe { asm!("slbie {rb}", "isync", rb = in(reg) rb, options(nostack)) };
}

/// Current MSR.
pub fn mfmsr() -> u64 {
    let m: u64;
    // SAFETY: reading the MSR has no side effects.
    unsafe { asm!("mfmsr {0}", out(reg) m, options(nostack, nomem)) };
    m
}

/// Turns data and instruction relocation on.
///
/// # Safety
/// Every address the kernel touches (code, stack, statics, heap) is mapped at EA = RA.
pub unsafe fn relocation_on() {
    let m = mfmsr() | MSR_IR | MSR_DR;
    // SAFETY: the caller guarantees the identity map; mtmsrd + isync switches at once.
    unsafe { asm!("sync", "mtmsrd {0}", "isync", in(reg) m, options(nostack)) };
}

/// Turns data and instruction relocation off.
pub fn relocation_off() {
    let m = mfmsr() & !(MSR_IR | MSR_DR);
    // SAFETY: real mode reaches every address the kernel uses (they are identity mapped).
    unsafe { asm!("sync", "mtmsrd {0}", "isync", in(reg) m, options(nostack)) };
}
