//! The PAPR hypercalls a guest makes on its table, one file per call
//! family (KVM keeps them in `book3s_hv_rm_mmu.c`), and the dispatch by
//! opcode.

use mmu_generic::addr::GfnRange;
use mmu_generic::backend::{FlushToken, TlbFlush};

use super::{GuestHpt, PageResolver};
use crate::papr::{
    Hcall, HcallReturn, HptError, H_BULK_REMOVE, H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_FUNCTION, H_PROTECT,
    H_READ, H_REMOVE,
};

mod clear;
mod enter;
mod protect;
mod read;
mod remove;

pub(super) use enter::pteh_reserved;
pub use enter::{same_virtual_page, H_ENTER_FLAGS};
pub use read::ReadResult;

impl<R: PageResolver> GuestHpt<R> {
    /// Serves hypercall `opcode` with arguments r4.. in `args`, recording
    /// the TLB invalidations it needs in `flush`. Unknown opcodes answer
    /// H_FUNCTION.
    pub fn hcall(&mut self, opcode: u64, args: &[u64], flush: &mut FlushToken) -> HcallReturn {
        let mut a = [0u64; 8];
        for (d, s) in a.iter_mut().zip(args) {
            *d = *s;
        }
        let res: Result<[u64; 8], HptError> = match opcode {
            H_ENTER => self.h_enter(a[0], a[1], a[2], a[3]).map(|s| [s, 0, 0, 0, 0, 0, 0, 0]),
            H_REMOVE => self.h_remove(a[0], a[1], a[2], flush).map(|h| [h.v, h.r, 0, 0, 0, 0, 0, 0]),
            H_READ => self.h_read(a[0], a[1]).map(|rr| {
                let mut out = [0u64; 8];
                for (i, h) in rr.hptes.iter().take(rr.count).enumerate() {
                    out[2 * i] = h.v;
                    out[2 * i + 1] = h.r;
                }
                out
            }),
            H_PROTECT => self.h_protect(a[0], a[1], a[2], flush).map(|()| [0; 8]),
            H_CLEAR_REF => self.h_clear_ref(a[0], a[1], flush).map(|r| [r, 0, 0, 0, 0, 0, 0, 0]),
            H_CLEAR_MOD => self.h_clear_mod(a[0], a[1], flush).map(|r| [r, 0, 0, 0, 0, 0, 0, 0]),
            H_BULK_REMOVE => {
                // The request words come back rewritten whatever the status.
                let st = self.h_bulk_remove(&mut a, flush);
                return HcallReturn { status: st.err().map_or(0, |e| e.status()), ret: a };
            }
            _ => return HcallReturn { status: H_FUNCTION, ret: [0; 8] },
        };
        match res {
            Ok(ret) => HcallReturn::ok(ret),
            Err(e) => HcallReturn::err(e),
        }
    }
}

/// A [`GuestHpt`] and the embedder's TLB, answering hypercalls through the
/// [`Hcall`] trait: each call's recorded flush is performed before it returns.
/// Lets the [`PaprHpt`](crate::passthrough::PaprHpt) pass-through drive an
/// in-memory guest table (host tests of the pass-through).
#[derive(Debug)]
pub struct HcallServer<'a, R: PageResolver, T: TlbFlush> {
    /// The table served.
    pub hpt: &'a mut GuestHpt<R>,
    /// The TLB flushed after each call.
    pub tlb: &'a mut T,
}

impl<R: PageResolver, T: TlbFlush> Hcall for HcallServer<'_, R, T> {
    fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallReturn {
        let mut flush = FlushToken::new();
        let ret = self.hpt.hcall(opcode, args, &mut flush);
        flush.flush(self.tlb);
        ret
    }
}

/// A [`TlbFlush`] that does nothing: for tables no CPU walks (host tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTlb;

impl TlbFlush for NoTlb {
    fn flush_range(&mut self, _range: GfnRange) {}
    fn flush_all(&mut self) {}
}
