//! Installing a bundle on the ESP, power-safe.
//!
//! The order of writes is what keeps the appliance bootable whatever moment the
//! power goes:
//!
//! 1. Nothing is written until the bundle's signature verified and the version
//!    checks (downgrade, minimum version, a blessed running version to fall back
//!    to) passed.
//! 2. The UKI streams into `EFI/Linux/.keel-<v>.efi.partial`, a name systemd-boot
//!    never boots (leading dot, not `.efi`), while it is hashed.
//! 3. Only when the whole payload matched its signed sha256 and size: fsync the
//!    file, write the version's record (`keel/manifests/keel-<v>.json`, temp +
//!    rename), remove earlier installs that never booted, rename the partial file
//!    to `keel-<v>+3.efi`, fsync the directory.
//!
//! A power cut before the rename leaves a dot-file that the next install removes;
//! systemd-boot boots the running (blessed) version. After the rename the new
//! version is complete. Any failure removes the partial file before returning.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::bundle::{self, BundleError};
use super::slots::{self, EFI_LINUX, PARTIAL_PREFIX, PARTIAL_SUFFIX, RECORDS_DIR, Slot, SlotName};
use super::{FsError, rename_durably, sync_dir, sync_renamed};

/// Room kept free beyond the UKI itself (the record, FAT metadata, rounding).
pub const SPACE_MARGIN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("the bundle holds version {0}, which is already running; nothing to do")]
    SameVersion(String),
    #[error(
        "the bundle holds version {offered}, older than the running {running}; refused (pass --allow-downgrade to install it anyway)"
    )]
    Downgrade { running: String, offered: String },
    #[error(
        "the bundle (version {offered}) applies only to appliances running {min} or newer; this one runs {running}: install an intermediate version first"
    )]
    TooOld {
        running: String,
        offered: String,
        min: String,
    },
    #[error(
        "the running version {0} has no UKI in EFI/Linux on the ESP, so nothing known-good would boot if the new version failed; refusing to install (is the ESP mounted?)"
    )]
    RunningNotOnEsp(String),
    #[error(
        "the running version is still on trial ({0}, not yet blessed): wait until it is found healthy, or roll back, then update"
    )]
    RunningOnTrial(String),
    #[error(
        "the ESP has {free} bytes free, the update needs {need}: remove old versions (`keelctl rollback` then bless) or rebuild with a larger ESP"
    )]
    NoSpace { free: u64, need: u64 },
    #[error(transparent)]
    Fs(#[from] FsError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Fs(FsError::new(path, source))
}

pub use keel_config::slots::EspRecord;

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub version: String,
    /// `EFI/Linux/keel-<version>+3.efi`.
    pub file: String,
    pub sha256: String,
    pub size: u64,
    /// Files removed from `EFI/Linux` (superseded installs, failed versions, or
    /// partial files of an interrupted update).
    pub removed: Vec<String>,
    /// On a downgrade, the running version's new name (`+0`): it would otherwise
    /// keep booting first, being newer.
    pub demoted: Option<String>,
}

/// What an install is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The mounted ESP's root.
    pub esp: &'a Path,
    /// IMAGE_VERSION of the running OS.
    pub running_version: &'a str,
    pub allow_downgrade: bool,
}

/// Verifies a bundle streamed from `reader` and installs its UKI as
/// `EFI/Linux/keel-<version>+3.efi` on the ESP at `esp`. On any error nothing new
/// carries a `keel-*.efi` name.
pub fn apply_stream<R: Read>(
    reader: R,
    trusted_keys: &[VerifyingKey],
    esp: &Path,
    running_version: &str,
    allow_downgrade: bool,
) -> Result<Installed, InstallError> {
    let target = Target {
        esp,
        running_version,
        allow_downgrade,
    };
    apply_stream_with_progress(reader, trusted_keys, target, |_, _| {})
}

/// [`apply_stream`] that reports `(payload bytes written, payload size)` as it goes.
pub fn apply_stream_with_progress<R: Read>(
    reader: R,
    trusted_keys: &[VerifyingKey],
    target: Target<'_>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Installed, InstallError> {
    let payload = bundle::read_header(reader, trusted_keys)?;
    let manifest = payload.manifest().clone();
    check_versions(&manifest, target)?;
    let esp = target.esp;
    let linux_dir = esp.join(EFI_LINUX);
    let slots = slots::list(esp).map_err(io_err(&linux_dir))?;
    let running = running_slot(&slots, target.running_version)?;
    info!(
        version = manifest.version,
        size = manifest.uki_size,
        running = running.file,
        "update bundle signature verified; installing"
    );

    let superseded: Vec<&Slot> = slots
        .iter()
        .filter(|s| s.name.version != target.running_version)
        .filter(|s| s.name.version == manifest.version || s.name.is_on_trial())
        .collect();
    let mut removed = Vec::new();
    for partial in slots::list_partial(esp).map_err(io_err(&linux_dir))? {
        let path = linux_dir.join(&partial);
        warn!("removing {}, left by an interrupted update", path.display());
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(format!("{EFI_LINUX}/{partial}"));
    }
    make_room(esp, &slots, running, &manifest, &superseded, &mut removed)?;

    // Stream into the partial file; `Partial` removes it on every early return.
    let (partial, file) = Partial::create(&linux_dir, &manifest.version)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let size = manifest.uki_size;
    let mut last_logged = 0;
    let verified = payload.copy_to(&mut out, |done| {
        progress(done, size);
        // A line per quarter on the console; the client shows the fine-grained bar.
        if done * 4 / size > last_logged {
            last_logged = done * 4 / size;
            debug!("update: {done} of {size} bytes written");
        }
    });
    let file = match verified {
        Ok(_) => out.into_inner().map_err(|e| io_err(&partial.path)(e.into_error()))?,
        Err(e) => {
            drop(out);
            return Err(e.into());
        }
    };
    file.sync_all().map_err(io_err(&partial.path))?;
    drop(file);

    write_record(esp, &manifest, target.running_version)?;
    for slot in &superseded {
        let path = linux_dir.join(&slot.file);
        if path.exists() {
            info!("removing {}: replaced by this install", slot.esp_path());
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(slot.esp_path());
        }
    }
    let final_name = SlotName::fresh(&manifest.version).file_name();
    partial.persist(&final_name)?;
    info!("installed {EFI_LINUX}/{final_name} ({} tries)", slots::INITIAL_TRIES);

    // A downgrade boots only if the newer running version no longer sorts first:
    // mark it as out of tries. It still boots if the older one fails all its tries
    // (systemd-boot falls back to entries without tries when nothing else is left).
    let mut demoted = None;
    if slots::compare_versions(&manifest.version, target.running_version).is_lt() {
        let to = running.name.failed().file_name();
        rename_durably(&linux_dir, &running.file, &to)?;
        warn!(
            "downgrade: renamed {} to {to} so the older version boots next",
            running.file
        );
        demoted = Some(format!("{EFI_LINUX}/{to}"));
    }
    Ok(Installed {
        version: manifest.version.clone(),
        file: format!("{EFI_LINUX}/{final_name}"),
        sha256: manifest.uki_sha256.clone(),
        size,
        removed,
        demoted,
    })
}

/// The version rules, decided from the signed manifest before anything is written.
pub fn check_versions(manifest: &bundle::Manifest, target: Target<'_>) -> Result<(), InstallError> {
    let running = target.running_version;
    if let Some(min) = &manifest.min_version
        && slots::compare_versions(running, min).is_lt()
    {
        return Err(InstallError::TooOld {
            running: running.to_owned(),
            offered: manifest.version.clone(),
            min: min.clone(),
        });
    }
    match slots::compare_versions(&manifest.version, running) {
        std::cmp::Ordering::Equal => Err(InstallError::SameVersion(manifest.version.clone())),
        std::cmp::Ordering::Less if !target.allow_downgrade => Err(InstallError::Downgrade {
            running: running.to_owned(),
            offered: manifest.version.clone(),
        }),
        _ => Ok(()),
    }
}

/// The running version's slot, which must be blessed: it is what boots when the
/// new version is incomplete or fails.
fn running_slot<'a>(slots: &'a [Slot], running_version: &str) -> Result<&'a Slot, InstallError> {
    let mut mine = slots.iter().filter(|s| s.name.version == running_version);
    let slot = mine
        .clone()
        .find(|s| s.name.is_blessed())
        .or_else(|| mine.next())
        .ok_or_else(|| InstallError::RunningNotOnEsp(running_version.to_owned()))?;
    if !slot.name.is_blessed() {
        return Err(InstallError::RunningOnTrial(slot.esp_path()));
    }
    Ok(slot)
}

/// Checks free space; if the UKI does not fit, removes what is not needed to boot
/// (superseded installs, failed versions, versions older than the previous one)
/// and checks again. Refuses before writing when even that is not enough.
fn make_room(
    esp: &Path,
    slots: &[Slot],
    running: &Slot,
    manifest: &bundle::Manifest,
    superseded: &[&Slot],
    removed: &mut Vec<String>,
) -> Result<(), InstallError> {
    let linux_dir = esp.join(EFI_LINUX);
    let need = manifest.uki_size + SPACE_MARGIN;
    let free = free_bytes(&linux_dir)?;
    if free >= need {
        return Ok(());
    }
    let previous = super::bless::previous_version(slots, &running.name.version).map(|s| s.file.clone());
    let reclaimable: Vec<&Slot> = slots
        .iter()
        .filter(|s| s.file != running.file && Some(&s.file) != previous.as_ref())
        .filter(|s| s.name.is_failed() || superseded.iter().any(|x| x.file == s.file) || s.name.is_blessed())
        .collect();
    let mut gain = 0;
    for s in &reclaimable {
        gain += fs::metadata(linux_dir.join(&s.file)).map(|m| m.len()).unwrap_or(0);
    }
    if free + gain < need {
        return Err(InstallError::NoSpace { free, need });
    }
    for s in reclaimable {
        let path = linux_dir.join(&s.file);
        info!("removing {} to make room for the update", s.esp_path());
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(s.esp_path());
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> Result<u64, InstallError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| io_err(dir)(e.into()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

/// Writes `keel/manifests/keel-<v>.json` through a temporary name.
fn write_record(esp: &Path, manifest: &bundle::Manifest, running_version: &str) -> Result<(), InstallError> {
    let dir = esp.join(RECORDS_DIR);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let config_sha256 = fs::read(esp.join(slots::record_path(running_version)))
        .ok()
        .and_then(|b| serde_json::from_slice::<EspRecord>(&b).ok())
        .map(|r| r.config_sha256)
        .unwrap_or_default();
    let record = EspRecord {
        format: 1,
        version: manifest.version.clone(),
        uki: format!("{EFI_LINUX}/{}", SlotName::fresh(&manifest.version).file_name()),
        sha256: manifest.uki_sha256.clone(),
        size: manifest.uki_size,
        cmdline: manifest.cmdline.clone(),
        config_sha256,
        source_date_epoch: manifest.created,
    };
    let mut json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    json.push(b'\n');
    let final_path = esp.join(slots::record_path(&manifest.version));
    let tmp = dir.join(format!(".keel-{}.json.partial", manifest.version));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    let written = f.write_all(&json).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, &final_path).map_err(io_err(&final_path))?;
    sync_renamed(&final_path)?;
    Ok(sync_dir(&dir)?)
}

/// The partial file of an install in progress. Removed when dropped unless
/// [`Partial::persist`] gave it its final name.
struct Partial {
    dir: PathBuf,
    path: PathBuf,
    persisted: bool,
}

impl Partial {
    fn create(dir: &Path, version: &str) -> Result<(Self, File), InstallError> {
        let path = dir.join(format!("{PARTIAL_PREFIX}{version}{PARTIAL_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let partial = Self {
            dir: dir.to_owned(),
            path,
            persisted: false,
        };
        Ok((partial, file))
    }

    fn persist(mut self, final_name: &str) -> Result<(), InstallError> {
        let to = self.dir.join(final_name);
        fs::rename(&self.path, &to).map_err(io_err(&to))?;
        self.persisted = true;
        // On FAT the new name's entry says size 0 until the file itself is synced.
        sync_renamed(&to)?;
        Ok(sync_dir(&self.dir)?)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.persisted {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove the partial update {}: {e}", self.path.display());
            }
            let _ = sync_dir(&self.dir);
        }
    }
}
