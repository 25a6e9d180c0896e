//! The MC146818 real-time clock and CMOS RAM at 0x70/0x71, enough for Linux to read the
//! time at boot (`mach_get_cmos_time`): a fixed date in BCD, 24-hour mode, the update-in-
//! progress bit clear, the valid-RAM bit set; the rest of the 128 bytes is RAM. Bit 7 of
//! the index write (the NMI mask) is ignored. The clock does not advance: the guest keeps
//! time with the PIT and the TSC. Motorola MC146818A data sheet.

/// The RTC and its RAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Cmos {
    /// 2026-12-03 00:00:00, a Thursday.
    pub fn new() -> Self {
        let mut ram = [0u8; 128];
        ram[0x06] = 0x05; // day of week
        ram[0x07] = 0x03; // day
        ram[0x08] = 0x12; // month
        ram[0x09] = 0x26; // year
        ram[0x0a] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[0x0b] = 0x02; // 24-hour, BCD, no interrupts
        ram[0x0d] = 0x80; // valid RAM and time
        ram[0x32] = 0x20; // century
        Cmos { index: 0, ram }
    }

    /// Handles a port access at 0x70/0x71; `None` if not ours.
    pub fn io(&mut self, port: u16, write: Option<u8>) -> Option<u8> {
        match (port, write) {
            (0x70, Some(v)) => {
                self.index = v & 0x7f;
                Some(0)
            }
            (0x70, None) => Some(0xff),
            (0x71, Some(v)) => {
                // Registers C and D are read-only.
                if !matches!(self.index, 0x0c | 0x0d) {
                    self.ram[self.index as usize] = v;
                }
                Some(0)
            }
            // Reading register C acknowledges (and clears) its interrupt flags.
            (0x71, None) if self.index == 0x0c => Some(core::mem::take(&mut self.ram[0x0c])),
            (0x71, None) => Some(self.ram[self.index as usize]),
            _ => None,
        }
    }
}
