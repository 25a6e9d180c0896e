//! The C memory functions the compiler calls (`compiler_builtins` leaves them out on this
//! target). Volatile accesses keep LLVM from turning the loops back into calls to
//! themselves.

use core::ptr::{read_volatile, write_volatile};

/// Copies `n` bytes forward from `src` to `dst`.
///
/// # Safety
/// Both ranges are valid for `n` bytes; if they overlap, `dst` is not above `src`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract is memmove's, for a forward copy.
    unsafe { copy_forward(dst, src, n) };
    dst
}

/// Copies `n` bytes from `src` to `dst`; the ranges may overlap.
///
/// # Safety
/// Both ranges are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        unsafe { copy_forward(dst, src, n) };
    } else {
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n, both ranges valid for n bytes (caller); backward copy for overlap.
            unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        }
    }
    dst
}

/// # Safety
/// Both ranges valid for `n` bytes; no overlap with dst above src.
unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    if (dst as usize).is_multiple_of(8) && (src as usize).is_multiple_of(8) {
        while i + 8 <= n {
            // SAFETY: both pointers 8-aligned at offset i, i + 8 <= n.
            unsafe { write_volatile(dst.add(i) as *mut u64, read_volatile(src.add(i) as *const u64)) };
            i += 8;
        }
    }
    while i < n {
        // SAFETY: i < n, both ranges valid for n bytes (caller).
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
        i += 1;
    }
}

/// Fills `n` bytes at `dst` with the low byte of `c`.
///
/// # Safety
/// `dst` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let b = c as u8;
    let mut i = 0;
    if (dst as usize).is_multiple_of(8) {
        let w = u64::from_ne_bytes([b; 8]);
        while i + 8 <= n {
            // SAFETY: dst 8-aligned at offset i, i + 8 <= n.
            unsafe { write_volatile(dst.add(i) as *mut u64, w) };
            i += 8;
        }
    }
    while i < n {
        // SAFETY: i < n, dst valid for n bytes (caller).
        unsafe { write_volatile(dst.add(i), b) };
        i += 1;
    }
    dst
}

/// Compares `n` bytes; negative, zero or positive as the first difference says.
///
/// # Safety
/// Both ranges are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, both ranges valid for n bytes (caller).
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// Compares `n` bytes for equality only.
///
/// # Safety
/// Both ranges are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
