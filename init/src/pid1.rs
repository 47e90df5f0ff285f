//! keel-init as PID 1 — and in test mode — : the boot sequence and the main loop.
//!
//! The order as PID 1: early mounts → console → logging → kernel modules
//! (kvm-amd or kvm-intel by CPU vendor) → /dev/kvm → KEEL-CONFIG → keel.yaml
//! (validated; an invalid file is reported line by line and nothing is started)
//! → storage pools → guests and the control API. Then it reaps children, restarts
//! guests by policy, serves the API, and waits for a power request.
//!
//! Test mode (`keel-init --test-mode --root DIR ...`, not PID 1) skips mounts,
//! modules, networking and power actions and runs the same supervisor and API
//! with every path under DIR, so the integration tests drive real keel-vmm
//! processes through the real API. SIGTERM then stops the guests and exits.
//!
//! A PID 1 that exits or panics takes the kernel with it, so nothing here ends
//! the process: failures are logged and the appliance stays up, degraded, with
//! its console; a panic lands in an emergency loop that keeps reaping.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::api::{ApiContext, AppliedConfig};
use crate::config::{self, OnIdle};
use crate::guest::resources::{GuestResources, Readiness};
use crate::guest::vmm_command::Paths;
use crate::guest::{Exit, Supervisor};
use crate::layout;
use crate::logging::LevelHandle;
use crate::power::{self, Action};
use crate::{modules, mounts, partitions};

/// How long guests get to shut down before their VMMs are killed.
const GUEST_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where everything is: the appliance's paths, or a test root's.
#[derive(Clone, Debug)]
pub struct Environment {
    pub paths: Paths,
    /// KEEL-CONFIG: keel.yaml is read from and applied configs are written to here.
    pub config_dir: PathBuf,
    pub esp_dir: PathBuf,
    pub os_release: PathBuf,
    pub api_socket: PathBuf,
    /// Test mode: no host networking, no power actions, SIGTERM exits.
    pub test_mode: bool,
}

impl Environment {
    pub fn appliance() -> Self {
        Environment {
            paths: Paths::default(),
            config_dir: layout::CONFIG_MOUNT.into(),
            esp_dir: layout::ESP_MOUNT.into(),
            os_release: layout::OS_RELEASE.into(),
            api_socket: layout::API_SOCKET.into(),
            test_mode: false,
        }
    }

    /// Every path of the appliance below `root`.
    pub fn under(root: &Path, vmm: PathBuf) -> Self {
        let rooted = |p: &str| root.join(p.trim_start_matches('/'));
        let mut paths = Paths::under(root, vmm);
        // Tests and development runs end often; their guests get little time.
        paths.shutdown_timeout_secs = 3;
        Environment {
            paths,
            config_dir: rooted(layout::CONFIG_MOUNT),
            esp_dir: rooted(layout::ESP_MOUNT),
            os_release: rooted(layout::OS_RELEASE),
            api_socket: rooted(layout::API_SOCKET),
            test_mode: true,
        }
    }
}

/// Runs the appliance. Never returns.
///
/// `kernel_words` are the command-line words the kernel did not recognise and passed on
/// to init as arguments (e.g. `nokaslr`, `single`): they are logged, never refused, since
/// PID 1 must not exit over them.
pub fn run(kernel_words: &[String]) -> ! {
    let mount_failures = mounts::mount_early();
    let console = mounts::reopen_console();
    let level = Arc::new(crate::logging::init());
    std::panic::set_hook(Box::new(|info| {
        error!("keel-init: internal error: {info}");
    }));
    info!(
        "keel-init started as PID 1 (Keel {})",
        crate::api::host::os_version(Path::new(layout::OS_RELEASE)).unwrap_or_else(|| "unknown version".into())
    );
    if !kernel_words.is_empty() {
        info!(
            "kernel command-line words passed to init (ignored): {}",
            kernel_words.join(" ")
        );
    }
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

    let outcome = std::panic::catch_unwind(|| serve_appliance(level.clone()));
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

/// Test mode: supervises the guests of `config_file` with every path under
/// `env`'s root until SIGTERM/SIGINT. Returns the process exit code.
pub fn run_test_mode(env: Environment, config_file: &Path) -> i32 {
    crate::logging::init();
    let text = match std::fs::read_to_string(config_file) {
        Ok(t) => t,
        Err(e) => {
            error!("{}: cannot read: {e}", config_file.display());
            return 1;
        }
    };
    let loaded = match config::parse_str(&text) {
        Ok(l) => l,
        Err(d) => {
            for line in d.render(&config_file.display().to_string()).lines() {
                error!("{line}");
            }
            return 1;
        }
    };
    for dir in [&env.config_dir, &env.esp_dir, &env.paths.data_root, &env.paths.run_dir] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            error!("{}: cannot create: {e}", dir.display());
            return 1;
        }
    }
    if let Err(e) = crate::api::config_store::write(&env.config_dir, &text) {
        error!("{e}");
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the event loop: {e}");
            return 1;
        }
    };
    let applied = AppliedConfig {
        config: loaded.config,
        text,
    };
    let outcome = rt.block_on(async {
        // Test mode: pools and volumes under the root; no host networking.
        let root = env.paths.data_root.clone();
        let cfg = applied.config.clone();
        let report = crate::storage::reconcile(&cfg, &root);
        for item in report.errors() {
            if let Err(e) = &item.result {
                error!("storage {}: {e}", item.name);
            }
        }
        let mut readiness = Readiness::default();
        readiness.update_storage(&cfg, &report);
        let resources = GuestResources::new(readiness, false, true, root);
        supervise(&env, Some(applied), resources, None).await
    });
    match outcome {
        Ok(action) => {
            info!("test mode: {action} requested; guests stopped, exiting");
            0
        }
        Err(e) => {
            error!("{e:#}");
            1
        }
    }
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

fn serve_appliance(level: Arc<LevelHandle>) -> anyhow::Result<Action> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let vendor = modules::cpu_vendor();
        modules::load_all(&modules::modules_dir(), vendor);
        // Boot counting needs LoaderBootCountPath: efivarfs, a module on Debian's kernels.
        match mounts::mount_efivarfs() {
            Ok(true) => info!("efivarfs mounted on {}", mounts::EFIVARS_DIR),
            Ok(false) => {}
            Err(e) => warn!("{e}: boot counting cannot tell a trial boot, so an unhealthy update is not given up"),
        }
        wait_for_kvm(Duration::from_secs(3)).await;
        let applied = load_config().await;
        let env = Environment::appliance();
        // KEEL-DATA, pools and volumes, networks and their services.
        if let Some(a) = &applied {
            if let Err(e) = nix::unistd::sethostname(a.config.host.hostname.as_str()) {
                warn!("cannot set hostname: {e}");
            }
            level.set(a.config.host.log_level.as_str());
        }
        let mut host = crate::host::bring_up(applied.as_ref().map(|a| &a.config)).await;
        let mut readiness = Readiness::default();
        if let Some(a) = &applied {
            readiness.update_storage(&a.config, &host.storage);
            readiness.update_network(&a.config, &host.net);
        }
        let resources = GuestResources::new(readiness, true, host.data_mounted, env.paths.data_root.clone())
            .with_log_level(level.clone())
            .with_services(host.services.clone());
        let window = applied
            .as_ref()
            .map(|a| a.config.update.health_window.get())
            .unwrap_or(Duration::from_secs(60));
        let update = update_watch(window).await;
        let action = supervise(&env, applied, resources, update).await;
        host.shut_down().await;
        action
    })
}

/// The main loop shared by PID 1 and test mode: supervisor, control API, signals.
async fn supervise(
    env: &Environment,
    applied: Option<AppliedConfig>,
    resources: GuestResources,
    mut update: Option<UpdateWatch>,
) -> anyhow::Result<Action> {
    // Signals first, so a poweroff request during start-up is not lost.
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;

    let cfg = applied.as_ref().map(|a| a.config.clone());
    let guests = cfg.as_ref().map(|c| c.guests.clone()).unwrap_or_default();
    let on_idle = cfg.as_ref().map(|c| c.host.on_idle).unwrap_or_default();
    let mut sup = Supervisor::new(env.paths.clone(), &guests, true);
    for g in &guests {
        sup.set_resources(&g.name, resources.prepare(g).await);
    }
    let sup = Arc::new(Mutex::new(sup));
    let (host_reconcile, prepare_guest) = resources.hooks();
    let mut changes = lock(&sup).subscribe();
    let ctx = Arc::new(ApiContext {
        sup: sup.clone(),
        config_applied_at: Mutex::new(applied.as_ref().map(|_| Instant::now())),
        applied: Mutex::new(applied),
        config_dir: env.config_dir.clone(),
        esp_dir: env.esp_dir.clone(),
        os_release: env.os_release.clone(),
        data_root: env.paths.data_root.clone(),
        apply_lock: tokio::sync::Mutex::new(()),
        host_reconcile,
        prepare_guest,
        update: update.as_ref().map(|w| w.agent.clone()),
    });
    if let Err(e) = crate::api::serve_unix(ctx.clone(), &env.api_socket).await {
        error!("cannot serve the control API on {}: {e}", env.api_socket.display());
    }
    if let Some(api) = cfg.as_ref().and_then(|c| c.host.api.clone()) {
        start_tcp_api(&ctx, env, &api).await;
    }
    lock(&sup).start_autostart();

    let action = loop {
        let mut next = lock(&sup).tick();
        if let Some(w) = &mut update {
            match w.step(&ctx, &sup) {
                HealthStep::Reboot => break Action::Reboot,
                HealthStep::WakeAt(t) => next = Some(next.map_or(t, |n| n.min(t))),
                HealthStep::Nothing => {}
            }
        }
        let sleep = tokio::time::sleep_until(next.map(tokio::time::Instant::from_std).unwrap_or_else(far_future));
        tokio::select! {
            _ = sigchld.recv() => reap(&sup),
            _ = sigterm.recv() => break if env.test_mode { Action::Poweroff } else { Action::Reboot },
            _ = sigint.recv() => break if env.test_mode { Action::Poweroff } else { Action::Reboot },
            _ = sigusr2.recv() => break Action::Poweroff,
            _ = changes.changed() => {}
            _ = sleep => {}
        }
        let sup = lock(&sup);
        if on_idle == OnIdle::Poweroff && sup.any_started() && sup.idle() {
            info!("every guest has stopped; powering off (host.on_idle: poweroff)");
            break Action::Poweroff;
        }
    };

    info!("{action} requested: stopping guests");
    lock(&sup).stop_all();
    let deadline = Instant::now() + GUEST_STOP_TIMEOUT;
    while !lock(&sup).running_pids().is_empty() && Instant::now() < deadline {
        tokio::select! {
            _ = sigchld.recv() => reap(&sup),
            _ = tokio::time::sleep(Duration::from_millis(200)) => reap(&sup),
        }
    }
    for pid in lock(&sup).running_pids() {
        warn!(pid, "keel-vmm did not stop in {GUEST_STOP_TIMEOUT:?}; killing it");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    reap(&sup);
    let _ = std::fs::remove_file(&env.api_socket);
    Ok(action)
}

/// Health-gated blessing of an updated OS (DESIGN.md "A/B updates"): once the
/// config is applied and every autostart guest has run for the health window,
/// the booted entry is blessed; a trial boot that cannot get healthy is given up
/// by rebooting, so systemd-boot spends its next try (or falls back).
pub struct UpdateWatch {
    agent: Arc<crate::update::Agent>,
    assessment: crate::update::health::Assessment,
    window: Duration,
    /// Found healthy, but an install held the ESP: bless as soon as it is free.
    bless_pending: bool,
}

enum HealthStep {
    Nothing,
    WakeAt(Instant),
    Reboot,
}

/// How soon a bless postponed by an install in progress is tried again.
const BLESS_RETRY: Duration = Duration::from_secs(1);

impl UpdateWatch {
    fn step(&mut self, ctx: &ApiContext, sup: &Mutex<Supervisor>) -> HealthStep {
        use crate::update::health::{self, Action as H};
        let now = Instant::now();
        if !self.bless_pending {
            let applied_at = *ctx.config_applied_at.lock().unwrap_or_else(|p| p.into_inner());
            let verdict = health::assess(now, applied_at, &lock(sup).health(), self.window);
            match self.assessment.step(now, &verdict) {
                H::Bless => self.bless_pending = true,
                H::GiveUp(reason) => {
                    error!(
                        "this trial boot will not become healthy ({reason}); rebooting so the boot loader tries again or falls back"
                    );
                    return HealthStep::Reboot;
                }
                H::Wait(Some(t)) => return HealthStep::WakeAt(t),
                H::Wait(None) | H::Idle => return HealthStep::Nothing,
            }
        }
        // Never wait for the ESP here: an install holds it while this loop feeds it the
        // upload, so waiting would hang PID 1 (and the install with it).
        match self.agent.try_bless() {
            None => {
                debug!("healthy, but an update is being installed; blessing once it is done");
                HealthStep::WakeAt(now + BLESS_RETRY)
            }
            Some(result) => {
                self.bless_pending = false;
                match result {
                    Ok(r) => info!("the system is healthy: boot entry blessed ({r:?})"),
                    Err(e) => error!("the system is healthy but blessing failed: {e}"),
                }
                HealthStep::Nothing
            }
        }
    }
}

/// Mounts the ESP read-write and sets up the update agent for the running version.
async fn update_watch(window: Duration) -> Option<UpdateWatch> {
    let Some(version) = crate::api::host::os_version(Path::new(layout::OS_RELEASE)) else {
        warn!("no IMAGE_VERSION in {}: boot blessing is off", layout::OS_RELEASE);
        return None;
    };
    let dev = tokio::task::spawn_blocking(|| partitions::wait_for_label(layout::ESP_LABEL, Duration::from_secs(5)))
        .await
        .ok()
        .flatten();
    let Some(dev) = dev else {
        error!(
            "no partition labelled {} found: boot blessing and updates are off",
            layout::ESP_LABEL
        );
        return None;
    };
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
    if let Err(e) = mounts::mount_device(
        &dev,
        layout::ESP_MOUNT,
        "vfat",
        flags,
        Some("flush,fmask=0177,dmask=0077"),
    ) {
        error!("{e}: boot blessing and updates are off");
        return None;
    }
    match crate::update::Agent::for_this_system(layout::ESP_MOUNT.into(), version) {
        Ok(agent) => {
            let assessment = crate::update::health::Assessment::new(window, agent.on_trial(), Instant::now());
            info!(
                on_trial = agent.on_trial(),
                "boot health check armed (window {window:?})"
            );
            Some(UpdateWatch {
                agent: Arc::new(agent),
                assessment,
                window,
                bless_pending: false,
            })
        }
        Err(e) => {
            error!("update agent: {e}: boot blessing and updates are off");
            None
        }
    }
}

/// `host.api`: the TCP listener, if its token file is usable.
async fn start_tcp_api(ctx: &Arc<ApiContext>, env: &Environment, api: &crate::config::ApiListener) {
    let token_path = env.config_dir.join(api.token_file.as_str());
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            error!(
                "host.api: cannot read the token file {}: {e}; the TCP API stays off",
                token_path.display()
            );
            return;
        }
    };
    if token.len() < 16 {
        error!(
            "host.api: the token in {} is shorter than 16 characters; the TCP API stays off",
            token_path.display()
        );
        return;
    }
    if let Err(e) = crate::api::serve_tcp(ctx.clone(), *api.listen, token).await {
        error!("host.api: cannot listen on {}: {e}", api.listen.value);
    }
}

fn lock(sup: &Mutex<Supervisor>) -> std::sync::MutexGuard<'_, Supervisor> {
    sup.lock().unwrap_or_else(|p| p.into_inner())
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

/// Reaps every exited child: guests go to the supervisor (which, while shutting
/// down, finds them stopping and leaves them stopped), orphans are just reaped.
fn reap(sup: &Mutex<Supervisor>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                let Some((pid, exit)) = Exit::from_wait(status) else {
                    continue;
                };
                if !lock(sup).on_exit(pid, exit) {
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
/// there is no usable config: the appliance then starts no guests, and the API
/// still accepts a valid one.
async fn load_config() -> Option<AppliedConfig> {
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
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            error!("{}: cannot read: {e}; starting no guests", path.display());
            return None;
        }
    };
    match config::parse_str(&text) {
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
            Some(AppliedConfig {
                config: loaded.config,
                text,
            })
        }
        Err(d) => {
            for line in d.render(&path.display().to_string()).lines() {
                error!("{line}");
            }
            error!(
                "the config is not valid; starting no guests. Fix it with `keelctl apply` or by editing KEEL-CONFIG"
            );
            None
        }
    }
}
