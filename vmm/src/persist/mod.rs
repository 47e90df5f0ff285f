//! The state seam: every piece of a VM that a snapshot or a live migration carries, in
//! one serializable [`VmState`], plus guest RAM as a separate stream ([`memory`]).
//!
//! | part | where it comes from |
//! |---|---|
//! | vCPUs | [`VcpuState`]: regs, sregs, MSRs, LAPIC, XSAVE, XCRs, debug regs, events, MP state, taken by each vCPU's own thread |
//! | VM-wide KVM | [`kvm::KvmVmState`]: both PICs and the IOAPIC, the PIT, kvmclock |
//! | legacy devices | serial (vm-superio), i8042, CMOS, ACPI PM, boot timer: each device's `state()` |
//! | virtio | each virtio-mmio transport with its queues and device: `MmioTransport::state()` |
//! | memory | the region layout here, the bytes through [`memory::write`] / [`memory::read`] |
//!
//! `Vm::save_state` / `StateHandle::save` take it; `Vm::restore` builds a VM from it,
//! sharing everything below "how the guest starts" with `Vm::build`.
//!
//! **Time.** A few values KVM reports move with the host's clock even when no guest
//! code runs: kvmclock, the PIT's load times, each vCPU's TSC and LAPIC timer count.
//! For a VM restored and not yet run, a save reports them as restored (the guest's
//! time has not moved: it has not run), which makes "restore, then save" give back the
//! same bytes; every other field is read back from KVM and the devices. Once the guest
//! runs, they are read live.
//!
//! The state is JSON: readable, diffable, and small next to memory (a vCPU is ~12 KiB).
//! [`VmState::from_bytes`] bounds what it reads, since a state file comes from outside.

pub mod kvm;
pub mod memory;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::cpu::state::{MSR_IA32_TSC, VcpuState};
use crate::devices::acpi_pm::AcpiPmState;
use crate::devices::boot_timer::BootTimerState;
use crate::devices::cmos::CmosState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialState;
use crate::state_error::StateError;
use crate::virtio::persist::VirtioTransportState;
use memory::MemoryRegionState;

/// Bumped whenever a field changes meaning; a state of another format is refused.
pub const STATE_FORMAT: u32 = 1;
/// The largest state file read: 32 vCPUs at ~12 KiB of JSON each plus devices fit many
/// times over.
pub const MAX_STATE_BYTES: usize = 16 << 20;

/// A whole VM but its RAM bytes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub format: u32,
    pub memory: Vec<MemoryRegionState>,
    pub kvm: kvm::KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Every device's own state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub cmos: CmosState,
    pub acpi_pm: AcpiPmState,
    /// None when the VM has no boot timer (`boot_timer: false`).
    pub boot_timer: Option<BootTimerState>,
    /// One per virtio device, in config order (disks, nets, rng).
    pub virtio: Vec<VirtioTransportState>,
}

impl VmState {
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Invalid {
            what: "VM state",
            reason: e.to_string(),
        })
    }

    /// Parses a state file's bytes: at most [`MAX_STATE_BYTES`], of [`STATE_FORMAT`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(StateError::Invalid {
                what: "VM state",
                reason: format!("{} bytes, at most {MAX_STATE_BYTES}", bytes.len()),
            });
        }
        let state: VmState = serde_json::from_slice(bytes).map_err(|e| StateError::Invalid {
            what: "VM state",
            reason: e.to_string(),
        })?;
        if state.format != STATE_FORMAT {
            return Err(StateError::Mismatch {
                what: "VM state",
                reason: format!("format {}, this keel-vmm reads format {STATE_FORMAT}", state.format),
            });
        }
        Ok(state)
    }

    /// Checks the parts of the state a config decides: vCPU count and ids, the number of
    /// virtio devices, the boot timer. (Memory is checked against the layout.)
    pub fn check_fits(&self, config: &VmConfig) -> Result<(), StateError> {
        let ids: Vec<u8> = self.vcpus.iter().map(|v| v.id).collect();
        let expected: Vec<u8> = (0..config.cpus).collect();
        if ids != expected {
            return Err(StateError::Mismatch {
                what: "vCPUs",
                reason: format!("saved vCPU ids {ids:?}, the config has {} vCPUs", config.cpus),
            });
        }
        let devices = config.disks.len() + config.nets.len() + usize::from(config.rng);
        if self.devices.virtio.len() != devices {
            return Err(StateError::Mismatch {
                what: "virtio devices",
                reason: format!(
                    "{} saved, the config has {devices} (disks, nets and rng must match)",
                    self.devices.virtio.len()
                ),
            });
        }
        if self.devices.boot_timer.is_some() != config.boot_timer {
            return Err(StateError::Mismatch {
                what: "boot timer",
                reason: "the saved VM and this config disagree on `boot_timer`".into(),
            });
        }
        Ok(())
    }
}

/// The time-moving values a VM was restored with (see the module doc), applied to its
/// saves until it runs.
#[derive(Clone, Debug)]
pub struct RestoredTime {
    clock: kvm_bindings::kvm_clock_data,
    pit_load_times: [i64; 3],
    /// Per vCPU: its TSC (if saved) and LAPIC timer count.
    vcpus: Vec<(Option<u64>, u32)>,
}

impl RestoredTime {
    pub fn of(state: &VmState) -> Self {
        RestoredTime {
            clock: state.kvm.clock,
            pit_load_times: std::array::from_fn(|i| state.kvm.pit.channels[i].count_load_time),
            vcpus: state
                .vcpus
                .iter()
                .map(|v| (v.msr(MSR_IA32_TSC), v.lapic_timer_count()))
                .collect(),
        }
    }

    pub fn apply_to(&self, state: &mut VmState) {
        state.kvm.clock = self.clock;
        for (channel, t) in state.kvm.pit.channels.iter_mut().zip(self.pit_load_times) {
            channel.count_load_time = t;
        }
        for (vcpu, &(tsc, count)) in state.vcpus.iter_mut().zip(&self.vcpus) {
            if let Some(tsc) = tsc {
                vcpu.set_msr(MSR_IA32_TSC, tsc);
            }
            vcpu.set_lapic_timer_count(count);
        }
    }
}
