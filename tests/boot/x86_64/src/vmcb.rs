//! The AMD VMCB (APM Vol. 2, appendix B) as the three SVM users of the image drive it:
//! the nested-paging vendor ([`crate::svm`]), its shadow-paging mode
//! ([`crate::svm_shadow`], same VMCB) and the Linux guest's vCPU
//! ([`crate::linux::svm_cpu`], a VMCB of its own). Field offsets, intercept bits, exit
//! codes and event-injection bits, the page types the processor reads, and typed access
//! to a VMCB page.

use core::cell::UnsafeCell;

pub(crate) const MSR_EFER: u32 = 0xc000_0080;
pub(crate) const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
pub(crate) const EFER_SVME: u64 = 1 << 12;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const EFER_NXE: u64 = 1 << 11;

// Control area offsets (table B-1).
pub(crate) const C_INTERCEPT_CR: usize = 0x000;
pub(crate) const C_INTERCEPT_EXC: usize = 0x008;
pub(crate) const C_INTERCEPT_MISC1: usize = 0x00c;
pub(crate) const C_INTERCEPT_MISC2: usize = 0x010;
pub(crate) const C_IOPM_BASE: usize = 0x040;
pub(crate) const C_MSRPM_BASE: usize = 0x048;
pub(crate) const C_ASID: usize = 0x058;
pub(crate) const C_TLB_CONTROL: usize = 0x05c;
pub(crate) const C_VINTR: usize = 0x060;
pub(crate) const C_INT_SHADOW: usize = 0x068;
pub(crate) const C_EXITCODE: usize = 0x070;
pub(crate) const C_EXITINFO1: usize = 0x078;
pub(crate) const C_EXITINFO2: usize = 0x080;
pub(crate) const C_EXITINTINFO: usize = 0x088;
pub(crate) const C_NP_ENABLE: usize = 0x090;
pub(crate) const C_EVENTINJ: usize = 0x0a8;
pub(crate) const C_NCR3: usize = 0x0b0;
pub(crate) const C_CLEAN: usize = 0x0c0;

// State-save area offsets (table B-2).
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
pub(crate) const S_STAR: usize = 0x600;
pub(crate) const S_LSTAR: usize = 0x608;
pub(crate) const S_CSTAR: usize = 0x610;
pub(crate) const S_SFMASK: usize = 0x618;
pub(crate) const S_KERNEL_GS_BASE: usize = 0x620;
pub(crate) const S_SYSENTER_CS: usize = 0x628;
pub(crate) const S_SYSENTER_ESP: usize = 0x630;
pub(crate) const S_SYSENTER_EIP: usize = 0x638;
pub(crate) const S_CR2: usize = 0x640;
pub(crate) const S_GPAT: usize = 0x668;

// Intercept bits (table B-1, vectors 3 and 4).
pub(crate) const MISC1_INTR: u32 = 1 << 0;
pub(crate) const MISC1_VINTR: u32 = 1 << 4;
pub(crate) const MISC1_CPUID: u32 = 1 << 18;
pub(crate) const MISC1_HLT: u32 = 1 << 24;
pub(crate) const MISC1_INVLPG: u32 = 1 << 25;
pub(crate) const MISC1_IOIO: u32 = 1 << 27;
pub(crate) const MISC1_MSR: u32 = 1 << 28;
pub(crate) const MISC1_SHUTDOWN: u32 = 1 << 31;
pub(crate) const MISC2_VMRUN: u32 = 1 << 0;
pub(crate) const MISC2_VMMCALL: u32 = 1 << 1;
/// CR intercepts of shadow paging: reads (bits 0-15) and writes (16-31) of CR0, CR3, CR4.
pub(crate) const INTERCEPT_CR0_CR3_CR4: u32 =
    (1 << 0) | (1 << 3) | (1 << 4) | (1 << 16) | (1 << 19) | (1 << 20);
/// Exception intercept of #PF (vector 14).
pub(crate) const INTERCEPT_EXC_PF: u32 = 1 << 14;

// V_INTR fields (offset 0x60, APM 15.21).
pub(crate) const VINTR_V_IRQ: u64 = 1 << 8;
pub(crate) const VINTR_IGN_TPR: u64 = 1 << 20;
/// V_INTR_MASKING: physical interrupts follow the host's IF, the guest's IF is virtual.
pub(crate) const VINTR_MASKING: u64 = 1 << 24;

// Exit codes (appendix C).
pub(crate) const EXIT_CR_READ: u64 = 0x00;
pub(crate) const EXIT_CR_WRITE: u64 = 0x10;
pub(crate) const EXIT_PF: u64 = 0x4e;
pub(crate) const EXIT_INTR: u64 = 0x60;
pub(crate) const EXIT_VINTR: u64 = 0x64;
pub(crate) const EXIT_CPUID: u64 = 0x72;
pub(crate) const EXIT_HLT: u64 = 0x78;
pub(crate) const EXIT_INVLPG: u64 = 0x79;
pub(crate) const EXIT_IOIO: u64 = 0x7b;
pub(crate) const EXIT_MSR: u64 = 0x7c;
pub(crate) const EXIT_SHUTDOWN: u64 = 0x7f;
pub(crate) const EXIT_VMMCALL: u64 = 0x81;
pub(crate) const EXIT_NPF: u64 = 0x400;
pub(crate) const EXIT_INVALID: u64 = 0xffff_ffff;

/// EVENTINJ / EXITINTINFO: valid (APM 15.20).
pub(crate) const EVENT_VALID: u64 = 1 << 31;
/// Error code valid.
pub(crate) const EVENT_EV: u64 = 1 << 11;
/// Event type: external interrupt 0, exception 3.
pub(crate) const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;

/// TLB_CONTROL value: flush the whole TLB on this VMRUN (APM 15.16.1).
pub(crate) const TLB_FLUSH_ALL: u32 = 1;

/// A 4 KiB page the processor reads (host save area, VMLOAD/VMSAVE area).
#[repr(C, align(4096))]
pub(crate) struct Page(pub(crate) [u8; 4096]);

/// The I/O permission map (APM 15.10.1): 12 KiB, one bit per port.
#[repr(C, align(4096))]
pub(crate) struct Iopm(pub(crate) [u8; 3 * 4096]);

/// The MSR permission map (APM 15.11): 8 KiB, two bits (read, write) per MSR.
#[repr(C, align(4096))]
pub(crate) struct Msrpm(pub(crate) [u8; 2 * 4096]);

/// One VMCB page, written and read by field offset.
#[repr(C, align(4096))]
pub(crate) struct Vmcb(UnsafeCell<[u8; 4096]>);

// SAFETY: each VMCB belongs to one vCPU, driven by the one CPU that runs it; the image
// touches it only between VMRUNs, and no other CPU reads or writes it.
unsafe impl Sync for Vmcb {}

impl Vmcb {
    /// A zeroed VMCB.
    pub(crate) const fn new() -> Self {
        Vmcb(UnsafeCell::new([0; 4096]))
    }

    /// The physical address of the page (the image is identity-mapped).
    pub(crate) fn pa(&self) -> u64 {
        self.0.get() as u64
    }

    /// Writes the field at `off`.
    pub(crate) fn put<T: Copy>(&self, off: usize, v: T) {
        assert!(off + size_of::<T>() <= 4096, "VMCB offset {off:#x} outside the page");
        // SAFETY: the field lies within the page (checked above); the processor accesses
        // the VMCB only during VMRUN/VMLOAD/VMSAVE, none of which runs now (see `Sync`).
        unsafe { (self.0.get().cast::<u8>().add(off) as *mut T).write_unaligned(v) }
    }

    /// Reads the field at `off`.
    pub(crate) fn get<T: Copy>(&self, off: usize) -> T {
        assert!(off + size_of::<T>() <= 4096, "VMCB offset {off:#x} outside the page");
        // SAFETY: as in `put`.
        unsafe { (self.0.get().cast::<u8>().add(off) as *const T).read_unaligned() }
    }

    /// Writes a segment register at `off`: selector, attributes (descriptor bits 40-47
    /// and 52-55 packed), limit, base.
    pub(crate) fn put_seg(&self, off: usize, sel: u16, attrib: u16, limit: u32, base: u64) {
        self.put(off, sel);
        self.put(off + 2, attrib);
        self.put(off + 4, limit);
        self.put(off + 8, base);
    }

    /// Loads the state every guest of the image starts with: flat 4 GiB segments (CS
    /// `code`, the others `data`, as (selector, attributes)), GDTR `gdt` (base, limit),
    /// no IDT, an unusable LDTR, a busy 32-bit TSS, CPL 0, DR6, DR7 and RFLAGS at their
    /// reset values, the reset PAT, and `rip`, `rsp`, RAX = 0.
    pub(crate) fn reset_state(
        &self,
        code: (u16, u16),
        data: (u16, u16),
        gdt: (u64, u32),
        rip: u64,
        rsp: u64,
    ) {
        self.put_seg(S_CS, code.0, code.1, 0xffff_ffff, 0);
        for off in [S_ES, S_SS, S_DS, S_FS, S_GS] {
            self.put_seg(off, data.0, data.1, 0xffff_ffff, 0);
        }
        self.put_seg(S_GDTR, 0, 0, gdt.1, gdt.0);
        self.put_seg(S_IDTR, 0, 0, 0, 0);
        self.put_seg(S_LDTR, 0, 0x82, 0, 0);
        self.put_seg(S_TR, 0, 0x8b, 0x67, 0);
        self.put(S_CPL, 0u8);
        self.put(S_DR6, 0xffff_0ff0u64);
        self.put(S_DR7, 0x400u64);
        self.put(S_RFLAGS, 0x2u64);
        self.put(S_RIP, rip);
        self.put(S_RSP, rsp);
        self.put(S_RAX, 0u64);
        self.put(S_GPAT, 0x0007_0406_0007_0406u64);
    }

    /// Sets the controls every SVM user of the image starts from: the `misc1` intercepts
    /// with VMRUN and VMMCALL, the I/O and MSR permission maps at `iopm` and `msrpm`, ASID
    /// 1, V_INTR masking, nested paging on, nothing clean (APM 15.15.3).
    pub(crate) fn init_controls(&self, misc1: u32, iopm: u64, msrpm: u64) {
        self.put(C_INTERCEPT_MISC1, misc1);
        self.put(C_INTERCEPT_MISC2, MISC2_VMRUN | MISC2_VMMCALL);
        self.put(C_IOPM_BASE, iopm);
        self.put(C_MSRPM_BASE, msrpm);
        self.put(C_ASID, 1u32);
        self.put(C_VINTR, VINTR_MASKING);
        self.put(C_NP_ENABLE, 1u64);
        self.put(C_CLEAN, 0u32);
    }

    /// Whether the guest runs 64-bit code: CS.L (attribute bit 9) with EFER.LMA.
    pub(crate) fn code64(&self) -> bool {
        self.get::<u16>(S_CS + 2) & (1 << 9) != 0 && self.get::<u64>(S_EFER) & EFER_LMA != 0
    }
}

/// An IOIO intercept's EXITINFO1 (APM 15.10.2).
#[derive(Clone, Copy, Debug)]
pub(crate) struct IoInfo {
    /// The port.
    pub(crate) port: u16,
    /// IN rather than OUT.
    pub(crate) input: bool,
    /// INS/OUTS or a REP prefix.
    pub(crate) string: bool,
    /// The access size in bytes: 1, 2 or 4.
    pub(crate) bytes: u8,
}

impl IoInfo {
    /// Decodes EXITINFO1.
    pub(crate) fn decode(info1: u64) -> Self {
        let bytes = match (info1 >> 4) & 7 {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        IoInfo { port: (info1 >> 16) as u16, input: info1 & 1 != 0, string: info1 & 0b1100 != 0, bytes }
    }

    /// The value an OUT wrote, from the guest's RAX.
    pub(crate) fn out_value(&self, rax: u64) -> u32 {
        (rax & (u64::MAX >> (64 - 8 * self.bytes as u32))) as u32
    }
}
