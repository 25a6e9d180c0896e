//! A software walker that translates a guest-physical address through nested
//! tables exactly as the processor does, so host tests can play the hardware.
//!
//! It follows SDM Vol. 3C §29.3.2 (EPT translation) and APM Vol. 2 §15.25.5
//! (nested table walk): at each level the entry must be present and free of
//! reserved bits; permissions are the AND over every level; an access that
//! the walk does not permit faults with the exit the format reports. On
//! success it sets the accessed bit in every entry used and, for a write, the
//! dirty bit in the leaf (SDM §29.3.5; APM §5.4.2), each with a
//! compare-exchange that restarts the walk if the entry changed under it, as
//! the processor's locked update does. A faulting walk sets no bit.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gpa, Pfn};

use crate::exit::{NestedExit, Origin};
use crate::format::{level_index, Access, PageSize, TdpFormat, WalkFault};
use crate::frame::{FrameMemory, Table};

/// A successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    /// The host-physical address.
    pub hpa: u64,
    /// Size of the page that mapped it.
    pub size: PageSize,
    /// What the walk permits (the AND over every level).
    pub allowed: Access,
}

impl Translation {
    /// The host frame holding the translated byte.
    pub fn pfn(&self) -> Pfn {
        Pfn(self.hpa >> 12)
    }
}

/// Why the walk did not translate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalkError {
    /// The processor would exit: the architectural cause and the exit.
    Exit {
        /// The cause.
        fault: WalkFault,
        /// The VM exit reported for it.
        exit: NestedExit,
    },
    /// An entry points to a frame that is not table memory (the processor
    /// would read whatever RAM is there; the simulation refuses).
    NotTableMemory(Pfn),
}

/// Translates `gpa` for `access` from `origin` through the tables rooted at
/// host frame `root`, setting accessed and dirty bits as the processor does.
pub fn translate<F: TdpFormat, M: FrameMemory>(
    format: &F,
    mem: &M,
    root: Pfn,
    gpa: Gpa,
    access: Access,
    origin: Origin,
) -> Result<Translation, WalkError> {
    let access = format.effective_access(access, origin);
    'restart: loop {
        let fault = |fault| WalkError::Exit { fault, exit: format.exit_for(fault, access, origin) };
        let gfn = gpa.gfn().0;
        let walk = format.walk_length();
        if !walk.covers(gfn) {
            return Err(fault(WalkFault::AddressTooWide));
        }
        // (table, index, entry) of every level used, root first.
        let mut used: [Option<(&Table, usize, u64)>; 5] = [None; 5];
        let mut table_pfn = root;
        let mut allowed = Access::all();
        let mut level = walk.levels();
        let (leaf, size) = loop {
            let frame = mem.frame_of(table_pfn).ok_or(WalkError::NotTableMemory(table_pfn))?;
            let table = mem.table(frame);
            let idx = level_index(gfn, level);
            let e = table[idx].load(Ordering::Acquire);
            used[level as usize - 1] = Some((table, idx, e));
            if !format.is_present(e) {
                return Err(fault(WalkFault::NotPresent { level }));
            }
            if format.is_reserved(e, level) {
                return Err(fault(WalkFault::Reserved { level }));
            }
            allowed &= format.entry_rights(e, level);
            if format.is_leaf(e, level) {
                break (e, PageSize::at_level(level).expect("leaves exist at levels 1 to 3 only"));
            }
            table_pfn = format.entry_pfn(e, level);
            level -= 1;
        };
        if !allowed.contains(access) {
            return Err(fault(WalkFault::Permission { allowed }));
        }
        let a = format.accessed_mask();
        let d = if access.contains(Access::WRITE) { format.dirty_mask() } else { 0 };
        for (l, slot) in used.iter().enumerate().rev() {
            let Some((table, idx, e)) = *slot else { continue };
            let set = if l + 1 == level as usize { a | d } else { a };
            if e & set != set
                && table[idx].compare_exchange(e, e | set, Ordering::AcqRel, Ordering::Acquire).is_err()
            {
                continue 'restart;
            }
        }
        let offset = gpa.0 & (size.bytes() - 1);
        let hpa = (format.entry_pfn(leaf, level).0 << 12) + offset;
        return Ok(Translation { hpa, size, allowed });
    }
}
