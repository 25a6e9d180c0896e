//! The fuzz target's harness (`model::check_sequence`) on random operation
//! sequences, so that what the fuzzer checks also runs in `cargo test`.

use arch_ppc_book3s::guest::WimgPolicy;
use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::model::{check_sequence, HcallOp};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn random_op(rng: &mut SmallRng) -> HcallOp {
    match rng.gen_range(0..10) {
        0..=3 => HcallOp::Enter {
            exact: rng.gen_bool(0.3),
            ptex: rng.gen_range(0..80),
            avpn: rng.gen_range(0..4),
            large: rng.gen_bool(0.3),
            secondary: rng.gen_bool(0.2),
            gfn: if rng.gen_bool(0.9) { rng.gen_range(0..64) } else { rng.gen() },
            wimg: if rng.gen_bool(0.9) { 2 } else { rng.gen() },
            pp: rng.gen(),
        },
        4 => HcallOp::Raw {
            op: rng.gen(),
            args: [rng.gen(), rng.gen_range(0..80), rng.gen(), rng.gen(), rng.gen(), 0, 0, 0],
        },
        5..=6 => HcallOp::Small {
            op: rng.gen(),
            flags: [0, 1 << 31, 1 << 30, 3, 0x100, 1 << 37][rng.gen_range(0..6)],
            ptex: rng.gen_range(0..80),
            avpn: rng.gen_range(0..4),
        },
        7..=8 => HcallOp::Touch { ptex: rng.gen_range(0..80), store: rng.gen() },
        _ => HcallOp::Host { what: rng.gen(), gfn: rng.gen_range(0..64), len: rng.gen_range(0..64) },
    }
}

/// Rounds of 300 operations. Big-endian runs under qemu-user, where each
/// round's invariant sweeps cost about a second: fewer rounds there keep the
/// crate's ppc64 test time under a minute (both layouts and WIMG policies are
/// still covered); the host runs all of them.
const ROUNDS: u32 = if cfg!(target_endian = "big") { 18 } else { 40 };

#[test]
fn random_operation_sequences_keep_model_and_invariants() {
    let mut rng = SmallRng::seed_from_u64(0x6);
    for round in 0..ROUNDS {
        let ops: Vec<HcallOp> = (0..300).map(|_| random_op(&mut rng)).collect();
        let format = if round % 2 == 0 { HpteFormat::PreIsa300 } else { HpteFormat::Isa300 };
        let wimg = if round % 3 == 0 { WimgPolicy::ForceM } else { WimgPolicy::RequireM };
        check_sequence(format, wimg, &ops).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    }
}
