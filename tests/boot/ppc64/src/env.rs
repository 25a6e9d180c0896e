//! The machine as the scenarios see it: the memory layout, the page sizes the platform
//! lists (parsed by the crate from `ibm,segment-page-sizes`), the HPT geometry, the
//! platform table, and small allocators for SLB slots, VSIDs and test frames.

use crate::hpt::{self, PageSize, Spapr, Table, Vpage};
use crate::mmu;
use crate::ofw::Platform;
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize};
use arch_ppc_book3s::mapping::insert;
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::HptError;

/// Real-address layout.
pub mod layout {
    /// The heap (identity mapped).
    pub const HEAP_BASE: u64 = 16 << 20;
    /// Heap size.
    pub const HEAP_SIZE: u64 = 32 << 20;
    /// End of the identity-mapped region (vectors, image, heap).
    pub const IDENT_END: u64 = 64 << 20;
    /// Frames for scenario mappings (never identity mapped: reached through test EAs).
    pub const POOL_BASE: u64 = 64 << 20;
    /// End of the frame pool.
    pub const POOL_END: u64 = 192 << 20;
}

/// VSID of the kernel's identity segment (ESID 0).
pub const IDENT_VSID: u64 = 0x7_0000;

/// Why the environment cannot be built.
#[derive(Debug)]
pub enum EnvError {
    /// `ibm,segment-page-sizes` did not parse.
    PageSizes,
    /// `ibm,pft-size` out of range.
    PftSize(u32),
    /// 4K pages are not listed.
    No4K,
}

impl core::fmt::Display for EnvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::PageSizes => f.write_str("ibm,segment-page-sizes does not parse"),
            Self::PftSize(s) => write!(f, "ibm,pft-size 2^{} out of range", s),
            Self::No4K => f.write_str("4K pages are not listed in ibm,segment-page-sizes"),
        }
    }
}

/// Scenario environment.
pub struct Env {
    /// What the device tree said.
    pub plat: Platform,
    /// Page sizes, from the device tree.
    pub sizes: PageSizes,
    /// HPT geometry, from the device tree.
    pub geometry: HptGeometry,
    /// PTEG index mask.
    pub hash_mask: u64,
    /// The platform's table.
    pub table: Table,
    /// 4 KiB pages in a 4 KiB segment.
    pub ps4k: PageSize,
    /// 64 KiB pages in a 64 KiB segment, if listed.
    pub ps64k: Option<PageSize>,
    /// 16 MiB pages in a 16 MiB segment, if listed.
    pub ps16m: Option<PageSize>,
    /// Page size of the identity map.
    pub ident_ps: PageSize,
    /// HPTEs of the identity map.
    pub ident_entries: u64,
    next_vsid: u64,
    next_frame: u64,
    next_slb: u64,
}

impl Env {
    /// Builds the environment from the device tree.
    pub fn new(plat: Platform) -> Result<Self, EnvError> {
        let sizes =
            PageSizes::from_cells(&plat.sps_cells[..plat.sps_len]).map_err(|_| EnvError::PageSizes)?;
        let geometry = HptGeometry::from_pft_size(plat.pft_shift).ok_or(EnvError::PftSize(plat.pft_shift))?;
        let listed = |b: u32, a: u32| sizes.encode(b, a, 0).map(|_| PageSize { base_shift: b, shift: a });
        let ps4k = listed(12, 12).ok_or(EnvError::No4K)?;
        let ps64k = listed(16, 16);
        Ok(Env {
            plat,
            sizes,
            geometry,
            hash_mask: geometry.pteg_mask(),
            table: Table::new(Spapr, geometry.pteg_mask()),
            ps4k,
            ps64k,
            ps16m: listed(24, 24),
            ident_ps: ps64k.unwrap_or(ps4k),
            ident_entries: 0,
            next_vsid: 0x1000,
            next_frame: layout::POOL_BASE,
            next_slb: 1,
        })
    }

    /// A fresh VSID.
    pub fn vsid(&mut self) -> u64 {
        self.next_vsid += 1;
        self.next_vsid
    }

    /// `n` contiguous frames of 2^`shift` bytes, aligned to their size.
    pub fn frames(&mut self, shift: u32, n: u64) -> u64 {
        let size = 1u64 << shift;
        let base = (self.next_frame + size - 1) & !(size - 1);
        let end = base + n * size;
        assert!(end <= layout::POOL_END, "frame pool exhausted");
        self.next_frame = end;
        base
    }

    /// Loads an SLB entry for the segment containing `ea`; returns its index.
    pub fn load_segment(&mut self, ea: u64, vsid: u64, ssize: SegmentSize, base_shift: u32) -> u64 {
        let index = self.next_slb;
        assert!(index < self.plat.slb_size.max(32) as u64, "SLB full");
        self.next_slb += 1;
        let e = hpt::slb_entry(&self.sizes, ea, vsid, ssize, base_shift, index);
        mmu::slbmte(e.esid_word, e.vsid_word);
        index
    }

    /// Removes the segment containing `ea` from the SLB.
    pub fn unload_segment(&mut self, ea: u64, ssize: SegmentSize) {
        mmu::slbie(ea, ssize.b());
    }

    /// Frees every SLB slot above the kernel's (after the scenario unloaded its segments).
    pub fn reset_slb(&mut self) {
        self.next_slb = 1;
    }

    /// Enters `n` consecutive pages from `first` onto the frames at `pa` with the crate's
    /// `mapping::insert` (primary group; secondary when full) and returns (slot, dword 0)
    /// for each.
    pub fn enter_range(
        &mut self,
        first: Vpage,
        pa: u64,
        n: u64,
        pp: u64,
    ) -> Result<alloc::vec::Vec<(u64, u64)>, HptError> {
        let mut out = alloc::vec::Vec::new();
        let ps = first.ps;
        for i in 0..n {
            let vp = Vpage { ea: first.ea + i * ps.bytes(), ..first };
            let ins = insert(&mut self.table, &vp.page(), &self.sizes, pa + i * ps.bytes(), pp)?;
            out.push((ins.slot, ins.hpte.v));
        }
        Ok(out)
    }

    /// Enters the identity map [0, IDENT_END) and loads its segment (SLB slot 0).
    pub fn map_identity(&mut self) -> Result<(), HptError> {
        let ps = self.ident_ps;
        let n = layout::IDENT_END / ps.bytes();
        let slots = self.enter_range(
            Vpage { vsid: IDENT_VSID, ssize: SegmentSize::S256M, ea: 0, ps },
            0,
            n,
            hpt::PP_RW,
        )?;
        self.ident_entries = slots.len() as u64;
        let e = hpt::slb_entry(&self.sizes, 0, IDENT_VSID, SegmentSize::S256M, ps.base_shift, 0);
        mmu::slbmte(e.esid_word, e.vsid_word);
        Ok(())
    }
}

/// Runs `f` with relocation off (real addresses), then turns it back on.
pub fn in_real_mode<T>(f: impl FnOnce() -> T) -> T {
    mmu::relocation_off();
    let t = f();
    // SAFETY: relocation was on before (the identity map is in place).
    unsafe { mmu::relocation_on() };
    t
}
