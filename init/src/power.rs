//! Ending the appliance: stop guests, flush, unmount, and ask the kernel.

use std::fmt;

use nix::sys::reboot::{RebootMode, reboot};
use tracing::{error, info};

use crate::layout;
use crate::mounts::unmount_quietly;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Poweroff,
    Reboot,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Poweroff => "poweroff",
            Action::Reboot => "reboot",
        })
    }
}

/// Flushes and unmounts Keel's filesystems, then powers off or reboots. Returns
/// only if the kernel refused (e.g. not running as PID 1 in a test).
pub fn execute(action: Action) -> nix::Error {
    info!("{action}: syncing and unmounting filesystems");
    nix::unistd::sync();
    for target in [layout::ESP_MOUNT, layout::CONFIG_MOUNT, layout::DATA_MOUNT] {
        unmount_quietly(target);
    }
    nix::unistd::sync();
    info!("{action} now");
    let mode = match action {
        Action::Poweroff => RebootMode::RB_POWER_OFF,
        Action::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let err = match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    error!("{action} failed: {err}");
    err
}
