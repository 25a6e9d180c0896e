//! vmmu's x86_64 boot image: a bare-metal hypervisor that runs a small guest on nested
//! paging and checks, with the emulated CPU walking the tables, the scenarios of the
//! vmmu crates (demand faults, dirty logging, ageing, invalidation, huge pages, zap all,
//! access outside every memslot).
//!
//! One ELF boots two ways: by PVH under QEMU (AMD SVM with nested paging) and by GRUB
//! multiboot2 under Bochs (Intel VMX with EPT). The vendor is chosen by CPUID.
//!
//! Modules: `boot` (entry, trampoline), `gdt`, `idt`, `port`, `console`, `heap`,
//! `frames`, `timer`; `vendor` (the common interface), `svm`, `vmx`, `vmcb` (the VMCB
//! layout and access every SVM user shares); `guest` (the guest
//! program); `harness` (runs guest commands); `nested` (arch-x86's TDP engine with
//! mmu-generic's drivers); `scenarios`; the two-CPU dirty-log race: `apic` (local APIC),
//! `smp` (second CPU bring-up, remote TLB flush), `spin` (the MMU lock), `race`; shadow
//! paging with nested paging off: `sguest` (a guest that behaves like an OS), `decode`
//! (the instructions the hypervisor decodes), `shadow_ram` (guest RAM as the shadow MMU
//! sees it, shared with the Linux guest), `shadow_vm` (arch-x86's shadow MMU and the
//! exits it needs), `svm_shadow`, `vmx_shadow`, `shadow_scenarios`.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

// First: its world-switch assembly macros serve `svm`, `vmx` and `linux`.
#[macro_use]
mod vendor;

mod apic;
mod boot;
mod console;
mod decode;
mod frames;
mod gdt;
mod guest;
mod harness;
mod heap;
mod idt;
mod linux;
mod nested;
mod port;
mod race;
mod scenarios;
mod sguest;
mod shadow_ram;
mod shadow_scenarios;
mod shadow_vm;
mod smp;
mod spin;
mod svm;
mod svm_shadow;
mod timer;
mod vmcb;
mod vmx;
mod vmx_shadow;

use core::panic::PanicInfo;

extern "C" {
    static __kernel_end: u8;
}

/// Physical memory the image uses: the emulators are started with 128 MiB.
const RAM_TOP: u64 = 120 << 20;
/// Size of the kernel heap.
const HEAP_SIZE: u64 = 8 << 20;

#[no_mangle]
extern "C" fn kernel_entry(protocol: u32, boot_info: u32) -> ! {
    console::init(protocol);
    gdt::init();
    idt::init();
    let kernel_end = core::ptr::addr_of!(__kernel_end) as u64;
    let heap_start = (kernel_end + frames::FRAME_2M - 1) & !(frames::FRAME_2M - 1);
    // SAFETY: the region after the kernel image is identity-mapped RAM that nothing else
    // uses (the loaders' own structures are no longer read).
    unsafe { heap::init(heap_start as usize, HEAP_SIZE as usize) };
    let mut pool = frames::FramePool::new(heap_start + HEAP_SIZE, RAM_TOP);
    println!(
        "vmmu boot: {} entry, kernel end {:#x}, frames {:#x}..{:#x}",
        if protocol == boot::PROTO_PVH { "PVH" } else { "multiboot2" },
        kernel_end,
        heap_start + HEAP_SIZE,
        RAM_TOP
    );
    timer::init();
    let mut tally = scenarios::Tally { passed: 0, failed: 0 };
    // Started with a Linux guest as the PVH module: the Linux VMM runs instead of the
    // scenarios (a separate QEMU run in ci/boot-x86_64).
    if let Some(found) = linux::find(if protocol == boot::PROTO_PVH { boot_info } else { 0 }) {
        linux::run(found, heap_start + HEAP_SIZE, &mut tally);
        check_flush_tokens(&mut tally);
        println!("{} passed, {} failed", tally.passed, tally.failed);
        console::exit(tally.failed == 0 && tally.passed > 0);
    }
    if svm::available() {
        match svm::Svm::new() {
            Ok(mut v) => {
                scenarios::run_all(&mut v, &mut pool, &mut tally);
                shadow_scenarios::run_all(&mut svm_shadow::SvmShadow::new(), &mut pool, &mut tally);
            }
            Err(e) => {
                println!("FAIL setup: SVM unusable: {:?}", e);
                tally.failed += 1;
            }
        }
    } else if vmx::available() {
        match vmx::Vmx::new(&mut pool) {
            Ok(mut v) => {
                scenarios::run_all(&mut v, &mut pool, &mut tally);
                shadow_scenarios::run_all(&mut vmx_shadow::VmxShadow::new(), &mut pool, &mut tally);
            }
            Err(e) => {
                println!("FAIL setup: VMX unusable: {:?}", e);
                tally.failed += 1;
            }
        }
    } else {
        println!("FAIL setup: the CPU has neither SVM nor VMX");
        tally.failed += 1;
    }
    check_flush_tokens(&mut tally);
    println!("{} passed, {} failed", tally.passed, tally.failed);
    console::exit(tally.failed == 0 && tally.passed > 0)
}

/// The image is a release build, where a `FlushToken` dropped without its flush is
/// counted instead of panicking: every such drop is a TLB flush the run forgot.
fn check_flush_tokens(tally: &mut scenarios::Tally) {
    let drops = mmu_generic::backend::FlushToken::unflushed_drops();
    if drops == 0 {
        println!("PASS flush tokens: every token with a recorded change was flushed");
        tally.passed += 1;
    } else {
        println!("FAIL flush tokens: {} dropped with a recorded change and no flush", drops);
        tally.failed += 1;
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("PANIC: {}", info);
    println!("0 passed, 1 failed");
    console::exit(false)
}
