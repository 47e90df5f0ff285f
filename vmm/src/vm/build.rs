//! Building a [`Vm`]: from a config (load a kernel, write the boot tables, put the boot
//! processor at the kernel's entry) or from saved state (fill RAM from a memory image,
//! put every register and device back). Both go through [`create`], which makes
//! everything below "how the guest starts": KVM's VM with its memory, irqchip and PIT,
//! the legacy devices, the virtio transports and the vCPU fds' CPUID.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Machine, SerialInput, Vm};
use crate::boot::{self, acpi, layout, loader, mptable, params};
use crate::bus::{Bus, SharedDevice, lock};
use crate::config::{SerialOutput, VmConfig};
use crate::control::VmControl;
use crate::cpu::vcpu::{Vcpu, VcpuSetup};
use crate::cpu::{msr, regs};
use crate::devices::acpi_pm::{AcpiPm, PM_BASE, PM_LEN, SCI_IRQ};
use crate::devices::boot_timer::{BOOT_TIMER_PORT, BootTimer};
use crate::devices::cmos::{CMOS_LEN, CMOS_PORT, Cmos};
use crate::devices::i8042::{AUX_IRQ, I8042, I8042_LEN, I8042_PORT, KBD_IRQ};
use crate::devices::serial::{self, COM1_IRQ, COM1_LEN, COM1_PORT, SerialDevice};
use crate::devices::{IrqLine, sink::Sink};
use crate::error::{Error, Result, kvm_err};
use crate::event_loop::EventLoop;
use crate::memory::{self, GuestMemory};
use crate::os_error::{errno_message, os_message};
use crate::persist::{self, RestoredTime, VmState};
use crate::virtio::attach::{self, PlannedDevice};

/// POST code port; Linux also writes it as an I/O delay.
const POST_PORT: u64 = 0x80;

/// What [`create`] makes; the front ends add the vCPUs and the way the guest starts.
struct Created {
    kvm: Kvm,
    machine: Machine,
    pio: Bus,
    mmio: Bus,
    event_loop: EventLoop,
    serial_input: SerialInput,
    supported_cpuid: CpuId,
    supported_msrs: Vec<u32>,
    tsc_deadline: bool,
}

impl Created {
    fn vcpu_setup(&self, cpus: u8) -> VcpuSetup<'_> {
        VcpuSetup {
            cpus,
            supported_cpuid: &self.supported_cpuid,
            tsc_deadline: self.tsc_deadline,
            supported_msrs: &self.supported_msrs,
        }
    }

    fn into_vm(self, config: &VmConfig, vcpus: Vec<Vcpu>) -> Vm {
        Vm {
            config: config.clone(),
            vcpus,
            machine: Arc::new(self.machine),
            _kvm: self.kvm,
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            event_loop: (!self.event_loop.is_empty()).then_some(self.event_loop),
            serial_input: self.serial_input,
            api_socket: None,
        }
    }
}

impl Vm {
    /// Validates `config`, creates the VM, loads the kernel and configures every vCPU.
    /// `start` is when the VMM started; the boot timer reports relative to it.
    pub fn build(config: &VmConfig, start: Instant) -> Result<Vm> {
        config.validate()?;
        // Input first: a bad kernel or initrd is reported the same with or without KVM.
        tracing::debug!("allocating {} of guest memory", config.memory);
        let guest_memory = memory::allocate(config.memory)?;
        let t = Instant::now();
        let kernel = boot::load_kernel(&guest_memory, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(loader::load_initrd(&guest_memory, path, &kernel)?),
            None => None,
        };
        // Device backends (disk files, taps) are input too.
        let virtio_devices = attach::open_all(config)?;
        let slots: Vec<acpi::MmioDeviceInfo> = virtio_devices.iter().map(|d| d.info).collect();
        let cmdline = attach::cmdline_with_devices(&config.cmdline, &slots);
        let cmdline_len = loader::load_cmdline(&guest_memory, &cmdline, &kernel)?;
        // Both CPU tables: the MP table for kernels without ACPI, ACPI for kernels
        // without MP table parsing.
        mptable::write(&guest_memory, config.cpus)?;
        let rsdp = acpi::write(&guest_memory, config.cpus, &slots)?;
        params::write_boot_params(
            &guest_memory,
            &kernel,
            cmdline_len,
            initrd,
            &memory::e820_map(config.memory.bytes()),
            Some(rsdp),
        )?;
        regs::write_boot_tables(&guest_memory)?;
        tracing::debug!(
            "{:?} kernel loaded in {:?}, entry {:#x}",
            kernel.format,
            t.elapsed(),
            kernel.entry.0
        );

        let created = create(config, start, guest_memory, virtio_devices)?;
        let t = Instant::now();
        tracing::debug!("configuring {} vCPUs", config.cpus);
        let setup = created.vcpu_setup(config.cpus);
        let vcpus = (0..config.cpus)
            .map(|id| Vcpu::new(&created.machine.vm_fd, id, &setup, (id == 0).then_some(kernel.entry.0)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        tracing::debug!("{} vCPUs configured in {:?}", vcpus.len(), t.elapsed());
        Ok(created.into_vm(config, vcpus))
    }

    /// Builds the VM that `state` and the memory image `memory` describe, for `config`
    /// (the same config the saved VM ran with: it names the disks and taps to reopen).
    /// Nothing of the guest runs until [`Vm::run`]; until then [`Vm::save_state`] gives
    /// back `state` as restored.
    pub fn restore(config: &VmConfig, start: Instant, state: &VmState, memory: &mut impl Read) -> Result<Vm> {
        config.validate()?;
        state.check_fits(config)?;
        let guest_memory = memory::allocate(config.memory)?;
        persist::memory::check_layout(&guest_memory, &state.memory)?;
        persist::memory::read(&guest_memory, memory)?;
        let virtio_devices = attach::open_all(config)?;
        let created = create(config, start, guest_memory, virtio_devices)?;
        let m = &created.machine;
        state.kvm.apply(&m.vm_fd)?;
        let d = &state.devices;
        lock(&m.serial).restore(&d.serial)?;
        lock(&m.i8042).restore(&d.i8042)?;
        lock(&m.cmos).restore(&d.cmos)?;
        lock(&m.acpi_pm).restore(&d.acpi_pm)?;
        // `check_fits` made sure the saved VM and the config agree on having one.
        if let (Some(timer), Some(saved)) = (&m.boot_timer, &d.boot_timer) {
            lock(timer).restore(saved)?;
        }
        for (transport, saved) in m.transports.iter().zip(&d.virtio) {
            lock(transport).restore(saved)?;
        }
        let setup = created.vcpu_setup(config.cpus);
        let vcpus = state
            .vcpus
            .iter()
            .map(|s| Vcpu::restore(&m.vm_fd, &setup, s))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        *lock(&m.restored_time) = Some(RestoredTime::of(state));
        tracing::debug!("VM restored: {} vCPUs, {}", vcpus.len(), config.memory);
        Ok(created.into_vm(config, vcpus))
    }
}

/// KVM's VM with `guest_memory` registered, its irqchip and PIT, the legacy devices on
/// the port bus, the virtio transports on the MMIO bus, and what vCPUs are made from.
fn create(config: &VmConfig, start: Instant, guest_memory: GuestMemory, virtio: Vec<PlannedDevice>) -> Result<Created> {
    // The KVM ioctls below sleep in the kernel (VM creation starts kernel threads;
    // memory registration waits for SRCU readers): each is said before it is made,
    // so a VMM stuck at start shows in its debug log where.
    tracing::debug!("opening /dev/kvm");
    let kvm = Kvm::new().map_err(|e| Error::KvmOpen(errno_message(&e)))?;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::SetTssAddr, "TSS address"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::Kvm {
                what: "capability check",
                reason: format!("this KVM lacks {name}"),
            });
        }
    }
    tracing::debug!("KVM_CREATE_VM");
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Memory first: measured on this PVM host, KVM_SET_USER_MEMORY_REGION for 128 MiB
    // takes ~0.2 ms on a bare VM but 4-7 ms once the irqchip and PIT exist (each
    // memslot change then waits for their readers), which was most of our start time.
    let t = Instant::now();
    tracing::debug!("KVM_SET_USER_MEMORY_REGION");
    register_memory(&vm_fd, &guest_memory)?;
    tracing::debug!("guest memory registered with KVM in {:?}", t.elapsed());
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    tracing::debug!("KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2");
    vm_fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let control = Arc::new(VmControl::new().map_err(|e| Error::Io {
        what: "creating the exit eventfd",
        reason: os_message(&e),
    })?);
    let devices = Devices::create(config, start, &vm_fd, &control)?;
    let mut mmio = Bus::new();
    let mut event_loop = EventLoop::new().map_err(|e| Error::Io {
        what: "creating the device event loop",
        reason: os_message(&e),
    })?;
    let transports = attach::attach(&vm_fd, &guest_memory, virtio, &mut mmio, &mut event_loop)?;

    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| crate::cpu::CpuError::SupportedCpuid(errno_message(&e)))?;
    let supported_msrs = msr::supported(&kvm)?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    Ok(Created {
        machine: Machine {
            vm_fd,
            memory: guest_memory,
            control,
            api: Arc::new(crate::cpu::pause::ControlState::new()),
            serial: devices.serial,
            i8042: devices.i8042,
            cmos: devices.cmos,
            acpi_pm: devices.acpi_pm,
            boot_timer: devices.boot_timer,
            transports,
            restored_time: Mutex::new(None),
        },
        kvm,
        pio: devices.pio,
        mmio,
        event_loop,
        serial_input: devices.serial_input,
        supported_cpuid,
        supported_msrs,
        tsc_deadline,
    })
}

/// Registers each RAM region with KVM as one memory slot.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping is valid for `len` bytes and lives in `Vm` until after
        // the VM fd (which holds the slot) is dropped.
        unsafe { vm_fd.set_user_memory_region(region_desc) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The legacy devices and the port I/O bus that routes to them.
struct Devices {
    pio: Bus,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    cmos: Arc<Mutex<Cmos>>,
    boot_timer: Option<Arc<Mutex<BootTimer>>>,
    serial_input: SerialInput,
}

impl Devices {
    fn create(config: &VmConfig, start: Instant, vm_fd: &VmFd, control: &Arc<VmControl>) -> Result<Self> {
        let irq = |gsi: u32| -> Result<IrqLine> {
            let line = IrqLine::new(gsi).map_err(|e| Error::Io {
                what: "creating an interrupt eventfd",
                reason: os_message(&e),
            })?;
            vm_fd
                .register_irqfd(line.eventfd(), gsi)
                .map_err(kvm_err("KVM_IRQFD"))?;
            Ok(line)
        };

        let sink = serial::open_sink(&config.serial)?;
        let serial_input = match (&config.serial, &sink) {
            (SerialOutput::Stdio, _) if serial::is_terminal(libc::STDIN_FILENO) => SerialInput::Stdin,
            (SerialOutput::Unix(_), serial::SerialSink::Unix(stream)) => {
                let clone = stream.try_clone().map_err(|e| Error::Serial {
                    target: config.serial.to_string(),
                    reason: os_message(&e),
                })?;
                SerialInput::Socket(clone.into())
            }
            _ => SerialInput::None,
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq(COM1_IRQ)?, sink)));
        let i8042 = Arc::new(Mutex::new(I8042::new(irq(KBD_IRQ)?, irq(AUX_IRQ)?, control.clone())));
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        let boot_timer = config.boot_timer.then(|| Arc::new(Mutex::new(BootTimer::new(start))));
        let boot_timer_port: SharedDevice = match &boot_timer {
            Some(timer) => timer.clone(),
            None => Arc::new(Mutex::new(Sink)),
        };

        let mut pio = Bus::new();
        let bus_err = |e: crate::bus::BusError| Error::Io {
            what: "building the I/O bus",
            reason: e.to_string(),
        };
        pio.insert("serial", COM1_PORT, COM1_LEN, serial.clone())
            .map_err(bus_err)?;
        pio.insert("i8042", I8042_PORT, I8042_LEN, i8042.clone())
            .map_err(bus_err)?;
        pio.insert("cmos", CMOS_PORT, CMOS_LEN, cmos.clone()).map_err(bus_err)?;
        pio.insert("boot-timer", BOOT_TIMER_PORT, 1, boot_timer_port)
            .map_err(bus_err)?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(control.clone(), irq(u32::from(SCI_IRQ))?)));
        pio.insert("acpi-pm", u64::from(PM_BASE), PM_LEN, acpi_pm.clone())
            .map_err(bus_err)?;
        pio.insert("post", POST_PORT, 1, Arc::new(Mutex::new(Sink)))
            .map_err(bus_err)?;
        Ok(Devices {
            pio,
            acpi_pm,
            i8042,
            serial,
            cmos,
            boot_timer,
            serial_input,
        })
    }
}
