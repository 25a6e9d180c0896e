//! The scenarios: each builds a fresh partition, has the guest act, and checks
//! what the CPU did against what `GuestHpt` promises. One PASS/FAIL line each,
//! with its figures.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use arch_ppc_book3s::hash::{SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HPTE_R_C, HPTE_R_M, HPTE_R_R, HPTE_R_RPN, HPTE_V_VALID};
use arch_ppc_book3s::papr::{
    BULK_CODE, BULK_END, BULK_NOT_FOUND, BULK_REQUEST, BULK_RESPONSE, BULK_SUCCESS, BULK_TYPE, H_BULK_REMOVE,
    H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_EXACT, H_FUNCTION, H_NOT_FOUND, H_PARAMETER, H_PROTECT, H_PTEG_FULL,
    H_READ, H_REMOVE,
};
use arch_ppc_book3s::slb::{SlbEntry, SlbFlags};
use arch_ppc_book3s::table::Protection;
use mmu_generic::addr::{Hva, HvaRange};
use mmu_generic::age::{age, test_age, NoAccessedBit};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::SlotId;
use mmu_generic::zap::zap_hva_range;

use crate::guest::{res, Op, EXEC_MAGIC, EXEC_STUB};
use crate::kprintln;
use crate::partition::{Model, Partition, Platform, SLOT0_BYTES};
use crate::GUEST_BYTES;

/// HPT size used by the scenarios (`ibm,pft-size` 18: 256 KiB, 2048 PTEGs).
const PFT_SHIFT: u32 = 18;

type Outcome = Result<String, String>;

/// Everything a scenario needs.
struct Env<'a> {
    model: Model,
    plat: &'a Platform,
    guest_base: u64,
}

impl Env<'_> {
    fn partition(&self) -> Result<Partition, String> {
        Partition::new(self.model, self.plat, self.guest_base, GUEST_BYTES, PFT_SHIFT)
    }
}

/// A guest segment: where it is, how it is hashed.
#[derive(Clone, Copy)]
struct Seg {
    ea: u64,
    vsid: u64,
    ssize: SegmentSize,
    base_shift: u32,
}

impl Seg {
    fn slbmte(&self, plat: &Platform, index: u64) -> Result<Op, String> {
        let e = SlbEntry::new(
            self.ea,
            self.vsid,
            self.ssize,
            self.base_shift,
            SlbFlags::empty(),
            index,
            &plat.sizes,
        )
        .map_err(|e| format!("SLB entry: {e:?}"))?;
        Ok(Op::Slbmte { rs: e.vsid_word, rb: e.esid_word })
    }

    fn va(&self, ea: u64) -> Result<VirtAddr, String> {
        VirtAddr::new(self.vsid, self.ssize, ea).ok_or_else(|| format!("VA of {ea:#x}"))
    }
}

/// The H_ENTER arguments mapping `ea` (in `seg`) to guest-real `gpa` with a page of
/// `1 << shift` bytes and PP `pp`: (ptex of the primary group, pteh, ptel).
fn hpte_for(
    p: &Partition,
    seg: &Seg,
    ea: u64,
    gpa: u64,
    shift: u32,
    pp: u64,
) -> Result<(u64, u64, u64), String> {
    let va = seg.va(ea)?;
    let (l, rpn) =
        p.gh.page_sizes()
            .encode(seg.base_shift, shift, gpa)
            .ok_or_else(|| format!("no {shift} page at {gpa:#x}"))?;
    let mask = p.gh.table().geometry().pteg_mask();
    let ptex = (va.hash(seg.base_shift) & mask) * 8;
    Ok((ptex, va.avpn_v(shift) | l | HPTE_V_VALID, rpn | HPTE_R_M | pp))
}

fn enter(ptex: u64, pteh: u64, ptel: u64) -> Op {
    Op::Hcall(H_ENTER, [0, ptex, pteh, ptel, 0, 0, 0, 0])
}

fn status(r: &[u64; 16]) -> i64 {
    r[0] as i64
}

/// Runs every scenario; returns (passed, failed).
pub fn run_all(model: Model, plat: &Platform, guest_base: u64) -> (u32, u32) {
    let env = Env { model, plat, guest_base };
    let mut passed = 0;
    let mut failed = 0;
    let mut report = |name: &str, o: Outcome| match o {
        Ok(s) => {
            passed += 1;
            kprintln!("PASS {name}: {s}");
        }
        Err(s) => {
            failed += 1;
            kprintln!("FAIL {name}: {s}");
        }
    };
    report("partition-entry", partition_entry(&env));
    for (shift, ssize, name) in [
        (12, SegmentSize::S256M, "map-4k-256m"),
        (16, SegmentSize::S256M, "map-64k-256m"),
        (12, SegmentSize::S1T, "map-4k-1t"),
        (16, SegmentSize::S1T, "map-64k-1t"),
    ] {
        report(name, map(&env, shift, ssize));
    }
    report("hdec-watchdog", watchdog(&env));
    report("exec-through-guest-hpte", exec(&env));
    report("protect-and-remove", protect_remove(&env));
    report("clear-ref-mod-bulk-remove", clear_bulk(&env));
    report("bad-arguments-and-pteg-full", bad_args(&env));
    report("outside-memslots", outside(&env));
    report("invalidate-then-fault-in-vpm1", invalidate(&env));
    report("dirty-log-from-c-bits", dirty_log(&env));
    report("ageing-from-r-bits", ageing(&env));
    (passed, failed)
}

/// The guest enters in real mode (through the VRMA entries the hypervisor made)
/// and comes back with `sc 1`.
fn partition_entry(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let t0 = crate::spr::timebase();
    // The guest writes a marker in real mode (DR = 0: the VRMA), reads it back through
    // H_READ of the VRMA entry: the store must land at the slot-0 host address.
    p.run(&[])?;
    let entries = p.entries;
    let t1 = crate::spr::timebase();
    let regs = match env.model {
        Model::Power8 => format!("SDR1 {:#x}", crate::spr::sdr1()),
        Model::Power9 => format!("PTCR {:#x}", crate::spr::ptcr()),
    };
    Ok(format!(
        "LPID {} LPCR {:#x} {regs} HPT {:#x} ({:?} layout), VRMA {}x{}M, guest ran {} entries/exits in {} timebase ticks",
        crate::spr::lpidr(),
        crate::spr::lpcr(),
        p.gh.table().base_address(),
        p.gh.table().format(),
        SLOT0_BYTES >> p.vrma_shift,
        (1u64 << p.vrma_shift) >> 20,
        entries,
        t1 - t0
    ))
}

/// Demand mapping: the guest enters 16 pages of `1 << shift` bytes in a segment
/// of `ssize`, stores through them, loads back; every store must land at the host
/// address the memslots give, the hardware entries must hold host addresses, the
/// guest must read its own addresses back with H_READ, and the CPU must have set R and C.
fn map(env: &Env, shift: u32, ssize: SegmentSize) -> Outcome {
    if ssize == SegmentSize::S1T && !env.plat.seg_1t {
        return Err(String::from("the device tree lists no 1T segments"));
    }
    let mut p = env.partition()?;
    let seg = match ssize {
        SegmentSize::S256M => Seg { ea: 0x1_0000_0000, vsid: 0x51_2345, ssize, base_shift: shift },
        SegmentSize::S1T => Seg { ea: 0x100_0000_0000, vsid: 0x2345, ssize, base_shift: shift },
    };
    let n = 16u64;
    let page = 1u64 << shift;
    let off = |k: u64| (page / 2 + 8 * k) & (page - 1);
    let gpa = |k: u64| SLOT0_BYTES + k * page * 3;
    let ea = |k: u64| seg.ea + k * page;
    let value = |k: u64| 0x600d_0000_0000_0000 | (u64::from(shift) << 32) | k;
    let mut ops = Vec::new();
    ops.push(seg.slbmte(env.plat, 1)?);
    let mut want = Vec::new();
    for k in 0..n {
        let (ptex, pteh, ptel) = hpte_for(&p, &seg, ea(k), gpa(k), shift, 0b10)?;
        want.push((ptex, pteh, ptel));
        ops.push(enter(ptex, pteh, ptel));
    }
    let r = p.run(&ops)?;
    let mut slots = Vec::new();
    for (k, rr) in r[1..].iter().enumerate() {
        if status(rr) != 0 {
            return Err(format!("H_ENTER {k} answered {}", status(rr)));
        }
        slots.push(rr[1]);
    }
    let mut ops = Vec::new();
    for k in 0..n {
        ops.push(Op::Store(ea(k) + off(k), value(k)));
    }
    for k in 0..n {
        ops.push(Op::Load(ea(k) + off(k)));
    }
    ops.push(Op::Hcall(H_READ, [0, slots[3], 0, 0, 0, 0, 0, 0]));
    let r = p.run(&ops)?;
    let faults: u64 = r.iter().map(|x| x[res::FCOUNT]).sum();
    if faults != 0 {
        let f = r.iter().find(|x| x[res::FCOUNT] != 0).map(|x| (x[res::FVEC], x[res::FADDR], x[res::FCAUSE]));
        return Err(format!("{faults} faults, first (vector, address, cause) {f:x?}"));
    }
    let mut landed = 0;
    let mut rc = 0;
    for k in 0..n {
        let host = p.read(gpa(k) + off(k)).ok_or("host read")?;
        if host != value(k) {
            return Err(format!(
                "store {k} to {:#x}: host memory at guest-real {:#x} holds {host:#x}",
                ea(k) + off(k),
                gpa(k) + off(k)
            ));
        }
        if r[n as usize + k as usize][0] != value(k) {
            return Err(format!("load {k} read {:#x}", r[n as usize + k as usize][0]));
        }
        landed += 1;
        let hw = p.gh.table().load(slots[k as usize]).ok_or("slot")?;
        let host_ra = hw.r & HPTE_R_RPN & !(page - 1);
        if host_ra != p.base + gpa(k) {
            return Err(format!(
                "hardware entry {} holds RPN {host_ra:#x}, not host {:#x}",
                slots[k as usize],
                p.base + gpa(k)
            ));
        }
        if hw.r & (HPTE_R_R | HPTE_R_C) == HPTE_R_R | HPTE_R_C {
            rc += 1;
        }
    }
    let read = &r[2 * n as usize];
    if status(read) != 0 || read[2] & HPTE_R_RPN & !(page - 1) != gpa(3) || read[1] & HPTE_V_VALID == 0 {
        return Err(format!(
            "H_READ of slot {}: status {} v {:#x} r {:#x}, want guest RPN {:#x}",
            slots[3],
            status(read),
            read[1],
            read[2],
            gpa(3)
        ));
    }
    if rc != n {
        return Err(format!("the CPU set R and C in {rc} of {n} entries"));
    }
    Ok(format!(
        "{n} pages entered ({} slots), {landed} stores landed at host {:#x}+, {n} loads read back, R+C set by the CPU in {rc}/{n}, H_READ gives the guest RPN, 0 faults, {} hcalls, {} tlb flushes",
        slots.len(),
        p.base + gpa(0),
        p.hcalls,
        p.tlb.flushes
    ))
}

/// DSISR bits (Power ISA Book III 6.5.3).
const DSISR_NOPTE: u64 = 0x4000_0000;
const DSISR_PROT: u64 = 0x0800_0000;
const DSISR_STORE: u64 = 0x0200_0000;
/// SRR1 bit of an instruction storage interrupt for a no-execute page (Book III 6.5.4).
const SRR1_NOEXEC_GUARD: u64 = 0x1000_0000;

fn hc(op: u64, a: &[u64]) -> Op {
    let mut args = [0u64; 8];
    args[..a.len()].copy_from_slice(a);
    Op::Hcall(op, args)
}

fn pflags(pp: u8, no_execute: bool) -> u64 {
    Protection { pp, no_execute, key: 0 }.h_protect_flags()
}

fn seg4k() -> Seg {
    Seg { ea: 0x1_0000_0000, vsid: 0x51_2345, ssize: SegmentSize::S256M, base_shift: 12 }
}

fn expect_status(what: &str, r: &[u64; 16], want: i64) -> Result<(), String> {
    if status(r) == want {
        Ok(())
    } else {
        Err(format!("{what}: status {} (want {want})", status(r)))
    }
}

fn expect_fault(what: &str, r: &[u64; 16], vec: u64, addr: u64, cause: u64) -> Result<(), String> {
    if r[res::FCOUNT] == 1 && r[res::FVEC] == vec && r[res::FADDR] == addr && r[res::FCAUSE] & cause == cause
    {
        Ok(())
    } else {
        Err(format!(
            "{what}: faults {} vector {:#x} address {:#x} cause {:#x} (want one {vec:#x} at {addr:#x} with {cause:#x})",
            r[res::FCOUNT],
            r[res::FVEC],
            r[res::FADDR],
            r[res::FCAUSE]
        ))
    }
}

fn no_fault(what: &str, r: &[u64; 16]) -> Result<(), String> {
    if r[res::FCOUNT] == 0 {
        Ok(())
    } else {
        Err(format!("{what}: fault {:#x} at {:#x} cause {:#x}", r[res::FVEC], r[res::FADDR], r[res::FCAUSE]))
    }
}

/// Enters `n` 4K pages of `seg` at `seg.ea + k * 4K` → guest-real `gpa(k)`; returns the slots.
fn enter_pages(
    p: &mut Partition,
    plat: &Platform,
    seg: &Seg,
    gpa: impl Fn(u64) -> u64,
    n: u64,
) -> Result<Vec<u64>, String> {
    let mut ops = vec![seg.slbmte(plat, 1)?];
    for k in 0..n {
        let (ptex, pteh, ptel) = hpte_for(p, seg, seg.ea + (k << 12), gpa(k), 12, 0b10)?;
        ops.push(enter(ptex, pteh, ptel));
    }
    let mut slots = Vec::new();
    for chunk in ops.chunks(60) {
        let r = p.run(chunk)?;
        for (i, rr) in r.iter().enumerate() {
            if matches!(chunk[i], Op::Hcall(H_ENTER, _)) {
                expect_status("H_ENTER", rr, 0)?;
                slots.push(rr[1]);
            }
        }
    }
    Ok(slots)
}

/// The guest runs code through its own HPTE with MSR[IR] = 1; H_PROTECT with N
/// then makes the fetch fault into the guest's ISI handler.
fn exec(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = Seg { ea: 0x2_0000_0000, vsid: 0x77_0001, ssize: SegmentSize::S256M, base_shift: 12 };
    let slots = enter_pages(&mut p, env.plat, &seg, |_| EXEC_STUB, 1)?;
    let r =
        p.run(&[Op::Exec(seg.ea), hc(H_PROTECT, &[pflags(0b10, true), slots[0], 0]), Op::Exec(seg.ea)])?;
    no_fault("exec", &r[0])?;
    if r[0][0] != EXEC_MAGIC {
        return Err(format!("the code at {:#x} left {:#x}", seg.ea, r[0][0]));
    }
    expect_status("H_PROTECT N", &r[1], 0)?;
    if r[2][res::FVEC] != 0x400 || r[2][res::FADDR] != seg.ea || r[2][res::FCAUSE] & SRR1_NOEXEC_GUARD == 0 {
        return Err(format!(
            "no-execute fetch: vector {:#x} srr0 {:#x} srr1 {:#x}",
            r[2][res::FVEC],
            r[2][res::FADDR],
            r[2][res::FCAUSE]
        ));
    }
    Ok(format!(
        "fetch at {:#x} (IR=1) ran guest-real {EXEC_STUB:#x} (host {:#x}); after H_PROTECT N: ISI 0x400 at {:#x} srr1 {:#x} in the guest",
        seg.ea,
        p.base + EXEC_STUB,
        r[2][res::FADDR],
        r[2][res::FCAUSE]
    ))
}

/// H_PROTECT to read-only: the guest's store faults (DSI 0x300, protection) into
/// its own handler, the load still works; back to read-write, the store lands;
/// H_REMOVE: the load faults (no PTE), a second H_REMOVE is H_NOT_FOUND.
fn protect_remove(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let gpa = SLOT0_BYTES + 0x5000;
    let ea = seg.ea;
    let slots = enter_pages(&mut p, env.plat, &seg, |_| gpa, 1)?;
    let s = slots[0];
    let r = p.run(&[
        Op::Store(ea, 0x1111),
        hc(H_PROTECT, &[pflags(0b11, false), s, 0]),
        Op::Store(ea, 0x2222),
        Op::Load(ea),
    ])?;
    no_fault("first store", &r[0])?;
    expect_status("H_PROTECT ro", &r[1], 0)?;
    expect_fault("store to read-only", &r[2], 0x300, ea, DSISR_PROT | DSISR_STORE)?;
    no_fault("load from read-only", &r[3])?;
    if r[3][0] != 0x1111 || p.read(gpa) != Some(0x1111) {
        return Err(format!("read-only page changed: guest read {:#x}, host {:?}", r[3][0], p.read(gpa)));
    }
    let ro_dsisr = r[2][res::FCAUSE];
    let r = p.run(&[
        hc(H_PROTECT, &[pflags(0b10, false), s, 0]),
        Op::Store(ea, 0x3333),
        hc(H_REMOVE, &[0, s, 0]),
        Op::Load(ea),
        hc(H_REMOVE, &[0, s, 0]),
    ])?;
    expect_status("H_PROTECT rw", &r[0], 0)?;
    no_fault("store after rw", &r[1])?;
    if p.read(gpa) != Some(0x3333) {
        return Err(format!("store after H_PROTECT rw: host holds {:?}", p.read(gpa)));
    }
    expect_status("H_REMOVE", &r[2], 0)?;
    if r[2][2] & HPTE_R_C == 0 || r[2][2] & HPTE_R_RPN != gpa {
        return Err(format!("H_REMOVE returned r {:#x}: want C and guest RPN {gpa:#x}", r[2][2]));
    }
    expect_fault("load after H_REMOVE", &r[3], 0x300, ea, DSISR_NOPTE)?;
    expect_status("second H_REMOVE", &r[4], H_NOT_FOUND)?;
    Ok(format!(
        "read-only store: DSI 0x300 DSISR {ro_dsisr:#x} in the guest, load read 0x1111; rw store landed; H_REMOVE gave back R/C {:#x}, then load: DSI DSISR {:#x}; second H_REMOVE {}; {} tlb flushes",
        r[2][2] & (HPTE_R_R | HPTE_R_C),
        r[3][res::FCAUSE],
        status(&r[4]),
        p.tlb.flushes
    ))
}

/// H_CLEAR_MOD / H_CLEAR_REF clear C / R and flush, so the CPU sets them again on
/// the next store / load; H_BULK_REMOVE removes four entries and the loads fault.
fn clear_bulk(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let gpa = |k: u64| SLOT0_BYTES + 0x10_0000 + (k << 12);
    let slots = enter_pages(&mut p, env.plat, &seg, gpa, 4)?;
    let ea = |k: u64| seg.ea + (k << 12);
    let mut ops: Vec<Op> = (0..4).map(|k| Op::Store(ea(k), k)).collect();
    ops.extend([
        hc(H_CLEAR_MOD, &[0, slots[0]]),
        hc(H_READ, &[0, slots[0]]),
        Op::Store(ea(0), 0x44),
        hc(H_READ, &[0, slots[0]]),
        hc(H_CLEAR_REF, &[0, slots[1]]),
        hc(H_READ, &[0, slots[1]]),
        Op::Load(ea(1)),
        hc(H_READ, &[0, slots[1]]),
    ]);
    let r = p.run(&ops)?;
    let (cm, rd0, rd0b, cr, rd1, rd1b) = (&r[4], &r[5], &r[7], &r[8], &r[9], &r[11]);
    if status(cm) != 0 || cm[1] & HPTE_R_C == 0 || rd0[2] & HPTE_R_C != 0 || rd0b[2] & HPTE_R_C == 0 {
        return Err(format!(
            "H_CLEAR_MOD: status {} old r {:#x}, after {:#x}, after a store {:#x}",
            status(cm),
            cm[1],
            rd0[2],
            rd0b[2]
        ));
    }
    if status(cr) != 0 || cr[1] & HPTE_R_R == 0 || rd1[2] & HPTE_R_R != 0 || rd1b[2] & HPTE_R_R == 0 {
        return Err(format!(
            "H_CLEAR_REF: status {} old r {:#x}, after {:#x}, after a load {:#x}",
            status(cr),
            cr[1],
            rd1[2],
            rd1b[2]
        ));
    }
    let req = |k: usize| BULK_REQUEST | slots[k];
    let r = p.run(&[
        hc(H_BULK_REMOVE, &[req(0), 0, req(1), 0, req(2), 0, req(3), 0]),
        hc(H_BULK_REMOVE, &[req(0), 0, BULK_END, 0]),
        Op::Load(ea(0)),
        Op::Load(ea(1)),
        Op::Load(ea(2)),
        Op::Load(ea(3)),
    ])?;
    expect_status("H_BULK_REMOVE", &r[0], 0)?;
    for k in 0..4 {
        let w = r[0][1 + 2 * k];
        if w & BULK_TYPE != BULK_RESPONSE || w & BULK_CODE != BULK_SUCCESS {
            return Err(format!("bulk response {k}: {w:#x}"));
        }
        expect_fault("load after bulk remove", &r[2 + k], 0x300, ea(k as u64), DSISR_NOPTE)?;
    }
    if r[1][1] & BULK_CODE != BULK_NOT_FOUND {
        return Err(format!("bulk remove of a removed entry: {:#x}", r[1][1]));
    }
    Ok(format!(
        "H_CLEAR_MOD took C ({:#x} -> {:#x}), the next store set it again ({:#x}); H_CLEAR_REF took R, the next load set it ({:#x}); H_BULK_REMOVE x4: responses {:#x} ..., 4 loads then DSI, re-remove answers not-found; {} tlb flushes",
        cm[1] & 0x180,
        rd0[2] & 0x180,
        rd0b[2] & 0x180,
        rd1b[2] & 0x180,
        r[0][1],
        p.tlb.flushes
    ))
}

/// Bad arguments get the PAPR codes; a full PTEG answers H_PTEG_FULL.
fn bad_args(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let (ptex, pteh, ptel) = hpte_for(&p, &seg, seg.ea, SLOT0_BYTES, 12, 0b10)?;
    let hptes = p.gh.table().len();
    let r = p.run(&[
        hc(H_ENTER, &[1, ptex, pteh, ptel]),
        hc(H_ENTER, &[0, hptes, pteh, ptel]),
        hc(H_ENTER, &[0, ptex, pteh, (ptel & !0x78) | 0x20]),
        hc(H_REMOVE, &[0, hptes, 0]),
        hc(H_READ, &[1, ptex]),
        hc(H_PROTECT, &[1 << 40, ptex, 0]),
        hc(H_CLEAR_REF, &[1, ptex]),
        hc(H_CLEAR_MOD, &[0, hptes]),
        hc(0x2f0, &[]),
        hc(H_REMOVE, &[0, ptex, 0]),
    ])?;
    let want = [
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_PARAMETER,
        H_FUNCTION,
        H_NOT_FOUND,
    ];
    for (i, w) in want.iter().enumerate() {
        expect_status(&format!("bad call {i}"), &r[i], *w)?;
    }
    // Nine virtual pages whose primary hash is the same group: VSIDs that differ
    // only above the PTEG mask, same page index.
    let mask = p.gh.table().geometry().pteg_mask();
    let mut ops = Vec::new();
    for k in 0..9u64 {
        let s = Seg { vsid: seg.vsid + k * (mask + 1), ..seg };
        let (x, h, l) = hpte_for(&p, &s, s.ea, SLOT0_BYTES + (k << 12), 12, 0b10)?;
        if x != ptex {
            return Err(format!("group {x:#x} != {ptex:#x}"));
        }
        ops.push(enter(x, h, l));
    }
    let s9 = Seg { vsid: seg.vsid + 9 * (mask + 1), ..seg };
    let (x, h, l) = hpte_for(&p, &s9, s9.ea, SLOT0_BYTES, 12, 0b10)?;
    ops.push(hc(H_ENTER, &[H_EXACT, x + 3, h, l]));
    let r = p.run(&ops)?;
    for (k, rr) in r.iter().take(8).enumerate() {
        expect_status(&format!("H_ENTER {k} into the group"), rr, 0)?;
    }
    expect_status("ninth H_ENTER", &r[8], H_PTEG_FULL)?;
    expect_status("H_EXACT on a used slot", &r[9], H_PTEG_FULL)?;
    Ok(format!(
        "10 bad calls answered {want:?}; PTEG {:#x}: 8 entered, the ninth H_PTEG_FULL ({}), H_EXACT on a used slot {}",
        ptex / 8,
        status(&r[8]),
        status(&r[9])
    ))
}

/// A mapping of guest-real memory outside the memslots is refused (H_PARAMETER)
/// and the address stays unreachable: the guest's load faults, the host memory
/// beyond the guest is untouched.
fn outside(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let canary_at = p.base + GUEST_BYTES;
    if !env.plat.is_free(canary_at, 4096, (0, 0)) {
        return Err(format!("no free RAM at {canary_at:#x} for the canary"));
    }
    let canary = 0xc0ff_ee00_dead_beef_u64;
    // SAFETY: free RAM just past guest memory (checked), used by nothing else.
    unsafe { core::ptr::write_volatile(canary_at as *mut u64, canary) };
    let targets = [GUEST_BYTES, GUEST_BYTES + 0x1000, 0x2000_0000, canary_at, 1 << 40];
    let mut ops = vec![seg.slbmte(env.plat, 1)?];
    for (k, &gpa) in targets.iter().enumerate() {
        let (x, h, l) = hpte_for(&p, &seg, seg.ea + ((k as u64) << 12), gpa, 12, 0b10)?;
        ops.push(enter(x, h, l));
        ops.push(Op::Store(seg.ea + ((k as u64) << 12), 0x0bad));
    }
    let r = p.run(&ops)?;
    for (k, gpa) in targets.iter().enumerate() {
        expect_status(&format!("H_ENTER of guest-real {gpa:#x}"), &r[1 + 2 * k], H_PARAMETER)?;
        expect_fault("store", &r[2 + 2 * k], 0x300, seg.ea + ((k as u64) << 12), DSISR_NOPTE)?;
    }
    // SAFETY: as above.
    let after = unsafe { core::ptr::read_volatile(canary_at as *const u64) };
    if after != canary {
        return Err(format!("host memory past the guest changed: {after:#x}"));
    }
    p.gh.check_invariants().map_err(|v| format!("GuestHpt invariant: {v:?}"))?;
    Ok(format!(
        "{} mappings outside the memslots (first {:#x}, host image {:#x}, 1T) refused H_PARAMETER, {} guest stores faulted (DSI no PTE), canary past the guest intact, table invariants hold",
        targets.len(),
        targets[0],
        targets[2],
        targets.len()
    ))
}

fn mix(k: u64, round: u64) -> u64 {
    let x = (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (round + 7).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

/// Dirty logging of slot 1 from the C bits the CPU sets, harvested by
/// mmu-generic's dirty-log driver through GuestHpt's reverse map while the
/// guest keeps running with its mappings: rounds of writes, a page written then
/// removed (its C folded), a page entered while logging.
fn dirty_log(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let n = 48u64;
    let gpa = |k: u64| SLOT0_BYTES + (k << 12) * 5;
    let slots = enter_pages(&mut p, env.plat, &seg, gpa, n)?;
    let ea = |k: u64| seg.ea + (k << 12);
    // Written before logging starts: not to be reported.
    let pre: Vec<Op> = (0..n).map(|k| Op::Store(ea(k), k)).collect();
    p.run(&pre)?;
    let slot = *p.gh.memslots().get(SlotId(1)).ok_or("slot 1")?;
    p.gh.queue_folded_dirty(true);
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&slot, Tracking::HardwareDirty, LogMode::Bitmap, &mut p.gh, &mut flush)
        .map_err(|e| format!("start: {e:?}"))?;
    flush.flush(&mut p.tlb);
    p.log = Some(log);
    let (mut written_total, mut reported_total, mut missed, mut spurious) = (0u64, 0u64, 0u64, 0u64);
    let late = n; // entered during logging, in round 1
    let rounds = 5u64;
    let mut bitmap = Vec::new();
    for round in 0..rounds {
        let mut ops = Vec::new();
        let mut want: Vec<u64> = (0..n).filter(|&k| mix(k, round).is_multiple_of(3)).map(gpa).collect();
        for &g in &want {
            let k = (g - SLOT0_BYTES) / (5 << 12);
            ops.push(Op::Store(ea(k), round << 32 | k));
        }
        if round == 1 {
            // Written, then removed by the guest: the C bit leaves the hardware.
            let k = (0..n).find(|&k| !mix(k, round).is_multiple_of(3)).unwrap_or(0);
            ops.push(Op::Store(ea(k), 0xdead));
            ops.push(hc(H_REMOVE, &[0, slots[k as usize], 0]));
            want.push(gpa(k));
            // Entered again (a new writable entry under logging), and the page
            // beyond the first n entered for the first time.
            let (x, h, l) = hpte_for(&p, &seg, ea(k), gpa(k), 12, 0b10)?;
            ops.push(enter(x, h, l));
            let (x, h, l) = hpte_for(&p, &seg, ea(late), gpa(late), 12, 0b10)?;
            ops.push(enter(x, h, l));
        }
        if round == 3 {
            ops.push(Op::Store(ea(late), 0x1a7e));
            want.push(gpa(late));
        }
        let r = p.run(&ops)?;
        if let Some(bad) = r.iter().find(|x| x[res::FCOUNT] != 0) {
            return Err(format!("round {round}: fault {:#x} at {:#x}", bad[res::FVEC], bad[res::FADDR]));
        }
        let mut log = p.log.take().ok_or("log")?;
        let f = log.get_and_clear(&mut p.gh, &mut bitmap).map_err(|e| format!("round {round}: {e:?}"))?;
        f.flush(&mut p.tlb);
        p.log = Some(log);
        let mut got = Vec::new();
        for (w, word) in bitmap.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    got.push(SLOT0_BYTES + (((w * 64 + b) as u64) << 12));
                }
            }
        }
        want.sort_unstable();
        missed += want.iter().filter(|g| !got.contains(g)).count() as u64;
        spurious += got.iter().filter(|g| !want.contains(g)).count() as u64;
        written_total += want.len() as u64;
        reported_total += got.len() as u64;
    }
    if missed != 0 || spurious != 0 {
        return Err(format!("{rounds} rounds: {written_total} pages written, {reported_total} reported, {missed} missed, {spurious} spurious"));
    }
    Ok(format!(
        "{rounds} rounds over {n}+1 mapped pages: {written_total} pages written, {reported_total} reported, 0 missed, 0 spurious (incl. a page written, H_REMOVEd ({} C bit folded) and entered again, and one first entered while logging); {} tlb flushes",
        p.gh.lost_dirty_pages(),
        p.tlb.flushes
    ))
}

/// Ageing from the R bits the CPU sets: mmu-generic's `age`/`test_age` through
/// GuestHpt's reverse map, page by page, between the guest's rounds of loads.
fn ageing(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    let seg = seg4k();
    let n = 48u64;
    let gpa = |k: u64| SLOT0_BYTES + (k << 12) * 3;
    enter_pages(&mut p, env.plat, &seg, gpa, n)?;
    let ea = |k: u64| seg.ea + (k << 12);
    let slots = p.gh.memslots().clone();
    let whole = HvaRange::from_len(Hva(p.base + SLOT0_BYTES), GUEST_BYTES - SLOT0_BYTES).ok_or("range")?;
    let young_pages = |p: &Partition| -> Vec<u64> {
        (0..n)
            .filter(|&k| {
                let r = HvaRange::from_len(Hva(p.base + gpa(k)), 4096).expect("in range");
                test_age(&slots, &p.gh, r, NoAccessedBit::ReportOld).young
            })
            .collect()
    };
    // Every page touched once: the first pass must find them all young.
    let all: Vec<Op> = (0..n).map(|k| Op::Load(ea(k))).collect();
    p.run(&all)?;
    if young_pages(&p).len() as u64 != n {
        return Err(format!("{} of {n} loaded pages young", young_pages(&p).len()));
    }
    let mut flush = FlushToken::new();
    let first = age(&slots, &mut p.gh, whole, NoAccessedBit::ReportOld, &mut flush);
    flush.flush(&mut p.tlb);
    if first.young_leaves != n {
        return Err(format!("first age(): {} young leaves of {n}", first.young_leaves));
    }
    if !young_pages(&p).is_empty() {
        return Err(String::from("pages still young after age()"));
    }
    let (mut touched_total, mut missed, mut spurious, mut aged) = (0u64, 0u64, 0u64, 0u64);
    let rounds = 4u64;
    for round in 0..rounds {
        let want: Vec<u64> = (0..n).filter(|&k| mix(k, round + 10).is_multiple_of(4)).collect();
        let ops: Vec<Op> = want.iter().map(|&k| Op::Load(ea(k))).collect();
        let r = p.run(&ops)?;
        if let Some(bad) = r.iter().find(|x| x[res::FCOUNT] != 0) {
            return Err(format!("round {round}: fault {:#x} at {:#x}", bad[res::FVEC], bad[res::FADDR]));
        }
        let got = young_pages(&p);
        missed += want.iter().filter(|k| !got.contains(k)).count() as u64;
        spurious += got.iter().filter(|k| !want.contains(k)).count() as u64;
        touched_total += want.len() as u64;
        let mut flush = FlushToken::new();
        let rep = age(&slots, &mut p.gh, whole, NoAccessedBit::ReportOld, &mut flush);
        flush.flush(&mut p.tlb);
        aged += rep.young_leaves;
        if rep.young_leaves != want.len() as u64 {
            return Err(format!(
                "round {round}: age() found {} young leaves, the guest touched {}",
                rep.young_leaves,
                want.len()
            ));
        }
    }
    if missed != 0 || spurious != 0 {
        return Err(format!(
            "{rounds} rounds: {touched_total} pages touched, {missed} missed, {spurious} spurious"
        ));
    }
    Ok(format!(
        "first pass aged {} young leaves; {rounds} rounds of guest loads: {touched_total} pages touched, test_age found each (0 missed, 0 spurious), age() cleared {aged}; {} tlb flushes",
        first.young_leaves,
        p.tlb.flushes
    ))
}

/// A guest that never exits is ended by the hypervisor decrementer (0x980),
/// the watchdog of every guest entry, and reported with where it was.
fn watchdog(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    p.watchdog = 1 << 24;
    let t0 = crate::spr::timebase();
    match p.run(&[Op::Spin]) {
        Ok(_) => Err(String::from("a spinning guest exited")),
        Err(e) if e.starts_with("guest watchdog") && p.vcpu.hsrr1 & (1 << 60) == 0 => Ok(format!(
            "spinning guest ended by HDEC after {} ticks (set {}), at guest-real {:#x} with HV = 0",
            crate::spr::timebase() - t0,
            p.watchdog,
            p.vcpu.hsrr0
        )),
        Err(e) => Err(e),
    }
}

/// With LPCR[VPM1] the guest's virtual-mode storage interrupts come to the
/// hypervisor (HDSI, 0xE00). An MMU-notifier invalidation (mmu-generic's
/// `zap_hva_range` through GuestHpt) leaves entries absent; the guest's next
/// access is an HDSI that `GuestHpt::fault_in` answers, invisible to the guest;
/// a fault of the guest's own (no entry, a read-only page) is delivered to its 0x300.
fn invalidate(env: &Env) -> Outcome {
    let mut p = env.partition()?;
    p.set_vpm1(true);
    let seg = seg4k();
    let n = 8u64;
    let gpa = |k: u64| SLOT0_BYTES + 0x20_0000 + (k << 12);
    let ea = |k: u64| seg.ea + (k << 12);
    let slots = enter_pages(&mut p, env.plat, &seg, gpa, n)?;
    let stores: Vec<Op> = (0..n).map(|k| Op::Store(ea(k), 0x1000 + k)).collect();
    let r = p.run(&stores)?;
    if let Some(bad) = r.iter().find(|x| x[res::FCOUNT] != 0) {
        return Err(format!("store fault {:#x} at {:#x}", bad[res::FVEC], bad[res::FADDR]));
    }
    let range = HvaRange::from_len(Hva(p.base + gpa(2)), 4 << 12).ok_or("range")?;
    let gslots = p.gh.memslots().clone();
    let mut flush = FlushToken::new();
    let zapped = zap_hva_range(&gslots, &mut p.gh, range, &mut flush, |_, _| {});
    flush.flush(&mut p.tlb);
    let absent = slots.iter().filter(|&&s| p.gh.is_absent(s)).count();
    if zapped != 4 || absent != 4 {
        return Err(format!("zap of 4 pages: {zapped} leaves zapped, {absent} entries absent"));
    }
    let mut ops: Vec<Op> = (0..n).map(|k| Op::Load(ea(k))).collect();
    let unmapped = seg.ea + (64 << 12);
    ops.extend([
        hc(H_READ, &[0, slots[3]]),
        Op::Load(unmapped),
        hc(H_PROTECT, &[pflags(0b11, false), slots[0], 0]),
        Op::Store(ea(0), 9),
    ]);
    let r = p.run(&ops)?;
    for (k, rr) in r.iter().enumerate().take(n as usize) {
        no_fault("load", rr)?;
        if rr[0] != 0x1000 + k as u64 {
            return Err(format!("page {k} read {:#x}", rr[0]));
        }
    }
    let nu = n as usize;
    if r[nu][1] & HPTE_V_VALID == 0 {
        return Err(format!("H_READ of a faulted-in entry: v {:#x}", r[nu][1]));
    }
    expect_fault("load of an unmapped address", &r[nu + 1], 0x300, unmapped, DSISR_NOPTE)?;
    expect_fault("store to read-only", &r[nu + 3], 0x300, ea(0), DSISR_PROT | DSISR_STORE)?;
    if p.fault_ins != 4 || p.reflected != 2 {
        return Err(format!(
            "{} fault_in (want 4), {} delivered to the guest (want 2)",
            p.fault_ins, p.reflected
        ));
    }
    p.gh.check_invariants().map_err(|v| format!("GuestHpt invariant: {v:?}"))?;
    Ok(format!(
        "zap of 4 of {n} pages left 4 entries absent; the guest's reads took {} HDSIs answered by fault_in (the guest saw 0 faults, read every value); {} own faults (no PTE, read-only) delivered by the hypervisor to the guest's 0x300; invariants hold",
        p.fault_ins,
        p.reflected
    ))
}
