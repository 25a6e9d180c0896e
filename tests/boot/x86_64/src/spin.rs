//! A spin lock for data shared between the two host CPUs (the MMU lock of the two-CPU
//! race: the vCPU's fault path and the harvester both take it).
//!
//! Interrupts stay disabled on both CPUs while the image runs host code, so a holder is
//! never interrupted by a path that takes the same lock; no fairness is needed for two
//! CPUs. Waiting is unbounded here by design: every holder releases after a bounded
//! amount of work (a fault, one harvest round), and the scenario bounds the rest.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A test-and-test-and-set spin lock around a `T`.
pub struct SpinLock<T> {
    locked: AtomicBool,
    /// Acquisitions that found the lock taken (contention seen).
    contended: AtomicU64,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard exists at a
// time (acquiring needs the `false -> true` exchange on `locked`, releasing stores `false`
// with Release after the guard's last use); so sharing the lock between CPUs hands the
// `T` from one CPU to another, which `T: Send` allows.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// An unlocked lock around `value`.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            contended: AtomicU64::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Spins until the lock is free, then takes it.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        let mut waited = false;
        while self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            waited = true;
            while self.locked.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
        if waited {
            self.contended.fetch_add(1, Ordering::Relaxed);
        }
        SpinGuard { lock: self }
    }

    /// How many acquisitions had to wait for the other CPU.
    pub fn contended(&self) -> u64 {
        self.contended.load(Ordering::Relaxed)
    }
}

/// Exclusive access to a [`SpinLock`]'s value; unlocks on drop.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}
