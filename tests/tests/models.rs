//! Model-based tests: random operation sequences (the same `arbitrary`
//! enums the fuzz targets decode) against plain models.

use arbitrary::{Arbitrary, Unstructured};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use vmmu_tests::model::{
    run_ageing, run_dirty, run_invalidation, run_memslots, run_rmap, AgeOp, DirtyOp, DirtySetup,
    InvalidateOp, MemslotOp, RmapOp,
};

/// Decodes `cases` random byte strings of `len` bytes and runs `f` on each.
fn cases<T: for<'a> Arbitrary<'a>>(seed: u64, cases: usize, len: usize, f: impl Fn(T) -> Result<(), String>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; len];
    for case in 0..cases {
        rng.fill_bytes(&mut bytes);
        let input = T::arbitrary_take_rest(Unstructured::new(&bytes)).expect("decodes");
        if let Err(e) = f(input) {
            panic!("case {case} of seed {seed}: {e}");
        }
    }
}

#[test]
fn memslots_match_a_btreemap_model() {
    cases::<Vec<MemslotOp>>(1, 2000, 600, |ops| run_memslots(&ops));
}

#[test]
fn pte_lists_match_a_vec_model() {
    cases::<Vec<RmapOp>>(2, 2000, 1200, |ops| run_rmap(&ops));
}

#[test]
fn dirty_log_reports_every_write_once_in_every_mode() {
    cases::<(DirtySetup, Vec<DirtyOp>)>(3, 600, 1500, |(setup, ops)| run_dirty(setup, &ops));
}

#[test]
fn ageing_matches_an_accessed_since_aged_model() {
    cases::<Vec<AgeOp>>(4, 600, 800, |ops| run_ageing(true, &ops));
    cases::<Vec<AgeOp>>(5, 600, 800, |ops| run_ageing(false, &ops));
}

#[test]
fn invalidation_never_lets_a_stale_fault_commit() {
    cases::<Vec<InvalidateOp>>(6, 2000, 400, |ops| run_invalidation(&ops));
}
