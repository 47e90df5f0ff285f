//! How a running VM ends: the reasons, their process exit codes, and the one-shot
//! "stop now" signal that devices and vCPU threads raise and the main thread waits on.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::lock;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or halted for good. Exit code 0.
    PowerOff,
    /// The guest asked for a reboot (i8042 reset, triple fault, KVM reset event).
    /// Exit code 3: a supervisor restarts it if its policy says so.
    Reboot,
    /// A stop was requested (SIGTERM) and the guest ended within the grace period,
    /// whichever way it chose. Exit code 0.
    Stopped,
    /// A stop was requested and the guest did not end within the grace period, or the
    /// console escape asked for a hard stop; the VMM stopped it. Exit code 4.
    Killed,
    /// The guest or the VMM failed (entry failure, emulation failure, a VMM thread
    /// died). Exit code 1; the text says what happened.
    Error(String),
}

pub use keel_vmm_api::exit::{EXIT_ERROR, EXIT_KILLED, EXIT_POWER_OFF, EXIT_REBOOT, EXIT_USAGE};

impl ExitReason {
    /// The `keel-vmm` process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Stopped => EXIT_POWER_OFF,
            ExitReason::Reboot => EXIT_REBOOT,
            ExitReason::Killed => EXIT_KILLED,
            ExitReason::Error(_) => EXIT_ERROR,
        }
    }
}

/// Shared between the main thread, the vCPU threads and the devices. The first reason
/// recorded wins; later ones (e.g. the other vCPUs noticing the stop) are ignored.
pub struct VmControl {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    /// Readable once a reason is recorded; the main thread polls it.
    exit_evt: EventFd,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmControl {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            exit_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records why the VM ends (first caller wins) and wakes the main thread.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *slot = Some(reason);
            self.stopping.store(true, Ordering::SeqCst);
            // An eventfd write only fails when the counter would overflow, which one
            // write per VM cannot reach.
            let _ = self.exit_evt.write(1);
        }
    }

    /// True once any exit was requested: vCPU loops check it before re-entering the guest.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_fd_fires() {
        let c = VmControl::new().unwrap();
        assert!(!c.is_stopping());
        assert!(c.exit_evt().read().is_err(), "not readable before a request");
        c.request_exit(ExitReason::Reboot);
        c.request_exit(ExitReason::PowerOff);
        assert!(c.is_stopping());
        assert_eq!(c.reason(), Some(ExitReason::Reboot));
        assert_eq!(c.exit_evt().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes_are_distinct_where_they_matter() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Stopped.exit_code(), 0);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::Reboot.exit_code(), 3);
        assert_eq!(ExitReason::Killed.exit_code(), 4);
    }
}
