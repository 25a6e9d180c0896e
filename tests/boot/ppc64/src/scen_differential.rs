//! Differential test of the hypercall surface: one random sequence of H_ENTER, H_REMOVE,
//! H_PROTECT, H_READ(_4) and H_BULK_REMOVE goes both to QEMU's implementation (by `sc 1`)
//! and to `arch_ppc_book3s::guest::GuestHpt` (the crate's handlers over its in-memory,
//! big-endian table, here on a big-endian CPU), over the same PTEG indices; every status,
//! return register and, at the end, every slot of the groups used must agree.
//!
//! Known, documented differences are normalised before comparing: QEMU sets bit 0x40 of
//! dword 0 in every slot it writes (DESIGN.md section 8); the crate refuses a second
//! translation of one virtual page in a PTEG pair, which the sequence never attempts.

use crate::env::Env;
use crate::hcall::{hcall, H_BULK_REMOVE, H_ENTER, H_PROTECT, H_READ, H_REMOVE};
use crate::report::scenario;
use crate::suite::Rng;
use alloc::vec::Vec;
use arch_ppc_book3s::guest::{GuestConfig, GuestHpt, HvaIdentity, WimgPolicy};
use arch_ppc_book3s::hash::{HptGeometry, SegmentSize, VirtAddr};
use arch_ppc_book3s::hpte::{HpteFormat, HPTE_R_M, HPTE_V_SECONDARY, HPTE_V_VALID};
use arch_ppc_book3s::pagesize::PageSizes;
use arch_ppc_book3s::papr::{HcallReturn, H_ANDCOND, H_AVPN, H_EXACT, H_READ_4};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::{FlushToken, NoTlb};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

const KEYS: usize = 24;
const OPS: u32 = 600;

fn norm_v(v: u64) -> u64 {
    v & !0x40
}

/// Picks a group whose 8 slots and whose secondary's 8 slots are free in QEMU's table.
fn free_pair(mask: u64, start: u64) -> u64 {
    let free = |g: u64| {
        [g * 8, g * 8 + 4].iter().all(|&p| {
            let r = hcall(H_READ, &[H_READ_4, p]);
            r.status == 0 && (0..4).all(|i| r.ret[2 * i] & HPTE_V_VALID == 0)
        })
    };
    let mut g = start & mask;
    while !(free(g) && free(!g & mask)) {
        g = (g + 0x33) & mask;
    }
    g
}

/// Runs the sequence; one scenario line.
pub fn differential(env: &mut Env, sizes: &PageSizes, format: HpteFormat) {
    let mask = env.hash_mask;
    let Some(geometry) = HptGeometry::from_pft_size(env.plat.pft_shift) else {
        return scenario("papr-vs-guesthpt", false, format_args!("pft-size {} rejected", env.plat.pft_shift));
    };
    // The twin table must match QEMU's size (same PTEG indices): 16 bytes per HPTE plus
    // the crate's reverse-map entry. Skip, saying so, when that would not fit the heap.
    let need = geometry.hptes() * 48;
    if need > crate::env::layout::HEAP_SIZE / 2 {
        crate::kprintln!(
            "SKIP papr-vs-guesthpt: a twin of the 2^{}-byte table needs ~{} MiB of heap (run with -m 1G or less)",
            env.plat.pft_shift,
            need >> 20
        );
        return;
    }
    let pa = env.frames(12, KEYS as u64);
    let slot = Memslot::new(SlotId(0), Gfn(pa >> 12), KEYS as u64, Hva(pa), SlotFlags::empty());
    let mut b = MemslotsBuilder::new();
    let slots = match b.create(slot).and_then(|b| b.build()) {
        Ok(s) => s,
        Err(e) => return scenario("papr-vs-guesthpt", false, format_args!("memslots: {:?}", e)),
    };
    let config = GuestConfig { geometry, format, sizes: *sizes, wimg: WimgPolicy::RequireM };
    let mut guest = match GuestHpt::new(config, slots, HvaIdentity) {
        Ok(g) => g,
        Err(e) => return scenario("papr-vs-guesthpt", false, format_args!("GuestHpt::new: {:?}", e)),
    };

    // Keys: half hash to group ga, half to gb, so groups fill and H_PTEG_FULL happens.
    let ga = free_pair(mask, 0x2222);
    let mut gb = free_pair(mask, ga + 0x101);
    if gb == ga || gb == !ga & mask {
        gb = free_pair(mask, ga + 0x777);
    }
    let groups = [ga, gb, !ga & mask, !gb & mask];
    let vsid_base = env.vsid() << 12;
    let keys: Vec<(u64, u64)> = (0..KEYS)
        .map(|k| {
            let g = if k % 2 == 0 { ga } else { gb };
            let vsid = (vsid_base & !0xffff_ffff) | ((g >> 16) << 16) | (0x400 + k as u64);
            let pidx = (g ^ vsid) & 0xffff;
            let va = VirtAddr::new(vsid, SegmentSize::S256M, pidx << 12).expect("VSID fits 256M segments");
            debug_assert_eq!(va.hash(12) & mask, g);
            let v = va.avpn_v(12) | HPTE_V_VALID;
            (v, (pa + ((k as u64) << 12)) | HPTE_R_M | 2)
        })
        .collect();
    let group_of = |k: usize, secondary: bool| {
        let g = if k.is_multiple_of(2) { ga } else { gb };
        if secondary {
            !g & mask
        } else {
            g
        }
    };

    let mut entered: [Option<u64>; KEYS] = [None; KEYS];
    let mut rng = Rng(0x0bad_5eed_1234_5678);
    let rand = |rng: &mut Rng, n: u64| rng.below(n);
    let (mut mismatches, mut full, mut not_found, mut ok_ops) = (0u32, 0u32, 0u32, 0u32);
    let mut counts = [0u32; 5];
    let mut first_bad: Option<(u32, u64, i64, i64)> = None;
    let mut flush = FlushToken::new();
    let both = |op: u64,
                args: &[u64],
                guest: &mut GuestHpt<HvaIdentity>,
                flush: &mut FlushToken|
     -> (HcallReturn, HcallReturn) {
        let q = hcall(op, args);
        let g = guest.hcall(op, args, flush);
        (HcallReturn { status: q.status, ret: q.ret }, g)
    };
    for n in 0..OPS {
        let kind = rand(&mut rng, 10);
        let slot_any = |rng: &mut Rng| groups[rand(rng, 4) as usize] * 8 + rand(rng, 8);
        let (op, args): (u64, Vec<u64>) = match kind {
            0..=3 => {
                let k = rand(&mut rng, KEYS as u64) as usize;
                if entered[k].is_some() {
                    continue;
                }
                let sec = rand(&mut rng, 4) == 0;
                let exact = rand(&mut rng, 4) == 0;
                let g = group_of(k, sec);
                let (v, r) = keys[k];
                let v = if sec { v | HPTE_V_SECONDARY } else { v };
                let ptex = g * 8 + if exact { rand(&mut rng, 8) } else { 0 };
                (H_ENTER, alloc::vec![if exact { H_EXACT } else { 0 }, ptex, v, r])
            }
            4 | 5 => {
                let ptex = slot_any(&mut rng);
                let (flags, arg) = match rand(&mut rng, 4) {
                    0 => (0, 0),
                    1 => (H_AVPN, keys[rand(&mut rng, KEYS as u64) as usize].0 & !0x7f),
                    2 => (H_AVPN, guest.guest_view(ptex).v & !0x7f),
                    _ => (H_ANDCOND, [0, HPTE_V_SECONDARY, 0x1][rand(&mut rng, 3) as usize]),
                };
                (H_REMOVE, alloc::vec![flags, ptex, arg])
            }
            6 => {
                let ptex = slot_any(&mut rng);
                let pp = [1u64, 2, 3, 2 | 4][rand(&mut rng, 4) as usize];
                let (flags, avpn) =
                    if rand(&mut rng, 2) == 0 { (H_AVPN, guest.guest_view(ptex).v & !0x7f) } else { (0, 0) };
                (H_PROTECT, alloc::vec![flags | pp, ptex, avpn])
            }
            7 | 8 => {
                let ptex = slot_any(&mut rng);
                (
                    H_READ,
                    alloc::vec![
                        if rand(&mut rng, 2) == 0 { H_READ_4 } else { 0 },
                        if rand(&mut rng, 2) == 0 { ptex & !3 } else { ptex }
                    ],
                )
            }
            _ => {
                let nreq = 1 + rand(&mut rng, 4) as usize;
                let mut a = alloc::vec![0u64; 8];
                for i in 0..4 {
                    if i < nreq {
                        let ptex = slot_any(&mut rng);
                        let avpn = guest.guest_view(ptex).v & !0x7f;
                        let (fl, arg) =
                            if rand(&mut rng, 2) == 0 { (0x0200_0000_0000_0000u64, avpn) } else { (0, 0) };
                        a[2 * i] = 0x4000_0000_0000_0000 | fl | ptex;
                        a[2 * i + 1] = arg;
                    } else {
                        a[2 * i] = 0xc000_0000_0000_0000;
                    }
                }
                (H_BULK_REMOVE, a)
            }
        };
        let (q, g) = both(op, &args, &mut guest, &mut flush);
        let idx = match op {
            H_ENTER => 0,
            H_REMOVE => 1,
            H_PROTECT => 2,
            H_READ => 3,
            _ => 4,
        };
        counts[idx] += 1;
        let same = q.status == g.status
            && match op {
                H_ENTER => q.status != 0 || q.ret[0] == g.ret[0],
                H_REMOVE => q.status != 0 || (norm_v(q.ret[0]) == norm_v(g.ret[0]) && q.ret[1] == g.ret[1]),
                H_READ => (0..if args[0] & H_READ_4 != 0 { 4 } else { 1 }).all(|i| {
                    norm_v(q.ret[2 * i]) == norm_v(g.ret[2 * i]) && q.ret[2 * i + 1] == g.ret[2 * i + 1]
                }),
                H_BULK_REMOVE => (0..4)
                    .all(|i| q.ret[2 * i] & !0x0c0c_0000_0000_0000 == g.ret[2 * i] & !0x0c0c_0000_0000_0000),
                _ => true,
            };
        if !same {
            mismatches += 1;
            if first_bad.is_none() {
                first_bad = Some((n, op, q.status, g.status));
                crate::kprintln!(
                    "  mismatch at op {}: op {:#x} args {:x?}: qemu {} {:x?} / guesthpt {} {:x?}",
                    n,
                    op,
                    args,
                    q.status,
                    q.ret,
                    g.status,
                    g.ret
                );
            }
        } else {
            ok_ops += 1;
        }
        match q.status {
            -6 => full += 1,
            -7 => not_found += 1,
            _ => {}
        }
        // Track what is entered where (from QEMU's answers; they agree or we counted it).
        if q.status == 0 {
            match op {
                H_ENTER => {
                    let k = keys.iter().position(|&(v, _)| v == args[2] & !HPTE_V_SECONDARY).unwrap_or(0);
                    entered[k] = Some(q.ret[0]);
                }
                H_REMOVE => entered.iter_mut().for_each(|e| {
                    if *e == Some(args[1]) {
                        *e = None
                    }
                }),
                H_BULK_REMOVE => {
                    for i in 0..4 {
                        if q.ret[2 * i] >> 62 == 2 && (q.ret[2 * i] >> 60) & 3 == 0 {
                            let p = args[2 * i] & 0x00ff_ffff_ffff_ffff;
                            entered.iter_mut().for_each(|e| {
                                if *e == Some(p) {
                                    *e = None
                                }
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // GuestHpt's table lives in this kernel's memory and no CPU walks it here, so
    // the flushes its hypercalls recorded have no TLB to reach.
    flush.flush(&mut NoTlb);
    // Final state of every slot of the four groups, then clean both tables.
    let mut slot_diffs = 0;
    for &g in &groups {
        for p in g * 8..g * 8 + 8 {
            let q = hcall(H_READ, &[0, p]);
            let gv = guest.guest_view(p);
            if norm_v(q.ret[0]) & 1 != gv.v & 1
                || (gv.valid() && (norm_v(q.ret[0]) != gv.v || q.ret[1] != gv.r))
            {
                slot_diffs += 1;
            }
            let _ = hcall(H_REMOVE, &[0, p, 0]);
        }
    }
    let invariants = guest.check_invariants();
    scenario(
        "papr-vs-guesthpt",
        mismatches == 0 && slot_diffs == 0 && invariants.is_ok(),
        format_args!(
            "{} ops ({} H_ENTER, {} H_REMOVE, {} H_PROTECT, {} H_READ, {} H_BULK_REMOVE) on groups {:#x}/{:#x} and secondaries: {} identical, {} differ; {} PTEG_FULL, {} NOT_FOUND; final slots differing {}; GuestHpt ({:?} table) invariants {}",
            counts.iter().sum::<u32>(),
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            counts[4],
            ga,
            gb,
            ok_ops,
            mismatches,
            full,
            not_found,
            slot_diffs,
            format,
            if invariants.is_ok() { "hold" } else { "BROKEN" }
        ),
    );
    let _ = first_bad;
}
