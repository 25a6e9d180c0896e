//! The Linux guest's vCPU on AMD SVM (APM Vol. 2, chapter 15): its own VMCB, the guest
//! started in 64-bit long mode, intercepts for port I/O, CPUID, MSRs, HLT, shutdown and
//! the interrupt window, event injection through EVENTINJ, and a world switch that also
//! swaps the state VMRUN leaves alone (FS, GS, TR, LDTR, KernelGsBase, STAR/LSTAR/CSTAR/
//! SFMASK, SYSENTER_*) with VMLOAD/VMSAVE, as a Linux guest changes all of them. With
//! nested paging off ([`SvmCpu::enable_shadow`]) it also intercepts #PF, CR0/CR3/CR4 and
//! INVLPG and keeps the guest's control registers apart from the processor's.

use core::arch::global_asm;

use super::vcpu::{ControlRegs, Event, IoSize, LinuxExit, VCpu};
use crate::port::{cpuid, rdmsr, wrmsr};
use crate::vendor::{Exit, GuestRegs, GuestStart, NestedFormat, Vendor};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// VMCB control area (APM Vol. 2, appendix B, table B-1).
const C_INTERCEPT_CR: usize = 0x000;
const C_INTERCEPT_EXC: usize = 0x008;
const C_INTERCEPT_MISC1: usize = 0x00c;
const C_INTERCEPT_MISC2: usize = 0x010;
const C_IOPM_BASE: usize = 0x040;
const C_MSRPM_BASE: usize = 0x048;
const C_ASID: usize = 0x058;
const C_TLB_CONTROL: usize = 0x05c;
const C_VINTR: usize = 0x060;
const C_INT_SHADOW: usize = 0x068;
const C_EXITCODE: usize = 0x070;
const C_EXITINFO1: usize = 0x078;
const C_EXITINFO2: usize = 0x080;
const C_EXITINTINFO: usize = 0x088;
const C_NP_ENABLE: usize = 0x090;
const C_EVENTINJ: usize = 0x0a8;
const C_NCR3: usize = 0x0b0;
const C_CLEAN: usize = 0x0c0;

// VMCB state-save area (table B-2).
const S_ES: usize = 0x400;
const S_CS: usize = 0x410;
const S_SS: usize = 0x420;
const S_DS: usize = 0x430;
const S_FS: usize = 0x440;
const S_GS: usize = 0x450;
const S_GDTR: usize = 0x460;
const S_LDTR: usize = 0x470;
const S_IDTR: usize = 0x480;
const S_TR: usize = 0x490;
const S_CPL: usize = 0x4cb;
const S_EFER: usize = 0x4d0;
const S_CR4: usize = 0x548;
const S_CR3: usize = 0x550;
const S_CR0: usize = 0x558;
const S_DR7: usize = 0x560;
const S_DR6: usize = 0x568;
const S_RFLAGS: usize = 0x570;
const S_RIP: usize = 0x578;
const S_RSP: usize = 0x5d8;
const S_RAX: usize = 0x5f8;
const S_STAR: usize = 0x600;
const S_LSTAR: usize = 0x608;
const S_CSTAR: usize = 0x610;
const S_SFMASK: usize = 0x618;
const S_KERNEL_GS_BASE: usize = 0x620;
const S_SYSENTER_CS: usize = 0x628;
const S_SYSENTER_ESP: usize = 0x630;
const S_SYSENTER_EIP: usize = 0x638;
const S_CR2: usize = 0x640;
const S_GPAT: usize = 0x668;

// Intercept bits (table B-1, vectors 3 and 4).
const MISC1_INTR: u32 = 1 << 0;
const MISC1_VINTR: u32 = 1 << 4;
const MISC1_CPUID: u32 = 1 << 18;
const MISC1_HLT: u32 = 1 << 24;
const MISC1_INVLPG: u32 = 1 << 25;
const MISC1_IOIO: u32 = 1 << 27;
const MISC1_MSR: u32 = 1 << 28;
const MISC1_SHUTDOWN: u32 = 1 << 31;
const MISC2_VMRUN: u32 = 1 << 0;
const MISC2_VMMCALL: u32 = 1 << 1;

// V_INTR fields (offset 0x60).
const VINTR_V_IRQ: u64 = 1 << 8;
const VINTR_IGN_TPR: u64 = 1 << 20;
const VINTR_MASKING: u64 = 1 << 24;

// Exit codes (appendix C).
const EXIT_CR_READ: u64 = 0x00;
const EXIT_CR_WRITE: u64 = 0x10;
const EXIT_PF: u64 = 0x4e;
const EXIT_INTR: u64 = 0x60;
const EXIT_VINTR: u64 = 0x64;
const EXIT_CPUID: u64 = 0x72;
const EXIT_HLT: u64 = 0x78;
const EXIT_INVLPG: u64 = 0x79;
const EXIT_IOIO: u64 = 0x7b;
const EXIT_MSR: u64 = 0x7c;
const EXIT_SHUTDOWN: u64 = 0x7f;
const EXIT_NPF: u64 = 0x400;
const EXIT_INVALID: u64 = 0xffff_ffff;

/// EVENTINJ / EXITINTINFO: valid (APM 15.20).
const EVENT_VALID: u64 = 1 << 31;
/// Error code valid.
const EVENT_EV: u64 = 1 << 11;
/// Event type: external interrupt 0, exception 3.
const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;

const RFLAGS_IF: u64 = 1 << 9;
const EFER_NXE: u64 = 1 << 11;
const HLT_LEN: u64 = 1;

/// TLB_CONTROL value: flush everything on this VMRUN (APM 15.16.1).
const TLB_FLUSH_ALL: u32 = 1;

/// MSRs the guest reads and writes without an exit: VMLOAD/VMSAVE keep them in the VMCB
/// (Linux writes FS_BASE on context switches).
const PASSTHROUGH_MSRS: [u32; 3] = [0xc000_0100, 0xc000_0101, 0xc000_0102];

#[repr(C, align(4096))]
struct Page([u8; 4096]);

#[repr(C, align(4096))]
struct Iopm([u8; 3 * 4096]);

#[repr(C, align(4096))]
struct Msrpm([u8; 2 * 4096]);

static mut VMCB: Page = Page([0; 4096]);
static mut HSAVE: Page = Page([0; 4096]);
static mut HOST_STATE: Page = Page([0; 4096]);
static mut IOPM: Iopm = Iopm([0xff; 3 * 4096]);
static mut MSRPM: Msrpm = Msrpm([0xff; 2 * 4096]);

global_asm!(
    r#"
    .text
    .global linux_svm_world_switch
    // rdi = VMCB physical address, rsi = &mut GuestRegs, rdx = host VMSAVE area
linux_svm_world_switch:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    push %rsi
    push %rdx
    mov %rdx, %rax
    vmsave %rax
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
    vmload %rax
    vmrun %rax
    vmsave %rax
    xchg 8(%rsp), %rsi
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
    mov 8(%rsp), %rax
    mov %rax, {rsi}(%rsi)
    pop %rax
    vmload %rax
    cli
    stgi
    pop %rax
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
    fn linux_svm_world_switch(vmcb_pa: u64, regs: *mut GuestRegs, host_state_pa: u64);
}

fn vmcb() -> *mut u8 {
    core::ptr::addr_of_mut!(VMCB) as *mut u8
}

fn put<T: Copy>(off: usize, v: T) {
    // SAFETY: VMCB is a static page owned by the single `SvmCpu`; offsets lie within it and
    // the hardware reads it only during VMRUN/VMLOAD/VMSAVE, none of which runs now.
    unsafe { (vmcb().add(off) as *mut T).write_unaligned(v) }
}

fn get<T: Copy>(off: usize) -> T {
    // SAFETY: as in `put`.
    unsafe { (vmcb().add(off) as *const T).read_unaligned() }
}

fn put_seg(off: usize, sel: u16, attrib: u16, limit: u32, base: u64) {
    put(off, sel);
    put(off + 2, attrib);
    put(off + 4, limit);
    put(off + 8, base);
}

/// The saved register of x86 number `n`; `None` for RSP (number 4), which lives in the VMCB.
fn gpr_slot(r: &mut GuestRegs, n: u8) -> Option<&mut u64> {
    Some(match n & 15 {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => return None,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        n => &mut r.r[(n - 8) as usize],
    })
}

/// Why the Linux vCPU could not be made.
#[derive(Clone, Copy, Debug)]
pub enum SvmCpuError {
    /// No SVM or no nested paging.
    NoNestedPaging,
}

/// Where the guest starts: the Linux 64-bit boot protocol's state.
#[derive(Clone, Copy, Debug)]
pub struct LongModeStart {
    /// RIP (the kernel's 64-bit entry).
    pub rip: u64,
    /// RSI (boot_params).
    pub rsi: u64,
    /// CR3 (identity page tables built by the VMM).
    pub cr3: u64,
    /// GDT base and limit (the boot protocol's __BOOT_CS 0x10 and __BOOT_DS 0x18).
    pub gdt: (u64, u16),
}

/// The Linux guest's vCPU on SVM.
pub struct SvmCpu {
    regs: GuestRegs,
    vmcb_pa: u64,
    host_state_pa: u64,
    /// Shadow paging (nested paging off): the control registers as the guest sees them;
    /// the VMCB holds what the processor runs with ([`VCpu::set_paging`]).
    shadow: Option<ControlRegs>,
}

impl SvmCpu {
    /// Enables SVM and prepares the VMCB: nested paging on, the Linux VMM's intercepts.
    pub fn new() -> Result<Self, SvmCpuError> {
        if !crate::svm::available() || cpuid(0x8000_000a, 0).3 & 1 == 0 {
            return Err(SvmCpuError::NoNestedPaging);
        }
        // SAFETY: setting EFER.SVME only enables the SVM instructions; HSAVE is a static
        // page reserved for the processor's host save area.
        unsafe {
            wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
            wrmsr(MSR_VM_HSAVE_PA, core::ptr::addr_of!(HSAVE) as u64);
        }
        // SAFETY: MSRPM is a static owned by this vCPU; no VMRUN is in progress.
        let msrpm = unsafe { &mut *core::ptr::addr_of_mut!(MSRPM) };
        for msr in PASSTHROUGH_MSRS {
            // Range C000_0000-C000_1FFF starts at byte 0x800; two bits (read, write) per MSR.
            let bit = 2 * (msr - 0xc000_0000) as usize;
            msrpm.0[0x800 + bit / 8] &= !(3 << (bit % 8));
        }
        put(
            C_INTERCEPT_MISC1,
            MISC1_INTR | MISC1_CPUID | MISC1_HLT | MISC1_IOIO | MISC1_MSR | MISC1_SHUTDOWN,
        );
        put(C_INTERCEPT_MISC2, MISC2_VMRUN | MISC2_VMMCALL);
        put(C_IOPM_BASE, core::ptr::addr_of!(IOPM) as u64);
        put(C_MSRPM_BASE, core::ptr::addr_of!(MSRPM) as u64);
        put(C_ASID, 1u32);
        put(C_VINTR, VINTR_MASKING);
        put(C_NP_ENABLE, 1u64);
        put(C_CLEAN, 0u32);
        Ok(SvmCpu {
            regs: GuestRegs::default(),
            vmcb_pa: vmcb() as u64,
            host_state_pa: core::ptr::addr_of!(HOST_STATE) as u64,
            shadow: None,
        })
    }

    /// Turns nested paging off for shadow paging (APM 15.12-15.16): reads and writes of
    /// CR0, CR3 and CR4, #PF (EXITINFO1 = error code, EXITINFO2 = the address) and INVLPG
    /// exit; the guest's control registers live in the vCPU from now on.
    pub fn enable_shadow(&mut self) {
        put(C_NP_ENABLE, 0u64);
        put(C_INTERCEPT_CR, (1u32 << 0) | (1 << 3) | (1 << 4) | (1 << 16) | (1 << 19) | (1 << 20));
        put(C_INTERCEPT_EXC, 1u32 << 14);
        put(C_INTERCEPT_MISC1, get::<u32>(C_INTERCEPT_MISC1) | MISC1_INVLPG);
        self.shadow = Some(ControlRegs::default());
    }

    /// Puts the guest at the 64-bit entry of the Linux boot protocol: long mode, paging on
    /// with the given tables, flat segments __BOOT_CS/__BOOT_DS, interrupts off.
    pub fn start_long_mode(&mut self, s: LongModeStart) {
        self.regs = GuestRegs::default();
        self.regs.rsi = s.rsi;
        // Attributes pack descriptor bits 40-47 and 52-55: code P|S|type 0xb, L, G.
        put_seg(S_CS, 0x10, 0xa9b, 0xffff_ffff, 0);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            put_seg(off, 0x18, 0xc93, 0xffff_ffff, 0);
        }
        put_seg(S_GDTR, 0, 0, s.gdt.1 as u32, s.gdt.0);
        put_seg(S_IDTR, 0, 0, 0, 0);
        put_seg(S_LDTR, 0, 0x82, 0, 0);
        put_seg(S_TR, 0, 0x8b, 0x67, 0);
        put(S_CPL, 0u8);
        put(S_EFER, EFER_SVME | EFER_LME | EFER_LMA);
        put(S_CR0, 0x8000_0031u64); // PG | NE | ET | PE
        put(S_CR3, s.cr3);
        put(S_CR4, 0x20u64); // PAE
        put(S_DR6, 0xffff_0ff0u64);
        put(S_DR7, 0x400u64);
        put(S_RFLAGS, 0x2u64);
        put(S_RIP, s.rip);
        put(S_RSP, 0u64);
        put(S_RAX, 0u64);
        put(S_GPAT, 0x0007_0406_0007_0406u64);
        for off in [
            S_STAR,
            S_LSTAR,
            S_CSTAR,
            S_SFMASK,
            S_KERNEL_GS_BASE,
            S_SYSENTER_CS,
            S_SYSENTER_ESP,
            S_SYSENTER_EIP,
        ] {
            put(off, 0u64);
        }
        put(C_EVENTINJ, 0u64);
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
        if self.shadow.is_some() {
            // Until the shadow MMU sets the processor's paging state (`set_paging`)
            // before the first entry, this is the guest's view.
            self.shadow =
                Some(ControlRegs { cr0: 0x8000_0031, cr3: s.cr3, cr4: 0x20, efer: EFER_LME | EFER_LMA });
        }
    }

    /// The guest's RIP (for reports).
    pub fn rip_now(&self) -> u64 {
        get(S_RIP)
    }

    /// Points the vCPU at nested tables (nCR3).
    pub fn set_ncr3(&mut self, ncr3: u64) {
        put(C_NCR3, ncr3);
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn exit(&mut self) -> LinuxExit {
        let code: u64 = get(C_EXITCODE);
        let info1: u64 = get(C_EXITINFO1);
        let info2: u64 = get(C_EXITINFO2);
        // An event whose delivery the exit interrupted is delivered again on the next entry
        // (APM 15.7.2), unless the VMM replaces it.
        let pending: u64 = get(C_EXITINTINFO);
        if pending & EVENT_VALID != 0 {
            put(C_EVENTINJ, pending);
        }
        match code {
            EXIT_PF => LinuxExit::PageFault { addr: info2, code: info1 as u32 },
            c if (EXIT_CR_READ..EXIT_CR_READ + 16).contains(&c) => {
                LinuxExit::CrRead((c - EXIT_CR_READ) as u8)
            }
            c if (EXIT_CR_WRITE..EXIT_CR_WRITE + 16).contains(&c) => {
                LinuxExit::CrWrite((c - EXIT_CR_WRITE) as u8)
            }
            EXIT_INVLPG => LinuxExit::Invlpg,
            EXIT_NPF => LinuxExit::NestedFault { gpa: info2, info: info1, write: info1 & 2 != 0 },
            EXIT_IOIO => {
                let port = (info1 >> 16) as u16;
                if info1 & 0b1100 != 0 {
                    return LinuxExit::IoString { port };
                }
                let size = match (info1 >> 4) & 7 {
                    1 => IoSize::B1,
                    2 => IoSize::B2,
                    _ => IoSize::B4,
                };
                // EXITINFO2 is the RIP of the next instruction (APM 15.10.2).
                put(S_RIP, info2);
                if info1 & 1 != 0 {
                    LinuxExit::IoIn { port, size }
                } else {
                    LinuxExit::IoOut { port, size, value: self.regs.rax as u32 & size.mask() }
                }
            }
            EXIT_CPUID => LinuxExit::Cpuid,
            EXIT_MSR if info1 == 0 => LinuxExit::Rdmsr,
            EXIT_MSR => LinuxExit::Wrmsr,
            EXIT_HLT => {
                put(S_RIP, get::<u64>(S_RIP) + HLT_LEN);
                // The shadow of an STI before the HLT ends with the HLT.
                put(C_INT_SHADOW, 0u64);
                LinuxExit::Halt
            }
            EXIT_VINTR => LinuxExit::InterruptWindow,
            EXIT_INTR => LinuxExit::HostInterrupt,
            EXIT_SHUTDOWN => LinuxExit::Shutdown,
            c if c & 0xffff_ffff == EXIT_INVALID => LinuxExit::EntryFailed { code },
            _ => LinuxExit::Other { code, info1, info2 },
        }
    }
}

impl VCpu for SvmCpu {
    fn run(&mut self) -> LinuxExit {
        put(S_RAX, self.regs.rax);
        // SAFETY: the VMCB describes a consistent long-mode guest (`start_long_mode`), its
        // nested root is a table the nested MMU built, and the world switch saves and
        // restores every host register the ABI requires plus the VMSAVE state.
        unsafe { linux_svm_world_switch(self.vmcb_pa, &mut self.regs, self.host_state_pa) };
        put(C_TLB_CONTROL, 0u32);
        self.regs.rax = get(S_RAX);
        // An injected event was taken (or is back in EXITINTINFO, see `exit`).
        put(C_EVENTINJ, 0u64);
        self.exit()
    }

    fn gprs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&self) -> u64 {
        get(S_RIP)
    }

    fn skip(&mut self, len: u64) {
        put(S_RIP, get::<u64>(S_RIP).wrapping_add(len));
    }

    fn complete_in(&mut self, size: IoSize, value: u32) {
        let rax = self.regs.rax;
        self.regs.rax = match size {
            IoSize::B1 => (rax & !0xff) | (value as u64 & 0xff),
            IoSize::B2 => (rax & !0xffff) | (value as u64 & 0xffff),
            // A 32-bit result zero-extends into RAX.
            IoSize::B4 => value as u64,
        };
    }

    fn interruptible(&self) -> bool {
        get::<u64>(S_RFLAGS) & RFLAGS_IF != 0 && get::<u64>(C_INT_SHADOW) & 1 == 0 && !self.event_pending()
    }

    fn interrupts_enabled(&self) -> bool {
        get::<u64>(S_RFLAGS) & RFLAGS_IF != 0
    }

    fn inject(&mut self, event: Event) {
        let v = match event {
            Event::Interrupt(vector) => EVENT_VALID | vector as u64,
            Event::Exception { vector, error: None } => EVENT_VALID | EVENT_TYPE_EXCEPTION | vector as u64,
            Event::Exception { vector, error: Some(e) } => {
                EVENT_VALID | EVENT_TYPE_EXCEPTION | EVENT_EV | vector as u64 | ((e as u64) << 32)
            }
            Event::PageFault { error, cr2 } => {
                // An intercepted #PF left CR2 alone (APM 15.12): the guest's CR2 is set here.
                put(S_CR2, cr2);
                EVENT_VALID | EVENT_TYPE_EXCEPTION | EVENT_EV | 14 | ((error as u64) << 32)
            }
        };
        put(C_EVENTINJ, v);
    }

    fn event_pending(&self) -> bool {
        get::<u64>(C_EVENTINJ) & EVENT_VALID != 0
    }

    fn request_interrupt_window(&mut self, on: bool) {
        let misc1: u32 = get(C_INTERCEPT_MISC1);
        let vintr: u64 = get(C_VINTR);
        if on {
            // A virtual interrupt pending with the VINTR intercept: the CPU exits when the
            // guest could take it (APM 15.21.4), then the VMM injects the real one.
            put(C_INTERCEPT_MISC1, misc1 | MISC1_VINTR);
            put(C_VINTR, vintr | VINTR_V_IRQ | VINTR_IGN_TPR);
        } else {
            put(C_INTERCEPT_MISC1, misc1 & !MISC1_VINTR);
            put(C_VINTR, vintr & !(VINTR_V_IRQ | VINTR_IGN_TPR));
        }
    }

    fn control(&self) -> ControlRegs {
        if let Some(c) = self.shadow {
            return c;
        }
        ControlRegs {
            cr0: get(S_CR0),
            cr3: get(S_CR3),
            cr4: get(S_CR4),
            efer: get::<u64>(S_EFER) & !EFER_SVME,
        }
    }

    fn reg(&mut self, n: u8) -> u64 {
        match gpr_slot(&mut self.regs, n) {
            Some(r) => *r,
            None => get(S_RSP),
        }
    }

    fn set_reg(&mut self, n: u8, v: u64) {
        match gpr_slot(&mut self.regs, n) {
            Some(r) => *r = v,
            None => put(S_RSP, v),
        }
    }

    fn state_msr(&self, msr: u32) -> Option<u64> {
        Some(match msr {
            0x174 => get(S_SYSENTER_CS),
            0x175 => get(S_SYSENTER_ESP),
            0x176 => get(S_SYSENTER_EIP),
            0x277 => get(S_GPAT),
            MSR_EFER => match self.shadow {
                Some(c) => c.efer,
                None => get::<u64>(S_EFER) & !EFER_SVME,
            },
            0xc000_0081 => get(S_STAR),
            0xc000_0082 => get(S_LSTAR),
            0xc000_0083 => get(S_CSTAR),
            0xc000_0084 => get(S_SFMASK),
            0xc000_0100 => get(S_FS + 8),
            0xc000_0101 => get(S_GS + 8),
            0xc000_0102 => get(S_KERNEL_GS_BASE),
            _ => return None,
        })
    }

    fn set_state_msr(&mut self, msr: u32, value: u64) -> bool {
        let off = match msr {
            0x174 => S_SYSENTER_CS,
            0x175 => S_SYSENTER_ESP,
            0x176 => S_SYSENTER_EIP,
            0x277 => S_GPAT,
            MSR_EFER if self.shadow.is_some() => {
                // The guest's EFER; the shadow MMU sees the change before the next entry
                // and gives the processor its own (NXE forced).
                if let Some(c) = self.shadow.as_mut() {
                    c.efer = (value & !(EFER_LMA | EFER_SVME)) | (c.efer & EFER_LMA);
                }
                return true;
            }
            MSR_EFER => {
                // SVME stays on under SVM (VMRUN requires it); LMA is the CPU's, not the
                // writer's (it follows LME and CR0.PG).
                let lma = get::<u64>(S_EFER) & EFER_LMA;
                put(S_EFER, (value & !EFER_LMA) | lma | EFER_SVME);
                return true;
            }
            0xc000_0081 => S_STAR,
            0xc000_0082 => S_LSTAR,
            0xc000_0083 => S_CSTAR,
            0xc000_0084 => S_SFMASK,
            0xc000_0100 => S_FS + 8,
            0xc000_0101 => S_GS + 8,
            0xc000_0102 => S_KERNEL_GS_BASE,
            _ => return false,
        };
        put(off, value);
        true
    }

    fn flush_nested(&mut self) {
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn set_guest_control(&mut self, c: ControlRegs) {
        if let Some(s) = self.shadow.as_mut() {
            *s = c;
        }
    }

    fn set_paging(&mut self, hw: &ControlRegs) {
        put(S_CR0, hw.cr0);
        put(S_CR3, hw.cr3);
        put(S_CR4, hw.cr4);
        put(S_EFER, hw.efer | EFER_SVME | EFER_NXE);
    }

    fn code64(&self) -> bool {
        // CS.L (attribute bit 9) in long mode.
        get::<u16>(S_CS + 2) & (1 << 9) != 0 && get::<u64>(S_EFER) & EFER_LMA != 0
    }

    fn rflags(&self) -> u64 {
        get(S_RFLAGS)
    }
}

/// The scenario interface, so the nested MMU can flush and reload the root through it.
impl Vendor for SvmCpu {
    fn name(&self) -> &'static str {
        "SVM"
    }

    fn format(&self) -> NestedFormat {
        NestedFormat::Npt
    }

    fn set_nested_root(&mut self, pointer: u64) {
        self.set_ncr3(pointer);
    }

    fn reset_guest(&mut self, start: GuestStart) {
        put(S_RIP, start.rip);
        put(S_RSP, start.rsp);
    }

    fn run(&mut self) -> Exit {
        match VCpu::run(self) {
            LinuxExit::NestedFault { gpa, info, write } => {
                Exit::NestedFault { gpa, write, fetch: info & 0x10 != 0, present: info & 1 != 0, info }
            }
            LinuxExit::IoOut { port, value, .. } => Exit::IoOut { port, value },
            LinuxExit::Halt => Exit::Halt,
            LinuxExit::HostInterrupt => Exit::Timer,
            LinuxExit::Shutdown => Exit::Shutdown,
            LinuxExit::EntryFailed { code } => Exit::EntryFailed { code },
            _ => Exit::Other { code: get(C_EXITCODE), info1: get(C_EXITINFO1), info2: get(C_EXITINFO2) },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn flush_nested_tlb(&mut self) {
        self.flush_nested();
    }
}
