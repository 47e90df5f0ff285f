//! The guest supervisor: one `keel-vmm` process per guest, restarted by policy.
//!
//! PID 1 reaps every child itself (`waitpid(-1)` on SIGCHLD, orphans included), so
//! this module does not wait on its children: the caller passes each reaped exit
//! to [`Supervisor::on_exit`]. Each guest's serial output (keel-vmm's stdout) and
//! the VMM's own messages (its stderr) are relayed to the console line by line,
//! prefixed `[guest NAME]` and `[vmm NAME]`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::config::{Guest, RestartPolicy};
use crate::vmm_command::{self, Paths};

/// keel-vmm's exit codes (see `keel-vmm --help`).
pub const VMM_EXIT_POWEROFF: i32 = 0;
pub const VMM_EXIT_REBOOT: i32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Declared, not started (autostart off, or stopped by the operator).
    Defined,
    Running {
        pid: i32,
        since: Instant,
    },
    /// Waiting to be restarted.
    Backoff {
        until: Instant,
    },
    /// Ended and not to be restarted (policy, or a clean poweroff).
    Stopped {
        reason: String,
    },
    /// Crash-looped past its limit, or could not be started.
    Crashed {
        reason: String,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Defined => "defined",
            State::Running { .. } => "running",
            State::Backoff { .. } => "backoff",
            State::Stopped { .. } => "stopped",
            State::Crashed { .. } => "crashed",
        }
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
    /// Consecutive failures, for the exponential backoff.
    failures: u32,
}

impl RestartHistory {
    pub fn restarts(&self) -> usize {
        self.recent.len()
    }

    /// `never` leaves every ended guest stopped (also after a guest reboot, which
    /// is how a guest without ACPI ends its VM). Otherwise a guest that asks to
    /// reboot is restarted at once, a clean poweroff is final unless the policy
    /// is `always`, and anything else is a
    /// failure, restarted by `always`/`on-failure` after a backoff that doubles up
    /// to `max_backoff`, until `max_restarts` within `window` makes it a crash loop.
    pub fn decide(&mut self, g: &Guest, exit: Exit, now: Instant) -> Decision {
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
        if reboot || clean {
            self.failures = 0;
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
}

struct Slot {
    spec: Guest,
    state: State,
    history: RestartHistory,
}

/// All guests of the applied config.
pub struct Supervisor {
    paths: Paths,
    guests: BTreeMap<String, Slot>,
}

impl Supervisor {
    pub fn new(paths: Paths, guests: &[Guest]) -> Self {
        let guests = guests
            .iter()
            .map(|g| {
                (
                    g.name.value.clone(),
                    Slot {
                        spec: g.clone(),
                        state: State::Defined,
                        history: RestartHistory::default(),
                    },
                )
            })
            .collect();
        Supervisor { paths, guests }
    }

    /// Starts every guest with `autostart`.
    pub fn start_autostart(&mut self) {
        let names: Vec<String> = self
            .guests
            .values()
            .filter(|s| s.spec.autostart)
            .map(|s| s.spec.name.value.clone())
            .collect();
        for name in names {
            self.start(&name);
        }
    }

    /// Starts one guest now. Failure to spawn marks it crashed.
    pub fn start(&mut self, name: &str) {
        let Some(slot) = self.guests.get_mut(name) else { return };
        match spawn(&slot.spec, &self.paths) {
            Ok(pid) => {
                info!(guest = name, pid, "guest started");
                slot.state = State::Running {
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
    }

    /// Handles a reaped child. Returns false if the pid was not a guest's.
    pub fn on_exit(&mut self, pid: i32, exit: Exit) -> bool {
        let now = Instant::now();
        let Some((name, slot)) = self
            .guests
            .iter_mut()
            .find(|(_, s)| matches!(s.state, State::Running { pid: p, .. } if p == pid))
        else {
            return false;
        };
        let what = exit.describe();
        let decision = slot.history.decide(&slot.spec, exit, now);
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
                    slot.history.restarts(),
                    slot.spec.restart.window.value
                );
                slot.state = State::Crashed {
                    reason: format!("crash loop: {what}"),
                };
            }
            Decision::RestartNow => {
                info!(guest = name.as_str(), "{what}; restarting");
                slot.state = State::Backoff { until: now };
            }
            Decision::RestartAfter(d) => {
                warn!(
                    guest = name.as_str(),
                    "{what}; restarting in {}",
                    crate::config::Duration(d)
                );
                slot.state = State::Backoff { until: now + d };
            }
        }
        true
    }

    /// Starts guests whose backoff has passed; returns when to call again.
    pub fn tick(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let due: Vec<String> = self
            .guests
            .iter()
            .filter(|(_, s)| matches!(s.state, State::Backoff { until } if until <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.start(&name);
        }
        self.guests
            .values()
            .filter_map(|s| {
                if let State::Backoff { until } = s.state {
                    Some(until)
                } else {
                    None
                }
            })
            .min()
    }

    /// Whether no guest is running or waiting to restart.
    pub fn idle(&self) -> bool {
        self.guests
            .values()
            .all(|s| !matches!(s.state, State::Running { .. } | State::Backoff { .. }))
    }

    /// Whether any guest was ever started (idle at boot is not "all guests ended").
    pub fn any_started(&self) -> bool {
        self.guests.values().any(|s| !matches!(s.state, State::Defined))
    }

    pub fn states(&self) -> Vec<(String, State)> {
        self.guests.iter().map(|(n, s)| (n.clone(), s.state.clone())).collect()
    }

    /// Pids of running VMMs.
    pub fn running_pids(&self) -> Vec<i32> {
        self.guests
            .values()
            .filter_map(|s| {
                if let State::Running { pid, .. } = s.state {
                    Some(pid)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Asks every VMM to stop its guest (SIGTERM: keel-vmm presses the guest's
    /// power button / Ctrl-Alt-Del and stops hard after its own timeout), and
    /// cancels pending restarts.
    pub fn stop_all(&mut self) {
        for slot in self.guests.values_mut() {
            match slot.state {
                State::Running { pid, .. } => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
                State::Backoff { .. } => {
                    slot.state = State::Stopped {
                        reason: "appliance shutting down".into(),
                    }
                }
                _ => {}
            }
        }
    }

    /// Marks a reaped guest stopped without applying its policy (during shutdown).
    pub fn forget(&mut self, pid: i32) {
        for slot in self.guests.values_mut() {
            if matches!(slot.state, State::Running { pid: p, .. } if p == pid) {
                slot.state = State::Stopped {
                    reason: "appliance shut down".into(),
                };
            }
        }
    }
}

/// Spawns keel-vmm for a guest and starts the two relay threads.
fn spawn(g: &Guest, paths: &Paths) -> std::io::Result<i32> {
    let mut child = Command::new(&paths.vmm)
        .args(vmm_command::args(g, paths))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let name = g.name.value.clone();
    if let Some(out) = child.stdout.take() {
        relay(out, format!("[guest {name}]"));
    }
    if let Some(err) = child.stderr.take() {
        relay(err, format!("[vmm {name}]"));
    }
    // The child is reaped by PID 1's waitpid(-1) loop, not through this handle.
    Ok(child.id() as i32)
}

/// Copies a pipe to the console line by line with a prefix. Runs until the
/// writer closes its end (the VMM exits).
fn relay(pipe: impl Read + Send + 'static, prefix: String) {
    let thread_name = format!("relay {prefix}");
    let spawned = std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    crate::logging::console_line(&format!("{prefix} {}", text.trim_end_matches(['\n', '\r'])));
                }
            }
        }
    });
    if let Err(e) = spawned {
        error!("cannot start {thread_name}: {e}");
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

    #[test]
    fn on_failure_backs_off_exponentially_then_declares_a_crash_loop() {
        let g = guest("on-failure");
        let mut h = RestartHistory::default();
        let t = Instant::now();
        assert_eq!(
            h.decide(&g, Exit::Code(1), t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            h.decide(&g, Exit::Signal(9), t),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(
            h.decide(&g, Exit::Code(1), t),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        assert_eq!(h.decide(&g, Exit::Code(1), t), Decision::CrashLoop);
        // Outside the window the history is forgotten.
        assert_eq!(
            h.decide(&g, Exit::Code(1), t + Duration::from_secs(120)),
            Decision::RestartAfter(Duration::from_secs(4))
        );
    }

    #[test]
    fn poweroff_and_reboot_follow_the_policy() {
        let t = Instant::now();
        let mut h = RestartHistory::default();
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_POWEROFF), t),
            Decision::Stop
        );
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_REBOOT), t),
            Decision::RestartNow
        );
        assert_eq!(
            h.decide(&guest("always"), Exit::Code(VMM_EXIT_POWEROFF), t),
            Decision::RestartNow
        );
        assert_eq!(h.decide(&guest("never"), Exit::Code(1), t), Decision::Stop);
        assert_eq!(
            h.decide(&guest("never"), Exit::Code(VMM_EXIT_REBOOT), t),
            Decision::Stop
        );
    }
}
