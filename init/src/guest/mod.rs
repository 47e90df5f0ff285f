//! The guest wing: one keel-vmm process per declared guest and everything about it.
//!
//! - [`supervisor`]: the guests of the applied config and what the API reads of them;
//! - [`lifecycle`]: what moves a guest between states (operations, exits, deadlines);
//! - [`state`], [`restart`]: the states, exits and the restart policy (pure);
//! - [`spawn`], [`vmm_command`]: starting keel-vmm (its fds and command line);
//! - [`vmm_control`]: the client of keel-vmm's control socket;
//! - [`console`], [`vmm_log`]: the guest's console ring and log, the VMM's stderr;
//! - [`resources`]: the host side (taps, volumes) prepared before a guest starts;
//! - [`stuck`]: what a VMM that does not move is doing (its kernel stacks);
//! - [`cloud_init`]: a guest's NoCloud seed (its files and the vfat disk they go on).

pub mod cloud_init;
pub mod console;
mod lifecycle;
pub mod resources;
pub mod restart;
mod spawn;
pub mod state;
pub mod stuck;
pub mod supervisor;
pub mod vmm_command;
pub mod vmm_control;
pub mod vmm_log;

pub use restart::{Decision, HEALTHY_RUN, RestartHistory};
pub use state::{AfterStop, Exit, GuestStatus, OpError, State, VMM_EXIT_KILLED, VMM_EXIT_POWEROFF, VMM_EXIT_REBOOT};
pub use supervisor::{DEFAULT_STOP_TIMEOUT, Prepared, StopHandle, Supervisor};
