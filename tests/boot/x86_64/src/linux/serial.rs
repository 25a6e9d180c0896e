//! COM1 (0x3f8-0x3ff, IRQ4) as a 16450 UART: no FIFO (IIR bits 7-6 read 0, so Linux's
//! autoconfig settles on a 16450), divisor latch, scratch register, modem loopback, the
//! transmitter-empty interrupt (IER bit 1, gated by MCR OUT2 as on a PC), and an empty
//! receiver (nothing is typed). Transmission is instant: a byte written to THR goes to the
//! guest's console line buffer and the transmitter is empty again at once.
//! National Semiconductor PC16450 / PC16550D data sheets.

use alloc::vec::Vec;

/// The UART.
#[derive(Debug, Default)]
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// A transmitter-empty interrupt is pending (cleared by reading IIR or writing THR).
    thre_pending: bool,
    /// The guest's output, up to the next newline.
    line: Vec<u8>,
    /// Bytes transmitted.
    pub bytes: u64,
}

const IER_THRI: u8 = 0x02;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const LCR_DLAB: u8 = 0x80;

impl Serial {
    /// A UART after reset.
    pub fn new() -> Self {
        Serial::default()
    }

    /// The level of IRQ4.
    pub fn irq_line(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && self.ier & IER_THRI != 0 && self.thre_pending
    }

    /// Handles a port access in 0x3f8-0x3ff; `None` if not ours. `out` gets each complete
    /// line the guest printed.
    pub fn io(&mut self, port: u16, write: Option<u8>, out: &mut dyn FnMut(&[u8])) -> Option<u8> {
        if !(0x3f8..=0x3ff).contains(&port) {
            return None;
        }
        let reg = port - 0x3f8;
        let dlab = self.lcr & LCR_DLAB != 0;
        Some(match (reg, write) {
            (0, Some(v)) if dlab => {
                self.dll = v;
                0
            }
            (0, Some(v)) => {
                if self.mcr & MCR_LOOP == 0 {
                    self.transmit(v, out);
                }
                // The byte leaves at once: the holding register is empty again.
                self.thre_pending = true;
                0
            }
            (0, None) if dlab => self.dll,
            (0, None) => 0,
            (1, Some(v)) if dlab => {
                self.dlm = v;
                0
            }
            (1, Some(v)) => {
                // Enabling the interrupt with the holding register empty raises it.
                if v & IER_THRI != 0 && self.ier & IER_THRI == 0 {
                    self.thre_pending = true;
                }
                self.ier = v & 0x0f;
                0
            }
            (1, None) if dlab => self.dlm,
            (1, None) => self.ier,
            (2, Some(_)) => 0,
            (2, None) => {
                if self.ier & IER_THRI != 0 && self.thre_pending {
                    self.thre_pending = false;
                    0x02
                } else {
                    0x01
                }
            }
            (3, Some(v)) => {
                self.lcr = v;
                0
            }
            (3, None) => self.lcr,
            (4, Some(v)) => {
                self.mcr = v & 0x1f;
                0
            }
            (4, None) => self.mcr,
            // LSR: transmitter holding register and shift register empty, no data.
            (5, _) => 0x60,
            (6, Some(_)) => 0,
            (6, None) => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = self.mcr;
                    (m & 1) << 5 | (m & 2) << 3 | (m & 4) << 4 | (m & 8) << 4
                } else {
                    // DCD, DSR, CTS asserted: a terminal is attached.
                    0xb0
                }
            }
            (7, Some(v)) => {
                self.scr = v;
                0
            }
            (7, None) => self.scr,
            _ => 0xff,
        })
    }

    fn transmit(&mut self, b: u8, out: &mut dyn FnMut(&[u8])) {
        self.bytes += 1;
        match b {
            b'\n' => {
                out(&self.line);
                self.line.clear();
            }
            b'\r' => {}
            _ if self.line.len() < 200 => self.line.push(b),
            _ => {
                out(&self.line);
                self.line.clear();
                self.line.push(b);
            }
        }
    }

    /// Hands out a partial last line (at the end of the run).
    pub fn flush(&mut self, out: &mut dyn FnMut(&[u8])) {
        if !self.line.is_empty() {
            out(&self.line);
            self.line.clear();
        }
    }
}
