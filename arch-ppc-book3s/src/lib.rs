#![doc = include_str!("../README.md")]
//!
//! ## The crate
//!
//! What a Book3s hypervisor, or a pseries guest kernel, needs to drive the
//! hashed page table (HPT): the HPTE formats (pre-ISA-3.0 and ISA 3.0, always
//! big-endian in memory), the hash functions, SLB entries, the PAPR
//! hypercalls with their exact return codes, a reverse map with R/C harvest
//! as KVM Book3s HV keeps it, and the PR shadow-HPTE cache. The generic
//! dirty-log and ageing drivers of `mmu-generic` drive the guest table
//! through [`MmuBackend`](mmu_generic::backend::MmuBackend).
//!
//! `no_std` + `alloc`, no `unsafe`: the one hardware boundary (`sc 1`) is the
//! embedder's [`Hcall`](papr::Hcall) implementation.
//!
//! | module | what it holds |
//! |---|---|
//! | [`hpte`] | HPTE layouts, field masks, conversion between pre-3.0 and 3.0 |
//! | [`pagesize`] | `ibm,segment-page-sizes`: SLB and LP encodings, HPTE page-size decode |
//! | [`hash`] | segment sizes, virtual addresses, primary/secondary hash, PTEG index, AVPN |
//! | [`slb`] | SLB entries (`slbmte` words) and effective-address lookup |
//! | [`papr`] | hypercall numbers, flags, return codes, the [`Hcall`](papr::Hcall) trait |
//! | [`table`] | the [`HashTable`](table::HashTable) trait, the in-memory table and its software MMU |
//! | [`search`] | the MMU's hashed search of a PTEG pair |
//! | [`mapping`] | the RAM HPTE builder, insertion with the secondary-hash fallback |
//! | [`passthrough`] | [`PaprHpt`](passthrough::PaprHpt): a table reached by hypercall, with QEMU's quirks |
//! | [`papr_backend`] | [`PaprBackend`](papr_backend::PaprBackend): `MmuBackend` over a `PaprHpt`, with its own reverse map |
//! | [`guest`] | [`GuestHpt`](guest::GuestHpt): a module per mechanism: hypercalls (`hcall/`), reverse map, R/C fold, `MmuBackend` |
//! | [`model`] | a plain model of the hypercall surface, for tests and fuzzing |
//! | [`pr_cache`] | the PR shadow-HPTE cache indexed by EA, VPN, long VPN and 64K VPN |
//!
//! ```
//! use arch_ppc_book3s::hash::{SegmentSize, VirtAddr};
//! use arch_ppc_book3s::pagesize::PageSizes;
//!
//! let sizes = PageSizes::qemu_pseries_default();
//! let va = VirtAddr::new(0x1234, SegmentSize::S256M, 0x0567_8000).expect("VSID fits");
//! // A 4 KiB page at guest-real 0x10_0000: L and RPN bits from the page-size table.
//! let (l, rpn) = sizes.encode(12, 12, 0x10_0000).expect("4K is listed");
//! let v = va.avpn_v(12) | l | arch_ppc_book3s::hpte::HPTE_V_VALID;
//! let group = (va.hash(12) & 0x7ff) * 8;
//! assert_eq!(group, ((0x1234 ^ 0x5678) & 0x7ff) * 8);
//! assert_eq!(sizes.decode(v, rpn).map(|p| p.actual_shift), Some(12));
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
// The `Arbitrary` derive (fuzzing only) names `std`.
#[cfg(feature = "arbitrary")]
extern crate std;

pub mod guest;
pub mod hash;
pub mod hpte;
pub mod mapping;
pub mod model;
pub mod pagesize;
pub mod papr;
pub mod papr_backend;
pub mod passthrough;
pub mod pr_cache;
pub mod search;
pub mod slb;
pub mod table;
