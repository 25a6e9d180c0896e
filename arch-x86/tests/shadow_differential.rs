//! Shadow paging against the guest's own tables.
//!
//! The differential test builds random guest page tables in every paging
//! mode (32-bit with and without PSE and PSE-36, PAE, 4-level, 5-level),
//! with sharing, loops, tables outside memory and reserved bits, and runs
//! random steps: accesses with every combination of user/supervisor
//! (explicit and implicit), read/write/fetch, CR0.WP, CR4.SMEP, CR4.SMAP,
//! EFLAGS.AC and EFER.NXE; guest writes to its tables (emulated when the
//! table is write-protected, direct when unsync) followed by the INVLPGs or
//! flush the guest owes; CR3 switches; zap-all by generation; host
//! invalidations. After each access the processor's translation through the
//! shadow tables (the software walker playing the CPU, with the MMU's fault
//! handler behind it) must equal a direct walk of the guest tables: the same
//! host address, or the same page-fault error code, MMIO exit or denial;
//! and the guest's A/D bits must be set as the processor would set them.
//!
//! The cross-arch scenario suite runs shadow paging too, through
//! `vmmu_tests::x86::ShadowGuest` (`tests/tests/scenarios.rs`).

use arch_x86::exit::Origin;
use arch_x86::format::npt::Npt;
use arch_x86::format::{Access, PageSize, PhysAddrWidth, WalkLength};
use arch_x86::frame::{FrameMemory, SimMemory};
use arch_x86::shadow::guest_walk::{load_pdptrs, walk_any, PhysMemory, WalkFault};
use arch_x86::shadow::mode::{A, D, P, PS, RW, US, XD};
use arch_x86::shadow::{
    AccessKind, AccessOp, CpuFeatures, DirtyTracker, GuestCpu, GuestMode, NoDirtyLog, PfErrorCode, Privilege,
    ShadowConfig, ShadowError, ShadowFault, ShadowMmu, SimGuestRam, SlotMemory,
};
use arch_x86::testing::LinearHost;
use arch_x86::walk::translate;
use mmu_generic::addr::{Gfn, Gpa, Gva, Hva, HvaRange, Pfn};
use mmu_generic::backend::{FlushToken, NoTlb};
use mmu_generic::dirty_log::{LogMode, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::PteHandle;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

type Mmu = ShadowMmu<SimMemory, SimGuestRam, LinearHost>;

const PFN_OFFSET: u64 = 0x10_0000;
const RAM_PAGES: u64 = 0x200;
const RO_BASE: u64 = 0x400;
const RO_PAGES: u64 = 0x10;
const TABLE_POOL: u64 = 0x60;

fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), RAM_PAGES, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
    b.create(Memslot::new(SlotId(1), Gfn(RO_BASE), RO_PAGES, Hva(0x5000_0000), SlotFlags::READONLY)).unwrap();
    b.build().unwrap()
}

fn new_mmu(max_pages: usize, cached_roots: usize) -> Mmu {
    let slots = slots();
    let ram = SimGuestRam::new(&[(Gfn(0), RAM_PAGES), (Gfn(RO_BASE), RO_PAGES)]);
    let config = ShadowConfig { features: CpuFeatures::typical(), max_pages, cached_roots };
    // Shadow frames below 4 GiB: PAE roots need it.
    ShadowMmu::new(
        config,
        SimMemory::new(Pfn(0x8_0000), 1 << 16),
        ram,
        LinearHost::new(PFN_OFFSET, PageSize::Size4K),
        slots,
    )
}

/// The host address the guest-physical address must translate to.
fn host_addr(slots: &Memslots, gpa: Gpa) -> Option<u64> {
    let hva = slots.lookup(gpa.gfn())?.gfn_to_hva(gpa.gfn())?;
    Some(((hva.page() + PFN_OFFSET) << 12) | gpa.page_offset())
}

/// How an access ended, seen from outside.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Host(u64),
    Emulated(Gpa),
    Pf(PfErrorCode),
    Gp,
    Mmio(Gpa),
    Denied(Gpa),
}

/// One guest's configuration for the random tables.
#[derive(Clone, Copy, Debug)]
struct Flavor {
    mode: GuestMode,
    pse: bool,
    pse36: bool,
}

fn entry_bytes(mode: GuestMode) -> u64 {
    mode.entry_bytes()
}

fn index_of(mode: GuestMode, va: u64, level: u8) -> u64 {
    match mode {
        GuestMode::Bits32 => (va >> (12 + 10 * (level as u32 - 1))) & 0x3ff,
        _ => (va >> (12 + 9 * (level as u32 - 1))) & 0x1ff,
    }
}

/// Random guest page tables.
struct TableGen<'a> {
    rng: &'a mut SmallRng,
    ram: &'a SimGuestRam,
    flavor: Flavor,
    next_table: u64,
    tables: Vec<u64>,
    entries: Vec<Gpa>,
}

impl TableGen<'_> {
    fn table(&mut self) -> u64 {
        if self.next_table < TABLE_POOL && (self.tables.is_empty() || self.rng.gen_range(0..10) < 8) {
            self.next_table += 1;
            self.tables.push(self.next_table - 1);
            self.next_table - 1
        } else {
            self.tables[self.rng.gen_range(0..self.tables.len())]
        }
    }

    fn flags(&mut self, leaf: bool) -> u64 {
        let r = &mut *self.rng;
        let mut e = 0;
        if r.gen_range(0..100) < 97 {
            e |= P;
        }
        if r.gen_range(0..100) < 85 {
            e |= RW;
        }
        if r.gen_range(0..100) < 85 {
            e |= US;
        }
        if r.gen_range(0..100) < 75 {
            e |= A;
        }
        if leaf && r.gen_range(0..100) < 50 {
            e |= D;
        }
        if self.flavor.mode != GuestMode::Bits32 && r.gen_range(0..100) < 8 {
            e |= XD;
        }
        e
    }

    /// A random entry for `level` (not the PAE PDPTEs).
    fn entry(&mut self, level: u8) -> u64 {
        let mode = self.flavor.mode;
        let large_ok = match mode {
            GuestMode::Bits32 => level == 2,
            GuestMode::Pae => level == 2,
            _ => level == 2 || level == 3,
        };
        let mut e;
        if level == 1 {
            e = self.flags(true) | (self.data_gfn() << 12);
        } else if large_ok && self.rng.gen_range(0..100) < 25 {
            e = self.flags(true) | PS;
            let shift = if mode == GuestMode::Bits32 { 22 } else { 12 + 9 * (level as u32 - 1) };
            let base: u64 =
                if self.rng.gen_range(0..10) < 8 { 0 } else { self.rng.gen_range(0..16) << shift };
            e |= base & 0xffff_ffff_ffff_f000;
            if mode == GuestMode::Bits32 && self.rng.gen_range(0..10) < 2 {
                e |= self.rng.gen_range(0..4u64) << 13; // PSE-36 high address bits
            }
            if self.rng.gen_range(0..10) < 2 {
                e |= 1 << 12; // PAT
            }
        } else {
            e = self.flags(false);
            let r = self.rng.gen_range(0..100);
            let target = if r < 92 {
                self.table()
            } else if r < 96 {
                0x300 // between the slots: not memory
            } else if r < 98 {
                RO_BASE + self.rng.gen_range(0..RO_PAGES)
            } else if mode == GuestMode::Bits32 {
                0xf_ff00
            } else {
                0x1_0000_0000 // far above every slot
            };
            e |= target << 12;
        }
        if self.rng.gen_range(0..100) < 2 {
            e |= self.reserved_bit(level);
        }
        e
    }

    fn reserved_bit(&mut self, level: u8) -> u64 {
        match self.flavor.mode {
            GuestMode::Bits32 => PS | 1 << 21,
            _ if level >= 4 => PS,
            _ => 1 << self.rng.gen_range(46..52),
        }
    }

    fn data_gfn(&mut self) -> u64 {
        match self.rng.gen_range(0..100) {
            0..=64 => self.rng.gen_range(TABLE_POOL..RAM_PAGES),
            65..=89 => self.rng.gen_range(0..TABLE_POOL),
            90..=94 => RO_BASE + self.rng.gen_range(0..RO_PAGES),
            _ => self.rng.gen_range(0x200..0x400),
        }
    }

    fn write(&mut self, addr: Gpa, e: u64) {
        let bytes = entry_bytes(self.flavor.mode);
        let e = if bytes == 4 { e & 0xffff_ffff } else { e };
        self.ram.write(addr, bytes, e).unwrap();
        self.entries.push(addr);
    }

    /// Fills in the entries `va` walks through, from the table at `table`.
    fn extend(&mut self, mut table: u64, mut level: u8, va: u64, cpu: &GuestCpu) {
        let bytes = entry_bytes(self.flavor.mode);
        let mut seen = Vec::new();
        loop {
            if seen.contains(&(table, level)) || !self.ram.contains(Gfn(table)) {
                return;
            }
            seen.push((table, level));
            let addr = Gpa((table << 12) + index_of(self.flavor.mode, va, level) * bytes);
            let mut e = self.ram.read(addr, bytes).unwrap();
            if e == 0 {
                e = self.entry(level);
                self.write(addr, e);
            }
            let large = level > 1
                && e & PS != 0
                && (self.flavor.mode != GuestMode::Bits32 || cpu.cr4_pse)
                && !(self.flavor.mode != GuestMode::Bits32 && level >= 4);
            if e & P == 0 || level == 1 || large {
                return;
            }
            table = if self.flavor.mode == GuestMode::Bits32 {
                (e & 0xffff_f000) >> 12
            } else {
                (e & 0x000f_ffff_ffff_f000) >> 12
            };
            level -= 1;
        }
    }

    /// A root for `cpu.mode`: its CR3 value.
    fn root(&mut self, gvas: &[u64], cpu: &GuestCpu) -> u64 {
        let t = self.table();
        match self.flavor.mode {
            GuestMode::Pae => {
                // The PDPT: 32-byte aligned, inside a table page.
                let pdpt = (t << 12) + 32 * self.rng.gen_range(0..4u64);
                for i in 0..4u64 {
                    let e = if self.rng.gen_range(0..10) < 9 { (self.table() << 12) | P } else { 0 };
                    self.ram.write(Gpa(pdpt + 8 * i), 8, e).unwrap();
                }
                for &va in gvas {
                    let e = self.ram.read(Gpa(pdpt + 8 * ((va >> 30) & 3)), 8).unwrap();
                    if e & P != 0 {
                        self.extend((e & 0x000f_ffff_ffff_f000) >> 12, 2, va, cpu);
                    }
                }
                pdpt
            }
            mode => {
                for &va in gvas {
                    self.extend(t, mode.root_level(), va, cpu);
                }
                t << 12
            }
        }
    }
}

fn random_gvas(rng: &mut SmallRng, mode: GuestMode) -> Vec<u64> {
    let bits = match mode {
        GuestMode::Bits32 | GuestMode::Pae => 32,
        GuestMode::Four => 48,
        GuestMode::Five => 57,
    };
    let mut out = Vec::new();
    for _ in 0..4 {
        let base = rng.gen::<u64>() & ((1u64 << bits) - 1) & !0xfff;
        for _ in 0..12 {
            let off = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..16u64) << 12,
                1 => rng.gen_range(0..8u64) << 21,
                _ => rng.gen_range(0..4u64) << 30,
            };
            let mut va = (base + off) & ((1u64 << bits) - 1);
            if bits > 32 && va >> (bits - 1) & 1 == 1 {
                va |= !((1u64 << bits) - 1); // canonical
            }
            out.push(va);
        }
    }
    if bits > 32 {
        // A non-canonical address: #GP, never a walk.
        out.push(1u64 << (bits - 1));
    }
    out
}

fn random_access(rng: &mut SmallRng) -> AccessKind {
    let op = [AccessOp::Read, AccessOp::Write, AccessOp::Fetch][rng.gen_range(0..3)];
    let privilege = match rng.gen_range(0..10) {
        0..=4 => Privilege::User,
        5..=8 => Privilege::Supervisor,
        _ => Privilege::ImplicitSupervisor,
    };
    AccessKind { op, privilege }
}

/// What a direct walk of the guest tables says, without side effects.
fn expected(mmu: &Mmu, cpu: &GuestCpu, gva: Gva, access: AccessKind) -> Outcome {
    let mem = SlotMemory { slots: mmu.memslots(), mem: mmu.guest() };
    match walk_any(&mem, cpu, mmu.features(), gva, access, false) {
        Ok(w) => match mmu.memslots().lookup(w.gpa.gfn()) {
            None => Outcome::Mmio(w.gpa),
            Some(s) if access.op == AccessOp::Write && s.flags().contains(SlotFlags::READONLY) => {
                Outcome::Denied(w.gpa)
            }
            Some(_) => Outcome::Host(host_addr(mmu.memslots(), w.gpa).unwrap()),
        },
        Err(WalkFault::BadAddress(_)) => Outcome::Gp,
        Err(f) => Outcome::Pf(f.error_code().expect("a page fault")),
    }
}

/// The processor's access through the shadow tables, with the MMU's fault
/// handler behind each fault.
fn run_access(mmu: &mut Mmu, cpu: &GuestCpu, gva: Gva, access: AccessKind) -> Outcome {
    for _ in 0..8 {
        match mmu.hw_access(cpu, gva, access) {
            Ok(t) => return Outcome::Host(t.gpa.0),
            Err(_) => {
                let r = mmu.page_fault(cpu, gva, access, &mut NoDirtyLog);
                mmu.take_flush().flush(&mut NoTlb);
                match r.unwrap_or_else(|e| panic!("typed error {e} for guest behaviour")) {
                    ShadowFault::Fixed | ShadowFault::Retry => {}
                    ShadowFault::InjectPf(c) => return Outcome::Pf(c),
                    ShadowFault::InjectGp => return Outcome::Gp,
                    ShadowFault::Emulate { gpa } => return Outcome::Emulated(gpa),
                    ShadowFault::Mmio { gpa } => return Outcome::Mmio(gpa),
                    ShadowFault::Denied { gpa } => return Outcome::Denied(gpa),
                }
            }
        }
    }
    panic!("{gva:?} {access:?} still faults after 8 faults");
}

/// The A/D bits a successful access must have left in the guest tables.
fn check_ad(mmu: &Mmu, cpu: &GuestCpu, gva: Gva, access: AccessKind) -> Result<(), String> {
    let mem = SlotMemory { slots: mmu.memslots(), mem: mmu.guest() };
    let w = walk_any(&mem, cpu, mmu.features(), gva, access, false).map_err(|e| format!("{e:?}"))?;
    let top = match cpu.mode {
        GuestMode::Pae => 2,
        m => m.root_level(),
    };
    for level in w.leaf_level..=top {
        let step = w.steps[level as usize - 1];
        let ro = mmu
            .memslots()
            .lookup(step.entry_addr.gfn())
            .is_some_and(|s| s.flags().contains(SlotFlags::READONLY));
        if ro {
            continue;
        }
        if step.entry & A == 0 {
            return Err(format!("A clear at level {level} after {access:?}"));
        }
        if level == w.leaf_level && access.op == AccessOp::Write && step.entry & D == 0 {
            return Err(format!("D clear in the leaf after {access:?}"));
        }
    }
    Ok(())
}

fn mutate(rng: &mut SmallRng, e: u64, mode: GuestMode) -> u64 {
    let bits: &[u32] = if mode == GuestMode::Bits32 {
        &[0, 1, 2, 5, 6, 7, 12, 13, 21]
    } else {
        &[0, 1, 2, 5, 6, 7, 12, 13, 47, 63]
    };
    match rng.gen_range(0..10) {
        0..=6 => e ^ (1 << bits[rng.gen_range(0..bits.len())]),
        7 | 8 => (e & 0xfff) | (rng.gen_range(0..RAM_PAGES) << 12) | (e & XD),
        _ => 0,
    }
}

struct Differential {
    rng: SmallRng,
    mmu: Mmu,
    cpu: GuestCpu,
    cr3s: Vec<u64>,
    gvas: Vec<u64>,
    entries: Vec<Gpa>,
    flavor: Flavor,
    checked: u64,
    translated: u64,
    /// Outcomes seen: host, emulated, #PF, MMIO, denied, #GP.
    outcomes: [u64; 6],
    max_pages: usize,
}

impl Differential {
    fn new(flavor: Flavor, seed: u64, max_pages: usize, cached_roots: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut mmu = new_mmu(max_pages, cached_roots);
        let mut cpu = GuestCpu::new(flavor.mode, 0);
        cpu.cr4_pse = flavor.pse;
        cpu.efer_nxe = rng.gen_range(0..4) != 0;
        let feat =
            CpuFeatures { phys_width: PhysAddrWidth::new(46).unwrap(), pse36: flavor.pse36, page_1g: true };
        mmu = ShadowMmu::new(
            ShadowConfig { features: feat, max_pages, cached_roots },
            SimMemory::new(Pfn(0x8_0000), 1 << 16),
            SimGuestRam::new(&[(Gfn(0), RAM_PAGES), (Gfn(RO_BASE), RO_PAGES)]),
            LinearHost::new(PFN_OFFSET, PageSize::Size4K),
            mmu.memslots().clone(),
        );
        let gvas = random_gvas(&mut rng, flavor.mode);
        let (cr3s, entries) = {
            let mut g = TableGen {
                rng: &mut rng,
                ram: mmu.guest(),
                flavor,
                next_table: 1,
                tables: Vec::new(),
                entries: Vec::new(),
            };
            let cr3s: Vec<u64> = (0..3).map(|_| g.root(&gvas, &cpu)).collect();
            (cr3s, g.entries)
        };
        let mut d = Differential {
            rng,
            mmu,
            cpu,
            cr3s,
            gvas,
            entries,
            flavor,
            checked: 0,
            translated: 0,
            outcomes: [0; 6],
            max_pages,
        };
        d.switch_cr3(0);
        d
    }

    fn switch_cr3(&mut self, k: usize) {
        self.cpu.cr3 = self.cr3s[k];
        if self.cpu.mode == GuestMode::Pae {
            match load_pdptrs(self.mmu.guest(), self.cpu.cr3, self.mmu.features()) {
                Ok(p) => self.cpu.pdptrs = p,
                // The MOV to CR3 would #GP: the guest keeps its old root.
                Err(_) => return,
            }
        }
        self.mmu.load_cr3(&self.cpu).expect("CR3 load");
        self.mmu.take_flush().flush(&mut NoTlb);
    }

    fn access(&mut self) {
        let gva = Gva(self.gvas[self.rng.gen_range(0..self.gvas.len())] | self.rng.gen_range(0..0x1000));
        let access = random_access(&mut self.rng);
        let want = expected(&self.mmu, &self.cpu, gva, access);
        let got = run_access(&mut self.mmu, &self.cpu, gva, access);
        self.checked += 1;
        let ok = match (want, got) {
            (a, b) if a == b => true,
            // A write to a write-protected guest table, or one no shadow
            // entry can express: the embedder emulates it.
            (Outcome::Host(h), Outcome::Emulated(gpa)) => {
                access.op == AccessOp::Write && host_addr(self.mmu.memslots(), gpa) == Some(h)
            }
            _ => false,
        };
        assert!(
            ok,
            "{:?} {gva:?} {access:?} cpu {:?}: guest walk says {want:?}, shadow says {got:?}",
            self.flavor, self.cpu
        );
        let kind = match got {
            Outcome::Host(_) => 0,
            Outcome::Emulated(_) => 1,
            Outcome::Pf(_) => 2,
            Outcome::Mmio(_) => 3,
            Outcome::Denied(_) => 4,
            Outcome::Gp => 5,
        };
        self.outcomes[kind] += 1;
        match got {
            Outcome::Host(h) => {
                self.translated += 1;
                check_ad(&self.mmu, &self.cpu, gva, access).unwrap_or_else(|e| panic!("{gva:?}: {e}"));
                self.cross_check_with_tdp_walker(gva, access, h);
            }
            Outcome::Emulated(gpa) => {
                // The embedder's emulator performs the write.
                let eb = entry_bytes(self.flavor.mode);
                let at = Gpa(gpa.0 & !(eb - 1));
                let cur = self.mmu.guest().read(at, eb).unwrap();
                let new = mutate(&mut self.rng, cur, self.flavor.mode);
                self.mmu.emulated_write(at, eb, new).expect("emulated write to RAM");
                self.guest_invalidates();
            }
            _ => {}
        }
    }

    /// A user access through 4- or 5-level shadow tables is also an NPT
    /// walk (every nested access is a user access): the crate's TDP walker,
    /// written independently, must find the same host address.
    fn cross_check_with_tdp_walker(&self, gva: Gva, access: AccessKind, host: u64) {
        let walk = match self.flavor.mode {
            GuestMode::Four => WalkLength::Four,
            GuestMode::Five => WalkLength::Five,
            _ => return,
        };
        if access.privilege != Privilege::User {
            return;
        }
        let npt = Npt { walk, width: PhysAddrWidth::MAX, nxe: true, page_1g: true };
        let a = match access.op {
            AccessOp::Read => Access::READ,
            AccessOp::Write => Access::WRITE,
            AccessOp::Fetch => Access::EXEC,
        };
        let root = self.mmu.root_hpa().expect("a root");
        let va = Gpa(gva.0 & ((1u64 << walk.gpa_bits()) - 1));
        let t = translate(&npt, self.mmu.memory(), root, va, a, Origin::Final).unwrap_or_else(|e| {
            panic!("{gva:?} {access:?}: the TDP walker faults on the shadow tables: {e:?}")
        });
        assert_eq!(t.hpa, host, "{gva:?} {access:?}");
    }

    /// The guest changes one of its table entries, then invalidates as it must.
    fn table_write(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let at = self.entries[self.rng.gen_range(0..self.entries.len())];
        if at.gfn().0 >= RO_BASE {
            return; // a read-only slot: the guest's write is refused, nothing changes
        }
        let eb = entry_bytes(self.flavor.mode);
        let cur = self.mmu.guest().read(at, eb).unwrap();
        let new = mutate(&mut self.rng, cur, self.flavor.mode);
        if self.mmu.is_write_tracked(at.gfn()) {
            // The write faults on the write-protected table and is emulated.
            self.mmu.emulated_write(at, eb, new).expect("emulated write");
        } else {
            self.mmu.guest().write(at, eb, new).unwrap();
        }
        self.guest_invalidates();
    }

    /// A guest entry written as the guest writes it: emulated when the
    /// table is write-protected, straight to memory when it is not.
    fn guest_write(&mut self, at: Gpa, value: u64) {
        let eb = entry_bytes(self.flavor.mode);
        if self.mmu.is_write_tracked(at.gfn()) {
            self.mmu.emulated_write(at, eb, value).expect("emulated write");
        } else {
            self.mmu.guest().write(at, eb, value).unwrap();
        }
    }

    /// The guest unlinks the table (or page) an entry points to, rewrites
    /// some of its entries, and links it again, invalidating after each
    /// step as it must: Linux freeing a page table and reusing the page as
    /// another. Found the unsync shadow page brought back with stale leaves.
    fn table_reuse(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let eb = entry_bytes(self.flavor.mode);
        let child_of = |link: u64| {
            if self.flavor.mode == GuestMode::Bits32 {
                link & 0xffff_f000
            } else {
                link & 0xf_ffff_f000
            }
        };
        // Best a table the guest writes without traps (unsync): try a few.
        let mut pick = None;
        for _ in 0..8 {
            let at = self.entries[self.rng.gen_range(0..self.entries.len())];
            let link = self.mmu.guest().read(at, eb).unwrap();
            let child = child_of(link);
            if at.gfn().0 >= RO_BASE || link & P == 0 || child >> 12 >= RAM_PAGES {
                continue;
            }
            pick = Some((at, link, child));
            if !self.mmu.is_write_tracked(Gfn(child >> 12)) {
                break;
            }
        }
        let Some((at, link, child)) = pick else { return };
        // Invalidated page by page, as Linux does a small range: an INVLPG
        // walk no longer reaches the unlinked table.
        let invlpg = self.rng.gen_range(0..4) != 0;
        let invalidate = |d: &mut Self| {
            if invlpg {
                for k in 0..d.gvas.len() {
                    let gva = Gva(d.gvas[k]);
                    d.mmu.invlpg(&d.cpu, gva);
                }
                d.mmu.take_flush().flush(&mut NoTlb);
            } else {
                d.guest_invalidates();
            }
        };
        self.guest_write(at, 0);
        invalidate(self);
        // Entries of the child the gvas use, where it has some: those are
        // the ones with shadow leaves to go stale.
        let used: Vec<Gpa> = self.entries.iter().copied().filter(|e| e.0 >> 12 == child >> 12).collect();
        for _ in 0..self.rng.gen_range(1..4) {
            let e = match used.len() {
                0 => Gpa(child + self.rng.gen_range(0..4096 / eb) * eb),
                n => used[self.rng.gen_range(0..n)],
            };
            let cur = self.mmu.guest().read(e, eb).unwrap();
            let new = mutate(&mut self.rng, cur, self.flavor.mode);
            self.guest_write(e, new);
        }
        invalidate(self);
        self.guest_write(at, link);
        invalidate(self);
    }

    fn guest_invalidates(&mut self) {
        if self.rng.gen_range(0..2) == 0 {
            self.mmu.flush_tlb();
        } else {
            for k in 0..self.gvas.len() {
                let gva = Gva(self.gvas[k]);
                self.mmu.invlpg(&self.cpu, gva);
            }
        }
        self.mmu.take_flush().flush(&mut NoTlb);
    }

    fn controls(&mut self) {
        let c = &mut self.cpu;
        match self.rng.gen_range(0..6) {
            0 => c.cr0_wp = !c.cr0_wp,
            1 => c.cr4_smep = !c.cr4_smep,
            2 => c.cr4_smap = !c.cr4_smap,
            3 => {
                // EFLAGS.AC changes without telling the MMU.
                c.eflags_ac = !c.eflags_ac;
                return;
            }
            4 => c.efer_nxe = !c.efer_nxe,
            _ => c.cr4_pse = !c.cr4_pse,
        }
        let k = self.cr3s.iter().position(|&x| x == self.cpu.cr3).unwrap_or(0);
        self.switch_cr3(k);
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=64 => self.access(),
            65..=76 => self.table_write(),
            77..=79 => self.table_reuse(),
            80..=84 => {
                let gva = Gva(self.gvas[self.rng.gen_range(0..self.gvas.len())]);
                self.mmu.invlpg(&self.cpu, gva);
                self.mmu.take_flush().flush(&mut NoTlb);
            }
            85..=89 => {
                let k = self.rng.gen_range(0..self.cr3s.len());
                self.switch_cr3(k);
            }
            90..=94 => self.controls(),
            95..=96 => {
                self.mmu.invalidate_all();
                let r = self.mmu.reclaim_obsolete(7, || true);
                assert!(!r.interrupted);
                self.mmu.take_flush().flush(&mut NoTlb);
            }
            _ => {
                let first = self.rng.gen_range(0..RAM_PAGES);
                let start = Hva(0x4000_0000 + first * 4096);
                let range = HvaRange { start, end: Hva(start.0 + self.rng.gen_range(1..64u64) * 4096) };
                self.mmu.zap_hva_range(range, |_, _| {});
                self.mmu.take_flush().flush(&mut NoTlb);
            }
        }
        assert!(self.mmu.pages() <= self.max_pages, "{} pages above the limit", self.mmu.pages());
    }

    /// Every shadow leaf maps a frame of a memslot to the host frame behind
    /// it, and never write-enables a read-only slot or a write-protected table.
    fn check_mappings(&self) {
        let slots = self.mmu.memslots();
        self.mmu.for_each_mapping(|gfn, pfn, writable| {
            let slot =
                slots.lookup(gfn).unwrap_or_else(|| panic!("shadow leaf for {gfn:?} outside the memslots"));
            assert_eq!(Some(pfn.0 << 12), host_addr(slots, gfn.gpa().unwrap()), "{gfn:?}");
            if writable {
                assert!(!slot.flags().contains(SlotFlags::READONLY), "{gfn:?} writable in a read-only slot");
                assert!(
                    !self.mmu.is_write_tracked(gfn),
                    "{gfn:?} is a write-protected table, mapped writable"
                );
            }
        });
    }
}

fn flavors() -> Vec<Flavor> {
    vec![
        Flavor { mode: GuestMode::Bits32, pse: true, pse36: true },
        Flavor { mode: GuestMode::Bits32, pse: true, pse36: false },
        Flavor { mode: GuestMode::Bits32, pse: false, pse36: true },
        Flavor { mode: GuestMode::Pae, pse: false, pse36: true },
        Flavor { mode: GuestMode::Four, pse: false, pse36: true },
        Flavor { mode: GuestMode::Five, pse: false, pse36: true },
    ]
}

/// What a differential run exercised.
#[derive(Debug, Default)]
struct Coverage {
    checked: u64,
    translated: u64,
    faults: [u64; 6],
    stats: arch_x86::shadow::mmu::ShadowStats,
}

fn run_differential(flavor: Flavor, seeds: std::ops::Range<u64>, steps: usize, max_pages: usize) -> Coverage {
    let mut cov = Coverage::default();
    for seed in seeds {
        let mut d = Differential::new(flavor, seed, max_pages, 2);
        for _ in 0..steps {
            d.step();
        }
        d.check_mappings();
        cov.checked += d.checked;
        cov.translated += d.translated;
        for (c, n) in cov.faults.iter_mut().zip(d.outcomes) {
            *c += n;
        }
        let s = d.mmu.stats();
        let t = &mut cov.stats;
        t.faults += s.faults;
        t.leaves_installed += s.leaves_installed;
        t.pages_created += s.pages_created;
        t.pages_zapped += s.pages_zapped;
        t.obsolete_zapped += s.obsolete_zapped;
        t.unsynced += s.unsynced;
        t.synced += s.synced;
        t.emulated_writes += s.emulated_writes;
        t.flood_zaps += s.flood_zaps;
        t.root_hits += s.root_hits;
        t.relinked_unsync += s.relinked_unsync;
        t.relink_dropped += s.relink_dropped;
    }
    cov
}

#[test]
fn shadow_translation_equals_guest_walk_in_every_mode() {
    for flavor in flavors() {
        let c = run_differential(flavor, 0..24, 600, 4096);
        std::println!("{flavor:?}: {c:?}");
        assert!(c.checked > 5000, "{flavor:?}: only {} accesses checked", c.checked);
        // Every kind of ending, and every mechanism, was exercised.
        assert!(c.faults.iter().take(5).all(|&n| n > 0), "{flavor:?}: {c:?}");
        assert!(flavor.mode.root_level() < 4 || c.faults[5] > 0, "{flavor:?}: no #GP");
        let s = c.stats;
        assert!(s.unsynced > 0 && s.synced > 0 && s.emulated_writes > 0 && s.obsolete_zapped > 0, "{s:?}");
        assert!(s.root_hits > 0 && s.pages_zapped > 0, "{s:?}");
    }
}

#[test]
fn shadow_translation_holds_with_a_tiny_page_budget() {
    for flavor in flavors() {
        run_differential(flavor, 100..108, 400, 24);
    }
}

// ----- bad input -----

/// A 4-level guest's path from the PML4 at gfn 1 (PDPT 2, PD 3) to the page
/// table at gfn 4, which maps gva 0 to 2 MiB.
fn one_path(g: &SimGuestRam) {
    g.write(Gpa(0x1000), 8, 0x2000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x2000), 8, 0x3000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x3000), 8, 0x4000 | P | RW | US | A).unwrap();
}

/// [`one_path`], the page table mapping itself (writable) at gva 0x4000.
fn self_mapped_pt(g: &SimGuestRam) {
    one_path(g);
    g.write(Gpa(0x4000 + 8 * 4), 8, 0x4000 | P | RW | US | A | D).unwrap();
}

fn four_level(mmu: &Mmu, cr3_gfn: u64) -> GuestCpu {
    let _ = mmu;
    GuestCpu::new(GuestMode::Four, cr3_gfn << 12)
}

#[test]
fn guest_tables_outside_memslots_fault_and_map_nothing() {
    let mut mmu = new_mmu(4096, 2);
    mmu.guest().write(Gpa(0x1000), 8, 0x300_000 | P | RW | A).unwrap(); // PDPT in the gap
    let cpu = four_level(&mmu, 1);
    mmu.load_cr3(&cpu).unwrap();
    let r = AccessKind::supervisor(AccessOp::Read);
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x1234), r), Outcome::Pf(PfErrorCode::empty()));
    // A root outside memory as well.
    let far = four_level(&mmu, 0x300);
    mmu.load_cr3(&far).unwrap();
    let w = AccessKind::user(AccessOp::Write);
    assert_eq!(run_access(&mut mmu, &far, Gva(0), w), Outcome::Pf(PfErrorCode::WRITE | PfErrorCode::USER));
    let mut leaves = 0;
    mmu.for_each_mapping(|_, _, _| leaves += 1);
    assert_eq!(leaves, 0);
}

#[test]
fn looping_guest_tables_translate_like_the_guest_walk() {
    let mut mmu = new_mmu(4096, 2);
    // PML4[0] points to the PML4 itself: every level reuses the same table.
    mmu.guest().write(Gpa(0x1000), 8, 0x1000 | P | RW | US | A | D).unwrap();
    let cpu = four_level(&mmu, 1);
    mmu.load_cr3(&cpu).unwrap();
    for op in [AccessOp::Read, AccessOp::Write, AccessOp::Fetch] {
        let a = AccessKind::user(op);
        let want = expected(&mmu, &cpu, Gva(0x10), a);
        assert_eq!(want, Outcome::Host(host_addr(mmu.memslots(), Gpa(0x1010)).unwrap()));
        let got = run_access(&mut mmu, &cpu, Gva(0x10), a);
        if op == AccessOp::Write {
            // The page is the guest's own PML4: the write is emulated.
            assert_eq!(got, Outcome::Emulated(Gpa(0x1010)));
        } else {
            assert_eq!(got, want);
        }
    }
    assert_eq!(mmu.pages(), 4, "one shadow page per level of the same table");
}

#[test]
fn reserved_bits_fault_with_rsvd_and_are_never_shadowed() {
    let mut mmu = new_mmu(4096, 2);
    let g = mmu.guest();
    one_path(g);
    g.write(Gpa(0x4000), 8, 0x70_000 | P | RW | US | A | D | 1 << 47).unwrap();
    let mut cpu = four_level(&mmu, 1);
    cpu.efer_nxe = false;
    g.write(Gpa(0x4008), 8, 0x71_000 | P | RW | US | A | D | XD).unwrap();
    mmu.load_cr3(&cpu).unwrap();
    let r = AccessKind::user(AccessOp::Read);
    let rsvd = PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::RSVD;
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0), r), Outcome::Pf(rsvd));
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x1000), r), Outcome::Pf(rsvd), "XD without EFER.NXE");
    let mut leaves = 0;
    mmu.for_each_mapping(|_, _, _| leaves += 1);
    assert_eq!(leaves, 0);
}

#[test]
fn continuous_self_writes_are_bounded_and_flooded_tables_unprotected() {
    let mut mmu = new_mmu(4096, 2);
    identity_2m(&mmu);
    let g = mmu.guest();
    // Address space 1: PML4 6, PDPT 7, PD 8, the same PT.
    g.write(Gpa(0x6000), 8, 0x7000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x7000), 8, 0x8000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x8000), 8, 0x4000 | P | RW | US | A).unwrap();
    let as0 = four_level(&mmu, 1);
    let as1 = four_level(&mmu, 6);
    let r = AccessKind::user(AccessOp::Read);
    mmu.load_cr3(&as1).unwrap();
    run_access(&mut mmu, &as1, Gva(0x5000), r);
    mmu.load_cr3(&as0).unwrap();
    assert!(mmu.is_write_tracked(Gfn(7)));

    let w = AccessKind::supervisor(AccessOp::Write);
    let write = |mmu: &mut Mmu, gva: u64, value: u64| {
        let faults = mmu.stats().faults;
        let out = match run_access(mmu, &as0, Gva(gva), w) {
            Outcome::Emulated(gpa) => {
                mmu.emulated_write(gpa, 8, value).unwrap();
                true
            }
            Outcome::Host(_) => {
                mmu.guest().write(Gpa(gva), 8, value).unwrap();
                false
            }
            other => panic!("{other:?}"),
        };
        assert!(mmu.stats().faults - faults <= 8, "bounded work per write");
        assert!(mmu.pages() <= 16);
        out
    };
    // The other address space's PDPT: emulated until the flood detector
    // zaps its shadow, then written directly.
    let emulated = (0..1000u64).filter(|&v| write(&mut mmu, 0x7008, v << 12)).count();
    assert!(emulated <= 3, "{emulated} writes emulated");
    assert!(!mmu.is_write_tracked(Gfn(7)));
    // The PD its own writes are translated through stays protected (it
    // must be shadowed to translate them), each write bounded.
    let emulated = (0..1000u64).filter(|&v| write(&mut mmu, 0x3008, v << 12)).count();
    assert_eq!(emulated, 1000);
    assert!(mmu.stats().flood_zaps > 300);
    // Translations are still exact, in both address spaces.
    assert_eq!(run_access(&mut mmu, &as0, Gva(0x5123), r), expected(&mmu, &as0, Gva(0x5123), r));
    mmu.load_cr3(&as1).unwrap();
    assert_eq!(run_access(&mut mmu, &as1, Gva(0x5123), r), expected(&mmu, &as1, Gva(0x5123), r));
}

/// A store into a write-protected guest table that the embedder cannot emulate (Linux's
/// locked read-modify-writes, string stores into recycled table pages): unprotecting the
/// frame lets the guest's retried store go through, and the other address space that
/// used the table refaults onto its new contents.
#[test]
fn an_unprotected_guest_table_takes_the_guest_store_and_is_shadowed_again_on_use() {
    let mut mmu = new_mmu(4096, 2);
    identity_2m(&mmu);
    let g = mmu.guest();
    // Address space 1: PML4 6, PDPT 7, PD 8, the shared PT 4.
    g.write(Gpa(0x6000), 8, 0x7000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x7000), 8, 0x8000 | P | RW | US | A).unwrap();
    g.write(Gpa(0x8000), 8, 0x4000 | P | RW | US | A).unwrap();
    let as0 = four_level(&mmu, 1);
    let as1 = four_level(&mmu, 6);
    let r = AccessKind::user(AccessOp::Read);
    let w = AccessKind::supervisor(AccessOp::Write);
    mmu.load_cr3(&as1).unwrap();
    assert!(matches!(run_access(&mut mmu, &as1, Gva(0x5000), r), Outcome::Host(_)));
    mmu.load_cr3(&as0).unwrap();
    assert!(mmu.is_write_tracked(Gfn(8)));
    assert_eq!(run_access(&mut mmu, &as0, Gva(0x8000), w), Outcome::Emulated(Gpa(0x8000)));
    assert_eq!(mmu.unprotect_gfn(Gfn(8)), 1, "the PD's one shadow page");
    assert!(!mmu.is_write_tracked(Gfn(8)));
    assert_eq!(mmu.unprotect_gfn(Gfn(8)), 0);
    // The retried store completes on a writable leaf; the guest repoints its PD entry.
    assert!(matches!(run_access(&mut mmu, &as0, Gva(0x8000), w), Outcome::Host(_)));
    mmu.guest().write(Gpa(0x8000), 8, 0x9000 | P | RW | US | A).unwrap();
    mmu.guest().write(Gpa(0x9000 + 8 * 5), 8, 0x77_000 | P | RW | US | A | D).unwrap();
    mmu.load_cr3(&as1).unwrap();
    assert_eq!(run_access(&mut mmu, &as1, Gva(0x5123), r), expected(&mmu, &as1, Gva(0x5123), r));
    assert_eq!(
        expected(&mmu, &as1, Gva(0x5123), r),
        Outcome::Host(host_addr(&slots(), Gpa(0x77_123)).unwrap())
    );
    assert!(mmu.is_write_tracked(Gfn(8)), "shadowed again once a walk uses it");
}

#[test]
fn unsync_leaf_tables_are_resynced_at_invlpg_cr3_load_and_flush() {
    let mut mmu = new_mmu(4096, 2);
    let g = mmu.guest();
    self_mapped_pt(g);
    // Data at 0x10000.
    g.write(Gpa(0x4000 + 8 * 16), 8, 0x80_000 | P | RW | US | A | D).unwrap();
    let cpu = four_level(&mmu, 1);
    mmu.load_cr3(&cpu).unwrap();
    let r = AccessKind::user(AccessOp::Read);
    let w = AccessKind::user(AccessOp::Write);
    let host = |gpa| Outcome::Host(host_addr(&slots(), Gpa(gpa)).unwrap());
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x80_000));
    // Writing the leaf table through its own mapping: it goes unsync, the
    // write completes without emulation.
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x4000 + 8 * 16), w), host(0x4000 + 8 * 16));
    assert_eq!(mmu.unsync_pages(), 1);
    assert!(!mmu.is_write_tracked(Gfn(4)));
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0x81_000 | P | US | A | D).unwrap();
    // Stale until the guest invalidates, like a TLB.
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x80_000));
    mmu.invlpg(&cpu, Gva(0x10000));
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x81_000));
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0x82_000 | P | US | A | D).unwrap();
    mmu.load_cr3(&cpu).unwrap();
    assert_eq!(mmu.unsync_pages(), 0, "CR3 load resyncs");
    assert!(mmu.is_write_tracked(Gfn(4)), "and write-protects the table again");
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x82_000));
    assert_eq!(
        run_access(&mut mmu, &cpu, Gva(0x10000), w),
        Outcome::Pf(PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER)
    );
}

/// A dirty-bit log of slot 0 as the fault path sees it.
struct DbitLog(mmu_generic::dirty_log::SlotDirtyLog);

impl DbitLog {
    /// Starts a bitmap log of slot 0 by D bits, its flush done.
    fn start(mmu: &mut Mmu) -> Self {
        let slot = *mmu.memslots().get(SlotId(0)).unwrap();
        let mut flush = FlushToken::new();
        let log = mmu_generic::dirty_log::SlotDirtyLog::start(
            &slot,
            Tracking::HardwareDirty,
            LogMode::Bitmap,
            mmu,
            &mut flush,
        )
        .unwrap();
        flush.flush(&mut NoTlb);
        Self(log)
    }
}

impl DirtyTracker for DbitLog {
    fn write_protected(&self, _: SlotId) -> bool {
        false
    }
    fn note_writable(&mut self, _: SlotId, gfn: Gfn, h: PteHandle) -> bool {
        self.0.note_writable(gfn, h, None).is_ok()
    }
    fn mark(&mut self, _: SlotId, gfn: Gfn) -> bool {
        self.0.mark(gfn, None).is_ok()
    }
}

/// One dirty-bit round as an embedder runs it: get-and-clear, which also takes the D
/// bits the MMU's own changes took from leaves (the log's start turned their recording
/// on, the round drains it). The guest frames reported.
fn dbit_round(mmu: &mut Mmu, log: &mut DbitLog) -> Vec<u64> {
    let mut words = Vec::new();
    log.0.get_and_clear(mmu, &mut words).unwrap().flush(&mut NoTlb);
    mmu.take_flush().flush(&mut NoTlb);
    let mut out = Vec::new();
    for (w, word) in words.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push(64 * w as u64 + b);
            }
        }
    }
    out
}

/// Found by Debian's kernel under shadow paging (33 lost writes in a D-bit migration):
/// a page the guest wrote through a writable, dirty leaf and then made a page table
/// was write-protected by the MMU with its D bit still set; the dirty-bit chain skips
/// leaves that are no longer writable, so the write was never reported. Linux does
/// this for every page-table page it allocates (zeroed, then linked).
#[test]
fn a_dirty_page_that_becomes_a_guest_table_is_still_reported_under_dirty_bits() {
    let mut mmu = new_mmu(4096, 2);
    let cpu = identity_2m(&mmu);
    mmu.load_cr3(&cpu).unwrap();
    let mut log = DbitLog::start(&mut mmu);
    let w = AccessKind::supervisor(AccessOp::Write);
    let r = AccessKind::supervisor(AccessOp::Read);
    let write = |mmu: &mut Mmu, log: &mut DbitLog, gva: u64| {
        for _ in 0..4 {
            if mmu.hw_access(&cpu, Gva(gva), w).is_ok() {
                return;
            }
            assert_eq!(mmu.page_fault(&cpu, Gva(gva), w, log), Ok(ShadowFault::Fixed));
        }
        panic!("the write to {gva:#x} never completed");
    };
    write(&mut mmu, &mut log, 0x50_000);
    assert_eq!(dbit_round(&mut mmu, &mut log), vec![0x50]);
    // The guest fills the page (a PTE of its future table), through the writable leaf.
    write(&mut mmu, &mut log, 0x50_000);
    mmu.guest().write(Gpa(0x50_000), 8, 0x60_000 | P | RW | A | D).unwrap();
    // It links the page as the page table of 2-4 MiB (an emulated write to the
    // write-protected PD) and touches 2 MiB: the MMU shadows and write-protects it.
    assert!(matches!(run_access(&mut mmu, &cpu, Gva(0x3008), w), Outcome::Emulated(_)));
    mmu.emulated_write(Gpa(0x3008), 8, 0x50_000 | P | RW | US | A).unwrap();
    assert!(matches!(run_access(&mut mmu, &cpu, Gva(0x20_0000), r), Outcome::Host(_)));
    assert!(mmu.is_write_tracked(Gfn(0x50)));
    let got = dbit_round(&mut mmu, &mut log);
    assert!(got.contains(&0x50), "the write before the page became a table was lost: {got:x?}");
}

/// A 4-level guest whose page table at gfn 4 maps itself at gva 0x4000 and data gfn
/// 0x80 at 0x10000, dirty-logged by D bits; the table has gone unsync (written through
/// its own mapping) and the data page has been written in one round and again in the
/// next. The two tests below then take the leaf's write away in two ways.
fn unsync_table_with_a_dirty_page() -> (Mmu, GuestCpu, DbitLog) {
    let mut mmu = new_mmu(4096, 2);
    let g = mmu.guest();
    self_mapped_pt(g);
    g.write(Gpa(0x4000 + 8 * 16), 8, 0x80_000 | P | RW | US | A | D).unwrap();
    let cpu = four_level(&mmu, 1);
    mmu.load_cr3(&cpu).unwrap();
    let mut log = DbitLog::start(&mut mmu);
    user_write(&mut mmu, &cpu, &mut log, 0x4000 + 8 * 16);
    assert_eq!(mmu.unsync_pages(), 1);
    user_write(&mut mmu, &cpu, &mut log, 0x10_000);
    dbit_round(&mut mmu, &mut log);
    user_write(&mut mmu, &cpu, &mut log, 0x10_000);
    (mmu, cpu, log)
}

/// A user write that completes, faulting (and fixing) as often as the MMU needs.
fn user_write(mmu: &mut Mmu, cpu: &GuestCpu, log: &mut impl DirtyTracker, gva: u64) {
    let w = AccessKind::user(AccessOp::Write);
    for _ in 0..4 {
        if mmu.hw_access(cpu, Gva(gva), w).is_ok() {
            return;
        }
        assert_eq!(mmu.page_fault(cpu, Gva(gva), w, log), Ok(ShadowFault::Fixed));
    }
    panic!("the write to {gva:#x} never completed");
}

/// The same loss through a resync: the guest cleans the D bit of a PTE in an unsync
/// page table (Linux's `pte_mkclean`) after writing the page; the INVLPG's resync makes
/// the leaf read-only, and its D bit must still reach the log.
#[test]
fn a_resync_that_makes_a_dirty_leaf_read_only_keeps_its_write_in_the_dirty_log() {
    let (mut mmu, cpu, mut log) = unsync_table_with_a_dirty_page();
    // The guest cleans its PTE (same frame, D clear) and invalidates it.
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0x80_000 | P | RW | US | A).unwrap();
    mmu.invlpg(&cpu, Gva(0x10_000));
    let mut writable = true;
    mmu.for_each_mapping(|gfn, _, wr| {
        if gfn == Gfn(0x80) {
            writable = wr;
        }
    });
    assert!(!writable, "the resync took write away");
    let got = dbit_round(&mut mmu, &mut log);
    assert!(got.contains(&0x80), "the write before the resync was lost: {got:x?}");
}

/// The MMU's own zap: the guest unmaps a written page in an unsync page table and
/// invalidates it; the resync zaps the dirty leaf, whose D bit leaves the hardware
/// without the drivers. The log's start turned the recording of such leaves on
/// (`MmuBackend::track_lost_dirty`) and the round drains it, with no call by the
/// embedder; the log's stop turns the recording off again.
#[test]
fn a_dirty_leaf_the_resync_zaps_is_reported_without_the_embedder_asking() {
    let (mut mmu, cpu, mut log) = unsync_table_with_a_dirty_page();
    // The guest unmaps the page and invalidates it: the resync zaps the dirty leaf.
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0).unwrap();
    mmu.invlpg(&cpu, Gva(0x10_000));
    let mut mapped = false;
    mmu.for_each_mapping(|gfn, _, _| mapped |= gfn == Gfn(0x80));
    assert!(!mapped, "the resync zapped the leaf");
    let got = dbit_round(&mut mmu, &mut log);
    assert!(got.contains(&0x80), "the write before the zap was lost: {got:x?}");
    assert!(dbit_round(&mut mmu, &mut log).is_empty(), "reported once");
    log.0.stop(&mut mmu);
    // With no log left, nothing is recorded any more.
    mmu.guest().write(Gpa(0x4000 + 8 * 18), 8, 0x81_000 | P | RW | US | A | D).unwrap();
    mmu.invlpg(&cpu, Gva(0x12_000));
    user_write(&mut mmu, &cpu, &mut arch_x86::shadow::NoDirtyLog, 0x12_000);
    mmu.guest().write(Gpa(0x4000 + 8 * 18), 8, 0).unwrap();
    mmu.invlpg(&cpu, Gva(0x12_000));
    assert!(mmu.take_zapped_dirty().is_empty(), "recording stopped with the last log");
    mmu.take_flush().flush(&mut NoTlb);
}

/// PML4 at gfn 1, PDPT 2, PD 3, PT 4: the first 2 MiB mapped one to one,
/// the tables included.
fn identity_2m(mmu: &Mmu) -> GuestCpu {
    let g = mmu.guest();
    one_path(g);
    for i in 0..512u64 {
        g.write(Gpa(0x4000 + 8 * i), 8, (i << 12) | P | RW | US | A | D).unwrap();
    }
    four_level(mmu, 1)
}

#[test]
fn obsolete_pages_are_reclaimed_in_batches_without_reading_guest_tables() {
    let mut mmu = new_mmu(4096, 2);
    let cpu = identity_2m(&mmu);
    mmu.load_cr3(&cpu).unwrap();
    let r = AccessKind::user(AccessOp::Read);
    for page in 0..512u64 {
        assert!(matches!(run_access(&mut mmu, &cpu, Gva(page << 12), r), Outcome::Host(_)));
    }
    // The guest writes its page table through its own mapping: unsync.
    let w = AccessKind::user(AccessOp::Write);
    assert!(matches!(run_access(&mut mmu, &cpu, Gva(0x4010), w), Outcome::Host(_)));
    assert_eq!(mmu.unsync_pages(), 1);
    let pages = mmu.pages();
    assert_eq!(pages, 4);
    mmu.invalidate_all();
    assert_eq!(mmu.unsync_pages(), 0, "obsolete pages are not synced");
    let reads = mmu.guest().reads();
    let mut yields = 0;
    let report = mmu.reclaim_obsolete(2, || {
        yields += 1;
        true
    });
    assert_eq!(mmu.guest().reads(), reads, "zapping obsolete pages syncs nothing");
    assert_eq!((report.freed, report.batches, yields), (4, 2, 2));
    assert_eq!(mmu.pages(), 0);
    assert_eq!(mmu.rmap().pool().bytes_in_use(), 0);
    assert_eq!(mmu.memory().frames_in_use(), 0);
    // The guest runs on fresh tables.
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x5123), r), expected(&mmu, &cpu, Gva(0x5123), r));
}

#[test]
fn cr3_switches_hit_the_root_cache() {
    let mut d = Differential::new(Flavor { mode: GuestMode::Four, pse: false, pse36: true }, 3, 4096, 2);
    for k in [1, 2, 0, 1, 2, 0] {
        d.switch_cr3(k);
    }
    assert_eq!(d.mmu.stats().root_hits, 4);
}

#[test]
fn pae_root_must_be_below_4g_and_bad_pdptrs_are_refused() {
    let mut mmu: Mmu = ShadowMmu::new(
        ShadowConfig::new(CpuFeatures::typical()),
        SimMemory::new(Pfn(0x100_0000), 64),
        SimGuestRam::new(&[(Gfn(0), RAM_PAGES)]),
        LinearHost::new(PFN_OFFSET, PageSize::Size4K),
        slots(),
    );
    let mut cpu = GuestCpu::new(GuestMode::Bits32, 0x1000);
    assert_eq!(mmu.load_cr3(&cpu), Err(ShadowError::NoFrameBelow4G));
    cpu.mode = GuestMode::Pae;
    cpu.pdptrs = [P | RW, 0, 0, 0];
    assert_eq!(mmu.load_cr3(&cpu), Err(ShadowError::BadPdptrs));
}

/// Found by Debian's kernel under shadow paging (its absent-MMIO check read a stale page
/// instead of faulting): a page table goes unsync; the guest unlinks it from its page
/// directory (an emulated write drops the shadow link), changes entries of it and
/// INVLPGs them, which syncs nothing (the INVLPG walk no longer reaches the page), and
/// links it again. Linux does this when it frees a page table and reuses the page as
/// another. Linking the unsync shadow page again must not bring back the translations
/// of the entries changed while it was unlinked.
#[test]
fn an_unsync_table_linked_again_does_not_serve_entries_changed_while_unlinked() {
    let mut mmu = new_mmu(4096, 2);
    let g = mmu.guest();
    self_mapped_pt(g);
    // Data at 0x10000 and 0x11000.
    g.write(Gpa(0x4000 + 8 * 16), 8, 0x80_000 | P | US | A | D).unwrap();
    g.write(Gpa(0x4000 + 8 * 17), 8, 0x81_000 | P | US | A | D).unwrap();
    let cpu = four_level(&mmu, 1);
    mmu.load_cr3(&cpu).unwrap();
    let r = AccessKind::user(AccessOp::Read);
    let w = AccessKind::user(AccessOp::Write);
    let host = |gpa| Outcome::Host(host_addr(&slots(), Gpa(gpa)).unwrap());
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x80_000));
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x11000), r), host(0x81_000));
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x4000 + 8 * 20), w), host(0x4000 + 8 * 20));
    assert_eq!(mmu.unsync_pages(), 1);
    // Unlinked (the PD is write-protected: the write is emulated), rewritten, the old
    // translations invalidated as the guest must.
    assert!(mmu.is_write_tracked(Gfn(3)));
    mmu.emulated_write(Gpa(0x3000), 8, 0).unwrap();
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0x82_000 | P | US | A | D).unwrap();
    mmu.guest().write(Gpa(0x4000 + 8 * 17), 8, 0x83_000 | P | US | A | D).unwrap();
    for gva in [0x10000, 0x11000] {
        mmu.invlpg(&cpu, Gva(gva));
    }
    mmu.take_flush().flush(&mut NoTlb);
    // Linked again: both addresses translate through the table as it is now.
    mmu.emulated_write(Gpa(0x3000), 8, 0x4000 | P | RW | US | A).unwrap();
    assert_eq!(run_access(&mut mmu, &cpu, Gva(0x10000), r), host(0x82_000));
    assert_eq!(
        run_access(&mut mmu, &cpu, Gva(0x11000), r),
        host(0x83_000),
        "a stale leaf of the unsync page"
    );
    assert!(mmu.is_write_tracked(Gfn(4)), "linked again, the table is write-protected again");
}

/// The same stale translation through a cached root: the guest writes a page table
/// shared by two address spaces while it is unsync under one of them, then switches to
/// the other, and the embedder's first word of the switch is a fault under the new CR3
/// (no `load_cr3`). The switch the fault makes flushes as the CR3 write did.
#[test]
fn a_fault_under_a_cached_root_sees_what_the_guest_wrote_before_the_switch() {
    let mut mmu = new_mmu(4096, 2);
    let g = mmu.guest();
    for (pml4, pdpt, pd) in [(0x1000u64, 0x2000u64, 0x3000u64), (0x5000, 0x6000, 0x7000)] {
        g.write(Gpa(pml4), 8, pdpt | P | RW | US | A).unwrap();
        g.write(Gpa(pdpt), 8, pd | P | RW | US | A).unwrap();
        g.write(Gpa(pd), 8, 0x4000 | P | RW | US | A).unwrap();
    }
    g.write(Gpa(0x4000 + 8 * 4), 8, 0x4000 | P | RW | US | A | D).unwrap();
    g.write(Gpa(0x4000 + 8 * 16), 8, 0x80_000 | P | US | A | D).unwrap();
    let (a, b) = (four_level(&mmu, 1), four_level(&mmu, 5));
    let r = AccessKind::user(AccessOp::Read);
    let w = AccessKind::user(AccessOp::Write);
    let host = |gpa| Outcome::Host(host_addr(&slots(), Gpa(gpa)).unwrap());
    mmu.load_cr3(&a).unwrap();
    assert_eq!(run_access(&mut mmu, &a, Gva(0x10000), r), host(0x80_000));
    mmu.load_cr3(&b).unwrap();
    assert_eq!(run_access(&mut mmu, &b, Gva(0x10000), r), host(0x80_000));
    assert_eq!(run_access(&mut mmu, &b, Gva(0x4000 + 8 * 20), w), host(0x4000 + 8 * 20));
    assert_eq!(mmu.unsync_pages(), 1);
    mmu.guest().write(Gpa(0x4000 + 8 * 16), 8, 0x82_000 | P | US | A | D).unwrap();
    // MOV CR3 to a's tables; the embedder reports a fault under them, not the load.
    assert_eq!(
        run_access(&mut mmu, &a, Gva(0x11000), r),
        Outcome::Pf(PfErrorCode::USER),
        "nothing mapped at 0x11000"
    );
    assert_eq!(
        run_access(&mut mmu, &a, Gva(0x10000), r),
        host(0x82_000),
        "a stale leaf under a's cached root"
    );
}
