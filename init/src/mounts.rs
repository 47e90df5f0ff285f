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
        target: EFIVARS_DIR,
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
        if fs.fstype == "efivarfs" && !Path::new(EFI_FIRMWARE_DIR).exists() {
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
            // efivarfs is a module in Debian's kernels (CONFIG_EFIVAR_FS=m): not there
            // yet; `mount_efivarfs` mounts it once the modules are loaded.
            Err(nix::errno::Errno::ENODEV) if fs.fstype == "efivarfs" => {
                debug!("efivarfs is not built in; mounting it after the modules are loaded")
            }
            Err(e) => failures.push(format!("mount {} on {}: {e}", fs.fstype, fs.target)),
        }
    }
    failures
}

/// Where efivarfs goes, and the directory that exists only on UEFI machines.
pub const EFIVARS_DIR: &str = "/sys/firmware/efi/efivars";
const EFI_FIRMWARE_DIR: &str = "/sys/firmware/efi";
/// `f_type` of an efivarfs mount (linux/magic.h).
const EFIVARFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xde5e_81e4);

/// Mounts efivarfs if this is a UEFI machine and it is not mounted yet: call after the
/// kernel modules are loaded (the early mount fails while efivarfs is a module that is
/// not loaded). Without it keel-init cannot read `LoaderBootCountPath`, so it would
/// never know that a boot is a trial and never give up an unhealthy one (no rollback).
/// `Ok(true)` when it mounted it now.
pub fn mount_efivarfs() -> Result<bool, String> {
    mount_efivarfs_at(Path::new(EFI_FIRMWARE_DIR), Path::new(EFIVARS_DIR))
}

fn mount_efivarfs_at(firmware_dir: &Path, target: &Path) -> Result<bool, String> {
    if !firmware_dir.exists() {
        return Ok(false); // BIOS boot: no EFI variables
    }
    if nix::sys::statfs::statfs(target).is_ok_and(|st| st.filesystem_type() == EFIVARFS_MAGIC) {
        return Ok(false);
    }
    fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    match mount(
        Some("efivarfs"),
        target,
        Some("efivarfs"),
        NOSUID_NODEV_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(true),
        Err(e) => Err(format!("mount efivarfs on {}: {e}", target.display())),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efivarfs_is_left_alone_on_a_bios_machine() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("sys/firmware/efi/efivars");
        assert_eq!(
            mount_efivarfs_at(&root.path().join("sys/firmware/efi"), &target),
            Ok(false)
        );
        assert!(!target.exists(), "nothing created without /sys/firmware/efi");
    }
}
