//! Device benchmarks (run by `ci/bench`, or `cargo bench -p keel-vmm --bench devices`).
//!
//! virtio-blk: requests through the device model (guest memory, split ring, MMIO
//! transport, ioeventfd → device thread → irqfd, exactly the runtime path minus KVM)
//! against plain pread/pwrite of the same pattern on the same tmpfs file, in the same
//! run: 64 KiB sequential and 4 KiB random, read and write. Printed as throughput and as
//! the ratio device/raw (the goal is >= 0.9 for 64 KiB sequential).
//!
//! virtio-net: frames per second through the device model into a tap in a private
//! network namespace (needs root).
//!
//! It measures; it asserts nothing about speed.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_vmm::bus::BusDevice;
use keel_vmm::config::DiskConfig;
use keel_vmm::devices::IrqLine;
use keel_vmm::event_loop::EventLoop;
use keel_vmm::memory::GuestMemory;
use keel_vmm::virtio::block::Block;
use keel_vmm::virtio::driver::{Buf, SplitRing};
use keel_vmm::virtio::mmio::MmioTransport;
use keel_vmm::virtio::net::{Mac, Net, TX_QUEUE};
use keel_vmm::virtio::tap::Tap;
use keel_vmm::virtio::{Interrupt, QueueContext, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const FILE_SIZE: u64 = 256 << 20;
const GUEST_MEM: usize = 64 << 20;
const RING: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 256;
/// Requests in flight per notification (Linux's blk-mq batches like this under load).
const BATCH: usize = 32;
const HEADERS: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;
const RANDOM_OPS: usize = 20_000;

#[derive(Clone, Copy)]
enum Pattern {
    Sequential,
    Random,
}

/// Offsets of one run: the whole file in order, or RANDOM_OPS aligned random offsets.
fn offsets(pattern: Pattern, size: u64, seed: &mut u64) -> Vec<u64> {
    match pattern {
        Pattern::Sequential => (0..FILE_SIZE / size).map(|i| i * size).collect(),
        Pattern::Random => (0..RANDOM_OPS)
            .map(|_| {
                // xorshift: cheap and the same for device and raw.
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % (FILE_SIZE / size)) * size
            })
            .collect(),
    }
}

/// The block device behind its transport, activated as a Linux driver would, with the
/// event loop running on its own thread.
struct BlockRig {
    mem: GuestMemory,
    ring: SplitRing,
    transport: Arc<Mutex<MmioTransport>>,
    notify: vmm_sys_util::eventfd::EventFd,
    irq: vmm_sys_util::eventfd::EventFd,
    /// None: requests are served inline on the calling thread (no thread hop), to show
    /// what the device model itself costs.
    _loop: Option<keel_vmm::event_loop::EventLoopThread>,
}

fn write_reg(t: &Arc<Mutex<MmioTransport>>, reg: u64, v: u32) {
    t.lock().unwrap().write(reg, &v.to_le_bytes());
}

impl BlockRig {
    fn new(path: &std::path::Path, threaded: bool) -> BlockRig {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM)]).unwrap();
        let ring = SplitRing::new(&mem, RING, QUEUE_SIZE);
        // Touch the data buffers as the raw side's are: untouched anonymous memory reads
        // as the shared zero page, which would flatter the device's writes.
        mem.write_slice(&vec![0x5au8; BATCH * (64 << 10)], GuestAddress(DATA))
            .unwrap();
        let block = Block::open(&DiskConfig {
            path: path.to_path_buf(),
            readonly: false,
            serial: None,
            direct: false,
        })
        .unwrap();
        let line = IrqLine::new(5).unwrap();
        let irq = line.eventfd().try_clone().unwrap();
        let t = Arc::new(Mutex::new(
            MmioTransport::new(Box::new(block), mem.clone(), Interrupt::new(line)).unwrap(),
        ));
        // ACKNOWLEDGE, DRIVER, VERSION_1 + EVENT_IDX, FEATURES_OK, queue 0, DRIVER_OK.
        write_reg(&t, 0x70, 1);
        write_reg(&t, 0x70, 3);
        write_reg(&t, 0x24, 1);
        write_reg(&t, 0x20, 1);
        write_reg(&t, 0x24, 0);
        write_reg(&t, 0x20, 1 << 29);
        write_reg(&t, 0x70, 0xb);
        write_reg(&t, 0x30, 0);
        write_reg(&t, 0x38, u32::from(QUEUE_SIZE));
        write_reg(&t, 0x80, ring.desc as u32);
        write_reg(&t, 0x90, ring.avail as u32);
        write_reg(&t, 0xa0, ring.used as u32);
        write_reg(&t, 0x44, 1);
        write_reg(&t, 0x70, 0xf);
        assert!(t.lock().unwrap().is_active(), "device activated");
        let notify = t.lock().unwrap().queue_evts()[0].try_clone().unwrap();
        let thread = threaded.then(|| {
            let mut event_loop = EventLoop::new().unwrap();
            event_loop.add(t.clone()).unwrap();
            let control = Arc::new(keel_vmm::control::VmControl::new().unwrap());
            event_loop.spawn(control).unwrap()
        });
        BlockRig {
            mem,
            ring,
            transport: t,
            notify,
            irq,
            _loop: thread,
        }
    }

    /// Runs every offset as a request of `size` bytes, BATCH per notification, waiting
    /// for the interrupt (irqfd) each time, as a guest driver does.
    fn run(&mut self, offsets: &[u64], size: u32, write: bool) -> Duration {
        let start = Instant::now();
        for batch in offsets.chunks(BATCH) {
            for (i, &off) in batch.iter().enumerate() {
                let hdr = HEADERS + 32 * i as u64;
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
                h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
                self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
                let data = DATA + i as u64 * u64::from(size);
                let data_buf = if write { Buf::r(data, size) } else { Buf::w(data, size) };
                self.ring
                    .add_chain(&self.mem, &[Buf::r(hdr, 16), data_buf, Buf::w(hdr + 16, 1)]);
            }
            self.notify.write(1).unwrap();
            if self._loop.is_none() {
                self.transport.lock().unwrap().handle_event(0, libc::EPOLLIN as u32);
            }
            let mut done = 0;
            while done < batch.len() {
                // Blocks until the device thread raises the interrupt.
                let _ = wait_readable(self.irq.as_raw_fd());
                let _ = self.irq.read();
                let used = self.ring.take_used(&self.mem);
                done += used.len();
            }
            self.transport.lock().unwrap().interrupt().ack(1);
        }
        start.elapsed()
    }
}

fn wait_readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 5000) > 0 }
}

/// The same offsets with pread/pwrite, rotating over BATCH buffers as the device's
/// requests do (one buffer reused would sit in cache and flatter the raw side).
fn raw_run(file: &std::fs::File, offsets: &[u64], size: u32, write: bool) -> Duration {
    let mut bufs = vec![0x5au8; size as usize * BATCH];
    let start = Instant::now();
    for (i, &off) in offsets.iter().enumerate() {
        let at = (i % BATCH) * size as usize;
        let buf = &mut bufs[at..at + size as usize];
        if write {
            file.write_all_at(buf, off).unwrap();
        } else {
            file.read_exact_at(buf, off).unwrap();
        }
    }
    start.elapsed()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn block_bench() {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-")
        .tempdir_in("/dev/shm")
        .expect("a tmpfs at /dev/shm");
    let path = dir.path().join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // Allocate the whole file first so neither side pays for tmpfs page allocation.
    file.write_all_at(&vec![1u8; FILE_SIZE as usize], 0).unwrap();
    let mut rig = BlockRig::new(&path, true);
    let mut inline = BlockRig::new(&path, false);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    println!(
        "virtio-blk on a tmpfs file, {BATCH} requests per notification; device = ioeventfd -> device thread -> irqfd,"
    );
    println!(
        "inline = the same device model called on the submitting thread; raw = pread/pwrite, same offsets and buffers"
    );
    println!(
        "{:<26} {:>12} {:>12} {:>10} {:>13} {:>13}",
        "", "device MB/s", "inline MB/s", "raw MB/s", "device/raw", "inline/raw"
    );
    for (name, pattern, size) in [
        ("64 KiB sequential", Pattern::Sequential, 64u32 << 10),
        ("4 KiB random", Pattern::Random, 4u32 << 10),
    ] {
        for write in [false, true] {
            let offs = offsets(pattern, u64::from(size), &mut seed);
            let bytes = offs.len() as u64 * u64::from(size);
            // Best of 5 for each side, interleaved so both see the same machine state.
            let mut dev = Duration::MAX;
            let mut inl = Duration::MAX;
            let mut raw = Duration::MAX;
            for _ in 0..5 {
                dev = dev.min(rig.run(&offs, size, write));
                inl = inl.min(inline.run(&offs, size, write));
                raw = raw.min(raw_run(&file, &offs, size, write));
            }
            let (d, i, r) = (mbps(bytes, dev), mbps(bytes, inl), mbps(bytes, raw));
            println!(
                "{:<26} {:>12.0} {:>12.0} {:>10.0} {:>13.2} {:>13.2}",
                format!("{name} {}", if write { "write" } else { "read" }),
                d,
                i,
                r,
                d / r,
                i / r
            );
        }
    }
}

fn net_bench() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("virtio-net: skipped (needs root for a network namespace and a tap)");
        return;
    }
    let ns = format!("keel-bench-{}", std::process::id());
    let ip = |args: &[&str]| {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip {args:?}");
    };
    ip(&["netns", "add", &ns]);
    let result = std::panic::catch_unwind(|| {
        let path = format!("/run/netns/{ns}");
        let tap = std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: entering a namespace on this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                Tap::open("kbench0").expect("tap in the namespace")
            })
            .join()
            .unwrap()
        });
        ip(&["-n", &ns, "link", "set", "kbench0", "up"]);
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let rx = SplitRing::new(&mem, RING, QUEUE_SIZE);
        let mut tx = SplitRing::new(&mem, RING + 0x10_0000, QUEUE_SIZE);
        let mut queues = vec![rx.queue(QUEUE_SIZE, true), tx.queue(QUEUE_SIZE, true)];
        let mut net = Net::new(tap, Mac([2, 0, 0, 0, 0, 1]));
        net.activate(1 << 32 | 1 << 29).unwrap();
        let interrupt = Interrupt::new(IrqLine::new(5).unwrap());
        // 64-byte Ethernet frames (+ 12-byte header): the worst case for per-frame cost.
        let frame_at = 0x80_0000u64;
        let mut frame = vec![0u8; 12];
        frame.extend([0xff; 6]);
        frame.extend([2, 0, 0, 0, 0, 1]);
        frame.extend([0x88, 0xb5]);
        frame.resize(12 + 64, 0x42);
        mem.write_slice(&frame, GuestAddress(frame_at)).unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            for _ in 0..128 {
                tx.add_chain(&mem, &[Buf::r(frame_at, frame.len() as u32)]);
            }
            let mut ctx = QueueContext {
                mem: &mem,
                queues: &mut queues,
                interrupt: &interrupt,
            };
            net.process_queue(&mut ctx, TX_QUEUE).unwrap();
            sent += tx.take_used(&mem).len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "virtio-net: {:.0} frames/s (64-byte frames through the device model into a tap in a netns; {} sent, {} dropped)",
            sent as f64 / secs,
            net.stats.tx_frames,
            net.stats.tx_dropped
        );
    });
    let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
    if result.is_err() {
        println!("virtio-net: benchmark failed (see above)");
    }
}

fn main() {
    block_bench();
    net_bench();
}
