//! Hashed page table entries: the pre-ISA-3.0 layout the PAPR hypercalls use,
//! the ISA 3.0 layout a POWER9+ hypervisor's own table holds, and the
//! conversion between them.
//!
//! An HPTE is two doublewords, always **big-endian in memory** whatever the
//! host: [`Hpte`] holds the values in CPU order and [`Hpte::to_be_bytes`] /
//! [`Hpte::from_be_bytes`] are the only way to and from memory images.
//!
//! Bit numbers in the docs are IBM numbering (bit 0 is the most significant)
//! as in Power ISA v2.07B Book III-S 5.7.7.1 "Page Table Entry" and v3.0B
//! Book III 5.7.7.1; the constants are plain masks.

/// A segment size (the B field of SLB entries and HPTEs).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum SegmentSize {
    /// 256 MB, B = 0b00.
    S256M,
    /// 1 TB, B = 0b01.
    S1T,
}

impl SegmentSize {
    /// Decodes a B field; 0b10 and 0b11 are reserved.
    pub const fn from_b(b: u64) -> Option<Self> {
        match b {
            0 => Some(Self::S256M),
            1 => Some(Self::S1T),
            _ => None,
        }
    }

    /// The B field value.
    pub const fn b(self) -> u64 {
        match self {
            Self::S256M => 0,
            Self::S1T => 1,
        }
    }

    /// log2 of the segment size (28 or 40).
    pub const fn shift(self) -> u32 {
        match self {
            Self::S256M => 28,
            Self::S1T => 40,
        }
    }

    /// Bits of VSID in a 78-bit virtual address (50 or 38).
    pub const fn vsid_bits(self) -> u32 {
        78 - self.shift()
    }
}

/// Dword 0, bits 0:1 (pre-3.0): segment size B (0b00 256 MB, 0b01 1 TB).
pub const HPTE_V_B: u64 = 0xc000_0000_0000_0000;
/// Shift of the B field in dword 0 (pre-3.0).
pub const HPTE_V_B_SHIFT: u32 = 62;
/// Dword 0 B value of a 1 TB segment (pre-3.0).
pub const HPTE_V_1TB_SEG: u64 = 0x4000_0000_0000_0000;
/// Dword 0, bits 2:56 (pre-3.0): abbreviated virtual page number (VA bits 0:54 of a 78-bit VA).
pub const HPTE_V_AVPN: u64 = 0x3fff_ffff_ffff_ff80;
/// Dword 0, bits 12:56 (ISA 3.0): the AVPN of a 68-bit virtual address.
pub const HPTE_V_AVPN_3_0: u64 = 0x000f_ffff_ffff_ff80;
/// The bits of dword 0 both layouts share (everything below the 3.0 AVPN top).
pub const HPTE_V_COMMON_BITS: u64 = 0x000f_ffff_ffff_ffff;
/// Shift of the AVPN field in dword 0.
pub const HPTE_V_AVPN_SHIFT: u32 = 7;
/// Dword 0, bits 57:60: software-use bits (hardware ignores them).
pub const HPTE_V_SW: u64 = 0x78;
/// Software bit a hypervisor uses as the per-HPTE lock (KVM's `HPTE_V_HVLOCK`).
/// QEMU's pseries machine sets this same bit in every slot it writes.
pub const HPTE_V_HVLOCK: u64 = 0x40;
/// Software bit marking an entry the guest entered but the hypervisor has
/// unmapped from the hardware (KVM's `HPTE_V_ABSENT`): the guest still sees it valid.
pub const HPTE_V_ABSENT: u64 = 0x20;
/// Software bit Linux guests use for bolted entries.
pub const HPTE_V_BOLTED: u64 = 0x10;
/// Dword 0, bit 61: L, the page is larger than 4 KiB (size in dword 1's LP bits).
pub const HPTE_V_LARGE: u64 = 0x4;
/// Dword 0, bit 62: H, the entry sits in its secondary PTEG.
pub const HPTE_V_SECONDARY: u64 = 0x2;
/// Dword 0, bit 63: V, the entry is valid.
pub const HPTE_V_VALID: u64 = 0x1;

/// Dword 1, bit 0: PP0, the high bit of the 3-bit page protection.
pub const HPTE_R_PP0: u64 = 0x8000_0000_0000_0000;
/// Dword 1, bit 1: reserved in ISA 2.07 (tag set); must be zero from a guest.
pub const HPTE_R_TS: u64 = 0x4000_0000_0000_0000;
/// Dword 1, bits 2:3: the high bits of the 5-bit storage key.
pub const HPTE_R_KEY_HI: u64 = 0x3000_0000_0000_0000;
/// Dword 1, bits 4:5 (ISA 3.0 only): segment size B.
pub const HPTE_R_3_0_B: u64 = 0x0c00_0000_0000_0000;
/// Shift of the ISA 3.0 B field in dword 1.
pub const HPTE_R_3_0_B_SHIFT: u32 = 58;
/// Dword 1, bits 4:51 (pre-3.0): abbreviated real page number, low bits shared with LP.
pub const HPTE_R_RPN: u64 = 0x0fff_ffff_ffff_f000;
/// Dword 1, bits 7:51 (ISA 3.0): the real page number.
pub const HPTE_R_RPN_3_0: u64 = 0x01ff_ffff_ffff_f000;
/// Shift of the RPN (and LP) field in dword 1.
pub const HPTE_R_RPN_SHIFT: u32 = 12;
/// Dword 1, bits 52:54: the low bits of the storage key.
pub const HPTE_R_KEY_LO: u64 = 0x0e00;
/// Dword 1, bit 55: R, referenced (set by hardware).
pub const HPTE_R_R: u64 = 0x100;
/// Dword 1, bit 56: C, changed (set by hardware on a store).
pub const HPTE_R_C: u64 = 0x80;
/// Dword 1, bits 57:60: WIMG storage attributes.
pub const HPTE_R_WIMG: u64 = 0x78;
/// Write-through.
pub const HPTE_R_W: u64 = 0x40;
/// Caching-inhibited.
pub const HPTE_R_I: u64 = 0x20;
/// Memory coherence required (what ordinary RAM takes, exactly, under QEMU).
pub const HPTE_R_M: u64 = 0x10;
/// Guarded.
pub const HPTE_R_G: u64 = 0x08;
/// Dword 1, bit 61: N, no-execute.
pub const HPTE_R_N: u64 = 0x04;
/// Dword 1, bits 62:63: PP, the low two bits of the page protection.
pub const HPTE_R_PP: u64 = 0x03;
/// PP0 and PP together.
pub const HPTE_R_PPP: u64 = HPTE_R_PP0 | HPTE_R_PP;
/// Both key fields.
pub const HPTE_R_KEY: u64 = HPTE_R_KEY_HI | HPTE_R_KEY_LO;

/// Bytes of one HPTE.
pub const HPTE_BYTES: usize = 16;
/// HPTEs in a PTEG.
pub const HPTES_PER_GROUP: u64 = 8;

/// Why an HPTE could not be converted between layouts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConvertError {
    /// The pre-3.0 AVPN has bits above the 68-bit virtual address ISA 3.0 keeps.
    AvpnTooWide(u64),
    /// The pre-3.0 RPN has bits above the ISA 3.0 real page number.
    RpnTooWide(u64),
    /// The B field holds a reserved value (0b10 or 0b11).
    ReservedSegmentSize(u64),
}

/// One HPTE in the pre-ISA-3.0 layout (B in dword 0), values in CPU order.
///
/// This is the layout every PAPR hypercall takes and returns, on POWER8,
/// POWER9 and POWER10 alike.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct Hpte {
    /// Dword 0: B, AVPN, SW, L, H, V.
    pub v: u64,
    /// Dword 1: PP0, key, RPN/LP, R, C, WIMG, N, PP.
    pub r: u64,
}

/// One HPTE in the ISA 3.0 layout (B in dword 1), values in CPU order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct Hpte300 {
    /// Dword 0: AVPN (68-bit VA), SW, L, H, V.
    pub v: u64,
    /// Dword 1: PP0, key, B, RPN/LP, R, C, WIMG, N, PP.
    pub r: u64,
}

impl Hpte {
    /// The empty (invalid, all-zero) entry.
    pub const EMPTY: Hpte = Hpte { v: 0, r: 0 };

    /// Builds an entry from its two doublewords.
    pub const fn new(v: u64, r: u64) -> Self {
        Self { v, r }
    }

    /// Reads an entry from its big-endian memory image.
    pub fn from_be_bytes(b: [u8; HPTE_BYTES]) -> Self {
        let mut v = [0u8; 8];
        let mut r = [0u8; 8];
        v.copy_from_slice(&b[..8]);
        r.copy_from_slice(&b[8..]);
        Self { v: u64::from_be_bytes(v), r: u64::from_be_bytes(r) }
    }

    /// The big-endian memory image of the entry.
    pub fn to_be_bytes(self) -> [u8; HPTE_BYTES] {
        let mut b = [0u8; HPTE_BYTES];
        b[..8].copy_from_slice(&self.v.to_be_bytes());
        b[8..].copy_from_slice(&self.r.to_be_bytes());
        b
    }

    /// V: the entry is valid.
    pub const fn valid(&self) -> bool {
        self.v & HPTE_V_VALID != 0
    }

    /// L: the page is larger than 4 KiB.
    pub const fn large(&self) -> bool {
        self.v & HPTE_V_LARGE != 0
    }

    /// H: the entry was placed with the secondary hash.
    pub const fn secondary(&self) -> bool {
        self.v & HPTE_V_SECONDARY != 0
    }

    /// The raw B field (0..=3).
    pub const fn b(&self) -> u64 {
        self.v >> HPTE_V_B_SHIFT
    }

    /// The segment size, or `None` for a reserved B value.
    pub const fn segment_size(&self) -> Option<SegmentSize> {
        SegmentSize::from_b(self.b())
    }

    /// The AVPN field value (VA bits 0:54, right-aligned).
    pub const fn avpn(&self) -> u64 {
        (self.v & HPTE_V_AVPN) >> HPTE_V_AVPN_SHIFT
    }

    /// The three-bit page protection PP0 || PP.
    pub const fn pp(&self) -> u64 {
        ((self.r >> 61) & 0x4) | (self.r & HPTE_R_PP)
    }

    /// N: no-execute.
    pub const fn no_execute(&self) -> bool {
        self.r & HPTE_R_N != 0
    }

    /// The WIMG bits, right-aligned (W = 8, I = 4, M = 2, G = 1).
    pub const fn wimg(&self) -> u64 {
        (self.r & HPTE_R_WIMG) >> 3
    }

    /// R: referenced.
    pub const fn referenced(&self) -> bool {
        self.r & HPTE_R_R != 0
    }

    /// C: changed.
    pub const fn changed(&self) -> bool {
        self.r & HPTE_R_C != 0
    }

    /// The five-bit storage key.
    pub const fn key(&self) -> u64 {
        ((self.r & HPTE_R_KEY_HI) >> 57) | ((self.r & HPTE_R_KEY_LO) >> 9)
    }

    /// The real address of the page for an actual page size of `1 << shift`
    /// (the LP encoding bits below the page size are dropped).
    pub const fn real_address(&self, shift: u32) -> u64 {
        self.r & HPTE_R_RPN & !((1u64 << shift) - 1)
    }

    /// Whether the protection lets a store through in some privilege state
    /// (everything but PP = 0b011 and PP0||PP = 0b110, which are read-only).
    pub const fn writable(&self) -> bool {
        is_writable(self.r)
    }

    /// Converts to the ISA 3.0 layout: B moves to dword 1; the AVPN and RPN
    /// must fit the narrower 3.0 fields.
    #[inline]
    pub fn to_isa300(self) -> Result<Hpte300, ConvertError> {
        if self.b() > 1 {
            return Err(ConvertError::ReservedSegmentSize(self.b()));
        }
        if self.v & HPTE_V_AVPN & !HPTE_V_COMMON_BITS != 0 {
            return Err(ConvertError::AvpnTooWide(self.v));
        }
        if self.r & HPTE_R_RPN & !HPTE_R_RPN_3_0 != 0 {
            return Err(ConvertError::RpnTooWide(self.r));
        }
        Ok(Hpte300 {
            v: self.v & HPTE_V_COMMON_BITS,
            r: (self.r & !HPTE_R_3_0_B) | (self.b() << HPTE_R_3_0_B_SHIFT),
        })
    }
}

impl Hpte300 {
    /// Converts to the pre-3.0 layout (always possible: the old fields are wider).
    #[inline]
    pub const fn to_pre300(self) -> Hpte {
        let b = (self.r & HPTE_R_3_0_B) >> HPTE_R_3_0_B_SHIFT;
        Hpte { v: (self.v & HPTE_V_COMMON_BITS) | (b << HPTE_V_B_SHIFT), r: self.r & !HPTE_R_3_0_B }
    }

    /// Reads an entry from its big-endian memory image.
    pub fn from_be_bytes(b: [u8; HPTE_BYTES]) -> Self {
        let h = Hpte::from_be_bytes(b);
        Self { v: h.v, r: h.r }
    }

    /// The big-endian memory image of the entry.
    pub fn to_be_bytes(self) -> [u8; HPTE_BYTES] {
        Hpte { v: self.v, r: self.r }.to_be_bytes()
    }
}

/// The layout a hardware table holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum HpteFormat {
    /// Power ISA 2.07 and earlier (POWER8): B in dword 0.
    #[default]
    PreIsa300,
    /// Power ISA 3.0 and later (POWER9, POWER10): B in dword 1.
    Isa300,
}

impl HpteFormat {
    /// Converts a pre-3.0 entry into this layout (identity for pre-3.0).
    #[inline]
    pub fn encode(self, h: Hpte) -> Result<(u64, u64), ConvertError> {
        match self {
            Self::PreIsa300 => Ok((h.v, h.r)),
            Self::Isa300 => h.to_isa300().map(|n| (n.v, n.r)),
        }
    }

    /// [`HpteFormat::encode`] of an entry its caller has checked fits the
    /// layout (B not reserved; for ISA 3.0, AVPN and RPN inside the narrower
    /// fields): nothing left to refuse, so nothing to branch on. Bits a
    /// narrower field lacks are dropped, never carried into another field.
    #[inline]
    pub const fn encode_fitting(self, h: Hpte) -> (u64, u64) {
        match self {
            Self::PreIsa300 => (h.v, h.r),
            Self::Isa300 => {
                (h.v & HPTE_V_COMMON_BITS, (h.r & !HPTE_R_3_0_B) | ((h.b() & 1) << HPTE_R_3_0_B_SHIFT))
            }
        }
    }

    /// Converts an entry in this layout to pre-3.0.
    #[inline]
    pub const fn decode(self, v: u64, r: u64) -> Hpte {
        match self {
            Self::PreIsa300 => Hpte { v, r },
            Self::Isa300 => Hpte300 { v, r }.to_pre300(),
        }
    }
}

/// PP0||PP values, Power ISA 2.07B Book III-S 5.7.9.2 (with Kp = 1 for
/// problem state, Ks = 0 for privileged state).
pub mod pp {
    /// Privileged read/write, problem state no access.
    pub const RW_NONE: u64 = 0;
    /// Privileged read/write, problem state read.
    pub const RW_R: u64 = 1;
    /// Read/write in both states.
    pub const RW_RW: u64 = 2;
    /// Read-only in both states.
    pub const R_R: u64 = 3;
    /// PP0 = 1, PP = 0b10: privileged read-only, problem state no access.
    pub const R_NONE: u64 = 6;
}

/// The AVPN argument of H_REMOVE, H_PROTECT and H_BULK_REMOVE that matches
/// the entry whose dword 0 is `v`: dword 0 bits 0:56, **B included** (LoPAPR
/// 14.5.4.1.2; QEMU and KVM compare `v & !0x7f` with it). Forgetting B fails
/// every 1 TB-segment entry with H_NOT_FOUND; the software bits 0x78 (QEMU
/// sets 0x40 in every slot it writes) and L, H, V are dropped.
pub const fn avpn_arg(v: u64) -> u64 {
    v & !0x7f
}

/// Whether dword 1 grants a store in some state (KVM's `hpte_is_writable`).
pub const fn is_writable(r: u64) -> bool {
    let p = r & HPTE_R_PPP;
    p != 3 && p != (HPTE_R_PP0 | 2)
}

/// What PP0||PP in `r` allows an access with storage key `key` (Ks in
/// privileged state, Kp in problem state): `(load, store)`. Power ISA 2.07B
/// Book III-S 5.7.9.2, Table 18; the reserved values 0b100, 0b101 and 0b111
/// allow nothing here.
pub const fn pp_allows(r: u64, key: bool) -> (bool, bool) {
    let p = ((r & HPTE_R_PP0) >> 61) | (r & HPTE_R_PP);
    match (key, p) {
        (false, 0..=2) | (true, 2) => (true, true),
        (false, 3) | (false, 6) | (true, 1) | (true, 3) => (true, false),
        _ => (false, false),
    }
}

/// Dword 1 with store permission taken away in every state, keeping loads
/// as they were (RW_NONE becomes R_NONE, the others R_R).
pub const fn make_readonly(r: u64) -> u64 {
    if r & HPTE_R_PP0 != 0 || r & HPTE_R_PP == 0 {
        (r & !HPTE_R_PPP) | HPTE_R_PP0 | 2
    } else {
        r | 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_image_is_big_endian_on_every_host() {
        let h = Hpte::new(0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
        let b = h.to_be_bytes();
        assert_eq!(b[0], 0x01);
        assert_eq!(b[7], 0x08);
        assert_eq!(b[8], 0x11);
        assert_eq!(b[15], 0x18);
        assert_eq!(Hpte::from_be_bytes(b), h);
    }

    #[test]
    fn field_accessors_follow_the_isa_bit_layout() {
        // 1 TB segment, AVPN 0x1234, bolted, large, secondary, valid.
        let v =
            HPTE_V_1TB_SEG | (0x1234 << 7) | HPTE_V_BOLTED | HPTE_V_LARGE | HPTE_V_SECONDARY | HPTE_V_VALID;
        let r =
            HPTE_R_PP0 | (0b10 << 60) | (0xabcde << 12) | (0b101 << 9) | HPTE_R_R | HPTE_R_M | HPTE_R_N | 2;
        let h = Hpte::new(v, r);
        assert!(h.valid() && h.large() && h.secondary());
        assert_eq!(h.segment_size(), Some(SegmentSize::S1T));
        assert_eq!(h.avpn(), 0x1234);
        assert_eq!(h.pp(), 0b110);
        assert!(!h.writable());
        assert!(h.no_execute() && h.referenced() && !h.changed());
        assert_eq!(h.wimg(), 0b0010);
        assert_eq!(h.key(), 0b10101);
        assert_eq!(h.real_address(12), 0xabcde000);
        assert_eq!(h.real_address(16), 0xabcd0000);
    }

    #[test]
    fn isa300_moves_b_to_dword_1_and_back() {
        let h = Hpte::new(HPTE_V_1TB_SEG | (0xfff << 7) | HPTE_V_VALID, (0x42 << 12) | HPTE_R_C | 2);
        let n = h.to_isa300().expect("fits");
        assert_eq!(n.v, (0xfff << 7) | HPTE_V_VALID);
        assert_eq!(n.r, (1 << 58) | (0x42 << 12) | HPTE_R_C | 2);
        assert_eq!(n.to_pre300(), h);
        assert_eq!(HpteFormat::Isa300.decode(n.v, n.r), h);
        assert_eq!(HpteFormat::PreIsa300.encode(h), Ok((h.v, h.r)));
    }

    #[test]
    fn encode_fitting_agrees_with_encode_on_every_entry_that_fits() {
        let vs = [0, HPTE_V_VALID, HPTE_V_1TB_SEG | (0xfff << 7) | HPTE_V_VALID, HPTE_V_COMMON_BITS];
        let rs =
            [0, HPTE_R_RPN_3_0 | HPTE_R_C, HPTE_R_PP0 | HPTE_R_KEY | (0x42 << 12) | 0x1ff, u64::MAX >> 7];
        for format in [HpteFormat::PreIsa300, HpteFormat::Isa300] {
            for (&v, &r) in vs.iter().flat_map(|v| rs.iter().map(move |r| (v, r))) {
                let h = Hpte::new(v, r & !HPTE_R_TS);
                if let Ok(words) = format.encode(h) {
                    assert_eq!(format.encode_fitting(h), words, "{format:?} {h:x?}");
                }
            }
        }
    }

    #[test]
    fn isa300_rejects_what_its_narrower_fields_cannot_hold() {
        let wide_avpn = Hpte::new(1 << 60, 0);
        assert_eq!(wide_avpn.to_isa300(), Err(ConvertError::AvpnTooWide(1 << 60)));
        let wide_rpn = Hpte::new(HPTE_V_VALID, 1 << 58);
        assert_eq!(wide_rpn.to_isa300(), Err(ConvertError::RpnTooWide(1 << 58)));
        let reserved_b = Hpte::new(0x8000_0000_0000_0001, 0);
        assert_eq!(reserved_b.to_isa300(), Err(ConvertError::ReservedSegmentSize(2)));
    }

    #[test]
    fn readonly_keeps_loads_and_drops_stores() {
        for p in 0..8u64 {
            let r = ((p & 4) << 61) | (p & 3);
            let ro = make_readonly(r);
            assert!(!is_writable(ro), "pp {p:#b}");
        }
        assert_eq!(make_readonly(pp::RW_NONE), HPTE_R_PP0 | 2);
        assert_eq!(make_readonly(pp::RW_RW), 3);
        assert_eq!(make_readonly(pp::RW_R), 3);
    }
}
