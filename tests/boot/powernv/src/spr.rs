//! Special-purpose registers the hypervisor reads and writes (Power ISA v2.07 / v3.0,
//! Book III: the SPR numbers in the register tables of chapters 4-6).

use core::arch::asm;

macro_rules! mfspr {
    ($name:ident, $n:literal) => {
        /// Reads the SPR.
        #[inline(always)]
        #[allow(dead_code)]
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading an SPR in hypervisor state has no side effect.
            unsafe { asm!(concat!("mfspr {0}, ", $n), out(reg) v, options(nomem, nostack)) };
            v
        }
    };
}

mfspr!(pvr, 287);
mfspr!(lpcr, 318);
mfspr!(lpidr, 319);

/// Reads the MSR.
pub fn mfmsr() -> u64 {
    let v: u64;
    // SAFETY: reading the MSR has no side effect.
    unsafe { asm!("mfmsr {0}", out(reg) v, options(nomem, nostack)) };
    v
}

macro_rules! mtspr {
    ($name:ident, $n:literal, $what:literal) => {
        #[doc = concat!("Writes ", $what, ".")]
        ///
        /// # Safety
        /// The value must be one the hypervisor is ready for (see the callers).
        #[inline(always)]
        #[allow(dead_code)]
        pub unsafe fn $name(v: u64) {
            // SAFETY: the caller's contract.
            unsafe { asm!(concat!("mtspr ", $n, ", {0}"), "isync", in(reg) v, options(nostack)) };
        }
    };
}

mfspr!(sdr1, 25);
mfspr!(ptcr, 464);
mfspr!(hsprg0, 304);
mtspr!(set_lpcr, 318, "LPCR");
mtspr!(set_lpidr, 319, "LPIDR");
mtspr!(set_sdr1, 25, "SDR1 (the POWER8 hashed page table)");
mtspr!(set_ptcr, 464, "PTCR (the POWER9 partition table)");
mtspr!(set_hsprg0_raw, 304, "HSPRG0");
mtspr!(set_hdec_raw, 310, "HDEC");

/// Arms the hypervisor decrementer: an interrupt at 0x980 once `ticks`
/// timebase ticks have passed with the guest running (LPCR[HDICE] = 1).
pub fn set_hdec(ticks: u32) {
    // SAFETY: HDEC only raises the interrupt our 0x980 vector turns into a guest exit.
    unsafe { set_hdec_raw(u64::from(ticks)) }
}

/// Points HSPRG0, read by every hypervisor vector, at a vCPU.
pub fn set_hsprg0(v: u64) {
    // SAFETY: HSPRG0 is a scratch register only our vectors read.
    unsafe { set_hsprg0_raw(v) }
}

/// Copies `len` bytes (a multiple of 4) from `src` to real address `dst`.
///
/// # Safety
/// Both ranges are RAM we own, valid for `len` bytes, not overlapping.
pub unsafe fn copy_to_real(dst: u64, src: u64, len: u64) {
    let words = len.div_ceil(4);
    if words == 0 {
        return;
    }
    // SAFETY: the caller's contract; the loop touches exactly the two ranges.
    unsafe {
        asm!(
            "mtctr {n}",
            "addi {s}, {s}, -4",
            "addi {d}, {d}, -4",
            "2:",
            "lwzu {t}, 4({s})",
            "stwu {t}, 4({d})",
            "bdnz 2b",
            n = in(reg) words,
            s = inout(reg_nonzero) src => _,
            d = inout(reg_nonzero) dst => _,
            t = out(reg) _,
            out("ctr") _,
            options(nostack),
        );
    }
}

/// Makes `[addr, addr + len)` coherent for instruction fetch (Book II 1.8:
/// dcbst, sync, icbi, isync per 128-byte line). Works on real address 0.
pub fn sync_icache(addr: u64, len: u64) {
    let mut a = addr & !127;
    while a < addr + len {
        // SAFETY: cache-block operations on memory we own change no data.
        unsafe { asm!("dcbst 0, {0}", "sync", "icbi 0, {0}", in(reg) a, options(nostack)) };
        a += 128;
    }
    // SAFETY: a context synchronisation.
    unsafe { asm!("sync", "isync", options(nostack)) };
}

/// `ptesync`: the table walker sees every store to the HPT before the next access.
pub fn ptesync() {
    // SAFETY: a barrier.
    unsafe { asm!("ptesync", options(nostack)) };
}

/// Invalidates this CPU's translations of the current partition (LPIDR):
/// `tlbiel` with IS = 0b10 ("all entries of the set matching LPIDR") for each
/// of the `sets` congruence classes, between `ptesync`s (POWER8: 512 sets,
/// POWER9 in HPT mode: 256; as KVM's `flush_guest_tlb`). One CPU runs the
/// guest, so the local form is enough.
pub fn flush_partition_tlb(sets: u64) {
    ptesync();
    for set in 0..sets {
        let rb = (set << 12) | (2 << 10);
        // SAFETY: tlbiel only drops cached translations. Encoded by hand (X-form,
        // XO 274, RB = r4, RS = r0 holding 0, RIC = PRS = R = 0) so the ISA 3.0 form
        // needs no assembler flag.
        unsafe { asm!(".long 0x7c002224", in("r4") rb, in("r0") 0u64, options(nostack)) };
    }
    ptesync();
}

/// Reads the timebase.
pub fn timebase() -> u64 {
    let v: u64;
    // SAFETY: reading the timebase has no side effect.
    unsafe { asm!("mftb {0}", out(reg) v, options(nomem, nostack)) };
    v
}

/// `slbfee.`: the VSID word of the SLB entry translating `ea`, if any (the SLB
/// holds the guest's entries while the hypervisor runs: it is not switched).
pub fn slbfee(ea: u64) -> Option<u64> {
    let rt: u64;
    let cr: u64;
    // SAFETY: an SLB search; it changes nothing but CR0 and RT.
    unsafe {
        asm!("slbfee. {rt}, {rb}", "mfcr {cr}", rt = out(reg) rt, rb = in(reg) ea, cr = out(reg) cr, options(nostack))
    };
    // CR0[EQ] (bit 2 of the 32-bit CR): found.
    (cr & 0x2000_0000 != 0).then_some(rt)
}

/// Loads SRR0, SRR1, DAR and DSISR with the state of a data storage interrupt
/// the hypervisor delivers to the guest (its next `hrfid` goes to the guest's 0x300).
pub fn set_guest_dsi_regs(srr0: u64, srr1: u64, dar: u64, dsisr: u64) {
    // SAFETY: these registers belong to the guest while it runs; the hypervisor
    // takes no interrupt (and so no SRR0/1 overwrite) before the hrfid.
    unsafe {
        asm!(
            "mtsrr0 {0}", "mtsrr1 {1}", "mtdar {2}", "mtdsisr {3}",
            in(reg) srr0, in(reg) srr1, in(reg) dar, in(reg) dsisr,
            options(nostack)
        )
    };
}
