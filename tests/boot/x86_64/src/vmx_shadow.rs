//! Intel VMX with EPT off (SDM Vol. 3C 24.6, 25.1, 26.3): a second VMCS whose guest CR3
//! is the shadow root. Without EPT there is no unrestricted guest, so the guest always
//! runs with CR0.PE and CR0.PG set; what it reads of CR0 and CR4 comes from the read
//! shadows, and every change of a bit it owns exits (guest/host masks all ones). Exits:
//! #PF (exception bitmap bit 14, PFEC mask and match 0: every #PF), MOV to and from CR3
//! (CR3-load and CR3-store exiting), INVLPG exiting, RDMSR/WRMSR (no MSR bitmaps: all of
//! them exit), with the CR number in the exit qualification; the instruction itself is
//! decoded by [`crate::shadow_vm`] on both vendors. A #PF that is the guest's own is
//! injected through the VM-entry interruption information with CR2 loaded by the host
//! just before the entry (VMX does not switch CR2). Without VPID every VM entry and exit
//! flushes the guest's linear translations, so the flush the shadow MMU asks for is
//! already done by the next entry.

use alloc::format;
use alloc::string::String;
use core::arch::asm;

use crate::port::rdmsr;
use crate::shadow_vm::{HwPaging, SExit, ShadowVendor, EFER_LMA};
use crate::vendor::{GuestRegs, GuestStart};
use crate::vmx::*;

const PFEC_MASK: u64 = 0x4006;
const PFEC_MATCH: u64 = 0x4008;
const CR3_TARGET_COUNT: u64 = 0x400a;
const ENTRY_EXCEPTION_ERRCODE: u64 = 0x4018;
const EXIT_INTR_INFO: u64 = 0x4404;
const EXIT_INTR_ERRCODE: u64 = 0x4406;
const IDT_VECTORING_INFO: u64 = 0x4408;
const IDT_VECTORING_ERRCODE: u64 = 0x440a;
const GUEST_CS_AR: u64 = 0x4816;

const PROC_INVLPG: u32 = 1 << 9;
const PROC_CR3_LOAD: u32 = 1 << 15;
const PROC_CR3_STORE: u32 = 1 << 16;
const ENTRY_IA32E: u32 = 1 << 9;

const REASON_EXCEPTION: u64 = 0;
const REASON_CR: u64 = 28;
const REASON_INVLPG: u64 = 14;
const REASON_RDMSR: u64 = 31;
const REASON_WRMSR: u64 = 32;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut SHADOW_VMCS: Page = Page([0; 4096]);

/// The VMX vendor in shadow-paging mode.
pub struct VmxShadow {
    regs: GuestRegs,
    launched: bool,
    event: Option<(u64, Option<u32>)>,
    reinject: Option<(u64, u32)>,
    cr2: u64,
    entry: u32,
    timer: bool,
    timer_shift: u32,
}

fn w(field: u64, value: u64) -> Result<(), String> {
    vmwrite(field, value).map_err(|e| format!("VMWRITE {field:#x}: {e:?}"))
}

impl VmxShadow {
    /// A shadow-mode vendor; VMX operation must be on ([`crate::vmx::Vmx::new`]).
    pub fn new() -> Self {
        VmxShadow {
            regs: GuestRegs::default(),
            launched: false,
            event: None,
            reinject: None,
            cr2: 0,
            entry: 0,
            timer: false,
            timer_shift: 0,
        }
    }
}

impl ShadowVendor for VmxShadow {
    fn name(&self) -> &'static str {
        "VMX"
    }

    fn enter_shadow_mode(&mut self) -> Result<(), String> {
        let basic = rdmsr(MSR_VMX_BASIC);
        let revision = (basic & 0x7fff_ffff) as u32;
        let true_ctls = basic & (1 << 55) != 0;
        let vmcs = core::ptr::addr_of_mut!(SHADOW_VMCS) as u64;
        let ok: u8;
        // SAFETY: VMX operation is on; the region is a static 4 KiB-aligned page used for
        // nothing else, initialized with the revision identifier before VMCLEAR/VMPTRLD.
        unsafe {
            (vmcs as *mut u32).write_volatile(revision);
            asm!("vmclear [{0}]", "vmptrld [{0}]", "seta {1}", in(reg) &vmcs, out(reg_byte) ok, options(nostack));
        }
        if ok == 0 {
            return Err(String::from("VMCLEAR/VMPTRLD of the shadow VMCS failed"));
        }
        let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
            (MSR_VMX_TRUE_PINBASED, MSR_VMX_TRUE_PROCBASED, MSR_VMX_TRUE_EXIT, MSR_VMX_TRUE_ENTRY)
        } else {
            (MSR_VMX_PINBASED, MSR_VMX_PROCBASED, MSR_VMX_EXIT, MSR_VMX_ENTRY)
        };
        let pin = adjust(pin_msr, PIN_PREEMPTION_TIMER);
        self.timer = pin & PIN_PREEMPTION_TIMER != 0;
        self.timer_shift = (rdmsr(MSR_VMX_MISC) & 0x1f) as u32;
        w(PIN_CONTROLS, pin as u64)?;
        let proc = adjust(proc_msr, PROC_HLT | PROC_UNCOND_IO | PROC_INVLPG | PROC_CR3_LOAD | PROC_CR3_STORE);
        if proc & (PROC_INVLPG | PROC_CR3_LOAD | PROC_CR3_STORE)
            != PROC_INVLPG | PROC_CR3_LOAD | PROC_CR3_STORE
        {
            return Err(format!("processor-based controls {proc:#x} lack INVLPG or CR3 exiting"));
        }
        w(PROC_CONTROLS, proc as u64)?;
        // No secondary controls: no EPT, no unrestricted guest, no VPID.
        w(EXIT_CONTROLS, adjust(exit_msr, EXIT_HOST_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER) as u64)?;
        self.entry = adjust(entry_msr, ENTRY_LOAD_EFER);
        w(ENTRY_CONTROLS, self.entry as u64)?;
        w(EXCEPTION_BITMAP, 1 << 14)?;
        w(PFEC_MASK, 0)?;
        w(PFEC_MATCH, 0)?;
        w(CR3_TARGET_COUNT, 0)?;
        w(ENTRY_INTR_INFO, 0)?;
        w(CR0_MASK, u64::MAX)?;
        w(CR4_MASK, u64::MAX)?;
        w(VMCS_LINK_POINTER, u64::MAX)?;
        write_host_state().map_err(|e| format!("host state: {e:?}"))?;
        Ok(())
    }

    fn reset(&mut self, rip: u64, rsp: u64) {
        self.regs = GuestRegs::default();
        self.event = None;
        self.reinject = None;
        if let Err(e) = Vmx::setup_guest(GuestStart { rip, rsp }) {
            crate::println!("VMX: guest state write failed: {:?}", e);
        }
    }

    fn set_paging(&mut self, hw: &HwPaging, guest_cr0: u64, guest_cr4: u64) {
        let cr0 = (hw.cr0 | rdmsr(MSR_VMX_CR0_FIXED0)) & rdmsr(MSR_VMX_CR0_FIXED1);
        let cr4 = (hw.cr4 | rdmsr(MSR_VMX_CR4_FIXED0)) & rdmsr(MSR_VMX_CR4_FIXED1);
        let ia32e = if hw.efer & EFER_LMA != 0 { ENTRY_IA32E } else { 0 };
        let r = w(GUEST_CR0, cr0)
            .and(w(GUEST_CR3, hw.cr3))
            .and(w(GUEST_CR4, cr4))
            .and(w(GUEST_EFER, hw.efer))
            .and(w(CR0_SHADOW, guest_cr0))
            .and(w(CR4_SHADOW, guest_cr4))
            .and(w(ENTRY_CONTROLS, (self.entry | ia32e) as u64));
        if let Err(e) = r {
            crate::println!("VMX: paging state write failed: {e}");
        }
    }

    fn flush_tlb(&mut self) {
        // Without VPID, VM entry flushes the guest's linear and combined mappings.
    }

    fn inject(&mut self, vector: u8, code: Option<u32>, cr2: u64) {
        if vector == 14 {
            self.cr2 = cr2;
        }
        self.event =
            Some((vector as u64 | (3 << 8) | (1 << 31) | if code.is_some() { 1 << 11 } else { 0 }, code));
    }

    fn run(&mut self) -> SExit {
        let (info, code) = match (self.event.take(), self.reinject.take()) {
            (Some((i, c)), _) => (i, c.unwrap_or(0)),
            (None, Some((i, c))) => (i, c),
            (None, None) => (0, 0),
        };
        let _ = vmwrite(ENTRY_INTR_INFO, info);
        let _ = vmwrite(ENTRY_EXCEPTION_ERRCODE, code as u64);
        if self.timer {
            let _ = vmwrite(PREEMPTION_TIMER, (40_000_000u64 >> self.timer_shift).min(u32::MAX as u64));
        }
        if info != 0 && info & 0xff == 14 {
            // SAFETY: CR2 belongs to the guest while it runs; the host takes no page
            // fault between this write and the VM entry.
            unsafe { asm!("mov cr2, {}", in(reg) self.cr2, options(nostack)) };
        }
        // SAFETY: the shadow VMCS is current and complete; its guest CR3 is a shadow
        // root the shadow MMU built, and HOST_RIP is the exit half of the world switch.
        let status = unsafe { vmx_world_switch(&mut self.regs, self.launched as u64) };
        match status {
            0 => self.launched = true,
            1 => return SExit::EntryFailed { code: u64::MAX },
            _ => return SExit::EntryFailed { code: vmread(VM_INSTRUCTION_ERROR) },
        }
        let reason = vmread(EXIT_REASON);
        if reason & (1 << 31) != 0 {
            return SExit::EntryFailed { code: reason };
        }
        let vect = vmread(IDT_VECTORING_INFO);
        if vect & (1 << 31) != 0 {
            self.reinject = Some((vect & !(1 << 12), vmread(IDT_VECTORING_ERRCODE) as u32));
        }
        let qual = vmread(EXIT_QUALIFICATION);
        match reason & 0xffff {
            REASON_EXCEPTION if vmread(EXIT_INTR_INFO) & 0xff == 14 => {
                SExit::PageFault { addr: qual, code: vmread(EXIT_INTR_ERRCODE) as u32 }
            }
            REASON_CR if (qual >> 4) & 3 == 0 => SExit::CrWrite((qual & 0xf) as u8),
            REASON_CR if (qual >> 4) & 3 == 1 => SExit::CrRead((qual & 0xf) as u8),
            REASON_INVLPG => SExit::Invlpg,
            REASON_RDMSR | REASON_WRMSR => SExit::Msr,
            30 if qual & 8 == 0 => {
                let _ = vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(EXIT_INSTRUCTION_LEN));
                let mask = match qual & 7 {
                    0 => 0xff,
                    1 => 0xffff,
                    _ => 0xffff_ffff,
                };
                SExit::IoOut { port: (qual >> 16) as u16, value: (self.regs.rax & mask) as u32 }
            }
            12 => SExit::Halt,
            52 => SExit::Timer,
            2 => SExit::Shutdown,
            r => SExit::Other { code: r, info1: qual, info2: vmread(EXIT_INTR_INFO) },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&mut self) -> u64 {
        vmread(GUEST_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        let _ = vmwrite(GUEST_RIP, rip);
    }

    fn rsp(&mut self) -> u64 {
        vmread(GUEST_RSP)
    }

    fn set_rsp(&mut self, rsp: u64) {
        let _ = vmwrite(GUEST_RSP, rsp);
    }

    fn code64(&mut self) -> bool {
        vmread(GUEST_CS_AR) & (1 << 13) != 0 && vmread(GUEST_EFER) & EFER_LMA != 0
    }
}
