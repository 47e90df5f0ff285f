//! virtio-blk against guest memory and a temp file, no KVM: every request type, and
//! every malformed chain failing cleanly.

use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::IrqLine;
use crate::virtio::driver::{Buf, SplitRing};
use crate::virtio::queue_handler::tests::{NEXT, WRITE};
use crate::virtio::{INT_USED_RING, Interrupt};
use virtio_queue::Queue;

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const RING: u64 = 0x40000;

struct Rig {
    mem: GuestMemory,
    ring: SplitRing,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    dev: Block,
    _dir: tempfile::TempDir,
    file: std::fs::File,
}

fn rig_with(size: u64, readonly: bool, serial: Option<&str>) -> Rig {
    rig_opts(size, readonly, serial, false)
}

fn rig_opts(size: u64, readonly: bool, serial: Option<&str>, direct: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(size).unwrap();
    let dev = Block::open(&DiskConfig {
        path,
        readonly,
        serial: serial.map(str::to_string),
        direct,
    })
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let ring = SplitRing::new(&mem, RING, 16);
    let queues = vec![ring.queue(256, false)];
    Rig {
        mem,
        ring,
        queues,
        interrupt: Interrupt::new(IrqLine::new(5).unwrap()),
        dev,
        _dir: dir,
        file,
    }
}

fn rig() -> Rig {
    rig_with(1 << 20, false, Some("keel-disk-1"))
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn process(&mut self) -> Result<(), NeedsReset> {
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        };
        self.dev.process_queue(&mut ctx, 0)
    }

    /// Submits one chain and returns (used len, status byte).
    fn submit(&mut self, bufs: &[Buf]) -> (u32, u8) {
        self.ring.add_chain(&self.mem, bufs);
        self.process().expect("no NEEDS_RESET");
        let used = self.ring.take_used(&self.mem);
        assert_eq!(used.len(), 1, "one chain in, one out");
        (used[0].1, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> (u32, u8) {
        self.header(kind, sector);
        let mut bufs = vec![Buf::r(HDR, 16)];
        bufs.extend(data);
        bufs.push(Buf::w(STATUS, 1));
        self.submit(&bufs)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_then_read_back_through_the_file() {
    let mut r = rig();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 8, Some(Buf::r(DATA, 4096))), (1, OK));
    let mut on_disk = vec![0u8; 4096];
    r.file.read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, pattern, "the host file holds what the guest wrote");

    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 8, Some(Buf::w(DATA, 4096))), (4097, OK));
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_ne!(r.interrupt.status() & INT_USED_RING, 0, "guest interrupted");
}

#[test]
fn reads_and_writes_are_counted_for_stats_and_failures_are_not() {
    let counters = DeviceCounters::detached(DeviceKind::Block);
    let mut r = rig();
    r.dev = std::mem::replace(&mut r.dev, rig().dev).with_counters(counters.clone());
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 8, Some(Buf::r(DATA, 4096))), (1, OK));
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 16, Some(Buf::r(DATA, 1024))), (1, OK));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 8, Some(Buf::w(DATA, 512))), (513, OK));
    // Past the end of the 1 MiB disk: refused, not counted.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 4096, Some(Buf::w(DATA, 512))), (1, IOERR));
    let s = counters.snapshot("virtio-blk0");
    assert_eq!((s.ops_out, s.bytes_out), (2, 5120), "writes: {s:?}");
    assert_eq!((s.ops_in, s.bytes_in), (1, 512), "reads: {s:?}");
}

#[test]
fn data_split_over_many_descriptors_and_indirect_tables() {
    let mut r = rig();
    r.file.write_all_at(&[0xabu8; 1024], 0).unwrap();
    r.header(VIRTIO_BLK_T_IN, 0);
    // Two 512-byte halves in an indirect table.
    let table = 0x50000u64;
    let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        r.mem
            .write_obj(
                virtio_queue::desc::split::Descriptor::new(addr, len, flags, next),
                GuestAddress(table + 16 * i),
            )
            .unwrap();
    };
    put(0, HDR, 16, NEXT, 1);
    put(1, DATA, 512, NEXT | WRITE, 2);
    put(2, DATA + 0x1000, 512, NEXT | WRITE, 3);
    put(3, STATUS, 1, WRITE, 0);
    r.ring.put_desc(
        &r.mem,
        0,
        table,
        64,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    );
    r.ring.publish(&r.mem, 0);
    r.process().unwrap();
    assert_eq!(r.ring.take_used(&r.mem), vec![(0, 1025)]);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA + 0x1000 + 511)).unwrap(), 0xab);
}

#[test]
fn flush_get_id_and_unknown_requests() {
    let mut r = rig();
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, OK));
    assert_eq!(r.request(VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(DATA, 20))), (21, OK));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"keel-disk-1");
    assert!(id[11..].iter().all(|&b| b == 0));
    assert_eq!(r.request(99, 0, None), (1, UNSUPP));
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let mut r = rig(); // 2048 sectors
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 2048, Some(Buf::w(DATA, 512))), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 2047, Some(Buf::w(DATA, 1024))), (1, IOERR));
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, u64::MAX, Some(Buf::w(DATA, 512))),
        (1, IOERR)
    );
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 0, Some(Buf::r(DATA, 100))), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 2047, Some(Buf::w(DATA, 512))), (513, OK));
}

#[test]
fn readonly_disk_refuses_writes_and_punches() {
    let mut r = rig_with(1 << 20, true, None);
    assert_ne!(r.dev.features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(r.dev.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 0, Some(Buf::r(DATA, 512))), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(DATA, 16))), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, Some(Buf::w(DATA, 512))), (513, OK));
    // GET_ID without a serial answers an empty string.
    assert_eq!(r.request(VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(DATA, 20))), (21, OK));
}

fn discard_segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    use std::os::unix::fs::MetadataExt;
    let mut r = rig_with(4 << 20, false, None);
    r.file.write_all_at(&vec![0x5au8; 4 << 20], 0).unwrap();
    r.file.sync_all().unwrap();
    let blocks_full = r.file.metadata().unwrap().blocks();
    // Discard the first MiB, write zeroes over the second (unmap allowed).
    r.mem
        .write_slice(&discard_segment(0, 2048, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(DATA, 16))), (1, OK));
    r.mem
        .write_slice(
            &discard_segment(2048, 2048, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA),
        )
        .unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Buf::r(DATA, 16))), (1, OK));
    let mut back = vec![0xffu8; 2 << 20];
    r.file.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0), "discarded and zeroed ranges read zero");
    let mut rest = vec![0u8; 4096];
    r.file.read_exact_at(&mut rest, 2 << 20).unwrap();
    assert!(rest.iter().all(|&b| b == 0x5a), "the rest is untouched");
    assert_eq!(r.file.metadata().unwrap().len(), 4 << 20, "size kept");
    let blocks_after = r.file.metadata().unwrap().blocks();
    assert!(
        blocks_after < blocks_full,
        "holes punched: {blocks_after} < {blocks_full} blocks"
    );
    // Bad segments: unknown flag, beyond the disk, length not a multiple of 16.
    r.mem
        .write_slice(&discard_segment(0, 8, 2), GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(DATA, 16))), (1, UNSUPP));
    r.mem
        .write_slice(&discard_segment(8190, 8, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(DATA, 16))), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(DATA, 12))), (1, IOERR));
}

#[test]
fn capacity_comes_from_the_file_size() {
    let r = rig_with(10 * 512 + 100, false, None);
    assert_eq!(r.dev.capacity(), 10);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 10);
    let mut seg_max = [0u8; 4];
    r.dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 254);
}

#[test]
fn malformed_chains_fail_the_request_without_touching_the_file() {
    let mut r = rig();
    r.file.write_all_at(&[0x11u8; 512], 0).unwrap();
    // Header too short.
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[Buf::r(HDR, 8), Buf::r(DATA, 512), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    // Data buffer outside guest memory.
    assert_eq!(
        r.submit(&[Buf::r(HDR, 16), Buf::r(0xfff_0000, 512), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    // Address + length overflowing u64.
    assert_eq!(
        r.submit(&[Buf::r(HDR, 16), Buf::r(u64::MAX - 100, 512), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    // Zero-length data buffer.
    assert_eq!(
        r.submit(&[Buf::r(HDR, 16), Buf::r(DATA, 0), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    // Readable buffer after a writable one (wrong direction).
    assert_eq!(
        r.submit(&[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::r(DATA, 512), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    // Oversized request.
    assert_eq!(
        r.submit(&[Buf::r(HDR, 16), Buf::r(0, u32::MAX), Buf::w(STATUS, 1)]),
        (1, IOERR)
    );
    let mut on_disk = [0u8; 512];
    r.file.read_exact_at(&mut on_disk, 0).unwrap();
    assert!(
        on_disk.iter().all(|&b| b == 0x11),
        "no malformed write reached the file"
    );
    // No writable status byte at all: returned unserved, nothing written.
    r.header(VIRTIO_BLK_T_IN, 0);
    r.ring.add_chain(&r.mem, &[Buf::r(HDR, 16), Buf::r(DATA, 512)]);
    r.process().unwrap();
    assert_eq!(r.ring.take_used(&r.mem)[0].1, 0);
    // The status descriptor itself outside memory.
    r.ring.add_chain(&r.mem, &[Buf::r(HDR, 16), Buf::w(0xfff_ffff, 1)]);
    r.process().unwrap();
    assert_eq!(r.ring.take_used(&r.mem)[0].1, 0);
    // The device still works afterwards.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, Some(Buf::w(DATA, 512))), (513, OK));
}

#[test]
fn broken_descriptor_table_needs_reset() {
    let mut r = rig();
    // A loop: 0 -> 1 -> 0.
    r.ring.put_desc(&r.mem, 0, HDR, 16, NEXT, 1);
    r.ring.put_desc(&r.mem, 1, DATA, 512, NEXT, 0);
    r.ring.publish(&r.mem, 0);
    assert!(r.process().is_err());

    let mut r = rig();
    // A head index beyond the queue size.
    r.ring.publish(&r.mem, 40);
    assert!(r.process().is_err());

    let mut r = rig();
    // The driver claims more chains than the ring holds.
    r.mem.write_obj(100u16, GuestAddress(r.ring.avail + 2)).unwrap();
    let e = r.process().unwrap_err();
    assert!(e.0.contains("available ring"), "{e}");
}

#[test]
fn direct_io_with_aligned_and_unaligned_guest_buffers() {
    // /tmp is a file system with O_DIRECT on these machines (ext4).
    let mut r = rig_opts(1 << 20, false, None, true);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    // DATA is page aligned: straight to the file; DATA + 512 is not: bounced.
    for (addr, sector) in [(DATA, 0u64), (DATA + 512, 64)] {
        r.mem.write_slice(&pattern, GuestAddress(addr)).unwrap();
        assert_eq!(r.request(VIRTIO_BLK_T_OUT, sector, Some(Buf::r(addr, 8192))), (1, OK));
        let mut on_disk = vec![0u8; 8192];
        r.file.read_exact_at(&mut on_disk, sector * 512).unwrap();
        assert_eq!(on_disk, pattern, "write from {addr:#x}");
        r.mem.write_slice(&[0u8; 8192], GuestAddress(addr)).unwrap();
        assert_eq!(r.request(VIRTIO_BLK_T_IN, sector, Some(Buf::w(addr, 8192))), (8193, OK));
        let mut back = vec![0u8; 8192];
        r.mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, pattern, "read into {addr:#x}");
    }
}
