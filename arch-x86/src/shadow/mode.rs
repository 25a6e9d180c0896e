//! The guest's paging modes, its paging controls, and the page-fault error
//! code (Intel SDM Vol. 3A chapter 4).
//!
//! One [`PagingMode`] per mode says what differs between them: how many
//! levels, how wide an entry, which bits are reserved, where a large page's
//! address lives. The walker ([`super::guest_walk`]) is written once against
//! the trait. Bit positions shared by every mode (P, R/W, U/S, A, D, PS, XD)
//! are the constants below.

use crate::format::PhysAddrWidth;

/// Bit 0 (P): present (SDM Vol. 3A §4.3 Table 4-6, §4.4 Tables 4-8 to 4-11, §4.5 Tables 4-14 to 4-20).
pub const P: u64 = 1 << 0;
/// Bit 1 (R/W): writes allowed through this entry (SDM §4.6).
pub const RW: u64 = 1 << 1;
/// Bit 2 (U/S): user-mode accesses allowed through this entry (SDM §4.6).
pub const US: u64 = 1 << 2;
/// Bit 5 (A): accessed, set by the processor in every entry it uses (SDM §4.8).
pub const A: u64 = 1 << 5;
/// Bit 6 (D): dirty, set by the processor in the leaf on a write (SDM §4.8).
pub const D: u64 = 1 << 6;
/// Bit 7 (PS) of a PDE or PDPTE: the entry maps a page (SDM §4.3, §4.5).
pub const PS: u64 = 1 << 7;
/// Bit 63 (XD): execute-disable, only with PAE/4-level/5-level paging and
/// IA32_EFER.NXE = 1; reserved otherwise (SDM §4.6, §4.4.2, §4.5.4).
pub const XD: u64 = 1 << 63;

/// The guest's paging mode (SDM Vol. 3A §4.1.1, Table 4-1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum GuestMode {
    /// 32-bit paging: CR0.PG = 1, CR4.PAE = 0. Two levels of 4-byte entries,
    /// 4 MiB pages with CR4.PSE (and PSE-36 for addresses above 4 GiB).
    Bits32,
    /// PAE paging: CR4.PAE = 1, IA32_EFER.LME = 0. Four PDPTE registers
    /// loaded at MOV to CR3, then two levels of 8-byte entries.
    Pae,
    /// 4-level paging: IA32_EFER.LME = 1, CR4.LA57 = 0 (48-bit linear addresses).
    Four,
    /// 5-level paging: CR4.LA57 = 1 (57-bit linear addresses).
    Five,
}

impl GuestMode {
    /// Every mode.
    pub const ALL: [GuestMode; 4] = [GuestMode::Bits32, GuestMode::Pae, GuestMode::Four, GuestMode::Five];

    /// The level of the root table (2, 3, 4 or 5); for PAE, the PDPTE registers.
    pub const fn root_level(self) -> u8 {
        match self {
            GuestMode::Bits32 => 2,
            GuestMode::Pae => 3,
            GuestMode::Four => 4,
            GuestMode::Five => 5,
        }
    }

    /// Bytes per entry (4 for 32-bit paging, 8 otherwise).
    pub const fn entry_bytes(self) -> u64 {
        match self {
            GuestMode::Bits32 => 4,
            _ => 8,
        }
    }
}

/// What the processor supports, fixed for a VM (CPUID).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CpuFeatures {
    /// MAXPHYADDR (CPUID.80000008H:EAX bits 7:0).
    pub phys_width: PhysAddrWidth,
    /// PSE-36 (CPUID.01H:EDX bit 17): 4 MiB pages of 32-bit paging reach
    /// physical addresses above 4 GiB (SDM §4.3).
    pub pse36: bool,
    /// 1-GByte pages (CPUID.80000001H:EDX bit 26) in 4-level and 5-level paging.
    pub page_1g: bool,
}

impl CpuFeatures {
    /// MAXPHYADDR 46 (a common server part), PSE-36 and 1 GiB pages.
    pub fn typical() -> Self {
        Self { phys_width: PhysAddrWidth::new(46).expect("46 is in range"), pse36: true, page_1g: true }
    }

    /// M of SDM Table 4-4: the physical-address width of a 4 MiB page,
    /// `min(MAXPHYADDR, 40)` with PSE-36, 32 without.
    pub fn pse_width(&self) -> u32 {
        if self.pse36 {
            (self.phys_width.bits() as u32).min(40)
        } else {
            32
        }
    }
}

/// The guest's paging controls: what a translation depends on beyond the
/// tables themselves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestCpu {
    /// The paging mode.
    pub mode: GuestMode,
    /// CR3. Bits 31:12 (32-bit), 31:5 (PAE) or MAXPHYADDR-1:12 address the root.
    pub cr3: u64,
    /// The four PDPTE registers (PAE paging only), as loaded by
    /// [`super::guest_walk::load_pdptrs`] at the last MOV to CR3.
    pub pdptrs: [u64; 4],
    /// CR0.WP: supervisor writes honour R/W.
    pub cr0_wp: bool,
    /// CR4.PSE: 4 MiB pages in 32-bit paging.
    pub cr4_pse: bool,
    /// CR4.SMEP: supervisor fetches from user-mode addresses fault.
    pub cr4_smep: bool,
    /// CR4.SMAP: supervisor data accesses to user-mode addresses fault
    /// unless explicit with EFLAGS.AC = 1.
    pub cr4_smap: bool,
    /// IA32_EFER.NXE: the XD bit (not in 32-bit paging).
    pub efer_nxe: bool,
    /// EFLAGS.AC at the time of the access.
    pub eflags_ac: bool,
}

impl GuestCpu {
    /// A CPU in `mode` with root `cr3`, CR0.WP and EFER.NXE set, the rest clear.
    pub fn new(mode: GuestMode, cr3: u64) -> Self {
        Self {
            mode,
            cr3,
            pdptrs: [0; 4],
            cr0_wp: true,
            cr4_pse: true,
            cr4_smep: false,
            cr4_smap: false,
            efer_nxe: true,
            eflags_ac: false,
        }
    }

    /// Whether entries have an XD bit (SDM §4.6: PAE, 4-level or 5-level
    /// paging with IA32_EFER.NXE = 1).
    pub fn has_xd(&self) -> bool {
        self.mode != GuestMode::Bits32 && self.efer_nxe
    }
}

/// The kind of an access.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccessOp {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes an access (SDM §4.6: "supervisor-mode" and "user-mode" accesses).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Privilege {
    /// CPL = 3, not an implicit supervisor access.
    User,
    /// An explicit access at CPL < 3.
    Supervisor,
    /// An implicit supervisor access (GDT, IDT, TSS, ... at any CPL): SMAP
    /// applies whatever EFLAGS.AC says.
    ImplicitSupervisor,
}

/// One access: what and by whom.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AccessKind {
    /// Read, write or fetch.
    pub op: AccessOp,
    /// User or supervisor.
    pub privilege: Privilege,
}

impl AccessKind {
    /// A user-mode access.
    pub const fn user(op: AccessOp) -> Self {
        Self { op, privilege: Privilege::User }
    }

    /// An explicit supervisor-mode access.
    pub const fn supervisor(op: AccessOp) -> Self {
        Self { op, privilege: Privilege::Supervisor }
    }

    /// Whether it is a user-mode access.
    pub fn is_user(&self) -> bool {
        self.privilege == Privilege::User
    }
}

bitflags::bitflags! {
    /// What a translation permits: the combination over every entry of the
    /// walk (SDM §4.6: a user-mode address has U/S = 1 everywhere, a
    /// writable one R/W = 1 everywhere, an executable one XD = 0 everywhere).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct PteAccess: u8 {
        /// R/W = 1 in every entry.
        const WRITE = 1 << 0;
        /// U/S = 1 in every entry: a user-mode address.
        const USER = 1 << 1;
        /// XD = 0 in every entry (always, without XD).
        const EXEC = 1 << 2;
    }
}

impl PteAccess {
    /// What one entry grants.
    #[inline]
    pub fn of_entry(e: u64, has_xd: bool) -> Self {
        // Without branches (a walk asks once a level): R/W (bit 1) and U/S
        // (bit 2) shift down onto WRITE and USER; EXEC unless XD counts.
        const _: () =
            assert!(RW >> 1 == PteAccess::WRITE.bits() as u64 && US >> 1 == PteAccess::USER.bits() as u64);
        let no_exec = u8::from(has_xd & (e & XD != 0));
        PteAccess::from_bits_retain(((e & (RW | US)) >> 1) as u8 | ((no_exec ^ 1) << 2))
    }
}

bitflags::bitflags! {
    /// The page-fault error code (SDM Vol. 3A §4.7, Figure 4-12).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct PfErrorCode: u32 {
        /// Bit 0 (P): 0 = a not-present page; 1 = a protection violation
        /// (access rights or a reserved bit).
        const PRESENT = 1 << 0;
        /// Bit 1 (W/R): the access was a write.
        const WRITE = 1 << 1;
        /// Bit 2 (U/S): the access was a user-mode access.
        const USER = 1 << 2;
        /// Bit 3 (RSVD): a reserved bit was set in some paging-structure entry.
        const RSVD = 1 << 3;
        /// Bit 4 (I/D): an instruction fetch, reported only with CR4.SMEP = 1
        /// or with PAE/4-level/5-level paging and IA32_EFER.NXE = 1.
        const FETCH = 1 << 4;
    }
}

impl PfErrorCode {
    /// The error code for a fault of `kind` (not-present: `present` false).
    pub fn for_access(cpu: &GuestCpu, access: AccessKind, present: bool, rsvd: bool) -> Self {
        let mut code = PfErrorCode::empty();
        code.set(PfErrorCode::PRESENT, present || rsvd);
        code.set(PfErrorCode::WRITE, access.op == AccessOp::Write);
        code.set(PfErrorCode::USER, access.is_user());
        code.set(PfErrorCode::RSVD, rsvd);
        code.set(PfErrorCode::FETCH, access.op == AccessOp::Fetch && (cpu.cr4_smep || cpu.has_xd()));
        code
    }
}

/// Whether a translation that permits `allowed` allows `access` under the
/// controls of `cpu` (SDM §4.6.1, protection keys not modelled: CR4.PKE = 0).
pub fn permits(cpu: &GuestCpu, allowed: PteAccess, access: AccessKind) -> bool {
    let user_addr = allowed.contains(PteAccess::USER);
    // SMAP (SDM §4.6.1): a supervisor data access to a user-mode address is
    // refused unless it is explicit with EFLAGS.AC = 1.
    let smap_ok = |implicit: bool| !(user_addr && cpu.cr4_smap && (implicit || !cpu.eflags_ac));
    match (access.op, access.privilege) {
        (AccessOp::Read, Privilege::User) => user_addr,
        (AccessOp::Write, Privilege::User) => user_addr && allowed.contains(PteAccess::WRITE),
        (AccessOp::Fetch, Privilege::User) => user_addr && allowed.contains(PteAccess::EXEC),
        (AccessOp::Read, p) => smap_ok(p == Privilege::ImplicitSupervisor),
        (AccessOp::Write, p) => {
            smap_ok(p == Privilege::ImplicitSupervisor) && (!cpu.cr0_wp || allowed.contains(PteAccess::WRITE))
        }
        (AccessOp::Fetch, _) => allowed.contains(PteAccess::EXEC) && !(user_addr && cpu.cr4_smep),
    }
}

/// A paging mode, as the walker needs it. Levels are numbered as in the SDM's
/// tables: 1 is the page table.
pub trait PagingMode {
    /// The mode.
    const MODE: GuestMode;
    /// Bytes per entry.
    const ENTRY_BYTES: u64;
    /// Linear-address bits each level translates (10 or 9).
    const INDEX_BITS: u32;
    /// Linear-address bits translated (32, 48 or 57).
    const VA_BITS: u32;

    /// The index into the table of `level` that translates `va`.
    #[inline]
    fn index(va: u64, level: u8) -> usize {
        ((va >> Self::level_shift(level)) & ((1 << Self::INDEX_BITS) - 1)) as usize
    }

    /// log2 of the bytes one entry of `level` maps.
    #[inline]
    fn level_shift(level: u8) -> u32 {
        12 + Self::INDEX_BITS * (level as u32 - 1)
    }

    /// Whether a present entry at `level` maps a page.
    fn is_leaf(e: u64, level: u8, cpu: &GuestCpu, feat: &CpuFeatures) -> bool;

    /// The bits reserved in a present entry at `level` whose bit 7 (PS, or
    /// PAT in a PTE) is `ps`, under `cpu`'s controls: the entry has a reserved
    /// bit set exactly when it has one of these. Where bit 7 itself is
    /// reserved (a PML4E, a 1 GiB page without 1 GiB-page support), every
    /// bit is. Below the root (the PAE PDPTEs apart), an entry with bit 7
    /// clear has the same reserved bits at every level: the walker computes
    /// that mask once a walk.
    fn reserved_bits(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64;

    /// Whether a present entry at `level` has a reserved bit set.
    #[inline]
    fn is_reserved(e: u64, level: u8, cpu: &GuestCpu, feat: &CpuFeatures) -> bool {
        e & Self::reserved_bits(level, e & PS != 0, cpu, feat) != 0
    }

    /// The physical address of the table a present non-leaf entry points to.
    fn table_addr(e: u64, feat: &CpuFeatures) -> u64;

    /// The physical address of the page a leaf at `level` maps.
    fn page_addr(e: u64, level: u8, feat: &CpuFeatures) -> u64;

    /// The physical address of the root table (not used for PAE, whose root
    /// is the PDPTE registers).
    fn root_addr(cr3: u64, feat: &CpuFeatures) -> u64;

    /// The linear address is one the mode translates: below 4 GiB for 32-bit
    /// and PAE paging (the caller truncates), canonical for 4- and 5-level
    /// (SDM §4.5: bits 63:48 or 63:57 copy bit 47 or 56).
    fn va_ok(va: u64) -> bool {
        let top = (va as i64) >> (Self::VA_BITS - 1);
        if Self::VA_BITS == 32 {
            va >> 32 == 0
        } else {
            top == 0 || top == -1
        }
    }
}

/// 32-bit paging (SDM §4.3).
#[derive(Clone, Copy, Debug)]
pub enum Bits32 {}
/// PAE paging (SDM §4.4).
#[derive(Clone, Copy, Debug)]
pub enum Pae {}
/// 4-level paging (SDM §4.5).
#[derive(Clone, Copy, Debug)]
pub enum Level4 {}
/// 5-level paging (SDM §4.5).
#[derive(Clone, Copy, Debug)]
pub enum Level5 {}

/// Bits `hi:lo` set.
const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
}

impl PagingMode for Bits32 {
    const MODE: GuestMode = GuestMode::Bits32;
    const ENTRY_BYTES: u64 = 4;
    const INDEX_BITS: u32 = 10;
    const VA_BITS: u32 = 32;

    fn is_leaf(e: u64, level: u8, cpu: &GuestCpu, _: &CpuFeatures) -> bool {
        // Bit 7 of a PDE is ignored without CR4.PSE (Table 4-5).
        level == 1 || (cpu.cr4_pse && e & PS != 0)
    }

    #[inline]
    fn reserved_bits(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64 {
        // Only a 4 MiB PDE has reserved bits: 21:(M-19) (Table 4-4).
        if level == 2 && cpu.cr4_pse && ps {
            bits(21, feat.pse_width() - 19)
        } else {
            0
        }
    }

    fn table_addr(e: u64, _: &CpuFeatures) -> u64 {
        e & bits(31, 12)
    }

    fn page_addr(e: u64, level: u8, feat: &CpuFeatures) -> u64 {
        if level == 1 {
            return e & bits(31, 12);
        }
        // Bits 31:22 of the address, and with PSE-36 bits (M-1):32 from
        // entry bits (M-20):13 (Table 4-4).
        let m = feat.pse_width();
        let high = if m > 32 { (e >> 13) & ((1 << (m - 32)) - 1) } else { 0 };
        (e & bits(31, 22)) | (high << 32)
    }

    fn root_addr(cr3: u64, _: &CpuFeatures) -> u64 {
        cr3 & bits(31, 12)
    }
}

/// Reserved bits of PAE, 4-level and 5-level entries below the root (PAE
/// PDPTEs excepted): bits 51:MAXPHYADDR, XD without IA32_EFER.NXE, and by
/// level and PS.
#[inline]
fn reserved_64(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64 {
    let base = feat.phys_width.reserved_mask() | if cpu.efer_nxe { 0 } else { XD };
    if !ps {
        return base;
    }
    match level {
        // PS is reserved in a PML4E and a PML5E (Tables 4-14, 4-15).
        4 | 5 => u64::MAX,
        // A 1 GiB page: bits 29:13 (Table 4-16), and PS itself without 1 GiB pages.
        3 if !feat.page_1g => u64::MAX,
        3 => base | bits(29, 13),
        // A 2 MiB page: bits 20:13 (Tables 4-9, 4-18).
        2 => base | bits(20, 13),
        // Bit 7 of a PTE is PAT.
        _ => base,
    }
}

fn page_addr_64(e: u64, level: u8, feat: &CpuFeatures) -> u64 {
    let shift = 12 + 9 * (level as u32 - 1);
    e & feat.phys_width.addr_mask() & !((1u64 << shift) - 1)
}

impl PagingMode for Pae {
    const MODE: GuestMode = GuestMode::Pae;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;
    const VA_BITS: u32 = 32;

    fn is_leaf(e: u64, level: u8, _: &GuestCpu, _: &CpuFeatures) -> bool {
        level == 1 || (level == 2 && e & PS != 0)
    }

    #[inline]
    fn reserved_bits(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64 {
        if level == 3 {
            return pdpte_reserved_bits(feat);
        }
        reserved_64(level, ps, cpu, feat)
    }

    fn table_addr(e: u64, feat: &CpuFeatures) -> u64 {
        e & feat.phys_width.addr_mask()
    }

    fn page_addr(e: u64, level: u8, feat: &CpuFeatures) -> u64 {
        page_addr_64(e, level, feat)
    }

    fn root_addr(cr3: u64, _: &CpuFeatures) -> u64 {
        // The PDPT is 32-byte aligned: CR3 bits 31:5 (SDM §4.4.1).
        cr3 & bits(31, 5)
    }
}

/// Reserved bits of a present PAE PDPTE: 2:1, 8:5 and 63:MAXPHYADDR (Table 4-8).
#[inline]
fn pdpte_reserved_bits(feat: &CpuFeatures) -> u64 {
    let high = !((1u64 << feat.phys_width.bits()) - 1);
    bits(2, 1) | bits(8, 5) | high
}

/// Whether a present PAE PDPTE has a reserved bit set (Table 4-8).
pub fn pdpte_reserved(e: u64, feat: &CpuFeatures) -> bool {
    e & pdpte_reserved_bits(feat) != 0
}

impl PagingMode for Level4 {
    const MODE: GuestMode = GuestMode::Four;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;
    const VA_BITS: u32 = 48;

    fn is_leaf(e: u64, level: u8, _: &GuestCpu, _: &CpuFeatures) -> bool {
        level == 1 || ((level == 2 || level == 3) && e & PS != 0)
    }

    #[inline]
    fn reserved_bits(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64 {
        reserved_64(level, ps, cpu, feat)
    }

    fn table_addr(e: u64, feat: &CpuFeatures) -> u64 {
        e & feat.phys_width.addr_mask()
    }

    fn page_addr(e: u64, level: u8, feat: &CpuFeatures) -> u64 {
        page_addr_64(e, level, feat)
    }

    fn root_addr(cr3: u64, feat: &CpuFeatures) -> u64 {
        cr3 & feat.phys_width.addr_mask()
    }
}

impl PagingMode for Level5 {
    const MODE: GuestMode = GuestMode::Five;
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;
    const VA_BITS: u32 = 57;

    // Entries are 4-level entries; a fifth level only widens the address.
    fn is_leaf(e: u64, level: u8, cpu: &GuestCpu, feat: &CpuFeatures) -> bool {
        Level4::is_leaf(e, level, cpu, feat)
    }

    #[inline]
    fn reserved_bits(level: u8, ps: bool, cpu: &GuestCpu, feat: &CpuFeatures) -> u64 {
        Level4::reserved_bits(level, ps, cpu, feat)
    }

    fn table_addr(e: u64, feat: &CpuFeatures) -> u64 {
        Level4::table_addr(e, feat)
    }

    fn page_addr(e: u64, level: u8, feat: &CpuFeatures) -> u64 {
        Level4::page_addr(e, level, feat)
    }

    fn root_addr(cr3: u64, feat: &CpuFeatures) -> u64 {
        Level4::root_addr(cr3, feat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feat() -> CpuFeatures {
        CpuFeatures::typical()
    }

    #[test]
    fn pse36_page_address_takes_bits_m_minus_20_to_13() {
        let f = CpuFeatures { phys_width: PhysAddrWidth::new(40).unwrap(), ..feat() };
        // PA bits 39:32 = 0xab from entry bits 20:13.
        let e = 0x4080_0000 | (0xab << 13) | PS | P;
        assert_eq!(Bits32::page_addr(e, 2, &f), 0xab_4080_0000);
        let cpu = GuestCpu::new(GuestMode::Bits32, 0);
        assert!(!Bits32::is_reserved(e, 2, &cpu, &f));
        assert!(Bits32::is_reserved(e | 1 << 21, 2, &cpu, &f));
        let f36 = CpuFeatures { phys_width: PhysAddrWidth::new(36).unwrap(), ..f };
        assert!(Bits32::is_reserved(e, 2, &cpu, &f36), "bits 21:17 are reserved at M = 36");
        let no36 = CpuFeatures { pse36: false, ..f };
        assert!(Bits32::is_reserved(P | PS | 1 << 13, 2, &cpu, &no36));
        let nopse = GuestCpu { cr4_pse: false, ..cpu };
        assert!(!Bits32::is_leaf(e, 2, &nopse, &f) && !Bits32::is_reserved(e | 1 << 21, 2, &nopse, &f));
    }

    /// Every level of `P` from 1 to `top` has the reserved bits of level 1
    /// for an entry with bit 7 clear, under every control the walker sees.
    fn plain_mask_is_level_independent<P: PagingMode>(mode: GuestMode, top: u8) {
        for width in [36, 40, 46, 52] {
            for (pse36, page_1g, nxe, pse) in [(true, true, true, true), (false, false, false, false)] {
                let f = CpuFeatures { phys_width: PhysAddrWidth::new(width).unwrap(), pse36, page_1g };
                let cpu = GuestCpu { efer_nxe: nxe, cr4_pse: pse, ..GuestCpu::new(mode, 0) };
                let plain = P::reserved_bits(1, false, &cpu, &f);
                for level in 1..=top {
                    assert_eq!(
                        P::reserved_bits(level, false, &cpu, &f),
                        plain,
                        "{mode:?} level {level} M={width}"
                    );
                }
            }
        }
    }

    #[test]
    fn entries_without_bit_7_have_one_reserved_mask_at_every_walked_level() {
        // The walker checks such entries at every level with one mask.
        plain_mask_is_level_independent::<Bits32>(GuestMode::Bits32, 2);
        plain_mask_is_level_independent::<Pae>(GuestMode::Pae, 2);
        plain_mask_is_level_independent::<Level4>(GuestMode::Four, 4);
        plain_mask_is_level_independent::<Level5>(GuestMode::Five, 5);
    }

    #[test]
    fn reserved_bits_of_64_bit_entries_follow_the_sdm_tables() {
        let f = feat();
        let cpu = GuestCpu::new(GuestMode::Four, 0);
        assert!(Level4::is_reserved(P | PS, 4, &cpu, &f));
        assert!(Level4::is_reserved(P | 1 << 46, 1, &cpu, &f), "bit MAXPHYADDR");
        assert!(!Level4::is_reserved(P | 1 << 45, 1, &cpu, &f));
        assert!(!Level4::is_reserved(P | 1 << 52, 1, &cpu, &f), "bits 58:52 are ignored");
        assert!(Level4::is_reserved(P | XD, 1, &GuestCpu { efer_nxe: false, ..cpu }, &f));
        assert!(Level4::is_reserved(P | PS | 1 << 13, 3, &cpu, &f));
        assert!(!Level4::is_reserved(P | PS | 1 << 12, 3, &cpu, &f), "PAT of a 1 GiB page");
        assert!(Level4::is_reserved(P | PS, 3, &cpu, &CpuFeatures { page_1g: false, ..f }));
        assert!(Level4::is_reserved(P | PS | 1 << 20, 2, &cpu, &f));
        assert!(pdpte_reserved(P | RW, &f) && pdpte_reserved(P | A, &f) && pdpte_reserved(P | XD, &f));
        assert!(!pdpte_reserved(P | 0x18 | 0xe00, &f));
    }

    #[test]
    fn error_code_reports_fetch_only_with_smep_or_nx() {
        let mut cpu = GuestCpu::new(GuestMode::Bits32, 0);
        let fetch = AccessKind::user(AccessOp::Fetch);
        assert_eq!(PfErrorCode::for_access(&cpu, fetch, false, false), PfErrorCode::USER);
        cpu.cr4_smep = true;
        assert_eq!(PfErrorCode::for_access(&cpu, fetch, true, false).bits(), 0x15);
        let pae = GuestCpu::new(GuestMode::Pae, 0);
        assert_eq!(PfErrorCode::for_access(&pae, fetch, false, false).bits(), 0x14);
        let w = AccessKind::supervisor(AccessOp::Write);
        assert_eq!(PfErrorCode::for_access(&pae, w, false, true).bits(), 0x0b);
    }

    #[test]
    fn permission_rules_of_sdm_4_6() {
        let mut cpu = GuestCpu::new(GuestMode::Four, 0);
        let ro_user = PteAccess::USER | PteAccess::EXEC;
        let sw = AccessKind::supervisor(AccessOp::Write);
        assert!(!permits(&cpu, ro_user, sw));
        cpu.cr0_wp = false;
        assert!(permits(&cpu, ro_user, sw));
        cpu.cr4_smap = true;
        assert!(!permits(&cpu, ro_user, sw));
        cpu.eflags_ac = true;
        assert!(permits(&cpu, ro_user, sw));
        let implicit = AccessKind { op: AccessOp::Read, privilege: Privilege::ImplicitSupervisor };
        assert!(!permits(&cpu, ro_user, implicit));
        cpu.cr4_smep = true;
        assert!(!permits(&cpu, ro_user, AccessKind::supervisor(AccessOp::Fetch)));
        assert!(permits(&cpu, PteAccess::EXEC, AccessKind::supervisor(AccessOp::Fetch)));
        assert!(!permits(&cpu, PteAccess::EXEC | PteAccess::WRITE, AccessKind::user(AccessOp::Read)));
        assert!(!permits(&cpu, PteAccess::USER, AccessKind::user(AccessOp::Fetch)));
        assert!(Level4::va_ok(0xffff_8000_0000_0000) && !Level4::va_ok(0x0000_8000_0000_0000));
        assert!(Level5::va_ok(0x00ff_ffff_ffff_ffff) && !Level5::va_ok(0x0100_0000_0000_0000));
        assert!(Bits32::va_ok(0xffff_ffff) && !Pae::va_ok(1 << 32));
    }
}
