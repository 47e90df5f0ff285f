//! The VM-wide state KVM keeps in the kernel: the in-kernel irqchip (both 8259 PICs and
//! the IOAPIC), the PIT, and the kvmclock.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::state_error::{StateError, kvm};

/// The irqchip, PIT and clock of one VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm(what))?;
    Ok(c)
}

impl KvmVmState {
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        Ok(KvmVmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts the state into a VM whose irqchip and PIT were just created.
    pub fn apply(&self, vm: &VmFd) -> Result<(), StateError> {
        for (c, id, what) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "KVM_SET_IRQCHIP (PIC master)"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "KVM_SET_IRQCHIP (PIC slave)"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "KVM_SET_IRQCHIP (IOAPIC)"),
        ] {
            if c.chip_id != id {
                return Err(StateError::Invalid {
                    what: "irqchip",
                    reason: format!("{what}: saved chip id {}, expected {id}", c.chip_id),
                });
            }
            vm.set_irqchip(c).map_err(kvm(what))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // Only the clock value: with KVM_CLOCK_REALTIME KVM would add the wall time since
        // the save, and the other flags are KVM's to report, not ours to set. The guest's
        // clock goes on from where it stopped, as after a pause.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
