//! The platform as a suite [`Machine`]: the crate's PAPR pass-through back end
//! (`arch_ppc_book3s::papr_backend::PaprBackend`) over QEMU's hashed page table, accesses made by this CPU through its MMU (relocation on), write-protect
//! faults taken at the real-mode DSI vector and resolved there through the dirty log.

use crate::env::Env;
use crate::hcall::{self, H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_REMOVE};
use crate::hpt::{Spapr, Table, Vpage};
use crate::suite::{gfn_of, Machine, NPAGES};
use crate::trap::{self, probe_load, probe_store, Resume, DSISR_PROTFAULT, DSISR_STORE, VEC_DSI};
use crate::vectors::TrapFrame;
use arch_ppc_book3s::guest::NoTlb;
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::papr_backend::PaprBackend;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::SlotDirtyLog;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};

/// NPAGES 4K pages mapped writable at `ea` (a fresh 256 MB segment); the guest frames
/// are real page numbers of pool frames, the "host-virtual" addresses their real
/// addresses.
pub struct PaprMachine {
    be: PaprBackend<Spapr>,
    slots: Memslots,
    slot: Memslot,
    ea: u64,
    faults_resolved: u64,
    calls0: [u64; 4],
}

impl PaprMachine {
    /// Maps the slot and loads its segment.
    pub fn new(env: &mut Env, ea: u64, flags: SlotFlags) -> Result<Self, &'static str> {
        let ps = env.ps4k;
        let vsid = env.vsid();
        let pa = env.frames(12, NPAGES);
        let slot = Memslot::new(SlotId(0), Gfn(pa >> 12), NPAGES, Hva(pa), flags);
        let mut b = MemslotsBuilder::new();
        b.create(slot).map_err(|_| "memslot rejected")?;
        let slots = b.build().map_err(|_| "memslots rejected")?;
        let mut be = PaprBackend::new(Table::new(Spapr, env.hash_mask), env.sizes);
        for i in 0..NPAGES {
            be.map(
                &Vpage { vsid, ssize: SegmentSize::S256M, ea: ea + (i << 12), ps }.page(),
                gfn_of(&slot, i),
                true,
            )
            .map_err(|_| "H_ENTER failed")?;
        }
        env.load_segment(ea, vsid, SegmentSize::S256M, ps.base_shift);
        let calls0 = [H_CLEAR_REF, H_CLEAR_MOD, H_REMOVE, H_ENTER].map(hcall::count);
        Ok(Self { be, slots, slot, ea, faults_resolved: 0, calls0 })
    }

    /// Drops the segment (after `teardown`).
    pub fn release(self, env: &mut Env) {
        env.unload_segment(self.ea, SegmentSize::S256M);
        env.reset_slb();
    }
}

/// What the DSI fixer works on during one store under write protection.
struct WpFix {
    be: *mut PaprBackend<Spapr>,
    log: *mut SlotDirtyLog,
    ea: u64,
    gfn: u64,
}

static WP_FIX: AtomicUsize = AtomicUsize::new(0);
static WP_RESOLVED: AtomicU64 = AtomicU64::new(0);

/// Runs in the DSI handler: the core marks the page dirty, the back end unprotects it,
/// `rfid` retries the store.
fn resolve_write_fault(f: &TrapFrame) {
    let fix = WP_FIX.load(SeqCst) as *const WpFix;
    if fix.is_null() || f.dsisr & DSISR_PROTFAULT == 0 {
        return;
    }
    // SAFETY: WP_FIX is set by `store` only around one probe store, pointing at a WpFix on
    // its stack whose back end and log are exclusively borrowed by that call; the store's
    // caller is suspended at the faulting instruction, so these are the only references.
    let (be, log, ea, gfn0) = unsafe { (&mut *(*fix).be, &mut *(*fix).log, (*fix).ea, (*fix).gfn) };
    let gfn = Gfn(gfn0 + ((f.dar - ea) >> 12));
    if let Some(h) = be.lookup(gfn) {
        if log.note_writable(gfn, h, None).is_ok() && be.make_writable(h) {
            WP_RESOLVED.fetch_add(1, SeqCst);
        }
    }
}

impl Machine for PaprMachine {
    type Backend = PaprBackend<Spapr>;

    fn backend(&mut self) -> &mut PaprBackend<Spapr> {
        &mut self.be
    }

    fn slots(&self) -> (&Memslots, Memslot) {
        (&self.slots, self.slot)
    }

    fn store(
        &mut self,
        page: u64,
        off: u64,
        val: u64,
        log: Option<&mut SlotDirtyLog>,
    ) -> Result<bool, &'static str> {
        let addr = self.ea + (page << 12) + off;
        let Some(log) = log else {
            probe_store(addr, val);
            return Ok(false);
        };
        let fix = WpFix { be: &mut self.be, log, ea: self.ea, gfn: self.slot.base_gfn().0 };
        let resolved0 = WP_RESOLVED.load(SeqCst);
        WP_FIX.store(&fix as *const WpFix as usize, SeqCst);
        trap::expect(VEC_DSI, Resume::Retry(resolve_write_fault));
        probe_store(addr, val);
        let caught = trap::take();
        WP_FIX.store(0, SeqCst);
        match caught {
            None => Ok(false),
            Some(c)
                if c.dar == addr
                    && c.dsisr == DSISR_PROTFAULT | DSISR_STORE
                    && WP_RESOLVED.load(SeqCst) == resolved0 + 1 =>
            {
                self.faults_resolved += 1;
                Ok(true)
            }
            Some(_) => Err("write fault with the wrong DAR/DSISR, or not resolved"),
        }
    }

    fn load(&mut self, page: u64, off: u64) -> Result<u64, &'static str> {
        Ok(probe_load(self.ea + (page << 12) + off, 0))
    }

    fn flush(&mut self, token: FlushToken) {
        // The hypercalls invalidated already: the crate's back end records nothing.
        token.flush(&mut NoTlb);
    }

    fn figures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.faults_resolved > 0 {
            write!(
                f,
                "{} DSIs resolved in the handler via note_writable + H_PROTECT; ",
                self.faults_resolved
            )?;
        }
        let d: [u64; 4] = core::array::from_fn(|i| {
            hcall::count([H_CLEAR_REF, H_CLEAR_MOD, H_REMOVE, H_ENTER][i]) - self.calls0[i]
        });
        let (er, em) = self.be.clears_emulated();
        write!(
            f,
            "hcalls: {} H_CLEAR_REF, {} H_CLEAR_MOD (emulated by the crate: ref {}, mod {}), {} H_REMOVE, {} H_ENTER",
            d[0], d[1], er, em, d[2], d[3]
        )
    }

    fn teardown(&mut self) -> u32 {
        self.be.unmap_all() as u32
    }
}
