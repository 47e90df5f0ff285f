//! Turning the config's disks, nets and rng into virtio-mmio devices wired to KVM: one
//! MMIO window and one interrupt line each, an irqfd for the line, an ioeventfd per
//! queue on QueueNotify, the window on the MMIO bus and the fds in the event loop.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};

use super::block::Block;
use super::mmio::{MMIO_WINDOW, MmioTransport, NOTIFY_OFFSET};
use super::net::{Mac, Net};
use super::rng::Rng;
use super::tap::Tap;
use super::{Interrupt, VirtioDevice};
use crate::boot::acpi::MmioDeviceInfo;
use crate::boot::layout::{VIRTIO_IRQS, VIRTIO_MMIO_BASE};
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::device_counters::{DeviceKind, device_counters};
use crate::devices::IrqLine;
use crate::error::{Error, kvm_err};
use crate::event_loop::EventLoop;
use crate::memory::GuestMemory;
use crate::os_error::os_message;

/// A device opened from the config, with the place it will occupy.
pub struct PlannedDevice {
    pub device: Box<dyn VirtioDevice>,
    pub info: MmioDeviceInfo,
    /// For the log: "virtio-blk /var/disk.img".
    pub label: String,
}

/// Where device number `index` lives.
pub fn slot(index: usize) -> MmioDeviceInfo {
    MmioDeviceInfo {
        addr: VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW,
        len: MMIO_WINDOW,
        irq: VIRTIO_IRQS[index],
    }
}

/// Opens every backend (files, taps) in config order: disks, nets, rng. Done before
/// KVM is touched, so a bad disk path is reported like a bad kernel path.
pub fn open_all(config: &VmConfig) -> Result<Vec<PlannedDevice>, Error> {
    let mut out: Vec<PlannedDevice> = Vec::new();
    let mut push = |device: Box<dyn VirtioDevice>, label: String| {
        let info = slot(out.len());
        out.push(PlannedDevice { device, info, label });
    };
    // Counter names follow the order the guest sees: virtio-blk0 is its first disk.
    for (i, disk) in config.disks.iter().enumerate() {
        let block = Block::open(disk)
            .map_err(|e| Error::Device(e.to_string()))?
            .with_counters(device_counters(&format!("virtio-blk{i}"), DeviceKind::Block));
        push(Box::new(block), format!("virtio-blk {}", super::block::describe(disk)));
    }
    for (i, net) in config.nets.iter().enumerate() {
        net.validate().map_err(|e| Error::Device(e.to_string()))?;
        let tap = match (&net.tap, net.fd) {
            (Some(name), _) => Tap::open(name),
            (None, fd) => Tap::from_fd(fd.unwrap_or(-1)),
        }
        .map_err(|e| Error::Device(e.to_string()))?;
        let mac = net.mac.unwrap_or_else(Mac::random);
        let label = format!("virtio-net tap {} mac {mac}", tap.name());
        let counters = device_counters(&format!("virtio-net{i}"), DeviceKind::Net);
        push(Box::new(Net::new(tap, mac).with_counters(counters)), label);
    }
    if config.rng {
        push(Box::<Rng>::default(), "virtio-rng".into());
    }
    Ok(out)
}

/// `cmdline` plus one `virtio_mmio.device=<size>@<addr>:<irq>` per device, for kernels
/// with VIRTIO_MMIO_CMDLINE_DEVICES (ACPI kernels find them in the DSDT instead; a
/// kernel with both refuses the second registration of a window, harmlessly).
pub fn cmdline_with_devices(cmdline: &str, devices: &[MmioDeviceInfo]) -> String {
    let mut out = cmdline.to_string();
    for d in devices {
        out.push_str(&format!(" virtio_mmio.device={}K@{:#x}:{}", d.len >> 10, d.addr, d.irq));
    }
    out
}

/// Wires the planned devices into KVM, the MMIO bus and the event loop.
pub fn attach(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    planned: Vec<PlannedDevice>,
    bus: &mut Bus,
    event_loop: &mut EventLoop,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, Error> {
    let io = |what: &'static str| {
        move |e: std::io::Error| Error::Io {
            what,
            reason: os_message(&e),
        }
    };
    let mut transports = Vec::new();
    for p in planned {
        let line = IrqLine::new(p.info.irq).map_err(io("creating an interrupt eventfd"))?;
        vm_fd
            .register_irqfd(line.eventfd(), p.info.irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let transport =
            MmioTransport::new(p.device, mem.clone(), Interrupt::new(line)).map_err(io("creating queue eventfds"))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(p.info.addr + NOTIFY_OFFSET), queue as u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(&p.label, p.info.addr, p.info.len, transport.clone())
            .map_err(|e| Error::Io {
                what: "building the MMIO bus",
                reason: e.to_string(),
            })?;
        event_loop
            .add(transport.clone())
            .map_err(io("adding a device to the event loop"))?;
        tracing::info!("{} at {:#x} irq {}", p.label, p.info.addr, p.info.irq);
        transports.push(transport);
    }
    Ok(transports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap_and_cmdline_names_them() {
        let infos: Vec<MmioDeviceInfo> = (0..16).map(slot).collect();
        for w in infos.windows(2) {
            assert!(w[0].addr + w[0].len <= w[1].addr);
        }
        let mut irqs: Vec<u32> = infos.iter().map(|i| i.irq).collect();
        irqs.sort_unstable();
        irqs.dedup();
        assert_eq!(irqs.len(), 16, "every device has its own line");
        for legacy in [0, 1, 2, 4, 8, 9, 12, 13] {
            assert!(!irqs.contains(&legacy), "IRQ {legacy} belongs to a legacy device");
        }
        assert_eq!(
            cmdline_with_devices("console=ttyS0", &infos[..2]),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:16 virtio_mmio.device=4K@0xd0001000:17"
        );
    }
}
