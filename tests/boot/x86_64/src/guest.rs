//! The guest program and its mailbox protocol.
//!
//! The guest is 32-bit protected-mode code with paging off, carried in the image and
//! copied to guest-physical [`CODE_GPA`]. It loops: read a command from the mailbox page,
//! perform it, report through `out` to [`DONE_PORT`] (EAX = result), start over. The host
//! changes the mailbox between runs through its own mapping of guest memory (host writes
//! do not set nested A/D bits and are not guest writes).
//!
//! Commands (mailbox word 0), over the list of guest-physical addresses at +0x100:
//! * [`OP_READ`]: sum the 32-bit words at the addresses (EAX = sum);
//! * [`OP_WRITE`]: store `addr ^ value` at each address and append the address to the log
//!   page (EAX = number written) — what a migration source would have to copy;
//! * [`OP_CHECK`]: count addresses whose word is not `addr ^ value` (EAX = mismatches);
//! * [`OP_SPIN`]: loop forever without exiting (to prove the run budget);
//! * [`OP_PAGING_ON`]: load CR3 with `value`, set CR4.PSE and CR0.PG: from then on the
//!   guest runs with its own 32-bit paging (the host builds an identity page directory of
//!   4 MiB pages), so every access is a two-dimensional walk (EXITINFO/EPT see both the
//!   guest's page-directory reads and the final accesses);
//! * [`OP_STREAM`]: the two-CPU race's writer. Count = number of pages `n` (a power of
//!   two), value = the base guest-physical address of the pages, address list word 0 =
//!   the first sequence number, word 1 = the stop flag (the host sets it). Until the
//!   stop flag is non-zero, store sequence number `s` (then `s + 1`, ...) to page
//!   `(i * 97) mod n` at word `c mod 1024`, where `i = (s - first) mod n` and
//!   `c = (s - first) / n`: every page once per cycle, a fresh word per cycle. Reads the
//!   stop flag before every store and exits only then (EAX = the next sequence number),
//!   so between nested faults and the host's interrupts it runs without exits;
//! * anything else: EAX = [`BAD_OP`].

use core::arch::global_asm;

/// Where the guest code is copied (guest-physical).
pub const CODE_GPA: u64 = 0x1000;
/// The mailbox page.
pub const MAILBOX_GPA: u64 = 0x2000;
/// The log page: word 0 = count, then the addresses written.
pub const LOG_GPA: u64 = 0x3000;
/// Initial stack pointer (the stack page below it is in the code slot).
pub const STACK_TOP: u64 = 0x8000;
/// Port the guest writes its result to.
pub const DONE_PORT: u16 = 0x510;
/// Offset of the address list in the mailbox.
pub const MAILBOX_ADDRS: u64 = 0x100;
/// Most addresses one command can carry.
pub const MAX_ADDRS: usize = (4096 - 0x100) / 4;
/// Most addresses the log page can hold.
pub const MAX_LOG: usize = 1023;

/// Read the addresses.
pub const OP_READ: u32 = 1;
/// Write the addresses and log them.
pub const OP_WRITE: u32 = 2;
/// Check the addresses.
pub const OP_CHECK: u32 = 3;
/// Spin forever.
pub const OP_SPIN: u32 = 5;
/// Turn guest paging on.
pub const OP_PAGING_ON: u32 = 6;
/// Stream sequence-stamped writes until stopped.
pub const OP_STREAM: u32 = 7;
/// The page stride of [`OP_STREAM`] (odd, so it visits every page of a power of two).
pub const STREAM_STRIDE: u64 = 97;
/// Result of an unknown command.
pub const BAD_OP: u32 = 0xbad;

global_asm!(
    r#"
    .section .rodata.guest, "a"
    .global guest_code_start
    .global guest_code_end
    .code32
guest_code_start:
    mov ${stack}, %esp
1:
    mov ${mailbox}, %esi
    mov 0(%esi), %eax
    mov 4(%esi), %ecx
    mov 8(%esi), %edx
    lea 0x100(%esi), %edi
    xor %ebx, %ebx
    cmp ${op_read}, %eax
    je 10f
    cmp ${op_write}, %eax
    je 20f
    cmp ${op_check}, %eax
    je 30f
    cmp ${op_spin}, %eax
    je 40f
    cmp ${op_paging}, %eax
    je 50f
    cmp ${op_stream}, %eax
    je 60f
    mov ${bad}, %ebx
    jmp 90f
10:
    test %ecx, %ecx
    jz 90f
11:
    mov (%edi), %eax
    add (%eax), %ebx
    add $4, %edi
    dec %ecx
    jnz 11b
    jmp 90f
20:
    test %ecx, %ecx
    jz 90f
    mov ${log}, %ebp
21:
    mov (%edi), %eax
    mov %eax, %esi
    xor %edx, %esi
    mov %esi, (%eax)
    mov (%ebp), %esi
    mov %eax, 4(%ebp,%esi,4)
    inc %esi
    mov %esi, (%ebp)
    inc %ebx
    add $4, %edi
    dec %ecx
    jnz 21b
    jmp 90f
30:
    test %ecx, %ecx
    jz 90f
31:
    mov (%edi), %eax
    mov %eax, %esi
    xor %edx, %esi
    cmp %esi, (%eax)
    je 32f
    inc %ebx
32:
    add $4, %edi
    dec %ecx
    jnz 31b
    jmp 90f
40:
    jmp 40b
50:
    mov %edx, %cr3
    mov %cr4, %eax
    or $0x10, %eax
    mov %eax, %cr4
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    jmp 51f
51:
    mov $1, %ebx
    jmp 90f
60:
    mov (%edi), %ebx
    lea -1(%ecx), %ebp
    xor %ecx, %ecx
    xor %esi, %esi
61:
    cmpl $0, 4(%edi)
    jne 90f
    imul ${stride}, %ecx, %eax
    and %ebp, %eax
    shl $12, %eax
    add %edx, %eax
    mov %ebx, (%eax,%esi)
    inc %ebx
    inc %ecx
    test %ebp, %ecx
    jnz 61b
    xor %ecx, %ecx
    add $4, %esi
    and $0xfff, %esi
    jmp 61b
90:
    mov %ebx, %eax
    mov ${port}, %dx
    out %eax, %dx
    jmp 1b
guest_code_end:
    .code64
    .text
"#,
    stack = const STACK_TOP,
    mailbox = const MAILBOX_GPA,
    log = const LOG_GPA,
    port = const DONE_PORT,
    op_read = const OP_READ,
    op_write = const OP_WRITE,
    op_check = const OP_CHECK,
    op_spin = const OP_SPIN,
    op_paging = const OP_PAGING_ON,
    op_stream = const OP_STREAM,
    stride = const STREAM_STRIDE,
    bad = const BAD_OP,
    options(att_syntax)
);

extern "C" {
    static guest_code_start: u8;
    static guest_code_end: u8;
}

/// The guest program's bytes.
pub fn code() -> &'static [u8] {
    // SAFETY: the two symbols delimit the assembled guest program in `.rodata`.
    unsafe {
        let start = core::ptr::addr_of!(guest_code_start);
        let end = core::ptr::addr_of!(guest_code_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}
