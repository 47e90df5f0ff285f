//! `keel-image build`: one appliance disk image from its parts, without root, loop
//! devices or mounts.
//!
//! The image file is created next to the output as a sparse temporary file, written
//! (GPT, ESP, KEEL-CONFIG; KEEL-DATA stays zero for PID 1 to format on first boot),
//! fsynced and renamed over the output, so a failed build never leaves a half image
//! under the final name.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::fat::{self, FatTree, VolumeParams, VolumeStats};
use crate::gpt_layout::{self, DiskIds, Layout};
use crate::identity::{BuildSeed, sha256_hex};
use crate::uki;

/// `loader.conf`: boot the first entry at once (`timeout 0`). No `default` line: a
/// pinned default would defeat boot counting (systemd-boot would keep booting a
/// failed version). `editor no`: an appliance's kernel command line is not edited at
/// the boot menu.
pub const LOADER_CONF: &str = "timeout 0\neditor no\n";

/// Where the ESP records each installed UKI's hash (see `Manifest`).
pub use keel_config::slots::RECORDS_DIR as MANIFEST_DIR;

/// `--firmware-reset-on-exit` (test images only): the UEFI shell script at the ESP's
/// root and its content. When systemd-boot cannot start an entry (a damaged UKI) it
/// spends the try and exits to the firmware; OVMF then falls through to its UEFI shell,
/// which runs `startup.nsh` from the ESP after a short countdown, and `reset` starts
/// the boot over, so the next try (or the fallback) runs unattended. Real firmware
/// moves on to its next boot option instead; appliance images do not carry a script
/// that the firmware's shell would run.
pub const FIRMWARE_RESET_SCRIPT: &str = "startup.nsh";
pub const FIRMWARE_RESET_NSH: &str = "reset\r\n";

/// Everything that goes into an image. Paths are resolved and files read by the caller.
#[derive(Debug, Clone)]
pub struct ImageInputs {
    /// keel.yaml as written to KEEL-CONFIG (already validated by the caller).
    pub config_yaml: Vec<u8>,
    /// More files for KEEL-CONFIG beside keel.yaml (name, contents), e.g. the token file
    /// `host.api` names.
    pub config_files: Vec<(String, Vec<u8>)>,
    pub version: String,
    pub cmdline: String,
    /// The host kernel (bzImage with EFI stub).
    pub kernel: Vec<u8>,
    /// The initramfs (newc cpio, possibly compressed).
    pub initramfs: Vec<u8>,
    /// zstd level to compress an uncompressed (newc) initramfs with; `None` keeps it as is.
    pub initramfs_zstd_level: Option<i32>,
    /// systemd's `linuxx64.efi.stub`.
    pub efi_stub: Vec<u8>,
    /// systemd-boot (`systemd-bootx64.efi`).
    pub systemd_boot: Vec<u8>,
    pub disk_size: u64,
    /// Seconds since 1970 for every timestamp in the image (`SOURCE_DATE_EPOCH`).
    pub timestamp: i64,
    /// Test images: write [`FIRMWARE_RESET_SCRIPT`] so OVMF resets when systemd-boot
    /// exits to it.
    pub firmware_reset_on_exit: bool,
}

/// The record of one UKI kept on the ESP as `keel/manifests/keel-<version>.json`: the
/// update agent's record type, so the first version's record (written here) and those of
/// installed updates are one format. `inspect` verifies each UKI against it. It lives on
/// the ESP because it belongs to the UKI: installed, replaced and pruned with it, and out
/// of KEEL-CONFIG, which the operator edits.
pub use keel_config::slots::EspRecord as Manifest;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Version(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Layout(#[from] gpt_layout::LayoutError),
    #[error("assembling the UKI: {0}")]
    Uki(#[from] uki::UkiError),
    #[error("{volume}: {source}")]
    Fat {
        volume: &'static str,
        source: fat::FatError,
    },
    #[error(
        "KEEL-ESP: the UKI is {uki} bytes; the ESP keeps {free} bytes free after it, less than the {need} bytes an update needs (one more UKI plus room)"
    )]
    EspTooSmall { uki: u64, free: u64, need: u64 },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("compressing the initramfs with zstd: {0}")]
    Compress(std::io::Error),
    #[error("{}: exists and is not a regular file; to write a device use `keel-image flash`", .0.display())]
    OutputNotAFile(PathBuf),
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub output: PathBuf,
    pub version: String,
    pub disk_size: u64,
    /// Bytes of disk the sparse image file occupies (`du`): the image's real size.
    pub allocated_bytes: u64,
    pub uki_size: u64,
    pub uki_sha256: String,
    pub disk_guid: String,
    pub esp_free_bytes: u64,
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The UKI's file name for a version (no boot counter: the first version is blessed).
pub fn uki_file_name(version: &str) -> String {
    format!("keel-{version}.efi")
}

/// The magic of an uncompressed newc cpio archive.
const NEWC_MAGIC: &[u8] = b"070701";

/// The initramfs as it goes into the UKI: an uncompressed newc archive is compressed with
/// zstd when a level is given (single-threaded, so the bytes depend only on the input
/// and level). The kernel recognizes the format by its magic; a compressed or other
/// input is passed through.
pub fn initramfs_payload(inputs: &ImageInputs) -> Result<std::borrow::Cow<'_, [u8]>, BuildError> {
    match inputs.initramfs_zstd_level {
        Some(level) if inputs.initramfs.starts_with(NEWC_MAGIC) => zstd::bulk::compress(&inputs.initramfs, level)
            .map(std::borrow::Cow::Owned)
            .map_err(BuildError::Compress),
        _ => Ok(std::borrow::Cow::Borrowed(&inputs.initramfs)),
    }
}

/// Assembles the UKI for `inputs`.
pub fn assemble_uki(inputs: &ImageInputs) -> Result<Vec<u8>, BuildError> {
    uki::validate_version(&inputs.version).map_err(BuildError::Version)?;
    let cmdline = inputs.cmdline.trim();
    if cmdline.is_empty() || cmdline.contains('\n') || cmdline.contains('\0') {
        return Err(BuildError::Cmdline("must be one non-empty line".into()));
    }
    let osrel = uki::os_release(&inputs.version);
    let initramfs = initramfs_payload(inputs)?;
    Ok(uki::assemble(
        &inputs.efi_stub,
        &[
            (".osrel", osrel.as_bytes()),
            (".cmdline", cmdline.as_bytes()),
            (".linux", &inputs.kernel),
            (".initrd", &initramfs),
        ],
    )?)
}

/// Builds the image at `output`. `progress` advances by one per step (see `STEPS`).
pub fn build_image(inputs: &ImageInputs, output: &Path, progress: &ProgressBar) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Io { path, source }
    };
    if let Ok(meta) = std::fs::metadata(output)
        && !meta.is_file()
    {
        return Err(BuildError::OutputNotAFile(output.to_owned()));
    }
    let layout = Layout::plan(inputs.disk_size)?;

    progress.set_message("assembling the UKI");
    let uki_bytes = assemble_uki(inputs)?;
    let uki_sha256 = sha256_hex(&uki_bytes);
    tracing::debug!(
        bytes = uki_bytes.len(),
        ms = started.elapsed().as_millis(),
        "UKI assembled"
    );
    progress.inc(1);

    let seed = BuildSeed::from_inputs(&[
        ("version", inputs.version.as_bytes()),
        ("disk size", &inputs.disk_size.to_le_bytes()),
        ("timestamp", &inputs.timestamp.to_le_bytes()),
        ("config", &inputs.config_yaml),
        // The UKI (kernel, initramfs, command line, os-release) by its hash: hashing
        // 25+ MB twice would cost more than the rest of the seed.
        ("uki sha256", uki_sha256.as_bytes()),
        ("systemd-boot", &inputs.systemd_boot),
    ]);

    progress.set_message("laying out the ESP");
    let manifest = Manifest {
        format: 1,
        version: inputs.version.clone(),
        uki: format!("EFI/Linux/{}", uki_file_name(&inputs.version)),
        sha256: uki_sha256.clone(),
        size: uki_bytes.len() as u64,
        cmdline: inputs.cmdline.trim().to_owned(),
        config_sha256: sha256_hex(&inputs.config_yaml),
        source_date_epoch: inputs.timestamp,
    };
    let mut manifest_json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    manifest_json.push(b'\n');
    let uki_size = uki_bytes.len() as u64;
    let fat_err = |volume| move |source| BuildError::Fat { volume, source };
    let mut esp = FatTree::new();
    esp.add_file("EFI/BOOT/BOOTX64.EFI", inputs.systemd_boot.clone())
        .map_err(fat_err("KEEL-ESP"))?;
    esp.add_file("EFI/systemd/systemd-bootx64.efi", inputs.systemd_boot.clone())
        .map_err(fat_err("KEEL-ESP"))?;
    esp.add_file(&manifest.uki, uki_bytes).map_err(fat_err("KEEL-ESP"))?;
    esp.add_file("loader/loader.conf", LOADER_CONF.as_bytes().to_vec())
        .map_err(fat_err("KEEL-ESP"))?;
    esp.add_file(&keel_config::slots::record_path(&inputs.version), manifest_json)
        .map_err(fat_err("KEEL-ESP"))?;
    if inputs.firmware_reset_on_exit {
        esp.add_file(FIRMWARE_RESET_SCRIPT, FIRMWARE_RESET_NSH.as_bytes().to_vec())
            .map_err(fat_err("KEEL-ESP"))?;
    }
    let mut config = FatTree::new();
    config
        .add_file("keel.yaml", inputs.config_yaml.clone())
        .map_err(fat_err("KEEL-CONFIG"))?;
    for (name, data) in &inputs.config_files {
        config.add_file(name, data.clone()).map_err(fat_err("KEEL-CONFIG"))?;
    }
    progress.inc(1);

    // A sparse file in the output's directory, renamed into place when complete.
    progress.set_message("writing the partition table");
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".keel-image-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(io_err(&dir))?;
    let tmp_path = tmp.path().to_owned();
    let mut file = tmp.reopen().map_err(io_err(&tmp_path))?;
    file.set_len(inputs.disk_size).map_err(io_err(&tmp_path))?;
    let ids = DiskIds {
        disk: seed.uuid("disk"),
        partitions: layout
            .partitions()
            .map(|p| seed.uuid(&format!("partition {}", p.label))),
    };
    gpt_layout::write_gpt(&mut file, &layout, &ids)?;
    tracing::debug!(ms = started.elapsed().as_millis(), "GPT written");
    progress.inc(1);

    progress.set_message("writing KEEL-ESP (FAT32)");
    let esp_stats = write_fat(&mut file, &layout.esp, &seed, inputs.timestamp, &esp)?;
    let need = 2 * uki_size + 8 * gpt_layout::MIB;
    if esp_stats.free_bytes() < need {
        return Err(BuildError::EspTooSmall {
            uki: uki_size,
            free: esp_stats.free_bytes(),
            need,
        });
    }
    progress.inc(1);
    progress.set_message("writing KEEL-CONFIG (FAT32)");
    write_fat(&mut file, &layout.config, &seed, inputs.timestamp, &config)?;
    tracing::debug!(ms = started.elapsed().as_millis(), "FAT volumes written");
    progress.inc(1);

    progress.set_message("syncing");
    file.sync_all().map_err(io_err(&tmp_path))?;
    drop(file);
    let written = tmp.persist(output).map_err(|e| BuildError::Io {
        path: output.to_owned(),
        source: e.error,
    })?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    let allocated_bytes = allocated_bytes(&written).map_err(io_err(output))?;
    progress.inc(1);

    Ok(BuildReport {
        output: output.to_owned(),
        version: inputs.version.clone(),
        disk_size: inputs.disk_size,
        allocated_bytes,
        uki_size,
        uki_sha256,
        disk_guid: ids.disk.to_string(),
        esp_free_bytes: esp_stats.free_bytes(),
        elapsed: started.elapsed(),
    })
}

/// Steps `build_image` reports through its progress bar.
pub const STEPS: u64 = 6;

fn write_fat(
    file: &mut std::fs::File,
    part: &gpt_layout::PartitionPlan,
    seed: &BuildSeed,
    timestamp: i64,
    tree: &FatTree,
) -> Result<VolumeStats, BuildError> {
    let params = VolumeParams {
        size: part.size(),
        label: part.label.to_owned(),
        volume_id: seed.volume_id(&format!("volume {}", part.label)),
        timestamp,
        hidden_sectors: u32::try_from(part.first_lba).unwrap_or(u32::MAX),
    };
    // Buffer the many small writes of the FAT metadata.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut *file);
    let stats = fat::write_volume(&mut out, part.offset(), &params, tree).map_err(|source| BuildError::Fat {
        volume: part.label,
        source,
    })?;
    Ok(stats)
}

#[cfg(unix)]
fn allocated_bytes(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(not(unix))]
fn allocated_bytes(file: &std::fs::File) -> std::io::Result<u64> {
    Ok(file.metadata()?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(initramfs: &[u8], level: Option<i32>) -> ImageInputs {
        ImageInputs {
            config_yaml: Vec::new(),
            config_files: Vec::new(),
            version: "1.0.0".into(),
            cmdline: "quiet".into(),
            kernel: Vec::new(),
            initramfs: initramfs.to_vec(),
            initramfs_zstd_level: level,
            efi_stub: Vec::new(),
            systemd_boot: Vec::new(),
            disk_size: 0,
            timestamp: 0,
            firmware_reset_on_exit: false,
        }
    }

    #[test]
    fn newc_initramfs_is_zstd_compressed_and_round_trips() {
        let mut cpio = b"070701".to_vec();
        cpio.extend(std::iter::repeat_n(b"0123456789abcdef".as_slice(), 4096).flatten());
        let i = inputs(&cpio, Some(6));
        let packed = initramfs_payload(&i).expect("compress").into_owned();
        assert_eq!(&packed[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        assert!(packed.len() < cpio.len() / 10);
        assert_eq!(zstd::bulk::decompress(&packed, cpio.len()).expect("decompress"), cpio);
        assert_eq!(
            initramfs_payload(&i).expect("again").as_ref(),
            packed.as_slice(),
            "deterministic"
        );
    }

    #[test]
    fn other_initramfs_bytes_pass_through() {
        let gz = [0x1f, 0x8b, 8, 0, 1, 2, 3];
        assert_eq!(
            initramfs_payload(&inputs(&gz, Some(6))).expect("as is").as_ref(),
            gz.as_slice()
        );
        assert_eq!(
            initramfs_payload(&inputs(b"070701xyz", None)).expect("as is").as_ref(),
            b"070701xyz"
        );
    }
}
