//! The 8254 programmable interval timer as Linux uses it: channel 0 on IRQ0 (modes 0, 2, 3
//! and 4: Linux's i8253 clockevent runs mode 2 periodic and mode 4 one-shot), channel 2
//! with its gate and output on port 0x61 (the TSC calibration loops poll it and read its
//! counter), counter latches and the lobyte/hibyte flip-flops. Channel 1 (DRAM refresh)
//! only answers. Time is the host TSC, the same clock the guest's RDTSC reads, so the
//! guest's calibration against this PIT measures the real TSC rate. Intel 82C54 data sheet.

/// PIT input clock (Hz).
pub const PIT_HZ: u64 = 1_193_182;

#[derive(Clone, Copy, Debug, Default)]
struct Channel {
    mode: u8,
    /// Access: 1 lobyte, 2 hibyte, 3 lobyte then hibyte.
    access: u8,
    /// Reload value (0 means 65536).
    reload: u32,
    /// A count is loaded and counting (TSC at load).
    start: Option<u64>,
    /// The first byte of a lobyte/hibyte write.
    write_lo: Option<u8>,
    /// Latched count and which byte is read next.
    latch: Option<u16>,
    read_hi: bool,
}

/// The timer.
#[derive(Clone, Copy, Debug)]
pub struct Pit {
    ch: [Channel; 3],
    /// Port 0x61 bits 0 (channel 2 gate) and 1 (speaker data).
    port61: u8,
    tsc_hz: u64,
    /// Next channel-0 expiry (TSC) not yet signalled.
    next_irq: Option<u64>,
    /// Channel-0 expiries signalled (IRQ0 pulses).
    pub irqs: u64,
}

impl Pit {
    /// A stopped timer counting in TSC ticks of `tsc_hz`.
    pub fn new(tsc_hz: u64) -> Self {
        Pit { ch: [Channel::default(); 3], port61: 0, tsc_hz: tsc_hz.max(1), next_irq: None, irqs: 0 }
    }

    fn ticks_since(&self, start: u64, now: u64) -> u64 {
        (now.saturating_sub(start) as u128 * PIT_HZ as u128 / self.tsc_hz as u128) as u64
    }

    fn tsc_after(&self, start: u64, ticks: u64) -> u64 {
        start.saturating_add((ticks as u128 * self.tsc_hz as u128).div_ceil(PIT_HZ as u128) as u64)
    }

    fn reload(c: &Channel) -> u64 {
        if c.reload == 0 {
            0x1_0000
        } else {
            c.reload as u64
        }
    }

    /// The counter of channel `i` at `now`, and its output.
    fn state(&self, i: usize, now: u64) -> (u16, bool) {
        let c = &self.ch[i];
        let Some(start) = c.start else { return (c.reload as u16, c.mode != 0) };
        let n = self.ticks_since(start, now);
        let r = Self::reload(c);
        match c.mode {
            2 | 3 => {
                let left = r - n % r;
                let out = if c.mode == 2 { left != 1 } else { left > r / 2 };
                (left as u16, out)
            }
            // Modes 0 and 4 (and 1, 5 without a gate trigger): count down once, then wrap.
            _ => ((r.wrapping_sub(n) & 0xffff) as u16, if c.mode == 0 { n >= r } else { n != r }),
        }
    }

    fn program_irq(&mut self, now: u64) {
        let c = self.ch[0];
        self.next_irq = c.start.map(|s| {
            let r = Self::reload(&c);
            match c.mode {
                2 | 3 => {
                    let n = self.ticks_since(s, now);
                    self.tsc_after(s, (n / r + 1) * r)
                }
                _ => self.tsc_after(s, r),
            }
        });
        if matches!(c.mode, 0 | 1 | 4 | 5)
            && c.start.is_some_and(|s| self.ticks_since(s, now) >= Self::reload(&c))
        {
            self.next_irq = None;
        }
    }

    /// The TSC at which channel 0 next raises IRQ0, if it will.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next_irq
    }

    /// Whether channel 0 expired by `now` (then the caller pulses IRQ0); moves the
    /// deadline on (periodic modes skip the periods the guest could not see).
    pub fn poll(&mut self, now: u64) -> bool {
        let Some(t) = self.next_irq else { return false };
        if now < t {
            return false;
        }
        let c = self.ch[0];
        self.next_irq = match (c.mode, c.start) {
            (2 | 3, Some(s)) => {
                let r = Self::reload(&c);
                let n = self.ticks_since(s, now);
                Some(self.tsc_after(s, (n / r + 1) * r))
            }
            _ => None,
        };
        self.irqs += 1;
        true
    }

    /// Handles a port access in 0x40-0x43 or 0x61; `None` if not ours.
    pub fn io(&mut self, port: u16, write: Option<u8>, now: u64) -> Option<u8> {
        match (port, write) {
            (0x43, Some(v)) => {
                self.control(v, now);
                Some(0)
            }
            (0x43, None) => Some(0xff),
            (0x40..=0x42, Some(v)) => {
                self.write_count((port - 0x40) as usize, v, now);
                Some(0)
            }
            (0x40..=0x42, None) => Some(self.read_count((port - 0x40) as usize, now)),
            (0x61, Some(v)) => {
                let was = self.port61 & 1;
                self.port61 = v & 0x03;
                // Gate of channel 2 rising: the count (re)starts (modes 1 and 5 trigger;
                // modes 0/2/3/4 resume from the top in this model).
                if was == 0 && v & 1 != 0 && self.ch[2].start.is_some() {
                    self.ch[2].start = Some(now);
                }
                Some(0)
            }
            (0x61, None) => {
                let out2 = self.port61 & 1 != 0 && self.state(2, now).1;
                // Bit 4 toggles with the DRAM refresh (every 15 us); bit 5 is channel 2's output.
                let refresh = (self.ticks_since(0, now) / 18) & 1 != 0;
                Some(self.port61 | (refresh as u8) << 4 | (out2 as u8) << 5)
            }
            _ => None,
        }
    }

    fn control(&mut self, v: u8, now: u64) {
        let sel = (v >> 6) as usize;
        if sel == 3 {
            // Read-back: latch the counts of the selected channels (status latching is not
            // used by Linux).
            if v & 0x20 == 0 {
                for i in 0..3 {
                    if v & (2 << i) != 0 {
                        let count = self.state(i, now).0;
                        self.ch[i].latch.get_or_insert(count);
                    }
                }
            }
            return;
        }
        let access = (v >> 4) & 3;
        if access == 0 {
            let count = self.state(sel, now).0;
            self.ch[sel].latch.get_or_insert(count);
            return;
        }
        let c = &mut self.ch[sel];
        c.access = access;
        c.mode = match (v >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        c.start = None;
        c.write_lo = None;
        c.latch = None;
        c.read_hi = false;
        if sel == 0 {
            self.next_irq = None;
        }
    }

    fn write_count(&mut self, i: usize, v: u8, now: u64) {
        let c = &mut self.ch[i];
        let value = match c.access {
            1 => v as u32,
            2 => (v as u32) << 8,
            _ => match c.write_lo.take() {
                None => {
                    c.write_lo = Some(v);
                    return;
                }
                Some(lo) => lo as u32 | (v as u32) << 8,
            },
        };
        c.reload = value;
        c.start = Some(now);
        if i == 0 {
            self.program_irq(now);
        }
    }

    fn read_count(&mut self, i: usize, now: u64) -> u8 {
        let count = match self.ch[i].latch {
            Some(l) => l,
            None => self.state(i, now).0,
        };
        let c = &mut self.ch[i];
        let (byte, done) = match c.access {
            1 => (count as u8, true),
            2 => ((count >> 8) as u8, true),
            _ => {
                let hi = c.read_hi;
                c.read_hi = !hi;
                (if hi { (count >> 8) as u8 } else { count as u8 }, hi)
            }
        };
        if done {
            c.latch = None;
        }
        byte
    }
}
