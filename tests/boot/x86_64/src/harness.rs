//! Runs guest commands over a [`Vendor`], serving nested faults through the MMU, with
//! every run bounded (time budget per entry, exit budget per command).

use alloc::vec::Vec;

use crate::guest;
use crate::nested::{FaultOutcome, Nested, NestedError};
use crate::vendor::{Exit, GuestStart, Vendor};

/// Most exits one command may take before it is declared runaway.
pub const MAX_EXITS: u32 = 20_000;

/// Why a command did not complete.
#[derive(Clone, Copy, Debug)]
pub enum RunError {
    /// The guest touched a guest-physical address outside every memslot.
    NoSlot {
        /// The address.
        gpa: u64,
    },
    /// The MMU refused the guest's access (read-only slot or host page).
    Denied {
        /// The address.
        gpa: u64,
    },
    /// The run's time budget expired.
    Budget,
    /// More than [`MAX_EXITS`] exits for one command.
    TooManyExits,
    /// The MMU failed while serving a fault. (Fields are printed through `Debug`.)
    Mmu(NestedError),
    /// The guest's EBX (where it keeps its result) differs from the value it sent: the
    /// world switch lost a register.
    RegisterMismatch {
        /// Value sent through the port.
        sent: u32,
        /// EBX as the host saved it.
        rbx: u64,
    },
    /// An exit the harness does not expect.
    Unexpected(Exit),
    /// The mailbox or the command does not fit.
    BadCommand,
}

impl core::fmt::Display for RunError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RunError::NoSlot { gpa } => write!(f, "gpa {gpa:#x} is in no memslot"),
            RunError::Denied { gpa } => write!(f, "access to gpa {gpa:#x} denied"),
            RunError::Budget => f.write_str("run budget expired"),
            RunError::TooManyExits => write!(f, "more than {MAX_EXITS} exits for one command"),
            RunError::Mmu(e) => write!(f, "nested MMU error {e:?}"),
            RunError::RegisterMismatch { sent, rbx } => {
                write!(f, "guest sent {sent:#x} but EBX reads {rbx:#x}")
            }
            RunError::Unexpected(exit) => write!(f, "unexpected exit {exit:?}"),
            RunError::BadCommand => f.write_str("command does not fit the mailbox"),
        }
    }
}

/// Fault statistics of one command.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Nested faults taken.
    pub faults: u64,
    /// Of which on a write.
    pub write_faults: u64,
    /// Exits of any kind.
    pub exits: u64,
}

/// A guest with its vendor, MMU and frame pool.
pub struct Harness<'v> {
    /// The vendor.
    pub vendor: &'v mut dyn Vendor,
    /// The nested MMU.
    pub mmu: Nested,
    /// Statistics of the last command.
    pub last: Stats,
    /// Guest-physical addresses of faults in the last command.
    pub fault_log: Vec<u64>,
    /// Distinct raw fault reports (NPF error codes / EPT qualifications) seen so far.
    pub fault_infos: Vec<u64>,
}

impl<'v> Harness<'v> {
    /// Points the vendor at the MMU's root and resets the guest.
    pub fn start(&mut self) {
        let pointer = self.mmu.root_pointer();
        self.vendor.set_nested_root(pointer);
        self.vendor.reset_guest(GuestStart { rip: guest::CODE_GPA, rsp: guest::STACK_TOP });
    }

    /// A host pointer to a guest-physical word.
    pub fn guest_word(&self, gpa: u64) -> Option<*mut u32> {
        self.mmu.gpa_to_hva(gpa).map(|h| h as *mut u32)
    }

    /// Reads a guest word through the host's mapping.
    pub fn read_guest(&self, gpa: u64) -> Option<u32> {
        // SAFETY: the slot's backing is identity-mapped host memory owned by this harness;
        // the guest is not running.
        self.guest_word(gpa).map(|p| unsafe { p.read_volatile() })
    }

    /// Writes a guest word through the host's mapping.
    pub fn write_guest(&self, gpa: u64, v: u32) -> bool {
        match self.guest_word(gpa) {
            Some(p) => {
                // SAFETY: as in `read_guest`.
                unsafe { p.write_volatile(v) };
                true
            }
            None => false,
        }
    }

    /// The addresses the guest logged since the log was last reset.
    pub fn take_log(&self) -> Vec<u64> {
        let n = self.read_guest(guest::LOG_GPA).unwrap_or(0) as usize;
        let v = (0..n.min(guest::MAX_LOG))
            .filter_map(|i| self.read_guest(guest::LOG_GPA + 4 + 4 * i as u64))
            .map(u64::from)
            .collect();
        self.write_guest(guest::LOG_GPA, 0);
        v
    }

    /// Runs one guest command to completion; returns the guest's result word.
    pub fn command(&mut self, op: u32, addrs: &[u64], value: u32) -> Result<u32, RunError> {
        if addrs.len() > guest::MAX_ADDRS {
            return Err(RunError::BadCommand);
        }
        let mb = guest::MAILBOX_GPA;
        let mut ok = self.write_guest(mb, op)
            && self.write_guest(mb + 4, addrs.len() as u32)
            && self.write_guest(mb + 8, value);
        for (i, a) in addrs.iter().enumerate() {
            ok &= self.write_guest(mb + guest::MAILBOX_ADDRS + 4 * i as u64, *a as u32);
        }
        if !ok {
            return Err(RunError::BadCommand);
        }
        self.last = Stats::default();
        self.fault_log.clear();
        for _ in 0..MAX_EXITS {
            self.mmu.flush(self.vendor);
            let exit = self.vendor.run();
            self.last.exits += 1;
            match exit {
                Exit::NestedFault { gpa, write, info, .. } => {
                    self.last.faults += 1;
                    self.last.write_faults += write as u64;
                    self.fault_log.push(gpa);
                    if !self.fault_infos.contains(&info) {
                        self.fault_infos.push(info);
                    }
                    match self.mmu.fault(gpa, info, self.vendor) {
                        Ok(FaultOutcome::NoSlot) => return Err(RunError::NoSlot { gpa }),
                        Ok(FaultOutcome::Denied) => return Err(RunError::Denied { gpa }),
                        Ok(_) => {}
                        Err(e) => return Err(RunError::Mmu(e)),
                    }
                }
                Exit::IoOut { port, value } if port == guest::DONE_PORT => {
                    let rbx = self.vendor.regs().rbx;
                    if rbx & 0xffff_ffff != value as u64 {
                        return Err(RunError::RegisterMismatch { sent: value, rbx });
                    }
                    return Ok(value);
                }
                Exit::Timer => return Err(RunError::Budget),
                other => return Err(RunError::Unexpected(other)),
            }
        }
        Err(RunError::TooManyExits)
    }
}
