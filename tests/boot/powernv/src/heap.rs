//! The hypervisor heap: power-of-two size classes over a bump region.
//!
//! Every block is a power of two aligned to its own size. That is what lets the
//! CPU walk `GuestHpt`'s table in place: the HPT (SDR1 HTABORG, or the partition
//! table's) must be aligned to its size, and the table's storage is one
//! allocation of exactly that size. One CPU, interrupts off, so a plain cell
//! suffices.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;

const MIN_SHIFT: u32 = 4;
const CLASSES: usize = 40;

struct State {
    next: usize,
    end: usize,
    /// Freed blocks of each class, linked through their first word.
    free: [usize; CLASSES],
}

/// The global allocator.
pub struct Heap(UnsafeCell<State>);

// SAFETY: one CPU with interrupts off, and the hypervisor's own code never faults
// inside the allocator: accesses to the state never overlap.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap(UnsafeCell::new(State { next: 0, end: 0, free: [0; CLASSES] }));

/// Hands `[base, base + size)` to the heap.
///
/// # Safety
/// The range is RAM owned by nobody else for the rest of the run, and `init` is
/// called once, before any allocation.
pub unsafe fn init(base: usize, size: usize) {
    // SAFETY: single-threaded initialisation (see `Sync`).
    let s = unsafe { &mut *HEAP.0.get() };
    s.next = base;
    s.end = base + size;
}

fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let shift = usize::BITS - (size - 1).leading_zeros();
    let c = (shift - MIN_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

// SAFETY: blocks handed out are disjoint, inside the region given to `init`,
// aligned to their size (hence to the layout's alignment), and reused only after
// `dealloc` gave them back.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see `Sync`.
        let s = unsafe { &mut *self.0.get() };
        let Some(c) = class_of(&layout) else { return null_mut() };
        let head = s.free[c];
        if head != 0 {
            // SAFETY: a free block holds the next free block's address in its first word.
            s.free[c] = unsafe { *(head as *const usize) };
            return head as *mut u8;
        }
        let size = 1usize << (c as u32 + MIN_SHIFT);
        let start = (s.next + size - 1) & !(size - 1);
        match start.checked_add(size) {
            Some(end) if end <= s.end => {
                s.next = end;
                start as *mut u8
            }
            _ => null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: see `Sync`.
        let s = unsafe { &mut *self.0.get() };
        if let Some(c) = class_of(&layout) {
            // SAFETY: the block is ours again and at least 16 bytes long.
            unsafe { *(ptr as *mut usize) = s.free[c] };
            s.free[c] = ptr as usize;
        }
    }
}
