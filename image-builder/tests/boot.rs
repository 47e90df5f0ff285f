//! The whole boot chain of a built image under QEMU: OVMF finds the ESP on the GPT,
//! starts systemd-boot, which reads loader.conf and picks the UKI by its `.osrel`; the
//! stub starts Debian's kernel with the UKI's command line and initramfs. The
//! initramfs here is a busybox script (not keel-init: this tests the image, not PID 1)
//! that prints a marker and the command line, then powers off.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keel_image::initramfs::Builder;

const HOST_KERNEL: &str = "/var/cache/keel/kernels/linux-image-amd64";
const MARKER: &str = "KEEL-IMAGE-BOOT-MARKER";
const TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn built_image_boots_through_ovmf_systemd_boot_and_the_uki() {
    for (path, package) in [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/lib/systemd/boot/efi/linuxx64.efi.stub", "systemd-boot-efi"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install {package} (ci/setup does)"
        );
    }
    let kernel_dir = std::fs::canonicalize(HOST_KERNEL).unwrap_or_else(|e| {
        panic!("{HOST_KERNEL}: {e}; run ci/setup (kernel-config/fetch-host unpacks Debian's kernel)")
    });
    let kver = std::fs::read_to_string(kernel_dir.join(".kernel-version")).expect(".kernel-version");
    let kernel = kernel_dir.join("boot").join(format!("vmlinuz-{}", kver.trim()));

    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = Builder::with_mtime(1_700_000_000);
    b.host_file("/bin/busybox", Path::new("/bin/busybox"), 0o755)
        .expect("busybox");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /proc\n/bin/busybox mount -t proc proc /proc\n\
         echo {MARKER} cmdline=$(/bin/busybox cat /proc/cmdline)\n/bin/busybox poweroff -f\n"
    );
    b.file("/init", 0o755, init).expect("init");
    let initramfs = dir.path().join("initrd.cpio");
    b.write_to_file(&initramfs).expect("write initramfs");

    let image = dir.path().join("boot.img");
    let config = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../configs/minimal.yaml");
    let o = Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["build", "--size", "400MiB", "--version", "2.3.4", "--config"])
        .arg(&config)
        .arg("-o")
        .arg(&image)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .output()
        .expect("run keel-image build");
    assert!(o.status.success(), "build: {}", String::from_utf8_lossy(&o.stderr));

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["run", "--accel", "tcg", "--memory", "1GiB", "--cpus", "1", "--snapshot"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run keel-image run");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut marker = None;
    while started.elapsed() < TIMEOUT {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                if line.contains(MARKER) && marker.is_none() {
                    marker = Some((line.clone(), started.elapsed()));
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The console closes a moment before the process can be reaped: give it until the
    // deadline to exit.
    let mut exited = child.try_wait().expect("wait");
    while exited.is_none() && started.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(100));
        exited = child.try_wait().expect("wait");
    }
    let status = match exited {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "QEMU did not power off within {TIMEOUT:?}; console:\n{}",
                console.join("\n")
            );
        }
    };
    let (line, at) = marker.unwrap_or_else(|| panic!("no {MARKER} on the console:\n{}", console.join("\n")));
    eprintln!(
        "marker after {:.1} s, QEMU exit after {:.1} s",
        at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let default_cmdline = std::fs::read_to_string(
        Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("../kernel-config/cmdline"),
    )
    .expect("cmdline");
    assert!(
        line.contains(default_cmdline.trim()),
        "the UKI's .cmdline reached the kernel: {line}"
    );
    assert!(status.success(), "QEMU exit status {status} after poweroff");
}
