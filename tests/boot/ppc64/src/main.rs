//! vmmu ppc64 boot image: a big-endian pseries kernel that manages its own translation.
//!
//! Boot flow: `entry` (64-bit mode, stack) → `kmain`: walk the device tree through the
//! Open Firmware client interface (`ofw`), then take over low memory with exception
//! vectors (`vectors`), identity-map the kernel through PAPR hypercalls with
//! `arch-ppc-book3s` (`hpt`, `env`), turn relocation on (`mmu`) and run the scenarios
//! (`scenarios`). Each prints one line; the run ends with `N passed, M failed` and the
//! verdict leaves through RTAS (`rtas`): power-off on pass, ibm,os-term on failure.
//!
//! | module | what it holds |
//! |---|---|
//! | `asm` | assembly pieces shared with the powernv image (ELFv1 calls, frames, stacks) |
//! | `entry` | the entry stub (ELFv1 descriptor call, MSR bits, .bss, stack) and the OF call gate |
//! | `console`, `hcall`, `rtas` | H_PUT_TERM_CHAR output, `sc 1` with per-opcode counters, RTAS verdict |
//! | `ofw` | IEEE 1275 client interface and the device-tree walk (`Platform`) |
//! | `vectors`, `trap` | real-mode vectors, full-state trap entry, expected-fault protocol, probes |
//! | `watchdog` | decrementer watchdog: a hang ends in a FAIL line |
//! | `heap`, `mem` | the global allocator; memcpy and friends |
//! | `mmu`, `hpt`, `env` | SLB/MSR, glue to the crate (`Spapr` hcall, HPTE/SLB construction), layout and allocators |
//! | `suite`, `machine_papr` | dirty-log/ageing rounds on the platform table through the crate's `PaprBackend`, accesses by this CPU |
//! | `scen_harness` | `vmmu-tests`' harness suite (the host's) on the crate's in-memory HPT (`vmmu_tests::ppc`) |
//! | `scen_*`, `scenarios` | translation, invalidation/faults, full PTEG, execution, differential |

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

// One assembler line per source line: rustfmt would split the `concat!`s.
#[macro_use]
#[rustfmt::skip]
mod asm;
mod console;
mod entry;
mod env;
mod hcall;
mod heap;
mod hpt;
mod machine_papr;
mod mem;
mod mmu;
mod ofw;
mod report;
mod rtas;
mod scen_differential;
mod scen_exec;
mod scen_faults;
mod scen_harness;
mod scen_pteg;
mod scen_translate;
mod scenarios;
mod suite;
mod trap;
mod vectors;
mod watchdog;

use core::panic::PanicInfo;

/// Size classes of the heap: 16 B .. 64 KiB; larger blocks are reused first fit.
const HEAP_CLASSES: usize = 13;

/// Rust entry, called by the stub with the firmware's r3, r4, r5.
#[no_mangle]
pub extern "C" fn kmain(_initrd: u64, _initrd_size: u64, of_entry: u64) -> ! {
    kprintln!("vmmu ppc64 boot: OF client interface at {:#x}", of_entry);
    // SAFETY: r5 from the firmware is its client-interface entry; nothing has touched
    // low memory yet.
    let of = unsafe { ofw::Ofw::new(of_entry) };
    let plat = match ofw::discover(&of) {
        Ok(p) => p,
        Err(e) => {
            match e {
                ofw::OfError::Failed(what) => kprintln!(
                    "device-tree walk failed: client-interface call {} failed",
                    what.trim_end_matches('\0')
                ),
                ofw::OfError::NoProperty => kprintln!("device-tree walk failed: property missing"),
            }
            rtas::os_term(b"device-tree walk failed\0");
        }
    };
    rtas::set_tokens(plat.rtas_power_off, plat.rtas_os_term);
    kprintln!(
        "platform: {} nodes, {} props, ram {} MiB, pft-size 2^{}, slb {} entries, timebase {} Hz, rtas power-off {:x?} os-term {:x?}",
        plat.nodes,
        plat.props,
        plat.ram_bytes >> 20,
        plat.pft_shift,
        plat.slb_size,
        plat.timebase_hz,
        plat.rtas_power_off,
        plat.rtas_os_term
    );
    match arch_ppc_book3s::pagesize::PageSizes::from_cells(&plat.sps_cells[..plat.sps_len]) {
        Ok(sizes) => {
            for s in sizes.segments() {
                kprint!("  segment base 2^{} slb-enc {:#x}:", s.base_shift, s.slb_enc);
                for e in s.encodings() {
                    kprint!(" [2^{} enc {:#x}]", e.shift, e.pte_enc);
                }
                kprintln!();
            }
        }
        Err(e) => kprintln!("  ibm,segment-page-sizes rejected: {:?}", e),
    }
    kprintln!("  segment sizes: {:?}", &plat.segment_shifts[..plat.nsegment_shifts]);

    // Every client-interface call is done: low memory is ours.
    // SAFETY: relocation is off and the firmware is no longer called.
    unsafe { vectors::install() };
    smoke_program_interrupt();

    // SAFETY: the heap range is RAM inside the first memory node, below the identity-map
    // end, above the image (checked), used by nothing else.
    unsafe {
        extern "C" {
            static __image_end: u8;
        }
        assert!((&__image_end as *const u8 as u64) <= env::layout::HEAP_BASE, "image overlaps heap");
        assert!(plat.ram0_bytes >= env::layout::POOL_END, "need at least 192 MiB of RAM at 0");
        heap::init(env::layout::HEAP_BASE as usize, env::layout::HEAP_SIZE as usize);
    }
    let mut env = match env::Env::new(plat) {
        Ok(e) => e,
        Err(e) => {
            kprintln!("device tree unusable: {}", e);
            report::fatal("platform description");
        }
    };
    let t0 = timebase();
    if let Err(e) = env.map_identity() {
        kprintln!("identity map: H_ENTER failed: {}", e);
        report::fatal("identity map");
    }
    // SAFETY: [0, IDENT_END) is mapped EA = RA and holds everything the kernel touches.
    unsafe { mmu::relocation_on() };
    report::scenario(
        "relocation-on",
        mmu::mfmsr() & (mmu::MSR_IR | mmu::MSR_DR) == mmu::MSR_IR | mmu::MSR_DR,
        format_args!(
            "identity map of {} MiB with {} x {}K HPTEs, HPT 2^{} bytes ({} PTEGs), msr {:#x}, {} timebase ticks",
            env::layout::IDENT_END >> 20,
            env.ident_entries,
            1u64 << (env.ident_ps.shift - 10),
            env.plat.pft_shift,
            env.geometry.ptegs(),
            mmu::mfmsr(),
            timebase() - t0
        ),
    );
    let budget = env.plat.arg_u64("watchdog").unwrap_or(10);
    watchdog::arm(budget, env.plat.timebase_hz);
    scenarios::run(&mut env);
    watchdog::disarm();
    report::finish();
}

/// The timebase register.
pub fn timebase() -> u64 {
    let t: u64;
    // SAFETY: reading the timebase has no side effects.
    unsafe { core::arch::asm!("mftb {0}", out(reg) t, options(nostack, nomem)) };
    t
}

/// A `trap` instruction must arrive at 0x700 and resume after it, with every volatile
/// GPR and FPR the interrupted code held intact (the handler runs Rust code that may use
/// them, and the trap entry turns FP back on).
fn smoke_program_interrupt() {
    let g_in: [u64; 9] = core::array::from_fn(|i| 0x0123_4567_89ab_cd00 ^ (i as u64) << 56 ^ i as u64);
    let f_in: [f64; 6] = core::array::from_fn(|i| 1.5 + i as f64 * 1024.25);
    let mut g = g_in;
    let mut f = f_in;
    trap::expect(trap::VEC_PROGRAM, trap::Resume::Skip);
    // SAFETY: an unconditional trap; the handler expects it and skips it. Every register
    // named is declared as in/out.
    unsafe {
        core::arch::asm!(
            "trap",
            inout("r3") g[0], inout("r4") g[1], inout("r5") g[2], inout("r6") g[3],
            inout("r7") g[4], inout("r8") g[5], inout("r9") g[6], inout("r10") g[7],
            inout("r12") g[8],
            inout("f0") f[0], inout("f1") f[1], inout("f2") f[2], inout("f7") f[3],
            inout("f12") f[4], inout("f13") f[5],
            options(nostack)
        )
    };
    let c = trap::take();
    let regs_ok = g == g_in && f == f_in;
    report::scenario(
        "program-interrupt",
        c.map(|c| c.vector) == Some(trap::VEC_PROGRAM) && regs_ok,
        format_args!(
            "trap at {:#x} caught at vector {:#x}, resumed after it; 9 GPRs and 6 FPRs preserved: {}",
            c.map_or(0, |c| c.srr0),
            c.map_or(0, |c| c.vector),
            if regs_ok { "yes" } else { "NO" }
        ),
    );
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kprintln!("PANIC: {}", info);
    report::fatal("panic");
}

/// The prebuilt `alloc` of this target refers to the unwinding personality; with
/// `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
