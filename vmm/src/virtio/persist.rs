//! Saving and restoring a virtio device behind its virtio-mmio transport, for a
//! snapshot or a migration ([`crate::persist`]): the transport's registers and
//! interrupt status, every queue's configuration and ring positions (virtio-queue's
//! `QueueState`, mirrored so it serializes), and what the device type keeps beyond
//! them ([`VirtioDeviceState`]).
//!
//! What the devices keep:
//! - block: nothing in flight (every notification is served to completion under the
//!   transport's lock, so no request is half done at a save). Its capacity is carried
//!   only to refuse a disk that changed size: the guest's file system was sized by it.
//! - net: a frame read from the tap but not yet delivered (the guest had no receive
//!   buffer), so it is not lost, and the MAC, to refuse a NIC the guest does not know.
//!   Tap readiness is not carried: the tap is a new one, and activation starts by
//!   trying it both ways.
//! - rng: nothing.
//!
//! The saved state comes from a file: everything is checked before anything changes,
//! against the device it is restored into (type, queue count and sizes, offered
//! features) and against itself (queue sizes powers of two within the maximum, ring
//! alignment, in-flight counts within the queue, a status the transport can reach).
//! Rings are checked against guest memory when the device was running, exactly as
//! DRIVER_OK checks them; a ready queue of a device not yet running is checked when the
//! guest sets DRIVER_OK, as it would have been.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::MmioTransport;
use super::{INT_CONFIG_CHANGE, INT_USED_RING, VIRTIO_F_VERSION_1, VirtioDevice, has_feature};
use crate::memory::GuestMemory;
use crate::state_error::StateError;

/// One virtqueue: what the driver configured and how far both sides got. The indices
/// are free-running 16-bit counters, as in the rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSavedState {
    /// The device's maximum (QueueNumMax): must match the device restored into.
    pub max_size: u16,
    /// The size the driver chose (QueueNum).
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated and is in use on this queue.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSavedState {
    fn from(s: QueueState) -> Self {
        QueueSavedState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<&QueueSavedState> for QueueState {
    fn from(s: &QueueSavedState) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// virtio-blk's own state: see the module doc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// The capacity the guest was shown, in 512-byte sectors.
    pub capacity_sectors: u64,
}

/// virtio-net's own state: see the module doc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address the guest was shown.
    pub mac: [u8; 6],
    /// A frame read from the tap and not yet delivered, vnet header first; empty when
    /// there is none.
    pub rx_frame: Vec<u8>,
    /// The available index when delivering `rx_frame` last ran out of buffers.
    pub rx_avail_seen: u16,
}

/// What a device type keeps beyond its queues and the transport's registers
/// ([`VirtioDevice::save_state`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// Nothing (virtio-rng).
    Stateless,
    Block(BlockState),
    Net(NetState),
}

impl VirtioDeviceState {
    fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Stateless => "a stateless device's",
            VirtioDeviceState::Block(_) => "virtio-blk's",
            VirtioDeviceState::Net(_) => "virtio-net's",
        }
    }
}

/// The refusal of a device-specific state of another device type (`what` is the
/// device's name).
pub fn wrong_device_state(what: &'static str, state: &VirtioDeviceState) -> StateError {
    StateError::Mismatch {
        what,
        reason: format!("{} state was saved for it", state.kind()),
    }
}

/// [`VirtioDevice::restore_state`] of a device that keeps nothing.
pub fn expect_stateless(what: &'static str, state: &VirtioDeviceState) -> Result<(), StateError> {
    match state {
        VirtioDeviceState::Stateless => Ok(()),
        other => Err(wrong_device_state(what, other)),
    }
}

/// A virtio-mmio transport, its queues and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioTransportState {
    /// The virtio device ID (1 net, 2 block, 4 rng): a restore into another kind of
    /// device is refused.
    pub device_type: u32,
    /// The device status the driver wrote, without NEEDS_RESET (that is `needs_reset`).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver acked (DriverFeatures, both halves).
    pub acked_features: u64,
    /// QueueSel as the guest left it: any value, as the guest may write any.
    pub queue_sel: u32,
    pub config_generation: u32,
    /// InterruptStatus bits the driver has not acknowledged.
    pub interrupt_status: u32,
    /// The device was activated (DRIVER_OK accepted): a restore activates it again.
    pub active: bool,
    /// The driver broke a queue (or activation failed) and must reset the device.
    pub needs_reset: bool,
    pub queues: Vec<QueueSavedState>,
    pub device: VirtioDeviceState,
}

impl MmioTransport {
    pub fn state(&self) -> VirtioTransportState {
        VirtioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
            needs_reset: self.needs_reset,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.device.save_state(),
        }
    }

    /// Puts `state` into this freshly built transport (its device opened on the
    /// restored VM's backends, over the restored guest memory), before any vCPU runs.
    ///
    /// A device that was running is activated again with the saved features and
    /// queues, as the guest's DRIVER_OK did, without the guest writing anything. Each
    /// of its ready queues then gets one notification: work the saved device had seen
    /// but not finished (a transmit waiting for the tap, which suppresses the guest's
    /// kicks meanwhile) would otherwise wait for a kick that never comes; for a queue
    /// with nothing new it is a spurious notification, which changes nothing. Unacked
    /// interrupt status is raised again: the irqchip's saved state usually has the
    /// edge already, and drivers read InterruptStatus and ignore an empty interrupt.
    ///
    /// A state refused by the transport's checks leaves the transport as it was; one
    /// its device refuses, or a device that cannot be activated, leaves it reset (for
    /// the fresh transport a restore is meant for, also as it was).
    pub fn restore(&mut self, state: &VirtioTransportState) -> Result<(), StateError> {
        let queues = check(state, self.device.as_ref(), &self.mem)?;
        self.reset();
        self.device.restore_state(&state.device)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.needs_reset = state.needs_reset;
        if state.active {
            if let Err(why) = self.try_activate() {
                self.reset();
                return Err(StateError::Mismatch {
                    what: self.device.name(),
                    reason: format!("the restored device cannot run here: {why}"),
                });
            }
            if !self.needs_reset {
                for (q, evt) in self.queues.iter().zip(&self.queue_evts) {
                    if q.ready() {
                        // Fails only if the counter would overflow: then it is pending.
                        let _ = evt.write(1);
                    }
                }
            }
        }
        self.interrupt.restore(state.interrupt_status);
        Ok(())
    }
}

/// Checks a saved transport against the device and memory it goes into and against
/// itself; returns its queues, ready to install.
fn check(state: &VirtioTransportState, device: &dyn VirtioDevice, mem: &GuestMemory) -> Result<Vec<Queue>, StateError> {
    let what = device.name();
    let mismatch = |reason: String| StateError::Mismatch { what, reason };
    let invalid = |reason: String| StateError::Invalid { what, reason };
    if state.device_type != device.device_type() {
        return Err(mismatch(format!(
            "a device of type {} was saved, this one is type {}",
            state.device_type,
            device.device_type()
        )));
    }
    let max_sizes = device.queue_max_sizes();
    if state.queues.len() != max_sizes.len() {
        return Err(mismatch(format!(
            "{} queues were saved, the device has {}",
            state.queues.len(),
            max_sizes.len()
        )));
    }
    check_status(state, device.features()).map_err(|e| match e {
        StatusError::Mismatch(reason) => mismatch(reason),
        StatusError::Invalid(reason) => invalid(reason),
    })?;
    let event_idx = has_feature(state.acked_features, VIRTIO_RING_F_EVENT_IDX);
    let mut queues = Vec::with_capacity(max_sizes.len());
    for (i, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
        if saved.max_size != max {
            return Err(mismatch(format!(
                "queue {i} had at most {} entries, this device offers {max}",
                saved.max_size
            )));
        }
        // Sizes (a power of two, 1..=max) and ring alignment.
        let q = Queue::try_from(QueueState::from(saved)).map_err(|e| {
            invalid(format!(
                "queue {i} (size {}, descriptors {:#x}, avail {:#x}, used {:#x}): {e}",
                saved.size, saved.desc_table, saved.avail_ring, saved.used_ring
            ))
        })?;
        // The device cannot have used more chains than it took, nor hold more than the
        // ring has entries.
        let in_flight = saved.next_avail.wrapping_sub(saved.next_used);
        if in_flight > saved.size {
            return Err(invalid(format!(
                "queue {i}: next available {} is {in_flight} entries past next used {}, the queue has {}",
                saved.next_avail, saved.next_used, saved.size
            )));
        }
        if state.active && saved.ready {
            if !q.is_valid(mem) {
                return Err(invalid(format!(
                    "queue {i} (size {}, descriptors {:#x}, avail {:#x}, used {:#x}) is not inside guest memory",
                    saved.size, saved.desc_table, saved.avail_ring, saved.used_ring
                )));
            }
            if saved.event_idx_enabled != event_idx {
                return Err(invalid(format!(
                    "queue {i}: event index {} but the feature was {}acked",
                    if saved.event_idx_enabled { "on" } else { "off" },
                    if event_idx { "" } else { "not " }
                )));
            }
        }
        queues.push(q);
    }
    Ok(queues)
}

enum StatusError {
    Mismatch(String),
    Invalid(String),
}

/// The status, features and flags must be ones the transport can reach (see
/// `MmioTransport::set_status`): FEATURES_OK only with acceptable features, DRIVER_OK
/// only after FEATURES_OK, active only with DRIVER_OK, and DRIVER_OK without activity
/// only when activation failed (NEEDS_RESET). Other status bits a driver may write are
/// kept by the transport and carried as they are.
fn check_status(state: &VirtioTransportState, offered: u64) -> Result<(), StatusError> {
    let status = state.status;
    let has = |bit: u32| status & bit != 0;
    let bad = |reason: String| Err(StatusError::Invalid(reason));
    if has(VIRTIO_CONFIG_S_NEEDS_RESET) {
        return bad(format!(
            "status {status:#x} holds NEEDS_RESET, which the transport keeps apart"
        ));
    }
    if has(VIRTIO_CONFIG_S_FEATURES_OK) {
        let extra = state.acked_features & !offered;
        if extra != 0 {
            // The saved device offered them: this one is not the same device.
            return Err(StatusError::Mismatch(format!(
                "the driver acked features {extra:#x} this device does not offer ({offered:#x})"
            )));
        }
        if !has_feature(state.acked_features, VIRTIO_F_VERSION_1) {
            return bad(format!(
                "FEATURES_OK with features {:#x}, without VERSION_1",
                state.acked_features
            ));
        }
    }
    if has(VIRTIO_CONFIG_S_DRIVER_OK) && !has(VIRTIO_CONFIG_S_FEATURES_OK) {
        return bad(format!("status {status:#x}: DRIVER_OK without FEATURES_OK"));
    }
    if state.active && !has(VIRTIO_CONFIG_S_DRIVER_OK) {
        return bad(format!("active with status {status:#x}, without DRIVER_OK"));
    }
    if has(VIRTIO_CONFIG_S_DRIVER_OK) && !state.active && !state.needs_reset {
        return bad(format!(
            "status {status:#x} has DRIVER_OK but the device neither ran nor failed"
        ));
    }
    let unknown = state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE);
    if unknown != 0 {
        return bad(format!("interrupt status bits {unknown:#x} do not exist"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
