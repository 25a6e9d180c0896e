//! The scenario adapter for arch-ppc-book3s: a pseries guest whose hashed
//! page table a hypervisor keeps in memory ([`GuestHpt`] over the
//! big-endian `InMemoryHpt`), with the CPU played by the crate's software MMU.
//!
//! On Book3s the *guest* owns its translation: it maps its real memory with
//! H_ENTER, and the hypervisor checks every entry, swaps the guest-real page
//! for the host page and chains it in the reverse map. So the adapter plays
//! three parties:
//!
//! * **the CPU** ([`GuestMmu::hw_access`]): the guest maps guest frame `gfn`
//!   at effective address `gfn << 12` in 256 MB segments (VSID
//!   [`VSID_BASE`] + ESID); [`InMemoryHpt::translate`](arch_ppc_book3s::table::InMemoryHpt::translate) hashes, searches the
//!   primary then the secondary group, checks PP and sets R (and C on a
//!   store) in the big-endian table;
//! * **the guest kernel's fault path**: no entry for the address → H_ENTER
//!   through the crate's pass-through ([`PaprHpt`] over [`HcallServer`]) with
//!   [`insert`]'s secondary-hash fallback (and, if both groups are full, an
//!   H_REMOVE of a victim, as Linux evicts); H_PARAMETER means the frame is
//!   not guest memory: an MMIO exit;
//! * **the hypervisor's fault path**: an entry a zap left absent is mapped
//!   again with [`GuestHpt::fault_in`]; a store to an entry the host made
//!   read-only for dirty logging is logged with `note_writable` and the entry
//!   unprotected ([`GuestHpt::unprotect`]); a store to a read-only slot is
//!   denied. A fresh writable entry in a logged slot goes on the log's
//!   writable chain (dirty-bit tracking), or, under write protection, is
//!   logged when entered for a store and write-protected otherwise: the
//!   hypervisor sees every H_ENTER, so no write escapes the log.
//!
//! [`GuestMmu::zap_hva_range`] zaps through the [`MmuBackend`] and feeds the
//! leaves to `note_zapped`, so the C bits of zapped entries reach the log.
//!
//! With `page_shift` 16 or 24 the guest maps 64 KiB or 16 MiB pages (in
//! segments of that base size) in every slot whose extent allows them; those
//! runs are for the scenarios without dirty logging or ageing, whose exact
//! per-page comparisons assume 4 KiB pages (as the simulated back end maps
//! small pages in logged slots).

use arch_ppc_book3s::guest::{
    GuestConfig, GuestHpt, GuestHptError, HcallServer, HvaIdentity, NoTlb, WimgPolicy,
};
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{avpn_arg, pp, HpteFormat};
use arch_ppc_book3s::mapping::{insert, VirtPage};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::{HptError, RemoveCond};
use arch_ppc_book3s::passthrough::PaprHpt;
use arch_ppc_book3s::table::{AccessFault, HashTable};
use mmu_generic::addr::{Gfn, HvaRange};
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::Tracking;
use mmu_generic::dirty_ring::RingPush;
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags};
use mmu_generic::pte_list::PteHandle;
use mmu_generic::zap::zap_hva_range;

use crate::harness::{DirtyLogs, FaultOutcome, GuestMmu, HwFault};

/// VSID of the guest's segment with ESID 0; ESID `e` uses `VSID_BASE + e`.
pub const VSID_BASE: u64 = 0x7_1000;

/// What the adapter counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PpcCounters {
    /// H_ENTERs the guest's fault path made.
    pub entered: u64,
    /// Of those, entries placed in their secondary group (H_PTEG_FULL).
    pub secondary: u64,
    /// Entries the guest evicted because both groups were full.
    pub evicted: u64,
    /// Absent entries mapped again by the hypervisor (`fault_in`).
    pub faulted_in: u64,
    /// Stores resolved by `note_writable` + `unprotect`.
    pub unprotected: u64,
}

/// A pseries guest over an in-memory [`GuestHpt`], as a [`GuestMmu`].
#[derive(Debug)]
pub struct PpcGuest {
    slots: Memslots,
    hpt: GuestHpt<HvaIdentity>,
    tlb: NoTlb,
    sizes: PageSizes,
    page_shift: u32,
    /// What happened so far.
    pub counters: PpcCounters,
}

impl PpcGuest {
    /// A guest over `slots` with a 2^`pft_shift`-byte table in `format`,
    /// told of `sizes`, mapping pages of 2^`page_shift` bytes where a slot
    /// allows (12 everywhere else; the size must be listed as a base size).
    pub fn new(
        slots: Memslots,
        pft_shift: u32,
        format: HpteFormat,
        sizes: PageSizes,
        page_shift: u32,
    ) -> Result<Self, GuestHptError> {
        let geometry =
            HptGeometry::from_pft_size(pft_shift).ok_or(GuestHptError::TableTooLarge(pft_shift))?;
        let config = GuestConfig { geometry, format, sizes, wimg: WimgPolicy::RequireM };
        let mut hpt = GuestHpt::new(config, slots.clone(), HvaIdentity)?;
        // C bits the guest takes from the hardware (its H_REMOVEs, evictions)
        // are queued for the core's C-bit harvest, which drains them through
        // `MmuBackend::drain_lost_dirty`.
        hpt.queue_folded_dirty(true);
        Ok(Self { slots, hpt, tlb: NoTlb, sizes, page_shift, counters: PpcCounters::default() })
    }

    /// The hypervisor's table.
    pub fn hpt(&self) -> &GuestHpt<HvaIdentity> {
        &self.hpt
    }

    /// The base (= actual) page shift the guest uses for `slot`.
    fn shift_for(&self, slot: Option<&Memslot>) -> u32 {
        let large = self.page_shift;
        match slot {
            Some(s)
                if large > 12
                    && s.npages() % (1 << (large - 12)) == 0
                    && s.allows_page(s.base_gfn(), large) =>
            {
                large
            }
            _ => 12,
        }
    }

    /// The guest's virtual address of frame `gfn`, and the page size there.
    fn va_of(&self, gfn: Gfn) -> Option<(VirtAddr, u32)> {
        let ea = gfn.0.checked_mul(1 << 12)?;
        let va = VirtAddr::new(VSID_BASE + (ea >> 28), SegmentSize::S256M, ea)?;
        Some((va, self.shift_for(self.slots.lookup(gfn))))
    }

    /// The guest kernel maps the page holding `gfn` (read/write; the
    /// hypervisor makes it read-only for a read-only slot). Both groups
    /// full: it evicts one entry of the primary group and tries again.
    fn guest_enter(&mut self, va: &VirtAddr, shift: u32, gfn: Gfn) -> Result<u64, HptError> {
        let first = gfn.0 & !((1u64 << (shift - 12)) - 1);
        let page = VirtPage::new(*va, shift, shift);
        let mask = self.hpt.table().geometry().pteg_mask();
        for attempt in 0..2 {
            let server = HcallServer { hpt: &mut self.hpt, tlb: &mut self.tlb };
            let mut table = PaprHpt::new(server, mask);
            match insert(&mut table, &page, &self.sizes, first << 12, pp::RW_RW) {
                Ok(ins) => {
                    self.counters.entered += 1;
                    self.counters.secondary += u64::from(ins.secondary);
                    return Ok(ins.slot);
                }
                Err(HptError::PtegFull) if attempt == 0 => {
                    let victim = page.group(mask, false) * 8 + self.counters.evicted % 8;
                    let v = table.read(victim)?.v;
                    // The guest's H_REMOVE: the hypervisor folds R/C into its reverse map.
                    table.remove(victim, RemoveCond::Avpn(avpn_arg(v)))?;
                    self.counters.evicted += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Err(HptError::PtegFull)
    }

    /// The hypervisor's policy for an entry that just became writable in
    /// hardware (entered, or faulted back in) in a logged slot.
    fn log_new_entry(
        &mut self,
        slot: &Memslot,
        gfn: Gfn,
        ptex: u64,
        write: bool,
        logs: &mut DirtyLogs,
    ) -> FaultOutcome {
        if slot.flags().contains(SlotFlags::READONLY) {
            return FaultOutcome::Mapped;
        }
        let Some(log) = logs.logs.get_mut(&slot.id()) else { return FaultOutcome::Mapped };
        let h = PteHandle(ptex as u32);
        let mut flush = FlushToken::new();
        let out = match log.tracking() {
            // On the writable chain: the harvest reads its C bit.
            Tracking::HardwareDirty => match log.note_writable(gfn, h, logs.ring.as_ref()) {
                Ok(_) => FaultOutcome::Mapped,
                Err(_) => {
                    self.hpt.write_protect(h, &mut flush);
                    FaultOutcome::Retry
                }
            },
            Tracking::WriteProtect if write => match log.note_writable(gfn, h, logs.ring.as_ref()) {
                Ok(RingPush::SoftFull) => {
                    logs.soft_full_exits += 1;
                    FaultOutcome::Mapped
                }
                Ok(RingPush::Ok) => FaultOutcome::Mapped,
                // A full ring: the store is not logged, so not allowed yet.
                Err(_) => {
                    self.hpt.write_protect(h, &mut flush);
                    FaultOutcome::Retry
                }
            },
            Tracking::WriteProtect => {
                self.hpt.write_protect(h, &mut flush);
                FaultOutcome::Mapped
            }
        };
        flush.flush(&mut self.tlb);
        out
    }
}

impl GuestMmu for PpcGuest {
    type Backend = GuestHpt<HvaIdentity>;

    fn memslots(&self) -> &Memslots {
        &self.slots
    }

    fn backend(&self) -> &GuestHpt<HvaIdentity> {
        &self.hpt
    }

    fn backend_mut(&mut self) -> &mut GuestHpt<HvaIdentity> {
        &mut self.hpt
    }

    fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
        let (va, shift) = self.va_of(gfn).ok_or(HwFault::NotPresent)?;
        // Privileged state with Ks = 0: key 0.
        match self.hpt.table().translate(&va, shift, &self.sizes, write, false) {
            Ok(_) => Ok(()),
            Err(AccessFault::NoTranslation) => Err(HwFault::NotPresent),
            Err(AccessFault::Protection(_)) => Err(HwFault::WriteProtected),
        }
    }

    fn handle_fault(&mut self, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> FaultOutcome {
        let Some((va, shift)) = self.va_of(gfn) else { return FaultOutcome::Mmio };
        let slot = self.slots.lookup(gfn).copied();
        match self.hpt.find(&va, shift) {
            // The guest's DSI: it enters the page; the hypervisor refuses
            // memory outside the slots with H_PARAMETER.
            None => match self.guest_enter(&va, shift, gfn) {
                Ok(ptex) => match slot {
                    Some(s) => self.log_new_entry(&s, gfn, ptex, write, logs),
                    // Entered outside every slot: a hypervisor bug the scenario reports.
                    None => FaultOutcome::Mapped,
                },
                Err(HptError::Parameter) => FaultOutcome::Mmio,
                Err(_) => FaultOutcome::Retry,
            },
            // The hypervisor's: the host zapped the entry.
            Some(f) if self.hpt.is_absent(f.ptex) => {
                let Some(s) = slot else { return FaultOutcome::Mmio };
                match self.hpt.fault_in(f.ptex) {
                    Ok(()) => {
                        self.counters.faulted_in += 1;
                        self.log_new_entry(&s, gfn, f.ptex, write, logs)
                    }
                    Err(_) => FaultOutcome::Mmio,
                }
            }
            // A valid entry refused a store: read-only slot, or write-protected for the log.
            Some(f) => {
                let Some(s) = slot else { return FaultOutcome::Mmio };
                if !write {
                    return FaultOutcome::Retry;
                }
                if s.flags().contains(SlotFlags::READONLY) {
                    return FaultOutcome::Denied;
                }
                if let Some(log) = logs.logs.get_mut(&s.id()) {
                    match log.note_writable(gfn, PteHandle(f.ptex as u32), logs.ring.as_ref()) {
                        Ok(RingPush::SoftFull) => logs.soft_full_exits += 1,
                        Ok(RingPush::Ok) => {}
                        Err(_) => return FaultOutcome::Retry,
                    }
                }
                let mut flush = FlushToken::new();
                let ok = self.hpt.unprotect(f.ptex, &mut flush);
                flush.flush(&mut self.tlb);
                if ok {
                    self.counters.unprotected += 1;
                    FaultOutcome::Mapped
                } else {
                    // The guest's own PP forbids the store: its own fault, not ours.
                    FaultOutcome::Denied
                }
            }
        }
    }

    fn flush(&mut self, token: FlushToken) {
        token.flush(&mut self.tlb);
    }

    fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize {
        let mut flush = FlushToken::new();
        let zapped = zap_hva_range(&self.slots, &mut self.hpt, range, &mut flush, |slot, leaf| {
            if let Some(log) = logs.logs.get(&slot.id()) {
                log.note_zapped(leaf);
            }
        });
        flush.flush(&mut self.tlb);
        zapped
    }
}
