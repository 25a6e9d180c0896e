//! Shadow paging: page tables the processor walks in place of the guest's
//! own, kept coherent with them, for hardware without nested paging, for
//! nested virtualization and for emulators.
//!
//! The guest's tables are walked exactly as the processor walks them, in
//! every paging mode, by one walker generic over [`mode::PagingMode`]
//! ([`guest_walk`]). A fault the processor takes on the shadow tables is
//! resolved by walking the guest's tables: their verdict is injected as the
//! guest's own page fault (with the exact error code), or the shadow path
//! is built from shadow pages keyed by (guest table, role) ([`page`]) and a
//! 4 KiB leaf installed ([`mmu`]). Guest tables that are shadowed are
//! write-protected through the reverse map; a write to one is emulated and
//! updates (or zaps) the shadow entries; leaf tables may instead go
//! *unsync*, writable by the guest, and are resynced at INVLPG, CR3 load
//! and TLB flush, as KVM does. Zap-all bumps the generation; obsolete pages
//! are freed in batches without syncing anything. Shadow leaves feed the
//! core's reverse map, dirty log and ageing through [`MmuBackend`]
//! ([`backend`]).
//!
//! | module | what it holds |
//! |---|---|
//! | [`mode`] | paging modes, controls, access kinds, permission rules, the #PF error code |
//! | [`guest_walk`] | the walker, physical-memory views of guest RAM and shadow frames, PDPTE loading |
//! | [`page`] | roles, shadow pages, the hash over guest frames |
//! | [`mmu`] | the shadow MMU: faults, roots, write protection, emulated writes, unsync, zaps |
//! | [`backend`] | `MmuBackend` for shadow leaves |
//! | [`ram`] | simulated guest RAM for tests and benchmarks |
//!
//! ```
//! use arch_x86::format::PageSize;
//! use arch_x86::frame::SimMemory;
//! use arch_x86::shadow::mode::{A, D, P, RW, US};
//! use arch_x86::shadow::{AccessKind, AccessOp, CpuFeatures, GuestCpu, GuestMode, NoDirtyLog};
//! use arch_x86::shadow::{ShadowConfig, ShadowFault, ShadowMmu, SimGuestRam};
//! use arch_x86::testing::LinearHost;
//! use mmu_generic::addr::{Gfn, Gpa, Gva, Hva, Pfn};
//! use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};
//!
//! let mut b = MemslotsBuilder::new();
//! b.create(Memslot::new(SlotId(0), Gfn(0), 512, Hva(0x4000_0000), SlotFlags::empty()))?;
//! // A 32-bit guest: page directory at 0x1000, page table at 0x2000, gva 0x5000 -> gpa 0x9000.
//! let ram = SimGuestRam::new(&[(Gfn(0), 512)]);
//! ram.write(Gpa(0x1000), 4, 0x2000 | P | RW | US | A).unwrap();
//! ram.write(Gpa(0x2000 + 4 * 5), 4, 0x9000 | P | US | A | D).unwrap();
//! let mut mmu = ShadowMmu::new(
//!     ShadowConfig::new(CpuFeatures::typical()),
//!     SimMemory::new(Pfn(0x8_0000), 64),
//!     ram,
//!     LinearHost::new(0x10_0000, PageSize::Size4K),
//!     b.build()?,
//! );
//! let cpu = GuestCpu::new(GuestMode::Bits32, 0x1000);
//! mmu.load_cr3(&cpu).unwrap();
//! let read = AccessKind::user(AccessOp::Read);
//! assert!(mmu.hw_access(&cpu, Gva(0x5123), read).is_err()); // nothing shadowed yet
//! assert_eq!(mmu.page_fault(&cpu, Gva(0x5123), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
//! // The processor now translates through PAE shadow tables to the host page.
//! assert_eq!(mmu.hw_access(&cpu, Gva(0x5123), read).unwrap().gpa, Gpa(0x4000_9123 + (0x10_0000 << 12)));
//! // A write is the guest's own page fault: P, W/R and U/S set.
//! let write = AccessKind::user(AccessOp::Write);
//! let code = match mmu.page_fault(&cpu, Gva(0x5123), write, &mut NoDirtyLog) {
//!     Ok(ShadowFault::InjectPf(code)) => code.bits(),
//!     other => panic!("{other:?}"),
//! };
//! assert_eq!(code, 0x7);
//! # mmu.take_flush().flush(&mut mmu_generic::backend::NoTlb);
//! # Ok::<(), mmu_generic::memslot::MemslotError>(())
//! ```
//!
//! [`MmuBackend`]: mmu_generic::backend::MmuBackend

pub mod backend;
pub mod guest_walk;
pub mod mmu;
pub mod mode;
pub mod page;
pub mod ram;

pub use guest_walk::{load_pdptrs, walk, walk_any, GuestWalk, PhysMemory, WalkFault};
pub use mmu::{DirtyTracker, NoDirtyLog, ShadowConfig, ShadowError, ShadowFault, ShadowMmu, SlotMemory};
pub use mode::{AccessKind, AccessOp, CpuFeatures, GuestCpu, GuestMode, PfErrorCode, Privilege};
pub use ram::SimGuestRam;
