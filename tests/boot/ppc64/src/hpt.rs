//! Glue between the kernel and `arch-ppc-book3s`: the platform's hashed page table is
//! the crate's PAPR pass-through (`PaprHpt`) over this kernel's `sc 1` ([`Spapr`]); HPTE
//! words, hashes and SLB entries come from the crate. Only addresses and choices (which
//! VSID, which EA, which frame) are made here.

use crate::hcall::hcall;
use arch_ppc_book3s::hash::{pteg_index, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{Hpte, HPTE_R_M, HPTE_V_SECONDARY, HPTE_V_VALID};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::{Hcall, HcallReturn};
use arch_ppc_book3s::passthrough::PaprHpt;
use arch_ppc_book3s::slb::{SlbEntry, SlbFlags};

/// The hypercall instruction, for the crate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spapr;

impl Hcall for Spapr {
    fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
        let r = hcall(opcode, args);
        HcallReturn { status: r.status, ret: r.ret }
    }
}

/// The platform's table, reached by hypercall.
pub type Table = PaprHpt<Spapr>;

/// PP = read/write for key 0 (and key 1).
pub const PP_RW: u64 = 2;
/// PP = read-only.
pub const PP_RO: u64 = 3;

/// A page size: the segment's base size and the page's actual size (log2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSize {
    /// Base page size of the segment (what the hash uses; selects the SLB L||LP).
    pub base_shift: u32,
    /// Actual page size.
    pub shift: u32,
}

impl PageSize {
    /// Bytes in a page.
    pub const fn bytes(self) -> u64 {
        1 << self.shift
    }
}

/// One virtual page: a segment (VSID, size) and an effective address in it.
#[derive(Clone, Copy, Debug)]
pub struct Vpage {
    /// Virtual segment id.
    pub vsid: u64,
    /// Segment size.
    pub ssize: SegmentSize,
    /// Effective address.
    pub ea: u64,
    /// Page size.
    pub ps: PageSize,
}

impl Vpage {
    fn va(&self) -> VirtAddr {
        VirtAddr::new(self.vsid, self.ssize, self.ea).expect("scenario VSIDs fit every segment size")
    }

    /// The hash (before masking).
    pub fn hash(&self) -> u64 {
        self.va().hash(self.ps.base_shift)
    }

    /// The PTEG index of the primary or secondary hash.
    pub fn group(&self, mask: u64, secondary: bool) -> u64 {
        pteg_index(self.hash(), mask, secondary)
    }

    /// The HPTE (PAPR layout) mapping this page to real address `pa` with `pp`.
    pub fn hpte(&self, sizes: &PageSizes, pa: u64, pp: u64, secondary: bool) -> Option<Hpte> {
        let (l, rpn) = sizes.encode(self.ps.base_shift, self.ps.shift, pa)?;
        let h = if secondary { HPTE_V_SECONDARY } else { 0 };
        Some(Hpte::new(self.va().avpn_v(self.ps.shift) | l | h | HPTE_V_VALID, rpn | HPTE_R_M | pp))
    }
}

/// The AVPN argument matching entry `v` (QEMU compares it with `v & !0x7f`, B included).
pub const fn avpn_arg(v: u64) -> u64 {
    v & !0x7f
}

/// The SLB entry for the segment of `ea`, base page size `base_shift`, in slot `index`.
pub fn slb_entry(
    sizes: &PageSizes,
    ea: u64,
    vsid: u64,
    ssize: SegmentSize,
    base_shift: u32,
    index: u64,
) -> SlbEntry {
    SlbEntry::new(ea, vsid, ssize, base_shift, SlbFlags::KP, index, sizes)
        .expect("listed base page size, small VSID and index")
}
