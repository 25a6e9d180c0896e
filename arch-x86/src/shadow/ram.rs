//! Simulated guest RAM, for host tests and benchmarks: the memory guest page
//! tables live in.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use mmu_generic::addr::{Gfn, Gpa};

use super::guest_walk::{cas_field, field, NotMemory, PhysMemory};
use crate::format::ENTRIES;

/// Guest-physical RAM made of ranges of 4 KiB frames, each frame 512 atomic
/// words holding the little-endian values the guest sees (so a 4-byte entry
/// at offset 4 is the high half of its word on any host).
#[derive(Debug)]
pub struct SimGuestRam {
    ranges: Vec<(u64, Vec<Box<[AtomicU64; ENTRIES]>>)>,
    reads: AtomicU64,
}

impl SimGuestRam {
    /// RAM at `(first frame, number of frames)` for each range, zeroed.
    pub fn new(ranges: &[(Gfn, u64)]) -> Self {
        let ranges = ranges
            .iter()
            .map(|&(g, n)| {
                (g.0, (0..n).map(|_| Box::new(core::array::from_fn(|_| AtomicU64::new(0)))).collect())
            })
            .collect();
        Self { ranges, reads: AtomicU64::new(0) }
    }

    #[inline]
    fn word(&self, addr: Gpa) -> Result<&AtomicU64, NotMemory> {
        let gfn = addr.0 >> 12;
        for (base, frames) in &self.ranges {
            if let Some(frame) = gfn.checked_sub(*base).and_then(|i| frames.get(i as usize)) {
                return Ok(&frame[(addr.0 as usize & 0xfff) / 8]);
            }
        }
        Err(NotMemory(addr))
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
        Ok(field(self.word(addr)?.load(Ordering::Acquire), addr.0, bytes))
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
}
