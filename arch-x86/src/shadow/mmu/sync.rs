//! Guest writes to its own tables: emulated writes to write-protected
//! tables, unsync leaf tables resynced at INVLPG, CR3 load and TLB flush.

use super::*;

impl<M: FrameMemory, G: PhysMemory, H: HostMemory> ShadowMmu<M, G, H> {
    /// The embedder emulated an instruction that writes `bytes` (1 to 8,
    /// little-endian `value`) at `gpa`: performs the write and brings every
    /// shadow of the written table up to date, or zaps the shadow page when
    /// the guest writes it too often or across entries.
    pub fn emulated_write(&mut self, gpa: Gpa, bytes: u64, value: u64) -> Result<(), ShadowError> {
        self.emulated_write_logged(gpa, bytes, value, &mut NoDirtyLog)
    }

    /// [`emulated_write`](Self::emulated_write) in a guest whose memory may
    /// be dirty-logged: the page is marked in `dirty` first (the hypervisor
    /// writes guest memory), and a refused mark (a full ring) writes nothing
    /// ([`ShadowError::DirtyRingFull`]).
    pub fn emulated_write_logged(
        &mut self,
        gpa: Gpa,
        bytes: u64,
        value: u64,
        dirty: &mut dyn DirtyTracker,
    ) -> Result<(), ShadowError> {
        let bytes = bytes.clamp(1, 8);
        let slot = self.slots.lookup(gpa.gfn()).ok_or(ShadowError::NotGuestMemory(gpa))?;
        if slot.flags().contains(SlotFlags::READONLY)
            || gpa.checked_add(bytes - 1).map(|e| e.gfn()) != Some(gpa.gfn())
        {
            return Err(ShadowError::NotGuestMemory(gpa));
        }
        if !dirty.mark(slot.id(), gpa.gfn()) {
            return Err(ShadowError::DirtyRingFull(gpa));
        }
        write_bytes(&self.guest, gpa, bytes, value).map_err(|_| ShadowError::NotGuestMemory(gpa))?;
        self.stats.emulated_writes += 1;
        let gen = self.generation.current();
        let pages: Vec<PageIdx> = self
            .cache
            .of_gfn(gpa.gfn())
            .filter(|&i| {
                let p = self.cache.get(i);
                !p.role.direct && p.generation == gen && !p.invalid && !p.unsync
            })
            .collect();
        let offset = gpa.0 & 0xfff;
        for i in pages {
            let role = self.cache.get(i).role;
            let eb = role.mode.entry_bytes();
            let flood = self.cache.bump_flood(i);
            if (offset % eb) + bytes > eb || flood >= FLOOD_LIMIT {
                self.stats.flood_zaps += 1;
                self.zap_page(i, ZapReason::Range);
                continue;
            }
            let g = (offset / eb) as usize;
            let (first, n) = if role.mode != GuestMode::Bits32 {
                (g, 1)
            } else if role.level == 1 {
                if g / 512 != role.quadrant as usize {
                    continue;
                }
                (g % 512, 1)
            } else {
                if g / 256 != role.quadrant as usize {
                    continue;
                }
                (2 * (g % 256), 2)
            };
            for j in first..first + n {
                if role.level == 1 {
                    self.sync_entry(i, j);
                } else {
                    self.drop_link(i, j);
                }
            }
        }
        Ok(())
    }

    /// Brings leaf `j` of leaf page `i` in line with the guest entry it
    /// shadows: drops it if the guest entry is gone, changed frame, has a
    /// reserved bit or no A bit; otherwise sets the rights, never widening
    /// write (the next write fault does, through the dirty log).
    pub(super) fn sync_entry(&mut self, i: PageIdx, j: usize) {
        let page = self.cache.get(i);
        let frame = page.frame;
        let cur = self.mem.table(frame)[j].load(Ordering::Acquire);
        if cur & P == 0 || page.role.direct {
            return;
        }
        let role = page.role;
        let feat = self.config.features;
        let eb = role.mode.entry_bytes();
        let g = if role.mode == GuestMode::Bits32 { role.quadrant as u64 * 512 + j as u64 } else { j as u64 };
        let Some(addr) = page.gfn.gpa().map(|a| Gpa(a.0 + g * eb)) else {
            self.drop_leaf(i, j);
            return;
        };
        let old_word = self.leaf_word(i, j);
        let gpte = match (SlotMemory { slots: &self.slots, mem: &self.guest }).read(addr, eb) {
            Ok(e) => e,
            Err(_) => {
                self.drop_leaf(i, j);
                return;
            }
        };
        let cpu = role.cpu(0);
        let new_gfn = leaf_addr_any(role.mode, gpte, &feat) >> 12;
        if gpte & P == 0
            || gpte & A == 0
            || reserved_any(role.mode, gpte, 1, &cpu, &feat)
            || new_gfn != old_word & ((1 << SLOT_SHIFT) - 1)
        {
            self.drop_leaf(i, j);
            return;
        }
        let acc = role.access & PteAccess::of_entry(gpte, cpu.has_xd());
        let may_write = acc.contains(PteAccess::WRITE) && gpte & D != 0;
        let user = if acc.contains(PteAccess::USER) { US } else { 0 };
        let keeps_write = |c: u64| may_write && c & RW != 0 && c & US == user;
        let was = self.mem.table(frame)[j].fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            let mut n = (c & !(US | XD | RW)) | user;
            if !acc.contains(PteAccess::EXEC) {
                n |= XD;
            }
            if keeps_write(c) {
                n |= RW;
            }
            Some(n)
        });
        if let Ok(c) = was {
            if c & RW != 0 && !keeps_write(c) {
                let w = self.leaf_word(i, j);
                let slot = SlotId((w >> SLOT_SHIFT) as u16);
                self.took_write(frame, j, slot, Gfn(w & ((1 << SLOT_SHIFT) - 1)), c);
            }
        }
        self.flush.add_all();
    }

    /// Resyncs an unsync page and write-protects its guest table again.
    pub(super) fn sync_page(&mut self, i: PageIdx) {
        for j in 0..ENTRIES {
            self.sync_entry(i, j);
        }
        let p = self.cache.get_mut(i);
        p.unsync = false;
        let gfn = p.gfn;
        self.stats.synced += 1;
        self.write_protect_gfn(gfn);
    }

    /// Resyncs every unsync page of the current generation. Obsolete pages
    /// are skipped: they are about to be freed.
    pub(super) fn sync_all(&mut self) {
        let pages: Vec<PageIdx> = self.unsync_live().collect();
        self.unsync.clear();
        for i in pages {
            self.sync_page(i);
        }
    }

    /// INVLPG `gva`: resyncs the leaf that translates it if its page is
    /// unsync, and flushes the address.
    pub fn invlpg(&mut self, cpu: &GuestCpu, gva: Gva) {
        self.flush.add_all();
        let Some(root) = self.roots.first().copied() else { return };
        if !self.root_valid(&root) || root.key != self.root_key(cpu) {
            return;
        }
        let gva = if cpu.mode == GuestMode::Bits32 || cpu.mode == GuestMode::Pae {
            gva.0 & 0xffff_ffff
        } else {
            gva.0
        };
        let (mut page, mut level) = match root.kind {
            RootKind::Page(i) => (i, root.key.role.level),
            RootKind::Pae { pds, .. } => match pds[((gva >> 30) & 3) as usize] {
                Some(i) => (i, 2),
                None => return,
            },
        };
        while level > 1 {
            let e = self.mem.table(self.cache.get(page).frame)[hw_index(gva, level)].load(Ordering::Acquire);
            let child = (e & P != 0)
                .then(|| self.mem.frame_of(Pfn((e & SPTE_ADDR) >> 12)))
                .flatten()
                .and_then(|f| self.cache.of_frame(f));
            let Some(c) = child else { return };
            page = c;
            level -= 1;
        }
        if self.cache.get(page).unsync {
            self.sync_entry(page, hw_index(gva, 1));
        }
    }

    /// Stops shadowing guest frame `gfn` (KVM's `kvm_mmu_unprotect_page`):
    /// zaps every shadow page of the current generation that shadows it, so
    /// a fault on it may map it writable. For a write to a write-protected
    /// guest table that the embedder cannot emulate (a locked
    /// read-modify-write, a string store into a table page being reused):
    /// unprotect and let the guest retry the instruction. Returns the pages
    /// zapped.
    pub fn unprotect_gfn(&mut self, gfn: Gfn) -> usize {
        let gen = self.generation.current();
        let pages: Vec<PageIdx> = self
            .cache
            .of_gfn(gfn)
            .filter(|&i| {
                let p = self.cache.get(i);
                !p.role.direct && p.generation == gen && !p.invalid
            })
            .collect();
        for &i in &pages {
            self.zap_page(i, ZapReason::Range);
        }
        pages.len()
    }

    /// A guest TLB flush (MOV to CR4 of PGE, INVPCID all, a flush hypercall):
    /// resyncs every unsync page.
    pub fn flush_tlb(&mut self) {
        self.sync_all();
        self.flush.add_all();
    }
}

/// Writes `bytes` little-endian bytes of `value` at `addr`, word by word.
fn write_bytes<G: PhysMemory>(mem: &G, addr: Gpa, bytes: u64, value: u64) -> Result<(), NotMemory> {
    let mut done = 0;
    while done < bytes {
        let a = addr.0 + done;
        let n = (8 - (a & 7)).min(bytes - done);
        let part = if n == 8 { value } else { (value >> (done * 8)) & ((1u64 << (n * 8)) - 1) };
        let word = Gpa(a & !7);
        loop {
            let w = mem.read(word, 8)?;
            let shift = (a & 7) * 8;
            let mask = if n == 8 { u64::MAX } else { ((1u64 << (n * 8)) - 1) << shift };
            let new = (w & !mask) | ((part << shift) & mask);
            if mem.compare_exchange(word, 8, w, new)? {
                break;
            }
        }
        done += n;
    }
    Ok(())
}
