//! The guest of the shadow-paging runs: a small program that behaves like an OS kernel.
//!
//! The hypervisor starts it in 32-bit protected mode with its own 32-bit paging on (as
//! VMX without EPT requires), CR3 = a page directory the loader (the host, acting as the
//! guest's boot loader) left in guest memory. The guest loads its own GDT and IDT (a #PF
//! handler, a #GP handler and a catch-all), then loops: run the script in the mailbox (a
//! list of operations: loads, stores, stores to its own page-table entries, INVLPG, MOV
//! to CR3, full flushes, calls into pages that may be no-execute, a switch to PAE paging
//! or to 4-level long mode done by the guest itself), store each result, and report with
//! `out` to [`DONE_PORT`] (EAX = how many `OP_BITS` checks failed).
//!
//! **The #PF handler** appends (CR2, error code) to the fault log and looks the page up
//! in the fix list of the mailbox: a fix names the page-table entry to rewrite and its
//! new value; the handler writes it, INVLPGs the address and returns, so the faulting
//! instruction is retried. A fault on a page without a fix is reported to
//! [`FAULT_PORT`] (EAX = CR2) and the guest halts: the scenario fails with that address.
//! The #GP handler reports 13 to [`EXC_PORT`], the catch-all 0xff.
//!
//! The same loop exists as 32-bit code (32-bit and PAE paging) and as 64-bit code (after
//! `OP_TO_LONG`); every address is identity-mapped in the guest's kernel mapping, so the
//! code is position-dependent on [`CODE_GPA`] and assembled with offsets from its start.

use core::arch::global_asm;

/// Where the guest code is copied (guest-physical and guest-linear).
pub const CODE_GPA: u64 = 0x1000;
/// The mailbox: word 0 = operations, word 1 = fixes; operations at +0x40, fixes at +0xc00.
pub const MAILBOX: u64 = 0x4000;
/// Offset of the operations in the mailbox (32 bytes each: op, pad, a, b, c).
pub const OPS_OFF: u64 = 0x40;
/// Most operations in one script.
pub const MAX_OPS: usize = ((FIX_OFF - OPS_OFF) / 32) as usize;
/// Offset of the fixes in the mailbox (32 bytes each: page, entry address, value, entry bytes).
pub const FIX_OFF: u64 = 0xc00;
/// Most fixes.
pub const MAX_FIXES: usize = 32;
/// Results: one 64-bit word per operation.
pub const RESULTS: u64 = 0x5000;
/// The fault log: word 0 = count, then (CR2, error code) as two 64-bit words each.
pub const FAULT_LOG: u64 = 0x6000;
/// Most faults the log keeps (later ones are only counted).
pub const MAX_LOGGED: u64 = 255;
/// The guest's 32-bit IDT.
pub const IDT32: u64 = 0x7100;
/// The guest's 64-bit IDT.
pub const IDT64: u64 = 0x7400;
/// Top of the guest's stack.
pub const STACK_TOP: u64 = 0x9000;
/// End of the code area.
pub const CODE_END: u64 = 0x4000;
/// Port the script result goes to.
pub const DONE_PORT: u16 = 0x520;
/// Port an unexpected page fault goes to (EAX = CR2).
pub const FAULT_PORT: u16 = 0x521;
/// Port an unexpected exception goes to (EAX = vector, 0xff for any but #GP and #PF).
pub const EXC_PORT: u16 = 0x522;

/// Loads the 32-bit word at `a` (result = the word).
pub const OP_READ32: u32 = 1;
/// Stores the 32-bit `b` at `a`.
pub const OP_WRITE32: u32 = 2;
/// Loads the 64-bit word at `a` (32-bit code: two loads, low first).
pub const OP_READ64: u32 = 3;
/// Stores the 64-bit `b` at `a` (32-bit code: high half first when `b` sets P, as an OS
/// does for a PAE entry, so the entry never is present with half an address).
pub const OP_WRITE64: u32 = 4;
/// INVLPG `a`.
pub const OP_INVLPG: u32 = 5;
/// MOV `a` to CR3.
pub const OP_SET_CR3: u32 = 6;
/// MOV from CR3 (result = CR3).
pub const OP_GET_CR3: u32 = 7;
/// Calls `a` (the page holds a `ret`).
pub const OP_FETCH: u32 = 8;
/// Reloads CR3 with itself: a full TLB flush.
pub const OP_FLUSH: u32 = 9;
/// Loads the 32-bit word at `a`, masks it with `b` (result); counts a failed check if
/// that differs from `c`.
pub const OP_BITS: u32 = 10;
/// Switches to PAE paging with CR3 = `a` (paging off, CR4.PAE, EFER.NXE, CR3, paging on).
pub const OP_TO_PAE: u32 = 11;
/// Switches to 4-level long mode with CR3 = `a` (paging off, CR4.PAE, CR3, EFER.LME and
/// NXE, paging on, far jump to a 64-bit code segment); the script goes on in 64-bit code.
pub const OP_TO_LONG: u32 = 12;
/// [`OP_TO_LONG`] with CR4.LA57 set as well: 5-level paging.
pub const OP_TO_LA57: u32 = 13;

global_asm!(
    r#"
    .section .rodata.sguest, "a"
    .global sguest_start
    .global sguest_end
    .code32
sguest_start:
    mov ${stack}, %esp
    lgdt (sg_gdt_desc - sguest_start + {code})
    ljmp $0x08, $(sg_cs32 - sguest_start + {code})
sg_cs32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    // 32-bit IDT: vector 14 -> #PF handler, 13 -> #GP handler, others -> catch-all.
    xor %ecx, %ecx
sg_idt32_loop:
    mov $(sg_other32 - sguest_start + {code}), %eax
    cmp $14, %ecx
    jne 1f
    mov $(sg_pf32 - sguest_start + {code}), %eax
1:
    cmp $13, %ecx
    jne 2f
    mov $(sg_gp32 - sguest_start + {code}), %eax
2:
    mov %eax, %edx
    and $0xffff, %eax
    or $0x00080000, %eax
    mov %eax, {idt32}(,%ecx,8)
    and $0xffff0000, %edx
    or $0x8e00, %edx
    mov %edx, {idt32}+4(,%ecx,8)
    inc %ecx
    cmp $32, %ecx
    jb sg_idt32_loop
    lidt (sg_idt32_desc - sguest_start + {code})
sg_loop32:
    mov ${mailbox}, %esi
    mov (%esi), %ecx
    add ${ops_off}, %esi
    mov ${results}, %edi
    xor %ebp, %ebp
    test %ecx, %ecx
    jz sg_done32
sg_op32:
    mov (%esi), %eax
    mov 8(%esi), %ebx
    mov 16(%esi), %edx
    cmp ${op_read32}, %eax
    je sg_read32_32
    cmp ${op_write32}, %eax
    je sg_write32_32
    cmp ${op_read64}, %eax
    je sg_read64_32
    cmp ${op_write64}, %eax
    je sg_write64_32
    cmp ${op_invlpg}, %eax
    je sg_invlpg32
    cmp ${op_set_cr3}, %eax
    je sg_setcr3_32
    cmp ${op_get_cr3}, %eax
    je sg_getcr3_32
    cmp ${op_fetch}, %eax
    je sg_fetch32
    cmp ${op_flush}, %eax
    je sg_flush32
    cmp ${op_bits}, %eax
    je sg_bits32
    cmp ${op_to_pae}, %eax
    je sg_to_pae
    cmp ${op_to_long}, %eax
    je sg_to_long
    cmp ${op_to_la57}, %eax
    je sg_to_la57
    inc %ebp
    jmp sg_next32
sg_read32_32:
    mov (%ebx), %eax
    mov %eax, (%edi)
    movl $0, 4(%edi)
    jmp sg_next32
sg_write32_32:
    mov %edx, (%ebx)
    jmp sg_next32
sg_read64_32:
    mov (%ebx), %eax
    mov %eax, (%edi)
    mov 4(%ebx), %eax
    mov %eax, 4(%edi)
    jmp sg_next32
sg_write64_32:
    mov 20(%esi), %eax
    test $1, %edx
    jz 1f
    mov %eax, 4(%ebx)
    mov %edx, (%ebx)
    jmp sg_next32
1:
    mov %edx, (%ebx)
    mov %eax, 4(%ebx)
    jmp sg_next32
sg_invlpg32:
    invlpg (%ebx)
    jmp sg_next32
sg_setcr3_32:
    mov %ebx, %cr3
    jmp sg_next32
sg_getcr3_32:
    mov %cr3, %eax
    mov %eax, (%edi)
    movl $0, 4(%edi)
    jmp sg_next32
sg_fetch32:
    call *%ebx
    jmp sg_next32
sg_flush32:
    mov %cr3, %eax
    mov %eax, %cr3
    jmp sg_next32
sg_bits32:
    mov (%ebx), %eax
    and %edx, %eax
    mov %eax, (%edi)
    movl $0, 4(%edi)
    cmp 24(%esi), %eax
    je sg_next32
    inc %ebp
    jmp sg_next32
sg_to_pae:
    push %ecx
    mov %cr0, %eax
    and $0x7fffffff, %eax
    mov %eax, %cr0
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x800, %eax
    wrmsr
    mov %ebx, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    pop %ecx
    jmp sg_next32
sg_to_la57:
    mov $0x1020, %eax
    jmp 1f
sg_to_long:
    mov $0x20, %eax
1:
    push %ecx
    push %eax
    mov %cr0, %eax
    and $0x7fffffff, %eax
    mov %eax, %cr0
    pop %ecx
    mov %cr4, %eax
    or %ecx, %eax
    mov %eax, %cr4
    mov %ebx, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x900, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    pop %ecx
    ljmp $0x18, $(sg_long64 - sguest_start + {code})
sg_next32:
    add $32, %esi
    add $8, %edi
    dec %ecx
    jnz sg_op32
sg_done32:
    mov %ebp, %eax
    mov ${done_port}, %dx
    out %eax, %dx
    jmp sg_loop32

    // #PF: log (CR2, error code), apply the fix for the page, INVLPG, retry.
sg_pf32:
    push %eax
    push %ebx
    push %ecx
    push %edx
    mov %cr2, %eax
    mov {log}, %ebx
    cmp ${max_logged}, %ebx
    jae 1f
    shl $4, %ebx
    mov %eax, {log}+16(%ebx)
    movl $0, {log}+20(%ebx)
    mov 16(%esp), %ecx
    mov %ecx, {log}+24(%ebx)
    movl $0, {log}+28(%ebx)
1:
    incl {log}
    mov %eax, %edx
    and $0xfffff000, %edx
    mov ${mailbox}+{fix_off}, %ebx
    mov {mailbox}+4, %ecx
2:
    test %ecx, %ecx
    jz sg_pf32_unexpected
    cmp (%ebx), %edx
    je 3f
    add $32, %ebx
    dec %ecx
    jmp 2b
3:
    mov 8(%ebx), %ecx
    cmpl $8, 24(%ebx)
    jne 4f
    mov 20(%ebx), %edx
    mov %edx, 4(%ecx)
4:
    mov 16(%ebx), %edx
    mov %edx, (%ecx)
    invlpg (%eax)
    pop %edx
    pop %ecx
    pop %ebx
    pop %eax
    add $4, %esp
    iret
sg_pf32_unexpected:
    mov ${fault_port}, %dx
    out %eax, %dx
5:
    hlt
    jmp 5b
sg_gp32:
    mov $13, %eax
    mov ${exc_port}, %dx
    out %eax, %dx
6:
    hlt
    jmp 6b
sg_other32:
    mov $0xff, %eax
    mov ${exc_port}, %dx
    out %eax, %dx
7:
    hlt
    jmp 7b

    .balign 8
sg_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
sg_gdt_desc:
    .word 31
    .long sg_gdt - sguest_start + {code}
    .balign 4
sg_idt32_desc:
    .word 32 * 8 - 1
    .long {idt32}
    .balign 4
sg_idt64_desc:
    .word 32 * 16 - 1
    .quad {idt64}

    .code64
sg_long64:
    mov %esp, %esp
    mov %esi, %esi
    mov %edi, %edi
    mov %ebp, %ebp
    mov %ecx, %ecx
    push %rcx
    xor %ecx, %ecx
sg_idt64_loop:
    lea sg_other64(%rip), %rax
    cmp $14, %ecx
    jne 1f
    lea sg_pf64(%rip), %rax
1:
    cmp $13, %ecx
    jne 2f
    lea sg_gp64(%rip), %rax
2:
    mov %ecx, %edx
    shl $4, %edx
    mov %eax, %ebx
    and $0xffff, %ebx
    or $0x00180000, %ebx
    mov %ebx, {idt64}(%rdx)
    mov %eax, %ebx
    and $0xffff0000, %ebx
    or $0x8e00, %ebx
    mov %ebx, {idt64}+4(%rdx)
    movq $0, {idt64}+8(%rdx)
    inc %ecx
    cmp $32, %ecx
    jb sg_idt64_loop
    lidt sg_idt64_desc(%rip)
    pop %rcx
    jmp sg_next64
sg_loop64:
    mov ${mailbox}, %esi
    mov (%rsi), %ecx
    add ${ops_off}, %rsi
    mov ${results}, %edi
    xor %ebp, %ebp
    test %ecx, %ecx
    jz sg_done64
sg_op64:
    mov (%rsi), %eax
    mov 8(%rsi), %rbx
    mov 16(%rsi), %rdx
    cmp ${op_read32}, %eax
    je sg_read32_64
    cmp ${op_write32}, %eax
    je sg_write32_64
    cmp ${op_read64}, %eax
    je sg_read64_64
    cmp ${op_write64}, %eax
    je sg_write64_64
    cmp ${op_invlpg}, %eax
    je sg_invlpg64
    cmp ${op_set_cr3}, %eax
    je sg_setcr3_64
    cmp ${op_get_cr3}, %eax
    je sg_getcr3_64
    cmp ${op_fetch}, %eax
    je sg_fetch64
    cmp ${op_flush}, %eax
    je sg_flush64
    cmp ${op_bits}, %eax
    je sg_bits64
    inc %ebp
    jmp sg_next64
sg_read32_64:
    mov (%rbx), %eax
    mov %rax, (%rdi)
    jmp sg_next64
sg_write32_64:
    mov %edx, (%rbx)
    jmp sg_next64
sg_read64_64:
    mov (%rbx), %rax
    mov %rax, (%rdi)
    jmp sg_next64
sg_write64_64:
    mov %rdx, (%rbx)
    jmp sg_next64
sg_invlpg64:
    invlpg (%rbx)
    jmp sg_next64
sg_setcr3_64:
    mov %rbx, %cr3
    jmp sg_next64
sg_getcr3_64:
    mov %cr3, %rax
    mov %rax, (%rdi)
    jmp sg_next64
sg_fetch64:
    call *%rbx
    jmp sg_next64
sg_flush64:
    mov %cr3, %rax
    mov %rax, %cr3
    jmp sg_next64
sg_bits64:
    mov (%rbx), %eax
    and %edx, %eax
    mov %rax, (%rdi)
    cmp 24(%rsi), %rax
    je sg_next64
    inc %ebp
    jmp sg_next64
sg_next64:
    add $32, %rsi
    add $8, %rdi
    dec %ecx
    jnz sg_op64
sg_done64:
    mov %ebp, %eax
    mov ${done_port}, %dx
    out %eax, %dx
    jmp sg_loop64

sg_pf64:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    mov %cr2, %rax
    mov {log}, %ebx
    cmp ${max_logged}, %ebx
    jae 1f
    shl $4, %ebx
    mov %rax, {log}+16(%rbx)
    mov 32(%rsp), %rcx
    mov %rcx, {log}+24(%rbx)
1:
    incl {log}
    mov %rax, %rdx
    and $-4096, %rdx
    mov ${mailbox}+{fix_off}, %ebx
    mov {mailbox}+4, %ecx
2:
    test %ecx, %ecx
    jz sg_pf64_unexpected
    cmp (%rbx), %rdx
    je 3f
    add $32, %rbx
    dec %ecx
    jmp 2b
3:
    mov 8(%rbx), %rcx
    mov 16(%rbx), %rdx
    mov %rdx, (%rcx)
    invlpg (%rax)
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $8, %rsp
    iretq
sg_pf64_unexpected:
    mov ${fault_port}, %dx
    out %eax, %dx
5:
    hlt
    jmp 5b
sg_gp64:
    mov $13, %eax
    mov ${exc_port}, %dx
    out %eax, %dx
6:
    hlt
    jmp 6b
sg_other64:
    mov $0xff, %eax
    mov ${exc_port}, %dx
    out %eax, %dx
7:
    hlt
    jmp 7b
sguest_end:
    .text
"#,
    stack = const STACK_TOP,
    code = const CODE_GPA,
    mailbox = const MAILBOX,
    ops_off = const OPS_OFF,
    fix_off = const FIX_OFF,
    results = const RESULTS,
    log = const FAULT_LOG,
    max_logged = const MAX_LOGGED,
    idt32 = const IDT32,
    idt64 = const IDT64,
    done_port = const DONE_PORT,
    fault_port = const FAULT_PORT,
    exc_port = const EXC_PORT,
    op_read32 = const OP_READ32,
    op_write32 = const OP_WRITE32,
    op_read64 = const OP_READ64,
    op_write64 = const OP_WRITE64,
    op_invlpg = const OP_INVLPG,
    op_set_cr3 = const OP_SET_CR3,
    op_get_cr3 = const OP_GET_CR3,
    op_fetch = const OP_FETCH,
    op_flush = const OP_FLUSH,
    op_bits = const OP_BITS,
    op_to_pae = const OP_TO_PAE,
    op_to_long = const OP_TO_LONG,
    op_to_la57 = const OP_TO_LA57,
    options(att_syntax)
);

extern "C" {
    static sguest_start: u8;
    static sguest_end: u8;
}

/// The guest program's bytes.
pub fn code() -> &'static [u8] {
    // SAFETY: the two symbols delimit the assembled guest program in `.rodata`.
    unsafe {
        let start = core::ptr::addr_of!(sguest_start);
        let end = core::ptr::addr_of!(sguest_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}
