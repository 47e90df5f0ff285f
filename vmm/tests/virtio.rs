//! Tiny guests drive keel-vmm's virtio-mmio devices on /dev/kvm: each negotiates
//! features through the MMIO registers, builds its virtqueues in its own memory, makes
//! requests and reports over the serial port; the host checks the other side (the disk
//! file, the tap).

mod common;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::virtio_guest::*;
use common::*;
use iced_x86::code_asm::*;

const TIMEOUT: Duration = Duration::from_secs(90);
const VERSION_1: u64 = 1 << 32;

// Guest memory layout of the tests (all free RAM above the 1 MiB kernel image).
const RING0: u32 = 0x20_0000;
const RING1: u32 = 0x21_0000;
const HDR: u32 = 0x22_0000;
const STATUS: u32 = 0x22_0100;
const WBUF: u32 = 0x23_0000;
const RBUF: u32 = 0x24_0000;
const SECTORS: u32 = 8; // 4 KiB written and read back
const SECTOR: u64 = 16; // at byte 8 KiB of the disk

/// The byte the guest writes at offset `i` of its buffer.
fn pattern(i: usize) -> u8 {
    ((i & 0xff) + (i >> 8)) as u8
}

fn block_guest() -> Vec<u8> {
    let ring = Ring::at(RING0, 8);
    let mut d = Driver::new(mmio_base(0));
    d.negotiate(2, VERSION_1);
    d.setup_queue(0, ring);
    d.driver_ok();
    let len = SECTORS * 512;

    // The pattern: byte i = (i & 0xff) + (i >> 8).
    d.step(30);
    {
        let a = &mut d.a;
        let mut fill = a.create_label();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut fill).unwrap();
        a.mov(eax, ecx).unwrap();
        a.add(al, ch).unwrap();
        a.mov(byte_ptr(rcx + WBUF as i32), al).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, len).unwrap();
        a.jb(fill).unwrap();
    }

    // Write: header (OUT, sector), data, status.
    d.step(31);
    d.a.mov(dword_ptr(HDR as u64), 1u32).unwrap();
    d.a.mov(dword_ptr(HDR as u64 + 4), 0u32).unwrap();
    d.a.mov(qword_ptr(HDR as u64 + 8), SECTOR as i32).unwrap();
    d.a.mov(byte_ptr(STATUS as u64), 0xffu32).unwrap();
    d.desc(ring, 0, HDR, 16, F_NEXT, 1);
    d.desc(ring, 1, WBUF, len, F_NEXT, 2);
    d.desc(ring, 2, STATUS, 1, F_WRITE, 0);
    d.submit(ring, 0, 0, 0);
    d.wait_used(ring, 1);
    d.a.movzx(eax, byte_ptr(STATUS as u64)).unwrap();
    d.expect_eax(0);
    d.used_len(ring, 0);
    d.expect_eax(1);

    // Read back into another buffer: header (IN), data (device-writable), status.
    d.step(32);
    d.a.mov(dword_ptr(HDR as u64), 0u32).unwrap();
    d.a.mov(byte_ptr(STATUS as u64), 0xffu32).unwrap();
    d.desc(ring, 3, HDR, 16, F_NEXT, 4);
    d.desc(ring, 4, RBUF, len, F_NEXT | F_WRITE, 5);
    d.desc(ring, 5, STATUS, 1, F_WRITE, 0);
    d.submit(ring, 0, 1, 3);
    d.wait_used(ring, 2);
    d.a.movzx(eax, byte_ptr(STATUS as u64)).unwrap();
    d.expect_eax(0);
    d.used_len(ring, 1);
    d.expect_eax(len + 1);

    // Compare.
    d.step(33);
    let fail = d.fail_label();
    d.a.mov(esi, WBUF).unwrap();
    d.a.mov(edi, RBUF).unwrap();
    d.a.mov(ecx, len).unwrap();
    d.a.cld().unwrap();
    d.a.repe().cmpsb().unwrap();
    d.a.jne(fail).unwrap();
    d.a.mov(dx, COM1 as u32).unwrap();
    d.finish(b"BLK-OK\n")
}

#[test]
fn guest_writes_and_reads_back_a_virtio_blk_disk() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&block_guest(), LOAD_ADDR, 0));
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let disk_arg = format!("path={},serial=tiny", disk.display());
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32MiB",
            "--disk",
            &disk_arg,
        ],
        TIMEOUT,
    );
    assert_eq!(run.stdout_text(), "BLK-OK\n", "stderr: {}", run.stderr);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    let file = std::fs::File::open(&disk).unwrap();
    let mut data = vec![0u8; SECTORS as usize * 512];
    file.read_exact_at(&mut data, SECTOR * 512).unwrap();
    let want: Vec<u8> = (0..data.len()).map(pattern).collect();
    assert_eq!(data, want, "the image holds the guest's pattern at sector {SECTOR}");
    let mut before = vec![0xffu8; SECTOR as usize * 512];
    file.read_exact_at(&mut before, 0).unwrap();
    assert!(before.iter().all(|&b| b == 0), "nothing written before the sector");
}

fn rng_guest() -> Vec<u8> {
    let ring = Ring::at(RING0, 4);
    let mut d = Driver::new(mmio_base(0));
    d.negotiate(4, VERSION_1);
    d.setup_queue(0, ring);
    d.driver_ok();
    d.step(30);
    d.desc(ring, 0, RBUF, 64, F_WRITE, 0);
    d.submit(ring, 0, 0, 0);
    d.wait_used(ring, 1);
    d.used_len(ring, 0);
    d.expect_eax(64);
    // Print the 64 bytes as hex for the host to judge.
    print(&mut d.a, b"RNG ");
    {
        let a = &mut d.a;
        let mut next = a.create_label();
        let mut digit = a.create_label();
        let mut low = a.create_label();
        a.mov(esi, RBUF).unwrap();
        a.mov(dx, COM1 as u32).unwrap();
        a.set_label(&mut next).unwrap();
        a.movzx(ecx, byte_ptr(rsi)).unwrap();
        a.mov(eax, ecx).unwrap();
        a.shr(eax, 4).unwrap();
        a.call(digit).unwrap();
        a.mov(eax, ecx).unwrap();
        a.and(eax, 15u32).unwrap();
        a.call(digit).unwrap();
        a.inc(esi).unwrap();
        a.cmp(esi, RBUF + 64).unwrap();
        a.jb(next).unwrap();
        let mut done = a.create_label();
        a.jmp(done).unwrap();
        // digit: AL (0..15) as a hex character.
        a.set_label(&mut digit).unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.cmp(al, b'9' as u32).unwrap();
        a.jbe(low).unwrap();
        a.add(al, 39u32).unwrap();
        a.set_label(&mut low).unwrap();
        a.out(dx, al).unwrap();
        a.ret().unwrap();
        a.set_label(&mut done).unwrap();
    }
    d.finish(b"\nRNG-OK\n")
}

#[test]
fn guest_reads_entropy_from_virtio_rng() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&rng_guest(), LOAD_ADDR, 0));
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let run = run_vmm(
            &["--kernel", kernel.to_str().unwrap(), "--memory", "32MiB", "--rng"],
            TIMEOUT,
        );
        assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
        let out = run.stdout_text();
        assert!(out.ends_with("\nRNG-OK\n"), "{out}\nstderr: {}", run.stderr);
        let hex = out.trim_start_matches("RNG ").lines().next().unwrap().to_string();
        assert_eq!(hex.len(), 128, "{out}");
        outputs.push(hex);
    }
    assert_ne!(outputs[0], outputs[1], "two boots, two different random buffers");
    assert_ne!(outputs[0], "0".repeat(128));
}

// ---- virtio-net with a tap in a private network namespace ----

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
const GUEST_PAYLOAD: &[u8; 16] = b"KEEL-GUEST-FRAME";
const HOST_PAYLOAD: &[u8; 16] = b"KEEL-HOST-FRAME!";
const RXBUF: u32 = 0x25_0000;
const TXBUF: u32 = 0x26_0000;
const VNET_HDR: u32 = 12;

fn net_guest() -> Vec<u8> {
    let rx = Ring::at(RING0, 4);
    let tx = Ring::at(RING1, 4);
    let mut d = Driver::new(mmio_base(0));
    d.negotiate(1, VERSION_1 | 1 << 5); // VERSION_1 | MAC
    d.setup_queue(0, rx);
    d.setup_queue(1, tx);
    d.driver_ok();

    // One receive buffer posted first.
    d.step(30);
    d.desc(rx, 0, RXBUF, 2048, F_WRITE, 0);
    d.submit(rx, 0, 0, 0);

    // The frame: zero vnet header, broadcast destination, our MAC (read from the config
    // space) as source, the test ethertype, the payload.
    d.step(31);
    let t = TXBUF as u64 + VNET_HDR as u64;
    d.a.mov(dword_ptr(t), 0xffff_ffffu32).unwrap();
    d.a.mov(word_ptr(t + 4), 0xffffu32).unwrap();
    d.a.mov(eax, dword_ptr(rbx + REG_CONFIG)).unwrap();
    d.a.mov(dword_ptr(t + 6), eax).unwrap();
    d.a.movzx(eax, word_ptr(rbx + REG_CONFIG + 4)).unwrap();
    d.a.mov(word_ptr(t + 10), ax).unwrap();
    d.a.mov(word_ptr(t + 12), u32::from(ETHERTYPE.swap_bytes())).unwrap();
    for (i, chunk) in GUEST_PAYLOAD.chunks(8).enumerate() {
        d.a.mov(rax, u64::from_le_bytes(chunk.try_into().unwrap())).unwrap();
        d.a.mov(qword_ptr(t + 14 + 8 * i as u64), rax).unwrap();
    }
    let frame_len = VNET_HDR + 14 + GUEST_PAYLOAD.len() as u32;
    d.desc(tx, 0, TXBUF, frame_len, 0, 0);
    d.submit(tx, 1, 0, 0);
    d.wait_used(tx, 1);
    print(&mut d.a, b"TX-DONE\n");

    // Receive until a frame of our ethertype arrives; anything else goes back as a
    // fresh buffer. R12 = receive buffers posted so far.
    d.step(32);
    {
        let fail = d.fail_label();
        d.a.mov(r12d, 1u32).unwrap();
        let mut ours = d.a.create_label();
        // wait for used idx == r12
        let mut spin = d.a.create_label();
        d.a.set_label(&mut spin).unwrap();
        d.a.pause().unwrap();
        d.a.movzx(eax, word_ptr(rx.used as u64 + 2)).unwrap();
        d.a.cmp(eax, r12d).unwrap();
        d.a.jb(spin).unwrap();
        d.a.movzx(eax, word_ptr(RXBUF as u64 + VNET_HDR as u64 + 12)).unwrap();
        d.a.cmp(eax, u32::from(ETHERTYPE.swap_bytes())).unwrap();
        d.a.je(ours).unwrap();
        // Not ours: post the buffer again (avail slot r12 % 4, idx r12 + 1).
        d.a.cmp(r12d, 50u32).unwrap();
        d.a.jae(fail).unwrap();
        d.a.mov(eax, r12d).unwrap();
        d.a.and(eax, 3u32).unwrap();
        d.a.mov(word_ptr(rax * 2 + (rx.avail + 4) as i32), 0u32).unwrap();
        d.a.inc(r12d).unwrap();
        d.a.mov(eax, r12d).unwrap();
        d.a.mov(word_ptr(rx.avail as u64 + 2), ax).unwrap();
        d.a.mfence().unwrap();
        d.a.mov(dword_ptr(rbx + REG_QUEUE_NOTIFY), 0u32).unwrap();
        d.a.jmp(spin).unwrap();
        d.a.set_label(&mut ours).unwrap();
    }
    // num_buffers must be 1; print the payload.
    d.step(33);
    d.a.movzx(eax, word_ptr(RXBUF as u64 + 10)).unwrap();
    d.expect_eax(1);
    d.a.mov(dx, COM1 as u32).unwrap();
    print(&mut d.a, b"RX:");
    for i in 0..HOST_PAYLOAD.len() as u64 {
        d.a.mov(al, byte_ptr(RXBUF as u64 + VNET_HDR as u64 + 14 + i)).unwrap();
        d.a.out(dx, al).unwrap();
    }
    d.finish(b"\nNET-OK\n")
}

/// A network namespace for one test, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("keel-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        NetNs { name }
    }

    /// Runs `f` on a thread that has entered the namespace (sockets and taps created
    /// there belong to it).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only, with a namespace fd we opened.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip (iproute2, installed by ci/setup): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails loudly without root (creating namespaces and taps needs it).
fn require_root() -> bool {
    if std::env::var("KEEL_SKIP_KVM").as_deref() == Ok("1") {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates a network namespace and a tap: run it as root"
    );
    true
}

/// Creates tap `name` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR on this thread's namespace,
/// as keel-init does before passing it to keel-vmm.
fn create_tap(name: &str) -> OwnedFd {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0x0002 | 0x1000 | 0x4000,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF with a struct ifreq we own.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, &mut req) };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file.into()
}

/// An AF_PACKET socket bound to `ifname` (all protocols), in this thread's namespace.
fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: plain socket calls with checked results.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let cname = std::ffi::CString::new(ifname).unwrap();
        let index = libc::if_nametoindex(cname.as_ptr());
        assert!(index > 0, "no interface {ifname}");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index as i32;
        let r = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    }
}

/// Waits up to `timeout` for a frame of the test ethertype; returns it.
fn recv_test_frame(fd: RawFd, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        if pfd.revents == 0 {
            continue;
        }
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
            buf.truncate(n as usize);
            return Some(buf);
        }
    }
    None
}

#[test]
fn guest_sends_and_receives_frames_through_a_tap_passed_as_fd() {
    if !require_kvm() || !require_root() {
        return;
    }
    let ns = NetNs::new("vnet");
    let tap = ns.run(|| create_tap("ktap0"));
    ip(&[
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.ktap0.disable_ipv6=1",
    ]);
    ip(&["-n", &ns.name, "link", "set", "ktap0", "up"]);
    let sock = ns.run(|| packet_socket("ktap0"));

    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&net_guest(), LOAD_ADDR, 0));
    let tap_fd = tap.as_raw_fd();
    let mut cmd = Command::new(vmm_bin());
    cmd.args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32MiB",
        "--net",
        "fd=3,mac=52:54:00:12:34:56",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: between fork and exec only dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(tap_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn keel-vmm");
    drop(tap); // keel-vmm holds the only reference now

    let frame = recv_test_frame(sock.as_raw_fd(), Duration::from_secs(60));
    // Inject the answer whether or not the guest's frame came, so the guest can finish.
    let mut reply = Vec::new();
    reply.extend(GUEST_MAC);
    reply.extend([0x02, 0, 0, 0, 0, 0x99]);
    reply.extend(ETHERTYPE.to_be_bytes());
    reply.extend(HOST_PAYLOAD);
    reply.resize(60, 0);
    // SAFETY: sending our buffer on a bound packet socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(n as usize, reply.len(), "inject: {}", std::io::Error::last_os_error());

    let run = wait_with_timeout(child, TIMEOUT);
    let frame = frame.unwrap_or_else(|| panic!("no frame from the guest on the tap; stderr: {}", run.stderr));
    assert_eq!(&frame[0..6], &[0xff; 6], "broadcast destination");
    assert_eq!(
        &frame[6..12],
        &GUEST_MAC,
        "source is the configured MAC (read from config space)"
    );
    assert_eq!(&frame[14..30], GUEST_PAYLOAD);
    assert_eq!(
        run.stdout_text(),
        format!("TX-DONE\nRX:{}\nNET-OK\n", std::str::from_utf8(HOST_PAYLOAD).unwrap()),
        "stderr: {}",
        run.stderr
    );
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
}

#[test]
fn net_fd_that_is_not_a_tap_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b"x"), LOAD_ADDR, 0));
    // fd 0 is /dev/null here.
    let run = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--net", "fd=0"], TIMEOUT);
    assert_eq!(run.code(), Some(1), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("net fd=0: not a tap device"), "{}", run.stderr);
    let run = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--net", "fd=77"], TIMEOUT);
    assert!(run.stderr.contains("net fd=77: Bad file descriptor"), "{}", run.stderr);
}

#[test]
fn bad_disks_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b"x"), LOAD_ADDR, 0));
    let k = kernel.to_str().unwrap();
    let run = run_vmm(&["--kernel", k, "--disk", "path=/nonexistent.img"], TIMEOUT);
    assert_eq!(run.code(), Some(1));
    assert_eq!(
        run.stderr.trim(),
        "keel-vmm: error: disk /nonexistent.img: No such file or directory"
    );
    let empty = write_file(dir.path(), "empty.img", b"");
    let run = run_vmm(
        &["--kernel", k, "--disk", &format!("path={}", empty.display())],
        TIMEOUT,
    );
    assert!(
        run.stderr.contains("smaller than one 512-byte sector"),
        "{}",
        run.stderr
    );
    let run = run_vmm(&["--kernel", k, "--disk", "path=x,bogus=1"], TIMEOUT);
    assert_eq!(run.code(), Some(2), "usage error");
    assert!(run.stderr.contains("unknown key \"bogus\""), "{}", run.stderr);
    // 17 devices exceed the 16 MMIO windows.
    let disk = write_file(dir.path(), "d.img", &[0u8; 512]);
    let mut args = vec!["--kernel".to_string(), k.to_string()];
    for _ in 0..17 {
        args.push("--disk".into());
        args.push(format!("path={}", disk.display()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_vmm(&refs, TIMEOUT);
    assert!(run.stderr.contains("17 virtio devices"), "{}", run.stderr);
}

#[test]
fn tap_by_name_is_created_in_the_vmm_namespace() {
    if !require_kvm() || !require_root() {
        return;
    }
    let ns = NetNs::new("vtapname");
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b"up\n"), LOAD_ADDR, 0));
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, vmm_bin(), "--kernel"])
        .arg(&kernel)
        .args(["--memory", "32MiB", "--net", "tap=kname0,mac=52:54:00:00:00:07"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec keel-vmm");
    let run = wait_with_timeout(child, TIMEOUT);
    assert_eq!(run.stdout_text(), "up\n", "stderr: {}", run.stderr);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    assert!(
        run.stderr
            .contains("virtio-net tap kname0 mac 52:54:00:00:00:07 at 0xd0000000"),
        "{}",
        run.stderr
    );
}
