//! AMD nested paging (NPT): long-mode page-table entries walked from `nCR3`
//! with the host's paging rules (APM Vol. 2 §15.25.5 "Nested Table Walk").

use mmu_generic::addr::Pfn;

use super::{Access, PageSize, PhysAddrWidth, TdpFormat, WalkFault, WalkLength};
use crate::exit::{NestedExit, NpfErrorCode, Origin};

bitflags::bitflags! {
    /// A long-mode paging-structure entry, also the nested (NPT) entry
    /// (APM Vol. 2 §5.4.1 "Field Definitions"; SDM Vol. 3A §4.5, the 4-level
    /// and 5-level entry-format tables).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct PteFlags: u64 {
        /// Bit 0 (P): present (APM §5.4.1).
        const PRESENT = 1 << 0;
        /// Bit 1 (R/W): writes allowed in the region the entry controls (APM §5.4.1, §5.6).
        const WRITABLE = 1 << 1;
        /// Bit 2 (U/S): user accesses allowed (APM §5.4.1, §5.6). Every nested
        /// access is a user access, so nested entries need it (APM §15.25.5).
        const USER = 1 << 2;
        /// Bit 3 (PWT): page-level write-through (APM §5.4.1, §7.7.3).
        const WRITE_THROUGH = 1 << 3;
        /// Bit 4 (PCD): page-level cache disable (APM §5.4.1, §7.7.3).
        const CACHE_DISABLE = 1 << 4;
        /// Bit 5 (A): accessed, set by the processor in every entry it uses
        /// (APM §5.4.1, §5.4.2).
        const ACCESSED = 1 << 5;
        /// Bit 6 (D): dirty, set by the processor in a leaf on a write (APM §5.4.1, §5.4.2).
        const DIRTY = 1 << 6;
        /// Bit 7 (PS) of a PDE or PDPE: the entry maps a 2 MiB / 1 GiB page
        /// (APM §5.4.1); must be zero in a PML4E and PML5E.
        const PAGE_SIZE = 1 << 7;
        /// Bit 7 (PAT) of a 4 KiB PTE: the high bit of the PAT index (APM §7.8.2).
        const PAT_4K = 1 << 7;
        /// Bit 8 (G): global, for leaves (APM §5.4.1; ignored in nested walks).
        const GLOBAL = 1 << 8;
        /// Bit 12 (PAT) of a 2 MiB or 1 GiB leaf (APM §7.8.2).
        const PAT_LARGE = 1 << 12;
        /// Bit 63 (NX): no instruction fetches, with EFER.NXE; reserved
        /// otherwise (APM §5.4.1, §5.6.1).
        const NO_EXECUTE = 1 << 63;
    }
}

/// The nested-paging format with the host's paging configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Npt {
    /// 4-level (PML4 root) or 5-level (host CR4.LA57).
    pub walk: WalkLength,
    /// MAXPHYADDR.
    pub width: PhysAddrWidth,
    /// Host EFER.NXE: bit 63 is the no-execute bit; without it bit 63 is
    /// reserved and every page is executable.
    pub nxe: bool,
    /// CPUID Fn8000_0001_EDX\[Page1GB\]: 1 GiB pages.
    pub page_1g: bool,
}

impl Npt {
    /// A nested format with NX and 1 GiB pages.
    pub const fn new(walk: WalkLength, width: PhysAddrWidth) -> Self {
        Self { walk, width, nxe: true, page_1g: true }
    }
}

const P: u64 = PteFlags::PRESENT.bits();
const RW: u64 = PteFlags::WRITABLE.bits();
const US: u64 = PteFlags::USER.bits();
const PS: u64 = PteFlags::PAGE_SIZE.bits();
const NX: u64 = PteFlags::NO_EXECUTE.bits();

impl Npt {
    fn leaf_mask(&self, e: u64, level: u8) -> u64 {
        if level >= 2 && e & PS != 0 {
            // A huge leaf's address starts at its size; bit 12 is PAT.
            self.width.addr_mask() & !((1u64 << super::level_shift(level)) - 1)
        } else {
            self.width.addr_mask()
        }
    }

    fn rights(&self, e: u64) -> Access {
        let mut a = Access::READ;
        a.set(Access::WRITE, e & RW != 0);
        a.set(Access::EXEC, !self.nxe || e & NX == 0);
        a
    }
}

impl TdpFormat for Npt {
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
        PteFlags::ACCESSED.bits()
    }

    fn dirty_mask(&self) -> u64 {
        PteFlags::DIRTY.bits()
    }

    #[inline]
    fn is_present(&self, e: u64) -> bool {
        e & P != 0
    }

    #[inline]
    fn is_leaf(&self, e: u64, level: u8) -> bool {
        level == 1 || ((level == 2 || level == 3) && e & PS != 0)
    }

    fn table_entry(&self, table: Pfn) -> u64 {
        (table.0 << 12) | P | RW | US
    }

    fn leaf_entry(&self, pfn: Pfn, size: PageSize, access: Access) -> u64 {
        let mut e = (pfn.0 << 12) | P | US;
        if access.contains(Access::WRITE) {
            e |= RW;
        }
        if self.nxe && !access.contains(Access::EXEC) {
            e |= NX;
        }
        if size != PageSize::Size4K {
            e |= PS;
        }
        e
    }

    #[inline]
    fn entry_pfn(&self, e: u64, level: u8) -> Pfn {
        Pfn((e & self.leaf_mask(e, level)) >> 12)
    }

    #[inline]
    fn leaf_access(&self, e: u64) -> Access {
        self.rights(e)
    }

    fn with_leaf_access(&self, e: u64, access: Access) -> u64 {
        let mut e = e & !RW;
        if access.contains(Access::WRITE) {
            e |= RW;
        }
        if self.nxe {
            e &= !NX;
            if !access.contains(Access::EXEC) {
                e |= NX;
            }
        }
        e
    }

    fn split_child(&self, huge: u64, size: PageSize, i: usize) -> u64 {
        let child = size.smaller().expect("only huge leaves are split");
        let pfn = self.entry_pfn(huge, size.level()).0 + i as u64 * child.frames();
        let pat = huge & PteFlags::PAT_LARGE.bits() != 0;
        let mut e = (huge & !self.width.addr_mask()) | (pfn << 12);
        if child == PageSize::Size4K {
            // The PAT bit moves from bit 12 to bit 7, where PS was.
            e &= !PS;
            if pat {
                e |= PteFlags::PAT_4K.bits();
            }
        } else if pat {
            e |= PteFlags::PAT_LARGE.bits();
        }
        e
    }

    fn to_tracked(&self, _e: u64) -> Option<u64> {
        None
    }

    fn is_tracked(&self, _e: u64) -> bool {
        false
    }

    fn tracked_access(&self, _e: u64) -> Access {
        Access::empty()
    }

    fn with_tracked_access(&self, e: u64, _access: Access) -> u64 {
        e
    }

    fn restore_tracked(&self, e: u64) -> u64 {
        e
    }

    fn entry_rights(&self, e: u64, _level: u8) -> Access {
        // Nested accesses are user accesses: U/S = 0 denies everything.
        if e & US == 0 {
            Access::empty()
        } else {
            self.rights(e)
        }
    }

    fn is_reserved(&self, e: u64, level: u8) -> bool {
        if e & self.width.reserved_mask() != 0 || (!self.nxe && e & NX != 0) {
            return true;
        }
        if level >= 4 {
            return e & PS != 0;
        }
        if !self.is_leaf(e, level) {
            return false;
        }
        match level {
            3 => !self.page_1g || e & 0x3fff_e000 != 0, // bits 29:13 of a 1 GiB leaf
            2 => e & 0x1f_e000 != 0,                    // bits 20:13 of a 2 MiB leaf
            _ => false,
        }
    }

    fn effective_access(&self, access: Access, origin: Origin) -> Access {
        // APM §15.25.5: guest page-table accesses are treated as user writes
        // for the nested checks (the processor may set the guest's A/D bits).
        if origin == Origin::GuestPaging {
            access | Access::WRITE
        } else {
            access
        }
    }

    fn exit_for(&self, fault: WalkFault, access: Access, origin: Origin) -> NestedExit {
        let access = self.effective_access(access, origin);
        let mut code = NpfErrorCode::USER;
        match fault {
            WalkFault::NotPresent { .. } | WalkFault::AddressTooWide => {}
            WalkFault::Permission { .. } => code |= NpfErrorCode::PRESENT,
            WalkFault::Reserved { .. } => code |= NpfErrorCode::PRESENT | NpfErrorCode::RESERVED,
        }
        code.set(NpfErrorCode::WRITE, access.contains(Access::WRITE));
        code.set(NpfErrorCode::FETCH, access.contains(Access::EXEC));
        code |= match origin {
            Origin::GuestPaging => NpfErrorCode::GUEST_TABLE,
            Origin::Final | Origin::NoLinear => NpfErrorCode::FINAL_TRANSLATION,
        };
        NestedExit::Npf(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npt() -> Npt {
        Npt::new(WalkLength::Four, PhysAddrWidth::new(48).unwrap())
    }

    #[test]
    fn entry_bits_sit_where_the_apm_puts_them() {
        assert_eq!(
            [PteFlags::PRESENT, PteFlags::WRITABLE, PteFlags::USER, PteFlags::WRITE_THROUGH]
                .map(|f| f.bits()),
            [1, 2, 4, 8]
        );
        assert_eq!(PteFlags::ACCESSED.bits(), 0x20);
        assert_eq!(PteFlags::DIRTY.bits(), 0x40);
        assert_eq!(PteFlags::PAGE_SIZE.bits(), 0x80);
        assert_eq!(PteFlags::PAT_LARGE.bits(), 0x1000);
        let f = npt();
        assert_eq!(f.table_entry(Pfn(0x1234)), 0x123_4007);
        assert_eq!(f.leaf_entry(Pfn(0x1234), PageSize::Size4K, Access::READ), 0x8000_0000_0123_4005);
        assert_eq!(f.leaf_entry(Pfn(0x200), PageSize::Size2M, Access::all()), 0x20_0087);
    }

    #[test]
    fn huge_leaf_address_skips_the_pat_bit() {
        let f = npt();
        let e = f.leaf_entry(Pfn(0x400), PageSize::Size2M, Access::READ) | PteFlags::PAT_LARGE.bits();
        assert_eq!(f.entry_pfn(e, 2), Pfn(0x400));
        assert!(!f.is_reserved(e, 2));
        assert!(f.is_reserved(e | 0x2000, 2), "bit 13 of a 2 MiB leaf");
        let c = f.split_child(e, PageSize::Size2M, 5);
        assert_eq!(f.entry_pfn(c, 1), Pfn(0x405));
        assert_eq!(c & 0x80, PteFlags::PAT_4K.bits(), "PAT moved to bit 7");
        let even = f.split_child(e, PageSize::Size2M, 4);
        assert_eq!(even & 0x1080, PteFlags::PAT_4K.bits(), "bit 12 is address again");
        let g = f.leaf_entry(Pfn(0x4_0000), PageSize::Size1G, Access::READ) | PteFlags::PAT_LARGE.bits();
        let c = f.split_child(g, PageSize::Size1G, 1);
        assert_eq!(c & 0x1080, 0x1080, "a 2 MiB child keeps PS and PAT in bit 12");
        assert_eq!(f.entry_pfn(c, 2), Pfn(0x4_0200));
    }

    #[test]
    fn reserved_bits_and_user_bit_follow_the_apm() {
        let f = npt();
        let t = f.table_entry(Pfn(1));
        assert!(f.is_reserved(t | PS, 4), "PS in a PML4E");
        assert!(f.is_reserved(t | (1 << 48), 3), "address bit at MAXPHYADDR");
        assert!(Npt { nxe: false, ..f }.is_reserved(t | NX, 3), "NX without EFER.NXE");
        assert!(
            Npt { page_1g: false, ..f }.is_reserved(f.leaf_entry(Pfn(0), PageSize::Size1G, Access::READ), 3)
        );
        assert_eq!(f.entry_rights(t & !US, 3), Access::empty());
        assert_eq!(f.entry_rights(t, 3), Access::all());
    }

    #[test]
    fn npf_error_codes_are_built_bit_by_bit() {
        let f = npt();
        let np = f.exit_for(WalkFault::NotPresent { level: 4 }, Access::WRITE, Origin::Final);
        assert_eq!(np, NestedExit::Npf(NpfErrorCode::from_bits_retain(0x1_0000_0006)));
        let prot = f.exit_for(WalkFault::Permission { allowed: Access::READ }, Access::EXEC, Origin::Final);
        assert_eq!(prot, NestedExit::Npf(NpfErrorCode::from_bits_retain(0x1_0000_0015)));
        let table = f.exit_for(WalkFault::NotPresent { level: 1 }, Access::READ, Origin::GuestPaging);
        assert_eq!(table, NestedExit::Npf(NpfErrorCode::from_bits_retain(0x2_0000_0006)));
    }
}
