//! Firecracker-style boot timer on port 0x3f0: a guest writes 123 when it considers
//! itself booted, and the VMM logs how long that took since the VMM process started, so
//! boot times compare one to one with Firecracker's.

use std::time::Instant;

use crate::bus::BusDevice;

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
