//! What moves a guest between states: the operators' operations (start, stop,
//! reset, pause), a reaped VMM's exit, and deadlines (backoff over, start or stop
//! taking too long, a VMM that survives SIGKILL).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::restart::Decision;
use super::spawn::{report_stuck, spawn};
use super::state::{AfterStop, Exit, OpError, State, VMM_EXIT_KILLED, VMM_EXIT_POWEROFF, VMM_EXIT_REBOOT};
use super::supervisor::{Slot, StopHandle, Supervisor};

/// After SIGKILL, how long until a VMM that has not been reaped is given up on as
/// stuck in the kernel.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often a starting guest is checked for its control socket.
const STARTING_POLL: Duration = Duration::from_millis(20);

impl Supervisor {
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

    pub(super) fn slot_mut(&mut self, name: &str) -> Result<&mut Slot, OpError> {
        self.guests
            .get_mut(name)
            .ok_or_else(|| OpError::NoSuchGuest(name.into()))
    }

    /// Spawns keel-vmm for a guest (its console socket first).
    pub(super) fn spawn_guest(&mut self, name: &str) {
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
    pub(super) fn finish_stop(&mut self, name: &str) {
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
                    slot.failure = Some(failure);
                    slot.state = kill_vmm(pid, now);
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
                    slot.stop_note = Some("it did not stop in time: its keel-vmm was killed".into());
                    slot.state = kill_vmm(pid, now);
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
}

/// SIGKILLs a guest's VMM: the state that waits [`KILL_GRACE`] for it to be reaped.
fn kill_vmm(pid: i32, now: Instant) -> State {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    State::Stopping {
        pid,
        deadline: now + KILL_GRACE,
        killed: true,
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::supervisor::Prepared;
    use super::super::supervisor::tests_support::guest;
    use super::super::vmm_command::Paths;
    use super::*;

    const SHORT: Duration = Duration::from_secs(1);

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
                ..Prepared::default()
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
