//! Dirty logging in every mode with guest writes, reads and invalidations interleaved, and rings of 2 to 64
//! entries that fill mid-run (full and soft-full exits to the harvester): every page written since the
//! previous harvest is reported exactly once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: (DirtySetup, Vec<DirtyOp>)| {
    if let Err(e) = run_dirty(input.0, &input.1) {
        panic!("{e}");
    }
});
