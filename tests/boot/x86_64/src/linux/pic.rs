//! The legacy interrupt controller: two cascaded 8259A PICs (master at 0x20/0x21, slave at
//! 0xa0/0xa1, slave on master IRQ2), edge-triggered, fixed priority, with the ICW1-ICW4
//! initialisation sequence, OCW1 masks, OCW2 EOIs (non-specific and specific), OCW3 reads
//! of IRR/ISR, auto-EOI, and the ELCR registers at 0x4d0/0x4d1 (stored, not acted on:
//! every line here is edge-triggered). Intel 8259A data sheet; what Linux's i8259 driver
//! programs (`init_8259A`, `mask_and_ack_8259A`).

/// One 8259A.
#[derive(Clone, Copy, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Line levels last seen (an edge sets IRR).
    lines: u8,
    vector_base: u8,
    /// Next ICW expected (0: initialised).
    icw_step: u8,
    icw4_needed: bool,
    auto_eoi: bool,
    read_isr: bool,
    elcr: u8,
}

impl Chip {
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The highest-priority request that may interrupt now: unmasked, and higher in
    /// priority than everything in service.
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        if req == 0 {
            return None;
        }
        let irq = req.trailing_zeros() as u8;
        let in_service = if self.isr == 0 { 8 } else { self.isr.trailing_zeros() as u8 };
        (irq < in_service).then_some(irq)
    }

    fn ack(&mut self, irq: u8) {
        self.irr &= !(1 << irq);
        if !self.auto_eoi {
            self.isr |= 1 << irq;
        }
    }

    fn write_cmd(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: starts initialisation; clears the mask and the in-service state.
            self.icw_step = 2;
            self.icw4_needed = v & 1 != 0;
            self.imr = 0;
            self.isr = 0;
            self.irr = 0;
            self.auto_eoi = false;
            self.read_isr = false;
        } else if v & 0x08 != 0 {
            // OCW3: register read select (bit 1 enables, bit 0 picks ISR).
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
        } else {
            // OCW2: EOI commands (rotation is not emulated: Linux does not use it).
            match v >> 5 {
                // Non-specific: the highest-priority bit in service.
                0b001 if self.isr != 0 => self.isr &= self.isr - 1,
                0b011 => self.isr &= !(1 << (v & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.icw_step {
            2 => {
                self.vector_base = v & 0xf8;
                self.icw_step = 3;
            }
            3 => self.icw_step = if self.icw4_needed { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.icw_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read_cmd(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The master/slave pair.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pic {
    master: Chip,
    slave: Chip,
    /// Interrupts acknowledged (delivered to the guest), per IRQ line.
    pub delivered: [u64; 16],
}

impl Pic {
    /// Both chips masked, as after reset.
    pub fn new() -> Self {
        let mut p = Pic::default();
        p.master.imr = 0xff;
        p.slave.imr = 0xff;
        p
    }

    /// Sets the level of ISA line `irq` (0-15); a rising edge requests an interrupt.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq < 8 {
            self.master.set_line(irq, level);
        } else if irq < 16 {
            self.slave.set_line(irq - 8, level);
            self.update_cascade();
        }
    }

    /// A rising then falling edge on `irq` (the PIT's output pulse).
    pub fn pulse(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn update_cascade(&mut self) {
        let out = self.slave.pending().is_some();
        self.master.set_line(2, out);
    }

    /// Whether the pair asserts its interrupt output.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The interrupt-acknowledge cycle: the vector of the highest-priority request, with
    /// its in-service bit set. `None` if nothing is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending()?;
        self.master.ack(irq);
        if irq == 2 {
            let Some(s) = self.slave.pending() else {
                // The request went away: a spurious IRQ7 of the slave, as the hardware does.
                return Some(self.slave.vector_base | 7);
            };
            self.slave.ack(s);
            // The cascade line follows the slave's output again.
            self.master.lines &= !(1 << 2);
            self.update_cascade();
            self.delivered[8 + s as usize] += 1;
            return Some(self.slave.vector_base | s);
        }
        self.delivered[irq as usize] += 1;
        Some(self.master.vector_base | irq)
    }

    /// Handles a port access in 0x20-0x21, 0xa0-0xa1 or 0x4d0-0x4d1; `None` if not ours.
    pub fn io(&mut self, port: u16, write: Option<u8>) -> Option<u8> {
        let chip = match port {
            0x20 | 0x21 => &mut self.master,
            0xa0 | 0xa1 => &mut self.slave,
            0x4d0 => {
                return Some(match write {
                    Some(v) => {
                        self.master.elcr = v;
                        0
                    }
                    None => self.master.elcr,
                })
            }
            0x4d1 => {
                return Some(match write {
                    Some(v) => {
                        self.slave.elcr = v;
                        0
                    }
                    None => self.slave.elcr,
                })
            }
            _ => return None,
        };
        let r = match (port & 1, write) {
            (0, Some(v)) => {
                chip.write_cmd(v);
                0
            }
            (_, Some(v)) => {
                chip.write_data(v);
                0
            }
            (0, None) => chip.read_cmd(),
            (_, None) => chip.imr,
        };
        self.update_cascade();
        Some(r)
    }
}
