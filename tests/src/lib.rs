//! # vmmu-tests: one scenario suite, every back end
//!
//! [`harness`] holds the scenarios (demand faults, dirty-log rounds in every
//! mode, ageing, invalidation, MMIO exits), generic over [`harness::GuestMmu`];
//! [`sim`] holds a plain simulated back end with software accessed and dirty
//! bits, so the core's drivers are tested before any arch crate plugs in.
//! The arch crates implement `GuestMmu` for their engines and run the same
//! scenarios (see `tests/scenarios.rs`).
//!
//! The harness and the simulated back end are `no_std` + `alloc`, so a boot
//! image can run the same scenarios on real (emulated) hardware; the models
//! (`model`, for tests and fuzzing) need the default `std` feature.

#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod harness;
#[cfg(feature = "std")]
pub mod model;
#[cfg(feature = "ppc")]
pub mod ppc;
pub mod sim;
#[cfg(feature = "x86")]
pub mod x86;

/// The README's quick start, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
