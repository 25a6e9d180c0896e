//! The two-CPU dirty-log race (issue 11, part 3), after KVM's `dirty_log_test`: the boot
//! CPU runs the guest, which streams sequence-stamped writes over a dirty-logged slot
//! ([`guest::OP_STREAM`]); the second CPU harvests the slot's dirty log concurrently,
//! round after round, and copies every page reported dirty into a destination buffer,
//! as the source side of a live migration would. After a final round with the guest
//! stopped, the copy must equal guest memory page for page: every word that differs is
//! a stamp the copy never received, a lost write.
//!
//! Run once with write-protect tracking and once with D-bit tracking, each on a slot of
//! its own, in one VM (arch-x86's TDP engine with NPT; mmu-generic's dirty log).
//!
//! * **The MMU lock** is [`MMU`], a spin lock around the nested MMU (TDP engine,
//!   memslots, dirty logs): the vCPU takes it to serve a nested fault and to collect the
//!   flushes its faults need; the harvester takes it for `get_and_clear`.
//! * **The flush.** A round's [`FlushToken`] (write protection or D clears) is flushed
//!   through [`smp::RemoteTlb`]: the vCPU honours the request on its next VMRUN with the
//!   SVM TLB flush (TLB_CONTROL), and a vCPU in guest mode is kicked out by an IPI. The
//!   harvester copies the round's pages only once the flush took effect on the vCPU
//!   (acknowledged, or the vCPU seen outside guest mode after the request), which is
//!   the core's rule: a write either landed before the flush, and the copy sees it, or
//!   it comes after and is reported by the next round.
//! * **Bounds.** Every wait has a TSC deadline (calibrated against the PIT at the
//!   start); the vCPU side stops the guest itself if the harvester never does; a failure
//!   on either side aborts the other; a hang becomes a FAIL line.
//!
//! Only the QEMU run has two CPUs (`-smp 2 -accel tcg,thread=multi`) and SVM; the Bochs
//! runs (VMX, one CPU) print a SKIP line instead.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use mmu_generic::addr::{Gfn, GfnRange, Hva};
use mmu_generic::backend::{FlushToken, TlbFlush};
use mmu_generic::dirty_log::Tracking;
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

use crate::frames::FramePool;
use crate::guest;
use crate::nested::{FaultOutcome, Nested};
use crate::smp::{self, FlushDone, FlushError};
use crate::spin::SpinLock;
use crate::timer::{self, Deadline};
use crate::vendor::{Exit, GuestStart, NestedFormat, Vendor};

/// Pages of each streamed slot (a power of two, as the guest's page order needs).
const NPAGES: u64 = 256;
/// The code slot: code, mailbox, log, stack (guest-physical 0..64 KiB).
const CODE_SLOT: SlotId = SlotId(0);
const CODE_PAGES: u64 = 16;
/// (slot, base gfn, tracking, pause between rounds in ms) of the two streamed slots.
/// Under write protection the guest first refaults every page a round protected (about
/// 50 us each under TCG, so some 13 ms for the slot); the longer pause lets it get back
/// to streaming without exits, on a warm TLB, before the next round protects again:
/// that is when a missing flush loses writes.
const PHASES: [(SlotId, u64, Tracking, u64); 2] =
    [(SlotId(1), 0x400, Tracking::WriteProtect, 20), (SlotId(2), 0x800, Tracking::HardwareDirty, 2)];
/// Harvest rounds while the guest writes (then one final round with it stopped).
const ROUNDS: u32 = 40;
/// Longest wait for one remote flush.
const FLUSH_TIMEOUT_MS: u64 = 1000;
/// Longest a phase may stream before the vCPU side stops the guest itself.
const PHASE_BUDGET_MS: u64 = 10_000;
/// Longest wait for the guest to stop, or for the harvester's final report.
const STOP_WAIT_MS: u64 = 5_000;
/// Exits one phase may take before it is declared runaway.
const MAX_EXITS: u64 = 2_000_000;
/// The stop flag's offset in the mailbox (address-list word 1).
const STOP_OFFSET: u64 = guest::MAILBOX_ADDRS + 4;
/// First sequence number of each stream.
const FIRST_SEQ: u32 = 1;

/// The MMU lock: the guest's nested MMU, shared by the vCPU (boot CPU) and the
/// harvester (second CPU). `None` outside the race.
static MMU: SpinLock<Option<Nested>> = SpinLock::new(None);

/// What the harvester is to do in the current phase.
#[derive(Clone, Copy, Debug)]
struct Job {
    slot: SlotId,
    base_gfn: u64,
    /// Host address of the slot's memory (identity-mapped, so also physical).
    src: u64,
    /// Host address of the destination copy.
    dst: u64,
    /// Host address of the guest's stop flag.
    stop: u64,
    /// Pause before each round, so that it has writes to find.
    gap_ms: u64,
}

/// The harvester's figures for one phase.
#[derive(Clone, Copy, Debug, Default)]
struct Report {
    rounds: u32,
    /// Pages copied in the rounds while the guest ran.
    copied: u64,
    /// Most pages one of those rounds reported.
    max_round: u64,
    /// Pages copied by the final round (guest stopped).
    final_copied: u64,
    /// Remote flushes the vCPU acknowledged on a VMRUN.
    acknowledged: u32,
    /// Remote flushes that found the vCPU outside guest mode.
    outside: u32,
    /// Rounds whose token needed no flush.
    no_flush: u32,
}

static JOB: SpinLock<Option<Job>> = SpinLock::new(None);
static REPORT: SpinLock<Option<Result<Report, String>>> = SpinLock::new(None);
/// Set by the vCPU side once the guest has stopped (the final round may start).
static GUEST_STOPPED: AtomicBool = AtomicBool::new(false);
/// Set by either side when it gives up: the other stops waiting.
static ABORT: AtomicBool = AtomicBool::new(false);

/// Verdict of one scenario, as `scenarios` reports it.
pub type Outcome = Result<String, String>;

fn read_word(addr: u64) -> u32 {
    // SAFETY: callers pass addresses inside the race's guest memory or copy buffers,
    // 2 MiB blocks of identity-mapped RAM taken from the frame pool for this scenario.
    // The guest (another agent, like DMA) may write guest memory concurrently, hence the
    // volatile access.
    unsafe { (addr as *const u32).read_volatile() }
}

fn write_word(addr: u64, v: u32) {
    // SAFETY: as in `read_word`; the words written are the mailbox (read by the guest)
    // and the copy buffers (touched by no one else while the harvester fills them).
    unsafe { (addr as *mut u32).write_volatile(v) }
}

/// Copies one 4 KiB page from guest memory to the destination, word by word (the guest
/// may be writing it: any write the copy misses is reported by the next round).
fn copy_page(src: u64, dst: u64) {
    for off in (0..4096).step_by(4) {
        write_word(dst + off, read_word(src + off));
    }
}

/// The flush the core's token asks for, performed on the vCPU by request and kick.
struct RemoteFlush {
    result: Option<Result<FlushDone, FlushError>>,
}

impl RemoteFlush {
    fn run(&mut self) {
        self.result = Some(smp::VCPU.flush(Deadline::after_ms(FLUSH_TIMEOUT_MS)));
    }
}

impl TlbFlush for RemoteFlush {
    fn flush_range(&mut self, _range: GfnRange) {
        // The SVM TLB control flushes the whole ASID, never a range.
        self.run();
    }

    fn flush_all(&mut self) {
        self.run();
    }
}

/// One harvest round on the second CPU: get-and-clear under the MMU lock, the remote
/// flush, then the copy. Returns the number of pages copied.
fn round(job: &Job, rep: &mut Report) -> Result<u64, String> {
    let (gfns, flush): (Vec<Gfn>, FlushToken) = {
        let mut guard = MMU.lock();
        let mmu = guard.as_mut().ok_or("the MMU is gone")?;
        mmu.harvest_unflushed(job.slot).map_err(|e| format!("harvest: {:?}", e))?
    };
    if !flush.is_needed() {
        rep.no_flush += 1;
    } else if cfg!(feature = "race-skip-flush") {
        // Negative check only (see README): the copy starts without the flush.
        drop(flush);
    } else {
        let mut remote = RemoteFlush { result: None };
        flush.flush(&mut remote);
        match remote.result {
            Some(Ok(FlushDone::Acknowledged)) => rep.acknowledged += 1,
            Some(Ok(FlushDone::OutsideGuest)) => rep.outside += 1,
            Some(Err(e)) => return Err(format!("remote flush failed: {:?}", e)),
            None => return Err(String::from("the flush token flushed nothing")),
        }
    }
    for gfn in &gfns {
        let page =
            gfn.0.checked_sub(job.base_gfn).filter(|&p| p < NPAGES).ok_or("reported gfn outside the slot")?;
        copy_page(job.src + page * 4096, job.dst + page * 4096);
    }
    Ok(gfns.len() as u64)
}

fn harvest_phase(job: &Job) -> Result<Report, String> {
    let mut rep = Report::default();
    let result = (|| {
        for _ in 0..ROUNDS {
            let gap = Deadline::after_ms(job.gap_ms);
            while !gap.expired() {
                core::hint::spin_loop();
            }
            if ABORT.load(Ordering::SeqCst) {
                return Err(String::from("aborted by the vCPU side"));
            }
            let n = round(job, &mut rep)?;
            rep.rounds += 1;
            rep.copied += n;
            rep.max_round = rep.max_round.max(n);
        }
        Ok(())
    })();
    // Stop the guest whatever happened (the vCPU side also stops it at its deadline).
    write_word(job.stop, 1);
    result?;
    let d = Deadline::after_ms(STOP_WAIT_MS);
    while !GUEST_STOPPED.load(Ordering::SeqCst) {
        if ABORT.load(Ordering::SeqCst) {
            return Err(String::from("aborted by the vCPU side"));
        }
        if d.expired() {
            return Err(format!("the guest did not stop within {} ms", STOP_WAIT_MS));
        }
        core::hint::spin_loop();
    }
    rep.final_copied = round(job, &mut rep)?;
    Ok(rep)
}

/// The harvester (a job for the second CPU).
fn harvester() {
    let job = JOB.lock().take();
    let result = match job {
        Some(job) => harvest_phase(&job),
        None => Err(String::from("no job posted")),
    };
    if result.is_err() {
        ABORT.store(true, Ordering::SeqCst);
    }
    *REPORT.lock() = Some(result);
}

/// Host memory of the race's VM.
struct Vm {
    code: u64,
    data: [u64; 2],
    copies: [u64; 2],
}

/// Number of CPUs QEMU reports through fw_cfg (`FW_CFG_NB_CPUS`), if fw_cfg is there.
fn qemu_cpu_count() -> Option<u16> {
    use crate::port::{inb, outw};
    const SELECTOR: u16 = 0x510;
    const DATA: u16 = 0x511;
    outw(SELECTOR, 0x0000); // signature
    let sig = [inb(DATA), inb(DATA), inb(DATA), inb(DATA)];
    if &sig != b"QEMU" {
        return None;
    }
    outw(SELECTOR, 0x0005);
    Some(u16::from_le_bytes([inb(DATA), inb(DATA)]))
}

/// Runs the race in both tracking modes; returns each mode's verdict by name.
pub fn run(vendor: &mut dyn Vendor, pool: &mut FramePool) -> Vec<(String, Outcome)> {
    const NAME: &str = "two-CPU dirty-log race";
    let fail_all = |why: String| Vec::from([(String::from(NAME), Err(why))]);
    if vendor.format() != NestedFormat::Npt {
        return fail_all(String::from("needs the QEMU SVM run"));
    }
    match qemu_cpu_count() {
        Some(n) if n >= 2 => {}
        other => return fail_all(format!("needs two CPUs (QEMU -smp 2); fw_cfg reports {:?}", other)),
    }
    let Some(tsc_per_ms) = timer::calibrate_tsc() else {
        return fail_all(String::from("the TSC could not be calibrated (no PIT channel 2)"));
    };
    if let Err(e) = crate::apic::enable() {
        return fail_all(format!("local APIC: {:?}", e));
    }
    smp::VCPU.bind_here();
    let bsp = crate::apic::id();
    // QEMU numbers the CPUs of `-smp 2` with APIC IDs 0 and 1.
    let target = if bsp == 0 { 1 } else { 0 };
    let t0 = crate::port::rdtsc();
    if let Err(e) = smp::start_secondary(target) {
        return fail_all(format!("second CPU (APIC ID {}) did not start: {:?}", target, e));
    }
    let up_ms = timer::tsc_ms(t0, crate::port::rdtsc());
    crate::println!(
        "two-CPU race: second CPU up (APIC ID {}, {} ms after INIT), vCPU on APIC ID {}, TSC {} kHz",
        smp::secondary_apic_id().unwrap_or(u32::MAX),
        up_ms,
        bsp,
        tsc_per_ms
    );
    let vm = match build_vm(vendor, pool) {
        Ok(vm) => vm,
        Err(e) => return fail_all(e),
    };
    let mut out = Vec::new();
    for (i, (slot, base, tracking, gap_ms)) in PHASES.into_iter().enumerate() {
        let name = match tracking {
            Tracking::WriteProtect => format!("{} (write-protect)", NAME),
            Tracking::HardwareDirty => format!("{} (D bit)", NAME),
        };
        let job = Job {
            slot,
            base_gfn: base,
            src: vm.data[i],
            dst: vm.copies[i],
            stop: vm.code + guest::MAILBOX_GPA + STOP_OFFSET,
            gap_ms,
        };
        let (r, clean) = phase(vendor, &job, tracking);
        out.push((name, r));
        // A verdict failure (lost writes) leaves both CPUs idle and the next phase can
        // run; a CPU that did not finish its part ends the race.
        if !clean {
            break;
        }
    }
    // Park the second CPU (it is idle once its job reported), and retire the VM.
    let _ = smp::run_on_secondary(smp::park);
    MMU.lock().take();
    out
}

fn build_vm(vendor: &mut dyn Vendor, pool: &mut FramePool) -> Result<Vm, String> {
    let mut alloc = || pool.alloc_2m().map_err(|_| String::from("out of frames"));
    let vm = Vm { code: alloc()?, data: [alloc()?, alloc()?], copies: [alloc()?, alloc()?] };
    let mut b = MemslotsBuilder::new();
    let mut list = Vec::from([Memslot::new(CODE_SLOT, Gfn(0), CODE_PAGES, Hva(vm.code), SlotFlags::empty())]);
    for (i, (slot, base, ..)) in PHASES.into_iter().enumerate() {
        list.push(Memslot::new(slot, Gfn(base), NPAGES, Hva(vm.data[i]), SlotFlags::empty()));
    }
    for m in list {
        b.create(m).map_err(|e| format!("memslot: {:?}", e))?;
    }
    let slots = b.build().map_err(|e| format!("memslots: {:?}", e))?;
    let mut mmu = Nested::new(NestedFormat::Npt, pool).map_err(|e| format!("nested MMU: {:?}", e))?;
    mmu.set_slots(slots, vendor);
    for (i, chunk) in guest::code().chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        write_word(vm.code + guest::CODE_GPA + 4 * i as u64, u32::from_le_bytes(w));
    }
    vendor.set_nested_root(mmu.root_pointer());
    vendor.reset_guest(GuestStart { rip: guest::CODE_GPA, rsp: guest::STACK_TOP });
    *MMU.lock() = Some(mmu);
    Ok(vm)
}

/// What the vCPU side saw in one phase.
#[derive(Default)]
struct VcpuFigures {
    exits: u64,
    faults: u64,
    /// The guest's next sequence number when it stopped.
    end_seq: u32,
    /// The vCPU side had to stop the guest (the harvester did not).
    self_stopped: bool,
}

/// Runs the guest's stream until it stops, serving its faults under the MMU lock.
fn run_vcpu(vendor: &mut dyn Vendor, job: &Job) -> Result<VcpuFigures, String> {
    let mut fig = VcpuFigures::default();
    let deadline = Deadline::after_ms(PHASE_BUDGET_MS);
    loop {
        if ABORT.load(Ordering::SeqCst) || (!fig.self_stopped && deadline.expired()) {
            write_word(job.stop, 1);
            fig.self_stopped = true;
        }
        if fig.exits >= MAX_EXITS {
            return Err(format!("more than {} exits", MAX_EXITS));
        }
        if let Some(mmu) = MMU.lock().as_mut() {
            mmu.flush(vendor);
        }
        let exit = vendor.run();
        fig.exits += 1;
        match exit {
            Exit::NestedFault { gpa, info, .. } => {
                fig.faults += 1;
                let outcome = {
                    let mut guard = MMU.lock();
                    let mmu = guard.as_mut().ok_or("the MMU is gone")?;
                    mmu.fault(gpa, info, vendor)
                };
                match outcome {
                    Ok(FaultOutcome::NoSlot) | Ok(FaultOutcome::Denied) => {
                        return Err(format!("fault at gpa {:#x} came to {:?}", gpa, outcome))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("fault at gpa {:#x}: {:?}", gpa, e)),
                }
            }
            Exit::IoOut { port, value } if port == guest::DONE_PORT => {
                fig.end_seq = value;
                return Ok(fig);
            }
            // The run budget (about 0.5 s without an exit): the stop flag ends the
            // stream, the deadline above sets it at the latest.
            Exit::Timer => {}
            other => return Err(format!("unexpected exit {:?}", other)),
        }
    }
}

/// One phase; also says whether it ended cleanly (guest stopped, harvester reported),
/// so that the next phase may run.
fn phase(vendor: &mut dyn Vendor, job: &Job, tracking: Tracking) -> (Outcome, bool) {
    let mut clean = false;
    let r = phase_inner(vendor, job, tracking, &mut clean);
    (r, clean)
}

fn phase_inner(vendor: &mut dyn Vendor, job: &Job, tracking: Tracking, clean: &mut bool) -> Outcome {
    GUEST_STOPPED.store(false, Ordering::SeqCst);
    ABORT.store(false, Ordering::SeqCst);
    *REPORT.lock() = None;
    {
        let mut guard = MMU.lock();
        let mmu = guard.as_mut().ok_or("the MMU is gone")?;
        mmu.start_dirty_log(job.slot, tracking, vendor).map_err(|e| format!("start dirty log: {:?}", e))?;
        mmu.flush(vendor);
    }
    // The bulk copy before the rounds (the guest is not running).
    for p in 0..NPAGES {
        copy_page(job.src + p * 4096, job.dst + p * 4096);
    }
    let mb = job.stop - STOP_OFFSET;
    write_word(mb, guest::OP_STREAM);
    write_word(mb + 4, NPAGES as u32);
    write_word(mb + 8, (job.base_gfn << 12) as u32);
    write_word(mb + guest::MAILBOX_ADDRS, FIRST_SEQ);
    write_word(job.stop, 0);
    *JOB.lock() = Some(*job);
    let lock_waits_before = MMU.contended();
    let (kicks_before, flushes_before) = smp::VCPU.counters();
    let taken_before = crate::apic::kicks_taken();
    smp::run_on_secondary(harvester).map_err(|e| format!("second CPU: {:?}", e))?;
    let t0 = crate::port::rdtsc();
    let vcpu = run_vcpu(vendor, job);
    let ms = timer::tsc_ms(t0, crate::port::rdtsc());
    if vcpu.is_ok() {
        GUEST_STOPPED.store(true, Ordering::SeqCst);
    } else {
        ABORT.store(true, Ordering::SeqCst);
        write_word(job.stop, 1);
    }
    let d = Deadline::after_ms(STOP_WAIT_MS + FLUSH_TIMEOUT_MS);
    let report = loop {
        if let Some(r) = REPORT.lock().take() {
            break r;
        }
        if d.expired() {
            ABORT.store(true, Ordering::SeqCst);
            break Err(String::from("no report in time"));
        }
        core::hint::spin_loop();
    };
    let vcpu = vcpu?;
    let rep = report.map_err(|e| {
        let stopped = if vcpu.self_stopped {
            format!(" (the vCPU side stopped the guest itself after {} ms)", PHASE_BUDGET_MS)
        } else {
            String::new()
        };
        format!("harvester: {}{}", e, stopped)
    })?;
    *clean = true;
    let (kicks, flushes) = smp::VCPU.counters();
    let (kicks, flushes) = (kicks - kicks_before, flushes - flushes_before);
    let taken = crate::apic::kicks_taken().wrapping_sub(taken_before);
    let lock_waits = MMU.contended() - lock_waits_before;

    // The copy against guest memory, page for page: a differing word is a lost write.
    let (mut lost, mut bad_pages) = (0u64, 0u64);
    for p in 0..NPAGES {
        let diff = (0..4096u64)
            .step_by(4)
            .filter(|&o| read_word(job.src + p * 4096 + o) != read_word(job.dst + p * 4096 + o))
            .count();
        lost += diff as u64;
        bad_pages += (diff > 0) as u64;
    }
    // The writer itself: the last stamps of the stream are where its order puts them.
    let written = vcpu.end_seq.wrapping_sub(FIRST_SEQ) as u64;
    let misplaced = (written.saturating_sub(NPAGES)..written)
        .filter(|&i| {
            let page = ((i % NPAGES) * guest::STREAM_STRIDE) & (NPAGES - 1);
            let word = (i / NPAGES) % 1024;
            read_word(job.src + page * 4096 + 4 * word) != FIRST_SEQ.wrapping_add(i as u32)
        })
        .count();
    let figures = format!(
        "{} rounds + 1 final, {} pages copied ({} in the rounds, at most {} a round, {} in the final round; \
         plus the {}-page bulk copy), {} pages written by the guest in {} ms ({} nested faults, {} exits), \
         remote flushes {} acknowledged by VMRUN + {} with the vCPU outside guest mode + {} rounds needing none \
         ({} kick IPIs sent, {} taken; {} flushing VMRUNs), \
         MMU lock contended {} times, copy == guest memory {}/{} pages, {} lost writes{}",
        rep.rounds,
        rep.copied + rep.final_copied,
        rep.copied,
        rep.max_round,
        rep.final_copied,
        NPAGES,
        written,
        ms,
        vcpu.faults,
        vcpu.exits,
        rep.acknowledged,
        rep.outside,
        rep.no_flush,
        kicks,
        taken,
        flushes,
        lock_waits,
        NPAGES - bad_pages,
        NPAGES,
        lost,
        if misplaced > 0 { format!(", {} of the last stamps misplaced", misplaced) } else { String::new() }
    );
    let ok = lost == 0
        && misplaced == 0
        && !vcpu.self_stopped
        && rep.rounds == ROUNDS
        && written >= 2 * NPAGES
        && rep.copied > 0;
    if ok {
        Ok(figures)
    } else {
        Err(format!(
            "{}{}",
            figures,
            if vcpu.self_stopped { ", the harvester never stopped the guest" } else { "" }
        ))
    }
}
