//! Guest RAM as arch-x86's shadow MMU reads and writes it, for both shadow-paging guests
//! (the OS-like guest of [`crate::shadow_vm`] and the Linux guest of
//! [`crate::linux::shadow_mmu`]): one identity-mapped host block at guest-physical 0,
//! bounds-checked, accessed atomically (the guest may write the same word), with a
//! record of every page the hypervisor writes (the walker's A/D updates, emulated table
//! writes, the loader's stores), which the VMs mark in the slot's dirty log so that a
//! migration copies those pages too.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arch_x86::shadow::guest_walk::NotMemory;
use arch_x86::shadow::PhysMemory;
use mmu_generic::addr::{Gfn, Gpa};

/// Guest RAM: `bytes` of identity-mapped host memory from `base`, with a record of the
/// pages the hypervisor wrote.
pub struct ShadowRam {
    base: u64,
    bytes: u64,
    /// One bit per guest page written by the hypervisor since the last `take_written`.
    written: Vec<AtomicU64>,
    /// Some bit of `written` may be set.
    any: AtomicBool,
}

impl ShadowRam {
    /// Guest RAM of `bytes` at host address `base`.
    ///
    /// # Safety
    /// `base .. base + bytes` must be identity-mapped RAM owned by the guest for as long
    /// as the value lives.
    pub unsafe fn new(base: u64, bytes: u64) -> Self {
        let words = (bytes >> 12).div_ceil(64) as usize;
        ShadowRam {
            base,
            bytes,
            written: (0..words).map(|_| AtomicU64::new(0)).collect(),
            any: AtomicBool::new(false),
        }
    }

    /// Host address of guest RAM's first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The host address of `bytes` at `addr`, if they lie inside guest RAM, naturally
    /// aligned.
    fn check(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        let end = addr.0.checked_add(bytes).ok_or(NotMemory(addr))?;
        if end > self.bytes || !addr.0.is_multiple_of(bytes) {
            return Err(NotMemory(addr));
        }
        Ok(self.base + addr.0)
    }

    fn note_write(&self, addr: Gpa) {
        let g = addr.0 >> 12;
        self.written[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::AcqRel);
        self.any.store(true, Ordering::Release);
    }

    /// Calls `f` with each guest frame the hypervisor wrote since the last call.
    pub fn take_written(&self, mut f: impl FnMut(Gfn)) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        for (i, w) in self.written.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                f(Gfn(i as u64 * 64 + bits.trailing_zeros() as u64));
                bits &= bits - 1;
            }
        }
    }

    /// Reads a 32- or 64-bit word; all ones outside guest RAM.
    pub fn get(&self, addr: u64, bytes: u64) -> u64 {
        self.read(Gpa(addr), bytes).unwrap_or(u64::MAX)
    }

    /// Writes a 32- or 64-bit word (a hypervisor write: recorded); false outside guest
    /// RAM.
    pub fn set(&self, addr: u64, bytes: u64, value: u64) -> bool {
        let Ok(p) = self.check(Gpa(addr), bytes) else { return false };
        // SAFETY: `check` keeps the access inside guest RAM, naturally aligned.
        unsafe {
            if bytes == 8 {
                (*(p as *const AtomicU64)).store(value, Ordering::Release);
            } else {
                (*(p as *const AtomicU32)).store(value as u32, Ordering::Release);
            }
        }
        self.note_write(Gpa(addr));
        true
    }
}

impl PhysMemory for ShadowRam {
    fn read(&self, addr: Gpa, bytes: u64) -> Result<u64, NotMemory> {
        let bytes = if bytes == 8 { 8 } else { 4 };
        let p = self.check(addr, bytes)?;
        // SAFETY: `check` keeps the access inside guest RAM (identity-mapped host memory
        // the guest owns, see `new`), naturally aligned; the guest may write the word
        // concurrently, hence the atomic access.
        Ok(unsafe {
            if bytes == 8 {
                (*(p as *const AtomicU64)).load(Ordering::Acquire)
            } else {
                (*(p as *const AtomicU32)).load(Ordering::Acquire) as u64
            }
        })
    }

    fn compare_exchange(&self, addr: Gpa, bytes: u64, old: u64, new: u64) -> Result<bool, NotMemory> {
        let bytes = if bytes == 8 { 8 } else { 4 };
        let p = self.check(addr, bytes)?;
        // SAFETY: as in `read`.
        let ok = unsafe {
            if bytes == 8 {
                (*(p as *const AtomicU64))
                    .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            } else {
                (*(p as *const AtomicU32))
                    .compare_exchange(old as u32, new as u32, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            }
        };
        if ok && old != new {
            self.note_write(addr);
        }
        Ok(ok)
    }
}
