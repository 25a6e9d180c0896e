//! Ageing with and without an accessed bit, with 4 KiB or 2 MiB leaves, against an accessed-since-aged
//! model compared page by page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: (bool, bool, Vec<AgeOp>)| {
    if let Err(e) = run_ageing(input.0, input.1, &input.2) {
        panic!("{e}");
    }
});
