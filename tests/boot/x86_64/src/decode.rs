//! The few guest instructions a shadow-paging hypervisor must decode itself when the
//! processor does not (QEMU's SVM has neither decode assists nor NRIP save): MOV to and
//! from CR0/CR3/CR4, INVLPG, RDMSR/WRMSR, and the stores (`mov r/m, reg` and
//! `mov r/m, imm`) that write a write-protected guest page table and must be emulated.
//! Anything else is `None`: the run stops with a named error, never a guess.

/// A memory operand: `base + index * scale + disp`, or RIP-relative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mem {
    /// Base register (0 = RAX ... 15 = R15).
    pub base: Option<u8>,
    /// Index register and scale.
    pub index: Option<(u8, u8)>,
    /// Displacement (sign-extended).
    pub disp: i64,
    /// RIP-relative (64-bit code, mod 00 r/m 101).
    pub rip_rel: bool,
}

/// Where a store's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// A register (0 = RAX ... 15 = R15).
    Reg(u8),
    /// An immediate, sign-extended to the operand size.
    Imm(u64),
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// MOV to CRn from a register.
    MovToCr {
        /// The control register.
        cr: u8,
        /// The source register.
        gpr: u8,
    },
    /// MOV from CRn to a register.
    MovFromCr {
        /// The control register.
        cr: u8,
        /// The destination register.
        gpr: u8,
    },
    /// INVLPG of a memory operand's address.
    Invlpg(Mem),
    /// A store of `bytes` (1, 2, 4 or 8).
    Store {
        /// Destination.
        mem: Mem,
        /// Operand size.
        bytes: u64,
        /// Value.
        src: Src,
    },
    /// WRMSR.
    Wrmsr,
    /// RDMSR.
    Rdmsr,
}

/// An instruction and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// What it does.
    pub op: Op,
    /// Its length in bytes.
    pub len: u64,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }
    fn i8(&mut self) -> Option<i64> {
        self.u8().map(|v| v as i8 as i64)
    }
    fn i16(&mut self) -> Option<i64> {
        let lo = self.u8()? as u16;
        let hi = self.u8()? as u16;
        Some((lo | hi << 8) as i16 as i64)
    }
    fn i32(&mut self) -> Option<i64> {
        let mut v = 0u32;
        for i in 0..4 {
            v |= (self.u8()? as u32) << (8 * i);
        }
        Some(v as i32 as i64)
    }
}

/// Decodes a ModRM memory operand (32- or 64-bit addressing); `None` for a register
/// operand (mod 11).
fn modrm_mem(c: &mut Cursor<'_>, modrm: u8, rex: u8, long: bool) -> Option<Mem> {
    let md = modrm >> 6;
    let rm = modrm & 7;
    if md == 3 {
        return None;
    }
    let mut mem = Mem { base: None, index: None, disp: 0, rip_rel: false };
    if rm == 4 {
        let sib = c.u8()?;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | ((rex & 2) << 2);
        let base = (sib & 7) | ((rex & 1) << 3);
        if index != 4 {
            mem.index = Some((index, scale));
        }
        if sib & 7 == 5 && md == 0 {
            mem.disp = c.i32()?;
        } else {
            mem.base = Some(base);
        }
    } else if rm == 5 && md == 0 {
        mem.disp = c.i32()?;
        mem.rip_rel = long;
    } else {
        mem.base = Some(rm | ((rex & 1) << 3));
    }
    match md {
        1 => mem.disp = c.i8()?,
        2 => mem.disp = c.i32()?,
        _ => {}
    }
    Some(mem)
}

/// Decodes the instruction at the start of `bytes`; `long` for 64-bit code.
pub fn decode(bytes: &[u8], long: bool) -> Option<Insn> {
    let mut c = Cursor { b: bytes, at: 0 };
    let mut opsize16 = false;
    let mut b = c.u8()?;
    if b == 0x66 {
        opsize16 = true;
        b = c.u8()?;
    }
    let mut rex = 0u8;
    if long && (0x40..0x50).contains(&b) {
        rex = b;
        b = c.u8()?;
    }
    let wide = rex & 8 != 0;
    let bytes_op = if wide {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let op = match b {
        0x0f => match c.u8()? {
            x @ (0x20 | 0x22) => {
                let modrm = c.u8()?;
                let cr = ((modrm >> 3) & 7) | ((rex & 4) << 1);
                let gpr = (modrm & 7) | ((rex & 1) << 3);
                if x == 0x22 {
                    Op::MovToCr { cr, gpr }
                } else {
                    Op::MovFromCr { cr, gpr }
                }
            }
            0x01 => {
                let modrm = c.u8()?;
                if (modrm >> 3) & 7 != 7 {
                    return None;
                }
                Op::Invlpg(modrm_mem(&mut c, modrm, rex, long)?)
            }
            0x30 => Op::Wrmsr,
            0x32 => Op::Rdmsr,
            _ => return None,
        },
        0x88 | 0x89 => {
            let modrm = c.u8()?;
            let reg = ((modrm >> 3) & 7) | ((rex & 4) << 1);
            let mem = modrm_mem(&mut c, modrm, rex, long)?;
            if b == 0x88 && rex == 0 && reg >= 4 {
                // AH, CH, DH, BH: not used by the guest.
                return None;
            }
            Op::Store { mem, bytes: if b == 0x88 { 1 } else { bytes_op }, src: Src::Reg(reg) }
        }
        0xc6 | 0xc7 => {
            let modrm = c.u8()?;
            if (modrm >> 3) & 7 != 0 {
                return None;
            }
            let mem = modrm_mem(&mut c, modrm, rex, long)?;
            let (n, imm) = if b == 0xc6 {
                (1, c.i8()?)
            } else if opsize16 && !wide {
                (2, c.i16()?)
            } else {
                (bytes_op, c.i32()?)
            };
            Op::Store { mem, bytes: n, src: Src::Imm(imm as u64) }
        }
        _ => return None,
    };
    Some(Insn { op, len: c.at as u64 })
}

/// The linear address of `mem`: `reg(n)` reads register n, `next_rip` is the address
/// after the instruction, `long` selects 64-bit addressing (else 32-bit, truncated).
pub fn address(mem: &Mem, reg: impl Fn(u8) -> u64, next_rip: u64, long: bool) -> u64 {
    let mut a = mem.disp as u64;
    if mem.rip_rel {
        a = a.wrapping_add(next_rip);
    }
    if let Some(b) = mem.base {
        a = a.wrapping_add(reg(b));
    }
    if let Some((i, s)) = mem.index {
        a = a.wrapping_add(reg(i).wrapping_mul(s as u64));
    }
    if long {
        a
    } else {
        a & 0xffff_ffff
    }
}
