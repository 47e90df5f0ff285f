//! The transport's register protocol against a probe device, no KVM: identification,
//! feature negotiation, status and reset, queue setup and NEEDS_RESET. The helpers are
//! shared with the save/restore tests.

use super::*;
use crate::devices::IrqLine;
use crate::virtio::{COMMON_FEATURES, NeedsReset};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
use vm_memory::GuestMemoryMmap;

/// A device that records what the transport does to it.
#[derive(Default)]
pub(crate) struct Probe {
    pub(crate) activated: Arc<Mutex<Vec<u64>>>,
    pub(crate) resets: Arc<Mutex<u32>>,
    pub(crate) fail_queue: bool,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &'static str {
        "probe"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | 1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(b"0123456789", offset, data);
    }
    fn activate(&mut self, acked: u64) -> Result<(), String> {
        self.activated.lock().unwrap().push(acked);
        Ok(())
    }
    fn reset(&mut self) {
        *self.resets.lock().unwrap() += 1;
    }
    fn process_queue(&mut self, _: &mut QueueContext<'_>, index: usize) -> Result<(), NeedsReset> {
        if self.fail_queue {
            Err(NeedsReset(format!("queue {index} broken")))
        } else {
            Ok(())
        }
    }
}

pub(crate) fn transport(probe: Probe) -> MmioTransport {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    MmioTransport::new(Box::new(probe), mem, Interrupt::new(IrqLine::new(5).unwrap())).unwrap()
}

pub(crate) fn w(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}
pub(crate) fn r(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

/// The Linux driver's sequence up to FEATURES_OK with `features` acked.
pub(crate) fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    for sel in 0..2 {
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    w(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    r(t, VIRTIO_MMIO_STATUS)
}

pub(crate) fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    w(t, VIRTIO_MMIO_QUEUE_SEL, index);
    w(t, VIRTIO_MMIO_QUEUE_NUM, size);
    w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
    w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
    w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    w(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

pub(crate) const ALL_UP: u32 =
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

#[test]
fn identification_registers_and_config_space() {
    let mut t = transport(Probe::default());
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 4);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), COMMON_FEATURES as u32 | 8);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no such queue");
    let mut cfg = [0u8; 4];
    t.read(CONFIG_OFFSET + 8, &mut cfg);
    assert_eq!(&cfg, b"89\0\0");
    // Narrow register reads read zero rather than half a register.
    let mut half = [0xffu8; 2];
    t.read(0, &mut half);
    assert_eq!(half, [0, 0]);
}

#[test]
fn features_ok_requires_version_1_and_offered_bits() {
    let mut t = transport(Probe::default());
    assert_eq!(
        negotiate(&mut t, 1 << 3) & VIRTIO_CONFIG_S_FEATURES_OK,
        0,
        "no VERSION_1"
    );
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    let not_offered = 1 << VIRTIO_F_VERSION_1 | 1 << 7;
    assert_eq!(negotiate(&mut t, not_offered) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    let good = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
    assert_ne!(negotiate(&mut t, good) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Features are frozen after FEATURES_OK.
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    assert_eq!(t.acked_features, good);
}

#[test]
fn driver_ok_activates_and_reset_resets() {
    let probe = Probe::default();
    let activated = probe.activated.clone();
    let resets = probe.resets.clone();
    let mut t = transport(probe);
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
    negotiate(&mut t, features);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0x1_0000);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, VIRTIO_MMIO_STATUS, ALL_UP);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_UP);
    assert!(t.is_active());
    assert_eq!(*activated.lock().unwrap(), vec![features]);
    assert!(t.queues[0].event_idx_enabled());
    // Clearing a bit without a reset is ignored.
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_UP);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert!(!t.is_active());
    assert_eq!(*resets.lock().unwrap(), 1);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(t.acked_features, 0);
}

#[test]
fn queue_outside_memory_sets_needs_reset() {
    let mut t = transport(Probe::default());
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0xfff_f000);
    w(&mut t, VIRTIO_MMIO_STATUS, ALL_UP);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!t.is_active());
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG_CHANGE,
        INT_CONFIG_CHANGE
    );
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG_CHANGE);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0, "reset clears NEEDS_RESET");
}

#[test]
fn queue_error_during_processing_sets_needs_reset() {
    let mut t = transport(Probe {
        fail_queue: true,
        ..Probe::default()
    });
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    w(&mut t, VIRTIO_MMIO_STATUS, ALL_UP);
    // A notify that no ioeventfd caught still goes through the eventfd.
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    t.handle_event(0, libc::EPOLLIN as u32);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        t.interrupt().line().eventfd().read().unwrap(),
        1,
        "config interrupt raised"
    );
}

#[test]
fn queue_config_is_ignored_outside_its_phase() {
    let mut t = transport(Probe::default());
    // Before FEATURES_OK.
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 12); // not a power of two: refused
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5008); // misaligned: refused
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    assert_eq!(t.queues[0].size(), 16);
}
