//! A guest's hashed page table, served by hypercall: the PAPR handlers over
//! an [`InMemoryHpt`], with the reverse map KVM Book3s HV keeps.
//!
//! The guest enters HPTEs whose RPN is a guest-real (logical) address; the
//! hardware table holds the host-real address instead, and a **reverse-map
//! entry per HPTE** keeps the guest's view of dword 1 plus forward/back
//! indices that chain, in a circular list, every HPTE mapping the same guest
//! page. A **per-gfn word** holds the chain's head index, and the present,
//! referenced, changed and lock bits ([`RMAP_INDEX`], [`RMAP_PRESENT`],
//! [`RMAP_REFERENCED`], [`RMAP_CHANGED`], [`RMAP_LOCK`]).
//!
//! R and C are **folded** into the per-gfn word whenever the guest would
//! otherwise take them away from the host (H_REMOVE, H_BULK_REMOVE,
//! H_PROTECT, H_CLEAR_REF, H_CLEAR_MOD): a page the guest wrote and then
//! unmapped is still dirty for a live migration. Through
//! [`MmuBackend`] the generic dirty-log and ageing drivers see each HPTE as a
//! leaf, and a per-gfn word with folded bits as a one-page leaf of its own
//! (a handle with bit 31 set), whose `clear_dirty`/`clear_young` take the
//! folded bits.
//!
//! A zap (MMU-notifier invalidation) makes the hardware entry invalid but
//! keeps it *absent* ([`HPTE_V_ABSENT`]): the guest still reads it as valid,
//! and [`GuestHpt::fault_in`] maps it again on the next storage interrupt,
//! as KVM does.
//!
//! Every hypercall argument is checked; a guest can never obtain a mapping
//! of memory outside its memslots.
//!
//! **Dirty bits that leave the table.** Under dirty-bit logging the C bits the
//! guest takes away go to a queue of whole-page ranges instead of the per-gfn
//! word ([`GuestHpt::queue_folded_dirty`]), which the core's harvest drains
//! every round through `MmuBackend::drain_lost_dirty`. The core's
//! `SlotDirtyLog::start` turns the queue on (`MmuBackend::track_lost_dirty`),
//! so an embedder never has to.
//!
//! **Limits of the handle space.** Leaves are named by mmu-generic's 32-bit
//! `PteHandle`: an HPTE index, or bit 31 ([`RMAP_HANDLE_BIT`]) plus a page index
//! for the per-gfn pseudo-leaves. That caps a table at 2^31 HPTEs (a 32 GiB
//! table, which PAPR sizes at about 1/128 of RAM, so guests of several TiB) and a
//! guest at 2^31 pages; [`GuestHpt::new`] refuses more with a typed error
//! ([`GuestHptError::TableTooLarge`], [`GuestHptError::GuestTooLarge`]). A wider handle
//! would cost every x86 reverse-map entry 4 more bytes for a limit no guest here
//! reaches, so the core keeps 32 bits.
//!
//! **TLB flushes.** The [`FlushToken`] the hypercalls fill names guest-frame
//! ranges, as for every back end, not the virtual address a `tlbie` wants. A
//! bare-metal embedder flushes the partition (`tlbiel` with IS = 2 over every
//! set, as the powernv boot image does) or maps the range back to HPTEs through
//! [`GuestHpt::chain`]. A per-entry flush kind in the core token would serve only
//! this back end; the partition flush is what the boot image measures today.
//!
//! | file | what it holds |
//! |---|---|
//! | `revmap` | the entry per HPTE, the per-gfn word and its chain |
//! | `fold` | R/C folded into the per-gfn word, or queued for a dirty log |
//! | `translate` | guest entry to hardware entry: memslot, [`PageResolver`], WIMG |
//! | `hcall` | the hypercalls, a file per family, and the dispatch by opcode |
//! | `host` | zap to absent, [`GuestHpt::fault_in`], [`GuestHpt::unprotect`] |
//! | `backend` | [`MmuBackend`] for the core's drivers |
//! | `invariants` | [`GuestHpt::check_invariants`] |

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, GfnRange};
#[cfg(doc)]
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::memslot::Memslots;

use crate::hash::{HptGeometry, VirtAddr};
use crate::hpte::{Hpte, HpteFormat, HPTE_R_C, HPTE_R_R, HPTE_V_ABSENT, HPTE_V_HVLOCK, HPTE_V_VALID};
use crate::pagesize::{PageSizePair, PageSizes};
use crate::papr::HptError;
use crate::search::{search, Found};
use crate::table::InMemoryHpt;

mod backend;
mod fold;
mod hcall;
mod host;
mod invariants;
mod revmap;
mod translate;

pub use hcall::{same_virtual_page, HcallServer, NoTlb, ReadResult, H_ENTER_FLAGS};
pub use invariants::Violation;
pub use revmap::{
    ChainIter, RMAP_CHANGED, RMAP_HANDLE_BIT, RMAP_INDEX, RMAP_LOCK, RMAP_PRESENT, RMAP_REFERENCED,
};
use revmap::{RevEntry, SlotIndex};
pub use translate::{HvaIdentity, PageResolver};

/// What H_ENTER does with the WIMG bits of a mapping of guest RAM.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum WimgPolicy {
    /// Refuse anything but WIMG = 0b0010 with H_PARAMETER (QEMU's behaviour).
    #[default]
    RequireM,
    /// Accept any WIMG and map the page with M only (KVM's behaviour); the
    /// guest still reads back what it entered.
    ForceM,
}

/// How a guest's table is built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestConfig {
    /// Table size (`ibm,pft-size`).
    pub geometry: HptGeometry,
    /// Layout of the hardware table.
    pub format: HpteFormat,
    /// The page sizes the guest was told about.
    pub sizes: PageSizes,
    /// WIMG handling.
    pub wimg: WimgPolicy,
}

/// Why a guest table could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuestHptError {
    /// The table has more than 2^31 HPTEs (handles need bit 31).
    TableTooLarge(u32),
    /// The memslots hold 2^31 pages or more.
    GuestTooLarge(u64),
}

/// A guest's HPT with its reverse map, serving the PAPR hypercalls.
#[derive(Debug)]
pub struct GuestHpt<R: PageResolver = HvaIdentity> {
    hpt: InMemoryHpt,
    /// Per PTEG, which slots hold an entry the guest sees as valid (valid or
    /// absent), bit `k` for slot `k`: H_ENTER's duplicate check and slot
    /// choice read this byte instead of the group's 16 doublewords. Kept
    /// by the only two places that fill or empty a slot, H_ENTER and
    /// `remove_viewed`; the hardware changes only R and C. Dense (a byte
    /// per group, apart from `rev`): the two groups of a pair share few
    /// cache lines with anything else H_ENTER touches.
    busy: Vec<u8>,
    rev: Vec<RevEntry>,
    slots: Memslots,
    index: Vec<SlotIndex>,
    /// The entry of `index` that held the last page H_ENTER mapped: tried
    /// first, since a guest's pages are mostly in one slot.
    last_slot: usize,
    rmap: Vec<AtomicU64>,
    /// Dword-0 bits H_ENTER refuses for this layout: a reserved B, and the
    /// AVPN bits an ISA 3.0 table lacks (one mask test for both).
    pteh_reserved: u64,
    /// Host frame-number bits the layout cannot hold ([`translate::pfn_unfit`]).
    pfn_unfit: u64,
    sizes: PageSizes,
    wimg: WimgPolicy,
    resolver: R,
    /// Largest page (in 4 KiB frames) ever entered: how far back a range
    /// walk must look for a large page that starts before the range.
    max_npages: u64,
    /// C bits the hardware lost at the guest's request, when queued.
    folded_dirty: Option<Vec<GfnRange>>,
    /// Dirty-bit logs running ([`MmuBackend::track_lost_dirty`]).
    lost_dirty_logs: u32,
    /// Pages ever queued in `folded_dirty`.
    lost_dirty_pages: u64,
}

impl<R: PageResolver> GuestHpt<R> {
    /// An empty table for a guest whose memory `slots` describes.
    pub fn new(config: GuestConfig, slots: Memslots, resolver: R) -> Result<Self, GuestHptError> {
        if config.geometry.hptes() > u64::from(RMAP_HANDLE_BIT) {
            return Err(GuestHptError::TableTooLarge(config.geometry.shift()));
        }
        let mut index = Vec::with_capacity(slots.len());
        let mut total = 0u64;
        for s in slots.iter() {
            index.push(SlotIndex { base: s.base_gfn().0, npages: s.npages(), first: total as u32, slot: *s });
            total += s.npages();
            if total >= u64::from(RMAP_HANDLE_BIT) {
                return Err(GuestHptError::GuestTooLarge(total));
            }
        }
        let mut rmap = Vec::with_capacity(total as usize);
        rmap.resize_with(total as usize, || AtomicU64::new(0));
        let n = config.geometry.hptes() as usize;
        let mut rev = Vec::with_capacity(n);
        rev.resize_with(n, RevEntry::default);
        Ok(Self {
            hpt: InMemoryHpt::new(config.geometry, config.format),
            busy: vec![0; n / 8],
            rev,
            slots,
            index,
            last_slot: 0,
            rmap,
            pteh_reserved: hcall::pteh_reserved(config.format),
            pfn_unfit: translate::pfn_unfit(config.format),
            sizes: config.sizes,
            wimg: config.wimg,
            resolver,
            max_npages: 1,
            folded_dirty: None,
            lost_dirty_logs: 0,
            lost_dirty_pages: 0,
        })
    }

    /// The hardware table (host-real RPNs), for the MMU and for tests that
    /// play the hardware ([`InMemoryHpt::hardware_access`]).
    pub fn table(&self) -> &InMemoryHpt {
        &self.hpt
    }

    /// The guest's memslots.
    pub fn memslots(&self) -> &Memslots {
        &self.slots
    }

    /// The page sizes the table accepts.
    pub fn page_sizes(&self) -> &PageSizes {
        &self.sizes
    }

    /// The per-gfn word of `gfn`, or `None` outside the memslots.
    pub fn rmap_word(&self, gfn: Gfn) -> Option<u64> {
        let i = self.gfn_index(gfn)?;
        Some(self.rmap[i as usize].load(Ordering::Acquire))
    }

    fn gfn_index(&self, gfn: Gfn) -> Option<u32> {
        let pos = self.index.partition_point(|s| s.base <= gfn.0).checked_sub(1)?;
        let s = self.index[pos];
        let off = gfn.0 - s.base;
        (off < s.npages).then(|| s.first + off as u32)
    }

    fn index_gfn(&self, idx: u32) -> Gfn {
        let pos = self.index.partition_point(|s| s.first <= idx).saturating_sub(1);
        let s = self.index[pos];
        Gfn(s.base + u64::from(idx - s.first))
    }

    /// The guest's view of dword 1 of entry `i` (without live hardware R/C).
    fn gr(&self, i: usize) -> u64 {
        self.rev[i].guest_r.load(Ordering::Acquire)
    }

    fn set_gr(&self, i: usize, r: u64) {
        self.rev[i].guest_r.store(r, Ordering::Release);
    }

    fn or_gr(&self, i: usize, bits: u64) {
        self.rev[i].guest_r.fetch_or(bits, Ordering::AcqRel);
    }

    fn in_range(&self, ptex: u64) -> Result<usize, HptError> {
        if self.hpt.geometry().contains(ptex) {
            Ok(ptex as usize)
        } else {
            Err(HptError::Parameter)
        }
    }

    /// Dword 0 as the guest sees it: lock bit hidden, absent shown valid.
    fn guest_v(hw_v: u64) -> u64 {
        let v = hw_v & !HPTE_V_HVLOCK;
        if v & HPTE_V_ABSENT != 0 {
            (v & !HPTE_V_ABSENT) | HPTE_V_VALID
        } else {
            v
        }
    }

    /// The entry at `ptex` as the guest sees it (what H_READ returns): its
    /// own RPN, with the R and C the hardware has set.
    pub fn guest_view(&self, ptex: u64) -> Hpte {
        let Some(hw) = self.hpt.load(ptex) else { return Hpte::EMPTY };
        self.view_of(ptex, hw)
    }

    /// The guest view of entry `ptex` whose hardware entry reads `hw`.
    fn view_of(&self, ptex: u64, hw: Hpte) -> Hpte {
        let v = Self::guest_v(hw.v);
        if v & HPTE_V_VALID == 0 {
            return Hpte::new(v, hw.r);
        }
        let rc = if hw.valid() { hw.r & (HPTE_R_R | HPTE_R_C) } else { 0 };
        Hpte::new(v, self.gr(ptex as usize) | rc)
    }

    /// The guest's entry for `va` in a segment of base page size
    /// `1 << base_shift`, by the MMU's hashed search over the guest's view
    /// (guest-real RPN): a valid entry, or one a zap left absent, which the
    /// host maps again with [`GuestHpt::fault_in`] on the storage interrupt.
    pub fn find(&self, va: &VirtAddr, base_shift: u32) -> Option<Found> {
        let geom = self.hpt.geometry();
        search(geom.pteg_mask(), &self.sizes, va, base_shift, |p| {
            geom.contains(p).then(|| self.guest_view(p))
        })
    }

    /// Whether a zap left the entry at `ptex` absent: valid for the guest,
    /// invalid for the hardware until [`GuestHpt::fault_in`].
    pub fn is_absent(&self, ptex: u64) -> bool {
        self.hpt.load(ptex).is_some_and(|h| h.v & HPTE_V_ABSENT != 0)
    }

    /// The guest frames an entry's page covers, from the guest's view.
    fn guest_range(&self, view: Hpte) -> Option<(GfnRange, PageSizePair)> {
        let ps = self.sizes.decode(view.v, view.r)?;
        let gfn = Gfn(view.real_address(ps.actual_shift) >> 12);
        Some((GfnRange::from_len(gfn, ps.npages())?, ps))
    }
}
