//! The scenarios: each builds a fresh partition, has the guest act, and checks
//! what the CPU did against what `GuestHpt` promises. One PASS/FAIL line each,
//! with its figures.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use arch_ppc_book3s::hash::{SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HPTE_R_C, HPTE_R_M, HPTE_R_R, HPTE_R_RPN, HPTE_V_VALID};
use arch_ppc_book3s::papr::{H_ENTER, H_READ};
use arch_ppc_book3s::slb::{SlbEntry, SlbFlags};

use crate::guest::{res, Op};
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
