//! The guest's nested MMU as the scenarios use it: arch-x86's TDP engine (`TdpMmu` over
//! identity-mapped frames, EPT or NPT) serving every fault, with mmu-generic's memslots,
//! dirty logs, ageing, invalidation sequencing and the engine's zap-all by generation.
//!
//! The format is built from what the CPU reports: MAXPHYADDR (CPUID 0x8000_0008), and
//! for NPT the host's EFER.NXE and 1 GiB-page support, for EPT IA32_VMX_EPT_VPID_CAP
//! (A/D flags, execute-only, 1 GiB pages).

use alloc::vec::Vec;

use arch_x86::exit::{EptQualification, NestedExit, NpfErrorCode};
use arch_x86::format::ept::Ept;
use arch_x86::format::npt::Npt;
use arch_x86::format::{PageSize, PhysAddrWidth, WalkLength};
use arch_x86::frame::{FrameMemory, IdentityMemory};
use arch_x86::tdp::{self, HostFault, HostMemory, HostPage, MapKind, TdpError, TdpMmu};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Hva, HvaRange, Pfn};
use mmu_generic::age::{self, AgeReport, NoAccessedBit};
use mmu_generic::backend::{FlushToken, Leaf, MmuBackend, TlbFlush};
use mmu_generic::dirty_log::{DirtyLogError, FaultCtx, LogMode, SlotDirtyLog, Tracking};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, MemslotError, Memslots, SlotFlags, SlotId};

use crate::frames::{FramePool, OutOfFrames};
use crate::port::{cpuid, rdmsr};
use crate::vendor::{NestedFormat, Vendor};

/// Bytes of identity-mapped RAM given to the engine for its tables.
const TABLE_REGION: u64 = 2 << 20;
/// Obsolete tables freed per reclaim batch (the MMU lock could be dropped between).
const RECLAIM_BATCH: usize = 4;

/// What a nested fault came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A leaf was installed or made writable (`pages`: 1 or 512).
    Mapped {
        /// 4 KiB frames the leaf maps.
        pages: u64,
    },
    /// An access-tracked leaf was restored (the refault is the access).
    Restored,
    /// The leaf already permits the access: a stale translation.
    Spurious,
    /// An invalidation raced with the fault: nothing installed, the guest refaults.
    Retry,
    /// The address is in no memslot: not mapped, reported (an MMIO exit for a VMM).
    NoSlot,
    /// The engine refused the access (read-only slot or host page).
    Denied,
}

/// Why the MMU failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedError {
    /// Frames ran out.
    OutOfFrames,
    /// The TDP engine failed.
    Tdp(TdpError),
    /// A memslot change was refused.
    Memslot(MemslotError),
    /// A dirty-log operation was refused.
    DirtyLog(DirtyLogError),
    /// No such slot, or it is not logged.
    NoSuchSlot(SlotId),
    /// The CPU reports a physical-address width the engine rejects.
    PhysWidth(u8),
}

impl From<OutOfFrames> for NestedError {
    fn from(_: OutOfFrames) -> Self {
        NestedError::OutOfFrames
    }
}

impl From<TdpError> for NestedError {
    fn from(e: TdpError) -> Self {
        NestedError::Tdp(e)
    }
}

/// Fault counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Faults that installed a leaf.
    pub mapped: u64,
    /// Access-tracked leaves restored.
    pub restored: u64,
    /// Faults retried after an invalidation.
    pub retries: u64,
}

/// Adapter: the core's flush token performs the vendor's nested TLB flush
/// (SVM: TLB_CONTROL on the next VMRUN; VMX: INVEPT single-context).
pub struct VendorTlb<'a>(pub &'a mut dyn Vendor);

impl TlbFlush for VendorTlb<'_> {
    fn flush_range(&mut self, _range: GfnRange) {
        // Neither INVEPT nor the SVM TLB control flushes a guest-physical range.
        self.0.flush_nested_tlb();
    }

    fn flush_all(&mut self) {
        self.0.flush_nested_tlb();
    }
}

/// Guest memory as the host sees it: identity-mapped, so hva = hpa; the listed host
/// ranges are 2 MiB-aligned contiguous blocks (huge host pages).
struct IdentityHost<'a> {
    huge: &'a [HvaRange],
}

impl HostMemory for IdentityHost<'_> {
    fn resolve(&mut self, hva: Hva, _write: bool) -> Result<HostPage, HostFault> {
        let huge = self.huge.iter().any(|r| hva.0 >= r.start.0 && hva.0 < r.end.0);
        Ok(HostPage {
            pfn: Pfn(hva.0 >> 12),
            writable: true,
            size: if huge { PageSize::Size2M } else { PageSize::Size4K },
        })
    }
}

enum Engine {
    Npt(TdpMmu<Npt, IdentityMemory>),
    Ept(TdpMmu<Ept, IdentityMemory>),
}

/// Runs `$body` with `$t` bound to the engine, whichever format it has.
macro_rules! with_engine {
    ($engine:expr, $t:ident => $body:expr) => {
        match $engine {
            Engine::Npt($t) => $body,
            Engine::Ept($t) => $body,
        }
    };
}

/// The nested MMU of one guest.
pub struct Nested {
    engine: Engine,
    /// The memslot set (replaced whole on change).
    pub slots: Memslots,
    /// Slots backed by 2 MiB host pages (the engine may map them with 2 MiB leaves).
    pub huge_ok: Vec<SlotId>,
    logs: Vec<Option<SlotDirtyLog>>,
    /// Invalidation sequencing.
    pub seq: InvalidationSeq,
    /// Ageing policy where the format has no accessed bit.
    pub policy: NoAccessedBit,
    /// Counters.
    pub counters: Counters,
    /// Test hook: an MMU-notifier invalidation of this host range arrives while the next
    /// fault resolves its host address (between the snapshot and the install).
    pub inject_invalidation: Option<HvaRange>,
    injected_open: bool,
    pending: FlushToken,
}

fn phys_width() -> Result<PhysAddrWidth, NestedError> {
    let bits = (cpuid(0x8000_0008, 0).0 & 0xff) as u8;
    PhysAddrWidth::new(bits).map_err(|_| NestedError::PhysWidth(bits))
}

impl Nested {
    /// An MMU with no memslots; its tables live in a region taken from `pool`.
    pub fn new(format: NestedFormat, pool: &mut FramePool) -> Result<Self, NestedError> {
        let region = pool.alloc_contiguous(TABLE_REGION)?;
        // SAFETY: the region was just taken from the frame pool, which hands each frame out
        // once; it is identity-mapped RAM below 4 GiB and nothing else will touch it.
        let mem = unsafe { IdentityMemory::new(Pfn(region >> 12), (TABLE_REGION >> 12) as u32) };
        let width = phys_width()?;
        let engine = match format {
            NestedFormat::Npt => {
                let mut npt = Npt::new(WalkLength::Four, width);
                npt.nxe = rdmsr(0xc000_0080) & (1 << 11) != 0;
                npt.page_1g = cpuid(0x8000_0001, 0).3 & (1 << 26) != 0;
                Engine::Npt(TdpMmu::new(npt, mem)?)
            }
            NestedFormat::Ept { ad } => {
                let cap = rdmsr(0x48c);
                let mut ept = Ept::new(WalkLength::Four, width, ad);
                ept.execute_only = cap & 1 != 0;
                ept.page_1g = cap & (1 << 17) != 0;
                Engine::Ept(TdpMmu::new(ept, mem)?)
            }
        };
        Ok(Nested {
            engine,
            slots: Memslots::new(),
            huge_ok: Vec::new(),
            logs: Vec::new(),
            seq: InvalidationSeq::new(),
            policy: NoAccessedBit::AccessTracking,
            counters: Counters::default(),
            inject_invalidation: None,
            injected_open: false,
            pending: FlushToken::new(),
        })
    }

    fn backend(&self) -> &dyn MmuBackend {
        with_engine!(&self.engine, t => t as &dyn MmuBackend)
    }

    fn backend_mut(&mut self) -> &mut dyn MmuBackend {
        with_engine!(&mut self.engine, t => t as &mut dyn MmuBackend)
    }

    /// What the vendor loads to use the tables: nCR3 (NPT) or the EPTP (EPT), from the
    /// engine's current root.
    pub fn root_pointer(&self) -> u64 {
        match &self.engine {
            Engine::Npt(t) => t.root().0 << 12,
            Engine::Ept(t) => match t.format().eptp(t.root()) {
                Ok(eptp) => eptp.raw(),
                Err(e) => {
                    crate::println!("EPTP rejected: {:?}", e);
                    0
                }
            },
        }
    }

    /// Page-table frames the engine holds (obsolete ones included).
    pub fn tables_in_use(&self) -> usize {
        with_engine!(&self.engine, t => t.memory().frames_in_use())
    }

    /// Replaces the memslot set (the engine zaps what a change invalidates).
    pub fn set_slots(&mut self, slots: Memslots, vendor: &mut dyn Vendor) {
        let logs = &self.logs;
        let mut tlb = VendorTlb(vendor);
        with_engine!(&mut self.engine, t => t.set_memslots(&slots, &mut tlb, |leaf| fold_zapped(logs, &slots, &leaf)));
        self.slots = slots;
    }

    /// Performs the TLB flush the last changes need, if any.
    pub fn flush(&mut self, vendor: &mut dyn Vendor) {
        core::mem::take(&mut self.pending).flush(&mut VendorTlb(vendor));
    }

    /// Host address of a guest-physical address.
    pub fn gpa_to_hva(&self, gpa: u64) -> Option<u64> {
        let gfn = Gfn(gpa >> 12);
        self.slots.lookup(gfn).and_then(|s| s.gfn_to_hva(gfn)).map(|h| h.0 + (gpa & 0xfff))
    }

    fn slot(&self, id: SlotId) -> Result<Memslot, NestedError> {
        self.slots.get(id).copied().ok_or(NestedError::NoSuchSlot(id))
    }

    /// Serves a nested fault at `gpa` through the TDP engine; `info` is the hardware's
    /// report (NPF error code or EPT-violation qualification), decoded by arch-x86.
    pub fn fault(
        &mut self,
        gpa: u64,
        info: u64,
        vendor: &mut dyn Vendor,
    ) -> Result<FaultOutcome, NestedError> {
        let exit = match self.engine {
            Engine::Npt(_) => NestedExit::Npf(NpfErrorCode::from_bits_retain(info)),
            Engine::Ept(_) => NestedExit::EptViolation(EptQualification::from_bits_retain(info)),
        };
        if let Some(range) = self.inject_invalidation.take() {
            self.inject_during_next_fault(range, vendor);
        }
        let huge: Vec<HvaRange> =
            self.huge_ok.iter().filter_map(|id| self.slots.get(*id)).map(|s| s.hvas()).collect();
        let mut host = IdentityHost { huge: &huge };
        let mut flush = FlushToken::new();
        let seq = &self.seq;
        // Log, then grant: the engine logs each page before it maps it writable.
        let ctx = FaultCtx::new(&self.logs, None);
        let out = with_engine!(&mut self.engine, t => t.handle_exit_logged(exit, Gpa(gpa), &mut host, seq, &ctx, &mut flush));
        // The staged invalidation (test hook) completes after the fault's check.
        self.end_injected();
        let out = out?;
        self.pending.merge(flush);
        let outcome = match out {
            tdp::FaultOutcome::Mapped(m) => match m.kind {
                MapKind::Installed => {
                    self.counters.mapped += 1;
                    FaultOutcome::Mapped { pages: m.size.frames() }
                }
                MapKind::Restored => {
                    self.counters.restored += 1;
                    FaultOutcome::Restored
                }
                MapKind::Spurious => {
                    self.pending.add_all();
                    FaultOutcome::Spurious
                }
            },
            tdp::FaultOutcome::Retry => {
                self.counters.retries += 1;
                FaultOutcome::Retry
            }
            tdp::FaultOutcome::Mmio { .. } => FaultOutcome::NoSlot,
            tdp::FaultOutcome::Denied(_) => FaultOutcome::Denied,
        };
        Ok(outcome)
    }

    /// The test hook's invalidation. The engine snapshots the sequence inside
    /// `handle_fault`, so the race is staged as an invalidation that is still in
    /// progress (started, not ended) while the fault runs: `must_retry` sees the range.
    fn inject_during_next_fault(&mut self, range: HvaRange, vendor: &mut dyn Vendor) {
        self.zap_hva(range, vendor);
        self.seq.start(range);
        self.injected_open = true;
    }

    fn zap_hva(&mut self, range: HvaRange, vendor: &mut dyn Vendor) -> u64 {
        let targets: Vec<GfnRange> = self.slots.lookup_hva(range).map(|(_, g)| g).collect();
        let mut pages = 0;
        let logs = &self.logs;
        let slots = &self.slots;
        let mut tlb = VendorTlb(vendor);
        for gfns in targets {
            with_engine!(&mut self.engine, t => t.zap_range(gfns, &mut tlb, |leaf| {
                pages += leaf.npages;
                fold_zapped(logs, slots, &leaf);
            }));
        }
        pages
    }

    /// MMU-notifier invalidation of host range `range`: every leaf backed by it is zapped
    /// (its final D bit folded into the slot's dirty log). Returns the pages unmapped.
    pub fn invalidate(&mut self, range: HvaRange, vendor: &mut dyn Vendor) -> u64 {
        self.seq.start(range);
        let pages = self.zap_hva(range, vendor);
        self.seq.end();
        pages
    }

    /// Ends an invalidation the test hook left open (after the fault it raced with).
    fn end_injected(&mut self) {
        if core::mem::take(&mut self.injected_open) {
            self.seq.end();
        }
    }

    /// Starts dirty logging of slot `id` (memslot flag DIRTY_LOG set, a new memslot
    /// generation). Returns the number of 2 MiB leaves split.
    pub fn start_dirty_log(
        &mut self,
        id: SlotId,
        tracking: Tracking,
        vendor: &mut dyn Vendor,
    ) -> Result<usize, NestedError> {
        let slot = self.slot(id)?;
        let huge_before = self.count_huge(&slot);
        let mut b = self.slots.to_builder();
        b.set_flags(id, slot.flags() | SlotFlags::DIRTY_LOG).map_err(NestedError::Memslot)?;
        let slots = b.build().map_err(NestedError::Memslot)?;
        self.set_slots(slots, vendor);
        let slot = self.slot(id)?;
        let mut flush = FlushToken::new();
        let log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, self.backend_mut(), &mut flush)
            .map_err(NestedError::DirtyLog)?;
        self.pending.merge(flush);
        if self.logs.len() <= id.0 as usize {
            self.logs.resize_with(id.0 as usize + 1, || None);
        }
        self.logs[id.0 as usize] = Some(log);
        Ok(huge_before - self.count_huge(&slot))
    }

    fn count_huge(&self, slot: &Memslot) -> usize {
        let b = self.backend();
        let mut n = 0;
        b.for_each_leaf(slot, slot.gfns(), &mut |h| n += b.leaf(h).is_some_and(|l| l.npages > 1) as usize);
        n
    }

    /// How slot `id` is dirty-logged, if it is.
    pub fn logging(&self, id: SlotId) -> Option<Tracking> {
        self.logs.get(id.0 as usize).and_then(Option::as_ref).map(|l| l.tracking())
    }

    /// One dirty-log round of slot `id` (classic get-and-clear): the guest frames written
    /// since the last round. The round's TLB flush is done before returning, as the pages
    /// must be copied only after it.
    pub fn harvest(&mut self, id: SlotId, vendor: &mut dyn Vendor) -> Result<Vec<Gfn>, NestedError> {
        let (gfns, flush) = self.harvest_unflushed(id)?;
        self.pending.merge(flush);
        self.flush(vendor);
        Ok(gfns)
    }

    /// One dirty-log round of slot `id` whose TLB flush the caller performs: the guest
    /// frames written since the last round, and the flush that must have taken effect on
    /// every CPU that may cache the guest's translations before any of them is copied
    /// (the two-CPU race flushes the vCPU remotely, outside the MMU lock).
    pub fn harvest_unflushed(&mut self, id: SlotId) -> Result<(Vec<Gfn>, FlushToken), NestedError> {
        let slot = self.slot(id)?;
        let Some(log) = self.logs.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return Err(NestedError::NoSuchSlot(id));
        };
        let mut words = Vec::new();
        let backend: &mut dyn MmuBackend = with_engine!(&mut self.engine, t => t as &mut dyn MmuBackend);
        let flush = log.get_and_clear(backend, &mut words).map_err(NestedError::DirtyLog)?;
        let mut out = Vec::new();
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                out.push(Gfn(slot.base_gfn().0 + 64 * w as u64 + b));
            }
        }
        Ok((out, flush))
    }

    /// `test_age` of the host page backing `gfn`.
    pub fn test_age_gfn(&self, gfn: Gfn) -> Option<AgeReport> {
        let hva = self.slots.lookup(gfn)?.gfn_to_hva(gfn)?;
        let range = HvaRange::from_len(hva, 4096)?;
        Some(age::test_age(&self.slots, self.backend(), range, self.policy))
    }

    /// `age` of the host range backing guest frames `gfns` of one slot.
    pub fn age_gfns(&mut self, gfns: GfnRange) -> Option<AgeReport> {
        let slot = self.slots.lookup(gfns.start)?;
        let start = slot.gfn_to_hva(gfns.start)?;
        let range = HvaRange { start, end: Hva(start.0 + (gfns.len() << 12)) };
        let mut flush = FlushToken::new();
        let (slots, policy) = (&self.slots, self.policy);
        let backend: &mut dyn MmuBackend = with_engine!(&mut self.engine, t => t as &mut dyn MmuBackend);
        let r = age::age(slots, backend, range, policy, &mut flush);
        self.pending.merge(flush);
        Some(r)
    }

    /// Zaps everything by generation: the engine switches to a fresh root (loaded into the
    /// vendor at once), then frees the obsolete tables in batches, folding their leaves'
    /// final D bits into the dirty logs. Returns (generation, tables freed, batches).
    pub fn zap_all(&mut self, vendor: &mut dyn Vendor) -> Result<(u64, usize, usize), NestedError> {
        let logs = &self.logs;
        let slots = &self.slots;
        {
            let mut tlb = VendorTlb(&mut *vendor);
            with_engine!(&mut self.engine, t => t.zap_all(&mut tlb, |leaf| fold_zapped(logs, slots, &leaf)));
        }
        vendor.set_nested_root(self.root_pointer());
        let (mut freed, mut batches) = (0, 0);
        loop {
            let r = with_engine!(&mut self.engine, t => t.reclaim_obsolete(RECLAIM_BATCH, |leaf| fold_zapped(logs, slots, &leaf)));
            freed += r.freed;
            batches += 1;
            if !r.remaining {
                break;
            }
        }
        let gen = with_engine!(&self.engine, t => t.generation()) as u64;
        Ok((gen, freed, batches))
    }

    /// The leaf mapping `gfn`, if any.
    pub fn leaf(&self, gfn: Gfn) -> Option<Leaf> {
        let slot = self.slots.lookup(gfn)?;
        let b = self.backend();
        let mut found = None;
        b.for_each_leaf(slot, GfnRange { start: gfn, end: Gfn(gfn.0 + 1) }, &mut |h| {
            if let Some(l) = b.leaf(h) {
                found = Some(l);
            }
        });
        found
    }
}

/// A zapped leaf's final state goes to its slot's dirty log (a D bit set since the last
/// round is the only record of that write).
fn fold_zapped(logs: &[Option<SlotDirtyLog>], slots: &Memslots, leaf: &Leaf) {
    if let Some(slot) = slots.lookup(leaf.gfn) {
        if let Some(log) = logs.get(slot.id().0 as usize).and_then(Option::as_ref) {
            log.note_zapped(leaf);
        }
    }
}
