//! Memslot sets against a BTreeMap model: build verdicts, gfn lookups over the whole 64-bit space (with
//! and without the vCPU hint), host-range lookups up to the top of the address space, and generations
//! that only go up across rebuilds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmmu_tests::model::*;

fuzz_target!(|input: Vec<MemslotOp>| {
    if let Err(e) = run_memslots(&input) {
        panic!("{e}");
    }
});
