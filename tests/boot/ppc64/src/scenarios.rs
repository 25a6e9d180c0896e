//! The scenario list, in order.

use crate::env::Env;
use crate::machine_papr::PaprMachine;
use crate::report::scenario;
use crate::suite::{self, Outcome};
use crate::{scen_differential, scen_exec, scen_faults, scen_harness, scen_pteg, scen_translate};
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::pagesize::PageSizes;
use mmu_generic::dirty_log::Tracking;
use mmu_generic::memslot::SlotFlags;

/// Runs every scenario; each prints one line.
pub fn run(env: &mut Env) {
    if env.plat.has_arg("selftest=hang") {
        // Proves the watchdog: spin until the decrementer ends the run with a FAIL line.
        crate::kprintln!("selftest: spinning until the watchdog fires");
        loop {
            core::hint::spin_loop();
        }
    }
    if env.plat.has_arg("selftest=unexpected-dsi") {
        // Proves the failure path: a load from an unmapped segment with no expectation
        // must end the run with a FAIL line and QEMU exit status 1.
        crate::kprintln!("selftest: load from an unmapped EA without an expectation");
        let _ = crate::trap::probe_load(0x7700_0000_0000, 0);
        crate::kprintln!("selftest: the fault was not caught");
        return;
    }
    let t1 = env.plat.has_segment_shift(40);
    if !t1 {
        crate::kprintln!("SKIP 1T segments: ibm,processor-segment-sizes lacks 40");
    }
    let sizes = [
        (Some(env.ps4k), "4K", ["map-4K-256M", "map-4K-1T"], 64, 0x1000_0000u64, 0x0100_0000_0000u64),
        (env.ps64k, "64K", ["map-64K-256M", "map-64K-1T"], 32, 0x2000_0000, 0x0200_0000_0000),
        (env.ps16m, "16M", ["map-16M-256M", "map-16M-1T"], 2, 0x4000_0000, 0x0400_0000_0000),
    ];
    for (ps, label, names, n, ea256, ea1t) in sizes {
        let Some(ps) = ps else {
            crate::kprintln!(
                "SKIP map-{}: ibm,segment-page-sizes does not list it (16M needs cap-hpt-max-page-size=16M)",
                label
            );
            continue;
        };
        scen_translate::translate(env, names[0], ea256, SegmentSize::S256M, ps, n);
        if t1 {
            scen_translate::translate(env, names[1], ea1t, SegmentSize::S1T, ps, n);
        }
    }
    if t1 {
        scen_translate::alias(env);
    }
    scen_faults::invalidation(env);
    scen_pteg::pteg_full(env);
    scen_exec::exec(env);
    papr_suite(env);
    match PageSizes::from_cells(&env.plat.sps_cells[..env.plat.sps_len]) {
        Ok(sizes) => {
            // A bare-metal hypervisor's own table uses the ISA 3.0 layout from POWER9 on.
            let cpu = &env.plat.cpu_name;
            let isa300 = cpu.windows(6).any(|w| w == b"POWER9") || cpu.windows(7).any(|w| w == b"POWER10");
            let format = if isa300 { HpteFormat::Isa300 } else { HpteFormat::PreIsa300 };
            scen_differential::differential(env, &sizes, format);
            scen_harness::run(sizes, format);
        }
        Err(e) => scenario(
            "page-sizes",
            false,
            format_args!("PageSizes::from_cells rejected the device tree: {:?}", e),
        ),
    }
}

/// One suite run on the platform: name, effective address, slot flags, scenario.
type PaprRun = (&'static str, u64, SlotFlags, fn(&mut PaprMachine) -> Outcome);

/// The generic suite on the platform's table through the PAPR pass-through back end.
fn papr_suite(env: &mut Env) {
    let runs: [PaprRun; 3] = [
        ("papr dirty-log (C bit)", 0x6000_0000, SlotFlags::DIRTY_LOG, |m| {
            suite::dirty_rounds(m, Tracking::HardwareDirty)
        }),
        ("papr dirty-log (write protect)", 0x6800_0000, SlotFlags::DIRTY_LOG, |m| {
            suite::dirty_rounds(m, Tracking::WriteProtect)
        }),
        ("papr ageing (R bit)", 0x7000_0000, SlotFlags::empty(), |m| suite::ageing(m)),
    ];
    for (name, ea, flags, run) in runs {
        match PaprMachine::new(env, ea, flags) {
            Ok(mut m) => {
                let o = run(&mut m);
                scenario(name, o.ok, format_args!("{}", o.line));
                m.release(env);
            }
            Err(e) => scenario(name, false, format_args!("setup: {}", e)),
        }
    }
}
