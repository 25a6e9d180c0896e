//! The interface the scenarios use to run a guest, written once for both vendors:
//! AMD SVM with nested paging ([`crate::svm`]) and Intel VMX with EPT ([`crate::vmx`]).

/// The guest's general-purpose registers that the hardware does not keep in the
/// VMCB/VMCS (RSP and RIP live there; on SVM so does RAX, the vendor copies it here).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8 to R15.
    pub r: [u64; 8],
}

// The world switches' assembly below hard-codes these offsets.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GuestRegs, rax) == 0 && offset_of!(GuestRegs, rbx) == 8);
    assert!(offset_of!(GuestRegs, rcx) == 16 && offset_of!(GuestRegs, rdx) == 24);
    assert!(offset_of!(GuestRegs, rsi) == 32 && offset_of!(GuestRegs, rdi) == 40);
    assert!(offset_of!(GuestRegs, rbp) == 48 && offset_of!(GuestRegs, r) == 56);
};

/// AT&T assembly opening a world switch: pushes the registers the System V ABI has the
/// callee keep (RBP, RBX, R12-R15); `pop_callee_saved!` closes it.
macro_rules! push_callee_saved {
    () => {
        "
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
"
    };
}

/// The inverse of `push_callee_saved!`, before the `ret`.
macro_rules! pop_callee_saved {
    () => {
        "
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
"
    };
}

/// AT&T assembly for a world switch (`svm`, `linux::svm_cpu`, `vmx`): loads the guest's
/// RBX, RCX, RDX, RBP and R8-R15 from the [`GuestRegs`] at `%$base` (`"rsi"` or
/// `"rdi"`). RAX, RSI and RDI are each vendor's own business (the VMCB holds RAX on
/// SVM; the base register is loaded last).
#[rustfmt::skip]
macro_rules! load_guest_gprs {
    ($base:literal) => {
        concat!(
            "    mov 8(%", $base, "), %rbx\n",
            "    mov 16(%", $base, "), %rcx\n",
            "    mov 24(%", $base, "), %rdx\n",
            "    mov 48(%", $base, "), %rbp\n",
            "    mov 56(%", $base, "), %r8\n",
            "    mov 64(%", $base, "), %r9\n",
            "    mov 72(%", $base, "), %r10\n",
            "    mov 80(%", $base, "), %r11\n",
            "    mov 88(%", $base, "), %r12\n",
            "    mov 96(%", $base, "), %r13\n",
            "    mov 104(%", $base, "), %r14\n",
            "    mov 112(%", $base, "), %r15\n",
        )
    };
}

/// The inverse of `load_guest_gprs!`: stores RBX, RCX, RDX, RBP and R8-R15 into the
/// [`GuestRegs`] at `%$base`.
#[rustfmt::skip]
macro_rules! store_guest_gprs {
    ($base:literal) => {
        concat!(
            "    mov %rbx, 8(%", $base, ")\n",
            "    mov %rcx, 16(%", $base, ")\n",
            "    mov %rdx, 24(%", $base, ")\n",
            "    mov %rbp, 48(%", $base, ")\n",
            "    mov %r8, 56(%", $base, ")\n",
            "    mov %r9, 64(%", $base, ")\n",
            "    mov %r10, 72(%", $base, ")\n",
            "    mov %r11, 80(%", $base, ")\n",
            "    mov %r12, 88(%", $base, ")\n",
            "    mov %r13, 96(%", $base, ")\n",
            "    mov %r14, 104(%", $base, ")\n",
            "    mov %r15, 112(%", $base, ")\n",
        )
    };
}

/// The nested page-table format a vendor walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFormat {
    /// AMD nested paging: long-mode PTEs (U bit required), hardware A and D.
    Npt,
    /// Intel EPT; `ad` when the EPTP enables accessed/dirty flags.
    Ept {
        /// EPT A/D flags enabled.
        ad: bool,
    },
}

/// Why the guest stopped, in terms common to both vendors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A nested page fault (#NPF, exit 0x400) or EPT violation (exit 48).
    NestedFault {
        /// Faulting guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
        /// The access was an instruction fetch.
        fetch: bool,
        /// A translation existed (permission fault), as opposed to not present.
        present: bool,
        /// The raw report: EXITINFO1 (NPF error code) or the EPT-violation exit
        /// qualification, for arch-x86's exit decoding.
        info: u64,
    },
    /// The guest wrote a value to an I/O port (RIP already advanced).
    IoOut {
        /// Port number.
        port: u16,
        /// Value (from RAX, truncated to the access size).
        value: u32,
    },
    /// VMMCALL or VMCALL (RIP already advanced); the number is in RAX.
    Hypercall,
    /// HLT (RIP already advanced).
    Halt,
    /// The run's time budget expired (the guest did not exit on its own).
    Timer,
    /// The guest shut down (triple fault).
    Shutdown,
    /// VM entry failed (inconsistent guest state or controls).
    EntryFailed {
        /// Vendor-specific code (SVM exit code, VMX exit reason or instruction error).
        code: u64,
    },
    /// Anything else.
    Other {
        /// Vendor exit code / reason.
        code: u64,
        /// First piece of exit information (EXITINFO1 / exit qualification).
        info1: u64,
        /// Second piece (EXITINFO2 / guest-physical address).
        info2: u64,
    },
}

/// How a guest starts: 32-bit flat protected mode, paging off (guest-physical = linear).
#[derive(Clone, Copy, Debug)]
pub struct GuestStart {
    /// Entry point (guest-physical).
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
}

/// One virtualization extension, as the scenarios drive it.
pub trait Vendor {
    /// "SVM" or "VMX".
    fn name(&self) -> &'static str;
    /// The nested page-table format this vendor walks.
    fn format(&self) -> NestedFormat;
    /// Points the hardware at the nested tables: `pointer` is the nCR3 value (SVM) or the
    /// EPTP (VMX), as the nested MMU built it.
    fn set_nested_root(&mut self, pointer: u64);
    /// Resets the guest to its initial state.
    fn reset_guest(&mut self, start: GuestStart);
    /// Runs the guest until the next exit, bounded by a time budget.
    fn run(&mut self) -> Exit;
    /// The guest's registers (hypercall arguments and results).
    fn regs(&mut self) -> &mut GuestRegs;
    /// Invalidates every cached nested translation before the next run
    /// (SVM: TLB_CONTROL flush of the ASID; VMX: INVEPT single-context).
    fn flush_nested_tlb(&mut self);
}
