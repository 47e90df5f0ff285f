//! `keel-image`: the operator's and CI's tool for Keel disk images.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_config::ByteSize;
use keel_image::build::{self, ImageInputs};
use keel_image::host_initramfs::HostInitramfs;
use keel_image::{bundle, flash, identity, initramfs, inspect, qemu, uki};

/// The default kernel command line of the host, from kernel-config/cmdline.
const DEFAULT_CMDLINE: &str = include_str!("../../kernel-config/cmdline");
/// Where kernel-config/fetch-host unpacks Debian's host kernel (`ci/setup` runs it).
const HOST_KERNEL_CACHE: &str = "/var/cache/keel/kernels/linux-image-amd64";
const EFI_DIR: &str = "/usr/lib/systemd/boot/efi";

#[derive(Parser)]
#[command(
    name = "keel-image",
    version,
    about = "Build, check, inspect and boot Keel appliance images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check appliance configs (keel.yaml) and report every error at once.
    #[command(after_help = "Examples:\n  keel-image validate configs/*.yaml\n  keel-image validate --json keel.yaml")]
    Validate {
        /// Print a machine-readable JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// Config files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON Schema of keel.yaml (for yaml-language-server and editors).
    #[command(
        after_help = "Example:\n  keel-image schema > keel.schema.json\n  # then in keel.yaml:  # yaml-language-server: $schema=keel.schema.json"
    )]
    Schema,
    /// Build a bootable appliance disk image from keel.yaml (no root needed).
    #[command(after_help = BUILD_HELP)]
    Build(Box<BuildArgs>),
    /// Show partitions, installed versions (with boot counters) and the config of an
    /// image or disk, and verify each UKI against its recorded sha256.
    #[command(
        after_help = "Examples:\n  keel-image inspect disk.img\n  keel-image inspect --json /dev/sdb | jq .esp.versions\n\nExit status: 0 all verified, 1 problems found (listed), 2 unreadable."
    )]
    Inspect {
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Boot an image in QEMU with UEFI firmware (OVMF); the serial console is this terminal.
    #[command(
        after_help = "Examples:\n  keel-image run disk.img\n  keel-image run disk.img --memory 2GiB --cpus 1 --snapshot\n  keel-image run disk.img --forward 8443:443 -- -d guest_errors\n  keel-image run disk.img --forward 8443:443 --open-network\n\nExit: Ctrl-A X. keel-image exits with QEMU's exit status.\nUses -accel tcg -cpu max unless /dev/kvm is real KVM (not PVM: /sys/module/kvm_pvm)."
    )]
    Run {
        image: PathBuf,
        /// Guest memory, e.g. 2GiB.
        #[arg(long, default_value = "4GiB")]
        memory: String,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Force the accelerator instead of detecting it.
        #[arg(long, value_parser = ["tcg", "kvm"])]
        accel: Option<String>,
        /// Throw away the disk's changes when QEMU exits.
        #[arg(long)]
        snapshot: bool,
        /// Forward a TCP port from 127.0.0.1:HOST to the appliance (HOST:GUEST); repeatable.
        #[arg(long = "forward", value_name = "HOST:GUEST")]
        forwards: Vec<String>,
        /// Let the forwarded NIC reach the network beyond the forwards (by default it is
        /// `restrict=on`: the appliance sees only its forwarded ports).
        #[arg(long, requires = "forwards")]
        open_network: bool,
        /// Print the QEMU command line and exit.
        #[arg(long)]
        print: bool,
        /// More QEMU arguments, after `--`.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Write an image to a disk, fsync, read it back and compare sha256.
    #[command(
        after_help = "Examples:\n  keel-image flash disk.img /dev/sdb\n  keel-image flash --yes disk.img /dev/disk/by-id/usb-SanDisk_...\n\nRefuses a mounted disk (or one with a mounted partition), swap, and a disk smaller than the image."
    )]
    Flash {
        image: PathBuf,
        device: PathBuf,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Generate an ed25519 key pair for signing update bundles.
    #[command(after_help = KEYGEN_HELP)]
    Keygen {
        /// Path prefix: writes PREFIX.key (secret, mode 0600) and PREFIX.pub.
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Sign an OS version (a UKI) into an update bundle for `keelctl update`.
    #[command(after_help = BUNDLE_HELP)]
    Bundle(BundleArgs),
    /// Check an update bundle: signature by KEY, manifest, size and sha256 of the UKI.
    #[command(
        after_help = "Examples:\n  keel-image verify update.keel --key release.pub\n  keel-image verify --json update.keel --key release.pub | jq .version\n\nExit status: 0 only for an intact bundle signed by that key."
    )]
    Verify {
        bundle: PathBuf,
        /// The public key (.pub file from `keel-image keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

const KEYGEN_HELP: &str = "\
Examples:
  keel-image keygen --output keys/release
  # then in keel.yaml, so images built from it accept bundles signed with it:
  #   update:
  #     trusted_keys:
  #       - ed25519:...   (the content of keys/release.pub)

Never overwrites an existing key. Keep PREFIX.key secret; PREFIX.pub may be published.";

const BUNDLE_HELP: &str = "\
Examples:
  keel-image bundle --image disk.img --key keys/release.key -o keel-1.2.0.keel
  keel-image bundle --uki keel-1.2.0.efi --version 1.2.0 --key keys/release.key -o update.keel
  keel-image bundle --image disk.img --key keys/release.key -o update.keel --min-version 1.1.0

--image takes the newest keel-*.efi from the image's ESP and its version from the UKI's
.osrel. The appliance refuses a bundle older than what it runs (unless
`keelctl update --allow-downgrade`) and, with --min-version, when it runs an older version.";

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["image", "uki"])))]
struct BundleArgs {
    /// A disk image built by `keel-image build`: bundle its UKI.
    #[arg(long)]
    image: Option<PathBuf>,
    /// A UKI file (needs --version, which must match its .osrel IMAGE_VERSION).
    #[arg(long, requires = "version")]
    uki: Option<PathBuf>,
    /// The UKI's version (with --uki).
    #[arg(long)]
    version: Option<String>,
    /// The secret key (.key file from `keel-image keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The bundle to write (replaced atomically).
    #[arg(long, short)]
    output: PathBuf,
    /// Appliances running an older version refuse this bundle.
    #[arg(long)]
    min_version: Option<String>,
    #[arg(long)]
    json: bool,
}

const BUILD_HELP: &str = "\
Examples:
  keel-image build --config configs/minimal.yaml --output disk.img
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) keel-image build --config keel.yaml -o disk.img --version 1.2.0
  keel-image build --config keel.yaml -o disk.img --initramfs my-initrd.cpio --kernel vmlinuz

Inputs and their defaults:
  --kernel        $KEEL_KERNEL_IMAGE, else Debian's kernel unpacked by ci/setup in /var/cache/keel/kernels
  --modules       $KEEL_KERNEL_MODULES, else that kernel's lib/modules/<version>
  --guest-kernel  $KEEL_GUEST_KERNEL (kernel-config/build-guest prints one)
  --bin-dir       directory of this program (holds static keel-init, keel-vmm, keelctl)

The image is sparse: KEEL-DATA is left empty for keel-init to format and grow on first
boot. The same inputs and SOURCE_DATE_EPOCH give a bit-identical image.";

#[derive(clap::Args)]
struct BuildArgs {
    /// The appliance config (keel.yaml); validated first.
    #[arg(long)]
    config: PathBuf,
    /// The disk image to write (replaced atomically).
    #[arg(long, short)]
    output: PathBuf,
    /// Disk size (KEEL-DATA takes what the ESP and KEEL-CONFIG leave).
    #[arg(long, default_value = "4GiB")]
    size: String,
    /// OS version, recorded in the UKI's .osrel and its file name.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// Host kernel command line (default: kernel-config/cmdline).
    #[arg(long)]
    cmdline: Option<String>,
    /// Host kernel (bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Host kernel modules directory (lib/modules/<version>, with modules.dep).
    #[arg(long)]
    modules: Option<PathBuf>,
    /// Which modules to include: a file in the format of kernel-config/modules.list
    /// (default: that file as it was when keel-image was built).
    #[arg(long)]
    modules_list: Option<PathBuf>,
    /// Default guest kernel (for `kernel: default`).
    #[arg(long)]
    guest_kernel: Option<PathBuf>,
    /// Default guest initramfs (for `initrd: default`); Keel's busybox userland when not given.
    #[arg(long)]
    guest_initrd: Option<PathBuf>,
    /// Static busybox for Keel's default guest initramfs (package busybox-static).
    #[arg(long, default_value = keel_image::guest_initramfs::DEFAULT_BUSYBOX)]
    busybox: PathBuf,
    /// Directory with static keel-init, keel-vmm and keelctl.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Use this initramfs as is instead of assembling one (then --modules, --guest-kernel
    /// and --bin-dir are not used).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// zstd level for the initramfs (1-19; 0 stores it uncompressed). Higher is smaller
    /// and slower to build; decompression at boot is fast at any level.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(0..=19))]
    zstd_level: i32,
    /// Where systemd-boot and the UKI stub are (package systemd-boot-efi).
    #[arg(long, default_value = EFI_DIR)]
    efi_dir: PathBuf,
    /// Print the build report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Put a file on KEEL-CONFIG beside keel.yaml, as NAME (repeatable), e.g. the bearer
    /// token `host.api.token_file` names: `--config-file api-token=./token`.
    #[arg(long = "config-file", value_name = "NAME=PATH")]
    config_files: Vec<String>,
    /// For test images only: put `startup.nsh` (`reset`) at the ESP's root, so that when
    /// systemd-boot exits to the firmware (a UKI it cannot start), QEMU's OVMF resets from
    /// its UEFI shell and the next try runs unattended. Not for appliances.
    #[arg(long)]
    firmware_reset_on_exit: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { json, files } => return keel_image::validate::run(&files, json),
        Command::Schema => return keel_image::validate::print_schema(),
        Command::Build(args) => cmd_build(*args),
        Command::Inspect { json, image } => cmd_inspect(&image, json),
        Command::Run {
            image,
            memory,
            cpus,
            accel,
            snapshot,
            forwards,
            open_network,
            print,
            extra,
        } => cmd_run(
            image,
            &memory,
            cpus,
            accel,
            snapshot,
            (forwards, open_network),
            print,
            extra,
        ),
        Command::Flash {
            image,
            device,
            yes,
            json,
        } => cmd_flash(&image, &device, yes, json),
        Command::Keygen { output, json } => cmd_keygen(&output, json),
        Command::Bundle(args) => cmd_bundle(args),
        Command::Verify { bundle, key, json } => cmd_verify(&bundle, &key, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel-image: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_size(what: &str, s: &str) -> Result<u64> {
    ByteSize::from_str(s)
        .map(ByteSize::bytes)
        .map_err(|e| anyhow::anyhow!("{what} {s:?}: {e}"))
}

fn progress_bar(len: u64, template: &str) -> ProgressBar {
    // Drawn on stderr only when it is a terminal; hidden in CI logs and pipes.
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    // Keep the spinner turning through long steps (compressing, writing).
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

fn cmd_build(args: BuildArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let bar = progress_bar(build::STEPS + 2, "{spinner} [{bar:24}] {pos}/{len} {msg}");
    bar.set_message("validating the config");
    let loaded = match keel_config::load_file(&args.config) {
        Ok(loaded) => loaded,
        Err(e) => {
            bar.finish_and_clear();
            // The error renders every diagnostic, one per line, with file:line:col.
            eprintln!("{e}");
            bail!("{} is not a valid config; nothing was built", args.config.display());
        }
    };
    let rendered = loaded.warnings.render(&args.config.display().to_string());
    if !rendered.trim().is_empty() {
        bar.suspend(|| eprint!("{rendered}"));
    }
    let config_yaml = read(&args.config, "config")?;
    let trusted_keys: Vec<String> = loaded
        .config
        .update
        .trusted_keys
        .iter()
        .map(|k| k.value.clone())
        .collect();
    if args.initramfs.is_some() && !trusted_keys.is_empty() {
        bar.suspend(|| {
            eprintln!(
                "warning: update.trusted_keys are not added to a prebuilt --initramfs; put them in its {} yourself",
                keel_image::host_initramfs::TRUSTED_KEYS
            )
        });
    }
    bar.inc(1);

    uki::validate_version(&args.version).map_err(anyhow::Error::msg)?;
    let disk_size = parse_size("--size", &args.size)?;
    let timestamp = identity::source_date_epoch().map_err(anyhow::Error::msg)?;
    let kernel_path = resolve_kernel(args.kernel.as_deref())?;

    bar.set_message("assembling the initramfs");
    let initramfs = match &args.initramfs {
        Some(path) => read(path, "initramfs")?,
        None => {
            let bin_dir = match &args.bin_dir {
                Some(d) => d.clone(),
                None => std::env::current_exe()
                    .context("locating keel-image to find keel-init next to it")?
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            };
            let guest_kernel = match args
                .guest_kernel
                .clone()
                .or_else(|| std::env::var_os("KEEL_GUEST_KERNEL").map(PathBuf::from))
            {
                Some(p) => p,
                None => bail!(
                    "no guest kernel: pass --guest-kernel PATH or set KEEL_GUEST_KERNEL (kernel-config/build-guest builds one)"
                ),
            };
            let mtime = u32::try_from(timestamp).unwrap_or(u32::MAX);
            let guest_initrd = match &args.guest_initrd {
                Some(path) => read(path, "guest initramfs")?,
                None => keel_image::guest_initramfs::build(&args.busybox, mtime)
                    .context("assembling the default guest initramfs")?,
            };
            let spec = HostInitramfs {
                bin_dir,
                modules_dir: resolve_modules(args.modules.as_deref())?,
                modules: match &args.modules_list {
                    Some(path) => initramfs::read_modules_list(path)?,
                    None => initramfs::parse_modules_list(
                        Path::new("kernel-config/modules.list"),
                        initramfs::DEFAULT_MODULES_LIST,
                    )?,
                },
                guest_kernel,
                guest_initrd,
                os_release: uki::os_release(&args.version),
                trusted_keys: trusted_keys.clone(),
                mtime,
            };
            let cpio = spec.build().context("assembling the initramfs")?;
            tracing::debug!(
                bytes = cpio.len(),
                ms = started.elapsed().as_millis(),
                "initramfs assembled"
            );
            cpio
        }
    };
    bar.inc(1);

    let config_files = read_config_files(&args.config_files)?;
    if let Some(api) = loaded.config.host.api.as_ref().map(|api| api.token_file.as_str())
        && !config_files.iter().any(|(name, _)| name.eq_ignore_ascii_case(api))
    {
        bar.suspend(|| {
            eprintln!(
                "warning: host.api reads its token from `{api}` on KEEL-CONFIG, which this build does not add; \
                 pass --config-file {api}=PATH or write it to KEEL-CONFIG before the first boot (until then the TCP API stays off)"
            )
        });
    }
    let inputs = ImageInputs {
        config_yaml,
        config_files,
        version: args.version.clone(),
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.trim().to_owned()),
        kernel: read(&kernel_path, "host kernel")?,
        initramfs,
        initramfs_zstd_level: (args.zstd_level > 0).then_some(args.zstd_level),
        efi_stub: read(
            &args.efi_dir.join("linuxx64.efi.stub"),
            "systemd EFI stub (package systemd-boot-efi)",
        )?,
        systemd_boot: read(
            &args.efi_dir.join("systemd-bootx64.efi"),
            "systemd-boot (package systemd-boot-efi)",
        )?,
        disk_size,
        timestamp,
        firmware_reset_on_exit: args.firmware_reset_on_exit,
    };
    let report = build::build_image(&inputs, &args.output, &bar)?;
    bar.finish_and_clear();
    let total = started.elapsed().as_secs_f64();
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["total_secs"] = serde_json::json!(total);
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "built {} in {total:.1} s: Keel {}, disk {} MiB (sparse, {:.1} MiB allocated), UKI {:.1} MiB sha256 {}",
            report.output.display(),
            report.version,
            report.disk_size >> 20,
            report.allocated_bytes as f64 / 1048576.0,
            report.uki_size as f64 / 1048576.0,
            report.uki_sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The unpacked Debian kernel tree that kernel-config/fetch-host left, with its version.
fn cached_host_kernel() -> Result<(PathBuf, String)> {
    let dir = std::fs::canonicalize(HOST_KERNEL_CACHE)
        .with_context(|| format!("{HOST_KERNEL_CACHE}: no host kernel; run ci/setup or pass --kernel and --modules"))?;
    let version = std::fs::read_to_string(dir.join(".kernel-version"))
        .with_context(|| format!("{}/.kernel-version (rerun kernel-config/fetch-host)", dir.display()))?;
    Ok((dir, version.trim().to_owned()))
}

fn resolve_kernel(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KEEL_KERNEL_IMAGE").map(PathBuf::from))
    {
        return Ok(p);
    }
    let (dir, version) = cached_host_kernel()?;
    Ok(dir.join("boot").join(format!("vmlinuz-{version}")))
}

fn resolve_modules(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = arg
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KEEL_KERNEL_MODULES").map(PathBuf::from))
    {
        return Ok(p);
    }
    let (dir, version) = cached_host_kernel()?;
    Ok(dir.join("lib/modules").join(version))
}

fn cmd_inspect(image: &Path, json: bool) -> Result<ExitCode> {
    let report = match inspect::inspect(image) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-image: error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", inspect::render(&report));
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[allow(clippy::too_many_arguments)]
fn cmd_run(
    image: PathBuf,
    memory: &str,
    cpus: u32,
    accel: Option<String>,
    snapshot: bool,
    (forwards, open_network): (Vec<String>, bool),
    print: bool,
    extra: Vec<String>,
) -> Result<ExitCode> {
    let mut opts = qemu::QemuOptions::new(image);
    opts.memory_mib = parse_size("--memory", memory)? >> 20;
    if opts.memory_mib < 128 {
        bail!("--memory {memory}: at least 128MiB");
    }
    opts.cpus = cpus.max(1);
    opts.accel = match accel.as_deref() {
        Some("kvm") => qemu::Accel::Kvm,
        Some(_) => qemu::Accel::Tcg,
        None => qemu::Accel::detect(),
    };
    opts.snapshot = snapshot;
    opts.forwards = forwards.iter().map(|f| f.parse()).collect::<Result<_, _>>()?;
    opts.open_network = open_network;
    opts.extra_args = extra.into_iter().map(Into::into).collect();
    if print {
        println!("{}", qemu::invocation(&opts)?.display());
        return Ok(ExitCode::SUCCESS);
    }
    let code = qemu::run(&opts)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

fn cmd_flash(image: &Path, device: &Path, yes: bool, json: bool) -> Result<ExitCode> {
    let target = flash::check_target(image, device)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "{} will be overwritten: pass --yes to confirm (stdin is not a terminal)",
                device.display()
            );
        }
        eprint!(
            "Overwrite {} ({} MiB) with {}? [y/N] ",
            device.display(),
            target.size >> 20,
            image.display()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not confirmed; nothing written");
        }
    }
    let bar = progress_bar(0, "{spinner} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} {msg}");
    let report = flash::flash(image, device, &bar)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "flashed {} bytes to {} in {:.1} s, read back and verified in {:.1} s (sha256 {})",
            report.bytes,
            report.target.display(),
            report.write_secs,
            report.verify_secs,
            report.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_keygen(prefix: &Path, json: bool) -> Result<ExitCode> {
    let pair = bundle::keygen(prefix)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pair)?);
    } else {
        println!(
            "wrote {} (secret, mode 0600) and {}\nadd to keel.yaml under update.trusted_keys:\n  - {}",
            pair.secret.display(),
            pair.public.display(),
            pair.public_key
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_bundle(args: BundleArgs) -> Result<ExitCode> {
    let key = bundle::read_secret_key(&args.key)?;
    if let Some(min) = &args.min_version {
        keel_config::slots::validate_version(min).map_err(|e| anyhow::anyhow!("--min-version: {e}"))?;
    }
    let uki = match (&args.image, &args.uki, &args.version) {
        (Some(image), None, None) => bundle::uki_from_image(image)?,
        (Some(_), None, Some(_)) => bail!("--version goes with --uki; with --image the version comes from the UKI"),
        (None, Some(uki), Some(version)) => bundle::uki_from_file(uki, version)?,
        _ => bail!("pass either --image disk.img or --uki FILE --version V"),
    };
    let created = identity::source_date_epoch().map_err(anyhow::Error::msg)?;
    let report = bundle::create(&uki, args.min_version.as_deref(), &key, created, &args.output)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {}: Keel {}, UKI {:.1} MiB sha256 {}, signed by {}",
            report.output.display(),
            report.manifest.version,
            report.manifest.uki_size as f64 / 1048576.0,
            report.manifest.uki_sha256,
            report.public_key
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_verify(path: &Path, key: &Path, json: bool) -> Result<ExitCode> {
    let public = bundle::read_public_key(key)?;
    let manifest = bundle::verify(path, &public)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!(
            "{}: OK, Keel {}{}, UKI {} bytes sha256 {}, signed by {}",
            path.display(),
            manifest.version,
            manifest
                .min_version
                .as_deref()
                .map(|m| format!(" (for {m} or newer)"))
                .unwrap_or_default(),
            manifest.uki_size,
            manifest.uki_sha256,
            key.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--config-file NAME=PATH` arguments, read.
fn read_config_files(args: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for arg in args {
        let Some((name, path)) = arg.split_once('=') else {
            bail!("--config-file {arg}: expected NAME=PATH, e.g. --config-file api-token=./token");
        };
        if name.is_empty() || name.contains('/') || name.eq_ignore_ascii_case("keel.yaml") {
            bail!("--config-file {arg}: NAME must be a plain file name other than keel.yaml");
        }
        files.push((name.to_owned(), read(Path::new(path), "--config-file")?));
    }
    Ok(files)
}
