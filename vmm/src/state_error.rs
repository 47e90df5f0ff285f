//! The error of saving or restoring VM state (the snapshot seam, [`crate::persist`]). A
//! leaf like `os_error`: devices, vCPUs and the VM all return it without importing one
//! another.

/// Why a piece of saved state could not be taken or put back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The saved state does not fit the object it is restored into (another device
    /// type, queue count, memory layout, vCPU count...).
    #[error("{what}: the saved state does not fit: {reason}")]
    Mismatch { what: &'static str, reason: String },
    /// The saved state is self-contradictory (an index past a queue's size, a register
    /// value the device cannot hold).
    #[error("{what}: invalid saved state: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A KVM ioctl that gets or sets state failed.
    #[error("{what}: {reason}")]
    Kvm { what: &'static str, reason: String },
    /// Reading or writing a state or memory file failed.
    #[error("{what}: {reason}")]
    Io { what: &'static str, reason: String },
}

/// Maps a failed state ioctl to [`StateError::Kvm`] naming it.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm {
        what,
        reason: crate::os_error::errno_message(&e),
    }
}
