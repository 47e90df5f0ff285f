//! The VMM's top-level error type, which wraps each part's own error.

use crate::boot::BootError;
use crate::config::ConfigError;
use crate::cpu::CpuError;
use crate::memory::MemoryError;
use crate::os_error::errno_message;

/// Everything that can stop a VM from being built or keep it from running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open it?)")]
    KvmOpen(String),
    #[error("KVM: {what}: {reason}")]
    Kvm { what: &'static str, reason: String },
    /// A virtio device's backend (disk file, tap) cannot be opened; the text names it.
    #[error("{0}")]
    Device(String),
    #[error("serial {target}: {reason}")]
    Serial { target: String, reason: String },
    #[error("{what}: {reason}")]
    Io { what: &'static str, reason: String },
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Saving or restoring VM state (see `crate::persist`).
    #[error("VM state: {0}")]
    State(#[from] crate::state_error::StateError),
    /// The guest did something the VMM cannot continue from (entry failure, emulation
    /// failure, unexpected exit); the message carries the vCPU registers.
    #[error("{0}")]
    Guest(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        what,
        reason: errno_message(&e),
    }
}
