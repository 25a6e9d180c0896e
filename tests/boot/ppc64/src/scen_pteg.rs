//! A full PTEG: eight entries whose primary hash lands in one group fill it, the ninth
//! H_ENTER answers H_PTEG_FULL (so does H_EXACT on an occupied slot), and the crate's
//! `mapping::insert` puts the entry in the secondary group (one's complement of the
//! hash, H set), where the MMU finds it.

use crate::env::Env;
use crate::hpt::{self, Vpage};
use crate::report::scenario;
use crate::trap::{probe_load, probe_store};
use alloc::vec::Vec;
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::mapping::insert;
use arch_ppc_book3s::papr::{HptError, RemoveCond};
use arch_ppc_book3s::table::HashTable;

fn group_free(env: &mut Env, g: u64) -> usize {
    [g * 8, g * 8 + 4]
        .iter()
        .map(|&p| env.table.read4(p).map_or(0, |e| e.iter().filter(|h| !h.valid()).count()))
        .sum()
}

/// Fill a group, overflow into the secondary one, and access all nine pages.
pub fn pteg_full(env: &mut Env) {
    let ps = env.ps4k;
    let mask = env.hash_mask;
    // Nine segments (ESIDs 0x10..0x18), VSIDs chosen so that the page index
    // p_i = (g ^ vsid_i) & 0xffff puts every primary hash in group g.
    let vsid_base = env.vsid() << 8;
    let mut g = 0x1234 & mask;
    while group_free(env, g) != 8 || group_free(env, !g & mask) == 0 {
        g = (g + 0x101) & mask;
    }
    let pa = env.frames(12, 9);
    let mut entries = Vec::new(); // (ea, vsid, slot, v)
    let (mut full, mut exact_full, mut secondary_slot) = (None, None, None);
    for i in 0..9u64 {
        let vsid = (vsid_base & !0xffff) | ((g >> 16) << 16) | (0x100 + i);
        let ea = ((0x10 + i) << 28) | (((g ^ vsid) & 0xffff) << 12);
        let vp = Vpage { vsid, ssize: SegmentSize::S256M, ea, ps };
        assert_eq!(vp.group(mask, false), g, "constructed hash");
        let h = vp.hpte(&env.sizes, pa + (i << 12), hpt::PP_RW, false).expect("4K listed");
        if i < 8 {
            match env.table.enter(g * 8, h, false) {
                Ok(slot) => entries.push((ea, vsid, slot, h.v)),
                Err(e) => {
                    return scenario(
                        "pteg-full",
                        false,
                        format_args!("H_ENTER {} into group {:#x}: {}", i, g, e),
                    )
                }
            }
            continue;
        }
        // The ninth: the platform's answers first, then the crate's fallback.
        full = env.table.enter(g * 8, h, false).err();
        exact_full = env.table.enter(g * 8 + 3, h, true).err();
        match insert(&mut env.table, &vp.page(), &env.sizes, pa + (i << 12), hpt::PP_RW) {
            Ok(ins) if ins.secondary => {
                secondary_slot = Some(ins.slot);
                entries.push((ea, vsid, ins.slot, ins.hpte.v));
            }
            Ok(ins) => entries.push((ea, vsid, ins.slot, ins.hpte.v)),
            Err(e) => return scenario("pteg-full", false, format_args!("mapping::insert: {}", e)),
        }
    }
    let mut accessed = 0;
    for (i, &(ea, vsid, _, _)) in entries.iter().enumerate() {
        env.load_segment(ea, vsid, SegmentSize::S256M, ps.base_shift);
        probe_store(ea, 0x9e9 << 20 | i as u64);
        if probe_load(ea, 0) == 0x9e9 << 20 | i as u64 {
            accessed += 1;
        }
    }
    let last_rc = entries.last().and_then(|e| env.table.read(e.2).ok()).map_or(0, |h| h.r & 0x180);
    let mut removed = 0;
    for &(ea, _, slot, v) in &entries {
        if env.table.remove(slot, RemoveCond::Avpn(hpt::avpn_arg(v))).is_ok() {
            removed += 1;
        }
        env.unload_segment(ea, SegmentSize::S256M);
    }
    env.reset_slb();
    let sec_group = !g & mask;
    let ok = entries.len() == 9
        && full == Some(HptError::PtegFull)
        && exact_full == Some(HptError::PtegFull)
        && secondary_slot.is_some_and(|s| s / 8 == sec_group)
        && accessed == 9
        && last_rc == 0x180
        && removed == 9;
    scenario(
        "pteg-full",
        ok,
        format_args!(
            "group {:#x} filled with 8, 9th H_ENTER -> {} (H_EXACT on occupied -> {}), entered with H at slot {:#x} of secondary group {:#x}, {}/9 pages accessed, R|C {:#x}, removed {}/9",
            g,
            full.map_or(0, |e| e.status()),
            exact_full.map_or(0, |e| e.status()),
            secondary_slot.unwrap_or(u64::MAX),
            sec_group,
            accessed,
            last_rc,
            removed
        ),
    );
}
