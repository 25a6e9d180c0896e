//! The guest-memory MMU under the Linux VMM, as a parameter: the VMM serves nested faults,
//! runs dirty-log rounds, ages and invalidates through this trait only. Today it is the
//! nested MMU of the scenarios ([`crate::nested::Nested`]: arch-x86's TDP engine with
//! mmu-generic's memslots, dirty logs, ageing and invalidation), on NPT, or arch-x86's
//! shadow MMU ([`super::shadow_mmu::ShadowLinux`]), which also serves the paging exits
//! (#PF, CR accesses, INVLPG) and sets the processor's paging state before each entry.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, GfnRange, HvaRange};
use mmu_generic::age::AgeReport;
use mmu_generic::dirty_log::Tracking;
use mmu_generic::memslot::SlotId;

use super::ram::GuestRam;
use super::vcpu::{LinuxExit, VCpu};
use crate::nested::{Counters, FaultOutcome, Nested, NestedError};
use crate::vendor::Vendor;

/// What the Linux VMM needs from the MMU of guest memory.
pub trait GuestMmu {
    /// A short name for the report ("NPT").
    fn name(&self) -> &'static str;
    /// Serves a nested (or shadow) fault at `gpa` with the hardware's report `info`.
    fn fault(&mut self, gpa: u64, info: u64, cpu: &mut dyn Vendor) -> Result<FaultOutcome, NestedError>;
    /// Performs the TLB flush the last changes need before the next entry.
    fn flush(&mut self, cpu: &mut dyn Vendor);
    /// Starts (or restarts, in another mode) dirty logging of slot `id`; returns the huge
    /// leaves split.
    fn start_dirty_log(
        &mut self,
        id: SlotId,
        tracking: Tracking,
        cpu: &mut dyn Vendor,
    ) -> Result<usize, NestedError>;
    /// One dirty-log round (its flush done): the frames written since the last one.
    fn harvest(&mut self, id: SlotId, cpu: &mut dyn Vendor) -> Result<Vec<Gfn>, NestedError>;
    /// Ages the host memory behind `gfns`.
    fn age(&mut self, gfns: GfnRange) -> Option<AgeReport>;
    /// Invalidates host range `range` (an MMU notifier's call); returns the pages unmapped.
    fn invalidate(&mut self, range: HvaRange, cpu: &mut dyn Vendor) -> u64;
    /// Fault counters.
    fn counters(&self) -> Counters;
    /// Table frames in use.
    fn tables(&self) -> usize;
    /// What the MMU's faults are called in the report.
    fn fault_kind(&self) -> &'static str {
        "nested faults"
    }
    /// Serves an exit of the guest's paging (shadow paging: #PF, CR access, INVLPG);
    /// an MMU with nested paging takes none.
    fn paging_exit(
        &mut self,
        exit: LinuxExit,
        _cpu: &mut dyn VCpu,
        _ram: &GuestRam,
    ) -> Result<PagingOutcome, String> {
        Err(format!("{exit:?} under {}", self.name()))
    }
    /// Brings the processor's paging state up to date before an entry (shadow paging:
    /// the shadow root for the guest's CR3 and controls).
    fn before_entry(&mut self, _cpu: &mut dyn VCpu) -> Result<(), String> {
        Ok(())
    }
    /// Lines of figures for the run's report.
    fn report(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a paging exit came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingOutcome {
    /// Served: resume the guest.
    Done,
    /// The access goes to guest-physical memory outside every memslot.
    Mmio(u64),
}

impl GuestMmu for Nested {
    fn name(&self) -> &'static str {
        "NPT"
    }

    fn fault(&mut self, gpa: u64, info: u64, cpu: &mut dyn Vendor) -> Result<FaultOutcome, NestedError> {
        Nested::fault(self, gpa, info, cpu)
    }

    fn flush(&mut self, cpu: &mut dyn Vendor) {
        Nested::flush(self, cpu)
    }

    fn start_dirty_log(
        &mut self,
        id: SlotId,
        tracking: Tracking,
        cpu: &mut dyn Vendor,
    ) -> Result<usize, NestedError> {
        Nested::start_dirty_log(self, id, tracking, cpu)
    }

    fn harvest(&mut self, id: SlotId, cpu: &mut dyn Vendor) -> Result<Vec<Gfn>, NestedError> {
        Nested::harvest(self, id, cpu)
    }

    fn age(&mut self, gfns: GfnRange) -> Option<AgeReport> {
        self.age_gfns(gfns)
    }

    fn invalidate(&mut self, range: HvaRange, cpu: &mut dyn Vendor) -> u64 {
        Nested::invalidate(self, range, cpu)
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn tables(&self) -> usize {
        self.tables_in_use()
    }
}
