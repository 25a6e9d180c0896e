//! The MSRs a Linux guest reads and writes, and the answer to the others.
//!
//! Kept in the vCPU's hardware state (VMCB): EFER, PAT, STAR/LSTAR/CSTAR/SFMASK,
//! SYSENTER_*, FS/GS/KernelGS base (the last three pass through without an exit).
//! Emulated here: the TSC (read: the host TSC, which the guest's RDTSC also reads; writes
//! are refused with #GP since no TSC offset is kept), the AMD patch level, HWCR, the
//! northbridge config and the OS visible workaround MSRs (read as 0, writes ignored:
//! values Linux's AMD setup code reads with plain RDMSR). Every other MSR raises #GP, as
//! the CPU does for an MSR it does not implement; Linux reads optional MSRs with
//! `rdmsr_safe` and handles the fault.

use alloc::vec::Vec;

use crate::port::rdtsc;

/// What the VMM makes of an MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAnswer {
    /// The value read (or the write done).
    Value(u64),
    /// Not implemented: #GP(0).
    Fault,
}

/// MSRs emulated as plain registers (reads give what was written, 0 at first).
const PLAIN: [u32; 6] = [
    0x0000_008b, // AMD microcode patch level
    0xc001_0015, // HWCR
    0xc001_001f, // northbridge configuration
    0xc001_0140, // OS visible workaround length
    0xc001_0141, // OS visible workaround status
    0xc001_0058, // MMIO configuration base (reads 0: disabled)
];

/// The emulated MSRs and the record of those refused.
#[derive(Debug, Default)]
pub struct Msrs {
    plain: [u64; PLAIN.len()],
    /// MSR numbers refused with #GP (each once), for the report.
    pub refused: Vec<u32>,
}

impl Msrs {
    /// Fresh registers.
    pub fn new() -> Self {
        Msrs::default()
    }

    fn refuse(&mut self, msr: u32) -> MsrAnswer {
        if !self.refused.contains(&msr) && self.refused.len() < 32 {
            self.refused.push(msr);
        }
        MsrAnswer::Fault
    }

    /// RDMSR of an MSR the vCPU state does not hold.
    pub fn read(&mut self, msr: u32) -> MsrAnswer {
        if msr == 0x10 {
            return MsrAnswer::Value(rdtsc());
        }
        match PLAIN.iter().position(|&m| m == msr) {
            Some(i) => MsrAnswer::Value(self.plain[i]),
            None => self.refuse(msr),
        }
    }

    /// WRMSR of an MSR the vCPU state does not hold.
    pub fn write(&mut self, msr: u32, value: u64) -> MsrAnswer {
        match PLAIN.iter().position(|&m| m == msr) {
            Some(i) => {
                self.plain[i] = value;
                MsrAnswer::Value(value)
            }
            None => self.refuse(msr),
        }
    }
}
