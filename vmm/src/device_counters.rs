//! The device-counter registry: live I/O counters each device bumps on its hot path,
//! read by the control socket's `stats`. A keel-vmm process runs exactly one VM, so
//! devices register their counters in a process-wide registry instead of threading a
//! handle through every constructor. A leaf beside the devices: it imports only the
//! wire types.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use keel_vmm_api::control::{DeviceKind, DeviceStats};

use crate::bus::lock;

/// Live counters a device bumps on its I/O path (relaxed atomics: a few ns each).
#[derive(Debug)]
pub struct DeviceCounters {
    kind: DeviceKind,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    ops_in: AtomicU64,
    ops_out: AtomicU64,
}

impl DeviceCounters {
    /// Counters outside the registry (a device built by a test or a benchmark);
    /// [`device_counters`] makes the ones `stats` reports.
    pub fn detached(kind: DeviceKind) -> Arc<Self> {
        Arc::new(DeviceCounters {
            kind,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            ops_in: AtomicU64::new(0),
            ops_out: AtomicU64::new(0),
        })
    }

    /// One request towards the guest of `bytes` (a disk read, a received packet).
    pub fn add_in(&self, bytes: u64) {
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        self.ops_in.fetch_add(1, Ordering::Relaxed);
    }

    /// One request from the guest of `bytes` (a disk write, a sent packet).
    pub fn add_out(&self, bytes: u64) {
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        self.ops_out.fetch_add(1, Ordering::Relaxed);
    }

    /// What the counters say now.
    pub fn snapshot(&self, name: &str) -> DeviceStats {
        DeviceStats {
            name: name.to_string(),
            kind: self.kind,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            ops_in: self.ops_in.load(Ordering::Relaxed),
            ops_out: self.ops_out.load(Ordering::Relaxed),
        }
    }
}

type Registry = Mutex<Vec<(String, Arc<DeviceCounters>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The counters of device `name` (e.g. `virtio-blk0`), created on first use.
pub fn device_counters(name: &str, kind: DeviceKind) -> Arc<DeviceCounters> {
    let mut reg = lock(registry());
    if let Some((_, c)) = reg.iter().find(|(n, _)| n == name) {
        return c.clone();
    }
    let c = DeviceCounters::detached(kind);
    reg.push((name.to_string(), c.clone()));
    c
}

pub fn device_stats() -> Vec<DeviceStats> {
    lock(registry()).iter().map(|(n, c)| c.snapshot(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counters_accumulate_per_name() {
        let a = device_counters("test-blk", DeviceKind::Block);
        a.add_in(512);
        a.add_in(512);
        device_counters("test-blk", DeviceKind::Block).add_out(4096);
        let s = device_stats().into_iter().find(|d| d.name == "test-blk").unwrap();
        assert_eq!((s.bytes_in, s.ops_in, s.bytes_out, s.ops_out), (1024, 2, 4096, 1));
        assert_eq!(s.kind, DeviceKind::Block);
    }
}
