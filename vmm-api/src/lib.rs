//! keel-vmm-api: what the parts of Keel agree on about `keel-vmm`, in one place.
//!
//! - [`limits`]: the largest guest keel-vmm boots (vCPUs, memory, devices, command
//!   line), with check functions a config validator calls before a VMM ever starts.
//! - [`exit`]: the `keel-vmm` process exit codes and what each means.
//! - [`control`]: the requests and answers of the per-VM control socket
//!   (`keel-vmm --api-socket PATH`), as serde types.
//! - [`MemorySize`]: a guest memory size that parses and prints binary units.
//!
//! The crate depends on serde and thiserror only, so keel-init can use it without
//! linking the VMM and its KVM crates.

pub mod control;
pub mod exit;
pub mod limits;
mod size;

pub use limits::LimitError;
pub use size::{MemorySize, ParseSizeError};
