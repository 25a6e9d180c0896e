//! One page-table walker for every paging mode (SDM Vol. 3A §4.3 to §4.8),
//! generic over [`PagingMode`] and over the memory the tables live in.
//!
//! It walks the guest's own tables (in guest memory, [`PhysMemory`]), and,
//! instantiated for PAE, 4-level or 5-level paging over [`FrameTables`], the
//! shadow tables as the processor does: host tests use it to play the CPU.
//!
//! At each level the entry must be present and free of reserved bits; the
//! access rights are combined over the walk and checked against the access
//! at the end ([`permits`]); a fault yields the exact error code. On success
//! the walker sets A in every entry used and D in the leaf of a write, each
//! with a compare-exchange that restarts the walk if the entry changed (the
//! processor's locked update). A faulting walk sets no bit, as KVM's walker.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, Gpa, Gva};

use super::mode::{
    pdpte_reserved, permits, AccessKind, AccessOp, Bits32, CpuFeatures, GuestCpu, GuestMode, Level4, Level5,
    Pae, PagingMode, PfErrorCode, PteAccess, A, D, P, PS,
};
use crate::frame::FrameMemory;

/// The physical address is not memory the tables can live in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NotMemory(pub Gpa);

/// Memory that page tables are read from: guest RAM for guest tables, the
/// frame memory for shadow tables. Entries are read and updated as values
/// of the little-endian layout the processor sees, whatever the host's byte
/// order.
pub trait PhysMemory {
    /// The naturally aligned `bytes`-wide (4 or 8) value at `addr`.
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory>;

    /// Replaces the naturally aligned `bytes`-wide value at `addr` with `new`
    /// if it equals `old`; returns whether it did.
    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory>;
}

/// A shared reference to memory is that memory: several MMUs (or an MMU and
/// the test driving it) can work on one guest RAM that outlives them.
impl<T: PhysMemory + ?Sized> PhysMemory for &T {
    #[inline]
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        (**self).read(addr, bytes)
    }

    #[inline]
    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        (**self).compare_exchange(addr, bytes, old, new)
    }
}

/// Reads a `bytes`-wide little-endian field out of a 64-bit word.
#[inline]
pub(crate) fn field(word: u64, addr: u64, bytes: u64) -> u64 {
    if bytes == 8 {
        word
    } else {
        (word >> ((addr & 7) * 8)) & ((1u64 << (bytes * 8)) - 1)
    }
}

/// Compare-exchanges a `bytes`-wide field of an atomic word.
#[inline]
pub(crate) fn cas_field(
    word: &core::sync::atomic::AtomicU64,
    addr: u64,
    bytes: u64,
    old: u64,
    new: u64,
) -> bool {
    if bytes == 8 {
        return word.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire).is_ok();
    }
    let shift = (addr & 7) * 8;
    let mask = ((1u64 << (bytes * 8)) - 1) << shift;
    let mut cur = word.load(Ordering::Acquire);
    loop {
        if (cur & mask) >> shift != old {
            return false;
        }
        let next = (cur & !mask) | ((new << shift) & mask);
        match word.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(v) => cur = v,
        }
    }
}

/// Shadow tables in frame memory, seen as physical memory at their host
/// frames (what the processor walks).
#[derive(Clone, Copy, Debug)]
pub struct FrameTables<'a, M: FrameMemory>(pub &'a M);

impl<M: FrameMemory> PhysMemory for FrameTables<'_, M> {
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        let frame = self.0.frame_of(mmu_generic::addr::Pfn(addr.0 >> 12)).ok_or(NotMemory(addr))?;
        let word = self.0.table(frame)[(addr.0 as usize & 0xfff) / 8].load(Ordering::Acquire);
        Ok(field(word, addr.0, bytes))
    }

    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        let frame = self.0.frame_of(mmu_generic::addr::Pfn(addr.0 >> 12)).ok_or(NotMemory(addr))?;
        Ok(cas_field(&self.0.table(frame)[(addr.0 as usize & 0xfff) / 8], addr.0, bytes, old, new))
    }
}

/// One level of a walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct WalkStep {
    /// The table's guest frame.
    pub table_gfn: Gfn,
    /// Where the entry is (for PAE level 3: the PDPT in CR3; the entry
    /// itself comes from the PDPTE register).
    pub entry_addr: Gpa,
    /// The entry as used (after A/D updates of a successful walk).
    pub entry: u64,
    /// What the entries above this level permit together.
    pub access_above: PteAccess,
}

/// A successful walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestWalk {
    /// The mode walked.
    pub mode: GuestMode,
    /// The translated physical address.
    pub gpa: Gpa,
    /// Level of the leaf (1, or 2 and 3 for large pages).
    pub leaf_level: u8,
    /// log2 of the page size (12, 21, 22 or 30).
    pub page_shift: u32,
    /// What the translation permits.
    pub access: PteAccess,
    /// The leaf's D bit after the walk.
    pub dirty: bool,
    /// Steps by level (index `level - 1`), valid from the root level down
    /// to `leaf_level`.
    pub steps: [WalkStep; 5],
    /// Levels whose entry this walk's A/D update wrote (bit `level - 1`):
    /// the hypervisor wrote those guest table pages, and a dirty log must
    /// hear of it.
    pub ad_written: u8,
}

impl GuestWalk {
    /// A walk of nothing yet, for [`walk_into`] to fill.
    pub(crate) const fn empty(mode: GuestMode) -> Self {
        const STEP: WalkStep =
            WalkStep { table_gfn: Gfn(0), entry_addr: Gpa(0), entry: 0, access_above: PteAccess::empty() };
        GuestWalk {
            mode,
            gpa: Gpa(0),
            leaf_level: 0,
            page_shift: 0,
            access: PteAccess::empty(),
            dirty: false,
            steps: [STEP; 5],
            ad_written: 0,
        }
    }

    /// The first physical address of the page the leaf maps.
    pub fn page_base(&self) -> Gpa {
        Gpa(self.gpa.0 & !((1u64 << self.page_shift) - 1))
    }
}

/// Why a walk did not translate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalkFault {
    /// A page fault with this error code: a not-present entry at `level`,
    /// a reserved bit at `level`, or access rights (`level` 0).
    PageFault {
        /// The error code.
        code: PfErrorCode,
        /// Level of the offending entry (0 for an access-rights fault).
        level: u8,
    },
    /// A table lies outside memory (a guest table outside every memslot).
    /// KVM reports it to the guest as a not-present page fault, which
    /// [`WalkFault::error_code`] gives.
    TableNotInMemory {
        /// Where the walker tried to read.
        addr: Gpa,
        /// The level of the table.
        level: u8,
        /// The error code to inject.
        code: PfErrorCode,
    },
    /// A non-canonical linear address (#GP, not #PF) or one above 4 GiB in
    /// 32-bit or PAE paging.
    BadAddress(Gva),
    /// The entries kept changing under the walker's A/D updates.
    Contended,
}

impl WalkFault {
    /// The page-fault error code to deliver, if the fault is a page fault.
    pub fn error_code(&self) -> Option<PfErrorCode> {
        match *self {
            WalkFault::PageFault { code, .. } | WalkFault::TableNotInMemory { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Restarts allowed when an entry changes under an A/D update.
const MAX_RESTARTS: u32 = 16;

/// Walks the tables of `cpu` for `va` and `access`; with `set_ad`, sets the
/// accessed and dirty bits of a successful walk as the processor does.
pub fn walk<P: PagingMode, Mem: PhysMemory + ?Sized>(
    mem: &Mem,
    cpu: &GuestCpu,
    feat: &CpuFeatures,
    va: Gva,
    access: AccessKind,
    set_ad: bool,
) -> Result<GuestWalk, WalkFault> {
    let mut w = GuestWalk::empty(P::MODE);
    walk_into::<P, Mem>(mem, cpu, feat, va, access, set_ad, &mut w)?;
    Ok(w)
}

/// [`walk`] into `out`, which the caller keeps: the fault path walks without
/// moving the walk's steps from frame to frame. `out` must come from
/// [`GuestWalk::empty`] (or an earlier walk of the same mode): levels a walk
/// does not reach are left as they are, those below its leaf cleared.
pub(crate) fn walk_into<P: PagingMode, Mem: PhysMemory + ?Sized>(
    mem: &Mem,
    cpu: &GuestCpu,
    feat: &CpuFeatures,
    va: Gva,
    access: AccessKind,
    set_ad: bool,
    out: &mut GuestWalk,
) -> Result<(), WalkFault> {
    if !P::va_ok(va.0) {
        return Err(WalkFault::BadAddress(va));
    }
    let mut lv = Levels::<P, Mem> {
        mem,
        cpu,
        feat,
        va: va.0,
        access,
        has_xd: cpu.has_xd(),
        plain: P::reserved_bits(1, false, cpu, feat),
        allowed: PteAccess::all(),
        all: u64::MAX,
        _mode: core::marker::PhantomData,
    };
    // The first attempt straight, not as the first turn of the restart
    // loop: what the loop would hoist out of its turns (the error codes'
    // ingredients, every level's masks) is then only worked out by a walk
    // that faults or restarts.
    if lv.attempt(set_ad, out)? {
        return Ok(());
    }
    // (Levels passed by value: the fast path's stays in registers.)
    Levels::restart(lv, set_ad, out)
}

impl<P: PagingMode, Mem: PhysMemory + ?Sized> Levels<'_, P, Mem> {
    /// The walk after an attempt whose A/D update found an entry changed.
    #[cold]
    #[inline(never)]
    fn restart(mut self, set_ad: bool, out: &mut GuestWalk) -> Result<(), WalkFault> {
        for _ in 1..MAX_RESTARTS {
            if self.attempt(set_ad, out)? {
                return Ok(());
            }
        }
        Err(WalkFault::Contended)
    }

    /// The page fault for this access: present or not, reserved bit or not.
    #[inline(always)]
    fn fault(&self, present: bool, rsvd: bool, level: u8) -> WalkFault {
        page_fault(self.cpu, self.access, present, rsvd, level)
    }

    /// A table at `addr` (of `level`) outside memory.
    #[inline(always)]
    fn not_memory(&self, addr: Gpa, level: u8) -> WalkFault {
        table_not_in_memory(self.cpu, self.access, addr, level)
    }

    /// One walk from the root: `Ok(true)` when it translated (`out` filled),
    /// `Ok(false)` when an entry changed under its A/D update (walk again).
    #[inline(always)]
    fn attempt(&mut self, set_ad: bool, out: &mut GuestWalk) -> Result<bool, WalkFault> {
        let (mem, cpu, feat, va, access) = (self.mem, self.cpu, self.feat, self.va, self.access);
        // The level the walk starts at: below the PDPTE registers for PAE.
        let top = if P::MODE == GuestMode::Pae { 2 } else { P::MODE.root_level() };
        let write = access.op == AccessOp::Write;
        self.allowed = PteAccess::all();
        self.all = u64::MAX;
        let steps = &mut out.steps;
        let mut table = if P::MODE == GuestMode::Pae {
            // The PDPTE registers: no A bit, no access rights (SDM §4.4.1).
            let i = P::index(va, 3);
            let e = cpu.pdptrs[i];
            let pdpt = P::root_addr(cpu.cr3, feat);
            steps[2] = WalkStep {
                table_gfn: Gpa(pdpt).gfn(),
                entry_addr: Gpa(pdpt + 8 * i as u64),
                entry: e,
                access_above: self.allowed,
            };
            if e & P == 0 {
                return Err(self.fault(false, false, 3));
            }
            if pdpte_reserved(e, feat) {
                return Err(self.fault(true, true, 3));
            }
            P::table_addr(e, feat)
        } else {
            P::root_addr(cpu.cr3, feat)
        };
        // The levels written out from the root down, each with its level a
        // constant (the index shift, the reserved bits of a large page,
        // whether bit 7 maps a page fold away): `top` is a constant of the
        // mode, so the levels a mode lacks compile to nothing. A PTE always
        // maps a page.
        // (A loop over the levels is not unrolled by LLVM: written out.)
        let (leaf, level) = 'walk: {
            macro_rules! descend {
                ($l:literal) => {
                    if top >= $l {
                        let e = self.step($l, table, steps)?;
                        if P::is_leaf(e, $l, cpu, feat) {
                            break 'walk (e, $l);
                        }
                        table = P::table_addr(e, feat);
                    }
                };
            }
            descend!(5);
            descend!(4);
            descend!(3);
            descend!(2);
            (self.step(1, table, steps)?, 1)
        };
        let allowed = self.allowed;
        if !permits(cpu, allowed, access) {
            return Err(self.fault(true, false, 0));
        }
        let mut ad_written = 0u8;
        // Every entry has A (and the leaf of a write D): nothing to set,
        // nearly always. Otherwise the levels that lack one.
        if set_ad && (self.all & A == 0 || (write && leaf & D == 0)) {
            let unset = unset_levels(steps, level, top, write);
            for l in level..=top {
                if unset & (1 << (l - 1)) == 0 {
                    continue;
                }
                let step = &mut steps[l as usize - 1];
                let set = if l == level && write { A | D } else { A };
                let new = step.entry | set;
                match mem.compare_exchange(step.entry_addr, P::ENTRY_BYTES, step.entry, new) {
                    Ok(true) => {
                        step.entry = new;
                        ad_written |= 1 << (l - 1);
                    }
                    Ok(false) => return Ok(false),
                    Err(_) => return Err(self.not_memory(step.entry_addr, l)),
                }
            }
        }
        // Levels below the leaf hold nothing (an earlier attempt of this
        // walk may have gone deeper).
        for s in &mut steps[..level as usize - 1] {
            *s = WalkStep::default();
        }

        let shift = P::level_shift(level);
        let base = P::page_addr(leaf, level, feat);
        out.mode = P::MODE;
        out.gpa = Gpa(base | (va & ((1u64 << shift) - 1)));
        out.leaf_level = level;
        out.page_shift = shift;
        out.access = allowed;
        out.dirty = out.steps[level as usize - 1].entry & D != 0;
        out.ad_written = ad_written;
        Ok(true)
    }
}

/// What one walk carries from level to level.
struct Levels<'a, P: PagingMode, Mem: PhysMemory + ?Sized> {
    mem: &'a Mem,
    cpu: &'a GuestCpu,
    feat: &'a CpuFeatures,
    va: u64,
    access: AccessKind,
    has_xd: bool,
    /// The reserved bits of an entry with bit 7 clear, the same at every
    /// level the walk reads ([`PagingMode::reserved_bits`]): computed once,
    /// one AND a level (KVM's `rsvd_bits_mask`). Bit 7 set (a large page, or
    /// PAT in a PTE) takes the level's own mask.
    plain: u64,
    /// What the entries so far permit together.
    allowed: PteAccess,
    /// The entries so far ANDed: whether all have A.
    all: u64,
    _mode: core::marker::PhantomData<P>,
}

impl<P: PagingMode, Mem: PhysMemory + ?Sized> Levels<'_, P, Mem> {
    /// Reads and checks the entry of the table at `table` at `level` that
    /// translates the address, records it in `steps`, and returns it.
    #[inline(always)]
    fn step(&mut self, level: u8, table: u64, steps: &mut [WalkStep; 5]) -> Result<u64, WalkFault> {
        let addr = Gpa(table + P::index(self.va, level) as u64 * P::ENTRY_BYTES);
        let Ok(e) = self.mem.read(addr, P::ENTRY_BYTES) else {
            return Err(self.not_memory(addr, level));
        };
        steps[level as usize - 1] =
            WalkStep { table_gfn: Gpa(table).gfn(), entry_addr: addr, entry: e, access_above: self.allowed };
        if e & P == 0 {
            return Err(self.fault(false, false, level));
        }
        // Bit 7 clear: the walk's one mask. Set: the level's own, asked out
        // of line (else the masks of every level are worked out up front).
        let reserved = if e & PS == 0 {
            e & self.plain != 0
        } else {
            large_reserved::<P>(e, level, self.cpu, self.feat)
        };
        if reserved {
            return Err(self.fault(true, true, level));
        }
        self.allowed &= PteAccess::of_entry(e, self.has_xd);
        self.all &= e;
        Ok(e)
    }
}

// The walk's faults are built out of line, from values: the walk's state
// stays in registers, and nothing of the error codes is worked out before
// a walk faults.

/// The page fault `access` takes under `cpu` at `level`.
#[cold]
#[inline(never)]
fn page_fault(cpu: &GuestCpu, access: AccessKind, present: bool, rsvd: bool, level: u8) -> WalkFault {
    WalkFault::PageFault { code: PfErrorCode::for_access(cpu, access, present, rsvd), level }
}

/// The fault of a table at `addr` (of `level`) outside memory.
#[cold]
#[inline(never)]
fn table_not_in_memory(cpu: &GuestCpu, access: AccessKind, addr: Gpa, level: u8) -> WalkFault {
    WalkFault::TableNotInMemory { addr, level, code: PfErrorCode::for_access(cpu, access, false, false) }
}

/// Whether a present entry at `level` with bit 7 set has a reserved bit.
#[cold]
#[inline(never)]
fn large_reserved<P: PagingMode>(e: u64, level: u8, cpu: &GuestCpu, feat: &CpuFeatures) -> bool {
    e & P::reserved_bits(level, true, cpu, feat) != 0
}

/// The levels (bit `level - 1`, from the leaf at `leaf` up to `top`) whose
/// entry lacks its A bit, or for the leaf of a write its D bit: what a
/// successful walk sets.
#[cold]
fn unset_levels(steps: &[WalkStep; 5], leaf: u8, top: u8, write: bool) -> u8 {
    let mut unset = 0;
    for l in leaf..=top {
        let e = steps[l as usize - 1].entry;
        let want = if l == leaf && write { A | D } else { A };
        unset |= u8::from(e & want != want) << (l - 1);
    }
    unset
}

/// [`walk`] for the mode `cpu` is in.
pub fn walk_any<Mem: PhysMemory + ?Sized>(
    mem: &Mem,
    cpu: &GuestCpu,
    feat: &CpuFeatures,
    va: Gva,
    access: AccessKind,
    set_ad: bool,
) -> Result<GuestWalk, WalkFault> {
    match cpu.mode {
        GuestMode::Bits32 => walk::<Bits32, Mem>(mem, cpu, feat, va, access, set_ad),
        GuestMode::Pae => walk::<Pae, Mem>(mem, cpu, feat, va, access, set_ad),
        GuestMode::Four => walk::<Level4, Mem>(mem, cpu, feat, va, access, set_ad),
        GuestMode::Five => walk::<Level5, Mem>(mem, cpu, feat, va, access, set_ad),
    }
}

/// [`walk_any`] into `out` ([`walk_into`]).
pub(crate) fn walk_any_into<Mem: PhysMemory + ?Sized>(
    mem: &Mem,
    cpu: &GuestCpu,
    feat: &CpuFeatures,
    va: Gva,
    access: AccessKind,
    set_ad: bool,
    out: &mut GuestWalk,
) -> Result<(), WalkFault> {
    match cpu.mode {
        GuestMode::Bits32 => walk_into::<Bits32, Mem>(mem, cpu, feat, va, access, set_ad, out),
        GuestMode::Pae => walk_into::<Pae, Mem>(mem, cpu, feat, va, access, set_ad, out),
        GuestMode::Four => walk_into::<Level4, Mem>(mem, cpu, feat, va, access, set_ad, out),
        GuestMode::Five => walk_into::<Level5, Mem>(mem, cpu, feat, va, access, set_ad, out),
    }
}

/// Why a MOV to CR3 in PAE paging fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PdptrError {
    /// A present PDPTE has a reserved bit set: #GP (SDM §4.4.1).
    Reserved(usize),
    /// The PDPT is not in memory.
    NotMemory(Gpa),
}

/// Loads the four PDPTE registers from the PDPT CR3 points to, as a MOV to
/// CR3 in PAE paging does (SDM §4.4.1).
pub fn load_pdptrs<Mem: PhysMemory + ?Sized>(
    mem: &Mem,
    cr3: u64,
    feat: &CpuFeatures,
) -> Result<[u64; 4], PdptrError> {
    let base = Pae::root_addr(cr3, feat);
    let mut out = [0; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let addr = Gpa(base + 8 * i as u64);
        let e = mem.read(addr, 8).map_err(|_| PdptrError::NotMemory(addr))?;
        if e & P != 0 && pdpte_reserved(e, feat) {
            return Err(PdptrError::Reserved(i));
        }
        *slot = e;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::mode::{Privilege, PS, RW, US, XD};
    use super::super::ram::SimGuestRam;
    use super::*;
    use mmu_generic::addr::Gfn;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn ram() -> SimGuestRam {
        SimGuestRam::new(&[(Gfn(0), 64)])
    }

    /// The plain model of a walk: one loop over the levels, the reserved
    /// bits asked of the mode at each, A/D set leaf first and the walk
    /// restarted when an entry changed under the update.
    /// `ask`: the address, the access, and whether to set A/D.
    fn model_walk<P: PagingMode>(mem: &SimGuestRam, cpu: &GuestCpu, feat: &CpuFeatures, ask: Ask) -> Walked {
        let (va, access, set_ad) = ask;
        if !P::va_ok(va.0) {
            return Err(WalkFault::BadAddress(va));
        }
        let pf = |present, rsvd, level| WalkFault::PageFault {
            code: PfErrorCode::for_access(cpu, access, present, rsvd),
            level,
        };
        let write = access.op == AccessOp::Write;
        'restart: for _ in 0..MAX_RESTARTS {
            let mut w = GuestWalk::empty(P::MODE);
            let mut allowed = PteAccess::all();
            let (mut table, mut level) = if P::MODE == GuestMode::Pae {
                let i = P::index(va.0, 3);
                let pdpt = P::root_addr(cpu.cr3, feat);
                let e = cpu.pdptrs[i];
                w.steps[2] = WalkStep {
                    table_gfn: Gpa(pdpt).gfn(),
                    entry_addr: Gpa(pdpt + 8 * i as u64),
                    entry: e,
                    access_above: allowed,
                };
                if e & P == 0 {
                    return Err(pf(false, false, 3));
                }
                if pdpte_reserved(e, feat) {
                    return Err(pf(true, true, 3));
                }
                (P::table_addr(e, feat), 2)
            } else {
                (P::root_addr(cpu.cr3, feat), P::MODE.root_level())
            };
            let top = level;
            let leaf = loop {
                let addr = Gpa(table + P::index(va.0, level) as u64 * P::ENTRY_BYTES);
                let e = mem.read(addr, P::ENTRY_BYTES).map_err(|_| WalkFault::TableNotInMemory {
                    addr,
                    level,
                    code: PfErrorCode::for_access(cpu, access, false, false),
                })?;
                w.steps[level as usize - 1] = WalkStep {
                    table_gfn: Gpa(table).gfn(),
                    entry_addr: addr,
                    entry: e,
                    access_above: allowed,
                };
                if e & P == 0 {
                    return Err(pf(false, false, level));
                }
                if P::is_reserved(e, level, cpu, feat) {
                    return Err(pf(true, true, level));
                }
                allowed &= PteAccess::of_entry(e, cpu.has_xd());
                if P::is_leaf(e, level, cpu, feat) {
                    break e;
                }
                table = P::table_addr(e, feat);
                level -= 1;
            };
            if !permits(cpu, allowed, access) {
                return Err(pf(true, false, 0));
            }
            for l in level..=top {
                let step = &mut w.steps[l as usize - 1];
                let set = if l == level && write { A | D } else { A };
                if !set_ad || step.entry & set == set {
                    continue;
                }
                if !mem
                    .compare_exchange(step.entry_addr, P::ENTRY_BYTES, step.entry, step.entry | set)
                    .unwrap()
                {
                    continue 'restart;
                }
                step.entry |= set;
                w.ad_written |= 1 << (l - 1);
            }
            let shift = P::level_shift(level);
            w.gpa = Gpa(P::page_addr(leaf, level, feat) | (va.0 & ((1u64 << shift) - 1)));
            w.leaf_level = level;
            w.page_shift = shift;
            w.access = allowed;
            w.dirty = w.steps[level as usize - 1].entry & D != 0;
            return Ok(w);
        }
        Err(WalkFault::Contended)
    }

    type Ask = (Gva, AccessKind, bool);
    type Walked = Result<GuestWalk, WalkFault>;
    type Walker = fn(&SimGuestRam, &GuestCpu, &CpuFeatures, Ask) -> Walked;

    /// A random entry of a mode: mostly present, pointing into the first
    /// `frames` frames or just past them, with random rights, A/D, bit 7,
    /// XD and now and then a reserved or PSE-36 bit.
    fn random_entry(rng: &mut SmallRng, mode: GuestMode, frames: u64) -> u64 {
        let mut e = rng.gen_range(0..frames + 1) << 12;
        for (bit, percent) in [(P, 95), (RW, 60), (US, 70), (A, 50), (D, 40), (PS, 20)] {
            if rng.gen_range(0..100) < percent {
                e |= bit;
            }
        }
        let extra: &[u64] = if mode == GuestMode::Bits32 {
            &[1 << 13, 1 << 14, 1 << 17, 1 << 21]
        } else {
            &[XD, XD, 1 << 13, 1 << 20, 1 << 29, 1 << 45, 1 << 47, 1 << 51]
        };
        if rng.gen_range(0..100) < 25 {
            e |= extra[rng.gen_range(0..extra.len())];
        }
        if mode == GuestMode::Bits32 {
            e & 0xffff_ffff
        } else {
            e
        }
    }

    /// Guest RAM where the first A/D update finds its entry changed and the
    /// PDE at 0x3000 turned into a 2 MiB page meanwhile (another vCPU).
    struct RacingRam(SimGuestRam, core::cell::Cell<bool>);

    impl PhysMemory for RacingRam {
        fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
            self.0.read(addr, bytes)
        }
        fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
            if self.1.replace(false) {
                // The other vCPU used the PTE too (A set), then remapped.
                self.0.write(Gpa(0x4000), 8, 0x5000 | P | RW | US | A)?;
                self.0.write(Gpa(0x3000), 8, 0x20_0000 | P | PS | RW | US | A | D)?;
            }
            self.0.compare_exchange(addr, bytes, old, new)
        }
    }

    #[test]
    fn a_walk_restarted_onto_a_large_page_keeps_no_step_below_it() {
        let m = RacingRam(ram(), core::cell::Cell::new(true));
        let f = CpuFeatures::typical();
        m.0.write(Gpa(0x1000), 8, 0x2000 | P | RW | US | A).unwrap();
        m.0.write(Gpa(0x2000), 8, 0x3000 | P | RW | US | A).unwrap();
        m.0.write(Gpa(0x3000), 8, 0x4000 | P | RW | US | A).unwrap();
        m.0.write(Gpa(0x4000), 8, 0x5000 | P | RW | US).unwrap();
        let cpu = GuestCpu::new(GuestMode::Four, 0x1000);
        let r = AccessKind::user(AccessOp::Read);
        let w = walk::<Level4, _>(&m, &cpu, &f, Gva(0x123), r, true).unwrap();
        assert_eq!((w.leaf_level, w.gpa), (2, Gpa(0x20_0123)), "the second attempt walks the large page");
        assert_eq!(w.steps[0], WalkStep::default(), "the first attempt's PTE step is gone");
        assert_eq!(w, walk::<Level4, _>(&m.0, &cpu, &f, Gva(0x123), r, true).unwrap());
    }

    #[test]
    fn the_walker_matches_the_plain_model_in_every_mode_and_control() {
        const FRAMES: u64 = 8;
        let mut rng = SmallRng::seed_from_u64(0x9a1c);
        // By mode: walks that translate, #PF, tables outside memory, #GP,
        // large pages, walks that set A or D.
        let mut outcomes = [[0u32; 6]; 4];
        for round in 0..200 {
            let mode = GuestMode::ALL[round % 4];
            let rams = [SimGuestRam::new(&[(Gfn(0), FRAMES)]), SimGuestRam::new(&[(Gfn(0), FRAMES)])];
            let eb = mode.entry_bytes();
            for i in 0..FRAMES * 4096 / eb {
                let e = random_entry(&mut rng, mode, FRAMES);
                for r in &rams {
                    r.write(Gpa(i * eb), eb, e).unwrap();
                }
            }
            let width = [36, 40, 46, 52][rng.gen_range(0..4)];
            let feat = CpuFeatures {
                phys_width: crate::format::PhysAddrWidth::new(width).unwrap(),
                pse36: rng.gen(),
                page_1g: rng.gen(),
            };
            let mut cpu = GuestCpu::new(mode, rng.gen_range(0..FRAMES + 1) << 12 | rng.gen_range(0..8) << 5);
            (cpu.cr0_wp, cpu.cr4_pse, cpu.cr4_smep, cpu.cr4_smap) =
                (rng.gen(), rng.gen(), rng.gen(), rng.gen());
            cpu.efer_nxe = rng.gen();
            if mode == GuestMode::Pae {
                // PDPTEs have only P, PWT, PCD and the address (the rest is
                // reserved, and a MOV to CR3 would #GP).
                let pdpt = Pae::root_addr(cpu.cr3, &feat);
                for k in 0..4 {
                    let e = match rng.gen_range(0..10) {
                        0 => 0,
                        1 => P | RW,
                        _ => rng.gen_range(0..FRAMES + 2) << 12 | P | rng.gen_range(0..4) << 3,
                    };
                    for r in &rams {
                        // (A root outside RAM: load_pdptrs refuses it below.)
                        let _ = r.write(Gpa(pdpt + 8 * k), 8, e);
                    }
                }
                match load_pdptrs(&rams[0], cpu.cr3, &feat) {
                    Ok(p) => cpu.pdptrs = p,
                    Err(_) => continue,
                }
            }
            for _ in 0..200 {
                cpu.eflags_ac = rng.gen_range(0..4) == 0;
                let va = match rng.gen_range(0..20) {
                    0 => rng.gen::<u64>(),
                    _ if mode.root_level() >= 4 => rng.gen_range(0..1u64 << 47),
                    _ => rng.gen_range(0..1u64 << 32),
                };
                let op = [AccessOp::Read, AccessOp::Write, AccessOp::Fetch][rng.gen_range(0..3)];
                let privilege = [Privilege::User, Privilege::Supervisor, Privilege::ImplicitSupervisor]
                    [rng.gen_range(0..3)];
                let access = AccessKind { op, privilege };
                let set_ad = rng.gen_range(0..4) != 0;
                let got = walk_any(&rams[0], &cpu, &feat, Gva(va), access, set_ad);
                let model: Walker = match mode {
                    GuestMode::Bits32 => model_walk::<Bits32>,
                    GuestMode::Pae => model_walk::<Pae>,
                    GuestMode::Four => model_walk::<Level4>,
                    GuestMode::Five => model_walk::<Level5>,
                };
                let want = model(&rams[1], &cpu, &feat, (Gva(va), access, set_ad));
                assert_eq!(got, want, "{cpu:?} {feat:?} va {va:#x} {access:?} set_ad {set_ad}");
                let kind = match got {
                    Ok(_) => 0,
                    Err(WalkFault::PageFault { .. }) => 1,
                    Err(WalkFault::TableNotInMemory { .. }) => 2,
                    Err(_) => 3,
                };
                outcomes[round % 4][kind] += 1;
                if let Ok(w) = got {
                    outcomes[round % 4][4] += u32::from(w.leaf_level > 1);
                    outcomes[round % 4][5] += u32::from(w.ad_written != 0);
                }
            }
            for i in 0..FRAMES * 512 {
                let a = Gpa(i * 8);
                assert_eq!(rams[0].read(a, 8), rams[1].read(a, 8), "A/D updates differ at {a:?}");
            }
        }
        for (mode, o) in GuestMode::ALL.iter().zip(outcomes) {
            // Every ending, large pages and A/D updates, in every mode (#GP
            // for 32-bit and PAE paging: a linear address above 4 GiB).
            let floor = [300, 300, 100, 100, 40, 200];
            assert!(o.iter().zip(floor).all(|(&n, f)| n >= f), "{mode:?}: {o:?}");
        }
    }

    #[test]
    fn four_level_walk_sets_a_and_d_and_reports_error_codes() {
        let m = ram();
        let f = CpuFeatures::typical();
        // PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000, page 0x5000.
        m.write(Gpa(0x1000), 8, 0x2000 | P | RW | US).unwrap();
        m.write(Gpa(0x2000), 8, 0x3000 | P | RW | US).unwrap();
        m.write(Gpa(0x3000), 8, 0x4000 | P | RW | US).unwrap();
        m.write(Gpa(0x4000 + 8), 8, 0x5000 | P | US | XD).unwrap();
        let cpu = GuestCpu::new(GuestMode::Four, 0x1000);
        let r = AccessKind::user(AccessOp::Read);
        let w = walk::<Level4, _>(&m, &cpu, &f, Gva(0x1234), r, true).unwrap();
        assert_eq!(w.gpa, Gpa(0x5234));
        assert_eq!(w.access, PteAccess::USER);
        assert_eq!(m.read(Gpa(0x4008), 8).unwrap(), 0x5000 | P | US | XD | A);
        assert_eq!(m.read(Gpa(0x1000), 8).unwrap() & A, A);
        let wr = AccessKind::user(AccessOp::Write);
        let e = walk::<Level4, _>(&m, &cpu, &f, Gva(0x1234), wr, true).unwrap_err();
        assert_eq!(e.error_code().unwrap().bits(), 0x7);
        let fe = AccessKind::user(AccessOp::Fetch);
        assert_eq!(
            walk::<Level4, _>(&m, &cpu, &f, Gva(0x1000), fe, true).unwrap_err().error_code().unwrap().bits(),
            0x15
        );
        let np = walk::<Level4, _>(&m, &cpu, &f, Gva(0x2000), wr, true).unwrap_err();
        assert_eq!(np, WalkFault::PageFault { code: PfErrorCode::from_bits_retain(0x6), level: 1 });
        let sup = AccessKind { op: AccessOp::Write, privilege: Privilege::Supervisor };
        let nowp = GuestCpu { cr0_wp: false, ..cpu };
        let ok = walk::<Level4, _>(&m, &nowp, &f, Gva(0x1234), sup, true).unwrap();
        assert!(ok.dirty, "a supervisor write with CR0.WP = 0 dirties a read-only page");
        m.write(Gpa(0x3000), 8, 0x4000 | P | RW | US | PS | 1 << 13).unwrap();
        let rs = walk::<Level4, _>(&m, &cpu, &f, Gva(0x1234), r, true).unwrap_err();
        assert_eq!(rs, WalkFault::PageFault { code: PfErrorCode::from_bits_retain(0xd), level: 2 });
    }

    #[test]
    fn thirty_two_bit_walk_with_4m_pages_and_pae_pdptrs() {
        let m = ram();
        let f = CpuFeatures::typical();
        m.write(Gpa(0x1000 + 4 * 3), 4, 0x0140_0000 | (0x5 << 13) | P | PS | RW).unwrap();
        let cpu = GuestCpu::new(GuestMode::Bits32, 0x1000);
        let w =
            walk::<Bits32, _>(&m, &cpu, &f, Gva(0x00c1_2345), AccessKind::supervisor(AccessOp::Write), true)
                .unwrap();
        assert_eq!(w.gpa, Gpa(0x5_0141_2345));
        assert_eq!(w.page_shift, 22);
        assert_eq!(m.read(Gpa(0x100c), 4).unwrap() & (A | D), A | D);
        assert_eq!(m.read(Gpa(0x1008), 4).unwrap(), 0, "the neighbouring entry is untouched");

        m.write(Gpa(0x2000 + 16), 8, 0x3000 | P).unwrap();
        m.write(Gpa(0x3000 + 8), 8, 0x0020_0000 | P | PS | US | RW).unwrap();
        let mut pae = GuestCpu::new(GuestMode::Pae, 0x2000);
        pae.pdptrs = load_pdptrs(&m, 0x2000, &f).unwrap();
        let w =
            walk::<Pae, _>(&m, &pae, &f, Gva(0x8030_0001), AccessKind::user(AccessOp::Fetch), true).unwrap();
        assert_eq!(w.gpa, Gpa(0x30_0001));
        m.write(Gpa(0x2000 + 24), 8, 0x3000 | P | RW).unwrap();
        assert_eq!(load_pdptrs(&m, 0x2000, &f), Err(PdptrError::Reserved(3)));
    }

    #[test]
    fn tables_outside_memory_and_bad_addresses_are_typed() {
        let m = ram();
        let f = CpuFeatures::typical();
        m.write(Gpa(0x1000), 8, 0x7_0000_0000 | P | RW).unwrap();
        let cpu = GuestCpu::new(GuestMode::Four, 0x1000);
        let r = AccessKind::supervisor(AccessOp::Read);
        match walk::<Level4, _>(&m, &cpu, &f, Gva(0), r, true) {
            Err(WalkFault::TableNotInMemory { level: 3, code, .. }) => assert_eq!(code.bits(), 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            walk::<Level4, _>(&m, &cpu, &f, Gva(1 << 47), r, true),
            Err(WalkFault::BadAddress(Gva(1 << 47)))
        );
    }
}
