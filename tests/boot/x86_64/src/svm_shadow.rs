//! AMD SVM with nested paging off (APM Vol. 2, 15.12-15.16, 15.20): the guest's CR3 is
//! the shadow root, and the VMCB intercepts what shadow paging needs: #PF (EXITINFO1 =
//! error code, EXITINFO2 = the address), reads and writes of CR0, CR3 and CR4, INVLPG,
//! and EFER through the MSR permission map. QEMU's TCG has neither decode assists nor
//! NRIP save, so [`crate::shadow_vm`] decodes the intercepted instruction and advances
//! RIP itself. A #PF that is the guest's own is injected through EVENTINJ with CR2 set
//! in the VMCB; an event whose delivery was cut short by an intercept (EXITINTINFO) is
//! injected again. The guest's TLB is flushed with TLB_CONTROL = 1 on the next VMRUN.

use alloc::string::String;

use crate::shadow_vm::{HwPaging, SExit, ShadowVendor};
use crate::svm::{run_budgeted, svm_world_switch, MSRPM, SLICE_MS, VMCB};
use crate::timer;
use crate::vendor::GuestRegs;
use crate::vmcb::*;

/// Byte of the MSR permission map holding EFER's read and write bits (MSRs
/// C000_0000-C000_1FFF start at 0x800, two bits per MSR).
const MSRPM_EFER_BYTE: usize = 0x800 + (0x80 * 2) / 8;

/// The SVM vendor in shadow-paging mode (same VMCB as [`crate::svm::Svm`]).
pub struct SvmShadow {
    regs: GuestRegs,
    vmcb_pa: u64,
    event: u64,
    reinject: u64,
}

impl SvmShadow {
    /// The shadow-mode view of the VMCB that [`crate::svm::Svm::new`] prepared.
    pub fn new() -> Self {
        SvmShadow { regs: GuestRegs::default(), vmcb_pa: VMCB.pa(), event: 0, reinject: 0 }
    }
}

impl ShadowVendor for SvmShadow {
    fn name(&self) -> &'static str {
        "SVM"
    }

    fn enter_shadow_mode(&mut self) -> Result<(), String> {
        VMCB.put(C_NP_ENABLE, 0u64);
        VMCB.put(C_INTERCEPT_CR, INTERCEPT_CR0_CR3_CR4);
        VMCB.put(C_INTERCEPT_EXC, INTERCEPT_EXC_PF);
        VMCB.put(
            C_INTERCEPT_MISC1,
            MISC1_INTR | MISC1_HLT | MISC1_IOIO | MISC1_SHUTDOWN | MISC1_INVLPG | MISC1_MSR,
        );
        // SAFETY: the MSR permission map is a static the processor reads only during
        // VMRUN, which is not running.
        unsafe { (*core::ptr::addr_of_mut!(MSRPM)).0[MSRPM_EFER_BYTE] |= 3 };
        VMCB.put(C_CLEAN, 0u32);
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
        Ok(())
    }

    fn reset(&mut self, rip: u64, rsp: u64) {
        self.regs = GuestRegs::default();
        self.event = 0;
        self.reinject = 0;
        VMCB.reset_state((0x08, 0xc9b), (0x10, 0xc93), (0, 0), rip, rsp);
        VMCB.put(S_CR2, 0u64);
        VMCB.put(C_EVENTINJ, 0u64);
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn set_paging(&mut self, hw: &HwPaging, _guest_cr0: u64, _guest_cr4: u64) {
        VMCB.put(S_CR0, hw.cr0);
        VMCB.put(S_CR3, hw.cr3);
        VMCB.put(S_CR4, hw.cr4);
        VMCB.put(S_EFER, hw.efer | EFER_SVME);
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn flush_tlb(&mut self) {
        VMCB.put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn inject(&mut self, vector: u8, code: Option<u32>, cr2: u64) {
        // EVENTINJ: vector, type 3 (exception), EV (error code valid), V.
        let mut e = vector as u64 | EVENT_TYPE_EXCEPTION | EVENT_VALID;
        if let Some(c) = code {
            e |= EVENT_EV | ((c as u64) << 32);
        }
        if vector == 14 {
            VMCB.put(S_CR2, cr2);
        }
        self.event = e;
    }

    fn run(&mut self) -> SExit {
        let (code, fired) = run_budgeted(|| {
            VMCB.put(S_RAX, self.regs.rax);
            let ev = if self.event != 0 { self.event } else { self.reinject };
            VMCB.put(C_EVENTINJ, ev);
            self.event = 0;
            self.reinject = 0;
            let before = timer::ticks();
            timer::arm(SLICE_MS);
            // SAFETY: the VMCB describes a consistent guest whose CR3 is a shadow root the
            // shadow MMU built, and the world switch saves and restores every host
            // register the ABI requires.
            unsafe { svm_world_switch(self.vmcb_pa, &mut self.regs) };
            let fired = timer::disarm(before);
            VMCB.put(C_TLB_CONTROL, 0u32);
            self.regs.rax = VMCB.get(S_RAX);
            let info: u64 = VMCB.get(C_EXITINTINFO);
            if info & EVENT_VALID != 0 {
                self.reinject = info;
            }
            (VMCB.get(C_EXITCODE), fired)
        });
        let info1: u64 = VMCB.get(C_EXITINFO1);
        let info2: u64 = VMCB.get(C_EXITINFO2);
        match code {
            EXIT_PF => SExit::PageFault { addr: info2, code: info1 as u32 },
            c if (EXIT_CR_READ..EXIT_CR_READ + 16).contains(&c) => SExit::CrRead((c - EXIT_CR_READ) as u8),
            c if (EXIT_CR_WRITE..EXIT_CR_WRITE + 16).contains(&c) => {
                SExit::CrWrite((c - EXIT_CR_WRITE) as u8)
            }
            EXIT_INVLPG => SExit::Invlpg,
            EXIT_MSR => SExit::Msr,
            EXIT_IOIO if info1 & 1 == 0 => {
                VMCB.put(S_RIP, info2);
                let io = IoInfo::decode(info1);
                SExit::IoOut { port: io.port, value: io.out_value(self.regs.rax) }
            }
            EXIT_HLT => SExit::Halt,
            EXIT_INTR if fired => SExit::Timer,
            EXIT_SHUTDOWN => SExit::Shutdown,
            c if c & 0xffff_ffff == EXIT_INVALID => SExit::EntryFailed { code },
            _ => SExit::Other { code, info1, info2 },
        }
    }

    fn regs(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn rip(&mut self) -> u64 {
        VMCB.get(S_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        VMCB.put(S_RIP, rip);
    }

    fn rsp(&mut self) -> u64 {
        VMCB.get(S_RSP)
    }

    fn set_rsp(&mut self, rsp: u64) {
        VMCB.put(S_RSP, rsp);
    }

    fn code64(&mut self) -> bool {
        VMCB.code64()
    }
}
