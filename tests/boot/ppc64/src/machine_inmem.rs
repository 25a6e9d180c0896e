//! The crate's in-memory table as a suite [`Machine`]: `GuestHpt` serves this kernel's
//! H_ENTERs (as a hypervisor would for a guest) into a big-endian table in the kernel's
//! heap, and a software MMU plays the CPU: it hashes the address, searches the primary
//! then the secondary group, checks PP, and sets R/C atomically
//! (`InMemoryHpt::hardware_access`). Write-protection faults are resolved as the
//! hypervisor's fault path would: `note_writable` in the dirty log, `GuestHpt::unprotect`.

use crate::suite::{gfn_of, Machine, NPAGES};
use alloc::collections::BTreeMap;
use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, NoTlb, WimgPolicy};
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HpteFormat, HPTE_R_M, HPTE_V_AVPN, HPTE_V_B, HPTE_V_SECONDARY, HPTE_V_VALID};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::H_ENTER;
use core::fmt;
use mmu_generic::addr::{Gfn, GfnRange, Hva};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::SlotDirtyLog;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};

/// VSID and EA of the simulated guest's mapping.
const VSID: u64 = 0x5_1234;
const EA: u64 = 0x4000_0000;

/// The in-memory machine.
pub struct InMemMachine {
    guest: GuestHpt<HvaIdentity>,
    slots: Memslots,
    slot: Memslot,
    mask: u64,
    memory: BTreeMap<(u64, u64), u64>,
    accesses: u64,
    faults: u64,
    format: HpteFormat,
}

impl InMemMachine {
    /// A guest table of 2^`pft_shift` bytes in `format`; NPAGES pages at guest-real
    /// `gpa` (identity host mapping), entered by H_ENTER through `GuestHpt::hcall`.
    pub fn new(
        pft_shift: u32,
        format: HpteFormat,
        sizes: PageSizes,
        gpa: u64,
        flags: SlotFlags,
    ) -> Result<Self, &'static str> {
        let geometry = HptGeometry::from_pft_size(pft_shift).ok_or("pft-size rejected")?;
        let slot = Memslot::new(SlotId(0), Gfn(gpa >> 12), NPAGES, Hva(gpa), flags);
        let mut b = MemslotsBuilder::new();
        let slots = b.create(slot).and_then(|b| b.build()).map_err(|_| "memslots rejected")?;
        let config = GuestConfig { geometry, format, sizes, wimg: WimgPolicy::RequireM };
        let mut guest =
            GuestHpt::new(config, slots.clone(), HvaIdentity).map_err(|_| "GuestHpt::new failed")?;
        let mask = geometry.pteg_mask();
        for i in 0..NPAGES {
            let va = VirtAddr::new(VSID, SegmentSize::S256M, EA + (i << 12)).ok_or("VSID too wide")?;
            let v = va.avpn_v(12) | HPTE_V_VALID;
            let r = (gfn_of(&slot, i).0 << 12) | HPTE_R_M | 2;
            let mut flush = FlushToken::new();
            let ret = guest.hcall(H_ENTER, &[0, (va.hash(12) & mask) * 8, v, r], &mut flush);
            flush.flush(&mut NoTlb);
            if ret.status != 0 {
                return Err("H_ENTER into GuestHpt failed");
            }
        }
        Ok(Self { guest, slots, slot, mask, memory: BTreeMap::new(), accesses: 0, faults: 0, format })
    }

    /// The software MMU's lookup: the slot holding the translation of page `page`.
    fn translate(&self, page: u64) -> Option<u64> {
        let va = VirtAddr::new(VSID, SegmentSize::S256M, EA + (page << 12))?;
        let want = va.avpn_v(12);
        let hash = va.hash(12);
        for secondary in [false, true] {
            let g = if secondary { !hash & self.mask } else { hash & self.mask };
            for ptex in g * 8..g * 8 + 8 {
                let Some(h) = self.guest.table().load(ptex) else { continue };
                let h_bit = h.v & HPTE_V_SECONDARY != 0;
                if h.valid() && h_bit == secondary && h.v & (HPTE_V_B | HPTE_V_AVPN) == want {
                    return Some(ptex);
                }
            }
        }
        None
    }

    /// One access by the simulated CPU: Ok(true) if permitted (R, and C for a store, set).
    fn access(&mut self, page: u64, store: bool) -> Result<bool, &'static str> {
        let ptex = self.translate(page).ok_or("no translation (simulated DSI)")?;
        let h = self.guest.table().load(ptex).ok_or("slot vanished")?;
        if store && !h.writable() {
            return Ok(false);
        }
        self.accesses += 1;
        Ok(self.guest.table().hardware_access(ptex, store))
    }
}

impl Machine for InMemMachine {
    type Backend = GuestHpt<HvaIdentity>;

    fn backend(&mut self) -> &mut GuestHpt<HvaIdentity> {
        &mut self.guest
    }

    fn slots(&self) -> (&Memslots, Memslot) {
        (&self.slots, self.slot)
    }

    fn store(
        &mut self,
        page: u64,
        off: u64,
        val: u64,
        log: Option<&mut SlotDirtyLog>,
    ) -> Result<bool, &'static str> {
        let mut faulted = false;
        if !self.access(page, true)? {
            let log = log.ok_or("protection fault without dirty logging")?;
            // The hypervisor's write-fault path: log the page, give write access back.
            let gfn = gfn_of(&self.slot, page);
            let ptex = self.translate(page).ok_or("no translation")?;
            let h = mmu_generic::pte_list::PteHandle(ptex as u32);
            log.note_writable(gfn, h, None).map_err(|_| "note_writable refused")?;
            let mut flush = FlushToken::new();
            let ok = self.guest.unprotect(ptex, &mut flush);
            flush.flush(&mut NoTlb);
            if !ok || !self.access(page, true)? {
                return Err("unprotect did not make the page writable");
            }
            self.faults += 1;
            faulted = true;
        }
        self.memory.insert((page, off), val);
        Ok(faulted)
    }

    fn load(&mut self, page: u64, off: u64) -> Result<u64, &'static str> {
        if !self.access(page, false)? {
            return Err("load refused");
        }
        Ok(self.memory.get(&(page, off)).copied().unwrap_or(0))
    }

    fn flush(&mut self, token: FlushToken) {
        token.flush(&mut NoTlb);
    }

    fn figures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inv = self.guest.check_invariants();
        write!(
            f,
            "GuestHpt {:?} table ({} PTEGs, big-endian in memory), {} simulated accesses, {} write faults resolved by unprotect; rmap invariants {}",
            self.format,
            self.mask + 1,
            self.accesses,
            self.faults,
            if inv.is_ok() { "hold" } else { "BROKEN" }
        )
    }

    fn teardown(&mut self) -> u32 {
        let mut failed = 0;
        let mut leaves = alloc::vec::Vec::new();
        self.guest.for_each_leaf(
            &self.slot,
            GfnRange { start: self.slot.base_gfn(), end: Gfn(self.slot.base_gfn().0 + NPAGES) },
            &mut |h| leaves.push(h),
        );
        for h in leaves {
            let mut t = FlushToken::new();
            if self.guest.zap(h, &mut t).is_none() {
                failed += 1;
            }
            t.flush(&mut NoTlb);
        }
        failed
    }
}
