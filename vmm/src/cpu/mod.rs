//! vCPU setup (CPUID, MSRs, registers, LAPIC) and the per-vCPU run loop.

pub mod cpuid;
pub mod kick;
pub mod msr;
pub mod pause;
pub mod regs;
pub mod state;
pub mod vcpu;

/// Setting up a vCPU failed: which step, and KVM's answer.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {id}: {what}: {reason}")]
    Setup { id: u8, what: &'static str, reason: String },
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(String),
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrList(String),
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    #[error("vCPU state: {0}")]
    State(#[from] crate::state_error::StateError),
}

impl CpuError {
    pub(crate) fn setup(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |e| CpuError::Setup {
            id,
            what,
            reason: crate::os_error::errno_message(&e),
        }
    }
}
