//! CMOS RTC and NVRAM at ports 0x70 (index) / 0x71 (data).
//!
//! Linux reads the wall clock here at boot, and its rtc_cmos driver waits seconds for an
//! update cycle that never ends if the registers read 0xff. So this answers the host's
//! current UTC time on every read, never reports "update in progress", and keeps the
//! rest of the 128 bytes as plain NVRAM. Saved state ([`CmosState`]) is the index and
//! the NVRAM, never the time (see there why).

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state_error::StateError;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register B bits.
const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;
/// Register D: "RAM and time valid" (battery good).
const D_VALID: u8 = 0x80;
/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const A_DEFAULT: u8 = 0x26;

/// A broken-down UTC time, as the RTC presents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub weekday: u8, // 1 = Sunday, as the RTC counts
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl RtcTime {
    /// The host's current UTC time.
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::from_unix(secs)
    }

    /// Civil date from days since the epoch (Howard Hinnant's algorithm).
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        RtcTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday (RTC weekday 5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    /// Injected clock so tests can pin the time.
    clock: fn() -> RtcTime,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(RtcTime::now)
    }
}

impl Cmos {
    pub fn with_clock(clock: fn() -> RtcTime) -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A as usize] = A_DEFAULT;
        nvram[REG_B as usize] = B_24H;
        nvram[REG_D as usize] = D_VALID;
        Cmos { index: 0, nvram, clock }
    }

    fn encode(&self, value: u8) -> u8 {
        if self.nvram[REG_B as usize] & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn hour(&self, hour: u8) -> u8 {
        if self.nvram[REG_B as usize] & B_24H != 0 {
            return self.encode(hour);
        }
        // 12-hour mode: 12 for noon/midnight, PM flag in bit 7.
        let pm = hour >= 12;
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if pm { 0x80 } else { 0 }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let time_reg = matches!(
            reg,
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY
        );
        if !time_reg {
            return match reg {
                REG_A => self.nvram[REG_A as usize] & 0x7f,
                // Reading C acknowledges interrupts; none are ever raised.
                REG_C => 0,
                REG_D => D_VALID,
                _ => self.nvram[reg as usize],
            };
        }
        let t = (self.clock)();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year % 100) as u8),
            _ => self.encode((t.year / 100) as u8),
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.read_register(self.index),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = value & 0x7f,
            _ => match self.index {
                // The clock follows the host; the guest setting it is ignored.
                REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY
                | REG_C | REG_D => {}
                i => self.nvram[i as usize] = value,
            },
        }
    }
}

/// The index register and all 128 bytes of NVRAM, registers A and B (rate, binary and
/// 12/24-hour modes) among them; the bytes at the clock registers' indices are unused
/// and carried as they are.
///
/// The time itself is not carried, on purpose: this RTC has none of its own, it answers
/// the host's clock on every read. A restored guest (later, maybe on another host)
/// must read the real time now, as a real machine's battery-backed clock would give
/// after the machine was off; carrying the saved time would set its clock back by
/// however long the VM was saved. (The guest's running time is kvmclock and the TSC,
/// saved with the vCPUs and the VM.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    /// The selected register (the index port without its NMI-mask bit), < 128.
    pub index: u8,
    /// Exactly 128 bytes (a Vec: serde has no 128-element arrays).
    pub nvram: Vec<u8>,
}

impl Cmos {
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Puts the index and NVRAM back; the clock stays this device's (the host's).
    pub fn restore(&mut self, state: &CmosState) -> Result<(), StateError> {
        let invalid = |reason: String| StateError::Invalid { what: "CMOS", reason };
        let nvram: [u8; 128] = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| invalid(format!("{} NVRAM bytes, the device has 128", state.nvram.len())))?;
        // Reads index the NVRAM with it: past 127 they would be out of bounds.
        if usize::from(state.index) >= nvram.len() {
            return Err(invalid(format!("index register {:#x} past the NVRAM", state.index)));
        }
        self.index = state.index;
        self.nvram = nvram;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> RtcTime {
        // 2026-11-22 16:41:07 UTC, a Sunday.
        RtcTime::from_unix(1_795_365_667)
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0xffu8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_date_conversion() {
        let t = fixed();
        assert_eq!((t.year, t.month, t.day), (2026, 11, 22));
        assert_eq!((t.hour, t.minute, t.second), (16, 41, 7));
        assert_eq!(t.weekday, 1);
        let leap = RtcTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        assert_eq!(RtcTime::from_unix(0).weekday, 5);
    }

    #[test]
    fn reads_bcd_time_and_sane_status() {
        let mut c = Cmos::with_clock(fixed);
        assert_eq!(read(&mut c, REG_SECONDS), 0x07);
        assert_eq!(read(&mut c, REG_MINUTES), 0x41);
        assert_eq!(read(&mut c, REG_HOURS), 0x16);
        assert_eq!(read(&mut c, REG_DAY), 0x22);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&mut c, REG_D), 0x80);
    }

    fn later() -> RtcTime {
        // A day and an hour after `fixed`.
        RtcTime::from_unix(1_795_365_667 + 90_000)
    }

    /// NVRAM byte 0x40 written, binary 12-hour mode, register 0x41 left selected.
    fn used() -> Cmos {
        let mut c = Cmos::with_clock(fixed);
        c.write(0, &[REG_B]);
        c.write(1, &[B_BINARY]);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.write(0, &[0x41 | 0x80]);
        c
    }

    #[test]
    fn restored_cmos_keeps_index_and_nvram_but_reads_the_current_time() {
        let saved = used().state();
        let mut c = Cmos::with_clock(later);
        c.restore(&saved).unwrap();
        assert_eq!(c.state(), saved);
        let mut b = [0u8];
        c.read(0, &mut b);
        assert_eq!(b[0], 0x41, "index register");
        assert_eq!(read(&mut c, 0x40), 0x5a, "NVRAM byte");
        assert_eq!(read(&mut c, REG_B), B_BINARY, "register B");
        // Binary, 12-hour (register B came back): 17:41 reads as 5 PM, today's hour.
        assert_eq!(read(&mut c, REG_HOURS), 0x80 | 5);
        assert_eq!(read(&mut c, REG_DAY), 23, "the host's date, not the saved one");
    }

    #[test]
    fn state_round_trips_through_json() {
        let saved = used().state();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<CmosState>(&json).unwrap(), saved);
    }

    #[test]
    fn impossible_states_are_refused() {
        let mut c = Cmos::with_clock(fixed);
        let before = c.state();
        let mut short = used().state();
        short.nvram.pop();
        let mut index = used().state();
        index.index = 0x80;
        for bad in [short, index] {
            assert!(matches!(c.restore(&bad), Err(StateError::Invalid { what: "CMOS", .. })));
        }
        assert_eq!(c.state(), before);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = Cmos::with_clock(fixed);
        c.write(0, &[REG_B]);
        c.write(1, &[B_BINARY]);
        assert_eq!(read(&mut c, REG_MINUTES), 41);
        assert_eq!(read(&mut c, REG_HOURS), 0x80 | 4, "4 PM");
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a, "NVRAM keeps what is written");
    }
}
