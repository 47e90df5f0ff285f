//! Direct Linux boot: where things go in guest memory, loading the kernel, initrd and
//! command line, and the tables the kernel reads at entry (boot_params, e820, MP table).

pub mod acpi;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod params;

use std::path::PathBuf;

pub use loader::{KernelFormat, LoadedKernel, load_kernel};

/// Everything that can go wrong putting a kernel into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd {}: {reason}", path.display())]
    Initrd { path: PathBuf, reason: String },
    #[error("cmdline: {0}")]
    Cmdline(String),
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
}
