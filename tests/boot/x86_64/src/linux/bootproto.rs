//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: parse the
//! bzImage's setup header (version 2.12 or later, a 64-bit kernel), load the protected-mode
//! kernel at its preferred address (aligned to `kernel_alignment`, room for `init_size`),
//! place the initramfs at the top of RAM, and build the zero page (`struct boot_params`)
//! with the e820 map made from the memslots, the command line and the initramfs. The VMM
//! then enters `startup_64` at load address + 0x200 in long mode, on identity page tables
//! it built in guest memory, with RSI = the zero page.

use super::ram::{GuestRam, OutOfRam};

/// Guest-physical address of the zero page.
pub const BOOT_PARAMS: u64 = 0x7000;
/// Guest-physical address of the GDT (__BOOT_CS 0x10, __BOOT_DS 0x18).
pub const GDT: u64 = 0x6000;
/// Guest-physical address of the command line.
pub const CMDLINE: u64 = 0x20000;
/// Guest-physical address of the boot page tables: PML4, PDPT, four page directories.
pub const PAGE_TABLES: u64 = 0x9000;
/// The end of conventional memory the e820 map reports (the EBDA and BIOS area above it
/// are reserved, as on a PC).
const LOW_RAM_END: u64 = 0x9fc00;
/// Start of extended memory.
const HIGH_RAM: u64 = 0x10_0000;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Why the kernel cannot be booted.
#[derive(Clone, Copy, Debug)]
pub enum BootError {
    /// No "HdrS" setup header (not a bzImage) or no 0xAA55 boot flag.
    NotBzImage,
    /// Protocol older than 2.12, or no 64-bit entry (XLF_KERNEL_64).
    Protocol(u16),
    /// Kernel, initramfs and the kernel's working area do not fit in guest RAM.
    NoRoom {
        /// End of the kernel's area (load address + init_size).
        kernel_end: u64,
        /// Where the initramfs would start.
        initrd: u64,
    },
    /// The command line is longer than the kernel accepts.
    CmdlineTooLong(usize),
    /// A guest-memory write fell outside RAM.
    Ram(OutOfRam),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::NotBzImage => f.write_str("not a bzImage (no HdrS setup header or boot flag)"),
            BootError::Protocol(v) => {
                write!(f, "boot protocol {v:#x}: 2.12 or later with a 64-bit entry needed")
            }
            BootError::NoRoom { kernel_end, initrd } => {
                write!(f, "the kernel's area ends at {kernel_end:#x}, past the initramfs at {initrd:#x}")
            }
            BootError::CmdlineTooLong(n) => write!(f, "command line of {n} bytes is too long"),
            BootError::Ram(e) => write!(f, "write of {:#x} bytes at {:#x} outside guest RAM", e.len, e.gpa),
        }
    }
}

impl From<OutOfRam> for BootError {
    fn from(e: OutOfRam) -> Self {
        BootError::Ram(e)
    }
}

/// Where things went.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// Protocol version.
    pub version: u16,
    /// Load address of the protected-mode kernel.
    pub load: u64,
    /// `init_size`.
    pub init_size: u64,
    /// The 64-bit entry point.
    pub entry: u64,
    /// Initramfs address and size.
    pub initrd: (u64, u64),
    /// e820 entries written.
    pub e820: usize,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u32_at(b, off) as u64 | (u32_at(b, off + 4) as u64) << 32
}

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820 {
    /// Start.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// Type.
    pub kind: u32,
}

/// The e820 map of RAM ranges `ram` (the memslots, guest-physical [start, end)): each
/// range as usable RAM, except that the PC's EBDA and BIOS area (0x9fc00-0x100000) is
/// reported reserved where a range covers it.
pub fn e820_from_slots(ram: &[(u64, u64)], out: &mut [E820]) -> usize {
    let mut n = 0;
    let mut push = |addr: u64, end: u64, kind: u32| {
        if end > addr && n < out.len() {
            out[n] = E820 { addr, size: end - addr, kind };
            n += 1;
        }
    };
    for &(start, end) in ram {
        push(start, end.min(LOW_RAM_END), E820_RAM);
        push(start.max(LOW_RAM_END), end.min(HIGH_RAM), E820_RESERVED);
        push(start.max(HIGH_RAM), end, E820_RAM);
    }
    n
}

/// Loads `kernel` (a bzImage) and `initrd` into `ram` and builds the zero page, the GDT and
/// the identity page tables for the 64-bit entry. `slots` are the RAM memslots.
pub fn load(
    ram: &GuestRam,
    slots: &[(u64, u64)],
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
) -> Result<Loaded, BootError> {
    if kernel.len() < 0x1000 || u16_at(kernel, 0x1fe) != 0xaa55 || &kernel[0x202..0x206] != b"HdrS" {
        return Err(BootError::NotBzImage);
    }
    let version = u16_at(kernel, 0x206);
    let xloadflags = u16_at(kernel, 0x236);
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(BootError::Protocol(version));
    }
    let setup_sects = match kernel[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm_offset = (setup_sects + 1) * 512;
    if pm_offset >= kernel.len() {
        return Err(BootError::NotBzImage);
    }
    let align = (u32_at(kernel, 0x230) as u64).max(0x1000);
    let pref = u64_at(kernel, 0x258);
    let init_size = u32_at(kernel, 0x260) as u64;
    let cmdline_max = u32_at(kernel, 0x238) as usize;
    let initrd_max = u32_at(kernel, 0x22c) as u64;
    // A relocatable kernel may go anywhere aligned; its preferred address is the natural one.
    let load = pref.max(HIGH_RAM).div_ceil(align) * align;
    let kernel_end = load + init_size.max((kernel.len() - pm_offset) as u64);
    let ram_end = slots.iter().map(|s| s.1).max().unwrap_or(0).min(initrd_max + 1);
    let initrd_at = ram_end.saturating_sub(initrd.len() as u64) & !0xfff;
    if kernel_end > initrd_at || initrd_at < HIGH_RAM {
        return Err(BootError::NoRoom { kernel_end, initrd: initrd_at });
    }
    if cmdline.len() >= cmdline_max.min(4095) {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    ram.write(load, &kernel[pm_offset..])?;
    ram.write(initrd_at, initrd)?;

    // The zero page: the setup header copied from the image, then the loader's fields.
    let mut bp = [0u8; 4096];
    let hdr_end = (0x202 + kernel[0x201] as usize).min(0x290);
    bp[0x1f1..hdr_end].copy_from_slice(&kernel[0x1f1..hdr_end]);
    bp[0x210] = 0xff; // type_of_loader: undefined boot loader
    bp[0x211] |= 0x01; // loadflags: LOADED_HIGH
    bp[0x214..0x218].copy_from_slice(&(load as u32).to_le_bytes()); // code32_start
    bp[0x218..0x21c].copy_from_slice(&(initrd_at as u32).to_le_bytes()); // ramdisk_image
    bp[0x21c..0x220].copy_from_slice(&(initrd.len() as u32).to_le_bytes()); // ramdisk_size
    bp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes()); // cmd_line_ptr
    let mut map = [E820 { addr: 0, size: 0, kind: 0 }; 16];
    let n = e820_from_slots(slots, &mut map);
    bp[0x1e8] = n as u8; // e820_entries
    for (i, e) in map[..n].iter().enumerate() {
        let off = 0x2d0 + 20 * i; // e820_table
        bp[off..off + 8].copy_from_slice(&e.addr.to_le_bytes());
        bp[off + 8..off + 16].copy_from_slice(&e.size.to_le_bytes());
        bp[off + 16..off + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    ram.write(BOOT_PARAMS, &bp)?;
    ram.zero(CMDLINE, 4096)?;
    ram.write(CMDLINE, cmdline.as_bytes())?;

    // GDT: null, null, __BOOT_CS (64-bit code), __BOOT_DS (flat data).
    let gdt: [u64; 4] = [0, 0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT + 8 * i as u64, &d.to_le_bytes())?;
    }
    // Identity map of the first 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] ->
    // four page directories.
    let (pml4, pdpt, pd) = (PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000);
    ram.zero(PAGE_TABLES, 6 * 0x1000)?;
    ram.write(pml4, &(pdpt | 0x3).to_le_bytes())?;
    for i in 0..4u64 {
        ram.write(pdpt + 8 * i, &((pd + 0x1000 * i) | 0x3).to_le_bytes())?;
    }
    for i in 0..2048u64 {
        ram.write(pd + 8 * i, &((i << 21) | 0x83).to_le_bytes())?;
    }
    Ok(Loaded {
        version,
        load,
        init_size,
        entry: load + 0x200,
        initrd: (initrd_at, initrd.len() as u64),
        e820: n,
    })
}

/// The boot GDT's base and limit.
pub fn gdt() -> (u64, u16) {
    (GDT, 4 * 8 - 1)
}
