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
//!
//! Every access is a user access, which is right for nested paging (EPT and
//! NPT have no supervisor/user distinction of their own). It therefore cannot
//! play the CPU on shadow tables for supervisor accesses, CR0.WP, SMEP or SMAP:
//! shadow paging walks with its own walker (`shadow::guest_walk`, generic over
//! the paging mode), and the shadow differential test checks the two agree on
//! every user access of 4- and 5-level shadow tables walked as `Npt` tables.

use core::sync::atomic::Ordering;

use mmu_generic::addr::{Gpa, Pfn};

use crate::exit::{NestedExit, Origin};
use crate::format::{level_index, Access, PageSize, TdpFormat, WalkFault, WalkLength};
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
    // With the walk length a constant, the levels unroll into straight-line
    // code.
    match format.walk_length() {
        WalkLength::Four => translate_at::<4, F, M>(format, mem, root, gpa, access, origin),
        WalkLength::Five => translate_at::<5, F, M>(format, mem, root, gpa, access, origin),
    }
}

/// [`translate`] for a walk of `TOP` levels.
#[inline(always)]
fn translate_at<const TOP: u8, F: TdpFormat, M: FrameMemory>(
    format: &F,
    mem: &M,
    root: Pfn,
    gpa: Gpa,
    access: Access,
    origin: Origin,
) -> Result<Translation, WalkError> {
    let access = format.effective_access(access, origin);
    let fault = |fault| WalkError::Exit { fault, exit: format.exit_for(fault, access, origin) };
    let gfn = gpa.gfn().0;
    let walk = format.walk_length();
    debug_assert_eq!(walk.levels(), TOP);
    if !walk.covers(gfn) {
        return Err(fault(WalkFault::AddressTooWide));
    }
    let a = format.accessed_mask();
    let d = if access.contains(Access::WRITE) { format.dirty_mask() } else { 0 };
    'restart: loop {
        // (table, index, entry) of every level used, root first at
        // `used[levels - 1]`; only `used[level - 1..]` is meaningful.
        let root_table = mem.table_at(root).ok_or(WalkError::NotTableMemory(root))?;
        let mut used: [(&Table, usize, u64); 5] = [(root_table, 0, 0); 5];
        // Whether an entry used lacks the accessed bit (the common case after
        // the first walk is that none does, and nothing is written).
        let mut lacks_a = false;
        let mut table = root_table;
        let mut allowed = Access::all();
        let mut level = TOP;
        let (leaf, size) = loop {
            let idx = level_index(gfn, level);
            let e = table[idx].load(Ordering::Acquire);
            used[level as usize - 1] = (table, idx, e);
            if !format.is_present(e) {
                return Err(fault(WalkFault::NotPresent { level }));
            }
            if format.is_reserved(e, level) {
                return Err(fault(WalkFault::Reserved { level }));
            }
            allowed &= format.entry_rights(e, level);
            lacks_a |= e & a != a;
            if level == 1 || format.is_leaf(e, level) {
                break (e, PageSize::at_level(level).expect("leaves exist at levels 1 to 3 only"));
            }
            let next = format.entry_pfn(e, level);
            table = mem.table_at(next).ok_or(WalkError::NotTableMemory(next))?;
            level -= 1;
        };
        if !allowed.contains(access) {
            return Err(fault(WalkFault::Permission { allowed }));
        }
        if lacks_a || leaf & d != d {
            for l in (level as usize - 1..TOP as usize).rev() {
                let (table, idx, e) = used[l];
                let set = if l + 1 == level as usize { a | d } else { a };
                if e & set != set
                    && table[idx].compare_exchange(e, e | set, Ordering::AcqRel, Ordering::Acquire).is_err()
                {
                    continue 'restart;
                }
            }
        }
        let offset = gpa.0 & (size.bytes() - 1);
        let hpa = (format.entry_pfn(leaf, level).0 << 12) + offset;
        return Ok(Translation { hpa, size, allowed });
    }
}
