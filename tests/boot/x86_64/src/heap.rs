//! The kernel heap: a first-fit free list over one fixed physical region, address
//! ordered and coalescing on free. Single CPU, interrupts off: a spin flag guards it.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, Ordering};

const MIN_BLOCK: usize = 16;

struct Node {
    size: usize,
    next: *mut Node,
}

/// The global allocator.
pub struct Heap {
    lock: AtomicBool,
    head: core::cell::UnsafeCell<*mut Node>,
}

// SAFETY: every access to `head` happens with `lock` held.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap { lock: AtomicBool::new(false), head: core::cell::UnsafeCell::new(null_mut()) };

fn round_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

fn block_size(layout: &Layout) -> usize {
    round_up(layout.size().max(MIN_BLOCK), MIN_BLOCK)
}

/// Hands the region `[start, start + len)` to the heap.
///
/// # Safety
/// The region must be identity-mapped RAM used by nothing else, now or later.
pub unsafe fn init(start: usize, len: usize) {
    let start = round_up(start, MIN_BLOCK);
    let node = start as *mut Node;
    // SAFETY: the caller gives us exclusive use of the region; it is 16-byte aligned.
    unsafe {
        node.write(Node { size: len & !(MIN_BLOCK - 1), next: null_mut() });
        *HEAP.head.get() = node;
    }
}

impl Heap {
    fn with<R>(&self, f: impl FnOnce(&mut *mut Node) -> R) -> R {
        while self.lock.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to the list head.
        let r = f(unsafe { &mut *self.head.get() });
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: `alloc` returns blocks of at least the layout's size and alignment carved from
// the heap region, never handing out a byte twice until `dealloc` returns it; the list is
// only touched under the lock.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = block_size(&layout);
        let align = layout.align().max(MIN_BLOCK);
        self.with(|head| {
            let mut link: *mut *mut Node = head;
            // SAFETY: every node on the list is a free block of the heap region, written by
            // `init`, `alloc` or `dealloc`; the lock gives exclusive access to them.
            unsafe {
                while !(*link).is_null() {
                    let cur = *link;
                    let start = cur as usize;
                    let end = start + (*cur).size;
                    let a = round_up(start, align);
                    if a + size <= end {
                        let mut next = (*cur).next;
                        if end > a + size {
                            let back = (a + size) as *mut Node;
                            back.write(Node { size: end - a - size, next });
                            next = back;
                        }
                        if a > start {
                            (*cur).size = a - start;
                            (*cur).next = next;
                        } else {
                            *link = next;
                        }
                        return a as *mut u8;
                    }
                    link = &mut (*cur).next;
                }
            }
            null_mut()
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let size = block_size(&layout);
        let addr = ptr as usize;
        self.with(|head| {
            // SAFETY: `ptr` came from `alloc` with this layout, so `[addr, addr + size)` is a
            // block of the heap region that no one uses any more; the list is ours (lock).
            unsafe {
                let mut prev: *mut Node = null_mut();
                let mut cur = *head;
                while !cur.is_null() && (cur as usize) < addr {
                    prev = cur;
                    cur = (*cur).next;
                }
                let node = addr as *mut Node;
                node.write(Node { size, next: cur });
                if !cur.is_null() && addr + size == cur as usize {
                    (*node).size += (*cur).size;
                    (*node).next = (*cur).next;
                }
                if prev.is_null() {
                    *head = node;
                } else if prev as usize + (*prev).size == addr {
                    (*prev).size += (*node).size;
                    (*prev).next = (*node).next;
                } else {
                    (*prev).next = node;
                }
            }
        })
    }
}
