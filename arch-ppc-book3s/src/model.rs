//! A plain model of the hypercall surface: the guest's view of its table as
//! a `BTreeMap` from HPTE index to (dword 0, dword 1), with the PAPR rules
//! written out straightforwardly. Tests and the fuzz target run random
//! hypercall sequences against it and [`GuestHpt`](crate::guest::GuestHpt)
//! and require identical answers.
//!
//! The model knows nothing of host frames, the reverse map or absent
//! entries: the host's zaps and re-faults must be invisible to the guest.
//! It assumes the identity resolver ([`HvaIdentity`](crate::guest::HvaIdentity))
//! and host addresses that fit every RPN field.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::guest::{same_virtual_page, WimgPolicy, H_ENTER_FLAGS};
use crate::hpte::{
    Hpte, HpteFormat, HPTE_R_C, HPTE_R_M, HPTE_R_R, HPTE_R_TS, HPTE_R_WIMG, HPTE_V_ABSENT, HPTE_V_AVPN,
    HPTE_V_COMMON_BITS, HPTE_V_HVLOCK, HPTE_V_VALID,
};
use crate::pagesize::PageSizes;
use crate::papr::{
    HcallReturn, HptError, RemoveCond, BULK_END, BULK_FLAGS, BULK_NOT_FOUND, BULK_PARM, BULK_PTEX,
    BULK_REQUEST, BULK_RESPONSE, BULK_TYPE, H_ANDCOND, H_AVPN, H_BULK_REMOVE, H_CLEAR_MOD, H_CLEAR_REF,
    H_ENTER, H_EXACT, H_FUNCTION, H_PROTECT, H_PROTECT_BITS, H_READ, H_READ_4, H_REMOVE,
};
use crate::table::Protection;

/// One guest memory range of the model: `[base_gfn, base_gfn + npages)` at
/// host-virtual `hva`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ModelSlot {
    /// First guest frame.
    pub base_gfn: u64,
    /// Number of 4 KiB frames.
    pub npages: u64,
    /// Host-virtual address of the first frame.
    pub hva: u64,
}

/// The plain model of a guest's HPT.
#[derive(Clone, Debug)]
pub struct HptModel {
    /// Guest view of every occupied slot: index → (dword 0, dword 1).
    pub entries: BTreeMap<u64, (u64, u64)>,
    hptes: u64,
    mask: u64,
    sizes: PageSizes,
    slots: Vec<ModelSlot>,
    format: HpteFormat,
    wimg: WimgPolicy,
}

fn err(e: HptError) -> HcallReturn {
    HcallReturn::err(e)
}

impl HptModel {
    /// An empty table of `hptes` entries.
    pub fn new(
        hptes: u64,
        sizes: PageSizes,
        slots: Vec<ModelSlot>,
        format: HpteFormat,
        wimg: WimgPolicy,
    ) -> Self {
        Self { entries: BTreeMap::new(), hptes, mask: hptes / 8 - 1, sizes, slots, format, wimg }
    }

    fn page_in_memory(&self, gfn: u64, npages: u64) -> bool {
        self.slots.iter().any(|s| {
            gfn >= s.base_gfn
                && gfn - s.base_gfn + npages <= s.npages
                && gfn % npages == 0
                && (s.hva + ((gfn - s.base_gfn) << 12)) % (npages << 12) == 0
        })
    }

    /// What hardware does on an access: sets R, and C on a store.
    pub fn touch(&mut self, ptex: u64, store: bool) {
        if let Some(e) = self.entries.get_mut(&ptex) {
            e.1 |= HPTE_R_R | if store { HPTE_R_C } else { 0 };
        }
    }

    /// Answers hypercall `opcode` with r4.. in `args`.
    pub fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
        let mut a = [0u64; 8];
        for (d, s) in a.iter_mut().zip(args) {
            *d = *s;
        }
        match opcode {
            H_ENTER => self.enter(a[0], a[1], a[2], a[3]),
            H_REMOVE => self.remove(a[0], a[1], a[2]),
            H_READ => self.read(a[0], a[1]),
            H_PROTECT => self.protect(a[0], a[1], a[2]),
            H_CLEAR_REF => self.clear(a[0], a[1], HPTE_R_R),
            H_CLEAR_MOD => self.clear(a[0], a[1], HPTE_R_C),
            H_BULK_REMOVE => self.bulk(a),
            _ => HcallReturn { status: H_FUNCTION, ret: [0; 8] },
        }
    }

    fn enter(&mut self, flags: u64, ptex: u64, pteh: u64, ptel: u64) -> HcallReturn {
        if flags & !H_ENTER_FLAGS != 0 || ptex >= self.hptes || pteh >> 62 > 1 || ptel & HPTE_R_TS != 0 {
            return err(HptError::Parameter);
        }
        if self.format == HpteFormat::Isa300 && pteh & HPTE_V_AVPN & !HPTE_V_COMMON_BITS != 0 {
            return err(HptError::Parameter);
        }
        let v = (pteh & !(HPTE_V_HVLOCK | HPTE_V_ABSENT)) | HPTE_V_VALID;
        let Some(ps) = self.sizes.decode(v, ptel) else { return err(HptError::Parameter) };
        let gfn = Hpte::new(v, ptel).real_address(ps.actual_shift) >> 12;
        if !self.page_in_memory(gfn, ps.npages()) {
            return err(HptError::Parameter);
        }
        if self.wimg == WimgPolicy::RequireM && ptel & HPTE_R_WIMG != HPTE_R_M {
            return err(HptError::Parameter);
        }
        let g = ptex >> 3;
        for grp in [g, g ^ self.mask] {
            for (&i, &(ev, er)) in self.entries.range(grp * 8..grp * 8 + 8) {
                if let Some(eps) = self.sizes.decode(ev, er) {
                    if same_virtual_page(
                        self.mask,
                        (ptex, Hpte::new(v, ptel), ps),
                        (i, Hpte::new(ev, er), eps),
                    ) {
                        return err(HptError::Parameter);
                    }
                }
            }
        }
        let slot = if flags & H_EXACT != 0 {
            if self.entries.contains_key(&ptex) {
                return err(HptError::PtegFull);
            }
            ptex
        } else {
            match (ptex & !7..(ptex & !7) + 8).find(|i| !self.entries.contains_key(i)) {
                Some(s) => s,
                None => return err(HptError::PtegFull),
            }
        };
        self.entries.insert(slot, (v, ptel));
        HcallReturn::ok([slot, 0, 0, 0, 0, 0, 0, 0])
    }

    fn remove(&mut self, flags: u64, ptex: u64, avpn: u64) -> HcallReturn {
        if flags & !(H_AVPN | H_ANDCOND) != 0 || ptex >= self.hptes {
            return err(HptError::Parameter);
        }
        let Some(&(v, r)) = self.entries.get(&ptex) else { return err(HptError::NotFound) };
        if (flags & H_AVPN != 0 && v & !0x7f != avpn) || (flags & H_ANDCOND != 0 && v & avpn != 0) {
            return err(HptError::NotFound);
        }
        self.entries.remove(&ptex);
        HcallReturn::ok([v, r, 0, 0, 0, 0, 0, 0])
    }

    fn read(&self, flags: u64, ptex: u64) -> HcallReturn {
        if flags & !H_READ_4 != 0 || ptex >= self.hptes {
            return err(HptError::Parameter);
        }
        let (base, n) = if flags & H_READ_4 != 0 { (ptex & !3, 4) } else { (ptex, 1) };
        let mut out = [0u64; 8];
        for i in 0..n {
            let (v, r) = self.entries.get(&(base + i)).copied().unwrap_or((0, 0));
            out[2 * i as usize] = v;
            out[2 * i as usize + 1] = r;
        }
        HcallReturn::ok(out)
    }

    fn protect(&mut self, flags: u64, ptex: u64, avpn: u64) -> HcallReturn {
        if flags & !(H_AVPN | H_PROTECT_BITS) != 0 || ptex >= self.hptes {
            return err(HptError::Parameter);
        }
        let Some(e) = self.entries.get_mut(&ptex) else { return err(HptError::NotFound) };
        if flags & H_AVPN != 0 && e.0 & !0x7f != avpn {
            return err(HptError::NotFound);
        }
        e.1 = (e.1 & !Protection::R_MASK) | Protection::from_h_protect_flags(flags).r_bits();
        HcallReturn::ok([0; 8])
    }

    fn clear(&mut self, flags: u64, ptex: u64, bit: u64) -> HcallReturn {
        if flags != 0 || ptex >= self.hptes {
            return err(HptError::Parameter);
        }
        let Some(e) = self.entries.get_mut(&ptex) else { return err(HptError::NotFound) };
        let old = e.1;
        e.1 &= !bit;
        HcallReturn::ok([old, 0, 0, 0, 0, 0, 0, 0])
    }

    fn bulk(&mut self, mut a: [u64; 8]) -> HcallReturn {
        for i in 0..4 {
            let (tsh, tsl) = (a[2 * i], a[2 * i + 1]);
            if tsh & BULK_TYPE == BULK_END {
                break;
            }
            let flags = tsh & BULK_FLAGS;
            let ptex = tsh & BULK_PTEX;
            let base = BULK_RESPONSE | flags | ptex;
            if tsh & BULK_TYPE != BULK_REQUEST || flags == BULK_FLAGS || ptex >= self.hptes {
                a[2 * i] = base | BULK_PARM;
                return HcallReturn { status: HptError::Parameter.status(), ret: a };
            }
            let cond = match flags >> 56 {
                1 => RemoveCond::AndCond(tsl),
                2 => RemoveCond::Avpn(tsl),
                _ => RemoveCond::Absolute,
            };
            a[2 * i] = match self.entries.get(&ptex).copied() {
                Some((v, r)) if cond.matches(v) => {
                    self.entries.remove(&ptex);
                    base | ((r & (HPTE_R_R | HPTE_R_C)) << 51)
                }
                _ => base | BULK_NOT_FOUND,
            };
        }
        HcallReturn::ok(a)
    }
}

/// One step of a fuzzed sequence: a guest hypercall, a hardware access, or
/// a host-side action the guest must not notice.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum HcallOp {
    /// H_ENTER of a 4 KiB page (`large` false) or a 64 KiB page.
    Enter {
        /// H_EXACT.
        exact: bool,
        /// HPTE index (reduced modulo twice the table size).
        ptex: u16,
        /// Small AVPN, so that duplicates and AVPN matches happen.
        avpn: u8,
        /// L bit with the 64 KiB encoding.
        large: bool,
        /// H bit.
        secondary: bool,
        /// Guest frame (may fall outside memory).
        gfn: u16,
        /// WIMG bits.
        wimg: u8,
        /// PP bits.
        pp: u8,
    },
    /// Any hypercall with raw arguments (opcode reduced to the HPT calls and one unknown).
    Raw {
        /// Selects the opcode.
        op: u8,
        /// r4..r11.
        args: [u64; 8],
    },
    /// H_REMOVE / H_PROTECT / H_CLEAR_REF / H_CLEAR_MOD / H_READ on a small index.
    Small {
        /// Selects the opcode.
        op: u8,
        /// Flags.
        flags: u64,
        /// HPTE index.
        ptex: u16,
        /// AVPN or mask.
        avpn: u16,
    },
    /// Hardware access through an entry.
    Touch {
        /// HPTE index.
        ptex: u16,
        /// A store (sets C).
        store: bool,
    },
    /// Host zaps, write-protects or harvests the leaves of a guest range.
    Host {
        /// 0 zap, 1 write-protect, 2 clear dirty, 3 clear young, 4 split.
        what: u8,
        /// First guest frame.
        gfn: u16,
        /// Frames.
        len: u8,
    },
}

/// Why a checked sequence failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SequenceError {
    /// The table and the model answered a hypercall differently.
    Mismatch {
        /// Step number.
        step: usize,
        /// Opcode.
        opcode: u64,
        /// The table's answer, then the model's.
        answers: alloc::boxed::Box<(HcallReturn, HcallReturn)>,
    },
    /// An invariant broke.
    Invariant(usize, crate::guest::Violation),
    /// An absent entry could not be faulted back in.
    FaultIn(usize, HptError),
}

/// Runs `ops` against a fresh [`GuestHpt`](crate::guest::GuestHpt) (2^14
/// entries, two memslots: 4 MiB read-write at 0 and 1 MiB read-only at
/// 256 MiB) and the model, comparing every answer and checking invariants.
pub fn check_sequence(format: HpteFormat, wimg: WimgPolicy, ops: &[HcallOp]) -> Result<(), SequenceError> {
    use crate::guest::{GuestConfig, GuestHpt, HvaIdentity};
    use crate::hash::HptGeometry;
    use crate::hpte::{HPTE_V_LARGE, HPTE_V_SECONDARY};
    use mmu_generic::addr::{Gfn, GfnRange, Hva};
    use mmu_generic::backend::{FlushToken, MmuBackend};
    use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

    let sizes = PageSizes::qemu_pseries_default();
    let geometry = HptGeometry::from_pft_size(18).expect("valid size");
    let slots = [
        (0u64, 1024u64, 0x4000_0000u64, SlotFlags::DIRTY_LOG),
        (0x10000, 256, 0x8000_0000, SlotFlags::READONLY),
    ];
    let mut b = MemslotsBuilder::new();
    for (i, &(base, n, hva, fl)) in slots.iter().enumerate() {
        b.create(Memslot::new(SlotId(i as u16), Gfn(base), n, Hva(hva), fl)).expect("valid slot");
    }
    let memslots = b.build().expect("valid slots");
    let slot0 = *memslots.iter().next().expect("two slots");
    let cfg = GuestConfig { geometry, format, sizes, wimg };
    let mut g = GuestHpt::new(cfg, memslots, HvaIdentity).expect("valid table");
    let model_slots =
        slots.iter().map(|&(base_gfn, npages, hva, _)| ModelSlot { base_gfn, npages, hva }).collect();
    let mut m = HptModel::new(geometry.hptes(), sizes, model_slots, format, wimg);
    let n = geometry.hptes();
    const OPS: [u64; 8] =
        [H_ENTER, H_REMOVE, H_READ, H_PROTECT, H_CLEAR_REF, H_CLEAR_MOD, H_BULK_REMOVE, 0x28];
    for (step, op) in ops.iter().enumerate() {
        let call = match *op {
            HcallOp::Enter { exact, ptex, avpn, large, secondary, gfn, wimg, pp } => {
                let gfn = u64::from(gfn) % 0x10200;
                let gfn = if large { gfn & !0xf } else { gfn };
                let v = (u64::from(avpn) << 7)
                    | if large { HPTE_V_LARGE } else { 0 }
                    | if secondary { HPTE_V_SECONDARY } else { 0 };
                let r = (gfn << 12)
                    | if large { 0x1000 } else { 0 }
                    | (u64::from(wimg & 0xf) << 3)
                    | u64::from(pp & 3);
                Some((
                    H_ENTER,
                    [if exact { H_EXACT } else { 0 }, u64::from(ptex) % (2 * n), v, r, 0, 0, 0, 0],
                ))
            }
            HcallOp::Raw { op, args } => Some((OPS[usize::from(op) % OPS.len()], args)),
            HcallOp::Small { op, flags, ptex, avpn } => {
                let opcode = OPS[1 + usize::from(op) % 5];
                Some((opcode, [flags, u64::from(ptex) % (2 * n), u64::from(avpn) << 7, 0, 0, 0, 0, 0]))
            }
            HcallOp::Touch { ptex, store } => {
                let p = u64::from(ptex) % n;
                if m.entries.contains_key(&p) {
                    if !g.table().hardware_access(p, store) {
                        g.fault_in(p).map_err(|e| SequenceError::FaultIn(step, e))?;
                        g.table().hardware_access(p, store);
                    }
                    m.touch(p, store);
                }
                None
            }
            HcallOp::Host { what, gfn, len } => {
                let start = u64::from(gfn) % 1024;
                let range = GfnRange { start: Gfn(start), end: Gfn(start + u64::from(len) + 1) };
                let mut hs = alloc::vec::Vec::new();
                g.for_each_leaf(&slot0, range, &mut |h| hs.push(h));
                let mut f = FlushToken::new();
                for h in hs {
                    match what % 5 {
                        0 => drop(g.zap(h, &mut f)),
                        1 => drop(g.write_protect(h, &mut f)),
                        2 => drop(g.clear_dirty(h, &mut f)),
                        3 => drop(g.clear_young(h, &mut f)),
                        _ => drop(g.split_huge(h, &mut f)),
                    }
                }
                // The model has no TLB: the table is the translation.
                f.flush(&mut mmu_generic::backend::NoTlb);
                None
            }
        };
        if let Some((opcode, args)) = call {
            let mut f = FlushToken::new();
            let got = g.hcall(opcode, &args, &mut f);
            // The model has no TLB: the table is the translation.
            f.flush(&mut mmu_generic::backend::NoTlb);
            let want = m.hcall(opcode, &args);
            if got != want {
                return Err(SequenceError::Mismatch {
                    step,
                    opcode,
                    answers: alloc::boxed::Box::new((got, want)),
                });
            }
        }
        if step % 8 == 7 || step + 1 == ops.len() {
            g.check_invariants().map_err(|v| SequenceError::Invariant(step, v))?;
        }
    }
    Ok(())
}
