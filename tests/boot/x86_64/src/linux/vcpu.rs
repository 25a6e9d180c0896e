//! The vCPU as the Linux VMM drives it, written once for every virtualization extension:
//! the exits a Linux guest causes, in vendor-neutral terms, and what the VMM does to the
//! vCPU (registers, event injection, the interrupt window). SVM implements it today
//! ([`super::svm_cpu`]); the MMU under the vCPU is a separate parameter ([`super::mmu`]).

use crate::vendor::GuestRegs;

/// Size of a port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoSize {
    /// One byte.
    B1,
    /// Two bytes.
    B2,
    /// Four bytes.
    B4,
}

impl IoSize {
    /// Mask of the bytes moved.
    pub fn mask(self) -> u32 {
        match self {
            IoSize::B1 => 0xff,
            IoSize::B2 => 0xffff,
            IoSize::B4 => 0xffff_ffff,
        }
    }
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxExit {
    /// Nested page fault (or EPT violation): `info` is the hardware's report.
    NestedFault {
        /// Faulting guest-physical address.
        gpa: u64,
        /// The raw report for arch-x86's exit decoding.
        info: u64,
        /// The access was a write.
        write: bool,
    },
    /// `out` (RIP already advanced).
    IoOut {
        /// Port.
        port: u16,
        /// Size.
        size: IoSize,
        /// Value written.
        value: u32,
    },
    /// `in` (RIP already advanced; the VMM completes it with [`VCpu::complete_in`]).
    IoIn {
        /// Port.
        port: u16,
        /// Size.
        size: IoSize,
    },
    /// A string or REP port instruction (not emulated: Linux's legacy devices do not need it).
    IoString {
        /// Port.
        port: u16,
    },
    /// CPUID (RIP not advanced: [`VCpu::skip`]).
    Cpuid,
    /// RDMSR (RIP not advanced).
    Rdmsr,
    /// WRMSR (RIP not advanced).
    Wrmsr,
    /// HLT (RIP already advanced).
    Halt,
    /// The interrupt window opened (the guest can take an interrupt now).
    InterruptWindow,
    /// Shadow paging: an intercepted #PF at linear `addr` with error code `code`.
    PageFault {
        /// The faulting linear address (the guest's CR2 to be).
        addr: u64,
        /// The error code.
        code: u32,
    },
    /// Shadow paging: a MOV from CRn (RIP not advanced; no decode assists).
    CrRead(u8),
    /// Shadow paging: a MOV to CRn (RIP not advanced).
    CrWrite(u8),
    /// Shadow paging: INVLPG (RIP not advanced).
    Invlpg,
    /// A host interrupt (the run slice ended or another host event).
    HostInterrupt,
    /// Triple fault.
    Shutdown,
    /// VM entry refused the state.
    EntryFailed {
        /// Vendor code.
        code: u64,
    },
    /// Anything else.
    Other {
        /// Vendor exit code.
        code: u64,
        /// First exit information.
        info1: u64,
        /// Second exit information.
        info2: u64,
    },
}

/// An event for the guest's IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An external interrupt (from the PIC).
    Interrupt(u8),
    /// A hardware exception, with its error code if it has one.
    Exception {
        /// Vector.
        vector: u8,
        /// Error code.
        error: Option<u32>,
    },
    /// A page fault with its error code and the guest's new CR2.
    PageFault {
        /// Error code.
        error: u32,
        /// The faulting linear address.
        cr2: u64,
    },
}

/// The guest's control state the VMM reads (for its page walks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// The vCPU of the Linux VMM.
pub trait VCpu {
    /// Runs the guest until the next exit. A host interrupt arriving while the guest
    /// runs ends the run (the caller arms its slice timer around it).
    fn run(&mut self) -> LinuxExit;
    /// General-purpose registers (RAX included).
    fn gprs(&mut self) -> &mut GuestRegs;
    /// RIP.
    fn rip(&self) -> u64;
    /// Advances RIP by `len` bytes (an instruction the VMM emulated).
    fn skip(&mut self, len: u64);
    /// Completes an `in`: merges `value` into RAX as the instruction would.
    fn complete_in(&mut self, size: IoSize, value: u32);
    /// Whether the guest can take an external interrupt now (IF set, no interrupt shadow,
    /// no event already being delivered).
    fn interruptible(&self) -> bool;
    /// Whether RFLAGS.IF is set.
    fn interrupts_enabled(&self) -> bool;
    /// Queues `event` for delivery at the next entry.
    fn inject(&mut self, event: Event);
    /// Whether an event is queued (a re-injection after an exit during delivery, or an
    /// injection not yet taken).
    fn event_pending(&self) -> bool;
    /// Asks for an exit as soon as the guest can take an interrupt (or stops asking).
    fn request_interrupt_window(&mut self, on: bool);
    /// The guest's control registers.
    fn control(&self) -> ControlRegs;
    /// General register `n` in the x86 encoding (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP,
    /// 6 RSI, 7 RDI, 8-15 R8-R15).
    fn reg(&mut self, n: u8) -> u64;
    /// Sets general register `n` (same encoding).
    fn set_reg(&mut self, n: u8, v: u64);
    /// Reads an MSR the hardware keeps in the vCPU's state (`None`: not such an MSR).
    fn state_msr(&self, msr: u32) -> Option<u64>;
    /// Writes an MSR the hardware keeps in the vCPU's state; false if not such an MSR.
    fn set_state_msr(&mut self, msr: u32, value: u64) -> bool;
    /// Invalidates the vCPU's cached nested translations before the next entry (under
    /// shadow paging: the guest's whole TLB).
    fn flush_nested(&mut self);
    /// Shadow paging: sets the control registers as the guest sees them (what
    /// [`VCpu::control`] returns; nothing without shadow paging).
    fn set_guest_control(&mut self, c: ControlRegs);
    /// Shadow paging: the paging state the processor runs the guest with (CR3 = the
    /// shadow root).
    fn set_paging(&mut self, hw: &ControlRegs);
    /// Whether the guest runs 64-bit code (CS.L in long mode).
    fn code64(&self) -> bool;
    /// RFLAGS.
    fn rflags(&self) -> u64;
}
