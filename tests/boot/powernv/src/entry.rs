//! The entry stub and the OPAL call gate.
//!
//! skiboot enters the kernel (run in place where QEMU copied it) in hypervisor real
//! mode with MSR = HV | SF, r3 = the flattened device tree, r8 = OPAL's base and
//! r9 = OPAL's entry (skiboot `asm/head.S`, `start_kernel`). The stub turns on FP,
//! VEC, VSX (the compiler emits such code), ME and RI, clears .bss, sets up the boot
//! stack and calls `kmain(fdt, opal_base, opal_entry)` through its ELFv1 descriptor.

use core::arch::global_asm;

global_asm!(
    concat!(
        start_label!(),
        r#"
    mfmsr   11
    ori     11, 11, 0x3002
    oris    11, 11, 0x0280
    mtmsrd  11
    isync
"#,
        clear_bss!(),
        stack_top!("BOOT_STACK", "{stack_size}"),
        "    mr      4, 8\n",
        "    mr      5, 9\n",
        call_descriptor!("kmain"),
        "3:  b       3b\n",
        // opal_gate(token (r3), args: *const [u64; 8] (r4), base (r5), entry (r6)) -> i64
        // OPAL wants r0 = token, r3.. = arguments, r2 = its base, hypervisor real mode;
        // every non-volatile register and our r2 are kept around it.
        elfv1_function!("opal_gate"),
        save_nonvolatile!(384),
        r#"
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
"#,
        restore_nonvolatile!(384),
        "    blr\n",
    ),
    stack_size = const crate::asm::BOOT_STACK_SIZE,
);

extern "C" {
    /// Calls OPAL function `token` with up to eight arguments.
    pub fn opal_gate(token: u64, args: *const [u64; 8], base: u64, entry: u64) -> i64;
}
