//! Firecracker-style boot timer on port 0x3f0: a guest writes 123 when it considers
//! itself booted, and the VMM logs how long that took since the VMM process started, so
//! boot times compare one to one with Firecracker's. Saved state ([`BootTimerState`]):
//! whether the guest has reported.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state_error::StateError;

/// I/O port of the boot timer.
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// The magic value the guest writes.
pub const BOOT_TIMER_MAGIC: u8 = 123;

pub struct BootTimer {
    start: Instant,
    /// Only the first write is reported: later ones (e.g. a second init stage) would
    /// not be "boot" times.
    reported: bool,
}

impl BootTimer {
    /// `start` is the VMM's start time (taken first thing in `main`).
    pub fn new(start: Instant) -> Self {
        BootTimer { start, reported: false }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) && !self.reported {
            self.reported = true;
            let us = self.start.elapsed().as_micros();
            tracing::info!("boot-timer: guest ready {us} us after VMM start");
        }
    }
}

/// Whether the guest has reported its boot. That is all: the start time is an
/// `Instant` of the VMM process that started the VM, meaningless in another process,
/// and the port reads zero whatever happened. Carrying `reported` keeps a restored
/// guest that already booted from having a later write logged as a boot time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTimerState {
    pub reported: bool,
}

impl BootTimer {
    pub fn state(&self) -> BootTimerState {
        BootTimerState {
            reported: self.reported,
        }
    }

    /// Every value is valid: this cannot fail, but has the devices' common signature.
    pub fn restore(&mut self, state: &BootTimerState) -> Result<(), StateError> {
        self.reported = state.reported;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_survives_restore_and_json() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[1]);
        assert_eq!(timer.state(), BootTimerState { reported: false }, "not the magic value");
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let saved = timer.state();
        assert!(saved.reported);
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<BootTimerState>(&json).unwrap(), saved);
        let mut restored = BootTimer::new(Instant::now());
        restored.restore(&saved).unwrap();
        assert_eq!(restored.state(), saved);
        let mut b = [0xffu8];
        restored.read(0, &mut b);
        assert_eq!(b, [0]);
    }
}
