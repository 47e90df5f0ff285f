//! keel-image's command line: the subcommands, their arguments and their `--help` texts.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where Debian's systemd-boot-efi puts the systemd-boot and stub binaries.
const EFI_DIR: &str = "/usr/lib/systemd/boot/efi";

#[derive(Parser)]
#[command(
    name = "keel-image",
    version,
    about = "Build, check, inspect and boot Keel appliance images"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        after_help = "Examples:\n  keel-image run disk.img\n  keel-image run disk.img --memory 2GiB --snapshot\n  keel-image run disk.img --forward 8443:443 -- -d guest_errors\n  keel-image run disk.img --forward 8443:443 --open-network\n\nExit: Ctrl-A X. keel-image exits with QEMU's exit status.\nUses -accel tcg -cpu max unless /dev/kvm is real KVM (not PVM: /sys/module/kvm_pvm)."
    )]
    Run {
        image: PathBuf,
        /// Guest memory, e.g. 2GiB.
        #[arg(long, default_value = "4GiB")]
        memory: String,
        /// vCPUs [default: 1 under TCG, 2 under KVM; more than 1 under TCG can wedge the
        /// appliance's kernel, see `keel_image::qemu::Accel::default_cpus`].
        #[arg(long)]
        cpus: Option<u32>,
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
pub(crate) struct BundleArgs {
    /// A disk image built by `keel-image build`: bundle its UKI.
    #[arg(long)]
    pub(crate) image: Option<PathBuf>,
    /// A UKI file (needs --version, which must match its .osrel IMAGE_VERSION).
    #[arg(long, requires = "version")]
    pub(crate) uki: Option<PathBuf>,
    /// The UKI's version (with --uki).
    #[arg(long)]
    pub(crate) version: Option<String>,
    /// The secret key (.key file from `keel-image keygen`).
    #[arg(long)]
    pub(crate) key: PathBuf,
    /// The bundle to write (replaced atomically).
    #[arg(long, short)]
    pub(crate) output: PathBuf,
    /// Appliances running an older version refuse this bundle.
    #[arg(long)]
    pub(crate) min_version: Option<String>,
    #[arg(long)]
    pub(crate) json: bool,
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
pub(crate) struct BuildArgs {
    /// The appliance config (keel.yaml); validated first.
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The disk image to write (replaced atomically).
    #[arg(long, short)]
    pub(crate) output: PathBuf,
    /// Disk size (KEEL-DATA takes what the ESP and KEEL-CONFIG leave).
    #[arg(long, default_value = "4GiB")]
    pub(crate) size: String,
    /// OS version, recorded in the UKI's .osrel and its file name.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub(crate) version: String,
    /// Host kernel command line (default: kernel-config/cmdline).
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// Host kernel (bzImage).
    #[arg(long)]
    pub(crate) kernel: Option<PathBuf>,
    /// Host kernel modules directory (lib/modules/<version>, with modules.dep).
    #[arg(long)]
    pub(crate) modules: Option<PathBuf>,
    /// Which modules to include: a file in the format of kernel-config/modules.list
    /// (default: that file as it was when keel-image was built).
    #[arg(long)]
    pub(crate) modules_list: Option<PathBuf>,
    /// Default guest kernel (for `kernel: default`).
    #[arg(long)]
    pub(crate) guest_kernel: Option<PathBuf>,
    /// Default guest initramfs (for `initrd: default`); Keel's busybox userland when not given.
    #[arg(long)]
    pub(crate) guest_initrd: Option<PathBuf>,
    /// Static busybox for Keel's default guest initramfs (package busybox-static).
    #[arg(long, default_value = keel_image::guest_initramfs::DEFAULT_BUSYBOX)]
    pub(crate) busybox: PathBuf,
    /// Directory with static keel-init, keel-vmm and keelctl.
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// Use this initramfs as is instead of assembling one (then --modules, --guest-kernel
    /// and --bin-dir are not used).
    #[arg(long)]
    pub(crate) initramfs: Option<PathBuf>,
    /// zstd level for the initramfs (1-19; 0 stores it uncompressed). Higher is smaller
    /// and slower to build; decompression at boot is fast at any level.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub(crate) zstd_level: i32,
    /// Where systemd-boot and the UKI stub are (package systemd-boot-efi).
    #[arg(long, default_value = EFI_DIR)]
    pub(crate) efi_dir: PathBuf,
    /// Print the build report as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Put a file on KEEL-CONFIG beside keel.yaml, as NAME (repeatable), e.g. the bearer
    /// token `host.api.token_file` names: `--config-file api-token=./token`.
    #[arg(long = "config-file", value_name = "NAME=PATH")]
    pub(crate) config_files: Vec<String>,
    /// For test images only: put `startup.nsh` (`reset`) at the ESP's root, so that when
    /// systemd-boot exits to the firmware (a UKI it cannot start), QEMU's OVMF resets from
    /// its UEFI shell and the next try runs unattended. Not for appliances.
    #[arg(long)]
    pub(crate) firmware_reset_on_exit: bool,
}
