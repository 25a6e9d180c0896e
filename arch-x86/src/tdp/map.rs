//! Installing leaves: the shared path of faults and explicit maps, building
//! new tables off to the side and linking them with one store, and splitting
//! huge leaves without an unmapped window.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gfn, GfnRange, Pfn};
use mmu_generic::backend::FlushToken;
use mmu_generic::memslot::SlotId;
use mmu_generic::pte_list::PteHandle;

use super::{Pos, TdpError, TdpMmu};
use crate::format::{level_frames, level_index, Access, PageSize, TdpFormat, ENTRIES};
use crate::frame::{FrameId, FrameMemory};

/// The leaf an install is asked for.
#[derive(Clone, Copy, Debug)]
pub(super) struct NewLeaf {
    /// The guest frame to map (any frame of the page).
    pub gfn: Gfn,
    /// The host frame of `gfn` itself, not the head of the page.
    pub pfn: Pfn,
    /// Permissions.
    pub access: Access,
    /// Accessed/dirty bits to preset (a fault knows the access is about to
    /// happen).
    pub ad: u64,
    /// The memslot to file the leaf under in the reverse map.
    pub slot: Option<SlotId>,
}

/// How an install ended.
#[derive(Clone, Copy, Debug)]
pub(super) struct Installed {
    pub pos: Pos,
    pub new: u64,
}

impl<F: TdpFormat, M: FrameMemory> TdpMmu<F, M> {
    /// Installs a leaf of at most `size` for `want`.
    ///
    /// With `exact`, anything already in the way is an error and nothing
    /// changes. Without it (faults), a table where the leaf would go makes the
    /// leaf smaller, a huge leaf above is split, and an existing leaf at the
    /// position is updated in place.
    ///
    /// `grant(handle)` runs right before a leaf with write permission is
    /// stored (log, then grant); `false` stores it read-only instead.
    pub(super) fn install(
        &mut self,
        want: NewLeaf,
        size: PageSize,
        exact: bool,
        grant: &mut dyn FnMut(PteHandle) -> Result<bool, TdpError>,
        flush: &mut FlushToken,
    ) -> Result<Installed, TdpError> {
        let NewLeaf { gfn, pfn, access, ad, slot } = want;
        let mut target = size.level();
        let mut frame = self.root;
        let mut level = self.format.walk_length().levels();
        loop {
            let pos = Pos { frame, idx: level_index(gfn.0, level), level };
            let e = self.entry(pos).load(Ordering::Acquire);
            let present = self.format.is_present(e);
            let tracked = !present && level <= 3 && self.format.is_tracked(e);
            if level == target {
                if present && !self.format.is_leaf(e, level) {
                    if exact {
                        return Err(TdpError::AlreadyMapped(gfn));
                    }
                    // Tables already translate this range: map at their size.
                    target -= 1;
                    frame = self.child(e, level);
                    level -= 1;
                    continue;
                }
                if exact && (present || tracked) {
                    return Err(TdpError::AlreadyMapped(gfn));
                }
                let access = self.granted(access, pos, grant)?;
                let new = self.leaf_for(gfn, pfn, level, access) | self.ad_for(access, ad);
                return self.set_leaf(pos, e, new, slot, flush);
            }
            if tracked || (present && self.format.is_leaf(e, level)) {
                if exact {
                    return Err(TdpError::AlreadyMapped(gfn));
                }
                self.split_pos(pos, flush)?;
                continue;
            }
            if !present {
                return self.link_subtree(pos, want, target, grant);
            }
            frame = self.child(e, level);
            level -= 1;
        }
    }

    /// `access`, less write permission if `grant` refuses it for the leaf at
    /// `pos`. Asked only when the leaf would be writable.
    fn granted(
        &self,
        access: Access,
        pos: Pos,
        grant: &mut dyn FnMut(PteHandle) -> Result<bool, TdpError>,
    ) -> Result<Access, TdpError> {
        if access.contains(Access::WRITE) && !grant(pos.handle())? {
            return Ok(access - Access::WRITE);
        }
        Ok(access)
    }

    /// The A/D bits to preset: never D on a leaf that is not writable.
    fn ad_for(&self, access: Access, ad: u64) -> u64 {
        if access.contains(Access::WRITE) {
            ad
        } else {
            ad & !self.format.dirty_mask()
        }
    }

    /// The leaf at `level` containing `gfn` → `pfn`.
    fn leaf_for(&self, gfn: Gfn, pfn: Pfn, level: u8, access: Access) -> u64 {
        let size = PageSize::at_level(level).expect("leaves exist at levels 1 to 3 only");
        let offset = gfn.0 & (size.frames() - 1);
        self.format.leaf_entry(Pfn(pfn.0 - offset), size, access)
    }

    /// Writes leaf `new` at `pos`, whose entry was `old`.
    fn set_leaf(
        &mut self,
        pos: Pos,
        old: u64,
        new: u64,
        slot: Option<SlotId>,
        flush: &mut FlushToken,
    ) -> Result<Installed, TdpError> {
        let f = &self.format;
        if !f.is_present(old) {
            if !f.is_tracked(old) {
                if let Some(s) = slot {
                    self.rmap.add(s, self.entry_gfn(pos), pos.level as usize - 1, pos.handle())?;
                }
            }
            // The processor never writes a not-present entry (A/D are set only
            // in entries it uses), so a plain store cannot lose a bit. Release:
            // a walker that sees the entry sees whatever it points to.
            self.entry(pos).store(new, Ordering::Release);
            self.stats.leaves_installed += 1;
            return Ok(Installed { pos, new });
        }
        let same_pfn = f.entry_pfn(old, pos.level) == f.entry_pfn(new, pos.level);
        let access = f.leaf_access(new);
        let mut cur = old;
        let next = loop {
            let next = if same_pfn {
                f.with_leaf_access(cur, access) | (new & (f.accessed_mask() | f.dirty_mask()))
            } else {
                // The host page changed under a live mapping: keep the dirty
                // bit, the dirty log counts guest frames, not host pages.
                new | (cur & f.dirty_mask())
            };
            match self.entry(pos).compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break next,
                Err(now) => cur = now,
            }
        };
        if !same_pfn || !access.contains(f.leaf_access(old)) {
            flush.add_range(self.pos_range(pos));
        }
        self.stats.leaves_installed += 1;
        Ok(Installed { pos, new: next })
    }

    /// Builds the tables from below `pos` (an empty entry of level
    /// `pos.level`) down to a leaf at `target`, then links them with one
    /// store: no walker ever sees a partly built table.
    fn link_subtree(
        &mut self,
        pos: Pos,
        want: NewLeaf,
        target: u8,
        grant: &mut dyn FnMut(PteHandle) -> Result<bool, TdpError>,
    ) -> Result<Installed, TdpError> {
        let NewLeaf { gfn, pfn, access, ad, slot } = want;
        let n = (pos.level - target) as usize;
        let mut frames = [FrameId(0); 4];
        for k in 0..n {
            let level = pos.level - 1 - k as u8;
            let base = gfn.0 & !(level_frames(level + 1) - 1);
            match self.new_table(level, base) {
                Ok(frame) => frames[k] = frame,
                Err(e) => {
                    for &f in &frames[..k] {
                        self.free_table(f);
                    }
                    return Err(e);
                }
            }
        }
        let leaf = Pos { frame: frames[n - 1], idx: level_index(gfn.0, target), level: target };
        if let Some(s) = slot {
            if let Err(e) = self.rmap.add(s, self.entry_gfn(leaf), target as usize - 1, leaf.handle()) {
                for &f in &frames[..n] {
                    self.free_table(f);
                }
                return Err(e.into());
            }
        }
        let access = match self.granted(access, leaf, grant) {
            Ok(a) => a,
            Err(e) => {
                if let Some(s) = slot {
                    let _ = self.rmap.remove(s, self.entry_gfn(leaf), target as usize - 1, leaf.handle());
                }
                for &f in &frames[..n] {
                    self.free_table(f);
                }
                return Err(e);
            }
        };
        let new = self.leaf_for(gfn, pfn, target, access) | self.ad_for(access, ad);
        self.entry(leaf).store(new, Ordering::Relaxed);
        for k in 0..n - 1 {
            let level = pos.level - 1 - k as u8;
            let link = self.format.table_entry(self.mem.pfn(frames[k + 1]));
            self.table(frames[k])[level_index(gfn.0, level)].store(link, Ordering::Relaxed);
        }
        let top = self.format.table_entry(self.mem.pfn(frames[0]));
        self.entry(pos).store(top, Ordering::Release);
        self.stats.leaves_installed += 1;
        Ok(Installed { pos: leaf, new })
    }

    /// The guest frames the entry at `pos` covers.
    pub(super) fn pos_range(&self, pos: Pos) -> GfnRange {
        let start = self.entry_gfn(pos);
        GfnRange { start, end: Gfn(start.0 + level_frames(pos.level)) }
    }

    /// Replaces the huge leaf at `pos` by a table of 512 leaves with the same
    /// translation, permissions and A/D bits (an access-tracked leaf becomes
    /// 512 access-tracked leaves). The table is filled
    /// first and swapped in with a compare-exchange, so every frame stays
    /// mapped throughout; if the processor set A or D meanwhile, the fill is
    /// redone from the new value.
    pub(super) fn split_pos(&mut self, pos: Pos, flush: &mut FlushToken) -> Result<(), TdpError> {
        let size = PageSize::at_level(pos.level).filter(|s| *s != PageSize::Size4K);
        let Some(size) = size else { return Ok(()) };
        let gfn = self.entry_gfn(pos);
        let child_level = pos.level - 1;
        let child = self.new_table(child_level, gfn.0)?;
        let slot = self.slot_of(gfn);
        if let Some(s) = slot {
            if let Err(e) = self.rmap_split(s, gfn, pos, child) {
                self.free_table(child);
                return Err(e);
            }
        }
        let link = self.format.table_entry(self.mem.pfn(child));
        let mut cur = self.entry(pos).load(Ordering::Acquire);
        loop {
            for (i, e) in self.table(child).iter().enumerate() {
                e.store(self.format.split_child(cur, size, i), Ordering::Relaxed);
            }
            match self.entry(pos).compare_exchange(cur, link, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        // The CPU may hold the huge translation and the new small ones at
        // once; both translate alike, but later changes to a small leaf must
        // also drop the huge one.
        flush.add_range(self.pos_range(pos));
        self.stats.splits += 1;
        Ok(())
    }

    /// Moves the reverse-map entry of the huge leaf at `pos` to the 512
    /// leaves of `child`, all or nothing.
    fn rmap_split(&mut self, slot: SlotId, gfn: Gfn, pos: Pos, child: FrameId) -> Result<(), TdpError> {
        // Descriptors come from the reserve topped up before the lock
        // (`TdpMmu::reserve`); an empty one fails the split, all or nothing.
        let child_level = pos.level as usize - 2;
        let step = level_frames(pos.level - 1);
        let child_pos = |i: usize| Pos { frame: child, idx: i, level: pos.level - 1 };
        for i in 0..ENTRIES {
            if let Err(e) =
                self.rmap.add(slot, Gfn(gfn.0 + i as u64 * step), child_level, child_pos(i).handle())
            {
                for j in 0..i {
                    let _ = self.rmap.remove(
                        slot,
                        Gfn(gfn.0 + j as u64 * step),
                        child_level,
                        child_pos(j).handle(),
                    );
                }
                return Err(e.into());
            }
        }
        // The huge leaf may have been mapped outside the reverse map's reach
        // (the slot changed since): nothing to remove then.
        let _ = self.rmap.remove(slot, gfn, pos.level as usize - 1, pos.handle());
        Ok(())
    }

    /// Maps `size` page at `gfn` to `pfn` with `access` (an explicit mapping,
    /// as a VMM sets up memory or a test builds tables). Nothing may be mapped
    /// there yet, not even a table where a huge leaf would go.
    pub fn map(&mut self, gfn: Gfn, pfn: Pfn, size: PageSize, access: Access) -> Result<(), TdpError> {
        self.map_inner(gfn, pfn, size, access).map(|_| ())
    }

    fn map_inner(
        &mut self,
        gfn: Gfn,
        pfn: Pfn,
        size: PageSize,
        access: Access,
    ) -> Result<Installed, TdpError> {
        let slot = self.check_map(gfn, pfn, size, access)?;
        let mut flush = FlushToken::new();
        let want = NewLeaf { gfn, pfn, access, ad: 0, slot };
        // An explicit mapping is the VMM's own: no dirty log to ask.
        let r = self.install(want, size, true, &mut |_| Ok(true), &mut flush);
        debug_assert!(!flush.is_needed(), "an exact install only fills empty entries");
        // Nothing any CPU could cache changed: only empty entries were filled.
        flush.discard();
        r
    }

    /// Maps up to `n` consecutive 4 KiB pages from `gfn` to host frames from
    /// `pfn` into the page table `frame` that an earlier map of the batch
    /// reached (all `n` pages lie in it), without walking from the root and
    /// with the checks of [`check_map`](Self::check_map) and the memslot
    /// lookup done once for the run instead of per page. Stops before the
    /// first page that needs the full path (a check fails or its entry is
    /// not empty; the full path then reports the error or does the work);
    /// returns the number of pages mapped. On a reverse-map error the pages
    /// before the failing one stay mapped.
    fn fill_4k(
        &mut self,
        frame: FrameId,
        gfn: Gfn,
        pfn: Pfn,
        n: u64,
        access: Access,
    ) -> Result<u64, TdpError> {
        debug_assert!(n >= 1 && level_index(gfn.0, 1) as u64 + n <= ENTRIES as u64);
        let last_gfn = gfn.0 + (n - 1);
        if !access.contains(Access::READ)
            || !self.format.phys_width().fits(Pfn(pfn.0.saturating_add(n - 1)))
            || !self.format.walk_length().covers(last_gfn)
        {
            return Ok(0);
        }
        // Every page of the run files under the slot that holds `gfn` (or
        // under none): stop at the slot's end, or at the next slot's start.
        let (slot, n) = match self.slots.lookup(gfn) {
            Some(s) => (Some(s.id()), n.min(s.gfns().end.0.wrapping_sub(gfn.0))),
            None => {
                let after = self.slots.iter().as_slice();
                let next = after.partition_point(|s| s.gfns().start.0 <= gfn.0);
                let n = after.get(next).map_or(n, |s| n.min(s.gfns().start.0 - gfn.0));
                (None, n)
            }
        };
        let first = level_index(gfn.0, 1);
        let table = self.mem.table(frame);
        let mut done = 0u64;
        let mut result = Ok(());
        for (i, entry) in table[first..first + n as usize].iter().enumerate() {
            if entry.load(Ordering::Acquire) != 0 {
                break;
            }
            if let Some(s) = slot {
                let h = Pos { frame, idx: first + i, level: 1 }.handle();
                if let Err(e) = self.rmap.add(s, Gfn(gfn.0 + i as u64), 0, h) {
                    result = Err(e.into());
                    break;
                }
            }
            // An empty entry: the processor never writes it, so a plain
            // store loses nothing. Release: a walker that sees the entry
            // sees whatever it points to.
            let new = self.format.leaf_entry(Pfn(pfn.0 + i as u64), PageSize::Size4K, access);
            entry.store(new, Ordering::Release);
            done += 1;
        }
        self.stats.leaves_installed += done;
        result.map(|()| done)
    }

    /// Validates an explicit mapping and finds its slot.
    fn check_map(
        &self,
        gfn: Gfn,
        pfn: Pfn,
        size: PageSize,
        access: Access,
    ) -> Result<Option<SlotId>, TdpError> {
        if !access.contains(Access::READ) {
            return Err(TdpError::AccessUnsupported(access));
        }
        if size > self.format.largest_page() {
            return Err(TdpError::SizeUnsupported(size));
        }
        let n = size.frames();
        if gfn.0 & (n - 1) != 0 || pfn.0 & (n - 1) != 0 {
            return Err(TdpError::Misaligned { gfn, pfn, size });
        }
        let width = self.format.phys_width();
        let last_pfn = Pfn(pfn.0.saturating_add(n - 1));
        if !width.fits(last_pfn) {
            return Err(TdpError::PfnTooWide { pfn, width: width.bits() });
        }
        let last = Gfn(gfn.0.saturating_add(n - 1));
        if !self.format.walk_length().covers(last.0) {
            return Err(TdpError::GfnTooWide(gfn));
        }
        let range = GfnRange { start: gfn, end: Gfn(last.0 + 1) };
        match self.slots.lookup(gfn) {
            Some(s) if s.contains(last) => Ok(Some(s.id())),
            Some(_) => Err(TdpError::CrossesSlot { gfn, size }),
            None if size != PageSize::Size4K && self.slots.iter().any(|s| s.gfns().overlaps(&range)) => {
                Err(TdpError::CrossesSlot { gfn, size })
            }
            None => Ok(None),
        }
    }

    /// Maps `npages` frames from `gfn` to host frames from `pfn`, each piece
    /// with the largest page up to `max` that alignment, length and memslot
    /// edges allow. On error the frames before the failing one stay mapped;
    /// returns the number of frames mapped.
    pub fn map_range(
        &mut self,
        gfn: Gfn,
        pfn: Pfn,
        npages: u64,
        access: Access,
        max: PageSize,
    ) -> Result<u64, TdpError> {
        let mut done = 0;
        // The page table the last 4 KiB map reached, and the frames it covers.
        let mut last: Option<(FrameId, u64)> = None;
        while done < npages {
            let (g, p) = (Gfn(gfn.0 + done), Pfn(pfn.0 + done));
            if let Some((frame, base)) = last.filter(|&(_, base)| g.0.wrapping_sub(base) < ENTRIES as u64) {
                // The rest of that table in one run; a page the run stops at
                // takes the full path below.
                let n = (base + ENTRIES as u64 - g.0).min(npages - done);
                let k = self.fill_4k(frame, g, p, n, access)?;
                done += k;
                if k > 0 {
                    continue;
                }
            }
            let mut size = max.min(self.format.largest_page());
            loop {
                let n = size.frames();
                let fits = g.0 & (n - 1) == 0 && p.0 & (n - 1) == 0 && npages - done >= n;
                if size == PageSize::Size4K || (fits && self.check_map(g, p, size, access).is_ok()) {
                    break;
                }
                size = size.smaller().expect("4 KiB always breaks the loop");
            }
            let at = self.map_inner(g, p, size, access)?;
            last = (at.pos.level == 1).then(|| (at.pos.frame, g.0 & !(ENTRIES as u64 - 1)));
            done += size.frames();
        }
        Ok(done)
    }
}
