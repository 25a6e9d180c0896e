//! Intel EPT: the entry, the EPTP, and the format's rules (SDM Vol. 3C §29.3).

use core::fmt;

use mmu_generic::addr::Pfn;

use super::{Access, PageSize, PhysAddrWidth, TdpFormat, WalkFault, WalkLength};
use crate::exit::{EptQualification, NestedExit, Origin};

bitflags::bitflags! {
    /// An EPT paging-structure entry (SDM Vol. 3C §29.3.2, the EPT entry
    /// formats for PML5E, PML4E, PDPTE, PDE and PTE).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct EptFlags: u64 {
        /// Bit 0: reads allowed in the region the entry controls (§29.3.2).
        const READ = 1 << 0;
        /// Bit 1: writes allowed (§29.3.2). Write without read is a
        /// misconfiguration (§29.3.3.1).
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetches allowed (supervisor-mode fetches with
        /// mode-based execute control) (§29.3.2).
        const EXECUTE = 1 << 2;
        /// Bits 5:3 of a leaf: the EPT memory type (§29.3.7, "EPT and Memory
        /// Typing"); reserved (must be 0) in non-leaf entries.
        const MEMORY_TYPE = 0b111 << 3;
        /// Bit 6 of a leaf: ignore PAT memory type (§29.3.7).
        const IGNORE_PAT = 1 << 6;
        /// Bit 7 of a PDPTE or PDE: the entry maps a 1 GiB / 2 MiB page
        /// (§29.3.2); reserved in a PML4E and PML5E, ignored in a PTE.
        const LARGE_PAGE = 1 << 7;
        /// Bit 8: accessed, set by the processor when EPTP bit 6 enables
        /// accessed and dirty flags; ignored otherwise (§29.3.5).
        const ACCESSED = 1 << 8;
        /// Bit 9 of a leaf: dirty, set by the processor on a write when EPTP
        /// bit 6 enables accessed and dirty flags; ignored otherwise (§29.3.5).
        const DIRTY = 1 << 9;
        /// Bit 10: user-mode fetches allowed, with mode-based execute control
        /// only; ignored otherwise (§29.3.2).
        const USER_EXECUTE = 1 << 10;
        /// Bit 57 of a leaf: verify guest paging, with guest-paging
        /// verification only (§29.3.2).
        const VERIFY_GUEST_PAGING = 1 << 57;
        /// Bit 58 of a leaf: paging-write access, with guest-paging
        /// verification only (§29.3.2).
        const PAGING_WRITE = 1 << 58;
        /// Bit 60 of a leaf: supervisor shadow stack, with EPTP bit 7 (§29.3.2).
        const SUPERVISOR_SHADOW_STACK = 1 << 60;
        /// Bit 61 of a PTE: sub-page write permissions (§29.3.2, §29.3.4).
        const SUB_PAGE_WRITE = 1 << 61;
        /// Bit 63 of a leaf: suppress #VE, with EPT-violation #VE enabled
        /// (§29.3.2, §26.5.7).
        const SUPPRESS_VE = 1 << 63;
    }
}

/// Bits 2:0: the permission bits; an entry is present when any is set and
/// mode-based execute control is off (§29.3.2).
const RWX: u64 = 0b111;
/// Bits 54:52 of a leaf, ignored by the processor (bits 56:52 are ignored in
/// every EPT leaf format, §29.3.2): the permissions an access-tracked leaf
/// had. A not-present entry's other bits are ignored, so the leaf keeps its
/// address and memory type in place.
const SAVED_SHIFT: u32 = 52;

/// An EPT memory type (SDM Vol. 3C §29.3.7; encodings as the MTRR types, Vol. 3A §12.11).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum EptMemoryType {
    /// 0: uncacheable.
    Uncacheable = 0,
    /// 1: write combining.
    WriteCombining = 1,
    /// 4: write through.
    WriteThrough = 4,
    /// 5: write protected.
    WriteProtected = 5,
    /// 6: write back.
    WriteBack = 6,
}

impl EptMemoryType {
    /// The type an encoding names, `None` for the reserved 2, 3 and 7.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

/// The extended-page-table pointer, a VMCS field (SDM Vol. 3C §25.6.11,
/// "Extended-Page-Table Pointer (EPTP)").
///
/// Bits 2:0 memory type used to access the tables (UC or WB), bits 5:3 the
/// page-walk length minus one, bit 6 enables accessed and dirty flags, bit 7
/// enables supervisor shadow-stack control, bits 11:8 reserved, bits
/// `MAXPHYADDR-1:12` the root table.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Eptp(u64);

/// Why an EPTP value is invalid (the VM entry would fail).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EptpError {
    /// Bits 2:0 name neither UC (0) nor WB (6).
    MemoryType(u8),
    /// Bits 5:3 name a walk of neither 4 nor 5 levels.
    WalkLength(u8),
    /// Bits 11:8 or `63:MAXPHYADDR` are not zero.
    ReservedBits(u64),
}

impl fmt::Display for EptpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MemoryType(t) => write!(f, "EPTP memory type {t} is neither UC nor WB"),
            Self::WalkLength(l) => write!(f, "EPTP page-walk length field {l} is neither 3 nor 4"),
            Self::ReservedBits(b) => write!(f, "EPTP reserved bits {b:#x} are set"),
        }
    }
}

impl Eptp {
    /// An EPTP for the root table in frame `root`.
    pub fn new(
        root: Pfn,
        memory_type: EptMemoryType,
        walk: WalkLength,
        accessed_dirty: bool,
        width: PhysAddrWidth,
    ) -> Result<Self, EptpError> {
        let raw = (root.0 << 12)
            | memory_type as u64
            | ((walk.levels() as u64 - 1) << 3)
            | ((accessed_dirty as u64) << 6);
        Self::from_raw(raw, width)
    }

    /// Checks a raw EPTP value as VM entry does (§26.2.1.1).
    pub fn from_raw(raw: u64, width: PhysAddrWidth) -> Result<Self, EptpError> {
        let mt = (raw & 0b111) as u8;
        if mt != EptMemoryType::Uncacheable as u8 && mt != EptMemoryType::WriteBack as u8 {
            return Err(EptpError::MemoryType(mt));
        }
        let wl = ((raw >> 3) & 0b111) as u8;
        if wl != 3 && wl != 4 {
            return Err(EptpError::WalkLength(wl));
        }
        let reserved = raw & (0xf00 | !((1u64 << width.bits()) - 1));
        if reserved != 0 {
            return Err(EptpError::ReservedBits(reserved));
        }
        Ok(Self(raw))
    }

    /// The raw value for the VMCS.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The root table's frame.
    pub const fn root(self) -> Pfn {
        Pfn((self.0 & !0xfff) >> 12)
    }

    /// The memory type of table accesses.
    pub fn memory_type(self) -> EptMemoryType {
        EptMemoryType::from_bits((self.0 & 0b111) as u8).expect("from_raw checked the memory type")
    }

    /// The page-walk length.
    pub const fn walk_length(self) -> WalkLength {
        if (self.0 >> 3) & 0b111 == 4 {
            WalkLength::Five
        } else {
            WalkLength::Four
        }
    }

    /// Whether accessed and dirty flags are enabled.
    pub const fn accessed_dirty(self) -> bool {
        self.0 & (1 << 6) != 0
    }
}

impl fmt::Debug for Eptp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eptp({:#x})", self.0)
    }
}

/// The EPT format with the processor's capabilities (IA32_VMX_EPT_VPID_CAP,
/// SDM Vol. 3D Appendix A.10) and the EPTP's choices.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ept {
    /// Page-walk length (EPTP bits 5:3).
    pub walk: WalkLength,
    /// MAXPHYADDR.
    pub width: PhysAddrWidth,
    /// EPTP bit 6: the processor sets A and D. Without it, ageing uses access
    /// tracking.
    pub accessed_dirty: bool,
    /// Capability bit 0: execute-only translations are allowed.
    pub execute_only: bool,
    /// Capability bit 17: 1 GiB pages.
    pub page_1g: bool,
    /// Memory type of the leaves the engine creates.
    pub leaf_memory_type: EptMemoryType,
    /// Whether leaves set ignore-PAT (the guest's PAT cannot weaken the type).
    pub ignore_pat: bool,
}

impl Ept {
    /// A 4- or 5-level EPT with A/D flags, 1 GiB pages and write-back leaves
    /// that ignore the guest PAT (what KVM uses for RAM).
    pub const fn new(walk: WalkLength, width: PhysAddrWidth, accessed_dirty: bool) -> Self {
        Self {
            walk,
            width,
            accessed_dirty,
            execute_only: true,
            page_1g: true,
            leaf_memory_type: EptMemoryType::WriteBack,
            ignore_pat: true,
        }
    }

    /// The EPTP for root table `root` (write-back table accesses).
    pub fn eptp(&self, root: Pfn) -> Result<Eptp, EptpError> {
        Eptp::new(root, EptMemoryType::WriteBack, self.walk, self.accessed_dirty, self.width)
    }
}

fn rwx(access: Access) -> u64 {
    let mut v = 0;
    if access.contains(Access::READ) {
        v |= EptFlags::READ.bits();
    }
    if access.contains(Access::WRITE) {
        v |= EptFlags::WRITE.bits();
    }
    if access.contains(Access::EXEC) {
        v |= EptFlags::EXECUTE.bits();
    }
    v
}

fn access_of(bits: u64) -> Access {
    let mut a = Access::empty();
    a.set(Access::READ, bits & EptFlags::READ.bits() != 0);
    a.set(Access::WRITE, bits & EptFlags::WRITE.bits() != 0);
    a.set(Access::EXEC, bits & EptFlags::EXECUTE.bits() != 0);
    a
}

impl TdpFormat for Ept {
    fn walk_length(&self) -> WalkLength {
        self.walk
    }

    fn phys_width(&self) -> PhysAddrWidth {
        self.width
    }

    fn largest_page(&self) -> PageSize {
        if self.page_1g {
            PageSize::Size1G
        } else {
            PageSize::Size2M
        }
    }

    fn accessed_mask(&self) -> u64 {
        if self.accessed_dirty {
            EptFlags::ACCESSED.bits()
        } else {
            0
        }
    }

    fn dirty_mask(&self) -> u64 {
        if self.accessed_dirty {
            EptFlags::DIRTY.bits()
        } else {
            0
        }
    }

    #[inline]
    fn is_present(&self, e: u64) -> bool {
        e & RWX != 0
    }

    #[inline]
    fn is_leaf(&self, e: u64, level: u8) -> bool {
        level == 1 || ((level == 2 || level == 3) && e & EptFlags::LARGE_PAGE.bits() != 0)
    }

    fn table_entry(&self, table: Pfn) -> u64 {
        (table.0 << 12) | RWX
    }

    fn leaf_entry(&self, pfn: Pfn, size: PageSize, access: Access) -> u64 {
        let mut e = (pfn.0 << 12) | rwx(access) | ((self.leaf_memory_type as u64) << 3);
        if self.ignore_pat {
            e |= EptFlags::IGNORE_PAT.bits();
        }
        if size != PageSize::Size4K {
            e |= EptFlags::LARGE_PAGE.bits();
        }
        e
    }

    #[inline]
    fn entry_pfn(&self, e: u64, level: u8) -> Pfn {
        let _ = level;
        Pfn((e & self.width.addr_mask()) >> 12)
    }

    #[inline]
    fn leaf_access(&self, e: u64) -> Access {
        access_of(e)
    }

    fn with_leaf_access(&self, e: u64, access: Access) -> u64 {
        (e & !RWX) | rwx(access)
    }

    fn split_child(&self, huge: u64, size: PageSize, i: usize) -> u64 {
        let child = size.smaller().expect("only huge leaves are split");
        let pfn = self.entry_pfn(huge, size.level()).0 + i as u64 * child.frames();
        let mut e = (huge & !self.width.addr_mask()) | (pfn << 12);
        if child == PageSize::Size4K {
            // Bit 7 is ignored in a PTE; keep the PTE canonical.
            e &= !EptFlags::LARGE_PAGE.bits();
        }
        e
    }

    fn to_tracked(&self, e: u64) -> Option<u64> {
        if self.accessed_dirty {
            return None;
        }
        Some((e & !RWX & !(RWX << SAVED_SHIFT)) | ((e & RWX) << SAVED_SHIFT))
    }

    #[inline]
    fn is_tracked(&self, e: u64) -> bool {
        !self.accessed_dirty && e & RWX == 0 && (e >> SAVED_SHIFT) & RWX != 0
    }

    fn tracked_access(&self, e: u64) -> Access {
        access_of(e >> SAVED_SHIFT)
    }

    fn with_tracked_access(&self, e: u64, access: Access) -> u64 {
        (e & !(RWX << SAVED_SHIFT)) | (rwx(access) << SAVED_SHIFT)
    }

    fn restore_tracked(&self, e: u64) -> u64 {
        (e & !(RWX << SAVED_SHIFT)) | ((e >> SAVED_SHIFT) & RWX)
    }

    #[inline]
    fn entry_rights(&self, e: u64, _level: u8) -> Access {
        access_of(e)
    }

    fn is_reserved(&self, e: u64, level: u8) -> bool {
        let perms = e & RWX;
        // §29.3.3.1: write without read; execute-only without the capability.
        if perms & 0b011 == 0b010 || (perms == 0b100 && !self.execute_only) {
            return true;
        }
        if e & self.width.reserved_mask() != 0 {
            return true;
        }
        if level >= 4 {
            // PML4E / PML5E: bits 7:3 reserved.
            return e & (0x1f << 3) != 0;
        }
        if !self.is_leaf(e, level) {
            // PDPTE / PDE referencing a table: bits 6:3 reserved.
            return e & (0xf << 3) != 0;
        }
        if level == 3 && !self.page_1g {
            return true;
        }
        let low = match level {
            3 => 0x3fff_f000, // bits 29:12 of a 1 GiB leaf
            2 => 0x1f_f000,   // bits 20:12 of a 2 MiB leaf
            _ => 0,
        };
        e & low != 0 || EptMemoryType::from_bits(((e >> 3) & 0b111) as u8).is_none()
    }

    fn effective_access(&self, access: Access, origin: Origin) -> Access {
        // §29.3.3.2: with A/D flags enabled, accesses to guest paging
        // structures are treated as writes.
        if self.accessed_dirty && origin == Origin::GuestPaging {
            access | Access::WRITE
        } else {
            access
        }
    }

    fn exit_for(&self, fault: WalkFault, access: Access, origin: Origin) -> NestedExit {
        let allowed = match fault {
            WalkFault::Reserved { .. } => return NestedExit::EptMisconfig,
            WalkFault::Permission { allowed } => allowed,
            WalkFault::NotPresent { .. } | WalkFault::AddressTooWide => Access::empty(),
        };
        let access = self.effective_access(access, origin);
        let mut q = EptQualification::empty();
        q.set(EptQualification::DATA_READ, access.contains(Access::READ));
        q.set(EptQualification::DATA_WRITE, access.contains(Access::WRITE));
        q.set(EptQualification::FETCH, access.contains(Access::EXEC));
        q.set(EptQualification::READABLE, allowed.contains(Access::READ));
        q.set(EptQualification::WRITABLE, allowed.contains(Access::WRITE));
        q.set(EptQualification::EXECUTABLE, allowed.contains(Access::EXEC));
        match origin {
            Origin::Final => q |= EptQualification::LINEAR_VALID | EptQualification::TRANSLATED,
            Origin::GuestPaging => q |= EptQualification::LINEAR_VALID,
            Origin::NoLinear => {}
        }
        NestedExit::EptViolation(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ept(ad: bool) -> Ept {
        Ept::new(WalkLength::Four, PhysAddrWidth::new(46).unwrap(), ad)
    }

    #[test]
    fn leaf_bits_sit_where_the_sdm_puts_them() {
        let f = ept(true);
        let e = f.leaf_entry(Pfn(0x12345), PageSize::Size4K, Access::READ | Access::WRITE);
        // R=bit0, W=bit1, WB (6) in bits 5:3, ignore-PAT bit 6, address at bit 12.
        assert_eq!(e, 0x1234_5000 | 0b011 | (6 << 3) | (1 << 6));
        let e = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Access::all());
        assert_eq!(e & (1 << 7), 1 << 7, "large-page bit 7");
        assert_eq!(EptFlags::ACCESSED.bits(), 1 << 8);
        assert_eq!(EptFlags::DIRTY.bits(), 1 << 9);
        assert_eq!(EptFlags::USER_EXECUTE.bits(), 1 << 10);
        assert_eq!(EptFlags::SUPPRESS_VE.bits(), 1 << 63);
        assert_eq!(f.table_entry(Pfn(7)), 0x7007);
        assert!(f.is_present(0b100) && !f.is_present(0xfff8));
    }

    #[test]
    fn misconfigurations_follow_29_3_3_1() {
        let f = Ept { execute_only: false, ..ept(false) };
        let leaf = f.leaf_entry(Pfn(1), PageSize::Size4K, Access::READ);
        assert!(!f.is_reserved(leaf, 1));
        assert!(f.is_reserved((leaf & !7) | 0b010, 1), "write-only");
        assert!(f.is_reserved((leaf & !7) | 0b110, 1), "write+execute without read");
        assert!(f.is_reserved((leaf & !7) | 0b100, 1), "execute-only without the capability");
        assert!(!ept(false).is_reserved((leaf & !7) | 0b100, 1));
        assert!(f.is_reserved(leaf | (1 << 46), 1), "address bit at MAXPHYADDR");
        assert!(f.is_reserved((leaf & !(7 << 3)) | (2 << 3), 1), "memory type 2");
        assert!(f.is_reserved((leaf & !(7 << 3)) | (7 << 3), 1), "memory type 7");
        let table = f.table_entry(Pfn(5));
        assert!(!f.is_reserved(table, 4) && !f.is_reserved(table, 2));
        assert!(f.is_reserved(table | (1 << 7), 4), "large page in a PML4E");
        assert!(f.is_reserved(table | (1 << 3), 2), "bits 6:3 of a PDE pointing to a table");
        let huge = f.leaf_entry(Pfn(0x200), PageSize::Size2M, Access::READ);
        assert!(!f.is_reserved(huge, 2));
        assert!(f.is_reserved(huge | 0x1000, 2), "bits 20:12 of a 2 MiB leaf");
        let giant = f.leaf_entry(Pfn(0x40000), PageSize::Size1G, Access::READ);
        assert!(!f.is_reserved(giant, 3));
        assert!(f.is_reserved(giant | 0x20_0000, 3), "bits 29:12 of a 1 GiB leaf");
        assert!(Ept { page_1g: false, ..f }.is_reserved(giant, 3));
    }

    #[test]
    fn eptp_encodes_and_checks_every_field() {
        let w = PhysAddrWidth::new(39).unwrap();
        let p = Eptp::new(Pfn(0x1234), EptMemoryType::WriteBack, WalkLength::Four, true, w).unwrap();
        assert_eq!(p.raw(), 0x123_4000 | 6 | (3 << 3) | (1 << 6));
        assert_eq!((p.root(), p.walk_length(), p.accessed_dirty()), (Pfn(0x1234), WalkLength::Four, true));
        assert_eq!(p.memory_type(), EptMemoryType::WriteBack);
        let p5 = Eptp::new(Pfn(1), EptMemoryType::Uncacheable, WalkLength::Five, false, w).unwrap();
        assert_eq!(p5.raw(), 0x1000 | (4 << 3));
        assert_eq!(
            Eptp::new(Pfn(1), EptMemoryType::WriteThrough, WalkLength::Four, false, w),
            Err(EptpError::MemoryType(4))
        );
        assert_eq!(Eptp::from_raw(0x1000 | 6 | (2 << 3), w), Err(EptpError::WalkLength(2)));
        assert_eq!(Eptp::from_raw(0x1000 | 6 | (3 << 3) | 0x100, w), Err(EptpError::ReservedBits(0x100)));
        assert!(Eptp::new(Pfn(1 << 27), EptMemoryType::WriteBack, WalkLength::Four, false, w).is_err());
    }

    #[test]
    fn access_tracking_saves_permissions_in_ignored_bits_and_restores_them() {
        let f = ept(false);
        let leaf = f.leaf_entry(Pfn(0x42), PageSize::Size4K, Access::READ | Access::EXEC);
        let t = f.to_tracked(leaf).unwrap();
        assert!(!f.is_present(t) && f.is_tracked(t));
        assert_eq!(f.tracked_access(t), Access::READ | Access::EXEC);
        assert_eq!(f.restore_tracked(t), leaf);
        assert_eq!(f.to_tracked(leaf).map(|t| f.entry_pfn(t, 1)), Some(Pfn(0x42)));
        assert_eq!(ept(true).to_tracked(leaf), None);
        assert!(!f.is_tracked(0));
    }

    #[test]
    fn split_children_cover_the_huge_page_in_order() {
        let f = ept(true);
        let huge = f.leaf_entry(Pfn(0x4_0000), PageSize::Size1G, Access::READ) | EptFlags::DIRTY.bits();
        let c = f.split_child(huge, PageSize::Size1G, 3);
        assert_eq!(f.entry_pfn(c, 2), Pfn(0x4_0000 + 3 * 512));
        assert!(f.is_leaf(c, 2) && c & EptFlags::DIRTY.bits() != 0);
        let small = f.split_child(c, PageSize::Size2M, 511);
        assert_eq!(f.entry_pfn(small, 1), Pfn(0x4_0000 + 3 * 512 + 511));
        assert_eq!(small & EptFlags::LARGE_PAGE.bits(), 0);
    }
}
