//! virtio-net with a socket pair standing in for the tap, no KVM: frames both ways,
//! mergeable receive buffers, back-pressure both ways, malformed chains.

use std::os::fd::{AsRawFd, OwnedFd};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::IrqLine;
use crate::memory::GuestMemory;
use crate::virtio::driver::{Buf, SplitRing};
use crate::virtio::tap::SocketBackend;
use crate::virtio::{Interrupt, VIRTIO_F_VERSION_1};
use virtio_queue::Queue;

const RX_RING: u64 = 0x10000;
const TX_RING: u64 = 0x20000;
const BUFS: u64 = 0x40000;

struct Rig {
    mem: GuestMemory,
    rx: SplitRing,
    tx: SplitRing,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    dev: Net<SocketBackend>,
    peer: OwnedFd,
}

fn rig(features: u64) -> Rig {
    let (backend, peer) = SocketBackend::pair().unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let rx = SplitRing::new(&mem, RX_RING, 16);
    let tx = SplitRing::new(&mem, TX_RING, 16);
    let queues = vec![rx.queue(256, true), tx.queue(256, true)];
    let mut dev = Net::new(backend, Mac([2, 0, 0, 0, 0, 1]));
    dev.activate(1 << VIRTIO_F_VERSION_1 | features).unwrap();
    Rig {
        mem,
        rx,
        tx,
        queues,
        interrupt: Interrupt::new(IrqLine::new(5).unwrap()),
        dev,
        peer,
    }
}

impl Rig {
    fn ctx(&mut self) -> (QueueContext<'_>, &mut Net<SocketBackend>) {
        (
            QueueContext {
                mem: &self.mem,
                queues: &mut self.queues,
                interrupt: &self.interrupt,
            },
            &mut self.dev,
        )
    }
    fn queue(&mut self, index: usize) -> Result<(), NeedsReset> {
        let (mut ctx, dev) = self.ctx();
        dev.process_queue(&mut ctx, index)
    }
    fn tap_event(&mut self, events: i32) -> Result<(), NeedsReset> {
        let (mut ctx, dev) = self.ctx();
        dev.process_extra(&mut ctx, 0, events as u32)
    }
    fn peer_send(&self, frame: &[u8]) {
        // SAFETY: sending from a valid buffer on our socket.
        let n = unsafe { libc::send(self.peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n as usize, frame.len());
    }
    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        // SAFETY: receiving into a valid buffer.
        let n = unsafe {
            libc::recv(
                self.peer.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

/// A frame as the tap delivers it: 12-byte vnet header, then Ethernet.
fn frame(payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend([0xff; 6]);
    f.extend([2, 0, 0, 0, 0, 9]);
    f.extend([0x88, 0xb5]);
    f.extend(std::iter::repeat_n(fill, payload_len));
    f
}

#[test]
fn transmitted_frames_reach_the_tap_whole() {
    let mut r = rig(0);
    let f = frame(100, 0x42);
    // Header and frame in separate descriptors, as Linux sends them.
    r.mem.write_slice(&f[..12], GuestAddress(BUFS)).unwrap();
    r.mem.write_slice(&f[12..], GuestAddress(BUFS + 0x1000)).unwrap();
    r.tx.add_chain(&r.mem, &[Buf::r(BUFS, 12), Buf::r(BUFS + 0x1000, f.len() as u32 - 12)]);
    r.queue(TX_QUEUE).unwrap();
    assert_eq!(r.peer_recv().as_deref(), Some(&f[..]));
    assert_eq!(r.tx.take_used(&r.mem), vec![(0, 0)]);
    assert_eq!(r.dev.stats.tx_frames, 1);
}

#[test]
fn received_frame_lands_in_a_posted_buffer() {
    let mut r = rig(0);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 2048)]);
    let f = frame(60, 0x17);
    r.peer_send(&f);
    r.tap_event(libc::EPOLLIN).unwrap();
    assert_eq!(r.rx.take_used(&r.mem), vec![(0, f.len() as u32)]);
    let mut got = vec![0u8; f.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got[12..], f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
}

#[test]
fn frames_both_ways_are_counted_for_stats() {
    let counters = DeviceCounters::detached(DeviceKind::Net);
    let mut r = rig(0);
    let (backend, peer) = SocketBackend::pair().unwrap();
    let mut dev = Net::new(backend, Mac([2, 0, 0, 0, 0, 1])).with_counters(counters.clone());
    dev.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    r.dev = dev;
    r.peer = peer;

    let out = frame(100, 0x42);
    r.mem.write_slice(&out, GuestAddress(BUFS)).unwrap();
    r.tx.add_chain(&r.mem, &[Buf::r(BUFS, out.len() as u32)]);
    r.queue(TX_QUEUE).unwrap();
    assert_eq!(r.peer_recv().as_deref(), Some(&out[..]));

    r.rx.add_chain(&r.mem, &[Buf::w(BUFS + 0x1000, 2048)]);
    let inbound = frame(60, 0x17);
    r.peer_send(&inbound);
    r.tap_event(libc::EPOLLIN).unwrap();
    assert_eq!(r.rx.take_used(&r.mem).len(), 1);

    // Bytes are Ethernet frames, without the vnet header.
    let s = counters.snapshot("virtio-net0");
    assert_eq!(
        (s.ops_out, s.bytes_out),
        (1, (out.len() - VNET_HDR_LEN) as u64),
        "{s:?}"
    );
    assert_eq!(
        (s.ops_in, s.bytes_in),
        (1, (inbound.len() - VNET_HDR_LEN) as u64),
        "{s:?}"
    );
}

#[test]
fn mergeable_buffers_carry_a_big_frame() {
    let mut r = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
    for i in 0..4 {
        r.rx.add_chain(&r.mem, &[Buf::w(BUFS + i * 0x1000, 1526)]);
    }
    let f = frame(4000, 0x33);
    r.peer_send(&f);
    r.tap_event(libc::EPOLLIN).unwrap();
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(used.iter().map(|u| u.1 as usize).sum::<usize>(), f.len());
    let mut first = [0u8; 12];
    r.mem.read_slice(&mut first, GuestAddress(BUFS)).unwrap();
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
    let mut tail = [0u8; 1];
    r.mem
        .read_slice(&mut tail, GuestAddress(BUFS + 0x2000 + (f.len() - 2 * 1526 - 1) as u64))
        .unwrap();
    assert_eq!(tail[0], 0x33);
}

#[test]
fn receive_waits_for_buffers_then_delivers() {
    let mut r = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
    let f = frame(200, 0x01);
    r.peer_send(&f);
    r.peer_send(&frame(300, 0x02));
    // No buffers: the frame is held, nothing is lost, the tap is not drained further.
    r.tap_event(libc::EPOLLIN).unwrap();
    assert!(r.rx.take_used(&r.mem).is_empty());
    assert_eq!(r.dev.stats.rx_frames, 0);
    // The guest posts one buffer and kicks the receive queue.
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 2048)]);
    r.queue(RX_QUEUE).unwrap();
    assert_eq!(r.rx.take_used(&r.mem), vec![(0, f.len() as u32)]);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 2048)]);
    r.queue(RX_QUEUE).unwrap();
    assert_eq!(r.rx.take_used(&r.mem).len(), 1, "second frame delivered");
    assert_eq!(r.dev.stats.rx_frames, 2);
}

#[test]
fn transmit_stops_when_the_tap_is_full_and_resumes_on_epollout() {
    let mut r = rig(0);
    let f = frame(60000, 0x55);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    // Queue more than the socket buffer holds.
    let mut sent = 0;
    for _ in 0..12 {
        r.tx.add_chain(&r.mem, &[Buf::r(BUFS, f.len() as u32)]);
        sent += 1;
    }
    r.queue(TX_QUEUE).unwrap();
    let first_round = r.tx.take_used(&r.mem).len();
    assert!(first_round < sent, "back-pressure kicked in after {first_round}");
    assert!(r.dev.stats.tx_blocked > 0);
    // Drain the peer; each EPOLLOUT resumes transmission until the ring is empty.
    let mut received = 0;
    let mut completed = first_round;
    for _ in 0..sent {
        while r.peer_recv().is_some() {
            received += 1;
        }
        r.tap_event(libc::EPOLLOUT).unwrap();
        completed += r.tx.take_used(&r.mem).len();
        if completed == sent {
            break;
        }
    }
    while r.peer_recv().is_some() {
        received += 1;
    }
    assert_eq!(completed, sent);
    assert_eq!(received, sent, "no frame lost");
    assert_eq!(r.dev.stats.tx_dropped, 0);
}

#[test]
fn malformed_chains_are_dropped_not_fatal() {
    let mut r = rig(0);
    // Transmit: only a header, a writable buffer, a buffer outside memory.
    r.tx.add_chain(&r.mem, &[Buf::r(BUFS, 12)]);
    r.tx.add_chain(&r.mem, &[Buf::r(BUFS, 12), Buf::w(BUFS + 0x1000, 100)]);
    r.tx.add_chain(&r.mem, &[Buf::r(0xfff_0000, 100)]);
    r.queue(TX_QUEUE).unwrap();
    assert_eq!(r.tx.take_used(&r.mem).len(), 3);
    assert_eq!(r.dev.stats.tx_dropped, 3);
    assert!(r.peer_recv().is_none());
    // Receive: a buffer outside memory, or a device-readable one, breaks the receive
    // ring (chains held for a mergeable frame could not be put back in order): NEEDS_RESET.
    r.rx.add_chain(&r.mem, &[Buf::w(u64::MAX - 10, 2048)]);
    r.peer_send(&frame(64, 0x77));
    let e = r.tap_event(libc::EPOLLIN).unwrap_err();
    assert!(e.0.contains("receive buffer"), "{e}");
    let mut r = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 1526)]);
    r.rx.add_chain(&r.mem, &[Buf::r(BUFS, 1526)]);
    r.peer_send(&frame(3000, 0x77));
    assert!(r.tap_event(libc::EPOLLIN).is_err());
}

#[test]
fn mergeable_frame_waits_for_enough_buffers() {
    let mut r = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 1526)]);
    r.peer_send(&frame(3000, 0x66));
    // One buffer is not enough: nothing delivered, and the device does not spin.
    r.tap_event(libc::EPOLLIN).unwrap();
    assert!(r.rx.take_used(&r.mem).is_empty());
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS + 0x1000, 1526)]);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS + 0x2000, 1526)]);
    r.queue(RX_QUEUE).unwrap();
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(used[0].0, 0, "the first buffer goes first");
}

#[test]
fn frame_too_big_for_a_non_mergeable_buffer_is_dropped() {
    let mut r = rig(0);
    r.rx.add_chain(&r.mem, &[Buf::w(BUFS, 100)]);
    r.peer_send(&frame(500, 1));
    r.tap_event(libc::EPOLLIN).unwrap();
    assert!(r.rx.take_used(&r.mem).is_empty(), "buffer kept for the next frame");
    assert_eq!(r.dev.stats.rx_dropped, 1);
    r.peer_send(&frame(40, 2));
    r.tap_event(libc::EPOLLIN).unwrap();
    assert_eq!(r.rx.take_used(&r.mem).len(), 1);
}

#[test]
fn offloads_follow_the_acked_features() {
    let r = rig(0);
    assert_ne!(r.dev.features() & 1 << VIRTIO_NET_F_MRG_RXBUF, 0);
    assert_ne!(r.dev.features() & 1 << VIRTIO_NET_F_HOST_TSO4, 0);
    let mut mac = [0u8; 6];
    r.dev.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    assert_eq!(
        "52:54:00:ab:cd:ef".parse::<Mac>().unwrap().to_string(),
        "52:54:00:ab:cd:ef"
    );
    let m = Mac::random();
    assert_eq!(m.0[0] & 3, 2, "locally administered unicast: {m}");
}

#[test]
fn an_undelivered_frame_survives_save_and_restore() {
    let mut r = rig(0);
    let f = frame(200, 0x33);
    r.peer_send(&f);
    r.tap_event(libc::EPOLLIN).unwrap();
    assert!(
        r.rx.take_used(&r.mem).is_empty(),
        "no buffer: the frame waits in the device"
    );
    let saved = r.dev.save_state();
    let VirtioDeviceState::Net(net) = &saved else {
        panic!("{saved:?}")
    };
    assert_eq!((net.mac, net.rx_frame.as_slice()), ([2, 0, 0, 0, 0, 1], &f[..]));
    let json = serde_json::to_string(&saved).unwrap();
    assert_eq!(serde_json::from_str::<VirtioDeviceState>(&json).unwrap(), saved);

    // Another tap, the same MAC: the guest posts a buffer and gets the frame.
    let mut n = rig(0);
    n.dev.restore_state(&saved).unwrap();
    assert_eq!(n.dev.save_state(), saved);
    n.rx.add_chain(&n.mem, &[Buf::w(BUFS, 2048)]);
    n.queue(RX_QUEUE).unwrap();
    assert_eq!(n.rx.take_used(&n.mem), vec![(0, f.len() as u32)]);
    let mut got = vec![0u8; f.len()];
    n.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got[12..], f[12..]);
    assert_eq!(n.dev.save_state(), rig(0).dev.save_state(), "nothing pending any more");
}

#[test]
fn foreign_net_states_are_refused() {
    let mut r = rig(0);
    let fresh = r.dev.save_state();
    let net = |mac: [u8; 6], rx_frame: Vec<u8>| {
        VirtioDeviceState::Net(persist::NetState {
            mac,
            rx_frame,
            rx_avail_seen: 0,
        })
    };
    let other_mac = net([2, 0, 0, 0, 0, 2], Vec::new());
    let block = VirtioDeviceState::Block(persist::BlockState { capacity_sectors: 1 });
    for state in [&other_mac, &block, &VirtioDeviceState::Stateless] {
        let e = r.dev.restore_state(state).unwrap_err();
        assert!(matches!(e, StateError::Mismatch { what: "virtio-net", .. }), "{e:?}");
    }
    for len in [VNET_HDR_LEN, MAX_FRAME + 1] {
        let e = r.dev.restore_state(&net([2, 0, 0, 0, 0, 1], vec![0; len])).unwrap_err();
        assert!(
            matches!(e, StateError::Invalid { what: "virtio-net", .. }),
            "{len}: {e:?}"
        );
    }
    assert_eq!(r.dev.save_state(), fresh, "refused states change nothing");
}
