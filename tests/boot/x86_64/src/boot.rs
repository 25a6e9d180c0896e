//! Entry from the two boot loaders, the 32-bit trampoline into long mode, and the host's
//! own descriptor tables (GDT with a 64-bit TSS, which VMX requires as the host TR).
//!
//! * QEMU boots the ELF by PVH: an ELF note of type 18 ("Xen") gives the 32-bit entry
//!   `pvh_start`; the CPU is in flat 32-bit protected mode with paging off.
//! * GRUB boots it by multiboot2 (Bochs): the header below, entry `mb2_start` (the ELF
//!   entry), same CPU state.
//!
//! Both zero `.bss`, identity-map the first 4 GiB with 2 MiB pages, enable long mode and
//! call `kernel_main(protocol)`, where `protocol` says which loader started us (and so
//! which console and which way to end the run).

use core::arch::global_asm;

/// Started by QEMU's PVH loader.
pub const PROTO_PVH: u32 = 1;
/// Started by GRUB's multiboot2 loader.
pub const PROTO_MULTIBOOT2: u32 = 2;

global_asm!(
    r#"
    .section .mb2hdr, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6
    .long 0
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header))
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .note.Xen, "a"
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .boot32, "ax"
    .code32
    .global pvh_start
pvh_start:
    mov $1, %ebp
    jmp common32
    .global mb2_start
mb2_start:
    mov $2, %ebp
common32:
    cli
    cld
    /* zero .bss (the stack and the boot page tables live there) */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    /* PML4[0] -> PDPT */
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    /* PDPT[0..4] -> the four page directories */
    mov $boot_pd, %eax
    or $3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:
    mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b
    /* 2048 PDEs of 2 MiB: identity 0..4 GiB, present|writable|PS */
    mov $boot_pd, %edi
    mov $0x83, %eax
    xor %edx, %edx
    mov $2048, %ecx
2:
    mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    loop 2b
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    mov %ebp, %edi
    /* the loader's information structure (PVH start info, multiboot2 info) */
    mov %ebx, %esi
    xor %ebp, %ebp
    call kernel_entry
3:
    hlt
    jmp 3b

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
boot_stack:
    .skip 256 * 1024
boot_stack_top:
    .text
"#,
    options(att_syntax)
);
