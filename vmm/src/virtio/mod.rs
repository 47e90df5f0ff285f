//! Virtio devices (VIRTIO 1.x, split rings) behind the virtio-mmio transport.
//!
//! Layering, top to bottom:
//! - [`mmio::MmioTransport`]: the register block a vCPU reads and writes (feature
//!   negotiation, device status, queue setup, interrupt status). It is a bus device.
//! - [`VirtioDevice`]: what a device type (block, net, rng) implements: its features,
//!   config space, and how it processes a queue when the guest notifies it.
//! - [`queue_handler`]: strict parsing of descriptor chains out of guest memory; the only
//!   place guest-supplied addresses become host accesses.
//!
//! The rings themselves are rust-vmm's `virtio-queue`. Queue notifications arrive on
//! ioeventfds (KVM signals them without a VM exit to us) and are handled on the event loop
//! thread ([`crate::event_loop`]), never on a vCPU thread; interrupts go out through irqfds.

pub mod attach;
pub mod block;
/// A test-side virtio driver (builds rings in guest memory, `expect`s on misuse): for
/// unit tests, and for integration tests and benches through the `test-driver`
/// feature (keel-vmm's dev-dependency on itself turns it on); never in the binary.
#[cfg(any(test, feature = "test-driver"))]
pub mod driver;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue_handler;
pub mod rng;
pub mod tap;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};

use crate::devices::IrqLine;
use crate::memory::GuestMemory;
use crate::state_error::StateError;
use persist::VirtioDeviceState;

pub use virtio_bindings::virtio_config::{VIRTIO_F_VERSION_1, VIRTIO_TRANSPORT_F_END, VIRTIO_TRANSPORT_F_START};
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Feature bits every Keel device offers: modern (1.x) only, indirect descriptors and
/// event-index notification suppression.
pub const COMMON_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bits (the MMIO InterruptStatus register).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt: the status bits the guest reads and acknowledges, and the irqfd
/// that raises the line. Shared by the transport (vCPU side) and the device (event loop
/// side), so the bits are atomic.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    pub fn line(&self) -> &IrqLine {
        &self.line
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts saved status bits back and, when any is set, pulses the line again (see
    /// [`mmio::MmioTransport::restore`] why).
    pub fn restore(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0
            && let Err(e) = self.line.pulse()
        {
            tracing::warn!("virtio interrupt on GSI {}: {e}", self.line.gsi());
        }
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets `bits` and pulses the line. An eventfd write fails only when its counter
    /// would overflow, which cannot happen while KVM drains it; nothing to do then.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.pulse() {
            tracing::warn!("virtio interrupt on GSI {}: {e}", self.line.gsi());
        }
    }
}

/// Why a device stopped processing: the guest broke the queue protocol badly enough that
/// only a device reset can recover (VIRTIO 1.x 2.1.2: the device sets NEEDS_RESET).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NeedsReset(pub String);

/// What a device's processing sees: guest memory, its queues and its interrupt.
pub struct QueueContext<'a> {
    pub mem: &'a GuestMemory,
    pub queues: &'a mut [Queue],
    pub interrupt: &'a Interrupt,
}

impl QueueContext<'_> {
    /// Serves queue `index` until the driver has nothing more for it: `serve_available`
    /// takes every available request and returns whether it used any. Driver
    /// notifications stay off while it runs (one kick is enough for a whole batch); they
    /// are re-enabled before the final check, so a request the driver adds in between is
    /// seen here instead of waiting for a kick it will never send. The driver is
    /// signalled once per pass, as event-index suppression allows.
    pub fn serve_queue(
        &mut self,
        index: usize,
        mut serve_available: impl FnMut(&mut Self) -> Result<bool, NeedsReset>,
    ) -> Result<(), NeedsReset> {
        loop {
            self.queues[index]
                .disable_notification(self.mem)
                .map_err(|e| NeedsReset(format!("queue {index}: avail ring: {e}")))?;
            if serve_available(self)? {
                self.notify_used(index)?;
            }
            let more = self.queues[index]
                .enable_notification(self.mem)
                .map_err(|e| NeedsReset(format!("queue {index}: avail ring: {e}")))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Signals the guest that queue `index` has used buffers, unless event-index
    /// suppression says the driver does not want to hear about them yet.
    pub fn notify_used(&mut self, index: usize) -> Result<(), NeedsReset> {
        let queue = &mut self.queues[index];
        let needed = queue
            .needs_notification(self.mem)
            .map_err(|e| NeedsReset(format!("queue {index}: used ring: {e}")))?;
        if needed {
            self.interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }
}

/// An event source a device wants watched besides its queue notifications (a tap fd).
#[derive(Debug, Clone, Copy)]
pub struct ExtraFd {
    pub fd: RawFd,
    /// epoll event mask (edge triggered where the device says so).
    pub events: u32,
}

/// One virtio device type. Everything here runs under the transport's lock: register
/// accesses on vCPU threads, processing on the event loop thread.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = net, 2 = block, 4 = entropy).
    fn device_type(&self) -> u32;
    /// Short name for logs ("virtio-blk").
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (device-specific bits plus [`COMMON_FEATURES`]).
    fn features(&self) -> u64;
    /// Reads the device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `acked` features: start working.
    fn activate(&mut self, acked: u64) -> Result<(), String>;
    /// The driver reset the device: drop in-flight state (queues are reset by the
    /// transport).
    fn reset(&mut self);
    /// Fds the event loop should watch for this device besides its queue notifiers.
    fn extra_fds(&self) -> Vec<ExtraFd> {
        Vec::new()
    }
    /// The guest notified queue `index`. Errors put the device in NEEDS_RESET.
    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, index: usize) -> Result<(), NeedsReset>;
    /// Extra fd number `index` (position in [`VirtioDevice::extra_fds`]) is ready.
    fn process_extra(&mut self, _ctx: &mut QueueContext<'_>, _index: usize, _events: u32) -> Result<(), NeedsReset> {
        Ok(())
    }
    /// What the device keeps beyond its queues and the transport's registers, for a
    /// snapshot ([`persist`]). Called between two processing calls, never inside one.
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Stateless
    }
    /// Puts [`VirtioDevice::save_state`]'s state back into a freshly opened, reset
    /// device, before the transport activates it again. Checks it first: a refused
    /// state changes nothing.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        persist::expect_stateless(self.name(), state)
    }
}

/// Reads `data.len()` bytes of a little-endian config space at `offset`, zero outside it.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| space.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// True when `features` has bit `bit`.
pub fn has_feature(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// Fresh queues of the given maximum sizes.
pub fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&size| Queue::new(size).unwrap_or_else(|_| panic!("queue size {size} is a power of two <= 32768")))
        .collect()
}
