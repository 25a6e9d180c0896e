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
use crate::svm::*;
use crate::timer;
use crate::vendor::GuestRegs;

const C_INTERCEPT_CR: usize = 0x000;
const C_INTERCEPT_EXC: usize = 0x008;
const C_EXITINTINFO: usize = 0x088;
const C_EVENTINJ: usize = 0x0a8;
const S_CR2: usize = 0x640;

const MISC1_INVLPG: u32 = 1 << 25;
const MISC1_MSR: u32 = 1 << 28;

const EXIT_CR_READ: u64 = 0x00;
const EXIT_CR_WRITE: u64 = 0x10;
const EXIT_PF: u64 = 0x4e;
const EXIT_INVLPG: u64 = 0x79;
const EXIT_MSR: u64 = 0x7c;
const EXIT_HLT: u64 = 0x78;

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
        SvmShadow { regs: GuestRegs::default(), vmcb_pa: vmcb() as u64, event: 0, reinject: 0 }
    }
}

impl ShadowVendor for SvmShadow {
    fn name(&self) -> &'static str {
        "SVM"
    }

    fn enter_shadow_mode(&mut self) -> Result<(), String> {
        put(C_NP_ENABLE, 0u64);
        put(C_INTERCEPT_CR, (1u32 << 0) | (1 << 3) | (1 << 4) | (1 << 16) | (1 << 19) | (1 << 20));
        put(C_INTERCEPT_EXC, 1u32 << 14);
        put(
            C_INTERCEPT_MISC1,
            MISC1_INTR | MISC1_HLT | MISC1_IOIO | MISC1_SHUTDOWN | MISC1_INVLPG | MISC1_MSR,
        );
        // SAFETY: the MSR permission map is a static the processor reads only during
        // VMRUN, which is not running.
        unsafe { (*core::ptr::addr_of_mut!(MSRPM)).0[MSRPM_EFER_BYTE] |= 3 };
        put(C_CLEAN, 0u32);
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
        Ok(())
    }

    fn reset(&mut self, rip: u64, rsp: u64) {
        self.regs = GuestRegs::default();
        self.event = 0;
        self.reinject = 0;
        put_seg(S_CS, 0x08, 0xc9b, 0xffff_ffff, 0);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            put_seg(off, 0x10, 0xc93, 0xffff_ffff, 0);
        }
        put_seg(S_GDTR, 0, 0, 0, 0);
        put_seg(S_IDTR, 0, 0, 0, 0);
        put_seg(S_LDTR, 0, 0x82, 0, 0);
        put_seg(S_TR, 0, 0x8b, 0x67, 0);
        put(S_CPL, 0u8);
        put(S_DR6, 0xffff_0ff0u64);
        put(S_DR7, 0x400u64);
        put(S_RFLAGS, 0x2u64);
        put(S_RIP, rip);
        put(S_RSP, rsp);
        put(S_RAX, 0u64);
        put(S_CR2, 0u64);
        put(S_GPAT, 0x0007_0406_0007_0406u64);
        put(C_EVENTINJ, 0u64);
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn set_paging(&mut self, hw: &HwPaging, _guest_cr0: u64, _guest_cr4: u64) {
        put(S_CR0, hw.cr0);
        put(S_CR3, hw.cr3);
        put(S_CR4, hw.cr4);
        put(S_EFER, hw.efer | EFER_SVME);
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn flush_tlb(&mut self) {
        put(C_TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn inject(&mut self, vector: u8, code: Option<u32>, cr2: u64) {
        // EVENTINJ: vector, type 3 (exception), EV (error code valid), V.
        let mut e = vector as u64 | (3 << 8) | (1 << 31);
        if let Some(c) = code {
            e |= (1 << 11) | ((c as u64) << 32);
        }
        if vector == 14 {
            put(S_CR2, cr2);
        }
        self.event = e;
    }

    fn run(&mut self) -> SExit {
        let mut slices = 0;
        let (code, fired) = loop {
            put(S_RAX, self.regs.rax);
            let ev = if self.event != 0 { self.event } else { self.reinject };
            put(C_EVENTINJ, ev);
            self.event = 0;
            self.reinject = 0;
            let before = timer::ticks();
            timer::arm(SLICE_MS);
            // SAFETY: the VMCB describes a consistent guest whose CR3 is a shadow root the
            // shadow MMU built, and the world switch saves and restores every host
            // register the ABI requires.
            unsafe { svm_world_switch(self.vmcb_pa, &mut self.regs) };
            let fired = timer::disarm(before);
            put(C_TLB_CONTROL, 0u32);
            self.regs.rax = get(S_RAX);
            let info: u64 = get(C_EXITINTINFO);
            if info & (1 << 31) != 0 {
                self.reinject = info;
            }
            let code: u64 = get(C_EXITCODE);
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
            EXIT_PF => SExit::PageFault { addr: info2, code: info1 as u32 },
            c if (EXIT_CR_READ..EXIT_CR_READ + 16).contains(&c) => SExit::CrRead((c - EXIT_CR_READ) as u8),
            c if (EXIT_CR_WRITE..EXIT_CR_WRITE + 16).contains(&c) => {
                SExit::CrWrite((c - EXIT_CR_WRITE) as u8)
            }
            EXIT_INVLPG => SExit::Invlpg,
            EXIT_MSR => SExit::Msr,
            EXIT_IOIO if info1 & 1 == 0 => {
                put(S_RIP, info2);
                let mask = match (info1 >> 4) & 7 {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => 0xffff_ffff,
                };
                SExit::IoOut { port: (info1 >> 16) as u16, value: (self.regs.rax & mask) as u32 }
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
        get(S_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        put(S_RIP, rip);
    }

    fn rsp(&mut self) -> u64 {
        get(S_RSP)
    }

    fn set_rsp(&mut self, rsp: u64) {
        put(S_RSP, rsp);
    }

    fn code64(&mut self) -> bool {
        get::<u16>(S_CS + 2) & (1 << 9) != 0 && get::<u64>(S_EFER) & (1 << 10) != 0
    }
}
