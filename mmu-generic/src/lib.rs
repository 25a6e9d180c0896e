//! # mmu-generic: the arch-neutral memory-virtualization core
//!
//! What a hypervisor's MMU needs whatever the page-table format: memslots
//! (guest-physical ranges backed by host memory), a compact reverse map from
//! guest frames to the hardware PTEs that map them, and the back-end traits
//! through which the dirty-log, ageing and zap drivers drive any format. The
//! `arch-x86` (EPT, NPT, shadow paging) and `arch-ppc-book3s` (hashed page
//! table) crates implement those traits.
//!
//! `no_std` + `alloc`, and no `unsafe`: the hardware boundary lives in the
//! arch crates.
//!
//! | module | what it holds |
//! |---|---|
//! | [`addr`] | `Gfn`, `Pfn`, `Gpa`, `Gva`, `Hva` and ranges, with checked arithmetic |
//! | [`memslot`] | immutable memslot sets, lookup by gfn and by host-virtual range |
//! | [`pte_list`] | the compact list of PTE handles (one inline, more in cache-line descriptors) |
//! | [`rmap`] | per-slot, per-level reverse map built from those lists |
//! | [`backend`] | the traits a page-table format implements, and the flush token |
//! | [`invalidate`] | invalidation sequencing between MMU notifiers and faults |
//! | [`dirty_bitmap`] | the atomic per-slot bitmap |
//! | [`dirty_log`] | dirty logging per slot: write-protect or D/C-bit harvest, the writable chain, classic / manual / ring modes |
//! | [`dirty_ring`] | the per-vCPU dirty ring |
//! | [`age`] | referenced-bit ageing over a host-virtual range, with a policy for formats without an accessed bit |
//! | [`generation`] | zap everything by generation, obsolete pages reclaimed in batches |
//! | [`sync`] | the atomics used outside the MMU lock (switch to `loom` under `cfg(loom)`) |
//!
//! ```
//! use mmu_generic::addr::{Gfn, Hva};
//! use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};
//!
//! let mut b = MemslotsBuilder::new();
//! b.create(Memslot::new(SlotId(0), Gfn(0), 256, Hva(0x7f00_0000_0000), SlotFlags::empty()))?;
//! let slots = b.build()?;
//! assert_eq!(slots.lookup(Gfn(17)).and_then(|s| s.gfn_to_hva(Gfn(17))), Some(Hva(0x7f00_0001_1000)));
//! # Ok::<(), mmu_generic::memslot::MemslotError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
// The `arbitrary` derive names `std`; the feature is for tests and fuzzing only.
#[cfg(feature = "arbitrary")]
extern crate std;

pub mod addr;
pub mod age;
pub mod backend;
pub mod dirty_bitmap;
pub mod dirty_log;
pub mod dirty_ring;
pub mod generation;
pub mod invalidate;
pub mod memslot;
pub mod pte_list;
pub mod rmap;
pub mod sync;
