//! A device that swallows writes and reads as zero: port 0x80 (POST codes and Linux's
//! I/O delay) and other legacy ports that firmware-less guests probe but need no answer
//! from.

use crate::bus::BusDevice;

#[derive(Debug, Default)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
