//! virtio-net over a tap (VIRTIO 1.x section 5.1): one receive and one transmit queue.
//!
//! Frames carry a 12-byte virtio-net header both ways; the tap is opened with
//! IFF_VNET_HDR and the same header size, so checksum and segmentation offload
//! metadata pass through untouched: the guest sends unchecksummed TSO super-frames
//! (HOST_TSO4/6, CSUM) and receives GRO'd ones (GUEST_TSO4/6, GUEST_CSUM) once
//! TUNSETOFFLOAD enables them for the features the driver accepted.
//!
//! Back-pressure, both directions:
//! - transmit: when the tap refuses a frame (EAGAIN), the chain goes back to the
//!   available ring and transmission waits for the tap's EPOLLOUT edge;
//! - receive: with no receive buffer posted, the frame read from the tap waits in the
//!   device and the tap is not read further until the guest posts buffers; meanwhile the
//!   kernel queues (and eventually drops) frames for the tap, as on a real NIC.
//!
//! The tap is watched edge-triggered, so readiness is remembered here (`tap_readable`,
//! `tx_blocked`) rather than re-armed.

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;

use super::persist::{self, NetState, VirtioDeviceState};
use super::queue_handler::{self, Chain, IovecBuf, Segment};
use super::tap::{NetBackend, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::{COMMON_FEATURES, ExtraFd, NeedsReset, QueueContext, VirtioDevice, has_feature, read_config_bytes};
use crate::device_counters::{DeviceCounters, DeviceKind};
use crate::state_error::StateError;
pub use crate::types::Mac;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame: a 64 KiB GSO super-frame plus Ethernet header and the vnet header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535;
/// Offset of `num_buffers` in the v1 header.
const NUM_BUFFERS_OFFSET: u64 = 10;

/// The virtio-net device.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: Mac,
    config: [u8; 12],
    acked: u64,
    chain: Chain,
    /// A frame read from the tap and not yet delivered (length in `rx_len`).
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// The tap may have frames: its last EPOLLIN edge was not drained to EAGAIN.
    tap_readable: bool,
    /// A transmit hit EAGAIN: wait for EPOLLOUT.
    tx_blocked: bool,
    /// Receive chains collected for the current frame: (head, writable segments).
    rx_chains: Vec<(u16, Vec<Segment>, u64)>,
    /// The available index when delivery last ran out of buffers.
    rx_avail_seen: u16,
    iov: IovecBuf,
    pub stats: NetStats,
    /// Received ("in") and sent ("out") frames and bytes for the control socket's `stats`.
    counters: Arc<DeviceCounters>,
}

/// Counters for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_blocked: u64,
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: Mac) -> Self {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac.0);
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Net {
            backend,
            mac,
            config,
            acked: 0,
            chain: Chain::default(),
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            tap_readable: true,
            tx_blocked: false,
            rx_chains: Vec::new(),
            rx_avail_seen: 0,
            iov: IovecBuf::default(),
            stats: NetStats::default(),
            counters: DeviceCounters::detached(DeviceKind::Net),
        }
    }

    /// Counts this NIC's frames in `counters` (from [`device_counters`]).
    pub fn with_counters(mut self, counters: Arc<DeviceCounters>) -> Self {
        self.counters = counters;
        self
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn mergeable(&self) -> bool {
        has_feature(self.acked, VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Sends what the guest queued for transmission until the queue is empty or the tap
    /// pushes back.
    fn transmit(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), NeedsReset> {
        if self.tx_blocked {
            return Ok(());
        }
        loop {
            let q = &mut ctx.queues[TX_QUEUE];
            q.disable_notification(ctx.mem)
                .map_err(|e| NeedsReset(format!("tx avail ring: {e}")))?;
            let mut used_any = false;
            while queue_handler::pop_chain(&mut ctx.queues[TX_QUEUE], ctx.mem, MAX_FRAME as u64, &mut self.chain)? {
                let c = &self.chain;
                if c.error.is_some() || !c.writable.is_empty() || c.readable_len <= VNET_HDR_LEN as u64 {
                    tracing::debug!("virtio-net: bad transmit chain dropped: {:?}", c.error);
                    self.stats.tx_dropped += 1;
                } else {
                    match self.write_frame(ctx) {
                        Ok(()) => {
                            self.stats.tx_frames += 1;
                            self.counters.add_out(self.chain.readable_len - VNET_HDR_LEN as u64);
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::ENOBUFS) => {
                            queue_handler::unpop_chain(&mut ctx.queues[TX_QUEUE]);
                            self.tx_blocked = true;
                            self.stats.tx_blocked += 1;
                            break;
                        }
                        Err(e) => {
                            // Like a NIC: a frame the network refuses is dropped.
                            tracing::debug!("virtio-net: tap write: {e}");
                            self.stats.tx_dropped += 1;
                        }
                    }
                }
                queue_handler::add_used(&mut ctx.queues[TX_QUEUE], ctx.mem, self.chain.head, 0)?;
                used_any = true;
            }
            if used_any {
                ctx.notify_used(TX_QUEUE)?;
            }
            if self.tx_blocked {
                return Ok(());
            }
            let more = ctx.queues[TX_QUEUE]
                .enable_notification(ctx.mem)
                .map_err(|e| NeedsReset(format!("tx avail ring: {e}")))?;
            if !more {
                return Ok(());
            }
        }
    }

    fn write_frame(&mut self, ctx: &QueueContext<'_>) -> std::io::Result<()> {
        queue_handler::chain_iovecs(
            ctx.mem,
            &self.chain.readable,
            0,
            self.chain.readable_len,
            &mut self.iov.0,
        );
        let result = loop {
            // SAFETY: the iovecs point into checked guest memory that outlives the call.
            let n = unsafe {
                libc::writev(
                    self.backend.as_raw_fd(),
                    self.iov.0.as_ptr(),
                    self.iov.0.len() as libc::c_int,
                )
            };
            if n >= 0 {
                break Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                break Err(e);
            }
        };
        self.iov.0.clear();
        result
    }

    /// Moves frames from the tap into receive buffers until the tap is empty or the
    /// guest has no buffers left.
    fn receive(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), NeedsReset> {
        let mut delivered_any = false;
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    break;
                }
                // SAFETY: reading into our own buffer.
                let n = unsafe {
                    libc::read(
                        self.backend.as_raw_fd(),
                        self.rx_buf.as_mut_ptr().cast(),
                        self.rx_buf.len(),
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        std::io::ErrorKind::Interrupted => continue,
                        std::io::ErrorKind::WouldBlock => self.tap_readable = false,
                        _ => {
                            tracing::warn!("virtio-net: tap read: {e}");
                            self.tap_readable = false;
                        }
                    }
                    break;
                }
                if (n as usize) <= VNET_HDR_LEN {
                    continue; // nothing but a header: not a frame
                }
                self.rx_len = n as usize;
            }
            if self.deliver(ctx)? {
                self.rx_len = 0;
                delivered_any = true;
                continue;
            }
            // Not enough buffers: ask the guest to kick us when it posts more, and retry
            // only if it already has (posted past what the failed attempt saw).
            ctx.queues[RX_QUEUE]
                .enable_notification(ctx.mem)
                .map_err(|e| NeedsReset(format!("rx avail ring: {e}")))?;
            let now = ctx.queues[RX_QUEUE]
                .avail_idx(ctx.mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| NeedsReset(format!("rx avail ring: {e}")))?
                .0;
            if now == self.rx_avail_seen {
                break;
            }
        }
        if delivered_any {
            ctx.notify_used(RX_QUEUE)?;
        }
        // Keep avail_event current so the guest kicks when it adds buffers.
        ctx.queues[RX_QUEUE]
            .enable_notification(ctx.mem)
            .map_err(|e| NeedsReset(format!("rx avail ring: {e}")))?;
        Ok(())
    }

    /// Copies the pending frame into receive chains. Ok(false): not enough buffers (the
    /// chains taken are put back, and `rx_avail_seen` says how far the guest had posted).
    ///
    /// A receive chain that is not a plain device-writable buffer inside guest memory
    /// means the driver's receive ring is broken: NEEDS_RESET. (Returning it unused
    /// instead would interleave with the chains held for a mergeable frame, which can
    /// then not be put back in order.)
    fn deliver(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, NeedsReset> {
        let frame_len = self.rx_len as u64;
        let mergeable = self.mergeable();
        let mut capacity = 0u64;
        self.rx_chains.clear();
        while capacity < frame_len {
            if !queue_handler::pop_chain(&mut ctx.queues[RX_QUEUE], ctx.mem, u64::from(u32::MAX), &mut self.chain)? {
                for _ in 0..self.rx_chains.len() {
                    queue_handler::unpop_chain(&mut ctx.queues[RX_QUEUE]);
                }
                self.rx_avail_seen = ctx.queues[RX_QUEUE]
                    .avail_idx(ctx.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| NeedsReset(format!("rx avail ring: {e}")))?
                    .0;
                return Ok(false);
            }
            let c = &self.chain;
            if let Some(e) = &c.error {
                return Err(NeedsReset(format!("receive buffer: {e}")));
            }
            if !c.readable.is_empty() || c.writable_len < VNET_HDR_LEN as u64 {
                return Err(NeedsReset(format!(
                    "receive buffer of {} device-readable and {} device-writable bytes",
                    c.readable_len, c.writable_len
                )));
            }
            if !mergeable && c.writable_len < frame_len {
                // One buffer must hold the whole frame without MRG_RXBUF: the frame is
                // too big for what this driver posts. Drop the frame, keep the buffer.
                queue_handler::unpop_chain(&mut ctx.queues[RX_QUEUE]);
                self.stats.rx_dropped += 1;
                return Ok(true);
            }
            capacity += c.writable_len;
            self.rx_chains.push((c.head, c.writable.clone(), c.writable_len));
        }
        let count = self.rx_chains.len() as u16;
        self.rx_buf[NUM_BUFFERS_OFFSET as usize..NUM_BUFFERS_OFFSET as usize + 2]
            .copy_from_slice(&(if mergeable { count } else { 1 }).to_le_bytes());
        let mut offset = 0usize;
        for (head, segments, cap) in &self.rx_chains {
            let n = (self.rx_len - offset).min(*cap as usize);
            let done = queue_handler::write_to(ctx.mem, segments, 0, &self.rx_buf[offset..offset + n]);
            offset += done;
            queue_handler::add_used(&mut ctx.queues[RX_QUEUE], ctx.mem, *head, done as u32)?;
        }
        self.stats.rx_frames += 1;
        self.counters.add_in(self.rx_len.saturating_sub(VNET_HDR_LEN) as u64);
        Ok(true)
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
            | [
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_MRG_RXBUF,
            ]
            .iter()
            .fold(0u64, |f, bit| f | 1 << bit)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked: u64) -> Result<(), String> {
        self.acked = acked;
        let mut offload = 0;
        if has_feature(acked, VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            if has_feature(acked, VIRTIO_NET_F_GUEST_TSO4) {
                offload |= TUN_F_TSO4;
            }
            if has_feature(acked, VIRTIO_NET_F_GUEST_TSO6) {
                offload |= TUN_F_TSO6;
            }
            if has_feature(acked, VIRTIO_NET_F_GUEST_ECN) {
                offload |= TUN_F_TSO_ECN;
            }
        }
        self.backend
            .set_offload(offload)
            .map_err(|e| format!("TUNSETOFFLOAD {offload:#x}: {e}"))?;
        self.tap_readable = true;
        self.tx_blocked = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.rx_len = 0;
        self.tap_readable = true;
        self.tx_blocked = false;
    }

    /// The MAC (to refuse another NIC) and an undelivered frame (so it is not lost);
    /// see [`persist`]. The statistics and counters are this process's, not the
    /// guest's, and start again at zero.
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(NetState {
            mac: self.mac.0,
            rx_frame: self.rx_buf[..self.rx_len].to_vec(),
            rx_avail_seen: self.rx_avail_seen,
        })
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        let VirtioDeviceState::Net(saved) = state else {
            return Err(persist::wrong_device_state(self.name(), state));
        };
        if saved.mac != self.mac.0 {
            return Err(StateError::Mismatch {
                what: self.name(),
                reason: format!("MAC {}, the saved guest's NIC had {}", self.mac, Mac(saved.mac)),
            });
        }
        let len = saved.rx_frame.len();
        // What `receive` keeps: more than a header, at most a frame.
        if len != 0 && !(VNET_HDR_LEN + 1..=MAX_FRAME).contains(&len) {
            return Err(StateError::Invalid {
                what: self.name(),
                reason: format!(
                    "a pending frame of {len} bytes, not {} to {MAX_FRAME}",
                    VNET_HDR_LEN + 1
                ),
            });
        }
        self.rx_buf[..len].copy_from_slice(&saved.rx_frame);
        self.rx_len = len;
        self.rx_avail_seen = saved.rx_avail_seen;
        Ok(())
    }

    fn extra_fds(&self) -> Vec<ExtraFd> {
        vec![ExtraFd {
            fd: self.backend.as_raw_fd(),
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
        }]
    }

    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, index: usize) -> Result<(), NeedsReset> {
        match index {
            RX_QUEUE => self.receive(ctx),
            TX_QUEUE => self.transmit(ctx),
            _ => Ok(()),
        }
    }

    fn process_extra(&mut self, ctx: &mut QueueContext<'_>, _index: usize, events: u32) -> Result<(), NeedsReset> {
        if events & libc::EPOLLOUT as u32 != 0 && self.tx_blocked {
            self.tx_blocked = false;
            self.transmit(ctx)?;
        }
        if events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            self.tap_readable = true;
            self.receive(ctx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
