//! AMD SVM with nested paging (AMD APM Vol. 2, chapter 15): EFER.SVME, VM_HSAVE_PA, a
//! VMCB whose guest starts in 32-bit protected mode with paging off, and the world
//! switch. The run budget is the PIT countdown of [`crate::timer`] with the INTR intercept.

use core::arch::global_asm;

use crate::port::{cpuid, rdmsr, wrmsr};
use crate::smp;
use crate::timer;
use crate::vendor::{Exit, GuestRegs, GuestStart, NestedFormat, Vendor};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
pub(crate) const EFER_SVME: u64 = 1 << 12;

// VMCB control area offsets (APM Vol. 2, appendix B, table B-1).
pub(crate) const C_INTERCEPT_MISC1: usize = 0x00c;
pub(crate) const C_INTERCEPT_MISC2: usize = 0x010;
const C_IOPM_BASE: usize = 0x040;
const C_MSRPM_BASE: usize = 0x048;
const C_ASID: usize = 0x058;
pub(crate) const C_TLB_CONTROL: usize = 0x05c;
const C_VINTR: usize = 0x060;
pub(crate) const C_EXITCODE: usize = 0x070;
pub(crate) const C_EXITINFO1: usize = 0x078;
pub(crate) const C_EXITINFO2: usize = 0x080;
pub(crate) const C_NP_ENABLE: usize = 0x090;
const C_NCR3: usize = 0x0b0;
pub(crate) const C_CLEAN: usize = 0x0c0;

// VMCB state-save area offsets (table B-2).
pub(crate) const S_ES: usize = 0x400;
pub(crate) const S_CS: usize = 0x410;
pub(crate) const S_SS: usize = 0x420;
pub(crate) const S_DS: usize = 0x430;
pub(crate) const S_FS: usize = 0x440;
pub(crate) const S_GS: usize = 0x450;
pub(crate) const S_GDTR: usize = 0x460;
pub(crate) const S_LDTR: usize = 0x470;
pub(crate) const S_IDTR: usize = 0x480;
pub(crate) const S_TR: usize = 0x490;
pub(crate) const S_CPL: usize = 0x4cb;
pub(crate) const S_EFER: usize = 0x4d0;
pub(crate) const S_CR4: usize = 0x548;
pub(crate) const S_CR3: usize = 0x550;
pub(crate) const S_CR0: usize = 0x558;
pub(crate) const S_DR7: usize = 0x560;
pub(crate) const S_DR6: usize = 0x568;
pub(crate) const S_RFLAGS: usize = 0x570;
pub(crate) const S_RIP: usize = 0x578;
pub(crate) const S_RSP: usize = 0x5d8;
pub(crate) const S_RAX: usize = 0x5f8;
pub(crate) const S_GPAT: usize = 0x668;

// Intercept bits.
pub(crate) const MISC1_INTR: u32 = 1 << 0;
pub(crate) const MISC1_HLT: u32 = 1 << 24;
pub(crate) const MISC1_IOIO: u32 = 1 << 27;
pub(crate) const MISC1_SHUTDOWN: u32 = 1 << 31;
const MISC2_VMRUN: u32 = 1 << 0;
const MISC2_VMMCALL: u32 = 1 << 1;

// Exit codes (table C-1).
pub(crate) const EXIT_INTR: u64 = 0x60;
const EXIT_HLT: u64 = 0x78;
pub(crate) const EXIT_IOIO: u64 = 0x7b;
pub(crate) const EXIT_SHUTDOWN: u64 = 0x7f;
const EXIT_VMMCALL: u64 = 0x81;
const EXIT_NPF: u64 = 0x400;
pub(crate) const EXIT_INVALID: u64 = 0xffff_ffff;

/// TLB_CONTROL value: flush the whole TLB on this VMRUN (APM 15.16.1).
pub(crate) const TLB_FLUSH_ALL: u32 = 1;

/// Instruction length of VMMCALL (TCG has no NRIP save, so the host knows it).
const VMMCALL_LEN: u64 = 3;
/// Instruction length of HLT.
const HLT_LEN: u64 = 1;
/// One PIT countdown, in milliseconds (the PIT counts at most about 55 ms).
pub(crate) const SLICE_MS: u32 = 50;
/// Countdowns one guest run may use up before it is stopped: about half a second of host
/// time (TCG runs in wall-clock time, and the machine may be loaded).
pub(crate) const RUN_BUDGET_SLICES: u32 = 10;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

#[repr(C, align(4096))]
struct Iopm([u8; 3 * 4096]);

#[repr(C, align(4096))]
pub(crate) struct Msrpm(pub(crate) [u8; 2 * 4096]);

static mut VMCB: Page = Page([0; 4096]);
static mut HSAVE: Page = Page([0; 4096]);
static mut IOPM: Iopm = Iopm([0xff; 3 * 4096]);
pub(crate) static mut MSRPM: Msrpm = Msrpm([0; 2 * 4096]);

global_asm!(
    r#"
    .text
    .global svm_world_switch
    // rdi = VMCB physical address, rsi = &mut GuestRegs
svm_world_switch:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    push %rsi
    mov %rdi, %rax
    mov {rbx}(%rsi), %rbx
    mov {rcx}(%rsi), %rcx
    mov {rdx}(%rsi), %rdx
    mov {rdi}(%rsi), %rdi
    mov {rbp}(%rsi), %rbp
    mov {r8}+0(%rsi), %r8
    mov {r8}+8(%rsi), %r9
    mov {r8}+16(%rsi), %r10
    mov {r8}+24(%rsi), %r11
    mov {r8}+32(%rsi), %r12
    mov {r8}+40(%rsi), %r13
    mov {r8}+48(%rsi), %r14
    mov {r8}+56(%rsi), %r15
    mov {rsi}(%rsi), %rsi
    clgi
    sti
    vmrun %rax
    cli
    stgi
    xchg (%rsp), %rsi
    mov %rbx, {rbx}(%rsi)
    mov %rcx, {rcx}(%rsi)
    mov %rdx, {rdx}(%rsi)
    mov %rdi, {rdi}(%rsi)
    mov %rbp, {rbp}(%rsi)
    mov %r8, {r8}+0(%rsi)
    mov %r9, {r8}+8(%rsi)
    mov %r10, {r8}+16(%rsi)
    mov %r11, {r8}+24(%rsi)
    mov %r12, {r8}+32(%rsi)
    mov %r13, {r8}+40(%rsi)
    mov %r14, {r8}+48(%rsi)
    mov %r15, {r8}+56(%rsi)
    pop %rax
    mov %rax, {rsi}(%rsi)
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
"#,
    rbx = const crate::vendor::regs_offset::RBX,
    rcx = const crate::vendor::regs_offset::RCX,
    rdx = const crate::vendor::regs_offset::RDX,
    rsi = const crate::vendor::regs_offset::RSI,
    rdi = const crate::vendor::regs_offset::RDI,
    rbp = const crate::vendor::regs_offset::RBP,
    r8 = const crate::vendor::regs_offset::R8,
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

pub(crate) fn vmcb() -> *mut u8 {
    core::ptr::addr_of_mut!(VMCB) as *mut u8
}

pub(crate) fn put<T: Copy>(off: usize, v: T) {
    // SAFETY: VMCB is a static page owned by the single `Svm`; offsets are within it and
    // the hardware touches it only during VMRUN, which is not running now.
    unsafe { (vmcb().add(off) as *mut T).write_unaligned(v) }
}

pub(crate) fn get<T: Copy>(off: usize) -> T {
    // SAFETY: as in `put`.
    unsafe { (vmcb().add(off) as *const T).read_unaligned() }
}

pub(crate) fn put_seg(off: usize, sel: u16, attrib: u16, limit: u32, base: u64) {
    put(off, sel);
    put(off + 2, attrib);
    put(off + 4, limit);
    put(off + 8, base);
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
        put(C_INTERCEPT_MISC1, MISC1_INTR | MISC1_HLT | MISC1_IOIO | MISC1_SHUTDOWN);
        put(C_INTERCEPT_MISC2, MISC2_VMRUN | MISC2_VMMCALL);
        put(C_IOPM_BASE, core::ptr::addr_of!(IOPM) as u64);
        put(C_MSRPM_BASE, core::ptr::addr_of!(MSRPM) as u64);
        put(C_ASID, 1u32);
        // V_INTR_MASKING: physical interrupts follow the host's IF, the guest's IF is virtual.
        put(C_VINTR, 1u64 << 24);
        put(C_NP_ENABLE, 1u64);
        put(C_CLEAN, 0u32);
        Ok(Svm { regs: GuestRegs::default(), vmcb_pa: vmcb() as u64 })
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
        put(C_NCR3, pointer);
        self.flush_nested_tlb();
    }

    fn reset_guest(&mut self, start: GuestStart) {
        self.regs = GuestRegs::default();
        // Flat 32-bit segments; attributes are descriptor bits 40-47 and 52-55 packed.
        put_seg(S_CS, 0x08, 0xc9b, 0xffff_ffff, 0);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            put_seg(off, 0x10, 0xc93, 0xffff_ffff, 0);
        }
        put_seg(S_GDTR, 0, 0, 0, 0);
        put_seg(S_IDTR, 0, 0, 0, 0);
        put_seg(S_LDTR, 0, 0x82, 0, 0);
        put_seg(S_TR, 0, 0x8b, 0x67, 0);
        put(S_CPL, 0u8);
        put(S_EFER, EFER_SVME);
        put(S_CR0, 0x11u64); // PE | ET, paging off
        put(S_CR3, 0u64);
        put(S_CR4, 0u64);
        put(S_DR6, 0xffff_0ff0u64);
        put(S_DR7, 0x400u64);
        put(S_RFLAGS, 0x2u64);
        put(S_RIP, start.rip);
        put(S_RSP, start.rsp);
        put(S_RAX, 0u64);
        put(S_GPAT, 0x0007_0406_0007_0406u64);
        self.flush_nested_tlb();
    }

    fn run(&mut self) -> Exit {
        let mut slices = 0;
        let (code, fired) = loop {
            put(S_RAX, self.regs.rax);
            let before = timer::ticks();
            timer::arm(SLICE_MS);
            // A flush another CPU requested (the two-CPU race's harvester) is honoured on
            // this VMRUN; see `smp::RemoteTlb`.
            if smp::VCPU.enter_guest() {
                put(C_TLB_CONTROL, TLB_FLUSH_ALL);
            }
            // SAFETY: the VMCB describes a consistent guest (set up by `new`/`reset_guest`),
            // its nested root is a table the caller built, and the world switch saves and
            // restores every host register the ABI requires.
            unsafe { svm_world_switch(self.vmcb_pa, &mut self.regs) };
            smp::VCPU.exit_guest();
            let fired = timer::disarm(before);
            put(C_TLB_CONTROL, 0u32);
            self.regs.rax = get(S_RAX);
            let code: u64 = get(C_EXITCODE);
            // An interrupt that is not our countdown (none is unmasked, but a spurious
            // IRQ7 can still arrive), or a countdown while budget remains: resume.
            if code != EXIT_INTR {
                break (code, fired);
            }
            if fired {
                slices += 1;
                if slices >= RUN_BUDGET_SLICES {
                    break (code, fired);
                }
            }
        };
        let info1: u64 = get(C_EXITINFO1);
        let info2: u64 = get(C_EXITINFO2);
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
                put(S_RIP, info2);
                let size = (info1 >> 4) & 7;
                let mask = match size {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => 0xffff_ffff,
                };
                Exit::IoOut { port: (info1 >> 16) as u16, value: (self.regs.rax & mask) as u32 }
            }
            EXIT_VMMCALL => {
                put(S_RIP, get::<u64>(S_RIP) + VMMCALL_LEN);
                Exit::Hypercall
            }
            EXIT_HLT => {
                put(S_RIP, get::<u64>(S_RIP) + HLT_LEN);
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
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }
}
