//! Over-the-air updates: signed bundles, A/B slots with systemd-boot's boot
//! counting, health-gated blessing, rollback (DESIGN.md "A/B updates").
//!
//! - [`bundle`]: the bundle format and its verification (also used by keel-image);
//! - [`slots`]: the UKIs on the ESP, their names and systemd-boot's order;
//! - [`install`]: verify a streamed bundle and write `keel-<v>+3.efi`, power-safe;
//! - [`health`]: when a boot is healthy, and when a trial boot is given up;
//! - [`bless`]: bless the booted entry, prune old versions;
//! - [`rollback`]: make the previous version boot next.
//!
//! [`Agent`] ties them to one appliance (its ESP, efivarfs, version and keys)
//! and serializes the operations that change the ESP.

pub mod bless;
pub use keel_config::bundle;
pub mod health;
pub mod install;
pub mod rollback;
pub use keel_config::slots;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

pub use bless::{BlessError, BlessReport};
pub use bundle::{BundleError, Manifest};
pub use install::{InstallError, Installed, apply_stream};
pub use rollback::{RollbackError, RolledBack};

pub use keel_config::bundle::TRUSTED_KEYS_FILE;

/// A file-system error with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    pub fn new(path: &Path, source: std::io::Error) -> Self {
        Self {
            path: path.to_owned(),
            source,
        }
    }
}

/// Renames `from` to `to` inside `dir` and makes the rename durable.
pub(crate) fn rename_durably(dir: &Path, from: &str, to: &str) -> Result<(), FsError> {
    let to_path = dir.join(to);
    std::fs::rename(dir.join(from), &to_path).map_err(|e| FsError::new(&to_path, e))?;
    sync_renamed(&to_path)?;
    sync_dir(dir)
}

/// fsync of a file just renamed. Needed on FAT (the ESP): Linux's vfat writes the new
/// directory entry of a rename with size 0 and no first cluster, and the file's real
/// size and cluster reach it only when the file's inode is written back. A power cut
/// after rename + directory fsync alone left an empty `keel-<v>+3.efi` behind a
/// successful `keelctl update` (found by ci/e2e's power-cut runs).
pub(crate) fn sync_renamed(path: &Path) -> Result<(), FsError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| FsError::new(path, e))
}

/// fsync of a directory: makes renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::new(dir, e))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{TRUSTED_KEYS_FILE}: {0}")]
    TrustedKeys(String),
}

/// One installed version as `keelctl host` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    #[serde(flatten)]
    pub slot: slots::Slot,
    pub state: slots::SlotState,
    pub running: bool,
    /// systemd-boot boots this one next.
    pub boots_next: bool,
}

/// The update agent of one appliance.
#[derive(Debug)]
pub struct Agent {
    pub esp: PathBuf,
    pub efivars: PathBuf,
    pub running_version: String,
    pub trusted_keys: Vec<VerifyingKey>,
    /// Held by every operation that changes the ESP.
    lock: Mutex<()>,
}

impl Agent {
    pub fn new(esp: PathBuf, efivars: PathBuf, running_version: String, trusted_keys: Vec<VerifyingKey>) -> Self {
        Self {
            esp,
            efivars,
            running_version,
            trusted_keys,
            lock: Mutex::new(()),
        }
    }

    /// The agent of the running appliance: the ESP mounted read-write at `esp`
    /// (`layout::ESP_MOUNT`), efivarfs at its usual place, keys from
    /// [`TRUSTED_KEYS_FILE`] (a missing file means no keys: every bundle is refused).
    pub fn for_this_system(esp: PathBuf, running_version: String) -> Result<Self, AgentError> {
        let keys = match std::fs::read_to_string(TRUSTED_KEYS_FILE) {
            Ok(text) => bundle::parse_trusted_keys(&text).map_err(|e| AgentError::TrustedKeys(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AgentError::TrustedKeys(e.to_string())),
        };
        Ok(Self::new(esp, PathBuf::from(bless::EFIVARS_DIR), running_version, keys))
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        // A panic while holding it leaves nothing half-done that the next
        // operation could not handle (it re-reads the ESP), so poison is ignored.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies and installs a bundle read from `reader` (see [`install`]).
    pub fn apply(
        &self,
        reader: impl Read,
        allow_downgrade: bool,
        progress: impl FnMut(u64, u64),
    ) -> Result<Installed, InstallError> {
        let _g = self.guard();
        let target = install::Target {
            esp: &self.esp,
            running_version: &self.running_version,
            allow_downgrade,
        };
        install::apply_stream_with_progress(reader, &self.trusted_keys, target, progress)
    }

    /// Whether systemd-boot counted this boot (false also without efivarfs).
    pub fn on_trial(&self) -> bool {
        bless::on_trial(&self.efivars).unwrap_or(false)
    }

    /// Blesses the running entry and prunes; call when [`health::Action::Bless`].
    pub fn bless(&self) -> Result<BlessReport, BlessError> {
        let _g = self.guard();
        bless::bless_and_prune(&self.esp, &self.efivars, &self.running_version)
    }

    /// [`Agent::bless`] without waiting: `None` while another operation holds the ESP
    /// (an install streaming in); try again later. For the event loop, which must never
    /// block on the ESP lock: an install holds it while it waits for the event loop to
    /// hand it the next chunk of the upload, so blocking there would hang PID 1.
    pub fn try_bless(&self) -> Option<Result<BlessReport, BlessError>> {
        let _g = match self.lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(bless::bless_and_prune(&self.esp, &self.efivars, &self.running_version))
    }

    pub fn rollback(&self) -> Result<RolledBack, RollbackError> {
        let _g = self.guard();
        rollback::rollback(&self.esp, &self.running_version)
    }

    /// The installed versions in boot order.
    pub fn status(&self) -> Result<Vec<SlotStatus>, FsError> {
        let all = slots::list(&self.esp).map_err(|e| FsError::new(&self.esp.join(slots::EFI_LINUX), e))?;
        Ok(all
            .into_iter()
            .enumerate()
            .map(|(i, slot)| SlotStatus {
                state: slot.name.state(),
                running: slot.name.version == self.running_version,
                boots_next: i == 0,
                slot,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_with(esp: &Path, files: &[&str]) -> Agent {
        let linux = esp.join(slots::EFI_LINUX);
        std::fs::create_dir_all(&linux).expect("mkdir");
        for f in files {
            std::fs::write(linux.join(f), b"uki").expect("write");
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        Agent::new(esp.to_owned(), esp.join("no-efivars"), "1.1.0".into(), vec![key])
    }

    #[test]
    fn try_bless_does_not_wait_for_an_install_in_progress() {
        let esp = tempfile::tempdir().expect("tempdir");
        let agent = agent_with(esp.path(), &["keel-1.1.0+2-1.efi", "keel-1.0.0.efi"]);
        let installing = agent.guard();
        assert!(agent.try_bless().is_none(), "the ESP is busy: no bless, no waiting");
        assert!(esp.path().join("EFI/Linux/keel-1.1.0+2-1.efi").exists());
        drop(installing);
        let report = agent.try_bless().expect("free now").expect("blessed");
        assert_eq!(
            report.blessed.map(|r| r.to),
            Some("EFI/Linux/keel-1.1.0.efi".to_owned())
        );
        assert!(esp.path().join("EFI/Linux/keel-1.1.0.efi").exists());
    }

    #[test]
    fn a_blocked_upload_holds_the_esp_and_try_bless_returns_at_once() {
        use std::sync::mpsc;
        // An upload whose next chunk never comes (the event loop that would feed it is
        // the caller of try_bless): apply() sits in read() holding the ESP lock.
        struct Stalled(mpsc::Receiver<()>);
        impl Read for Stalled {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(0)
            }
        }
        let esp = tempfile::tempdir().expect("tempdir");
        let agent = std::sync::Arc::new(agent_with(esp.path(), &["keel-1.1.0.efi"]));
        let (release, stalled) = mpsc::channel();
        let installer = {
            let agent = agent.clone();
            std::thread::spawn(move || agent.apply(Stalled(stalled), false, |_, _| {}).is_err())
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while agent.try_bless().is_some() {
            assert!(std::time::Instant::now() < deadline, "apply() never took the ESP lock");
            // Not a tight loop: std's mutex is not fair, the installer must get a chance.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        release.send(()).expect("release the upload");
        assert!(installer.join().expect("installer"), "an empty upload is refused");
        assert!(agent.try_bless().is_some(), "free again once the install ended");
    }
}
