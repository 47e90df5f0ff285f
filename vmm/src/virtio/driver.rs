//! The guest side of a split virtqueue, written straight into guest memory: what a
//! driver does, for exercising devices without a guest (unit tests, the fuzz test, the
//! benchmarks). Not used by the VMM itself.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// A buffer in a chain: guest address, length, device-writable?
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub fn r(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// Ring addresses and the driver's indices.
#[derive(Debug)]
pub struct SplitRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl SplitRing {
    /// Lays out a ring of `size` entries from `base` (descriptors, then the available
    /// ring, then the used ring at the next 4 KiB boundary). Zeroes the rings.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> SplitRing {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 0xfff) & !0xfff;
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (end - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base))
            .expect("ring inside guest memory");
        SplitRing {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A device-side queue configured for this ring, ready, as after DRIVER_OK.
    pub fn queue(&self, max_size: u16, event_idx: bool) -> Queue {
        let mut q = Queue::new(max_size).expect("valid max size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` as is (for malformed chains).
    pub fn put_desc(&self, mem: &GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            GuestAddress(self.desc + 16 * u64::from(index)),
        )
        .expect("descriptor table inside guest memory");
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Writes `bufs` as a chain of fresh descriptors and publishes it; returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if b.writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.put_desc(mem, index, b.addr, b.len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Used elements not seen yet: (head, bytes written).
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used elem");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used elem");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        // With EVENT_IDX: interrupt me at the next completion (used_event sits after the
        // available ring's entries), as Linux's driver asks after draining the ring.
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.used_seen.to_le(), GuestAddress(used_event))
            .expect("used_event");
        out
    }
}
