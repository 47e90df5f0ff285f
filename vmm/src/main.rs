//! `keel-vmm`: boot one Linux guest under KVM. See `keel-vmm --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use keel_vmm::config::{DiskConfig, NetConfig};
use keel_vmm::{EXIT_ERROR, EXIT_USAGE, MemorySize, SerialOutput, Vm, VmConfig};

const AFTER_HELP: &str = "\
Examples:
  # Boot a kernel with an initramfs, 2 vCPUs and 1 GiB, console on this terminal
  keel-vmm --kernel /boot/vmlinuz --initrd initrd.img --cpus 2 --memory 1GiB

  # Quiet boot with the console in a file and the boot time on stderr
  keel-vmm --kernel vmlinux --cmdline 'console=ttyS0 reboot=k panic=1 quiet' \\
           --serial file:/var/log/guest.log --boot-timer

  # Supervised: console on the supervisor's socket, control socket for pause/stats
  keel-vmm --kernel vmlinux --serial unix:/run/keel/guests/web/console.sock \\
           --api-socket /run/keel/guests/web/vmm.sock

  # Two disks (the second read-only), a tap and an entropy device
  keel-vmm --kernel vmlinuz --initrd initrd.img --cmdline 'console=ttyS0 root=/dev/vda' \\
           --disk path=/var/lib/keel/root.img,serial=root \\
           --disk path=/srv/iso/data.img,readonly=on --net tap=tap0,mac=52:54:00:12:34:56 --rng

  # A tap the supervisor opened (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) and passed as fd 3
  keel-vmm --kernel vmlinuz --net fd=3 --disk path=disk.img,direct=on

  # Would keel-vmm start this VM? (limits, files; exit 0 or 1 with the reason)
  keel-vmm --check --kernel vmlinuz --cpus 32 --memory 1TiB

  # Everything from a JSON file (same fields as the flags; flags override it)
  keel-vmm --config guest.json
  #   {\"kernel\": \"/boot/vmlinuz\", \"initrd\": \"/boot/initrd\", \"cpus\": 2,
  #    \"memory\": \"512MiB\", \"serial\": \"unix:/run/keel/guest.sock\",
  #    \"cmdline\": \"console=ttyS0 reboot=k panic=1\", \"boot_timer\": false,
  #    \"shutdown_timeout_ms\": 10000, \"rng\": true,
  #    \"disks\": [{\"path\": \"root.img\", \"serial\": \"root\"}],
  #    \"nets\": [{\"tap\": \"tap0\", \"mac\": \"52:54:00:12:34:56\"}]}

Devices are virtio-mmio, announced both on the kernel command line
(virtio_mmio.device=..., for kernels with VIRTIO_MMIO_CMDLINE_DEVICES) and in the ACPI
DSDT (LNRO0005, for distribution kernels): disks first (vda, vdb, ...), then nets, then rng.

Console: with --serial stdio on a terminal, keys go to the guest; Ctrl-A x stops the VM.
Signals: SIGTERM/SIGINT/SIGHUP press the guest's ACPI power button when its OS listens
to it (else type Ctrl-Alt-Del); if it has not stopped after --shutdown-timeout seconds
(or on a second signal) the VM is stopped hard.

Exit codes:
  0  the guest powered off or halted, or stopped after SIGTERM
  1  VMM error (bad input, KVM failure, guest crashed its vCPU); one line on stderr
  2  usage error
  3  the guest asked to reboot (i8042 reset as with `reboot=k`, or a triple fault)
  4  stopped hard (grace period over, second signal, or Ctrl-A x)

Logging: RUST_LOG=error|warn|info|debug|trace|off (default info) sets the level of the
VMM's log on stderr. With a seccomp-blocked call the VMM exits 1 naming the call;
--no-seccomp runs without the filter.";

/// Boot one Linux guest under KVM (x86_64 direct boot).
#[derive(Debug, Parser)]
#[command(name = "keel-vmm", version, after_help = AFTER_HELP)]
#[command(group(ArgGroup::new("source").required(true).multiple(true).args(["kernel", "config"])))]
struct Cli {
    /// Kernel: bzImage (boot protocol >= 2.06) or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1 pci=off"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs (1 to 32) [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,
    /// Guest RAM, with a binary unit: 512MiB, 2GiB, ... [default: 512MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<MemorySize>,
    /// Serial console: stdio, file:PATH, unix:PATH (connects to a listening socket), none.
    #[arg(long, value_name = "TARGET", value_parser = parse_serial)]
    serial: Option<SerialOutput>,
    /// Log "boot-timer: guest ready N us after VMM start" when the guest writes 123 to
    /// port 0x3f0.
    #[arg(long)]
    boot_timer: bool,
    /// A virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,direct=on] (repeatable).
    #[arg(long, value_name = "OPTIONS", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net interface: tap=NAME or fd=N, [,mac=52:54:00:12:34:56] (repeatable).
    #[arg(long, value_name = "OPTIONS", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// A virtio-rng entropy device fed by getrandom(2).
    #[arg(long)]
    rng: bool,
    /// Run without the seccomp filter (to rule it out while debugging; see the exit codes).
    #[arg(long)]
    no_seccomp: bool,
    /// Seconds the guest gets to stop after SIGTERM's power button [default: 10].
    #[arg(long, value_name = "SECS")]
    shutdown_timeout: Option<f64>,
    /// Read the VM config from a JSON file; flags given as well override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the control socket (pause, resume, power button, stop, stats; one JSON
    /// line per request) at PATH while the VM runs.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Check the VM config (limits, files, devices) and exit: 0 when keel-vmm would
    /// start this VM, 1 with the reason otherwise. Nothing is allocated or opened
    /// beyond reading the config.
    #[arg(long)]
    check: bool,
}

fn parse_memory(s: &str) -> Result<MemorySize, String> {
    s.parse().map_err(|e: keel_vmm::config::ParseSizeError| e.to_string())
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse()
        .map_err(|e: keel_vmm::config::DeviceConfigError| e.to_string())
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
        .map_err(|e: keel_vmm::config::DeviceConfigError| e.to_string())
}

fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    s.parse().map_err(|e: keel_vmm::config::ParseSerialError| e.to_string())
}

impl Cli {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_json_file(path)?,
            // clap's group guarantees --kernel when there is no --config.
            None => VmConfig::new(self.kernel.clone().context("--kernel is required")?),
        };
        if let Some(kernel) = self.kernel {
            config.kernel = kernel;
        }
        if let Some(initrd) = self.initrd {
            config.initrd = Some(initrd);
        }
        if let Some(cmdline) = self.cmdline {
            config.cmdline = cmdline;
        }
        if let Some(cpus) = self.cpus {
            config.cpus = cpus;
        }
        if let Some(memory) = self.memory {
            config.memory = memory;
        }
        if let Some(serial) = self.serial {
            config.serial = serial;
        }
        if self.boot_timer {
            config.boot_timer = true;
        }
        // Devices on the command line come after those of the config file.
        config.disks.extend(self.disk);
        config.nets.extend(self.net);
        if self.rng {
            config.rng = true;
        }
        if self.no_seccomp {
            config.seccomp = false;
        }
        if let Some(secs) = self.shutdown_timeout {
            anyhow::ensure!(
                secs.is_finite() && secs >= 0.0,
                "--shutdown-timeout {secs}: expected a number of seconds, 0 or more"
            );
            config.shutdown_timeout_ms = (secs * 1000.0) as u64;
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    // First thing: the boot timer measures from here.
    let start = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    init_logging();
    match run(cli, start) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("keel-vmm: error: {e:#}");
            ExitCode::from(EXIT_ERROR as u8)
        }
    }
}

fn run(mut cli: Cli, start: Instant) -> anyhow::Result<i32> {
    let api_socket = cli.api_socket.take();
    let check = cli.check;
    let config = cli.into_config()?;
    if check {
        config.validate()?;
        println!(
            "keel-vmm: config OK: {} vCPUs, {} of memory, {} disks, {} NICs, a {}-byte command line",
            config.cpus,
            config.memory,
            config.disks.len(),
            config.nets.len(),
            config.cmdline.len()
        );
        return Ok(keel_vmm::EXIT_POWER_OFF);
    }
    let mut vm = Vm::build(&config, start)?;
    if let Some(path) = api_socket {
        vm = vm.with_api_socket(path);
    }
    let reason = vm.run()?;
    tracing::info!("guest ended: {reason:?}");
    Ok(reason.exit_code())
}

/// RUST_LOG is one level (error, warn, info, debug, trace, off); `info` when unset.
///
/// A level, not EnvFilter's per-module directives: keel-vmm logs from one crate, and
/// EnvFilter's regex engine is about a sixth of the static binary, all of it resident in
/// every VMM (measured with vmm/benches/boot.rs on the static binary: 3.36 → 2.73 MB, RSS
/// overhead 2.55 → 2.22 MiB).
fn init_logging() {
    let requested = std::env::var("RUST_LOG").ok();
    let level = match requested.as_deref().map(str::trim) {
        None | Some("") => Some(tracing_subscriber::filter::LevelFilter::INFO),
        Some(text) => text.parse().ok(),
    };
    tracing_subscriber::fmt()
        .with_max_level(level.unwrap_or(tracing_subscriber::filter::LevelFilter::INFO))
        .with_writer(std::io::stderr)
        // Colour only for a person: a supervisor reading the pipe parses the level word.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    if level.is_none() {
        tracing::warn!(
            "RUST_LOG={:?} is not a level (error, warn, info, debug, trace, off): logging at info",
            requested.unwrap_or_default()
        );
    }
}
