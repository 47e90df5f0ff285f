//! keel-init as PID 1: the boot sequence and the main loop.
//!
//! The order: early mounts → console → logging → kernel modules (kvm-amd or
//! kvm-intel by CPU vendor) → /dev/kvm → KEEL-CONFIG → keel.yaml (validated; an
//! invalid file is reported line by line and nothing is started) → guests. Then
//! it reaps children, restarts guests by policy, and waits for a power request.
//!
//! A PID 1 that exits or panics takes the kernel with it, so nothing here ends
//! the process: failures are logged and the appliance stays up, degraded, with
//! its console; a panic lands in an emergency loop that keeps reaping.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::config::{self, Config, OnIdle};
use crate::layout;
use crate::logging::LevelHandle;
use crate::power::{self, Action};
use crate::supervisor::{Exit, Supervisor};
use crate::vmm_command::Paths;
use crate::{modules, mounts, partitions};

/// How long guests get to shut down before their VMMs are killed.
const GUEST_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the appliance. Never returns.
pub fn run() -> ! {
    let mount_failures = mounts::mount_early();
    let console = mounts::reopen_console();
    let level = crate::logging::init();
    std::panic::set_hook(Box::new(|info| {
        error!("keel-init: internal error: {info}");
    }));
    info!(
        "keel-init started as PID 1 (Keel {})",
        os_version().unwrap_or_else(|| "unknown version".into())
    );
    for f in mount_failures {
        warn!("early mount: {f}");
    }
    if let Err(e) = console {
        warn!("cannot open /dev/console: {e}");
    }
    // Ctrl-Alt-Del becomes SIGINT to us (a clean reboot) instead of an instant reset.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        warn!("cannot route Ctrl-Alt-Del to keel-init: {e}");
    }

    let outcome = std::panic::catch_unwind(|| serve(&level));
    match outcome {
        Ok(Ok(action)) => {
            let err = power::execute(action);
            error!("the kernel refused to {action} ({err}); staying up");
        }
        Ok(Err(e)) => error!("keel-init cannot run its main loop: {e:#}"),
        Err(_) => error!("keel-init hit an internal error (logged above)"),
    }
    emergency_loop()
}

/// Keeps reaping children so the system stays usable; nothing else runs.
fn emergency_loop() -> ! {
    error!("keel-init is in emergency mode: guests are not supervised. Reset the machine to recover.");
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => std::thread::sleep(Duration::from_secs(1)),
            Ok(_) => {}
        }
    }
}

/// The IMAGE_VERSION of /etc/os-release.
fn os_version() -> Option<String> {
    let text = std::fs::read_to_string(layout::OS_RELEASE).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .map(|v| v.trim_matches('"').to_string())
}

fn serve(level: &LevelHandle) -> anyhow::Result<Action> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(boot(level))
}

async fn boot(level: &LevelHandle) -> anyhow::Result<Action> {
    // Signals first, so a poweroff request during boot is not lost.
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;

    let vendor = modules::cpu_vendor();
    modules::load_all(&modules::modules_dir(), vendor);
    wait_for_kvm(Duration::from_secs(3)).await;

    let cfg = load_config().await;
    if let Some(cfg) = &cfg {
        level.set(cfg.host.log_level.as_str());
        if let Err(e) = nix::unistd::sethostname(cfg.host.hostname.as_str()) {
            warn!("cannot set hostname: {e}");
        }
    }
    let guests = cfg.as_ref().map(|c| c.guests.clone()).unwrap_or_default();
    let on_idle = cfg.as_ref().map(|c| c.host.on_idle).unwrap_or_default();
    let mut sup = Supervisor::new(Paths::default(), &guests);
    sup.start_autostart();

    let action = loop {
        let next = sup.tick();
        let sleep = tokio::time::sleep_until(next.map(tokio::time::Instant::from_std).unwrap_or_else(far_future));
        tokio::select! {
            _ = sigchld.recv() => reap(&mut sup, false),
            _ = sigterm.recv() => break Action::Reboot,
            _ = sigint.recv() => break Action::Reboot,
            _ = sigusr2.recv() => break Action::Poweroff,
            _ = sleep => {}
        }
        if on_idle == OnIdle::Poweroff && sup.any_started() && sup.idle() {
            info!("every guest has stopped; powering off (host.on_idle: poweroff)");
            break Action::Poweroff;
        }
    };

    info!("{action} requested: stopping guests");
    sup.stop_all();
    let deadline = Instant::now() + GUEST_STOP_TIMEOUT;
    while !sup.running_pids().is_empty() && Instant::now() < deadline {
        tokio::select! {
            _ = sigchld.recv() => reap(&mut sup, true),
            _ = tokio::time::sleep(Duration::from_millis(200)) => reap(&mut sup, true),
        }
    }
    for pid in sup.running_pids() {
        warn!(pid, "keel-vmm did not stop in {GUEST_STOP_TIMEOUT:?}; killing it");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    Ok(action)
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

/// Reaps every exited child: guests go to the supervisor, orphans are just reaped.
fn reap(sup: &mut Supervisor, shutting_down: bool) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                let Some((pid, exit)) = Exit::from_wait(status) else {
                    continue;
                };
                if shutting_down {
                    sup.forget(pid);
                } else if !sup.on_exit(pid, exit) {
                    debug!(pid, "reaped an orphan");
                }
            }
        }
    }
}

async fn wait_for_kvm(timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if Path::new("/dev/kvm").exists() {
            info!("/dev/kvm ready");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    error!(
        "/dev/kvm did not appear: no KVM on this machine (is virtualization enabled in the firmware?); guests cannot start"
    );
}

/// Mounts KEEL-CONFIG and reads keel.yaml. `None` (after reporting why) when
/// there is no usable config: the appliance then starts no guests.
async fn load_config() -> Option<Config> {
    let dev = tokio::task::spawn_blocking(|| partitions::wait_for_label(layout::CONFIG_LABEL, Duration::from_secs(10)))
        .await
        .ok()
        .flatten();
    let Some(dev) = dev else {
        error!(
            "no partition labelled {} found; starting no guests",
            layout::CONFIG_LABEL
        );
        return None;
    };
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
    if let Err(e) = mounts::mount_device(
        &dev,
        layout::CONFIG_MOUNT,
        "vfat",
        flags,
        Some("flush,fmask=0177,dmask=0077"),
    ) {
        error!("{e}; starting no guests");
        return None;
    }
    let path = PathBuf::from(layout::CONFIG_MOUNT).join(layout::CONFIG_FILE);
    match config::load_file(&path) {
        Ok(loaded) => {
            for w in loaded.warnings.warnings() {
                warn!("{}:{}:{}: warning: {}", path.display(), w.line, w.col, w.message);
            }
            let c = &loaded.config;
            info!(
                "config {}: {} guests, {} bridges, {} pools",
                path.display(),
                c.guests.len(),
                c.network.bridges.len(),
                c.storage.pools.len()
            );
            Some(loaded.config)
        }
        Err(e) => {
            for line in e.to_string().lines() {
                error!("{line}");
            }
            error!(
                "the config is not valid; starting no guests. Fix it with `keelctl apply` or by editing KEEL-CONFIG"
            );
            None
        }
    }
}
