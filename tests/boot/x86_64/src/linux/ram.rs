//! Guest RAM as the host sees it: one memslot at guest-physical 0 backed by one physically
//! contiguous, identity-mapped host block (2 MiB-aligned, so the nested MMU may map it with
//! 2 MiB leaves). Accesses are bounds-checked: a guest-chosen address outside RAM is an
//! error, never a stray host access.

/// An access outside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRam {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u64,
}

/// Guest RAM.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam {
    /// Host address of guest-physical 0.
    pub hva: u64,
    /// Size in bytes.
    pub bytes: u64,
}

impl GuestRam {
    fn check(&self, gpa: u64, len: u64) -> Result<u64, OutOfRam> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(self.hva + gpa),
            _ => Err(OutOfRam { gpa, len }),
        }
    }

    /// Copies `data` to guest-physical `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutOfRam> {
        let dst = self.check(gpa, data.len() as u64)?;
        // SAFETY: `check` keeps the range inside the guest's host block, identity-mapped RAM
        // owned by this VMM; the guest is not running while the VMM writes.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len()) };
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with zeros.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), OutOfRam> {
        let dst = self.check(gpa, len)?;
        // SAFETY: as in `write`.
        unsafe { core::ptr::write_bytes(dst as *mut u8, 0, len as usize) };
        Ok(())
    }

    /// Reads `N` bytes at `gpa`.
    pub fn read<const N: usize>(&self, gpa: u64) -> Result<[u8; N], OutOfRam> {
        let src = self.check(gpa, N as u64)?;
        let mut out = [0u8; N];
        // SAFETY: as in `write` (a read of the guest's block).
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), N) };
        Ok(out)
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, OutOfRam> {
        self.read::<8>(gpa).map(u64::from_le_bytes)
    }

    /// The 4 KiB page `gfn` as host memory (for the migration copy).
    pub fn page(&self, gfn: u64) -> Result<&[u8], OutOfRam> {
        let src = self.check(gfn << 12, 4096)?;
        // SAFETY: as in `read`; the guest runs on this CPU only inside the VMM's VMRUN, so
        // the page does not change while the VMM holds the slice.
        Ok(unsafe { core::slice::from_raw_parts(src as *const u8, 4096) })
    }
}
