//! The guest partition: its memory, its memslots, the `GuestHpt` the CPU walks,
//! the partition registers (LPCR, LPIDR, SDR1 or the partition table) and the
//! VRMA, and the run loop that serves the guest's hypercalls.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, WimgPolicy};
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HpteFormat, HPTE_R_M, HPTE_V_VALID};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::H_ENTER;
use arch_ppc_book3s::slb::SlbEntry;
use mmu_generic::addr::{Gfn, GfnRange, Hva};
use mmu_generic::backend::{FlushToken, MmuBackend, TlbFlush};
use mmu_generic::dirty_log::SlotDirtyLog;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;

use crate::guest::{self, Op, H_VMMU_DONE, H_VMMU_UNEXPECTED};
use crate::hv::{self, msr, Vcpu};
use crate::spr;

/// The processor generation (from the PVR).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Model {
    /// POWER8 (ISA 2.07): SDR1, pre-3.0 HPTEs, LPCR[VPM0] for the VRMA.
    Power8,
    /// POWER9 (ISA 3.0) in HPT mode: PTCR and a partition table, ISA 3.0 HPTEs.
    Power9,
}

impl Model {
    /// From the PVR's version field.
    pub fn from_pvr(pvr: u64) -> Option<Self> {
        match pvr >> 16 {
            0x4b..=0x4d => Some(Self::Power8),
            0x4e => Some(Self::Power9),
            _ => None,
        }
    }

    /// TLB congruence classes (KVM: POWER8_TLB_SETS, POWER9_TLB_SETS_HASH).
    pub fn tlb_sets(self) -> u64 {
        match self {
            Self::Power8 => 512,
            Self::Power9 => 256,
        }
    }

    /// The table layout the MMU reads.
    pub fn format(self) -> HpteFormat {
        match self {
            Self::Power8 => HpteFormat::PreIsa300,
            Self::Power9 => HpteFormat::Isa300,
        }
    }
}

/// LPCR fields (Power ISA v2.07 / v3.0 Book III, 2.2 "Logical Partitioning Control Register").
mod lpcr {
    /// VPM0: virtualized partition memory in real mode (the VRMA). ISA 2.07 only.
    pub const VPM0: u64 = 1 << 63;
    /// VPM1: virtual-mode storage interrupts go to the hypervisor.
    pub const VPM1: u64 = 1 << 62;
    /// VRMASD: the VRMA's L||LP page-size bits (bits 12:16).
    pub const VRMASD_SHIFT: u32 = 47;
    /// VRMASD mask.
    pub const VRMASD: u64 = 0x1f << VRMASD_SHIFT;
    /// ILE: interrupts little-endian.
    pub const ILE: u64 = 1 << 25;
    /// AIL: alternate interrupt location (bits 39:40).
    pub const AIL: u64 = 3 << 23;
    /// UPRT: use the process table (ISA 3.0).
    pub const UPRT: u64 = 1 << 22;
    /// HR: host radix (ISA 3.0).
    pub const HR: u64 = 1 << 20;
    /// LPES: logical partitioning environment selectors.
    pub const LPES: u64 = 3 << 2;
    /// HDICE: hypervisor decrementer interrupts enabled.
    pub const HDICE: u64 = 1;
}

/// DSISR: no translation found (Power ISA Book III 6.5.3).
const DSISR_NOPTE: u64 = 0x4000_0000;

/// The VRMA's VSID (a 1 TB segment, Power ISA Book III 5.7.3.1).
pub const VRMA_VSID: u64 = 0x1ff_ffff;
/// The guest's LPID.
pub const GUEST_LPID: u64 = 1;

/// This CPU's TLB for the partition: every flush the core asks for becomes a
/// partition-wide `tlbiel` (the token carries guest frames, not virtual addresses).
pub struct PartitionTlb {
    sets: u64,
    /// Flushes performed.
    pub flushes: u64,
    /// Off only for the mutation check that a missing flush is caught.
    pub enabled: bool,
}

impl TlbFlush for PartitionTlb {
    fn flush_range(&mut self, _range: GfnRange) {
        self.flush_all();
    }
    fn flush_all(&mut self) {
        self.flushes += 1;
        if self.enabled {
            spr::flush_partition_tlb(self.sets);
        } else {
            spr::ptesync();
        }
    }
}

/// A fixed-capacity list of (address, size) ranges: the device tree is read
/// before the heap exists.
#[derive(Clone, Copy, Debug)]
pub struct Ranges {
    r: [(u64, u64); 32],
    n: usize,
}

impl Ranges {
    /// No ranges.
    pub const fn new() -> Self {
        Self { r: [(0, 0); 32], n: 0 }
    }

    /// Adds a range; false when full.
    pub fn push(&mut self, r: (u64, u64)) -> bool {
        if self.n == self.r.len() {
            return false;
        }
        self.r[self.n] = r;
        self.n += 1;
        true
    }

    /// The ranges.
    pub fn iter(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.r[..self.n].iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.n
    }
}

/// What the platform's device tree says.
pub struct Platform {
    /// RAM ranges (`/memory@*` `reg`).
    pub memory: Ranges,
    /// Reserved ranges (the reservation block and `/reserved-memory`).
    pub reserved: Ranges,
    /// Ranges the tree lists beyond the lists' capacity (then nothing is free).
    pub overflow: bool,
    /// The page sizes (`ibm,segment-page-sizes` of the CPU).
    pub sizes: PageSizes,
    /// 1 TB segments are listed in `ibm,processor-segment-sizes`.
    pub seg_1t: bool,
    /// The CPU's `timebase-frequency`.
    pub tb_hz: u64,
}

impl Platform {
    /// Whether `[base, base + len)` is RAM that no reservation or our image touches.
    pub fn is_free(&self, base: u64, len: u64, image: (u64, u64)) -> bool {
        let end = base + len;
        let overlaps = |(a, s): (u64, u64)| a < end && base < a + s;
        !self.overflow
            && self.memory.iter().any(|&(a, s)| a <= base && end <= a + s)
            && !self.reserved.iter().any(|&r| overlaps(r))
            && !overlaps(image)
    }
}

/// The guest partition.
pub struct Partition {
    /// The guest's hashed page table and reverse map.
    pub gh: GuestHpt<HvaIdentity>,
    /// The guest's vCPU.
    pub vcpu: Box<Vcpu>,
    /// Host-real base of guest memory.
    pub base: u64,
    /// Bytes of guest memory.
    pub size: u64,
    /// The TLB.
    pub tlb: PartitionTlb,
    /// A dirty log of slot 1, when one runs.
    pub log: Option<SlotDirtyLog>,
    /// Hypercalls served.
    pub hcalls: u64,
    /// Guest entries (hrfid).
    pub entries: u64,
    /// The POWER9 partition table (kept alive while PTCR points at it).
    _patb: Option<Vec<u64>>,
    /// The VRMA page shift.
    pub vrma_shift: u32,
    /// Absent entries mapped again on a hypervisor data storage interrupt.
    pub fault_ins: u64,
    /// Data storage interrupts the hypervisor delivered to the guest.
    pub reflected: u64,
    /// Timebase ticks a guest entry may run before the hypervisor decrementer
    /// (0x980) ends it as hung.
    pub watchdog: u32,
}

/// Guest exits one operation list may take (its hypercalls and HDSIs are a few
/// dozen): more means the hypervisor and the guest are stuck in a loop.
const MAX_EXITS_PER_RUN: u32 = 100_000;

/// Default watchdog: 2^31 - 1 ticks (4.2 s at QEMU's 512 MHz timebase; HDEC is 32 bits).
pub const WATCHDOG_TICKS: u32 = 0x7fff_ffff;

/// Bytes of slot 0 (guest-real 0.., reachable in real mode through the VRMA).
pub const SLOT0_BYTES: u64 = 16 << 20;

fn sz(e: impl core::fmt::Debug) -> String {
    format!("{e:?}")
}

impl Partition {
    /// Builds the partition on `size` bytes of host memory at `base` (16 MiB
    /// aligned), with an HPT of `1 << pft_shift` bytes.
    pub fn new(model: Model, plat: &Platform, base: u64, size: u64, pft_shift: u32) -> Result<Self, String> {
        let npages0 = SLOT0_BYTES >> 12;
        let npages1 = (size - SLOT0_BYTES) >> 12;
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), npages0, Hva(base), SlotFlags::empty())).map_err(sz)?;
        b.create(Memslot::new(
            SlotId(1),
            Gfn(npages0),
            npages1,
            Hva(base + SLOT0_BYTES),
            SlotFlags::DIRTY_LOG,
        ))
        .map_err(sz)?;
        let slots: Memslots = b.build().map_err(sz)?;
        let geometry = HptGeometry::from_pft_size(pft_shift).ok_or("bad HPT size")?;
        let config =
            GuestConfig { geometry, format: model.format(), sizes: plat.sizes, wimg: WimgPolicy::RequireM };
        let mut gh = GuestHpt::new(config, slots, HvaIdentity).map_err(sz)?;
        let htab = gh.table().base_address() as u64;
        if htab & ((1 << pft_shift) - 1) != 0 {
            return Err(format!("HPT at {htab:#x} is not aligned to its size {:#x}", 1u64 << pft_shift));
        }

        // The VRMA: the hypervisor enters the entries that translate guest real
        // mode (VSID 0x1ffffff, 1 TB segment, the largest page the 16M segment
        // holds) as KVM's kvmppc_map_vrma does. Guest-real 0..SLOT0_BYTES.
        let vrma_shift = 24;
        let seg = plat.sizes.segment(vrma_shift).ok_or("no 16M segment for the VRMA")?;
        let vrmasd = u64::from(seg.slb_enc >> 4);
        let mask = geometry.pteg_mask();
        for i in 0..(SLOT0_BYTES >> vrma_shift) {
            let ea = i << vrma_shift;
            let va = VirtAddr::new(VRMA_VSID, SegmentSize::S1T, ea).ok_or("VRMA VSID")?;
            let (l, rpn) = plat.sizes.encode(vrma_shift, vrma_shift, ea).ok_or("VRMA page size")?;
            let ptex = (va.hash(vrma_shift) & mask) * 8;
            gh.h_enter(0, ptex, va.avpn_v(vrma_shift) | l | HPTE_V_VALID, rpn | HPTE_R_M | 0b10)
                .map_err(|e| format!("VRMA H_ENTER: {e:?}"))?;
        }

        // The guest's code at guest-real 0.
        let blob = guest::blob();
        // SAFETY: guest memory is ours, `blob.len()` (< 16 KiB) lies inside it,
        // and the source is our image.
        unsafe { spr::copy_to_real(base, blob.as_ptr() as u64, blob.len() as u64) };
        spr::sync_icache(base, blob.len() as u64);

        // The partition registers.
        let pats_bytes = 4096u64;
        let mut patb = None;
        // SAFETY: LPIDR names the partition the guest runs in; the hypervisor's
        // own real-mode accesses do not depend on it.
        unsafe { spr::set_lpidr(GUEST_LPID) };
        let htabsize = u64::from(pft_shift - 18);
        match model {
            Model::Power8 => {
                // SAFETY: SDR1 = the guest's table, aligned to its size (checked).
                unsafe { spr::set_sdr1(htab | htabsize) };
            }
            Model::Power9 => {
                // Partition table of 256 entries (PATS = 0: 4 KiB), entry 1 for the
                // guest: dword 0 = HR 0 (HPT) | HTABORG | PS | HTABSIZE, big-endian.
                // ISA 3.0 moved the VRMA page size from LPCR[VRMASD] into PS
                // (bits 56:58, L||LP).
                let mut t = vec![0u64; (pats_bytes / 8) as usize];
                let at = t.as_ptr() as u64;
                if at & (pats_bytes - 1) != 0 {
                    return Err(format!("partition table at {at:#x} not aligned"));
                }
                let ps = ((vrmasd >> 4) << 2) | (vrmasd & 3);
                t[2 * GUEST_LPID as usize] = (htab | (ps << 5) | htabsize).to_be();
                spr::ptesync();
                // SAFETY: PTCR = a live, aligned partition table kept in `_patb`.
                unsafe { spr::set_ptcr(at) };
                patb = Some(t);
            }
        }
        let old = spr::lpcr();
        let mut new = old
            & !(lpcr::VPM0
                | lpcr::VPM1
                | lpcr::VRMASD
                | lpcr::ILE
                | lpcr::AIL
                | lpcr::UPRT
                | lpcr::HR
                | lpcr::LPES
                | lpcr::HDICE);
        new |= vrmasd << lpcr::VRMASD_SHIFT;
        if model == Model::Power8 {
            new |= lpcr::VPM0;
        }
        // HDEC interrupts on: the watchdog of every guest entry.
        new |= lpcr::HDICE;
        // SAFETY: guest real mode through the VRMA, virtual-mode faults to the
        // guest (VPM1 = 0), HPT mode, big-endian interrupts, HDEC interrupts only
        // while the guest runs (the hypervisor runs with EE = 0): the hypervisor
        // itself runs in real mode with HV = 1, unaffected.
        unsafe { spr::set_lpcr(new) };
        spr::flush_partition_tlb(model.tlb_sets());

        let vcpu = Box::new(Vcpu { pc: guest::ENTRY, msr: msr::SF | msr::ME | msr::RI, ..Vcpu::default() });
        Ok(Self {
            gh,
            vcpu,
            base,
            size,
            tlb: PartitionTlb { sets: model.tlb_sets(), flushes: 0, enabled: true },
            log: None,
            hcalls: 0,
            entries: 0,
            _patb: patb,
            vrma_shift,
            watchdog: WATCHDOG_TICKS,
            fault_ins: 0,
            reflected: 0,
        })
    }

    /// LPCR[VPM1]: with it, the guest's virtual-mode storage interrupts come to
    /// the hypervisor as HDSI (0xE00), which maps absent entries again
    /// ([`GuestHpt::fault_in`], after a zap) or delivers the interrupt to the
    /// guest, as KVM HV does.
    pub fn set_vpm1(&mut self, on: bool) {
        let l = spr::lpcr();
        let new = if on { l | lpcr::VPM1 } else { l & !lpcr::VPM1 };
        // SAFETY: only where the guest's virtual-mode storage interrupts go changes;
        // the run loop handles 0xE00.
        unsafe { spr::set_lpcr(new) };
    }

    /// A hypervisor data storage interrupt (HDSI): maps an absent entry again
    /// and retries, or delivers a DSI to the guest's 0x300.
    fn hdsi_enabled(&self) -> bool {
        spr::lpcr() & lpcr::VPM1 != 0
    }

    fn hdsi(&mut self) -> Result<(), String> {
        let v = &*self.vcpu;
        let (ea, dsisr, pc, gmsr) = (v.hdar, v.hdsisr, v.hsrr0, v.hsrr1);
        if gmsr & msr::DR == 0 {
            return Err(format!(
                "guest real-mode access at {ea:#x} (pc {pc:#x}) outside the VRMA: HDSISR {dsisr:#x}"
            ));
        }
        if dsisr & DSISR_NOPTE != 0 {
            if let Some(word) = spr::slbfee(ea) {
                let e = SlbEntry { esid_word: 0, vsid_word: word };
                let seg = self.gh.page_sizes().segment_for_slb(word).map(|s| s.base_shift);
                let va = e.vsid().zip(e.segment_size()).and_then(|(vsid, ss)| VirtAddr::new(vsid, ss, ea));
                if let (Some(va), Some(base_shift)) = (va, seg) {
                    if let Some(found) = self.gh.find(&va, base_shift) {
                        if self.gh.is_absent(found.ptex) {
                            self.gh
                                .fault_in(found.ptex)
                                .map_err(|e| format!("fault_in {:#x}: {e:?}", found.ptex))?;
                            spr::ptesync();
                            self.fault_ins += 1;
                            let v = &mut *self.vcpu;
                            (v.pc, v.msr) = (pc, gmsr);
                            return Ok(());
                        }
                    }
                }
            }
        }
        // The guest's own fault: deliver it as the DSI the CPU would have given
        // (SRR1 = the MSR with bits 33:36 and 42:47 cleared), to its 0x300 in real mode.
        spr::set_guest_dsi_regs(pc, gmsr & !0x783f_0000, ea, dsisr);
        self.reflected += 1;
        let v = &mut *self.vcpu;
        (v.pc, v.msr) = (0x300, msr::SF | msr::ME);
        Ok(())
    }

    /// The host-real address of guest-real `gpa` (`len` bytes), if inside guest memory.
    pub fn host(&self, gpa: u64, len: u64) -> Option<u64> {
        (gpa.checked_add(len)? <= self.size).then_some(self.base + gpa)
    }

    /// Reads a doubleword of guest memory.
    pub fn read(&self, gpa: u64) -> Option<u64> {
        let a = self.host(gpa, 8)?;
        // SAFETY: inside guest memory (checked), which we own; aligned by the callers.
        Some(unsafe { core::ptr::read_volatile(a as *const u64) })
    }

    /// Writes a doubleword of guest memory.
    pub fn write(&self, gpa: u64, v: u64) -> Option<()> {
        let a = self.host(gpa, 8)?;
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile(a as *mut u64, v) };
        Some(())
    }

    /// Has the guest execute `ops`; returns their result records.
    pub fn run(&mut self, ops: &[Op]) -> Result<Vec<[u64; 16]>, String> {
        if ops.len() >= guest::MAX_OPS {
            return Err(format!("{} operations, at most {}", ops.len(), guest::MAX_OPS - 1));
        }
        for (i, op) in ops.iter().chain(core::iter::once(&Op::Hcall(0, [0; 8]))).enumerate() {
            let w = if i == ops.len() { [0u64; 16] } else { op.encode() };
            for (k, x) in w.iter().enumerate() {
                self.write(guest::OPS + (i as u64) * 128 + 8 * k as u64, *x).ok_or("ops")?;
                self.write(guest::RESULTS + (i as u64) * 128 + 8 * k as u64, 0).ok_or("results")?;
            }
        }
        let mut exits = 0u32;
        loop {
            self.entries += 1;
            exits += 1;
            if exits > MAX_EXITS_PER_RUN {
                return Err(format!("the guest exited {MAX_EXITS_PER_RUN} times without finishing its list"));
            }
            spr::set_hdec(self.watchdog);
            let trap = hv::run(&mut self.vcpu);
            if trap == 0xe00 && self.hdsi_enabled() {
                self.hdsi()?;
                continue;
            }
            let v = &mut *self.vcpu;
            if trap == 0x980 {
                return Err(format!(
                    "guest watchdog: HDEC (0x980) after {} ticks, guest at {:#x} msr {:#x}",
                    self.watchdog, v.hsrr0, v.hsrr1
                ));
            }
            if trap != 0xc00 {
                return Err(format!(
                    "guest exit {trap:#x}: hsrr0 {:#x} hsrr1 {:#x} hdar {:#x} hdsisr {:#x} srr0 {:#x} srr1 {:#x}",
                    v.hsrr0, v.hsrr1, v.hdar, v.hdsisr, v.srr0, v.srr1
                ));
            }
            // sc 1: SRR0 is the instruction after it, SRR1 the guest's MSR.
            v.pc = v.srr0;
            v.msr = v.srr1;
            let op = v.gpr[3];
            if op == H_VMMU_DONE {
                break;
            }
            if op == H_VMMU_UNEXPECTED {
                return Err(format!(
                    "guest took unexpected interrupt {:#x}: srr0 {:#x} srr1 {:#x} dar {:#x} dsisr {:#x}",
                    v.gpr[4], v.gpr[5], v.gpr[6], v.gpr[7], v.gpr[8]
                ));
            }
            self.serve(op);
        }
        let mut out = Vec::with_capacity(ops.len());
        for i in 0..ops.len() {
            let mut r = [0u64; 16];
            for (k, x) in r.iter_mut().enumerate() {
                *x = self.read(guest::RESULTS + (i as u64) * 128 + 8 * k as u64).ok_or("results")?;
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Serves hypercall `op` from the vCPU's registers through `GuestHpt`.
    fn serve(&mut self, op: u64) {
        self.hcalls += 1;
        let mut args = [0u64; 8];
        args.copy_from_slice(&self.vcpu.gpr[4..12]);
        let mut flush = FlushToken::new();
        let ret = self.gh.hcall(op, &args, &mut flush);
        if op == H_ENTER && ret.status == 0 {
            self.note_new_entry(ret.ret[0]);
        }
        flush.flush(&mut self.tlb);
        self.vcpu.gpr[3] = ret.status as u64;
        self.vcpu.gpr[4..12].copy_from_slice(&ret.ret);
    }

    /// A dirty-bit log must chain every writable entry entered while it runs
    /// (the map path's `note_writable`, as on a fault).
    fn note_new_entry(&mut self, ptex: u64) {
        let Some(log) = self.log.as_mut() else { return };
        let h = PteHandle(ptex as u32);
        let Some(leaf) = self.gh.leaf(h) else { return };
        let Some(slot) = self.gh.memslots().get(log.slot()) else { return };
        if leaf.writable && slot.gfns().contains(leaf.gfn) {
            let _ = log.note_writable(leaf.gfn, h, None);
        }
    }
}
