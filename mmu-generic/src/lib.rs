#![doc = include_str!("../README.md")]
//!
//! ## The crate
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
//! | [`zap`] | zapping the leaves a host range backs (MMU-notifier invalidation) |
//! | [`sync`] | the atomics used outside the MMU lock (switch to `loom` under `cfg(loom)`) |
//! | `vm_memory` | (feature `vm-memory`, `std`) rust-vmm interop: `GuestAddress` conversions, memslots from a `GuestMemoryMmap`, the dirty bitmap as a `vm_memory` `Bitmap` |
//!
//! ## Locking model
//!
//! The core takes no lock itself; it states which operations need the
//! embedder's **MMU lock** (a reader-writer lock, as KVM's `mmu_lock`), and
//! the types say it: `&mut` where the lock must be held for writing, `&self`
//! where it may be shared.
//!
//! - **Held for writing** (`&mut`): anything that changes the structure or
//!   the permissions of the tables or the reverse map:
//!   [`rmap::Rmap::add`]/`remove`, [`pte_list::PteListPool::add`]/`remove`/`drain`,
//!   [`backend::MmuBackend::write_protect`], `zap`, `split_huge`,
//!   `mark_access_tracked`, a dirty-log round
//!   ([`dirty_log::SlotDirtyLog::get_and_clear`], `get`, `clear`,
//!   `reset_ring_entry`), [`zap::zap_hva_range`], access-tracking
//!   [`age::age`], and one [`generation::ObsoleteReclaimer::step`] (the
//!   caller drops the lock between steps; pages added meanwhile are kept).
//! - **Held for reading** is enough for the fault side of dirty logging:
//!   [`dirty_log::SlotDirtyLog::note_writable`], `mark` and `note_zapped`
//!   take `&self` and set bits with atomic ORs, so vCPUs faulting at once do
//!   not serialise (the writable chain is a bitmap, never full, never
//!   allocating). A fault follows "log, then grant": it calls the log, through
//!   [`dirty_log::FaultCtx`], before it stores a writable leaf, and maps
//!   read-only when the vCPU's ring is full. Ageing with an accessed bit
//!   ([`age::test_age`], and [`age::age`] when the format has one) only reads
//!   the tables and clears A/R with the back end's atomic test-and-clear
//!   ([`backend::MmuBackend::clear_young`] takes `&self`).
//! - **No lock**: the vCPU's push to its [`dirty_ring::DirtyRing`] and the
//!   harvester's collection (each entry changes hands through its flag word
//!   with release/acquire), marking a [`dirty_bitmap::DirtyBitmap`] (atomic
//!   `fetch_or`; the harvester takes words with `swap`), and a fault's
//!   [`invalidate::InvalidationSeq::snapshot`] before resolving its pfn.
//!
//! **No allocation under the lock.** Reverse-map descriptors are reserved
//! *before* taking it ([`pte_list::PteListPool::reserve`]); an empty reserve
//! is an error (`ReserveEmpty`) the caller answers by topping up and
//! retrying, never an allocation. The drivers that change leaves while
//! walking the reverse map (write protection, access tracking, zapping,
//! splitting) visit them in stack batches
//! ([`backend::for_each_leaf_batched`]); the dirty log's chain is a bitmap
//! sized when logging starts. (A harvest copies the bitmap into the caller's
//! `Vec`: give it its capacity before taking the lock.)
//!
//! **Flushes.** Every change a CPU may have cached is recorded in a
//! [`backend::FlushToken`]; a token dropped with a recorded change and no
//! `flush` panics in debug builds and is counted in release builds
//! ([`backend::FlushToken::unflushed_drops`]). Copy a page reported dirty only
//! after its round's flush.
//!
//! **Generations.** Memslot generations only go up across every set built
//! from the same counter ([`memslot::MemslotGenerations`]), so nothing keyed
//! on a generation sees a stale set.
//!
//! **PTE updates.** The CPU sets accessed and dirty bits in leaf entries at
//! any time, so a back end never writes a leaf with a plain store that could
//! erase them: clearing A, D or W is an atomic `fetch_and` (or a
//! compare-exchange loop where other bits change with it), installing or
//! splitting a leaf is a compare-exchange against the value read, and a zap
//! is an atomic swap whose returned value carries the final A/D bits into
//! the dirty log ([`dirty_log::SlotDirtyLog::note_zapped`]). The `loom`
//! models in `tests/loom.rs` check these protocols, and two vCPUs faulting
//! on one `&self` log against a harvester.
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
// Hosted builds only: the `arbitrary` derive and the `vm-memory` interop name `std`.
#[cfg(feature = "std")]
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
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
pub mod zap;
