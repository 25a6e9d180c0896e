//! The hashed page table behind a trait, and the in-memory table.
//!
//! [`HashTable`] is what a kernel or hypervisor does to *a* table, in the
//! vocabulary of the PAPR calls (entries in the pre-3.0 layout): the
//! [`PaprHpt`](crate::passthrough::PaprHpt) pass-through reaches a
//! hypervisor's table by hypercall; [`InMemoryHpt`] is a table a bare-metal
//! hypervisor owns. [`GuestHpt`](crate::guest::GuestHpt) serves a guest's
//! hypercalls over an `InMemoryHpt` with full argument checking and the
//! reverse map.
//!
//! The in-memory table is an array of atomic doublewords holding big-endian
//! values (the CPU's MMU reads it as big-endian on any host), in the layout
//! the [`HpteFormat`] names. Hardware sets R and C with atomic ORs while
//! software holds the per-HPTE lock bit ([`HPTE_V_HVLOCK`]), so software
//! updates of dword 1 are atomic read-modify-writes too.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::hash::{HptGeometry, VirtAddr};
use crate::hpte::{
    pp_allows, ConvertError, Hpte, HpteFormat, HPTE_R_C, HPTE_R_KEY, HPTE_R_KEY_HI, HPTE_R_KEY_LO, HPTE_R_N,
    HPTE_R_PP, HPTE_R_PP0, HPTE_R_PPP, HPTE_R_R, HPTE_V_ABSENT, HPTE_V_HVLOCK, HPTE_V_VALID,
};
use crate::pagesize::{PageSizePair, PageSizes};
use crate::papr::{BulkOutcome, BulkRequest, HptError, RemoveCond, BULK_MAX, H_AVPN};
use crate::search::{self, Found};

/// New page protection for H_PROTECT.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Protection {
    /// PP0 || PP (three bits; see [`hpte::pp`](crate::hpte::pp)).
    pub pp: u8,
    /// No-execute.
    pub no_execute: bool,
    /// The five-bit storage key.
    pub key: u8,
}

impl Protection {
    /// The H_PROTECT flag bits (without H_AVPN).
    pub const fn h_protect_flags(&self) -> u64 {
        let pp = self.pp as u64 & 7;
        let key = self.key as u64 & 0x1f;
        (pp & 3)
            | ((pp >> 2) << 8)
            | if self.no_execute { 4 } else { 0 }
            | ((key & 7) << 9)
            | ((key >> 3) << 12)
    }

    /// The protection carried by H_PROTECT flags (other bits ignored).
    pub const fn from_h_protect_flags(flags: u64) -> Self {
        Self {
            pp: ((flags & 3) | (((flags >> 8) & 1) << 2)) as u8,
            no_execute: flags & 4 != 0,
            key: (((flags >> 9) & 7) | (((flags >> 12) & 3) << 3)) as u8,
        }
    }

    /// The dword-1 bits (within [`Protection::R_MASK`]).
    pub const fn r_bits(&self) -> u64 {
        let f = self.h_protect_flags();
        ((f << 55) & HPTE_R_PP0) | ((f << 48) & HPTE_R_KEY_HI) | (f & (HPTE_R_PP | HPTE_R_N | HPTE_R_KEY_LO))
    }

    /// The dword-1 bits H_PROTECT replaces.
    pub const R_MASK: u64 = HPTE_R_PPP | HPTE_R_N | HPTE_R_KEY;
}

/// The result of an H_BULK_REMOVE: one outcome per request, and the call's status.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BulkResult {
    /// Per-request outcomes (requests past the end are `NotProcessed`).
    pub outcomes: [BulkOutcome; BULK_MAX],
    /// `Ok` unless a request was malformed (H_PARAMETER) or hit a hardware error.
    pub status: Result<(), HptError>,
}

/// A translation the software MMU ([`InMemoryHpt::translate`]) made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The entry used.
    pub ptex: u64,
    /// The real address.
    pub real_address: u64,
    /// The page size of the entry.
    pub size: PageSizePair,
}

/// Why the software MMU refused an access: the storage interrupt the CPU
/// would take (Power ISA 2.07B Book III-S 6.5.3, DSISR bits 33 and 36).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccessFault {
    /// No valid entry translates the address (DSISR 0x4000_0000).
    NoTranslation,
    /// The entry at this slot does not allow the access (DSISR 0x0800_0000).
    Protection(u64),
}

/// A hashed page table, driven with the PAPR operations.
///
/// Entries go in and come out in the pre-ISA-3.0 layout.
pub trait HashTable {
    /// The PTEG index mask (number of PTEGs − 1).
    fn pteg_mask(&self) -> u64;

    /// Inserts `hpte` into the PTEG holding `ptex` (the first free slot), or
    /// exactly at `ptex` when `exact`. Returns the slot used.
    fn enter(&mut self, ptex: u64, hpte: Hpte, exact: bool) -> Result<u64, HptError>;

    /// Removes the valid entry at `ptex` if `cond` holds; returns it as it
    /// was, with its final R and C.
    fn remove(&mut self, ptex: u64, cond: RemoveCond) -> Result<Hpte, HptError>;

    /// Reads the entry at `ptex`.
    fn read(&mut self, ptex: u64) -> Result<Hpte, HptError>;

    /// Reads the four entries of the aligned quad holding `ptex`.
    fn read4(&mut self, ptex: u64) -> Result<[Hpte; 4], HptError> {
        let base = ptex & !3;
        let mut out = [Hpte::EMPTY; 4];
        for (i, h) in out.iter_mut().enumerate() {
            *h = self.read(base + i as u64)?;
        }
        Ok(out)
    }

    /// Replaces PP0/PP/N/key of the valid entry at `ptex` (if its AVPN
    /// equals `avpn` when given).
    fn protect(&mut self, ptex: u64, prot: Protection, avpn: Option<u64>) -> Result<(), HptError>;

    /// Clears R of the valid entry at `ptex`; returns dword 1 as it was.
    fn clear_ref(&mut self, ptex: u64) -> Result<u64, HptError>;

    /// Clears C of the valid entry at `ptex`; returns dword 1 as it was.
    fn clear_mod(&mut self, ptex: u64) -> Result<u64, HptError>;

    /// Up to four removals; stops at the first malformed request.
    fn bulk_remove(&mut self, reqs: &[BulkRequest]) -> BulkResult {
        let mut out = BulkResult { outcomes: [BulkOutcome::NotProcessed; BULK_MAX], status: Ok(()) };
        if reqs.len() > BULK_MAX {
            out.status = Err(HptError::Parameter);
            return out;
        }
        for (o, r) in out.outcomes.iter_mut().zip(reqs) {
            match self.remove(r.ptex, r.cond) {
                Ok(h) => *o = BulkOutcome::Removed { rc: h.r & (HPTE_R_R | HPTE_R_C) },
                Err(HptError::NotFound) => *o = BulkOutcome::NotFound,
                Err(e) => {
                    *o =
                        if e == HptError::Parameter { BulkOutcome::Parameter } else { BulkOutcome::Hardware };
                    out.status = Err(e);
                    break;
                }
            }
        }
        out
    }
}

/// An HPT in memory: the table a bare-metal hypervisor points the MMU at.
#[derive(Debug)]
pub struct InMemoryHpt {
    geom: HptGeometry,
    format: HpteFormat,
    /// One HPTE per element (so one bounds check covers both doublewords),
    /// big-endian values.
    hptes: Vec<[AtomicU64; 2]>,
}

impl InMemoryHpt {
    /// An empty table of the given size and layout.
    pub fn new(geom: HptGeometry, format: HpteFormat) -> Self {
        let n = geom.hptes() as usize;
        let mut hptes = Vec::with_capacity(n);
        hptes.resize_with(n, || [AtomicU64::new(0), AtomicU64::new(0)]);
        Self { geom, format, hptes }
    }

    /// The table's size.
    #[inline]
    pub fn geometry(&self) -> HptGeometry {
        self.geom
    }

    /// The layout the table holds.
    #[inline]
    pub fn format(&self) -> HpteFormat {
        self.format
    }

    /// Where the table's storage starts in the embedder's address space: what a
    /// bare-metal hypervisor whose addresses are real addresses puts in SDR1
    /// (HTABORG) or the partition-table entry, after checking it is aligned
    /// to the table's size (the allocator decides the placement).
    pub fn base_address(&self) -> usize {
        self.hptes.as_ptr() as usize
    }

    /// Number of HPTEs.
    pub fn len(&self) -> u64 {
        self.geom.hptes()
    }

    /// Always false: a table has at least 2^14 entries.
    pub fn is_empty(&self) -> bool {
        false
    }

    #[inline]
    fn dw(&self, ptex: u64) -> Option<&[AtomicU64; 2]> {
        self.hptes.get(usize::try_from(ptex).ok()?)
    }

    /// The two doublewords as the table holds them (its layout), CPU order.
    #[inline]
    pub fn load_raw(&self, ptex: u64) -> Option<(u64, u64)> {
        let [v, r] = self.dw(ptex)?;
        Some((u64::from_be(v.load(Ordering::Acquire)), u64::from_be(r.load(Ordering::Acquire))))
    }

    /// Which of the 8 slots of PTEG `group` hold an entry, valid or left
    /// absent (bit `k` for slot `k`; 0 for a group outside the table). Reads
    /// dword 0 only: V and the absent bit sit where both layouts agree.
    #[inline]
    pub fn group_occupancy(&self, group: u64) -> u8 {
        let words = usize::try_from(group)
            .ok()
            .and_then(|g| g.checked_mul(8))
            .and_then(|i| self.hptes.get(i..i.checked_add(8)?));
        let Some(words) = words else { return 0 };
        let busy = (HPTE_V_VALID | HPTE_V_ABSENT).to_be();
        let mut m = 0;
        for (k, [v, _]) in words.iter().enumerate() {
            m |= u8::from(v.load(Ordering::Acquire) & busy != 0) << k;
        }
        m
    }

    /// The entry in the pre-3.0 layout, software bits included.
    #[inline]
    pub fn load(&self, ptex: u64) -> Option<Hpte> {
        self.load_raw(ptex).map(|(v, r)| self.format.decode(v, r))
    }

    /// The 16 bytes of the entry exactly as they sit in memory (big-endian).
    pub fn memory_image(&self, ptex: u64) -> Option<[u8; 16]> {
        let [v, r] = self.dw(ptex)?;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&v.load(Ordering::Acquire).to_ne_bytes());
        b[8..].copy_from_slice(&r.load(Ordering::Acquire).to_ne_bytes());
        Some(b)
    }

    /// Writes a pre-3.0 entry, dword 1 first so that a valid dword 0 never
    /// pairs with a stale dword 1.
    pub fn store(&self, ptex: u64, h: Hpte) -> Result<(), ConvertError> {
        let (v, r) = self.format.encode(h)?;
        if let Some([dv, dr]) = self.dw(ptex) {
            dr.store(r.to_be(), Ordering::Release);
            dv.store(v.to_be(), Ordering::Release);
        }
        Ok(())
    }

    /// Writes an entry already in the table's layout (as
    /// [`HpteFormat::encode`] made it), dword 1 first as [`InMemoryHpt::store`] does.
    #[inline]
    pub fn store_encoded(&self, ptex: u64, (v, r): (u64, u64)) {
        if let Some([dv, dr]) = self.dw(ptex) {
            dr.store(r.to_be(), Ordering::Release);
            dv.store(v.to_be(), Ordering::Release);
        }
    }

    /// Empties the entry, dword 0 (V) first.
    #[inline]
    pub fn clear(&self, ptex: u64) {
        if let Some([dv, dr]) = self.dw(ptex) {
            dv.store(0, Ordering::Release);
            dr.store(0, Ordering::Release);
        }
    }

    /// Removes the entry: clears dword 0 (V) first, then atomically takes
    /// dword 1, whose R and C the hardware may set until the entry is
    /// invalid (and, on a real CPU, until the tlbie completes). Returns the
    /// final dword 1; the entry is empty afterwards.
    #[inline]
    pub fn invalidate_take_r(&self, ptex: u64) -> u64 {
        match self.dw(ptex) {
            Some([dv, dr]) => {
                dv.store(0, Ordering::Release);
                u64::from_be(dr.swap(0, Ordering::AcqRel))
            }
            None => 0,
        }
    }

    /// Atomically ANDs dword 1 with `!bits`; returns the old dword 1.
    /// R, C, PP, N, WIMG and the key sit at the same place in both layouts.
    #[inline]
    pub fn clear_r_bits(&self, ptex: u64, bits: u64) -> u64 {
        match self.dw(ptex) {
            Some([_, dr]) => u64::from_be(dr.fetch_and((!bits).to_be(), Ordering::AcqRel)),
            None => 0,
        }
    }

    /// Atomically ORs `bits` into dword 1; returns the old dword 1.
    pub fn set_r_bits(&self, ptex: u64, bits: u64) -> u64 {
        match self.dw(ptex) {
            Some([_, dr]) => u64::from_be(dr.fetch_or(bits.to_be(), Ordering::AcqRel)),
            None => 0,
        }
    }

    /// Replaces the protection bits of dword 1 atomically, keeping whatever
    /// R/C the hardware sets meanwhile; returns the old dword 1.
    pub fn update_r(&self, ptex: u64, mask: u64, bits: u64) -> u64 {
        match self.dw(ptex) {
            Some([_, dr]) => {
                let old = dr.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    Some(((u64::from_be(w) & !mask) | (bits & mask)).to_be())
                });
                // The closure always returns Some.
                u64::from_be(old.unwrap_or_else(|w| w))
            }
            None => 0,
        }
    }

    /// Takes the per-HPTE lock bit if free; true on success.
    pub fn try_lock(&self, ptex: u64) -> bool {
        match self.dw(ptex) {
            Some([dv, _]) => {
                dv.fetch_or(HPTE_V_HVLOCK.to_be(), Ordering::Acquire) & HPTE_V_HVLOCK.to_be() == 0
            }
            None => false,
        }
    }

    /// Spins until the per-HPTE lock bit is ours.
    pub fn lock(&self, ptex: u64) {
        while self.dw(ptex).is_some() && !self.try_lock(ptex) {
            core::hint::spin_loop();
        }
    }

    /// Releases the per-HPTE lock bit.
    pub fn unlock(&self, ptex: u64) {
        if let Some([dv, _]) = self.dw(ptex) {
            dv.fetch_and((!HPTE_V_HVLOCK).to_be(), Ordering::Release);
        }
    }

    /// What hardware does on an access through the entry: sets R, and C on a
    /// store (only if the entry is valid). Returns whether it was valid.
    pub fn hardware_access(&self, ptex: u64, store: bool) -> bool {
        match self.load(ptex) {
            Some(h) if h.valid() => {
                self.set_r_bits(ptex, HPTE_R_R | if store { HPTE_R_C } else { 0 });
                true
            }
            _ => false,
        }
    }

    /// The MMU's hashed search of this table for `va` in a segment of base
    /// page size `1 << base_shift` (see [`search::search`]): the
    /// hardware-valid entry that translates it, if any.
    pub fn lookup(&self, va: &VirtAddr, base_shift: u32, sizes: &PageSizes) -> Option<Found> {
        search::search(self.geom.pteg_mask(), sizes, va, base_shift, |p| self.load(p))
    }

    /// What the MMU does on a load or store at `va` (privileged or problem
    /// state picks `key`, Ks or Kp of the segment): the hashed search, the
    /// PP check, then R (and C on a store) set atomically in the entry.
    /// No bit is set when the access faults.
    pub fn translate(
        &self,
        va: &VirtAddr,
        base_shift: u32,
        sizes: &PageSizes,
        store: bool,
        key: bool,
    ) -> Result<Translation, AccessFault> {
        let found = self.lookup(va, base_shift, sizes).ok_or(AccessFault::NoTranslation)?;
        let (load_ok, store_ok) = pp_allows(found.hpte.r, key);
        if !(if store { store_ok } else { load_ok }) {
            return Err(AccessFault::Protection(found.ptex));
        }
        self.set_r_bits(found.ptex, HPTE_R_R | if store { HPTE_R_C } else { 0 });
        Ok(Translation { ptex: found.ptex, real_address: found.real_address(va), size: found.size })
    }

    fn check(&self, ptex: u64) -> Result<(), HptError> {
        if self.geom.contains(ptex) {
            Ok(())
        } else {
            Err(HptError::Parameter)
        }
    }

    fn occupied(&self, ptex: u64) -> bool {
        self.load(ptex).is_some_and(|h| h.v & (HPTE_V_VALID | HPTE_V_ABSENT) != 0)
    }
}

impl HashTable for InMemoryHpt {
    fn pteg_mask(&self) -> u64 {
        self.geom.pteg_mask()
    }

    fn enter(&mut self, ptex: u64, hpte: Hpte, exact: bool) -> Result<u64, HptError> {
        self.check(ptex)?;
        let slot = if exact {
            if self.occupied(ptex) {
                return Err(HptError::PtegFull);
            }
            ptex
        } else {
            let g = ptex & !7;
            (g..g + 8).find(|&i| !self.occupied(i)).ok_or(HptError::PtegFull)?
        };
        let v = (hpte.v & !(HPTE_V_HVLOCK | HPTE_V_ABSENT)) | HPTE_V_VALID;
        self.store(slot, Hpte::new(v, hpte.r)).map_err(|_| HptError::Parameter)?;
        Ok(slot)
    }

    fn remove(&mut self, ptex: u64, cond: RemoveCond) -> Result<Hpte, HptError> {
        self.check(ptex)?;
        let h = self.load(ptex).unwrap_or_default();
        if !h.valid() || !cond.matches(h.v) {
            return Err(HptError::NotFound);
        }
        let r = self.invalidate_take_r(ptex);
        Ok(Hpte::new(h.v & !HPTE_V_HVLOCK, r))
    }

    fn read(&mut self, ptex: u64) -> Result<Hpte, HptError> {
        self.check(ptex)?;
        let h = self.load(ptex).unwrap_or_default();
        Ok(Hpte::new(h.v & !HPTE_V_HVLOCK, h.r))
    }

    fn protect(&mut self, ptex: u64, prot: Protection, avpn: Option<u64>) -> Result<(), HptError> {
        self.check(ptex)?;
        let h = self.load(ptex).unwrap_or_default();
        let cond = match avpn {
            Some(a) => RemoveCond::Avpn(a),
            None => RemoveCond::Absolute,
        };
        if !h.valid() || !cond.matches(h.v) {
            return Err(HptError::NotFound);
        }
        self.update_r(ptex, Protection::R_MASK, prot.r_bits());
        Ok(())
    }

    fn clear_ref(&mut self, ptex: u64) -> Result<u64, HptError> {
        self.check(ptex)?;
        if !self.load(ptex).unwrap_or_default().valid() {
            return Err(HptError::NotFound);
        }
        Ok(self.clear_r_bits(ptex, HPTE_R_R))
    }

    fn clear_mod(&mut self, ptex: u64) -> Result<u64, HptError> {
        self.check(ptex)?;
        if !self.load(ptex).unwrap_or_default().valid() {
            return Err(HptError::NotFound);
        }
        Ok(self.clear_r_bits(ptex, HPTE_R_C))
    }
}

/// The H_PROTECT flags for `prot`, with H_AVPN when `avpn` is given.
pub const fn h_protect_flags(prot: Protection, avpn: bool) -> u64 {
    prot.h_protect_flags() | if avpn { H_AVPN } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpte::{HPTE_R_M, HPTE_V_LARGE};

    fn table(format: HpteFormat) -> InMemoryHpt {
        InMemoryHpt::new(HptGeometry::from_pft_size(18).expect("valid"), format)
    }

    #[test]
    fn entries_are_big_endian_in_memory_in_both_layouts() {
        let mut t = table(HpteFormat::PreIsa300);
        let slot =
            t.enter(16, Hpte::new((1 << 62) | (0x55 << 7), 0x1234_5000 | HPTE_R_M), false).expect("free");
        let img = t.memory_image(slot).expect("in range");
        assert_eq!(img[0], 0x40, "B = 1 TB at the top byte of dword 0");
        assert_eq!(img[7], (0x55u64 << 7 | 1) as u8);
        assert_eq!(&img[8..], &(0x1234_5000u64 | HPTE_R_M).to_be_bytes());

        let mut t = table(HpteFormat::Isa300);
        let slot = t.enter(16, Hpte::new((1 << 62) | (0x55 << 7), 0x1234_5000), false).expect("free");
        let img = t.memory_image(slot).expect("in range");
        assert_eq!(img[0], 0x00, "ISA 3.0: dword 0 has no B");
        assert_eq!(img[8], 0x04, "ISA 3.0: B = 1 TB at dword 1 bits 4:5");
        assert_eq!(t.read(slot).expect("ok"), Hpte::new((1 << 62) | (0x55 << 7) | 1, 0x1234_5000));
    }

    #[test]
    fn base_address_names_the_live_storage_of_each_table() {
        let mut a = table(HpteFormat::PreIsa300);
        let b = table(HpteFormat::Isa300);
        let base = a.base_address();
        assert!(base != 0 && base % 8 == 0);
        // Two live tables of 2^18 bytes cannot overlap.
        assert!(base.abs_diff(b.base_address()) >= 1 << 18);
        a.enter(0, Hpte::new(0x80, HPTE_R_M), false).expect("free");
        assert_eq!(a.base_address(), base, "entering does not move the table");
    }

    #[test]
    fn enter_fills_the_group_then_reports_full() {
        let mut t = table(HpteFormat::PreIsa300);
        for i in 0..8 {
            assert_eq!(t.enter(8 + 3, Hpte::new(i << 7, 0), false), Ok(8 + i));
        }
        assert_eq!(t.enter(8, Hpte::new(0, 0), false), Err(HptError::PtegFull));
        assert_eq!(t.enter(8 + 5, Hpte::new(0, 0), true), Err(HptError::PtegFull));
        assert_eq!(t.enter(t.len(), Hpte::new(0, 0), false), Err(HptError::Parameter));
        assert_eq!(t.enter(16 + 5, Hpte::new(HPTE_V_LARGE, 0), true), Ok(16 + 5));
    }

    #[test]
    fn remove_honours_avpn_and_andcond_and_returns_rc() {
        let mut t = table(HpteFormat::PreIsa300);
        let s = t.enter(0, Hpte::new(0x80, 0x5000), false).expect("free");
        assert!(t.hardware_access(s, true));
        assert_eq!(t.remove(s, RemoveCond::Avpn(0x100)), Err(HptError::NotFound));
        assert_eq!(t.remove(s, RemoveCond::AndCond(0x80)), Err(HptError::NotFound));
        let old = t.remove(s, RemoveCond::Avpn(0x80)).expect("matches");
        assert_eq!(old, Hpte::new(0x81, 0x5000 | HPTE_R_R | HPTE_R_C));
        assert_eq!(t.remove(s, RemoveCond::Absolute), Err(HptError::NotFound));
        assert_eq!(t.read(s), Ok(Hpte::EMPTY));
    }

    #[test]
    fn protect_and_clears_keep_other_bits() {
        let mut t = table(HpteFormat::Isa300);
        let s = t.enter(0, Hpte::new(0x80, 0x5000 | HPTE_R_M | 2), false).expect("free");
        t.hardware_access(s, true);
        let prot = Protection { pp: 6, no_execute: true, key: 0x1f };
        t.protect(s, prot, Some(0x80)).expect("ok");
        let h = t.read(s).expect("ok");
        assert_eq!(h.pp(), 6);
        assert!(h.no_execute() && h.referenced() && h.changed());
        assert_eq!(h.key(), 0x1f);
        assert_eq!(Protection::from_h_protect_flags(prot.h_protect_flags()), prot);
        assert_eq!(t.clear_ref(s).map(|r| r & HPTE_R_R), Ok(HPTE_R_R));
        assert_eq!(t.clear_mod(s).map(|r| r & (HPTE_R_R | HPTE_R_C)), Ok(HPTE_R_C));
        assert!(!t.read(s).expect("ok").changed());
        assert_eq!(t.protect(s + 1, prot, None), Err(HptError::NotFound));
    }

    #[test]
    fn lock_bit_excludes_a_second_locker() {
        let t = table(HpteFormat::PreIsa300);
        assert!(t.try_lock(3));
        assert!(!t.try_lock(3));
        t.unlock(3);
        assert!(t.try_lock(3));
    }
}
