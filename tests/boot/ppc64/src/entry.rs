//! The entry stub and the Open Firmware call gate.
//!
//! The firmware (VOF or SLOF) jumps to the first byte of the image in real mode with
//! MSR[SF] = 0, r5 = the client-interface entry. The stub switches to 64-bit mode, turns
//! on FP/VEC/VSX (the compiler emits such code), clears .bss, sets up the boot stack and
//! calls `kmain` through its ELFv1 function descriptor (which carries the TOC for r2).

use core::arch::global_asm;

global_asm!(
    concat!(
        start_label!(),
        r#"
    # 64-bit mode, FP, VEC, VSX, RI on; the rest of the firmware's MSR is kept.
    mfmsr   11
    li      12, 1
    rldicr  12, 12, 63, 0
    or      11, 11, 12
    ori     11, 11, 0x2002
    oris    11, 11, 0x0280
    mtmsrd  11
    isync
"#,
        clear_bss!(),
        stack_top!("BOOT_STACK", "{stack_size}"),
        // kmain(r3 = initrd base, r4 = initrd size, r5 = client-interface entry).
        call_descriptor!("kmain"),
        "3:  b       3b\n",
        // of_call_gate(args: *mut u32 (r3), entry (r4)) -> i32
        // IEEE 1275 client calls are made in 32-bit mode (as Linux does), with every
        // non-volatile register and r2 preserved around the firmware.
        elfv1_function!("of_call_gate"),
        save_nonvolatile!(384),
        r#"
    mfmsr   31
    std     31, 280(1)
    # Drop to 32-bit mode for the firmware.
    li      0, 1
    rldicr  0, 0, 63, 0
    andc    30, 31, 0
    mtctr   4
    mtmsrd  30
    isync
    bctrl
    ld      31, 280(1)
    mtmsrd  31
    isync
"#,
        restore_nonvolatile!(384),
        "    extsw   3, 3\n",
        "    blr\n",
    ),
    stack_size = const crate::asm::BOOT_STACK_SIZE,
);

extern "C" {
    /// Calls the Open Firmware client interface at `entry` with the argument array `args`.
    pub fn of_call_gate(args: *mut u32, entry: u64) -> i32;
}
