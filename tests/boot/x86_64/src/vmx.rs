//! Intel VMX with EPT (SDM Vol. 3C chapters 24-29): VMXON, one VMCS whose guest starts in
//! 32-bit protected mode with paging off (unrestricted guest), the world switch, and the
//! VMX-preemption timer as the run budget. Verified under Bochs 2.7 (DESIGN.md section 8
//! lists its pitfalls: TRUE_* control MSRs, CR0/CR4 fixed bits also for the guest, a real
//! host TR, a usable busy guest TR, VMCS link pointer all ones).

use core::arch::{asm, global_asm};

use crate::frames::FramePool;
use crate::gdt;
use crate::port::{cpuid, rdmsr, read_cr0, read_cr3, read_cr4, write_cr0, write_cr4};
use crate::vendor::{Exit, GuestRegs, GuestStart, NestedFormat, Vendor};

pub(crate) const MSR_FEATURE_CONTROL: u32 = 0x3a;
pub(crate) const MSR_EFER: u32 = 0xc000_0080;
pub(crate) const MSR_VMX_BASIC: u32 = 0x480;
pub(crate) const MSR_VMX_PINBASED: u32 = 0x481;
pub(crate) const MSR_VMX_PROCBASED: u32 = 0x482;
pub(crate) const MSR_VMX_EXIT: u32 = 0x483;
pub(crate) const MSR_VMX_ENTRY: u32 = 0x484;
pub(crate) const MSR_VMX_MISC: u32 = 0x485;
pub(crate) const MSR_VMX_CR0_FIXED0: u32 = 0x486;
pub(crate) const MSR_VMX_CR0_FIXED1: u32 = 0x487;
pub(crate) const MSR_VMX_CR4_FIXED0: u32 = 0x488;
pub(crate) const MSR_VMX_CR4_FIXED1: u32 = 0x489;
pub(crate) const MSR_VMX_PROCBASED2: u32 = 0x48b;
pub(crate) const MSR_VMX_EPT_VPID_CAP: u32 = 0x48c;
pub(crate) const MSR_VMX_TRUE_PINBASED: u32 = 0x48d;
pub(crate) const MSR_VMX_TRUE_PROCBASED: u32 = 0x48e;
pub(crate) const MSR_VMX_TRUE_EXIT: u32 = 0x48f;
pub(crate) const MSR_VMX_TRUE_ENTRY: u32 = 0x490;
pub(crate) const CR4_VMXE: u64 = 1 << 13;

// VMCS field encodings (SDM Vol. 3C appendix B).
pub(crate) const GUEST_ES_SEL: u64 = 0x800;
pub(crate) const GUEST_CS_SEL: u64 = 0x802;
pub(crate) const GUEST_TR_SEL: u64 = 0x80e;
pub(crate) const GUEST_LDTR_SEL: u64 = 0x80c;
pub(crate) const HOST_ES_SEL: u64 = 0xc00;
pub(crate) const HOST_CS_SEL: u64 = 0xc02;
pub(crate) const HOST_SS_SEL: u64 = 0xc04;
pub(crate) const HOST_DS_SEL: u64 = 0xc06;
pub(crate) const HOST_FS_SEL: u64 = 0xc08;
pub(crate) const HOST_GS_SEL: u64 = 0xc0a;
pub(crate) const HOST_TR_SEL: u64 = 0xc0c;
pub(crate) const EPT_POINTER: u64 = 0x201a;
pub(crate) const GUEST_PHYS_ADDR: u64 = 0x2400;
pub(crate) const VMCS_LINK_POINTER: u64 = 0x2800;
pub(crate) const GUEST_PAT: u64 = 0x2804;
pub(crate) const GUEST_EFER: u64 = 0x2806;
pub(crate) const HOST_PAT: u64 = 0x2c00;
pub(crate) const HOST_EFER: u64 = 0x2c02;
pub(crate) const PIN_CONTROLS: u64 = 0x4000;
pub(crate) const PROC_CONTROLS: u64 = 0x4002;
pub(crate) const EXCEPTION_BITMAP: u64 = 0x4004;
pub(crate) const EXIT_CONTROLS: u64 = 0x400c;
pub(crate) const ENTRY_CONTROLS: u64 = 0x4012;
pub(crate) const ENTRY_INTR_INFO: u64 = 0x4016;
pub(crate) const PROC_CONTROLS2: u64 = 0x401e;
pub(crate) const VM_INSTRUCTION_ERROR: u64 = 0x4400;
pub(crate) const EXIT_REASON: u64 = 0x4402;
pub(crate) const EXIT_INSTRUCTION_LEN: u64 = 0x440c;
pub(crate) const GUEST_ES_LIMIT: u64 = 0x4800;
pub(crate) const GUEST_LDTR_LIMIT: u64 = 0x480c;
pub(crate) const GUEST_TR_LIMIT: u64 = 0x480e;
pub(crate) const GUEST_GDTR_LIMIT: u64 = 0x4810;
pub(crate) const GUEST_IDTR_LIMIT: u64 = 0x4812;
pub(crate) const GUEST_ES_AR: u64 = 0x4814;
pub(crate) const GUEST_LDTR_AR: u64 = 0x4820;
pub(crate) const GUEST_TR_AR: u64 = 0x4822;
pub(crate) const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
pub(crate) const GUEST_ACTIVITY: u64 = 0x4826;
pub(crate) const GUEST_SYSENTER_CS: u64 = 0x482a;
pub(crate) const PREEMPTION_TIMER: u64 = 0x482e;
pub(crate) const HOST_SYSENTER_CS: u64 = 0x4c00;
pub(crate) const CR0_MASK: u64 = 0x6000;
pub(crate) const CR4_MASK: u64 = 0x6002;
pub(crate) const CR0_SHADOW: u64 = 0x6004;
pub(crate) const CR4_SHADOW: u64 = 0x6006;
pub(crate) const EXIT_QUALIFICATION: u64 = 0x6400;
pub(crate) const GUEST_CR0: u64 = 0x6800;
pub(crate) const GUEST_CR3: u64 = 0x6802;
pub(crate) const GUEST_CR4: u64 = 0x6804;
pub(crate) const GUEST_ES_BASE: u64 = 0x6806;
pub(crate) const GUEST_LDTR_BASE: u64 = 0x6812;
pub(crate) const GUEST_TR_BASE: u64 = 0x6814;
pub(crate) const GUEST_GDTR_BASE: u64 = 0x6816;
pub(crate) const GUEST_IDTR_BASE: u64 = 0x6818;
pub(crate) const GUEST_DR7: u64 = 0x681a;
pub(crate) const GUEST_RSP: u64 = 0x681c;
pub(crate) const GUEST_RIP: u64 = 0x681e;
pub(crate) const GUEST_RFLAGS: u64 = 0x6820;
pub(crate) const GUEST_PENDING_DBG: u64 = 0x6822;
pub(crate) const GUEST_SYSENTER_ESP: u64 = 0x6824;
pub(crate) const GUEST_SYSENTER_EIP: u64 = 0x6826;
pub(crate) const HOST_CR0: u64 = 0x6c00;
pub(crate) const HOST_CR3: u64 = 0x6c02;
pub(crate) const HOST_CR4: u64 = 0x6c04;
pub(crate) const HOST_FS_BASE: u64 = 0x6c06;
pub(crate) const HOST_GS_BASE: u64 = 0x6c08;
pub(crate) const HOST_TR_BASE: u64 = 0x6c0a;
pub(crate) const HOST_GDTR_BASE: u64 = 0x6c0c;
pub(crate) const HOST_IDTR_BASE: u64 = 0x6c0e;
pub(crate) const HOST_SYSENTER_ESP: u64 = 0x6c10;
pub(crate) const HOST_SYSENTER_EIP: u64 = 0x6c12;
pub(crate) const HOST_RSP: u64 = 0x6c14;
pub(crate) const HOST_RIP: u64 = 0x6c16;

// Controls.
pub(crate) const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
pub(crate) const PROC_HLT: u32 = 1 << 7;
pub(crate) const PROC_UNCOND_IO: u32 = 1 << 24;
pub(crate) const PROC_SECONDARY: u32 = 1 << 31;
pub(crate) const PROC2_EPT: u32 = 1 << 1;
pub(crate) const PROC2_UNRESTRICTED: u32 = 1 << 7;
pub(crate) const EXIT_HOST_64: u32 = 1 << 9;
pub(crate) const EXIT_SAVE_EFER: u32 = 1 << 20;
pub(crate) const EXIT_LOAD_EFER: u32 = 1 << 21;
pub(crate) const ENTRY_LOAD_EFER: u32 = 1 << 15;

// Exit reasons (SDM Vol. 3C appendix C).
pub(crate) const REASON_TRIPLE_FAULT: u64 = 2;
pub(crate) const REASON_HLT: u64 = 12;
pub(crate) const REASON_VMCALL: u64 = 18;
pub(crate) const REASON_IO: u64 = 30;
pub(crate) const REASON_EPT_VIOLATION: u64 = 48;
pub(crate) const REASON_PREEMPTION_TIMER: u64 = 52;

/// Budget of one guest run in TSC ticks (Bochs: about one tick per instruction).
pub(crate) const RUN_BUDGET_TSC: u64 = 40_000_000;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut VMXON_REGION: Page = Page([0; 4096]);
static mut VMCS_REGION: Page = Page([0; 4096]);

global_asm!(
    concat!(
        r#"
    .text
    .global vmx_world_switch
    // rdi = &mut GuestRegs, rsi = 1 if the VMCS was launched. Returns 0 after a VM exit,
    // 1 on VMfailInvalid, 2 on VMfailValid.
vmx_world_switch:
"#,
        push_callee_saved!(),
        r#"
    push %rdi
    mov ${host_rsp}, %rax
    vmwrite %rsp, %rax
    cmp $0, %rsi
    mov 0(%rdi), %rax
"#,
        load_guest_gprs!("rdi"),
        r#"
    mov 32(%rdi), %rsi
    mov 40(%rdi), %rdi
    jne 1f
    vmlaunch
    jmp 2f
1:
    vmresume
2:
    jc 3f
    mov $2, %eax
    jmp 4f
3:
    mov $1, %eax
4:
    add $8, %rsp
    jmp 5f
    .global vmx_exit_entry
vmx_exit_entry:
    push %rdi
    mov 8(%rsp), %rdi
    mov %rax, 0(%rdi)
"#,
        store_guest_gprs!("rdi"),
        r#"
    mov %rsi, 32(%rdi)
    pop %rax
    mov %rax, 40(%rdi)
    add $8, %rsp
    xor %eax, %eax
5:
"#,
        pop_callee_saved!(),
        r#"
    ret
"#,
    ),
    host_rsp = const HOST_RSP,
    options(att_syntax)
);

extern "C" {
    pub(crate) fn vmx_world_switch(regs: *mut GuestRegs, launched: u64) -> u64;
    pub(crate) fn vmx_exit_entry();
}

/// Why VMX could not be used.
#[derive(Debug, Clone, Copy)]
pub enum VmxError {
    /// IA32_FEATURE_CONTROL is locked with VMX disabled.
    DisabledByFirmware,
    /// EPT, unrestricted guest or a 4-level write-back walk is missing.
    NoEpt,
    /// VMXON failed (RFLAGS CF/ZF).
    VmxonFailed,
    /// VMCLEAR or VMPTRLD failed.
    VmcsLoadFailed,
    /// A VMWRITE failed: (field, VM-instruction error). Printed through `Debug`.
    #[allow(dead_code)]
    VmwriteFailed(u64, u64),
}

/// Whether the CPU has VMX.
pub fn available() -> bool {
    cpuid(1, 0).2 & (1 << 5) != 0
}

pub(crate) fn vmread(field: u64) -> u64 {
    let v: u64;
    // SAFETY: a VMCS is current (loaded by `Vmx::new`); VMREAD only reads it.
    unsafe { asm!("vmread {}, {}", out(reg) v, in(reg) field, options(nostack)) };
    v
}

pub(crate) fn vmwrite(field: u64, value: u64) -> Result<(), VmxError> {
    let failed: u8;
    // SAFETY: a VMCS is current; the fields written are guest/host/control state that the
    // next VM entry checks, so a wrong value fails that entry, never host memory.
    unsafe {
        asm!("vmwrite {}, {}", "setna {}", in(reg) field, in(reg) value, out(reg_byte) failed, options(nostack))
    };
    if failed != 0 {
        Err(VmxError::VmwriteFailed(field, vmread(VM_INSTRUCTION_ERROR)))
    } else {
        Ok(())
    }
}

/// Adjusts desired control bits to what a capability MSR allows (low half: bits that
/// must be 1; high half: bits that may be 1).
pub(crate) fn adjust(msr: u32, want: u32) -> u32 {
    let cap = rdmsr(msr);
    (want | cap as u32) & (cap >> 32) as u32
}

/// The VMX vendor: one VMCS, one guest.
pub struct Vmx {
    regs: GuestRegs,
    launched: bool,
    ad: bool,
    eptp: u64,
    single_context: bool,
    timer: bool,
    timer_shift: u32,
}

/// Writes the host state of the current VMCS: what the world switch returns to.
pub(crate) fn write_host_state() -> Result<(), VmxError> {
    vmwrite(HOST_CR0, read_cr0())?;
    vmwrite(HOST_CR3, read_cr3())?;
    vmwrite(HOST_CR4, read_cr4())?;
    vmwrite(HOST_CS_SEL, gdt::KERNEL_CS as u64)?;
    for f in [HOST_ES_SEL, HOST_SS_SEL, HOST_DS_SEL, HOST_FS_SEL, HOST_GS_SEL] {
        vmwrite(f, gdt::KERNEL_DS as u64)?;
    }
    vmwrite(HOST_TR_SEL, gdt::TSS_SEL as u64)?;
    vmwrite(HOST_FS_BASE, 0)?;
    vmwrite(HOST_GS_BASE, 0)?;
    vmwrite(HOST_TR_BASE, gdt::tss_base())?;
    vmwrite(HOST_GDTR_BASE, gdt::gdt_base())?;
    vmwrite(HOST_IDTR_BASE, crate::idt::base())?;
    vmwrite(HOST_SYSENTER_CS, 0)?;
    vmwrite(HOST_SYSENTER_ESP, 0)?;
    vmwrite(HOST_SYSENTER_EIP, 0)?;
    vmwrite(HOST_EFER, rdmsr(MSR_EFER))?;
    vmwrite(HOST_PAT, rdmsr(0x277))?;
    vmwrite(HOST_RIP, vmx_exit_entry as *const () as u64)?;
    Ok(())
}

impl Vmx {
    /// Enters VMX operation and prepares the VMCS.
    pub fn new(_pool: &mut FramePool) -> Result<Self, VmxError> {
        let fc = rdmsr(MSR_FEATURE_CONTROL);
        if fc & 1 != 0 && fc & 4 == 0 {
            return Err(VmxError::DisabledByFirmware);
        }
        if fc & 1 == 0 {
            // SAFETY: enabling VMX outside SMX and locking the MSR only permits VMXON.
            unsafe { crate::port::wrmsr(MSR_FEATURE_CONTROL, fc | 5) };
        }
        let basic = rdmsr(MSR_VMX_BASIC);
        let revision = (basic & 0x7fff_ffff) as u32;
        let true_ctls = basic & (1 << 55) != 0;
        let ept_cap = rdmsr(MSR_VMX_EPT_VPID_CAP);
        let proc2_cap = rdmsr(MSR_VMX_PROCBASED2) >> 32;
        if ept_cap & (1 << 6) == 0
            || ept_cap & (1 << 14) == 0
            || proc2_cap & (PROC2_EPT | PROC2_UNRESTRICTED) as u64 != (PROC2_EPT | PROC2_UNRESTRICTED) as u64
        {
            return Err(VmxError::NoEpt);
        }
        let ad = ept_cap & (1 << 21) != 0;
        let single_context = ept_cap & (1 << 25) != 0;
        // SAFETY: CR0.NE and CR4.VMXE are required for VMXON; the fixed-bit MSRs only add
        // bits that the host (paging, protection, long mode) already has set.
        unsafe {
            write_cr0((read_cr0() | rdmsr(MSR_VMX_CR0_FIXED0)) & rdmsr(MSR_VMX_CR0_FIXED1));
            write_cr4((read_cr4() | CR4_VMXE | rdmsr(MSR_VMX_CR4_FIXED0)) & rdmsr(MSR_VMX_CR4_FIXED1));
        }
        let vmxon = core::ptr::addr_of_mut!(VMXON_REGION) as u64;
        let vmcs = core::ptr::addr_of_mut!(VMCS_REGION) as u64;
        let ok: u8;
        // SAFETY: both regions are static 4 KiB-aligned pages used for nothing else; the
        // revision identifier is written first as VMXON/VMPTRLD require.
        unsafe {
            (vmxon as *mut u32).write_volatile(revision);
            (vmcs as *mut u32).write_volatile(revision);
            asm!("vmxon [{}]", "seta {}", in(reg) &vmxon, out(reg_byte) ok, options(nostack));
        }
        if ok == 0 {
            return Err(VmxError::VmxonFailed);
        }
        let ok: u8;
        // SAFETY: VMX operation is on; the VMCS region is initialized with the revision.
        unsafe {
            asm!("vmclear [{0}]", "vmptrld [{0}]", "seta {1}", in(reg) &vmcs, out(reg_byte) ok, options(nostack))
        };
        if ok == 0 {
            return Err(VmxError::VmcsLoadFailed);
        }
        let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
            (MSR_VMX_TRUE_PINBASED, MSR_VMX_TRUE_PROCBASED, MSR_VMX_TRUE_EXIT, MSR_VMX_TRUE_ENTRY)
        } else {
            (MSR_VMX_PINBASED, MSR_VMX_PROCBASED, MSR_VMX_EXIT, MSR_VMX_ENTRY)
        };
        let pin = adjust(pin_msr, PIN_PREEMPTION_TIMER);
        let timer = pin & PIN_PREEMPTION_TIMER != 0;
        let timer_shift = (rdmsr(MSR_VMX_MISC) & 0x1f) as u32;
        vmwrite(PIN_CONTROLS, pin as u64)?;
        vmwrite(PROC_CONTROLS, adjust(proc_msr, PROC_HLT | PROC_UNCOND_IO | PROC_SECONDARY) as u64)?;
        vmwrite(PROC_CONTROLS2, adjust(MSR_VMX_PROCBASED2, PROC2_EPT | PROC2_UNRESTRICTED) as u64)?;
        vmwrite(EXIT_CONTROLS, adjust(exit_msr, EXIT_HOST_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER) as u64)?;
        vmwrite(ENTRY_CONTROLS, adjust(entry_msr, ENTRY_LOAD_EFER) as u64)?;
        vmwrite(EXCEPTION_BITMAP, 0)?;
        vmwrite(ENTRY_INTR_INFO, 0)?;
        vmwrite(CR0_MASK, 0)?;
        vmwrite(CR4_MASK, 0)?;
        vmwrite(CR0_SHADOW, 0)?;
        vmwrite(CR4_SHADOW, 0)?;
        vmwrite(VMCS_LINK_POINTER, u64::MAX)?;
        write_host_state()?;
        Ok(Vmx {
            regs: GuestRegs::default(),
            launched: false,
            ad,
            eptp: 0,
            single_context,
            timer,
            timer_shift,
        })
    }

    pub(crate) fn setup_guest(start: GuestStart) -> Result<(), VmxError> {
        // Flat 32-bit segments: ES, CS, SS, DS, FS, GS are consecutive encodings.
        for i in 0..6u64 {
            let code = i == 1;
            vmwrite(GUEST_ES_SEL + 2 * i, if code { 0x08 } else { 0x10 })?;
            vmwrite(GUEST_ES_LIMIT + 2 * i, 0xffff_ffff)?;
            vmwrite(GUEST_ES_AR + 2 * i, if code { 0xc09b } else { 0xc093 })?;
            vmwrite(GUEST_ES_BASE + 2 * i, 0)?;
        }
        let _ = GUEST_CS_SEL;
        vmwrite(GUEST_LDTR_SEL, 0)?;
        vmwrite(GUEST_LDTR_LIMIT, 0)?;
        vmwrite(GUEST_LDTR_AR, 1 << 16)?; // unusable
        vmwrite(GUEST_LDTR_BASE, 0)?;
        vmwrite(GUEST_TR_SEL, 0)?;
        vmwrite(GUEST_TR_LIMIT, 0x67)?;
        vmwrite(GUEST_TR_AR, 0x8b)?; // present, busy 32-bit TSS
        vmwrite(GUEST_TR_BASE, 0)?;
        vmwrite(GUEST_GDTR_LIMIT, 0)?;
        vmwrite(GUEST_GDTR_BASE, 0)?;
        vmwrite(GUEST_IDTR_LIMIT, 0)?;
        vmwrite(GUEST_IDTR_BASE, 0)?;
        // PE | ET | NE, paging off (allowed by unrestricted guest); CR4.VMXE is a fixed bit.
        let cr0 = (0x31 | (rdmsr(MSR_VMX_CR0_FIXED0) & !0x8000_0001)) & rdmsr(MSR_VMX_CR0_FIXED1);
        vmwrite(GUEST_CR0, cr0)?;
        vmwrite(GUEST_CR3, 0)?;
        vmwrite(GUEST_CR4, rdmsr(MSR_VMX_CR4_FIXED0) & rdmsr(MSR_VMX_CR4_FIXED1))?;
        vmwrite(GUEST_DR7, 0x400)?;
        vmwrite(GUEST_RFLAGS, 0x2)?;
        vmwrite(GUEST_RIP, start.rip)?;
        vmwrite(GUEST_RSP, start.rsp)?;
        vmwrite(GUEST_INTERRUPTIBILITY, 0)?;
        vmwrite(GUEST_ACTIVITY, 0)?;
        vmwrite(GUEST_PENDING_DBG, 0)?;
        vmwrite(GUEST_SYSENTER_CS, 0)?;
        vmwrite(GUEST_SYSENTER_ESP, 0)?;
        vmwrite(GUEST_SYSENTER_EIP, 0)?;
        vmwrite(GUEST_EFER, 0)?;
        vmwrite(GUEST_PAT, 0x0007_0406_0007_0406)?;
        Ok(())
    }

    fn advance_rip(&self) {
        let _ = vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(EXIT_INSTRUCTION_LEN));
    }
}

impl Vendor for Vmx {
    fn name(&self) -> &'static str {
        "VMX"
    }

    fn format(&self) -> NestedFormat {
        NestedFormat::Ept { ad: self.ad }
    }

    fn set_nested_root(&mut self, pointer: u64) {
        self.eptp = pointer;
        if let Err(e) = vmwrite(EPT_POINTER, self.eptp) {
            crate::println!("VMX: EPTP write failed: {:?}", e);
        }
        self.flush_nested_tlb();
    }

    fn reset_guest(&mut self, start: GuestStart) {
        self.regs = GuestRegs::default();
        if let Err(e) = Self::setup_guest(start) {
            crate::println!("VMX: guest state write failed: {:?}", e);
        }
    }

    fn run(&mut self) -> Exit {
        if self.timer {
            let _ = vmwrite(PREEMPTION_TIMER, (RUN_BUDGET_TSC >> self.timer_shift).min(u32::MAX as u64));
        }
        // SAFETY: the VMCS is current and complete (controls, host and guest state), HOST_RIP
        // is the exit half of the world switch, which restores every callee-saved register.
        let status = unsafe { vmx_world_switch(&mut self.regs, self.launched as u64) };
        match status {
            0 => self.launched = true,
            1 => return Exit::EntryFailed { code: u64::MAX },
            _ => return Exit::EntryFailed { code: vmread(VM_INSTRUCTION_ERROR) },
        }
        let reason = vmread(EXIT_REASON);
        if reason & (1 << 31) != 0 {
            return Exit::EntryFailed { code: reason };
        }
        let qual = vmread(EXIT_QUALIFICATION);
        match reason & 0xffff {
            REASON_EPT_VIOLATION => Exit::NestedFault {
                gpa: vmread(GUEST_PHYS_ADDR),
                write: qual & 2 != 0,
                fetch: qual & 4 != 0,
                present: qual & 0x38 != 0,
                info: qual,
            },
            REASON_IO if qual & 8 == 0 => {
                self.advance_rip();
                let mask = match qual & 7 {
                    0 => 0xff,
                    1 => 0xffff,
                    _ => 0xffff_ffff,
                };
                Exit::IoOut { port: (qual >> 16) as u16, value: (self.regs.rax & mask) as u32 }
            }
            REASON_VMCALL => {
                self.advance_rip();
                Exit::Hypercall
            }
            REASON_HLT => {
                self.advance_rip();
                Exit::Halt
            }
            REASON_PREEMPTION_TIMER => Exit::Timer,
            REASON_TRIPLE_FAULT => Exit::Shutdown,
            r => Exit::Other { code: r, info1: qual, info2: vmread(GUEST_PHYS_ADDR) },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn flush_nested_tlb(&mut self) {
        let desc: [u64; 2] = [self.eptp, 0];
        let kind: u64 = if self.single_context { 1 } else { 2 };
        // SAFETY: VMX operation is on and INVEPT was reported by EPT_VPID_CAP; the
        // descriptor is a valid 16-byte structure on the stack.
        unsafe { asm!("invept {}, [{}]", in(reg) kind, in(reg) &desc, options(nostack)) };
    }
}
