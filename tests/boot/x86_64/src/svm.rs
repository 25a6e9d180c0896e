//! AMD SVM with nested paging (AMD APM Vol. 2, chapter 15): EFER.SVME, VM_HSAVE_PA, a
//! VMCB whose guest starts in 32-bit protected mode with paging off, and the world
//! switch. The run budget is the PIT countdown of [`crate::timer`] with the INTR intercept.

use core::arch::global_asm;

use crate::port::{cpuid, rdmsr, wrmsr};
use crate::smp;
use crate::timer;
use crate::vendor::{Exit, GuestRegs, GuestStart, NestedFormat, Vendor};
use crate::vmcb::*;

/// Instruction length of VMMCALL (TCG has no NRIP save, so the host knows it).
const VMMCALL_LEN: u64 = 3;
/// Instruction length of HLT.
const HLT_LEN: u64 = 1;
/// One PIT countdown, in milliseconds (the PIT counts at most about 55 ms).
pub(crate) const SLICE_MS: u32 = 50;
/// Countdowns one guest run may use up before it is stopped: about half a second of host
/// time (TCG runs in wall-clock time, and the machine may be loaded).
pub(crate) const RUN_BUDGET_SLICES: u32 = 10;

/// The VMCB of [`Svm`] and [`crate::svm_shadow::SvmShadow`].
pub(crate) static VMCB: Vmcb = Vmcb::new();
static mut HSAVE: Page = Page([0; 4096]);
static mut IOPM: Iopm = Iopm([0xff; 3 * 4096]);
pub(crate) static mut MSRPM: Msrpm = Msrpm([0; 2 * 4096]);

global_asm!(
    concat!(
        r#"
    .text
    .global svm_world_switch
    // rdi = VMCB physical address, rsi = &mut GuestRegs
svm_world_switch:
"#,
        push_callee_saved!(),
        r#"
    push %rsi
    mov %rdi, %rax
"#,
        load_guest_gprs!("rsi"),
        r#"
    mov 40(%rsi), %rdi
    mov 32(%rsi), %rsi
    clgi
    sti
    vmrun %rax
    cli
    stgi
    xchg (%rsp), %rsi
"#,
        store_guest_gprs!("rsi"),
        r#"
    mov %rdi, 40(%rsi)
    pop %rax
    mov %rax, 32(%rsi)
"#,
        pop_callee_saved!(),
        r#"
    ret
"#,
    ),
    options(att_syntax)
);

extern "C" {
    pub(crate) fn svm_world_switch(vmcb_pa: u64, regs: *mut GuestRegs);
}

/// Why SVM could not be used.
#[derive(Debug, Clone, Copy)]
pub enum SvmError {
    /// CPUID 0x8000_0001 ECX.SVM is clear.
    NoSvm,
    /// CPUID 0x8000_000A EDX.NP is clear.
    NoNestedPaging,
}

/// The SVM vendor: one VMCB, one guest.
pub struct Svm {
    regs: GuestRegs,
    vmcb_pa: u64,
}

/// Whether the CPU has SVM.
pub fn available() -> bool {
    let (max, ..) = cpuid(0x8000_0000, 0);
    max >= 0x8000_000a && cpuid(0x8000_0001, 0).2 & (1 << 2) != 0
}

/// Runs the guest slice after slice until an exit that is not the PIT countdown, or
/// until the countdowns of one run's budget are used up; `slice` makes one VMRUN under
/// a countdown and returns the exit code and whether the countdown fired.
pub(crate) fn run_budgeted(mut slice: impl FnMut() -> (u64, bool)) -> (u64, bool) {
    let mut slices = 0;
    loop {
        let (code, fired) = slice();
        // An interrupt that is not our countdown (none is unmasked, but a spurious IRQ7
        // can still arrive), or a countdown while budget remains: resume.
        if code != EXIT_INTR {
            return (code, fired);
        }
        if fired {
            slices += 1;
            if slices >= RUN_BUDGET_SLICES {
                return (code, fired);
            }
        }
    }
}

impl Svm {
    /// Enables SVM and prepares a VMCB with nested paging on.
    pub fn new() -> Result<Self, SvmError> {
        if !available() {
            return Err(SvmError::NoSvm);
        }
        if cpuid(0x8000_000a, 0).3 & 1 == 0 {
            return Err(SvmError::NoNestedPaging);
        }
        let hsave = core::ptr::addr_of!(HSAVE) as u64;
        // SAFETY: setting EFER.SVME only enables the SVM instructions; HSAVE is a static
        // page reserved for the processor's host save area.
        unsafe {
            wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
            wrmsr(MSR_VM_HSAVE_PA, hsave);
        }
        VMCB.init_controls(
            MISC1_INTR | MISC1_HLT | MISC1_IOIO | MISC1_SHUTDOWN,
            core::ptr::addr_of!(IOPM) as u64,
            core::ptr::addr_of!(MSRPM) as u64,
        );
        Ok(Svm { regs: GuestRegs::default(), vmcb_pa: VMCB.pa() })
    }
}

impl Vendor for Svm {
    fn name(&self) -> &'static str {
        "SVM"
    }

    fn format(&self) -> NestedFormat {
        NestedFormat::Npt
    }

    fn set_nested_root(&mut self, pointer: u64) {
        VMCB.put(C_NCR3, pointer);
        self.flush_nested_tlb();
    }

    fn reset_guest(&mut self, start: GuestStart) {
        self.regs = GuestRegs::default();
        // Flat 32-bit segments (code 0x08, data 0x10), no GDT, paging off.
        VMCB.reset_state((0x08, 0xc9b), (0x10, 0xc93), (0, 0), start.rip, start.rsp);
        VMCB.put(S_EFER, EFER_SVME);
        VMCB.put(S_CR0, 0x11u64); // PE | ET, paging off
        VMCB.put(S_CR3, 0u64);
        VMCB.put(S_CR4, 0u64);
        self.flush_nested_tlb();
    }

    fn run(&mut self) -> Exit {
        let (code, fired) = run_budgeted(|| {
            VMCB.put(S_RAX, self.regs.rax);
            let before = timer::ticks();
            timer::arm(SLICE_MS);
            // A flush another CPU requested (the two-CPU race's harvester) is honoured on
            // this VMRUN; see `smp::RemoteTlb`.
            if smp::VCPU.enter_guest() {
                VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
            }
            // SAFETY: the VMCB describes a consistent guest (set up by `new`/`reset_guest`),
            // its nested root is a table the caller built, and the world switch saves and
            // restores every host register the ABI requires.
            unsafe { svm_world_switch(self.vmcb_pa, &mut self.regs) };
            smp::VCPU.exit_guest();
            let fired = timer::disarm(before);
            VMCB.put(C_TLB_CONTROL, 0u32);
            self.regs.rax = VMCB.get(S_RAX);
            (VMCB.get(C_EXITCODE), fired)
        });
        let info1: u64 = VMCB.get(C_EXITINFO1);
        let info2: u64 = VMCB.get(C_EXITINFO2);
        match code {
            EXIT_NPF => Exit::NestedFault {
                gpa: info2,
                write: info1 & 2 != 0,
                fetch: info1 & 0x10 != 0,
                present: info1 & 1 != 0,
                info: info1,
            },
            EXIT_IOIO if info1 & 1 == 0 => {
                // EXITINFO2 is the RIP of the next instruction (APM 15.10.2).
                VMCB.put(S_RIP, info2);
                let io = IoInfo::decode(info1);
                Exit::IoOut { port: io.port, value: io.out_value(self.regs.rax) }
            }
            EXIT_VMMCALL => {
                VMCB.put(S_RIP, VMCB.get::<u64>(S_RIP) + VMMCALL_LEN);
                Exit::Hypercall
            }
            EXIT_HLT => {
                VMCB.put(S_RIP, VMCB.get::<u64>(S_RIP) + HLT_LEN);
                Exit::Halt
            }
            EXIT_INTR if fired => Exit::Timer,
            EXIT_SHUTDOWN => Exit::Shutdown,
            c if c & 0xffff_ffff == EXIT_INVALID => Exit::EntryFailed { code },
            _ => Exit::Other { code, info1, info2 },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn flush_nested_tlb(&mut self) {
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }
}
