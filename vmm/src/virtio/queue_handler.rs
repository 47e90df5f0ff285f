//! Descriptor chains out of guest memory, parsed strictly.
//!
//! virtio-queue's own chain iterator ends quietly on a bad descriptor, which would make a
//! malformed chain look like a short one. Devices here need to tell the two apart, so
//! this module walks the chain itself (using virtio-queue for the rings and its
//! descriptor type) and checks everything a guest controls:
//!
//! - every descriptor index against its table, every table and buffer against guest
//!   memory (with overflow-checked arithmetic), so no host access can leave guest RAM;
//! - chain length against the table size (a loop runs into that limit), indirect tables
//!   (no nesting, no NEXT beside INDIRECT, length a multiple of 16);
//! - device-readable buffers before device-writable ones, no zero-length buffers, and a
//!   per-device limit on the bytes a request may carry.
//!
//! Errors come in two kinds. A broken ring or descriptor table ([`ChainError::is_fatal`])
//! means the driver lost track of the queue: the device reports NEEDS_RESET and stops
//! touching it. A bad buffer only fails that one request: the chain is still returned to
//! the used ring so the driver gets its descriptors back.

use std::num::Wrapping;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::NeedsReset;
use crate::memory::GuestMemory;

const DESC_SIZE: u64 = 16;

/// One guest buffer of a chain, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Something wrong with a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {index} is outside a table of {size} entries")]
    BadIndex { index: u16, size: u16 },
    #[error("descriptor chain has more than {limit} descriptors (a loop?)")]
    TooLong { limit: u32 },
    #[error("descriptor table entry at {0:#x} is outside guest memory")]
    TableOutside(u64),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with {0}")]
    BadIndirect(&'static str),
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutside { addr: u64, len: u32 },
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    #[error("zero-length buffer")]
    ZeroLength,
    #[error("request of more than {limit} bytes")]
    TooBig { limit: u64 },
}

impl ChainError {
    /// True when the ring or descriptor table itself is broken (NEEDS_RESET); false when
    /// only this request is bad.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ChainError::BadIndex { .. }
                | ChainError::TooLong { .. }
                | ChainError::TableOutside(_)
                | ChainError::NestedIndirect
                | ChainError::BadIndirect(_)
        )
    }
}

/// A parsed chain: its head (to return it to the used ring), its device-readable and
/// device-writable buffers in order, and the first request-level problem, if any.
/// Buffers are reused between requests to keep allocation off the I/O path.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub readable_len: u64,
    pub writable_len: u64,
    /// A non-fatal problem: the request must fail. Parsing went on past it so the device
    /// still knows the chain's last buffer (e.g. virtio-blk's status byte).
    pub error: Option<ChainError>,
    /// True when the chain's last descriptor is a valid device-writable buffer, i.e. the
    /// last byte of `writable` is where the driver expects a status.
    pub ends_writable: bool,
}

impl Chain {
    fn clear(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.error = None;
        self.ends_writable = false;
    }

    fn fail(&mut self, e: ChainError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// Walks the chain starting at `head` in the table at `table` of `size` entries.
/// `max_bytes` bounds the total buffer length of one request.
pub fn parse_chain(
    mem: &GuestMemory,
    table: GuestAddress,
    size: u16,
    head: u16,
    max_bytes: u64,
    out: &mut Chain,
) -> Result<(), ChainError> {
    out.clear(head);
    let mut table = table;
    let mut size = size;
    let mut index = head;
    let mut in_indirect = false;
    // Each table allows at most `size` descriptors: a chain that visits more loops.
    let mut left = u32::from(size);
    let mut total: u64 = 0;
    loop {
        if index >= size {
            return Err(ChainError::BadIndex { index, size });
        }
        if left == 0 {
            return Err(ChainError::TooLong { limit: u32::from(size) });
        }
        left -= 1;
        let at = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::TableOutside(table.0))?;
        let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::TableOutside(at.0))?;

        if desc.refers_to_indirect_table() {
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(ChainError::BadIndirect("NEXT also set"));
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || u64::from(len) / DESC_SIZE > u64::from(u16::MAX) {
                return Err(ChainError::BadIndirect("a table length that is not a multiple of 16"));
            }
            if !mem.check_range(desc.addr(), len as usize) {
                return Err(ChainError::TableOutside(desc.addr().0));
            }
            table = desc.addr();
            size = (u64::from(len) / DESC_SIZE) as u16;
            left = u32::from(size);
            index = 0;
            in_indirect = true;
            continue;
        }

        let len = desc.len();
        let writable = desc.is_write_only();
        let mut valid = true;
        if len == 0 {
            out.fail(ChainError::ZeroLength);
            valid = false;
        } else if desc.addr().checked_add(u64::from(len)).is_none() || !mem.check_range(desc.addr(), len as usize) {
            out.fail(ChainError::BufferOutside {
                addr: desc.addr().0,
                len,
            });
            valid = false;
        }
        if !writable && !out.writable.is_empty() {
            out.fail(ChainError::ReadableAfterWritable);
            valid = false;
        }
        // Only the buffer that crosses the limit is refused, so a status byte after an
        // oversized data buffer can still report the failure.
        if total + u64::from(len) > max_bytes {
            out.fail(ChainError::TooBig { limit: max_bytes });
            valid = false;
        } else {
            total += u64::from(len);
        }
        if valid {
            let seg = Segment { addr: desc.addr(), len };
            if writable {
                out.writable.push(seg);
                out.writable_len += u64::from(len);
            } else {
                out.readable.push(seg);
                out.readable_len += u64::from(len);
            }
        }
        if !desc.has_next() {
            out.ends_writable = valid && writable;
            return Ok(());
        }
        index = desc.next();
    }
}

/// Takes the next available chain of `queue` into `out`. `Ok(false)`: nothing available.
/// A broken available ring or descriptor table is a NEEDS_RESET error.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemory, max_bytes: u64, out: &mut Chain) -> Result<bool, NeedsReset> {
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let head = {
        let mut iter = queue
            .iter(mem)
            .map_err(|e| NeedsReset(format!("available ring: {e}")))?;
        match iter.next() {
            Some(chain) => chain.head_index(),
            None => return Ok(false),
        }
    };
    // parse_chain returns only fatal errors; request-level ones are in `out.error`.
    parse_chain(mem, table, size, head, max_bytes, out)
        .map(|()| true)
        .map_err(|e| NeedsReset(format!("chain at head {head}: {e}")))
}

/// Puts the last popped chain back (the device could not take it now: back-pressure).
pub fn unpop_chain(queue: &mut Queue) {
    let next = Wrapping(queue.next_avail()) - Wrapping(1);
    queue.set_next_avail(next.0);
}

/// Returns chain `head` to the driver with `len` bytes written.
pub fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> Result<(), NeedsReset> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| NeedsReset(format!("used ring: {e}")))
}

/// Calls `f` with each host slice making up `segments`, from byte `skip` on, at most
/// `limit` bytes. Segments were checked against guest memory when parsed, so a failure
/// here means the memory map changed, which it never does while devices run.
fn for_each_slice<'m>(
    mem: &'m GuestMemory,
    segments: &[Segment],
    mut skip: u64,
    mut limit: u64,
    mut f: impl FnMut(VolatileSlice<'m>),
) {
    for seg in segments {
        if limit == 0 {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(limit);
        let start = seg.addr.unchecked_add(skip);
        skip = 0;
        limit -= take;
        for slice in mem.get_slices(start, take as usize).flatten() {
            f(slice);
        }
    }
}

/// The host slices making up `segments`, from byte `skip` on, at most `limit` bytes.
pub fn slices<'m>(mem: &'m GuestMemory, segments: &[Segment], skip: u64, limit: u64, out: &mut Vec<VolatileSlice<'m>>) {
    out.clear();
    for_each_slice(mem, segments, skip, limit, |slice| out.push(slice));
}

/// The segment holding byte `offset` of the chain and the offset inside it.
fn locate(segments: &[Segment], mut offset: u64) -> Option<(usize, u64)> {
    for (i, seg) in segments.iter().enumerate() {
        if offset < u64::from(seg.len) {
            return Some((i, offset));
        }
        offset -= u64::from(seg.len);
    }
    None
}

/// Copies from the chain's buffers (from byte `offset`) into `buf`; returns bytes copied.
pub fn read_from(mem: &GuestMemory, segments: &[Segment], offset: u64, buf: &mut [u8]) -> usize {
    // Fast path, no allocation: the bytes sit in one buffer (request headers do).
    if let Some((i, at)) = locate(segments, offset)
        && at + buf.len() as u64 <= u64::from(segments[i].len)
    {
        return match mem.read_slice(buf, segments[i].addr.unchecked_add(at)) {
            Ok(()) => buf.len(),
            Err(_) => 0,
        };
    }
    let mut done = 0;
    let mut parts = Vec::new();
    slices(mem, segments, offset, buf.len() as u64, &mut parts);
    for s in parts {
        done += s.copy_to(&mut buf[done..]);
    }
    done
}

/// Copies `buf` into the chain's buffers at byte `offset`; returns bytes copied.
pub fn write_to(mem: &GuestMemory, segments: &[Segment], offset: u64, buf: &[u8]) -> usize {
    if let Some((i, at)) = locate(segments, offset)
        && at + buf.len() as u64 <= u64::from(segments[i].len)
    {
        return match mem.write_slice(buf, segments[i].addr.unchecked_add(at)) {
            Ok(()) => buf.len(),
            Err(_) => 0,
        };
    }
    let mut done = 0;
    let mut parts = Vec::new();
    slices(mem, segments, offset, buf.len() as u64, &mut parts);
    for s in parts {
        let n = s.len().min(buf.len() - done);
        s.copy_from(&buf[done..done + n]);
        done += n;
    }
    done
}

/// Appends iovecs for bytes `skip..skip + limit` of the chain straight to `out` (no
/// intermediate allocation: this is the per-request data path).
pub fn chain_iovecs(mem: &GuestMemory, segments: &[Segment], skip: u64, limit: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    for_each_slice(mem, segments, skip, limit, |slice| {
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        })
    });
}

/// A reusable iovec vector for [`chain_iovecs`]. Its raw pointers only live for one
/// request, inside the device thread, so sending the (empty) vector between threads is fine.
#[derive(Default)]
pub struct IovecBuf(pub Vec<libc::iovec>);
// SAFETY: the iovecs are filled and used within one request on one thread and cleared
// before the next; no pointer outlives the guest-memory borrow it came from.
unsafe impl Send for IovecBuf {}

#[cfg(test)]
pub mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const TABLE: u64 = 0x1000;
    const MEM: usize = 0x10_0000;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn put(mem: &GuestMemory, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            GuestAddress(table + u64::from(index) * 16),
        )
        .unwrap();
    }

    fn parse(mem: &GuestMemory, size: u16, head: u16) -> (Result<(), ChainError>, Chain) {
        let mut chain = Chain::default();
        let r = parse_chain(mem, GuestAddress(TABLE), size, head, 1 << 20, &mut chain);
        (r, chain)
    }

    #[test]
    fn well_formed_chain_splits_readable_and_writable() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 16, NEXT, 3);
        put(&m, TABLE, 3, 0x9000, 512, NEXT | WRITE, 5);
        put(&m, TABLE, 5, 0xa000, 1, WRITE, 0);
        let (r, c) = parse(&m, 8, 0);
        assert_eq!(r, Ok(()));
        assert_eq!(c.error, None);
        assert_eq!(
            c.readable,
            vec![Segment {
                addr: GuestAddress(0x8000),
                len: 16
            }]
        );
        assert_eq!(c.writable.len(), 2);
        assert_eq!((c.readable_len, c.writable_len), (16, 513));
        assert!(c.ends_writable);
    }

    #[test]
    fn loop_is_fatal() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 16, NEXT, 1);
        put(&m, TABLE, 1, 0x8000, 16, NEXT, 0);
        let (r, _) = parse(&m, 8, 0);
        assert_eq!(r, Err(ChainError::TooLong { limit: 8 }));
        assert!(r.unwrap_err().is_fatal());
        // A self-loop too.
        put(&m, TABLE, 2, 0x8000, 16, NEXT, 2);
        assert!(matches!(parse(&m, 8, 2).0, Err(ChainError::TooLong { .. })));
    }

    #[test]
    fn out_of_table_index_is_fatal() {
        let m = mem();
        assert_eq!(parse(&m, 8, 8).0, Err(ChainError::BadIndex { index: 8, size: 8 }));
        put(&m, TABLE, 0, 0x8000, 16, NEXT, 200);
        assert_eq!(parse(&m, 8, 0).0, Err(ChainError::BadIndex { index: 200, size: 8 }));
    }

    #[test]
    fn table_outside_memory_is_fatal() {
        let m = mem();
        let mut c = Chain::default();
        let r = parse_chain(&m, GuestAddress(MEM as u64 - 16), 4, 1, 1 << 20, &mut c);
        assert!(matches!(r, Err(ChainError::TableOutside(_))), "{r:?}");
        let r = parse_chain(&m, GuestAddress(u64::MAX - 8), 4, 0, 1 << 20, &mut c);
        assert!(matches!(r, Err(ChainError::TableOutside(_))), "{r:?}");
    }

    #[test]
    fn buffers_outside_or_overflowing_fail_the_request_only() {
        let m = mem();
        put(&m, TABLE, 0, MEM as u64 - 8, 16, NEXT, 1);
        put(&m, TABLE, 1, u64::MAX - 4, 16, NEXT | WRITE, 2);
        put(&m, TABLE, 2, 0x9000, 1, WRITE, 0);
        let (r, c) = parse(&m, 4, 0);
        assert_eq!(r, Ok(()));
        assert!(matches!(c.error, Some(ChainError::BufferOutside { .. })));
        assert!(c.readable.is_empty(), "the bad buffer is not used");
        assert_eq!(
            c.writable,
            vec![Segment {
                addr: GuestAddress(0x9000),
                len: 1
            }]
        );
        assert!(c.ends_writable, "status byte still reachable");
    }

    #[test]
    fn zero_length_and_wrong_direction_fail_the_request() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 0, NEXT, 1);
        put(&m, TABLE, 1, 0x9000, 1, WRITE, 0);
        let (r, c) = parse(&m, 4, 0);
        assert_eq!(r, Ok(()));
        assert_eq!(c.error, Some(ChainError::ZeroLength));

        put(&m, TABLE, 0, 0x8000, 16, WRITE | NEXT, 1);
        put(&m, TABLE, 1, 0x9000, 16, NEXT, 2);
        put(&m, TABLE, 2, 0xa000, 1, WRITE, 0);
        let (r, c) = parse(&m, 4, 0);
        assert_eq!(r, Ok(()));
        assert_eq!(c.error, Some(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn oversized_chain_fails_the_request() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 0x8000, NEXT, 1);
        put(&m, TABLE, 1, 0x10000, 0x8000, NEXT | WRITE, 2);
        put(&m, TABLE, 2, 0x20000, 1, WRITE, 0);
        let mut c = Chain::default();
        parse_chain(&m, GuestAddress(TABLE), 4, 0, 0x8000, &mut c).unwrap();
        assert_eq!(c.error, Some(ChainError::TooBig { limit: 0x8000 }));
        // u32-sized buffers add up in u64: no overflow.
        put(&m, TABLE, 0, 0x8000, u32::MAX, NEXT, 1);
        put(&m, TABLE, 1, 0x8000, u32::MAX, WRITE, 0);
        parse_chain(&m, GuestAddress(TABLE), 4, 0, u64::MAX, &mut c).unwrap();
        assert!(matches!(c.error, Some(ChainError::BufferOutside { .. })));
    }

    #[test]
    fn indirect_tables_are_followed_and_checked() {
        let m = mem();
        let ind = 0x4000;
        put(&m, TABLE, 0, ind, 3 * 16, INDIRECT, 0);
        put(&m, ind, 0, 0x8000, 16, NEXT, 1);
        put(&m, ind, 1, 0x9000, 4096, NEXT | WRITE, 2);
        put(&m, ind, 2, 0xa000, 1, WRITE, 0);
        let (r, c) = parse(&m, 4, 0);
        assert_eq!(r, Ok(()));
        assert_eq!(c.error, None);
        assert_eq!((c.readable_len, c.writable_len), (16, 4097));

        // Nested indirect.
        put(&m, ind, 2, 0x5000, 16, INDIRECT, 0);
        assert_eq!(parse(&m, 4, 0).0, Err(ChainError::NestedIndirect));
        // Bad table length, NEXT with INDIRECT, table outside memory.
        put(&m, TABLE, 0, ind, 20, INDIRECT, 0);
        assert!(matches!(parse(&m, 4, 0).0, Err(ChainError::BadIndirect(_))));
        put(&m, TABLE, 0, ind, 32, INDIRECT | NEXT, 1);
        assert!(matches!(parse(&m, 4, 0).0, Err(ChainError::BadIndirect(_))));
        put(&m, TABLE, 0, MEM as u64 - 16, 32, INDIRECT, 0);
        assert!(matches!(parse(&m, 4, 0).0, Err(ChainError::TableOutside(_))));
        // A loop inside an indirect table.
        put(&m, TABLE, 0, ind, 2 * 16, INDIRECT, 0);
        put(&m, ind, 0, 0x8000, 16, NEXT, 1);
        put(&m, ind, 1, 0x8000, 16, NEXT, 0);
        assert!(matches!(parse(&m, 4, 0).0, Err(ChainError::TooLong { .. })));
    }

    #[test]
    fn copies_across_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x8000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x9000),
                len: 5,
            },
        ];
        assert_eq!(write_to(&m, &segs, 1, b"abcdefgXYZ"), 7);
        let mut back = [0u8; 8];
        assert_eq!(read_from(&m, &segs, 0, &mut back), 8);
        assert_eq!(&back, b"\0abcdefg");
        let mut tail = [0u8; 4];
        assert_eq!(read_from(&m, &segs, 6, &mut tail), 2);
        assert_eq!(&tail[..2], b"fg");
    }
}
