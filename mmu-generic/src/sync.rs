//! The atomics the core uses without the MMU lock, in one place, so that the
//! lock-free protocols (hardware-set A/D bits, the dirty ring, invalidation
//! sequencing) are model-checked by `loom` under `cfg(loom)`.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
