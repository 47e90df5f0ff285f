//! `keel-image`: the operator's and CI's tool for Keel disk images.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_config::ByteSize;
use keel_image::build::{self, ImageInputs};
use keel_image::host_initramfs::HostInitramfs;
mod cli;

use cli::{BuildArgs, BundleArgs, Cli, Command};
use keel_image::{bundle, flash, identity, initramfs, inspect, qemu, uki};

/// The default kernel command line of the host, from kernel-config/cmdline.
const DEFAULT_CMDLINE: &str = include_str!("../../kernel-config/cmdline");
/// Where kernel-config/fetch-host unpacks Debian's host kernel (`ci/setup` runs it).
const HOST_KERNEL_CACHE: &str = "/var/cache/keel/kernels/linux-image-amd64";

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
    cpus: Option<u32>,
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
    opts.accel = match accel.as_deref() {
        Some("kvm") => qemu::Accel::Kvm,
        Some(_) => qemu::Accel::Tcg,
        None => qemu::Accel::detect(),
    };
    opts.cpus = cpus.unwrap_or(opts.accel.default_cpus()).max(1);
    if opts.accel == qemu::Accel::Tcg && opts.cpus > 1 {
        eprintln!(
            "keel-image: warning: --cpus {} under TCG: the appliance kernel's live code patching \
             (KVM's first VM created, last destroyed) can wedge all vCPUs under multi-threaded \
             TCG; drop --cpus for the safe default of 1",
            opts.cpus
        );
    }
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
