//! The Linux guest on shadow paging (nested paging off): arch-x86's `ShadowMmu` builds
//! every table the processor walks, from the guest kernel's own 4-level (or 5-level)
//! tables, behind the same [`GuestMmu`] interface as the nested MMU, so the boot, the
//! migrations, the ageing and the zap run unchanged on top.
//!
//! The vCPU intercepts #PF, reads and writes of CR0, CR3 and CR4, and INVLPG
//! ([`super::svm_cpu::SvmCpu::enable_shadow`]); QEMU's SVM has no decode assists, so the
//! instruction at RIP is fetched through the guest's tables and decoded here
//! ([`crate::decode`]). A #PF the guest's own tables call for is injected with the
//! walker's error code and CR2; a write to a write-protected guest table is emulated
//! (`mov` stores), and a write the decoder does not know (a locked read-modify-write, a
//! string store into a page-table page being reused) stops the shadowing of that frame
//! ([`ShadowMmu::unprotect_gfn`]) and lets the guest retry it, as KVM does. Before each
//! entry the processor gets the shadow root and the guest's control bits with CR0.WP and
//! EFER.NXE forced; any TLB flush the MMU asks for becomes TLB_CONTROL = 1.
//!
//! Hypervisor writes to guest memory (the walker's A/D updates in the guest's tables and
//! emulated table writes) are recorded by [`ShadowRam`] and marked in the RAM slot's dirty
//! log, so a migration copies them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use arch_x86::format::PhysAddrWidth;
use arch_x86::frame::{FrameMemory as _, IdentityMemory};
use arch_x86::shadow::{CpuFeatures, GuestCpu, GuestMode, ShadowConfig, ShadowFault, ShadowMmu};
use mmu_generic::addr::{Gfn, GfnRange, Gpa, Gva, Hva, HvaRange, Pfn};
use mmu_generic::age::{self, AgeReport, NoAccessedBit};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslots, SlotId};

use super::mmio;
use super::mmu::{GuestMmu, PagingOutcome};
use super::ram::GuestRam;
use super::vcpu::{ControlRegs, Event, LinuxExit, VCpu};
use crate::decode::{self, Op, Src};
use crate::nested::{Counters, FaultOutcome, NestedError};
use crate::port::cpuid;
use crate::shadow_ram::ShadowRam;
use crate::shadow_vm::{pf_access, IdentHost, Logs};
use crate::vendor::Vendor;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const CR4_LA57: u64 = 1 << 12;
const CR4_PCIDE: u64 = 1 << 17;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;
/// Unprotects in a row by one instruction after which the run stops (a store through
/// the table it writes, which only emulation could complete).
const UNPROTECT_LOOP: u32 = 64;
const EFER_NXE: u64 = 1 << 11;
/// CR3 bits that address the root (MAXPHYADDR 52; the guest's own width is checked by the
/// memslot lookup).
const CR3_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// A decoded `stos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stos {
    /// Element size (1, 2, 4, 8).
    pub size: u64,
    /// REP prefix: RCX elements.
    pub rep: bool,
    /// Instruction length.
    pub len: u64,
}

/// Decodes `[rep] stos{b,w,d,q}` with 64-bit addressing (prefixes F3, 66, REX); `None`
/// for anything else (Intel SDM Vol. 2B, STOS; Vol. 2A 2.2.1: REX follows the legacy
/// prefixes).
pub fn decode_stos(bytes: &[u8], long: bool) -> Option<Stos> {
    let (mut rep, mut op16, mut i) = (false, false, 0);
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf3 => rep = true,
            0x66 => op16 = true,
            _ => break,
        }
        i += 1;
    }
    let mut wide = false;
    if let Some(&b) = bytes.get(i) {
        if long && b & 0xf0 == 0x40 {
            wide = b & 8 != 0;
            i += 1;
        }
    }
    let size = match bytes.get(i)? {
        0xaa => 1,
        0xab if wide => 8,
        0xab if op16 => 2,
        0xab => 4,
        _ => return None,
    };
    (long && i < 15).then_some(Stos { size, rep, len: i as u64 + 1 })
}

/// The shadow MMU of the Linux guest.
pub type Mmu = ShadowMmu<IdentityMemory, ShadowRam, IdentHost>;

/// Exits and events of shadow paging.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShadowCounters {
    /// #PF exits.
    pub pf_exits: u64,
    /// Of which the guest's own faults, injected back.
    pub injected_pf: u64,
    /// #GP injected (non-canonical address).
    pub injected_gp: u64,
    /// Guest-table stores emulated.
    pub emulated: u64,
    /// Writes the decoder did not know: their frame unprotected, the guest retried.
    pub unprotected: u64,
    /// Elements of `rep stos` emulated.
    pub stos_elements: u64,
    /// MOV from CRn.
    pub cr_reads: u64,
    /// MOV to CRn.
    pub cr_writes: u64,
    /// CR3 loads served (MOV to CR3 and paging-control changes).
    pub cr3_loads: u64,
    /// Guest TLB flushes by CR4.PGE toggles.
    pub pge_flushes: u64,
    /// INVLPG.
    pub invlpgs: u64,
    /// TLB flushes requested of the vCPU.
    pub tlb_flushes: u64,
    /// Pages marked dirty for hypervisor writes while logging.
    pub hv_marked: u64,
    /// Accesses outside every memslot.
    pub mmio: u64,
}

/// The shadow MMU with its dirty logs and the guest's paging state it was loaded for.
pub struct ShadowLinux {
    mmu: Mmu,
    logs: Logs,
    pending: FlushToken,
    /// The guest paging state the current root was loaded for (EFLAGS.AC clear).
    loaded: Option<GuestCpu>,
    /// The paging state last given to the processor.
    hw: Option<ControlRegs>,
    /// The RIP of the last unprotecting store and how often in a row it unprotected.
    unprotect_streak: (u64, u32),
    /// Counters.
    pub counters: ShadowCounters,
}

/// The processor's features the walker needs, from CPUID.
fn features() -> CpuFeatures {
    let bits = (cpuid(0x8000_0008, 0).0 & 0xff) as u8;
    CpuFeatures {
        phys_width: PhysAddrWidth::new(bits).unwrap_or(PhysAddrWidth::new(36).expect("36 is in range")),
        pse36: cpuid(1, 0).3 & (1 << 17) != 0,
        page_1g: cpuid(0x8000_0001, 0).3 & (1 << 26) != 0,
    }
}

/// The guest's paging state as the shadow MMU takes it; a 64-bit Linux is always in
/// long mode with paging on.
fn guest_cpu(c: &ControlRegs, ac: bool) -> Result<GuestCpu, String> {
    if c.cr0 & CR0_PG == 0 || c.efer & EFER_LMA == 0 {
        return Err(format!(
            "the guest left long mode with paging (CR0 {:#x}, EFER {:#x}): the Linux VMM shadows 4- and 5-level paging only",
            c.cr0, c.efer
        ));
    }
    Ok(GuestCpu {
        mode: if c.cr4 & CR4_LA57 != 0 { GuestMode::Five } else { GuestMode::Four },
        cr3: c.cr3,
        pdptrs: [0; 4],
        cr0_wp: c.cr0 & CR0_WP != 0,
        cr4_pse: c.cr4 & CR4_PSE != 0,
        cr4_smep: c.cr4 & CR4_SMEP != 0,
        cr4_smap: c.cr4 & CR4_SMAP != 0,
        efer_nxe: c.efer & EFER_NXE != 0,
        eflags_ac: ac,
    })
}

impl ShadowLinux {
    /// A shadow MMU over `slots`, guest RAM `ram`, shadow tables in the `nframes` host
    /// frames from `frames_pa`, at most `max_pages` shadow pages.
    ///
    /// # Safety
    /// `frames_pa .. frames_pa + nframes * 4096` must be identity-mapped RAM used by
    /// nothing else.
    pub unsafe fn new(
        frames_pa: u64,
        nframes: u32,
        max_pages: usize,
        ram: GuestRam,
        slots: Memslots,
    ) -> Self {
        let mut config = ShadowConfig::new(features());
        config.max_pages = max_pages;
        // SAFETY: the caller hands the region over.
        let frames = unsafe { IdentityMemory::new(Pfn(frames_pa >> 12), nframes) };
        // SAFETY: guest RAM is the guest's identity-mapped host block for the whole run
        // (`GuestRam`).
        let ram = unsafe { ShadowRam::new(ram.hva, ram.bytes) };
        ShadowLinux {
            mmu: ShadowMmu::new(config, frames, ram, IdentHost, slots),
            logs: Logs::default(),
            pending: FlushToken::new(),
            loaded: None,
            hw: None,
            unprotect_streak: (0, 0),
            counters: ShadowCounters::default(),
        }
    }

    /// Folds what the MMU's last operation did to guest memory into the dirty logs: the
    /// pages the hypervisor wrote, and the dirty leaves its own zaps dropped.
    fn after_mmu(&mut self) {
        let (slots, logs, counters) = (self.mmu.memslots(), &self.logs, &mut self.counters);
        self.mmu.guest().take_written(|gfn| {
            let Some(slot) = slots.lookup(gfn) else { return };
            let Some(log) = logs.logs.get(slot.id().0 as usize).and_then(Option::as_ref) else { return };
            if log.mark(gfn, None).is_ok() {
                counters.hv_marked += 1;
            }
        });
        for (slot, leaf) in self.mmu.take_zapped_dirty() {
            if let Some(log) = self.logs.logs.get(slot.0 as usize).and_then(Option::as_ref) {
                log.note_zapped(&leaf);
            }
        }
        self.pending.merge(self.mmu.take_flush());
    }

    /// Loads the root for the guest's current paging state (a MOV to CR3, or a change of
    /// CR0.WP, CR4 or EFER.NXE): resyncs the unsync pages, flushes.
    fn load(&mut self, cpu: &dyn VCpu) -> Result<(), String> {
        let gc = guest_cpu(&cpu.control(), false)?;
        let root = Gpa(gc.cr3 & CR3_ADDR).gfn();
        if self.mmu.memslots().lookup(root).is_none() {
            return Err(format!("guest CR3 {:#x} points outside guest RAM", gc.cr3));
        }
        let r = self.mmu.load_cr3(&gc);
        self.after_mmu();
        r.map_err(|e| format!("shadow MMU: {e}"))?;
        self.loaded = Some(gc);
        self.counters.cr3_loads += 1;
        Ok(())
    }

    /// The instruction bytes at RIP, fetched through the guest's tables (fewer than 15
    /// where the next page is not mapped).
    fn fetch_at_rip(&self, cpu: &dyn VCpu, ram: &GuestRam) -> (Vec<u8>, u64) {
        let rip = cpu.rip();
        let cr = cpu.control();
        let mut bytes = Vec::with_capacity(15);
        for i in 0..15u64 {
            let la = rip.wrapping_add(i);
            let Some(pa) = mmio::translate(ram, &cr, la) else { break };
            let Ok([v]) = ram.read::<1>(pa) else { break };
            bytes.push(v);
        }
        (bytes, rip)
    }

    /// Fetches the instruction at RIP through the guest's tables and decodes it.
    fn decode_at_rip(&self, cpu: &dyn VCpu, ram: &GuestRam) -> Result<(decode::Insn, u64), String> {
        let (bytes, rip) = self.fetch_at_rip(cpu, ram);
        let insn = decode::decode(&bytes, cpu.code64()).ok_or_else(|| {
            format!("undecodable instruction at {rip:#x}: {:02x?}", &bytes[..bytes.len().min(8)])
        })?;
        Ok((insn, rip))
    }

    fn serve_page_fault(
        &mut self,
        addr: u64,
        code: u32,
        cpu: &mut dyn VCpu,
        ram: &GuestRam,
    ) -> Result<PagingOutcome, String> {
        self.counters.pf_exits += 1;
        let access = pf_access(code);
        let gc = guest_cpu(&cpu.control(), cpu.rflags() & RFLAGS_AC != 0)?;
        let out = self.mmu.page_fault(&gc, Gva(addr), access, &mut self.logs);
        self.after_mmu();
        match out.map_err(|e| format!("shadow MMU: {e} (fault at {addr:#x}, code {code:#x})"))? {
            ShadowFault::Fixed | ShadowFault::Retry => {}
            ShadowFault::InjectPf(c) => {
                self.counters.injected_pf += 1;
                cpu.inject(Event::PageFault { error: c.bits(), cr2: addr });
            }
            ShadowFault::InjectGp => {
                self.counters.injected_gp += 1;
                cpu.inject(Event::Exception { vector: 13, error: Some(0) });
            }
            ShadowFault::Emulate { gpa } => self.emulate_store(gpa, addr, cpu, ram)?,
            ShadowFault::Mmio { gpa } => {
                self.counters.mmio += 1;
                return Ok(PagingOutcome::Mmio(gpa.0));
            }
            ShadowFault::Denied { gpa } => return Err(format!("write to gpa {:#x} denied", gpa.0)),
        }
        Ok(PagingOutcome::Done)
    }

    /// Emulates the store at RIP into the write-protected guest table at `gpa`: a `mov`
    /// store, or the iterations of a `rep stos` that fall in the faulting page (Linux
    /// clears page-table pages, its own live root included, with `rep stos`). A store the
    /// decoder does not know unprotects the frame and the guest retries it.
    fn emulate_store(
        &mut self,
        gpa: Gpa,
        addr: u64,
        cpu: &mut dyn VCpu,
        ram: &GuestRam,
    ) -> Result<(), String> {
        let (bytes, rip) = self.fetch_at_rip(cpu, ram);
        let long = cpu.code64();
        if let Some(stos) = decode_stos(&bytes, long) {
            return self.emulate_stos(stos, gpa, addr, cpu);
        }
        let Some(decode::Insn { op: Op::Store { mem, bytes, src }, len }) = decode::decode(&bytes, long)
        else {
            return self.unprotect(gpa, rip);
        };
        let regs: [u64; 16] = core::array::from_fn(|i| cpu.reg(i as u8));
        let next = rip.wrapping_add(len);
        let ea = decode::address(&mem, |n| regs[n as usize & 15], next, long);
        if ea != addr {
            return Err(format!("store at {rip:#x} writes {ea:#x}, the fault was at {addr:#x}"));
        }
        let mask = if bytes == 8 { u64::MAX } else { (1u64 << (8 * bytes)) - 1 };
        let value = match src {
            Src::Reg(r) => regs[r as usize & 15],
            Src::Imm(v) => v,
        } & mask;
        let out = self.mmu.emulated_write(gpa, bytes, value);
        self.after_mmu();
        out.map_err(|e| format!("shadow MMU: {e}"))?;
        self.counters.emulated += 1;
        self.unprotect_streak = (0, 0);
        cpu.skip(len);
        Ok(())
    }

    /// The iterations of a `stos` whose destination lies in the faulting linear page: each
    /// element an emulated write; RDI and RCX advance as the processor's would. RIP moves
    /// on once the count is done; otherwise the guest resumes the instruction on the
    /// next page.
    fn emulate_stos(&mut self, s: Stos, gpa: Gpa, addr: u64, cpu: &mut dyn VCpu) -> Result<(), String> {
        let down = cpu.rflags() & RFLAGS_DF != 0;
        let value = cpu.reg(0) & if s.size == 8 { u64::MAX } else { (1u64 << (8 * s.size)) - 1 };
        let (mut rdi, mut rcx) = (cpu.reg(7), if s.rep { cpu.reg(1) } else { 1 });
        if rdi != addr {
            return Err(format!("stos at {:#x} writes {rdi:#x}, the fault was at {addr:#x}", cpu.rip()));
        }
        let page = addr & !0xfff;
        let gpage = gpa.0 & !0xfff;
        let mut n = 0u64;
        while rcx != 0 && rdi & !0xfff == page && (rdi & 0xfff) + s.size <= 4096 {
            let out = self.mmu.emulated_write(Gpa(gpage | (rdi & 0xfff)), s.size, value);
            if let Err(e) = out {
                self.after_mmu();
                return Err(format!("shadow MMU: {e}"));
            }
            rdi = if down { rdi.wrapping_sub(s.size) } else { rdi.wrapping_add(s.size) };
            rcx -= 1;
            n += 1;
        }
        self.after_mmu();
        if n == 0 {
            // An element across the page boundary: let the guest write it itself.
            return self.unprotect(gpa, cpu.rip());
        }
        self.counters.emulated += 1;
        self.counters.stos_elements += n;
        self.unprotect_streak = (0, 0);
        cpu.set_reg(7, rdi);
        if s.rep {
            cpu.set_reg(1, rcx);
        }
        if rcx == 0 {
            cpu.skip(s.len);
        }
        Ok(())
    }

    /// Stops shadowing the frame at `gpa` so the guest's retried store goes through. The
    /// same instruction unprotecting again and again means the store is translated
    /// through the table it writes: the run stops with the instruction named.
    fn unprotect(&mut self, gpa: Gpa, rip: u64) -> Result<(), String> {
        self.unprotect_streak = match self.unprotect_streak {
            (r, n) if r == rip => (r, n + 1),
            _ => (rip, 1),
        };
        if self.unprotect_streak.1 > UNPROTECT_LOOP {
            return Err(format!(
                "the store at {rip:#x} into the guest table at gpa {:#x} cannot be emulated and refaults after each unprotect",
                gpa.0
            ));
        }
        self.mmu.unprotect_gfn(gpa.gfn());
        self.after_mmu();
        self.counters.unprotected += 1;
        Ok(())
    }

    fn serve_cr(&mut self, cpu: &mut dyn VCpu, ram: &GuestRam) -> Result<(), String> {
        let (insn, _) = self.decode_at_rip(cpu, ram)?;
        let mut c = cpu.control();
        match insn.op {
            Op::MovFromCr { cr, gpr } => {
                self.counters.cr_reads += 1;
                let v = match cr {
                    0 => c.cr0,
                    3 => c.cr3,
                    4 => c.cr4,
                    _ => return Err(format!("MOV from CR{cr}")),
                };
                cpu.set_reg(gpr, v);
            }
            Op::MovToCr { cr, gpr } => {
                self.counters.cr_writes += 1;
                let v = cpu.reg(gpr);
                let old = c;
                match cr {
                    0 => c.cr0 = v | CR0_ET,
                    3 => c.cr3 = v,
                    4 => c.cr4 = v,
                    _ => return Err(format!("MOV to CR{cr}")),
                }
                if c.cr4 & CR4_PCIDE != 0 {
                    return Err(String::from("the guest set CR4.PCIDE (CPUID offers no PCID)"));
                }
                cpu.set_guest_control(c);
                if cr == 3 {
                    // Every MOV to CR3 flushes the guest's non-global TLB entries.
                    self.load(cpu)?;
                } else if cr == 4 && (old.cr4 ^ c.cr4) & CR4_PGE != 0 {
                    // Toggling PGE flushes the whole TLB, global entries included.
                    self.counters.pge_flushes += 1;
                    self.mmu.flush_tlb();
                    self.after_mmu();
                }
                // WP, SMEP, SMAP, PSE, LA57: a new root is loaded before the next entry.
            }
            other => return Err(format!("exit for a CR access, but the instruction is {other:?}")),
        }
        cpu.skip(insn.len);
        Ok(())
    }

    fn serve_invlpg(&mut self, cpu: &mut dyn VCpu, ram: &GuestRam) -> Result<(), String> {
        let (insn, rip) = self.decode_at_rip(cpu, ram)?;
        let Op::Invlpg(mem) = insn.op else {
            return Err(format!("exit for INVLPG, but the instruction is {:?}", insn.op));
        };
        let regs: [u64; 16] = core::array::from_fn(|i| cpu.reg(i as u8));
        let ea = decode::address(&mem, |n| regs[n as usize & 15], rip.wrapping_add(insn.len), cpu.code64());
        let gc = guest_cpu(&cpu.control(), false)?;
        self.mmu.invlpg(&gc, Gva(ea));
        self.after_mmu();
        self.counters.invlpgs += 1;
        cpu.skip(insn.len);
        Ok(())
    }
}

impl GuestMmu for ShadowLinux {
    fn name(&self) -> &'static str {
        "shadow paging"
    }

    fn fault(&mut self, _gpa: u64, _info: u64, _cpu: &mut dyn Vendor) -> Result<FaultOutcome, NestedError> {
        // Nested paging is off, so the processor reports no nested fault; if one came,
        // no nested table of this MMU could serve it.
        Err(NestedError::NoSuchSlot(super::migrate::RAM_SLOT))
    }

    fn flush(&mut self, cpu: &mut dyn Vendor) {
        self.pending.merge(self.mmu.take_flush());
        let flush = core::mem::take(&mut self.pending);
        if flush.is_needed() {
            self.counters.tlb_flushes += 1;
        }
        flush.flush(&mut crate::nested::VendorTlb(cpu));
    }

    fn start_dirty_log(
        &mut self,
        id: SlotId,
        tracking: Tracking,
        cpu: &mut dyn Vendor,
    ) -> Result<usize, NestedError> {
        let slot = self.mmu.memslots().get(id).copied().ok_or(NestedError::NoSuchSlot(id))?;
        let mut flush = FlushToken::new();
        let log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut self.mmu, &mut flush)
            .map_err(NestedError::DirtyLog)?;
        // Under D-bit logging a dirty leaf the MMU drops on its own (resync, emulated
        // write, eviction) must still reach the log.
        self.mmu.set_track_zapped_dirty(tracking == Tracking::HardwareDirty);
        if self.logs.logs.len() <= id.0 as usize {
            self.logs.logs.resize_with(id.0 as usize + 1, || None);
        }
        self.logs.logs[id.0 as usize] = Some(log);
        self.pending.merge(flush);
        self.flush(cpu);
        // Every shadow leaf maps 4 KiB: nothing to split.
        Ok(0)
    }

    fn harvest(&mut self, id: SlotId, cpu: &mut dyn Vendor) -> Result<Vec<Gfn>, NestedError> {
        let slot = self.mmu.memslots().get(id).copied().ok_or(NestedError::NoSuchSlot(id))?;
        self.after_mmu();
        let mut words = Vec::new();
        let log = self
            .logs
            .logs
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(NestedError::NoSuchSlot(id))?;
        let flush = log.get_and_clear(&mut self.mmu, &mut words).map_err(NestedError::DirtyLog)?;
        self.pending.merge(flush);
        self.flush(cpu);
        let mut out = Vec::new();
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                out.push(Gfn(slot.base_gfn().0 + 64 * w as u64 + bits.trailing_zeros() as u64));
                bits &= bits - 1;
            }
        }
        Ok(out)
    }

    fn age(&mut self, gfns: GfnRange) -> Option<AgeReport> {
        let slot = *self.mmu.memslots().lookup(gfns.start)?;
        let start = slot.gfn_to_hva(gfns.start)?;
        let range = HvaRange { start, end: Hva(start.0 + (gfns.len() << 12)) };
        let slots = self.mmu.memslots().clone();
        let mut flush = FlushToken::new();
        let r = age::age(&slots, &mut self.mmu, range, NoAccessedBit::ReportOld, &mut flush);
        self.pending.merge(flush);
        Some(r)
    }

    fn invalidate(&mut self, range: HvaRange, cpu: &mut dyn Vendor) -> u64 {
        let logs = &self.logs;
        let n = self.mmu.zap_hva_range(range, |slot, leaf| {
            if let Some(log) = logs.logs.get(slot.0 as usize).and_then(Option::as_ref) {
                log.note_zapped(&leaf);
            }
        });
        self.after_mmu();
        self.flush(cpu);
        n as u64
    }

    fn counters(&self) -> Counters {
        let s = self.mmu.stats();
        Counters { mapped: s.leaves_installed, restored: 0, retries: 0 }
    }

    fn tables(&self) -> usize {
        self.mmu.memory().frames_in_use()
    }

    fn fault_kind(&self) -> &'static str {
        "#PF exits"
    }

    fn paging_exit(
        &mut self,
        exit: LinuxExit,
        cpu: &mut dyn VCpu,
        ram: &GuestRam,
    ) -> Result<PagingOutcome, String> {
        match exit {
            LinuxExit::PageFault { addr, code } => return self.serve_page_fault(addr, code, cpu, ram),
            LinuxExit::CrRead(_) | LinuxExit::CrWrite(_) => self.serve_cr(cpu, ram)?,
            LinuxExit::Invlpg => self.serve_invlpg(cpu, ram)?,
            other => return Err(format!("{other:?} is not a paging exit")),
        }
        Ok(PagingOutcome::Done)
    }

    fn before_entry(&mut self, cpu: &mut dyn VCpu) -> Result<(), String> {
        let c = cpu.control();
        let gc = guest_cpu(&c, false)?;
        if self.loaded != Some(gc) {
            self.load(cpu)?;
        }
        let root = self.mmu.root_hpa().ok_or_else(|| String::from("no shadow root"))?;
        let hw = ControlRegs {
            cr0: c.cr0 | CR0_PG | CR0_PE | CR0_WP | CR0_NE | CR0_ET,
            cr3: root.0 << 12,
            // The guest's bits (OSFXSR, PGE, ...) with PAE; no PCIDs.
            cr4: (c.cr4 | CR4_PAE) & !CR4_PCIDE,
            efer: c.efer | EFER_NXE,
        };
        if self.hw != Some(hw) {
            cpu.set_paging(&hw);
            self.hw = Some(hw);
        }
        Ok(())
    }

    fn report(&self) -> Vec<String> {
        let s = self.mmu.stats();
        let c = &self.counters;
        let m = self.mmu.memory_use();
        alloc::vec![
            format!(
                "linux: shadow paging: {} #PF exits ({} injected into the guest, {} #GP), {} shadow faults, {} leaves installed, {} shadow pages created, {} zapped ({} for write flooding), {} alive ({} unsync), {} KiB of tables",
                c.pf_exits,
                c.injected_pf,
                c.injected_gp,
                s.faults,
                s.leaves_installed,
                s.pages_created,
                s.pages_zapped,
                s.flood_zaps,
                m.pages,
                self.mmu.unsync_pages(),
                m.table_bytes / 1024
            ),
            format!(
                "linux: shadow paging: unsync {} resynced {} (at a new link {}, stale leaves dropped {}), emulated table writes {} ({} rep stos elements; MMU writes {}), unprotected frames {}, CR reads {} writes {}, CR3 loads {} (root-cache hits {}), PGE flushes {}, INVLPGs {}, TLB flushes {}, MMIO {}, hypervisor writes marked {}",
                s.unsynced,
                s.synced,
                s.relinked_unsync,
                s.relink_dropped,
                c.emulated,
                c.stos_elements,
                s.emulated_writes,
                c.unprotected,
                c.cr_reads,
                c.cr_writes,
                c.cr3_loads,
                s.root_hits,
                c.pge_flushes,
                c.invlpgs,
                c.tlb_flushes,
                c.mmio,
                c.hv_marked
            ),
        ]
    }
}
