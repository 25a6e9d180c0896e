//! Model-based tests: random operation sequences (the same `arbitrary`
//! enums the fuzz targets decode) against plain models.
//!
//! The sequences are decoded element by element until the bytes run out.
//! (`Vec::arbitrary_take_rest` reads a "continue" flag before each element,
//! so from random bytes it yields about one operation: fine for a fuzzer
//! that mutates towards longer inputs, vacuous for random test cases.)

use arbitrary::{Arbitrary, Unstructured};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use vmmu_tests::model::{
    run_ageing, run_dirty, run_invalidation, run_memslots, run_rmap, AgeOp, DirtyOp, DirtySetup,
    InvalidateOp, MemslotOp, RmapOp,
};

/// Decodes `T` values from `u` until it is empty.
fn seq<'a, T: Arbitrary<'a>>(u: &mut Unstructured<'a>) -> Vec<T> {
    let mut out = Vec::new();
    while !u.is_empty() {
        match T::arbitrary(u) {
            Ok(t) => out.push(t),
            Err(_) => break,
        }
    }
    out
}

/// Runs `f` on `cases` random byte strings of `len` bytes, failing with the
/// case number and seed (and the sequence length, to show it is not empty).
fn cases(seed: u64, cases: usize, len: usize, f: impl Fn(&mut Unstructured<'_>) -> Result<usize, String>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; len];
    let mut total = 0;
    for case in 0..cases {
        rng.fill_bytes(&mut bytes);
        match f(&mut Unstructured::new(&bytes)) {
            Ok(n) => total += n,
            Err(e) => panic!("case {case} of seed {seed}: {e}"),
        }
    }
    assert!(total >= cases * 10, "seed {seed}: only {total} operations in {cases} cases");
}

#[test]
fn memslots_match_a_btreemap_model() {
    cases(1, 500, 600, |u| {
        let ops: Vec<MemslotOp> = seq(u);
        run_memslots(&ops).map(|()| ops.len())
    });
}

#[test]
fn pte_lists_match_a_vec_model() {
    cases(2, 500, 1200, |u| {
        let ops: Vec<RmapOp> = seq(u);
        run_rmap(&ops).map(|()| ops.len())
    });
}

#[test]
fn dirty_log_reports_every_write_once_in_every_mode() {
    cases(3, 150, 1500, |u| {
        let setup = DirtySetup::arbitrary(u).map_err(|e| e.to_string())?;
        let ops: Vec<DirtyOp> = seq(u);
        run_dirty(setup, &ops).map(|()| ops.len())
    });
}

#[test]
fn ageing_matches_an_accessed_since_aged_model() {
    for (seed, accessed_bit) in [(4, true), (5, false)] {
        cases(seed, 120, 800, |u| {
            let ops: Vec<AgeOp> = seq(u);
            run_ageing(accessed_bit, false, &ops).map(|()| ops.len())
        });
    }
}

#[test]
fn ageing_with_huge_leaves_matches_the_model_page_by_page() {
    for (seed, accessed_bit) in [(7, true), (8, false)] {
        cases(seed, 120, 800, |u| {
            let ops: Vec<AgeOp> = seq(u);
            run_ageing(accessed_bit, true, &ops).map(|()| ops.len())
        });
    }
}

#[test]
fn invalidation_never_lets_a_stale_fault_commit() {
    cases(6, 500, 400, |u| {
        let ops: Vec<InvalidateOp> = seq(u);
        run_invalidation(&ops).map(|()| ops.len())
    });
}
