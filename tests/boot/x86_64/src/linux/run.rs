//! The Linux VMM's run loop: devices, interrupt injection, exits by reason, the run's
//! bounds, and the hook where the live phases (migration, ageing, zap) act between exits.

use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;

use super::cmos::Cmos;
use super::cpuid::guest_cpuid;
use super::mmio;
use super::mmu::{GuestMmu, PagingOutcome};
use super::msr::{MsrAnswer, Msrs};
use super::pic::Pic;
use super::pit::Pit;
use super::ram::GuestRam;
use super::serial::Serial;
use super::vcpu::{Event, IoSize, LinuxExit, VCpu};
use crate::nested::FaultOutcome;
use crate::port::rdtsc;
use crate::println;
use crate::timer;
use crate::vendor::Vendor;

/// The test program's ports (see `linux/vmmu-test.c`).
pub const PORT_STATE: u16 = 0x5f0;
/// Checksum halves, low then high.
pub const PORT_SUM: u16 = 0x5f4;
/// The verdict: the test program's error count.
pub const PORT_VERDICT: u16 = 0x5f8;
/// Longest host slice per entry (ms): the PIT counts at most about 55 ms.
const MAX_SLICE_MS: u64 = 50;

/// Exits by reason.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitCounts {
    /// Nested page faults.
    pub npf: u64,
    /// #PF intercepts (shadow paging).
    pub pf: u64,
    /// CR reads and writes (shadow paging).
    pub cr: u64,
    /// INVLPG (shadow paging).
    pub invlpg: u64,
    /// `in`.
    pub io_in: u64,
    /// `out`.
    pub io_out: u64,
    /// CPUID.
    pub cpuid: u64,
    /// RDMSR.
    pub rdmsr: u64,
    /// WRMSR.
    pub wrmsr: u64,
    /// HLT.
    pub hlt: u64,
    /// Interrupt windows.
    pub vintr: u64,
    /// Host interrupts (slice ends).
    pub intr: u64,
    /// All.
    pub total: u64,
}

impl ExitCounts {
    /// Faults of guest memory: nested faults, or #PF intercepts under shadow paging.
    pub fn faults(&self) -> u64 {
        self.npf + self.pf
    }
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The test program wrote its verdict (its error count).
    Verdict(u32),
    /// The guest stopped otherwise (triple fault, halt with interrupts off, reset, an
    /// exit the VMM cannot serve): the reason.
    Failed(String),
    /// The run's time limit passed.
    TimeLimit,
}

/// What the test program reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct TestReport {
    /// The workload is running (TSC when it said so).
    pub started: Option<u64>,
    /// The live phases are done (the state port reads 1).
    pub phases_done: bool,
    /// The checksum halves received.
    pub sum: [Option<u32>; 2],
}

/// Accesses outside every memslot, answered as absent.
#[derive(Clone, Debug, Default)]
pub struct AbsentMmio {
    /// Loads completed with all ones.
    pub loads: u64,
    /// Stores dropped.
    pub stores: u64,
    /// Guest frames touched (each once).
    pub pages: Vec<u64>,
}

/// The Linux guest's machine: vCPU, MMU, RAM and the legacy devices.
pub struct Vm<C: VCpu + Vendor, M: GuestMmu> {
    /// The vCPU.
    pub cpu: C,
    /// The MMU of guest memory.
    pub mmu: M,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The PICs.
    pub pic: Pic,
    /// The PIT.
    pub pit: Pit,
    /// COM1.
    pub serial: Serial,
    /// RTC/CMOS.
    pub cmos: Cmos,
    /// MSRs.
    pub msrs: Msrs,
    /// Exits by reason.
    pub exits: ExitCounts,
    /// The test program's reports.
    pub test: TestReport,
    /// Accesses outside every memslot.
    pub mmio: AbsentMmio,
    /// Exits per port (in and out), in first-use order.
    pub ports: Vec<(u16, u64)>,
    /// The exit counts when /init first printed.
    pub exits_at_init: ExitCounts,
    /// Ports outside every device the guest touched (each once, for the report).
    pub absent_ports: Vec<u16>,
    /// TSC ticks per millisecond.
    pub tsc_per_ms: u64,
    /// TSC when the run started.
    pub t0: u64,
    /// TSC when the guest's /init first printed.
    pub init_at: Option<u64>,
}

impl<C: VCpu + Vendor, M: GuestMmu> Vm<C, M> {
    /// A machine with fresh devices around `cpu` and `mmu`; the run's clock starts now.
    pub fn new(cpu: C, mmu: M, ram: GuestRam, tsc_per_ms: u64) -> Self {
        Vm {
            cpu,
            mmu,
            ram,
            pic: Pic::new(),
            pit: Pit::new(tsc_per_ms * 1000),
            serial: Serial::new(),
            cmos: Cmos::new(),
            msrs: Msrs::new(),
            exits: ExitCounts::default(),
            test: TestReport::default(),
            absent_ports: Vec::new(),
            ports: Vec::new(),
            exits_at_init: ExitCounts::default(),
            mmio: AbsentMmio::default(),
            tsc_per_ms,
            t0: rdtsc(),
            init_at: None,
        }
    }

    /// Milliseconds since the start of the run.
    pub fn ms(&self) -> u64 {
        rdtsc().saturating_sub(self.t0) / self.tsc_per_ms.max(1)
    }

    fn console(&mut self, line: &[u8]) {
        let text = core::str::from_utf8(line).unwrap_or("<non-UTF-8 line>");
        if self.init_at.is_none() && text.starts_with("vmmu init:") {
            self.init_at = Some(rdtsc());
            self.exits_at_init = self.exits;
        }
        println!("linux| {}", text);
    }

    /// Flushes the guest's last partial console line.
    pub fn flush_console(&mut self) {
        let mut lines = Vec::new();
        self.serial.flush(&mut |l| lines.push(Vec::from(l)));
        for l in lines {
            self.console(&l);
        }
    }

    fn port_io(&mut self, port: u16, size: IoSize, write: Option<u32>) -> Result<u32, End> {
        let now = rdtsc();
        match self.ports.iter_mut().find(|(p, _)| *p == port) {
            Some((_, n)) => *n += 1,
            None => self.ports.push((port, 1)),
        }
        let byte = write.map(|v| v as u8);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let r = if let Some(r) = self.serial.io(port, byte, &mut |l| lines.push(Vec::from(l))) {
            if port == 0x3f8 && write.is_some() {
                // THR written: the interrupt drops, the instant transmission raises it again.
                self.pic.set_irq(4, false);
            }
            self.pic.set_irq(4, self.serial.irq_line());
            Some(r as u32)
        } else {
            self.pic
                .io(port, byte)
                .or_else(|| self.pit.io(port, byte, now))
                .or_else(|| self.cmos.io(port, byte))
                .map(u32::from)
        };
        for l in lines {
            self.console(&l);
        }
        if let Some(r) = r {
            return Ok(r);
        }
        match (port, write) {
            (PORT_STATE, Some(1)) => {
                self.test.started.get_or_insert(now);
                Ok(0)
            }
            (PORT_STATE, None) => Ok(self.test.phases_done as u32),
            (PORT_SUM, Some(v)) => {
                let i = self.test.sum[0].is_some() as usize;
                self.test.sum[i] = Some(v);
                Ok(0)
            }
            (PORT_VERDICT, Some(v)) => Err(End::Verdict(v)),
            // Keyboard controller pulse of the reset line, or a reset through 0xcf9.
            (0x64, Some(0xfe)) => {
                Err(End::Failed(String::from("the guest reset the machine (keyboard controller)")))
            }
            (0xcf9, Some(v)) if v & 0x04 != 0 => {
                Err(End::Failed(String::from("the guest reset the machine (port 0xcf9)")))
            }
            _ => {
                // Nothing decodes this port: reads float high, writes go nowhere.
                if port != 0x80 && !self.absent_ports.contains(&port) && self.absent_ports.len() < 48 {
                    self.absent_ports.push(port);
                }
                Ok(size.mask())
            }
        }
    }

    /// Delivers what the devices raised: a pending PIC interrupt is injected when the guest
    /// can take it, else the VMM asks for the interrupt window.
    fn deliver(&mut self) {
        if self.pit.poll(rdtsc()) {
            self.pic.pulse(0);
        }
        if self.cpu.event_pending() || !self.pic.has_interrupt() {
            self.cpu.request_interrupt_window(false);
            return;
        }
        if self.cpu.interruptible() {
            if let Some(v) = self.pic.acknowledge() {
                self.cpu.inject(Event::Interrupt(v));
            }
            self.cpu.request_interrupt_window(false);
        } else {
            self.cpu.request_interrupt_window(true);
        }
    }

    fn slice_ms(&self) -> u32 {
        let now = rdtsc();
        let ms = match self.pit.next_deadline() {
            Some(t) if t > now => (t - now).div_ceil(self.tsc_per_ms.max(1)),
            Some(_) => 1,
            None => MAX_SLICE_MS,
        };
        ms.clamp(1, MAX_SLICE_MS) as u32
    }

    /// The guest halted with interrupts enabled: the host sleeps until the next PIT expiry
    /// (or `limit_ms` without one, a guest waiting for nothing).
    fn idle(&mut self, limit_ms: u64) -> Result<(), End> {
        let start = rdtsc();
        loop {
            if self.pit.next_deadline().is_some_and(|t| rdtsc() >= t) || self.pic.has_interrupt() {
                return Ok(());
            }
            if rdtsc().saturating_sub(start) / self.tsc_per_ms.max(1) > limit_ms {
                return Err(End::Failed(String::from("the guest halted with no timer armed")));
            }
            let before = timer::ticks();
            timer::arm(self.slice_ms());
            // SAFETY: the IDT has the IRQ0 gate; the host sleeps with interrupts open
            // only for this HLT and closes them again (STI's shadow covers the HLT).
            unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
            timer::disarm(before);
        }
    }

    /// Runs the guest until it ends, the time limit `limit_ms` passes, or `hook` (called
    /// between exits, with the guest stopped) asks to stop by returning an end.
    pub fn run(&mut self, limit_ms: u64, hook: &mut dyn FnMut(&mut Self) -> Option<End>) -> End {
        loop {
            if self.ms() > limit_ms {
                return End::TimeLimit;
            }
            if let Some(end) = hook(self) {
                return end;
            }
            self.deliver();
            if let Err(why) = self.mmu.before_entry(&mut self.cpu) {
                return End::Failed(why);
            }
            self.mmu.flush(&mut self.cpu);
            let before = timer::ticks();
            timer::arm(self.slice_ms());
            let exit = VCpu::run(&mut self.cpu);
            timer::disarm(before);
            self.exits.total += 1;
            if let Err(end) = self.handle(exit) {
                return end;
            }
        }
    }

    /// An access outside every memslot: completed as absent (see [`super::mmio`]).
    fn absent_mmio(&mut self, gpa: u64) -> Result<(), End> {
        let rip = self.cpu.rip();
        let cr = self.cpu.control();
        let decoded = mmio::fetch(&self.ram, &cr, rip).and_then(|code| mmio::decode(&code));
        let d = decoded.map_err(|e| {
            End::Failed(alloc::format!("access to gpa {gpa:#x} outside every memslot at rip {rip:#x}: {e:?}"))
        })?;
        if let mmio::Access::Load { reg, .. } = d.access {
            let old = self.cpu.reg(reg);
            self.cpu.set_reg(reg, mmio::load_result(old, d.access));
            self.mmio.loads += 1;
        } else {
            self.mmio.stores += 1;
        }
        if !self.mmio.pages.contains(&(gpa >> 12)) && self.mmio.pages.len() < 16 {
            self.mmio.pages.push(gpa >> 12);
        }
        self.cpu.skip(d.len as u64);
        Ok(())
    }

    fn handle(&mut self, exit: LinuxExit) -> Result<(), End> {
        match exit {
            LinuxExit::NestedFault { gpa, info, .. } => {
                self.exits.npf += 1;
                match self.mmu.fault(gpa, info, &mut self.cpu) {
                    Ok(FaultOutcome::NoSlot) => self.absent_mmio(gpa)?,
                    Ok(FaultOutcome::Denied) => {
                        return Err(End::Failed(alloc::format!("access to gpa {gpa:#x} denied")))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(End::Failed(alloc::format!("nested MMU error {e:?} at gpa {gpa:#x}")))
                    }
                }
            }
            LinuxExit::PageFault { .. }
            | LinuxExit::CrRead(_)
            | LinuxExit::CrWrite(_)
            | LinuxExit::Invlpg => {
                match exit {
                    LinuxExit::PageFault { .. } => self.exits.pf += 1,
                    LinuxExit::Invlpg => self.exits.invlpg += 1,
                    _ => self.exits.cr += 1,
                }
                match self.mmu.paging_exit(exit, &mut self.cpu, &self.ram).map_err(End::Failed)? {
                    PagingOutcome::Done => {}
                    PagingOutcome::Mmio(gpa) => self.absent_mmio(gpa)?,
                }
            }
            LinuxExit::IoOut { port, size, value } => {
                self.exits.io_out += 1;
                self.port_io(port, size, Some(value))?;
            }
            LinuxExit::IoIn { port, size } => {
                self.exits.io_in += 1;
                let v = self.port_io(port, size, None)?;
                self.cpu.complete_in(size, v);
            }
            LinuxExit::IoString { port } => {
                return Err(End::Failed(alloc::format!("string port I/O at {port:#x} (not emulated)")))
            }
            LinuxExit::Cpuid => {
                self.exits.cpuid += 1;
                let r = self.cpu.gprs();
                let [a, b, c, d] = guest_cpuid(r.rax as u32, r.rcx as u32);
                (r.rax, r.rbx, r.rcx, r.rdx) = (a as u64, b as u64, c as u64, d as u64);
                self.cpu.skip(2);
            }
            LinuxExit::Rdmsr => {
                self.exits.rdmsr += 1;
                let msr = self.cpu.gprs().rcx as u32;
                let v = match self.cpu.state_msr(msr) {
                    Some(v) => MsrAnswer::Value(v),
                    None => self.msrs.read(msr),
                };
                match v {
                    MsrAnswer::Value(v) => {
                        let r = self.cpu.gprs();
                        (r.rax, r.rdx) = (v & 0xffff_ffff, v >> 32);
                        self.cpu.skip(2);
                    }
                    MsrAnswer::Fault => self.cpu.inject(Event::Exception { vector: 13, error: Some(0) }),
                }
            }
            LinuxExit::Wrmsr => {
                self.exits.wrmsr += 1;
                let r = self.cpu.gprs();
                let (msr, v) = (r.rcx as u32, (r.rdx << 32) | (r.rax & 0xffff_ffff));
                let ok = self.cpu.set_state_msr(msr, v) || self.msrs.write(msr, v) != MsrAnswer::Fault;
                if ok {
                    self.cpu.skip(2);
                } else {
                    self.cpu.inject(Event::Exception { vector: 13, error: Some(0) });
                }
            }
            LinuxExit::Halt => {
                self.exits.hlt += 1;
                if !self.cpu.interrupts_enabled() && !self.cpu.event_pending() {
                    return Err(End::Failed(alloc::format!(
                        "the guest halted with interrupts off (rip {:#x})",
                        self.cpu.rip()
                    )));
                }
                self.idle(10_000)?;
            }
            LinuxExit::InterruptWindow => self.exits.vintr += 1,
            LinuxExit::HostInterrupt => self.exits.intr += 1,
            LinuxExit::Shutdown => {
                return Err(End::Failed(alloc::format!("triple fault (rip {:#x})", self.cpu.rip())))
            }
            LinuxExit::EntryFailed { code } => {
                return Err(End::Failed(alloc::format!(
                    "VMRUN refused the guest state (exit code {code:#x})"
                )))
            }
            LinuxExit::Other { code, info1, info2 } => {
                return Err(End::Failed(alloc::format!(
                    "unexpected exit {code:#x} (info1 {info1:#x}, info2 {info2:#x}, rip {:#x})",
                    self.cpu.rip()
                )))
            }
        }
        Ok(())
    }
}
