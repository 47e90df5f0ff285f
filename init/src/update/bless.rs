//! Blessing the running version once it is healthy, and pruning old ones.
//!
//! systemd-boot tells the OS which file it booted through the EFI variable
//! `LoaderBootCountPath` (vendor GUID [`LOADER_VENDOR_GUID`]): the path *after* its
//! counter rename, e.g. `\EFI\Linux\keel-1.1.0+2-1.efi`; the variable is absent when
//! the entry had no counter (already blessed). Blessing renames that file to drop the
//! counter (`keel-1.1.0.efi`): systemd-boot then boots it without counting.
//!
//! Pruning keeps the running version, the previous one (the newest older version
//! that has not failed: what `keelctl rollback` goes back to) and installs that have
//! not been tried yet; it deletes everything else, failed (`+0-N`) versions included.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::slots::{self, EFI_LINUX, RECORDS_DIR, Slot, SlotName};
use super::{FsError, rename_durably, sync_dir};

/// systemd-boot's vendor GUID for its `Loader*` variables.
pub const LOADER_VENDOR_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Where efivarfs is mounted (keel-init's early mounts do it on UEFI machines).
pub const EFIVARS_DIR: &str = "/sys/firmware/efi/efivars";
pub const BOOT_COUNT_PATH_VAR: &str = "LoaderBootCountPath";

#[derive(Debug, thiserror::Error)]
pub enum BlessError {
    #[error("EFI variable {}: {reason}", path.display())]
    BadVariable { path: PathBuf, reason: String },
    #[error(
        "systemd-boot booted {path}, which is not a Keel UKI in \\EFI\\Linux (keel-<version>+N[-M].efi); not blessing it"
    )]
    NotAKeelEntry { path: String },
    #[error(
        "systemd-boot booted {path} (version {booted}), but the running OS reports version {running}; not blessing"
    )]
    VersionMismatch {
        path: String,
        booted: String,
        running: String,
    },
    #[error(
        "{path}: systemd-boot booted this file but it is gone from the ESP (rolled back or removed since?); not blessing"
    )]
    Missing { path: String },
    #[error(transparent)]
    Fs(#[from] FsError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BlessError + '_ {
    move |source| BlessError::Fs(FsError::new(path, source))
}

/// Reads a string variable of systemd-boot from efivarfs. efivarfs files start with
/// the variable's 4 attribute bytes; the value is UTF-16LE, usually NUL-terminated.
/// `None` when the variable does not exist.
pub fn read_loader_string(efivars: &Path, name: &str) -> Result<Option<String>, BlessError> {
    let path = efivars.join(format!("{name}-{LOADER_VENDOR_GUID}"));
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let bad = |reason: &str| BlessError::BadVariable {
        path: path.clone(),
        reason: reason.to_owned(),
    };
    let value = bytes
        .get(4..)
        .ok_or_else(|| bad("shorter than its 4 attribute bytes"))?;
    if value.len() % 2 != 0 {
        return Err(bad("odd length for a UTF-16 string"));
    }
    let mut units: Vec<u16> = value
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    while units.last() == Some(&0) {
        units.pop();
    }
    String::from_utf16(&units)
        .map(Some)
        .map_err(|_| bad("not valid UTF-16"))
}

/// `LoaderBootCountPath`: the ESP path (with `\`) of the entry booted with a counter.
pub fn boot_count_path(efivars: &Path) -> Result<Option<String>, BlessError> {
    read_loader_string(efivars, BOOT_COUNT_PATH_VAR)
}

/// `\EFI\Linux\keel-1.0+2-1.efi` → `EFI/Linux/keel-1.0+2-1.efi`.
pub fn esp_relative(efi_path: &str) -> String {
    efi_path.replace('\\', "/").trim_start_matches('/').to_owned()
}

/// Whether this boot is a trial: systemd-boot counted it.
pub fn on_trial(efivars: &Path) -> Result<bool, BlessError> {
    Ok(boot_count_path(efivars)?.is_some())
}

/// The rename a bless did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renamed {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlessReport {
    /// `None` when the running entry was blessed already.
    pub blessed: Option<Renamed>,
    /// ESP paths removed by pruning.
    pub removed: Vec<String>,
}

/// Blesses the entry systemd-boot booted (if it was counted) and then prunes.
pub fn bless_and_prune(esp: &Path, efivars: &Path, running_version: &str) -> Result<BlessReport, BlessError> {
    let blessed = bless(esp, efivars, running_version)?;
    let removed = prune(esp, running_version)?;
    Ok(BlessReport { blessed, removed })
}

/// Renames the booted entry to drop its boot counter. `Ok(None)` when there is
/// nothing to bless.
pub fn bless(esp: &Path, efivars: &Path, running_version: &str) -> Result<Option<Renamed>, BlessError> {
    let linux_dir = esp.join(EFI_LINUX);
    let Some(booted) = boot_count_path(efivars)? else {
        // No counter on the booted entry. A counted file of the running version
        // here means systemd-boot did not start us (firmware booted the UKI
        // directly, or no efivarfs): bless by version then, since this version is
        // the one found healthy.
        let slots = slots::list(esp).map_err(io_err(&linux_dir))?;
        if slots
            .iter()
            .any(|s| s.name.version == running_version && s.name.is_blessed())
        {
            return Ok(None);
        }
        let Some(slot) = slots
            .iter()
            .find(|s| s.name.version == running_version && s.name.is_on_trial())
        else {
            return Ok(None);
        };
        warn!(
            "{BOOT_COUNT_PATH_VAR} is not set, but the running version's entry {} has a counter (booted without systemd-boot?); blessing it by version",
            slot.esp_path()
        );
        return rename_blessed(&linux_dir, slot).map(Some);
    };
    let rel = esp_relative(&booted);
    // FAT and the firmware ignore case; the variable carries the case systemd-boot saw.
    let prefix = format!("{EFI_LINUX}/");
    let file = rel
        .get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(&prefix))
        .map(|_| &rel[prefix.len()..])
        .filter(|f| !f.contains('/'))
        .ok_or_else(|| BlessError::NotAKeelEntry { path: booted.clone() })?;
    let name = SlotName::parse(file).ok_or_else(|| BlessError::NotAKeelEntry { path: booted.clone() })?;
    if name.version != running_version {
        return Err(BlessError::VersionMismatch {
            path: booted,
            booted: name.version,
            running: running_version.to_owned(),
        });
    }
    if !linux_dir.join(file).exists() {
        if linux_dir.join(name.blessed().file_name()).exists() {
            return Ok(None); // blessed earlier in this boot
        }
        return Err(BlessError::Missing { path: rel });
    }
    let slot = Slot {
        file: file.to_owned(),
        name,
    };
    rename_blessed(&linux_dir, &slot).map(Some)
}

fn rename_blessed(linux_dir: &Path, slot: &Slot) -> Result<Renamed, BlessError> {
    let to = slot.name.blessed().file_name();
    rename_durably(linux_dir, &slot.file, &to)?;
    info!("blessed {EFI_LINUX}/{} as {EFI_LINUX}/{to}", slot.file);
    Ok(Renamed {
        from: slot.esp_path(),
        to: format!("{EFI_LINUX}/{to}"),
    })
}

/// The version `keelctl rollback` goes back to and pruning keeps: the newest
/// version older than `running` that has not failed, blessed ones preferred.
pub fn previous_version<'a>(slots: &'a [Slot], running: &str) -> Option<&'a Slot> {
    let older = || {
        slots
            .iter()
            .filter(|s| !s.name.is_failed() && slots::compare_versions(&s.name.version, running).is_lt())
    };
    let newest = |a: &&Slot, b: &&Slot| slots::compare_versions(&a.name.version, &b.name.version);
    older()
        .filter(|s| s.name.is_blessed())
        .max_by(newest)
        .or_else(|| older().max_by(newest))
}

/// Deletes every UKI except the running version, the previous one and installs not
/// tried yet; then the records of versions no longer present. Returns what it removed.
pub fn prune(esp: &Path, running_version: &str) -> Result<Vec<String>, BlessError> {
    let linux_dir = esp.join(EFI_LINUX);
    let slots = slots::list(esp).map_err(io_err(&linux_dir))?;
    let previous = previous_version(&slots, running_version).map(|s| s.file.clone());
    let mut removed = Vec::new();
    for slot in &slots {
        let keep = slot.name.version == running_version
            || previous.as_deref() == Some(slot.file.as_str())
            || (slot.name.is_on_trial() && slot.name.tries_done.is_none());
        if keep {
            continue;
        }
        let path = linux_dir.join(&slot.file);
        fs::remove_file(&path).map_err(io_err(&path))?;
        info!("pruned {} ({})", slot.esp_path(), slot.name.state().as_str());
        removed.push(slot.esp_path());
    }
    if !removed.is_empty() {
        sync_dir(&linux_dir)?;
    }
    // Records of versions that have no UKI any more.
    let records = esp.join(RECORDS_DIR);
    let left = slots::list(esp).map_err(io_err(&linux_dir))?;
    if let Ok(entries) = fs::read_dir(&records) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(version) = name.strip_prefix("keel-").and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !left.iter().any(|s| s.name.version == version) {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(format!("{RECORDS_DIR}/{name}"));
            }
        }
    }
    Ok(removed)
}
