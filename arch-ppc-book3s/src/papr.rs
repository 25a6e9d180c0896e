//! PAPR hypercall numbers, flags, return codes, and the register-level call
//! interface (LoPAPR 14.5.4.1 "Page Frame Table Access"; Linux
//! `arch/powerpc/include/asm/hvcall.h` spells the same values).
//!
//! Return codes are mapped to and from [`HptError`] here and nowhere else.

use core::fmt;

/// H_REMOVE: invalidate one HPTE.
pub const H_REMOVE: u64 = 0x04;
/// H_ENTER: insert an HPTE.
pub const H_ENTER: u64 = 0x08;
/// H_READ: read one (or four) HPTEs.
pub const H_READ: u64 = 0x0c;
/// H_CLEAR_MOD: clear C of one HPTE.
pub const H_CLEAR_MOD: u64 = 0x10;
/// H_CLEAR_REF: clear R of one HPTE.
pub const H_CLEAR_REF: u64 = 0x14;
/// H_PROTECT: change PP0/PP/N/key of one HPTE.
pub const H_PROTECT: u64 = 0x18;
/// H_BULK_REMOVE: up to four removals (0x24 is H_SET_SPRG0).
pub const H_BULK_REMOVE: u64 = 0x124;

/// The call succeeded.
pub const H_SUCCESS: i64 = 0;
/// The hypervisor is busy; retry.
pub const H_BUSY: i64 = 1;
/// A hardware error.
pub const H_HARDWARE: i64 = -1;
/// The function is not supported.
pub const H_FUNCTION: i64 = -2;
/// The caller lacks the privilege.
pub const H_PRIVILEGE: i64 = -3;
/// A parameter is invalid.
pub const H_PARAMETER: i64 = -4;
/// Bad mode.
pub const H_BAD_MODE: i64 = -5;
/// No free slot in the PTEG (or, with H_EXACT, the slot is occupied).
pub const H_PTEG_FULL: i64 = -6;
/// No valid HPTE matched.
pub const H_NOT_FOUND: i64 = -7;

/// H_ENTER: use the exact slot, fail with H_PTEG_FULL if occupied.
pub const H_EXACT: u64 = 1 << (63 - 24);
/// H_READ: return logical rather than real addresses (unsupported here).
pub const H_R_XLATE: u64 = 1 << (63 - 25);
/// H_READ: read the four HPTEs of the aligned quad.
pub const H_READ_4: u64 = 1 << (63 - 26);
/// H_REMOVE/H_PROTECT: remove only if dword 0 (bits 0:56) equals the AVPN argument.
pub const H_AVPN: u64 = 1 << (63 - 32);
/// H_REMOVE: remove only if dword 0 AND the argument is zero.
pub const H_ANDCOND: u64 = 1 << (63 - 33);
/// H_ENTER: the page may be coalesced (a hint).
pub const H_COALESCE_CAND: u64 = 1 << (63 - 42);
/// H_ENTER: invalidate the I-cache for the page (a hint the table itself need not act on).
pub const H_ICACHE_INVALIDATE: u64 = 1 << (63 - 40);
/// H_ENTER: synchronize the I-cache for the page (a hint).
pub const H_ICACHE_SYNCHRONIZE: u64 = 1 << (63 - 41);
/// H_ENTER: zero the page first (unsupported here).
pub const H_ZERO_PAGE: u64 = 1 << (63 - 48);

/// H_PROTECT flag bits that carry the new protection: PP (0x3), N (0x4),
/// PP0 (0x100, moved to dword-1 bit 0), key low (0xe00), key high (0x3000,
/// moved to dword-1 bits 2:3) — KVM's and QEMU's reading of LoPAPR.
pub const H_PROTECT_BITS: u64 = 0x3 | 0x4 | 0x100 | 0xe00 | 0x3000;

/// H_BULK_REMOVE request word: the two type bits.
pub const BULK_TYPE: u64 = 0xc000_0000_0000_0000;
/// Type: an unused slot.
pub const BULK_UNUSED: u64 = 0x0000_0000_0000_0000;
/// Type: a request.
pub const BULK_REQUEST: u64 = 0x4000_0000_0000_0000;
/// Type: a response.
pub const BULK_RESPONSE: u64 = 0x8000_0000_0000_0000;
/// Type: end of the list.
pub const BULK_END: u64 = 0xc000_0000_0000_0000;
/// Response code field.
pub const BULK_CODE: u64 = 0x3000_0000_0000_0000;
/// Response code: removed.
pub const BULK_SUCCESS: u64 = 0x0000_0000_0000_0000;
/// Response code: no matching entry.
pub const BULK_NOT_FOUND: u64 = 0x1000_0000_0000_0000;
/// Response code: bad parameter.
pub const BULK_PARM: u64 = 0x2000_0000_0000_0000;
/// Response code: hardware error.
pub const BULK_HW: u64 = 0x3000_0000_0000_0000;
/// The removed entry's R and C (R = upper bit), where PAPR and KVM put them.
pub const BULK_RC: u64 = 0x0c00_0000_0000_0000;
/// Where QEMU 7.2 puts R and C instead (`(r & 0x180) << 43`).
pub const BULK_RC_QEMU: u64 = 0x000c_0000_0000_0000;
/// Request flags field.
pub const BULK_FLAGS: u64 = 0x0300_0000_0000_0000;
/// Flags: remove unconditionally.
pub const BULK_ABSOLUTE: u64 = 0x0000_0000_0000_0000;
/// Flags: remove if dword 0 AND the second word is zero.
pub const BULK_ANDCOND: u64 = 0x0100_0000_0000_0000;
/// Flags: remove if dword 0 (bits 0:56) equals the second word.
pub const BULK_AVPN: u64 = 0x0200_0000_0000_0000;
/// The HPTE index field.
pub const BULK_PTEX: u64 = 0x00ff_ffff_ffff_ffff;
/// Requests per call.
pub const BULK_MAX: usize = 4;

/// A PAPR failure, one variant per return code a hashed-page-table call gives.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum HptError {
    /// H_PARAMETER (-4): an argument is out of range, malformed, or names
    /// memory outside the guest.
    Parameter,
    /// H_PTEG_FULL (-6): no free slot in the group (or H_EXACT's slot is used).
    PtegFull,
    /// H_NOT_FOUND (-7): no valid entry matched (or the AVPN/ANDCOND check failed).
    NotFound,
    /// H_FUNCTION (-2): the platform does not implement the call.
    Function,
    /// H_HARDWARE (-1): the platform reported a hardware error.
    Hardware,
    /// H_PRIVILEGE (-3).
    Privilege,
    /// H_BUSY (1) or a long-busy code: retry later.
    Busy(i64),
    /// Any other non-success code.
    Other(i64),
}

impl HptError {
    /// The PAPR return code.
    pub const fn status(self) -> i64 {
        match self {
            Self::Parameter => H_PARAMETER,
            Self::PtegFull => H_PTEG_FULL,
            Self::NotFound => H_NOT_FOUND,
            Self::Function => H_FUNCTION,
            Self::Hardware => H_HARDWARE,
            Self::Privilege => H_PRIVILEGE,
            Self::Busy(c) | Self::Other(c) => c,
        }
    }

    /// The error a return code stands for (`None` for H_SUCCESS).
    pub const fn from_status(code: i64) -> Option<Self> {
        Some(match code {
            H_SUCCESS => return None,
            H_PARAMETER => Self::Parameter,
            H_PTEG_FULL => Self::PtegFull,
            H_NOT_FOUND => Self::NotFound,
            H_FUNCTION => Self::Function,
            H_HARDWARE => Self::Hardware,
            H_PRIVILEGE => Self::Privilege,
            // H_BUSY and the long-busy codes 9900..9905.
            1 | 9900..=9905 => Self::Busy(code),
            c => Self::Other(c),
        })
    }
}

impl fmt::Display for HptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Parameter => f.write_str("H_PARAMETER: invalid argument"),
            Self::PtegFull => f.write_str("H_PTEG_FULL: no free slot"),
            Self::NotFound => f.write_str("H_NOT_FOUND: no matching entry"),
            Self::Function => f.write_str("H_FUNCTION: not supported"),
            Self::Hardware => f.write_str("H_HARDWARE: hardware error"),
            Self::Privilege => f.write_str("H_PRIVILEGE: not permitted"),
            Self::Busy(c) => write!(f, "busy ({c})"),
            Self::Other(c) => write!(f, "hypercall failed with {c}"),
        }
    }
}

/// A hypercall's status (r3) and return registers (r4..r11).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HcallReturn {
    /// r3: H_SUCCESS or an error code.
    pub status: i64,
    /// r4..r11.
    pub ret: [u64; 8],
}

impl HcallReturn {
    /// A success with the given return registers.
    pub const fn ok(ret: [u64; 8]) -> Self {
        Self { status: H_SUCCESS, ret }
    }

    /// A failure.
    pub const fn err(e: HptError) -> Self {
        Self { status: e.status(), ret: [0; 8] }
    }

    /// The status as a `Result`.
    pub const fn result(&self) -> Result<[u64; 8], HptError> {
        match HptError::from_status(self.status) {
            None => Ok(self.ret),
            Some(e) => Err(e),
        }
    }
}

/// The embedder's way to make a hypercall (`sc 1` in a pseries kernel; a
/// function call into [`GuestHpt`](crate::guest::GuestHpt) in host tests).
///
/// `args` holds r4.. (at most eight); missing registers are zero.
pub trait Hcall {
    /// Issues hypercall `opcode` and returns r3 and r4..r11.
    fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn;
}

impl<T: Hcall + ?Sized> Hcall for &mut T {
    fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
        (**self).hcall(opcode, args)
    }
}

/// How one H_BULK_REMOVE request matches.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum RemoveCond {
    /// Remove whatever valid entry is there.
    Absolute,
    /// Remove only if dword 0 bits 0:56 (B and AVPN) equal this value
    /// (compared as `v & !0x7f`).
    Avpn(u64),
    /// Remove only if `v & mask == 0`.
    AndCond(u64),
}

impl RemoveCond {
    /// The H_REMOVE flags and third argument.
    pub const fn h_remove_args(self) -> (u64, u64) {
        match self {
            Self::Absolute => (0, 0),
            Self::Avpn(a) => (H_AVPN, a),
            Self::AndCond(m) => (H_ANDCOND, m),
        }
    }

    /// The H_BULK_REMOVE flags field and second word.
    pub const fn bulk_args(self) -> (u64, u64) {
        match self {
            Self::Absolute => (BULK_ABSOLUTE, 0),
            Self::Avpn(a) => (BULK_AVPN, a),
            Self::AndCond(m) => (BULK_ANDCOND, m),
        }
    }

    /// Whether dword 0 `v` passes the condition.
    pub const fn matches(self, v: u64) -> bool {
        match self {
            Self::Absolute => true,
            Self::Avpn(a) => v & !0x7f == a,
            Self::AndCond(m) => v & m == 0,
        }
    }
}

/// One H_BULK_REMOVE request.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct BulkRequest {
    /// The HPTE index.
    pub ptex: u64,
    /// The match condition.
    pub cond: RemoveCond,
}

impl BulkRequest {
    /// The two request words.
    pub const fn encode(&self) -> [u64; 2] {
        let (flags, arg) = self.cond.bulk_args();
        [BULK_REQUEST | flags | (self.ptex & BULK_PTEX), arg]
    }
}

/// What one H_BULK_REMOVE request came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum BulkOutcome {
    /// Removed; R and C of the removed entry (as dword-1 bits 0x100/0x80).
    Removed {
        /// The removed entry's R and C.
        rc: u64,
    },
    /// Nothing matched.
    NotFound,
    /// The request was malformed or out of range (processing stopped here).
    Parameter,
    /// A hardware error (processing stopped here).
    Hardware,
    /// The request was not processed (after an end marker or an error).
    NotProcessed,
}

impl BulkOutcome {
    /// Decodes a response word, accepting R/C both where PAPR puts them and
    /// where QEMU 7.2 does (see DESIGN.md section 8).
    pub const fn decode(word: u64) -> Self {
        if word & BULK_TYPE != BULK_RESPONSE {
            return Self::NotProcessed;
        }
        match word & BULK_CODE {
            BULK_SUCCESS => {
                let papr = (word & BULK_RC) >> 51;
                let qemu = (word & BULK_RC_QEMU) >> 43;
                Self::Removed { rc: papr | qemu }
            }
            BULK_NOT_FOUND => Self::NotFound,
            BULK_PARM => Self::Parameter,
            _ => Self::Hardware,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_match_papr_bit_numbers() {
        assert_eq!(H_EXACT, 0x0000_0080_0000_0000);
        assert_eq!(H_READ_4, 0x0000_0020_0000_0000);
        assert_eq!(H_AVPN, 0x0000_0000_8000_0000);
        assert_eq!(H_ANDCOND, 0x0000_0000_4000_0000);
        assert_eq!(H_ZERO_PAGE, 0x8000);
    }

    #[test]
    fn every_return_code_round_trips() {
        for e in [
            HptError::Parameter,
            HptError::PtegFull,
            HptError::NotFound,
            HptError::Function,
            HptError::Hardware,
            HptError::Privilege,
            HptError::Busy(1),
            HptError::Busy(9902),
            HptError::Other(-9),
        ] {
            assert_eq!(HptError::from_status(e.status()), Some(e));
        }
        assert_eq!(HptError::from_status(0), None);
        assert_eq!((H_PARAMETER, H_PTEG_FULL, H_NOT_FOUND, H_FUNCTION), (-4, -6, -7, -2));
    }

    #[test]
    fn bulk_responses_decode_rc_in_both_positions() {
        let papr = BULK_RESPONSE | BULK_SUCCESS | (0x180 << 51) | 5;
        assert_eq!(BulkOutcome::decode(papr), BulkOutcome::Removed { rc: 0x180 });
        let qemu = BULK_RESPONSE | BULK_SUCCESS | (0x100 << 43) | 5;
        assert_eq!(BulkOutcome::decode(qemu), BulkOutcome::Removed { rc: 0x100 });
        assert_eq!(BulkOutcome::decode(BULK_RESPONSE | BULK_NOT_FOUND), BulkOutcome::NotFound);
        assert_eq!(BulkOutcome::decode(BULK_RESPONSE | BULK_PARM), BulkOutcome::Parameter);
        assert_eq!(BulkOutcome::decode(BULK_REQUEST), BulkOutcome::NotProcessed);
        let req = BulkRequest { ptex: 0x1234, cond: RemoveCond::Avpn(0x80) }.encode();
        assert_eq!(req, [BULK_REQUEST | BULK_AVPN | 0x1234, 0x80]);
    }
}
