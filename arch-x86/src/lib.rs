#![doc = include_str!("../README.md")]
//!
//! ## The crate
//!
//! The nested page tables that translate guest-physical to host-physical
//! addresses, for Intel EPT and AMD NPT, filled on demand from EPT violations
//! and nested page faults and kept consistent with `mmu-generic`'s memslots,
//! reverse map, dirty logging and ageing. One engine, [`tdp::TdpMmu`], is
//! generic over the entry format ([`format::TdpFormat`]: [`format::ept::Ept`],
//! [`format::npt::Npt`]) and over the memory its tables live in
//! ([`frame::FrameMemory`]: simulated for host tests, identity-mapped RAM on
//! bare metal). A software walker ([`walk`]) translates exactly as the
//! processor does, so host tests can play the hardware.
//!
//! `no_std` + `alloc`. The `unsafe` code is [`frame::IdentityMemory`]'s
//! pointer to a frame and the dirty-log round's cache prefetch of a leaf
//! line (`tdp/dirty.rs`, x86_64 only).
//!
//! ## What D-bit dirty logging reports for a guest with paging on
//!
//! With EPT A/D enabled, every access the CPU makes to a guest paging
//! structure during a guest page walk counts as a write for the EPT dirty
//! flag (SDM Vol. 3C §29.3.3.2, §29.3.5), whether or not the guest's own A/D
//! bits change; AMD NPT (and QEMU's emulation of it) sets the nested D bit on
//! the guest page-table pages it walks as well. So a dirty-bit round reports
//! the guest's own page tables in every round in which the guest walked them
//! (a cold TLB), besides the pages it wrote: a migration copies those table
//! pages again each round. That is expected, not a leak; the boot image's
//! `guest paging on` scenario checks exactly this on Bochs (EPT A/D) and QEMU
//! (NPT). Write-protect logging reports them only when the guest's A/D
//! updates really change them.
//!
//! | module | what it holds |
//! |---|---|
//! | [`format`] | page sizes, access rights, MAXPHYADDR, the format trait; [`format::ept`] (entry, EPTP) and [`format::npt`] (long-mode entry) |
//! | [`exit`] | EPT-violation exit qualification, NPF error code, and their decoding |
//! | [`frame`] | the frame-memory trait, simulated and identity-mapped memory |
//! | [`walk`] | the software walker (permissions, reserved bits, A/D) |
//! | [`tdp`] | the engine: faults, maps, splits, zaps, zap-all by generation, `MmuBackend` |
//! | [`shadow`] | shadow paging: one guest walker for every paging mode, shadow pages keyed by (gfn, role), write-protected guest tables, unsync pages, zap by generation, `MmuBackend` |
//! | [`testing`] | stand-ins for the embedder (linear host memory, a recording TLB) |
//!
//! ```
//! use arch_x86::format::{npt::Npt, Access, PageSize, PhysAddrWidth, WalkLength};
//! use arch_x86::frame::SimMemory;
//! use arch_x86::tdp::TdpMmu;
//! use arch_x86::walk::translate;
//! use arch_x86::exit::Origin;
//! use mmu_generic::addr::{Gfn, Gpa, Pfn};
//!
//! let npt = Npt::new(WalkLength::Four, PhysAddrWidth::new(48).unwrap());
//! let mut mmu = TdpMmu::new(npt, SimMemory::new(Pfn(0x100_0000), 1024))?;
//! mmu.map(Gfn(0x200), Pfn(0x8_0000), PageSize::Size2M, Access::READ | Access::WRITE)?;
//! let t = translate(mmu.format(), mmu.memory(), mmu.root(), Gpa(0x20_1234), Access::WRITE, Origin::Final)
//!     .expect("mapped writable");
//! assert_eq!(t.hpa, 0x8000_1234);
//! # Ok::<(), arch_x86::tdp::TdpError>(())
//! ```
#![no_std]

extern crate alloc;

pub mod exit;
pub mod format;
pub mod frame;
pub mod shadow;
pub mod tdp;
pub mod testing;
pub mod walk;
