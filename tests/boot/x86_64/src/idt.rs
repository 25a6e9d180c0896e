//! Host exception handlers: any CPU exception in the host is a bug; it is printed with the
//! faulting RIP and the run ends as failed (never a silent triple fault or a hang).

use core::arch::{asm, global_asm};

global_asm!(
    r#"
    .text
isr0:
    push $0
    push $0
    jmp isr_common
isr1:
    push $0
    push $1
    jmp isr_common
isr2:
    push $0
    push $2
    jmp isr_common
isr3:
    push $0
    push $3
    jmp isr_common
isr4:
    push $0
    push $4
    jmp isr_common
isr5:
    push $0
    push $5
    jmp isr_common
isr6:
    push $0
    push $6
    jmp isr_common
isr7:
    push $0
    push $7
    jmp isr_common
isr8:
    push $8
    jmp isr_common
isr9:
    push $0
    push $9
    jmp isr_common
isr10:
    push $10
    jmp isr_common
isr11:
    push $11
    jmp isr_common
isr12:
    push $12
    jmp isr_common
isr13:
    push $13
    jmp isr_common
isr14:
    push $14
    jmp isr_common
isr15:
    push $0
    push $15
    jmp isr_common
isr16:
    push $0
    push $16
    jmp isr_common
isr17:
    push $17
    jmp isr_common
isr18:
    push $0
    push $18
    jmp isr_common
isr19:
    push $0
    push $19
    jmp isr_common
isr20:
    push $0
    push $20
    jmp isr_common
isr21:
    push $21
    jmp isr_common
isr22:
    push $0
    push $22
    jmp isr_common
isr23:
    push $0
    push $23
    jmp isr_common
isr24:
    push $0
    push $24
    jmp isr_common
isr25:
    push $0
    push $25
    jmp isr_common
isr26:
    push $0
    push $26
    jmp isr_common
isr27:
    push $0
    push $27
    jmp isr_common
isr28:
    push $0
    push $28
    jmp isr_common
isr29:
    push $29
    jmp isr_common
isr30:
    push $30
    jmp isr_common
isr31:
    push $0
    push $31
    jmp isr_common
isr_common:
    mov %rsp, %rdi
    and $-16, %rsp
    call host_exception

    .section .rodata
    .balign 8
    .global isr_table
isr_table:
    .quad isr0
    .quad isr1
    .quad isr2
    .quad isr3
    .quad isr4
    .quad isr5
    .quad isr6
    .quad isr7
    .quad isr8
    .quad isr9
    .quad isr10
    .quad isr11
    .quad isr12
    .quad isr13
    .quad isr14
    .quad isr15
    .quad isr16
    .quad isr17
    .quad isr18
    .quad isr19
    .quad isr20
    .quad isr21
    .quad isr22
    .quad isr23
    .quad isr24
    .quad isr25
    .quad isr26
    .quad isr27
    .quad isr28
    .quad isr29
    .quad isr30
    .quad isr31
    .text
"#,
    options(att_syntax)
);

#[repr(C)]
struct Frame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
}

#[no_mangle]
extern "C" fn host_exception(frame: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    crate::println!(
        "HOST EXCEPTION vector {} error {:#x} rip {:#x} rsp {:#x} rflags {:#x} cr2 {:#x}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.rsp,
        frame.rflags,
        cr2
    );
    crate::println!("0 passed, 1 failed");
    crate::console::exit(false)
}

static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];

global_asm!(
    r#"
    .text
    .global apic_kick_stub
apic_kick_stub:
    push %rax
    lock incl {kicks}(%rip)
    mov ${eoi}, %eax
    movl $0, (%rax)
    pop %rax
    iretq
    .global apic_spurious_stub
apic_spurious_stub:
    iretq
"#,
    kicks = sym crate::apic::KICKS_TAKEN,
    eoi = const crate::apic::EOI_ADDRESS,
    options(att_syntax)
);

extern "C" {
    static isr_table: [u64; 32];
    fn irq0_stub();
    fn spurious_stub();
    fn apic_kick_stub();
    fn apic_spurious_stub();
}

fn gate(handler: u64) -> [u64; 2] {
    [
        (handler & 0xffff)
            | ((crate::gdt::KERNEL_CS as u64) << 16)
            | (0x8eu64 << 40)
            | (((handler >> 16) & 0xffff) << 48),
        handler >> 32,
    ]
}

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Installs interrupt gates for the 32 exception vectors, IRQ0, the PIC's spurious IRQ7,
/// the APIC kick IPI and the APIC's spurious vector, and loads the IDT.
pub fn init() {
    // SAFETY: single-threaded boot; `isr_table` is the constant table above; the IDT is a
    // static that lives forever, and its gates point at the stubs of this module.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let table = &*core::ptr::addr_of!(isr_table);
        for (entry, &handler) in idt.iter_mut().zip(table.iter()) {
            *entry = gate(handler);
        }
        idt[crate::timer::IRQ0_VECTOR as usize] = gate(irq0_stub as *const () as u64);
        idt[crate::timer::SPURIOUS_VECTOR as usize] = gate(spurious_stub as *const () as u64);
        idt[crate::apic::KICK_VECTOR as usize] = gate(apic_kick_stub as *const () as u64);
        idt[crate::apic::SPURIOUS_VECTOR as usize] = gate(apic_spurious_stub as *const () as u64);
    }
    load();
}

/// Loads the IDT on the calling CPU (the boot CPU after `init`, the second CPU when it
/// starts: both share the gates).
pub fn load() {
    let ptr = IdtPointer { limit: (core::mem::size_of::<[[u64; 2]; 256]>() - 1) as u16, base: base() };
    // SAFETY: the IDT is a static that lives forever, filled by `init` before any CPU
    // loads it; its gates point at this module's stubs.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(nostack)) };
}

/// Base address of the IDT (the VMX host-state area needs it).
pub fn base() -> u64 {
    core::ptr::addr_of!(IDT) as u64
}
