//! The entry stub and the Open Firmware call gate.
//!
//! The firmware (VOF or SLOF) jumps to the first byte of the image in real mode with
//! MSR[SF] = 0, r5 = the client-interface entry. The stub switches to 64-bit mode, turns
//! on FP/VEC/VSX (the compiler emits such code), clears .bss, sets up the boot stack and
//! calls `kmain` through its ELFv1 function descriptor (which carries the TOC for r2).

use core::arch::global_asm;

/// Size of the boot stack.
pub const STACK_SIZE: usize = 256 * 1024;

/// The boot stack (in .bss, zeroed by the stub before use).
#[no_mangle]
#[used]
static mut BOOT_STACK: [u8; STACK_SIZE] = [0; STACK_SIZE];

global_asm!(
    r#"
    .section .text.entry, "ax"
    .globl _start
_start:
    # 64-bit mode, FP, VEC, VSX, RI on; the rest of the firmware's MSR is kept.
    mfmsr   11
    li      12, 1
    rldicr  12, 12, 63, 0
    or      11, 11, 12
    ori     11, 11, 0x2002
    oris    11, 11, 0x0280
    mtmsrd  11
    isync

    # Clear .bss (8-byte aligned at both ends by the linker script).
    lis     11, __bss_start@h
    ori     11, 11, __bss_start@l
    lis     12, __bss_end@h
    ori     12, 12, __bss_end@l
    li      0, 0
1:  cmpld   11, 12
    bge     2f
    std     0, 0(11)
    addi    11, 11, 8
    b       1b
2:
    # Boot stack, with a terminated back chain.
    lis     1, BOOT_STACK@h
    ori     1, 1, BOOT_STACK@l
    lis     0, {stack_size}@h
    ori     0, 0, {stack_size}@l
    add     1, 1, 0
    # The ABI wants r1 16-byte aligned (lvx/stvx silently ignore the low bits).
    rldicr  1, 1, 0, 59
    li      0, 0
    stdu    0, -256(1)

    # kmain(r3 = initrd base, r4 = initrd size, r5 = client-interface entry).
    lis     11, kmain@h
    ori     11, 11, kmain@l
    ld      0, 0(11)
    ld      2, 8(11)
    mtctr   0
    bctrl
3:  b       3b

    # of_call_gate(args: *mut u32 (r3), entry (r4)) -> i32
    # IEEE 1275 client calls are made in 32-bit mode (as Linux does), with every
    # non-volatile register and r2 preserved around the firmware.
    .section .opd, "aw"
    .align 3
    .globl of_call_gate
of_call_gate:
    .quad .of_call_gate, .TOC.@tocbase, 0
    .text
.of_call_gate:
    mflr    0
    std     0, 16(1)
    stdu    1, -384(1)
    std     2, 112(1)
    std     13, 120(1)
    std     14, 128(1)
    std     15, 136(1)
    std     16, 144(1)
    std     17, 152(1)
    std     18, 160(1)
    std     19, 168(1)
    std     20, 176(1)
    std     21, 184(1)
    std     22, 192(1)
    std     23, 200(1)
    std     24, 208(1)
    std     25, 216(1)
    std     26, 224(1)
    std     27, 232(1)
    std     28, 240(1)
    std     29, 248(1)
    std     30, 256(1)
    std     31, 264(1)
    mfcr    0
    std     0, 272(1)
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
    ld      0, 272(1)
    mtcr    0
    ld      2, 112(1)
    ld      13, 120(1)
    ld      14, 128(1)
    ld      15, 136(1)
    ld      16, 144(1)
    ld      17, 152(1)
    ld      18, 160(1)
    ld      19, 168(1)
    ld      20, 176(1)
    ld      21, 184(1)
    ld      22, 192(1)
    ld      23, 200(1)
    ld      24, 208(1)
    ld      25, 216(1)
    ld      26, 224(1)
    ld      27, 232(1)
    ld      28, 240(1)
    ld      29, 248(1)
    ld      30, 256(1)
    ld      31, 264(1)
    addi    1, 1, 384
    ld      0, 16(1)
    mtlr    0
    extsw   3, 3
    blr
"#,
    stack_size = const STACK_SIZE,
);

extern "C" {
    /// Calls the Open Firmware client interface at `entry` with the argument array `args`.
    pub fn of_call_gate(args: *mut u32, entry: u64) -> i32;
}
