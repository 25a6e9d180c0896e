//! Memslot sets against a BTreeMap model: build verdicts, gfn and host-range lookups.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: Vec<MemslotOp>| {
    if let Err(e) = run_memslots(&input) {
        panic!("{e}");
    }
});
