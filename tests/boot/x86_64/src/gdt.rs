//! The host's GDT and a 64-bit TSS, loaded once after the trampoline.
//!
//! The trampoline's GDT has no TSS; VMX requires a non-zero host TR selector (SDM Vol. 3C
//! 26.2.3), and a TSS is also where an interrupt stack would live.

use core::arch::asm;
use core::mem::size_of;

/// Kernel code segment selector (64-bit).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// TSS selector (a 16-byte system descriptor).
pub const TSS_SEL: u16 = 0x18;

/// 64-bit task-state segment (SDM Vol. 3A 8.7).
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: size_of::<Tss>() as u16,
};

static mut GDT: [u64; 5] = [0, 0x00af9a000000ffff, 0x00cf92000000ffff, 0, 0];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Base address of the GDT (the VMX host-state area needs it).
pub fn gdt_base() -> u64 {
    core::ptr::addr_of!(GDT) as u64
}

/// Base address of the TSS.
pub fn tss_base() -> u64 {
    core::ptr::addr_of!(TSS) as u64
}

/// Builds the TSS descriptor, loads the GDT, reloads the segment registers and TR.
pub fn init() {
    let base = tss_base();
    let limit = (size_of::<Tss>() - 1) as u64;
    // Available 64-bit TSS (type 9), present.
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89u64 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    // SAFETY: single-threaded boot, nothing else refers to GDT yet; the descriptors written
    // are the ones the kernel runs on.
    unsafe {
        let gdt = &mut *core::ptr::addr_of_mut!(GDT);
        gdt[3] = low;
        gdt[4] = high;
    }
    reload_segments();
    // SAFETY: the TSS descriptor was just written and the GDT loaded; TR is loaded once.
    unsafe { asm!("ltr {tss:x}", tss = in(reg) TSS_SEL as u64) };
}

/// Loads the GDT `init` built on the second CPU and reloads its segment registers. The
/// TSS is not loaded there: its descriptor is busy (the boot CPU's TR), and the second
/// CPU never enters a guest, so it needs no TR of its own.
pub fn load_secondary() {
    reload_segments();
}

/// Loads the GDT and reloads CS (by a far return), DS, ES and SS.
fn reload_segments() {
    let ptr = DescriptorPointer { limit: (size_of::<[u64; 5]>() - 1) as u16, base: gdt_base() };
    // SAFETY: the GDT is built (by `init`, before any second CPU starts) and only read
    // here; the code and data selectors are the ones the boot and AP trampolines used,
    // so execution continues at the next instruction.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            ptr = in(reg) &ptr,
            cs = in(reg) KERNEL_CS as u64,
            tmp = out(reg) _,
            ds = in(reg) KERNEL_DS as u64,
        );
    }
}
