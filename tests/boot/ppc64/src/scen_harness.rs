//! The generic scenario suite of `vmmu-tests` (`tests/src/harness.rs`, the very code the
//! host runs in `tests/tests/scenarios.rs`, the `hpt_*` back ends) against the crate's in-memory HPT:
//! `vmmu_tests::ppc::PpcGuest`, a guest whose `GuestHpt` (over the big-endian
//! `InMemoryHpt`, in the layout this CPU's hypervisor would use) serves its H_ENTERs, the
//! CPU played by the crate's software MMU, which sets R and C in the table. Here it runs
//! on a big-endian CPU. One line per harness scenario.

use crate::report::scenario;
use alloc::string::String;
use arch_ppc_book3s::hpte::HpteFormat;
use arch_ppc_book3s::pagesize::PageSizes;
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::age::NoAccessedBit;
use mmu_generic::dirty_log::{LogMode, Tracking};
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use vmmu_tests::harness::{ageing, demand_faults, dirty_rounds, invalidation, outside_slots_is_mmio};
use vmmu_tests::ppc::PpcGuest;

/// `format!` without `alloc::fmt::format`, whose landing pad would need an
/// unwinder in this panic=abort kernel: the message is written through
/// `core::fmt::Write` into a `String`.
macro_rules! msg {
    ($($arg:tt)*) => {{
        let mut s = String::new();
        let _ = core::fmt::Write::write_fmt(&mut s, format_args!($($arg)*));
        s
    }};
}

/// The host suite's layout: slot 2 aliases the first 16 pages of slot 1's host memory,
/// read-only. (Host addresses are never dereferenced: the software MMU only sets bits.)
fn slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    let made = b
        .create(Memslot::new(SlotId(0), Gfn(0), 1024, Hva(0x1000_0000), SlotFlags::empty()))
        .and_then(|b| {
            b.create(Memslot::new(SlotId(1), Gfn(0x10000), 300, Hva(0x2000_0000), SlotFlags::empty()))
        })
        .and_then(|b| {
            b.create(Memslot::new(SlotId(2), Gfn(0x20000), 16, Hva(0x2000_0000), SlotFlags::READONLY))
        })
        .and_then(|b| b.build());
    made.expect("a fixed, valid layout")
}

/// One 32 MiB slot at 1 GiB, for 16 MiB pages.
fn big_slot() -> Memslots {
    let mut b = MemslotsBuilder::new();
    let made = b
        .create(Memslot::new(SlotId(0), Gfn(0x4_0000), 8192, Hva(0x4000_0000), SlotFlags::empty()))
        .and_then(|b| b.build());
    made.expect("a fixed, valid layout")
}

/// Nine 256-page slots in nine segments whose VSIDs differ only in their low four bits:
/// segment 0's 256 primary groups each receive nine pages, so one in nine goes to its
/// secondary group (`mapping::insert`'s fallback, H_PTEG_FULL from `GuestHpt`).
fn crowded_slots() -> Memslots {
    let mut b = MemslotsBuilder::new();
    for s in 0..9u16 {
        let base = u64::from(s);
        let slot = Memslot::new(
            SlotId(s),
            Gfn(base << 16),
            256,
            Hva(0x1_0000_0000 + (base << 20)),
            SlotFlags::empty(),
        );
        b.create(slot).expect("a fixed, valid layout");
    }
    b.build().expect("a fixed, valid layout")
}

/// One slot of 17 × 2048 pages in one segment: pages `i` and `i + 2048` share a primary
/// group, so every group pair receives 17 pages for its 16 slots and the guest evicts its
/// own entries (H_REMOVE), written ones included.
fn overcrowded_slot() -> Memslots {
    let mut b = MemslotsBuilder::new();
    let made = b
        .create(Memslot::new(SlotId(0), Gfn(0), 17 * 2048, Hva(0x1_0000_0000), SlotFlags::empty()))
        .and_then(|b| b.build());
    made.expect("a fixed, valid layout")
}

struct Ctx {
    sizes: PageSizes,
    format: HpteFormat,
}

impl Ctx {
    fn guest(&self, slots: Memslots, pft_shift: u32, page_shift: u32) -> Result<PpcGuest, String> {
        PpcGuest::new(slots, pft_shift, self.format, self.sizes, page_shift)
            .map_err(|e| msg!("PpcGuest::new: {e:?}"))
    }
}

fn invariants(g: &PpcGuest) -> Result<(), String> {
    g.hpt().check_invariants().map_err(|v| msg!("table invariant broken: {v:?}"))
}

fn figures(g: &PpcGuest) -> String {
    let c = g.counters;
    msg!(
        "{} H_ENTER ({} secondary), {} fault_in, {} unprotect; invariants hold",
        c.entered,
        c.secondary,
        c.faulted_in,
        c.unprotected
    )
}

fn report(name: &str, r: Result<String, String>) {
    match r {
        Ok(line) => scenario(name, true, format_args!("{}", line)),
        Err(e) => scenario(name, false, format_args!("{}", e)),
    }
}

fn demand(ctx: &Ctx, page_shift: u32, want_entered: u64) -> Result<String, String> {
    let mut g = ctx.guest(slots(), 18, page_shift)?;
    let faults = demand_faults(&mut g)?;
    invariants(&g)?;
    // One fault, one H_ENTER per page: 4 KiB pages, or 64 KiB ones where a slot allows.
    if faults != want_entered || g.counters.entered != want_entered {
        return Err(msg!("{faults} faults, {} H_ENTER; want {want_entered}", g.counters.entered));
    }
    Ok(msg!("1340 frames in 3 slots, {faults} faults, each page once; {}", figures(&g)))
}

fn mmio(ctx: &Ctx) -> Result<String, String> {
    let mut g = ctx.guest(slots(), 18, 12)?;
    outside_slots_is_mmio(&mut g, Gfn(5000))?;
    outside_slots_is_mmio(&mut g, Gfn(u64::MAX))?;
    invariants(&g)?;
    if g.counters.entered != 0 {
        return Err(msg!("{} entries entered outside memory", g.counters.entered));
    }
    Ok(String::from("gfn 5000 and u64::MAX: H_ENTER refused with H_PARAMETER, MMIO exits, nothing mapped"))
}

fn dirty(ctx: &Ctx, tracking: Tracking, mode: LogMode) -> Result<String, String> {
    let mut g = ctx.guest(slots(), 18, 12)?;
    let r = dirty_rounds(&mut g, SlotId(0), tracking, mode, 12, 1)?;
    invariants(&g)?;
    if r.written != r.reported || (tracking == Tracking::WriteProtect && g.counters.unprotected == 0) {
        return Err(msg!("{r:?}, {}", figures(&g)));
    }
    Ok(msg!(
        "{} rounds, {} page writes, {} reported, none missed or extra; {}",
        r.rounds,
        r.written,
        r.reported,
        figures(&g)
    ))
}

fn age(ctx: &Ctx) -> Result<String, String> {
    let mut g = ctx.guest(slots(), 18, 12)?;
    let y1 = ageing(&mut g, SlotId(1), NoAccessedBit::ReportOld, 1)?;
    let y0 = ageing(&mut g, SlotId(0), NoAccessedBit::ReportOld, 11)?;
    invariants(&g)?;
    if y0 == 0 || y1 == 0 {
        return Err(String::from("no page found young"));
    }
    Ok(msg!(
        "slot 1: {y1} young pages, slot 0: {y0}, exactly the touched ones, none after age; {}",
        figures(&g)
    ))
}

fn inval(ctx: &Ctx) -> Result<String, String> {
    let mut g = ctx.guest(slots(), 18, 12)?;
    demand_faults(&mut g)?;
    let z = invalidation(&mut g, SlotId(1), 4, 20, false)?;
    demand_faults(&mut g)?;
    invariants(&g)?;
    if z != 32 || g.counters.faulted_in != 32 || g.counters.entered != 1340 {
        return Err(msg!("{z} zapped (want 20 + 12 aliases); {}", figures(&g)));
    }
    Ok(msg!("{z} entries zapped (20 + 12 read-only aliases), left absent, back by fault_in; {}", figures(&g)))
}

fn inval_16m(ctx: &Ctx) -> Result<String, String> {
    let mut g = ctx.guest(big_slot(), 20, 24)?;
    demand_faults(&mut g)?;
    let z = invalidation(&mut g, SlotId(0), 600, 3, true)?;
    invariants(&g)?;
    if g.counters.entered != 2 || z != 1 || g.counters.faulted_in != 1 {
        return Err(msg!("{z} zapped; {}", figures(&g)));
    }
    Ok(msg!("8192 frames in two 16 MiB pages; 3 frames invalidated zap 1 entry; {}", figures(&g)))
}

fn crowded(ctx: &Ctx) -> Result<String, String> {
    let mut g = ctx.guest(crowded_slots(), 18, 12)?;
    let faults = demand_faults(&mut g)?;
    let r = dirty_rounds(&mut g, SlotId(8), Tracking::HardwareDirty, LogMode::Bitmap, 6, 5)?;
    let z = invalidation(&mut g, SlotId(8), 10, 30, false)?;
    invariants(&g)?;
    if faults != 9 * 256 || g.counters.secondary != 256 || r.written != r.reported || z != 30 {
        return Err(msg!("{faults} faults, {r:?}, {z} zapped; {}", figures(&g)));
    }
    Ok(msg!(
        "2304 pages, 9 per primary group: 256 placed in the secondary by mapping::insert; then {} C-bit rounds ({} writes, all reported) and 30 zapped/faulted in; {}",
        r.rounds,
        r.written,
        figures(&g)
    ))
}

fn evictions(ctx: &Ctx, tracking: Tracking) -> Result<String, String> {
    let mut g = ctx.guest(overcrowded_slot(), 18, 12)?;
    let r = dirty_rounds(&mut g, SlotId(0), tracking, LogMode::Bitmap, 12, 2)?;
    invariants(&g)?;
    let c = g.counters;
    let lost = g.hpt().lost_dirty_pages();
    if r.written != r.reported || c.evicted == 0 || (tracking == Tracking::HardwareDirty && lost == 0) {
        return Err(msg!("{r:?}, {c:?}"));
    }
    Ok(msg!(
        "34816 pages for 16384 slots: {} guest evictions, {} C bits of evicted entries queued by GuestHpt and drained by the core's harvest; {} rounds, {} writes, all reported; {}",
        c.evicted,
        lost,
        r.rounds,
        r.written,
        figures(&g)
    ))
}

/// Runs the harness suite with the page sizes the device tree lists and the table layout
/// of this CPU's hypervisor.
pub fn run(sizes: PageSizes, format: HpteFormat) {
    let ctx = Ctx { sizes, format };
    let listed = |shift: u32| sizes.segment(shift).is_some_and(|s| s.encoding(shift).is_some());
    report("harness demand-faults 4K", demand(&ctx, 12, 1340));
    if listed(16) {
        // Slot 0: 64 pages of 64 KiB; slot 2: one; slot 1 (300 frames) stays 4 KiB.
        report("harness demand-faults 64K", demand(&ctx, 16, 64 + 300 + 1));
    } else {
        crate::kprintln!("SKIP harness demand-faults 64K: ibm,segment-page-sizes does not list 64K");
    }
    report("harness outside-slots-mmio", mmio(&ctx));
    let runs = [
        ("harness dirty-rounds bitmap (write protect)", Tracking::WriteProtect, LogMode::Bitmap),
        (
            "harness dirty-rounds manual-protect (write protect)",
            Tracking::WriteProtect,
            LogMode::ManualProtect,
        ),
        ("harness dirty-rounds ring (write protect)", Tracking::WriteProtect, LogMode::Ring),
        ("harness dirty-rounds bitmap (C bit)", Tracking::HardwareDirty, LogMode::Bitmap),
        ("harness dirty-rounds manual-protect (C bit)", Tracking::HardwareDirty, LogMode::ManualProtect),
    ];
    for (name, tracking, mode) in runs {
        report(name, dirty(&ctx, tracking, mode));
    }
    report("harness ageing (R bit)", age(&ctx));
    report("harness pteg-overflow", crowded(&ctx));
    report("harness dirty-rounds with evictions (C bit)", evictions(&ctx, Tracking::HardwareDirty));
    report("harness dirty-rounds with evictions (write protect)", evictions(&ctx, Tracking::WriteProtect));
    report("harness invalidation 4K", inval(&ctx));
    if listed(24) {
        report("harness invalidation 16M", inval_16m(&ctx));
    } else {
        crate::kprintln!("SKIP harness invalidation 16M: ibm,segment-page-sizes does not list 16M (cap-hpt-max-page-size=16M)");
    }
}
