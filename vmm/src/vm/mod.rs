//! A VM: built ([`build`]) from a [`VmConfig`] or from saved state, run to its end, and
//! its state saved ([`state`]) for snapshots and migration.

mod build;
mod signals;
pub mod state;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::Killable;

use crate::bus::{Bus, lock};
use crate::config::VmConfig;
use crate::control::{ExitReason, VmControl};
use crate::cpu::pause::ControlState;
use crate::cpu::vcpu;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::boot_timer::BootTimer;
use crate::devices::cmos::Cmos;
use crate::devices::i8042::I8042;
use crate::devices::serial::{self, RawTerminal, SerialDevice};
use crate::error::{Error, Result};
use crate::event_loop::EventLoop;
use crate::memory::GuestMemory;
use crate::os_error::os_message;
use crate::persist::RestoredTime;
use crate::virtio::mmio::MmioTransport;
use signals::SignalGuard;

/// Where serial input comes from, decided at build time.
enum SerialInput {
    None,
    /// stdin; `true` when it is a terminal (raw mode, Ctrl-A escape).
    Stdin,
    /// The unix socket the output goes to.
    Socket(OwnedFd),
}

/// The parts of a built VM that its vCPU threads, the control socket and a
/// [`state::StateHandle`] share: everything whose state a snapshot carries.
struct Machine {
    // Field order is drop order: the VM fd (which holds the memory slots) before RAM.
    vm_fd: VmFd,
    memory: GuestMemory,
    control: Arc<VmControl>,
    /// Pause/resume and vCPU state capture, shared with the vCPU threads.
    api: Arc<ControlState>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    boot_timer: Option<Arc<Mutex<BootTimer>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Set by [`Vm::restore`] until the guest runs (see [`RestoredTime`]).
    restored_time: Mutex<Option<RestoredTime>>,
}

/// A VM that is fully built (memory loaded, vCPUs configured) and ready to run.
pub struct Vm {
    config: VmConfig,
    // Field order is drop order: vCPUs go before the VM fd, the VM before KVM.
    vcpus: Vec<vcpu::Vcpu>,
    machine: Arc<Machine>,
    _kvm: Kvm,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    /// The device thread's loop, started by `run` (None: no virtio devices).
    event_loop: Option<EventLoop>,
    serial_input: SerialInput,
    /// Where to serve the control socket (`--api-socket`).
    api_socket: Option<std::path::PathBuf>,
}

impl Vm {
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
            Some(l) => Some(l.spawn(self.machine.control.clone()).map_err(|e| Error::Io {
                what: "starting the device thread",
                reason: os_message(&e),
            })?),
            None => None,
        };

        // From here the guest runs: its time moves on from what it was restored with.
        lock(&self.machine.restored_time).take();
        let ctx = Arc::new(vcpu::VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            control: self.machine.control.clone(),
            api: self.machine.api.clone(),
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
            self.machine
                .control
                .request_exit(ExitReason::Error(format!("cannot start a vCPU thread: {reason}")));
        }

        self.machine.api.set_vcpu_threads(
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
                    state: self.machine.api.clone(),
                    control: self.machine.control.clone(),
                    i8042: self.machine.i8042.clone(),
                    acpi_pm: self.machine.acpi_pm.clone(),
                },
            ) {
                Ok(server) => Some(server),
                Err(e) => {
                    self.machine.control.request_exit(ExitReason::Error(format!(
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
        let stop_requested = self.wait_for_exit(&signals) || self.machine.api.stop_requested();
        drop(api_server);
        self.machine.api.clear_vcpu_threads();

        // Teardown: every vCPU out of KVM_RUN and joined, input thread joined, terminal
        // restored (RawTerminal's drop), signal mask restored (SignalGuard's drop).
        self.machine.control.request_exit(ExitReason::Killed);
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
            .machine
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
                    fd: self.machine.control.exit_evt().as_raw_fd(),
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
                self.machine
                    .control
                    .request_exit(ExitReason::Error(format!("waiting for the VM: {}", os_message(&e))));
                return deadline.is_some();
            }
            if fds[0].revents != 0 || self.machine.control.is_stopping() {
                return deadline.is_some();
            }
            if fds[1].revents != 0
                && let Some(signo) = signals.read()
            {
                if deadline.is_some() || grace.is_zero() {
                    tracing::info!("signal {signo} again: stopping the VM hard");
                    self.machine.control.request_exit(ExitReason::Killed);
                    return true;
                }
                let mut pm = lock(&self.machine.acpi_pm);
                if pm.power_button_armed() {
                    tracing::info!("signal {signo}: pressing the ACPI power button, stopping hard in {grace:?}");
                    pm.press_power_button();
                } else {
                    tracing::info!(
                        "signal {signo}: guest has no ACPI power button handler, sending Ctrl-Alt-Del; \
                         stopping hard in {grace:?}"
                    );
                    lock(&self.machine.i8042).inject_ctrl_alt_del();
                }
                drop(pm);
                deadline = Some(Instant::now() + grace);
            }
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                tracing::warn!("guest did not stop within {:?}: stopping it hard", grace);
                self.machine.control.request_exit(ExitReason::Killed);
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
        let handle = serial::spawn_input_thread(
            fd,
            is_tty,
            stop,
            self.machine.serial.clone(),
            self.machine.control.clone(),
        )
        .map_err(|e| Error::Io {
            what: "starting the serial input thread",
            reason: os_message(&e),
        })?;
        Ok((Some(handle), raw))
    }
}
