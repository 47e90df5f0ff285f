//! `keelctl rollback`: make the previous version boot next.
//!
//! Decision: a rollback works through the file names only, like boot counting
//! itself, and never through `loader.conf` or the `LoaderEntryDefault`/`OneShot`
//! variables (a pinned default defeats automatic rollback, see LAB-NOTES). Every
//! entry that would boot before the previous version is taken out of its way:
//!
//! - the running version is renamed to "no tries left" (`keel-<v>+0[-D].efi`):
//!   systemd-boot sorts it last but still boots it if nothing else is left, so
//!   the appliance keeps a bootable OS even if the previous one is gone bad since;
//!   once the previous version is healthy, its bless prunes the demoted one;
//! - an installed version that has not booted yet (a pending update) is deleted:
//!   the operator asked for the older OS, not for the next try of a newer one.
//!
//! The result is checked against systemd-boot's ordering before returning.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::bless::{Renamed, previous_version};
use super::slots::{self, EFI_LINUX};
use super::{FsError, rename_durably, sync_dir};

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("there is no previous version on the ESP to roll back to (only {0})")]
    NoPreviousVersion(String),
    #[error(
        "after the rollback systemd-boot would boot {actual}, not {expected}; the ESP needs a look (`keelctl host`)"
    )]
    WrongOrder { expected: String, actual: String },
    #[error(transparent)]
    Fs(#[from] FsError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The running version.
    pub from: String,
    /// The version that boots next.
    pub to: String,
    pub renamed: Vec<Renamed>,
    pub removed: Vec<String>,
}

pub fn rollback(esp: &Path, running_version: &str) -> Result<RolledBack, RollbackError> {
    let linux_dir = esp.join(EFI_LINUX);
    let fs_err = |source| FsError::new(&linux_dir, source);
    let slots = slots::list(esp).map_err(fs_err)?;
    let target = previous_version(&slots, running_version)
        .ok_or_else(|| {
            let present: Vec<&str> = slots.iter().map(|s| s.file.as_str()).collect();
            RollbackError::NoPreviousVersion(if present.is_empty() {
                "no Keel UKI at all".into()
            } else {
                present.join(", ")
            })
        })?
        .clone();
    let mut renamed = Vec::new();
    let mut removed = Vec::new();
    for slot in slots.iter().take_while(|s| s.file != target.file) {
        if slot.name.is_failed() {
            continue; // sorts after every entry with tries left already
        }
        if slot.name.version == running_version || slot.name.is_blessed() {
            let to = slot.name.failed().file_name();
            rename_durably(&linux_dir, &slot.file, &to)?;
            info!("rollback: {} → {EFI_LINUX}/{to}", slot.esp_path());
            renamed.push(Renamed {
                from: slot.esp_path(),
                to: format!("{EFI_LINUX}/{to}"),
            });
        } else {
            let path = linux_dir.join(&slot.file);
            fs::remove_file(&path).map_err(|e| FsError::new(&path, e))?;
            info!("rollback: removed the pending update {}", slot.esp_path());
            removed.push(slot.esp_path());
        }
    }
    sync_dir(&linux_dir)?;
    let after = slots::list(esp).map_err(fs_err)?;
    let first = after.first().map(|s| s.file.clone()).unwrap_or_default();
    if first != target.file {
        return Err(RollbackError::WrongOrder {
            expected: target.esp_path(),
            actual: first,
        });
    }
    info!("rollback: {} boots next", target.esp_path());
    Ok(RolledBack {
        from: running_version.to_owned(),
        to: target.name.version,
        renamed,
        removed,
    })
}
