//! The IEEE 1275 client interface the firmware hands over in r5, and a device-tree walk
//! through it (no flattened tree is passed on pseries).
//!
//! Cells are 32-bit big-endian; every buffer passed to the firmware lives on the boot
//! stack, below 4 GiB. All calls happen before the exception vectors overwrite low
//! memory, where the firmware lives.

use crate::entry::of_call_gate;

/// Longest property or node name we accept (QEMU exceeds the 32 bytes IEEE 1275 promises).
pub const NAME_LEN: usize = 128;

/// A failed client-interface call.
#[derive(Clone, Copy, Debug)]
pub enum OfError {
    /// The firmware returned -1 for the service named.
    Failed(&'static str),
    /// The property is absent or longer than the buffer.
    NoProperty,
}

/// A package handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phandle(pub u32);

/// The client interface.
pub struct Ofw {
    entry: u64,
}

impl Ofw {
    /// Wraps the entry point passed in r5.
    ///
    /// # Safety
    /// `entry` is the firmware's client-interface entry and the firmware is still intact.
    pub unsafe fn new(entry: u64) -> Self {
        Self { entry }
    }

    /// Calls `service` (a NUL-terminated name) with `args`, returning `nret` cells.
    fn call<const R: usize>(&self, service: &'static str, args: &[u32]) -> Result<[u32; R], OfError> {
        debug_assert!(service.ends_with('\0'));
        let mut cells = [0u32; 16];
        cells[0] = service.as_ptr() as usize as u32;
        cells[1] = args.len() as u32;
        cells[2] = R as u32;
        cells[3..3 + args.len()].copy_from_slice(args);
        // SAFETY: `cells` is a valid IEEE 1275 argument array with room for the returns;
        // every pointer in it refers to memory below 4 GiB that outlives the call; the
        // firmware is intact (constructor contract).
        let rc = unsafe { of_call_gate(cells.as_mut_ptr(), self.entry) };
        if rc != 0 {
            return Err(OfError::Failed(service));
        }
        let mut out = [0u32; R];
        out.copy_from_slice(&cells[3 + args.len()..3 + args.len() + R]);
        Ok(out)
    }

    /// The root node (`peer(0)`).
    pub fn root(&self) -> Result<Phandle, OfError> {
        let [p] = self.call::<1>("peer\0", &[0])?;
        Ok(Phandle(p))
    }

    /// Next sibling of `ph`, if any.
    pub fn peer(&self, ph: Phandle) -> Result<Option<Phandle>, OfError> {
        let [p] = self.call::<1>("peer\0", &[ph.0])?;
        Ok(if p == 0 || p == u32::MAX { None } else { Some(Phandle(p)) })
    }

    /// First child of `ph`, if any.
    pub fn child(&self, ph: Phandle) -> Result<Option<Phandle>, OfError> {
        let [p] = self.call::<1>("child\0", &[ph.0])?;
        Ok(if p == 0 || p == u32::MAX { None } else { Some(Phandle(p)) })
    }

    /// Copies property `name` (NUL-terminated) of `ph` into `buf`; returns its length.
    pub fn getprop(&self, ph: Phandle, name: &[u8], buf: &mut [u8]) -> Result<usize, OfError> {
        let mut n = [0u8; NAME_LEN];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len()).min(NAME_LEN - 1);
        n[..len].copy_from_slice(&name[..len]);
        let [size] = self.call::<1>(
            "getprop\0",
            &[ph.0, n.as_ptr() as usize as u32, buf.as_mut_ptr() as usize as u32, buf.len() as u32],
        )?;
        let size = size as i32;
        if size < 0 || size as usize > buf.len() {
            return Err(OfError::NoProperty);
        }
        Ok(size as usize)
    }

    /// Name of the property after `prev` (empty for the first); `None` after the last.
    pub fn nextprop(
        &self,
        ph: Phandle,
        prev: &[u8; NAME_LEN],
        out: &mut [u8; NAME_LEN],
    ) -> Result<bool, OfError> {
        *out = [0; NAME_LEN];
        let [flag] = self.call::<1>(
            "nextprop\0",
            &[ph.0, prev.as_ptr() as usize as u32, out.as_mut_ptr() as usize as u32],
        )?;
        Ok(flag as i32 == 1)
    }
}

/// What the kernel learns from the device tree.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// log2 of the hashed page table size in bytes (`ibm,pft-size` second cell).
    pub pft_shift: u32,
    /// `ibm,segment-page-sizes` as read (cells), for the crate's parser.
    pub sps_cells: [u32; 64],
    /// How many of `sps_cells` are used.
    pub sps_len: usize,
    /// Segment sizes the processor supports (log2), from `ibm,processor-segment-sizes`.
    pub segment_shifts: [u32; 4],
    /// How many of `segment_shifts` are used.
    pub nsegment_shifts: usize,
    /// Timebase (and decrementer) frequency in Hz (`timebase-frequency`).
    pub timebase_hz: u64,
    /// Number of SLB entries (`slb-size` or `ibm,slb-size`).
    pub slb_size: u32,
    /// Total RAM from the memory nodes.
    pub ram_bytes: u64,
    /// Size of the first memory node (starts at real address 0).
    pub ram0_bytes: u64,
    /// RTAS token of `power-off`.
    pub rtas_power_off: Option<u32>,
    /// RTAS token of `ibm,os-term`.
    pub rtas_os_term: Option<u32>,
    /// Nodes visited.
    pub nodes: u32,
    /// Properties enumerated with nextprop.
    pub props: u32,
    /// `/chosen` `bootargs` (QEMU's `-append`), NUL-padded.
    pub bootargs: [u8; 64],
    /// CPU model name (first cpu node's name).
    pub cpu_name: [u8; 32],
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            pft_shift: 0,
            sps_cells: [0; 64],
            sps_len: 0,
            segment_shifts: [0; 4],
            nsegment_shifts: 0,
            slb_size: 0,
            timebase_hz: 0,
            ram_bytes: 0,
            ram0_bytes: 0,
            rtas_power_off: None,
            rtas_os_term: None,
            nodes: 0,
            props: 0,
            bootargs: [0; 64],
            cpu_name: [0; 32],
        }
    }
}

impl Platform {
    /// The value of `key=value` in `/chosen/bootargs`, as a number.
    pub fn arg_u64(&self, key: &str) -> Option<u64> {
        let args = cstr(&self.bootargs);
        args.split(|&b| b == b' ').find_map(|w| {
            let v = w.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
            core::str::from_utf8(v).ok()?.parse().ok()
        })
    }

    /// Whether `/chosen/bootargs` contains `word`.
    pub fn has_arg(&self, word: &str) -> bool {
        let args = cstr(&self.bootargs);
        args.split(|&b| b == b' ').any(|w| w == word.as_bytes())
    }

    /// Whether the processor supports segments of size 2^`shift`.
    pub fn has_segment_shift(&self, shift: u32) -> bool {
        self.segment_shifts[..self.nsegment_shifts].contains(&shift)
    }
}

fn cells(buf: &[u8]) -> impl Iterator<Item = u32> + '_ {
    buf.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

fn cstr(buf: &[u8]) -> &[u8] {
    &buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]
}

/// Walks the whole tree depth-first and gathers [`Platform`].
pub fn discover(of: &Ofw) -> Result<Platform, OfError> {
    let mut p = Platform::default();
    let root = of.root()?;
    let mut buf = [0u8; 256];
    let addr_cells =
        of.getprop(root, b"#address-cells\0", &mut buf).ok().and_then(|_| cells(&buf).next()).unwrap_or(2);
    let size_cells =
        of.getprop(root, b"#size-cells\0", &mut buf).ok().and_then(|_| cells(&buf).next()).unwrap_or(2);

    // Explicit stack of phandles: depth-first, child before peer.
    let mut stack = [Phandle(0); 32];
    let mut depth = 0;
    stack[0] = root;
    depth += 1;
    while depth > 0 {
        depth -= 1;
        let node = stack[depth];
        p.nodes += 1;
        visit(of, node, &mut p, addr_cells, size_cells)?;
        if let Some(peer) = if node == root { None } else { of.peer(node)? } {
            stack[depth] = peer;
            depth += 1;
        }
        if let Some(child) = of.child(node)? {
            if depth == stack.len() {
                return Err(OfError::Failed("device tree deeper than 32"));
            }
            stack[depth] = child;
            depth += 1;
        }
    }
    Ok(p)
}

fn visit(of: &Ofw, node: Phandle, p: &mut Platform, addr_cells: u32, size_cells: u32) -> Result<(), OfError> {
    let mut prev = [0u8; NAME_LEN];
    let mut name = [0u8; NAME_LEN];
    while of.nextprop(node, &prev, &mut name)? {
        p.props += 1;
        prev = name;
    }
    let mut nbuf = [0u8; NAME_LEN];
    let mut tbuf = [0u8; NAME_LEN];
    let nlen = of.getprop(node, b"name\0", &mut nbuf).unwrap_or(0);
    let tlen = of.getprop(node, b"device_type\0", &mut tbuf).unwrap_or(0);
    let node_name = cstr(&nbuf[..nlen]);
    let dtype = cstr(&tbuf[..tlen]);
    let mut buf = [0u8; 512];

    if dtype == b"cpu" && p.pft_shift == 0 {
        let n = node_name.len().min(p.cpu_name.len());
        p.cpu_name[..n].copy_from_slice(&node_name[..n]);
        if let Ok(len) = of.getprop(node, b"ibm,pft-size\0", &mut buf) {
            p.pft_shift = cells(&buf[..len]).nth(1).unwrap_or(0);
        }
        if let Ok(len) = of.getprop(node, b"ibm,segment-page-sizes\0", &mut buf) {
            let n = len / 4;
            for (d, c) in p.sps_cells.iter_mut().zip(cells(&buf[..len])) {
                *d = c;
            }
            p.sps_len = n.min(p.sps_cells.len());
        }
        if let Ok(len) = of.getprop(node, b"ibm,processor-segment-sizes\0", &mut buf) {
            for c in cells(&buf[..len]).filter(|&c| c != u32::MAX) {
                if p.nsegment_shifts < p.segment_shifts.len() {
                    p.segment_shifts[p.nsegment_shifts] = c;
                    p.nsegment_shifts += 1;
                }
            }
        }
        if let Ok(len) = of.getprop(node, b"timebase-frequency\0", &mut buf) {
            p.timebase_hz = cells(&buf[..len]).fold(0u64, |a, c| (a << 32) | c as u64);
        }
        for prop in [&b"slb-size\0"[..], &b"ibm,slb-size\0"[..]] {
            if let Ok(len) = of.getprop(node, prop, &mut buf) {
                if let Some(c) = cells(&buf[..len]).next() {
                    p.slb_size = c;
                }
            }
        }
    }
    if dtype == b"memory" {
        if let Ok(len) = of.getprop(node, b"reg\0", &mut buf) {
            let per = (addr_cells + size_cells) as usize;
            let words: [u32; 64] = {
                let mut a = [0u32; 64];
                for (d, s) in a.iter_mut().zip(cells(&buf[..len])) {
                    *d = s;
                }
                a
            };
            let mut i = 0;
            while per > 0 && i + per <= (len / 4).min(64) {
                let fold = |ws: &[u32]| ws.iter().fold(0u64, |acc, &w| (acc << 32) | w as u64);
                let base = fold(&words[i..i + addr_cells as usize]);
                let size = fold(&words[i + addr_cells as usize..i + per]);
                p.ram_bytes += size;
                if base == 0 {
                    p.ram0_bytes = size;
                }
                i += per;
            }
        }
    }
    if node_name == b"chosen" {
        let mut args = [0u8; 64];
        if let Ok(len) = of.getprop(node, b"bootargs\0", &mut args) {
            p.bootargs[..len.min(64)].copy_from_slice(&args[..len.min(64)]);
        }
    }
    if node_name == b"rtas" {
        if let Ok(len) = of.getprop(node, b"power-off\0", &mut buf) {
            p.rtas_power_off = cells(&buf[..len]).next();
        }
        if let Ok(len) = of.getprop(node, b"ibm,os-term\0", &mut buf) {
            p.rtas_os_term = cells(&buf[..len]).next();
        }
    }
    Ok(())
}
