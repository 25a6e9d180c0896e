//! Dirty-log a slot and migrate it: pre-copy rounds driven by the core's
//! `SlotDirtyLog` over the minimal back end of `common/mod.rs`, once with
//! write protection and once with the hardware dirty bit. A guest keeps
//! writing while each round copies what the last one found dirty; the final
//! round stops the guest, and the destination must equal the source byte
//! for byte.
//!
//! Run with `cargo run -p mmu-generic --example dirty_log_migrate`.

mod common;

use common::{Access, CountingTlb, FlatMmu};
use mmu_generic::addr::{Gfn, Hva};
use mmu_generic::backend::FlushToken;
use mmu_generic::dirty_log::{LogMode, SlotDirtyLog, Tracking};
use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

const PAGES: u64 = 4096; // a 16 MiB slot
const PAGE: usize = 4096;

/// The guest: a deterministic stream of writes, hot pages more often.
struct Guest {
    seed: u64,
}

impl Guest {
    fn next_page(&mut self) -> u64 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = self.seed >> 33;
        if r % 4 == 0 {
            r % PAGES
        } else {
            r % 64
        }
    }

    /// One store: through the CPU, faulting into the hypervisor as needed.
    fn store(&mut self, mmu: &mut FlatMmu, log: Option<&SlotDirtyLog>, ram: &mut [u8], stamp: u8) {
        let page = self.next_page();
        let gfn = Gfn(page);
        while mmu.cpu_access(gfn, true) == Access::Fault {
            mmu.fault(gfn, true, log).expect("inside the slot");
        }
        let at = page as usize * PAGE + (self.seed as usize >> 7) % PAGE;
        ram[at] = stamp;
    }
}

fn copy_pages(words: &[u64], src: &[u8], dst: &mut [u8]) -> u64 {
    let mut n = 0;
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            dst[page * PAGE..(page + 1) * PAGE].copy_from_slice(&src[page * PAGE..(page + 1) * PAGE]);
            n += 1;
        }
    }
    n
}

fn migrate(tracking: Tracking) {
    let mut b = MemslotsBuilder::new();
    b.create(Memslot::new(SlotId(0), Gfn(0), PAGES, Hva(0x7f00_0000_0000), SlotFlags::DIRTY_LOG))
        .expect("a valid slot");
    let slots = b.build().expect("one slot");
    let slot = *slots.get(SlotId(0)).expect("just built");
    let mut mmu = FlatMmu::new(&slots);
    let mut tlb = CountingTlb::default();
    let mut src = vec![0u8; PAGES as usize * PAGE];
    let mut dst = vec![0u8; PAGES as usize * PAGE];

    // The guest runs a while before the migration starts.
    let mut guest = Guest { seed: 42 };
    for i in 0..2000 {
        guest.store(&mut mmu, None, &mut src, i as u8);
    }

    // Start logging, then copy everything once.
    let mut flush = FlushToken::new();
    let mut log = SlotDirtyLog::start(&slot, tracking, LogMode::Bitmap, &mut mmu, &mut flush)
        .expect("the format has a dirty bit");
    flush.flush(&mut tlb);
    dst.copy_from_slice(&src);
    println!(
        "dirty_log_migrate [{tracking:?}]: round 0 copied all {PAGES} pages, {} leaves mapped",
        mmu.mapped()
    );

    let mut words = Vec::new();
    // Each round the guest keeps writing while the last round's pages are
    // copied; then the round harvests. Fewer writes land per round as the
    // copies shrink, as in a converging pre-copy.
    let mut writes = 1500;
    for round in 1..=6 {
        for i in 0..writes {
            guest.store(&mut mmu, Some(&log), &mut src, (round * 31 + i) as u8);
        }
        let flush = log.get_and_clear(&mut mmu, &mut words).expect("bitmap mode");
        // Copy only after the flush: a write after it faults (or sets D
        // again) and is reported next round.
        flush.flush(&mut tlb);
        let copied = copy_pages(&words, &src, &mut dst);
        println!(
            "dirty_log_migrate [{tracking:?}]: round {round}: guest wrote {writes} times, {copied} dirty pages copied, writable chain {}",
            log.chain_len()
        );
        writes /= 2;
    }

    // The guest writes during the last copy, then stops: the final round
    // takes what is left, and the destination must equal the source.
    for i in 0..writes {
        guest.store(&mut mmu, Some(&log), &mut src, i as u8 ^ 0x5a);
    }
    let flush = log.get_and_clear(&mut mmu, &mut words).expect("bitmap mode");
    flush.flush(&mut tlb);
    let last = copy_pages(&words, &src, &mut dst);
    let same = src == dst;
    println!(
        "dirty_log_migrate [{tracking:?}]: final round copied {last} pages; destination equals source: {same}; TLB range flushes {}",
        tlb.ranges
    );
    assert!(same, "a dirty page was lost");
}

fn main() {
    migrate(Tracking::WriteProtect);
    migrate(Tracking::HardwareDirty);
}
