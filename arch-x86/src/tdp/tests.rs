use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use mmu_generic::addr::{Gfn, GfnRange, Gpa, Hva, HvaRange, Pfn};
use mmu_generic::backend::BackendError;
use mmu_generic::backend::{FlushToken, MmuBackend};
use mmu_generic::dirty_log::{DirtyLogError, FaultCtx, LogMode, SlotDirtyLog, Tracking, WriteGrant};
use mmu_generic::dirty_ring::{DirtyRing, RingPush};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::{Memslot, Memslots, MemslotsBuilder, SlotFlags, SlotId};
use mmu_generic::pte_list::RmapError;

use super::*;
use crate::exit::{NestedExit, Origin};
use crate::format::ept::Ept;
use crate::format::npt::Npt;
use crate::format::{PhysAddrWidth, WalkLength};
use crate::frame::SimMemory;
use crate::testing::{FlushRecorder, LinearHost};
use crate::walk::{translate, Translation, WalkError};

const GIB: u64 = 1 << 18; // frames per GiB

fn width() -> PhysAddrWidth {
    PhysAddrWidth::new(46).unwrap()
}

fn npt() -> Npt {
    Npt::new(WalkLength::Four, width())
}

fn ept(ad: bool) -> Ept {
    Ept::new(WalkLength::Four, width(), ad)
}

fn mem() -> SimMemory {
    // Tables high in the physical space: every address bit gets exercised.
    SimMemory::with_stride(Pfn(0x3_0000_0000), 7, 1 << 16)
}

fn slots(list: &[(u16, u64, u64, u64, SlotFlags)]) -> Memslots {
    let mut b = MemslotsBuilder::new();
    for &(id, gfn, npages, hva, flags) in list {
        b.create(Memslot::new(SlotId(id), Gfn(gfn), npages, Hva(hva), flags)).unwrap();
    }
    b.build().unwrap()
}

/// One 4 GiB slot at gpa 4 GiB, backed by 1 GiB-aligned host memory.
fn mmu_with<F: TdpFormat>(format: F, flags: SlotFlags) -> TdpMmu<F, SimMemory> {
    let mut mmu = TdpMmu::new(format, mem()).unwrap();
    let s = slots(&[(0, 4 * GIB, 4 * GIB, 0x40_0000_0000, flags)]);
    mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
    mmu
}

fn walk<F: TdpFormat>(
    mmu: &TdpMmu<F, SimMemory>,
    gpa: u64,
    access: Access,
) -> Result<Translation, WalkError> {
    translate(mmu.format(), mmu.memory(), mmu.root(), Gpa(gpa), access, Origin::Final)
}

fn fault<F: TdpFormat>(
    mmu: &mut TdpMmu<F, SimMemory>,
    host: &mut LinearHost,
    gpa: u64,
    access: Access,
) -> Result<FaultOutcome, TdpError> {
    let inv = InvalidationSeq::new();
    let mut flush = FlushToken::new();
    let r = mmu.handle_fault(Gpa(gpa), access, host, &inv, &mut flush);
    flush.flush(&mut FlushRecorder::default());
    r
}

/// A fault with the dirty-log context `logs` (and the vCPU's `ring`).
fn fault_logged<F: TdpFormat>(
    mmu: &mut TdpMmu<F, SimMemory>,
    host: &mut LinearHost,
    gpa: u64,
    access: Access,
    logs: &BTreeMap<SlotId, SlotDirtyLog>,
    ring: Option<&DirtyRing>,
) -> Result<FaultOutcome, TdpError> {
    let inv = InvalidationSeq::new();
    let mut flush = FlushToken::new();
    let ctx = FaultCtx::new(logs, ring);
    let r = mmu.handle_fault_logged(Gpa(gpa), access, host, &inv, &ctx, &mut flush);
    flush.flush(&mut FlushRecorder::default());
    r
}

/// A log of slot 0 of `slots`, started on an engine with nothing mapped.
fn log_of(slots: &Memslots, tracking: Tracking, mode: LogMode) -> BTreeMap<SlotId, SlotDirtyLog> {
    let mut blank = TdpMmu::new(npt(), mem()).unwrap();
    blank.set_memslots(slots, &mut FlushRecorder::default(), |_| {});
    let slot = *slots.get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let log = SlotDirtyLog::start(&slot, tracking, mode, &mut blank, &mut flush).unwrap();
    flush.flush(&mut FlushRecorder::default());
    BTreeMap::from([(SlotId(0), log)])
}

fn host(size: PageSize) -> LinearHost {
    LinearHost::new(0x100 * GIB, size)
}

fn each_format(mut f: impl FnMut(&dyn Fn() -> TdpMmu<Ept, SimMemory>, &dyn Fn() -> TdpMmu<Npt, SimMemory>)) {
    f(&|| mmu_with(ept(true), SlotFlags::empty()), &|| mmu_with(npt(), SlotFlags::empty()));
}

fn mapped(o: FaultOutcome) -> Mapping {
    match o {
        FaultOutcome::Mapped(m) => m,
        other => panic!("expected a mapping, got {other:?}"),
    }
}

#[test]
fn fault_maps_the_largest_page_that_slot_and_host_allow() {
    for size in PageSize::ALL {
        let mut mmu = mmu_with(npt(), SlotFlags::empty());
        let mut h = host(size);
        let gpa = (4 * GIB + GIB / 2 + 3) << 12;
        let m = mapped(fault(&mut mmu, &mut h, gpa | 0x10, Access::WRITE).unwrap());
        assert_eq!(m.size, size);
        assert_eq!(m.kind, MapKind::Installed);
        assert!(m.dirtied);
        let hva = 0x40_0000_0000 + gpa - ((4 * GIB) << 12);
        let t = walk(&mmu, gpa | 0x10, Access::WRITE).unwrap();
        assert_eq!(t.hpa, (h.pfn_of(Hva(hva)).0 << 12) | 0x10);
        assert_eq!(t.size, size);
    }
    let mut mmu = mmu_with(ept(true), SlotFlags::empty());
    mmu.set_max_page_size(PageSize::Size2M);
    let m = mapped(fault(&mut mmu, &mut host(PageSize::Size1G), (4 * GIB) << 12, Access::READ).unwrap());
    assert_eq!(m.size, PageSize::Size2M);
}

#[test]
fn misaligned_host_backing_limits_the_page_size() {
    let mut mmu = TdpMmu::new(npt(), mem()).unwrap();
    // The slot's hva is 2 MiB aligned but not 1 GiB aligned.
    let s = slots(&[(0, GIB, 2 * GIB, 0x40_0020_0000, SlotFlags::empty())]);
    mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
    let m = mapped(fault(&mut mmu, &mut host(PageSize::Size1G), GIB << 12, Access::READ).unwrap());
    assert_eq!(m.size, PageSize::Size2M);
}

#[test]
fn gfn_outside_every_memslot_is_mmio_and_maps_nothing() {
    each_format(|e, n| {
        let mut mmu = e();
        let o = fault(&mut mmu, &mut host(PageSize::Size4K), 0xfee0_0000, Access::WRITE).unwrap();
        assert_eq!(o, FaultOutcome::Mmio { gpa: Gpa(0xfee0_0000), access: Access::WRITE });
        assert_eq!(mmu.tables_in_use(), 1);
        let mut mmu = n();
        let o = fault(&mut mmu, &mut host(PageSize::Size4K), 0x1000, Access::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Mmio { .. }));
    });
}

#[test]
fn write_to_a_read_only_slot_is_denied_and_read_maps_read_only() {
    let mut mmu = mmu_with(ept(true), SlotFlags::READONLY);
    let mut h = host(PageSize::Size4K);
    let gpa = (4 * GIB) << 12;
    let o = fault(&mut mmu, &mut h, gpa, Access::WRITE).unwrap();
    assert_eq!(o, FaultOutcome::Denied(Denied::ReadOnlySlot { slot: SlotId(0), gfn: Gfn(4 * GIB) }));
    let m = mapped(fault(&mut mmu, &mut h, gpa, Access::READ).unwrap());
    assert_eq!(m.access, Access::READ | Access::EXEC);
    assert!(matches!(
        walk(&mmu, gpa, Access::WRITE),
        Err(WalkError::Exit { exit: NestedExit::EptViolation(_), .. })
    ));
}

#[test]
fn host_read_only_page_denies_a_write() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    let mut h = host(PageSize::Size4K);
    h.read_only.push(0x40_0000_0000 >> 12);
    let o = fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::WRITE).unwrap();
    assert_eq!(o, FaultOutcome::Denied(Denied::HostReadOnly(Gfn(4 * GIB))));
    let m = mapped(fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::READ).unwrap());
    assert!(!m.access.contains(Access::WRITE));
}

struct RacingHost<'a> {
    inner: LinearHost,
    inv: &'a InvalidationSeq,
}

impl HostMemory for RacingHost<'_> {
    fn resolve(&mut self, hva: Hva, write: bool) -> Result<HostPage, HostFault> {
        // An MMU notifier runs while the fault resolves the page.
        self.inv.start(HvaRange { start: hva, end: Hva(hva.0 + 4096) });
        self.inv.end();
        self.inner.resolve(hva, write)
    }
}

#[test]
fn fault_racing_an_invalidation_retries_and_maps_nothing() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    let inv = InvalidationSeq::new();
    let mut h = RacingHost { inner: host(PageSize::Size4K), inv: &inv };
    let mut flush = FlushToken::new();
    let o = mmu.handle_fault(Gpa((4 * GIB) << 12), Access::READ, &mut h, &inv, &mut flush).unwrap();
    flush.flush(&mut FlushRecorder::default());
    assert_eq!(o, FaultOutcome::Retry);
    assert_eq!(mmu.lookup(Gfn(4 * GIB)), None);
    assert_eq!(mmu.tables_in_use(), 1);
}

#[test]
fn pfn_above_maxphyaddr_is_a_typed_error() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    let mut h = LinearHost::new(1 << 40, PageSize::Size4K);
    let e = fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::READ).unwrap_err();
    assert!(matches!(e, TdpError::PfnTooWide { width: 46, .. }));
    assert_eq!(
        mmu.map(Gfn(0), Pfn(1 << 34), PageSize::Size4K, Access::READ),
        Err(TdpError::PfnTooWide { pfn: Pfn(1 << 34), width: 46 })
    );
    assert_eq!(mmu.tables_in_use(), 1);
}

#[test]
fn explicit_maps_reject_bad_input_without_building_tables() {
    let mut mmu = TdpMmu::new(ept(true), mem()).unwrap();
    let rw = Access::READ | Access::WRITE;
    assert_eq!(
        mmu.map(Gfn(0x201), Pfn(0x400), PageSize::Size2M, rw),
        Err(TdpError::Misaligned { gfn: Gfn(0x201), pfn: Pfn(0x400), size: PageSize::Size2M })
    );
    assert!(matches!(
        mmu.map(Gfn(0x200), Pfn(0x401), PageSize::Size2M, rw),
        Err(TdpError::Misaligned { .. })
    ));
    assert_eq!(
        mmu.map(Gfn(0), Pfn(0), PageSize::Size4K, Access::WRITE),
        Err(TdpError::AccessUnsupported(Access::WRITE))
    );
    assert_eq!(mmu.map(Gfn(1 << 36), Pfn(0), PageSize::Size4K, rw), Err(TdpError::GfnTooWide(Gfn(1 << 36))));
    let mut small = TdpMmu::new(Ept { page_1g: false, ..ept(true) }, mem()).unwrap();
    assert_eq!(
        small.map(Gfn(0), Pfn(0), PageSize::Size1G, rw),
        Err(TdpError::SizeUnsupported(PageSize::Size1G))
    );
    assert_eq!(mmu.tables_in_use(), 1);
    mmu.map(Gfn(0x200), Pfn(0x400), PageSize::Size2M, rw).unwrap();
    assert_eq!(mmu.map(Gfn(0x3ff), Pfn(9), PageSize::Size4K, rw), Err(TdpError::AlreadyMapped(Gfn(0x3ff))));
    assert_eq!(mmu.map(Gfn(0), Pfn(0), PageSize::Size1G, rw), Err(TdpError::AlreadyMapped(Gfn(0))));
}

#[test]
fn huge_explicit_maps_may_not_straddle_a_memslot_edge() {
    let mut mmu = TdpMmu::new(npt(), mem()).unwrap();
    let s = slots(&[(0, 0x100, 0x300, 0x1000_0000, SlotFlags::empty())]);
    mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
    let r = mmu.map(Gfn(0), Pfn(0), PageSize::Size2M, Access::READ);
    assert_eq!(r, Err(TdpError::CrossesSlot { gfn: Gfn(0), size: PageSize::Size2M }));
    // map_range picks 4 KiB pages at the edge and 2 MiB where it may.
    assert_eq!(mmu.map_range(Gfn(0), Pfn(0), 0x600, Access::READ, PageSize::Size1G), Ok(0x600));
    assert_eq!(mmu.lookup(Gfn(0x5ff)).map(|l| l.size), Some(PageSize::Size2M));
    assert_eq!(mmu.lookup(Gfn(0xff)).map(|l| l.size), Some(PageSize::Size4K));
    assert_eq!(mmu.lookup(Gfn(0x1ff)).map(|l| l.size), Some(PageSize::Size4K));
    assert_eq!(mmu.lookup(Gfn(0x3ff)).map(|l| (l.pfn, l.size)), Some((Pfn(0x3ff), PageSize::Size2M)));
}

#[test]
fn running_out_of_frames_leaves_no_half_built_table() {
    // Root plus two frames: a 4 KiB leaf needs three new tables.
    let mut mmu = TdpMmu::new(npt(), SimMemory::new(Pfn(0x1000), 3)).unwrap();
    let s = slots(&[(0, 0, 16, 0x4000_0000, SlotFlags::empty())]);
    mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
    let e = fault(&mut mmu, &mut host(PageSize::Size4K), 0x5000, Access::READ).unwrap_err();
    assert_eq!(e, TdpError::OutOfFrames);
    assert_eq!(mmu.tables_in_use(), 1);
    let root = mmu.memory().table(mmu.root);
    assert!(root.iter().all(|e| e.load(Ordering::Relaxed) == 0));
    assert_eq!(mmu.rmap().list(SlotId(0), Gfn(5), 0).count(), 0);
    assert_eq!(mmu.map(Gfn(5), Pfn(5), PageSize::Size4K, Access::READ), Err(TdpError::OutOfFrames));
    assert_eq!(mmu.tables_in_use(), 1);
}

#[test]
fn five_level_walks_translate_above_256_tib() {
    for five in [true, false] {
        let walk_len = if five { WalkLength::Five } else { WalkLength::Four };
        let mut mmu = TdpMmu::new(Ept::new(walk_len, PhysAddrWidth::MAX, true), mem()).unwrap();
        let gfn = Gfn((1 << 44) + 0x1234); // gpa bit 56
        let r = mmu.map(gfn, Pfn(0x77), PageSize::Size4K, Access::READ);
        if five {
            r.unwrap();
            let t = translate(
                mmu.format(),
                mmu.memory(),
                mmu.root(),
                gfn.gpa().unwrap(),
                Access::READ,
                Origin::Final,
            )
            .unwrap();
            assert_eq!(t.pfn(), Pfn(0x77));
            assert_eq!(mmu.tables_in_use(), 5);
        } else {
            assert_eq!(r, Err(TdpError::GfnTooWide(gfn)));
        }
    }
}

#[test]
fn walker_sets_accessed_everywhere_and_dirty_on_the_leaf_for_writes() {
    let mut mmu = TdpMmu::new(npt(), mem()).unwrap();
    mmu.map(Gfn(0x10), Pfn(0x20), PageSize::Size4K, Access::READ | Access::WRITE).unwrap();
    walk(&mmu, 0x10_000, Access::READ).unwrap();
    let leaf = mmu.lookup(Gfn(0x10)).unwrap().entry;
    assert_eq!(leaf & 0x60, 0x20, "A without D after a read");
    walk(&mmu, 0x10_000, Access::WRITE).unwrap();
    assert_eq!(mmu.lookup(Gfn(0x10)).unwrap().entry & 0x60, 0x60);
    let root_entry = mmu.memory().table(mmu.root)[0].load(Ordering::Relaxed);
    assert_eq!(root_entry & 0x60, 0x20, "non-leaf: A only");
    // EPT without A/D: the walker sets nothing.
    let mut e = TdpMmu::new(ept(false), mem()).unwrap();
    e.map(Gfn(0x10), Pfn(0x20), PageSize::Size4K, Access::all()).unwrap();
    let before = e.lookup(Gfn(0x10)).unwrap().entry;
    walk(&e, 0x10_000, Access::WRITE).unwrap();
    assert_eq!(e.lookup(Gfn(0x10)).unwrap().entry, before);
}

#[test]
fn walker_exits_round_trip_through_handle_exit() {
    each_format(|e, n| {
        fn check<F: TdpFormat>(mut mmu: TdpMmu<F, SimMemory>) {
            let mut h = host(PageSize::Size2M);
            let inv = InvalidationSeq::new();
            let gpa = (4 * GIB + 0x333) << 12;
            for access in [Access::EXEC, Access::READ, Access::WRITE] {
                let exit = match walk(&mmu, gpa, access) {
                    Err(WalkError::Exit { exit, .. }) => Some(exit),
                    Ok(_) => None,
                    Err(other) => panic!("{other:?}"),
                };
                if let Some(exit) = exit {
                    let mut flush = FlushToken::new();
                    let o = mmu.handle_exit(exit, Gpa(gpa), &mut h, &inv, &mut flush).unwrap();
                    flush.flush(&mut FlushRecorder::default());
                    assert!(matches!(o, FaultOutcome::Mapped(_)), "{o:?}");
                }
                walk(&mmu, gpa, access).unwrap();
            }
        }
        check(e());
        check(n());
    });
}

#[test]
fn split_keeps_every_frame_mapped_with_the_same_bits() {
    let mut mmu = TdpMmu::new(ept(true), mem()).unwrap();
    let s = slots(&[(0, 0, 2 * GIB, 0x40_0000_0000, SlotFlags::empty())]);
    mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
    mmu.map(Gfn(GIB), Pfn(3 * GIB), PageSize::Size1G, Access::all()).unwrap();
    walk(&mmu, (GIB + 5) << 12, Access::WRITE).unwrap(); // sets A and D
    let mut handles = Vec::new();
    mmu.for_each_leaf(s.get(SlotId(0)).unwrap(), GfnRange { start: Gfn(0), end: Gfn(2 * GIB) }, &mut |h| {
        handles.push(h)
    });
    assert_eq!(handles.len(), 1);
    let mut flush = FlushToken::new();
    mmu.split_huge(handles[0], &mut flush).unwrap();
    let mut rec = FlushRecorder::default();
    flush.flush(&mut rec);
    assert_eq!(rec.ranges, [GfnRange { start: Gfn(GIB), end: Gfn(2 * GIB) }]);
    for g in [GIB, GIB + 511, GIB + 512 * 300 + 7, 2 * GIB - 1] {
        let l = mmu.lookup(Gfn(g)).unwrap();
        assert_eq!((l.pfn, l.size), (Pfn(2 * GIB + g), PageSize::Size2M));
        assert_eq!(l.entry & 0x300, 0x300, "A and D inherited");
    }
    let mut n = 0;
    mmu.for_each_leaf(s.get(SlotId(0)).unwrap(), GfnRange { start: Gfn(0), end: Gfn(2 * GIB) }, &mut |h| {
        n += 1;
        assert_eq!(mmu.leaf(h).unwrap().npages, 512);
    });
    assert_eq!(n, 512);
    assert_eq!(mmu.leaf(handles[0]), None, "the huge leaf is gone");
}

#[test]
fn dirty_logged_slot_maps_4k_and_writable_only_on_write_faults() {
    let mut mmu = mmu_with(npt(), SlotFlags::DIRTY_LOG);
    let logs = log_of(mmu.memslots(), Tracking::WriteProtect, LogMode::Bitmap);
    let mut h = host(PageSize::Size1G);
    let gpa = (4 * GIB) << 12;
    // A flagged slot without its log in the context is refused.
    assert_eq!(fault(&mut mmu, &mut h, gpa, Access::READ), Err(TdpError::NoDirtyLog(SlotId(0))));
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::READ, &logs, None).unwrap());
    assert_eq!((m.size, m.access.contains(Access::WRITE), m.dirtied), (PageSize::Size4K, false, false));
    assert!(!logs[&SlotId(0)].bitmap().test(0), "a read logs nothing");
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, None).unwrap());
    assert_eq!((m.kind, m.access.contains(Access::WRITE), m.dirtied), (MapKind::Installed, true, true));
    assert_eq!(m.grant, Some(WriteGrant::Writable(RingPush::Ok)));
    assert!(logs[&SlotId(0)].bitmap().test(0), "logged before it was granted");
    assert_eq!(mmu.leaf(m.handle).map(|l| (l.gfn, l.writable)), Some((Gfn(4 * GIB), true)));
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, None).unwrap());
    assert_eq!(m.kind, MapKind::Spurious);
}

/// Log, then grant: the log is asked with the leaf's handle before the
/// writable leaf is stored, and a full ring leaves the leaf read-only.
#[test]
fn a_full_ring_maps_read_only_and_the_log_runs_before_the_grant() {
    let mut mmu = mmu_with(ept(true), SlotFlags::DIRTY_LOG);
    let logs = log_of(mmu.memslots(), Tracking::WriteProtect, LogMode::Ring);
    let ring = DirtyRing::new(2, 0).unwrap();
    let mut h = host(PageSize::Size4K);
    for i in 0..2u64 {
        let gpa = (4 * GIB + i) << 12;
        let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, Some(&ring)).unwrap());
        assert!(m.access.contains(Access::WRITE) && m.grant.is_some());
    }
    let gpa = (4 * GIB + 2) << 12;
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, Some(&ring)).unwrap());
    assert_eq!(m.grant, Some(WriteGrant::RingFull));
    assert!(!m.access.contains(Access::WRITE) && !m.dirtied);
    assert!(walk(&mmu, gpa, Access::READ).is_ok());
    assert!(walk(&mmu, gpa, Access::WRITE).is_err(), "no write without a ring entry");
    assert_eq!(mmu.leaf(m.handle).map(|l| (l.writable, l.dirty)), Some((false, false)));
    // The harvester frees the ring; the refault is granted.
    let mut fetch = 0;
    assert_eq!(ring.harvest(&mut fetch, |_, _| {}), 2);
    ring.reset(|_, _| {});
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, Some(&ring)).unwrap());
    assert!(m.access.contains(Access::WRITE));
    let mut got = Vec::new();
    ring.harvest(&mut fetch, |s, o| got.push((s, o)));
    assert_eq!(got, [(SlotId(0), 2)]);
}

/// Under dirty-bit tracking a read fault maps writable with D clear: the
/// first write takes no fault and the D bit is the record.
#[test]
fn dirty_bit_tracking_maps_writable_on_a_read_with_d_clear() {
    let mut mmu = mmu_with(ept(true), SlotFlags::DIRTY_LOG);
    let logs = log_of(mmu.memslots(), Tracking::HardwareDirty, LogMode::Bitmap);
    let mut h = host(PageSize::Size1G);
    let gpa = (4 * GIB + 5) << 12;
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::READ, &logs, None).unwrap());
    assert_eq!((m.size, m.access.contains(Access::WRITE), m.dirtied), (PageSize::Size4K, true, false));
    assert_eq!(mmu.leaf(m.handle).map(|l| (l.writable, l.dirty)), Some((true, false)));
    assert_eq!(logs[&SlotId(0)].chain_len(), 1, "the page is chained before it is writable");
    assert!(walk(&mmu, gpa, Access::WRITE).is_ok());
    assert!(mmu.leaf(m.handle).unwrap().dirty);
}

#[test]
fn write_fault_in_a_newly_logged_slot_splits_the_huge_page_first() {
    let mut mmu = mmu_with(ept(true), SlotFlags::empty());
    let mut h = host(PageSize::Size1G);
    let gpa = (4 * GIB + 77) << 12;
    mapped(fault(&mut mmu, &mut h, gpa, Access::READ).unwrap());
    let logged = slots(&[(0, 4 * GIB, 4 * GIB, 0x40_0000_0000, SlotFlags::DIRTY_LOG)]);
    mmu.set_memslots(&logged, &mut FlushRecorder::default(), |_| panic!("a flag change zaps nothing"));
    let logs = log_of(&logged, Tracking::WriteProtect, LogMode::Bitmap);
    let slot = *logged.get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let mut hs = Vec::new();
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |x| hs.push(x));
    for x in hs {
        mmu.write_protect(x, &mut flush);
    }
    flush.flush(&mut FlushRecorder::default());
    let m = mapped(fault_logged(&mut mmu, &mut h, gpa, Access::WRITE, &logs, None).unwrap());
    assert_eq!((m.size, m.gfn), (PageSize::Size4K, Gfn(4 * GIB + 77)));
    assert!(walk(&mmu, gpa, Access::WRITE).is_ok());
    assert!(walk(&mmu, gpa + 4096, Access::WRITE).is_err(), "neighbours stay write-protected");
    assert!(walk(&mmu, gpa + (1 << 29), Access::READ).is_ok(), "and mapped");
    assert!(mmu.stats().splits >= 2);
}

#[test]
fn dirty_bits_are_harvested_once_with_a_flush() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    let mut h = host(PageSize::Size4K);
    let gpa = (4 * GIB + 9) << 12;
    mapped(fault(&mut mmu, &mut h, gpa, Access::READ).unwrap());
    walk(&mmu, gpa, Access::WRITE).unwrap();
    let slot = *mmu.memslots().get(SlotId(0)).unwrap();
    let mut hs = Vec::new();
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |x| hs.push(x));
    assert_eq!(hs.len(), 1);
    assert!(mmu.leaf(hs[0]).unwrap().dirty);
    let mut flush = FlushToken::new();
    assert!(mmu.clear_dirty(hs[0], &mut flush));
    assert!(flush.is_needed());
    let mut again = FlushToken::new();
    assert!(!mmu.clear_dirty(hs[0], &mut again));
    assert!(!again.is_needed());
    assert!(mmu.clear_young(hs[0], &mut flush));
    flush.flush(&mut FlushRecorder::default());
    let l = mmu.leaf(hs[0]).unwrap();
    assert!(!l.dirty && !l.young && l.writable);
}

#[test]
fn ept_without_ad_ages_by_access_tracking_and_a_refault_restores() {
    let mut mmu = mmu_with(ept(false), SlotFlags::empty());
    assert!(!mmu.caps().accessed_bit);
    let mut h = host(PageSize::Size2M);
    let gpa = (4 * GIB + 1000) << 12;
    mapped(fault(&mut mmu, &mut h, gpa, Access::WRITE).unwrap());
    let slot = *mmu.memslots().get(SlotId(0)).unwrap();
    let mut hs = Vec::new();
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |x| hs.push(x));
    let mut flush = FlushToken::new();
    assert!(mmu.mark_access_tracked(hs[0], &mut flush));
    assert!(!mmu.mark_access_tracked(hs[0], &mut flush), "already tracked: not accessed since");
    flush.flush(&mut FlushRecorder::default());
    let l = mmu.leaf(hs[0]).unwrap();
    assert!(l.access_tracked && l.writable);
    let exit = match walk(&mmu, gpa, Access::READ) {
        Err(WalkError::Exit { exit, .. }) => exit,
        other => panic!("{other:?}"),
    };
    let resolves = h.resolves;
    let inv = InvalidationSeq::new();
    let mut flush = FlushToken::new();
    let o = mmu.handle_exit(exit, Gpa(gpa), &mut h, &inv, &mut flush).unwrap();
    assert!(!flush.is_needed());
    let _ = flush;
    assert_eq!(mapped(o).kind, MapKind::Restored);
    assert_eq!(h.resolves, resolves, "restored without the host");
    assert!(walk(&mmu, gpa, Access::WRITE).is_ok());
    assert!(flushed(|f| mmu.mark_access_tracked(hs[0], f)));
    // NPT has an accessed bit: no tracking.
    let mut n = mmu_with(npt(), SlotFlags::empty());
    mapped(fault(&mut n, &mut h, gpa, Access::READ).unwrap());
    let mut hs = Vec::new();
    n.for_each_leaf(&slot, slot.gfns(), &mut |x| hs.push(x));
    assert!(!flushed(|f| n.mark_access_tracked(hs[0], f)));
}

/// Runs `f` with a fresh token and flushes it: these host tests walk the
/// tables on every access (no TLB to flush).
fn flushed<T>(f: impl FnOnce(&mut FlushToken) -> T) -> T {
    let mut token = FlushToken::new();
    let r = f(&mut token);
    token.flush(&mut mmu_generic::backend::NoTlb);
    r
}

#[test]
fn zap_all_by_generation_keeps_obsolete_dirt_visible_and_frees_in_batches() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    mmu.set_max_page_size(PageSize::Size4K);
    let mut h = host(PageSize::Size4K);
    for i in 0..1100u64 {
        mapped(fault(&mut mmu, &mut h, (4 * GIB + i * 3) << 12, Access::WRITE).unwrap());
    }
    let tables = mmu.tables_in_use();
    let slot = *mmu.memslots().get(SlotId(0)).unwrap();
    let mut rec = FlushRecorder::default();
    mmu.zap_all(&mut rec, |_| {});
    assert_eq!(rec.alls, 1);
    assert_eq!(mmu.generation(), 1);
    assert_eq!(mmu.lookup(Gfn(4 * GIB)), None);
    assert!(walk(&mmu, (4 * GIB) << 12, Access::READ).is_err());
    // Refault one frame under the new root: the frame has two leaves now,
    // and its reverse-map list needs a descriptor. The reserve was never
    // topped up: the fault says so and changes nothing; topped up, the retry
    // maps.
    assert_eq!(mmu.rmap().pool().reserve_len(), 0);
    let before = mmu.tables_in_use();
    assert_eq!(
        fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::READ),
        Err(TdpError::Rmap(RmapError::ReserveEmpty))
    );
    assert_eq!(mmu.tables_in_use(), before, "nothing left half-built");
    // The tables the failed fault built off to the side were freed.
    let undone = mmu.stats().tables_freed as usize;
    assert!(walk(&mmu, (4 * GIB) << 12, Access::READ).is_err());
    mmu.reserve(TdpMmu::<Npt, SimMemory>::FAULT_RESERVE);
    mapped(fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::READ).unwrap());
    let mut dirty = 0;
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |x| dirty += mmu.leaf(x).map_or(0, |l| l.dirty as u32));
    assert_eq!(dirty, 1100, "obsolete leaves still report their dirty bits");
    let mut reported = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        let r = mmu.reclaim_obsolete(2, |l| reported += l.dirty as u32);
        if !r.remaining {
            break;
        }
        assert_eq!(r.freed, 2);
    }
    assert_eq!(reported, 1100);
    assert!(calls > 2);
    assert_eq!(mmu.tables_in_use(), 4, "the new root and one path remain");
    assert_eq!(mmu.stats().tables_freed as usize - undone, tables);
    let mut left = 0;
    mmu.for_each_leaf(&slot, slot.gfns(), &mut |_| left += 1);
    assert_eq!(left, 1);
}

#[test]
fn zap_range_reports_dirty_leaves_flushes_and_frees_empty_tables() {
    let mut mmu = mmu_with(ept(true), SlotFlags::empty());
    mmu.set_max_page_size(PageSize::Size4K);
    let mut h = host(PageSize::Size4K);
    for i in 0..600u64 {
        mapped(fault(&mut mmu, &mut h, (4 * GIB + i) << 12, Access::WRITE).unwrap());
    }
    let before = mmu.tables_in_use();
    let mut rec = FlushRecorder::default();
    let mut dirty = 0;
    mmu.zap_range(GfnRange { start: Gfn(4 * GIB), end: Gfn(4 * GIB + 512) }, &mut rec, |l| {
        dirty += l.dirty as u32
    });
    assert_eq!(dirty, 512);
    assert_eq!(rec.ranges, [GfnRange { start: Gfn(4 * GIB), end: Gfn(4 * GIB + 512) }]);
    assert_eq!(mmu.tables_in_use(), before - 1);
    assert!(mmu.lookup(Gfn(4 * GIB + 511)).is_none());
    assert!(mmu.lookup(Gfn(4 * GIB + 512)).is_some());
}

#[test]
fn unmap_range_splits_cut_huge_pages_and_zap_range_takes_them_whole() {
    let mut mmu = TdpMmu::new(npt(), mem()).unwrap();
    mmu.map(Gfn(0x400), Pfn(0x800), PageSize::Size2M, Access::READ).unwrap();
    let cut = GfnRange { start: Gfn(0x410), end: Gfn(0x420) };
    mmu.unmap_range(cut, &mut FlushRecorder::default(), |_| {}).unwrap();
    assert!(mmu.lookup(Gfn(0x410)).is_none() && mmu.lookup(Gfn(0x41f)).is_none());
    assert_eq!(mmu.lookup(Gfn(0x40f)).map(|l| l.pfn), Some(Pfn(0x80f)));
    assert_eq!(mmu.lookup(Gfn(0x420)).map(|l| l.pfn), Some(Pfn(0x820)));
    mmu.map(Gfn(0x1000), Pfn(0x1000), PageSize::Size2M, Access::READ).unwrap();
    let mut n = 0;
    mmu.zap_range(GfnRange { start: Gfn(0x1001), end: Gfn(0x1002) }, &mut FlushRecorder::default(), |l| {
        n += l.npages
    });
    assert_eq!(n, 512);
    assert!(mmu.lookup(Gfn(0x1100)).is_none());
}

#[test]
fn deleting_a_memslot_zaps_its_leaves() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    mapped(fault(&mut mmu, &mut host(PageSize::Size2M), (4 * GIB) << 12, Access::READ).unwrap());
    let empty = mmu.memslots().to_builder().delete(SlotId(0)).unwrap().build().unwrap();
    let mut n = 0;
    mmu.set_memslots(&empty, &mut FlushRecorder::default(), |_| n += 1);
    assert_eq!(n, 1);
    assert_eq!(mmu.lookup(Gfn(4 * GIB)), None);
    assert_eq!(mmu.tables_in_use(), 1);
}

#[test]
fn batched_4k_map_files_each_page_under_its_slot_and_stops_at_a_taken_entry() {
    each_format(|ept, npt| {
        fn check<F: TdpFormat>(mut mmu: TdpMmu<F, SimMemory>) {
            // Two slots with a hole between them, all inside one page table,
            // and a page already mapped in the second slot.
            let s = slots(&[
                (0, 0x1_0010, 0x40, 0x40_0000_0000, SlotFlags::empty()),
                (1, 0x1_0080, 0x100, 0x50_0000_0000, SlotFlags::empty()),
            ]);
            mmu.set_memslots(&s, &mut FlushRecorder::default(), |_| {});
            mmu.map(Gfn(0x1_0100), Pfn(0x9999), PageSize::Size4K, Access::READ).unwrap();
            let r = mmu.map_range(Gfn(0x1_0001), Pfn(0x5001), 0x200, Access::all(), PageSize::Size4K);
            assert_eq!(r, Err(TdpError::AlreadyMapped(Gfn(0x1_0100))));
            for g in 0x1_0001..0x1_0100u64 {
                let l = mmu.lookup(Gfn(g)).unwrap();
                assert_eq!(l.pfn, Pfn(0x5001 + g - 0x1_0001), "gfn {g:#x}");
                assert_eq!(l.access, Access::all());
                let slot = s.lookup(Gfn(g)).map(|s| s.id());
                for id in [SlotId(0), SlotId(1)] {
                    let n = mmu.rmap().list(id, Gfn(g), 0).count();
                    assert_eq!(n, usize::from(slot == Some(id)), "gfn {g:#x} slot {id:?}");
                }
            }
            assert_eq!(mmu.lookup(Gfn(0x1_0100)).unwrap().pfn, Pfn(0x9999));
            assert_eq!(mmu.lookup(Gfn(0x1_0101)), None);
            assert_eq!(mmu.stats().leaves_installed, 1 + 0xff);
            // Across page tables, with the walker agreeing.
            let n = mmu.map_range(Gfn(0x2_01f0), Pfn(0x7000), 0x420, Access::READ, PageSize::Size4K);
            assert_eq!(n, Ok(0x420));
            for g in 0x2_01f0..0x2_0610u64 {
                let t = walk(&mmu, g << 12 | 0x18, Access::READ).unwrap();
                assert_eq!(t.hpa, (0x7000 + g - 0x2_01f0) << 12 | 0x18);
            }
        }
        check(ept());
        check(npt());
    });
}

/// A split that finds the reverse-map reserve empty returns `ReserveEmpty`
/// through the dirty-log start (nothing half split); topped up, the start
/// is retried and succeeds. The frames' lists already hold a leaf of an
/// obsolete tree, so the 512 new entries need descriptors.
#[test]
fn a_split_with_an_empty_reserve_fails_typed_and_the_retry_after_a_top_up_splits() {
    let mut mmu = mmu_with(npt(), SlotFlags::empty());
    let mut h = host(PageSize::Size2M);
    mmu.set_max_page_size(PageSize::Size4K);
    for i in 0..512u64 {
        mapped(fault(&mut mmu, &mut h, (4 * GIB + i) << 12, Access::WRITE).unwrap());
    }
    mmu.zap_all(&mut FlushRecorder::default(), |_| {});
    mmu.set_max_page_size(PageSize::Size2M);
    let m = mapped(fault(&mut mmu, &mut h, (4 * GIB) << 12, Access::READ).unwrap());
    assert_eq!(m.size, PageSize::Size2M);
    assert_eq!(mmu.rmap().pool().reserve_len(), 0);
    let slot = *mmu.memslots().get(SlotId(0)).unwrap();
    let mut flush = FlushToken::new();
    let r = SlotDirtyLog::start(&slot, Tracking::WriteProtect, LogMode::Bitmap, &mut mmu, &mut flush);
    assert_eq!(r.err(), Some(DirtyLogError::Backend(BackendError::ReserveEmpty)));
    flush.flush(&mut FlushRecorder::default());
    assert_eq!(mmu.lookup(Gfn(4 * GIB)).map(|l| l.size), Some(PageSize::Size2M), "the huge leaf is intact");
    mmu.reserve(TdpMmu::<Npt, SimMemory>::FAULT_RESERVE);
    let mut flush = FlushToken::new();
    SlotDirtyLog::start(&slot, Tracking::WriteProtect, LogMode::Bitmap, &mut mmu, &mut flush).unwrap();
    flush.flush(&mut FlushRecorder::default());
    assert_eq!(
        mmu.lookup(Gfn(4 * GIB + 7)).map(|l| l.size),
        Some(PageSize::Size4K),
        "split after the top-up"
    );
}
