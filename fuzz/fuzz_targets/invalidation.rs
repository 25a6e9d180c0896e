//! Invalidation sequencing against the retry rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: Vec<InvalidateOp>| {
    if let Err(e) = run_invalidation(&input) {
        panic!("{e}");
    }
});
