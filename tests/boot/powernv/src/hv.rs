//! Entering and leaving the guest partition.
//!
//! The hypervisor runs in hypervisor real mode (MSR[HV] = 1, IR = DR = 0). It
//! enters the guest with `hrfid` (HSRR0 = the guest's next instruction, HSRR1 =
//! its MSR, HV = 0). The guest comes back through an interrupt that sets
//! MSR[HV]: `sc 1` (0xC00, LEV = 1, SRR0/SRR1), the hypervisor data and
//! instruction storage interrupts (0xE00, 0xE20: HSRR0/1, HDAR, HDSISR), the
//! hypervisor decrementer (0x980) and the other hypervisor vectors. The
//! guest's own interrupts (0x300, 0x380, 0x400, 0x700, ...) never come here:
//! with HV = 0 they go to the guest's vectors at guest-real 0x300 etc., fetched
//! through the VRMA.
//!
//! Every vector at real address 0 saves r13 in HSPRG1, loads the vCPU pointer
//! from HSPRG0, saves r12, puts the vector number in r12 and branches to a
//! common low-memory stub, which saves r11 and CTR and jumps to `hv_exit`
//! (its address is in the vCPU). `hv_exit` saves the rest of the guest's state
//! and returns from `enter_guest` on the hypervisor's stack.

use core::arch::global_asm;

/// A vCPU's saved state. Field offsets are used by the assembly below.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Vcpu {
    /// r0..r31.
    pub gpr: [u64; 32],
    /// Condition register.
    pub cr: u64,
    /// Link register.
    pub lr: u64,
    /// Count register.
    pub ctr: u64,
    /// Fixed-point exception register.
    pub xer: u64,
    /// The next instruction of the guest (HSRR0 on entry).
    pub pc: u64,
    /// The guest's MSR (HSRR1 on entry).
    pub msr: u64,
    /// The vector of the last exit.
    pub trap: u64,
    /// SRR0 at the exit (after `sc 1`: the instruction after it).
    pub srr0: u64,
    /// SRR1 at the exit (after `sc 1`: the guest's MSR).
    pub srr1: u64,
    /// HSRR0 at the exit.
    pub hsrr0: u64,
    /// HSRR1 at the exit.
    pub hsrr1: u64,
    /// HDAR at the exit.
    pub hdar: u64,
    /// HDSISR at the exit.
    pub hdsisr: u64,
    /// Reserved (keeps the offsets below fixed).
    pub spare: u64,
    /// Address of `hv_exit`, read by the low-memory stub.
    pub exit_addr: u64,
    /// The hypervisor's stack pointer while the guest runs.
    pub hv_sp: u64,
    /// DAR at the exit.
    pub dar: u64,
    /// DSISR at the exit.
    pub dsisr: u64,
}

/// MSR bits (Power ISA Book III, 4.2.1).
pub mod msr {
    /// 64-bit mode.
    pub const SF: u64 = 1 << 63;
    /// Data relocation.
    pub const DR: u64 = 1 << 4;
    /// Machine check enable.
    pub const ME: u64 = 1 << 12;
    /// Recoverable interrupt.
    pub const RI: u64 = 1 << 1;
}

global_asm!(concat!(
    // enter_guest(vcpu (r3)) -> trap
    elfv1_function!("enter_guest"),
    save_nonvolatile!(320),
    r#"
    std     1, 376(3)
    lis     4, hv_exit@h
    ori     4, 4, hv_exit@l
    std     4, 368(3)
    mtspr   304, 3
    ld      0, 288(3)
    mtspr   314, 0
    ld      0, 296(3)
    mtspr   315, 0
"#,
    load_frame!("3", "0,1,2,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31"),
    r#"
    ld      3, 24(3)
    hrfid

    # The common exit: r13 = vCPU, r12 = vector; the guest's r13 is in HSPRG1,
    # its r12, r11 and CTR are saved.
    .globl hv_exit
hv_exit:
    .irp r, 0,1,2,3,4,5,6,7,8,9,10,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    std     \r, 8 * \r(13)
    .endr
    mfspr   0, 305
    std     0, 104(13)
    std     12, 304(13)
    mfcr    0
    std     0, 256(13)
    mflr    0
    std     0, 264(13)
    mfxer   0
    std     0, 280(13)
    mfsrr0  0
    std     0, 312(13)
    mfsrr1  0
    std     0, 320(13)
    mfspr   0, 314
    std     0, 328(13)
    mfspr   0, 315
    std     0, 336(13)
    mfspr   0, 307
    std     0, 344(13)
    mfspr   0, 306
    std     0, 352(13)
    mfdar   0
    std     0, 384(13)
    mfdsisr 0
    std     0, 392(13)
    # Back to the hypervisor's MSR: FP, VEC, VSX, ME, RI on (the interrupt cleared them).
    mfmsr   0
    ori     0, 0, 0x3002
    oris    0, 0, 0x0280
    mtmsrd  0
    isync
    mr      3, 12
    ld      1, 376(13)
"#,
    restore_nonvolatile!(320),
    r#"
    blr

    # The vector block, copied to real address 0. Position independent: only
    # branches relative to the block.
    .section .rodata.hv_vectors, "a"
    .balign 256
    .globl hv_vectors_start
hv_vectors_start:
    .irp vec, 0x100, 0x200, 0x300, 0x380, 0x400, 0x480, 0x500, 0x600, 0x700, 0x800, 0x900, 0x980, 0xa00, 0xb00, 0xc00, 0xd00, 0xe00, 0xe20, 0xe40, 0xe60, 0xe80, 0xea0, 0xf00, 0xf20, 0xf40, 0xf60, 0xf80
    .org hv_vectors_start + \vec
    mtspr   305, 13
    mfspr   13, 304
    std     12, 96(13)
    li      12, \vec
    b       hv_low_common
    .endr
    .org hv_vectors_start + 0x1000
hv_low_common:
    std     11, 88(13)
    mfctr   11
    std     11, 272(13)
    ld      11, 368(13)
    mtctr   11
    bctr
    .globl hv_vectors_end
hv_vectors_end:
"#,
),);

extern "C" {
    fn enter_guest(vcpu: *mut Vcpu) -> u64;
    static hv_vectors_start: u8;
    static hv_vectors_end: u8;
}

/// Runs the guest until its next exit to the hypervisor; returns the vector.
pub fn run(vcpu: &mut Vcpu) -> u64 {
    // SAFETY: the vectors are installed (`install_vectors`), the partition is set
    // up (LPCR, LPIDR, the table), and `vcpu` stays valid and unmoved while the
    // guest runs: HSPRG0 points at it until the exit has saved the guest's state
    // into it and `enter_guest` returns.
    unsafe { enter_guest(vcpu) }
}

/// Copies the vector block to real address 0 (below the firmware, which the
/// OS owns once skiboot has started it) and makes it visible to instruction
/// fetch. HSPRG0 must point at a vCPU before any interrupt: `boot` is the one
/// interrupts taken before the first guest entry would be saved to.
pub fn install_vectors(boot: &mut Vcpu) {
    // SAFETY: the symbols delimit the vector block in .rodata.
    let (start, end) = unsafe { (&hv_vectors_start as *const u8, &hv_vectors_end as *const u8) };
    let len = end as usize - start as usize;
    boot.exit_addr = 0;
    // SAFETY: real addresses 0..len (< 0x1100) are RAM the OS owns (skiboot lives at
    // 0x30000000 and reserves nothing below it), nothing else uses them, and the
    // source is the block in our image.
    unsafe { crate::spr::copy_to_real(0, start as u64, len as u64) };
    crate::spr::sync_icache(0, len as u64);
    crate::spr::set_hsprg0(boot as *mut Vcpu as u64);
}
