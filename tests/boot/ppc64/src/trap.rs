//! What to do with an interrupt: a scenario announces the fault it expects (vector, DAR,
//! DSISR) and how to resume (skip the faulting instruction, or run a fixer and retry it);
//! anything else is an unexpected interrupt and fails the run.
//!
//! State is kept in atomics: the kernel runs on one CPU with external interrupts off, so
//! the only concurrency is the handler interrupting the scenario at a probe.

use crate::vectors::TrapFrame;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

/// Data storage interrupt.
pub const VEC_DSI: u64 = 0x300;
/// Data segment interrupt.
pub const VEC_DSEG: u64 = 0x380;
/// Instruction storage interrupt.
pub const VEC_ISI: u64 = 0x400;
/// Instruction segment interrupt.
pub const VEC_ISEG: u64 = 0x480;
/// Decrementer interrupt (the watchdog).
pub const VEC_DECREMENTER: u64 = 0x900;
/// Program interrupt.
pub const VEC_PROGRAM: u64 = 0x700;

/// SRR1 after an ISI: no translation found.
pub const SRR1_ISI_NOPTE: u64 = 0x4000_0000;
/// SRR1 after an ISI: fetch from no-execute or guarded storage.
pub const SRR1_ISI_N_OR_G: u64 = 0x1000_0000;

/// DSISR: no translation found (Power ISA 3.0B, 6.5.3 Data Storage Interrupt).
pub const DSISR_NOPTE: u64 = 0x4000_0000;
/// DSISR: the access was not permitted by the storage protection.
pub const DSISR_PROTFAULT: u64 = 0x0800_0000;
/// DSISR: the access was a store.
pub const DSISR_STORE: u64 = 0x0200_0000;

/// How the handler resumes after an expected fault.
#[derive(Clone, Copy)]
pub enum Resume {
    /// Step over the faulting instruction (SRR0 += 4); the probe's result register keeps
    /// its sentinel.
    Skip,
    /// Call the fixer (which repairs the translation), then retry the instruction.
    Retry(fn(&TrapFrame)),
    /// Resume at LR: an instruction fetch fault on the first instruction of a called
    /// routine returns to its caller as if it had returned at once.
    Return,
}

/// A fault as the handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caught {
    /// Vector address.
    pub vector: u64,
    /// DAR (data interrupts).
    pub dar: u64,
    /// DSISR (data storage interrupts).
    pub dsisr: u64,
    /// Address of the faulting instruction.
    pub srr0: u64,
    /// SRR1 (instruction interrupts report their cause here).
    pub srr1: u64,
}

const NONE: u64 = u64::MAX;
static EXPECT_VECTOR: AtomicU64 = AtomicU64::new(NONE);
static EXPECT_RESUME: AtomicUsize = AtomicUsize::new(0);
static CAUGHT: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static CAUGHT_VALID: AtomicU64 = AtomicU64::new(0);
static TOTAL_CAUGHT: AtomicU64 = AtomicU64::new(0);

/// Announces that the next interrupt will be at `vector` and how to resume from it.
/// The expectation is one-shot: a second fault is unexpected.
pub fn expect(vector: u64, resume: Resume) {
    let code = match resume {
        Resume::Skip => 0,
        Resume::Return => 1,
        Resume::Retry(f) => f as usize,
    };
    EXPECT_RESUME.store(code, SeqCst);
    CAUGHT_VALID.store(0, SeqCst);
    EXPECT_VECTOR.store(vector, SeqCst);
}

/// Takes the record of the expected fault, if one happened; clears any pending expectation.
pub fn take() -> Option<Caught> {
    EXPECT_VECTOR.store(NONE, SeqCst);
    if CAUGHT_VALID.swap(0, SeqCst) == 0 {
        return None;
    }
    Some(Caught {
        vector: CAUGHT[0].load(SeqCst),
        dar: CAUGHT[1].load(SeqCst),
        dsisr: CAUGHT[2].load(SeqCst),
        srr0: CAUGHT[3].load(SeqCst),
        srr1: CAUGHT[4].load(SeqCst),
    })
}

/// Number of expected faults taken since boot.
pub fn total_caught() -> u64 {
    TOTAL_CAUGHT.load(SeqCst)
}

/// Called by `trap_common` with relocation off, on the exception stack.
#[no_mangle]
extern "C" fn trap_handler(f: &mut TrapFrame) {
    if f.vector == VEC_DECREMENTER {
        crate::watchdog::tick(f.srr0);
        return;
    }
    let expected = EXPECT_VECTOR.swap(NONE, SeqCst);
    if expected != f.vector {
        crate::kprint!(
            "unexpected interrupt {:#x}: srr0={:#x} srr1={:#x} dar={:#x} dsisr={:#x} lr={:#x}",
            f.vector,
            f.srr0,
            f.srr1,
            f.dar,
            f.dsisr,
            f.lr
        );
        if expected == NONE {
            crate::kprintln!(" (none expected)");
        } else {
            crate::kprintln!(" (expected {:#x})", expected);
        }
        crate::report::fatal("unexpected interrupt");
    }
    CAUGHT[0].store(f.vector, SeqCst);
    CAUGHT[1].store(f.dar, SeqCst);
    CAUGHT[2].store(f.dsisr, SeqCst);
    CAUGHT[3].store(f.srr0, SeqCst);
    CAUGHT[4].store(f.srr1, SeqCst);
    CAUGHT_VALID.store(1, SeqCst);
    TOTAL_CAUGHT.fetch_add(1, SeqCst);
    match EXPECT_RESUME.load(SeqCst) {
        0 => f.srr0 += 4,
        1 => f.srr0 = f.lr,
        code => {
            // SAFETY: `code` was stored by `expect` from a `fn(&TrapFrame)`.
            let fixer: fn(&TrapFrame) = unsafe { core::mem::transmute::<usize, fn(&TrapFrame)>(code) };
            fixer(f);
        }
    }
}

/// Loads a doubleword from `ea` with one `ld` instruction; if the load faults and the
/// expectation says [`Resume::Skip`], returns `sentinel`.
#[inline(never)]
pub fn probe_load(ea: u64, sentinel: u64) -> u64 {
    let mut v = sentinel;
    // SAFETY: a single load; if the address is unmapped the interrupt is either expected
    // (and resumed per the expectation) or fatal. No Rust object lives at `ea`.
    unsafe { asm!("ld {v}, 0({a})", v = inout(reg) v, a = in(reg_nonzero) ea, options(nostack)) };
    v
}

/// Stores `val` at `ea` with one `std` instruction (skipped if it faults and the
/// expectation says so).
#[inline(never)]
pub fn probe_store(ea: u64, val: u64) {
    // SAFETY: a single store to memory that no Rust object occupies (scenario pages);
    // faults are handled as for `probe_load`.
    unsafe { asm!("std {v}, 0({a})", v = in(reg) val, a = in(reg_nonzero) ea, options(nostack)) };
}

/// Calls the code at `ea` (which must follow the ELFv1 convention and return its result
/// in r3); returns r3, or `sentinel` if the fetch faulted and the expectation said
/// [`Resume::Return`].
#[inline(never)]
pub fn probe_call(ea: u64, sentinel: u64) -> u64 {
    let mut r3 = sentinel;
    // SAFETY: the callee is a leaf routine written by the scenario (it only sets r3 and
    // returns), or faults on its first fetch and the handler returns to LR. Everything
    // the call may clobber is declared.
    unsafe {
        asm!(
            "mtctr {f}",
            "bctrl",
            f = in(reg) ea,
            inout("r3") r3,
            lateout("r0") _, lateout("r4") _, lateout("r5") _, lateout("r6") _,
            lateout("r7") _, lateout("r8") _, lateout("r9") _, lateout("r10") _,
            lateout("r11") _, lateout("r12") _, lateout("ctr") _, lateout("lr") _,
            lateout("cr0") _, lateout("xer") _,
            options(nostack)
        )
    };
    r3
}
