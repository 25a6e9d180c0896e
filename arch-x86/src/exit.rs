//! The exits nested paging raises: the EPT-violation exit qualification, the
//! EPT misconfiguration and the nested-page-fault error code, and the access
//! they decode to.
//!
//! The lowest module of the nested-paging side: it imports nothing from the
//! crate; [`crate::format`] (which encodes walk faults as these exits) and
//! the engine build on it. [`Access`] is defined here and re-exported by
//! [`crate::format`].

use core::fmt;

bitflags::bitflags! {
    /// An access, or the set of accesses an entry permits.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct Access: u8 {
        /// A data read.
        const READ = 1 << 0;
        /// A data write.
        const WRITE = 1 << 1;
        /// An instruction fetch.
        const EXEC = 1 << 2;
    }
}

bitflags::bitflags! {
    /// Exit qualification of an EPT violation (SDM Vol. 3C §28.2.1, Table 28-7
    /// "Exit Qualification for EPT Violations"; causes in §29.3.3.2).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct EptQualification: u64 {
        /// Bit 0: the access was a data read.
        const DATA_READ = 1 << 0;
        /// Bit 1: the access was a data write.
        const DATA_WRITE = 1 << 1;
        /// Bit 2: the access was an instruction fetch.
        const FETCH = 1 << 2;
        /// Bit 3: the AND of bit 0 (read) of the EPT entries used (the gpa was readable).
        const READABLE = 1 << 3;
        /// Bit 4: the AND of bit 1 (write) of the entries used.
        const WRITABLE = 1 << 4;
        /// Bit 5: the AND of bit 2 (execute) of the entries used.
        const EXECUTABLE = 1 << 5;
        /// Bit 6: the AND of bit 10 (user-mode execute) of the entries used,
        /// defined only with mode-based execute control.
        const USER_EXECUTABLE = 1 << 6;
        /// Bit 7: the guest linear-address field is valid.
        const LINEAR_VALID = 1 << 7;
        /// Bit 8 (with bit 7): the access was to the translation of a linear
        /// address; clear: to a guest paging-structure entry.
        const TRANSLATED = 1 << 8;
        /// Bit 12: NMI unblocking due to IRET.
        const NMI_UNBLOCKING = 1 << 12;
        /// Bit 13: the access was a shadow-stack access.
        const SHADOW_STACK = 1 << 13;
        /// Bit 14: the supervisor shadow-stack control of the translation was set.
        const SUPERVISOR_SHADOW_STACK = 1 << 14;
        /// Bit 15: the access was part of guest-paging verification.
        const GUEST_PAGING_VERIFICATION = 1 << 15;
        /// Bit 16: the access was asynchronous to instruction execution.
        const ASYNC = 1 << 16;
    }
}

bitflags::bitflags! {
    /// The nested-page-fault error code, `EXITINFO1` of `#VMEXIT(NPF)`
    /// (APM Vol. 2 §15.25.6 "Nested versus Guest Page Faults, Fault
    /// Ordering"; bits 4:0 as the #PF error code, §8.4.2).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct NpfErrorCode: u64 {
        /// Bit 0 (P): the entry was present (a protection fault); clear: not present.
        const PRESENT = 1 << 0;
        /// Bit 1 (RW): the access was a write.
        const WRITE = 1 << 1;
        /// Bit 2 (US): a user access; always set, every nested access is one.
        const USER = 1 << 2;
        /// Bit 3 (RSV): a reserved bit was set in a nested entry.
        const RESERVED = 1 << 3;
        /// Bit 4 (ID): the access was an instruction fetch.
        const FETCH = 1 << 4;
        /// Bit 6 (SS): a shadow-stack access.
        const SHADOW_STACK = 1 << 6;
        /// Bit 32: the fault was on the final guest-physical translation.
        const FINAL_TRANSLATION = 1 << 32;
        /// Bit 33: the fault was on a guest page-table access.
        const GUEST_TABLE = 1 << 33;
    }
}

/// Which guest access a nested translation serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Origin {
    /// The final translation of a guest linear address (a data or code access).
    Final,
    /// An access to a guest paging-structure entry during the guest's walk.
    GuestPaging,
    /// An access with no guest linear address (guest paging off, or a
    /// device-like access).
    NoLinear,
}

/// A nested-paging VM exit, as the processor reports it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NestedExit {
    /// EPT violation (basic exit reason 48) with its exit qualification.
    EptViolation(EptQualification),
    /// EPT misconfiguration (basic exit reason 49): a reserved bit or an
    /// illegal combination in an EPT entry (SDM Vol. 3C §29.3.3.1).
    EptMisconfig,
    /// `#VMEXIT(NPF)` (exit code 0x400) with `EXITINFO1`.
    Npf(NpfErrorCode),
}

/// The exit cannot be served by mapping memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExitDecodeError {
    /// An EPT misconfiguration or an NPF with RSV set: the tables hold an
    /// entry the engine never writes.
    Misconfigured,
    /// The qualification or error code names no access.
    NoAccess(u64),
}

impl fmt::Display for ExitDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misconfigured => f.write_str("nested entry with reserved bits (misconfiguration)"),
            Self::NoAccess(raw) => write!(f, "exit information {raw:#x} names no access"),
        }
    }
}

impl NestedExit {
    /// The access that faulted, for the fault handler.
    ///
    /// A data read with a write (EPT sets both for a locked read-modify-write)
    /// is a write; the fault handler needs the strongest right.
    pub fn access(self) -> Result<Access, ExitDecodeError> {
        let access = match self {
            NestedExit::EptMisconfig => return Err(ExitDecodeError::Misconfigured),
            NestedExit::EptViolation(q) => {
                let mut a = Access::empty();
                a.set(Access::READ, q.contains(EptQualification::DATA_READ));
                a.set(Access::WRITE, q.contains(EptQualification::DATA_WRITE));
                a.set(Access::EXEC, q.contains(EptQualification::FETCH));
                if a.is_empty() {
                    return Err(ExitDecodeError::NoAccess(q.bits()));
                }
                a
            }
            NestedExit::Npf(e) => {
                if e.contains(NpfErrorCode::RESERVED) {
                    return Err(ExitDecodeError::Misconfigured);
                }
                if e.contains(NpfErrorCode::FETCH) {
                    Access::EXEC
                } else if e.contains(NpfErrorCode::WRITE) {
                    Access::WRITE
                } else {
                    Access::READ
                }
            }
        };
        Ok(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_qualifications_seen_under_bochs_decode_to_their_access() {
        // Values from DESIGN.md §8 (Bochs, Haswell model).
        let fetch = NestedExit::EptViolation(EptQualification::from_bits_retain(0x184));
        let read = NestedExit::EptViolation(EptQualification::from_bits_retain(0x181));
        let write = NestedExit::EptViolation(EptQualification::from_bits_retain(0x182));
        let write_rx = EptQualification::from_bits_retain(0x1aa);
        assert_eq!(fetch.access(), Ok(Access::EXEC));
        assert_eq!(read.access(), Ok(Access::READ));
        assert_eq!(write.access(), Ok(Access::WRITE));
        assert!(write_rx.contains(
            EptQualification::DATA_WRITE
                | EptQualification::READABLE
                | EptQualification::EXECUTABLE
                | EptQualification::LINEAR_VALID
                | EptQualification::TRANSLATED
        ));
        assert!(!write_rx.contains(EptQualification::WRITABLE));
    }

    #[test]
    fn npf_error_codes_decode_and_reserved_is_a_misconfiguration() {
        let e = |bits| NestedExit::Npf(NpfErrorCode::from_bits_retain(bits));
        assert_eq!(e(0x1_0000_0006).access(), Ok(Access::WRITE));
        assert_eq!(e(0x1_0000_0014).access(), Ok(Access::EXEC));
        assert_eq!(e(0x2_0000_0004).access(), Ok(Access::READ));
        assert_eq!(e(0x1_0000_000d).access(), Err(ExitDecodeError::Misconfigured));
        assert_eq!(NestedExit::EptMisconfig.access(), Err(ExitDecodeError::Misconfigured));
        assert_eq!(
            NestedExit::EptViolation(EptQualification::LINEAR_VALID).access(),
            Err(ExitDecodeError::NoAccess(0x80))
        );
    }
}
