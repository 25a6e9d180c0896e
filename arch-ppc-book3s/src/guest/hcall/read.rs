//! H_READ: one entry, or the aligned four, as the guest sees them.

use crate::guest::{GuestHpt, PageResolver};
use crate::hpte::Hpte;
use crate::papr::{HptError, H_READ_4};

/// The outcome of H_READ: one or four entries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReadResult {
    /// The entries read (only the first `count` are meaningful).
    pub hptes: [Hpte; 4],
    /// 1, or 4 with H_READ_4.
    pub count: usize,
}

impl<R: PageResolver> GuestHpt<R> {
    /// aligned quad. H_PARAMETER: flags other than H_READ_4, or `ptex`
    /// outside the table.
    pub fn h_read(&self, flags: u64, ptex: u64) -> Result<ReadResult, HptError> {
        if flags & !H_READ_4 != 0 {
            return Err(HptError::Parameter);
        }
        self.in_range(ptex)?;
        let (base, count) = if flags & H_READ_4 != 0 { (ptex & !3, 4) } else { (ptex, 1) };
        let mut out = ReadResult { hptes: [Hpte::EMPTY; 4], count };
        for (i, h) in out.hptes.iter_mut().take(count).enumerate() {
            *h = self.guest_view(base + i as u64);
        }
        Ok(out)
    }
}
