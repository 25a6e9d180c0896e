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
/// moving the walk's steps from frame to frame.
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
    let has_xd = cpu.has_xd();
    let bytes = P::ENTRY_BYTES;
    // The reserved bits of an entry with bit 7 clear, the same at every
    // level the loop walks ([`PagingMode::reserved_bits`]): computed once,
    // one AND a level (KVM's `rsvd_bits_mask`). Bit 7 set (a large page, or
    // PAT in a PTE) takes the level's own mask.
    let plain = P::reserved_bits(1, false, cpu, feat);
    let write = access.op == AccessOp::Write;
    let pf = |present, rsvd, level| WalkFault::PageFault {
        code: PfErrorCode::for_access(cpu, access, present, rsvd),
        level,
    };
    let steps = &mut out.steps;
    for _ in 0..MAX_RESTARTS {
        *steps = [WalkStep::default(); 5];
        let mut allowed = PteAccess::all();
        // Bit `level - 1`: the entry lacks its A bit (or, the leaf of a
        // write, its D bit), which a successful walk sets.
        let mut unset = 0u8;
        let (mut table, mut level) = if P::MODE == GuestMode::Pae {
            // The PDPTE registers: no A bit, no access rights (SDM §4.4.1).
            let i = P::index(va.0, 3);
            let e = cpu.pdptrs[i];
            let pdpt = P::root_addr(cpu.cr3, feat);
            steps[2] = WalkStep {
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
        let leaf = loop {
            let addr = Gpa(table + P::index(va.0, level) as u64 * bytes);
            let e = mem.read(addr, bytes).map_err(|_| WalkFault::TableNotInMemory {
                addr,
                level,
                code: PfErrorCode::for_access(cpu, access, false, false),
            })?;
            let l = level as usize - 1;
            steps[l] =
                WalkStep { table_gfn: Gpa(table).gfn(), entry_addr: addr, entry: e, access_above: allowed };
            if e & P == 0 {
                return Err(pf(false, false, level));
            }
            let rsvd = if e & PS == 0 { plain } else { P::reserved_bits(level, true, cpu, feat) };
            if e & rsvd != 0 {
                return Err(pf(true, true, level));
            }
            allowed &= PteAccess::of_entry(e, has_xd);
            unset |= u8::from(e & A == 0) << l;
            if P::is_leaf(e, level, cpu, feat) {
                break e;
            }
            table = P::table_addr(e, feat);
            level -= 1;
        };
        if !permits(cpu, allowed, access) {
            return Err(pf(true, false, 0));
        }
        unset |= u8::from(write && leaf & D == 0) << (level - 1);
        let mut restart = false;
        let mut ad_written = 0u8;
        if set_ad && unset != 0 {
            let top = if P::MODE == GuestMode::Pae { 2 } else { P::MODE.root_level() };
            for l in level..=top {
                if unset & (1 << (l - 1)) == 0 {
                    continue;
                }
                let step = &mut steps[l as usize - 1];
                let set = if l == level && write { A | D } else { A };
                let new = step.entry | set;
                match mem.compare_exchange(step.entry_addr, bytes, step.entry, new) {
                    Ok(true) => {
                        step.entry = new;
                        ad_written |= 1 << (l - 1);
                    }
                    Ok(false) => {
                        restart = true;
                        break;
                    }
                    Err(_) => {
                        return Err(WalkFault::TableNotInMemory {
                            addr: step.entry_addr,
                            level: l,
                            code: PfErrorCode::for_access(cpu, access, false, false),
                        })
                    }
                }
            }
        }
        if restart {
            continue;
        }
        let shift = P::level_shift(level);
        let base = P::page_addr(leaf, level, feat);
        out.mode = P::MODE;
        out.gpa = Gpa(base | (va.0 & ((1u64 << shift) - 1)));
        out.leaf_level = level;
        out.page_shift = shift;
        out.access = allowed;
        out.dirty = out.steps[level as usize - 1].entry & D != 0;
        out.ad_written = ad_written;
        return Ok(());
    }
    Err(WalkFault::Contended)
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

    fn ram() -> SimGuestRam {
        SimGuestRam::new(&[(Gfn(0), 64)])
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
