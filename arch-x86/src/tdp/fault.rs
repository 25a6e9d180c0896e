//! Faults: an EPT violation or nested page fault becomes a leaf, a retry, an
//! MMIO exit or a denial.
//!
//! The path, as KVM's: find the memslot (none: MMIO, never mapped); try the
//! fast path (the access is already permitted, or an access-tracked leaf only
//! needs its permissions back); otherwise snapshot the invalidation
//! sequence, resolve hva → pfn through the embedder (which may sleep), and
//! retry if an invalidation hit meanwhile; then choose the largest page the
//! slot and the host mapping allow and install it.
//!
//! **Log, then grant.** A fault gets a [`FaultCtx`] naming the slots' dirty
//! logs and the vCPU's ring. In a logged slot the engine calls the log
//! ([`FaultCtx::before_grant`]) *before* it stores a writable leaf, so no
//! vCPU can write through a leaf whose page is not yet logged; a full ring
//! maps the leaf read-only ([`Mapping::grant`] says so) and the write
//! refaults once the harvester has reset the ring. Under write-protect
//! tracking only a write fault maps writable; under dirty-bit tracking any
//! fault does, with D clear on a read (the CPU sets it on the first write,
//! and no write fault is taken per page). A slot flagged
//! [`SlotFlags::DIRTY_LOG`] without a log in the context is refused
//! ([`TdpError::NoDirtyLog`]): logging cannot be bypassed by forgetting it.
//!
//! **No allocation.** The fault takes reverse-map descriptors from the
//! reserve; an empty reserve is [`TdpError::Rmap`]`(`[`RmapError::ReserveEmpty`]`)`:
//! top up with [`TdpMmu::reserve`] (outside the MMU lock) and retry.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, Gpa, Hva, Pfn};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{FaultCtx, Tracking, WriteGrant};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;

#[cfg(doc)]
use mmu_generic::pte_list::RmapError;

use super::map::NewLeaf;
use super::{TdpError, TdpMmu};
use crate::exit::NestedExit;
use crate::format::{Access, PageSize, TdpFormat};
use crate::frame::FrameMemory;

/// The host page behind a host-virtual address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostPage {
    /// The host frame of the 4 KiB page at the address.
    pub pfn: Pfn,
    /// The host maps it writable.
    pub writable: bool,
    /// Size of the host mapping containing it (a transparent huge page,
    /// hugetlbfs, or 4 KiB). A huge host mapping is physically contiguous
    /// and aligned.
    pub size: PageSize,
}

/// The embedder could not resolve the address (not mapped, poisoned, ...).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostFault;

/// How the embedder turns guest memory's host-virtual addresses into host
/// frames (`get_user_pages` in KVM's terms).
pub trait HostMemory {
    /// Resolves `hva`; with `write`, the host page must be made writable
    /// (breaking copy-on-write) or reported read-only.
    fn resolve(&mut self, hva: Hva, write: bool) -> Result<HostPage, HostFault>;
}

/// How a fault left the mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapKind {
    /// A leaf was installed or updated.
    Installed,
    /// The access was already permitted (another vCPU fixed it, or a stale
    /// TLB entry): nothing changed.
    Spurious,
    /// An access-tracked leaf got its permissions back (the refault counts
    /// as an access for ageing).
    Restored,
}

/// A leaf a fault left in place.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapping {
    /// First guest frame of the leaf.
    pub gfn: Gfn,
    /// First host frame of the leaf.
    pub pfn: Pfn,
    /// Size of the leaf.
    pub size: PageSize,
    /// What the leaf permits.
    pub access: Access,
    /// The memslot holding the guest frame.
    pub slot: SlotId,
    /// What happened.
    pub kind: MapKind,
    /// The fault was a write and the leaf is writable: the frame is dirty
    /// (and, in a logged slot, already logged).
    pub dirtied: bool,
    /// The leaf's handle (as the reverse map files it).
    pub handle: PteHandle,
    /// What the slot's dirty log said before the leaf was made writable:
    /// `None` when no log was asked (unlogged slot, read-only leaf, or a
    /// fault that changed nothing). `Some(WriteGrant::RingFull)`: the leaf
    /// was mapped read-only; exit to the harvester.
    pub grant: Option<WriteGrant>,
}

/// Why a fault on guest memory is refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Denied {
    /// A write to a read-only memslot; KVM reports it to the VMM as an MMIO
    /// write so that a device model can see it.
    ReadOnlySlot {
        /// The slot.
        slot: SlotId,
        /// The guest frame written.
        gfn: Gfn,
    },
    /// A write to a page the host maps read-only and would not make writable.
    HostReadOnly(Gfn),
}

/// What a fault came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// The access can now proceed.
    Mapped(Mapping),
    /// An invalidation raced with the fault: resume the guest (it refaults).
    Retry,
    /// No memslot holds the address: emulate the access (MMIO).
    Mmio {
        /// The guest-physical address.
        gpa: Gpa,
        /// The access.
        access: Access,
    },
    /// The access is refused.
    Denied(Denied),
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// Handles the nested-paging exit for `gpa` (the VMCS guest-physical
    /// address or `EXITINFO2`).
    pub fn handle_exit(
        &mut self,
        exit: NestedExit,
        gpa: Gpa,
        host: &mut impl HostMemory,
        inv: &InvalidationSeq,
        flush: &mut FlushToken,
    ) -> Result<FaultOutcome, TdpError> {
        self.handle_exit_logged(exit, gpa, host, inv, &FaultCtx::unlogged(), flush)
    }

    /// [`handle_exit`](Self::handle_exit) with the dirty-log context.
    pub fn handle_exit_logged(
        &mut self,
        exit: NestedExit,
        gpa: Gpa,
        host: &mut impl HostMemory,
        inv: &InvalidationSeq,
        ctx: &FaultCtx<'_>,
        flush: &mut FlushToken,
    ) -> Result<FaultOutcome, TdpError> {
        let access = exit.access().map_err(|_| TdpError::Misconfigured(gpa.gfn()))?;
        self.handle_fault_logged(gpa, access, host, inv, ctx, flush)
    }

    /// Handles a fault of `access` at `gpa`.
    ///
    /// Changes that need a TLB flush (a huge page split to serve a 4 KiB
    /// write in a dirty-logged slot, a leaf whose host page changed) are
    /// recorded in `flush`; a leaf that only gained permissions needs none,
    /// the exit itself dropped the faulting translation.
    pub fn handle_fault(
        &mut self,
        gpa: Gpa,
        access: Access,
        host: &mut impl HostMemory,
        inv: &InvalidationSeq,
        flush: &mut FlushToken,
    ) -> Result<FaultOutcome, TdpError> {
        self.handle_fault_logged(gpa, access, host, inv, &FaultCtx::unlogged(), flush)
    }

    /// [`handle_fault`](Self::handle_fault) where slots may be dirty-logged:
    /// `ctx` names the logs and the vCPU's ring, and the engine logs each
    /// page before it maps it writable.
    pub fn handle_fault_logged(
        &mut self,
        gpa: Gpa,
        access: Access,
        host: &mut impl HostMemory,
        inv: &InvalidationSeq,
        ctx: &FaultCtx<'_>,
        flush: &mut FlushToken,
    ) -> Result<FaultOutcome, TdpError> {
        let gfn = gpa.gfn();
        let Some(slot) = self.slots.lookup(gfn).copied() else {
            return Ok(FaultOutcome::Mmio { gpa, access });
        };
        let write = access.contains(Access::WRITE);
        if write && slot.flags().contains(SlotFlags::READONLY) {
            return Ok(FaultOutcome::Denied(Denied::ReadOnlySlot { slot: slot.id(), gfn }));
        }
        if !self.format.walk_length().covers(gfn.0) {
            return Err(TdpError::GfnTooWide(gfn));
        }
        let log = ctx.log(slot.id());
        if log.is_none() && slot.flags().contains(SlotFlags::DIRTY_LOG) {
            return Err(TdpError::NoDirtyLog(slot.id()));
        }
        if let Some(m) = self.fast_path(gfn, access, slot.id()) {
            return Ok(FaultOutcome::Mapped(m));
        }

        let snap = inv.snapshot();
        let hva = slot.gfn_to_hva(gfn).expect("the slot holds the frame");
        let page = host.resolve(hva, write).map_err(|HostFault| TdpError::HostFault(gfn))?;
        if write && !page.writable {
            return Ok(FaultOutcome::Denied(Denied::HostReadOnly(gfn)));
        }
        let width = self.format.phys_width();
        if !width.fits(page.pfn) {
            return Err(TdpError::PfnTooWide { pfn: page.pfn, width: width.bits() });
        }
        if inv.must_retry(snap, hva) {
            return Ok(FaultOutcome::Retry);
        }

        let logging = log.is_some();
        let mut size = if logging { PageSize::Size4K } else { self.max_size.min(page.size) };
        while size != PageSize::Size4K {
            let offset = gfn.0 & (size.frames() - 1);
            let head_pfn = page.pfn.0.wrapping_sub(offset);
            if slot.allows_page(gfn, size.shift()) && head_pfn & (size.frames() - 1) == 0 {
                break;
            }
            size = size.smaller().expect("4 KiB ends the loop");
        }
        let mut leaf_access = Access::READ | Access::EXEC;
        // In a slot logged by write protection only a write fault maps
        // writable, so that the log sees every first write; under dirty-bit
        // tracking any fault may (D stays clear until the CPU writes).
        let tracking = log.map(|l| l.tracking());
        if page.writable
            && !slot.flags().contains(SlotFlags::READONLY)
            && (write || tracking != Some(Tracking::WriteProtect))
        {
            leaf_access |= Access::WRITE;
        }
        // The access is about to happen: preset A (and D for a write), which
        // spares the processor a locked update of the fresh entry.
        let ad = self.format.accessed_mask() | if write { self.format.dirty_mask() } else { 0 };
        let want = NewLeaf { gfn, pfn: page.pfn, access: leaf_access, ad, slot: Some(slot.id()) };
        // Log, then grant: the engine asks the log right before it stores
        // the writable leaf, with the leaf's handle.
        let mut grant = None;
        let mut ask = |h: PteHandle| -> Result<bool, TdpError> {
            if log.is_none() {
                return Ok(true);
            }
            let g = ctx.before_grant(slot.id(), gfn, h).map_err(TdpError::DirtyLog)?;
            grant = Some(g);
            Ok(g != WriteGrant::RingFull)
        };
        let done = self.install(want, size, false, &mut ask, flush)?;
        let size = PageSize::at_level(done.pos.level).expect("leaves exist at levels 1 to 3 only");
        let access = self.format.leaf_access(done.new);
        Ok(FaultOutcome::Mapped(Mapping {
            gfn: self.entry_gfn(done.pos),
            pfn: self.format.entry_pfn(done.new, done.pos.level),
            size,
            access,
            slot: slot.id(),
            kind: MapKind::Installed,
            dirtied: write && access.contains(Access::WRITE),
            handle: done.pos.handle(),
            grant,
        }))
    }

    /// Serves the fault without the host when the leaf already permits the
    /// access or only needs its access-tracked permissions back.
    fn fast_path(&mut self, gfn: Gfn, access: Access, slot: SlotId) -> Option<Mapping> {
        let (pos, e) = self.find_leaf(gfn)?;
        let f = &self.format;
        let size = PageSize::at_level(pos.level)?;
        let mapping = |access, kind| Mapping {
            gfn: Gfn(gfn.0 & !(size.frames() - 1)),
            pfn: f.entry_pfn(e, pos.level),
            size,
            access,
            slot,
            kind,
            dirtied: false,
            handle: pos.handle(),
            grant: None,
        };
        if f.is_present(e) {
            let have = f.leaf_access(e);
            if have.contains(access) {
                let m = mapping(have, MapKind::Spurious);
                self.stats.spurious += 1;
                return Some(Mapping { dirtied: access.contains(Access::WRITE), ..m });
            }
            return None;
        }
        let saved = f.tracked_access(e);
        if !saved.contains(access) {
            return None;
        }
        let restored = f.restore_tracked(e);
        // Not present, so the processor cannot change it: a failed exchange
        // means another path changed it; take the slow path.
        self.entry(pos).compare_exchange(e, restored, Ordering::AcqRel, Ordering::Acquire).ok()?;
        let m = mapping(saved, MapKind::Restored);
        self.stats.restores += 1;
        Some(Mapping { dirtied: access.contains(Access::WRITE), ..m })
    }
}
