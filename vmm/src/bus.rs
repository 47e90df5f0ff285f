//! Address-range buses for port I/O and MMIO exits.
//!
//! A device claims a range `[base, base + len)` and sees accesses as offsets into it, so
//! one device type (e.g. a virtio-mmio transport) can sit at many bases. The bus is built
//! before the vCPUs start and is read-only afterwards, so lookups take no lock; each
//! device has its own mutex, which keeps vCPUs that talk to different devices apart.
//! Devices that need to kick something outside the exit path (interrupts, queue
//! notifications, VM exit) hold their own EventFds; the bus only routes accesses.

use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's range. Bytes the
    /// device leaves untouched read as whatever the caller pre-filled.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs it (e.g. the signal path that
/// injects Ctrl-Alt-Del into the i8042).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps {other}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
    },
    #[error("bus range for {name} at {base:#x} is empty or wraps")]
    BadRange { name: String, base: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    name: String,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each routed to one device.
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`; ranges never overlap.
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    /// Routes `[base, base + len)` to `device`; `name` appears in overlap errors and logs.
    pub fn insert(&mut self, name: &str, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange {
                name: name.into(),
                base,
            });
        }
        let idx = self.entries.partition_point(|e| e.base < base);
        let overlaps = |e: &Entry| base < e.base + e.len && e.base < base + len;
        for neighbour in [idx.checked_sub(1), Some(idx)].into_iter().flatten() {
            if let Some(e) = self.entries.get(neighbour).filter(|e| overlaps(e)) {
                return Err(BusError::Overlap {
                    name: name.into(),
                    base,
                    len,
                    other: e.name.clone(),
                });
            }
        }
        self.entries.insert(
            idx,
            Entry {
                base,
                len,
                name: name.into(),
                device,
            },
        );
        Ok(())
    }

    /// The device whose range holds `addr`, and `addr`'s offset into that range.
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    /// Name of the device at `addr`, for diagnostics.
    pub fn device_name(&self, addr: u64) -> Option<&str> {
        self.find(addr).map(|(e, _)| e.name.as_str())
    }

    /// Dispatches a read; returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, shrugging off poisoning: a device whose holder panicked is still the
/// best state we have, and the panic itself already ends the VM.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert("b", 0x3f8, 8, b.clone()).unwrap();
        bus.insert("a", 0x60, 5, a.clone()).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x64, &mut byte));
        assert_eq!(byte, [4]);
        assert!(bus.write(0x3fd, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x65, &mut byte));
        assert_eq!(b.lock().unwrap().writes, vec![(5, vec![7])]);
        assert_eq!(bus.device_name(0x3ff), Some("b"));
        assert_eq!(bus.device_name(0x5f), None);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        let mut bus = Bus::new();
        bus.insert("x", 0x1000, 0x1000, d()).unwrap();
        assert!(matches!(bus.insert("y", 0x1fff, 1, d()), Err(BusError::Overlap { .. })));
        assert!(matches!(
            bus.insert("y", 0x800, 0x801, d()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert("y", 0x2000, 0x1000, d()).unwrap();
        bus.insert("z", 0x0, 0x1000, d()).unwrap();
        assert!(matches!(bus.insert("w", 5, 0, d()), Err(BusError::BadRange { .. })));
        assert!(matches!(
            bus.insert("w", u64::MAX, 2, d()),
            Err(BusError::BadRange { .. })
        ));
    }
}
