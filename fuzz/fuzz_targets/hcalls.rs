//! Arbitrary sequences of PAPR hashed-page-table hypercalls, hardware
//! accesses and host actions (zap, write-protect, R/C harvest, split) against
//! `GuestHpt` and the plain model: every answer must match, and the table's
//! invariants must hold (no two valid HPTEs for one virtual page in a PTEG
//! pair, every valid HPTE inside guest memory, reverse map consistent).
#![no_main]

use arbitrary::Arbitrary;
use arch_ppc_book3s::guest::WimgPolicy;
use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::model::{check_sequence, HcallOp};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    isa300: bool,
    force_m: bool,
    ops: Vec<HcallOp>,
}

fuzz_target!(|input: Input| {
    let format = if input.isa300 { HpteFormat::Isa300 } else { HpteFormat::PreIsa300 };
    let wimg = if input.force_m { WimgPolicy::ForceM } else { WimgPolicy::RequireM };
    if let Err(e) = check_sequence(format, wimg, &input.ops) {
        panic!("{e:?}");
    }
});
