//! A minimal VMM that boots Debian's Linux kernel as the guest (issue 17), on the nested
//! MMU of the scenarios: the kernel and an initramfs (busybox, `/init`, the test program
//! `linux/vmmu-test.c`) arrive as one PVH module ([`blob`]), are loaded by the Linux boot
//! protocol ([`bootproto`]) into 128 MiB of guest RAM faulted in on demand through
//! arch-x86's TDP engine ([`mmu`]), and run on a vCPU ([`vcpu`], SVM in [`svm_cpu`]) with
//! the legacy devices a Linux guest needs and no more: COM1 ([`serial`]), the PICs
//! ([`pic`]), the PIT ([`pit`]), the RTC ([`cmos`]), filtered CPUID ([`cpuid`]) and MSRs
//! ([`msr`]); every other port reads as absent. While the test program works the VMM
//! migrates it twice, ages its memory and zaps a host range under it ([`migrate`]).
//! With `shadow` on the image's PVH command line the same guest runs with nested paging
//! off, on arch-x86's shadow MMU ([`shadow_mmu`]).
//!
//! The kernel command line is [`CMDLINE`]: the serial console, `quiet`, the legacy PIC and
//! PIT instead of the APICs (`noapic nolapic`, no second CPU), and no KASLR (the kernel
//! stays where the loader put it, below the initramfs).

pub mod blob;
pub mod bootproto;
pub mod cmos;
pub mod cpuid;
pub mod migrate;
pub mod mmio;
pub mod mmu;
pub mod msr;
pub mod pic;
pub mod pit;
pub mod ram;
pub mod run;
pub mod selftest;
pub mod serial;
pub mod shadow_mmu;
pub mod svm_cpu;
pub mod vcpu;

use alloc::format;
use alloc::string::String;

use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags};

use crate::frames::{FramePool, FRAME_2M};
use crate::nested::Nested;
use crate::println;
use crate::scenarios::Tally;
use crate::timer;
use crate::vendor::{NestedFormat, Vendor};

use blob::{Blob, BlobError};
use migrate::{Live, RAM_SLOT};
use mmu::GuestMmu;
use ram::GuestRam;
use run::{End, ExitCounts, Vm};
use shadow_mmu::ShadowLinux;
use svm_cpu::{LongModeStart, SvmCpu};

/// The guest kernel's command line.
pub const CMDLINE: &str = "console=ttyS0 quiet noapic nolapic nosmp nokaslr";
/// Guest RAM.
const RAM_BYTES: u64 = 128 << 20;
/// Host frames for shadow tables (shadow paging run): 48 MiB.
const SHADOW_FRAMES: u64 = 12 * 1024;
/// Shadow pages kept at most (older ones are zapped to make room).
const SHADOW_PAGES: usize = 8 * 1024;
/// The run's limit (ms of host time).
const RUN_LIMIT_MS: u64 = 200_000;

/// The Linux guest handed over by PVH, if the image was started with one.
pub fn find(start_info: u32) -> Option<Result<Blob, BlobError>> {
    let (pa, size) = blob::pvh_module(start_info)?;
    let shadow = blob::pvh_cmdline(start_info).split(|&c| c == b' ').any(|w| w == b"shadow");
    blob::parse(pa, size).map(|r| r.map(|b| Blob { shadow, ..b }))
}

fn pass(tally: &mut Tally, name: &str, r: Result<String, String>) {
    match r {
        Ok(s) => {
            tally.passed += 1;
            println!("PASS {}: {}", name, s);
        }
        Err(s) => {
            tally.failed += 1;
            println!("FAIL {}: {}", name, s);
        }
    }
}

/// The known region of the test program: 1 MiB of words from its generator, and its
/// FNV-1a checksum over 64-bit words (the same functions as `vmmu-test.c`).
fn expected_checksum() -> u64 {
    let mut s: u64 = 0x766d_6d75;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..(1 << 20) / 8 {
        s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        h ^= s >> 16;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn exits_line(e: &ExitCounts) -> String {
    format!(
        "{} exits: npf {}, #PF {}, CR access {}, invlpg {}, io in {}, io out {}, cpuid {}, rdmsr {}, wrmsr {}, hlt {}, interrupt window {}, host interrupt {}",
        e.total, e.npf, e.pf, e.cr, e.invlpg, e.io_in, e.io_out, e.cpuid, e.rdmsr, e.wrmsr, e.hlt, e.vintr, e.intr
    )
}

/// Boots the guest in `found` under NPT (or shadow paging, if the image's command line
/// says `shadow`) and runs every Linux phase; the host frames come
/// from `[pool_start, module start)`.
pub fn run(found: Result<Blob, BlobError>, pool_start: u64, tally: &mut Tally) {
    let blob = match found {
        Ok(b) => b,
        Err(e) => {
            return pass(tally, "linux setup", Err(format!("the PVH module is not a usable guest: {e:?}")))
        }
    };
    pass(tally, "linux device models", selftest::run());
    let mut pool = FramePool::new(pool_start, blob.start & !(FRAME_2M - 1));
    let Some(tsc_per_ms) = timer::calibrate_tsc() else {
        return pass(tally, "linux setup", Err(String::from("TSC calibration against PIT channel 2 failed")));
    };
    let cpu = match SvmCpu::new() {
        Ok(c) => c,
        Err(e) => return pass(tally, "linux setup", Err(format!("SVM unusable: {e:?}"))),
    };
    let (Ok(ram_hva), Ok(dest)) = (pool.alloc_contiguous(RAM_BYTES), pool.alloc_contiguous(RAM_BYTES)) else {
        return pass(tally, "linux setup", Err(String::from("out of host frames for guest RAM")));
    };
    let mut builder = MemslotsBuilder::new();
    let slot = Memslot::new(RAM_SLOT, Gfn(0), RAM_BYTES >> 12, Hva(ram_hva), SlotFlags::empty());
    let slots = match builder.create(slot).and_then(|b| b.build()) {
        Ok(s) => s,
        Err(e) => return pass(tally, "linux setup", Err(format!("memslot: {e:?}"))),
    };
    let ram = GuestRam { hva: ram_hva, bytes: RAM_BYTES };
    let loaded = match bootproto::load(&ram, &[(0, RAM_BYTES)], blob.kernel, blob.initrd, CMDLINE) {
        Ok(l) => l,
        Err(e) => return pass(tally, "linux setup", Err(format!("boot protocol: {e}"))),
    };
    println!(
        "linux: bzImage protocol {}.{:02}, kernel at {:#x} (init_size {:#x}), entry {:#x}, initramfs {:#x}+{:#x}, {} e820 entries, {} MiB RAM, command line \"{}\"",
        loaded.version >> 8,
        loaded.version & 0xff,
        loaded.load,
        loaded.init_size,
        loaded.entry,
        loaded.initrd.0,
        loaded.initrd.1,
        loaded.e820,
        RAM_BYTES >> 20,
        CMDLINE
    );
    let start = LongModeStart {
        rip: loaded.entry,
        rsi: bootproto::BOOT_PARAMS,
        cr3: bootproto::PAGE_TABLES,
        gdt: bootproto::gdt(),
    };
    if blob.shadow {
        let Ok(frames) = pool.alloc_contiguous(SHADOW_FRAMES << 12) else {
            return pass(tally, "linux setup", Err(String::from("out of host frames for shadow tables")));
        };
        // SAFETY: the region was just taken from the frame pool, which hands each frame out
        // once; it is identity-mapped RAM used by nothing else.
        let mmu = unsafe { ShadowLinux::new(frames, SHADOW_FRAMES as u32, SHADOW_PAGES, ram, slots) };
        let mut vm = Vm::new(cpu, mmu, ram, tsc_per_ms);
        vm.cpu.enable_shadow();
        vm.cpu.start_long_mode(start);
        drive(vm, dest, tally);
    } else {
        let mut mmu = match Nested::new(NestedFormat::Npt, &mut pool) {
            Ok(m) => m,
            Err(e) => return pass(tally, "linux setup", Err(format!("nested MMU: {e:?}"))),
        };
        mmu.huge_ok.push(RAM_SLOT);
        let mut vm = Vm::new(cpu, mmu, ram, tsc_per_ms);
        vm.mmu.set_slots(slots, &mut vm.cpu);
        let root = vm.mmu.root_pointer();
        vm.cpu.set_nested_root(root);
        vm.cpu.start_long_mode(start);
        drive(vm, dest, tally);
    }
}

/// Runs the guest on `vm` to its verdict with the live phases, and reports.
fn drive<M: GuestMmu>(mut vm: Vm<SvmCpu, M>, dest: u64, tally: &mut Tally) {
    let tsc_per_ms = vm.tsc_per_ms;
    let mut live = Live::new(dest);
    let end = vm.run(RUN_LIMIT_MS, &mut |vm| live.step(vm));
    vm.flush_console();
    let total_ms = vm.ms();
    let init_ms = vm.init_at.map(|t| t.saturating_sub(vm.t0) / tsc_per_ms);
    let c = vm.mmu.counters();
    println!("linux: boot to /init: {}", exits_line(&vm.exits_at_init));
    println!("linux: whole run: {}", exits_line(&vm.exits));
    let mut ports = vm.ports.clone();
    ports.sort_unstable_by_key(|p| core::cmp::Reverse(p.1));
    let busiest: alloc::vec::Vec<String> = ports.iter().take(8).map(|(p, n)| format!("{p:#x} {n}")).collect();
    println!("linux: port exits by port (busiest first): {}", busiest.join(", "));
    println!(
        "linux: {} {} ({} leaves installed, {} retried), {} table frames; interrupts delivered IRQ0 {}, IRQ4 {}; PIT expiries {}; serial bytes {}",
        vm.mmu.fault_kind(),
        vm.exits.faults(),
        c.mapped,
        c.retries,
        vm.mmu.tables(),
        vm.pic.delivered[0],
        vm.pic.delivered[4],
        vm.pit.irqs,
        vm.serial.bytes
    );
    println!("linux: MSRs refused with #GP {:x?}; absent ports read {:x?}", vm.msrs.refused, vm.absent_ports);
    for line in vm.mmu.report() {
        println!("{}", line);
    }
    pass(
        tally,
        &format!("linux boot ({})", vm.mmu.name()),
        match init_ms {
            Some(ms) => Ok(format!("Debian's kernel reached /init in {}.{:03} s", ms / 1000, ms % 1000)),
            None => Err(String::from("the kernel never ran /init")),
        },
    );
    let m = &vm.mmio;
    pass(
        tally,
        "linux absent MMIO",
        if m.loads > 0 && m.stores > 0 {
            Ok(format!("{} loads read all ones, {} stores dropped, frames {:x?}", m.loads, m.stores, m.pages))
        } else {
            Err(format!(
                "{} loads, {} stores outside every memslot: the test program's accesses never came",
                m.loads, m.stores
            ))
        },
    );
    for (name, r) in core::mem::take(&mut live.lines) {
        pass(tally, &name, r);
    }
    if !live.done() {
        pass(
            tally,
            "linux live phases",
            Err(String::from("not all phases ran (the workload ended or never started)")),
        );
    }
    let sum = match vm.test.sum {
        [Some(lo), Some(hi)] => Some(lo as u64 | (hi as u64) << 32),
        _ => None,
    };
    let expected = expected_checksum();
    let verdict = match &end {
        End::Verdict(0) if sum == Some(expected) => Ok(format!(
            "0 errors, checksum of the known region {:016x} as expected, {}.{:03} s in all",
            expected,
            total_ms / 1000,
            total_ms % 1000
        )),
        End::Verdict(0) => Err(format!("checksum {:x?}, expected {:016x}", sum, expected)),
        End::Verdict(n) => Err(format!("the test program counted {n} errors")),
        End::Failed(why) => Err(format!("{} (rip {:#x}, after {} ms)", why, vm.cpu.rip_now(), total_ms)),
        End::TimeLimit => Err(format!("no verdict within {} s", RUN_LIMIT_MS / 1000)),
    };
    pass(tally, "linux test program", verdict);
}
