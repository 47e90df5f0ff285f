//! SIGTERM asks the guest to stop: it presses the ACPI power button when the guest enabled
//! it, and types Ctrl-Alt-Del into the i8042 otherwise; then it waits. A guest that
//! ignores it is stopped hard after the grace period, or at a second signal.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

/// Set 1 scan codes for Ctrl, Alt, Del down then up (the controller translates).
const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Prints "R", then echoes 8 bytes from the keyboard to the serial port and resets.
fn keyboard_echo_guest() -> Vec<u8> {
    let mut a = asm64();
    serial_setup(&mut a);
    print(&mut a, b"R");
    a.xor(ecx, ecx).unwrap();
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.in_(al, 0x64).unwrap();
    a.test(al, 1u32).unwrap();
    a.jz(poll).unwrap();
    a.in_(al, 0x60).unwrap();
    a.out(dx, al).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, CTRL_ALT_DEL.len() as u32).unwrap();
    a.jb(poll).unwrap();
    i8042_reset(&mut a);
    assemble(a, LOAD_ADDR)
}

/// An ACPI-aware guest: enables the power button event (PWRBTN_EN in PM1_EN at 0x602),
/// prints "R", polls PM1_STS (0x600) until PWRBTN_STS, acknowledges it (write one to
/// clear), prints "P", and powers off through PM1a_CNT.SLP_EN (0x604) as Linux does for S5.
fn power_button_guest() -> Vec<u8> {
    let mut a = asm64();
    a.mov(dx, 0x602u32).unwrap();
    a.mov(ax, 0x100u32).unwrap();
    a.out(dx, ax).unwrap();
    serial_setup(&mut a);
    print(&mut a, b"R");
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.mov(dx, 0x600u32).unwrap();
    a.in_(ax, dx).unwrap();
    a.test(ax, 0x100u32).unwrap();
    a.jz(poll).unwrap();
    a.mov(ax, 0x100u32).unwrap();
    a.out(dx, ax).unwrap();
    serial_setup(&mut a);
    print(&mut a, b"P");
    a.mov(dx, 0x604u32).unwrap();
    a.mov(ax, ((5u32 << 10) | (1 << 13)) | 1).unwrap();
    a.out(dx, ax).unwrap();
    halt_forever(&mut a);
    assemble(a, LOAD_ADDR)
}

/// Prints "R" and halts with interrupts off: it will never react.
fn deaf_guest() -> Vec<u8> {
    let mut a = asm64();
    serial_setup(&mut a);
    print(&mut a, b"R");
    halt_forever(&mut a);
    assemble(a, LOAD_ADDR)
}

/// Starts keel-vmm on `image`, waits for the guest's "R", then sends `signals`
/// SIGTERMs. Returns (exit code, stdout after "R", time from first signal to exit).
fn run_and_signal(image: &[u8], extra: &[&str], signals: usize) -> (Option<i32>, Vec<u8>, Duration, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(image, LOAD_ADDR, 0));
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "32MiB"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<u8>();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while let Ok(1) = stdout.read(&mut b) {
            if tx.send(b[0]).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30));
    if first != Ok(b'R') {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "guest did not print R: {first:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pid = child.id() as libc::pid_t;
    let signalled = Instant::now();
    for _ in 0..signals {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keel-vmm ignored SIGTERM for 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = signalled.elapsed();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let rest: Vec<u8> = std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(500)).ok()).collect();
    (status.code(), rest, elapsed, stderr)
}

#[test]
fn sigterm_types_ctrl_alt_del_and_guest_stop_exits_zero() {
    if !require_kvm() {
        return;
    }
    let (code, rest, _, stderr) = run_and_signal(&keyboard_echo_guest(), &[], 1);
    assert_eq!(rest, CTRL_ALT_DEL, "guest read Ctrl-Alt-Del; stderr: {stderr}");
    assert_eq!(
        code,
        Some(0),
        "guest reset after SIGTERM is a clean stop; stderr: {stderr}"
    );
}

#[test]
fn guest_ignoring_sigterm_is_stopped_after_grace_period() {
    if !require_kvm() {
        return;
    }
    let (code, _, elapsed, stderr) = run_and_signal(&deaf_guest(), &["--shutdown-timeout", "0.3"], 1);
    assert_eq!(code, Some(4), "hard stop code; stderr: {stderr}");
    assert!(
        elapsed >= Duration::from_millis(300),
        "waited the grace period: {elapsed:?}"
    );
    assert!(stderr.contains("did not stop within"), "{stderr}");
}

#[test]
fn second_sigterm_stops_hard_at_once() {
    if !require_kvm() {
        return;
    }
    let (code, _, elapsed, stderr) = run_and_signal(&deaf_guest(), &["--shutdown-timeout", "60"], 2);
    assert_eq!(code, Some(4), "stderr: {stderr}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn sigterm_presses_the_power_button_of_an_acpi_guest() {
    if !require_kvm() {
        return;
    }
    let (code, rest, _, stderr) = run_and_signal(&power_button_guest(), &[], 1);
    assert_eq!(rest, b"P", "guest saw PWRBTN_STS; stderr: {stderr}");
    assert!(stderr.contains("pressing the ACPI power button"), "{stderr}");
    assert!(!stderr.contains("Ctrl-Alt-Del"), "only the button is sent: {stderr}");
    assert_eq!(
        code,
        Some(0),
        "poweroff after SIGTERM is a clean stop; stderr: {stderr}"
    );
}
