//! Guest-physical accesses outside every memslot, answered as absent: reads return all
//! ones, writes go nowhere, as on a PC bus where nothing decodes the address. The VMM
//! fetches the faulting instruction through the guest's page tables (4- or 5-level, the
//! only modes a 64-bit Linux runs in), decodes the `mov` forms compilers emit for device
//! accesses (88/89/8a/8b, c6/c7, movzx 0f b6/b7, with legacy and REX prefixes), completes
//! it and skips it. Anything else is reported, never guessed (Intel SDM Vol. 2, chapter 2:
//! instruction format; Vol. 3A 4.5: 4-level paging).

use super::ram::GuestRam;
use super::vcpu::ControlRegs;

const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Why an access could not be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The guest is not in long mode with paging (Linux always is once it touches devices).
    NotLongMode,
    /// RIP's page is not mapped by the guest or not in RAM.
    FetchFault(u64),
    /// The instruction is not one of the emulated `mov` forms.
    Unsupported([u8; 8]),
}

/// What the instruction does with the absent location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load into general register `reg` (x86 encoding 0-15): `bytes` read, written to the
    /// register as an `op_bytes` operand (zero-extended for movzx).
    Load {
        /// Register number.
        reg: u8,
        /// Bytes read from memory.
        bytes: u8,
        /// Operand size of the destination.
        op_bytes: u8,
        /// Byte register AH/CH/DH/BH (no REX, reg 4-7, byte operand).
        high_byte: bool,
    },
    /// A store of `bytes`.
    Store {
        /// Bytes written.
        bytes: u8,
    },
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Its length.
    pub len: u8,
    /// Its access.
    pub access: Access,
}

/// Translates linear address `la` through the guest's page tables.
pub fn translate(ram: &GuestRam, cr: &ControlRegs, la: u64) -> Option<u64> {
    if cr.cr0 & CR0_PG == 0 || cr.efer & EFER_LMA == 0 {
        return None;
    }
    let levels = if cr.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = cr.cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = (la >> shift) & 0x1ff;
        let e = ram.read_u64(table + 8 * idx).ok()?;
        if e & PTE_P == 0 {
            return None;
        }
        // A huge leaf at the PDPT (1 GiB) or PD (2 MiB) level.
        if (level == 2 || level == 3) && e & PTE_PS != 0 {
            let size_mask = (1u64 << shift) - 1;
            return Some((e & ADDR_MASK & !size_mask) | (la & size_mask));
        }
        table = e & ADDR_MASK;
    }
    Some(table | (la & 0xfff))
}

/// Reads up to 15 instruction bytes at `rip` (a page at a time).
pub fn fetch(ram: &GuestRam, cr: &ControlRegs, rip: u64) -> Result<[u8; 15], MmioError> {
    if cr.cr0 & CR0_PG == 0 || cr.efer & EFER_LMA == 0 {
        return Err(MmioError::NotLongMode);
    }
    let mut out = [0u8; 15];
    for (i, b) in out.iter_mut().enumerate() {
        let la = rip.wrapping_add(i as u64);
        let pa = translate(ram, cr, la).ok_or(MmioError::FetchFault(la))?;
        *b = ram.read::<1>(pa).map_err(|_| MmioError::FetchFault(la))?[0];
    }
    Ok(out)
}

/// Decodes a 64-bit-mode `mov` to or from memory.
pub fn decode(code: &[u8; 15]) -> Result<Decoded, MmioError> {
    let unsupported = || {
        let mut head = [0u8; 8];
        head.copy_from_slice(&code[..8]);
        MmioError::Unsupported(head)
    };
    let mut i = 0;
    let mut opsize16 = false;
    while i < 4 && matches!(code[i], 0x66 | 0x67 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0xf0) {
        opsize16 |= code[i] == 0x66;
        i += 1;
    }
    let rex = if code[i] & 0xf0 == 0x40 {
        i += 1;
        code[i - 1]
    } else {
        0
    };
    let rex_w = rex & 8 != 0;
    let op_bytes = if rex_w {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let (opcode, two_byte) = if code[i] == 0x0f {
        i += 1;
        (code[i], true)
    } else {
        (code[i], false)
    };
    i += 1;
    let modrm = code[i];
    i += 1;
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | (rex & 4) << 1, modrm & 7);
    if md == 3 {
        return Err(unsupported());
    }
    if rm == 4 {
        let sib = code[i];
        i += 1;
        if md == 0 && sib & 7 == 5 {
            i += 4;
        }
    }
    i += match (md, rm) {
        (0, 5) => 4,
        (1, _) => 1,
        (2, _) => 4,
        _ => 0,
    };
    let byte_reg = |reg: u8| rex == 0 && (4..8).contains(&reg);
    let access = match (two_byte, opcode) {
        (false, 0x88) => Access::Store { bytes: 1 },
        (false, 0x89) => Access::Store { bytes: op_bytes },
        (false, 0x8a) => Access::Load { reg, bytes: 1, op_bytes: 1, high_byte: byte_reg(reg) },
        (false, 0x8b) => Access::Load { reg, bytes: op_bytes, op_bytes, high_byte: false },
        (false, 0xc6) if reg & 7 == 0 => {
            i += 1;
            Access::Store { bytes: 1 }
        }
        (false, 0xc7) if reg & 7 == 0 => {
            i += if op_bytes == 2 { 2 } else { 4 };
            Access::Store { bytes: op_bytes }
        }
        (true, 0xb6) => Access::Load { reg, bytes: 1, op_bytes, high_byte: false },
        (true, 0xb7) => Access::Load { reg, bytes: 2, op_bytes, high_byte: false },
        _ => return Err(unsupported()),
    };
    if i > 15 {
        return Err(unsupported());
    }
    Ok(Decoded { len: i as u8, access })
}

/// The register's new value after a load of all ones (absent memory) into it.
pub fn load_result(old: u64, access: Access) -> u64 {
    let Access::Load { bytes, op_bytes, high_byte, .. } = access else { return old };
    let value = if bytes >= 8 { u64::MAX } else { (1u64 << (8 * bytes)) - 1 };
    match op_bytes {
        1 if high_byte => (old & !0xff00) | (value & 0xff) << 8,
        1 => (old & !0xff) | (value & 0xff),
        2 => (old & !0xffff) | (value & 0xffff),
        // A 32-bit destination zero-extends into the 64-bit register.
        4 => value & 0xffff_ffff,
        _ => value,
    }
}
