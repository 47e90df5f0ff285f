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

/// A virtio device behind its MMIO register block. The fields are the virtio module's
/// so that saving and restoring them ([`super::persist`]) can live apart from the
/// register handling.
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Interrupt,
    pub(super) queues: Vec<Queue>,
    /// One per queue; KVM signals it when the guest writes the queue's index to
    /// QueueNotify (datamatch), and the event loop waits on it.
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) acked_features: u64,
    pub(super) queue_sel: u32,
    pub(super) config_generation: u32,
    pub(super) active: bool,
    /// Set when the driver broke a queue; cleared by reset.
    pub(super) needs_reset: bool,
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

    pub(super) fn reset(&mut self) {
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
        if let Err(why) = self.try_activate() {
            self.fail(&why);
        }
    }

    /// Checks the ready queues against guest memory and starts the device with the
    /// acked features (the guest's DRIVER_OK, or a restore of a running device). On
    /// error nothing is active and the caller decides what the guest sees.
    pub(super) fn try_activate(&mut self) -> Result<(), String> {
        let event_idx = has_feature(self.acked_features, VIRTIO_RING_F_EVENT_IDX);
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i} (size {}, descriptors {:#x}, avail {:#x}, used {:#x}) is not inside guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
            q.set_event_idx(event_idx);
        }
        self.device
            .activate(self.acked_features)
            .map_err(|e| format!("activation failed: {e}"))?;
        self.active = true;
        tracing::debug!(
            "{}: activated with features {:#x}",
            self.device.name(),
            self.acked_features
        );
        Ok(())
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

/// Shared with the save/restore tests ([`super::persist`]).
#[cfg(test)]
pub(super) mod tests;
