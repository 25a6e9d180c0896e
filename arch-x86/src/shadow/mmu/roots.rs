//! The root cache: the current root and the cached ones, found by key in
//! constant time however many are cached.
//!
//! A CR3 switch must find the cached root of the new CR3 and make it
//! current, and a miss must evict the least recently used root. A list kept
//! in recency order makes each of those linear (the search, then the move
//! to the front); with tens of cached roots that is most of the switch.
//! Here the roots sit in a vector whose first element is the current root
//! (the others in no order), each with a use stamp that orders them by
//! recency, and an open-addressing index maps a key's hash to its position.
//! A hit is one probe and a swap; only eviction, which follows building a
//! root and is far costlier, scans the stamps for the oldest.

use alloc::vec::Vec;

use super::{Root, RootKey};
use crate::shadow::mode::GuestCpu;

/// The index hash of a root key: its words folded, one multiply. Roots that
/// differ only in role bits left out here share a probe run, which the key
/// comparison sorts out.
#[inline]
fn hash_of(key: &RootKey) -> u64 {
    let p = &key.pdptrs;
    let r = &key.role;
    let role = u64::from(r.level)
        | u64::from(r.quadrant) << 8
        | u64::from(r.access.bits()) << 16
        | (r.mode as u64) << 24;
    let h = (key.cr3 >> 12)
        ^ p[0].rotate_left(9)
        ^ p[1].rotate_left(21)
        ^ p[2].rotate_left(33)
        ^ p[3].rotate_left(45);
    let h = (h ^ role.rotate_left(52)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}

/// The current root first, then the cached roots in no order.
#[derive(Debug, Default)]
pub(super) struct RootCache {
    roots: Vec<Root>,
    /// Use stamp of each root, parallel to `roots`: larger is more recent.
    used: Vec<u64>,
    /// Index hash of each root's key, parallel to `roots`.
    hashes: Vec<u64>,
    /// Open addressing with linear probing: position + 1, 0 for empty. Its
    /// length is a power of two at least twice the number of roots.
    index: Vec<u32>,
    clock: u64,
}

impl RootCache {
    /// The current root.
    #[inline]
    pub fn first(&self) -> Option<&Root> {
        self.roots.first()
    }

    /// Records that the current root serves `cpu` (whose key is its key).
    #[inline]
    pub fn set_current_cpu(&mut self, cpu: GuestCpu) {
        if let Some(r) = self.roots.first_mut() {
            debug_assert_eq!(r.key.role.mode, cpu.mode, "a root serves only its own mode");
            r.cpu = cpu;
        }
    }

    /// Roots held, the current one included.
    #[inline]
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.index.len().wrapping_sub(1)
    }

    /// The index slot holding position `pos`, whose key is `key`.
    fn slot_of(&self, pos: usize) -> usize {
        let mask = self.mask();
        let mut s = self.hashes[pos] as usize & mask;
        loop {
            if self.index[s] as usize == pos + 1 {
                return s;
            }
            s = (s + 1) & mask;
        }
    }

    /// The position of the root of `key`.
    #[inline]
    pub fn find(&self, key: &RootKey) -> Option<usize> {
        if self.index.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut s = hash_of(key) as usize & mask;
        loop {
            let p = (self.index[s] as usize).checked_sub(1)?;
            if self.roots[p].key == *key {
                return Some(p);
            }
            s = (s + 1) & mask;
        }
    }

    fn index_insert(&mut self, pos: usize) {
        let mask = self.mask();
        let mut s = self.hashes[pos] as usize & mask;
        while self.index[s] != 0 {
            s = (s + 1) & mask;
        }
        self.index[s] = pos as u32 + 1;
    }

    /// Removes index slot `s` and shifts later entries of its probe run back
    /// (linear-probing deletion without tombstones).
    fn index_remove(&mut self, mut s: usize) {
        let mask = self.mask();
        let mut j = s;
        loop {
            self.index[s] = 0;
            loop {
                j = (j + 1) & mask;
                let Some(p) = (self.index[j] as usize).checked_sub(1) else { return };
                let home = self.hashes[p] as usize & mask;
                // The entry at j may move to s unless its home lies
                // cyclically in (s, j].
                let stays = if s <= j { s < home && home <= j } else { s < home || home <= j };
                if !stays {
                    break;
                }
            }
            self.index[s] = self.index[j];
            s = j;
        }
    }

    /// Re-points the index entry of the root at `from` to `to`.
    fn index_move(&mut self, from: usize, to: usize) {
        let s = self.slot_of(from);
        self.index[s] = to as u32 + 1;
    }

    /// Sizes the index for `n` roots, rehashing the held ones.
    fn grow_index(&mut self, n: usize) {
        let want = (2 * n).next_power_of_two().max(8);
        if self.index.len() >= want {
            return;
        }
        self.index = alloc::vec![0; want];
        for p in 0..self.roots.len() {
            self.index_insert(p);
        }
    }

    fn stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Swaps the roots at `a` and `b`, index and stamps included.
    fn swap(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        let sa = self.slot_of(a);
        let sb = self.slot_of(b);
        self.index[sa] = b as u32 + 1;
        self.index[sb] = a as u32 + 1;
        self.roots.swap(a, b);
        self.used.swap(a, b);
        self.hashes.swap(a, b);
    }

    /// Makes the root at `pos` current (the most recently used).
    pub fn promote(&mut self, pos: usize) {
        let t = self.stamp();
        self.used[pos] = t;
        self.swap(0, pos);
    }

    /// Adds `root` (whose key no held root has) as the current root.
    pub fn push_current(&mut self, root: Root) {
        let t = self.stamp();
        self.grow_index(self.roots.len() + 1);
        self.roots.push(root);
        self.used.push(t);
        self.hashes.push(hash_of(&root.key));
        let pos = self.roots.len() - 1;
        self.index_insert(pos);
        self.swap(0, pos);
    }

    /// Takes the root at `pos` out. The others keep their stamps; if `pos`
    /// was the current root, the most recent remaining one becomes current.
    pub fn remove(&mut self, pos: usize) -> Root {
        let s = self.slot_of(pos);
        self.index_remove(s);
        let last = self.roots.len() - 1;
        if pos != last {
            self.index_move(last, pos);
        }
        let root = self.roots.swap_remove(pos);
        self.used.swap_remove(pos);
        self.hashes.swap_remove(pos);
        if pos == 0 {
            if let Some(m) = self.most_recent() {
                self.swap(0, m);
            }
        }
        root
    }

    fn most_recent(&self) -> Option<usize> {
        (0..self.used.len()).max_by_key(|&p| self.used[p])
    }

    /// The least recently used root's position.
    pub fn least_recent(&self) -> Option<usize> {
        (0..self.used.len()).min_by_key(|&p| self.used[p])
    }

    /// Keys of the roots `keep` refuses, most recent first.
    pub fn rejected(&self, mut keep: impl FnMut(&Root) -> bool) -> Vec<RootKey> {
        let mut out: Vec<usize> = (0..self.roots.len()).filter(|&p| !keep(&self.roots[p])).collect();
        out.sort_unstable_by_key(|&p| core::cmp::Reverse(self.used[p]));
        out.into_iter().map(|p| self.roots[p].key).collect()
    }

    /// Takes every root, most recent first.
    pub fn take_all(&mut self) -> Vec<Root> {
        let mut order: Vec<usize> = (0..self.roots.len()).collect();
        order.sort_unstable_by_key(|&p| core::cmp::Reverse(self.used[p]));
        let roots = order.iter().map(|&p| self.roots[p]).collect();
        self.roots.clear();
        self.used.clear();
        self.hashes.clear();
        self.index.iter_mut().for_each(|s| *s = 0);
        roots
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::super::{Root, RootKey, RootKind};
    use super::*;
    use crate::shadow::mode::{GuestMode, PteAccess};
    use crate::shadow::page::Role;

    fn root(n: u64) -> Root {
        let cpu = GuestCpu::new(GuestMode::Four, 0);
        // Few distinct cr3 values, so keys collide in the hash and differ
        // only in the PDPTE words or the role.
        let key = RootKey {
            cr3: (n % 5) << 12,
            pdptrs: [n / 5, 0, 0, 0],
            role: Role::for_cpu(&cpu, 4 + (n % 2) as u8, false, PteAccess::all(), 0),
        };
        Root { key, kind: RootKind::Page(n as u32), generation: 0, cpu }
    }

    /// The plain model: keys in recency order, most recent first.
    fn check(c: &RootCache, model: &[u64]) {
        assert_eq!(c.len(), model.len());
        assert_eq!(c.first().map(|r| r.key), model.first().map(|&n| root(n).key), "current root");
        for &n in model {
            let pos = c.find(&root(n).key).expect("a held root is found");
            assert_eq!(c.roots[pos].key, root(n).key);
        }
        let lru = c.least_recent().map(|p| c.roots[p].key);
        assert_eq!(lru, model.last().map(|&n| root(n).key), "least recently used");
    }

    #[test]
    fn root_cache_matches_a_recency_list() {
        let mut rng = SmallRng::seed_from_u64(19);
        for round in 0..40 {
            let mut c = RootCache::default();
            let mut model: Vec<u64> = Vec::new();
            let cap = 1 + round % 70;
            for _ in 0..600 {
                let n = rng.gen_range(0..120u64);
                match rng.gen_range(0..10) {
                    0..=5 => {
                        // A CR3 switch: hit, or insert and evict.
                        match c.find(&root(n).key) {
                            Some(pos) => {
                                c.promote(pos);
                                let m = model.iter().position(|&x| x == n).expect("model holds it");
                                model.remove(m);
                            }
                            None => {
                                assert!(!model.contains(&n), "{n} held but not found");
                                c.push_current(root(n));
                            }
                        }
                        model.insert(0, n);
                        while c.len() > cap {
                            let pos = c.least_recent().expect("non-empty");
                            let gone = c.remove(pos);
                            let m = model.pop().expect("non-empty");
                            assert_eq!(gone.key, root(m).key, "evicts the least recent");
                        }
                    }
                    1..=8 if !model.is_empty() => {
                        // An invalid root dropped, anywhere in the order.
                        let m = model.remove(rng.gen_range(0..model.len()));
                        let pos = c.find(&root(m).key).expect("held");
                        assert_eq!(c.remove(pos).key, root(m).key);
                    }
                    _ => {
                        let rejected = c.rejected(|r| r.key.cr3 != (n % 5) << 12);
                        let want: Vec<RootKey> =
                            model.iter().filter(|&&m| m % 5 == n % 5).map(|&m| root(m).key).collect();
                        assert_eq!(rejected, want, "rejected roots, most recent first");
                        if rng.gen_range(0..8) == 0 {
                            let all: Vec<RootKey> = c.take_all().iter().map(|r| r.key).collect();
                            let want: Vec<RootKey> = model.iter().map(|&m| root(m).key).collect();
                            assert_eq!(all, want, "take_all, most recent first");
                            model.clear();
                        }
                    }
                }
                check(&c, &model);
                assert!(c.find(&root(1000).key).is_none());
            }
        }
    }

    mod in_the_mmu {
        use mmu_generic::addr::{Gfn, Gpa, Gva, Hva, Pfn};
        use mmu_generic::memslot::{Memslot, MemslotsBuilder, SlotFlags, SlotId};

        use crate::format::PageSize;
        use crate::frame::SimMemory;
        use crate::shadow::mode::{A, D, P, RW, US};
        use crate::shadow::{
            AccessKind, AccessOp, CpuFeatures, GuestCpu, GuestMode, NoDirtyLog, ShadowConfig, ShadowFault,
            ShadowMmu, SimGuestRam,
        };
        use crate::testing::LinearHost;

        const E: u64 = P | RW | US | A | D;

        /// Four address spaces (PML4s at gfns 0x10-0x13) sharing a PDPT at
        /// 0x20, a PD at 0x21 and a PT at 0x22 that maps gva 0 to gfn 0x40.
        fn mmu(cached_roots: usize) -> (ShadowMmu<SimMemory, SimGuestRam, LinearHost>, [GuestCpu; 4]) {
            let ram = SimGuestRam::new(&[(Gfn(0), 0x100)]);
            for k in 0..4 {
                ram.write(Gpa((0x10 + k) << 12), 8, (0x20 << 12) | E).expect("in RAM");
            }
            ram.write(Gpa(0x20 << 12), 8, (0x21 << 12) | E).expect("in RAM");
            ram.write(Gpa(0x21 << 12), 8, (0x22 << 12) | E).expect("in RAM");
            ram.write(Gpa(0x22 << 12), 8, (0x40 << 12) | E).expect("in RAM");
            let mut b = MemslotsBuilder::new();
            b.create(Memslot::new(SlotId(0), Gfn(0), 0x100, Hva(0x4000_0000), SlotFlags::empty()))
                .expect("slot");
            let config = ShadowConfig { features: CpuFeatures::typical(), max_pages: 64, cached_roots };
            let m = ShadowMmu::new(
                config,
                SimMemory::new(Pfn(0x8_0000), 64),
                ram,
                LinearHost::new(0x10_0000, PageSize::Size4K),
                b.build().expect("slots"),
            );
            (m, core::array::from_fn(|k| GuestCpu::new(GuestMode::Four, (0x10 + k as u64) << 12)))
        }

        /// A write across two entries of the PML4 at `gfn` zaps its shadow.
        fn zap_root_table(m: &mut ShadowMmu<SimMemory, SimGuestRam, LinearHost>, gfn: u64) {
            let before = m.stats().pages_zapped;
            m.emulated_write(Gpa((gfn << 12) + 0x104), 8, 0).expect("guest RAM");
            assert_eq!(m.stats().pages_zapped, before + 1, "the misaligned write zaps the root page");
        }

        #[test]
        fn a_zapped_cached_root_is_rebuilt_not_reused() {
            let (mut m, cpus) = mmu(1);
            m.load_cr3(&cpus[0]).expect("root");
            m.load_cr3(&cpus[1]).expect("root");
            zap_root_table(&mut m, 0x10);
            let hits = m.stats().root_hits;
            let built = m.stats().pages_created;
            m.load_cr3(&cpus[0]).expect("root");
            assert_eq!(m.stats().root_hits, hits, "the invalid root is not a hit");
            assert_eq!(m.stats().pages_created, built + 1, "a fresh root page");
            let read = AccessKind::user(AccessOp::Read);
            assert_eq!(m.page_fault(&cpus[0], Gva(0x123), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
            assert!(m.hw_access(&cpus[0], Gva(0x123), read).is_ok());
            m.take_flush().flush(&mut mmu_generic::backend::NoTlb);
        }

        #[test]
        fn a_zapped_cached_root_frees_its_place_in_the_cache() {
            let (mut m, cpus) = mmu(2);
            for cpu in &cpus[..3] {
                m.load_cr3(cpu).expect("root");
            }
            // Cached: 2 (current), 1, 0. Root 1 goes invalid; loading 3
            // drops it, so 0 stays cached and 1's empty table is freed.
            zap_root_table(&mut m, 0x11);
            let pages = m.pages();
            m.load_cr3(&cpus[3]).expect("root");
            assert_eq!(m.pages(), pages, "one root page made, the zapped one freed");
            let hits = m.stats().root_hits;
            m.load_cr3(&cpus[0]).expect("root");
            assert_eq!(m.stats().root_hits, hits + 1, "root 0 is still cached");
            m.take_flush().flush(&mut mmu_generic::backend::NoTlb);
        }
    }
}
