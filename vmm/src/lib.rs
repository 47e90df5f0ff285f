//! keel-vmm: Keel's KVM virtual machine monitor, one process per guest.
//!
//! x86_64 direct Linux boot (bzImage with boot protocol >= 2.06, or ELF vmlinux) with an
//! initramfs and command line; 1 to 32 vCPUs announced through an MP table; an in-kernel
//! irqchip and PIT; an 8250 UART on 0x3f8/IRQ 4; an i8042 whose reset line ends the VM;
//! a CMOS RTC; a Firecracker-style boot timer on port 0x3f0; ACPI tables (MADT, FADT
//! with a fixed power button, DSDT built with `acpi_tables`).
//!
//! Devices ([`virtio`]): virtio-mmio (VIRTIO 1.x) block, net (tap) and rng, up to 16,
//! announced on the kernel command line and in the DSDT (`LNRO0005`). Queue
//! notifications arrive through ioeventfds and are served on one device thread
//! ([`event_loop`]); interrupts go out through irqfds. On SIGTERM the VMM presses the
//! ACPI power button when the guest listens to it, and types Ctrl-Alt-Del otherwise.
//! While the VM runs, a seccomp filter ([`seccomp`]) limits the VMM to the system calls
//! it needs after setup.
//!
//! ```no_run
//! use keel_vmm::{Vm, VmConfig};
//! let mut config = VmConfig::new("/boot/vmlinuz");
//! config.cpus = 2;
//! let reason = Vm::build(&config, std::time::Instant::now())?.run()?;
//! std::process::exit(reason.exit_code());
//! # Ok::<(), keel_vmm::Error>(())
//! ```
//!
//! # Exit codes of the `keel-vmm` binary
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the guest powered off or halted for good, or it stopped after SIGTERM (power button / Ctrl-Alt-Del) |
//! | 1 | VMM error: bad input, KVM failure, or the guest crashed its vCPU (one line on stderr says which) |
//! | 2 | usage error on the command line |
//! | 3 | the guest asked to reboot (i8042 reset, e.g. `reboot` with `reboot=k`, or a triple fault) |
//! | 4 | stopped hard: the guest ignored SIGTERM's power button / Ctrl-Alt-Del for the grace period, a second signal came, or `Ctrl-A x` was typed on the console |

pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device_config;
pub mod device_counters;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod memory;
pub mod os_error;
pub mod persist;
pub mod seccomp;
pub mod state_error;
pub mod types;
pub mod virtio;
pub mod vm;

pub use config::{MemorySize, SerialOutput, VmConfig};
pub use control::{EXIT_ERROR, EXIT_KILLED, EXIT_POWER_OFF, EXIT_REBOOT, EXIT_USAGE, ExitReason};
pub use error::{Error, Result};
pub use vm::Vm;
