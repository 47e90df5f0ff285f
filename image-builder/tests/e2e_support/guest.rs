//! Pieces of the test guests: a busybox initramfs whose /init reports the vCPU count, writes
//! keel-vmm's boot timer and reboots, and the tiny boot-timer program it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_image::initramfs::Builder;

/// Printed by the test guest's /init, followed by ` cpus=N`.
pub const GUEST_MARKER: &str = "KEEL-GUEST-MARKER";

/// The guest's /init: count vCPUs in /proc/cpuinfo, print the marker, write the boot timer,
/// reboot (with `reboot=k` on the command line the kernel resets through the i8042, which
/// ends keel-vmm with its reboot exit code, or QEMU under -no-reboot).
const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "KEEL-GUEST-MARKER cpus=$(grep -c ^processor /proc/cpuinfo)"
boot-timer || echo "KEEL-GUEST boot-timer write failed"
reboot -f
"#;

/// Writes 123 to I/O port 0x3f0 (keel-vmm's boot-timer device, as in Firecracker) and exits
/// 0, or exits 1 when the kernel refuses ioperm(2). Freestanding: no libc, two syscalls.
const BOOT_TIMER_C: &str = r#"
static long syscall3(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}
void _start(void) {
    long rc = syscall3(173 /* ioperm */, 0x3f0, 1, 1);
    if (rc == 0)
        __asm__ volatile("outb %b0, %w1" : : "a"((unsigned char)123), "Nd"((unsigned short)0x3f0));
    syscall3(60 /* exit */, rc == 0 ? 0 : 1, 0, 0);
    for (;;) {}
}
"#;

/// Compiles the boot-timer program into `dir` with the system C compiler.
pub fn build_boot_timer(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("boot-timer.c");
    let out = dir.join("boot-timer");
    std::fs::write(&src, BOOT_TIMER_C).map_err(|e| format!("{}: {e}", src.display()))?;
    let status = Command::new("cc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| format!("cc not found ({e}); ci/setup installs gcc"))?;
    if !status.success() {
        return Err(format!("cc failed on {}: {status}", src.display()));
    }
    Ok(out)
}

/// Adds busybox at /bin/busybox with the applets the test scripts use.
pub fn add_busybox(b: &mut Builder, busybox: &Path) -> Result<(), String> {
    b.host_file("/bin/busybox", busybox, 0o755).map_err(|e| e.to_string())?;
    for applet in [
        "sh", "mount", "grep", "echo", "cat", "reboot", "poweroff", "insmod", "uname", "sleep", "ls", "dmesg",
    ] {
        b.symlink(&format!("/bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    for dir in ["/proc", "/sys", "/dev", "/tmp"] {
        b.dir(dir, 0o755).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The test guest's initramfs (uncompressed newc cpio).
pub fn guest_initramfs(busybox: &Path, boot_timer: &Path) -> Result<Vec<u8>, String> {
    let mut b = Builder::from_env().map_err(|e| e.to_string())?;
    add_busybox(&mut b, busybox)?;
    b.host_file("/bin/boot-timer", boot_timer, 0o755)
        .map_err(|e| e.to_string())?;
    b.file("/init", 0o755, GUEST_INIT).map_err(|e| e.to_string())?;
    b.build().map_err(|e| e.to_string())
}
