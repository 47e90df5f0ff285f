//! A guest's lifecycle states as the supervisor tracks them, how a keel-vmm
//! process ended, and the answers the operations give.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// keel-vmm's exit codes, from the contract both sides build against.
pub use keel_vmm_api::exit::{
    EXIT_KILLED as VMM_EXIT_KILLED, EXIT_POWER_OFF as VMM_EXIT_POWEROFF, EXIT_REBOOT as VMM_EXIT_REBOOT,
};

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

    pub fn describe(self) -> String {
        match self {
            Exit::Code(VMM_EXIT_POWEROFF) => "guest powered off".into(),
            Exit::Code(VMM_EXIT_REBOOT) => "guest rebooted".into(),
            Exit::Code(VMM_EXIT_KILLED) => "guest stopped hard".into(),
            Exit::Code(c) => format!("keel-vmm failed (exit code {c})"),
            Exit::Signal(s) => format!("keel-vmm killed by signal {s}"),
        }
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
