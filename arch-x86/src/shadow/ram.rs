//! Simulated guest RAM, for host tests and benchmarks: the memory guest page
//! tables live in.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, Gpa};

use super::guest_walk::{cas_field, field, NotMemory, PhysMemory};
use crate::format::ENTRIES;

/// Guest-physical RAM made of ranges of 4 KiB frames, each range one array
/// of atomic words holding the little-endian values the guest sees (so a
/// 4-byte entry at offset 4 is the high half of its word on any host).
///
/// A range's words are contiguous, as guest RAM is behind its host mapping:
/// a read is an index and a load, no per-frame pointer to follow (what a
/// hypervisor's read of a guest table through the memslot's host address
/// costs).
#[derive(Debug)]
pub struct SimGuestRam {
    /// The first range, held inline: nearly always the only one, and then
    /// a read is one bounds check away from its word.
    first: Range,
    rest: Vec<Range>,
    reads: AtomicU64,
}

/// One range of RAM: `words` holds its frames back to back.
#[derive(Debug)]
struct Range {
    /// `first frame × 512`: the index of the range's first word in the
    /// guest-physical space of 8-byte words.
    first_word: u64,
    words: Box<[AtomicU64]>,
}

impl Range {
    #[inline]
    fn word(&self, addr: Gpa) -> Option<&AtomicU64> {
        let i = (addr.0 >> 3).wrapping_sub(self.first_word);
        self.words.get(usize::try_from(i).ok()?)
    }
}

impl SimGuestRam {
    /// RAM at `(first frame, number of frames)` for each range, zeroed. An
    /// address in several ranges is the first one's.
    ///
    /// # Panics
    ///
    /// If a range does not fit the address space or the host's memory (a
    /// test's own setup, not guest input).
    pub fn new(ranges: &[(Gfn, u64)]) -> Self {
        let mut ranges = ranges
            .iter()
            .map(|&(g, n)| {
                let words = n
                    .checked_mul(ENTRIES as u64)
                    .and_then(|w| usize::try_from(w).ok())
                    .filter(|_| g.0.checked_add(n).is_some_and(|end| end <= 1 << 52))
                    .expect("a range of guest RAM inside the 64-bit physical space and host memory");
                Range {
                    first_word: g.0 * ENTRIES as u64,
                    words: (0..words).map(|_| AtomicU64::new(0)).collect(),
                }
            })
            .collect::<Vec<_>>();
        let first =
            if ranges.is_empty() { Range { first_word: 0, words: Box::new([]) } } else { ranges.remove(0) };
        Self { first, rest: ranges, reads: AtomicU64::new(0) }
    }

    #[inline]
    fn word(&self, addr: Gpa) -> Result<&AtomicU64, NotMemory> {
        match self.first.word(addr) {
            Some(w) => Ok(w),
            None => self.word_in_rest(addr),
        }
    }

    #[cold]
    fn word_in_rest(&self, addr: Gpa) -> Result<&AtomicU64, NotMemory> {
        self.rest.iter().find_map(|r| r.word(addr)).ok_or(NotMemory(addr))
    }

    /// Writes the `bytes`-wide (1, 2, 4 or 8) little-endian `value` at `addr`,
    /// which must not cross an 8-byte boundary.
    pub fn write(&self, addr: Gpa, bytes: u64, value: u64) -> Result<(), NotMemory> {
        let w = self.word(addr)?;
        debug_assert!((addr.0 & 7) + bytes <= 8, "write crosses a word");
        loop {
            let old = field(w.load(Ordering::Acquire), addr.0, bytes);
            if cas_field(w, addr.0, bytes, old, value & mask(bytes)) {
                return Ok(());
            }
        }
    }

    /// Whether `gfn` is RAM.
    pub fn contains(&self, gfn: Gfn) -> bool {
        self.word(Gpa(gfn.0 << 12)).is_ok()
    }

    /// Number of reads so far (to check that a path reads no guest memory;
    /// concurrent reads may be counted once).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

fn mask(bytes: u64) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

impl PhysMemory for SimGuestRam {
    #[inline]
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        // A plain increment, not a locked add (a walk reads once a level):
        // reads on several threads at once may count as one.
        self.reads.store(self.reads.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        match self.first.word(addr) {
            Some(w) => Ok(field(w.load(Ordering::Acquire), addr.0, bytes)),
            None => Ok(field(self.word_in_rest(addr)?.load(Ordering::Acquire), addr.0, bytes)),
        }
    }

    #[inline]
    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        Ok(cas_field(self.word(addr)?, addr.0, bytes, old, new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_fields_are_little_endian_values_on_any_host() {
        let ram = SimGuestRam::new(&[(Gfn(2), 1)]);
        ram.write(Gpa(0x2004), 4, 0xdead_beef).unwrap();
        assert_eq!(ram.read(Gpa(0x2000), 8).unwrap(), 0xdead_beef_0000_0000);
        ram.write(Gpa(0x2001), 1, 0x7f).unwrap();
        assert_eq!(ram.read(Gpa(0x2000), 4).unwrap(), 0x7f00);
        assert!(ram.compare_exchange(Gpa(0x2004), 4, 0xdead_beef, 1).unwrap());
        assert!(!ram.compare_exchange(Gpa(0x2004), 4, 0xdead_beef, 2).unwrap());
        assert_eq!(ram.read(Gpa(0x2000), 8).unwrap(), 0x1_0000_7f00);
        assert_eq!(ram.read(Gpa(0x3000), 8), Err(NotMemory(Gpa(0x3000))));
    }

    #[test]
    fn each_range_holds_its_frames_and_nothing_around_them() {
        let ram = SimGuestRam::new(&[(Gfn(0x10), 2), (Gfn(4), 1), (Gfn(0x10), 1)]);
        for (gpa, v) in [(0x10_000u64, 1u64), (0x11_ff8, 2), (0x4000, 3), (0x4ff8, 4)] {
            ram.write(Gpa(gpa), 8, v).unwrap();
        }
        for (gpa, v) in [(0x10_000u64, 1u64), (0x11_ff8, 2), (0x4000, 3), (0x4ff8, 4), (0x10_008, 0)] {
            assert_eq!(ram.read(Gpa(gpa), 8), Ok(v), "{gpa:#x}");
        }
        // Just outside each range, and far outside (below, above, at the top).
        for gpa in [0xfff8u64, 0x12_000, 0x3ff8, 0x5000, 0, u64::MAX - 7] {
            assert_eq!(ram.read(Gpa(gpa), 8), Err(NotMemory(Gpa(gpa))), "{gpa:#x}");
            assert_eq!(ram.write(Gpa(gpa), 8, 9), Err(NotMemory(Gpa(gpa))));
        }
        assert!(ram.contains(Gfn(4)) && ram.contains(Gfn(0x11)) && !ram.contains(Gfn(5)));
        assert_eq!(ram.reads(), 11, "every read counted, failed ones included");
        assert_eq!(SimGuestRam::new(&[]).read(Gpa(0), 8), Err(NotMemory(Gpa(0))));
    }
}
