//! loom models of the core's lock-free protocols. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p mmu-generic --release --test loom`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

use loom::sync::RwLock;
use mmu_generic::addr::{Gfn, GfnRange, Hva, HvaRange};
use mmu_generic::backend::{BackendError, Caps, FlushToken, Leaf, MmuBackend, NoTlb};
use mmu_generic::dirty_bitmap::DirtyBitmap;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::dirty_ring::{DirtyRing, RingFull};
use mmu_generic::invalidate::InvalidationSeq;
use mmu_generic::memslot::SlotId;
use mmu_generic::memslot::{Memslot, SlotFlags};
use mmu_generic::pte_list::PteHandle;

/// Runs a loom model and prints how many interleavings it explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    loom::model(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!("loom {name}: {} interleavings explored", runs.load(std::sync::atomic::Ordering::Relaxed));
}

const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const W: u64 = 1 << 1;

/// The CPU sets A and D with an atomic OR while the hypervisor ages (clears
/// A) and harvests D into the bitmap. The write happens before the CPU sets
/// D, so a harvest that misses D must be followed by one that finds it:
/// after the final harvest the write is in the bitmap, and A is only seen
/// set after the access.
#[test]
fn hardware_dirty_bit_is_never_lost_while_harvesting() {
    model("hardware_dirty_bit_is_never_lost_while_harvesting", || {
        let pte = Arc::new(AtomicU64::new(W));
        let bitmap = Arc::new(DirtyBitmap::new(64));
        let accessed = Arc::new(AtomicU64::new(0));

        let cpu = {
            let (pte, accessed) = (pte.clone(), accessed.clone());
            thread::spawn(move || {
                accessed.store(1, Ordering::Release);
                pte.fetch_or(A | D, Ordering::AcqRel);
            })
        };
        // The hypervisor: one ageing pass and one harvest, concurrently.
        let was_young = pte.fetch_and(!A, Ordering::AcqRel) & A != 0;
        if was_young {
            assert_eq!(accessed.load(Ordering::Acquire), 1, "young before any access");
        }
        if pte.fetch_and(!D, Ordering::AcqRel) & D != 0 {
            bitmap.set(3);
        }
        cpu.join().unwrap();
        // Final round with the vCPU stopped.
        if pte.fetch_and(!D, Ordering::AcqRel) & D != 0 {
            bitmap.set(3);
        }
        assert!(bitmap.test(3), "the write's D bit was lost");
    });
}

/// Write protection against a write fault: the fault marks the bitmap and
/// makes the PTE writable with a compare-exchange; the harvester protects
/// (clears W) then takes the bitmap word. Whatever the interleaving, the
/// write lands in this round's word or in the bitmap for the next.
#[test]
fn write_fault_racing_a_protect_round_is_reported() {
    model("write_fault_racing_a_protect_round_is_reported", || {
        let pte = Arc::new(AtomicU64::new(0));
        let bitmap = Arc::new(DirtyBitmap::new(64));
        let fault = {
            let (pte, bitmap) = (pte.clone(), bitmap.clone());
            thread::spawn(move || {
                bitmap.set(7);
                let _ = pte.compare_exchange(0, W, Ordering::AcqRel, Ordering::Acquire);
            })
        };
        let was_writable = pte.fetch_and(!W, Ordering::AcqRel) & W != 0;
        if was_writable {
            bitmap.set(7);
        }
        let round1 = bitmap.take_word(0);
        fault.join().unwrap();
        let round2 = bitmap.take_word(0);
        assert!((round1 | round2) & (1 << 7) != 0, "the write was reported in no round");
    });
}

/// The vCPU pushes into a dirty ring while the harvester collects and the
/// MMU resets: every pushed entry is harvested exactly once, in order, and a
/// push refused as full is retried after a reset.
#[test]
fn dirty_ring_entries_are_harvested_exactly_once() {
    model("dirty_ring_entries_are_harvested_exactly_once", || {
        let ring = Arc::new(DirtyRing::new(2, 1).unwrap());
        let vcpu = {
            let ring = ring.clone();
            thread::spawn(move || {
                let mut soft_full_seen = false;
                for off in 0..3u64 {
                    loop {
                        match ring.push(SlotId(0), off) {
                            Ok(status) => {
                                soft_full_seen |= status == mmu_generic::dirty_ring::RingPush::SoftFull;
                                break;
                            }
                            Err(RingFull) => thread::yield_now(),
                        }
                    }
                }
                // A ring of 2 with a reserve of 1 is soft-full after each push.
                assert!(soft_full_seen);
            })
        };
        let mut fetch = 0u32;
        let mut got = Vec::new();
        while got.len() < 3 {
            ring.harvest(&mut fetch, |_, off| got.push(off));
            ring.reset(|_, _| {});
            thread::yield_now();
        }
        vcpu.join().unwrap();
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(ring.harvest(&mut fetch, |_, _| panic!("harvested twice")), 0);
    });
}

/// A fault snapshots the sequence, resolves a pfn, and commits only if
/// `must_retry` says no; a notifier invalidates the page (start and zap
/// under the MMU lock, replace the host page, end under the lock). Whatever
/// the interleaving, the translation left installed is never the old frame.
#[test]
fn fault_never_commits_a_pfn_invalidated_after_its_snapshot() {
    model("fault_never_commits_a_pfn_invalidated_after_its_snapshot", || {
        let seq = Arc::new(InvalidationSeq::new());
        // The host mapping of the page: frame 1, replaced by frame 2.
        let host_pte = Arc::new(AtomicU64::new(1));
        let range = HvaRange { start: Hva(0x1000), end: Hva(0x2000) };
        // The MMU lock, guarding the installed translation (0 = none).
        let mmu = Arc::new(loom::sync::Mutex::new(0u64));

        let notifier = {
            let (seq, host_pte, mmu) = (seq.clone(), host_pte.clone(), mmu.clone());
            thread::spawn(move || {
                {
                    let mut installed = mmu.lock().unwrap();
                    seq.start(range);
                    *installed = 0; // zap
                }
                host_pte.store(2, Ordering::Release);
                let _g = mmu.lock().unwrap();
                seq.end();
            })
        };

        let snap = seq.snapshot();
        let pfn = host_pte.load(Ordering::Acquire);
        {
            let mut installed = mmu.lock().unwrap();
            if !seq.must_retry(snap, Hva(0x1000)) {
                *installed = pfn;
            }
        }
        notifier.join().unwrap();
        let installed = *mmu.lock().unwrap();
        assert!(installed == 0 || installed == 2, "the old frame {installed} stayed mapped");
    });
}

/// Two vCPUs mark pages of the same bitmap word while the harvester takes
/// words: every mark is taken exactly once, in some round.
#[test]
fn concurrent_marks_are_harvested_exactly_once() {
    model("concurrent_marks_are_harvested_exactly_once", || {
        let bitmap = Arc::new(DirtyBitmap::new(64));
        let vcpus: Vec<_> = [3u64, 40]
            .into_iter()
            .map(|page| {
                let bitmap = bitmap.clone();
                thread::spawn(move || {
                    bitmap.set(page);
                })
            })
            .collect();
        let round1 = bitmap.take_word(0);
        for v in vcpus {
            v.join().unwrap();
        }
        let round2 = bitmap.take_word(0);
        assert_eq!(round1 & round2, 0, "a mark was reported twice");
        assert_eq!(round1 | round2, (1 << 3) | (1 << 40), "a mark was lost");
    });
}

/// A fault tags the table page it creates with the generation it read while
/// `invalidate_all` bumps it: a page tagged before the bump is obsolete
/// afterwards, so it can never survive a zap-all as valid.
#[test]
fn pages_made_during_a_zap_all_are_never_mistaken_for_valid() {
    model("pages_made_during_a_zap_all_are_never_mistaken_for_valid", || {
        let gen = Arc::new(mmu_generic::generation::MmuGeneration::new());
        let zapper = {
            let gen = gen.clone();
            thread::spawn(move || gen.invalidate_all())
        };
        let tagged = gen.current();
        let new_gen = zapper.join().unwrap();
        assert_eq!(gen.is_obsolete(tagged), tagged != new_gen);
        assert!(tagged == 0 || tagged == new_gen);
    });
}

const P: u64 = 1 << 0;

/// A two-leaf page table for the dirty-log model: leaf `i` maps gfn `i`,
/// present from the start; the CPU sets D with an atomic OR.
struct TwoLeaves {
    ptes: [AtomicU64; 2],
}

impl MmuBackend for TwoLeaves {
    fn caps(&self) -> Caps {
        Caps { accessed_bit: false, dirty_bit: true }
    }
    fn for_each_leaf(&self, _: &Memslot, gfns: GfnRange, f: &mut dyn FnMut(PteHandle)) {
        for i in 0..2u64 {
            if gfns.contains(Gfn(i)) && self.ptes[i as usize].load(Ordering::Acquire) & P != 0 {
                f(PteHandle(i as u32));
            }
        }
    }
    fn leaf(&self, h: PteHandle) -> Option<Leaf> {
        let w = self.ptes.get(h.0 as usize)?.load(Ordering::Acquire);
        (w & P != 0).then_some(Leaf {
            gfn: Gfn(h.0 as u64),
            npages: 1,
            writable: w & W != 0,
            young: false,
            dirty: w & D != 0,
            access_tracked: false,
        })
    }
    fn write_protect(&mut self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let was = self.ptes[h.0 as usize].fetch_and(!W, Ordering::AcqRel) & W != 0;
        if was {
            flush.add_range(GfnRange { start: Gfn(h.0 as u64), end: Gfn(h.0 as u64 + 1) });
        }
        was
    }
    fn clear_dirty(&self, h: PteHandle, flush: &mut FlushToken) -> bool {
        let was = self.ptes[h.0 as usize].fetch_and(!D, Ordering::AcqRel) & D != 0;
        if was {
            flush.add_range(GfnRange { start: Gfn(h.0 as u64), end: Gfn(h.0 as u64 + 1) });
        }
        was
    }
    fn clear_young(&self, _: PteHandle, _: &mut FlushToken) -> bool {
        false
    }
    fn split_huge(&mut self, _: PteHandle, _: &mut FlushToken) -> Result<(), BackendError> {
        Ok(())
    }
    fn zap(&mut self, _: PteHandle, _: &mut FlushToken) -> Option<Leaf> {
        None
    }
}

/// Two vCPUs take write faults at once on the same `&self` log (the MMU
/// lock held for reading: `note_writable`, then the grant of W), then write
/// through their leaf if it is still writable (setting D); a harvester
/// takes the lock for writing and runs a round, concurrently. After the
/// vCPUs stop, a final round. Every page written is reported in exactly one
/// round, under write protection and under dirty-bit tracking.
#[test]
fn two_faulting_vcpus_and_a_harvester_lose_no_write_and_report_none_twice() {
    for tracking in [Tracking::WriteProtect, Tracking::HardwareDirty] {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = runs.clone();
        b.check(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let slot = Memslot::new(
                mmu_generic::memslot::SlotId(0),
                Gfn(0),
                2,
                Hva(0x1000_0000),
                SlotFlags::DIRTY_LOG,
            );
            let mut backend = TwoLeaves { ptes: [AtomicU64::new(P), AtomicU64::new(P)] };
            let mut flush = FlushToken::new();
            let log =
                SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut backend, &mut flush).unwrap();
            flush.flush(&mut NoTlb);
            let mmu = Arc::new(RwLock::new((log, backend)));
            let written = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let vcpus: Vec<_> = (0..2u64)
                .map(|i| {
                    let (mmu, written) = (mmu.clone(), written.clone());
                    thread::spawn(move || {
                        {
                            // The fault, under the read lock: log, then grant.
                            let g = mmu.read().unwrap();
                            g.0.note_writable(Gfn(i), PteHandle(i as u32), None).unwrap();
                            g.1.ptes[i as usize].fetch_or(W, Ordering::AcqRel);
                        }
                        // The guest's store: through a writable leaf only,
                        // the CPU setting D as it writes.
                        let g = mmu.read().unwrap();
                        let pte = &g.1.ptes[i as usize];
                        let mut cur = pte.load(Ordering::Acquire);
                        while cur & W != 0 {
                            match pte.compare_exchange(cur, cur | D, Ordering::AcqRel, Ordering::Acquire) {
                                Ok(_) => {
                                    written[i as usize].store(1, Ordering::Release);
                                    break;
                                }
                                Err(now) => cur = now,
                            }
                        }
                    })
                })
                .collect();
            let mut words = Vec::new();
            let round1 = {
                let mut g = mmu.write().unwrap();
                let (log, backend) = &mut *g;
                let f = log.get_and_clear(backend, &mut words).unwrap();
                f.flush(&mut NoTlb);
                words[0]
            };
            for v in vcpus {
                v.join().unwrap();
            }
            let round2 = {
                let mut g = mmu.write().unwrap();
                let (log, backend) = &mut *g;
                let f = log.get_and_clear(backend, &mut words).unwrap();
                f.flush(&mut NoTlb);
                words[0]
            };
            for i in 0..2 {
                let bit = 1u64 << i;
                if written[i].load(Ordering::Acquire) == 1 {
                    assert!((round1 | round2) & bit != 0, "{tracking:?}: the write to page {i} was lost");
                }
                assert!(round1 & round2 & bit == 0, "{tracking:?}: page {i} was reported twice");
            }
        });
        eprintln!(
            "loom two vCPUs + harvester ({tracking:?}): {} interleavings",
            runs.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}
