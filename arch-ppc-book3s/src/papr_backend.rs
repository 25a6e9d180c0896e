//! mmu-generic's [`MmuBackend`] over a hashed page table reached by
//! hypercall: what a pseries guest kernel runs the core's dirty-log and
//! ageing drivers on (the ppc64 QEMU boot image does).
//!
//! The platform's table belongs to the hypervisor, so this back end keeps its
//! own bookkeeping for the entries it entered: per slot, the guest view
//! (dword 0 as entered, writability, first guest frame, size), and a reverse
//! map guest frame → slots. Every hardware fact comes from a hypercall:
//!
//! * `leaf` reads the entry with H_READ (only V is tested and AVPNs are
//!   compared through [`avpn_arg`]: QEMU sets 0x40 in every slot it writes);
//! * `write_protect` is H_PROTECT(H_AVPN, PP = 0b11), [`PaprBackend::make_writable`]
//!   the reverse, for the write-fault path;
//! * `clear_dirty` / `clear_young` are [`PaprHpt::clear_mod`] /
//!   [`PaprHpt::clear_ref`], with their fallback where the platform answers
//!   H_FUNCTION (QEMU 7.2: H_READ, H_REMOVE, H_ENTER with H_EXACT into the
//!   same slot; a CPU touching the page inside that window takes a storage
//!   interrupt and retries);
//! * `zap` is H_REMOVE(H_AVPN), which returns the final R and C;
//!   `split_huge` zaps a large page (the guest's next fault maps small ones).
//!
//! Mapping goes through [`insert`]: primary group, secondary on H_PTEG_FULL.
//!
//! **TLB:** every hypercall that weakens an entry (H_REMOVE, H_PROTECT, the
//! clear calls) invalidates the translation itself, so this back end adds
//! nothing to a [`FlushToken`]; flush tokens with
//! [`NoTlb`](crate::guest::NoTlb).
//!
//! `MmuBackend::clear_*` take `&self` while [`Hcall::hcall`] takes `&mut
//! self`, so the table sits in a `RefCell` (the back end is not `Sync`; a
//! kernel serialises its calls).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::RefCell;

use mmu_generic::addr::{Gfn, GfnRange};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend};
use mmu_generic::memslot::Memslot;
use mmu_generic::pte_list::PteHandle;

use crate::hpte::{avpn_arg, pp, HPTE_R_C, HPTE_R_R};
use crate::mapping::{insert, Inserted, VirtPage};
use crate::pagesize::PageSizes;
use crate::papr::{Hcall, HptError, RemoveCond};
use crate::passthrough::PaprHpt;
use crate::table::{HashTable, Protection};

/// What this back end remembers of an entry it entered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapped {
    /// The slot.
    pub slot: u64,
    /// Dword 0 as entered (B, AVPN, L, H, V).
    pub v: u64,
    /// Whether the entry currently allows stores (as this back end set it).
    pub writable: bool,
    /// The first guest frame of the page.
    pub gfn: Gfn,
    /// 4 KiB frames the page covers.
    pub npages: u64,
}

impl Mapped {
    fn leaf(&self, rc: u64) -> Leaf {
        Leaf {
            gfn: self.gfn,
            npages: self.npages,
            writable: self.writable,
            young: rc & HPTE_R_R != 0,
            dirty: rc & HPTE_R_C != 0,
            access_tracked: false,
        }
    }

    fn gfns(&self) -> GfnRange {
        GfnRange { start: self.gfn, end: Gfn(self.gfn.0 + self.npages) }
    }
}

/// An [`MmuBackend`] over a [`PaprHpt`]; handles are slot numbers.
#[derive(Debug)]
pub struct PaprBackend<H: Hcall> {
    table: RefCell<PaprHpt<H>>,
    sizes: PageSizes,
    entries: BTreeMap<u64, Mapped>,
    /// First guest frame → slots mapping a page that starts there.
    rmap: BTreeMap<u64, Vec<u64>>,
    /// Largest page entered, in frames: how far back a range walk looks.
    max_npages: u64,
    secondary: u64,
}

fn protection(writable: bool) -> Protection {
    Protection { pp: if writable { pp::RW_RW } else { pp::R_R } as u8, no_execute: false, key: 0 }
}

impl<H: Hcall> PaprBackend<H> {
    /// A back end over `table`, mapping pages of the sizes `sizes` lists.
    pub fn new(table: PaprHpt<H>, sizes: PageSizes) -> Self {
        Self {
            table: RefCell::new(table),
            sizes,
            entries: BTreeMap::new(),
            rmap: BTreeMap::new(),
            max_npages: 1,
            secondary: 0,
        }
    }

    /// The table, for calls this back end does not make (its bookkeeping
    /// does not follow them: remove only what you entered yourself).
    pub fn table_mut(&mut self) -> &mut PaprHpt<H> {
        self.table.get_mut()
    }

    /// The embedder's hypercall function.
    pub fn hcall_mut(&mut self) -> &mut H {
        self.table.get_mut().hcall_mut()
    }

    /// Whether H_CLEAR_REF / H_CLEAR_MOD are emulated (see [`PaprHpt`]).
    pub fn clears_emulated(&self) -> (bool, bool) {
        self.table.borrow().clear_calls_emulated()
    }

    /// Entries that went to their secondary group after H_PTEG_FULL.
    pub fn secondary_inserts(&self) -> u64 {
        self.secondary
    }

    /// Number of entries mapped.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Maps `page` onto guest frame `gfn` (real address `gfn << 12`, RAM,
    /// WIMG = M), read/write or read-only; primary group first, the
    /// secondary on H_PTEG_FULL. H_PARAMETER from the platform or for a
    /// page size the machine lacks, a misaligned frame, or a slot number
    /// that does not fit a handle; H_PTEG_FULL when both groups are full.
    pub fn map(&mut self, page: &VirtPage, gfn: Gfn, writable: bool) -> Result<PteHandle, HptError> {
        let pa = gfn.0.checked_mul(1 << 12).ok_or(HptError::Parameter)?;
        let t = self.table.get_mut();
        let Inserted { slot, hpte, secondary } =
            insert(t, page, &self.sizes, pa, protection(writable).pp.into())?;
        let Ok(handle) = u32::try_from(slot) else {
            // A table of 2^32 entries (64 GiB) has no handle for its upper half.
            let _ = t.remove(slot, RemoveCond::Avpn(avpn_arg(hpte.v)));
            return Err(HptError::Parameter);
        };
        let npages = page.size.npages();
        self.entries.insert(slot, Mapped { slot, v: hpte.v, writable, gfn, npages });
        self.rmap.entry(gfn.0).or_default().push(slot);
        self.max_npages = self.max_npages.max(npages);
        self.secondary += u64::from(secondary);
        Ok(PteHandle(handle))
    }

    /// What this back end entered at handle `h`.
    pub fn mapped(&self, h: PteHandle) -> Option<Mapped> {
        self.entries.get(&u64::from(h.0)).copied()
    }

    /// Every entry whose page covers `gfn`.
    pub fn handles_of(&self, gfn: Gfn) -> impl Iterator<Item = PteHandle> + '_ {
        let from = gfn.0.saturating_sub(self.max_npages - 1);
        self.rmap
            .range(from..=gfn.0)
            .flat_map(|(_, l)| l.iter())
            .filter(move |s| self.entries.get(s).is_some_and(|e| e.gfns().contains(gfn)))
            .map(|&s| PteHandle(s as u32))
    }

    /// The first entry whose page covers `gfn`.
    pub fn lookup(&self, gfn: Gfn) -> Option<PteHandle> {
        self.handles_of(gfn).next()
    }

    /// The write-fault path of write-protect dirty tracking (after the log's
    /// `note_writable`): H_PROTECT back to read/write. Whether it worked.
    pub fn make_writable(&mut self, h: PteHandle) -> bool {
        let slot = u64::from(h.0);
        let Some(e) = self.entries.get_mut(&slot) else { return false };
        if self.table.get_mut().protect(slot, protection(true), Some(avpn_arg(e.v))).is_err() {
            return false;
        }
        e.writable = true;
        true
    }

    /// Removes every entry; returns how many removals failed (an entry
    /// someone else removed).
    pub fn unmap_all(&mut self) -> usize {
        let all: Vec<u64> = self.entries.keys().copied().collect();
        let mut failed = 0;
        for slot in all {
            let mut t = FlushToken::new();
            if self.zap(PteHandle(slot as u32), &mut t).is_none() {
                failed += 1;
            }
        }
        failed
    }

    /// The entry at `slot` if it still holds ours, with its live R/C.
    fn live(&self, slot: u64) -> Option<(Mapped, u64)> {
        let e = *self.entries.get(&slot)?;
        let h = self.table.borrow_mut().read(slot).ok()?;
        (h.valid() && avpn_arg(h.v) == avpn_arg(e.v)).then_some((e, h.r & (HPTE_R_R | HPTE_R_C)))
    }

    fn forget(&mut self, e: &Mapped) {
        self.entries.remove(&e.slot);
        if let Some(list) = self.rmap.get_mut(&e.gfn.0) {
            list.retain(|&p| p != e.slot);
            if list.is_empty() {
                self.rmap.remove(&e.gfn.0);
            }
        }
    }
}

impl<H: Hcall> MmuBackend for PaprBackend<H> {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        let Some(r) = gfns.intersect(&slot.gfns()) else { return };
        // A large page is filed under its first frame, which may precede the range.
        let from = r.start.0.saturating_sub(self.max_npages - 1);
        for (_, list) in self.rmap.range(from..r.end.0) {
            for s in list {
                if self.entries.get(s).is_some_and(|e| e.gfns().overlaps(&r)) {
                    f(PteHandle(*s as u32));
                }
            }
        }
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        self.live(u64::from(h.0)).map(|(e, rc)| e.leaf(rc))
    }

    fn write_protect(&mut self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        let Some(e) = self.entries.get_mut(&slot) else { return false };
        if !e.writable || self.table.get_mut().protect(slot, protection(false), Some(avpn_arg(e.v))).is_err()
        {
            return false;
        }
        e.writable = false;
        true
    }

    fn clear_dirty(&self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        // Read first: the fallback for a missing H_CLEAR_MOD costs three calls.
        self.live(slot).is_some_and(|(_, rc)| rc & HPTE_R_C != 0)
            && self.table.borrow_mut().clear_mod(slot).is_ok_and(|old| old & HPTE_R_C != 0)
    }

    fn clear_young(&self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        self.live(slot).is_some_and(|(_, rc)| rc & HPTE_R_R != 0)
            && self.table.borrow_mut().clear_ref(slot).is_ok_and(|old| old & HPTE_R_R != 0)
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        match self.mapped(h) {
            // An HPTE cannot be split in place: it goes, the next fault maps small pages.
            Some(e) if e.npages > 1 => self.zap(h, flush).map(|_| ()).ok_or(BackendError::NotALeaf(h)),
            Some(_) => Ok(()),
            None => Err(BackendError::NotALeaf(h)),
        }
    }

    fn zap(&mut self, h: PteHandle, _flush: &mut FlushToken) -> Option<Leaf> {
        let e = self.mapped(h)?;
        match self.table.get_mut().remove(e.slot, RemoveCond::Avpn(avpn_arg(e.v))) {
            Ok(old) => {
                self.forget(&e);
                Some(e.leaf(old.r & (HPTE_R_R | HPTE_R_C)))
            }
            Err(HptError::NotFound) => {
                // Someone else removed it: it is not ours any more.
                self.forget(&e);
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{GuestConfig, GuestHpt, HcallServer, HvaIdentity, NoTlb, WimgPolicy};
    use crate::hash::{HptGeometry, SegmentSize, VirtAddr};
    use crate::hpte::HpteFormat;
    use crate::passthrough::tests::Qemu;
    use crate::table::AccessFault;
    use mmu_generic::addr::Hva;
    use mmu_generic::age::{age, test_age, NoAccessedBit};
    use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
    use mmu_generic::memslot::{Memslots, MemslotsBuilder, SlotFlags, SlotId};

    const NPAGES: u64 = 64;
    const BASE_GFN: u64 = 0x100;
    const VSID: u64 = 0x5_1234;

    fn guest(sizes: PageSizes) -> (GuestHpt, Memslots) {
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), 0x2000, Hva(0x4000_0000), SlotFlags::DIRTY_LOG))
            .expect("ok");
        let slots = b.build().expect("ok");
        let cfg = GuestConfig {
            geometry: HptGeometry::from_pft_size(18).expect("ok"),
            format: HpteFormat::Isa300,
            sizes,
            wimg: WimgPolicy::RequireM,
        };
        (GuestHpt::new(cfg, slots.clone(), HvaIdentity).expect("ok"), slots)
    }

    fn va(ssize: SegmentSize, page: u64) -> VirtAddr {
        VirtAddr::new(VSID, ssize, 0x3000_0000 + (page << 12)).expect("fits")
    }

    type Be<'a> = PaprBackend<Qemu<'a>>;

    /// The CPU's access to page `i` through the hypervisor's in-memory table.
    fn cpu(be: &mut Be<'_>, ssize: SegmentSize, i: u64, store: bool) -> Result<(), AccessFault> {
        let g = &be.hcall_mut().inner.hpt;
        let sizes = *g.page_sizes();
        g.table().translate(&va(ssize, i), 12, &sizes, store, false).map(|_| ())
    }

    fn map_all(be: &mut Be<'_>, ssize: SegmentSize) {
        for i in 0..NPAGES {
            be.map(&VirtPage::new(va(ssize, i), 12, 12), Gfn(BASE_GFN + i), true).expect("room");
        }
    }

    fn harvest(be: &mut Be<'_>, log: &mut SlotDirtyLog) -> u64 {
        let mut words = Vec::new();
        let _flush = log.get_and_clear(be, &mut words).expect("bitmap mode");
        // Pages BASE_GFN.. sit at bits BASE_GFN.. of the slot's bitmap.
        let (w, b) = ((BASE_GFN / 64) as usize, BASE_GFN % 64);
        assert_eq!(b, 0);
        words.get(w).copied().unwrap_or(0)
    }

    #[test]
    fn c_bit_dirty_rounds_through_hypercalls_report_exactly_the_written_pages() {
        let (mut g, slots) = guest(PageSizes::qemu_pseries_default());
        let slot = *slots.get(SlotId(0)).expect("slot");
        let mut tlb = NoTlb;
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut be = PaprBackend::new(PaprHpt::new(q, 0x7ff), PageSizes::qemu_pseries_default());
        map_all(&mut be, SegmentSize::S1T);
        let mut f = FlushToken::new();
        let mut log = SlotDirtyLog::start(&slot, Tracking::HardwareDirty, LogMode::Bitmap, &mut be, &mut f)
            .expect("C bits");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..6 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let set = if round == 2 { 0 } else { seed };
            for i in 0..NPAGES {
                cpu(&mut be, SegmentSize::S1T, i, set & (1 << i) != 0).expect("mapped writable");
            }
            assert_eq!(harvest(&mut be, &mut log), set, "round {round}");
        }
        assert_eq!(be.clears_emulated(), (false, true), "QEMU answers H_FUNCTION: the fallback ran");
        assert!(be.hcall_mut().inner.hpt.check_invariants().is_ok());
        assert_eq!(be.unmap_all(), 0, "every entry still ours, AVPN with B matched");
        assert!(be.is_empty());
    }

    #[test]
    fn write_protect_rounds_fault_once_per_page_and_report_it() {
        let (mut g, slots) = guest(PageSizes::qemu_pseries_default());
        let slot = *slots.get(SlotId(0)).expect("slot");
        let mut tlb = NoTlb;
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut be = PaprBackend::new(PaprHpt::new(q, 0x7ff), PageSizes::qemu_pseries_default());
        map_all(&mut be, SegmentSize::S256M);
        let mut f = FlushToken::new();
        let mut log = SlotDirtyLog::start(&slot, Tracking::WriteProtect, LogMode::Bitmap, &mut be, &mut f)
            .expect("write protect");
        let mut faults = 0;
        for round in 0..4u64 {
            let set = 0x0123_4567_89ab_cdefu64.rotate_left(round as u32 * 7) & !(round << 5);
            for i in (0..NPAGES).filter(|i| set & (1 << i) != 0) {
                if let Err(AccessFault::Protection(_)) = cpu(&mut be, SegmentSize::S256M, i, true) {
                    let gfn = Gfn(BASE_GFN + i);
                    let h = be.lookup(gfn).expect("mapped");
                    log.note_writable(gfn, h, None).expect("bitmap");
                    assert!(be.make_writable(h));
                    faults += 1;
                }
                cpu(&mut be, SegmentSize::S256M, i, true).expect("writable now");
                cpu(&mut be, SegmentSize::S256M, i, true).expect("no second fault");
            }
            assert_eq!(harvest(&mut be, &mut log), set, "round {round}");
        }
        assert!(faults > 0);
    }

    #[test]
    fn ageing_through_hypercalls_finds_exactly_the_touched_pages() {
        let (mut g, slots) = guest(PageSizes::qemu_pseries_default());
        let mut tlb = NoTlb;
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut be = PaprBackend::new(PaprHpt::new(q, 0x7ff), PageSizes::qemu_pseries_default());
        map_all(&mut be, SegmentSize::S256M);
        let all = slots.get(SlotId(0)).expect("slot").hvas();
        let mut f = FlushToken::new();
        age(&slots, &mut be, all, NoAccessedBit::ReportOld, &mut f);
        let touched = 0x00f0_0000_0000_1011u64;
        for i in (0..NPAGES).filter(|i| touched & (1 << i) != 0) {
            cpu(&mut be, SegmentSize::S256M, i, false).expect("mapped");
        }
        let rep = age(&slots, &mut be, all, NoAccessedBit::ReportOld, &mut f);
        assert_eq!(rep.young_leaves, u64::from(touched.count_ones()));
        assert!(!test_age(&slots, &be, all, NoAccessedBit::ReportOld).young);
        assert_eq!(be.clears_emulated(), (true, false));
    }

    #[test]
    fn zap_returns_final_rc_and_large_pages_split_by_zapping() {
        let sizes = PageSizes::qemu_pseries_16m();
        let (mut g, slots) = guest(sizes);
        let slot = *slots.get(SlotId(0)).expect("slot");
        let mut tlb = NoTlb;
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut be = PaprBackend::new(PaprHpt::new(q, 0x7ff), sizes);
        let big = VirtPage::new(VirtAddr::new(VSID, SegmentSize::S1T, 0x0100_0000).expect("fits"), 24, 24);
        let hb = be.map(&big, Gfn(0x1000), true).expect("16M at 16M");
        let h4 = be.map(&VirtPage::new(va(SegmentSize::S256M, 3), 12, 12), Gfn(0x1003), true).expect("ok");
        assert!(be.map(&big, Gfn(0x1001), true).is_err(), "misaligned 16M page");
        // The 16M page covers gfn 0x1003 too: both are found from inside.
        assert_eq!(be.handles_of(Gfn(0x1003)).collect::<Vec<_>>(), [hb, h4]);
        let mut seen = Vec::new();
        be.for_each_leaf(&slot, GfnRange { start: Gfn(0x1800), end: Gfn(0x1801) }, &mut |h| seen.push(h));
        assert_eq!(seen, [hb], "a range inside the large page finds it");
        cpu(&mut be, SegmentSize::S256M, 3, true).expect("mapped");
        let mut f = FlushToken::new();
        let leaf = be.zap(h4, &mut f).expect("ours");
        assert!(leaf.young && leaf.dirty && leaf.npages == 1);
        assert_eq!(be.zap(h4, &mut f), None);
        be.split_huge(hb, &mut f).expect("a large leaf");
        assert!(be.is_empty());
        assert!(!f.is_needed(), "the hypercalls invalidated");
    }
}
