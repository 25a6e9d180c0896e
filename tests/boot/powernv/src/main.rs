//! vmmu-boot-powernv: a bare-metal hypervisor for QEMU's powernv machine
//! (POWER8 and POWER9, booted by skiboot) that runs a guest partition (LPID 1)
//! on the hashed page table `arch_ppc_book3s::guest::GuestHpt` owns. The CPU
//! walks that table for the guest; the guest's `sc 1` hypercalls are served by
//! `GuestHpt`; the core's dirty-log and ageing drivers harvest the C and R bits
//! the CPU sets, while the guest keeps running.
//!
//! | module | what it holds |
//! |---|---|
//! | `asm` | assembly pieces shared with the pseries image (ELFv1 calls, frames, stacks) |
//! | `entry` | the entry stub skiboot jumps to, the OPAL call gate |
//! | `opal` | console, power-off |
//! | `fdt` | the flattened device tree reader |
//! | `heap`, `mem` | the allocator (size-aligned blocks: the HPT), memcpy and friends (both shared) |
//! | `spr` | SPR access, cache and TLB maintenance |
//! | `hv` | guest entry (`hrfid`) and exit (the hypervisor vectors) |
//! | `guest` | the guest's kernel: an operation interpreter copied into its memory |
//! | `partition` | memslots, `GuestHpt`, LPCR/LPIDR/SDR1/PTCR, VRMA, the hcall loop |
//! | `scenarios` | the scenarios and their PASS/FAIL lines |
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

// Assembly pieces (ELFv1 calls, frames, stacks), shared with the pseries image; first,
// so that every later module sees its macros.
#[path = "../../ppc64/src/asm.rs"]
#[macro_use]
#[rustfmt::skip]
mod asm;
mod entry;
mod fdt;
mod guest;
// The allocator, shared with the pseries image.
#[path = "../../ppc64/src/heap.rs"]
mod heap;
mod hv;
// memcpy and friends, shared with the pseries image (self-contained, no hardware access).
#[path = "../../ppc64/src/mem.rs"]
mod mem;
mod opal;
mod partition;
mod scenarios;
mod spr;

use core::panic::PanicInfo;

use arch_ppc_book3s::pagesize::PageSizes;

use partition::{Model, Platform, Ranges};

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Size classes of the heap: 16 B .. 2^43 B, so that every block is a power of two
/// aligned to its size (the HPT needs that).
const HEAP_CLASSES: usize = 40;
/// Bytes of the hypervisor heap.
const HEAP_BYTES: u64 = 64 << 20;
/// Bytes of guest memory.
pub const GUEST_BYTES: u64 = 64 << 20;

fn read_platform(fdt_addr: u64) -> Result<Platform, &'static str> {
    // SAFETY: skiboot passes a valid tree in r3; its header gives its size.
    let hdr = unsafe { core::slice::from_raw_parts(fdt_addr as *const u8, 8) };
    let total = fdt::Fdt::total_size(hdr).ok_or("no device tree in r3")?;
    // SAFETY: as above: `total` bytes from the header, in memory skiboot reserved.
    let blob = unsafe { core::slice::from_raw_parts(fdt_addr as *const u8, total) };
    let t = fdt::Fdt::new(blob).map_err(|_| "bad device tree")?;
    let mut memory = Ranges::new();
    let mut reserved = Ranges::new();
    let mut overflow = false;
    for r in t.reservations() {
        overflow |= !reserved.push(r);
    }
    let mut sizes = None;
    let mut seg_1t = false;
    let mut tb_hz = 0;
    t.for_each_prop(|p| {
        if p.name == b"reg" && (fdt::base_name(p.node) == b"memory" || p.parent == b"reserved-memory") {
            let list = if p.parent == b"reserved-memory" { &mut reserved } else { &mut memory };
            let mut i = 0;
            while let Some(r) = fdt::reg_pair(p.value, i) {
                overflow |= !list.push(r);
                i += 1;
            }
        }
        if p.name == b"ibm,segment-page-sizes" && sizes.is_none() {
            sizes = PageSizes::from_be_bytes(p.value).ok();
        }
        if p.name == b"timebase-frequency" && p.value.len() == 4 && tb_hz == 0 {
            tb_hz = u64::from(u32::from_be_bytes([p.value[0], p.value[1], p.value[2], p.value[3]]));
        }
        if p.name == b"ibm,processor-segment-sizes" {
            seg_1t |= p.value.chunks(4).any(|c| c == [0, 0, 0, 40]);
        }
    });
    Ok(Platform {
        memory,
        reserved,
        overflow,
        sizes: sizes.ok_or("no usable ibm,segment-page-sizes")?,
        seg_1t,
        tb_hz,
    })
}

#[no_mangle]
extern "C" fn kmain(fdt_addr: u64, opal_base: u64, opal_entry: u64) -> ! {
    opal::init(opal_base, opal_entry);
    let pvr = spr::pvr();
    kprintln!(
        "vmmu powernv hypervisor: pvr {pvr:#x} msr {:#x} lpcr {:#x} fdt {fdt_addr:#x} opal {opal_base:#x}",
        spr::mfmsr(),
        spr::lpcr()
    );
    let mut boot_vcpu = hv::Vcpu::default();
    hv::install_vectors(&mut boot_vcpu);
    let failed = match setup(fdt_addr, pvr) {
        Ok((model, plat, heap_base, guest_base)) => {
            kprintln!(
                "platform: {:?}, {} memory ranges ({:#x} bytes), {} reserved ranges, 1T segments {}, heap {heap_base:#x}, guest memory {guest_base:#x}+{GUEST_BYTES:#x}",
                model,
                plat.memory.len(),
                plat.memory.iter().map(|r| r.1).sum::<u64>(),
                plat.reserved.len(),
                plat.seg_1t
            );
            let t0 = spr::timebase();
            let (mut p, mut f) = scenarios::run_all(model, &plat, guest_base);
            // A release build counts a FlushToken dropped without its flush instead of
            // panicking: each such drop is a TLB flush the run forgot.
            let drops = mmu_generic::backend::FlushToken::unflushed_drops();
            if drops == 0 {
                p += 1;
                kprintln!("PASS flush tokens: every token with a recorded change was flushed");
            } else {
                f += 1;
                kprintln!("FAIL flush tokens: {drops} dropped with a recorded change and no flush");
            }
            let ticks = spr::timebase() - t0;
            kprintln!(
                "scenarios took {ticks} timebase ticks ({} ms at {} Hz)",
                ticks * 1000 / plat.tb_hz.max(1),
                plat.tb_hz
            );
            kprintln!("{p} passed, {f} failed");
            f
        }
        Err(e) => {
            kprintln!("FAIL setup: {e}");
            kprintln!("0 passed, 1 failed");
            1
        }
    };
    let _ = failed;
    opal::power_down();
    loop {
        core::hint::spin_loop();
    }
}

type Setup = (Model, Platform, u64, u64);

fn setup(fdt_addr: u64, pvr: u64) -> Result<Setup, &'static str> {
    let model = Model::from_pvr(pvr).ok_or("not a POWER8 or POWER9")?;
    let plat = read_platform(fdt_addr)?;
    // SAFETY: the linker defines both symbols around the image.
    let (start, end) = unsafe { (&__image_start as *const u8 as u64, &__image_end as *const u8 as u64) };
    let image = (start, end - start);
    // The heap and guest memory: the first 16 MiB-aligned free RAM above the image
    // that no reservation (firmware, OCC, HOMER, the device tree) touches.
    let mut at = (end + (16 << 20) - 1) & !((16 << 20) - 1);
    let mut pick = |len: u64| -> Option<u64> {
        for _ in 0..256 {
            if plat.is_free(at, len, image) {
                let base = at;
                at += len;
                return Some(base);
            }
            at += 16 << 20;
        }
        None
    };
    let heap_base = pick(HEAP_BYTES).ok_or("no free RAM for the heap")?;
    let guest_base = pick(GUEST_BYTES).ok_or("no free RAM for the guest")?;
    // SAFETY: free RAM (checked against the tree), used by nothing else.
    unsafe { heap::init(heap_base as usize, HEAP_BYTES as usize) };
    Ok((model, plat, heap_base, guest_base))
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kprintln!("FAIL fatal: panic: {info}");
    kprintln!("0 passed, 1 failed");
    opal::power_down();
    loop {
        core::hint::spin_loop();
    }
}

/// The prebuilt `alloc` of this target refers to the unwinding personality; with
/// `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// The prebuilt `alloc` is compiled with `panic = "unwind"`: `alloc::fmt::format` has a
/// landing pad that resumes unwinding. This kernel never unwinds, so reaching this is a
/// bug, reported as a failure.
#[no_mangle]
pub extern "C" fn _Unwind_Resume(_exception: *mut u8) -> ! {
    kprintln!("FAIL fatal: _Unwind_Resume reached");
    kprintln!("0 passed, 1 failed");
    opal::power_down();
    loop {
        core::hint::spin_loop();
    }
}
