//! Assembly pieces both ppc64 images put into their `global_asm!` blocks: this pseries
//! kernel and the powernv hypervisor (which includes this file by `#[path]`). Each macro
//! expands to a string literal, to be joined with `concat!`; the module is declared
//! first, with `#[macro_use]`, so that every later module sees them.
//!
//! The conventions they share (64-bit ELFv1 ABI, big-endian):
//! - a function is called through its descriptor in `.opd` (entry, TOC for r2,
//!   environment); the caller's frame has the LR save word at 16(r1);
//! - a frame opened by `save_nonvolatile!` holds r2 at 112, r13..r31 at 120..264 and
//!   CR at 272; r2 is saved too because firmware and the guest change it;
//! - a stack is 16-byte aligned (lvx/stvx ignore the low bits) and starts with a
//!   terminated back chain under a 256-byte frame.

/// Size of the boot stack `_start` calls `kmain` on.
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

/// The boot stack (in .bss, zeroed by `_start` before use; see `stack_top!`).
#[no_mangle]
#[used]
static mut BOOT_STACK: [u8; BOOT_STACK_SIZE] = [0; BOOT_STACK_SIZE];

/// Defines `$name` as an ELFv1 function: the global descriptor `$name` in `.opd` and the
/// code label `.$name` in `.text`, where the code that follows the macro goes.
macro_rules! elfv1_function {
    ($name:literal) => {
        concat!(
            "    .section .opd, \"aw\"\n",
            "    .align 3\n",
            "    .globl ", $name, "\n",
            $name, ":\n",
            "    .quad .", $name, ", .TOC.@tocbase, 0\n",
            "    .text\n",
            ".", $name, ":\n",
        )
    };
}

/// Saves LR in the caller's frame, opens a frame of `$bytes` (a multiple of 16, at least
/// 288) and saves r2, r13..r31 and CR in it. Clobbers r0.
macro_rules! save_nonvolatile {
    ($bytes:literal) => {
        concat!(
            "    mflr    0\n",
            "    std     0, 16(1)\n",
            "    stdu    1, -", $bytes, "(1)\n",
            "    std     2, 112(1)\n",
            "    .irp r, 13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n",
            "    std     \\r, 16 + 8 * \\r(1)\n",
            "    .endr\n",
            "    mfcr    0\n",
            "    std     0, 272(1)\n",
        )
    };
}

/// The inverse of `save_nonvolatile!` with r1 at the frame it opened: restores CR, r2
/// and r13..r31, closes the frame of `$bytes` and reloads LR; a `blr` returns. Clobbers r0.
macro_rules! restore_nonvolatile {
    ($bytes:literal) => {
        concat!(
            "    ld      0, 272(1)\n",
            "    mtcr    0\n",
            "    ld      2, 112(1)\n",
            "    .irp r, 13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n",
            "    ld      \\r, 16 + 8 * \\r(1)\n",
            "    .endr\n",
            "    addi    1, 1, ", $bytes, "\n",
            "    ld      0, 16(1)\n",
            "    mtlr    0\n",
        )
    };
}

/// Zeroes .bss (`__bss_start`..`__bss_end`, 8-byte aligned at both ends by the linker
/// script). Clobbers r0, r11, r12 and the local labels 1 and 2.
macro_rules! clear_bss {
    () => {
        concat!(
            "    lis     11, __bss_start@h\n",
            "    ori     11, 11, __bss_start@l\n",
            "    lis     12, __bss_end@h\n",
            "    ori     12, 12, __bss_end@l\n",
            "    li      0, 0\n",
            "1:  cmpld   11, 12\n",
            "    bge     2f\n",
            "    std     0, 0(11)\n",
            "    addi    11, 11, 8\n",
            "    b       1b\n",
            "2:\n",
        )
    };
}

/// Points r1 at the top of the stack `$stack` (a symbol) of `$size` bytes (an assembler
/// expression or operand such as `{stack_size}`), 16-byte aligned, with a terminated
/// back chain and a 256-byte frame below it. Clobbers r0.
macro_rules! stack_top {
    ($stack:literal, $size:literal) => {
        concat!(
            "    lis     1, ", $stack, "@h\n",
            "    ori     1, 1, ", $stack, "@l\n",
            "    lis     0, ", $size, "@h\n",
            "    ori     0, 0, ", $size, "@l\n",
            "    add     1, 1, 0\n",
            "    rldicr  1, 1, 0, 59\n",
            "    li      0, 0\n",
            "    stdu    0, -256(1)\n",
        )
    };
}

/// Calls the Rust function `$name` through its ELFv1 descriptor (entry to CTR, its TOC
/// to r2); r3.. are its arguments. Clobbers r0, r11 and whatever the callee may.
macro_rules! call_descriptor {
    ($name:literal) => {
        concat!(
            "    lis     11, ", $name, "@h\n",
            "    ori     11, 11, ", $name, "@l\n",
            "    ld      0, 0(11)\n",
            "    ld      2, 8(11)\n",
            "    mtctr   0\n",
            "    bctrl\n",
        )
    };
}

/// Loads a register frame at `$base` (a GPR number) laid out as `TrapFrame` and `Vcpu`
/// are (r0..r31 at 8 * n, then CR at 256, LR 264, CTR 272 and XER 280): CR, LR, CTR and
/// XER through r0, then the GPRs listed in `$gprs`, which leave out the base; the caller
/// loads the base last.
macro_rules! load_frame {
    ($base:literal, $gprs:literal) => {
        concat!(
            "    ld      0, 256(", $base, ")\n",
            "    mtcr    0\n",
            "    ld      0, 264(", $base, ")\n",
            "    mtlr    0\n",
            "    ld      0, 272(", $base, ")\n",
            "    mtctr   0\n",
            "    ld      0, 280(", $base, ")\n",
            "    mtxer   0\n",
            "    .irp r, ", $gprs, "\n",
            "    ld      \\r, 8 * \\r(", $base, ")\n",
            "    .endr\n",
        )
    };
}

/// Starts the image's entry point `_start`, in .text.entry (which the linker script
/// puts first, where the firmware jumps).
macro_rules! start_label {
    () => {
        concat!(
            "    .section .text.entry, \"ax\"\n",
            "    .globl _start\n",
            "_start:\n",
        )
    };
}
