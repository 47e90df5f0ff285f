//! The early filesystems a PID 1 must mount before anything else works.

use std::fs;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use tracing::{debug, warn};

struct Fs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

const EARLY: &[Fs] = &[
    Fs {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Fs {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Fs {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Fs {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    Fs {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Fs {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Fs {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Fs {
        source: "efivarfs",
        target: "/sys/firmware/efi/efivars",
        fstype: "efivarfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mounts proc, sys, dev, run, tmp, cgroup2 and (on UEFI machines) efivarfs.
/// Returns the failures; a missing efivarfs on a BIOS machine is not one.
pub fn mount_early() -> Vec<String> {
    let mut failures = Vec::new();
    for fs in EARLY {
        if fs.fstype == "efivarfs" && !Path::new("/sys/firmware/efi").exists() {
            continue;
        }
        if let Err(e) = fs::create_dir_all(fs.target) {
            failures.push(format!("mkdir {}: {e}", fs.target));
            continue;
        }
        match mount(Some(fs.source), fs.target, Some(fs.fstype), fs.flags, fs.data) {
            Ok(()) => debug!(target = fs.target, "mounted {}", fs.fstype),
            // Already mounted (e.g. the kernel automounted devtmpfs): fine.
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => failures.push(format!("mount {} on {}: {e}", fs.fstype, fs.target)),
        }
    }
    failures
}

/// Points stdin/stdout/stderr at /dev/console. The kernel opens the console for
/// init before /init runs, but only if the initramfs has a /dev/console node;
/// keel's initramfs has no device nodes, so this is done after devtmpfs is up.
pub fn reopen_console() -> std::io::Result<()> {
    let console = fs::OpenOptions::new().read(true).write(true).open("/dev/console")?;
    nix::unistd::dup2_stdin(&console)?;
    nix::unistd::dup2_stdout(&console)?;
    nix::unistd::dup2_stderr(&console)?;
    Ok(())
}

/// Mounts a block device; creates the mount point.
pub fn mount_device(
    device: &Path,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> std::io::Result<()> {
    fs::create_dir_all(target)?;
    mount(Some(device), target, Some(fstype), flags, data)
        .map_err(|e| std::io::Error::other(format!("mount {} ({fstype}) on {target}: {e}", device.display())))
}

/// Unmounts, logging instead of failing (used while shutting down).
pub fn unmount_quietly(target: &str) {
    if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::empty())
        && e != nix::errno::Errno::EINVAL
        && e != nix::errno::Errno::ENOENT
    {
        warn!("umount {target}: {e}");
    }
}
