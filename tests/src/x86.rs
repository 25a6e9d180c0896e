//! The scenario adapter for arch-x86's TDP engine (EPT with and without A/D
//! flags, NPT; 4- and 5-level walks).
//!
//! [`TdpGuest`] plugs the real [`TdpMmu`] into [`GuestMmu`]: faults go
//! through [`TdpMmu::handle_fault`] (memslot lookup, fast path, invalidation
//! sequence, host resolution through [`LinearHost`], page-size choice,
//! install), the CPU is the software walker [`translate`] (which sets A/D as
//! the hardware does), and host invalidations are [`TdpMmu::zap_range`] under
//! an [`InvalidationSeq`]. Nothing of the mapping is re-implemented here.
//!
//! **A TLB in front of the walker.** The CPU caches translations, so a PTE
//! change the engine or a driver forgot to flush would go unnoticed by a
//! walker that always reads the tables. [`TdpGuest::hw_access`] therefore
//! consults a simulated TLB first, with the x86 rules: a hit that permits the
//! access completes without touching the tables (no A bit set again); a write
//! hit on a translation cached before D was set re-walks to set D; a hit that
//! does not permit the access faults and the fault drops the cached
//! translation, as a #PF or an EPT violation invalidates the faulting
//! address's cached translations. The TLB is flushed only through the flush
//! tokens and the engine's [`TlbFlush`] calls, and after each flush
//! [`TdpGuest::audit_tlb`] checks that no cached translation grants more than
//! the tables (a missing flush); [`GuestStats::stale_after_flush`] counts the
//! violations.
//!
//! **What the embedder owes the core's dirty log.** The engine's fault path
//! takes a [`FaultCtx`] naming the slots' logs and the vCPU's ring, and logs
//! each page before it stores a writable leaf (log, then grant); a full ring
//! maps read-only and the adapter answers `Retry`. The adapter still:
//! 1. sets [`SlotFlags::DIRTY_LOG`] on a slot's memslot when the slot's
//!    log starts (and clears it when the log goes), through
//!    [`TdpMmu::set_memslots`], whose flag-only change keeps the mappings
//!    (the engine refuses a flagged slot without a log in the context). The
//!    harness starts logs without a memslot change, so the adapter derives
//!    the flags from the [`DirtyLogs`] at each fault;
//! 2. tops up the engine's reverse-map reserve when a fault reports it
//!    empty, and retries (KVM's memory caches, topped up outside the lock);
//! 3. on an invalidation it passes every zapped leaf to
//!    [`SlotDirtyLog::note_zapped`], so a dirty bit is not lost with its leaf.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use arch_x86::exit::Origin;
use arch_x86::format::ept::Ept;
use arch_x86::format::npt::Npt;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, TdpFormat, WalkFault, WalkLength};
use arch_x86::frame::SimMemory;
use arch_x86::shadow::guest_walk::load_pdptrs;
use arch_x86::shadow::mode::{A, D, P, PS, RW, US};
use arch_x86::shadow::{
    AccessKind, AccessOp, CpuFeatures, DirtyTracker, GuestCpu, GuestMode, PfErrorCode, ShadowConfig,
    ShadowError, ShadowFault, ShadowMmu, SimGuestRam,
};
use arch_x86::tdp::{self, MapKind, TdpError, TdpMmu};
use arch_x86::testing::{FlushRecorder, LinearHost};
use arch_x86::walk::{translate, WalkError};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Gva, Hva, HvaRange, Pfn, PAGE_SIZE};
use mmu_generic::backend::{FlushToken, TlbFlush};
use mmu_generic::dirty_log::{FaultCtx, Tracking, WriteGrant};
use mmu_generic::dirty_ring::RingPush;
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::{PteHandle, RmapError};

use crate::harness::{DirtyLogs, FaultOutcome, GuestMmu, HwFault};

#[cfg(doc)]
use mmu_generic::dirty_log::SlotDirtyLog;

/// MAXPHYADDR of the simulated processor.
pub const PHYS_WIDTH: PhysAddrWidth = match PhysAddrWidth::new(46) {
    Ok(w) => w,
    Err(_) => panic!("46 is a valid MAXPHYADDR"),
};

/// Host frame of the first page-table frame (high, to exercise address bits).
const TABLE_BASE: Pfn = Pfn(0x2_0000_0000);
/// Page-table frames the simulated memory may hand out.
const TABLE_FRAMES: usize = 1 << 20;
/// Host-virtual page `p` is host frame `p + HOST_PFN_OFFSET` (1 GiB aligned,
/// so huge host pages are physically aligned).
pub const HOST_PFN_OFFSET: u64 = 0x100_0000;

/// An EPT with A/D flags (EPTP bit 6 set).
pub fn ept_ad(walk: WalkLength) -> Ept {
    Ept::new(walk, PHYS_WIDTH, true)
}

/// An EPT without A/D flags: no accessed or dirty bit; ageing by access
/// tracking.
pub fn ept_no_ad(walk: WalkLength) -> Ept {
    Ept::new(walk, PHYS_WIDTH, false)
}

/// A nested page table with NX and 1 GiB pages.
pub fn npt(walk: WalkLength) -> Npt {
    Npt::new(walk, PHYS_WIDTH)
}

/// One cached translation of a 4 KiB guest frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TlbEntry {
    /// The host frame.
    pfn: Pfn,
    /// What the walk permitted.
    allowed: Access,
    /// The leaf's D bit was set when cached (always true where the format has
    /// no D bit): a write hit needs no re-walk.
    dirty: bool,
}

/// A simulated TLB: never evicts (the strictest model of a missing flush),
/// keyed by 4 KiB guest frame.
#[derive(Debug, Default)]
struct Tlb {
    entries: BTreeMap<u64, TlbEntry>,
    range_flushes: u64,
    full_flushes: u64,
}

impl TlbFlush for Tlb {
    fn flush_range(&mut self, range: GfnRange) {
        self.range_flushes += 1;
        let doomed: Vec<u64> = self.entries.range(range.start.0..range.end.0).map(|(&g, _)| g).collect();
        for g in doomed {
            self.entries.remove(&g);
        }
    }

    fn flush_all(&mut self) {
        self.full_flushes += 1;
        self.entries.clear();
    }
}

/// Counters of what the adapter saw.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GuestStats {
    /// Faults that installed or updated a leaf ([`MapKind::Installed`]).
    pub faults_mapped: u64,
    /// Faults that restored an access-tracked leaf.
    pub faults_restored: u64,
    /// Faults that found the access already permitted.
    pub faults_spurious: u64,
    /// Accesses served by the TLB without a walk.
    pub tlb_hits: u64,
    /// Range and full TLB flushes performed.
    pub flushes: u64,
    /// TLB entries found granting more than the tables after a flush.
    pub stale_after_flush: u64,
    /// Walks that hit a reserved bit or a pointer outside table memory: the
    /// engine wrote an entry the processor rejects.
    pub misconfigs: u64,
    /// Faults that found the reverse-map reserve empty and were retried
    /// after a top-up.
    pub reserve_refills: u64,
    /// Faults whose write the full ring refused (mapped read-only).
    pub ring_full: u64,
}

/// A guest whose nested tables are arch-x86's [`TdpMmu`] in [`SimMemory`].
pub struct TdpGuest<F: TdpFormat> {
    mmu: TdpMmu<F, SimMemory>,
    host: LinearHost,
    inv: InvalidationSeq,
    tlb: Tlb,
    stats: GuestStats,
    errors: Vec<String>,
    audits: Vec<String>,
}

impl<F: TdpFormat> core::fmt::Debug for TdpGuest<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TdpGuest")
            .field("mmu", &self.mmu)
            .field("stats", &self.stats)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl<F: TdpFormat> TdpGuest<F> {
    /// A guest over `slots` in `format`, whose host memory is mapped with
    /// pages of `host_page` (2 MiB or 1 GiB let the engine map huge leaves
    /// where the slot allows).
    pub fn new(format: F, slots: &Memslots, host_page: PageSize) -> Result<Self, TdpError> {
        let mem = SimMemory::new(TABLE_BASE, TABLE_FRAMES);
        let mut mmu = TdpMmu::new(format, mem)?;
        let mut tlb = Tlb::default();
        mmu.set_memslots(slots, &mut tlb, |_| {});
        Ok(Self {
            mmu,
            host: LinearHost::new(HOST_PFN_OFFSET, host_page),
            inv: InvalidationSeq::new(),
            tlb,
            stats: GuestStats::default(),
            errors: Vec::new(),
            audits: Vec::new(),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &TdpMmu<F, SimMemory> {
        &self.mmu
    }

    /// The engine, mutably (to limit page sizes, say).
    pub fn engine_mut(&mut self) -> &mut TdpMmu<F, SimMemory> {
        &mut self.mmu
    }

    /// The embedder's host memory.
    pub fn host(&self) -> &LinearHost {
        &self.host
    }

    /// What the adapter counted.
    pub fn stats(&self) -> GuestStats {
        GuestStats { flushes: self.tlb.range_flushes + self.tlb.full_flushes, ..self.stats }
    }

    /// Errors the engine returned from faults (each answered `Failed`), and
    /// faults the adapter could not complete.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The first few stale TLB entries the audits found, described.
    pub fn audit_findings(&self) -> &[String] {
        &self.audits
    }

    /// Whether nothing went wrong underneath the scenario: no engine error,
    /// no misconfigured entry walked, no stale translation after a flush.
    pub fn check_clean(&self) -> Result<(), String> {
        if !self.errors.is_empty() {
            return Err(format!("engine errors: {:?}", self.errors));
        }
        if self.stats.misconfigs != 0 {
            return Err(format!("{} walks met a misconfigured entry", self.stats.misconfigs));
        }
        if self.stats.stale_after_flush != 0 {
            return Err(format!(
                "{} stale TLB entries after flushes: {:?}",
                self.stats.stale_after_flush, self.audits
            ));
        }
        Ok(())
    }

    /// Compares every cached translation with the tables: after a flush none
    /// may grant an access the tables deny, point at another host frame, or
    /// skip a D bit the tables no longer hold. Returns the number of stale
    /// entries (also added to the stats).
    pub fn audit_tlb(&mut self) -> u64 {
        let d = self.mmu.format().dirty_mask();
        let mut stale = 0;
        for (&g, e) in &self.tlb.entries {
            let why = match self.mmu.lookup(Gfn(g)) {
                None => Some(String::from("no leaf")),
                Some(l) if l.tracked => Some(String::from("leaf is access-tracked")),
                Some(l) if l.pfn != e.pfn => Some(format!("host frame {} now {}", e.pfn, l.pfn)),
                Some(l) if !l.access.contains(e.allowed) => {
                    Some(format!("cached {:?}, tables {:?}", e.allowed, l.access))
                }
                Some(l) if d != 0 && e.dirty && e.allowed.contains(Access::WRITE) && l.entry & d == 0 => {
                    Some(String::from("D cached, cleared in the tables"))
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                stale += 1;
                if self.audits.len() < 8 {
                    self.audits.push(format!("gfn {g:#x}: {why}"));
                }
            }
        }
        self.stats.stale_after_flush += stale;
        stale
    }

    /// Sets or clears `DIRTY_LOG` on each slot's memslot to match `logs`.
    fn sync_log_flags(&mut self, logs: &DirtyLogs) {
        let slots = self.mmu.memslots();
        let changes: Vec<(SlotId, SlotFlags)> = slots
            .iter()
            .filter_map(|s| {
                let logged = logs.logs.contains_key(&s.id());
                (logged != s.flags().contains(SlotFlags::DIRTY_LOG)).then(|| {
                    let mut flags = s.flags();
                    flags.set(SlotFlags::DIRTY_LOG, logged);
                    (s.id(), flags)
                })
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        let mut b = slots.to_builder();
        for (id, flags) in changes {
            b.set_flags(id, flags).expect("the slot is in the set it came from");
        }
        let new = b.build().expect("a flag change keeps a valid set valid");
        // A flag-only change keeps every mapping; nothing is zapped.
        self.mmu.set_memslots(&new, &mut self.tlb, |_| {});
    }
}

impl<F: TdpFormat> GuestMmu for TdpGuest<F> {
    type Backend = TdpMmu<F, SimMemory>;

    fn memslots(&self) -> &Memslots {
        self.mmu.memslots()
    }

    fn backend(&self) -> &Self::Backend {
        &self.mmu
    }

    fn backend_mut(&mut self) -> &mut Self::Backend {
        &mut self.mmu
    }

    fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
        let access = if write { Access::WRITE } else { Access::READ };
        let denied = if write { HwFault::WriteProtected } else { HwFault::NotPresent };
        if let Some(e) = self.tlb.entries.get(&gfn.0) {
            if !e.allowed.contains(access) {
                // The fault drops the translation it faulted on.
                self.tlb.entries.remove(&gfn.0);
                return Err(denied);
            }
            if !write || e.dirty {
                self.stats.tlb_hits += 1;
                return Ok(());
            }
            // A write through a translation cached before D was set walks
            // the tables to set D, faulting if they no longer allow it.
        }
        self.tlb.entries.remove(&gfn.0);
        let Some(gpa) = gfn.gpa() else { return Err(HwFault::NotPresent) };
        match translate(self.mmu.format(), self.mmu.memory(), self.mmu.root(), gpa, access, Origin::Final) {
            Ok(t) => {
                let dirty = write || self.mmu.format().dirty_mask() == 0;
                let pfn = t.pfn();
                self.tlb.entries.insert(gfn.0, TlbEntry { pfn, allowed: t.allowed, dirty });
                Ok(())
            }
            Err(WalkError::Exit { fault, .. }) => match fault {
                WalkFault::NotPresent { .. } | WalkFault::AddressTooWide => Err(HwFault::NotPresent),
                WalkFault::Permission { .. } => Err(denied),
                WalkFault::Reserved { .. } => {
                    self.stats.misconfigs += 1;
                    Err(HwFault::NotPresent)
                }
            },
            Err(WalkError::NotTableMemory(_)) => {
                self.stats.misconfigs += 1;
                Err(HwFault::NotPresent)
            }
        }
    }

    fn handle_fault(&mut self, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> FaultOutcome {
        self.sync_log_flags(logs);
        let Some(gpa) = gfn.gpa() else { return FaultOutcome::Mmio };
        let access = if write { Access::WRITE } else { Access::READ };
        let ctx = FaultCtx::new(&logs.logs, logs.ring.as_ref());
        let mut outcome = Err(TdpError::Rmap(RmapError::ReserveEmpty));
        for _ in 0..2 {
            let mut flush = FlushToken::new();
            outcome = self.mmu.handle_fault_logged(gpa, access, &mut self.host, &self.inv, &ctx, &mut flush);
            self.flush(flush);
            if outcome != Err(TdpError::Rmap(RmapError::ReserveEmpty)) {
                break;
            }
            // Outside the MMU lock, as KVM tops up its memory caches.
            self.stats.reserve_refills += 1;
            self.mmu.reserve(TdpMmu::<F, SimMemory>::FAULT_RESERVE);
        }
        match outcome {
            Ok(tdp::FaultOutcome::Mapped(m)) => {
                match m.kind {
                    MapKind::Installed => self.stats.faults_mapped += 1,
                    MapKind::Restored => self.stats.faults_restored += 1,
                    MapKind::Spurious => self.stats.faults_spurious += 1,
                }
                match m.grant {
                    Some(WriteGrant::RingFull) => {
                        // Mapped read-only: the write waits for the harvester.
                        self.stats.ring_full += 1;
                        FaultOutcome::Retry
                    }
                    Some(WriteGrant::Writable(RingPush::SoftFull)) => {
                        logs.soft_full_exits += 1;
                        FaultOutcome::Mapped
                    }
                    _ => FaultOutcome::Mapped,
                }
            }
            Ok(tdp::FaultOutcome::Retry) => FaultOutcome::Retry,
            Ok(tdp::FaultOutcome::Mmio { .. }) => FaultOutcome::Mmio,
            Ok(tdp::FaultOutcome::Denied(_)) => FaultOutcome::Denied,
            Err(e) => {
                self.errors.push(format!("{gfn:?}: {e}"));
                FaultOutcome::Failed
            }
        }
    }

    fn flush(&mut self, token: FlushToken) {
        if token.is_needed() {
            token.flush(&mut self.tlb);
            self.audit_tlb();
        }
    }

    fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize {
        self.inv.start(range);
        let hits: Vec<(SlotId, GfnRange)> =
            self.mmu.memslots().lookup_hva(range).map(|(s, gfns)| (s.id(), gfns)).collect();
        let mut zapped = 0;
        for (slot, gfns) in hits {
            let log = logs.logs.get(&slot);
            self.mmu.zap_range(gfns, &mut self.tlb, |leaf| {
                zapped += 1;
                if let Some(log) = log {
                    log.note_zapped(&leaf);
                }
            });
        }
        self.inv.end();
        self.audit_tlb();
        zapped
    }
}

/// The shadow-paging MMU a [`ShadowGuest`] drives.
pub type ShadowEngine = ShadowMmu<SimMemory, SimGuestRam, LinearHost>;

/// The host frame offset of a [`ShadowGuest`]'s guest memory.
pub const SHADOW_PFN_OFFSET: u64 = 0x10_0000;

/// Shadow paging under the scenario harness: a guest in `mode` whose own
/// tables map its linear addresses one to one with its largest pages (1 GiB
/// in 4- and 5-level paging, 2 MiB in PAE, 4 MiB in 32-bit paging), the
/// tables in a slot of their own ([`ShadowGuest::table_slot`]); the
/// harness's guest frame `g` is the linear address `g << 12`. The first
/// 5 GiB are mapped in 4- and 5-level paging, all 4 GiB in the others.
///
/// Faults go through [`ShadowMmu::page_fault`] with the harness's dirty logs
/// behind [`HarnessDirty`]; the CPU is [`ShadowMmu::hw_access`] (the
/// software walker over the shadow tables); hypervisor writes to guest
/// memory go through [`ShadowMmu::emulated_write_logged`], so they reach
/// the dirty log as the CPU's writes do.
pub struct ShadowGuest {
    /// The engine.
    pub mmu: ShadowEngine,
    /// The vCPU.
    pub cpu: GuestCpu,
    tlb: FlushRecorder,
}

impl core::fmt::Debug for ShadowGuest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ShadowGuest").field("mode", &self.cpu.mode).field("pages", &self.mmu.pages()).finish()
    }
}

impl ShadowGuest {
    /// The scenario slots: the sim suite's three (slot 2, read-only, aliases
    /// slot 1's first 16 host pages) and slot 3, the guest's page tables.
    pub fn scenario_slots(mode: GuestMode) -> Memslots {
        let (base, pages) = Self::tables(mode);
        let mut b = MemslotsBuilder::new();
        let slots = [
            Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty()),
            Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty()),
            Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY),
            Memslot::new(SlotId(3), Gfn(base), pages, Hva(0x3000_0000), SlotFlags::empty()),
        ];
        for s in slots {
            b.create(s).expect("the scenario slots do not overlap");
        }
        b.build().expect("the scenario slots do not overlap")
    }

    /// The first gfn and the number of pages of the guest's table slot.
    pub fn tables(mode: GuestMode) -> (u64, u64) {
        match mode {
            // Root, PDPT with five 1 GiB entries (a PML5 above in 5-level).
            GuestMode::Four => (0x10_0000, 2),
            GuestMode::Five => (0x10_0000, 3),
            // PDPT and four page directories of 2 MiB pages.
            GuestMode::Pae => (0x3_0000, 5),
            // One page directory of 4 MiB pages.
            GuestMode::Bits32 => (0x3_0000, 1),
        }
    }

    /// The guest's table slot.
    pub const fn table_slot() -> SlotId {
        SlotId(3)
    }

    /// A guest in `mode`, its tables built and CR3 loaded.
    pub fn new(mode: GuestMode) -> Self {
        let (base, pages) = Self::tables(mode);
        let ram = SimGuestRam::new(&[(Gfn(base), pages)]);
        let page = |i: u64| (base + i) << 12;
        let put = |addr: u64, bytes: u64, value: u64| {
            ram.write(Gpa(addr), bytes, value).expect("the table slot is guest memory");
        };
        let big = P | RW | US | A | D | PS;
        match mode {
            GuestMode::Four | GuestMode::Five => {
                let (pml4, pdpt) = if mode == GuestMode::Five { (1, 2) } else { (0, 1) };
                if mode == GuestMode::Five {
                    put(page(0), 8, page(pml4) | P | RW | US | A);
                }
                put(page(pml4), 8, page(pdpt) | P | RW | US | A);
                for i in 0..5u64 {
                    put(page(pdpt) + 8 * i, 8, (i << 30) | big);
                }
            }
            GuestMode::Pae => {
                for d in 0..4u64 {
                    put(page(0) + 8 * d, 8, page(1 + d) | P);
                    for i in 0..512u64 {
                        put(page(1 + d) + 8 * i, 8, (d << 30) | (i << 21) | big);
                    }
                }
            }
            GuestMode::Bits32 => {
                for i in 0..1024u64 {
                    put(page(0) + 4 * i, 4, (i << 22) | big);
                }
            }
        }
        let mmu = ShadowMmu::new(
            ShadowConfig::new(CpuFeatures::typical()),
            // Below 4 GiB: PAE roots need it.
            SimMemory::new(Pfn(0x8_0000), 1 << 16),
            ram,
            LinearHost::new(SHADOW_PFN_OFFSET, PageSize::Size4K),
            Self::scenario_slots(mode),
        );
        let mut cpu = GuestCpu::new(mode, page(0));
        if mode == GuestMode::Pae {
            cpu.pdptrs = load_pdptrs(mmu.guest(), cpu.cr3, mmu.features()).expect("the PDPTEs are valid");
        }
        let mut g = ShadowGuest { mmu, cpu, tlb: FlushRecorder::default() };
        g.mmu.load_cr3(&g.cpu).expect("the guest's root is in memory");
        let t = g.mmu.take_flush();
        t.flush(&mut g.tlb);
        g
    }

    fn kind(write: bool) -> AccessKind {
        AccessKind::user(if write { AccessOp::Write } else { AccessOp::Read })
    }

    /// A hypervisor write of `bytes` bytes of `value` at `gpa` (an emulated
    /// instruction's store), logged in `logs` as the CPU's writes are: a
    /// refused mark (a full ring) writes nothing.
    pub fn emulated_write(
        &mut self,
        gpa: Gpa,
        bytes: u64,
        value: u64,
        logs: &mut DirtyLogs,
    ) -> Result<(), ShadowError> {
        let r = self.mmu.emulated_write_logged(gpa, bytes, value, &mut HarnessDirty(logs));
        let t = self.mmu.take_flush();
        t.flush(&mut self.tlb);
        r
    }
}

/// The harness's dirty logs, as shadow paging's fault path and emulated
/// writes consult them.
pub struct HarnessDirty<'a>(pub &'a mut DirtyLogs);

impl DirtyTracker for HarnessDirty<'_> {
    fn write_protected(&self, slot: SlotId) -> bool {
        self.0.logs.get(&slot).is_some_and(|l| l.tracking() == Tracking::WriteProtect)
    }

    fn mark(&mut self, slot: SlotId, gfn: Gfn) -> bool {
        let logs = &mut *self.0;
        let Some(log) = logs.logs.get(&slot) else { return true };
        log.mark(gfn, logs.ring.as_ref()).is_ok()
    }

    fn note_writable(&mut self, slot: SlotId, gfn: Gfn, h: PteHandle) -> bool {
        let logs = &mut *self.0;
        let Some(log) = logs.logs.get_mut(&slot) else { return true };
        match log.note_writable(gfn, h, logs.ring.as_ref()) {
            Ok(RingPush::SoftFull) => {
                logs.soft_full_exits += 1;
                true
            }
            Ok(RingPush::Ok) => true,
            Err(_) => false,
        }
    }
}

impl GuestMmu for ShadowGuest {
    type Backend = ShadowEngine;

    fn memslots(&self) -> &Memslots {
        self.mmu.memslots()
    }

    fn backend(&self) -> &ShadowEngine {
        &self.mmu
    }

    fn backend_mut(&mut self) -> &mut ShadowEngine {
        &mut self.mmu
    }

    fn hw_access(&mut self, gfn: Gfn, write: bool) -> Result<(), HwFault> {
        let Some(gva) = gfn.0.checked_mul(PAGE_SIZE) else { return Err(HwFault::NotPresent) };
        match self.mmu.hw_access(&self.cpu, Gva(gva), Self::kind(write)) {
            Ok(_) => Ok(()),
            Err(f) if f.error_code().is_some_and(|c| c.contains(PfErrorCode::PRESENT)) => {
                Err(HwFault::WriteProtected)
            }
            Err(_) => Err(HwFault::NotPresent),
        }
    }

    fn handle_fault(&mut self, gfn: Gfn, write: bool, logs: &mut DirtyLogs) -> FaultOutcome {
        let Some(gva) = gfn.0.checked_mul(PAGE_SIZE) else { return FaultOutcome::Mmio };
        let r = self.mmu.page_fault(&self.cpu, Gva(gva), Self::kind(write), &mut HarnessDirty(logs));
        for (slot, leaf) in self.mmu.take_zapped_dirty() {
            if let Some(log) = logs.logs.get(&slot) {
                log.note_zapped(&leaf);
            }
        }
        let t = self.mmu.take_flush();
        t.flush(&mut self.tlb);
        match r {
            Ok(ShadowFault::Fixed) => FaultOutcome::Mapped,
            Ok(ShadowFault::Mmio { .. }) => FaultOutcome::Mmio,
            Ok(ShadowFault::Denied { .. }) => FaultOutcome::Denied,
            // An engine error fails the access at once.
            Err(_) => FaultOutcome::Failed,
            // The identity-mapped guest never writes its tables: any other
            // answer is a failure the harness reports after its retries.
            Ok(_) => FaultOutcome::Retry,
        }
    }

    fn flush(&mut self, token: FlushToken) {
        token.flush(&mut self.tlb);
    }

    fn zap_hva_range(&mut self, range: HvaRange, logs: &DirtyLogs) -> usize {
        let n = self.mmu.zap_hva_range(range, |slot, leaf| {
            if let Some(log) = logs.logs.get(&slot) {
                log.note_zapped(&leaf);
            }
        });
        let t = self.mmu.take_flush();
        t.flush(&mut self.tlb);
        n
    }
}
