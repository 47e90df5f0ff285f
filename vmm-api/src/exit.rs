//! Exit codes of the `keel-vmm` process. A supervisor tells a reboot (restart the
//! guest) from a poweroff (leave it stopped) and from a failure by these alone.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the guest powered off or halted for good, or it stopped after SIGTERM (power button / Ctrl-Alt-Del) |
//! | 1 | VMM error: bad input, KVM failure, or the guest crashed its vCPU (one line on stderr says which) |
//! | 2 | usage error on the command line |
//! | 3 | the guest asked to reboot (i8042 reset, e.g. `reboot` with `reboot=k`, or a triple fault) |
//! | 4 | stopped hard: the guest ignored SIGTERM's power button / Ctrl-Alt-Del for the grace period, a second signal came, a `stop` request, or `Ctrl-A x` on the console |

/// The guest powered off, or stopped cleanly on request.
pub const EXIT_POWER_OFF: i32 = 0;
/// VMM error (bad input, KVM failure, guest crashed the vCPU).
pub const EXIT_ERROR: i32 = 1;
/// Usage error on the command line.
pub const EXIT_USAGE: i32 = 2;
/// The guest asked to reboot.
pub const EXIT_REBOOT: i32 = 3;
/// Stopped hard after the shutdown grace period (or by a stop request or the console escape).
pub const EXIT_KILLED: i32 = 4;
