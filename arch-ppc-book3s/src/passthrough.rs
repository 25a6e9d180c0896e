//! A hashed page table reached by PAPR hypercalls: what a pseries guest
//! kernel uses (the ppc64 QEMU boot image), generic over the embedder's
//! [`Hcall`] (only the kernel has the `sc 1` instruction).
//!
//! Platform quirks handled (measured on QEMU 7.2, DESIGN.md section 8):
//!
//! * **H_CLEAR_REF and H_CLEAR_MOD answer H_FUNCTION.** The first such
//!   answer switches the call to a fallback for the rest of the table's life:
//!   H_READ the entry, H_REMOVE it with H_AVPN (which returns the final R and
//!   C), and H_ENTER it again with H_EXACT into the same slot with the bit
//!   cleared. Between the remove and the enter the translation is missing: an
//!   access by another CPU in that window takes a storage interrupt and must
//!   be retried by its handler. The old dword 1 returned is the one H_REMOVE
//!   gave back, so no R/C set before the removal is lost.
//! * **Bit 0x40 of dword 0** is set by QEMU in every slot it writes (empty
//!   slots read back 0x40): only V is tested, AVPNs are compared masked with
//!   `!0x7f`, and the bit is dropped before an entry is re-entered.
//! * **H_BULK_REMOVE R/C** come back at `0x000c_0000_0000_0000` from QEMU
//!   instead of PAPR's `0x0c00_0000_0000_0000`: both are read.
//! * RAM must be mapped with WIMG = M exactly (callers build dword 1 so).

use crate::hpte::{Hpte, HPTE_R_C, HPTE_R_R, HPTE_V_ABSENT, HPTE_V_HVLOCK};
use crate::papr::{
    BulkOutcome, BulkRequest, Hcall, HptError, RemoveCond, BULK_END, BULK_MAX, H_AVPN, H_BULK_REMOVE,
    H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_EXACT, H_PROTECT, H_READ, H_READ_4, H_REMOVE,
};
use crate::table::{BulkResult, HashTable, Protection};

/// Whether the platform implements a call (learned from its first answer).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
enum Support {
    #[default]
    Unknown,
    Yes,
    No,
}

/// A hashed page table owned by the hypervisor and driven by hypercall.
#[derive(Debug)]
pub struct PaprHpt<H: Hcall> {
    h: H,
    pteg_mask: u64,
    clear_ref: Support,
    clear_mod: Support,
}

impl<H: Hcall> PaprHpt<H> {
    /// A pass-through for a table of `pteg_mask + 1` PTEGs (from
    /// `ibm,pft-size`, see [`HptGeometry`](crate::hash::HptGeometry)).
    pub fn new(h: H, pteg_mask: u64) -> Self {
        Self { h, pteg_mask, clear_ref: Support::Unknown, clear_mod: Support::Unknown }
    }

    /// The embedder's hypercall function.
    pub fn hcall_mut(&mut self) -> &mut H {
        &mut self.h
    }

    /// Whether H_CLEAR_REF / H_CLEAR_MOD are emulated by the
    /// read-remove-enter fallback (known after the first call).
    pub fn clear_calls_emulated(&self) -> (bool, bool) {
        (self.clear_ref == Support::No, self.clear_mod == Support::No)
    }

    fn call(&mut self, opcode: u64, args: &[u64]) -> Result<[u64; 8], HptError> {
        self.h.hcall(opcode, args).result()
    }

    /// Clears `bit` of dword 1 by removing and re-entering the entry.
    fn clear_by_reenter(&mut self, ptex: u64, bit: u64) -> Result<u64, HptError> {
        let cur = self.read(ptex)?;
        if !cur.valid() {
            return Err(HptError::NotFound);
        }
        let old = self.remove(ptex, RemoveCond::Avpn(cur.v & !0x7f))?;
        let v = old.v & !(HPTE_V_HVLOCK | HPTE_V_ABSENT);
        self.enter(ptex, Hpte::new(v, old.r & !bit), true)?;
        Ok(old.r)
    }

    fn clear(&mut self, ptex: u64, opcode: u64, bit: u64) -> Result<u64, HptError> {
        let support = if opcode == H_CLEAR_REF { self.clear_ref } else { self.clear_mod };
        if support != Support::No {
            match self.call(opcode, &[0, ptex]) {
                Err(HptError::Function) => {}
                other => {
                    if other.is_ok() {
                        self.set_support(opcode, Support::Yes);
                    }
                    return other.map(|r| r[0]);
                }
            }
            self.set_support(opcode, Support::No);
        }
        self.clear_by_reenter(ptex, bit)
    }

    fn set_support(&mut self, opcode: u64, s: Support) {
        if opcode == H_CLEAR_REF {
            self.clear_ref = s;
        } else {
            self.clear_mod = s;
        }
    }
}

impl<H: Hcall> HashTable for PaprHpt<H> {
    fn pteg_mask(&self) -> u64 {
        self.pteg_mask
    }

    fn enter(&mut self, ptex: u64, hpte: Hpte, exact: bool) -> Result<u64, HptError> {
        let flags = if exact { H_EXACT } else { 0 };
        self.call(H_ENTER, &[flags, ptex, hpte.v, hpte.r]).map(|r| r[0])
    }

    fn remove(&mut self, ptex: u64, cond: RemoveCond) -> Result<Hpte, HptError> {
        let (flags, arg) = cond.h_remove_args();
        self.call(H_REMOVE, &[flags, ptex, arg]).map(|r| Hpte::new(r[0], r[1]))
    }

    fn read(&mut self, ptex: u64) -> Result<Hpte, HptError> {
        self.call(H_READ, &[0, ptex]).map(|r| Hpte::new(r[0], r[1]))
    }

    fn read4(&mut self, ptex: u64) -> Result<[Hpte; 4], HptError> {
        let r = self.call(H_READ, &[H_READ_4, ptex])?;
        Ok([Hpte::new(r[0], r[1]), Hpte::new(r[2], r[3]), Hpte::new(r[4], r[5]), Hpte::new(r[6], r[7])])
    }

    fn protect(&mut self, ptex: u64, prot: Protection, avpn: Option<u64>) -> Result<(), HptError> {
        let flags = prot.h_protect_flags() | if avpn.is_some() { H_AVPN } else { 0 };
        self.call(H_PROTECT, &[flags, ptex, avpn.unwrap_or(0)]).map(|_| ())
    }

    fn clear_ref(&mut self, ptex: u64) -> Result<u64, HptError> {
        self.clear(ptex, H_CLEAR_REF, HPTE_R_R)
    }

    fn clear_mod(&mut self, ptex: u64) -> Result<u64, HptError> {
        self.clear(ptex, H_CLEAR_MOD, HPTE_R_C)
    }

    fn bulk_remove(&mut self, reqs: &[BulkRequest]) -> BulkResult {
        let mut out = BulkResult { outcomes: [BulkOutcome::NotProcessed; BULK_MAX], status: Ok(()) };
        if reqs.len() > BULK_MAX {
            out.status = Err(HptError::Parameter);
            return out;
        }
        let mut args = [0u64; 8];
        for (i, r) in reqs.iter().enumerate() {
            let [a, b] = r.encode();
            args[2 * i] = a;
            args[2 * i + 1] = b;
        }
        if reqs.len() < BULK_MAX {
            args[2 * reqs.len()] = BULK_END;
        }
        let ret = self.h.hcall(H_BULK_REMOVE, &args);
        for (o, w) in out.outcomes.iter_mut().zip(ret.ret.chunks_exact(2)).take(reqs.len()) {
            *o = BulkOutcome::decode(w[0]);
        }
        out.status = ret.result().map(|_| ());
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guest::{GuestConfig, GuestHpt, HcallServer, NoTlb, WimgPolicy};
    use crate::hash::HptGeometry;
    use crate::hpte::{HpteFormat, HPTE_R_M, HPTE_V_VALID};
    use crate::pagesize::PageSizes;
    use crate::papr::{HcallReturn, BULK_RC, BULK_RC_QEMU, H_FUNCTION};
    use mmu_generic::addr::{Gfn, Hva};
    use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

    fn guest() -> GuestHpt {
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty())).expect("ok");
        let cfg = GuestConfig {
            geometry: HptGeometry::from_pft_size(18).expect("ok"),
            format: HpteFormat::Isa300,
            sizes: PageSizes::qemu_pseries_default(),
            wimg: WimgPolicy::RequireM,
        };
        GuestHpt::new(cfg, b.build().expect("ok"), crate::guest::HvaIdentity).expect("ok")
    }

    /// Plays QEMU 7.2 in front of a guest table: no H_CLEAR_REF/H_CLEAR_MOD,
    /// bit 0x40 in dword 0 of what it returns, bulk R/C at QEMU's position.
    pub(crate) struct Qemu<'a> {
        pub(crate) inner: HcallServer<'a, crate::guest::HvaIdentity, NoTlb>,
        pub(crate) calls: usize,
    }

    impl Hcall for Qemu<'_> {
        fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
            self.calls += 1;
            if opcode == H_CLEAR_REF || opcode == H_CLEAR_MOD {
                return HcallReturn { status: H_FUNCTION, ret: [0; 8] };
            }
            let mut r = self.inner.hcall(opcode, args);
            match opcode {
                H_READ => {
                    for i in 0..4 {
                        r.ret[2 * i] |= 0x40;
                    }
                }
                H_REMOVE => r.ret[0] |= 0x40,
                H_BULK_REMOVE => {
                    for i in 0..4 {
                        let rc = (r.ret[2 * i] & BULK_RC) >> 51;
                        r.ret[2 * i] = (r.ret[2 * i] & !BULK_RC) | (rc << 43);
                    }
                }
                _ => {}
            }
            r
        }
    }

    #[test]
    fn clear_ref_and_mod_fall_back_to_remove_and_reenter_on_h_function() {
        let mut g = guest();
        let mut tlb = NoTlb;
        let v = 0x1234 << 7;
        let r = 0x5000 | HPTE_R_M | 2;
        let slot;
        {
            let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
            let mut t = PaprHpt::new(q, 0x7ff);
            slot = t.enter(8, Hpte::new(v, r), false).expect("entered");
            assert_eq!(slot, 8);
        }
        assert!(g.table().hardware_access(slot, true));
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut t = PaprHpt::new(q, 0x7ff);
        let old = t.clear_mod(slot).expect("emulated");
        assert_eq!(old & (HPTE_R_R | HPTE_R_C), HPTE_R_R | HPTE_R_C);
        assert_eq!(t.clear_calls_emulated(), (false, true));
        let now = t.read(slot).expect("ok");
        assert!(now.v & HPTE_V_VALID != 0 && now.referenced() && !now.changed());
        assert_eq!(now.v & !0x7f, v, "same AVPN once 0x40 is masked");
        let old = t.clear_ref(slot).expect("emulated");
        assert!(old & HPTE_R_R != 0);
        assert!(!t.read(slot).expect("ok").referenced());
        // Known unsupported: the next clear goes straight to the fallback.
        let before = t.hcall_mut().calls;
        t.clear_ref(slot).expect("emulated");
        assert_eq!(t.hcall_mut().calls - before, 3, "read, remove, enter");
        assert_eq!(t.clear_ref(slot + 1), Err(HptError::NotFound));
    }

    #[test]
    fn bulk_remove_reads_rc_at_the_qemu_position_too() {
        let mut g = guest();
        let mut tlb = NoTlb;
        for (i, gpa) in [(0u64, 0x1000u64), (1, 0x2000)] {
            let mut f = mmu_generic::backend::FlushToken::new();
            let r = g.hcall(H_ENTER, &[0, 16, (0x40 + i) << 7, gpa | HPTE_R_M], &mut f);
            assert_eq!(r.status, 0);
            f.flush(&mut tlb);
        }
        g.table().hardware_access(16, true);
        let q = Qemu { inner: HcallServer { hpt: &mut g, tlb: &mut tlb }, calls: 0 };
        let mut t = PaprHpt::new(q, 0x7ff);
        let res = t.bulk_remove(&[
            BulkRequest { ptex: 16, cond: RemoveCond::Absolute },
            BulkRequest { ptex: 17, cond: RemoveCond::Avpn(0x99 << 7) },
            BulkRequest { ptex: 18, cond: RemoveCond::Absolute },
        ]);
        assert_eq!(res.status, Ok(()));
        assert_eq!(res.outcomes[0], BulkOutcome::Removed { rc: HPTE_R_R | HPTE_R_C });
        assert_eq!(res.outcomes[1], BulkOutcome::NotFound);
        assert_eq!(res.outcomes[2], BulkOutcome::NotFound);
        assert_eq!(res.outcomes[3], BulkOutcome::NotProcessed);
        let _ = BULK_RC_QEMU;
    }

    #[test]
    fn platform_errors_come_back_typed() {
        let mut g = guest();
        let mut tlb = NoTlb;
        let mut t = PaprHpt::new(HcallServer { hpt: &mut g, tlb: &mut tlb }, 0x7ff);
        // WIMG other than M for RAM.
        assert_eq!(t.enter(0, Hpte::new(0, 0x1000), false), Err(HptError::Parameter));
        // Outside guest memory.
        assert_eq!(t.enter(0, Hpte::new(0, 0x1000_0000 | HPTE_R_M), false), Err(HptError::Parameter));
        assert_eq!(t.remove(0, RemoveCond::Absolute), Err(HptError::NotFound));
        let s = t.enter(0, Hpte::new(0x80, 0x1000 | HPTE_R_M), true).expect("ok");
        assert_eq!(t.enter(s, Hpte::new(0x100, 0x2000 | HPTE_R_M), true), Err(HptError::PtegFull));
        t.protect(s, Protection { pp: 3, no_execute: false, key: 0 }, Some(0x80)).expect("ok");
        assert_eq!(t.read4(s).expect("ok")[0].pp(), 3);
        assert_eq!(t.protect(s, Protection::default(), Some(0x100)), Err(HptError::NotFound));
        assert_eq!(t.clear_ref(s).map(|r| r & HPTE_R_R), Ok(0));
        assert_eq!(t.clear_calls_emulated(), (false, false));
    }
}
