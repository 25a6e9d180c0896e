//! Translation scenarios: ranges of RAM mapped with each listed page size in 256 MB and
//! 1 TB segments, every access checked against the real memory behind it, and R/C read
//! back; one real page aliased at two effective addresses.

use crate::env::{in_real_mode, Env};
use crate::hpt::{self, PageSize, Vpage};
use crate::report::scenario;
use crate::trap::{probe_load, probe_store};
use alloc::vec::Vec;
use arch_ppc_book3s::hash::SegmentSize;
use arch_ppc_book3s::papr::RemoveCond;
use arch_ppc_book3s::table::HashTable;
use core::ptr::{read_volatile, write_volatile};

const SIG_REAL: u64 = 0x5eed_0000_0000_0000;
const SIG_EA: u64 = 0xa11a_0000_0000_0000;

fn offsets(size: u64) -> [u64; 4] {
    [0, 8, size / 2, size - 8]
}

/// Removes entered (slot, v) pairs with the AVPN check; returns how many failed.
pub fn remove_all(env: &mut Env, entries: &[(u64, u64)]) -> u64 {
    entries
        .iter()
        .filter(|&&(slot, v)| env.table.remove(slot, RemoveCond::Avpn(hpt::avpn_arg(v))).is_err())
        .count() as u64
}

/// Maps, checks every access both ways, reads R/C, unmaps.
pub fn translate(env: &mut Env, name: &str, ea: u64, ssize: SegmentSize, ps: PageSize, n: u64) {
    let size = ps.bytes();
    let vsid = env.vsid();
    let pa = env.frames(ps.shift, n);
    // Real memory first: each checked dword holds its own real address.
    in_real_mode(|| {
        for i in 0..n {
            for off in offsets(size) {
                let ra = pa + i * size + off;
                // SAFETY: pool frames belong to this scenario; relocation is off.
                unsafe { write_volatile(ra as *mut u64, SIG_REAL ^ ra) };
            }
        }
    });
    let entries = match env.enter_range(Vpage { vsid, ssize, ea, ps }, pa, n, hpt::PP_RW) {
        Ok(e) => e,
        Err(e) => return scenario(name, false, format_args!("H_ENTER failed: {}", e)),
    };
    env.load_segment(ea, vsid, ssize, ps.base_shift);
    let (mut reads_ok, mut reads) = (0u64, 0u64);
    for i in 0..n {
        for off in offsets(size) {
            reads += 1;
            if probe_load(ea + i * size + off, 0) == SIG_REAL ^ (pa + i * size + off) {
                reads_ok += 1;
            }
            probe_store(ea + i * size + off, SIG_EA ^ (ea + i * size + off));
        }
    }
    let writes_ok = in_real_mode(|| {
        let mut ok = 0u64;
        for i in 0..n {
            for off in offsets(size) {
                let ra = pa + i * size + off;
                // SAFETY: as above.
                if unsafe { read_volatile(ra as *const u64) } == SIG_EA ^ (ea + i * size + off) {
                    ok += 1;
                }
            }
        }
        ok
    });
    let rc = entries
        .iter()
        .filter(|&&(slot, _)| env.table.read(slot).is_ok_and(|h| h.referenced() && h.changed()))
        .count() as u64;
    let failed = remove_all(env, &entries);
    env.unload_segment(ea, ssize);
    env.reset_slb();
    scenario(
        name,
        reads_ok == reads && writes_ok == reads && rc == n && failed == 0,
        format_args!(
            "{} x {}K pages at ea {:#x} -> ra {:#x}: reads {}/{}, writes landed {}/{}, R+C set {}/{}, removed {}/{}",
            n,
            size >> 10,
            ea,
            pa,
            reads_ok,
            reads,
            writes_ok,
            reads,
            rc,
            n,
            n - failed,
            n
        ),
    );
}

/// One real page at two effective addresses (a 256 MB and a 1 TB segment): stores through
/// one are seen through the other; R/C land on the HPTE actually used.
pub fn alias(env: &mut Env) {
    let ps = env.ps4k;
    let ea1 = 0x3000_0000u64;
    let ea2 = 0x0300_0000_0000u64;
    let pa = env.frames(12, 1);
    let mut entries = Vec::new();
    for (ea, ssize) in [(ea1, SegmentSize::S256M), (ea2, SegmentSize::S1T)] {
        let vsid = env.vsid();
        match env.enter_range(Vpage { vsid, ssize, ea, ps }, pa, 1, hpt::PP_RW) {
            Ok(e) => entries.extend(e),
            Err(e) => return scenario("alias", false, format_args!("H_ENTER failed: {}", e)),
        }
        env.load_segment(ea, vsid, ssize, ps.base_shift);
    }
    let mut ok = 0;
    let total = 2 * 512;
    for i in 0..512u64 {
        probe_store(ea1 + i * 8, 0xa1 << 56 | i);
    }
    for i in 0..512u64 {
        if probe_load(ea2 + i * 8, 0) == 0xa1 << 56 | i {
            ok += 1;
        }
    }
    let rc = |env: &mut Env, k: usize| env.table.read(entries[k].0).map_or(u64::MAX, |h| h.r & 0x180);
    let (rc1, rc2) = (rc(env, 0), rc(env, 1));
    for i in 0..512u64 {
        if probe_load(ea1 + i * 8, 0) == 0xa1 << 56 | i {
            ok += 1;
        }
    }
    let failed = remove_all(env, &entries);
    env.unload_segment(ea1, SegmentSize::S256M);
    env.unload_segment(ea2, SegmentSize::S1T);
    env.reset_slb();
    scenario(
        "alias",
        ok == total && rc1 == 0x180 && rc2 == 0x100 && failed == 0,
        format_args!(
            "ra {:#x} at ea {:#x} (256M) and {:#x} (1T): {}/{} accesses agree, R|C writer {:#x} reader {:#x}, removed {}/2",
            pa,
            ea1,
            ea2,
            ok,
            total,
            rc1,
            rc2,
            2 - failed
        ),
    );
}
