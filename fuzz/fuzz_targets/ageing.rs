//! Ageing with and without an accessed bit against an accessed-since-aged model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: (bool, Vec<AgeOp>)| {
    if let Err(e) = run_ageing(input.0, &input.1) {
        panic!("{e}");
    }
});
