//! The Book3s PR shadow-HPTE cache.
//!
//! A PR hypervisor (the guest runs in problem state, the host owns the only
//! real HPT) shadows each guest translation with a host HPTE and must find
//! those shadows again when the guest invalidates: by effective address
//! (`tlbie` of one page, or of a page index across segments), by virtual
//! page, by a 64 KiB or a 16 MiB block of virtual pages, or everything.
//! Like KVM's `book3s_mmu_hpte.c`, every shadow sits on five hash chains at
//! once, so each of those invalidations visits only the entries it removes
//! (plus hash collisions), not the whole cache:
//!
//! | chain | key |
//! |---|---|
//! | EA | `ea >> 12` |
//! | EA page index | `(ea >> 12) & 0xffff` (page within its 256 MB segment) |
//! | VPN | `vpn` (`VA >> 12`) |
//! | long VPN | `vpn >> 12` (16 MiB of VA) |
//! | 64K VPN | `vpn >> 4` (64 KiB of VA) |
//!
//! Entries live in a slab and are named by index; the chains are doubly
//! linked through the slab, so removal is O(1) on each.

use alloc::vec;
use alloc::vec::Vec;

const NIL: u32 = u32::MAX;
const CHAINS: usize = 5;
const EA: usize = 0;
const EA_INDEX: usize = 1;
const VPN: usize = 2;
const VPN_LONG: usize = 3;
const VPN_64K: usize = 4;

/// One shadow translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct ShadowPte {
    /// The guest effective address (page aligned).
    pub ea: u64,
    /// The guest virtual page number (`VA >> 12`).
    pub vpn: u64,
    /// The host HPTE index that holds the shadow.
    pub host_ptex: u64,
    /// The host frame mapped.
    pub pfn: u64,
    /// The shadow allows stores.
    pub writable: bool,
}

impl ShadowPte {
    fn key(&self, chain: usize) -> u64 {
        match chain {
            EA => self.ea >> 12,
            EA_INDEX => (self.ea >> 12) & 0xffff,
            VPN => self.vpn,
            VPN_LONG => self.vpn >> 12,
            _ => self.vpn >> 4,
        }
    }
}

/// Why an insertion failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PrCacheError {
    /// The cache holds its capacity; flush (KVM flushes everything) and retry.
    Full,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    pte: ShadowPte,
    used: bool,
    prev: [u32; CHAINS],
    next: [u32; CHAINS],
}

/// The shadow-HPTE cache.
#[derive(Clone, Debug)]
pub struct PrCache {
    slots: Vec<Slot>,
    free: Vec<u32>,
    heads: [Vec<u32>; CHAINS],
    bits: [u32; CHAINS],
    count: usize,
}

fn hash(key: u64, bits: u32) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
}

impl PrCache {
    /// A cache of `capacity` shadows (at least 1, at most 2^31) with hash
    /// tables sized for it.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, 1 << 31);
        let bits = (capacity.next_power_of_two().trailing_zeros()).clamp(4, 24);
        let empty = Slot { pte: ShadowPte::default(), used: false, prev: [NIL; CHAINS], next: [NIL; CHAINS] };
        // The EA-index key has 16 bits: no point in a larger table.
        let b = [bits, bits.min(16), bits, bits.min(20), bits];
        Self {
            slots: vec![empty; capacity],
            free: (0..capacity as u32).rev().collect(),
            heads: b.map(|n| vec![NIL; 1 << n]),
            bits: b,
            count: 0,
        }
    }

    /// Number of shadows held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds a shadow.
    pub fn insert(&mut self, pte: ShadowPte) -> Result<(), PrCacheError> {
        let i = self.free.pop().ok_or(PrCacheError::Full)?;
        let s = &mut self.slots[i as usize];
        s.pte = pte;
        s.used = true;
        for c in 0..CHAINS {
            let b = hash(pte.key(c), self.bits[c]);
            let head = self.heads[c][b];
            self.slots[i as usize].prev[c] = NIL;
            self.slots[i as usize].next[c] = head;
            if head != NIL {
                self.slots[head as usize].prev[c] = i;
            }
            self.heads[c][b] = i;
        }
        self.count += 1;
        Ok(())
    }

    fn unlink(&mut self, i: u32) -> ShadowPte {
        let pte = self.slots[i as usize].pte;
        for c in 0..CHAINS {
            let (p, n) = (self.slots[i as usize].prev[c], self.slots[i as usize].next[c]);
            if p == NIL {
                let b = hash(pte.key(c), self.bits[c]);
                self.heads[c][b] = n;
            } else {
                self.slots[p as usize].next[c] = n;
            }
            if n != NIL {
                self.slots[n as usize].prev[c] = p;
            }
        }
        self.slots[i as usize].used = false;
        self.free.push(i);
        self.count -= 1;
        pte
    }

    /// Removes every shadow on the chain for `key` that `keep_out` selects.
    fn flush_chain(
        &mut self,
        c: usize,
        key: u64,
        mut pred: impl FnMut(&ShadowPte) -> bool,
        f: &mut impl FnMut(&ShadowPte),
    ) -> usize {
        let mut i = self.heads[c][hash(key, self.bits[c])];
        let mut n = 0;
        while i != NIL {
            let next = self.slots[i as usize].next[c];
            let pte = self.slots[i as usize].pte;
            if pte.key(c) == key && pred(&pte) {
                self.unlink(i);
                f(&pte);
                n += 1;
            }
            i = next;
        }
        n
    }

    /// The shadow of effective address `ea`, if any.
    pub fn lookup_ea(&self, ea: u64) -> Option<&ShadowPte> {
        let key = ea >> 12;
        let mut i = self.heads[EA][hash(key, self.bits[EA])];
        while i != NIL {
            let s = &self.slots[i as usize];
            if s.pte.key(EA) == key {
                return Some(&s.pte);
            }
            i = s.next[EA];
        }
        None
    }

    /// Removes the shadows of the page holding `ea`; calls `f` for each.
    pub fn flush_ea(&mut self, ea: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_chain(EA, ea >> 12, |_| true, f)
    }

    /// Removes the shadows whose EA has the page index of `ea` within its
    /// 256 MB segment, in any segment (a `tlbie` that ignores the ESID).
    pub fn flush_ea_index(&mut self, ea: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_chain(EA_INDEX, (ea >> 12) & 0xffff, |_| true, f)
    }

    /// Removes the shadows of virtual page `vpn`.
    pub fn flush_vpn(&mut self, vpn: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_chain(VPN, vpn, |_| true, f)
    }

    /// Removes the shadows in the 64 KiB block of virtual pages holding `vpn`.
    pub fn flush_vpn_64k(&mut self, vpn: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_chain(VPN_64K, vpn >> 4, |_| true, f)
    }

    /// Removes the shadows in the 16 MiB block of virtual pages holding `vpn`.
    pub fn flush_vpn_long(&mut self, vpn: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_chain(VPN_LONG, vpn >> 12, |_| true, f)
    }

    /// Removes the shadows of virtual pages `start..end`, visiting the
    /// chains of the coarsest key that keeps the visit small, or scanning the
    /// cache when the range dwarfs it.
    pub fn flush_vpn_range(&mut self, start: u64, end: u64, f: &mut impl FnMut(&ShadowPte)) -> usize {
        if end <= start {
            return 0;
        }
        let n = end - start;
        let inside = move |p: &ShadowPte| p.vpn >= start && p.vpn < end;
        let blocks_64k = ((end - 1) >> 4) - (start >> 4) + 1;
        let blocks_long = ((end - 1) >> 12) - (start >> 12) + 1;
        let budget = self.count as u64;
        let mut removed = 0;
        if n <= 16 {
            for v in start..end {
                removed += self.flush_chain(VPN, v, inside, f);
            }
        } else if blocks_64k <= 64 && blocks_64k <= budget {
            for b in (start >> 4)..=((end - 1) >> 4) {
                removed += self.flush_chain(VPN_64K, b, inside, f);
            }
        } else if blocks_long <= budget {
            for b in (start >> 12)..=((end - 1) >> 12) {
                removed += self.flush_chain(VPN_LONG, b, inside, f);
            }
        } else {
            removed = self.flush_scan(inside, f);
        }
        removed
    }

    /// Removes every shadow `pred` selects by scanning the whole cache (the
    /// baseline the indexed flushes beat; also what a flush by host frame
    /// range needs).
    pub fn flush_scan(
        &mut self,
        mut pred: impl FnMut(&ShadowPte) -> bool,
        f: &mut impl FnMut(&ShadowPte),
    ) -> usize {
        let mut n = 0;
        for i in 0..self.slots.len() {
            if self.slots[i].used && pred(&self.slots[i].pte) {
                let pte = self.unlink(i as u32);
                f(&pte);
                n += 1;
            }
        }
        n
    }

    /// Removes everything.
    pub fn flush_all(&mut self, f: &mut impl FnMut(&ShadowPte)) -> usize {
        self.flush_scan(|_| true, f)
    }

    /// Iterates over the shadows held.
    pub fn iter(&self) -> impl Iterator<Item = &ShadowPte> {
        self.slots.iter().filter(|s| s.used).map(|s| &s.pte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn pte(i: u64) -> ShadowPte {
        ShadowPte { ea: 0x1000_0000 + (i << 12), vpn: 0x42_0000 + i, host_ptex: i, pfn: i, writable: true }
    }

    #[test]
    fn each_key_finds_its_shadows() {
        let mut c = PrCache::new(64);
        for i in 0..40 {
            c.insert(pte(i)).expect("room");
        }
        let mut seen = Vec::new();
        assert_eq!(c.flush_ea(0x1000_0000 + (3 << 12) + 0x123, &mut |p| seen.push(p.host_ptex)), 1);
        assert_eq!(seen, [3]);
        assert!(c.lookup_ea(0x1000_3000).is_none());
        assert!(c.lookup_ea(0x1000_4000).is_some());
        assert_eq!(c.flush_vpn(0x42_0004, &mut |_| {}), 1);
        assert_eq!(c.flush_vpn_64k(0x42_0000, &mut |_| {}), 14, "16 pages minus the two gone");
        assert_eq!(c.flush_ea_index(0x7000_0000 + (20 << 12), &mut |_| {}), 1, "any segment");
        assert_eq!(c.flush_vpn_long(0x42_0000, &mut |_| {}), 40 - 17);
        assert!(c.is_empty());
    }

    #[test]
    fn full_cache_refuses_then_accepts_after_flush() {
        let mut c = PrCache::new(2);
        c.insert(pte(0)).expect("room");
        c.insert(pte(1)).expect("room");
        assert_eq!(c.insert(pte(2)), Err(PrCacheError::Full));
        assert_eq!(c.flush_all(&mut |_| {}), 2);
        c.insert(pte(2)).expect("room");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn range_flush_matches_a_scan_on_random_contents() {
        let mut rng = SmallRng::seed_from_u64(6);
        for round in 0..50 {
            let mut a = PrCache::new(512);
            let mut b = PrCache::new(512);
            for i in 0..400 {
                let vpn = rng.gen_range(0..1u64 << 20);
                let p =
                    ShadowPte { ea: rng.gen::<u64>() & !0xfff, vpn, host_ptex: i, pfn: i, writable: false };
                a.insert(p).expect("room");
                b.insert(p).expect("room");
            }
            let start = rng.gen_range(0..1u64 << 20);
            let len = match round % 4 {
                0 => rng.gen_range(0..16),
                1 => rng.gen_range(16..1024),
                2 => rng.gen_range(1024..1 << 16),
                _ => 1 << 21,
            };
            let mut x = Vec::new();
            let mut y = Vec::new();
            a.flush_vpn_range(start, start + len, &mut |p| x.push(p.host_ptex));
            b.flush_scan(|p| p.vpn >= start && p.vpn < start + len, &mut |p| y.push(p.host_ptex));
            x.sort_unstable();
            y.sort_unstable();
            assert_eq!(x, y);
            let mut rest_a: Vec<_> = a.iter().map(|p| p.host_ptex).collect();
            let mut rest_b: Vec<_> = b.iter().map(|p| p.host_ptex).collect();
            rest_a.sort_unstable();
            rest_b.sort_unstable();
            assert_eq!(rest_a, rest_b);
        }
    }
}
