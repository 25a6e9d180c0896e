//! The shadow MMU: the fault path, roots and CR3 switches, write protection
//! of guest tables, emulated guest-table writes, unsync pages and their
//! resync, zaps and zap-all by generation.
//!
//! The processor runs the guest on shadow tables: PAE tables for 32-bit and
//! PAE guests (as KVM does, so host frames above 4 GiB can be mapped), and
//! 4- or 5-level tables for 4- and 5-level guests, with CR0.WP = 1 and
//! EFER.NXE = 1 forced and the guest's CR4.SMEP, CR4.SMAP and EFLAGS.AC.
//! Every shadow leaf maps 4 KiB; a leaf grants what the guest's whole walk
//! grants, except write, which also needs the guest's D bit (so that the
//! first write faults and sets it), a memslot and host page that allow it,
//! and a target that is not a write-protected guest table. Non-leaf shadow
//! entries grant everything; the leaf decides.
//!
//! | file | what it does |
//! |---|---|
//! | `mmu.rs` | types, roots and CR3 loads, shadow pages, the processor's view |
//! | `mmu/fault.rs` | the fault path |
//! | `mmu/sync.rs` | emulated guest-table writes, unsync pages, INVLPG, TLB flush |
//! | `mmu/zap.rs` | host-range invalidation, zap-all by generation, memslot changes |
//!
//! `&mut self` stands for the MMU lock held for writing. TLB flushes the
//! changes need accumulate in a [`FlushToken`] taken by [`ShadowMmu::take_flush`];
//! the guest's TLB caches linear addresses, so an embedder flushes the
//! guest's whole TLB (its VPID or ASID) for any range the token names.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, GfnRange, Gpa, Gva, HvaRange, Pfn};
use mmu_generic::backend::{FlushToken, Leaf};
use mmu_generic::generation::{reclaim_obsolete, MmuGeneration, ReclaimReport, ZapReason};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, Memslots, SlotFlags, SlotHint, SlotId};
use mmu_generic::pte_list::{PteHandle, PteList, RmapError};
use mmu_generic::rmap::{Rmap, X86_LEVEL_SHIFTS};

use super::guest_walk::{walk_any, walk_any_into, FrameTables, GuestWalk, NotMemory, PhysMemory, WalkFault};
use super::mode::{
    AccessKind, AccessOp, Bits32, CpuFeatures, GuestCpu, GuestMode, Level4, Pae, PagingMode, PfErrorCode,
    PteAccess, A, D, P, RW, US, XD,
};
use super::page::{PageCache, PageIdx, Role, ShadowPage, SLOT_SHIFT};
use crate::format::ENTRIES;
use crate::frame::{FrameId, FrameMemory};
use crate::tdp::HostMemory;

mod fault;
mod roots;
mod sync;
mod zap;

/// Frame ids must fit a handle: `id × 512 + index < 2^32`.
const MAX_FRAMES: u32 = 1 << 23;
/// Emulated writes to a shadowed table, without a fault using it in
/// between, after which the shadow page is zapped (KVM's write flooding).
const FLOOD_LIMIT: u8 = 3;
/// Address bits of a shadow entry (MAXPHYADDR 52).
const SPTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why a shadow-MMU operation failed. Guest behaviour never causes one:
/// a guest's bad tables end in an injected fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShadowError {
    /// No frame for a shadow table (or more than 2^23 of them).
    OutOfFrames,
    /// The reverse map refused an update.
    Rmap(RmapError),
    /// The embedder could not resolve the host page behind a guest frame.
    HostFault(Gfn),
    /// An emulated write to guest-physical memory outside every memslot.
    NotGuestMemory(Gpa),
    /// No frame below 4 GiB for a PAE root, the only place a 32-bit CR3 can
    /// point ([`FrameMemory::alloc_zeroed_below`] found none).
    NoFrameBelow4G,
    /// The CPU state names a PAE root whose PDPTE registers were not loaded
    /// with [`super::guest_walk::load_pdptrs`] (a present one has reserved bits).
    BadPdptrs,
    /// A logged emulated write found the vCPU's dirty ring full: nothing was
    /// written; exit to the harvester and emulate again.
    DirtyRingFull(Gpa),
}

impl fmt::Display for ShadowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames => f.write_str("no frame left for a shadow table"),
            Self::Rmap(e) => write!(f, "reverse map: {e}"),
            Self::HostFault(g) => write!(f, "no host page behind guest frame {g}"),
            Self::NotGuestMemory(a) => write!(f, "guest-physical address {a} is outside every memslot"),
            Self::NoFrameBelow4G => f.write_str("no frame below 4 GiB for a PAE root"),
            Self::BadPdptrs => f.write_str("PDPTE registers with reserved bits"),
            Self::DirtyRingFull(a) => write!(f, "dirty ring full: the write to {a} was not logged"),
        }
    }
}

impl From<RmapError> for ShadowError {
    fn from(e: RmapError) -> Self {
        Self::Rmap(e)
    }
}

/// What a shadow page fault came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShadowFault {
    /// The shadow tables now allow the access: resume the guest.
    Fixed,
    /// Nothing was installed (an invalidation raced, the guest tables kept
    /// changing, the dirty ring is full): resume, the guest refaults.
    Retry,
    /// The guest's own tables deny the access: inject #PF with this error
    /// code (and CR2 = the address).
    InjectPf(PfErrorCode),
    /// A non-canonical address: inject #GP(0).
    InjectGp,
    /// Emulate the instruction: it writes a write-protected guest page
    /// table (then call [`ShadowMmu::emulated_write`]), or it is a
    /// supervisor write with CR0.WP = 0 and CR4.SMAP = 1 to a user page,
    /// which no shadow entry can express exactly.
    Emulate {
        /// Where the access goes.
        gpa: Gpa,
    },
    /// No memslot holds the address: an MMIO access.
    Mmio {
        /// Where the access goes.
        gpa: Gpa,
    },
    /// A write to a read-only memslot or a page the host keeps read-only.
    Denied {
        /// Where the access goes.
        gpa: Gpa,
    },
}

/// The embedder's dirty logging, as the fault path consults it.
pub trait DirtyTracker {
    /// Whether `slot` is logged by write protection: a read fault then maps
    /// read-only, so the first write faults and is logged.
    fn write_protected(&self, slot: SlotId) -> bool;
    /// Leaf `h` of `slot`, mapping `gfn`, is about to become writable.
    /// Returning `false` refuses (a full dirty ring): the fault retries.
    fn note_writable(&mut self, slot: SlotId, gfn: Gfn, h: PteHandle) -> bool;
    /// The hypervisor wrote `gfn` of `slot` itself (a guest A/D update, an
    /// emulated write): log it without chaining
    /// ([`mmu_generic::dirty_log::SlotDirtyLog::mark`]). Returning `false`
    /// (a full ring) makes the fault retry, the mark kept for the next fault.
    fn mark(&mut self, slot: SlotId, gfn: Gfn) -> bool;
}

/// No dirty logging.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDirtyLog;

impl DirtyTracker for NoDirtyLog {
    fn write_protected(&self, _: SlotId) -> bool {
        false
    }
    fn note_writable(&mut self, _: SlotId, _: Gfn, _: PteHandle) -> bool {
        true
    }
    fn mark(&mut self, _: SlotId, _: Gfn) -> bool {
        true
    }
}

/// Guest memory restricted to the memslots: what the walker may read.
#[derive(Clone, Copy, Debug)]
pub struct SlotMemory<'a, G: PhysMemory> {
    /// The memslots.
    pub slots: &'a Memslots,
    /// Guest RAM.
    pub mem: &'a G,
}

impl<G: PhysMemory> PhysMemory for SlotMemory<'_, G> {
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        self.slots.lookup(addr.gfn()).ok_or(NotMemory(addr))?;
        self.mem.read(addr, bytes)
    }

    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        let slot = self.slots.lookup(addr.gfn()).ok_or(NotMemory(addr))?;
        if slot.flags().contains(SlotFlags::READONLY) {
            // The guest cannot write a read-only slot, and neither can its
            // walker: the A/D update is skipped, as KVM skips it.
            return Ok(true);
        }
        self.mem.compare_exchange(addr, bytes, old, new)
    }
}

/// [`SlotMemory`] for one fault: the walk reads each level's table and
/// nearly always finds it in the slot of the level before, so the last
/// slot found is tried first (the same answers, without a lookup a level),
/// and the first lookup starts from the hint the last fault left.
struct HintedSlotMemory<'a, G: PhysMemory> {
    slots: &'a Memslots,
    mem: &'a G,
    hint: core::cell::Cell<SlotHint>,
    last: core::cell::Cell<Option<&'a Memslot>>,
}

impl<'a, G: PhysMemory> HintedSlotMemory<'a, G> {
    fn new(slots: &'a Memslots, mem: &'a G, hint: SlotHint) -> Self {
        Self { slots, mem, hint: core::cell::Cell::new(hint), last: core::cell::Cell::new(None) }
    }

    #[inline]
    fn lookup(&self, gfn: Gfn) -> Option<&'a Memslot> {
        match self.last.get() {
            Some(s) if s.contains(gfn) => Some(s),
            _ => self.lookup_slow(gfn),
        }
    }

    fn lookup_slow(&self, gfn: Gfn) -> Option<&'a Memslot> {
        let mut hint = self.hint.get();
        let slot = self.slots.lookup_hinted(gfn, &mut hint);
        self.hint.set(hint);
        if slot.is_some() {
            self.last.set(slot);
        }
        slot
    }
}

impl<G: PhysMemory> PhysMemory for HintedSlotMemory<'_, G> {
    #[inline]
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        self.lookup(addr.gfn()).ok_or(NotMemory(addr))?;
        self.mem.read(addr, bytes)
    }

    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        let slot = self.lookup(addr.gfn()).ok_or(NotMemory(addr))?;
        if slot.flags().contains(SlotFlags::READONLY) {
            // As in SlotMemory: no A/D update in a read-only slot.
            return Ok(true);
        }
        self.mem.compare_exchange(addr, bytes, old, new)
    }
}

/// Sizing of a shadow MMU.
#[derive(Clone, Copy, Debug)]
pub struct ShadowConfig {
    /// The processor's features.
    pub features: CpuFeatures,
    /// Shadow pages kept at most; older ones are zapped to make room
    /// (KVM's `n_max_mmu_pages`). At least 16.
    pub max_pages: usize,
    /// Roots cached besides the current one, for fast CR3 switches.
    pub cached_roots: usize,
}

impl ShadowConfig {
    /// `features`, 4096 pages, 3 cached roots (KVM's `KVM_MMU_NUM_PREV_ROOTS`).
    pub fn new(features: CpuFeatures) -> Self {
        Self { features, max_pages: 4096, cached_roots: 3 }
    }
}

/// Counters, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Page faults handled.
    pub faults: u64,
    /// Leaves installed.
    pub leaves_installed: u64,
    /// Shadow pages created.
    pub pages_created: u64,
    /// Shadow pages zapped.
    pub pages_zapped: u64,
    /// Of which as obsolete (generation reclaim).
    pub obsolete_zapped: u64,
    /// Pages made unsync.
    pub unsynced: u64,
    /// Pages resynced.
    pub synced: u64,
    /// Emulated guest-table writes.
    pub emulated_writes: u64,
    /// Pages zapped for write flooding or misaligned writes.
    pub flood_zaps: u64,
    /// Root switches served from the cache.
    pub root_hits: u64,
    /// Unsync pages synced because a new link found them.
    pub relinked_unsync: u64,
    /// Leaves those syncs dropped: translations the guest had changed that
    /// the new link would have made reachable again.
    pub relink_dropped: u64,
}

/// Memory the shadow tables take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowMemory {
    /// Live shadow pages.
    pub pages: usize,
    /// Bytes of shadow-table frames (4 KiB each, PAE roots included).
    pub table_bytes: usize,
    /// Bytes of per-page bookkeeping (page records, leaf-gfn arrays, hash and frame index).
    pub meta_bytes: usize,
    /// Bytes of parent-list descriptors in use.
    pub parent_list_bytes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct RootKey {
    /// The root table's address (not PAE).
    cr3: u64,
    /// The PDPTE registers (PAE).
    pdptrs: [u64; 4],
    role: Role,
}

#[derive(Clone, Copy, Debug)]
enum RootKind {
    /// A 4- or 5-level root: one shadow page.
    Page(PageIdx),
    /// A PAE root: a frame of four PDPTEs pointing to shadow page directories.
    Pae { frame: FrameId, pds: [Option<PageIdx>; 4] },
}

#[derive(Clone, Copy, Debug)]
struct Root {
    key: RootKey,
    kind: RootKind,
    generation: u64,
    /// The CPU state the root last served, whose key is `key`: a fault
    /// with the same state needs no key built and compared.
    cpu: GuestCpu,
}

/// The shadow-paging MMU of one guest address-space family.
pub struct ShadowMmu<M: FrameMemory, G: PhysMemory, H: HostMemory> {
    mem: M,
    guest: G,
    host: H,
    slots: Memslots,
    rmap: Rmap,
    cache: PageCache,
    generation: MmuGeneration,
    invalidation: InvalidationSeq,
    config: ShadowConfig,
    /// The current root first, then the cached roots.
    roots: roots::RootCache,
    /// A page held by a root went invalid since the roots were last checked.
    stale_roots: bool,
    /// Pages that are (or were) unsync; stale indices are skipped.
    unsync: Vec<PageIdx>,
    /// Guest table pages a walk's A/D update wrote whose mark the dirty
    /// tracker refused (a full ring): marked first at the next fault.
    pending_marks: [Option<(SlotId, Gfn)>; 5],
    /// Some of `pending_marks` is set.
    marks_pending: bool,
    flush: FlushToken,
    /// The memslot the last fault's lookups ended on (a vCPU's
    /// `SlotHint`; one MMU serves one vCPU's faults at a time).
    slot_hint: SlotHint,
    /// Dirty leaves dropped by internal zaps, for the embedder's dirty log.
    zapped_dirty: Vec<(SlotId, Leaf)>,
    track_zapped_dirty: bool,
    /// Dirty-bit logs running ([`mmu_generic::backend::MmuBackend::track_lost_dirty`]).
    lost_dirty_logs: u32,
    stats: ShadowStats,
}

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> fmt::Debug for ShadowMmu<M, G, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowMmu")
            .field("pages", &self.cache.len())
            .field("roots", &self.roots.len())
            .field("stats", &self.stats)
            .finish()
    }
}

#[inline]
fn handle(frame: FrameId, idx: usize) -> PteHandle {
    PteHandle(frame.0 * ENTRIES as u32 + idx as u32)
}

#[inline]
fn unhandle(h: PteHandle) -> (FrameId, usize) {
    (FrameId(h.0 / ENTRIES as u32), (h.0 % ENTRIES as u32) as usize)
}

/// The index into a shadow table of `level` (9 bits a level).
#[inline]
fn hw_index(gva: u64, level: u8) -> usize {
    ((gva >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

fn reserved_any(mode: GuestMode, e: u64, level: u8, cpu: &GuestCpu, feat: &CpuFeatures) -> bool {
    match mode {
        GuestMode::Bits32 => Bits32::is_reserved(e, level, cpu, feat),
        GuestMode::Pae => Pae::is_reserved(e, level, cpu, feat),
        GuestMode::Four | GuestMode::Five => Level4::is_reserved(e, level, cpu, feat),
    }
}

fn leaf_addr_any(mode: GuestMode, e: u64, feat: &CpuFeatures) -> u64 {
    match mode {
        GuestMode::Bits32 => Bits32::page_addr(e, 1, feat),
        _ => Level4::page_addr(e, 1, feat),
    }
}

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> ShadowMmu<M, G, H> {
    /// An MMU with no roots over `slots`, building shadow tables in `mem`,
    /// reading guest tables from `guest` and resolving guest memory through `host`.
    pub fn new(config: ShadowConfig, mem: M, guest: G, host: H, slots: Memslots) -> Self {
        let mut rmap = Rmap::new(X86_LEVEL_SHIFTS);
        rmap.sync_slots(&slots);
        Self {
            mem,
            guest,
            host,
            slots,
            rmap,
            cache: PageCache::new(),
            generation: MmuGeneration::new(),
            invalidation: InvalidationSeq::new(),
            config: ShadowConfig { max_pages: config.max_pages.max(16), ..config },
            roots: roots::RootCache::default(),
            stale_roots: false,
            unsync: Vec::new(),
            pending_marks: [None; 5],
            marks_pending: false,
            flush: FlushToken::new(),
            slot_hint: SlotHint::default(),
            zapped_dirty: Vec::new(),
            track_zapped_dirty: false,
            lost_dirty_logs: 0,
            stats: ShadowStats::default(),
        }
    }

    /// The frame memory holding the shadow tables.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Guest RAM.
    pub fn guest(&self) -> &G {
        &self.guest
    }

    /// The embedder's host memory.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The memslots.
    pub fn memslots(&self) -> &Memslots {
        &self.slots
    }

    /// The processor's features.
    pub fn features(&self) -> &CpuFeatures {
        &self.config.features
    }

    /// The reverse map of shadow leaves.
    pub fn rmap(&self) -> &Rmap {
        &self.rmap
    }

    /// Counters.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// The invalidation sequence MMU notifiers bump.
    pub fn invalidation(&self) -> &InvalidationSeq {
        &self.invalidation
    }

    /// The TLB flush the changes so far need; flush before resuming the guest.
    pub fn take_flush(&mut self) -> FlushToken {
        core::mem::take(&mut self.flush)
    }

    /// Starts or stops recording the dirty leaves the MMU's own zaps drop
    /// (off by default). mmu-generic's `SlotDirtyLog::start` under dirty-bit
    /// tracking turns it on through [`mmu_generic::backend::MmuBackend::track_lost_dirty`], and its
    /// drivers drain the record every round ([`mmu_generic::backend::MmuBackend::drain_lost_dirty`]).
    pub fn set_track_zapped_dirty(&mut self, on: bool) {
        self.track_zapped_dirty = on;
        if !on {
            self.zapped_dirty.clear();
        }
    }

    /// Dirty leaves dropped by the MMU's own zaps (sync, emulated writes,
    /// eviction) while recording is on: under dirty-bit logging, fold them
    /// into the log ([`mmu_generic::dirty_log::SlotDirtyLog::note_zapped`]).
    pub fn take_zapped_dirty(&mut self) -> Vec<(SlotId, Leaf)> {
        core::mem::take(&mut self.zapped_dirty)
    }

    /// The core's side of [`ShadowMmu::take_zapped_dirty`]
    /// ([`mmu_generic::backend::MmuBackend::drain_lost_dirty`]): reports the recorded dirty leaves
    /// that overlap `gfns` and keeps the others, and what lies outside `gfns`,
    /// for the log that covers them.
    pub(crate) fn drain_zapped_dirty(&mut self, gfns: GfnRange, f: &mut dyn FnMut(GfnRange)) {
        self.zapped_dirty.retain(|(_, leaf)| match leaf.gfns().intersect(&gfns) {
            Some(mine) => {
                f(mine);
                leaf.gfn < gfns.start || leaf.gfns().end > gfns.end
            }
            None => true,
        });
    }

    /// Counts the dirty-bit logs ([`mmu_generic::backend::MmuBackend::track_lost_dirty`]): the
    /// first turns recording of zapped dirty leaves on, the last one's stop
    /// turns it off.
    pub(crate) fn count_lost_dirty_log(&mut self, on: bool) {
        if on {
            self.lost_dirty_logs += 1;
            self.set_track_zapped_dirty(true);
        } else if self.lost_dirty_logs > 0 {
            self.lost_dirty_logs -= 1;
            if self.lost_dirty_logs == 0 {
                self.set_track_zapped_dirty(false);
            }
        }
    }

    /// Memory the shadow tables take, parent lists included.
    pub fn memory_use(&self) -> ShadowMemory {
        let mut m = ShadowMemory { pages: self.cache.len(), ..Default::default() };
        for &i in &self.cache.active {
            m.meta_bytes += self.cache.meta_bytes(i);
        }
        m.table_bytes = self.mem.frames_in_use() * 4096;
        m.parent_list_bytes = self.cache.pool.bytes_in_use();
        m
    }

    /// Shadow pages alive.
    pub fn pages(&self) -> usize {
        self.cache.len()
    }

    /// Unsync pages.
    pub fn unsync_pages(&self) -> usize {
        self.unsync_live().count()
    }

    fn unsync_live(&self) -> impl Iterator<Item = PageIdx> {
        let gen = self.generation.current();
        // The list may hold a page twice (made unsync, synced, unsync
        // again) or a stale index: keep each live unsync page once.
        let mut pages: Vec<PageIdx> = self
            .unsync
            .iter()
            .copied()
            .filter(|&i| {
                self.cache.is_live(i) && self.cache.get(i).unsync && self.cache.get(i).generation == gen
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages.into_iter()
    }

    /// Whether guest frame `gfn` is a write-protected guest table: a write
    /// to it through any shadow entry faults and must be emulated.
    pub fn is_write_tracked(&self, gfn: Gfn) -> bool {
        let gen = self.generation.current();
        self.cache.of_gfn(gfn).any(|i| {
            let p = self.cache.get(i);
            !p.role.direct && !p.unsync && p.generation == gen && !p.invalid
        })
    }

    // ----- the processor's view -----

    /// The host frame the processor's CR3 holds for the current root.
    pub fn root_hpa(&self) -> Option<Pfn> {
        let root = self.roots.first()?;
        Some(match root.kind {
            RootKind::Page(i) => self.mem.pfn(self.cache.get(i).frame),
            RootKind::Pae { frame, .. } => self.mem.pfn(frame),
        })
    }

    /// The paging state the processor runs the guest with: the shadow
    /// root, PAE for 32-bit and PAE guests, CR0.WP and EFER.NXE forced, the
    /// guest's SMEP, SMAP and EFLAGS.AC. `None` before the first CR3 load.
    pub fn hw_cpu(&self, cpu: &GuestCpu) -> Option<GuestCpu> {
        let root = self.roots.first()?;
        let mode = match cpu.mode {
            GuestMode::Bits32 | GuestMode::Pae => GuestMode::Pae,
            m => m,
        };
        let mut hw = GuestCpu {
            mode,
            cr3: self.root_hpa()?.0 << 12,
            pdptrs: [0; 4],
            cr0_wp: true,
            cr4_pse: false,
            cr4_smep: cpu.cr4_smep,
            cr4_smap: cpu.cr4_smap,
            efer_nxe: true,
            eflags_ac: cpu.eflags_ac,
        };
        if let RootKind::Pae { frame, .. } = root.kind {
            // The processor loads its PDPTE registers from the PAE root.
            let t = self.mem.table(frame);
            for (q, r) in hw.pdptrs.iter_mut().enumerate() {
                *r = t[q].load(Ordering::Acquire);
            }
        }
        Some(hw)
    }

    /// The processor's access through the shadow tables (the software
    /// walker playing the CPU): the translation with A/D set in the shadow
    /// entries, or the fault it takes.
    pub fn hw_access(&self, cpu: &GuestCpu, gva: Gva, access: AccessKind) -> Result<GuestWalk, WalkFault> {
        let hw = self.hw_cpu(cpu).ok_or(WalkFault::PageFault {
            code: PfErrorCode::for_access(cpu, access, false, false),
            level: 0,
        })?;
        let gva = if cpu.mode == GuestMode::Bits32 || cpu.mode == GuestMode::Pae {
            Gva(gva.0 & 0xffff_ffff)
        } else {
            gva
        };
        let feat = CpuFeatures { phys_width: crate::format::PhysAddrWidth::MAX, ..self.config.features };
        walk_any(&FrameTables(&self.mem), &hw, &feat, gva, access, true)
    }

    // ----- roots -----

    fn root_key(&self, cpu: &GuestCpu) -> RootKey {
        let feat = &self.config.features;
        let (level, cr3, pdptrs) = match cpu.mode {
            GuestMode::Bits32 => (2, Bits32::root_addr(cpu.cr3, feat), [0; 4]),
            GuestMode::Pae => (2, 0, cpu.pdptrs),
            GuestMode::Four => (4, Level4::root_addr(cpu.cr3, feat), [0; 4]),
            GuestMode::Five => (5, Level4::root_addr(cpu.cr3, feat), [0; 4]),
        };
        RootKey { cr3, pdptrs, role: Role::for_cpu(cpu, level, false, PteAccess::all(), 0) }
    }

    fn root_valid(&self, root: &Root) -> bool {
        if root.generation != self.generation.current() {
            return false;
        }
        // Root pages go invalid only in zap_page, which raises stale_roots
        // until switch_root has dropped every such root.
        if !self.stale_roots {
            return true;
        }
        match root.kind {
            RootKind::Page(i) => !self.cache.get(i).invalid,
            RootKind::Pae { pds, .. } => pds.iter().flatten().all(|&i| !self.cache.get(i).invalid),
        }
    }

    /// A MOV to CR3 (or a paging-control change): switches to the root for
    /// `cpu`, from the cache when it holds one, and resyncs unsync pages (the
    /// load flushes the guest's TLB). Returns the root the processor loads.
    pub fn load_cr3(&mut self, cpu: &GuestCpu) -> Result<Pfn, ShadowError> {
        self.switch_root(cpu)?;
        self.sync_all();
        self.flush.add_all();
        Ok(self.root_hpa().expect("a root was just loaded"))
    }

    /// A fault under paging state the current root does not serve (a CR3
    /// the embedder did not load): the switch a load would make, with its
    /// resync, so a cached root brings back no leaf the guest changed
    /// before the CR3 write that flushed it.
    #[cold]
    fn switch_root_synced(&mut self, cpu: &GuestCpu) -> Result<(), ShadowError> {
        self.switch_root(cpu)?;
        self.sync_all();
        Ok(())
    }

    fn switch_root(&mut self, cpu: &GuestCpu) -> Result<(), ShadowError> {
        let key = self.root_key(cpu);
        // Drop roots that went obsolete or invalid, most recent first. Roots
        // only go invalid when a page they hold does (zap-all takes them
        // all), so without such a zap there is nothing to look for.
        if self.stale_roots {
            for gone in self.roots.rejected(|r| self.root_valid(r)) {
                let pos = self.roots.find(&gone).expect("a held root");
                let r = self.roots.remove(pos);
                self.release_root(r);
            }
            self.stale_roots = false;
        }
        if let Some(pos) = self.roots.find(&key) {
            self.roots.promote(pos);
            self.roots.set_current_cpu(*cpu);
            self.stats.root_hits += 1;
            return Ok(());
        }
        self.make_room();
        let root = self.build_root(cpu, key)?;
        self.roots.push_current(root);
        while self.roots.len() > self.config.cached_roots + 1 {
            let pos = self.roots.least_recent().expect("more roots than the cache holds");
            let r = self.roots.remove(pos);
            self.release_root(r);
        }
        Ok(())
    }

    fn build_root(&mut self, cpu: &GuestCpu, key: RootKey) -> Result<Root, ShadowError> {
        let gen = self.generation.current();
        let feat = self.config.features;
        let kind = match cpu.mode {
            GuestMode::Four | GuestMode::Five => {
                let i = self.get_page(Gpa(key.cr3).gfn(), key.role)?;
                self.cache.get_mut(i).root_count += 1;
                RootKind::Page(i)
            }
            GuestMode::Bits32 | GuestMode::Pae => {
                if cpu.mode == GuestMode::Pae
                    && key.pdptrs.iter().any(|&e| e & P != 0 && super::mode::pdpte_reserved(e, &feat))
                {
                    return Err(ShadowError::BadPdptrs);
                }
                // A 32-bit CR3 holds a physical address below 4 GiB.
                let frame =
                    self.mem.alloc_zeroed_below(Pfn(1 << 20)).map_err(|_| ShadowError::NoFrameBelow4G)?;
                if frame.0 >= MAX_FRAMES {
                    self.mem.free(frame);
                    return Err(ShadowError::OutOfFrames);
                }
                let mut pds = [None; 4];
                for q in 0..4 {
                    let (gfn, role) = if cpu.mode == GuestMode::Bits32 {
                        (Gpa(key.cr3).gfn(), Role { quadrant: q as u8, ..key.role })
                    } else {
                        let e = key.pdptrs[q];
                        if e & P == 0 {
                            continue;
                        }
                        (Gpa(Pae::table_addr(e, &feat)).gfn(), key.role)
                    };
                    let i = match self.get_page(gfn, role) {
                        Ok(i) => i,
                        Err(e) => {
                            let partial =
                                Root { key, kind: RootKind::Pae { frame, pds }, generation: gen, cpu: *cpu };
                            self.release_root(partial);
                            return Err(e);
                        }
                    };
                    self.cache.get_mut(i).root_count += 1;
                    pds[q] = Some(i);
                    let pfn = self.mem.pfn(self.cache.get(i).frame);
                    // A PDPTE has only P, PWT, PCD and the address (SDM Table 4-8).
                    self.mem.table(frame)[q].store((pfn.0 << 12) | P, Ordering::Release);
                }
                RootKind::Pae { frame, pds }
            }
        };
        Ok(Root { key, kind, generation: gen, cpu: *cpu })
    }

    fn release_root(&mut self, root: Root) {
        let pages: Vec<PageIdx> = match root.kind {
            RootKind::Page(i) => alloc::vec![i],
            RootKind::Pae { frame, pds } => {
                self.mem.free(frame);
                pds.iter().flatten().copied().collect()
            }
        };
        for i in pages {
            let p = self.cache.get_mut(i);
            p.root_count -= 1;
            if p.root_count == 0 && p.invalid {
                self.free_page(i);
            }
        }
        self.flush.add_all();
    }

    #[inline]
    fn ensure_root(&mut self, cpu: &GuestCpu) -> Result<(), ShadowError> {
        let gen = self.generation.current();
        // root_valid's answer without a call while no root page went invalid.
        let Some(r) =
            self.roots.first().filter(|r| r.generation == gen && (!self.stale_roots || self.root_valid(r)))
        else {
            return self.switch_root_synced(cpu);
        };
        // The state the root last served: its fields compared as they are,
        // where the key needs a role built from them first.
        if r.cpu == *cpu {
            return Ok(());
        }
        if r.key != self.root_key(cpu) {
            return self.switch_root_synced(cpu);
        }
        self.roots.set_current_cpu(*cpu);
        Ok(())
    }

    // ----- pages -----

    fn alloc_frame(&mut self) -> Result<FrameId, ShadowError> {
        let f = self.mem.alloc_zeroed().map_err(|_| ShadowError::OutOfFrames)?;
        if f.0 >= MAX_FRAMES {
            self.mem.free(f);
            return Err(ShadowError::OutOfFrames);
        }
        Ok(f)
    }

    /// The page of (`gfn`, `role`) in the current generation, made if needed.
    /// A new page of a guest table write-protects the table.
    fn get_page(&mut self, gfn: Gfn, role: Role) -> Result<PageIdx, ShadowError> {
        let gen = self.generation.current();
        if let Some(i) = self.cache.find(gfn, &role, gen) {
            // An unsync page may hold leaves whose guest entries changed
            // while no flush could reach them (the guest unlinked the table,
            // rewrote it, INVLPGed through a path that no longer leads here,
            // and links it again: Linux reusing a freed page table). The new
            // link must not make those leaves reachable: sync it first, as
            // KVM's `kvm_mmu_find_shadow_page` does.
            if self.cache.get(i).unsync {
                let frame = self.cache.get(i).frame;
                let present = |mmu: &Self| {
                    mmu.mem.table(frame).iter().filter(|e| e.load(Ordering::Relaxed) & P != 0).count() as u64
                };
                let before = present(self);
                self.sync_page(i);
                self.stats.relinked_unsync += 1;
                self.stats.relink_dropped += before - present(self);
            }
            return Ok(i);
        }
        if !role.direct {
            // The table becomes write-protected: its unsync shadows would no
            // longer see the guest's writes. Zapping is cheaper than syncing.
            let stale: Vec<PageIdx> = self
                .cache
                .of_gfn(gfn)
                .filter(|&i| {
                    let p = self.cache.get(i);
                    p.unsync && p.generation == gen
                })
                .collect();
            for i in stale {
                self.zap_page(i, ZapReason::Range);
            }
        }
        let frame = self.alloc_frame()?;
        let page = ShadowPage {
            gfn,
            role,
            frame,
            parents: PteList::EMPTY,
            generation: gen,
            unsync: false,
            invalid: false,
            root_count: 0,
            write_flood: 0,
            hash_next: 0,
            active_pos: 0,
            leaf_gfns: (role.level == 1 && !role.direct).then(|| alloc::boxed::Box::new([0u64; ENTRIES])),
        };
        let i = self.cache.insert(page);
        self.stats.pages_created += 1;
        if !role.direct {
            self.write_protect_gfn(gfn);
        }
        Ok(i)
    }

    /// Clears write permission in every shadow leaf mapping `gfn`.
    fn write_protect_gfn(&mut self, gfn: Gfn) {
        let Some(slot) = self.slots.lookup(gfn).map(|s| s.id()) else { return };
        let leaves: Vec<PteHandle> = self.rmap.list(slot, gfn, 0).collect();
        for h in leaves {
            let (frame, j) = unhandle(h);
            let old = self.mem.table(frame)[j].fetch_and(!RW, Ordering::AcqRel);
            if old & RW != 0 {
                self.flush.add_all();
                self.took_write(frame, j, slot, gfn, old);
            }
        }
    }

    /// The MMU itself took write permission from the leaf at (`frame`, `j`),
    /// which was `old`. A dirty-bit log chains writable leaves only, so a D
    /// bit left in a read-only leaf would never be harvested: while dirty
    /// leaves are tracked, move it to [`ShadowMmu::take_zapped_dirty`] as a
    /// zap would (clearing it, so it is reported once).
    pub(super) fn took_write(&mut self, frame: FrameId, j: usize, slot: SlotId, gfn: Gfn, old: u64) {
        if !self.track_zapped_dirty || old & D == 0 {
            return;
        }
        let was = self.mem.table(frame)[j].fetch_and(!D, Ordering::AcqRel);
        let leaf =
            Leaf { gfn, npages: 1, writable: true, young: was & A != 0, dirty: true, access_tracked: false };
        self.zapped_dirty.push((slot, leaf));
    }

    /// Zaps old pages until a fault's worth of new ones fits.
    fn make_room(&mut self) {
        let mut k = 0;
        while self.cache.len() + 6 > self.config.max_pages && k < self.cache.active.len() {
            let i = self.cache.active[k];
            if self.cache.get(i).root_count == 0 {
                self.zap_page(i, ZapReason::Range);
            } else {
                k += 1;
            }
        }
    }

    /// Drops the leaf at (`frame`, `j`): clears it and its reverse-map entry.
    fn drop_leaf(&mut self, page: PageIdx, j: usize) -> Option<Leaf> {
        let frame = self.cache.get(page).frame;
        let old = self.mem.table(frame)[j].swap(0, Ordering::AcqRel);
        if old & P == 0 {
            return None;
        }
        let word = self.leaf_word(page, j);
        let gfn = Gfn(word & ((1 << SLOT_SHIFT) - 1));
        let slot = SlotId((word >> SLOT_SHIFT) as u16);
        let _ = self.rmap.remove(slot, gfn, 0, handle(frame, j));
        self.flush.add_all();
        let leaf = Leaf {
            gfn,
            npages: 1,
            writable: old & RW != 0,
            young: old & A != 0,
            dirty: old & D != 0,
            access_tracked: false,
        };
        if leaf.dirty && self.track_zapped_dirty {
            self.zapped_dirty.push((slot, leaf));
        }
        Some(leaf)
    }

    /// The frame and page a present non-leaf shadow entry `e` links to
    /// (every link the MMU writes names one of its pages' frames).
    #[inline]
    fn child_of(&self, e: u64) -> Option<(FrameId, PageIdx)> {
        let f = self.mem.frame_of(Pfn((e & SPTE_ADDR) >> 12))?;
        Some((f, self.cache.of_frame(f)?))
    }

    /// Clears the non-leaf entry `j` of `page` and unlinks the child.
    fn drop_link(&mut self, page: PageIdx, j: usize) {
        let frame = self.cache.get(page).frame;
        let old = self.mem.table(frame)[j].swap(0, Ordering::AcqRel);
        if old & P == 0 {
            return;
        }
        self.flush.add_all();
        let child = self.mem.frame_of(Pfn((old & SPTE_ADDR) >> 12)).and_then(|f| self.cache.of_frame(f));
        if let Some(c) = child {
            let mut parents = self.cache.get(c).parents;
            let _ = self.cache.pool.remove(&mut parents, handle(frame, j));
            self.cache.get_mut(c).parents = parents;
        }
    }

    /// Zaps a page: its parents stop pointing to it, its entries go, and it
    /// leaves the hash. Obsolete pages are zapped the same way: nothing is
    /// synced, unsync children included (they are obsolete too and go in
    /// the same reclaim).
    fn zap_page(&mut self, i: PageIdx, reason: ZapReason) {
        let mut parents = core::mem::take(&mut self.cache.get_mut(i).parents);
        let mem = &self.mem;
        self.cache.pool.drain(&mut parents, |h| {
            let (f, j) = unhandle(h);
            mem.table(f)[j].store(0, Ordering::Release);
        });
        let level = self.cache.get(i).role.level;
        for j in 0..ENTRIES {
            if level == 1 {
                self.drop_leaf(i, j);
            } else {
                self.drop_link(i, j);
            }
        }
        let p = self.cache.get_mut(i);
        p.unsync = false;
        self.stats.pages_zapped += 1;
        if reason == ZapReason::Obsolete {
            self.stats.obsolete_zapped += 1;
        }
        self.flush.add_all();
        if p.invalid {
            return;
        }
        self.cache.unhash(i);
        if self.cache.get(i).root_count > 0 {
            // Still a root: keep the (empty) table until the root goes.
            self.cache.get_mut(i).invalid = true;
            self.stale_roots = true;
        } else {
            self.free_page(i);
        }
    }

    fn free_page(&mut self, i: PageIdx) {
        let frame = self.cache.remove(i);
        self.mem.free(frame);
    }

    /// Calls `f(gfn, pfn, writable)` for every present shadow leaf.
    pub fn for_each_mapping(&self, mut f: impl FnMut(Gfn, Pfn, bool)) {
        for &i in &self.cache.active {
            let p = self.cache.get(i);
            if p.role.level != 1 {
                continue;
            }
            for (j, e) in self.mem.table(p.frame).iter().enumerate() {
                let e = e.load(Ordering::Acquire);
                if e & P != 0 {
                    let gfn = Gfn(self.leaf_word(i, j) & ((1 << SLOT_SHIFT) - 1));
                    f(gfn, Pfn((e & SPTE_ADDR) >> 12), e & RW != 0);
                }
            }
        }
    }

    /// The (slot << 48 | gfn) leaf `j` of leaf page `i` maps: recorded for
    /// pages shadowing a guest table, implied for direct pages.
    fn leaf_word(&self, i: PageIdx, j: usize) -> u64 {
        let p = self.cache.get(i);
        match p.leaf_gfns.as_ref() {
            Some(g) => g[j],
            None => {
                let gfn = p.gfn.0 + j as u64;
                let slot = self.slots.lookup(Gfn(gfn)).map_or(0, |s| s.id().0);
                (u64::from(slot) << SLOT_SHIFT) | gfn
            }
        }
    }

    // ----- for the back end -----

    /// The leaf page and index a handle names, if it is a leaf page's.
    pub(crate) fn leaf_at(&self, h: PteHandle) -> Option<(PageIdx, usize)> {
        let (frame, j) = unhandle(h);
        let i = self.cache.of_frame(frame)?;
        (self.cache.get(i).role.level == 1).then_some((i, j))
    }

    pub(crate) fn entry(&self, i: PageIdx, j: usize) -> &core::sync::atomic::AtomicU64 {
        &self.mem.table(self.cache.get(i).frame)[j]
    }

    pub(crate) fn leaf_gfn(&self, i: PageIdx, j: usize) -> Gfn {
        let w = self.leaf_word(i, j);
        Gfn(w & ((1 << SLOT_SHIFT) - 1))
    }

    pub(crate) fn rmap_for_each(&self, slot: SlotId, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        self.rmap.for_each_in(slot, gfns, |_, h| f(h));
    }
}
