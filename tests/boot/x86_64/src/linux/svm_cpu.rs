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
use crate::vmcb::*;

const RFLAGS_IF: u64 = 1 << 9;
const HLT_LEN: u64 = 1;

/// MSRs the guest reads and writes without an exit: VMLOAD/VMSAVE keep them in the VMCB
/// (Linux writes FS_BASE on context switches).
const PASSTHROUGH_MSRS: [u32; 3] = [0xc000_0100, 0xc000_0101, 0xc000_0102];

/// The Linux vCPU's VMCB (its own, apart from [`crate::svm::VMCB`]).
static VMCB: Vmcb = Vmcb::new();
static mut HSAVE: Page = Page([0; 4096]);
static mut HOST_STATE: Page = Page([0; 4096]);
static mut IOPM: Iopm = Iopm([0xff; 3 * 4096]);
static mut MSRPM: Msrpm = Msrpm([0xff; 2 * 4096]);

global_asm!(
    concat!(
        r#"
    .text
    .global linux_svm_world_switch
    // rdi = VMCB physical address, rsi = &mut GuestRegs, rdx = host VMSAVE area
linux_svm_world_switch:
"#,
        push_callee_saved!(),
        r#"
    push %rsi
    push %rdx
    mov %rdx, %rax
    vmsave %rax
    mov %rdi, %rax
"#,
        load_guest_gprs!("rsi"),
        r#"
    mov 40(%rsi), %rdi
    mov 32(%rsi), %rsi
    clgi
    sti
    vmload %rax
    vmrun %rax
    vmsave %rax
    xchg 8(%rsp), %rsi
"#,
        store_guest_gprs!("rsi"),
        r#"
    mov %rdi, 40(%rsi)
    mov 8(%rsp), %rax
    mov %rax, 32(%rsi)
    pop %rax
    vmload %rax
    cli
    stgi
    pop %rax
"#,
        pop_callee_saved!(),
        r#"
    ret
"#,
    ),
    options(att_syntax)
);

extern "C" {
    fn linux_svm_world_switch(vmcb_pa: u64, regs: *mut GuestRegs, host_state_pa: u64);
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
        VMCB.init_controls(
            MISC1_INTR | MISC1_CPUID | MISC1_HLT | MISC1_IOIO | MISC1_MSR | MISC1_SHUTDOWN,
            core::ptr::addr_of!(IOPM) as u64,
            core::ptr::addr_of!(MSRPM) as u64,
        );
        Ok(SvmCpu {
            regs: GuestRegs::default(),
            vmcb_pa: VMCB.pa(),
            host_state_pa: core::ptr::addr_of!(HOST_STATE) as u64,
            shadow: None,
        })
    }

    /// Turns nested paging off for shadow paging (APM 15.12-15.16): reads and writes of
    /// CR0, CR3 and CR4, #PF (EXITINFO1 = error code, EXITINFO2 = the address) and INVLPG
    /// exit; the guest's control registers live in the vCPU from now on.
    pub fn enable_shadow(&mut self) {
        VMCB.put(C_NP_ENABLE, 0u64);
        VMCB.put(C_INTERCEPT_CR, INTERCEPT_CR0_CR3_CR4);
        VMCB.put(C_INTERCEPT_EXC, INTERCEPT_EXC_PF);
        VMCB.put(C_INTERCEPT_MISC1, VMCB.get::<u32>(C_INTERCEPT_MISC1) | MISC1_INVLPG);
        self.shadow = Some(ControlRegs::default());
    }

    /// Puts the guest at the 64-bit entry of the Linux boot protocol: long mode, paging on
    /// with the given tables, flat segments __BOOT_CS/__BOOT_DS, interrupts off.
    pub fn start_long_mode(&mut self, s: LongModeStart) {
        self.regs = GuestRegs::default();
        self.regs.rsi = s.rsi;
        // Attributes pack descriptor bits 40-47 and 52-55: code P|S|type 0xb, L, G.
        VMCB.reset_state((0x10, 0xa9b), (0x18, 0xc93), (s.gdt.0, s.gdt.1 as u32), s.rip, 0);
        VMCB.put(S_EFER, EFER_SVME | EFER_LME | EFER_LMA);
        VMCB.put(S_CR0, 0x8000_0031u64); // PG | NE | ET | PE
        VMCB.put(S_CR3, s.cr3);
        VMCB.put(S_CR4, 0x20u64); // PAE
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
            VMCB.put(off, 0u64);
        }
        VMCB.put(C_EVENTINJ, 0u64);
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
        if self.shadow.is_some() {
            // Until the shadow MMU sets the processor's paging state (`set_paging`)
            // before the first entry, this is the guest's view.
            self.shadow =
                Some(ControlRegs { cr0: 0x8000_0031, cr3: s.cr3, cr4: 0x20, efer: EFER_LME | EFER_LMA });
        }
    }

    /// The guest's RIP (for reports).
    pub fn rip_now(&self) -> u64 {
        VMCB.get(S_RIP)
    }

    /// Points the vCPU at nested tables (nCR3).
    pub fn set_ncr3(&mut self, ncr3: u64) {
        VMCB.put(C_NCR3, ncr3);
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn exit(&mut self) -> LinuxExit {
        let code: u64 = VMCB.get(C_EXITCODE);
        let info1: u64 = VMCB.get(C_EXITINFO1);
        let info2: u64 = VMCB.get(C_EXITINFO2);
        // An event whose delivery the exit interrupted is delivered again on the next entry
        // (APM 15.7.2), unless the VMM replaces it.
        let pending: u64 = VMCB.get(C_EXITINTINFO);
        if pending & EVENT_VALID != 0 {
            VMCB.put(C_EVENTINJ, pending);
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
                let io = IoInfo::decode(info1);
                let port = io.port;
                if io.string {
                    return LinuxExit::IoString { port };
                }
                let size = match io.bytes {
                    1 => IoSize::B1,
                    2 => IoSize::B2,
                    _ => IoSize::B4,
                };
                // EXITINFO2 is the RIP of the next instruction (APM 15.10.2).
                VMCB.put(S_RIP, info2);
                if io.input {
                    LinuxExit::IoIn { port, size }
                } else {
                    LinuxExit::IoOut { port, size, value: self.regs.rax as u32 & size.mask() }
                }
            }
            EXIT_CPUID => LinuxExit::Cpuid,
            EXIT_MSR if info1 == 0 => LinuxExit::Rdmsr,
            EXIT_MSR => LinuxExit::Wrmsr,
            EXIT_HLT => {
                VMCB.put(S_RIP, VMCB.get::<u64>(S_RIP) + HLT_LEN);
                // The shadow of an STI before the HLT ends with the HLT.
                VMCB.put(C_INT_SHADOW, 0u64);
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
        VMCB.put(S_RAX, self.regs.rax);
        // SAFETY: the VMCB describes a consistent long-mode guest (`start_long_mode`), its
        // nested root is a table the nested MMU built, and the world switch saves and
        // restores every host register the ABI requires plus the VMSAVE state.
        unsafe { linux_svm_world_switch(self.vmcb_pa, &mut self.regs, self.host_state_pa) };
        VMCB.put(C_TLB_CONTROL, 0u32);
        self.regs.rax = VMCB.get(S_RAX);
        // An injected event was taken (or is back in EXITINTINFO, see `exit`).
        VMCB.put(C_EVENTINJ, 0u64);
        self.exit()
    }

    fn gprs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&self) -> u64 {
        VMCB.get(S_RIP)
    }

    fn skip(&mut self, len: u64) {
        VMCB.put(S_RIP, VMCB.get::<u64>(S_RIP).wrapping_add(len));
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
        VMCB.get::<u64>(S_RFLAGS) & RFLAGS_IF != 0
            && VMCB.get::<u64>(C_INT_SHADOW) & 1 == 0
            && !self.event_pending()
    }

    fn interrupts_enabled(&self) -> bool {
        VMCB.get::<u64>(S_RFLAGS) & RFLAGS_IF != 0
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
                VMCB.put(S_CR2, cr2);
                EVENT_VALID | EVENT_TYPE_EXCEPTION | EVENT_EV | 14 | ((error as u64) << 32)
            }
        };
        VMCB.put(C_EVENTINJ, v);
    }

    fn event_pending(&self) -> bool {
        VMCB.get::<u64>(C_EVENTINJ) & EVENT_VALID != 0
    }

    fn request_interrupt_window(&mut self, on: bool) {
        let misc1: u32 = VMCB.get(C_INTERCEPT_MISC1);
        let vintr: u64 = VMCB.get(C_VINTR);
        if on {
            // A virtual interrupt pending with the VINTR intercept: the CPU exits when the
            // guest could take it (APM 15.21.4), then the VMM injects the real one.
            VMCB.put(C_INTERCEPT_MISC1, misc1 | MISC1_VINTR);
            VMCB.put(C_VINTR, vintr | VINTR_V_IRQ | VINTR_IGN_TPR);
        } else {
            VMCB.put(C_INTERCEPT_MISC1, misc1 & !MISC1_VINTR);
            VMCB.put(C_VINTR, vintr & !(VINTR_V_IRQ | VINTR_IGN_TPR));
        }
    }

    fn control(&self) -> ControlRegs {
        if let Some(c) = self.shadow {
            return c;
        }
        ControlRegs {
            cr0: VMCB.get(S_CR0),
            cr3: VMCB.get(S_CR3),
            cr4: VMCB.get(S_CR4),
            efer: VMCB.get::<u64>(S_EFER) & !EFER_SVME,
        }
    }

    fn reg(&mut self, n: u8) -> u64 {
        match gpr_slot(&mut self.regs, n) {
            Some(r) => *r,
            None => VMCB.get(S_RSP),
        }
    }

    fn set_reg(&mut self, n: u8, v: u64) {
        match gpr_slot(&mut self.regs, n) {
            Some(r) => *r = v,
            None => VMCB.put(S_RSP, v),
        }
    }

    fn state_msr(&self, msr: u32) -> Option<u64> {
        Some(match msr {
            0x174 => VMCB.get(S_SYSENTER_CS),
            0x175 => VMCB.get(S_SYSENTER_ESP),
            0x176 => VMCB.get(S_SYSENTER_EIP),
            0x277 => VMCB.get(S_GPAT),
            MSR_EFER => match self.shadow {
                Some(c) => c.efer,
                None => VMCB.get::<u64>(S_EFER) & !EFER_SVME,
            },
            0xc000_0081 => VMCB.get(S_STAR),
            0xc000_0082 => VMCB.get(S_LSTAR),
            0xc000_0083 => VMCB.get(S_CSTAR),
            0xc000_0084 => VMCB.get(S_SFMASK),
            0xc000_0100 => VMCB.get(S_FS + 8),
            0xc000_0101 => VMCB.get(S_GS + 8),
            0xc000_0102 => VMCB.get(S_KERNEL_GS_BASE),
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
                let lma = VMCB.get::<u64>(S_EFER) & EFER_LMA;
                VMCB.put(S_EFER, (value & !EFER_LMA) | lma | EFER_SVME);
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
        VMCB.put(off, value);
        true
    }

    fn flush_nested(&mut self) {
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn set_guest_control(&mut self, c: ControlRegs) {
        if let Some(s) = self.shadow.as_mut() {
            *s = c;
        }
    }

    fn set_paging(&mut self, hw: &ControlRegs) {
        VMCB.put(S_CR0, hw.cr0);
        VMCB.put(S_CR3, hw.cr3);
        VMCB.put(S_CR4, hw.cr4);
        VMCB.put(S_EFER, hw.efer | EFER_SVME | EFER_NXE);
    }

    fn code64(&self) -> bool {
        VMCB.code64()
    }

    fn rflags(&self) -> u64 {
        VMCB.get(S_RFLAGS)
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
        VMCB.put(S_RIP, start.rip);
        VMCB.put(S_RSP, start.rsp);
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
            _ => Exit::Other {
                code: VMCB.get(C_EXITCODE),
                info1: VMCB.get(C_EXITINFO1),
                info2: VMCB.get(C_EXITINFO2),
            },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn flush_nested_tlb(&mut self) {
        self.flush_nested();
    }
}
