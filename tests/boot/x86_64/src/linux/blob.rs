//! Finding the Linux guest: QEMU's PVH loader hands the image one module (`-initrd`),
//! described by the `hvm_start_info` whose address arrives in EBX (Xen's PVH ABI,
//! `xen/include/public/arch-x86/hvm/start_info.h`: magic 0x336ec578, module list of
//! {paddr, size, cmdline, reserved}). QEMU 7.2 passes exactly one module, so
//! `tests/boot/x86_64/linux/build-initramfs` packs the kernel and the initramfs behind a
//! 4 KiB ASCII header:
//!
//! ```text
//! vmmu-linux-blob 1
//! kernel <hex offset> <hex size>
//! initrd <hex offset> <hex size>
//! ```

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// The blob's first line.
const BLOB_MAGIC: &[u8] = b"vmmu-linux-blob 1\n";
/// Size of the blob's header.
const HEADER: u64 = 4096;

/// The kernel and the initramfs, in host memory.
#[derive(Clone, Copy, Debug)]
pub struct Blob {
    /// Where the module starts (the first byte the host must not reuse).
    pub start: u64,
    /// The bzImage.
    pub kernel: &'static [u8],
    /// The initramfs (newc cpio archives).
    pub initrd: &'static [u8],
    /// Run the guest on shadow paging instead of nested paging (the image's PVH command
    /// line, QEMU's `-append`, holds the word `shadow`).
    pub shadow: bool,
}

/// Why no guest could be found in a module that claims to be one.
#[derive(Clone, Copy, Debug)]
pub enum BlobError {
    /// A header line is missing or malformed.
    BadHeader,
    /// A part lies outside the module.
    OutOfModule,
}

fn read_u32(pa: u64) -> u32 {
    // SAFETY: the caller passes addresses inside the start-info structure or module list
    // QEMU wrote into RAM below 4 GiB, which the boot trampoline identity-maps.
    unsafe { (pa as *const u32).read_unaligned() }
}

fn read_u64(pa: u64) -> u64 {
    // SAFETY: as in `read_u32`.
    unsafe { (pa as *const u64).read_unaligned() }
}

/// The first PVH module, if the image was started by PVH with one: (address, size).
pub fn pvh_module(start_info: u32) -> Option<(u64, u64)> {
    if start_info == 0 || start_info as u64 + 56 > 1 << 32 || read_u32(start_info as u64) != PVH_MAGIC {
        return None;
    }
    let si = start_info as u64;
    if read_u32(si + 12) == 0 {
        return None;
    }
    let list = read_u64(si + 16);
    if list == 0 || list >= 1 << 32 {
        return None;
    }
    let (pa, size) = (read_u64(list), read_u64(list + 8));
    (pa != 0 && size != 0 && pa.checked_add(size)? <= 1 << 32).then_some((pa, size))
}

/// The image's own command line from the PVH start info (`cmdline_paddr`, offset 24), at
/// most 256 bytes up to its NUL; empty if there is none.
pub fn pvh_cmdline(start_info: u32) -> &'static [u8] {
    if start_info == 0 || start_info as u64 + 56 > 1 << 32 || read_u32(start_info as u64) != PVH_MAGIC {
        return &[];
    }
    let pa = read_u64(start_info as u64 + 24);
    if pa == 0 || pa + 256 > 1 << 32 {
        return &[];
    }
    // SAFETY: QEMU's PVH loader wrote the NUL-terminated string into RAM below 4 GiB
    // (checked), which the trampoline identity-maps; nothing writes it later.
    let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(pa as *const u8, 256) };
    &bytes[..bytes.iter().position(|&c| c == 0).unwrap_or(256)]
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| Some(acc << 4 | (c as char).to_digit(16)? as u64))
}

/// Parses "<name> <hex> <hex>\n" at the start of `text`; returns the pair and the rest.
pub(super) fn parse_line<'a>(text: &'a [u8], name: &[u8]) -> Option<((u64, u64), &'a [u8])> {
    let rest = text.strip_prefix(name)?.strip_prefix(b" ")?;
    let nl = rest.iter().position(|&c| c == b'\n')?;
    let mut fields = rest[..nl].split(|&c| c == b' ');
    let a = parse_hex(fields.next()?)?;
    let b = parse_hex(fields.next()?)?;
    fields.next().is_none().then_some(((a, b), &rest[nl + 1..]))
}

/// The guest in module `(pa, size)`: `None` if the module is not a vmmu Linux blob.
pub fn parse(pa: u64, size: u64) -> Option<Result<Blob, BlobError>> {
    if size < HEADER {
        return None;
    }
    // SAFETY: the module lies in identity-mapped RAM below 4 GiB (checked by
    // `pvh_module`), QEMU wrote it before starting the image and nothing writes it after:
    // the frame pools are kept below it.
    let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(pa as *const u8, size as usize) };
    let text = bytes[..HEADER as usize].strip_prefix(BLOB_MAGIC)?;
    let parts = parse_line(text, b"kernel").and_then(|(k, rest)| Some((k, parse_line(rest, b"initrd")?.0)));
    let Some(((koff, klen), (ioff, ilen))) = parts else { return Some(Err(BlobError::BadHeader)) };
    let part = |off: u64, len: u64| -> Option<&'static [u8]> {
        let end = off.checked_add(len)?;
        (off >= HEADER && end <= size).then(|| &bytes[off as usize..end as usize])
    };
    Some(match (part(koff, klen), part(ioff, ilen)) {
        (Some(kernel), Some(initrd)) => Ok(Blob { start: pa, kernel, initrd, shadow: false }),
        _ => Err(BlobError::OutOfModule),
    })
}
