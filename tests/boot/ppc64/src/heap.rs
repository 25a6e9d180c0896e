//! The kernel heap of both ppc64 images (the powernv hypervisor includes this file by
//! `#[path]`): power-of-two size classes over a bump region, for `alloc` users (the vmmu
//! crates), and first-fit reuse of blocks larger than every class.
//!
//! A class block is a power of two aligned to its own size. The image sets the number
//! of classes (`crate::HEAP_CLASSES`, from 16 B up): the powernv hypervisor has enough of
//! them for every allocation, which is what lets the CPU walk `GuestHpt`'s table in
//! place (the HPT must be aligned to its size, and the table's storage is one
//! allocation of exactly that size).
//!
//! One CPU, external interrupts off, and the only interrupts are faults expected at a
//! probe instruction (never inside the allocator), so a plain cell suffices: a fault
//! handler may allocate (the pseries write-protect dirty log does), the interrupted code
//! is not in here.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;

const CLASSES: usize = crate::HEAP_CLASSES;
/// The smallest class holds 16 bytes.
const MIN_SHIFT: u32 = 4;

struct State {
    next: usize,
    end: usize,
    /// Freed blocks of each class, linked through their first word.
    free: [usize; CLASSES],
    /// Large blocks: singly linked through their first two words (next, size).
    large_free: usize,
}

/// The global allocator.
pub struct Heap(UnsafeCell<State>);

// SAFETY: one CPU, interrupts off, and faults are only taken at probe instructions
// outside the allocator: accesses to the state never overlap.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap(UnsafeCell::new(State { next: 0, end: 0, free: [0; CLASSES], large_free: 0 }));

/// Hands `[base, base + size)` to the heap.
///
/// # Safety
/// The range is RAM owned by nobody else, accessible at these addresses for the rest of
/// the run, and `init` is called once before any allocation.
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

impl State {
    fn bump(&mut self, size: usize, align: usize) -> *mut u8 {
        let start = (self.next + align - 1) & !(align - 1);
        match start.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next = end;
                start as *mut u8
            }
            _ => null_mut(),
        }
    }
}

// SAFETY: blocks handed out are disjoint, within the region given to `init`, aligned to
// at least the layout's alignment (classes are power-of-two sized and allocated at their
// own alignment), and only reused after `dealloc`.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see `Sync`.
        let s = unsafe { &mut *self.0.get() };

        match class_of(&layout) {
            Some(c) => {
                let head = s.free[c];
                if head != 0 {
                    // SAFETY: free blocks hold the next pointer in their first word.
                    s.free[c] = unsafe { *(head as *const usize) };
                    head as *mut u8
                } else {
                    let size = 1usize << (c as u32 + MIN_SHIFT);
                    s.bump(size, size)
                }
            }
            None => {
                let align = layout.align().max(16);
                let size = (layout.size() + 15) & !15;
                // First fit among freed large blocks of suitable size and alignment.
                let mut link: *mut usize = &mut s.large_free;
                let mut found = null_mut();
                // SAFETY: the list links blocks this allocator handed out and got back.
                unsafe {
                    while *link != 0 {
                        let blk = *link;
                        let bsize = *((blk + 8) as *const usize);
                        if bsize >= size && blk.is_multiple_of(align) {
                            *link = *(blk as *const usize);
                            found = blk as *mut u8;
                            break;
                        }
                        link = blk as *mut usize;
                    }
                }
                if found.is_null() {
                    s.bump(size, align)
                } else {
                    found
                }
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: see `Sync`.
        let s = unsafe { &mut *self.0.get() };
        match class_of(&layout) {
            Some(c) => {
                // SAFETY: the block is ours again and at least 16 bytes.
                unsafe { *(ptr as *mut usize) = s.free[c] };
                s.free[c] = ptr as usize;
            }
            None => {
                let size = (layout.size() + 15) & !15;
                // SAFETY: the block is ours again and larger than the largest class.
                unsafe {
                    *(ptr as *mut usize) = s.large_free;
                    *((ptr as usize + 8) as *mut usize) = size;
                }
                s.large_free = ptr as usize;
            }
        }
    }
}
