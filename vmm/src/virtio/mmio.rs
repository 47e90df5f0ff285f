//! The virtio-mmio transport, version 2 ("modern", VIRTIO 1.x section 4.2).
//!
//! One 4 KiB window per device: the register block a vCPU reads and writes, then the
//! device configuration space at 0x100. Register accesses run on vCPU threads under the
//! transport's lock; queue notifications (writes to QueueNotify) reach the event loop
//! through ioeventfds registered with KVM, so a vCPU never processes a queue.
//!
//! Status handling follows the spec's driver sequence: ACKNOWLEDGE → DRIVER → features →
//! FEATURES_OK (refused unless the acked features are a subset of the offer and include
//! VERSION_1) → queue setup → DRIVER_OK (activates the device). Writing 0 resets. A device
//! whose driver broke a queue reports NEEDS_RESET and ignores that driver until reset.

use std::os::fd::AsRawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{INT_CONFIG_CHANGE, Interrupt, QueueContext, VIRTIO_F_VERSION_1, VirtioDevice, has_feature, new_queues};
use crate::bus::BusDevice;
use crate::memory::GuestMemory;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2: the modern register layout.
pub const VERSION: u32 = 2;
/// Vendor ID the guest sees ("KEEL" read as ASCII, little endian).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"KEEL");
/// Start of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// The QueueNotify register, where ioeventfds listen.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// A virtio device behind its MMIO register block.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    /// One per queue; KVM signals it when the guest writes the queue's index to
    /// QueueNotify (datamatch), and the event loop waits on it.
    queue_evts: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// Set when the driver broke a queue; cleared by reset.
    needs_reset: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, interrupt: Interrupt) -> std::io::Result<Self> {
        let queues = new_queues(device.queue_max_sizes());
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            needs_reset: false,
        })
    }

    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The queue notification eventfds, in queue order.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Fds the event loop watches for this device: queue notifiers, then device extras.
    pub fn event_sources(&self) -> Vec<(i32, u32)> {
        let mut v: Vec<(i32, u32)> = self
            .queue_evts
            .iter()
            .map(|e| (e.as_raw_fd(), libc::EPOLLIN as u32))
            .collect();
        v.extend(self.device.extra_fds().iter().map(|x| (x.fd, x.events)));
        v
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn status(&self) -> u32 {
        self.status
            | if self.needs_reset {
                VIRTIO_CONFIG_S_NEEDS_RESET
            } else {
                0
            }
    }

    /// Event source `index` (see [`MmioTransport::event_sources`]) fired.
    pub fn handle_event(&mut self, index: usize, events: u32) {
        let queues = self.queue_evts.len();
        if index < queues {
            // Drain the notifier whether or not the device runs: a notification before
            // DRIVER_OK or after NEEDS_RESET means nothing.
            let _ = self.queue_evts[index].read();
        }
        if !self.active || self.needs_reset {
            return;
        }
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        };
        let result = if index < queues {
            self.device.process_queue(&mut ctx, index)
        } else {
            self.device.process_extra(&mut ctx, index - queues, events)
        };
        if let Err(e) = result {
            self.fail(&e.0);
        }
    }

    /// Puts the device in NEEDS_RESET and tells the driver through a config interrupt.
    fn fail(&mut self, why: &str) {
        tracing::warn!("{}: {why}: device needs reset", self.device.name());
        self.needs_reset = true;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.raise(INT_CONFIG_CHANGE);
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.needs_reset = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (4.2.3.1 / 3.1.1); anything else is ignored.
        if value & old != old {
            tracing::debug!(
                "{}: status {value:#x} drops bits of {old:#x}: ignored",
                self.device.name()
            );
            return;
        }
        let added = value & !old;
        let mut new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up when FEATURES_OK did not stick.
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::debug!("{}: DRIVER_OK without FEATURES_OK: ignored", self.device.name());
                return;
            }
            self.status = new;
            self.activate();
            return;
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::debug!("{}: the driver gave up on the device (FAILED)", self.device.name());
        }
        self.status = new;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        let extra = self.acked_features & !offered;
        if extra != 0 {
            tracing::warn!(
                "{}: driver acked features {extra:#x} that were not offered",
                self.device.name()
            );
            return false;
        }
        if !has_feature(self.acked_features, VIRTIO_F_VERSION_1) {
            tracing::warn!(
                "{}: driver did not accept VERSION_1 (legacy drivers are not supported)",
                self.device.name()
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = has_feature(self.acked_features, VIRTIO_RING_F_EVENT_IDX);
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                let why = format!(
                    "queue {i} (size {}, descriptors {:#x}, avail {:#x}, used {:#x}) is not inside guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                );
                self.fail(&why);
                return;
            }
            q.set_event_idx(event_idx);
        }
        match self.device.activate(self.acked_features) {
            Ok(()) => {
                self.active = true;
                tracing::debug!(
                    "{}: activated with features {:#x}",
                    self.device.name(),
                    self.acked_features
                );
            }
            Err(e) => self.fail(&format!("activation failed: {e}")),
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: length all ones means "none" (4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let features_phase =
            self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let queue_phase =
            self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if queue_phase => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready())
                    && let Err(e) = q.try_set_size(value.min(u32::from(u16::MAX)) as u16)
                {
                    tracing::debug!("queue size {value}: {e}");
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queue_phase => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Only reached when no ioeventfd caught the write (never with KVM, where
                // every queue has one). Hand it to the event loop all the same.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if queue_phase =>
            {
                let Some(q) = self.selected_queue().filter(|q| !q.ready()) else {
                    return;
                };
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                let set = |current: u64| -> GuestAddress {
                    let lo = low.map_or(current & 0xffff_ffff, u64::from);
                    let hi = high.map_or(current >> 32, u64::from);
                    GuestAddress(hi << 32 | lo)
                };
                // The try_set_* calls refuse misaligned rings; the queue then stays
                // invalid and activation reports it.
                let r = match offset {
                    VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        q.try_set_desc_table_address(set(q.desc_table()))
                    }
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        q.try_set_avail_ring_address(set(q.avail_ring()))
                    }
                    _ => q.try_set_used_ring_address(set(q.used_ring())),
                };
                if let Err(e) = r {
                    tracing::debug!("queue address register {offset:#x} = {value:#x}: {e}");
                }
            }
            _ => tracing::trace!("virtio-mmio: ignored write {offset:#x} = {value:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLine;
    use crate::virtio::{COMMON_FEATURES, NeedsReset};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    use vm_memory::GuestMemoryMmap;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activated: Arc<Mutex<Vec<u64>>>,
        resets: Arc<Mutex<u32>>,
        fail_queue: bool,
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

    fn transport(probe: Probe) -> MmioTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        MmioTransport::new(Box::new(probe), mem, Interrupt::new(IrqLine::new(5).unwrap())).unwrap()
    }

    fn w(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// The Linux driver's sequence up to FEATURES_OK with `features` acked.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
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

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, index);
        w(t, VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const ALL_UP: u32 =
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
}
