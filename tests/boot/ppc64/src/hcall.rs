//! PAPR hypercalls (`sc 1`): opcode in r3, arguments in r4..r11; status back in r3,
//! return values in r4..r11 (PAPR 14.5.3, "Hypervisor Call Interface").

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Hypercalls issued so far, per opcode of interest (see [`count`]).
static COUNTS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

fn slot(opcode: u64) -> Option<usize> {
    match opcode {
        H_REMOVE => Some(0),
        H_ENTER => Some(1),
        H_READ => Some(2),
        H_CLEAR_MOD => Some(3),
        H_CLEAR_REF => Some(4),
        H_PROTECT => Some(5),
        H_BULK_REMOVE => Some(6),
        _ => None,
    }
}

/// How many times `opcode` (one of the HPT hypercalls) was issued since boot.
pub fn count(opcode: u64) -> u64 {
    slot(opcode).map_or(0, |i| COUNTS[i].load(Relaxed))
}

/// H_REMOVE: invalidate one HPTE.
pub const H_REMOVE: u64 = 0x04;
/// H_ENTER: insert an HPTE.
pub const H_ENTER: u64 = 0x08;
/// H_READ: read one (or, with H_READ_4, four) HPTEs.
pub const H_READ: u64 = 0x0c;
/// H_CLEAR_MOD: clear C (QEMU 7.2 answers H_FUNCTION).
pub const H_CLEAR_MOD: u64 = 0x10;
/// H_CLEAR_REF: clear R (QEMU 7.2 answers H_FUNCTION).
pub const H_CLEAR_REF: u64 = 0x14;
/// H_PROTECT: change PP/N/key of one HPTE.
pub const H_PROTECT: u64 = 0x18;
/// H_PUT_TERM_CHAR: write up to 16 bytes to a virtual terminal.
pub const H_PUT_TERM_CHAR: u64 = 0x58;
/// H_BULK_REMOVE: up to four removals in one call (0x24 is H_SET_SPRG0).
pub const H_BULK_REMOVE: u64 = 0x124;
/// QEMU's private hypercall that runs an RTAS call: r4 = real address of the RTAS arguments.
pub const KVMPPC_H_RTAS: u64 = 0xf000;

/// Status and the eight return registers of a hypercall.
#[derive(Clone, Copy, Debug)]
pub struct HcallRet {
    /// r3: H_SUCCESS (0) or a negative PAPR error.
    pub status: i64,
    /// r4..r11.
    pub ret: [u64; 8],
}

/// Issues hypercall `opcode` with up to eight arguments (missing ones are zero).
pub fn hcall(opcode: u64, args: &[u64]) -> HcallRet {
    if let Some(i) = slot(opcode) {
        COUNTS[i].fetch_add(1, Relaxed);
    }
    let mut a = [0u64; 8];
    a[..args.len()].copy_from_slice(args);
    let status: u64;
    // SAFETY: `sc 1` enters the hypervisor, which follows the PAPR register convention
    // declared here (r0, r3-r12, CTR, XER and CR0/1/5-7 volatile). A hypercall may read or
    // write guest memory named by its arguments (RTAS buffers); the asm is not `nomem`, so
    // the compiler assumes memory may change. The caller is the kernel in supervisor state.
    unsafe {
        asm!(
            "sc 1",
            inlateout("r3") opcode => status,
            inlateout("r4") a[0] => a[0],
            inlateout("r5") a[1] => a[1],
            inlateout("r6") a[2] => a[2],
            inlateout("r7") a[3] => a[3],
            inlateout("r8") a[4] => a[4],
            inlateout("r9") a[5] => a[5],
            inlateout("r10") a[6] => a[6],
            inlateout("r11") a[7] => a[7],
            lateout("r0") _,
            lateout("r12") _,
            lateout("ctr") _,
            lateout("xer") _,
            lateout("cr0") _,
            lateout("cr1") _,
            lateout("cr5") _,
            lateout("cr6") _,
            lateout("cr7") _,
            options(nostack)
        );
    }
    HcallRet { status: status as i64, ret: a }
}
