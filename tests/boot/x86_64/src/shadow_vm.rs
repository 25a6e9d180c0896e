//! A guest on shadow paging: arch-x86's `ShadowMmu` over identity-mapped frames, the
//! guest's control registers kept by the hypervisor, and the exits shadow paging needs
//! (#PF, MOV to/from CR0/CR3/CR4, INVLPG, EFER), written once over [`ShadowVendor`].
//!
//! The processor runs the guest on the shadow root only: PAE shadow tables for a 32-bit
//! or PAE guest, 4-level ones for a 4-level guest, CR0.WP and EFER.NXE forced, as
//! `ShadowMmu::hw_cpu` says. While the guest has paging off (between its MOV to CR0 that
//! clears PG and the one that sets it again, on its way to PAE or long mode) it runs on
//! the shadow of the hypervisor's identity page directory at [`IDENT_PD`], a page of
//! guest memory the guest's loader reserves (KVM's identity map for VMX without
//! unrestricted guest): linear = guest-physical within the memslots, and an access
//! outside them is an MMIO exit as it would be with paging off.
//!
//! Hypervisor writes to guest memory (the walker's A/D updates in the guest's tables,
//! emulated table writes, the loader's and the mailbox's stores) are recorded by
//! [`ShadowRam`] and marked in the slot's dirty log, so a migration copies them too.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use arch_x86::format::PageSize;
use arch_x86::frame::IdentityMemory;
use arch_x86::shadow::guest_walk::PdptrError;
use arch_x86::shadow::{
    load_pdptrs, walk_any, AccessKind, AccessOp, CpuFeatures, DirtyTracker, GuestCpu, GuestMode, PhysMemory,
    ShadowConfig, ShadowError, ShadowFault, ShadowMmu, SlotMemory,
};
use arch_x86::tdp::{HostFault, HostMemory, HostPage};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Gva, Hva, Pfn};
use mmu_generic::backend::TlbFlush;
use mmu_generic::dirty_log::{SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, SlotId};
use mmu_generic::pte_list::PteHandle;

use crate::decode::{self, Op, Src};
use crate::sguest;
use crate::shadow_ram::ShadowRam;
use crate::vendor::GuestRegs;

/// The hypervisor's identity page directory (4 MiB pages, reserved guest memory).
pub const IDENT_PD: u64 = 0xf000;
/// Pages of guest RAM (gpa 0 up).
pub const RAM_PAGES: u64 = 0x400;
/// Most exits one script may take.
pub const MAX_EXITS: u32 = 50_000;

pub const CR0_PE: u64 = 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
const MSR_EFER: u32 = 0xc000_0080;

/// The paging state the processor must run the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwPaging {
    /// CR0 (PG, PE, WP set).
    pub cr0: u64,
    /// CR3: the shadow root.
    pub cr3: u64,
    /// CR4 (PAE set, the guest's SMEP/SMAP).
    pub cr4: u64,
    /// EFER (NXE set; LME and LMA for a long-mode guest).
    pub efer: u64,
}

/// Why the guest stopped, as the shadow runs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SExit {
    /// An intercepted #PF: the address (CR2) and the error code.
    PageFault {
        /// The faulting linear address.
        addr: u64,
        /// The error code.
        code: u32,
    },
    /// A MOV from CRn (decode the instruction for the register).
    CrRead(u8),
    /// A MOV to CRn.
    CrWrite(u8),
    /// INVLPG.
    Invlpg,
    /// RDMSR or WRMSR.
    Msr,
    /// OUT to a port (RIP already advanced).
    IoOut {
        /// Port.
        port: u16,
        /// Value.
        value: u32,
    },
    /// HLT.
    Halt,
    /// The run's time budget expired.
    Timer,
    /// Triple fault.
    Shutdown,
    /// VM entry failed.
    EntryFailed {
        /// Vendor code.
        code: u64,
    },
    /// Anything else.
    Other {
        /// Exit code or reason.
        code: u64,
        /// First piece of information.
        info1: u64,
        /// Second piece.
        info2: u64,
    },
}

/// A virtualization extension with nested paging off, as the shadow runs drive it.
pub trait ShadowVendor {
    /// "SVM" or "VMX".
    fn name(&self) -> &'static str;
    /// Turns nested paging off and sets the intercepts shadow paging needs.
    fn enter_shadow_mode(&mut self) -> Result<(), String>;
    /// Resets the guest: 32-bit flat protected mode at `rip`, `rsp`.
    fn reset(&mut self, rip: u64, rsp: u64);
    /// Sets the paging state the processor runs the guest with, and what the guest
    /// reads back from CR0 and CR4 (VMX read shadows).
    fn set_paging(&mut self, hw: &HwPaging, guest_cr0: u64, guest_cr4: u64);
    /// Flushes the guest's TLB (its ASID or VPID) before the next entry.
    fn flush_tlb(&mut self);
    /// Injects an exception on the next entry (with CR2 for #PF).
    fn inject(&mut self, vector: u8, code: Option<u32>, cr2: u64);
    /// Runs until the next exit, bounded by a time budget.
    fn run(&mut self) -> SExit;
    /// The guest's general-purpose registers but RSP.
    fn regs(&mut self) -> &mut GuestRegs;
    /// RIP.
    fn rip(&mut self) -> u64;
    /// Sets RIP.
    fn set_rip(&mut self, rip: u64);
    /// RSP.
    fn rsp(&mut self) -> u64;
    /// Sets RSP.
    fn set_rsp(&mut self, rsp: u64);
    /// Whether CS is a 64-bit code segment.
    fn code64(&mut self) -> bool;
}

/// The shadow vendor as the core's [`TlbFlush`]: a shadow TLB caches linear
/// addresses, so a guest-frame range cannot be turned into INVLPGs and every flush
/// the MMU records flushes the guest's whole TLB (as `shadow::mmu` documents).
pub struct ShadowTlb<'a>(pub &'a mut dyn ShadowVendor);

impl TlbFlush for ShadowTlb<'_> {
    fn flush_range(&mut self, _range: GfnRange) {
        self.0.flush_tlb();
    }

    fn flush_all(&mut self) {
        self.0.flush_tlb();
    }
}

/// The access a #PF error code describes (SDM Vol. 3A 4.7): I/D (bit 4) a fetch, W/R
/// (bit 1) a write, else a read; U/S (bit 2) from user mode.
pub fn pf_access(code: u32) -> AccessKind {
    let op = if code & 0x10 != 0 {
        AccessOp::Fetch
    } else if code & 2 != 0 {
        AccessOp::Write
    } else {
        AccessOp::Read
    };
    if code & 4 != 0 {
        AccessKind::user(op)
    } else {
        AccessKind::supervisor(op)
    }
}

/// Host memory: identity-mapped, 4 KiB, writable.
pub struct IdentHost;

impl HostMemory for IdentHost {
    fn resolve(&mut self, hva: Hva, _write: bool) -> Result<HostPage, HostFault> {
        Ok(HostPage { pfn: Pfn(hva.0 >> 12), writable: true, size: PageSize::Size4K })
    }
}

/// The shadow MMU type of the boot image.
pub type Mmu = ShadowMmu<IdentityMemory, ShadowRam, IdentHost>;

/// The dirty logs of the slots, as the shadow fault path consults them.
#[derive(Default)]
pub struct Logs {
    /// One per slot id.
    pub logs: Vec<Option<SlotDirtyLog>>,
}

impl Logs {
    fn get(&self, slot: SlotId) -> Option<&SlotDirtyLog> {
        self.logs.get(slot.0 as usize).and_then(Option::as_ref)
    }
}

impl DirtyTracker for Logs {
    fn write_protected(&self, slot: SlotId) -> bool {
        self.get(slot).is_some_and(|l| l.tracking() == Tracking::WriteProtect)
    }

    fn note_writable(&mut self, slot: SlotId, gfn: Gfn, h: PteHandle) -> bool {
        match self.logs.get_mut(slot.0 as usize).and_then(Option::as_mut) {
            Some(log) => log.note_writable(gfn, h, None).is_ok(),
            None => true,
        }
    }

    fn mark(&mut self, slot: SlotId, gfn: Gfn) -> bool {
        match self.get(slot) {
            Some(log) => log.mark(gfn, None).is_ok(),
            None => true,
        }
    }
}

/// Marks a page the hypervisor wrote (not through a shadow leaf) in its slot's log.
fn mark_hypervisor_write(log: &SlotDirtyLog, slot: &Memslot, gfn: Gfn) {
    if slot.gfns().contains(gfn) {
        // Bitmap mode: no ring, so the mark cannot be refused.
        let _ = log.mark(gfn, None);
    }
}

/// Counters of one VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Exits of any kind.
    pub exits: u64,
    /// #PF exits.
    pub pf_exits: u64,
    /// #PF injected into the guest.
    pub injected_pf: u64,
    /// #GP injected.
    pub injected_gp: u64,
    /// Guest-table writes emulated.
    pub emulated: u64,
    /// MOV to CR3 (and paging-control changes) served.
    pub cr3_loads: u64,
    /// INVLPG served.
    pub invlpgs: u64,
    /// Guest TLB flushes requested of the vendor.
    pub flushes: u64,
    /// CR reads and writes.
    pub cr_accesses: u64,
    /// Pages marked dirty for hypervisor writes.
    pub hv_marked: u64,
}

/// Why a script did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SRunError {
    /// The guest touched guest-physical memory outside every memslot.
    NoSlot(u64),
    /// The MMU refused a write.
    Denied(u64),
    /// The guest loaded CR3 with an address outside guest RAM.
    Cr3OutsideRam(u64),
    /// The shadow MMU failed.
    Mmu(ShadowError),
    /// An instruction the hypervisor had to decode is not one it knows.
    Undecodable {
        /// Where.
        rip: u64,
        /// Its first bytes.
        bytes: [u8; 4],
    },
    /// The instruction at an exit is not the kind the exit reports.
    WrongInstruction {
        /// Where.
        rip: u64,
        /// What the exit called for.
        expected: &'static str,
        /// What was decoded.
        found: Op,
    },
    /// An emulated store's operand is not the address that faulted.
    StoreAddress {
        /// Where.
        rip: u64,
        /// The decoded operand's address.
        decoded: u64,
        /// The faulting address.
        fault: u64,
    },
    /// The guest did not reach the paging mode its boot script switches to.
    WrongMode {
        /// The mode the guest is in.
        mode: GuestMode,
        /// CR3 as the guest reads it.
        cr3: u64,
    },
    /// The guest's own #PF handler found no fix for a fault.
    GuestFault(u64),
    /// The guest reported an exception it does not handle.
    GuestException(u32),
    /// An MSR other than EFER.
    Msr(u32),
    /// The time budget ran out.
    Budget,
    /// Too many exits for one script.
    TooManyExits,
    /// Any other exit.
    Unexpected(SExit),
    /// A script longer than the mailbox holds.
    ScriptTooLong(usize),
}

impl core::fmt::Display for SRunError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SRunError::NoSlot(g) => write!(f, "guest access to gpa {g:#x} outside every memslot"),
            SRunError::Denied(g) => write!(f, "write to gpa {g:#x} denied"),
            SRunError::Cr3OutsideRam(c) => write!(f, "guest CR3 {c:#x} points outside guest RAM"),
            SRunError::Mmu(e) => write!(f, "shadow MMU: {e}"),
            SRunError::Undecodable { rip, bytes } => {
                write!(f, "undecodable instruction at {rip:#x}: {bytes:02x?}")
            }
            SRunError::WrongInstruction { rip, expected, found } => {
                write!(f, "exit for {expected} at {rip:#x}, but the instruction is {found:?}")
            }
            SRunError::StoreAddress { rip, decoded, fault } => {
                write!(f, "store at {rip:#x} writes {decoded:#x}, the fault was at {fault:#x}")
            }
            SRunError::WrongMode { mode, cr3 } => write!(f, "the guest is in {mode:?} with CR3 {cr3:#x}"),
            SRunError::GuestFault(a) => write!(f, "guest #PF at {a:#x} without a fix"),
            SRunError::GuestException(v) => write!(f, "guest exception {v:#x}"),
            SRunError::Msr(m) => write!(f, "guest MSR access {m:#x}"),
            SRunError::Budget => f.write_str("run budget expired"),
            SRunError::TooManyExits => write!(f, "more than {MAX_EXITS} exits for one script"),
            SRunError::Unexpected(e) => write!(f, "unexpected exit {e:?}"),
            SRunError::ScriptTooLong(n) => write!(f, "a script of {n} operations does not fit the mailbox"),
        }
    }
}

/// What a zap-all while the guest ran found and did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZapReport {
    /// Shadow pages alive before.
    pub pages: usize,
    /// Of which unsync.
    pub unsync: usize,
    /// Pages zapped as obsolete.
    pub obsolete: u64,
    /// Pages freed by the reclaim.
    pub freed: usize,
    /// Reclaim batches.
    pub batches: usize,
    /// Pages resynced during the zap and reclaim (none may be).
    pub resynced: u64,
}

/// The guest's control registers as the guest sees them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Controls {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// PDPTE registers (PAE).
    pub pdptrs: [u64; 4],
}

/// One guest on shadow paging.
pub struct ShadowVm<'v> {
    /// The vendor.
    pub vendor: &'v mut dyn ShadowVendor,
    /// The shadow MMU.
    pub mmu: Mmu,
    /// Dirty logs.
    pub logs: Logs,
    /// The guest's controls.
    pub ctl: Controls,
    /// Counters.
    pub counters: Counters,
    /// Zap everything by generation at the guest's next MOV from CR3, in the middle of
    /// its script (the guest's registers and TLB live).
    pub zap_on_cr3_read: bool,
    /// What that zap did.
    pub zap_report: Option<ZapReport>,
    hw: Option<HwPaging>,
}

fn bit(v: u64, b: u64) -> bool {
    v & b != 0
}

impl<'v> ShadowVm<'v> {
    /// A VM over `slots`, guest RAM `ram`, shadow tables in `frames`.
    pub fn new(
        vendor: &'v mut dyn ShadowVendor,
        frames: IdentityMemory,
        ram: ShadowRam,
        slots: Memslots,
        features: CpuFeatures,
        max_pages: usize,
    ) -> Self {
        let mut config = ShadowConfig::new(features);
        config.max_pages = max_pages;
        let mmu = ShadowMmu::new(config, frames, ram, IdentHost, slots);
        ShadowVm {
            vendor,
            mmu,
            logs: Logs::default(),
            ctl: Controls::default(),
            counters: Counters::default(),
            zap_on_cr3_read: false,
            zap_report: None,
            hw: None,
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &ShadowRam {
        self.mmu.guest()
    }

    /// Starts the guest at `rip` in 32-bit protected mode with its paging on: CR3 =
    /// `cr3` (a 32-bit page directory), CR0.WP and CR4.PSE set.
    pub fn boot(&mut self, rip: u64, rsp: u64, cr3: u64) -> Result<(), SRunError> {
        self.vendor.reset(rip, rsp);
        self.ctl = Controls {
            cr0: CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3,
            cr4: CR4_PSE,
            efer: 0,
            pdptrs: [0; 4],
        };
        self.hw = None;
        self.paging_changed().map(|_| ())
    }

    /// The guest's paging state as the shadow MMU takes it.
    pub fn guest_cpu(&self) -> GuestCpu {
        let c = &self.ctl;
        if !bit(c.cr0, CR0_PG) {
            let mut cpu = GuestCpu::new(GuestMode::Bits32, IDENT_PD);
            cpu.cr0_wp = bit(c.cr0, CR0_WP);
            cpu.cr4_pse = true;
            cpu.efer_nxe = false;
            return cpu;
        }
        let mode = if bit(c.efer, EFER_LMA) {
            if bit(c.cr4, CR4_LA57) {
                GuestMode::Five
            } else {
                GuestMode::Four
            }
        } else if bit(c.cr4, CR4_PAE) {
            GuestMode::Pae
        } else {
            GuestMode::Bits32
        };
        GuestCpu {
            mode,
            cr3: c.cr3,
            pdptrs: c.pdptrs,
            cr0_wp: bit(c.cr0, CR0_WP),
            cr4_pse: bit(c.cr4, CR4_PSE),
            cr4_smep: bit(c.cr4, CR4_SMEP),
            cr4_smap: bit(c.cr4, CR4_SMAP),
            efer_nxe: bit(c.efer, EFER_NXE),
            eflags_ac: false,
        }
    }

    /// A MOV to CR3 or a change of paging controls: checks the root, loads the PDPTEs
    /// (PAE), switches the shadow root (resyncing unsync pages). `Ok(false)`: #GP was
    /// injected (reserved PDPTE bits).
    fn paging_changed(&mut self) -> Result<bool, SRunError> {
        let cpu = self.guest_cpu();
        if bit(self.ctl.cr0, CR0_PG) {
            let root = match cpu.mode {
                GuestMode::Bits32 => cpu.cr3 & 0xffff_f000,
                GuestMode::Pae => cpu.cr3 & 0xffff_ffe0,
                _ => cpu.cr3 & 0x000f_ffff_ffff_f000,
            };
            if self.mmu.memslots().lookup(Gpa(root).gfn()).is_none() {
                return Err(SRunError::Cr3OutsideRam(cpu.cr3));
            }
            if cpu.mode == GuestMode::Pae {
                let mem = SlotMemory { slots: self.mmu.memslots(), mem: self.mmu.guest() };
                match load_pdptrs(&mem, cpu.cr3, self.mmu.features()) {
                    Ok(p) => self.ctl.pdptrs = p,
                    Err(PdptrError::Reserved(_)) => {
                        self.vendor.inject(13, Some(0), 0);
                        self.counters.injected_gp += 1;
                        return Ok(false);
                    }
                    Err(PdptrError::NotMemory(_)) => return Err(SRunError::Cr3OutsideRam(cpu.cr3)),
                }
            }
        }
        let cpu = self.guest_cpu();
        self.mmu.load_cr3(&cpu).map_err(SRunError::Mmu)?;
        self.counters.cr3_loads += 1;
        self.after_mmu();
        Ok(true)
    }

    /// Folds what the MMU's last operation did to guest memory into the dirty logs: the
    /// pages the hypervisor wrote, and the dirty leaves its own zaps dropped.
    pub fn after_mmu(&mut self) {
        let (slots, logs, counters) = (self.mmu.memslots(), &self.logs, &mut self.counters);
        self.mmu.guest().take_written(|gfn| {
            if let Some(slot) = slots.lookup(gfn) {
                if let Some(log) = logs.get(slot.id()) {
                    mark_hypervisor_write(log, slot, gfn);
                    counters.hv_marked += 1;
                }
            }
        });
        for (slot, leaf) in self.mmu.take_zapped_dirty() {
            if let Some(log) = self.logs.get(slot) {
                log.note_zapped(&leaf);
            }
        }
    }

    /// Brings the processor's paging state and TLB up to date before an entry.
    fn sync_hw(&mut self) -> Result<(), SRunError> {
        let cpu = self.guest_cpu();
        let Some(hwc) = self.mmu.hw_cpu(&cpu) else {
            self.paging_changed()?;
            return self.sync_hw();
        };
        let c = &self.ctl;
        let mut efer = EFER_NXE;
        let mut cr4 = CR4_PAE | (c.cr4 & (CR4_SMEP | CR4_SMAP));
        if matches!(hwc.mode, GuestMode::Four | GuestMode::Five) {
            efer |= EFER_LME | EFER_LMA;
        }
        if hwc.mode == GuestMode::Five {
            cr4 |= CR4_LA57;
        }
        let hw =
            HwPaging { cr0: c.cr0 | CR0_PG | CR0_PE | CR0_WP | CR0_NE | CR0_ET, cr3: hwc.cr3, cr4, efer };
        if self.hw != Some(hw) {
            self.vendor.set_paging(&hw, c.cr0, c.cr4);
            self.hw = Some(hw);
        }
        let flush = self.mmu.take_flush();
        if flush.is_needed() {
            self.counters.flushes += 1;
        }
        flush.flush(&mut ShadowTlb(&mut *self.vendor));
        Ok(())
    }

    fn gpr(&mut self, n: u8) -> u64 {
        if n == 4 {
            return self.vendor.rsp();
        }
        let r = self.vendor.regs();
        match n {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            n => r.r[(n as usize - 8) & 7],
        }
    }

    fn set_gpr(&mut self, n: u8, v: u64) {
        if n == 4 {
            return self.vendor.set_rsp(v);
        }
        let r = self.vendor.regs();
        let slot = match n {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            n => &mut r.r[(n as usize - 8) & 7],
        };
        *slot = v;
    }

    /// Fetches and decodes the instruction at RIP through the guest's own tables.
    fn decode_at_rip(&mut self) -> Result<(decode::Insn, u64, bool), SRunError> {
        let rip = self.vendor.rip();
        let long = self.vendor.code64();
        let cpu = self.guest_cpu();
        let mut bytes = [0u8; 15];
        let mem = SlotMemory { slots: self.mmu.memslots(), mem: self.mmu.guest() };
        let mut got = 0;
        for (i, b) in bytes.iter_mut().enumerate() {
            let va = rip.wrapping_add(i as u64);
            let va = if long { va } else { va & 0xffff_ffff };
            let Ok(w) = walk_any(
                &mem,
                &cpu,
                self.mmu.features(),
                Gva(va),
                AccessKind::supervisor(AccessOp::Fetch),
                false,
            ) else {
                break;
            };
            let word = mem.read(Gpa(w.gpa.0 & !3), 4).map_err(|_| SRunError::NoSlot(w.gpa.0))?;
            *b = (word >> ((w.gpa.0 & 3) * 8)) as u8;
            got = i + 1;
        }
        let insn = decode::decode(&bytes[..got], long)
            .ok_or(SRunError::Undecodable { rip, bytes: [bytes[0], bytes[1], bytes[2], bytes[3]] })?;
        Ok((insn, rip, long))
    }

    /// A MOV to CRn; `Ok(false)` if it faulted (#GP injected: RIP stays on it).
    fn write_cr(&mut self, cr: u8, v: u64) -> Result<bool, SRunError> {
        let old = self.ctl;
        match cr {
            0 => {
                self.ctl.cr0 = v | CR0_ET;
                if bit(v, CR0_PG) && bit(self.ctl.efer, EFER_LME) {
                    self.ctl.efer |= EFER_LMA;
                } else if !bit(v, CR0_PG) {
                    self.ctl.efer &= !EFER_LMA;
                }
                if (old.cr0 ^ self.ctl.cr0) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
                    return self.reload_or_restore(old);
                }
            }
            3 => {
                self.ctl.cr3 = v;
                if bit(self.ctl.cr0, CR0_PG) {
                    return self.reload_or_restore(old);
                }
            }
            4 => {
                self.ctl.cr4 = v;
                if (old.cr4 ^ v) & (CR4_PSE | CR4_PAE | CR4_PGE | CR4_SMEP | CR4_SMAP | CR4_LA57) != 0 {
                    return self.reload_or_restore(old);
                }
            }
            _ => return Err(SRunError::Unexpected(SExit::CrWrite(cr))),
        }
        Ok(true)
    }

    /// [`Self::paging_changed`] for a MOV to CRn: a faulting one changes nothing.
    fn reload_or_restore(&mut self, old: Controls) -> Result<bool, SRunError> {
        let ok = self.paging_changed()?;
        if !ok {
            self.ctl = old;
        }
        Ok(ok)
    }

    fn read_cr(&self, cr: u8) -> Result<u64, SRunError> {
        match cr {
            0 => Ok(self.ctl.cr0),
            3 => Ok(self.ctl.cr3),
            4 => Ok(self.ctl.cr4),
            _ => Err(SRunError::Unexpected(SExit::CrRead(cr))),
        }
    }

    fn skip(&mut self, rip: u64, len: u64, long: bool) {
        let next = rip.wrapping_add(len);
        self.vendor.set_rip(if long { next } else { next & 0xffff_ffff });
    }

    fn serve_page_fault(&mut self, addr: u64, code: u32) -> Result<(), SRunError> {
        self.counters.pf_exits += 1;
        let access = pf_access(code);
        let cpu = self.guest_cpu();
        let out = self.mmu.page_fault(&cpu, Gva(addr), access, &mut self.logs).map_err(SRunError::Mmu);
        self.after_mmu();
        match out? {
            ShadowFault::Fixed | ShadowFault::Retry => Ok(()),
            ShadowFault::InjectPf(c) => {
                self.counters.injected_pf += 1;
                self.vendor.inject(14, Some(c.bits()), addr);
                Ok(())
            }
            ShadowFault::InjectGp => {
                self.counters.injected_gp += 1;
                self.vendor.inject(13, Some(0), 0);
                Ok(())
            }
            ShadowFault::Emulate { gpa } => self.emulate_store(gpa, addr),
            ShadowFault::Mmio { gpa } => Err(SRunError::NoSlot(gpa.0)),
            ShadowFault::Denied { gpa } => Err(SRunError::Denied(gpa.0)),
        }
    }

    /// Emulates the store at RIP that wrote a write-protected guest table at `gpa`.
    fn emulate_store(&mut self, gpa: Gpa, addr: u64) -> Result<(), SRunError> {
        let (insn, rip, long) = self.decode_at_rip()?;
        let Op::Store { mem, bytes, src } = insn.op else {
            return Err(SRunError::WrongInstruction { rip, expected: "a store", found: insn.op });
        };
        let next = rip.wrapping_add(insn.len);
        let regs: [u64; 16] = core::array::from_fn(|i| self.gpr(i as u8));
        let ea = decode::address(&mem, |n| regs[n as usize], next, long);
        if ea != addr {
            return Err(SRunError::StoreAddress { rip, decoded: ea, fault: addr });
        }
        let mask = if bytes == 8 { u64::MAX } else { (1u64 << (8 * bytes)) - 1 };
        let value = match src {
            Src::Reg(r) => regs[r as usize],
            Src::Imm(v) => v,
        } & mask;
        let out = self.mmu.emulated_write(gpa, bytes, value).map_err(SRunError::Mmu);
        self.after_mmu();
        out?;
        self.counters.emulated += 1;
        self.skip(rip, insn.len, long);
        Ok(())
    }

    fn serve_cr(&mut self) -> Result<(), SRunError> {
        self.counters.cr_accesses += 1;
        let (insn, rip, long) = self.decode_at_rip()?;
        let mask = if long { u64::MAX } else { 0xffff_ffff };
        match insn.op {
            Op::MovToCr { cr, gpr } => {
                let v = self.gpr(gpr) & mask;
                if self.write_cr(cr, v)? {
                    self.skip(rip, insn.len, long);
                }
                Ok(())
            }
            Op::MovFromCr { cr, gpr } => {
                if cr == 3 && core::mem::take(&mut self.zap_on_cr3_read) {
                    self.zap_all_now();
                }
                let v = self.read_cr(cr)?;
                self.set_gpr(gpr, v & mask);
                self.skip(rip, insn.len, long);
                Ok(())
            }
            other => Err(SRunError::WrongInstruction { rip, expected: "a MOV to or from CRn", found: other }),
        }
    }

    /// Zap-all by generation, then the batched reclaim of the obsolete pages. The
    /// processor's root is gone with them: the next entry loads a fresh one.
    fn zap_all_now(&mut self) {
        let before = self.mmu.stats();
        let (pages, unsync) = (self.mmu.pages(), self.mmu.unsync_pages());
        self.mmu.invalidate_all();
        let rep = self.mmu.reclaim_obsolete(16, || true);
        self.after_mmu();
        let after = self.mmu.stats();
        self.zap_report = Some(ZapReport {
            pages,
            unsync,
            obsolete: after.obsolete_zapped - before.obsolete_zapped,
            freed: rep.freed,
            batches: rep.batches,
            resynced: after.synced - before.synced,
        });
    }

    fn serve_invlpg(&mut self) -> Result<(), SRunError> {
        let (insn, rip, long) = self.decode_at_rip()?;
        let Op::Invlpg(mem) = insn.op else {
            return Err(SRunError::WrongInstruction { rip, expected: "INVLPG", found: insn.op });
        };
        let next = rip.wrapping_add(insn.len);
        let regs: [u64; 16] = core::array::from_fn(|i| self.gpr(i as u8));
        let ea = decode::address(&mem, |n| regs[n as usize], next, long);
        let cpu = self.guest_cpu();
        self.mmu.invlpg(&cpu, Gva(ea));
        self.after_mmu();
        self.counters.invlpgs += 1;
        self.skip(rip, insn.len, long);
        Ok(())
    }

    fn serve_msr(&mut self) -> Result<(), SRunError> {
        let (insn, rip, long) = self.decode_at_rip()?;
        let ecx = self.vendor.regs().rcx as u32;
        if ecx != MSR_EFER {
            return Err(SRunError::Msr(ecx));
        }
        match insn.op {
            Op::Rdmsr => {
                let v = self.ctl.efer;
                let r = self.vendor.regs();
                r.rax = v & 0xffff_ffff;
                r.rdx = v >> 32;
            }
            Op::Wrmsr => {
                let r = self.vendor.regs();
                let v = (r.rax & 0xffff_ffff) | (r.rdx << 32);
                let old = self.ctl;
                self.ctl.efer = (v & !EFER_LMA) | (old.efer & EFER_LMA);
                if (old.efer ^ self.ctl.efer) & EFER_NXE != 0
                    && bit(self.ctl.cr0, CR0_PG)
                    && !self.reload_or_restore(old)?
                {
                    // #GP injected: the WRMSR did not happen.
                    return Ok(());
                }
            }
            other => {
                return Err(SRunError::WrongInstruction { rip, expected: "RDMSR or WRMSR", found: other })
            }
        }
        self.skip(rip, insn.len, long);
        Ok(())
    }

    /// Runs the guest until it reports on `DONE_PORT`; returns the reported value.
    pub fn run(&mut self) -> Result<u32, SRunError> {
        for _ in 0..MAX_EXITS {
            self.sync_hw()?;
            let exit = self.vendor.run();
            self.counters.exits += 1;
            match exit {
                SExit::PageFault { addr, code } => self.serve_page_fault(addr, code)?,
                SExit::CrRead(_) | SExit::CrWrite(_) => self.serve_cr()?,
                SExit::Invlpg => self.serve_invlpg()?,
                SExit::Msr => self.serve_msr()?,
                SExit::IoOut { port, value } if port == sguest::DONE_PORT => return Ok(value),
                SExit::IoOut { port, value } if port == sguest::FAULT_PORT => {
                    return Err(SRunError::GuestFault(value as u64))
                }
                SExit::IoOut { port, value } if port == sguest::EXC_PORT => {
                    return Err(SRunError::GuestException(value))
                }
                SExit::Timer => return Err(SRunError::Budget),
                other => return Err(SRunError::Unexpected(other)),
            }
        }
        Err(SRunError::TooManyExits)
    }

    /// A shadow leaf maps a frame outside every memslot: the gfn, if any.
    pub fn mapping_outside_slots(&self) -> Option<u64> {
        let slots = self.mmu.memslots();
        let base = self.ram().base() >> 12;
        let mut bad = None;
        self.mmu.for_each_mapping(|gfn, pfn, _| {
            let in_slot = slots.lookup(gfn).is_some();
            let backed = pfn.0 >= base && pfn.0 < base + RAM_PAGES && pfn.0 - base == gfn.0;
            if !in_slot || !backed {
                bad = Some(gfn.0);
            }
        });
        bad
    }
}

/// Formats a fault log entry list.
pub fn fmt_faults(v: &[(u64, u64)]) -> String {
    let parts: Vec<String> = v.iter().map(|(a, c)| format!("{a:#x}/{c:#x}")).collect();
    parts.join(" ")
}
