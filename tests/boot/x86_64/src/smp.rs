//! The host's second CPU, and the remote TLB flush between the two.
//!
//! **Bring-up.** QEMU's PVH boot starts the boot CPU only; the others wait for a STARTUP
//! IPI (the firmware parked them). [`start_secondary`] copies a trampoline to
//! [`AP_TRAMPOLINE_PA`] (a page below 1 MiB that neither loader nor the image uses) and
//! sends INIT, then STARTUP. The trampoline runs in real mode, loads its own GDT, enters
//! 32-bit protected mode, enables PAE with the boot CPU's identity page tables
//! (`boot_pml4`), sets EFER.LME and paging, and jumps to 64-bit code that calls
//! [`ap_main`] on a stack of its own. The second CPU then loads the image's GDT and IDT
//! (an exception there prints and fails the run like one on the boot CPU) and runs the
//! jobs the boot CPU posts ([`run_on_secondary`]), with interrupts disabled throughout.
//!
//! **Remote flush.** The vCPU (boot CPU) caches nested translations in its TLB while the
//! guest runs; the harvester (second CPU) write-protects leaves or clears their D bits
//! and must not copy a page reported dirty until the round's flush took effect on the
//! vCPU. [`RemoteTlb`] is KVM's request-and-kick protocol: the harvester raises the
//! request; the vCPU checks for requests after announcing "in guest" and before every
//! VMRUN, and turns a pending one into the SVM TLB flush of the guest's ASID
//! (TLB_CONTROL) on that VMRUN. The flush has taken effect for the harvester's purpose
//! once the vCPU acknowledged the request (no guest instruction runs between the
//! acknowledgement and the flushing VMRUN), or once the vCPU is seen outside guest mode
//! after the request was raised (sequentially consistent order: it will see the request
//! before it enters again). A vCPU in guest mode is kicked out by a fixed IPI, which
//! the INTR intercept turns into a #VMEXIT.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::apic::{self, ApicError};
use crate::spin::SpinLock;
use crate::timer::Deadline;

/// Physical address the trampoline is copied to (STARTUP vector = page number).
pub const AP_TRAMPOLINE_PA: u64 = 0x8000;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .global ap_trampoline_start
    .global ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, ${base} + ap_pm32 - ap_trampoline_start
    .code32
ap_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_long_entry
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
ap_gdt_ptr:
    .short ap_gdt_ptr - ap_gdt - 1
    .long {base} + ap_gdt - ap_trampoline_start
ap_trampoline_end:

    .text
    .code64
ap_long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $ap_stack_top, %rsp
    call ap_main
2:
    hlt
    jmp 2b

    .section .bss
    .balign 16
ap_stack:
    .skip 64 * 1024
ap_stack_top:
    .text
"#,
    base = const AP_TRAMPOLINE_PA,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// Why the second CPU could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// The local APIC cannot send the IPIs.
    Apic(ApicError),
    /// The second CPU did not report in after INIT and two STARTUP IPIs.
    NoResponse,
    /// The trampoline does not fit its page.
    TrampolineTooBig(usize),
    /// The second CPU did not take the job in time.
    Busy,
}

impl From<ApicError> for SmpError {
    fn from(e: ApicError) -> Self {
        SmpError::Apic(e)
    }
}

/// Set by the second CPU once it runs Rust code.
static AP_ALIVE: AtomicBool = AtomicBool::new(false);
/// The second CPU's APIC ID, as it read it itself.
static AP_APIC_ID: AtomicU32 = AtomicU32::new(u32::MAX);
/// A job posted for the second CPU.
static AP_JOB: SpinLock<Option<fn()>> = SpinLock::new(None);
/// Set with the job; cleared by the second CPU when it takes it (cheap polling).
static AP_JOB_POSTED: AtomicBool = AtomicBool::new(false);

/// Entry of the second CPU in Rust (from the trampoline, on its own stack).
#[no_mangle]
extern "C" fn ap_main() -> ! {
    crate::gdt::load_secondary();
    crate::idt::load();
    // The APIC only sends IPIs from this CPU; if it cannot be enabled the kick fails and
    // the harvester reports it.
    let _ = apic::enable();
    AP_APIC_ID.store(apic::id(), Ordering::SeqCst);
    AP_ALIVE.store(true, Ordering::SeqCst);
    loop {
        if !AP_JOB_POSTED.load(Ordering::Acquire) {
            core::hint::spin_loop();
            continue;
        }
        let job = AP_JOB.lock().take();
        AP_JOB_POSTED.store(false, Ordering::Release);
        if let Some(job) = job {
            job();
        }
    }
}

/// Starts the CPU with APIC ID `dest` (INIT, then up to two STARTUP IPIs) and waits up
/// to about 200 ms for it to report in. Does nothing if it already runs.
pub fn start_secondary(dest: u32) -> Result<(), SmpError> {
    if AP_ALIVE.load(Ordering::SeqCst) {
        return Ok(());
    }
    apic::enable()?;
    // SAFETY: the two symbols delimit the assembled trampoline in `.rodata`.
    let code = unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let end = core::ptr::addr_of!(ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    };
    if code.len() > 4096 {
        return Err(SmpError::TrampolineTooBig(code.len()));
    }
    // SAFETY: AP_TRAMPOLINE_PA is a page of conventional memory below 1 MiB, identity-
    // mapped, that neither the loaders (which are done) nor the image use; only the
    // second CPU reads it, after the STARTUP IPI below.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE_PA as *mut u8, code.len()) };
    apic::send_init(dest)?;
    let settle = Deadline::after_ms(10);
    while !settle.expired() {
        core::hint::spin_loop();
    }
    for wait_ms in [5, 200] {
        apic::send_startup(dest, (AP_TRAMPOLINE_PA >> 12) as u8)?;
        let d = Deadline::after_ms(wait_ms);
        while !d.expired() {
            if AP_ALIVE.load(Ordering::SeqCst) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
    }
    Err(SmpError::NoResponse)
}

/// The second CPU's APIC ID (once started).
pub fn secondary_apic_id() -> Option<u32> {
    AP_ALIVE.load(Ordering::SeqCst).then(|| AP_APIC_ID.load(Ordering::SeqCst))
}

/// Posts `job` to the second CPU; it runs there with interrupts disabled. Fails if a
/// previous job was not taken within 100 ms.
pub fn run_on_secondary(job: fn()) -> Result<(), SmpError> {
    let d = Deadline::after_ms(100);
    while AP_JOB_POSTED.load(Ordering::Acquire) {
        if d.expired() {
            return Err(SmpError::Busy);
        }
        core::hint::spin_loop();
    }
    *AP_JOB.lock() = Some(job);
    AP_JOB_POSTED.store(true, Ordering::Release);
    Ok(())
}

/// A job that parks the second CPU for good (HLT with interrupts disabled).
pub fn park() {
    loop {
        crate::port::halt();
    }
}

/// How a remote flush completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushDone {
    /// The vCPU acknowledged the request before a flushing VMRUN.
    Acknowledged,
    /// The vCPU was outside guest mode: it flushes before it enters again.
    OutsideGuest,
}

/// Why a remote flush did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushError {
    /// The kick IPI could not be sent.
    Kick(ApicError),
    /// The vCPU neither acknowledged nor left guest mode in time.
    Timeout,
}

/// The request-and-kick state of the one vCPU (see the module documentation).
pub struct RemoteTlb {
    /// The vCPU is in guest mode (or about to VMRUN).
    in_guest: AtomicBool,
    /// Flush requests raised (a sequence number).
    requested: AtomicU64,
    /// The newest request the vCPU turned into a flushing VMRUN.
    acknowledged: AtomicU64,
    /// APIC ID of the CPU that runs the vCPU (kick target).
    vcpu_apic: AtomicU32,
    /// Kick IPIs sent.
    kicks: AtomicU64,
    /// VMRUNs that flushed for a remote request.
    flushes: AtomicU64,
}

/// The vCPU of the boot image (the boot CPU runs it).
pub static VCPU: RemoteTlb = RemoteTlb {
    in_guest: AtomicBool::new(false),
    requested: AtomicU64::new(0),
    acknowledged: AtomicU64::new(0),
    vcpu_apic: AtomicU32::new(0),
    kicks: AtomicU64::new(0),
    flushes: AtomicU64::new(0),
};

impl RemoteTlb {
    /// Records which CPU runs the vCPU (call on that CPU).
    pub fn bind_here(&self) {
        self.vcpu_apic.store(apic::id(), Ordering::SeqCst);
    }

    /// vCPU side, immediately before VMRUN: announces guest mode, then takes any pending
    /// request. Returns whether this VMRUN must flush the guest's nested translations.
    pub fn enter_guest(&self) -> bool {
        self.in_guest.store(true, Ordering::SeqCst);
        let req = self.requested.load(Ordering::SeqCst);
        if req != self.acknowledged.load(Ordering::Relaxed) {
            self.acknowledged.store(req, Ordering::SeqCst);
            self.flushes.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// vCPU side, after #VMEXIT.
    pub fn exit_guest(&self) {
        self.in_guest.store(false, Ordering::SeqCst);
    }

    /// Harvester side: raises a flush request and waits until it took effect on the
    /// vCPU, kicking it out of guest mode if needed; gives up at `deadline`.
    pub fn flush(&self, deadline: Deadline) -> Result<FlushDone, FlushError> {
        let seq = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut kicked = false;
        loop {
            if self.acknowledged.load(Ordering::SeqCst) >= seq {
                return Ok(FlushDone::Acknowledged);
            }
            if !self.in_guest.load(Ordering::SeqCst) {
                return Ok(FlushDone::OutsideGuest);
            }
            if !kicked {
                apic::send_kick(self.vcpu_apic.load(Ordering::SeqCst)).map_err(FlushError::Kick)?;
                self.kicks.fetch_add(1, Ordering::Relaxed);
                kicked = true;
            }
            if deadline.expired() {
                return Err(FlushError::Timeout);
            }
            core::hint::spin_loop();
        }
    }

    /// (kick IPIs sent, VMRUNs that flushed for a request).
    pub fn counters(&self) -> (u64, u64) {
        (self.kicks.load(Ordering::Relaxed), self.flushes.load(Ordering::Relaxed))
    }
}
