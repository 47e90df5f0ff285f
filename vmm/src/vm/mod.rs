//! Building a VM from a [`VmConfig`] and running it to its end.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, acpi, layout, loader, mptable, params};
use crate::bus::{Bus, SharedDevice, lock};
use crate::config::{SerialOutput, VmConfig};
use crate::control::{ExitReason, VmControl};
use crate::cpu::{msr, regs, vcpu};
use crate::devices::acpi_pm::{AcpiPm, PM_BASE, PM_LEN, SCI_IRQ};
use crate::devices::boot_timer::{BOOT_TIMER_PORT, BootTimer};
use crate::devices::cmos::{CMOS_LEN, CMOS_PORT, Cmos};
use crate::devices::i8042::{AUX_IRQ, I8042, I8042_LEN, I8042_PORT, KBD_IRQ};
use crate::devices::serial::{self, COM1_IRQ, COM1_LEN, COM1_PORT, RawTerminal, SerialDevice};
use crate::devices::{IrqLine, sink::Sink};
use crate::error::{Error, Result, kvm_err};
use crate::event_loop::EventLoop;
use crate::memory::{self, GuestMemory};
use crate::os_error::{errno_message, os_message};
use crate::virtio::attach;

/// POST code port; Linux also writes it as an I/O delay.
const POST_PORT: u64 = 0x80;

/// Where serial input comes from, decided at build time.
enum SerialInput {
    None,
    /// stdin; `true` when it is a terminal (raw mode, Ctrl-A escape).
    Stdin,
    /// The unix socket the output goes to.
    Socket(OwnedFd),
}

/// A VM that is fully built (memory loaded, vCPUs configured) and ready to run.
pub struct Vm {
    config: VmConfig,
    // Field order is drop order: vCPUs go before the VM fd, the VM before KVM.
    vcpus: Vec<vcpu::Vcpu>,
    _vm_fd: VmFd,
    _kvm: Kvm,
    _memory: GuestMemory,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<VmControl>,
    /// The device thread's loop, started by `run` (None: no virtio devices).
    event_loop: Option<EventLoop>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input: SerialInput,
    /// The control socket's shared state, and where to serve it (`--api-socket`).
    api: Arc<crate::cpu::pause::ControlState>,
    api_socket: Option<std::path::PathBuf>,
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
        attach::attach(&vm_fd, &guest_memory, virtio_devices, &mut mmio, &mut event_loop)?;

        let t = Instant::now();
        tracing::debug!("configuring {} vCPUs", config.cpus);
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| crate::cpu::CpuError::SupportedCpuid(errno_message(&e)))?;
        let supported_msrs = msr::supported(&kvm)?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let vcpus = (0..config.cpus)
            .map(|id| {
                vcpu::Vcpu::new(
                    &vm_fd,
                    id,
                    config.cpus,
                    &supported_cpuid,
                    tsc_deadline,
                    &supported_msrs,
                    (id == 0).then_some(kernel.entry.0),
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        tracing::debug!("{} vCPUs configured in {:?}", vcpus.len(), t.elapsed());

        Ok(Vm {
            config: config.clone(),
            vcpus,
            _vm_fd: vm_fd,
            _kvm: kvm,
            _memory: guest_memory,
            pio: Arc::new(devices.pio),
            mmio: Arc::new(mmio),
            control,
            event_loop: (!event_loop.is_empty()).then_some(event_loop),
            acpi_pm: devices.acpi_pm,
            i8042: devices.i8042,
            serial: devices.serial,
            serial_input: devices.serial_input,
            api: Arc::new(crate::cpu::pause::ControlState::new()),
            api_socket: None,
        })
    }

    /// Serves the per-VM control socket (see [`crate::api`]) at `path` while the VM runs.
    pub fn with_api_socket(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.api_socket = Some(path.into());
        self
    }

    /// Runs the guest until it powers off, reboots, fails or is stopped by a signal.
    ///
    /// SIGTERM, SIGINT and SIGHUP are taken over while the VM runs: the first one asks
    /// the guest to shut down and starts the grace period; a second one, or the end of
    /// the grace period, stops the VM hard. Never returns `Ok(ExitReason::Error(_))`:
    /// guest failures come back as `Err(Error::Guest)`.
    ///
    /// How the guest is asked: if its OS enabled the ACPI power button (PWRBTN_EN; Linux
    /// does when its button driver is loaded), the button is pressed, which a systemd or
    /// acpid guest turns into a clean poweroff. Otherwise (no ACPI, no button driver, a
    /// tiny test guest) Ctrl-Alt-Del is typed on the i8042, which Linux's init handles.
    /// Only one of the two is sent: Ctrl-Alt-Del means *reboot* to systemd, and a
    /// guest that rebooted instead of powering off would look like a restart request.
    pub fn run(mut self) -> Result<ExitReason> {
        // Before any thread starts, so every thread inherits it.
        if self.config.seccomp {
            crate::seccomp::install()?;
        }
        crate::cpu::kick::install_kick_handler().map_err(|reason| Error::Io {
            what: "installing the vCPU kick signal handler",
            reason,
        })?;
        let signals = SignalGuard::block_stop_signals()?;
        let input_stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io {
            what: "creating an eventfd",
            reason: os_message(&e),
        })?;
        let (input_thread, raw_terminal) = self.start_serial_input(&input_stop)?;
        // Devices run before any vCPU can notify them.
        tracing::debug!("starting the device thread and the vCPUs");
        let device_thread = match self.event_loop.take() {
            Some(l) => Some(l.spawn(self.control.clone()).map_err(|e| Error::Io {
                what: "starting the device thread",
                reason: os_message(&e),
            })?),
            None => None,
        };

        let ctx = Arc::new(vcpu::VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            control: self.control.clone(),
            api: self.api.clone(),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for v in self.vcpus.drain(..) {
            match vcpu::spawn(v, ctx.clone()) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    spawn_error = Some(os_message(&e));
                    break;
                }
            }
        }
        if let Some(reason) = spawn_error {
            self.control
                .request_exit(ExitReason::Error(format!("cannot start a vCPU thread: {reason}")));
        }

        self.api.set_vcpu_threads(
            threads
                .iter()
                .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
                .collect(),
        );
        // Bound once the vCPUs run, so a supervisor that can connect knows the guest is up.
        let api_server = match &self.api_socket {
            Some(path) => match crate::api::ControlServer::start(
                path,
                crate::api::Targets {
                    state: self.api.clone(),
                    control: self.control.clone(),
                    i8042: self.i8042.clone(),
                    acpi_pm: self.acpi_pm.clone(),
                },
            ) {
                Ok(server) => Some(server),
                Err(e) => {
                    self.control.request_exit(ExitReason::Error(format!(
                        "cannot serve the control socket {}: {}",
                        path.display(),
                        os_message(&e)
                    )));
                    None
                }
            },
            None => None,
        };

        tracing::debug!("{} vCPUs started; serving until the guest ends", threads.len());
        let stop_requested = self.wait_for_exit(&signals) || self.api.stop_requested();
        drop(api_server);
        self.api.clear_vcpu_threads();

        // Teardown: every vCPU out of KVM_RUN and joined, input thread joined, terminal
        // restored (RawTerminal's drop), signal mask restored (SignalGuard's drop).
        self.control.request_exit(ExitReason::Killed);
        for t in &threads {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = t.kill(crate::cpu::kick::kick_signal());
        }
        for t in threads {
            let _ = t.join();
        }
        // No vCPU runs any more: nothing can notify a device.
        if let Some(t) = device_thread {
            t.stop();
        }
        let _ = input_stop.write(1);
        if let Some(t) = input_thread {
            let _ = t.join();
        }
        drop(raw_terminal);
        drop(signals);

        let reason = self
            .control
            .reason()
            .unwrap_or(ExitReason::Error("VM stopped without a reason".into()));
        match reason {
            ExitReason::Error(msg) => Err(Error::Guest(msg)),
            ExitReason::Reboot | ExitReason::PowerOff if stop_requested => Ok(ExitReason::Stopped),
            other => Ok(other),
        }
    }

    /// Waits for the VM to end, handling stop signals. Returns whether a stop was
    /// requested by signal.
    fn wait_for_exit(&self, signals: &SignalGuard) -> bool {
        let grace = Duration::from_millis(self.config.shutdown_timeout_ms);
        let mut deadline: Option<Instant> = None;
        loop {
            let timeout_ms = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128) as i32,
                None => -1,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.control.exit_evt().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.control
                    .request_exit(ExitReason::Error(format!("waiting for the VM: {}", os_message(&e))));
                return deadline.is_some();
            }
            if fds[0].revents != 0 || self.control.is_stopping() {
                return deadline.is_some();
            }
            if fds[1].revents != 0
                && let Some(signo) = signals.read()
            {
                if deadline.is_some() || grace.is_zero() {
                    tracing::info!("signal {signo} again: stopping the VM hard");
                    self.control.request_exit(ExitReason::Killed);
                    return true;
                }
                let mut pm = lock(&self.acpi_pm);
                if pm.power_button_armed() {
                    tracing::info!("signal {signo}: pressing the ACPI power button, stopping hard in {grace:?}");
                    pm.press_power_button();
                } else {
                    tracing::info!(
                        "signal {signo}: guest has no ACPI power button handler, sending Ctrl-Alt-Del; \
                         stopping hard in {grace:?}"
                    );
                    lock(&self.i8042).inject_ctrl_alt_del();
                }
                drop(pm);
                deadline = Some(Instant::now() + grace);
            }
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                tracing::warn!("guest did not stop within {:?}: stopping it hard", grace);
                self.control.request_exit(ExitReason::Killed);
                return true;
            }
        }
    }

    fn start_serial_input(&self, stop: &EventFd) -> Result<(Option<JoinHandle<()>>, Option<RawTerminal>)> {
        let (fd, is_tty): (RawFd, bool) = match &self.serial_input {
            SerialInput::None => return Ok((None, None)),
            SerialInput::Stdin => (libc::STDIN_FILENO, true),
            SerialInput::Socket(s) => (s.as_raw_fd(), false),
        };
        let raw = if is_tty {
            Some(RawTerminal::enable(fd).map_err(|e| Error::Io {
                what: "putting the terminal in raw mode",
                reason: os_message(&e),
            })?)
        } else {
            None
        };
        let stop = stop.try_clone().map_err(|e| Error::Io {
            what: "cloning an eventfd",
            reason: os_message(&e),
        })?;
        let handle =
            serial::spawn_input_thread(fd, is_tty, stop, self.serial.clone(), self.control.clone()).map_err(|e| {
                Error::Io {
                    what: "starting the serial input thread",
                    reason: os_message(&e),
                }
            })?;
        Ok((Some(handle), raw))
    }
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
        let boot_timer: SharedDevice = if config.boot_timer {
            Arc::new(Mutex::new(BootTimer::new(start)))
        } else {
            Arc::new(Mutex::new(Sink))
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
        pio.insert("cmos", CMOS_PORT, CMOS_LEN, Arc::new(Mutex::new(Cmos::default())))
            .map_err(bus_err)?;
        pio.insert("boot-timer", BOOT_TIMER_PORT, 1, boot_timer)
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
            serial_input,
        })
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP (so vCPU threads spawned afterwards inherit the mask)
/// and reads them through a signalfd; restores the old mask when dropped.
struct SignalGuard {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl SignalGuard {
    fn block_stop_signals() -> Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to sigset_t; signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask);
        }
        // SAFETY: valid sigset; -1 creates a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: restoring the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(Error::Io {
                what: "signalfd",
                reason: os_message(&e),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(SignalGuard { fd, old_mask })
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The next pending signal number, if any.
    fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading into a buffer of the right size.
        let n = unsafe { libc::read(self.fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        (n as usize == size).then_some(info.ssi_signo)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // Signals that arrived after we stopped listening are dropped, not delivered
        // with their default action: drain the fd before unblocking.
        while self.read().is_some() {}
        // SAFETY: restoring the mask saved when blocking.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
