//! Stand-ins for the embedder, for host tests and the cross-arch scenario
//! suite: a host whose memory is one linear, huge-page-backed mapping, and a
//! TLB that records the flushes it is asked for.

use alloc::vec::Vec;

use mmu_generic::addr::{GfnRange, Hva, Pfn};
use mmu_generic::backend::TlbFlush;

use crate::format::PageSize;
use crate::tdp::{HostFault, HostMemory, HostPage};

/// Host memory where host-virtual page `p` is host frame `p + pfn_offset`,
/// mapped with pages of `size` (so `pfn_offset` should be a multiple of the
/// size's frame count for huge host pages to be physically aligned).
#[derive(Clone, Debug)]
pub struct LinearHost {
    /// Added to the host-virtual page number to give the host frame.
    pub pfn_offset: u64,
    /// Size of the host mappings.
    pub size: PageSize,
    /// Host-virtual pages mapped read-only (copy-on-write refused).
    pub read_only: Vec<u64>,
    /// Number of resolutions asked for.
    pub resolves: u64,
}

impl LinearHost {
    /// A host with every page writable.
    pub fn new(pfn_offset: u64, size: PageSize) -> Self {
        Self { pfn_offset, size, read_only: Vec::new(), resolves: 0 }
    }

    /// The host frame behind `hva`.
    pub fn pfn_of(&self, hva: Hva) -> Pfn {
        Pfn(hva.page().wrapping_add(self.pfn_offset))
    }
}

impl HostMemory for LinearHost {
    fn resolve(&mut self, hva: Hva, _write: bool) -> Result<HostPage, HostFault> {
        self.resolves += 1;
        let page = hva.page();
        let pfn = page.checked_add(self.pfn_offset).ok_or(HostFault)?;
        Ok(HostPage { pfn: Pfn(pfn), writable: !self.read_only.contains(&page), size: self.size })
    }
}

/// A TLB that records flushes.
#[derive(Clone, Debug, Default)]
pub struct FlushRecorder {
    /// Ranges flushed, in order.
    pub ranges: Vec<GfnRange>,
    /// Number of full flushes.
    pub alls: usize,
}

impl TlbFlush for FlushRecorder {
    fn flush_range(&mut self, range: GfnRange) {
        self.ranges.push(range);
    }

    fn flush_all(&mut self) {
        self.alls += 1;
    }
}
