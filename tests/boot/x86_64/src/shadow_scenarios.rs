//! The shadow-paging runs: nested paging off, the processor walks only tables built by
//! `arch_x86::shadow`, while the guest of [`crate::sguest`] runs processes in three
//! paging modes it switches to itself (32-bit with 4 KiB and 4 MiB pages, PAE, 4-level
//! long mode) and changes its own tables. Each scenario prints a PASS or FAIL line with
//! its figures.
//!
//! Guest-physical layout (4 MiB of RAM in three memslots): slot 0 = gfn 0x000-0x1ff
//! (code 0x1000, mailbox 0x4000, results 0x5000, fault log 0x6000, GDT/IDT 0x7000, stack
//! below 0x9000, the hypervisor's identity page directory 0xf000, kernel tables from
//! 0x10000), slot 1 = gfn 0x200-0x2ff (process A's data pages and, at its top, process
//! A's page tables), slot 2 = gfn 0x300-0x3ff (the same for process B). The kernel maps
//! 0-4 MiB one to one; each process maps its 64 data pages at linear 0x400000.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use arch_x86::format::PhysAddrWidth;
use arch_x86::frame::IdentityMemory;
use arch_x86::shadow::{CpuFeatures, GuestMode};
use mmu_generic::addr::{Gfn, Hva, HvaRange, Pfn};
use mmu_generic::age::{self, NoAccessedBit};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

use crate::frames::FramePool;
use crate::port::cpuid;
use crate::println;
use crate::scenarios::Tally;
use crate::sguest::*;
use crate::shadow_ram::ShadowRam;
use crate::shadow_vm::{fmt_faults, SRunError, ShadowTlb, ShadowVendor, ShadowVm, IDENT_PD, RAM_PAGES};

const P: u64 = 1;
const RW: u64 = 2;
const A: u64 = 0x20;
const D: u64 = 0x40;
const PS: u64 = 0x80;
const XD: u64 = 1 << 63;

/// Linear address of process page `i`.
const USER: u64 = 0x40_0000;
/// Data pages each process maps.
const USER_PAGES: u64 = 64;
/// Frame of process A's first data page (slot 1) and of B's (slot 2).
const A_DATA: u64 = 0x200;
const B_DATA: u64 = 0x300;
/// Linear address whose table lies outside every memslot in the bad-input scenario.
const OUTSIDE_GVA: u64 = 0x80_0000;
/// A guest-physical address beyond guest RAM.
const BEYOND_RAM: u64 = 0x0800_0000;
/// Shadow-table frames (4 MiB) and the most shadow pages kept.
const SHADOW_FRAMES: u64 = 1024;
const SHADOW_MAX_PAGES: usize = 900;

type Outcome = Result<String, String>;

/// Where one paging mode keeps its tables.
#[derive(Clone, Copy)]
struct Layout {
    name: &'static str,
    mode: GuestMode,
    /// Entry bytes.
    eb: u64,
    /// CR3 of processes A and B.
    cr3: [u64; 2],
    /// The page tables mapping the processes' data pages.
    pt: [u64; 2],
    /// The page directory of process A (the table holding the user PDE).
    pd_a: u64,
    /// Linear address of the large-page alias of gpa 0, and its size.
    alias: u64,
    alias_size: u64,
    /// Linear address at which the recursive entry shows process A's root table.
    self_map: u64,
    /// Root table of process A (what `self_map` shows).
    root_a: u64,
}

const L32: Layout = Layout {
    name: "32-bit",
    mode: GuestMode::Bits32,
    eb: 4,
    cr3: [0x12000, 0x13000],
    pt: [0x2ff000, 0x3ff000],
    pd_a: 0x12000,
    alias: 0x4000_0000,
    alias_size: 4 << 20,
    self_map: 0xffff_f000,
    root_a: 0x12000,
};
const LPAE: Layout = Layout {
    name: "PAE",
    mode: GuestMode::Pae,
    eb: 8,
    cr3: [0x14000, 0x18000],
    pt: [0x2fe000, 0x3fe000],
    pd_a: 0x15000,
    alias: 0x2000_0000,
    alias_size: 2 << 20,
    self_map: 0x3fff_f000,
    root_a: 0x15000,
};
const L4: Layout = Layout {
    name: "4-level",
    mode: GuestMode::Four,
    eb: 8,
    cr3: [0x1a000, 0x1d000],
    pt: [0x2fd000, 0x3fd000],
    pd_a: 0x1c000,
    alias: 0x2000_0000,
    alias_size: 2 << 20,
    self_map: 0xffff_ffff_ffff_f000,
    root_a: 0x1a000,
};

const L5: Layout = Layout {
    name: "5-level",
    mode: GuestMode::Five,
    eb: 8,
    cr3: [0x20000, 0x21000],
    pt: L4.pt,
    pd_a: L4.pd_a,
    alias: L4.alias,
    alias_size: L4.alias_size,
    self_map: 0xffff_ffff_ffff_f000,
    root_a: 0x20000,
};

/// Kernel tables shared by the processes: 32-bit PT0 (0-4 MiB) and PAE/4-level PTs.
const PT32_KERNEL: u64 = 0x11000;
const PTP0: u64 = 0x16000;
const PTP1: u64 = 0x17000;
/// The boot page directory (kernel only).
const PD_BOOT: u64 = 0x10000;

fn features() -> CpuFeatures {
    let bits = (cpuid(0x8000_0008, 0).0 & 0xff) as u8;
    CpuFeatures {
        phys_width: PhysAddrWidth::new(bits).unwrap_or(PhysAddrWidth::new(36).expect("36 is in range")),
        pse36: cpuid(1, 0).3 & (1 << 17) != 0,
        page_1g: cpuid(0x8000_0001, 0).3 & (1 << 26) != 0,
    }
}

/// One script: operations and fixes.
#[derive(Default)]
struct Script {
    ops: Vec<(u32, u64, u64, u64)>,
    fixes: Vec<(u64, u64, u64, u64)>,
}

impl Script {
    fn op(&mut self, op: u32, a: u64, b: u64, c: u64) -> usize {
        self.ops.push((op, a, b, c));
        self.ops.len() - 1
    }
    /// Stores a page-table entry of the layout's width.
    fn pte(&mut self, l: &Layout, addr: u64, value: u64) -> usize {
        self.op(if l.eb == 4 { OP_WRITE32 } else { OP_WRITE64 }, addr, value, 0)
    }
    fn fix(&mut self, page: u64, entry: u64, value: u64, eb: u64) {
        self.fixes.push((page & !0xfff, entry, value, eb));
    }
}

/// What a script left.
struct Ran {
    mismatches: u32,
    results: Vec<u64>,
    faults: Vec<(u64, u64)>,
}

fn run_script(vm: &mut ShadowVm<'_>, s: &Script) -> Result<Ran, SRunError> {
    if s.ops.len() > MAX_OPS || s.fixes.len() > MAX_FIXES {
        return Err(SRunError::ScriptTooLong(s.ops.len()));
    }
    let ram = vm.ram();
    ram.set(MAILBOX, 4, s.ops.len() as u64);
    ram.set(MAILBOX + 4, 4, s.fixes.len() as u64);
    for (i, &(op, a, b, c)) in s.ops.iter().enumerate() {
        let at = MAILBOX + OPS_OFF + 32 * i as u64;
        ram.set(at, 8, op as u64);
        ram.set(at + 8, 8, a);
        ram.set(at + 16, 8, b);
        ram.set(at + 24, 8, c);
    }
    for (i, &(page, entry, value, eb)) in s.fixes.iter().enumerate() {
        let at = MAILBOX + FIX_OFF + 32 * i as u64;
        ram.set(at, 8, page);
        ram.set(at + 8, 8, entry);
        ram.set(at + 16, 8, value);
        ram.set(at + 24, 8, eb);
    }
    ram.set(FAULT_LOG, 8, 0);
    // The mailbox and log are in slot 0, which is never logged: these writes need no mark.
    vm.after_mmu();
    let mismatches = vm.run()?;
    let ram = vm.ram();
    let results = (0..s.ops.len()).map(|i| ram.get(RESULTS + 8 * i as u64, 8)).collect();
    let n = ram.get(FAULT_LOG, 4).min(MAX_LOGGED);
    let faults =
        (0..n).map(|i| (ram.get(FAULT_LOG + 16 + 16 * i, 8), ram.get(FAULT_LOG + 24 + 16 * i, 8))).collect();
    Ok(Ran { mismatches, results, faults })
}

fn e(err: SRunError) -> String {
    format!("{err}")
}

/// The guest's own PTE for process `p`'s page `i`.
fn pte_addr(l: &Layout, p: usize, i: u64) -> u64 {
    l.pt[p] + l.eb * i
}

fn pte_value(gfn: u64) -> u64 {
    (gfn << 12) | P | RW
}

fn pattern(gfn: u64) -> u64 {
    0x5ead_0000 ^ (gfn * 0x9e37)
}

/// Writes the loader's tables for every mode (the guest starts on `PD_BOOT`).
fn write_tables(ram: &ShadowRam) {
    for p in 0..1024u64 {
        // Hypervisor identity map: 4 MiB pages, all accessed and dirty already.
        ram.set(IDENT_PD + 4 * p, 4, (p << 22) | P | RW | 0x4 | PS | A | D);
    }
    // 32-bit: kernel PT0 maps 0-4 MiB one to one.
    for i in 0..1024u64 {
        ram.set(PT32_KERNEL + 4 * i, 4, pte_value(i));
    }
    for pd in [PD_BOOT, L32.cr3[0], L32.cr3[1]] {
        ram.set(pd, 4, PT32_KERNEL | P | RW);
        ram.set(pd + 4 * 0x100, 4, P | RW | PS); // 4 MiB alias of gpa 0
    }
    // PAE / 4-level kernel PTs: 0-2 MiB and 2-4 MiB.
    for i in 0..512u64 {
        ram.set(PTP0 + 8 * i, 8, pte_value(i));
        ram.set(PTP1 + 8 * i, 8, pte_value(512 + i));
    }
    let pae_pds = [(LPAE.cr3[0], 0x15000), (LPAE.cr3[1], 0x19000)];
    for (k, &(pdpt, pd)) in pae_pds.iter().enumerate() {
        ram.set(pdpt, 8, pd | P);
        ram.set(pd, 8, PTP0 | P | RW);
        ram.set(pd + 8, 8, PTP1 | P | RW);
        ram.set(pd + 16, 8, LPAE.pt[k] | P | RW);
        ram.set(pd + 8 * 0x100, 8, P | RW | PS);
    }
    let l4 = [(L4.cr3[0], 0x1b000, 0x1c000), (L4.cr3[1], 0x1e000, 0x1f000)];
    for (k, &(pml4, pdpt, pd)) in l4.iter().enumerate() {
        ram.set(pml4, 8, pdpt | P | RW);
        ram.set(pdpt, 8, pd | P | RW);
        ram.set(pd, 8, PTP0 | P | RW);
        ram.set(pd + 8, 8, PTP1 | P | RW);
        ram.set(pd + 16, 8, L4.pt[k] | P | RW);
        ram.set(pd + 8 * 0x100, 8, P | RW | PS);
        // 5-level: a PML5 above each process's PML4.
        ram.set(L5.cr3[k], 8, pml4 | P | RW);
    }
    // 32-bit processes: PDE 1 (0x400000) -> the process page table.
    ram.set(L32.cr3[0] + 4, 4, L32.pt[0] | P | RW);
    ram.set(L32.cr3[1] + 4, 4, L32.pt[1] | P | RW);
    for l in [L32, LPAE, L4] {
        for i in 0..USER_PAGES {
            ram.set(pte_addr(&l, 0, i), l.eb, pte_value(A_DATA + i));
            ram.set(pte_addr(&l, 1, i), l.eb, pte_value(B_DATA + i));
        }
    }
}

fn fill_data(ram: &ShadowRam) {
    for g in (A_DATA..A_DATA + 0xf0).chain(B_DATA..B_DATA + 0xf0) {
        for w in 0..1024u64 {
            ram.set((g << 12) + 4 * w, 4, 0);
        }
        ram.set(g << 12, 4, pattern(g));
    }
}

/// Runs every shadow scenario on `vendor`.
pub fn run_all(vendor: &mut dyn ShadowVendor, pool: &mut FramePool, tally: &mut Tally) {
    if let Err(why) = vendor.enter_shadow_mode() {
        return tally.report("shadow setup", Err(why));
    }
    let (Ok(ram_base), Ok(frames_base)) =
        (pool.alloc_contiguous(RAM_PAGES << 12), pool.alloc_contiguous(SHADOW_FRAMES << 12))
    else {
        return tally.report("shadow setup", Err(String::from("out of frames")));
    };
    let name = vendor.name();
    let feat = features();
    let mut lines: Vec<(String, Outcome)> = Vec::new();
    // 5-level paging where the processor has LA57 (CPUID.(EAX=7,ECX=0):ECX[16]).
    let la57 = cpuid(7, 0).2 & (1 << 16) != 0;
    if !la57 {
        println!("SKIP shadow {} 5-level: this CPU model has no LA57 (CPUID.7.0:ECX[16] clear)", name);
    }
    let modes: &[Layout] = if la57 { &[L32, LPAE, L4, L5] } else { &[L32, LPAE, L4] };
    for &l in modes {
        let mut b = MemslotsBuilder::new();
        for (id, (base, n)) in [(0u64, 0x200u64), (0x200, 0x100), (0x300, 0x100)].into_iter().enumerate() {
            let _ = b.create(Memslot::new(
                SlotId(id as u16),
                Gfn(base),
                n,
                Hva(ram_base + (base << 12)),
                SlotFlags::empty(),
            ));
        }
        let Ok(slots) = b.build() else {
            return tally.report("shadow setup", Err(String::from("memslots")));
        };
        // SAFETY: both regions were just taken from the frame pool, which hands each
        // frame out once; they are identity-mapped RAM below 4 GiB used by nothing else.
        let (frames, ram) = unsafe {
            (
                IdentityMemory::new(Pfn(frames_base >> 12), SHADOW_FRAMES as u32),
                ShadowRam::new(ram_base, RAM_PAGES * 4096),
            )
        };
        if CODE_GPA + code().len() as u64 > CODE_END {
            return tally.report("shadow setup", Err(String::from("the guest code does not fit its area")));
        }
        for (i, chunk) in code().chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            ram.set(CODE_GPA + 4 * i as u64, 4, u32::from_le_bytes(w) as u64);
        }
        write_tables(&ram);
        fill_data(&ram);
        ram.take_written(|_| {});
        let mut vm = ShadowVm::new(&mut *vendor, frames, ram, slots, feat, SHADOW_MAX_PAGES);
        let tag = format!("shadow {} {}", name, l.name);
        if let Err(err) = boot(&mut vm, &l) {
            lines.push((format!("{tag}: boot"), Err(e(err))));
            continue;
        }
        for (scenario, f) in SCENARIOS {
            let out = f(&mut vm, &l, &feat);
            let failed = out.is_err();
            lines.push((format!("{tag}: {scenario}"), out));
            if failed {
                // A failed scenario may leave the guest stopped or its tables changed:
                // the next one starts from a fresh boot.
                if let Err(err) = reboot(&mut vm, &l) {
                    lines.push((format!("{tag}: reboot"), Err(e(err))));
                    break;
                }
            }
        }
        let c = vm.counters;
        let s = vm.mmu.stats();
        println!(
            "shadow {} {}: {} exits, {} #PF exits, {} shadow faults, {} leaves, {} pages made, {} unsync, {} resynced, {} emulated table writes, {} CR3 loads ({} root-cache hits), {} INVLPG, {} guest TLB flushes requested, {} #PF injected",
            name, l.name, c.exits, c.pf_exits, s.faults, s.leaves_installed, s.pages_created, s.unsynced, s.synced, c.emulated, c.cr3_loads, s.root_hits, c.invlpgs, c.flushes, c.injected_pf
        );
    }
    for (n, o) in lines {
        tally.report(&n, o);
    }
}

/// A shadow scenario.
type Scenario = fn(&mut ShadowVm<'_>, &Layout, &CpuFeatures) -> Outcome;

/// The scenarios of each mode, in order.
const SCENARIOS: [(&str, Scenario); 9] = [
    ("address spaces", |vm, l, _| address_spaces(vm, l)),
    ("map, remap, unmap", |vm, l, _| remap(vm, l)),
    ("protection faults and A/D", |vm, l, _| protection(vm, l)),
    ("zap all while running", |vm, l, _| zap_all(vm, l)),
    ("dirty log (write-protect)", |vm, l, _| dirty_rounds(vm, l, 0, Tracking::WriteProtect)),
    ("dirty log (D bit)", |vm, l, _| dirty_rounds(vm, l, 1, Tracking::HardwareDirty)),
    ("ageing", |vm, l, _| ageing(vm, l)),
    ("bad guest tables", bad_tables),
    ("CR3 outside RAM", |vm, l, _| cr3_outside(vm, l)),
];

/// Starts the guest again from the loader's tables, with every shadow page dropped.
fn reboot(vm: &mut ShadowVm<'_>, l: &Layout) -> Result<(), SRunError> {
    write_tables(vm.ram());
    fill_data(vm.ram());
    let slots = vm.mmu.memslots().clone();
    vm.mmu.set_memslots(slots);
    vm.logs.logs.clear();
    vm.mmu.set_track_zapped_dirty(false);
    vm.ram().take_written(|_| {});
    boot(vm, l)
}

fn boot(vm: &mut ShadowVm<'_>, l: &Layout) -> Result<(), SRunError> {
    vm.boot(CODE_GPA, STACK_TOP, PD_BOOT)?;
    let mut s = Script::default();
    match l.mode {
        GuestMode::Pae => {
            s.op(OP_TO_PAE, l.cr3[0], 0, 0);
        }
        GuestMode::Four => {
            s.op(OP_TO_LONG, l.cr3[0], 0, 0);
        }
        GuestMode::Five => {
            s.op(OP_TO_LA57, l.cr3[0], 0, 0);
        }
        _ => {
            s.op(OP_SET_CR3, l.cr3[0], 0, 0);
        }
    }
    s.op(OP_GET_CR3, 0, 0, 0);
    let r = run_script(vm, &s)?;
    if r.results[1] != l.cr3[0] || vm.guest_cpu().mode != l.mode {
        return Err(SRunError::WrongMode { mode: vm.guest_cpu().mode, cr3: r.results[1] });
    }
    Ok(())
}

fn address_spaces(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    let before = (vm.counters, vm.mmu.stats());
    let mut s = Script::default();
    let n = 12;
    for p in 0..2 {
        s.op(OP_SET_CR3, l.cr3[p], 0, 0);
        for i in 0..n {
            s.op(OP_WRITE32, USER + i * 4096 + 8, 0xa000_0000 + ((p as u64) << 24) + i, 0);
        }
    }
    let mut reads = Vec::new();
    for p in [0usize, 1, 0] {
        s.op(OP_SET_CR3, l.cr3[p], 0, 0);
        for i in 0..n {
            reads.push((s.op(OP_READ32, USER + i * 4096 + 8, 0, 0), 0xa000_0000 + ((p as u64) << 24) + i));
        }
    }
    let get = s.op(OP_GET_CR3, 0, 0, 0);
    let r = run_script(vm, &s).map_err(e)?;
    let wrong = reads.iter().filter(|(k, v)| r.results[*k] != *v).count();
    let ram = vm.ram();
    let mem_wrong = (0..n)
        .filter(|&i| {
            ram.get(((A_DATA + i) << 12) + 8, 4) != 0xa000_0000 + i
                || ram.get(((B_DATA + i) << 12) + 8, 4) != 0xa100_0000 + i
        })
        .count();
    let (c, st) = (vm.counters, vm.mmu.stats());
    let figures = format!(
        "2 processes x {} pages, {} reads wrong, {} pages wrong in memory, {} CR3 loads ({} root-cache hits), {} shadow faults, {} faults injected, CR3 reads back {:#x}",
        n,
        wrong,
        mem_wrong,
        c.cr3_loads - before.0.cr3_loads,
        st.root_hits - before.1.root_hits,
        st.faults - before.1.faults,
        r.faults.len(),
        r.results[get]
    );
    if wrong == 0
        && mem_wrong == 0
        && r.faults.is_empty()
        && r.results[get] == l.cr3[0]
        && st.root_hits > before.1.root_hits
    {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn remap(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    let before = (vm.counters, vm.mmu.stats());
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    // Warm the translations to be changed (the leaves are cached in the shadow).
    for i in 3..6 {
        s.op(OP_READ32, USER + i * 4096, 0, 0);
    }
    // Remap page 3 to frame 0x240 and INVLPG it.
    s.pte(l, pte_addr(l, 0, 3), pte_value(A_DATA + 0x40));
    s.op(OP_INVLPG, USER + 3 * 4096, 0, 0);
    let r3 = s.op(OP_READ32, USER + 3 * 4096, 0, 0);
    // Unmap page 4, INVLPG: the read faults in the guest, whose handler maps it again.
    s.pte(l, pte_addr(l, 0, 4), 0);
    s.op(OP_INVLPG, USER + 4 * 4096, 0, 0);
    let r4 = s.op(OP_READ32, USER + 4 * 4096, 0, 0);
    s.fix(USER + 4 * 4096, pte_addr(l, 0, 4), pte_value(A_DATA + 4), l.eb);
    // Remap page 5 to frame 0x241 and flush everything by reloading CR3.
    s.pte(l, pte_addr(l, 0, 5), pte_value(A_DATA + 0x41));
    s.op(OP_FLUSH, 0, 0, 0);
    let r5 = s.op(OP_READ32, USER + 5 * 4096, 0, 0);
    let r = run_script(vm, &s).map_err(e)?;
    let st = vm.mmu.stats();
    let got = [r.results[r3], r.results[r4], r.results[r5]];
    let want = [pattern(A_DATA + 0x40), pattern(A_DATA + 4), pattern(A_DATA + 0x41)];
    let unsync = st.unsynced - before.1.unsynced;
    let synced = st.synced - before.1.synced;
    let figures = format!(
        "remap+INVLPG read {:#x} (want {:#x}), unmap -> guest #PF {} -> read {:#x} (want {:#x}), remap+flush read {:#x} (want {:#x}); {} pages went unsync, {} resynced, {} INVLPG, {} CR3 loads",
        got[0],
        want[0],
        fmt_faults(&r.faults),
        got[1],
        want[1],
        got[2],
        want[2],
        unsync,
        synced,
        vm.counters.invlpgs - before.0.invlpgs,
        vm.counters.cr3_loads - before.0.cr3_loads,
    );
    // Restore the loader's mappings for the next scenarios.
    let mut s = Script::default();
    s.pte(l, pte_addr(l, 0, 3), pte_value(A_DATA + 3));
    s.pte(l, pte_addr(l, 0, 5), pte_value(A_DATA + 5));
    s.op(OP_FLUSH, 0, 0, 0);
    run_script(vm, &s).map_err(e)?;
    let fault_ok = r.faults.len() == 1 && r.faults[0] == (USER + 4 * 4096, 0);
    if got == want && fault_ok && unsync > 0 && synced > 0 {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn protection(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    let nx = l.mode != GuestMode::Bits32;
    // Fresh PTEs with A/D clear: 6 read-only, 7 no-execute (a `ret`), 8-11 read then
    // written, 12-15 read, 16-19 untouched.
    let ram = vm.ram();
    let ro_gfn = A_DATA + 6;
    let nx_gfn = A_DATA + 7;
    ram.set(nx_gfn << 12, 4, 0xc3);
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    s.pte(l, pte_addr(l, 0, 6), (ro_gfn << 12) | P);
    if nx {
        s.pte(l, pte_addr(l, 0, 7), (nx_gfn << 12) | P | RW | XD);
    }
    for i in 8..20 {
        s.pte(l, pte_addr(l, 0, i), pte_value(A_DATA + i));
    }
    s.op(OP_FLUSH, 0, 0, 0);
    // Every page is read first, so the shadow leaf exists and the processor itself must
    // refuse the store, the fetch (and, for 8-11, the first store: the guest's D bit).
    s.op(OP_READ32, USER + 6 * 4096, 0, 0);
    s.op(OP_READ32, USER + 7 * 4096, 0, 0);
    for i in 8..12 {
        s.op(OP_READ32, USER + i * 4096, 0, 0);
    }
    s.op(OP_WRITE32, USER + 6 * 4096 + 16, 0x6666, 0);
    s.fix(USER + 6 * 4096, pte_addr(l, 0, 6), pte_value(ro_gfn), l.eb);
    if nx {
        s.op(OP_FETCH, USER + 7 * 4096, 0, 0);
        s.fix(USER + 7 * 4096, pte_addr(l, 0, 7), pte_value(nx_gfn), l.eb);
    }
    for i in 8..12 {
        s.op(OP_WRITE32, USER + i * 4096 + 32, 0x8888, 0);
    }
    for i in 12..16 {
        s.op(OP_READ32, USER + i * 4096 + 32, 0, 0);
    }
    // The 2 MiB / 4 MiB alias of gpa 0: a read of the mailbox through it and a store.
    let alias_read = s.op(OP_READ32, l.alias + MAILBOX, 0, 0);
    s.op(OP_READ32, l.alias + 0x8000, 0, 0);
    s.op(OP_WRITE32, l.alias + 0x8000, 0x7777, 0);
    // The guest checks its own A/D bits.
    for i in 8..20 {
        let want = match i {
            8..=11 => A | D,
            12..=15 => A,
            _ => 0,
        };
        s.op(OP_BITS, pte_addr(l, 0, i), A | D, want);
    }
    let alias_pde = if l.mode == GuestMode::Bits32 { l.pd_a + 4 * 0x100 } else { l.pd_a + 8 * 0x100 };
    s.op(OP_BITS, alias_pde, A | D, A | D);
    let r = run_script(vm, &s).map_err(e)?;
    let mut want_faults = vec![(USER + 6 * 4096 + 16, 0x3)];
    if nx {
        want_faults.push((USER + 7 * 4096, 0x11));
    }
    let ram = vm.ram();
    let stored = ram.get((ro_gfn << 12) + 16, 4) == 0x6666 && ram.get(0x8000, 4) == 0x7777;
    let alias_ok = r.results[alias_read] == s.ops.len() as u64;
    let figures = format!(
        "guest #PF handled by the guest: {} (want {}), read-only store landed {}, {} large-page alias read/write ok {}, A/D checks failed in the guest: {}",
        fmt_faults(&r.faults),
        fmt_faults(&want_faults),
        stored,
        if l.alias_size == 4 << 20 { "4 MiB" } else { "2 MiB" },
        alias_ok,
        r.mismatches
    );
    if r.faults == want_faults && stored && alias_ok && r.mismatches == 0 {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn zap_all(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    // One script: the guest writes its pages, makes process A's page table unsync (a
    // store to it through the kernel map), reads CR3 (where the hypervisor zaps
    // everything by generation, mid-script), and reads its pages back on fresh tables.
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    for i in 0..12 {
        s.op(OP_WRITE32, USER + i * 4096 + 8, 0xa000_0000 + i, 0);
    }
    s.pte(l, pte_addr(l, 0, 30), pte_value(A_DATA + 30));
    let cr3 = s.op(OP_GET_CR3, 0, 0, 0);
    let reads: Vec<usize> = (0..12).map(|i| s.op(OP_READ32, USER + i * 4096 + 8, 0, 0)).collect();
    vm.zap_on_cr3_read = true;
    vm.zap_report = None;
    let r = run_script(vm, &s).map_err(e)?;
    let z = vm.zap_report.ok_or_else(|| String::from("the guest never read CR3: no zap"))?;
    let wrong = reads.iter().enumerate().filter(|(i, &k)| r.results[k] != 0xa000_0000 + *i as u64).count();
    let figures = format!(
        "zapped mid-script: {} shadow pages ({} unsync) made obsolete, {} freed in {} batches, {} resynced; CR3 reads {:#x}, {} reads wrong after, {} pages rebuilt",
        z.pages,
        z.unsync,
        z.freed,
        z.batches,
        z.resynced,
        r.results[cr3],
        wrong,
        vm.mmu.pages()
    );
    if z.unsync > 0
        && z.obsolete as usize >= z.pages
        && z.freed >= z.pages
        && z.resynced == 0
        && wrong == 0
        && r.results[cr3] == l.cr3[0]
    {
        Ok(figures)
    } else {
        Err(figures)
    }
}

/// A random-ish subset generator.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn slot_snapshot(vm: &ShadowVm<'_>, first: u64, n: u64) -> Vec<u64> {
    let ram = vm.ram();
    (0..n * 512).map(|w| ram.get((first << 12) + 8 * w, 8)).collect()
}

fn dirty_rounds(vm: &mut ShadowVm<'_>, l: &Layout, p: usize, tracking: Tracking) -> Outcome {
    let slot_id = SlotId(1 + p as u16);
    let Some(slot) = vm.mmu.memslots().get(slot_id).copied() else { return Err(String::from("no slot")) };
    let data = if p == 0 { A_DATA } else { B_DATA };
    let pt_gfn = l.pt[p] >> 12;
    // Map the pages first.
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[p], 0, 0);
    for i in 0..32 {
        s.op(OP_READ32, USER + i * 4096, 0, 0);
    }
    run_script(vm, &s).map_err(e)?;
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut vm.mmu, &mut flush)
        .map_err(|x| format!("{x:?}"))?;
    if tracking == Tracking::HardwareDirty {
        vm.mmu.set_track_zapped_dirty(true);
    }
    vm.logs.logs.resize_with(3, || None);
    vm.logs.logs[slot_id.0 as usize] = Some(log);
    flush.flush(&mut ShadowTlb(&mut *vm.vendor));
    let mut rng = XorShift(0x1234_5678 + p as u64 + l.eb);
    let (mut missed, mut spurious, mut reported, mut written, mut tables) = (0, 0, 0, 0, 0);
    let rounds = 4;
    let mut snap = slot_snapshot(vm, slot.base_gfn().0, slot.npages());
    for round in 0..rounds {
        let mut s = Script::default();
        s.op(OP_SET_CR3, l.cr3[p], 0, 0);
        let mut wrote = BTreeSet::new();
        for i in 0..32u64 {
            match rng.next() % 4 {
                0 => {
                    s.op(OP_WRITE32, USER + i * 4096 + 4 * (round + 1), round * 0x100 + i, 0);
                    wrote.insert(data + i);
                }
                1 => {
                    s.op(OP_READ32, USER + i * 4096, 0, 0);
                }
                _ => {}
            }
        }
        // Even rounds: the guest also rewrites one of its own PTEs (same value). Odd
        // rounds: it only writes a page it never touched, so the page table changes by
        // the hypervisor's A/D update alone, which the log must report too.
        let k = 40 + round;
        if round % 2 == 0 {
            s.pte(l, pte_addr(l, p, k), pte_value(data + k));
            s.op(OP_INVLPG, USER + k * 4096, 0, 0);
            s.op(OP_READ32, USER + k * 4096, 0, 0);
            wrote.insert(pt_gfn);
        } else {
            s.op(OP_WRITE32, USER + k * 4096 + 64, round, 0);
            wrote.insert(data + k);
        }
        run_script(vm, &s).map_err(e)?;
        let mut words = Vec::new();
        let log = vm.logs.logs[slot_id.0 as usize].as_mut().expect("the log was started");
        let flush = log.get_and_clear(&mut vm.mmu, &mut words).map_err(|x| format!("{x:?}"))?;
        flush.flush(&mut ShadowTlb(&mut *vm.vendor));
        let mut got = BTreeSet::new();
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                got.insert(slot.base_gfn().0 + 64 * w as u64 + bits.trailing_zeros() as u64);
                bits &= bits - 1;
            }
        }
        let now = slot_snapshot(vm, slot.base_gfn().0, slot.npages());
        let changed: BTreeSet<u64> = (0..slot.npages())
            .filter(|&g| snap[(g * 512) as usize..][..512] != now[(g * 512) as usize..][..512])
            .map(|g| slot.base_gfn().0 + g)
            .collect();
        snap = now;
        let expect: BTreeSet<u64> = wrote.union(&changed).copied().collect();
        missed += expect.difference(&got).count();
        spurious += got.difference(&expect).count();
        reported += got.len();
        written += wrote.len();
        tables += got.contains(&pt_gfn) as usize;
    }
    vm.logs.logs[slot_id.0 as usize] = None;
    vm.mmu.set_track_zapped_dirty(false);
    let figures = format!(
        "{} rounds, {} pages reported ({} written by the guest), page table reported in {} rounds (the hypervisor's A/D and its own stores), {} missed, {} spurious, {} pages marked for hypervisor writes",
        rounds, reported, written, tables, missed, spurious, vm.counters.hv_marked
    );
    if missed == 0 && spurious == 0 && tables == rounds as usize {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn ageing(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    let slots = vm.mmu.memslots().clone();
    let Some(slot) = slots.get(SlotId(1)).copied() else { return Err(String::from("no slot")) };
    let page = |i: u64| {
        let h = slot.gfn_to_hva(Gfn(A_DATA + i)).expect("in the slot");
        HvaRange { start: h, end: Hva(h.0 + 4096) }
    };
    let range = HvaRange { start: page(0).start, end: page(31).end };
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    for i in 0..32 {
        s.op(OP_READ32, USER + i * 4096, 0, 0);
    }
    run_script(vm, &s).map_err(e)?;
    let mut flush = FlushToken::new();
    let first = age::age(&slots, &mut vm.mmu, range, NoAccessedBit::ReportOld, &mut flush);
    flush.flush(&mut ShadowTlb(&mut *vm.vendor));
    let old_after_age =
        (0..32).filter(|&i| !age::test_age(&slots, &vm.mmu, page(i), NoAccessedBit::ReportOld).young).count();
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    let touched: BTreeSet<u64> = (0..32).filter(|i| i % 3 == 0).collect();
    for &i in &touched {
        s.op(OP_READ32, USER + i * 4096 + 12, 0, 0);
    }
    run_script(vm, &s).map_err(e)?;
    let young: BTreeSet<u64> = (0..32)
        .filter(|&i| age::test_age(&slots, &vm.mmu, page(i), NoAccessedBit::ReportOld).young)
        .collect();
    let figures = format!(
        "age: {} of {} leaves young, then {} of 32 pages old; the guest read {} pages, test_age finds {} young ({} wrong)",
        first.young_leaves,
        first.leaves,
        old_after_age,
        touched.len(),
        young.len(),
        young.symmetric_difference(&touched).count()
    );
    if first.young_leaves >= 32 && old_after_age == 32 && young == touched {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn bad_tables(vm: &mut ShadowVm<'_>, l: &Layout, feat: &CpuFeatures) -> Outcome {
    let emulated_before = vm.counters.emulated;
    let (read, eb) = if l.eb == 4 { (OP_READ32, 4) } else { (OP_READ64, 8) };
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    // A loop: the root's last entry points to the root itself.
    let last = l.root_a + eb * if l.eb == 4 { 1023 } else { 511 };
    s.pte(l, last, l.root_a | P | RW);
    s.op(OP_FLUSH, 0, 0, 0);
    let loop0 = s.op(read, l.self_map, 0, 0);
    let loop1 = s.op(read, l.self_map + eb, 0, 0);
    s.pte(l, last, 0);
    s.op(OP_FLUSH, 0, 0, 0);
    // A page table outside every memslot: the guest gets a not-present #PF and fixes it.
    let (pde, _) =
        if l.eb == 4 { (l.pd_a + 4 * (OUTSIDE_GVA >> 22), 0) } else { (l.pd_a + 8 * (OUTSIDE_GVA >> 21), 0) };
    s.pte(l, pde, BEYOND_RAM | P | RW);
    s.op(OP_INVLPG, OUTSIDE_GVA, 0, 0);
    let outside = s.op(OP_READ32, OUTSIDE_GVA, 0, 0);
    s.fix(OUTSIDE_GVA, pde, l.pt[0] | P | RW, l.eb);
    // A reserved bit: the guest gets #PF with RSVD set and fixes it.
    let (rsvd_gva, rsvd_entry, bad, good) = if l.eb == 4 {
        let gva = 0xc0_0000u64;
        (gva + MAILBOX, l.pd_a + 4 * (gva >> 22), P | RW | PS | (1 << 21), P | RW | PS)
    } else {
        (
            USER + 9 * 4096,
            pte_addr(l, 0, 9),
            pte_value(A_DATA + 9) | (1u64 << feat.phys_width.bits()),
            pte_value(A_DATA + 9),
        )
    };
    s.pte(l, rsvd_entry, bad);
    s.op(OP_INVLPG, rsvd_gva, 0, 0);
    let rsvd = s.op(OP_READ32, rsvd_gva, 0, 0);
    s.fix(rsvd_gva, rsvd_entry, good, l.eb);
    // Unmapped again (an emulated store to a shadowed directory): the next read faults
    // in the guest again, whose handler maps it again.
    s.pte(l, pde, 0);
    s.op(OP_INVLPG, OUTSIDE_GVA, 0, 0);
    let again = s.op(OP_READ32, OUTSIDE_GVA, 0, 0);
    let r = run_script(vm, &s).map_err(e)?;
    let ram = vm.ram();
    // The walker may set A/D in these entries after the guest read them: compare the rest.
    let want_loop = [ram.get(l.root_a, eb) & !(A | D), ram.get(l.root_a + eb, eb) & !(A | D)];
    let got_loop = [r.results[loop0] & !(A | D), r.results[loop1] & !(A | D)];
    let want_faults = vec![(OUTSIDE_GVA, 0), (rsvd_gva, 0x9), (OUTSIDE_GVA, 0)];
    let outside_ok = r.results[outside] == pattern(A_DATA) && r.results[again] == pattern(A_DATA);
    let rsvd_want = if l.eb == 4 { s.ops.len() as u64 } else { pattern(A_DATA + 9) };
    let leak = vm.mapping_outside_slots();
    let emulated = vm.counters.emulated - emulated_before;
    let figures = format!(
        "{} stores to write-protected directories emulated; loop through the root read {:#x}/{:#x} (want {:#x}/{:#x}); guest #PF {} (want {}); read after the fixes {:#x}, {:#x}; shadow leaves outside the memslots: {:?}",
        emulated,
        got_loop[0],
        got_loop[1],
        want_loop[0],
        want_loop[1],
        fmt_faults(&r.faults),
        fmt_faults(&want_faults),
        r.results[outside],
        r.results[rsvd],
        leak
    );
    if got_loop == want_loop
        && r.faults == want_faults
        && outside_ok
        && r.results[rsvd] == rsvd_want
        && leak.is_none()
    {
        Ok(figures)
    } else {
        Err(figures)
    }
}

fn cr3_outside(vm: &mut ShadowVm<'_>, l: &Layout) -> Outcome {
    let mut pdpte = String::new();
    if l.mode == GuestMode::Pae {
        // A PDPT whose first entry has a reserved bit (bit 1, R/W, is reserved in a
        // PDPTE): MOV to CR3 raises #GP (SDM 4.4.1), which the guest's handler reports.
        let bad_pdpt = 0x22000;
        vm.ram().set(bad_pdpt, 8, 0x15000 | P | RW);
        vm.after_mmu();
        let mut s = Script::default();
        s.op(OP_SET_CR3, bad_pdpt, 0, 0);
        match run_script(vm, &s) {
            Err(SRunError::GuestException(13)) => {}
            other => {
                return Err(format!(
                    "MOV CR3 of a PDPT with reserved bits: {:?}, not #GP in the guest",
                    other.map(|r| r.mismatches)
                ))
            }
        }
        pdpte = format!("MOV CR3 {bad_pdpt:#x} (PDPTE with a reserved bit) -> #GP delivered to the guest ({} #GP injected); ", vm.counters.injected_gp);
        reboot(vm, l).map_err(e)?;
    }
    let mut s = Script::default();
    s.op(OP_SET_CR3, l.cr3[0], 0, 0);
    s.op(OP_SET_CR3, BEYOND_RAM, 0, 0);
    s.op(OP_READ32, USER, 0, 0);
    match run_script(vm, &s) {
        Err(SRunError::Cr3OutsideRam(c)) if c == BEYOND_RAM => {
            let outside = vm.mapping_outside_slots();
            let f = format!(
                "{pdpte}MOV CR3 {BEYOND_RAM:#x} stopped the run: \"{}\"; shadow leaves outside the memslots: {:?}",
                SRunError::Cr3OutsideRam(c),
                outside
            );
            if outside.is_none() {
                Ok(f)
            } else {
                Err(f)
            }
        }
        Err(other) => Err(format!("stopped with {other}, not at the CR3 load")),
        Ok(_) => Err(String::from("the guest ran on with CR3 outside RAM")),
    }
}
