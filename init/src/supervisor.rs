//! The guest supervisor: one `keel-vmm` process per guest, its lifecycle states,
//! restart policy, graceful stops, and the console each guest writes to.
//!
//! States: `defined` (declared, never started or removed from autostart),
//! `starting` (keel-vmm spawned, guest not yet running), `running`, `paused`,
//! `stopping` (power button pressed, waiting for the guest, then killed at the
//! deadline), `stopped` (ended and not to be restarted), `crashed` (crash loop or
//! cannot start), `backoff` (waiting to be restarted after a failure).
//!
//! PID 1 reaps every child itself (`waitpid` on SIGCHLD), so this module never
//! waits on its children: the caller passes each reaped exit to
//! [`Supervisor::on_exit`] and calls [`Supervisor::tick`] when the time it
//! returned has come. Everything here is synchronous and quick; the async parts
//! (talking to a VMM's control socket) are done by the caller with the paths this
//! module hands out, so the lock around the supervisor is never held across I/O.
//!
//! Every state change bumps a generation number on a `watch` channel: the main
//! loop re-plans its timers on it, and API calls wait on it for a guest to reach
//! the state they asked for.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Guest, RestartPolicy};
use crate::console::ConsoleHub;
use crate::guest::stuck;
use crate::guest::vmm_log::{self, VmmLog};
use crate::vmm_command::{self, Paths};

/// keel-vmm's exit codes (see `keel-vmm --help`).
pub const VMM_EXIT_POWEROFF: i32 = 0;
pub const VMM_EXIT_REBOOT: i32 = 3;
pub const VMM_EXIT_KILLED: i32 = 4;

/// A guest that ran at least this long before ending had a healthy run: a reboot
/// then restarts it at once and the backoff starts over. Ending sooner is a
/// failed boot — a kernel panic with `panic=1` or a triple fault also looks like a
/// reboot to the VMM — and backs off like a crash, so a boot loop cannot spin.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How long a graceful stop waits for the guest before killing its VMM, unless
/// the caller says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGKILL, how long until a VMM that has not been reaped is given up on as
/// stuck in the kernel.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often a starting guest is checked for its control socket.
const STARTING_POLL: Duration = Duration::from_millis(20);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Defined,
    Starting { pid: i32, since: Instant },
    Running { pid: i32, since: Instant },
    Paused { pid: i32, since: Instant },
    Stopping { pid: i32, deadline: Instant, killed: bool },
    Stopped { reason: String },
    Crashed { reason: String },
    Backoff { until: Instant, reason: String },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Defined => "defined",
            State::Starting { .. } => "starting",
            State::Running { .. } => "running",
            State::Paused { .. } => "paused",
            State::Stopping { .. } => "stopping",
            State::Stopped { .. } => "stopped",
            State::Crashed { .. } => "crashed",
            State::Backoff { .. } => "backoff",
        }
    }

    /// All state names, for metrics (one series per state).
    pub const NAMES: [&'static str; 8] = [
        "defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "backoff",
    ];

    /// The VMM's pid while one exists.
    pub fn pid(&self) -> Option<i32> {
        match *self {
            State::Starting { pid, .. }
            | State::Running { pid, .. }
            | State::Paused { pid, .. }
            | State::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// A VMM process exists or a restart is pending.
    pub fn is_active(&self) -> bool {
        self.pid().is_some() || matches!(self, State::Backoff { .. })
    }
}

/// How a keel-vmm process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn from_wait(status: nix::sys::wait::WaitStatus) -> Option<(i32, Exit)> {
        use nix::sys::wait::WaitStatus;
        match status {
            WaitStatus::Exited(pid, code) => Some((pid.as_raw(), Exit::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), Exit::Signal(sig as i32))),
            _ => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Exit::Code(VMM_EXIT_POWEROFF) => "guest powered off".into(),
            Exit::Code(VMM_EXIT_REBOOT) => "guest rebooted".into(),
            Exit::Code(VMM_EXIT_KILLED) => "guest stopped hard".into(),
            Exit::Code(c) => format!("keel-vmm failed (exit code {c})"),
            Exit::Signal(s) => format!("keel-vmm killed by signal {s}"),
        }
    }
}

/// What to do after an exit, decided from the policy alone (pure, so it is tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    RestartNow,
    RestartAfter(Duration),
    Stop,
    CrashLoop,
}

/// Restart bookkeeping of one guest.
#[derive(Clone, Debug, Default)]
pub struct RestartHistory {
    /// Times of recent restarts (within the crash-loop window).
    recent: VecDeque<Instant>,
    /// Consecutive failed runs, for the exponential backoff.
    failures: u32,
}

impl RestartHistory {
    pub fn recent_restarts(&self) -> usize {
        self.recent.len()
    }

    /// `never` leaves every ended guest stopped (also after a guest reboot, which
    /// is how a guest without ACPI ends its VM). Otherwise a guest that asks to
    /// reboot after a healthy run is restarted at once, a clean poweroff is final
    /// unless the policy is `always`, and anything else — a reboot within
    /// [`HEALTHY_RUN`] of starting included — is a failure, restarted after a
    /// backoff that doubles up to `max_backoff`, until `max_restarts` within
    /// `window` makes it a crash loop.
    pub fn decide(&mut self, g: &Guest, exit: Exit, uptime: Duration, now: Instant) -> Decision {
        let r = &g.restart;
        let clean = exit == Exit::Code(VMM_EXIT_POWEROFF);
        let reboot = exit == Exit::Code(VMM_EXIT_REBOOT);
        let restart = match r.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Always => true,
        };
        if !restart {
            return Decision::Stop;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > r.window.get())
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= *r.max_restarts as usize {
            return Decision::CrashLoop;
        }
        self.recent.push_back(now);
        let healthy = uptime >= HEALTHY_RUN;
        if healthy {
            self.failures = 0;
        }
        if (reboot || clean) && healthy {
            return Decision::RestartNow;
        }
        let delay = r
            .backoff
            .get()
            .saturating_mul(1u32 << self.failures.min(20))
            .min(r.max_backoff.get());
        self.failures += 1;
        Decision::RestartAfter(delay)
    }

    /// An operator's start forgives the past.
    pub fn reset(&mut self) {
        *self = RestartHistory::default();
    }
}

/// What happens when a stopping guest's VMM has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStop {
    /// Stay stopped.
    Stop,
    /// Start again (reboot, reset, a changed config), with the pending spec if any.
    Restart,
    /// Forget the guest (removed from the config).
    Remove,
}

/// Why an operation on a guest was refused; the API maps each to a status code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("no guest named `{0}`; `keelctl list` shows the declared guests")]
    NoSuchGuest(String),
    #[error("guest `{name}` cannot start: {}", reasons.join("; "))]
    Blocked { name: String, reasons: Vec<String> },
    #[error("guest `{name}` is {state}: {hint}")]
    WrongState {
        name: String,
        state: &'static str,
        hint: &'static str,
    },
}

struct Slot {
    spec: Guest,
    /// A changed spec waiting for the current run to stop (config apply).
    pending_spec: Option<Guest>,
    state: State,
    after_stop: AfterStop,
    history: RestartHistory,
    restarts: u64,
    console: Arc<ConsoleHub>,
    /// Set when the VMM has exited, so its console thread stops waiting for it.
    console_cancel: Arc<AtomicBool>,
    /// The VMM's last stderr lines (its error line when it fails; what it was
    /// waiting for when it hangs).
    vmm_log: VmmLog,
    last_exit: Option<String>,
    /// Why keel-init killed the running VMM (it did not start in time): its exit is
    /// then this failure, whatever the signal, and the restart policy applies.
    failure: Option<String>,
    /// What to add to "stopped by operator" when the stop had to kill the VMM.
    stop_note: Option<String>,
    /// A VMM that did not exit after SIGKILL (stuck in the kernel): the guest is not
    /// started again while it lives, since it may still hold the guest's disks.
    stuck_pid: Option<i32>,
    /// What the host prepared for this guest: its taps (held open here for the
    /// guest's lifetime, so they survive VMM restarts and vanish with the guest)
    /// and why it cannot start, if it cannot.
    resources: Prepared,
    /// Resources for `pending_spec`.
    pending_resources: Option<Prepared>,
}

/// The host side of a guest, prepared before it is added (taps need async
/// netlink, the supervisor is synchronous).
#[derive(Debug, Default)]
pub struct Prepared {
    pub taps: Vec<crate::net::tap::Tap>,
    /// Why the guest cannot start (a bridge or volume is missing); empty when it can.
    pub blockers: Vec<String>,
}

/// A snapshot of one guest for the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestStatus {
    pub name: String,
    pub state: String,
    pub pid: Option<i32>,
    /// Seconds since the guest entered its current state (starting, running, paused).
    pub uptime_secs: Option<f64>,
    /// Seconds until a guest in `backoff` is restarted.
    pub restart_in_secs: Option<f64>,
    /// Why the guest is stopped, crashed or backing off.
    pub reason: Option<String>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub vcpus: u32,
    pub memory: String,
    pub autostart: bool,
    /// always, on-failure or never.
    pub restart_policy: String,
    pub console_bytes: u64,
}

/// All guests of the applied config.
pub struct Supervisor {
    paths: Paths,
    guests: BTreeMap<String, Slot>,
    generation: watch::Sender<u64>,
    /// Relay guest output to the appliance console (off in tests that assert on
    /// keel-init's own output, on for PID 1).
    relay: bool,
}

impl Supervisor {
    pub fn new(paths: Paths, guests: &[Guest], relay: bool) -> Self {
        let (generation, _) = watch::channel(0);
        let mut sup = Supervisor {
            paths,
            guests: BTreeMap::new(),
            generation,
            relay,
        };
        for g in guests {
            sup.add(g.clone(), Prepared::default());
        }
        sup
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn add(&mut self, spec: Guest, resources: Prepared) {
        let name = spec.name.value.clone();
        let console = ConsoleHub::new(&name, Some(&self.paths.log_dir), self.relay);
        self.guests.insert(
            name,
            Slot {
                spec,
                pending_spec: None,
                state: State::Defined,
                after_stop: AfterStop::Stop,
                history: RestartHistory::default(),
                restarts: 0,
                console,
                console_cancel: Arc::new(AtomicBool::new(false)),
                vmm_log: VmmLog::default(),
                last_exit: None,
                failure: None,
                stop_note: None,
                stuck_pid: None,
                resources,
                pending_resources: None,
            },
        );
        self.bump();
    }

    pub fn names(&self) -> Vec<String> {
        self.guests.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.guests.contains_key(name)
    }

    pub fn spec(&self, name: &str) -> Option<&Guest> {
        self.guests.get(name).map(|s| &s.spec)
    }

    pub fn state(&self, name: &str) -> Option<&State> {
        self.guests.get(name).map(|s| &s.state)
    }

    pub fn console(&self, name: &str) -> Option<Arc<ConsoleHub>> {
        self.guests.get(name).map(|s| s.console.clone())
    }

    /// The guest's own graceful-stop timeout (`stop_timeout` in keel.yaml).
    pub fn stop_timeout(&self, name: &str) -> Option<Duration> {
        self.guests.get(name).map(|s| s.spec.stop_timeout.get())
    }

    /// The VMM control socket of a guest whose VMM is up.
    pub fn control_socket(&self, name: &str) -> Option<PathBuf> {
        let slot = self.guests.get(name)?;
        matches!(
            slot.state,
            State::Running { .. } | State::Paused { .. } | State::Stopping { .. }
        )
        .then(|| self.paths.vmm_socket(name))
    }

    pub fn status(&self, name: &str) -> Option<GuestStatus> {
        let slot = self.guests.get(name)?;
        let now = Instant::now();
        let (uptime, restart_in, reason) = match &slot.state {
            State::Starting { since, .. } | State::Running { since, .. } | State::Paused { since, .. } => {
                (Some(now.duration_since(*since).as_secs_f64()), None, None)
            }
            State::Backoff { until, reason } => (
                None,
                Some(until.saturating_duration_since(now).as_secs_f64()),
                Some(reason.clone()),
            ),
            State::Stopped { reason } | State::Crashed { reason } => (None, None, Some(reason.clone())),
            State::Defined | State::Stopping { .. } => (None, None, None),
        };
        Some(GuestStatus {
            name: name.to_string(),
            state: slot.state.name().to_string(),
            pid: slot.state.pid(),
            uptime_secs: uptime,
            restart_in_secs: restart_in,
            reason,
            restarts: slot.restarts,
            last_exit: slot.last_exit.clone(),
            vcpus: *slot.spec.vcpus,
            memory: slot.spec.memory.to_string(),
            autostart: slot.spec.autostart,
            restart_policy: serde_json::to_value(slot.spec.restart.policy)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            console_bytes: slot.console.bytes_out(),
        })
    }

    pub fn statuses(&self) -> Vec<GuestStatus> {
        self.guests.keys().filter_map(|n| self.status(n)).collect()
    }

    /// Starts every guest with `autostart`.
    pub fn start_autostart(&mut self) {
        let names: Vec<String> = self
            .guests
            .values()
            .filter(|s| s.spec.autostart && matches!(s.state, State::Defined))
            .map(|s| s.spec.name.value.clone())
            .collect();
        for name in names {
            self.spawn_guest(&name);
        }
    }

    /// Hands a guest what the host prepared for it (boot: after bring-up).
    pub fn set_resources(&mut self, name: &str, resources: Prepared) {
        if let Some(slot) = self.guests.get_mut(name) {
            slot.resources = resources;
        }
    }

    /// An operator's start: from defined, stopped, crashed or backoff (now).
    pub fn start(&mut self, name: &str) -> Result<(), OpError> {
        let slot = self.slot_mut(name)?;
        if let Some(pid) = slot.stuck_pid {
            return Err(OpError::Blocked {
                name: name.into(),
                reasons: vec![format!(
                    "its previous keel-vmm (pid {pid}) did not exit after SIGKILL and may still hold its disks; \
                     see the appliance log for its kernel stack"
                )],
            });
        }
        if !slot.resources.blockers.is_empty() {
            return Err(OpError::Blocked {
                name: name.into(),
                reasons: slot.resources.blockers.clone(),
            });
        }
        match slot.state {
            State::Defined | State::Stopped { .. } | State::Crashed { .. } | State::Backoff { .. } => {
                slot.history.reset();
                self.spawn_guest(name);
                Ok(())
            }
            ref s => Err(OpError::WrongState {
                name: name.into(),
                state: s.name(),
                hint: "it is already started; use `keelctl reboot` or `keelctl reset` to restart it",
            }),
        }
    }

    /// Begins a graceful stop: the caller presses the power button on the returned
    /// control socket (or sends SIGTERM when there is none); the VMM is killed at
    /// the deadline. A guest in backoff just stays stopped. `Ok(None)` when there
    /// is nothing to press (not running).
    pub fn begin_stop(
        &mut self,
        name: &str,
        timeout: Duration,
        then: AfterStop,
    ) -> Result<Option<StopHandle>, OpError> {
        let vmm_socket = self.paths.vmm_socket(name);
        let slot = self.slot_mut(name)?;
        let handle = match slot.state {
            State::Starting { pid, .. } | State::Running { pid, .. } | State::Paused { pid, .. } => {
                slot.state = State::Stopping {
                    pid,
                    deadline: Instant::now() + timeout,
                    killed: false,
                };
                slot.after_stop = then;
                Some(StopHandle { pid, vmm_socket })
            }
            State::Stopping { .. } => {
                // Already stopping: keep the earlier deadline, take the newer intent
                // unless that would cancel a removal.
                if slot.after_stop != AfterStop::Remove {
                    slot.after_stop = then;
                }
                None
            }
            State::Backoff { .. } | State::Defined | State::Stopped { .. } | State::Crashed { .. } => {
                if matches!(slot.state, State::Backoff { .. }) {
                    slot.state = State::Stopped {
                        reason: "stopped by operator during backoff".into(),
                    };
                }
                slot.after_stop = then;
                self.finish_stop(name);
                None
            }
        };
        self.bump();
        Ok(handle)
    }

    /// Kills the guest's VMM now (destroy, reset, stop --force).
    pub fn hard_stop(&mut self, name: &str, then: AfterStop) -> Result<(), OpError> {
        let slot = self.slot_mut(name)?;
        match slot.state {
            State::Starting { pid, .. }
            | State::Running { pid, .. }
            | State::Paused { pid, .. }
            | State::Stopping { pid, .. } => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                slot.state = State::Stopping {
                    pid,
                    deadline: Instant::now() + KILL_GRACE,
                    killed: true,
                };
                slot.after_stop = then;
                self.bump();
                Ok(())
            }
            _ => {
                if matches!(slot.state, State::Backoff { .. }) {
                    slot.state = State::Stopped {
                        reason: "stopped by operator during backoff".into(),
                    };
                }
                slot.after_stop = then;
                self.finish_stop(name);
                self.bump();
                Ok(())
            }
        }
    }

    /// Pause and resume are acknowledged by the VMM first; these record the result.
    pub fn check_pausable(&self, name: &str, pause: bool) -> Result<PathBuf, OpError> {
        let slot = self.guests.get(name).ok_or_else(|| OpError::NoSuchGuest(name.into()))?;
        match (&slot.state, pause) {
            (State::Running { .. }, true) | (State::Paused { .. }, false) => Ok(self.paths.vmm_socket(name)),
            (s, true) => Err(OpError::WrongState {
                name: name.into(),
                state: s.name(),
                hint: "only a running guest can be paused",
            }),
            (s, false) => Err(OpError::WrongState {
                name: name.into(),
                state: s.name(),
                hint: "only a paused guest can be resumed",
            }),
        }
    }

    pub fn mark_paused(&mut self, name: &str, paused: bool) {
        if let Some(slot) = self.guests.get_mut(name) {
            slot.state = match slot.state {
                State::Running { pid, .. } if paused => State::Paused {
                    pid,
                    since: Instant::now(),
                },
                State::Paused { pid, .. } if !paused => State::Running {
                    pid,
                    since: Instant::now(),
                },
                ref s => s.clone(),
            };
            self.bump();
        }
    }

    fn slot_mut(&mut self, name: &str) -> Result<&mut Slot, OpError> {
        self.guests
            .get_mut(name)
            .ok_or_else(|| OpError::NoSuchGuest(name.into()))
    }

    /// Spawns keel-vmm for a guest (its console socket first).
    fn spawn_guest(&mut self, name: &str) {
        let paths = self.paths.clone();
        let Some(slot) = self.guests.get_mut(name) else { return };
        if let Some(spec) = slot.pending_spec.take() {
            slot.spec = spec;
        }
        if let Some(r) = slot.pending_resources.take() {
            slot.resources = r;
        }
        slot.after_stop = AfterStop::Stop;
        slot.failure = None;
        slot.stop_note = None;
        if !slot.resources.blockers.is_empty() {
            let reason = format!("not started: {}", slot.resources.blockers.join("; "));
            warn!(guest = name, "{reason}");
            slot.state = State::Stopped { reason };
            self.bump();
            return;
        }
        slot.console_cancel = Arc::new(AtomicBool::new(false));
        match spawn(&slot.spec, &paths, slot) {
            Ok(pid) => {
                info!(guest = name, pid, "guest starting");
                slot.state = State::Starting {
                    pid,
                    since: Instant::now(),
                };
            }
            Err(e) => {
                error!(guest = name, "cannot start keel-vmm: {e}");
                slot.state = State::Crashed {
                    reason: format!("cannot start keel-vmm: {e}"),
                };
            }
        }
        self.bump();
    }

    /// Handles a reaped child. Returns false if the pid was not a guest's.
    pub fn on_exit(&mut self, pid: i32, exit: Exit) -> bool {
        let now = Instant::now();
        if let Some(slot) = self.guests.values_mut().find(|s| s.stuck_pid == Some(pid)) {
            warn!(
                guest = slot.spec.name.as_str(),
                pid,
                "the stuck keel-vmm has exited at last ({}); the guest can be started again",
                exit.describe()
            );
            slot.stuck_pid = None;
            self.bump();
            return true;
        }
        let Some(name) = self
            .guests
            .iter()
            .find(|(_, s)| s.state.pid() == Some(pid))
            .map(|(n, _)| n.clone())
        else {
            return false;
        };
        let slot = self.guests.get_mut(&name).expect("found above");
        slot.console_cancel.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(self.paths.vmm_socket(&name));
        let _ = std::fs::remove_file(self.paths.console_socket(&name));
        let mut what = exit.describe();
        if matches!(exit, Exit::Code(c) if c != VMM_EXIT_POWEROFF && c != VMM_EXIT_REBOOT && c != VMM_EXIT_KILLED)
            && let Some(msg) = slot.vmm_log.last_message()
        {
            what = format!("{what}: {msg}");
        }
        let failure = slot.failure.take();
        if let Some(f) = &failure {
            what = f.clone();
        }
        slot.last_exit = Some(what.clone());

        if let (State::Stopping { .. }, None) = (&slot.state, &failure) {
            info!(guest = name.as_str(), "{what}; stop complete");
            slot.state = State::Stopped {
                reason: match slot.stop_note.take() {
                    Some(note) => format!("stopped by operator ({note})"),
                    None => "stopped by operator".into(),
                },
            };
            self.finish_stop(&name);
            self.bump();
            return true;
        }

        let uptime = match slot.state {
            State::Starting { since, .. } | State::Running { since, .. } | State::Paused { since, .. } => {
                now.duration_since(since)
            }
            _ => Duration::ZERO,
        };
        let decision = slot.history.decide(&slot.spec, exit, uptime, now);
        match decision {
            Decision::Stop => {
                info!(
                    guest = name.as_str(),
                    "{what}; not restarting (policy {:?})", slot.spec.restart.policy
                );
                slot.state = State::Stopped { reason: what };
            }
            Decision::CrashLoop => {
                error!(
                    guest = name.as_str(),
                    "{what}; {} restarts within {}: crash loop, giving up until started by hand",
                    slot.history.recent_restarts(),
                    slot.spec.restart.window.value
                );
                slot.state = State::Crashed {
                    reason: format!("crash loop: {what}"),
                };
            }
            Decision::RestartNow => {
                info!(guest = name.as_str(), "{what}; restarting");
                slot.state = State::Backoff {
                    until: now,
                    reason: what,
                };
            }
            Decision::RestartAfter(d) => {
                warn!(
                    guest = name.as_str(),
                    "{what}; restarting in {}",
                    crate::config::Duration(d)
                );
                slot.state = State::Backoff {
                    until: now + d,
                    reason: what,
                };
            }
        }
        self.bump();
        true
    }

    /// Applies `after_stop` to a guest that has just come to rest.
    fn finish_stop(&mut self, name: &str) {
        let Some(slot) = self.guests.get_mut(name) else { return };
        match slot.after_stop {
            AfterStop::Stop => {}
            AfterStop::Restart => {
                slot.restarts += 1;
                slot.history.reset();
                self.spawn_guest(name);
            }
            AfterStop::Remove => {
                info!(guest = name, "guest removed");
                self.guests.remove(name);
            }
        }
    }

    /// Does what is due: restarts after backoff, promotes started guests whose VMM
    /// is up, kills VMMs past their stop deadline. Returns when to call again.
    pub fn tick(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let names: Vec<String> = self.guests.keys().cloned().collect();
        let mut changed = false;
        for name in &names {
            let vmm_socket = self.paths.vmm_socket(name);
            let Some(slot) = self.guests.get_mut(name) else {
                continue;
            };
            match slot.state {
                State::Backoff { until, .. } if until <= now => {
                    slot.restarts += 1;
                    self.spawn_guest(name);
                }
                // keel-vmm binds its control socket once its devices are attached and
                // its vCPUs run: the socket appearing is its report that the guest runs.
                State::Starting { pid, since } if vmm_socket.exists() => {
                    info!(guest = name.as_str(), pid, "guest running");
                    slot.state = State::Running { pid, since };
                    changed = true;
                }
                State::Starting { pid, since } if now.duration_since(since) >= slot.spec.start_timeout.get() => {
                    let failure = format!(
                        "keel-vmm did not report the guest running within {}; killed",
                        slot.spec.start_timeout.value
                    );
                    report_stuck(name, pid, &failure, &slot.vmm_log);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    slot.failure = Some(failure);
                    slot.state = State::Stopping {
                        pid,
                        deadline: now + KILL_GRACE,
                        killed: true,
                    };
                    changed = true;
                }
                State::Stopping {
                    pid,
                    deadline,
                    killed: false,
                } if deadline <= now => {
                    warn!(
                        guest = name.as_str(),
                        "guest did not stop in time; killing its keel-vmm"
                    );
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    slot.stop_note = Some("it did not stop in time: its keel-vmm was killed".into());
                    slot.state = State::Stopping {
                        pid,
                        deadline: now + KILL_GRACE,
                        killed: true,
                    };
                    changed = true;
                }
                State::Stopping {
                    pid,
                    deadline,
                    killed: true,
                } if deadline <= now => {
                    // Unkillable: in an uninterruptible sleep in the kernel. Waiting on
                    // it would hold the guest (and a stop, an apply, a shutdown) forever;
                    // the guest is given up on instead, and the pid is watched so its
                    // late exit is recognised.
                    let reason = format!(
                        "keel-vmm (pid {pid}) did not exit within {} of SIGKILL: stuck in the kernel",
                        crate::config::Duration(KILL_GRACE)
                    );
                    report_stuck(name, pid, &reason, &slot.vmm_log);
                    slot.stuck_pid = Some(pid);
                    slot.failure = None;
                    slot.after_stop = AfterStop::Stop;
                    slot.last_exit = Some(reason.clone());
                    slot.state = State::Crashed { reason };
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.bump();
        }
        self.guests
            .values()
            .filter_map(|s| match s.state {
                State::Backoff { until, .. } => Some(until),
                State::Stopping { deadline, .. } => Some(deadline),
                State::Starting { .. } => Some(now + STARTING_POLL),
                _ => None,
            })
            .min()
    }

    /// Each guest as the update agent's health check sees it: running since when,
    /// or given up on (crash loop, cannot start, held back by a missing resource).
    pub fn health(&self) -> Vec<crate::update::health::GuestHealth> {
        self.guests
            .values()
            .map(|s| crate::update::health::GuestHealth {
                name: s.spec.name.value.clone(),
                autostart: s.spec.autostart,
                running_since: match s.state {
                    State::Running { since, .. } | State::Paused { since, .. } => Some(since),
                    _ => None,
                },
                failed: matches!(s.state, State::Crashed { .. }) || !s.resources.blockers.is_empty(),
            })
            .collect()
    }

    /// Whether no guest is running, stopping or waiting to restart.
    pub fn idle(&self) -> bool {
        self.guests.values().all(|s| !s.state.is_active())
    }

    /// Whether any guest was ever started (idle at boot is not "all guests ended").
    pub fn any_started(&self) -> bool {
        self.guests.values().any(|s| !matches!(s.state, State::Defined))
    }

    /// Pids of all live VMMs.
    pub fn running_pids(&self) -> Vec<i32> {
        self.guests.values().filter_map(|s| s.state.pid()).collect()
    }

    /// Asks every VMM to stop its guest (SIGTERM: keel-vmm presses Ctrl-Alt-Del and
    /// stops hard after its `--shutdown-timeout`), and cancels pending restarts.
    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.guests.keys().cloned().collect();
        for name in names {
            let Some(slot) = self.guests.get_mut(&name) else {
                continue;
            };
            match slot.state {
                State::Starting { pid, .. } | State::Running { pid, .. } | State::Paused { pid, .. } => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                    slot.after_stop = AfterStop::Stop;
                    slot.state = State::Stopping {
                        pid,
                        deadline: Instant::now() + slot.spec.stop_timeout.get(),
                        killed: false,
                    };
                }
                State::Stopping { .. } => slot.after_stop = AfterStop::Stop,
                State::Backoff { .. } => {
                    slot.state = State::Stopped {
                        reason: "appliance shutting down".into(),
                    }
                }
                _ => {}
            }
        }
        self.bump();
    }

    // ------------------------------------------------------------ config apply

    /// Adds a guest from a newly applied config; started if `autostart`.
    pub fn add_guest(&mut self, spec: Guest, resources: Prepared) {
        let name = spec.name.value.clone();
        let autostart = spec.autostart;
        self.add(spec, resources);
        if autostart {
            self.spawn_guest(&name);
        }
    }

    /// Replaces a guest's spec where the running VM is not affected (restart
    /// policy, autostart).
    pub fn update_spec(&mut self, spec: Guest) {
        if let Some(slot) = self.guests.get_mut(&spec.name.value) {
            slot.spec = spec;
            self.bump();
        }
    }

    /// Replaces a guest's spec and restarts it with the new one if it is running;
    /// otherwise the new spec is used at its next start. Returns the stop handle
    /// to press the power button on.
    pub fn replace_and_restart(&mut self, spec: Guest, resources: Prepared, timeout: Duration) -> Option<StopHandle> {
        let name = spec.name.value.clone();
        let slot = self.guests.get_mut(&name)?;
        if slot.state.pid().is_some() {
            slot.pending_spec = Some(spec);
            slot.pending_resources = Some(resources);
            self.begin_stop(&name, timeout, AfterStop::Restart).ok().flatten()
        } else {
            slot.spec = spec;
            slot.resources = resources;
            self.bump();
            None
        }
    }

    /// Removes a guest: stopped first if it runs. Its volumes and logs stay.
    pub fn remove_guest(&mut self, name: &str, timeout: Duration) -> Option<StopHandle> {
        self.begin_stop(name, timeout, AfterStop::Remove).ok().flatten()
    }
}

/// What the caller needs to press a stopping guest's power button.
#[derive(Clone, Debug)]
pub struct StopHandle {
    pub pid: i32,
    pub vmm_socket: PathBuf,
}

impl StopHandle {
    /// Presses the power button through the control socket; falls back to SIGTERM
    /// (keel-vmm's own Ctrl-Alt-Del path) when the socket does not answer.
    pub async fn press_power_button(&self) {
        if let Err(e) = crate::vmm_control::request(&self.vmm_socket, crate::vmm_control::Op::PowerButton).await {
            warn!(
                pid = self.pid,
                "power button via control socket failed ({e}); sending SIGTERM"
            );
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        }
    }
}

/// Spawns keel-vmm for a guest: console socket, then the process, then the relays.
fn spawn(g: &Guest, paths: &Paths, slot: &Slot) -> std::io::Result<i32> {
    let name = g.name.value.as_str();
    let dir = paths.guest_run_dir(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let console_path = paths.console_socket(name);
    let _ = std::fs::remove_file(&console_path);
    let _ = std::fs::remove_file(paths.vmm_socket(name));
    let listener = UnixListener::bind(&console_path)?;
    std::fs::set_permissions(&console_path, std::fs::Permissions::from_mode(0o600))?;
    slot.console.serve_vmm(listener, slot.console_cancel.clone())?;
    let tap_fds: Vec<RawFd> = slot.resources.taps.iter().map(|t| t.fd.as_raw_fd()).collect();
    let mut cmd = Command::new(&paths.vmm);
    cmd.args(vmm_command::args(g, paths));
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
fn report_stuck(name: &str, pid: i32, what: &str, log: &VmmLog) {
    error!(guest = name, pid, "{what}");
    for line in log.tail() {
        error!(guest = name, pid, "keel-vmm said: {line}");
    }
    for line in stuck::describe(pid) {
        error!(guest = name, pid, "keel-vmm thread: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(policy: &str) -> Guest {
        let text = format!(
            "version: 1\nguests:\n  - name: g\n    memory: 64MiB\n    restart: {{policy: {policy}, backoff: 1s, max_backoff: 4s, max_restarts: 3, window: 1m}}\n"
        );
        crate::config::parse_str(&text).expect("valid").config.guests.remove(0)
    }

    const SHORT: Duration = Duration::from_secs(1);
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn on_failure_backs_off_exponentially_then_declares_a_crash_loop() {
        let g = guest("on-failure");
        let mut h = RestartHistory::default();
        let t = Instant::now();
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            h.decide(&g, Exit::Signal(9), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        assert_eq!(h.decide(&g, Exit::Code(1), SHORT, t), Decision::CrashLoop);
        // Outside the window the history is forgotten, but not the backoff growth
        // of a guest that never ran healthily.
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t + Duration::from_secs(120)),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        // A healthy run resets the backoff.
        assert_eq!(
            h.decide(&g, Exit::Code(1), LONG, t + Duration::from_secs(120)),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_reboot_right_after_start_is_a_failed_boot() {
        let g = guest("on-failure");
        let mut h = RestartHistory::default();
        let t = Instant::now();
        assert_eq!(
            h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), LONG, t), Decision::RestartNow);
    }

    #[test]
    fn poweroff_and_reboot_follow_the_policy() {
        let t = Instant::now();
        let mut h = RestartHistory::default();
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_POWEROFF), LONG, t),
            Decision::Stop
        );
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_REBOOT), LONG, t),
            Decision::RestartNow
        );
        assert_eq!(
            h.decide(&guest("always"), Exit::Code(VMM_EXIT_POWEROFF), LONG, t),
            Decision::RestartNow
        );
        assert_eq!(h.decide(&guest("never"), Exit::Code(1), LONG, t), Decision::Stop);
        assert_eq!(
            h.decide(&guest("never"), Exit::Code(VMM_EXIT_REBOOT), LONG, t),
            Decision::Stop
        );
    }

    #[test]
    fn operations_check_the_state_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path(), "/nonexistent/keel-vmm".into());
        let mut sup = Supervisor::new(paths, &[guest("never")], false);
        assert_eq!(sup.state("g"), Some(&State::Defined));
        assert!(matches!(sup.start("nope"), Err(OpError::NoSuchGuest(_))));
        assert!(matches!(sup.check_pausable("g", true), Err(OpError::WrongState { .. })));
        // A blocked guest is refused with its reasons.
        sup.set_resources(
            "g",
            Prepared {
                taps: Vec::new(),
                blockers: vec!["bridge br0 is not up".into()],
            },
        );
        assert!(matches!(sup.start("g"), Err(OpError::Blocked { .. })));
        sup.set_resources("g", Prepared::default());
        // The VMM binary does not exist: the start fails visibly, it does not hang.
        sup.start("g").unwrap();
        match sup.state("g") {
            Some(State::Crashed { reason }) => assert!(reason.contains("cannot start keel-vmm"), "{reason}"),
            other => panic!("expected crashed, got {other:?}"),
        }
        // Stopping a guest that does not run is a no-op that leaves it at rest.
        assert!(sup.begin_stop("g", SHORT, AfterStop::Stop).unwrap().is_none());
        assert_eq!(sup.status("g").unwrap().state, "crashed");
        sup.remove_guest("g", SHORT);
        assert!(!sup.contains("g"));
    }

    #[test]
    fn a_vmm_that_survives_sigkill_is_given_up_on_and_blocks_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path(), "/nonexistent/keel-vmm".into());
        let mut sup = Supervisor::new(paths, &[guest("always")], false);
        // Stands in for a VMM in uninterruptible sleep: a live process that is not
        // reaped, past its post-SIGKILL grace.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let slot = sup.guests.get_mut("g").unwrap();
        slot.state = State::Stopping {
            pid,
            deadline: Instant::now() - Duration::from_millis(1),
            killed: true,
        };
        sup.tick();
        match sup.state("g") {
            Some(State::Crashed { reason }) => assert!(reason.contains("stuck in the kernel"), "{reason}"),
            other => panic!("expected crashed, got {other:?}"),
        }
        // Not restarted by the `always` policy, and an operator's start is refused.
        sup.tick();
        assert!(matches!(sup.state("g"), Some(State::Crashed { .. })));
        match sup.start("g") {
            Err(OpError::Blocked { reasons, .. }) => assert!(reasons[0].contains("did not exit after SIGKILL")),
            other => panic!("expected blocked, got {other:?}"),
        }
        // Its late exit is recognised and unblocks the guest.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(sup.on_exit(pid, Exit::Signal(9)));
        assert!(matches!(sup.state("g"), Some(State::Crashed { .. })));
        sup.start("g").unwrap();
        match sup.state("g") {
            Some(State::Crashed { reason }) => assert!(reason.contains("cannot start keel-vmm"), "{reason}"),
            other => panic!("expected crashed, got {other:?}"),
        }
    }
}
