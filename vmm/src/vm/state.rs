//! Taking a VM's state: from a running VM through a [`StateHandle`] (pause, save,
//! memory, resume, from any thread), or from a built one that has not run
//! ([`Vm::save_state`]). Both end in [`Machine::collect`], so what a snapshot carries is
//! listed once.

use std::io::Write;
use std::sync::Arc;

use super::{Machine, Vm};
use crate::bus::lock;
use crate::control::ExitReason;
use crate::cpu::state::VcpuState;
use crate::persist::kvm::KvmVmState;
use crate::persist::{self, DevicesState, STATE_FORMAT, VmState};
use crate::state_error::StateError;

/// A handle on a VM's state that stays valid while [`Vm::run`] runs it on another thread.
#[derive(Clone)]
pub struct StateHandle {
    machine: Arc<Machine>,
}

impl StateHandle {
    /// Parks every vCPU out of the guest (what the control socket's `pause` does).
    pub fn pause(&self) -> Result<(), StateError> {
        let m = &self.machine;
        m.api.pause(&m.control).map_err(|reason| StateError::Kvm {
            what: "pausing the vCPUs",
            reason,
        })
    }

    pub fn resume(&self) {
        self.machine.api.resume();
    }

    /// The state of the paused VM (each vCPU takes its own on its thread).
    pub fn save(&self) -> Result<VmState, StateError> {
        let m = &self.machine;
        let vcpus = m.api.capture_vcpus(&m.control)?;
        m.collect(vcpus)
    }

    /// Guest RAM, for the paused VM whose state [`Self::save`] took.
    pub fn write_memory(&self, out: &mut impl Write) -> Result<(), StateError> {
        if !self.machine.api.is_paused() {
            return Err(StateError::Invalid {
                what: "guest memory",
                reason: "the VM must be paused while its memory is saved".into(),
            });
        }
        persist::memory::write(&self.machine.memory, out)
    }

    /// Stops the VM hard: `Vm::run` returns `ExitReason::Killed`.
    pub fn stop(&self) {
        self.machine.control.request_exit(ExitReason::Killed);
    }
}

impl Vm {
    /// A handle to pause the VM and take its state while [`Vm::run`] runs it.
    pub fn state_handle(&self) -> StateHandle {
        StateHandle {
            machine: self.machine.clone(),
        }
    }

    /// The state of a VM that is built (or restored) but not running.
    pub fn save_state(&mut self) -> Result<VmState, StateError> {
        let vcpus = self.vcpus.iter_mut().map(|v| v.save()).collect::<Result<Vec<_>, _>>()?;
        self.machine.collect(vcpus)
    }

    /// Guest RAM of a VM that is built (or restored) but not running.
    pub fn write_memory(&self, out: &mut impl Write) -> Result<(), StateError> {
        persist::memory::write(&self.machine.memory, out)
    }
}

impl Machine {
    /// Everything but the vCPUs, read now, around the vCPU states given.
    fn collect(&self, vcpus: Vec<VcpuState>) -> Result<VmState, StateError> {
        let mut state = VmState {
            format: STATE_FORMAT,
            memory: persist::memory::layout(&self.memory),
            kvm: KvmVmState::capture(&self.vm_fd)?,
            vcpus,
            devices: DevicesState {
                serial: lock(&self.serial).state(),
                i8042: lock(&self.i8042).state(),
                cmos: lock(&self.cmos).state(),
                acpi_pm: lock(&self.acpi_pm).state(),
                boot_timer: self.boot_timer.as_ref().map(|t| lock(t).state()),
                virtio: self.transports.iter().map(|t| lock(t).state()).collect(),
            },
        };
        if let Some(restored) = lock(&self.restored_time).as_ref() {
            restored.apply_to(&mut state);
        }
        Ok(state)
    }
}
