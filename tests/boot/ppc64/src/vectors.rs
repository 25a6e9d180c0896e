//! Exception vectors at their real addresses and the common trap entry.
//!
//! With LPCR[AIL] = 0 (as at reset) every interrupt enters at its real address with
//! relocation off. Each 32-byte slot from 0x100 to 0x17ff receives the same stub, patched
//! with its own address as the vector number: it parks r13 and CTR in SPRG1/SPRG2 and
//! branches to `trap_common`, which saves the full state (GPRs, CR, LR, CTR, XER, SRR0/1,
//! DAR, DSISR, all 64 VSX registers, FPSCR, VSCR) into [`TrapFrame`], turns FP/VEC/VSX
//! back on (interrupts clear them), calls [`crate::trap::trap_handler`] on its own stack,
//! restores everything (SRR0/SRR1 as the handler left them) and returns with `rfid`.

use core::arch::global_asm;
use core::ptr::write_volatile;

/// Saved state of an interrupted context. Layout shared with the assembly below.
#[repr(C, align(16))]
pub struct TrapFrame {
    /// r0..r31.
    pub gpr: [u64; 32],
    /// CR.
    pub cr: u64,
    /// LR.
    pub lr: u64,
    /// CTR.
    pub ctr: u64,
    /// XER.
    pub xer: u64,
    /// SRR0: the address `rfid` resumes at.
    pub srr0: u64,
    /// SRR1: the MSR `rfid` restores.
    pub srr1: u64,
    /// DAR.
    pub dar: u64,
    /// DSISR.
    pub dsisr: u64,
    /// Vector address (0x300, 0x380, ...).
    pub vector: u64,
    _pad: u64,
    /// VSR0..VSR63 (FPRs are the high halves of VSR0..31, VRs are VSR32..63).
    pub vsr: [[u64; 2]; 64],
    /// FPSCR (saved via f0 after VSR0 is safe).
    pub fpscr: u64,
    _pad2: u64,
    /// VSCR (in the last word).
    pub vscr: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<TrapFrame>() == 1392);

/// The one trap frame (interrupts are not nested: a fault inside the handler is fatal).
#[no_mangle]
static mut TRAP_FRAME: TrapFrame = TrapFrame {
    gpr: [0; 32],
    cr: 0,
    lr: 0,
    ctr: 0,
    xer: 0,
    srr0: 0,
    srr1: 0,
    dar: 0,
    dsisr: 0,
    vector: 0,
    _pad: 0,
    vsr: [[0; 2]; 64],
    fpscr: 0,
    _pad2: 0,
    vscr: [0; 2],
};

const EXC_STACK_SIZE: usize = 64 * 1024;

/// Stack the trap handler runs on.
#[no_mangle]
static mut EXC_STACK: [u8; EXC_STACK_SIZE] = [0; EXC_STACK_SIZE];

global_asm!(
    concat!(
        r#"
    .text
    .globl vector_template
    .globl vector_template_end
    .balign 32
vector_template:
    mtspr   273, 13
    mfctr   13
    mtspr   274, 13
    lis     13, trap_common@h
    ori     13, 13, trap_common@l
    mtctr   13
    li      13, 0
    bctr
vector_template_end:

    .balign 16
trap_common:
    mtspr   275, 12
    lis     12, TRAP_FRAME@h
    ori     12, 12, TRAP_FRAME@l
    std     13, 320(12)
    mfspr   13, 273
    std     13, 104(12)
    mfspr   13, 274
    std     13, 272(12)
    mfspr   13, 275
    std     13, 96(12)
    .irp r, 0,1,2,3,4,5,6,7,8,9,10,11,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    std     \r, 8 * \r(12)
    .endr
    mfcr    0
    std     0, 256(12)
    mflr    0
    std     0, 264(12)
    mfxer   0
    std     0, 280(12)
    mfsrr0  0
    std     0, 288(12)
    mfsrr1  0
    std     0, 296(12)
    mfdar   0
    std     0, 304(12)
    mfdsisr 0
    std     0, 312(12)

    # FP, VEC, VSX and RI back on (the interrupt cleared them); relocation stays off.
    mfmsr   0
    ori     0, 0, 0x2002
    oris    0, 0, 0x0280
    mtmsrd  0
    isync

    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    li      11, 336 + \i * 16
    stxvd2x \i, 11, 12
    .endr
    mffs    0
    stfd    0, 1360(12)
    mfvscr  0
    li      11, 1376
    stvx    0, 11, 12

"#,
        // Handler stack, then trap_handler(&mut TRAP_FRAME) through its descriptor.
        stack_top!("EXC_STACK", "{stack_size}"),
        "    mr      3, 12\n",
        call_descriptor!("trap_handler"),
        r#"

    lis     12, TRAP_FRAME@h
    ori     12, 12, TRAP_FRAME@l
    li      11, 1376
    lvx     0, 11, 12
    mtvscr  0
    lfd     0, 1360(12)
    mtfsf   0xff, 0
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
    li      11, 336 + \i * 16
    lxvd2x  \i, 11, 12
    .endr

    # RI off while SRR0/SRR1 hold the return state.
    mfmsr   0
    li      11, 2
    andc    0, 0, 11
    mtmsrd  0, 1
    ld      0, 288(12)
    mtsrr0  0
    ld      0, 296(12)
    mtsrr1  0
"#,
    load_frame!("12", "0,1,2,3,4,5,6,7,8,9,10,11,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31"),
    r#"
    ld      12, 96(12)
    rfid
"#,
    ),
    stack_size = const EXC_STACK_SIZE,
);

extern "C" {
    static vector_template: [u32; 8];
    static vector_template_end: u8;
}

/// First and last (exclusive) real addresses that receive a stub.
const FIRST_VECTOR: usize = 0x100;
const END_VECTORS: usize = 0x1800;
const STUB_BYTES: usize = 32;

/// Writes the stubs into low memory and makes them visible to instruction fetch.
///
/// # Safety
/// Relocation is off, and the firmware that lived in low memory is no longer needed
/// (every client-interface call has been made).
pub unsafe fn install() {
    // SAFETY: the template is 8 instructions of .text (checked below).
    let template = unsafe { &vector_template };
    // SAFETY: both symbols are in this image; taking addresses only.
    let len = unsafe { (&vector_template_end as *const u8 as usize) - (template.as_ptr() as usize) };
    assert_eq!(len, STUB_BYTES, "vector stub must be 8 instructions");
    for vec in (FIRST_VECTOR..END_VECTORS).step_by(STUB_BYTES) {
        for (i, &insn) in template.iter().enumerate() {
            // The 7th instruction is `li r13, 0`: its immediate becomes the vector address.
            let word = if i == 6 { insn | vec as u32 } else { insn };
            // SAFETY: real addresses 0x100..0x1800 are RAM owned by the kernel now
            // (caller's contract); relocation is off, so the pointer is the real address.
            unsafe { write_volatile((vec + 4 * i) as *mut u32, word) };
        }
    }
    for line in (FIRST_VECTOR..END_VECTORS).step_by(STUB_BYTES) {
        // SAFETY: cache maintenance on memory just written; no memory is changed.
        unsafe {
            core::arch::asm!("dcbst 0, {0}", "sync", "icbi 0, {0}", in(reg_nonzero) line, options(nostack));
        }
    }
    // SAFETY: context synchronisation after the icbi sequence.
    unsafe { core::arch::asm!("sync", "isync", options(nostack)) };
}
