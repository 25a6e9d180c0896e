//! The guest partition's kernel: a small program, copied to guest-real address 0,
//! that executes a list of operations the scenario placed in its memory and
//! reports what happened.
//!
//! It is a real guest: it runs with MSR[HV] = 0 in LPID 1, real-mode accesses go
//! through the VRMA, it loads its own SLB (`slbmte`), turns relocation on
//! (MSR[DR], MSR[IR]) and goes through its own HPTEs, makes PAPR hypercalls
//! with `sc 1`, and takes its own storage interrupts at guest-real 0x300,
//! 0x380, 0x400 and 0x480. The scenario decides *what* it does (like the guest
//! code of KVM's selftests); the CPU decides what happens.
//!
//! Operations sit at guest-real [`OPS`], 16 doublewords each (a kind and nine
//! arguments); each has a 16-doubleword result record at [`RESULTS`]. A kind of
//! 0 ends the list: the guest makes the private hypercall [`H_VMMU_DONE`] and,
//! resumed, starts the list again from the top.

use core::arch::global_asm;

/// Guest-real address of the operation list.
pub const OPS: u64 = 0x1_0000;
/// Guest-real address of the results.
pub const RESULTS: u64 = 0x1_4000;
/// Operations per list.
pub const MAX_OPS: usize = 64;
/// Guest-real address of the code the EXEC operation runs with IR = 1.
pub const EXEC_STUB: u64 = 0x3000;
/// The value EXEC_STUB leaves in the result.
pub const EXEC_MAGIC: u64 = 0x5a5;
/// The guest's entry point (guest-real).
pub const ENTRY: u64 = 0x2000;

/// Private hypercall: the operation list is done.
pub const H_VMMU_DONE: u64 = 0xf100;
/// Private hypercall: an interrupt the guest does not expect (r4 vector, r5
/// SRR0, r6 SRR1, r7 DAR, r8 DSISR).
pub const H_VMMU_UNEXPECTED: u64 = 0xf1ff;

/// Result record fields (doubleword index).
pub mod res {
    /// Fault vector (0x300, 0x380, 0x400, 0x480) of the last fault, or 0.
    pub const FVEC: usize = 9;
    /// DAR (data faults) or SRR0 (instruction faults) of the last fault.
    pub const FADDR: usize = 10;
    /// DSISR (data faults) or SRR1 (instruction faults) of the last fault.
    pub const FCAUSE: usize = 11;
    /// Number of faults taken during the operation.
    pub const FCOUNT: usize = 12;
}

/// One operation for the guest.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `sc 1` with r3 = opcode, r4..r11 = args; the result holds r3..r11.
    Hcall(u64, [u64; 8]),
    /// Load a doubleword from `ea` with MSR[DR] = 1; result[0] = value.
    Load(u64),
    /// Store `value` at `ea` with MSR[DR] = 1.
    Store(u64, u64),
    /// `slbmte rs, rb`.
    Slbmte { rs: u64, rb: u64 },
    /// Loop forever (checks the hypervisor decrementer watchdog).
    Spin,
    /// Branch to `ea` with IR = DR = 1 (the code there must be EXEC_STUB's);
    /// result[0] = what it left in r27 ([`EXEC_MAGIC`]).
    Exec(u64),
}

impl Op {
    /// The 16-doubleword encoding the guest reads.
    pub fn encode(&self) -> [u64; 16] {
        let mut w = [0u64; 16];
        match *self {
            Op::Hcall(op, a) => {
                w[0] = 1;
                w[1] = op;
                w[2..10].copy_from_slice(&a);
            }
            Op::Load(ea) => (w[0], w[1]) = (2, ea),
            Op::Store(ea, v) => (w[0], w[1], w[2]) = (3, ea, v),
            Op::Slbmte { rs, rb } => (w[0], w[1], w[2]) = (5, rs, rb),
            Op::Exec(ea) => (w[0], w[1]) = (7, ea),
            Op::Spin => w[0] = 4,
        }
        w
    }
}

global_asm!(
    r#"
    .section .rodata.guest_blob, "a"
    .balign 256
    .globl guest_blob_start
guest_blob_start:
    b       guest_main

    # Every vector the guest does not expect reports itself with H_VMMU_UNEXPECTED.
    .irp vec, 0x100, 0x200
    .org guest_blob_start + \vec
    mtsprg1 3
    li      3, \vec
    b       guest_unexpected
    .endr
    .org guest_blob_start + 0x300
    mtsprg1 3
    li      3, 0x300
    b       guest_dfault
    .org guest_blob_start + 0x380
    mtsprg1 3
    li      3, 0x380
    b       guest_dfault
    .org guest_blob_start + 0x400
    mtsprg1 3
    li      3, 0x400
    b       guest_ifault
    .org guest_blob_start + 0x480
    mtsprg1 3
    li      3, 0x480
    b       guest_ifault
    .irp vec, 0x500, 0x600, 0x700, 0x800, 0x900, 0x980, 0xa00, 0xb00, 0xc00, 0xd00, 0xe00, 0xe20, 0xe40, 0xe60, 0xe80, 0xea0, 0xf00, 0xf20, 0xf40, 0xf60, 0xf80
    .org guest_blob_start + \vec
    mtsprg1 3
    li      3, \vec
    b       guest_unexpected
    .endr

    .org guest_blob_start + 0x1000
    # A data fault at an operation's access: record it in the result (r30) and
    # go on after the faulting instruction.
guest_dfault:
    std     3, 72(30)
    mfdar   3
    std     3, 80(30)
    mfdsisr 3
    std     3, 88(30)
    ld      3, 96(30)
    addi    3, 3, 1
    std     3, 96(30)
    mfsrr0  3
    addi    3, 3, 4
    mtsrr0  3
    mfsprg1 3
    rfid

    # An instruction fault in EXEC: record it, return to the operation loop
    # (r29 = where, r28 = with which MSR).
guest_ifault:
    std     3, 72(30)
    mfsrr0  3
    std     3, 80(30)
    mfsrr1  3
    std     3, 88(30)
    ld      3, 96(30)
    addi    3, 3, 1
    std     3, 96(30)
    mtsrr0  29
    mtsrr1  28
    mfsprg1 3
    rfid

guest_unexpected:
    mr      4, 3
    li      3, 0
    ori     3, 3, 0xf1ff
    mfsrr0  5
    mfsrr1  6
    mfdar   7
    mfdsisr 8
    sc      1
    b       guest_unexpected

    .org guest_blob_start + 0x2000
guest_main:
    lis     31, 1
    lis     30, 1
    ori     30, 30, 0x4000
guest_loop:
    li      0, 0
    std     0, 72(30)
    std     0, 96(30)
    ld      3, 0(31)
    cmpdi   3, 0
    beq     op_end
    cmpdi   3, 1
    beq     op_hcall
    cmpdi   3, 2
    beq     op_load
    cmpdi   3, 3
    beq     op_store
    cmpdi   3, 4
    beq     op_spin
    cmpdi   3, 5
    beq     op_slbmte
    cmpdi   3, 7
    beq     op_exec
    b       op_end

op_next:
    addi    31, 31, 128
    addi    30, 30, 128
    b       guest_loop

op_end:
    li      3, 0
    ori     3, 3, 0xf100
    sc      1
    b       guest_main

op_hcall:
    ld      3, 8(31)
    ld      4, 16(31)
    ld      5, 24(31)
    ld      6, 32(31)
    ld      7, 40(31)
    ld      8, 48(31)
    ld      9, 56(31)
    ld      10, 64(31)
    ld      11, 72(31)
    sc      1
    std     3, 0(30)
    std     4, 8(30)
    std     5, 16(30)
    std     6, 24(30)
    std     7, 32(30)
    std     8, 40(30)
    std     9, 48(30)
    std     10, 56(30)
    std     11, 64(30)
    b       op_next

    # r5 = MSR as it is (real mode), r6 = with DR.
dr_on:
    mfmsr   5
    ori     6, 5, 0x10
    mtmsrd  6
    isync
    blr

op_load:
    ld      4, 8(31)
    li      7, 0
    bl      dr_on
    ld      7, 0(4)
    mtmsrd  5
    isync
    std     7, 0(30)
    b       op_next

op_store:
    ld      4, 8(31)
    ld      7, 16(31)
    bl      dr_on
    std     7, 0(4)
    mtmsrd  5
    isync
    b       op_next

op_spin:
    b       op_spin

op_slbmte:
    ld      4, 8(31)
    ld      5, 16(31)
    slbmte  4, 5
    isync
    b       op_next

op_exec:
    ld      4, 8(31)
    mfmsr   28
    bcl     20, 31, 1f
1:  mflr    29
    addi    29, 29, 2f - 1b
    ori     6, 28, 0x30
    mtsrr0  4
    mtsrr1  6
    li      27, 0
    rfid
2:  std     27, 0(30)
    b       op_next

    # EXEC's target, reached through the guest's own instruction translation.
    .org guest_blob_start + 0x3000
    li      27, 0x5a5
    mtsrr0  29
    mtsrr1  28
    rfid

    .globl guest_blob_end
guest_blob_end:
"#
);

extern "C" {
    static guest_blob_start: u8;
    static guest_blob_end: u8;
}

/// The guest's code, to be copied to guest-real 0.
pub fn blob() -> &'static [u8] {
    // SAFETY: the two symbols delimit the block in .rodata.
    unsafe {
        let s = &guest_blob_start as *const u8;
        let e = &guest_blob_end as *const u8;
        core::slice::from_raw_parts(s, e as usize - s as usize)
    }
}
