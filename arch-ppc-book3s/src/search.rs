//! The MMU's hashed lookup of a virtual page (Power ISA 2.07B Book III-S
//! 5.7.7.2, "Page Table Search"), used by software that plays the CPU over
//! an [`InMemoryHpt`](crate::table::InMemoryHpt) and by the guest table's
//! own search over the guest's view.

use crate::hash::{avpn_ignored, pteg_index, VirtAddr};
use crate::hpte::{Hpte, HPTE_V_AVPN, HPTE_V_B};
use crate::pagesize::{PageSizePair, PageSizes};

/// An entry the hashed lookup found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Found {
    /// Its slot.
    pub ptex: u64,
    /// The entry (pre-3.0 layout).
    pub hpte: Hpte,
    /// Its page size.
    pub size: PageSizePair,
}

impl Found {
    /// The real address `va` translates to through this entry.
    pub const fn real_address(&self, va: &VirtAddr) -> u64 {
        let size = 1u64 << self.size.actual_shift;
        self.hpte.real_address(self.size.actual_shift) | (va.offset & (size - 1))
    }
}

/// The MMU's search for `va` in a segment of base page size `1 << base_shift`:
/// the primary group then the secondary, the first valid entry whose H bit
/// names the group searched, whose page-size encoding belongs to the
/// segment's base size, and whose B and AVPN equal the address's (VA bits
/// inside a page larger than 8 MiB ignored). `load` reads one entry in the
/// pre-3.0 layout (`None` outside the table).
pub fn search(
    pteg_mask: u64,
    sizes: &PageSizes,
    va: &VirtAddr,
    base_shift: u32,
    mut load: impl FnMut(u64) -> Option<Hpte>,
) -> Option<Found> {
    let hash = va.hash(base_shift);
    for secondary in [false, true] {
        let g = pteg_index(hash, pteg_mask, secondary);
        for ptex in g * 8..g * 8 + 8 {
            let Some(h) = load(ptex) else { continue };
            if !h.valid() || h.secondary() != secondary {
                continue;
            }
            let Some(size) = sizes.decode(h.v, h.r) else { continue };
            if size.base_shift != base_shift {
                continue;
            }
            let ignored = avpn_ignored(size.actual_shift) << 7;
            if (h.v ^ va.avpn_v(size.actual_shift)) & (HPTE_V_B | HPTE_V_AVPN) & !ignored == 0 {
                return Some(Found { ptex, hpte: h, size });
            }
        }
    }
    None
}
