//! Legacy platform devices on the port I/O bus. The PIC, PIT and IOAPIC live in KVM.

pub mod acpi_pm;
pub mod boot_timer;
pub mod cmos;
pub mod i8042;
pub mod serial;
pub mod sink;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// An edge-triggered interrupt line into KVM's irqchip: writing the eventfd (registered
/// with KVM_IRQFD for one GSI) pulses the line without a KVM ioctl on our side.
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine {
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(IrqLine {
            evt: EventFd::new(EFD_NONBLOCK)?,
            gsi,
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd to register with KVM_IRQFD.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn pulse(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
