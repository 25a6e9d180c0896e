//! Glue between the kernel and `arch-ppc-book3s`: the platform's hashed page table is
//! the crate's PAPR pass-through (`PaprHpt`) over this kernel's `sc 1` ([`Spapr`]); HPTE
//! words (`mapping::VirtPage::ram_hpte`), the AVPN argument, hashes and SLB entries come
//! from the crate. Only addresses and choices (which VSID, which EA, which frame) are
//! made here.

use crate::hcall::hcall;
use arch_ppc_book3s::hash::{SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{pp, Hpte};
use arch_ppc_book3s::mapping::VirtPage;
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
pub const PP_RW: u64 = pp::RW_RW;
/// PP = read-only.
pub const PP_RO: u64 = pp::R_R;

/// The AVPN argument of H_REMOVE/H_PROTECT/H_BULK_REMOVE (B included), from the crate.
pub use arch_ppc_book3s::hpte::avpn_arg;

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

/// One virtual page as the scenarios choose it: a segment (VSID, size), an effective
/// address in it and a page size; [`Vpage::page`] is the crate's view of it.
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
    /// The crate's virtual page (VA and page sizes), for `mapping::insert` and the HPTE builder.
    pub fn page(&self) -> VirtPage {
        let va =
            VirtAddr::new(self.vsid, self.ssize, self.ea).expect("scenario VSIDs fit every segment size");
        VirtPage::new(va, self.ps.base_shift, self.ps.shift)
    }

    /// The PTEG index of the primary or secondary hash.
    pub fn group(&self, mask: u64, secondary: bool) -> u64 {
        self.page().group(mask, secondary)
    }

    /// The RAM HPTE (PAPR layout, WIMG = M) mapping this page to real address `pa`.
    pub fn hpte(&self, sizes: &PageSizes, pa: u64, pp: u64, secondary: bool) -> Option<Hpte> {
        self.page().ram_hpte(sizes, pa, pp, secondary)
    }
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
