//! mmu-generic's [`MmuBackend`] over the platform's table: the reverse map (gfn → slots)
//! and guest view (dword 0, dword 1 without R/C) this kernel keeps for the entries it
//! made, on top of the crate's PAPR pass-through `PaprHpt`, which does the hypercalls
//! (including the H_CLEAR_REF / H_CLEAR_MOD fallback QEMU 7.2 needs: H_READ, H_REMOVE,
//! H_ENTER with H_EXACT into the same slot).
//!
//! This layer belongs in `arch-ppc-book3s` (NEEDS-FROM-ARCH-PPC.md, item 6): the crate's
//! `GuestHpt` is the back end for a table the hypervisor owns; nothing there yet keeps a
//! reverse map for a table reached by hypercall. It stays here, small, until it moves.
//!
//! TLB: every hypercall that weakens an entry (H_REMOVE, H_PROTECT) invalidates the
//! translation itself, so a flush token's flush is empty ([`HcallFlushed`]).

use crate::env::Env;
use crate::hpt::{self, Spapr, Table, Vpage};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use arch_ppc_book3s::papr::{HptError, RemoveCond};
use arch_ppc_book3s::table::{HashTable, Protection};
use core::cell::RefCell;
use mmu_generic::addr::{Gfn, GfnRange};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend, TlbFlush};
use mmu_generic::memslot::Memslot;
use mmu_generic::pte_list::PteHandle;

#[derive(Clone, Copy)]
struct Entry {
    v: u64,
    writable: bool,
    gfn: Gfn,
    npages: u64,
}

/// The back end.
pub struct PaprBackend {
    table: RefCell<Table>,
    entries: BTreeMap<u64, Entry>,
    rmap: BTreeMap<u64, Vec<u64>>,
    /// Entries placed in their secondary group after H_PTEG_FULL.
    pub secondary: u64,
}

/// TLB flush for a table maintained by hypercalls: nothing left to do.
pub struct HcallFlushed;

impl TlbFlush for HcallFlushed {
    fn flush_range(&mut self, _range: GfnRange) {}
    fn flush_all(&mut self) {}
}

fn prot(writable: bool) -> Protection {
    Protection { pp: if writable { hpt::PP_RW } else { hpt::PP_RO } as u8, no_execute: false, key: 0 }
}

impl PaprBackend {
    /// A back end over the platform's table.
    pub fn new(env: &Env) -> Self {
        Self {
            table: RefCell::new(Table::new(Spapr, env.hash_mask)),
            entries: BTreeMap::new(),
            rmap: BTreeMap::new(),
            secondary: 0,
        }
    }

    /// Whether the crate emulates (H_CLEAR_REF, H_CLEAR_MOD) because the platform lacks them.
    pub fn clears_emulated(&self) -> (bool, bool) {
        self.table.borrow().clear_calls_emulated()
    }

    /// Maps virtual page `vp` to guest frame `gfn` (real address gfn << 12):
    /// primary group first, the secondary on H_PTEG_FULL.
    pub fn map(&mut self, env: &Env, vp: Vpage, gfn: Gfn, writable: bool) -> Result<PteHandle, HptError> {
        let ps = vp.ps;
        let pp = if writable { hpt::PP_RW } else { hpt::PP_RO };
        let h = vp.hpte(&env.sizes, gfn.0 << 12, pp, false).ok_or(HptError::Parameter)?;
        let t = self.table.get_mut();
        let (slot, v) = match t.enter(vp.group(env.hash_mask, false) * 8, h, false) {
            Err(HptError::PtegFull) => {
                let h2 = vp.hpte(&env.sizes, gfn.0 << 12, pp, true).ok_or(HptError::Parameter)?;
                self.secondary += 1;
                (t.enter(vp.group(env.hash_mask, true) * 8, h2, false)?, h2.v)
            }
            other => (other?, h.v),
        };
        self.entries.insert(slot, Entry { v, writable, gfn, npages: 1 << (ps.shift - 12) });
        self.rmap.entry(gfn.0).or_default().push(slot);
        Ok(PteHandle(slot as u32))
    }

    /// The first entry mapping `gfn`.
    pub fn lookup(&self, gfn: Gfn) -> Option<PteHandle> {
        self.rmap.get(&gfn.0).and_then(|l| l.first()).map(|&p| PteHandle(p as u32))
    }

    /// Fault path of write-protect dirty tracking: grants write access again.
    pub fn make_writable(&mut self, h: PteHandle) -> bool {
        let slot = u64::from(h.0);
        let Some(e) = self.entries.get_mut(&slot) else { return false };
        if self.table.get_mut().protect(slot, prot(true), Some(hpt::avpn_arg(e.v))).is_err() {
            return false;
        }
        e.writable = true;
        true
    }

    /// Removes every entry; returns how many removals failed.
    pub fn zap_all(&mut self) -> u32 {
        let all: Vec<u64> = self.entries.keys().copied().collect();
        let mut failed = 0;
        for slot in all {
            let mut t = FlushToken::new();
            if self.zap(PteHandle(slot as u32), &mut t).is_none() {
                failed += 1;
            }
            t.flush(&mut HcallFlushed);
        }
        failed
    }

    /// The entry in `slot` if it still holds ours: (guest view, live R/C bits).
    fn live(&self, slot: u64) -> Option<(Entry, u64)> {
        let e = *self.entries.get(&slot)?;
        let h = self.table.borrow_mut().read(slot).ok()?;
        (h.valid() && hpt::avpn_arg(h.v) == hpt::avpn_arg(e.v)).then_some((e, h.r & 0x180))
    }

    fn leaf_of(e: &Entry, rc: u64) -> Leaf {
        Leaf {
            gfn: e.gfn,
            npages: e.npages,
            writable: e.writable,
            young: rc & 0x100 != 0,
            dirty: rc & 0x80 != 0,
            access_tracked: false,
        }
    }
}

impl MmuBackend for PaprBackend {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: true, dirty_bit: true }
    }

    fn for_each_leaf(&self, slot: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        let Some(r) = gfns.intersect(&slot.gfns()) else { return };
        // Large leaves are keyed by their first frame: look back one 16M page.
        for (_, list) in self.rmap.range(r.start.0.saturating_sub(4095)..r.end.0) {
            for &s in list {
                let e = self.entries[&s];
                if e.gfn.0 + e.npages > r.start.0 {
                    f(PteHandle(s as u32));
                }
            }
        }
    }

    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        self.live(u64::from(h.0)).map(|(e, rc)| Self::leaf_of(&e, rc))
    }

    fn write_protect(&mut self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        let Some(e) = self.entries.get_mut(&slot) else { return false };
        let was = e.writable;
        if was && self.table.get_mut().protect(slot, prot(false), Some(hpt::avpn_arg(e.v))).is_ok() {
            e.writable = false;
        }
        was
    }

    fn clear_dirty(&self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        self.live(slot).is_some_and(|(_, rc)| rc & 0x80 != 0)
            && self.table.borrow_mut().clear_mod(slot).is_ok_and(|old_r| old_r & 0x80 != 0)
    }

    fn clear_young(&self, h: PteHandle, _flush: &mut FlushToken) -> bool {
        let slot = u64::from(h.0);
        self.live(slot).is_some_and(|(_, rc)| rc & 0x100 != 0)
            && self.table.borrow_mut().clear_ref(slot).is_ok_and(|old_r| old_r & 0x100 != 0)
    }

    fn split_huge(&mut self, h: PteHandle, flush: &mut FlushToken) -> Result<(), BackendError> {
        // An HPTE cannot be split in place: zap it, the next fault maps small pages.
        self.zap(h, flush).map(|_| ()).ok_or(BackendError::NotALeaf(h))
    }

    fn zap(&mut self, h: PteHandle, flush: &mut FlushToken) -> Option<Leaf> {
        let slot = u64::from(h.0);
        let e = *self.entries.get(&slot)?;
        let old = self.table.get_mut().remove(slot, RemoveCond::Avpn(hpt::avpn_arg(e.v))).ok()?;
        self.entries.remove(&slot);
        if let Some(list) = self.rmap.get_mut(&e.gfn.0) {
            list.retain(|&p| p != slot);
            if list.is_empty() {
                self.rmap.remove(&e.gfn.0);
            }
        }
        flush.add_range(GfnRange { start: e.gfn, end: Gfn(e.gfn.0 + e.npages) });
        Some(Self::leaf_of(&e, old.r & 0x180))
    }
}
