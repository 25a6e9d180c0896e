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

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, GfnRange, Pfn};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend, TlbFlush};
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags};
use mmu_generic::pte_list::PteHandle;

use crate::hash::{avpn_ignored, HptGeometry, VirtAddr};
use crate::hpte::{
    is_writable, make_readonly, Hpte, HpteFormat, HPTE_R_C, HPTE_R_M, HPTE_R_PPP, HPTE_R_R, HPTE_R_RPN,
    HPTE_R_TS, HPTE_R_WIMG, HPTE_V_ABSENT, HPTE_V_AVPN, HPTE_V_B, HPTE_V_COMMON_BITS, HPTE_V_HVLOCK,
    HPTE_V_SECONDARY, HPTE_V_VALID,
};
use crate::mapping::{search, Found};
use crate::pagesize::{PageSizePair, PageSizes};
use crate::papr::{Hcall, H_FUNCTION};
use crate::papr::{
    HcallReturn, HptError, RemoveCond, BULK_END, BULK_FLAGS, BULK_MAX, BULK_NOT_FOUND, BULK_PARM, BULK_PTEX,
    BULK_REQUEST, BULK_RESPONSE, BULK_SUCCESS, BULK_TYPE, H_ANDCOND, H_AVPN, H_BULK_REMOVE, H_CLEAR_MOD,
    H_CLEAR_REF, H_COALESCE_CAND, H_ENTER, H_EXACT, H_ICACHE_INVALIDATE, H_ICACHE_SYNCHRONIZE, H_PROTECT,
    H_PROTECT_BITS, H_READ, H_READ_4, H_REMOVE,
};
use crate::table::{InMemoryHpt, Protection};

/// Per-gfn word: the index of the chain's head HPTE.
pub const RMAP_INDEX: u64 = 0xffff_ffff;
/// Per-gfn word: the chain is not empty.
pub const RMAP_PRESENT: u64 = 1 << 32;
/// Per-gfn word: R folded in from an HPTE that no longer holds it.
pub const RMAP_REFERENCED: u64 = 1 << 33;
/// Per-gfn word: C folded in from an HPTE that no longer holds it.
pub const RMAP_CHANGED: u64 = 1 << 34;
/// Per-gfn word: lock bit, reserved for an editor that shares the table.
/// [`GuestHpt`] edits chains under `&mut self` and never sets it;
/// [`GuestHpt::check_invariants`] reports it set.
pub const RMAP_LOCK: u64 = 1 << 63;
/// Handle bit naming a per-gfn word rather than an HPTE.
pub const RMAP_HANDLE_BIT: u32 = 1 << 31;

const NO_RMAP: u32 = u32::MAX;

/// H_ENTER flags accepted: H_EXACT and the hints the table need not act on.
pub const H_ENTER_FLAGS: u64 = H_EXACT | H_ICACHE_INVALIDATE | H_ICACHE_SYNCHRONIZE | H_COALESCE_CAND;

/// The host frames behind guest memory.
pub trait PageResolver {
    /// The first host frame of `npages` host-contiguous frames backing guest
    /// frames `gfn..gfn + npages` of `slot` (the whole range is in the slot),
    /// or `None` if they are not resident or not contiguous.
    fn resolve(&mut self, slot: &Memslot, gfn: Gfn, npages: u64) -> Option<Pfn>;
}

/// A resolver for a hypervisor whose host-virtual addresses equal host-real
/// addresses (a bare-metal hypervisor with an identity map; host tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct HvaIdentity;

impl PageResolver for HvaIdentity {
    fn resolve(&mut self, slot: &Memslot, gfn: Gfn, _npages: u64) -> Option<Pfn> {
        slot.gfn_to_hva(gfn).map(|h| Pfn(h.page()))
    }
}

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

/// A broken invariant found by [`GuestHpt::check_invariants`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Violation {
    /// Two valid HPTEs translate the same virtual page in one PTEG pair.
    DuplicateTranslation(u64, u64),
    /// A valid HPTE maps guest memory outside every memslot, or its page
    /// does not lie wholly in one slot.
    OutsideGuestMemory(u64),
    /// A valid HPTE has a page-size encoding the machine lacks.
    BadPageSize(u64),
    /// A hardware-valid HPTE is not on the chain of its guest page.
    NotInChain(u64),
    /// A chain holds an HPTE that is not hardware-valid, or of another page.
    StrayInChain(u64),
    /// A chain's forward and back links disagree.
    BrokenLinks(u64),
    /// A per-gfn word's present bit disagrees with its chain.
    PresentBit(u64),
    /// A lock bit was left set.
    LockHeld(u64),
    /// The occupancy summary of a PTEG disagrees with the table.
    Occupancy(u64),
}

#[derive(Debug)]
struct RevEntry {
    /// dword 1 as the guest entered it (guest-real RPN), with the R/C the host
    /// took away (harvest, zap) folded in: the guest never sees them vanish.
    guest_r: AtomicU64,
    forw: u32,
    back: u32,
    /// Index of the per-gfn word whose chain holds the entry, or NO_RMAP.
    rmap: u32,
    /// The host made the hardware entry read-only (read-only slot or write-protect).
    hv_ro: bool,
    /// log2 of the page size H_ENTER decoded (the L/LP bits never change
    /// afterwards), so that a removal finds the page to flush without
    /// decoding again.
    shift: u8,
}

impl Default for RevEntry {
    fn default() -> Self {
        Self { guest_r: AtomicU64::new(0), forw: 0, back: 0, rmap: NO_RMAP, hv_ro: false, shift: 12 }
    }
}

/// What [`GuestHpt::hardware_r`] makes of a guest entry.
struct HwEntry {
    /// The hardware dword 1 (host-real RPN, WIMG and protection applied).
    r: u64,
    /// The per-gfn word of the page's first frame.
    idx: u32,
    /// The slot is read-only, so the hardware entry is.
    ro: bool,
    ps: PageSizePair,
    /// The hardware entry in the table's layout.
    table: (u64, u64),
}

#[derive(Clone, Copy, Debug)]
struct SlotIndex {
    base: u64,
    npages: u64,
    first: u32,
}

/// The outcome of H_READ: one or four entries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReadResult {
    /// The entries read (only the first `count` are meaningful).
    pub hptes: [Hpte; 4],
    /// 1, or 4 with H_READ_4.
    pub count: usize,
}

/// A guest's HPT with its reverse map, serving the PAPR hypercalls.
#[derive(Debug)]
pub struct GuestHpt<R: PageResolver = HvaIdentity> {
    hpt: InMemoryHpt,
    /// Per PTEG, which slots hold an entry the guest sees as valid (valid or
    /// absent), bit `k` for slot `k`: H_ENTER's duplicate check and slot
    /// choice read this byte instead of the group's 16 doublewords. Kept
    /// by the only two places that fill or empty a slot, H_ENTER and
    /// [`GuestHpt::remove_viewed`]; the hardware changes only R and C.
    busy: Vec<u8>,
    rev: Vec<RevEntry>,
    slots: Memslots,
    index: Vec<SlotIndex>,
    rmap: Vec<AtomicU64>,
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

/// The group index of the primary hash of the entry at `ptex`.
const fn primary_group(ptex: u64, v: u64, mask: u64) -> u64 {
    let g = ptex >> 3;
    if v & HPTE_V_SECONDARY != 0 {
        g ^ mask
    } else {
        g
    }
}

/// Whether two valid entries of one PTEG pair translate the same virtual
/// page: same base page size, same primary hash group, and the same B and
/// AVPN once the bits inside the larger page are ignored. (With at least 2^11
/// PTEGs, the group fixes every VA bit the AVPN omits.)
pub fn same_virtual_page(mask: u64, a: (u64, Hpte, PageSizePair), b: (u64, Hpte, PageSizePair)) -> bool {
    if a.2.base_shift != b.2.base_shift || primary_group(a.0, a.1.v, mask) != primary_group(b.0, b.1.v, mask)
    {
        return false;
    }
    let ign = avpn_ignored(a.2.actual_shift.max(b.2.actual_shift)) << 7;
    (a.1.v ^ b.1.v) & (HPTE_V_B | HPTE_V_AVPN) & !ign == 0
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
            index.push(SlotIndex { base: s.base_gfn().0, npages: s.npages(), first: total as u32 });
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
            rmap,
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

    // ---- the per-gfn word and its chain ------------------------------------------------------

    // Chains change only under `&mut self`, so no other thread can hold the
    // table meanwhile: the word is edited with plain loads and stores (no
    // lock bit, no atomic read-modify-write), keeping the folded R/C bits.

    /// Stores the head/present bits of per-gfn word `idx`, keeping R/C.
    fn set_head(&mut self, idx: u32, head: Option<u32>) {
        let w = self.rmap[idx as usize].get_mut();
        let set = match head {
            Some(h) => RMAP_PRESENT | u64::from(h),
            None => 0,
        };
        *w = (*w & (RMAP_REFERENCED | RMAP_CHANGED)) | set;
    }

    fn link(&mut self, idx: u32, ptex: u32) {
        let w = *self.rmap[idx as usize].get_mut();
        let me = ptex as usize;
        if w & RMAP_PRESENT != 0 {
            // Append at the tail of the circular list; the head stays.
            let head = (w & RMAP_INDEX) as u32;
            let tail = self.rev[head as usize].back;
            self.rev[me].forw = head;
            self.rev[me].back = tail;
            self.rev[tail as usize].forw = ptex;
            self.rev[head as usize].back = ptex;
            self.rev[me].rmap = idx;
        } else {
            self.rev[me].forw = ptex;
            self.rev[me].back = ptex;
            self.rev[me].rmap = idx;
            self.set_head(idx, Some(ptex));
        }
    }

    fn unlink(&mut self, ptex: u32) {
        let me = ptex as usize;
        let idx = self.rev[me].rmap;
        if idx == NO_RMAP {
            return;
        }
        let head = (*self.rmap[idx as usize].get_mut() & RMAP_INDEX) as u32;
        let (next, prev) = (self.rev[me].forw, self.rev[me].back);
        self.rev[next as usize].back = prev;
        self.rev[prev as usize].forw = next;
        self.rev[me].rmap = NO_RMAP;
        if next == ptex {
            self.set_head(idx, None);
        } else if head == ptex {
            self.set_head(idx, Some(next));
        }
    }

    /// ORs an HPTE's R and C into the per-gfn word of its chain. `lost`: the
    /// hardware entry no longer holds them (removed, or C cleared for the
    /// guest); with [`GuestHpt::queue_folded_dirty`] on, such a C goes to the
    /// queue instead of the word.
    fn fold(&mut self, ptex: u64, r: u64, lost: bool) {
        self.fold_from(ptex, None, r, lost);
    }

    /// [`GuestHpt::fold`] for an entry whose dword 0 (pre-3.0 layout) was
    /// `v` before the caller emptied it; `None`: read it from the table.
    fn fold_from(&mut self, ptex: u64, v: Option<u64>, r: u64, lost: bool) {
        let idx = self.rev[ptex as usize].rmap;
        let mut bits = 0;
        if r & HPTE_R_R != 0 {
            bits |= RMAP_REFERENCED;
        }
        if r & HPTE_R_C != 0 {
            if let Some(q) = self.folded_dirty.as_mut() {
                if lost {
                    let v = v.unwrap_or_else(|| self.hpt.load(ptex).unwrap_or_default().v);
                    let view = Hpte::new(v, self.rev[ptex as usize].guest_r.load(Ordering::Acquire));
                    if let Some(ps) = self.sizes.decode(view.v, view.r) {
                        let gfn = Gfn(view.real_address(ps.actual_shift) >> 12);
                        q.push(GfnRange { start: gfn, end: Gfn(gfn.0 + ps.npages()) });
                        self.lost_dirty_pages += ps.npages();
                    }
                }
            } else {
                bits |= RMAP_CHANGED;
            }
        }
        if bits != 0 && idx != NO_RMAP {
            self.rmap[idx as usize].fetch_or(bits, Ordering::AcqRel);
        }
    }

    /// Routes the C bits the guest takes away from the hardware (H_REMOVE,
    /// H_BULK_REMOVE and H_CLEAR_MOD of a changed entry, and a host
    /// `split_huge`) to a queue of guest-frame ranges instead of the per-gfn
    /// word, where a dirty log that harvests only its writable chain
    /// (mmu-generic's `Tracking::HardwareDirty`) would never look. The core's
    /// dirty-bit harvest drains it every round through
    /// `MmuBackend::drain_lost_dirty`, so a page the guest wrote and then
    /// unmapped is still reported; [`GuestHpt::take_folded_dirty`] drains it
    /// by hand. The queue covers the whole page, where the per-gfn word names
    /// only its first frame. mmu-generic's `SlotDirtyLog::start` turns it on
    /// (through `MmuBackend::track_lost_dirty`) and the last log's `stop`
    /// off; turning it off folds what is queued into the words.
    pub fn queue_folded_dirty(&mut self, on: bool) {
        match (on, self.folded_dirty.take()) {
            (true, q) => self.folded_dirty = Some(q.unwrap_or_default()),
            (false, Some(q)) => {
                for r in q {
                    if let Some(i) = self.gfn_index(r.start) {
                        self.rmap[i as usize].fetch_or(RMAP_CHANGED, Ordering::AcqRel);
                    }
                }
            }
            (false, None) => {}
        }
    }

    /// Pages queued by [`GuestHpt::queue_folded_dirty`] since the table was
    /// made (a statistic: the queue itself drains).
    pub fn lost_dirty_pages(&self) -> u64 {
        self.lost_dirty_pages
    }

    /// Drains the queue of [`GuestHpt::queue_folded_dirty`]: the guest
    /// frames whose C bit left the hardware since the last call.
    pub fn take_folded_dirty(&mut self) -> Vec<GfnRange> {
        self.folded_dirty.as_mut().map(core::mem::take).unwrap_or_default()
    }

    /// The chain of per-gfn word `idx`, head first.
    pub fn chain(&self, gfn: Gfn) -> ChainIter<'_, R> {
        let w = self.gfn_index(gfn).map(|i| self.rmap[i as usize].load(Ordering::Acquire)).unwrap_or(0);
        let head = (w & RMAP_PRESENT != 0).then_some((w & RMAP_INDEX) as u32);
        ChainIter { hpt: self, head, next: head, left: self.rev.len() }
    }

    // ---- hardware entry helpers ---------------------------------------------------------------

    /// Invalidates the hardware entry and unlinks it; returns its final
    /// dword 1 (R/C read after V went off).
    fn take_hw(&mut self, ptex: u64, flush: &mut FlushToken, fold: bool) -> u64 {
        let Some(h) = self.hpt.load(ptex) else { return 0 };
        if !h.valid() {
            return h.r;
        }
        // V off first; R/C can still change until the invalidation completes,
        // so dword 1 is read afterwards.
        let absent = Hpte::new((h.v & !(HPTE_V_VALID | HPTE_V_HVLOCK)) | HPTE_V_ABSENT, h.r);
        let _ = self.hpt.store(ptex, absent);
        let r = self.hpt.clear_r_bits(ptex, HPTE_R_R | HPTE_R_C);
        let view = Hpte::new(h.v, self.gr(ptex as usize));
        if let Some((range, _)) = self.guest_range(view) {
            flush.add_range(range);
        }
        if fold {
            self.fold(ptex, r, true);
        }
        self.unlink(ptex as u32);
        r
    }

    /// Computes the hardware dword 1 for the guest's `guest_r`, and the
    /// per-gfn index; `None` if the page is not wholly inside guest memory.
    fn hardware_r(&mut self, v: u64, guest_r: u64) -> Result<HwEntry, HptError> {
        let ps = self.sizes.decode(v, guest_r).ok_or(HptError::Parameter)?;
        let gpa = Hpte::new(v, guest_r).real_address(ps.actual_shift);
        let gfn = Gfn(gpa >> 12);
        let slot = *self.slots.lookup(gfn).ok_or(HptError::Parameter)?;
        if !slot.allows_page(gfn, ps.actual_shift) {
            return Err(HptError::Parameter);
        }
        let mut r = guest_r;
        match self.wimg {
            WimgPolicy::RequireM if guest_r & HPTE_R_WIMG != HPTE_R_M => return Err(HptError::Parameter),
            WimgPolicy::RequireM => {}
            WimgPolicy::ForceM => r = (r & !HPTE_R_WIMG) | HPTE_R_M,
        }
        let size = 1u64 << ps.actual_shift;
        let pfn = self.resolver.resolve(&slot, gfn, ps.npages()).ok_or(HptError::Parameter)?;
        let hpa = pfn.hpa().ok_or(HptError::Parameter)?;
        if hpa & (size - 1) != 0 || hpa & !HPTE_R_RPN != 0 {
            return Err(HptError::Parameter);
        }
        r = (r & !(HPTE_R_RPN & !(size - 1))) | hpa;
        let ro = slot.flags().contains(SlotFlags::READONLY);
        if ro {
            r = make_readonly(r);
        }
        let idx = self.gfn_index(gfn).ok_or(HptError::Parameter)?;
        // The hardware layout must be able to hold it (ISA 3.0's narrower RPN).
        let table = self.hpt.format().encode(Hpte::new(v, r)).map_err(|_| HptError::Parameter)?;
        Ok(HwEntry { r, idx, ro, ps, table })
    }

    // ---- the hypercalls -----------------------------------------------------------------------

    /// H_ENTER(flags, ptex, pteh, ptel): returns the slot used.
    ///
    /// H_PARAMETER: unknown flags, `ptex` outside the table, a reserved B,
    /// dword-1 bit 1 set, an AVPN wider than an ISA 3.0 table holds, a
    /// page-size encoding the machine lacks, a page not wholly inside one
    /// memslot, WIMG other than M (under [`WimgPolicy::RequireM`]), or a
    /// second translation of a virtual page already in the PTEG pair.
    /// H_PTEG_FULL: no free slot in the group, or H_EXACT's slot is in use.
    pub fn h_enter(&mut self, flags: u64, ptex: u64, pteh: u64, ptel: u64) -> Result<u64, HptError> {
        if flags & !H_ENTER_FLAGS != 0 {
            return Err(HptError::Parameter);
        }
        self.in_range(ptex)?;
        if pteh >> 62 > 1 || ptel & HPTE_R_TS != 0 {
            return Err(HptError::Parameter);
        }
        if self.hpt.format() == HpteFormat::Isa300 && pteh & HPTE_V_AVPN & !HPTE_V_COMMON_BITS != 0 {
            return Err(HptError::Parameter);
        }
        let v = (pteh & !(HPTE_V_HVLOCK | HPTE_V_ABSENT)) | HPTE_V_VALID;
        let HwEntry { idx, ro, ps, table: hw, .. } = self.hardware_r(v, ptel)?;

        // No second translation of the same virtual page in the PTEG pair:
        // the MMU would find two matches (a machine check on real hardware).
        // Only the entries the guest sees as valid (valid or absent) are
        // read and decoded; the primary group's occupancy also picks the slot.
        let mask = self.hpt.geometry().pteg_mask();
        let new = (ptex, Hpte::new(v, ptel), ps);
        let g = ptex >> 3;
        // In range (checked above), so are both groups.
        let taken = self.busy[g as usize];
        for (grp, busy) in [(g, taken), (g ^ mask, self.busy[(g ^ mask) as usize])] {
            let mut busy = busy;
            while busy != 0 {
                let i = grp * 8 + u64::from(busy.trailing_zeros());
                busy &= busy - 1;
                let e = self.guest_view(i);
                if let Some(eps) = self.sizes.decode(e.v, e.r) {
                    if same_virtual_page(mask, new, (i, e, eps)) {
                        return Err(HptError::Parameter);
                    }
                }
            }
        }

        let slot = if flags & H_EXACT != 0 {
            if taken & (1 << (ptex & 7)) != 0 {
                return Err(HptError::PtegFull);
            }
            ptex
        } else {
            // The first free slot of the group.
            if taken == 0xff {
                return Err(HptError::PtegFull);
            }
            (ptex & !7) + u64::from(taken.trailing_ones())
        };
        self.rev[slot as usize] = RevEntry {
            guest_r: AtomicU64::new(ptel),
            hv_ro: ro,
            shift: ps.actual_shift as u8,
            ..RevEntry::default()
        };
        self.link(idx, slot as u32);
        self.hpt.store_encoded(slot, hw);
        self.busy[g as usize] |= 1 << (slot & 7);
        self.max_npages = self.max_npages.max(ps.npages());
        Ok(slot)
    }

    fn remove_one(&mut self, ptex: u64, cond: RemoveCond, flush: &mut FlushToken) -> Result<Hpte, HptError> {
        let hw = self.hpt.load(ptex).unwrap_or_default();
        let view = self.view_of(ptex, hw);
        if !view.valid() || !cond.matches(view.v) {
            return Err(HptError::NotFound);
        }
        Ok(self.remove_viewed(ptex, hw, view, flush))
    }

    /// Removes the entry at `ptex` (hardware entry `hw`, guest view `view`,
    /// valid for the guest, both read by the caller); returns it as the
    /// guest saw it, with its final R and C.
    fn remove_viewed(&mut self, ptex: u64, hw: Hpte, view: Hpte, flush: &mut FlushToken) -> Hpte {
        let gr = self.gr(ptex as usize);
        let rc = if hw.valid() {
            // V off first; R/C can still change until the invalidation
            // completes, so dword 1 is taken afterwards (and the entry is
            // empty once it is).
            let r = self.hpt.invalidate_take_r(ptex);
            let shift = u32::from(self.rev[ptex as usize].shift);
            let page = Hpte::new(view.v, gr);
            debug_assert_eq!(self.sizes.decode(page.v, page.r).map(|ps| ps.actual_shift), Some(shift));
            if let Some(range) = GfnRange::from_len(Gfn(page.real_address(shift) >> 12), 1 << (shift - 12)) {
                flush.add_range(range);
            }
            self.fold_from(ptex, Some(hw.v), r, true);
            self.unlink(ptex as u32);
            r
        } else {
            // Absent: already invalid and unlinked, its R/C already taken.
            self.hpt.clear(ptex);
            hw.r
        };
        self.rev[ptex as usize] = RevEntry::default();
        self.busy[(ptex >> 3) as usize] &= !(1 << (ptex & 7));
        Hpte::new(view.v, gr | (rc & (HPTE_R_R | HPTE_R_C)))
    }

    /// H_REMOVE(flags, ptex, avpn): returns the removed entry (guest view,
    /// final R and C). H_PARAMETER: unknown flags or `ptex` outside the
    /// table. H_NOT_FOUND: no valid entry, or the H_AVPN / H_ANDCOND test failed.
    pub fn h_remove(
        &mut self,
        flags: u64,
        ptex: u64,
        avpn: u64,
        flush: &mut FlushToken,
    ) -> Result<Hpte, HptError> {
        if flags & !(H_AVPN | H_ANDCOND) != 0 {
            return Err(HptError::Parameter);
        }
        self.in_range(ptex)?;
        let hw = self.hpt.load(ptex).unwrap_or_default();
        let view = self.view_of(ptex, hw);
        let avpn_ok = flags & H_AVPN == 0 || RemoveCond::Avpn(avpn).matches(view.v);
        let and_ok = flags & H_ANDCOND == 0 || RemoveCond::AndCond(avpn).matches(view.v);
        if !(view.valid() && avpn_ok && and_ok) {
            return Err(HptError::NotFound);
        }
        Ok(self.remove_viewed(ptex, hw, view, flush))
    }

    /// H_READ(flags, ptex): the entry, or with H_READ_4 the four of the
    /// aligned quad. H_PARAMETER: flags other than H_READ_4, or `ptex`
    /// outside the table.
    pub fn h_read(&self, flags: u64, ptex: u64) -> Result<ReadResult, HptError> {
        if flags & !H_READ_4 != 0 {
            return Err(HptError::Parameter);
        }
        self.in_range(ptex)?;
        let (base, count) = if flags & H_READ_4 != 0 { (ptex & !3, 4) } else { (ptex, 1) };
        let mut out = ReadResult { hptes: [Hpte::EMPTY; 4], count };
        for (i, h) in out.hptes.iter_mut().take(count).enumerate() {
            *h = self.guest_view(base + i as u64);
        }
        Ok(out)
    }

    /// H_PROTECT(flags, ptex, avpn): replaces PP0, PP, N and the key.
    /// H_PARAMETER: flag bits outside H_AVPN and the protection bits, or
    /// `ptex` outside the table. H_NOT_FOUND: no valid entry or AVPN mismatch.
    pub fn h_protect(
        &mut self,
        flags: u64,
        ptex: u64,
        avpn: u64,
        flush: &mut FlushToken,
    ) -> Result<(), HptError> {
        if flags & !(H_AVPN | H_PROTECT_BITS) != 0 {
            return Err(HptError::Parameter);
        }
        let i = self.in_range(ptex)?;
        let view = self.guest_view(ptex);
        if !view.valid() || (flags & H_AVPN != 0 && !RemoveCond::Avpn(avpn).matches(view.v)) {
            return Err(HptError::NotFound);
        }
        let bits = Protection::from_h_protect_flags(flags).r_bits();
        self.set_gr(i, (self.gr(i) & !Protection::R_MASK) | bits);
        let hw = self.hpt.load(ptex).unwrap_or_default();
        if hw.valid() {
            let mut new = (hw.r & !Protection::R_MASK) | bits;
            if self.rev[i].hv_ro {
                new = make_readonly(new);
            }
            let old = self.hpt.update_r(ptex, Protection::R_MASK, new);
            // R/C stay in the hardware entry too.
            self.fold(ptex, old, false);
            if let Some((range, _)) = self.guest_range(view) {
                flush.add_range(range);
            }
        }
        Ok(())
    }

    fn clear_bit(
        &mut self,
        flags: u64,
        ptex: u64,
        bit: u64,
        flush: &mut FlushToken,
    ) -> Result<u64, HptError> {
        if flags != 0 {
            return Err(HptError::Parameter);
        }
        let i = self.in_range(ptex)?;
        let view = self.guest_view(ptex);
        if !view.valid() {
            return Err(HptError::NotFound);
        }
        self.rev[i].guest_r.fetch_and(!bit, Ordering::AcqRel);
        if self.hpt.load(ptex).is_some_and(|h| h.valid()) {
            let old = self.hpt.clear_r_bits(ptex, bit);
            if old & bit != 0 {
                // The host keeps what the guest clears; the TLB may cache the
                // bit as set, so the translation is flushed.
                self.fold(ptex, old & bit, true);
                if let Some((range, _)) = self.guest_range(view) {
                    flush.add_range(range);
                }
            }
        }
        Ok(view.r)
    }

    /// H_CLEAR_REF(flags, ptex): clears R; returns dword 1 as it was.
    /// H_PARAMETER: non-zero flags or `ptex` outside the table. H_NOT_FOUND: no valid entry.
    pub fn h_clear_ref(&mut self, flags: u64, ptex: u64, flush: &mut FlushToken) -> Result<u64, HptError> {
        self.clear_bit(flags, ptex, HPTE_R_R, flush)
    }

    /// H_CLEAR_MOD(flags, ptex): clears C; returns dword 1 as it was.
    /// H_PARAMETER: non-zero flags or `ptex` outside the table. H_NOT_FOUND: no valid entry.
    pub fn h_clear_mod(&mut self, flags: u64, ptex: u64, flush: &mut FlushToken) -> Result<u64, HptError> {
        self.clear_bit(flags, ptex, HPTE_R_C, flush)
    }

    /// H_BULK_REMOVE: up to four (request, AVPN/mask) pairs in `args`, each
    /// request word rewritten in place as its response (PAPR: type 0b10,
    /// code 0 removed with R/C at [`BULK_RC`](crate::papr::BULK_RC), 1 not
    /// found, 2 parameter). Processing stops at an end marker, or with
    /// H_PARAMETER at the first request that is not a request, has both
    /// AVPN and ANDCOND, or names an entry outside the table.
    pub fn h_bulk_remove(&mut self, args: &mut [u64; 8], flush: &mut FlushToken) -> Result<(), HptError> {
        for i in 0..BULK_MAX {
            let (tsh, tsl) = (args[2 * i], args[2 * i + 1]);
            if tsh & BULK_TYPE == BULK_END {
                break;
            }
            let flags = tsh & BULK_FLAGS;
            let ptex = tsh & BULK_PTEX;
            let base = BULK_RESPONSE | flags | ptex;
            if tsh & BULK_TYPE != BULK_REQUEST || flags == BULK_FLAGS || !self.hpt.geometry().contains(ptex) {
                args[2 * i] = base | BULK_PARM;
                return Err(HptError::Parameter);
            }
            let cond = match flags >> 56 {
                1 => RemoveCond::AndCond(tsl),
                2 => RemoveCond::Avpn(tsl),
                _ => RemoveCond::Absolute,
            };
            args[2 * i] = match self.remove_one(ptex, cond, flush) {
                Ok(old) => base | BULK_SUCCESS | ((old.r & (HPTE_R_R | HPTE_R_C)) << 51),
                Err(_) => base | BULK_NOT_FOUND,
            };
        }
        Ok(())
    }

    /// Serves hypercall `opcode` with arguments r4.. in `args`, recording
    /// the TLB invalidations it needs in `flush`. Unknown opcodes answer
    /// H_FUNCTION.
    pub fn hcall(&mut self, opcode: u64, args: &[u64], flush: &mut FlushToken) -> HcallReturn {
        let mut a = [0u64; 8];
        for (d, s) in a.iter_mut().zip(args) {
            *d = *s;
        }
        let res: Result<[u64; 8], HptError> = match opcode {
            H_ENTER => self.h_enter(a[0], a[1], a[2], a[3]).map(|s| [s, 0, 0, 0, 0, 0, 0, 0]),
            H_REMOVE => self.h_remove(a[0], a[1], a[2], flush).map(|h| [h.v, h.r, 0, 0, 0, 0, 0, 0]),
            H_READ => self.h_read(a[0], a[1]).map(|rr| {
                let mut out = [0u64; 8];
                for (i, h) in rr.hptes.iter().take(rr.count).enumerate() {
                    out[2 * i] = h.v;
                    out[2 * i + 1] = h.r;
                }
                out
            }),
            H_PROTECT => self.h_protect(a[0], a[1], a[2], flush).map(|()| [0; 8]),
            H_CLEAR_REF => self.h_clear_ref(a[0], a[1], flush).map(|r| [r, 0, 0, 0, 0, 0, 0, 0]),
            H_CLEAR_MOD => self.h_clear_mod(a[0], a[1], flush).map(|r| [r, 0, 0, 0, 0, 0, 0, 0]),
            H_BULK_REMOVE => {
                // The request words come back rewritten whatever the status.
                let st = self.h_bulk_remove(&mut a, flush);
                return HcallReturn { status: st.err().map_or(0, |e| e.status()), ret: a };
            }
            _ => return HcallReturn { status: H_FUNCTION, ret: [0; 8] },
        };
        match res {
            Ok(ret) => HcallReturn::ok(ret),
            Err(e) => HcallReturn::err(e),
        }
    }

    // ---- host side ----------------------------------------------------------------------------

    /// Maps again an entry a zap left absent (call it on the guest's storage
    /// interrupt for that entry). H_NOT_FOUND if the entry is not absent;
    /// H_PARAMETER if its page is no longer guest memory.
    pub fn fault_in(&mut self, ptex: u64) -> Result<(), HptError> {
        let i = self.in_range(ptex)?;
        let hw = self.hpt.load(ptex).unwrap_or_default();
        if hw.v & HPTE_V_ABSENT == 0 {
            return Err(HptError::NotFound);
        }
        let v = (hw.v & !(HPTE_V_ABSENT | HPTE_V_HVLOCK)) | HPTE_V_VALID;
        let guest_r = self.gr(i);
        let HwEntry { mut r, idx, ro, .. } = self.hardware_r(v, guest_r)?;
        // R/C were folded into the guest view at the zap; the new mapping starts clean.
        r &= !(HPTE_R_R | HPTE_R_C);
        self.rev[i].hv_ro = ro;
        self.link(idx, ptex as u32);
        let _ = self.hpt.store(ptex, Hpte::new(v, r));
        Ok(())
    }

    /// Gives back write permission the host took with
    /// [`MmuBackend::write_protect`], as far as the guest's PP and the
    /// slot allow (call it on the guest's protection fault). Returns whether
    /// the entry became writable.
    pub fn unprotect(&mut self, ptex: u64, flush: &mut FlushToken) -> bool {
        let Ok(i) = self.in_range(ptex) else { return false };
        let hw = self.hpt.load(ptex).unwrap_or_default();
        let guest_r = self.gr(i);
        if !hw.valid() || !self.rev[i].hv_ro || !is_writable(guest_r) {
            return false;
        }
        let view = Hpte::new(hw.v, guest_r);
        let Some((range, _)) = self.guest_range(view) else { return false };
        if self.slots.lookup(range.start).is_none_or(|s| s.flags().contains(SlotFlags::READONLY)) {
            return false;
        }
        self.hpt.update_r(ptex, HPTE_R_PPP, guest_r);
        self.rev[i].hv_ro = false;
        flush.add_range(range);
        true
    }

    /// Checks the table's invariants: no two valid translations of one
    /// virtual page in a PTEG pair; every valid entry inside guest memory
    /// with a known page size; every hardware-valid entry on exactly the
    /// chain of its page, chains well linked, present bits right, no lock
    /// bit held.
    pub fn check_invariants(&self) -> Result<(), Violation> {
        let n = self.hpt.len();
        let mask = self.hpt.geometry().pteg_mask();
        let mut chained = 0u64;
        let mut valid_hw = 0u64;
        for (g, &busy) in self.busy.iter().enumerate() {
            if busy != self.hpt.group_occupancy(g as u64) {
                return Err(Violation::Occupancy(g as u64));
            }
        }
        for ptex in 0..n {
            let hw = self.hpt.load(ptex).unwrap_or_default();
            if hw.v & HPTE_V_HVLOCK != 0 {
                return Err(Violation::LockHeld(ptex));
            }
            let view = self.guest_view(ptex);
            if !view.valid() {
                continue;
            }
            let (range, ps) = self.guest_range(view).ok_or(Violation::BadPageSize(ptex))?;
            let inside =
                self.slots.lookup(range.start).is_some_and(|s| s.allows_page(range.start, ps.actual_shift));
            if !inside {
                return Err(Violation::OutsideGuestMemory(ptex));
            }
            // Duplicates: compare with later entries of the pair only.
            let g = ptex >> 3;
            for grp in [g, g ^ mask] {
                for j in (grp * 8..grp * 8 + 8).filter(|&j| j > ptex) {
                    let e = self.guest_view(j);
                    if !e.valid() {
                        continue;
                    }
                    if let Some(eps) = self.sizes.decode(e.v, e.r) {
                        if same_virtual_page(mask, (ptex, view, ps), (j, e, eps)) {
                            return Err(Violation::DuplicateTranslation(ptex, j));
                        }
                    }
                }
            }
            if hw.valid() {
                valid_hw += 1;
                let idx = self.rev[ptex as usize].rmap;
                if idx == NO_RMAP || Some(idx) != self.gfn_index(range.start) {
                    return Err(Violation::NotInChain(ptex));
                }
            } else if self.rev[ptex as usize].rmap != NO_RMAP {
                return Err(Violation::StrayInChain(ptex));
            }
        }
        for (idx, w) in self.rmap.iter().enumerate() {
            let w = w.load(Ordering::Acquire);
            let gfn = self.index_gfn(idx as u32);
            if w & RMAP_LOCK != 0 {
                return Err(Violation::LockHeld(gfn.0));
            }
            if w & RMAP_PRESENT == 0 {
                if w & RMAP_INDEX != 0 {
                    return Err(Violation::PresentBit(gfn.0));
                }
                continue;
            }
            let head = (w & RMAP_INDEX) as u32;
            let mut cur = head;
            let mut steps = 0u64;
            loop {
                let e = self.rev.get(cur as usize).ok_or(Violation::BrokenLinks(u64::from(cur)))?;
                let hw = self.hpt.load(u64::from(cur)).unwrap_or_default();
                if !hw.valid() || e.rmap != idx as u32 {
                    return Err(Violation::StrayInChain(u64::from(cur)));
                }
                if self.rev.get(e.forw as usize).map(|f| f.back) != Some(cur) {
                    return Err(Violation::BrokenLinks(u64::from(cur)));
                }
                chained += 1;
                steps += 1;
                if steps > n {
                    return Err(Violation::BrokenLinks(u64::from(head)));
                }
                cur = e.forw;
                if cur == head {
                    break;
                }
            }
        }
        if chained != valid_hw {
            return Err(Violation::PresentBit(chained));
        }
        Ok(())
    }

    // ---- MmuBackend helpers -------------------------------------------------------------------

    fn hpte_leaf(&self, ptex: u64) -> Option<Leaf> {
        let hw = self.hpt.load(ptex)?;
        let e = self.rev.get(ptex as usize)?;
        if !hw.valid() || e.rmap == NO_RMAP {
            return None;
        }
        let (range, _) = self.guest_range(Hpte::new(hw.v, e.guest_r.load(Ordering::Acquire)))?;
        Some(Leaf {
            gfn: range.start,
            npages: range.len(),
            writable: is_writable(hw.r),
            young: hw.r & HPTE_R_R != 0,
            dirty: hw.r & HPTE_R_C != 0,
            access_tracked: false,
        })
    }

    fn word_leaf(&self, idx: u32) -> Option<Leaf> {
        let w = self.rmap.get(idx as usize)?.load(Ordering::Acquire);
        if w & (RMAP_REFERENCED | RMAP_CHANGED) == 0 {
            return None;
        }
        Some(Leaf {
            gfn: self.index_gfn(idx),
            npages: 1,
            writable: false,
            young: w & RMAP_REFERENCED != 0,
            dirty: w & RMAP_CHANGED != 0,
            access_tracked: false,
        })
    }

    fn clear_hw_bit(&self, ptex: u64, bit: u64, flush: &mut FlushToken) -> bool {
        let Some(hw) = self.hpt.load(ptex) else { return false };
        if !hw.valid() || hw.r & bit == 0 || self.rev[ptex as usize].rmap == NO_RMAP {
            // Nothing to clear (hardware only ever sets the bit).
            return false;
        }
        let Some(leaf) = self.hpte_leaf(ptex) else { return false };
        self.hpt.lock(ptex);
        let old = self.hpt.clear_r_bits(ptex, bit);
        // The guest must not see the host's harvest: keep the bit in its view.
        self.or_gr(ptex as usize, old & bit);
        self.hpt.unlock(ptex);
        if old & bit != 0 {
            flush.add_range(leaf.gfns());
            true
        } else {
            false
        }
    }

    fn clear_word_bit(&self, idx: u32, bit: u64) -> bool {
        match self.rmap.get(idx as usize) {
            Some(w) => w.fetch_and(!bit, Ordering::AcqRel) & bit != 0,
            None => false,
        }
    }
}

/// Iterator over the HPTE indices chained on one guest page.
#[derive(Debug)]
pub struct ChainIter<'a, R: PageResolver> {
    hpt: &'a GuestHpt<R>,
    head: Option<u32>,
    next: Option<u32>,
    left: usize,
}

impl<R: PageResolver> Iterator for ChainIter<'_, R> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let cur = self.next?;
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let forw = self.hpt.rev.get(cur as usize)?.forw;
        self.next = (Some(forw) != self.head).then_some(forw);
        Some(u64::from(cur))
    }
}

impl<R: PageResolver> MmuBackend for GuestHpt<R> {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        let Some(range) = slot.gfns().intersect(&gfns) else { return };
        // A large page is chained on its first frame, which may lie before the range.
        let start = Gfn((range.start.0 & !(self.max_npages - 1)).max(slot.base_gfn().0));
        let (Some(first), Some(last)) = (self.gfn_index(start), self.gfn_index(Gfn(range.end.0 - 1))) else {
            return;
        };
        // The slot's words are contiguous: walk them without further lookups.
        for (k, w) in self.rmap[first as usize..=last as usize].iter().enumerate() {
            let w = w.load(Ordering::Acquire);
            if w & (RMAP_REFERENCED | RMAP_CHANGED | RMAP_PRESENT) == 0 {
                continue;
            }
            let idx = first + k as u32;
            let gfn = Gfn(start.0 + k as u64);
            if w & (RMAP_REFERENCED | RMAP_CHANGED) != 0 && range.contains(gfn) {
                f(PteHandle(RMAP_HANDLE_BIT | idx));
            }
            if w & RMAP_PRESENT == 0 {
                continue;
            }
            let head = (w & RMAP_INDEX) as u32;
            let (mut cur, mut left) = (head, self.rev.len());
            loop {
                // Small pages that start in the range need no decode.
                let inside = gfn >= range.start
                    || self.hpte_leaf(u64::from(cur)).is_some_and(|l| l.gfns().overlaps(&range));
                if inside {
                    f(PteHandle(cur));
                }
                cur = self.rev[cur as usize].forw;
                left -= 1;
                if cur == head || left == 0 {
                    break;
                }
            }
        }
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.word_leaf(h.0 & !RMAP_HANDLE_BIT)
        } else {
            self.hpte_leaf(u64::from(h.0))
        }
    }

    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            return false;
        }
        let ptex = u64::from(h.0);
        let Some(leaf) = self.hpte_leaf(ptex) else { return false };
        if !leaf.writable {
            return false;
        }
        let r = self.hpt.load(ptex).unwrap_or_default().r;
        self.hpt.update_r(ptex, HPTE_R_PPP, make_readonly(r));
        self.rev[ptex as usize].hv_ro = true;
        flush.add_range(leaf.gfns());
        true
    }

    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.clear_word_bit(h.0 & !RMAP_HANDLE_BIT, RMAP_CHANGED)
        } else {
            self.clear_hw_bit(u64::from(h.0), HPTE_R_C, flush)
        }
    }

    fn clear_young(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            self.clear_word_bit(h.0 & !RMAP_HANDLE_BIT, RMAP_REFERENCED)
        } else {
            self.clear_hw_bit(u64::from(h.0), HPTE_R_R, flush)
        }
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            return Ok(());
        }
        let ptex = u64::from(h.0);
        match self.hpte_leaf(ptex) {
            // The guest chose the page size, so the host cannot split it: the
            // entry goes absent (R/C kept in the per-gfn word) and faults back.
            Some(l) if l.npages > 1 => {
                let r = self.take_hw(ptex, flush, true);
                self.or_gr(ptex as usize, r & (HPTE_R_R | HPTE_R_C));
                Ok(())
            }
            Some(_) => Ok(()),
            None => Err(BackendError::NotALeaf(h)),
        }
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        if h.0 & RMAP_HANDLE_BIT != 0 {
            let idx = h.0 & !RMAP_HANDLE_BIT;
            let leaf = self.word_leaf(idx)?;
            self.rmap[idx as usize].fetch_and(!(RMAP_REFERENCED | RMAP_CHANGED), Ordering::AcqRel);
            return Some(leaf);
        }
        let ptex = u64::from(h.0);
        let mut leaf = self.hpte_leaf(ptex)?;
        // The driver receives R/C in the returned leaf, so they are not folded.
        let r = self.take_hw(ptex, flush, false);
        self.or_gr(ptex as usize, r & (HPTE_R_R | HPTE_R_C));
        leaf.young = r & HPTE_R_R != 0;
        leaf.dirty = r & HPTE_R_C != 0;
        Some(leaf)
    }

    /// Counts the dirty-bit logs: the first turns the folded-dirty queue on,
    /// the last one's stop turns it off ([`GuestHpt::queue_folded_dirty`]).
    fn track_lost_dirty(&mut self, on: bool) {
        if on {
            self.lost_dirty_logs += 1;
            self.queue_folded_dirty(true);
        } else if self.lost_dirty_logs > 0 {
            self.lost_dirty_logs -= 1;
            if self.lost_dirty_logs == 0 {
                self.queue_folded_dirty(false);
            }
        }
    }

    fn drain_lost_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        let Some(queue) = self.folded_dirty.as_mut() else { return };
        queue.retain(|r| match r.intersect(&gfns) {
            Some(mine) => {
                f(mine);
                // Keep what lies outside `gfns` for the log that covers it.
                r.start < gfns.start || r.end > gfns.end
            }
            None => true,
        });
    }
}

/// A [`GuestHpt`] and the embedder's TLB, answering hypercalls through the
/// [`Hcall`] trait: each call's recorded flush is performed before it returns.
/// Lets the [`PaprHpt`](crate::passthrough::PaprHpt) pass-through drive an
/// in-memory guest table (host tests of the pass-through).
#[derive(Debug)]
pub struct HcallServer<'a, R: PageResolver, T: TlbFlush> {
    /// The table served.
    pub hpt: &'a mut GuestHpt<R>,
    /// The TLB flushed after each call.
    pub tlb: &'a mut T,
}

impl<R: PageResolver, T: TlbFlush> Hcall for HcallServer<'_, R, T> {
    fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
        let mut flush = FlushToken::new();
        let ret = self.hpt.hcall(opcode, args, &mut flush);
        flush.flush(self.tlb);
        ret
    }
}

/// A [`TlbFlush`] that does nothing: for tables no CPU walks (host tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlb;

impl TlbFlush for NoTlb {
    fn flush_range(&mut self, _range: GfnRange) {}
    fn flush_all(&mut self) {}
}
