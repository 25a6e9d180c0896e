//! The entry stub and the OPAL call gate.
//!
//! skiboot enters the kernel (run in place where QEMU copied it) in hypervisor real
//! mode with MSR = HV | SF, r3 = the flattened device tree, r8 = OPAL's base and
//! r9 = OPAL's entry (skiboot `asm/head.S`, `start_kernel`). The stub turns on FP,
//! VEC, VSX (the compiler emits such code), ME and RI, clears .bss, sets up the boot
//! stack and calls `kmain(fdt, opal_base, opal_entry)` through its ELFv1 descriptor.

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
    mfmsr   11
    ori     11, 11, 0x3002
    oris    11, 11, 0x0280
    mtmsrd  11
    isync

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
    lis     1, BOOT_STACK@h
    ori     1, 1, BOOT_STACK@l
    lis     0, {stack_size}@h
    ori     0, 0, {stack_size}@l
    add     1, 1, 0
    rldicr  1, 1, 0, 59
    li      0, 0
    stdu    0, -256(1)

    mr      4, 8
    mr      5, 9
    lis     11, kmain@h
    ori     11, 11, kmain@l
    ld      0, 0(11)
    ld      2, 8(11)
    mtctr   0
    bctrl
3:  b       3b

    # opal_gate(token (r3), args: *const [u64; 8] (r4), base (r5), entry (r6)) -> i64
    # OPAL wants r0 = token, r3.. = arguments, r2 = its base, hypervisor real mode;
    # every non-volatile register and our r2 are kept around it.
    .section .opd, "aw"
    .align 3
    .globl opal_gate
opal_gate:
    .quad .opal_gate, .TOC.@tocbase, 0
    .text
.opal_gate:
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
    mfmsr   0
    std     0, 280(1)
    mr      0, 3
    mr      11, 4
    mr      2, 5
    mtctr   6
    ld      3, 0(11)
    ld      4, 8(11)
    ld      5, 16(11)
    ld      6, 24(11)
    ld      7, 32(11)
    ld      8, 40(11)
    ld      9, 48(11)
    ld      10, 56(11)
    bctrl
    ld      0, 280(1)
    mtmsrd  0
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
    blr
"#,
    stack_size = const STACK_SIZE,
);

extern "C" {
    /// Calls OPAL function `token` with up to eight arguments.
    pub fn opal_gate(token: u64, args: *const [u64; 8], base: u64, entry: u64) -> i64;
}
