//! A reader of the flattened device tree skiboot hands over (devicetree
//! specification v0.4, chapter 5): the header, the memory reservation block and
//! the structure block, walked by node path.

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;

/// Why the tree cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtError {
    /// The header's magic number is wrong.
    BadMagic(u32),
    /// An offset or length points outside the blob.
    Truncated,
}

/// A flattened device tree in memory.
#[derive(Clone, Copy)]
pub struct Fdt<'a> {
    blob: &'a [u8],
    structs: usize,
    strings: usize,
    rsvmap: usize,
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// One property: its node's path components and its value.
pub struct Prop<'a> {
    /// The name of the node holding it (its last path component).
    pub node: &'a [u8],
    /// The name of its parent node.
    pub parent: &'a [u8],
    /// The property name.
    pub name: &'a [u8],
    /// The raw value.
    pub value: &'a [u8],
}

impl<'a> Fdt<'a> {
    /// Reads the header of the tree at `blob` (its first bytes; the header's
    /// `totalsize` bounds what is read).
    pub fn new(blob: &'a [u8]) -> Result<Self, FdtError> {
        let magic = be32(blob, 0).ok_or(FdtError::Truncated)?;
        if magic != MAGIC {
            return Err(FdtError::BadMagic(magic));
        }
        let total = be32(blob, 4).ok_or(FdtError::Truncated)? as usize;
        let blob = blob.get(..total).ok_or(FdtError::Truncated)?;
        let structs = be32(blob, 8).ok_or(FdtError::Truncated)? as usize;
        let strings = be32(blob, 12).ok_or(FdtError::Truncated)? as usize;
        let rsvmap = be32(blob, 16).ok_or(FdtError::Truncated)? as usize;
        Ok(Self { blob, structs, strings, rsvmap })
    }

    /// The total size in the header.
    pub fn total_size(blob_header: &[u8]) -> Option<usize> {
        (be32(blob_header, 0)? == MAGIC).then_some(be32(blob_header, 4)? as usize)
    }

    /// The memory reservation block's (address, size) pairs.
    pub fn reservations(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let blob = self.blob;
        let mut off = self.rsvmap;
        core::iter::from_fn(move || {
            let (a, s) = (be64(blob, off)?, be64(blob, off + 8)?);
            if a == 0 && s == 0 {
                return None;
            }
            off += 16;
            Some((a, s))
        })
    }

    fn string(&self, off: usize) -> &'a [u8] {
        let s = self.blob.get(self.strings + off..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        &s[..end]
    }

    /// Calls `f` with every property of the tree, in order.
    pub fn for_each_prop(&self, mut f: impl FnMut(&Prop<'a>)) {
        let b = self.blob;
        let mut off = self.structs;
        // Node names along the current path (depth limited: the tree is shallow).
        let mut path: [&'a [u8]; 16] = [&[]; 16];
        let mut depth = 0usize;
        while let Some(tok) = be32(b, off) {
            off += 4;
            match tok {
                BEGIN_NODE => {
                    let rest = b.get(off..).unwrap_or(&[]);
                    let len = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
                    if depth < path.len() {
                        path[depth] = &rest[..len];
                    }
                    depth += 1;
                    off = (off + len + 1 + 3) & !3;
                }
                END_NODE => depth = depth.saturating_sub(1),
                PROP => {
                    let (Some(len), Some(name)) = (be32(b, off), be32(b, off + 4)) else { return };
                    let start = off + 8;
                    let Some(value) = b.get(start..start + len as usize) else { return };
                    let node = if depth >= 1 && depth <= path.len() { path[depth - 1] } else { &[] };
                    let parent = if depth >= 2 && depth <= path.len() { path[depth - 2] } else { &[] };
                    f(&Prop { node, parent, name: self.string(name as usize), value });
                    off = (start + len as usize + 3) & !3;
                }
                NOP => {}
                END => return,
                _ => return,
            }
        }
    }
}

/// The node name without its unit address (`memory@0` is `memory`).
pub fn base_name(node: &[u8]) -> &[u8] {
    match node.iter().position(|&c| c == b'@') {
        Some(i) => &node[..i],
        None => node,
    }
}

/// Reads the `i`-th (address, size) pair of a `reg` with two cells each.
pub fn reg_pair(value: &[u8], i: usize) -> Option<(u64, u64)> {
    Some((be64(value, 16 * i)?, be64(value, 16 * i + 8)?))
}
