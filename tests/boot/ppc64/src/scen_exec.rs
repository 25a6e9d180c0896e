//! Instruction relocation: code written through a data mapping runs through the
//! translation; no-execute (N via H_PROTECT), a removed HPTE and a missing segment stop
//! the fetch at 0x400 / 0x480 with the cause in SRR1.

use crate::env::Env;
use crate::hpt;
use crate::mmu;
use crate::report::scenario;
use crate::trap::{
    self, probe_call, probe_store, Resume, SRR1_ISI_NOPTE, SRR1_ISI_N_OR_G, VEC_ISEG, VEC_ISI,
};
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::papr::RemoveCond;
use arch_ppc_book3s::table::{HashTable, Protection};
use core::arch::asm;

const SENTINEL: u64 = 0x5e47_1e57;

/// Map a page, write a routine into it, run it, then take the fetch faults.
pub fn exec(env: &mut Env) {
    let ps = env.ps4k;
    let ea = 0x8000_0000u64;
    let vsid = env.vsid();
    let pa = env.frames(12, 1);
    let (ptex, v) =
        match env.enter_range(hpt::Vpage { vsid, ssize: SegmentSize::S256M, ea, ps }, pa, 1, hpt::PP_RW) {
            Ok(e) => e[0],
            Err(e) => return scenario("exec", false, format_args!("H_ENTER: {}", e)),
        };
    env.load_segment(ea, vsid, SegmentSize::S256M, ps.base_shift);
    // li r3, 0x2a ; blr
    probe_store(ea, 0x3860_002a_4e80_0020);
    // SAFETY: make the stored instructions visible to instruction fetch (cache ops only).
    unsafe { asm!("dcbst 0, {0}", "sync", "icbi 0, {0}", "isync", in(reg_nonzero) ea, options(nostack)) };
    let mut fails = 0u32;
    let ran = probe_call(ea, SENTINEL);
    if ran != 0x2a {
        fails += 1;
    }
    let r_after_exec = env.table.read(ptex).map_or(0, |h| h.r & 0x100);
    if r_after_exec == 0 {
        fails += 1;
    }

    // No-execute: H_PROTECT with N; the fetch takes an ISI with SRR1 "N or G".
    let _ = env.table.protect(
        ptex,
        Protection { pp: hpt::PP_RW as u8, no_execute: true, key: 0 },
        Some(hpt::avpn_arg(v)),
    );
    trap::expect(VEC_ISI, Resume::Return);
    let nx = probe_call(ea, SENTINEL);
    let c_nx = trap::take();
    if nx != SENTINEL || !c_nx.is_some_and(|c| c.srr0 == ea && c.srr1 & SRR1_ISI_N_OR_G != 0) {
        fails += 1;
    }
    // Removed: ISI with SRR1 "no translation".
    let _ = env.table.remove(ptex, RemoveCond::Avpn(hpt::avpn_arg(v)));
    trap::expect(VEC_ISI, Resume::Return);
    let gone = probe_call(ea, SENTINEL);
    let c_gone = trap::take();
    if gone != SENTINEL || !c_gone.is_some_and(|c| c.srr0 == ea && c.srr1 & SRR1_ISI_NOPTE != 0) {
        fails += 1;
    }
    // No segment: instruction segment interrupt.
    env.unload_segment(ea, SegmentSize::S256M);
    trap::expect(VEC_ISEG, Resume::Return);
    let noseg = probe_call(ea, SENTINEL);
    let c_seg = trap::take();
    if noseg != SENTINEL || c_seg.is_none_or(|c| c.srr0 != ea) {
        fails += 1;
    }
    env.reset_slb();
    let ir = mmu::mfmsr() & mmu::MSR_IR != 0;
    scenario(
        "exec",
        fails == 0 && ir,
        format_args!(
            "routine at ea {:#x} (ra {:#x}) returned {:#x} with MSR[IR]={}, R {:#x}; N -> ISI srr1 {:#x}, removed -> ISI srr1 {:#x}, no SLB -> {:#x}",
            ea,
            pa,
            ran,
            ir as u8,
            r_after_exec,
            c_nx.map_or(0, |c| c.srr1 & 0x7800_0000),
            c_gone.map_or(0, |c| c.srr1 & 0x7800_0000),
            c_seg.map_or(0, |c| c.vector)
        ),
    );
}
