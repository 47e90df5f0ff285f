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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;
use tracing::warn;

use crate::config::Guest;

use super::console::ConsoleHub;
use super::restart::RestartHistory;
use super::state::{AfterStop, GuestStatus, State};
use super::vmm_command::Paths;
use super::vmm_log::VmmLog;

/// How long a graceful stop waits for the guest before killing its VMM, unless
/// the caller says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct Slot {
    pub(super) spec: Guest,
    /// A changed spec waiting for the current run to stop (config apply).
    pub(super) pending_spec: Option<Guest>,
    pub(super) state: State,
    pub(super) after_stop: AfterStop,
    pub(super) history: RestartHistory,
    pub(super) restarts: u64,
    pub(super) console: Arc<ConsoleHub>,
    /// Set when the VMM has exited, so its console thread stops waiting for it.
    pub(super) console_cancel: Arc<AtomicBool>,
    /// The VMM's last stderr lines (its error line when it fails; what it was
    /// waiting for when it hangs).
    pub(super) vmm_log: VmmLog,
    pub(super) last_exit: Option<String>,
    /// Why keel-init killed the running VMM (it did not start in time): its exit is
    /// then this failure, whatever the signal, and the restart policy applies.
    pub(super) failure: Option<String>,
    /// What to add to "stopped by operator" when the stop had to kill the VMM.
    pub(super) stop_note: Option<String>,
    /// A VMM that did not exit after SIGKILL (stuck in the kernel): the guest is not
    /// started again while it lives, since it may still hold the guest's disks.
    pub(super) stuck_pid: Option<i32>,
    /// What the host prepared for this guest: its taps (held open here for the
    /// guest's lifetime, so they survive VMM restarts and vanish with the guest)
    /// and why it cannot start, if it cannot.
    pub(super) resources: Prepared,
    /// Resources for `pending_spec`.
    pub(super) pending_resources: Option<Prepared>,
}

/// The host side of a guest, prepared before it is added (taps need async
/// netlink, the supervisor is synchronous).
#[derive(Debug, Default)]
pub struct Prepared {
    pub taps: Vec<crate::net::tap::Tap>,
    /// Why the guest cannot start (a bridge or volume is missing); empty when it can.
    pub blockers: Vec<String>,
    /// How each NIC is addressed, for a cloud-init seed's network-config.
    pub nic_networks: Vec<super::cloud_init::NicNetwork>,
}

/// All guests of the applied config.
pub struct Supervisor {
    pub(super) paths: Paths,
    pub(super) guests: BTreeMap<String, Slot>,
    pub(super) generation: watch::Sender<u64>,
    /// Relay guest output to the appliance console (off in tests that assert on
    /// keel-init's own output, on for PID 1).
    pub(super) relay: bool,
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

    pub(super) fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub(super) fn add(&mut self, spec: Guest, resources: Prepared) {
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
}

impl Supervisor {
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
        if let Err(e) =
            crate::guest::vmm_control::request(&self.vmm_socket, crate::guest::vmm_control::Op::PowerButton).await
        {
            warn!(
                pid = self.pid,
                "power button via control socket failed ({e}); sending SIGTERM"
            );
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        }
    }
}

#[cfg(test)]
pub(super) mod tests_support {
    use crate::config::Guest;

    /// A guest with restart `policy` and a short backoff, for unit tests.
    pub fn guest(policy: &str) -> Guest {
        let text = format!(
            "version: 1\nguests:\n  - name: g\n    memory: 64MiB\n    restart: {{policy: {policy}, backoff: 1s, max_backoff: 4s, max_restarts: 3, window: 1m}}\n"
        );
        crate::config::parse_str(&text).expect("valid").config.guests.remove(0)
    }
}
