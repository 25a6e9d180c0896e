//! PTE lists against a Vec model: add, remove, drain, reserve exhaustion.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: Vec<RmapOp>| {
    if let Err(e) = run_rmap(&input) {
        panic!("{e}");
    }
});
