//! Starting one keel-vmm process for a guest: its console socket first (so no
//! byte of early output is lost), the process with its taps at fixed fd numbers,
//! then the threads that relay its output; and what is logged when it hangs.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use tracing::{error, info, warn};

use crate::config::{BootSource, Guest};
use crate::storage::boot_entry::{self, Prepared};

use super::stuck;
use super::supervisor::Slot;
use super::vmm_command::{self, Paths};
use super::vmm_log::{self, VmmLog};

/// Spawns keel-vmm for a guest: console socket, then the process, then the relays.
pub(super) fn spawn(g: &Guest, paths: &Paths, slot: &Slot) -> std::io::Result<i32> {
    let name = g.name.value.as_str();
    let dir = paths.guest_run_dir(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let disk_boot = match g.boot.value {
        BootSource::Disk => Some(disk_boot(g, paths)?),
        BootSource::Kernel => None,
    };
    if let Some(c) = &g.cloud_init {
        let seed =
            super::cloud_init::write_seed(g, c, &slot.resources.nic_networks, paths).map_err(std::io::Error::other)?;
        let instance = seed.meta_data.lines().next().unwrap_or_default();
        info!(guest = name, "cloud-init seed written ({instance})");
    }
    let console_path = paths.console_socket(name);
    let _ = std::fs::remove_file(&console_path);
    let _ = std::fs::remove_file(paths.vmm_socket(name));
    let listener = UnixListener::bind(&console_path)?;
    std::fs::set_permissions(&console_path, std::fs::Permissions::from_mode(0o600))?;
    slot.console.serve_vmm(listener, slot.console_cancel.clone())?;
    let tap_fds: Vec<RawFd> = slot.resources.taps.iter().map(|t| t.fd.as_raw_fd()).collect();
    let mut cmd = Command::new(&paths.vmm);
    cmd.args(vmm_command::args(g, paths, disk_boot.as_ref()));
    cmd.env(vmm_log::VMM_LOG_ENV.0, vmm_log::VMM_LOG_ENV.1);
    if !tap_fds.is_empty() {
        // SAFETY: the closure only calls fcntl/dup2 (async-signal-safe) on fds this
        // process owns; see `place_fds`.
        unsafe { cmd.pre_exec(move || place_fds(&tap_fds)) };
    }
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            slot.console_cancel.store(true, Ordering::SeqCst);
            return Err(std::io::Error::new(e.kind(), format!("{}: {e}", paths.vmm.display())));
        }
    };
    slot.vmm_log.clear();
    if let Some(out) = child.stdout.take() {
        vmm_log::relay(out, format!("[guest {name}]"), None);
    }
    if let Some(err) = child.stderr.take() {
        vmm_log::relay(err, format!("[vmm {name}]"), Some(slot.vmm_log.clone()));
    }
    // The child is reaped by keel-init's waitpid loop, not through this handle.
    Ok(child.id() as i32)
}

/// `boot: disk`: what the guest's first disk boots, copied out of it again at every
/// start (a guest that installed a new kernel boots it). The error, on `keelctl status`,
/// says what was looked for.
fn disk_boot(g: &Guest, paths: &Paths) -> std::io::Result<Prepared> {
    let name = g.name.value.as_str();
    let disk = g
        .disks
        .first()
        .ok_or_else(|| std::io::Error::other("boot: disk: the guest has no disks"))?;
    let path = paths.pool_file(&disk.volume);
    tracing::debug!(guest = name, disk = %path.display(), "boot: disk: reading the boot entry");
    let prepared = boot_entry::prepare(&path, &paths.disk_boot_dir(name))
        .map_err(|e| std::io::Error::other(format!("boot: disk: {e}")))?;
    info!(
        guest = name,
        found_by = prepared.found_by.as_str(),
        cmdline = prepared.cmdline.as_str(),
        "boot: disk"
    );
    if let Some(w) = &prepared.warning {
        warn!(guest = name, "boot: disk: {w}");
    }
    Ok(prepared)
}

/// In the child between fork and exec: puts `fds` at 3, 4, ... (where
/// `vmm_command::args` says `--net fd=N`), without close-on-exec. Each is first
/// copied above the target range, so a source that sits at a target number is
/// not overwritten before it is moved.
fn place_fds(fds: &[RawFd]) -> std::io::Result<()> {
    let base = vmm_command::FIRST_PASSED_FD;
    let high = base + fds.len() as RawFd;
    let mut copies = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: fcntl on an fd we own; F_DUPFD_CLOEXEC returns a new fd >= high.
        let c = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high) };
        if c < 0 {
            return Err(std::io::Error::last_os_error());
        }
        copies.push(c);
    }
    for (i, c) in copies.into_iter().enumerate() {
        // SAFETY: dup2 onto the target number; the new fd has no close-on-exec.
        if unsafe { libc::dup2(c, base + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Logs a VMM that does not move: why, its last stderr lines (at debug level they
/// say what it was about to wait for) and each thread's kernel stack.
pub(super) fn report_stuck(name: &str, pid: i32, what: &str, log: &VmmLog) {
    error!(guest = name, pid, "{what}");
    for line in log.tail() {
        error!(guest = name, pid, "keel-vmm said: {line}");
    }
    for line in stuck::describe(pid) {
        error!(guest = name, pid, "keel-vmm thread: {line}");
    }
}
