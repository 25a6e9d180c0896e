//! The fault path: walk the guest's tables, then either report the guest's
//! own fault or build the shadow path (linking or making shadow pages) and
//! install a 4 KiB leaf with the rights the guest's walk grants.

use super::*;

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> ShadowMmu<M, G, H> {
    /// Tops up the descriptor reserves a fault may use (done before taking
    /// the MMU lock in a real hypervisor; here at the start of a fault).
    pub(super) fn topup(&mut self) {
        // Nearly always full already: ask only when not.
        if self.rmap.pool().reserve_len() < 2 {
            self.rmap.reserve(2);
        }
        if self.cache.pool.reserve_len() < 8 {
            self.cache.pool.reserve(8);
        }
    }

    /// A page fault the processor took on the shadow tables at `gva`, for
    /// `access`, with the guest's paging state `cpu`.
    pub fn page_fault(
        &mut self,
        cpu: &GuestCpu,
        gva: Gva,
        access: AccessKind,
        dirty: &mut (impl DirtyTracker + ?Sized),
    ) -> Result<ShadowFault, ShadowError> {
        self.stats.faults += 1;
        // Hypervisor writes a full ring refused at the last fault: logged
        // before anything else happens.
        if self.marks_pending {
            for pending in &mut self.pending_marks {
                if let Some((slot, gfn)) = *pending {
                    if !dirty.mark(slot, gfn) {
                        return Ok(ShadowFault::Retry);
                    }
                    *pending = None;
                }
            }
            self.marks_pending = false;
        }
        self.topup();
        self.make_room();
        self.ensure_root(cpu)?;
        let gva = if cpu.mode == GuestMode::Bits32 || cpu.mode == GuestMode::Pae {
            Gva(gva.0 & 0xffff_ffff)
        } else {
            gva
        };
        let mem = HintedSlotMemory::new(&self.slots, &self.guest, self.slot_hint);
        let mut w = GuestWalk::empty(cpu.mode);
        let walked = walk_any_into(&mem, cpu, &self.config.features, gva, access, true, &mut w);
        self.slot_hint = mem.hint.get();
        match walked {
            Ok(()) => {}
            Err(WalkFault::BadAddress(_)) => return Ok(ShadowFault::InjectGp),
            Err(WalkFault::Contended) => return Ok(ShadowFault::Retry),
            Err(f) => return Ok(ShadowFault::InjectPf(f.error_code().expect("page faults carry a code"))),
        }
        // The walk's A/D updates wrote guest table pages: log them.
        if w.ad_written != 0 && !mark_ad_written(&self.slots, &mut self.pending_marks, &w, dirty) {
            self.marks_pending = true;
            return Ok(ShadowFault::Retry);
        }
        let gpa = w.gpa;
        let gfn = gpa.gfn();
        let Some(slot) = mem.lookup(gfn) else { return Ok(ShadowFault::Mmio { gpa }) };
        // What the rest needs of the slot, without copying it.
        let (slot_id, readonly) = (slot.id(), slot.flags().contains(SlotFlags::READONLY));
        let hva = slot.gfn_to_hva(gfn).expect("the slot holds the frame");
        let write = access.op == AccessOp::Write;
        if write && readonly {
            return Ok(ShadowFault::Denied { gpa });
        }

        // The leaf's rights: the guest's, write only once D is set.
        let mut user = w.access.contains(PteAccess::USER);
        let mut exec = w.access.contains(PteAccess::EXEC);
        let mut writable = w.access.contains(PteAccess::WRITE) && w.dirty;
        if write && !access.is_user() && !cpu.cr0_wp && !w.access.contains(PteAccess::WRITE) {
            // CR0.WP = 0 let a supervisor write through a read-only
            // translation; the processor runs with WP = 1, so make the
            // entry a writable supervisor one (user accesses then fault
            // and get the guest's rights back). SMEP must still refuse
            // supervisor fetches from what the guest sees as a user page;
            // SMAP would have to refuse supervisor reads of it with AC = 0,
            // which no entry can say: emulate instead.
            if user && cpu.cr4_smap {
                return Ok(ShadowFault::Emulate { gpa });
            }
            if user && cpu.cr4_smep {
                exec = false;
            }
            user = false;
            writable = true;
        }

        let snap = self.invalidation.snapshot();
        let host = self.host.resolve(hva, write).map_err(|_| ShadowError::HostFault(gfn))?;
        if self.invalidation.must_retry(snap, hva) {
            return Ok(ShadowFault::Retry);
        }
        if write && !host.writable {
            return Ok(ShadowFault::Denied { gpa });
        }
        let (page, frame, j) = self.fetch_path(cpu, gva, &w, write.then_some(gfn))?;

        // Write permission: not into read-only memory, not into a
        // write-protected guest table, and in a write-protect-logged slot
        // only on a write fault.
        let mut emulate = false;
        if writable && (readonly || !host.writable || (!write && dirty.write_protected(slot_id))) {
            writable = false;
        }
        if writable && !self.cache.surely_no_table(gfn) && !self.allow_write(gfn) {
            writable = false;
            emulate = write;
        }
        let mut spte = (host.pfn.0 << 12) | P;
        if user {
            spte |= US;
        }
        if !exec {
            spte |= XD;
        }
        // Log, then grant: the tracker hears of the leaf before it is
        // stored writable, so the leaf goes in once, with W or without (a
        // refusal, a full ring, maps it read-only and retries).
        let granted = writable && dirty.note_writable(slot_id, gfn, handle(frame, j));
        if granted {
            spte |= RW;
        }
        self.install_leaf(page, frame, j, slot_id, gfn, spte)?;
        if writable && !granted {
            return Ok(ShadowFault::Retry);
        }
        if emulate {
            return Ok(ShadowFault::Emulate { gpa });
        }
        Ok(ShadowFault::Fixed)
    }

    /// Whether a leaf mapping `gfn` may be writable: yes unless the frame is
    /// a shadowed guest table; a table shadowed only by leaf pages goes
    /// unsync instead (KVM's `mmu_try_to_unsync_pages`).
    pub(super) fn allow_write(&mut self, gfn: Gfn) -> bool {
        let gen = self.generation.current();
        let shadows = |p: &ShadowPage| !p.role.direct && p.generation == gen && !p.invalid;
        // One pass over the hash bucket, without collecting: most frames
        // written are no guest table, and their bucket holds no page of them.
        let mut shadowed = false;
        for i in self.cache.of_gfn(gfn) {
            let p = self.cache.get(i);
            if shadows(p) {
                if p.role.level > 1 {
                    return false;
                }
                shadowed = true;
            }
        }
        if !shadowed {
            return true;
        }
        let pages: Vec<PageIdx> = self.cache.of_gfn(gfn).filter(|&i| shadows(self.cache.get(i))).collect();
        for i in pages {
            let p = self.cache.get_mut(i);
            if !p.unsync {
                p.unsync = true;
                self.unsync.push(i);
                self.stats.unsynced += 1;
            }
        }
        true
    }

    /// Walks the shadow tables for `gva` from the current root, linking or
    /// making the shadow pages the guest walk `w` calls for. Returns the
    /// leaf page, its frame and the index of the leaf entry.
    ///
    /// A present link is followed without looking the child up again (as
    /// KVM's `kvm_mmu_get_child_sp` returns `-EEXIST` for one): the child
    /// of entry `j` of a shadow page is a function of that page and guest
    /// entry `j` of the table it shadows (the child's frame, level and
    /// quadrant from the entry and `j`, its access from the page's and the
    /// entry's rights, its controls inherited from the root, which
    /// `ensure_root` matched to `cpu`). That table is write-protected while
    /// the page lives (only leaf pages go unsync), so a guest write to the
    /// entry is emulated and drops the link; zaps clear every link to the
    /// zapped page; zap-all drops the roots, so no current page links to
    /// an obsolete one. The exception is a direct child, whose access
    /// includes write only once the guest's large-page D bit is set, which
    /// the walk sets without an emulated write: its access is checked, as
    /// KVM's `validate_direct_spte` does.
    ///
    /// Each page on the path counts as used, which resets its write-flood
    /// count, except a page of `written`, the frame a write fault targets:
    /// a guest rewriting a table its own writes are translated through
    /// must still be seen flooding.
    // One caller, the fault: inlined, its results stay in registers.
    #[inline(always)]
    pub(super) fn fetch_path(
        &mut self,
        cpu: &GuestCpu,
        gva: Gva,
        w: &GuestWalk,
        written: Option<Gfn>,
    ) -> Result<(PageIdx, FrameId, usize), ShadowError> {
        let root = self.roots.first().expect("ensure_root loaded a root");
        let (mut page, mut level) = match root.kind {
            RootKind::Page(i) => (i, root.key.role.level),
            RootKind::Pae { pds, .. } => {
                let q = ((gva.0 >> 30) & 3) as usize;
                (pds[q].ok_or(ShadowError::BadPdptrs)?, 2)
            }
        };
        // What a direct child may grant: the guest's whole translation,
        // write only once its D bit is set (so a clean large page never
        // reuses writable leaves).
        let mut direct_access = w.access;
        if !w.dirty {
            direct_access.remove(PteAccess::WRITE);
        }
        let mut frame = self.cache.get(page).frame;
        // Nearly always the whole path is linked, the guest maps a 4 KiB
        // page (no direct page, whose access would need checking) and no
        // page has a write-flood count to reset: the links are followed as
        // the processor follows them, and only the leaf table's page is
        // looked up.
        if w.leaf_level == 1 && !self.cache.any_flooding() {
            if let Some(path) = self.linked_path(cpu, gva, w, frame, level) {
                return Ok(path);
            }
        }
        // The frame of each level comes from the link that leads to it (as
        // the processor finds the next table), not from the page record:
        // the record is read beside the table, not before it.
        loop {
            let p = self.cache.get(page);
            if p.write_flood != 0 && Some(p.gfn) != written {
                self.cache.clear_flood(page);
            }
            let j = hw_index(gva.0, level);
            if level == 1 {
                return Ok((page, frame, j));
            }
            let e = self.mem.table(frame)[j].load(Ordering::Acquire);
            if e & P != 0 {
                if let Some((f, child)) = self.child_of(e) {
                    if w.leaf_level < level || self.cache.get(child).role.access == direct_access {
                        debug_assert!(
                            self.is_child_for(child, cpu, gva, w, level, direct_access),
                            "the link at {frame:?}[{j}] names a child the guest walk does not call for"
                        );
                        (page, frame) = (child, f);
                        level -= 1;
                        continue;
                    }
                }
            }
            page = self.link_child(cpu, gva, w, level, direct_access, page, j)?;
            frame = self.cache.get(page).frame;
            level -= 1;
        }
    }

    /// The leaf page, its frame and the leaf index on the path of `gva` from
    /// the table `frame` at `level`, if every link on it is present: for a
    /// guest walk `w` to a 4 KiB page, whose path has no direct page.
    #[inline]
    fn linked_path(
        &self,
        cpu: &GuestCpu,
        gva: Gva,
        w: &GuestWalk,
        mut frame: FrameId,
        mut level: u8,
    ) -> Option<(PageIdx, FrameId, usize)> {
        while level > 1 {
            let j = hw_index(gva.0, level);
            let e = self.mem.table(frame)[j].load(Ordering::Acquire);
            if e & P == 0 {
                return None;
            }
            let child = self.mem.frame_of(Pfn((e & SPTE_ADDR) >> 12))?;
            debug_assert!(
                self.cache
                    .of_frame(child)
                    .is_some_and(|c| self.is_child_for(c, cpu, gva, w, level, w.access)),
                "the link at {frame:?}[{j}] names a child the guest walk does not call for"
            );
            frame = child;
            level -= 1;
        }
        Some((self.cache.of_frame(frame)?, frame, hw_index(gva.0, 1)))
    }

    /// Links entry `j` of `page` (of `level`, on the path of `gva`) to the
    /// child the guest walk `w` calls for, found or made; returns it. The
    /// fault path's slow step, kept out of its loop.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn link_child(
        &mut self,
        cpu: &GuestCpu,
        gva: Gva,
        w: &GuestWalk,
        level: u8,
        direct_access: PteAccess,
        page: PageIdx,
        j: usize,
    ) -> Result<PageIdx, ShadowError> {
        let (gfn, role) = Self::child_key(cpu, gva, w, level, direct_access);
        let c = self.get_page(gfn, role)?;
        // get_page may zap unsync leaf pages, which only clears links,
        // never this path's upper pages: a present entry here is a direct
        // child with stale access (or names no page at all).
        self.drop_link(page, j);
        let frame = self.cache.get(page).frame;
        let mut parents = self.cache.get(c).parents;
        self.cache.pool.add(&mut parents, handle(frame, j))?;
        self.cache.get_mut(c).parents = parents;
        let pfn = self.mem.pfn(self.cache.get(c).frame);
        // Non-leaf entries grant everything: the leaf decides.
        self.mem.table(frame)[j].store((pfn.0 << 12) | P | RW | US, Ordering::Release);
        Ok(c)
    }

    /// The (guest frame, role) of the child that entry `gva` indexes in a
    /// shadow page of `level` calls for, after the guest walk `w`.
    fn child_key(
        cpu: &GuestCpu,
        gva: Gva,
        w: &GuestWalk,
        level: u8,
        direct_access: PteAccess,
    ) -> (Gfn, Role) {
        let child_level = level - 1;
        if w.leaf_level >= level {
            // The guest maps a large page here: a direct page maps the
            // piece one shadow entry of this level covers.
            let cover = 12 + 9 * (child_level as u32);
            let base = Gpa(w.gpa.0 & !((1u64 << cover) - 1)).gfn();
            (base, Role::for_cpu(cpu, child_level, true, direct_access, 0))
        } else {
            let step = &w.steps[child_level as usize - 1];
            let quadrant = if cpu.mode == GuestMode::Bits32 { ((gva.0 >> 21) & 1) as u8 } else { 0 };
            (step.table_gfn, Role::for_cpu(cpu, child_level, false, step.access_above, quadrant))
        }
    }

    /// Whether `child`, linked from a shadow page of `level` on the path of
    /// `gva`, is the live current page the guest walk `w` calls for there
    /// (what [`fetch_path`](Self::fetch_path) relies on without checking).
    fn is_child_for(
        &self,
        child: PageIdx,
        cpu: &GuestCpu,
        gva: Gva,
        w: &GuestWalk,
        level: u8,
        direct_access: PteAccess,
    ) -> bool {
        let (gfn, role) = Self::child_key(cpu, gva, w, level, direct_access);
        let c = self.cache.get(child);
        c.gfn == gfn && c.role == role && !c.invalid && c.generation == self.generation.current()
    }

    /// Sets leaf `j` of `page` (whose table is `frame`) to `spte` (write
    /// permission added by the caller), keeping A/D if it already mapped
    /// the same frame.
    // One caller, the fault: inlined, its results stay in registers.
    #[inline(always)]
    pub(super) fn install_leaf(
        &mut self,
        page: PageIdx,
        frame: FrameId,
        j: usize,
        slot: SlotId,
        gfn: Gfn,
        spte: u64,
    ) -> Result<PteHandle, ShadowError> {
        let h = handle(frame, j);
        let word = (u64::from(slot.0) << SLOT_SHIFT) | gfn.0;
        let cur = self.mem.table(frame)[j].load(Ordering::Acquire);
        if cur & P != 0 {
            if self.leaf_word(page, j) == word && cur & SPTE_ADDR == spte & SPTE_ADDR {
                let keep = A | D;
                let _ = self.mem.table(frame)[j]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some((c & keep) | spte));
                self.flush.add_all();
                return Ok(h);
            }
            self.drop_leaf(page, j);
        }
        self.rmap.add(slot, gfn, 0, h)?;
        if let Some(g) = self.cache.get_mut(page).leaf_gfns.as_mut() {
            g[j] = word;
        }
        self.mem.table(frame)[j].store(spte, Ordering::Release);
        self.stats.leaves_installed += 1;
        Ok(h)
    }
}

/// Logs the guest table pages the walk `w`'s A/D updates wrote; a mark the
/// tracker refuses is kept in `pending` for the next fault, and the answer
/// is then `false` (retry).
fn mark_ad_written(
    slots: &Memslots,
    pending: &mut [Option<(SlotId, Gfn)>; 5],
    w: &GuestWalk,
    dirty: &mut (impl DirtyTracker + ?Sized),
) -> bool {
    let mut all = true;
    for l in (0..5u8).filter(|l| w.ad_written >> l & 1 != 0) {
        let table = w.steps[l as usize].table_gfn;
        if let Some(s) = slots.lookup(table) {
            if !dirty.mark(s.id(), table) {
                pending[l as usize] = Some((s.id(), table));
                all = false;
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::super::super::mode::{Privilege, A, D, P, RW, US};
    use super::super::super::ram::SimGuestRam;
    use super::*;
    use crate::format::PageSize;
    use crate::frame::SimMemory;
    use crate::testing::LinearHost;
    use mmu_generic::addr::Hva;
    use mmu_generic::backend::NoTlb;
    use mmu_generic::memslot::MemslotsBuilder;

    type Mmu = ShadowMmu<SimMemory, SimGuestRam, LinearHost>;

    /// Two 4-level address spaces: PML4 at gfn 1 maps gva 0 to gfn 0x20
    /// (a user page, read-only), PML4 at gfn 5 maps it to gfn 0x21.
    fn two_spaces() -> (Mmu, GuestCpu, GuestCpu) {
        let ram = SimGuestRam::new(&[(Gfn(0), 64)]);
        for (pml4, pt, data) in [(1u64, 4u64, 0x20u64), (5, 8, 0x21)] {
            let e = P | RW | US | A;
            ram.write(Gpa(pml4 << 12), 8, ((pml4 + 1) << 12) | e).unwrap();
            ram.write(Gpa((pml4 + 1) << 12), 8, ((pml4 + 2) << 12) | e).unwrap();
            ram.write(Gpa((pml4 + 2) << 12), 8, (pt << 12) | e).unwrap();
            ram.write(Gpa(pt << 12), 8, (data << 12) | P | US | A | D).unwrap();
        }
        let mut b = MemslotsBuilder::new();
        b.create(Memslot::new(SlotId(0), Gfn(0), 64, Hva(0x4000_0000), SlotFlags::empty())).unwrap();
        let mmu = ShadowMmu::new(
            ShadowConfig::new(CpuFeatures::typical()),
            SimMemory::new(Pfn(0x8_0000), 256),
            ram,
            LinearHost::new(0x10_0000, PageSize::Size4K),
            b.build().unwrap(),
        );
        (mmu, GuestCpu::new(GuestMode::Four, 1 << 12), GuestCpu::new(GuestMode::Four, 5 << 12))
    }

    fn host_of(gfn: u64) -> Gpa {
        Gpa((0x4_0000 + gfn + 0x10_0000) << 12)
    }

    #[test]
    fn a_fault_under_another_cr3_or_other_controls_uses_their_root() {
        let (mut mmu, a, b) = two_spaces();
        let read = AccessKind::user(AccessOp::Read);
        mmu.load_cr3(&a).unwrap();
        let root_a = mmu.root_hpa();
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        // The embedder faults with another CR3 without loading it first.
        assert_eq!(mmu.page_fault(&b, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert_ne!(mmu.root_hpa(), root_a, "the fault switched to the root of its CR3");
        assert_eq!(mmu.hw_access(&b, Gva(0x10), read).unwrap().gpa, Gpa(host_of(0x21).0 + 0x10));
        mmu.load_cr3(&a).unwrap();
        assert_eq!(mmu.root_hpa(), root_a);
        assert_eq!(mmu.hw_access(&a, Gva(0x10), read).unwrap().gpa, Gpa(host_of(0x20).0 + 0x10));

        // CR0.WP cleared without a CR3 load: a supervisor write to the
        // read-only user page is allowed, through a root of its own (a
        // writable supervisor leaf must not appear under WP = 1).
        let sup_write = AccessKind { op: AccessOp::Write, privilege: Privilege::Supervisor };
        let nowp = GuestCpu { cr0_wp: false, ..a };
        assert_eq!(mmu.page_fault(&nowp, Gva(0), sup_write, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert_ne!(mmu.root_hpa(), root_a, "CR0.WP is part of the root's role");
        mmu.load_cr3(&a).unwrap();
        mmu.take_flush().flush(&mut NoTlb);
        assert!(mmu.hw_access(&a, Gva(0), sup_write).is_err(), "under WP = 1 the page stays read-only");

        // EFLAGS.AC is no part of the root: a fault with it set keeps the
        // root, and so does the next one with it clear.
        let hits = mmu.stats().root_hits;
        let ac = GuestCpu { eflags_ac: true, ..a };
        assert_eq!(mmu.page_fault(&ac, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert_eq!((mmu.root_hpa(), mmu.stats().root_hits), (root_a, hits), "no switch for EFLAGS.AC");
        mmu.take_flush().flush(&mut NoTlb);
    }

    /// A fault through a shadowed table resets its write-flood count, also
    /// on the fault path that follows present links without looking pages
    /// up: two emulated writes, a fault, two more writes, and the table is
    /// still shadowed (three writes in a row zap it).
    #[test]
    fn a_fault_through_a_table_resets_its_write_flood_count() {
        let (mut mmu, a, _) = two_spaces();
        let read = AccessKind::user(AccessOp::Read);
        mmu.load_cr3(&a).unwrap();
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        let pt_entry_5 = Gpa((4 << 12) + 8 * 5);
        for round in 0..3 {
            mmu.emulated_write(pt_entry_5, 8, 0).unwrap();
            mmu.emulated_write(pt_entry_5, 8, 0).unwrap();
            assert!(mmu.is_write_tracked(Gfn(4)), "round {round}: two writes do not zap the table");
            assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        }
        assert_eq!(mmu.stats().flood_zaps, 0);
        // Without faults in between, the third write zaps it.
        for _ in 0..3 {
            mmu.emulated_write(pt_entry_5, 8, 0).unwrap();
        }
        assert!(!mmu.is_write_tracked(Gfn(4)));
        assert_eq!(mmu.stats().flood_zaps, 1);
        // Its count went with it: the next fault rebuilds the path and is
        // served, and later faults take the linked path again.
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert!(!mmu.cache.any_flooding(), "the zapped page's count left with it");
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        mmu.take_flush().flush(&mut NoTlb);
    }

    /// A tracker whose ring is full: every leaf it is asked to let become
    /// writable is refused.
    struct FullRing(u32);

    impl DirtyTracker for FullRing {
        fn write_protected(&self, _: SlotId) -> bool {
            false
        }
        fn note_writable(&mut self, _: SlotId, _: Gfn, _: PteHandle) -> bool {
            self.0 += 1;
            false
        }
        fn mark(&mut self, _: SlotId, _: Gfn) -> bool {
            true
        }
    }

    #[test]
    fn a_writable_leaf_the_tracker_refuses_is_mapped_read_only_and_retried() {
        let (mut mmu, a, _) = two_spaces();
        // Make gva 0 writable and dirty in the guest: the leaf would be writable.
        mmu.guest().write(Gpa(4 << 12), 8, (0x20 << 12) | P | RW | US | A | D).unwrap();
        mmu.load_cr3(&a).unwrap();
        let (read, write) = (AccessKind::user(AccessOp::Read), AccessKind::user(AccessOp::Write));
        let mut full = FullRing(0);
        assert_eq!(mmu.page_fault(&a, Gva(0), read, &mut full), Ok(ShadowFault::Retry));
        assert_eq!(mmu.page_fault(&a, Gva(0), write, &mut full), Ok(ShadowFault::Retry));
        assert_eq!(full.0, 2, "each fault asked before granting write");
        mmu.take_flush().flush(&mut NoTlb);
        // Reads go on through the read-only leaf; writes fault until the ring drains.
        assert_eq!(mmu.hw_access(&a, Gva(8), read).unwrap().gpa, Gpa(host_of(0x20).0 + 8));
        assert!(mmu.hw_access(&a, Gva(8), write).is_err(), "no write without a logged page");
        assert_eq!(mmu.page_fault(&a, Gva(0), write, &mut NoDirtyLog), Ok(ShadowFault::Fixed));
        assert!(mmu.hw_access(&a, Gva(8), write).is_ok());
        mmu.take_flush().flush(&mut NoTlb);
    }
}
