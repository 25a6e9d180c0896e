//! Shadow pages: one shadow table per (guest table, role), found through a
//! hash of the guest frame.
//!
//! A guest table may need several shadow tables: reached with different
//! access rights from above (the leaf entries combine them), under different
//! paging controls, or, for a 32-bit guest whose 1024-entry tables are
//! shadowed by 512-entry PAE tables, one per quadrant. The [`Role`] says
//! which. Every page of a guest frame hangs off the same hash bucket, so
//! write-protecting, unsyncing or zapping "every shadow of gfn G" is one
//! bucket walk (KVM's `mmu_page_hash`, hashed by gfn only).
//!
//! Each page keeps the shadow entries that point to it (its parents) in the
//! core's [`PteList`]: one parent inline in the head word, more in
//! cache-line descriptors of the shared [`PteListPool`].

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use mmu_generic::addr::Gfn;
use mmu_generic::pte_list::{PteList, PteListPool};

use super::mode::{GuestCpu, GuestMode, PteAccess};
use crate::format::ENTRIES;
use crate::frame::FrameId;

/// What a shadow table shadows besides the guest frame (KVM's
/// `kvm_mmu_page_role`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Role {
    /// Shadow level (1 = page table).
    pub level: u8,
    /// The page maps a piece of a guest large page directly (its gfn is the
    /// first frame of that piece), rather than shadowing a guest table.
    pub direct: bool,
    /// What the guest entries above permit (for a direct page: the whole
    /// translation). Leaf entries combine it with their own.
    pub access: PteAccess,
    /// For 32-bit guests: which 512-entry part of the 1024-entry guest table
    /// (0-1 for page tables, 0-3 for page directories).
    pub quadrant: u8,
    /// The guest paging mode (entry width, reserved bits).
    pub mode: GuestMode,
    /// CR0.WP: with WP = 0 supervisor writes may turn read-only user pages
    /// into writable supervisor shadow entries, which a WP = 1 context must
    /// not inherit.
    pub cr0_wp: bool,
    /// CR4.SMEP with CR0.WP = 0 (those converted entries lose execute).
    pub smep_andnot_wp: bool,
    /// CR4.SMAP with CR0.WP = 0 (user pages are then never converted, so
    /// entries converted without SMAP must not serve a context with it).
    pub smap_andnot_wp: bool,
    /// IA32_EFER.NXE (whether bit 63 is XD or reserved).
    pub efer_nx: bool,
    /// CR4.PSE (32-bit guests: whether PDE bit 7 maps 4 MiB).
    pub cr4_pse: bool,
}

impl Role {
    /// The role of a page at `level` for a guest with `cpu`'s controls.
    pub fn for_cpu(cpu: &GuestCpu, level: u8, direct: bool, access: PteAccess, quadrant: u8) -> Self {
        Role {
            level,
            direct,
            access,
            quadrant,
            mode: cpu.mode,
            cr0_wp: cpu.cr0_wp,
            smep_andnot_wp: cpu.cr4_smep && !cpu.cr0_wp,
            smap_andnot_wp: cpu.cr4_smap && !cpu.cr0_wp,
            efer_nx: cpu.efer_nxe,
            cr4_pse: cpu.mode == GuestMode::Bits32 && cpu.cr4_pse,
        }
    }

    /// The paging controls of the role, as a CPU state with `cr3`.
    pub fn cpu(&self, cr3: u64) -> GuestCpu {
        GuestCpu {
            mode: self.mode,
            cr3,
            pdptrs: [0; 4],
            cr0_wp: self.cr0_wp,
            cr4_pse: self.cr4_pse,
            cr4_smep: self.smep_andnot_wp,
            cr4_smap: self.smap_andnot_wp,
            efer_nxe: self.efer_nx,
            eflags_ac: false,
        }
    }
}

/// The index of a page in the cache, stable while the page lives.
pub(crate) type PageIdx = u32;

/// One shadow table and its bookkeeping.
#[derive(Debug)]
pub(crate) struct ShadowPage {
    /// The guest table's frame, or for a direct page its first guest frame.
    pub gfn: Gfn,
    /// What the page shadows besides the frame.
    pub role: Role,
    /// The shadow table.
    pub frame: FrameId,
    /// Shadow entries pointing to this page.
    pub parents: PteList,
    /// The MMU generation the page was made in.
    pub generation: u64,
    /// The guest may write the table freely; its leaves are refreshed at
    /// INVLPG, CR3 load and TLB flush.
    pub unsync: bool,
    /// Zapped while a root: unhashed and emptied, freed when released.
    pub invalid: bool,
    /// Roots (current or cached) holding the page.
    pub root_count: u32,
    /// Emulated writes since the page was last used by a fault. Changed
    /// through [`PageCache::bump_flood`] and [`PageCache::clear_flood`],
    /// which keep count of the pages where it is not zero.
    pub write_flood: u8,
    /// Next page of the hash bucket, index + 1.
    pub hash_next: u32,
    /// Position in [`PageCache::active`].
    pub active_pos: u32,
    /// For leaf pages: the (slot << 48 | gfn) each present entry maps, for
    /// the reverse map.
    pub leaf_gfns: Option<Box<[u64; ENTRIES]>>,
}

/// Bits of a leaf-gfn word that hold the slot number.
pub(crate) const SLOT_SHIFT: u32 = 48;

/// Buckets of the hash (KVM's `KVM_MMU_HASH_SHIFT` of 12).
const BUCKETS: usize = 1 << 12;

/// Entries of the guest-table filter: one per `gfn mod TABLE_FILTER`.
const TABLE_FILTER: usize = 1 << 14;

/// The pages, the hash over guest frames and the parent-list descriptors.
#[derive(Debug)]
pub(crate) struct PageCache {
    /// A slab: a freed page's record stays, dead, until its index is
    /// reused, so a lookup by index is one bounds check.
    pages: Vec<ShadowPage>,
    /// Whether each record of `pages` is a live page.
    live: Vec<bool>,
    free: Vec<PageIdx>,
    buckets: Vec<u32>,
    /// Hashed pages that shadow a guest table (not direct ones), counted by
    /// `gfn mod TABLE_FILTER`; a count that reaches 255 stays there. What
    /// KVM's per-gfn write-tracking count answers on the fault path (is
    /// this frame a shadowed guest table?), indexed by the frame itself:
    /// consecutive frames share a cache line, where their hash buckets are
    /// spread over the whole table.
    tables: Vec<u8>,
    /// Page index + 1 of each shadow frame.
    by_frame: Vec<u32>,
    /// Live pages, roughly in creation order (eviction and obsolete reclaim).
    pub active: Vec<PageIdx>,
    /// Descriptors of the parent lists.
    pub pool: PteListPool,
    /// Live pages whose write-flood count is not zero: while none is, a
    /// fault has no count to reset on its path.
    flooding: u32,
}

#[inline]
fn filter_of(gfn: Gfn) -> usize {
    gfn.0 as usize & (TABLE_FILTER - 1)
}

#[inline]
fn bucket_of(gfn: Gfn) -> usize {
    // Fibonacci hashing: consecutive frames spread over the buckets.
    (gfn.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - 12)) as usize
}

impl PageCache {
    pub fn new() -> Self {
        Self {
            pages: Vec::new(),
            live: Vec::new(),
            free: Vec::new(),
            buckets: vec![0; BUCKETS],
            tables: vec![0; TABLE_FILTER],
            by_frame: Vec::new(),
            active: Vec::new(),
            pool: PteListPool::new(),
            flooding: 0,
        }
    }

    #[inline]
    pub fn get(&self, i: PageIdx) -> &ShadowPage {
        debug_assert!(self.live[i as usize], "page index {i} names a freed page");
        &self.pages[i as usize]
    }

    #[inline]
    pub fn get_mut(&mut self, i: PageIdx) -> &mut ShadowPage {
        debug_assert!(self.live[i as usize], "page index {i} names a freed page");
        &mut self.pages[i as usize]
    }

    /// Whether `i` names a live page.
    #[inline]
    pub fn is_live(&self, i: PageIdx) -> bool {
        self.live.get(i as usize).is_some_and(|&l| l)
    }

    /// The page whose shadow table is `frame`.
    #[inline]
    pub fn of_frame(&self, frame: FrameId) -> Option<PageIdx> {
        self.by_frame.get(frame.0 as usize).and_then(|&i| i.checked_sub(1))
    }

    /// Pages alive.
    pub fn len(&self) -> usize {
        self.pages.len() - self.free.len()
    }

    /// Adds a page and hashes it.
    pub fn insert(&mut self, mut page: ShadowPage) -> PageIdx {
        let b = bucket_of(page.gfn);
        page.hash_next = self.buckets[b];
        let frame = page.frame.0 as usize;
        let i = match self.free.pop() {
            Some(i) => {
                self.pages[i as usize] = page;
                self.live[i as usize] = true;
                i
            }
            None => {
                self.pages.push(page);
                self.live.push(true);
                (self.pages.len() - 1) as PageIdx
            }
        };
        self.buckets[b] = i + 1;
        let (gfn, direct) = (self.get(i).gfn, self.get(i).role.direct);
        self.flooding += u32::from(self.get(i).write_flood != 0);
        if !direct {
            let count = &mut self.tables[filter_of(gfn)];
            *count = count.saturating_add(1);
        }
        self.get_mut(i).active_pos = self.active.len() as u32;
        if self.by_frame.len() <= frame {
            self.by_frame.resize(frame + 1, 0);
        }
        self.by_frame[frame] = i + 1;
        self.active.push(i);
        i
    }

    /// Takes a page out of the hash (it stays alive).
    pub fn unhash(&mut self, i: PageIdx) {
        let gfn = self.get(i).gfn;
        let b = bucket_of(gfn);
        let next = self.get(i).hash_next;
        if self.buckets[b] == i + 1 {
            self.buckets[b] = next;
        } else {
            let mut cur = self.buckets[b];
            while let Some(c) = cur.checked_sub(1) {
                let p = self.get_mut(c);
                if p.hash_next == i + 1 {
                    p.hash_next = next;
                    break;
                }
                cur = p.hash_next;
            }
        }
        self.get_mut(i).hash_next = 0;
        if !self.get(i).role.direct {
            let count = &mut self.tables[filter_of(gfn)];
            debug_assert!(*count > 0, "a hashed guest-table page of {gfn} was counted");
            // A saturated count no longer knows how many it stands for.
            if *count != u8::MAX {
                *count -= 1;
            }
        }
    }

    /// Drops a page that is unhashed; returns its shadow table's frame.
    pub fn remove(&mut self, i: PageIdx) -> FrameId {
        assert!(self.is_live(i), "removing page {i}, which is not live");
        self.live[i as usize] = false;
        let page = &mut self.pages[i as usize];
        // The dead record keeps no leaf-gfn array.
        page.leaf_gfns = None;
        self.flooding -= u32::from(page.write_flood != 0);
        let (frame, pos) = (page.frame, page.active_pos as usize);
        self.by_frame[frame.0 as usize] = 0;
        self.free.push(i);
        if self.active.get(pos) == Some(&i) {
            self.active.swap_remove(pos);
            if let Some(&moved) = self.active.get(pos) {
                self.get_mut(moved).active_pos = pos as u32;
            }
        }
        frame
    }

    /// Counts an emulated write to page `i`'s table; returns the count.
    pub fn bump_flood(&mut self, i: PageIdx) -> u8 {
        let p = self.get_mut(i);
        let was = p.write_flood;
        p.write_flood = was.saturating_add(1);
        let now = p.write_flood;
        self.flooding += u32::from(was == 0);
        now
    }

    /// A fault used page `i`: its write-flood count starts again.
    #[inline]
    pub fn clear_flood(&mut self, i: PageIdx) {
        let p = self.get_mut(i);
        if p.write_flood != 0 {
            p.write_flood = 0;
            self.flooding -= 1;
        }
    }

    /// Whether some live page has a write-flood count.
    #[inline]
    pub fn any_flooding(&self) -> bool {
        self.flooding != 0
    }

    /// Replaces the active list (after a reclaim pass took it) and renumbers.
    pub fn set_active(&mut self, active: Vec<PageIdx>) {
        self.active = active;
        for pos in 0..self.active.len() {
            let i = self.active[pos];
            self.get_mut(i).active_pos = pos as u32;
        }
    }

    /// Whether no hashed page shadows `gfn` as a guest table (direct pages
    /// may map it): the usual answer for a frame the guest writes. `false`
    /// means maybe: frames `TABLE_FILTER` apart share an entry.
    #[inline]
    pub fn surely_no_table(&self, gfn: Gfn) -> bool {
        self.tables[filter_of(gfn)] == 0
    }

    /// The hashed pages of `gfn`, any role.
    pub fn of_gfn(&self, gfn: Gfn) -> GfnPages<'_> {
        GfnPages { cache: self, gfn, next: self.buckets[bucket_of(gfn)] }
    }

    /// The hashed page of (`gfn`, `role`) made in `generation`.
    pub fn find(&self, gfn: Gfn, role: &Role, generation: u64) -> Option<PageIdx> {
        self.of_gfn(gfn).find(|&i| {
            let p = self.get(i);
            p.role == *role && p.generation == generation
        })
    }

    /// Bytes of bookkeeping per page (the struct, its leaf-gfn array, hash
    /// and frame-index words), not counting the shadow table's 4 KiB frame.
    pub fn meta_bytes(&self, i: PageIdx) -> usize {
        let p = self.get(i);
        core::mem::size_of::<ShadowPage>()
            + core::mem::size_of::<bool>()
            + 2 * core::mem::size_of::<u32>()
            + p.leaf_gfns.as_ref().map_or(0, |_| ENTRIES * 8)
    }
}

/// Iterator over the hashed pages of one guest frame.
pub(crate) struct GfnPages<'a> {
    cache: &'a PageCache,
    gfn: Gfn,
    next: u32,
}

impl Iterator for GfnPages<'_> {
    type Item = PageIdx;

    #[inline]
    fn next(&mut self) -> Option<PageIdx> {
        while let Some(i) = self.next.checked_sub(1) {
            let p = self.cache.get(i);
            self.next = p.hash_next;
            if p.gfn == self.gfn {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::mode::GuestCpu;

    fn page(gfn: u64, level: u8, frame: u32) -> ShadowPage {
        let cpu = GuestCpu::new(GuestMode::Four, 0);
        ShadowPage {
            gfn: Gfn(gfn),
            role: Role::for_cpu(&cpu, level, false, PteAccess::all(), 0),
            frame: FrameId(frame),
            parents: PteList::EMPTY,
            generation: 0,
            unsync: false,
            invalid: false,
            root_count: 0,
            write_flood: 0,
            hash_next: 0,
            active_pos: 0,
            leaf_gfns: None,
        }
    }

    #[test]
    fn pages_of_a_gfn_share_a_bucket_and_are_found_by_role() {
        let mut c = PageCache::new();
        let a = c.insert(page(7, 1, 0));
        let b = c.insert(page(7, 2, 1));
        // Frames that collide in the hash still only answer for their gfn.
        let others: Vec<PageIdx> = (0..5000u64).map(|g| c.insert(page(g + 100, 1, 2 + g as u32))).collect();
        let mut of7: Vec<PageIdx> = c.of_gfn(Gfn(7)).collect();
        of7.sort_unstable();
        assert_eq!(of7, [a, b]);
        assert_eq!(c.find(Gfn(7), &c.get(b).role.clone(), 0), Some(b));
        assert_eq!(c.find(Gfn(7), &c.get(b).role.clone(), 1), None, "another generation");
        assert_eq!(c.of_frame(FrameId(1)), Some(b));
        c.unhash(a);
        assert_eq!(c.of_gfn(Gfn(7)).collect::<Vec<_>>(), [b]);
        c.remove(a);
        assert!(!c.is_live(a) && c.of_frame(FrameId(0)).is_none());
        for &o in &others {
            c.unhash(o);
            c.remove(o);
        }
        assert_eq!(c.len(), 1);
        assert_eq!(c.active, [b]);
        assert_eq!(c.get(b).active_pos, 0);
    }

    #[test]
    fn the_pages_with_a_write_flood_count_are_counted() {
        let mut c = PageCache::new();
        let (a, b) = (c.insert(page(1, 1, 0)), c.insert(page(2, 1, 1)));
        assert!(!c.any_flooding());
        assert_eq!((c.bump_flood(a), c.bump_flood(a), c.bump_flood(b)), (1, 2, 1));
        c.clear_flood(a);
        assert_eq!(c.get(a).write_flood, 0);
        assert!(c.any_flooding(), "b still has a count");
        c.clear_flood(a);
        c.unhash(b);
        c.remove(b);
        assert!(!c.any_flooding(), "a removed page takes its count along");
        c.bump_flood(a);
        c.clear_flood(a);
        assert!(!c.any_flooding());
    }

    /// The guest-table filter against the hash itself: it never answers
    /// "none" for a frame some hashed non-direct page shadows, and answers
    /// "none" for every frame no such page shares an entry with, unless that
    /// entry saturated.
    #[test]
    fn the_table_filter_never_misses_a_shadowed_table_and_forgets_unhashed_ones() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(19);
        let mut c = PageCache::new();
        let mut hashed: Vec<PageIdx> = Vec::new();
        let mut frame = 0u32;
        // Frames near 0 and their aliases TABLE_FILTER and 2 x TABLE_FILTER up.
        let gfns: Vec<u64> =
            (0..24u64).flat_map(|g| [g, g + TABLE_FILTER as u64, g + 2 * TABLE_FILTER as u64]).collect();
        for round in 0..4000 {
            if hashed.is_empty() || rng.gen_bool(0.55) {
                let gfn = gfns[rng.gen_range(0..gfns.len())];
                let mut p = page(gfn, rng.gen_range(1..=4), frame);
                p.role.direct = rng.gen_bool(0.3);
                frame += 1;
                hashed.push(c.insert(p));
            } else {
                let i = hashed.swap_remove(rng.gen_range(0..hashed.len()));
                c.unhash(i);
                c.remove(i);
            }
            for &gfn in &gfns {
                let tables = |g: u64| hashed.iter().any(|&i| c.get(i).gfn == Gfn(g) && !c.get(i).role.direct);
                if tables(gfn) {
                    assert!(
                        !c.surely_no_table(Gfn(gfn)),
                        "round {round}: a shadowed table at {gfn:#x} was missed"
                    );
                }
                let entry = filter_of(Gfn(gfn));
                let sharing = gfns.iter().any(|&g| filter_of(Gfn(g)) == entry && tables(g));
                if !sharing && c.tables[entry] != u8::MAX {
                    assert!(c.surely_no_table(Gfn(gfn)), "round {round}: {gfn:#x} still counts a table");
                }
            }
        }
        // 300 tables of one frame saturate its entry, which then stays.
        let many: Vec<PageIdx> = (0..300).map(|k| c.insert(page(0x55, 1, frame + k))).collect();
        for i in many {
            c.unhash(i);
            c.remove(i);
        }
        assert!(!c.surely_no_table(Gfn(0x55)), "a saturated count is never lowered");
    }
}
