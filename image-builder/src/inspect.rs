//! `keel-image inspect`: what is on a Keel disk image (or device), read without mounting.
//!
//! Partitions from the GPT; from the ESP the installed versions (UKIs and their boot
//! counters) each verified against its recorded sha256; from KEEL-CONFIG a summary of
//! keel.yaml and whether it still validates.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::build::{MANIFEST_DIR, Manifest};
use crate::gpt_layout::{self, CONFIG_LABEL, ESP_LABEL, PartitionEntry, PartitionReader};
use crate::identity::sha256_hex;
use crate::uki;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: no GPT partition table: {reason}", path.display())]
    NoGpt { path: PathBuf, reason: String },
    #[error("{}: partition {label}: {reason}", path.display())]
    Volume {
        path: PathBuf,
        label: &'static str,
        reason: String,
    },
}

/// A file name `keel-<version>[+<left>[-<done>]].efi`, systemd's boot counting scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UkiName {
    pub version: String,
    /// Tries left; `None` for a blessed entry (no counter).
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
}

impl UkiName {
    pub fn parse(file_name: &str) -> Option<Self> {
        let stem = file_name.strip_prefix("keel-")?.strip_suffix(".efi")?;
        let (version, counter) = match stem.split_once('+') {
            Some((v, c)) => (v, Some(c)),
            None => (stem, None),
        };
        if uki::validate_version(version).is_err() {
            return None;
        }
        let (tries_left, tries_done) = match counter {
            None => (None, None),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(l.parse().ok()?), Some(d.parse().ok()?)),
                None => (Some(c.parse().ok()?), None),
            },
        };
        Some(Self {
            version: version.to_owned(),
            tries_left,
            tries_done,
        })
    }

    /// The state systemd-boot's boot counting gives this entry.
    pub fn state(&self) -> &'static str {
        match self.tries_left {
            None => "blessed",
            Some(0) => "failed (no tries left)",
            Some(_) => "on trial",
        }
    }
}

/// The hash check of one UKI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// sha256 and size match the manifest.
    Verified,
    /// The file differs from what the manifest records.
    Mismatch { expected_sha256: String },
    /// No manifest for this version on the ESP.
    NoManifest,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstalledVersion {
    pub file: String,
    #[serde(flatten)]
    pub name: UkiName,
    pub state: &'static str,
    pub size: u64,
    pub sha256: String,
    pub verification: Verification,
    /// `IMAGE_VERSION` from the UKI's `.osrel` (should equal the file name's version).
    pub osrel_version: Option<String>,
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EspSummary {
    pub boot_loader: bool,
    pub loader_conf: Option<String>,
    pub versions: Vec<InstalledVersion>,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestSummary {
    pub name: String,
    pub vcpus: u32,
    pub memory: String,
    pub autostart: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub size: u64,
    pub sha256: String,
    /// Whether keel.yaml is byte-for-byte what the image was built with (`None`: no
    /// manifest records it).
    pub as_built: Option<bool>,
    pub valid: bool,
    /// Rendered diagnostics when it does not validate.
    pub errors: Vec<String>,
    pub hostname: Option<String>,
    pub guests: Vec<GuestSummary>,
    pub bridges: Vec<String>,
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub size: u64,
    pub disk_guid: String,
    pub partitions: Vec<PartitionEntry>,
    pub esp: Option<EspSummary>,
    pub config: Option<ConfigSummary>,
    /// Everything that looks wrong, one line each.
    pub problems: Vec<String>,
}

impl Inspection {
    /// True when nothing is wrong: every UKI matches its manifest, both volumes readable.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

type Fs = fatfs::FileSystem<PartitionReader>;

pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let io_err = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = device_size(&file).map_err(io_err)?;
    let (disk_guid, partitions) =
        gpt_layout::read_gpt(PartitionReader::new(file.try_clone().map_err(io_err)?, 0, size)).map_err(|e| {
            InspectError::NoGpt {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        })?;
    let mut problems = Vec::new();

    let open = |label: &'static str| -> Result<Option<Fs>, InspectError> {
        let Some(p) = partitions.iter().find(|p| p.label == label) else {
            return Ok(None);
        };
        let reader = PartitionReader::new(file.try_clone().map_err(io_err)?, p.offset, p.size);
        fatfs::FileSystem::new(reader, fatfs::FsOptions::new())
            .map(Some)
            .map_err(|e| InspectError::Volume {
                path: path.to_owned(),
                label,
                reason: format!("not a FAT volume: {e}"),
            })
    };

    let esp_fs = open(ESP_LABEL)?;
    let mut manifests = Vec::new();
    let esp = match &esp_fs {
        None => {
            problems.push(format!("no {ESP_LABEL} partition"));
            None
        }
        Some(fs) => Some(read_esp(fs, &mut manifests, &mut problems)),
    };
    let config = match open(CONFIG_LABEL)? {
        None => {
            problems.push(format!("no {CONFIG_LABEL} partition"));
            None
        }
        Some(fs) => read_config(&fs, &manifests, &mut problems),
    };
    Ok(Inspection {
        path: path.to_owned(),
        size,
        disk_guid,
        partitions,
        esp,
        config,
        problems,
    })
}

fn read_esp(fs: &Fs, manifests: &mut Vec<Manifest>, problems: &mut Vec<String>) -> EspSummary {
    let root = fs.root_dir();
    let boot_loader = root.open_file("EFI/BOOT/BOOTX64.EFI").is_ok();
    if !boot_loader {
        problems.push("ESP: no EFI/BOOT/BOOTX64.EFI (the firmware has nothing to start)".into());
    }
    let loader_conf = read_file(&root, "loader/loader.conf").map(|b| String::from_utf8_lossy(&b).into_owned());

    if let Ok(dir) = root.open_dir(MANIFEST_DIR) {
        for entry in dir.iter().flatten() {
            let name = entry.file_name();
            if entry.is_file() && name.ends_with(".json") {
                match read_file(&dir, &name).map(|b| serde_json::from_slice::<Manifest>(&b)) {
                    Some(Ok(m)) => manifests.push(m),
                    _ => problems.push(format!("ESP: {MANIFEST_DIR}/{name} is not a readable manifest")),
                }
            }
        }
    }

    let mut versions = Vec::new();
    if let Ok(dir) = root.open_dir("EFI/Linux") {
        let mut names: Vec<String> = dir
            .iter()
            .flatten()
            .filter(|e| e.is_file())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for file in names {
            let Some(name) = UkiName::parse(&file) else { continue };
            let Some(bytes) = read_file(&dir, &file) else {
                problems.push(format!("ESP: EFI/Linux/{file} cannot be read"));
                continue;
            };
            let sha256 = sha256_hex(&bytes);
            let verification = match manifests.iter().find(|m| m.version == name.version) {
                None => Verification::NoManifest,
                Some(m) if m.sha256 == sha256 && m.size == bytes.len() as u64 => Verification::Verified,
                Some(m) => Verification::Mismatch {
                    expected_sha256: m.sha256.clone(),
                },
            };
            match &verification {
                Verification::Mismatch { expected_sha256 } => problems.push(format!(
                    "ESP: EFI/Linux/{file} has sha256 {sha256}, its manifest records {expected_sha256}: the UKI is damaged or was replaced"
                )),
                Verification::NoManifest => {
                    problems.push(format!("ESP: EFI/Linux/{file} has no manifest in {MANIFEST_DIR}: cannot verify it"))
                }
                Verification::Verified => {}
            }
            let osrel = uki::section_data(&bytes, ".osrel")
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(b).into_owned());
            let osrel_version = osrel.as_deref().and_then(|text| {
                uki::parse_os_release(text)
                    .into_iter()
                    .find(|(k, _)| k == "IMAGE_VERSION")
                    .map(|(_, v)| v)
            });
            if osrel_version.as_deref() != Some(name.version.as_str()) {
                problems.push(format!(
                    "ESP: EFI/Linux/{file}: .osrel IMAGE_VERSION is {osrel_version:?}, not {:?}: systemd-boot would order it wrongly",
                    name.version
                ));
            }
            let cmdline = uki::section_data(&bytes, ".cmdline")
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(b).into_owned());
            versions.push(InstalledVersion {
                file: format!("EFI/Linux/{file}"),
                state: name.state(),
                name,
                size: bytes.len() as u64,
                sha256,
                verification,
                osrel_version,
                cmdline,
            });
        }
    }
    if versions.is_empty() {
        problems.push("ESP: no keel-*.efi in EFI/Linux: nothing to boot".into());
    }
    let free_bytes = fs
        .stats()
        .map(|s| u64::from(s.free_clusters()) * u64::from(s.cluster_size()))
        .unwrap_or(0);
    EspSummary {
        boot_loader,
        loader_conf,
        versions,
        free_bytes,
    }
}

fn read_config(fs: &Fs, manifests: &[Manifest], problems: &mut Vec<String>) -> Option<ConfigSummary> {
    let Some(bytes) = read_file(&fs.root_dir(), "keel.yaml") else {
        problems.push(format!("{CONFIG_LABEL}: no keel.yaml"));
        return None;
    };
    let sha256 = sha256_hex(&bytes);
    let as_built = if manifests.is_empty() {
        None
    } else {
        Some(manifests.iter().any(|m| m.config_sha256 == sha256))
    };
    let mut summary = ConfigSummary {
        size: bytes.len() as u64,
        sha256,
        as_built,
        valid: false,
        errors: Vec::new(),
        hostname: None,
        guests: Vec::new(),
        bridges: Vec::new(),
        pools: Vec::new(),
    };
    let text = String::from_utf8_lossy(&bytes);
    match keel_config::parse_str(&text) {
        Ok(loaded) => {
            let c = &loaded.config;
            summary.valid = true;
            summary.hostname = Some(c.host.hostname.value.clone());
            summary.guests = c
                .guests
                .iter()
                .map(|g| GuestSummary {
                    name: g.name.value.clone(),
                    vcpus: g.vcpus.value,
                    memory: g.memory.value.to_string(),
                    autostart: g.autostart,
                })
                .collect();
            summary.bridges = c.network.bridges.iter().map(|b| b.name.value.clone()).collect();
            summary.pools = c.storage.pools.iter().map(|p| p.name.value.clone()).collect();
        }
        Err(diagnostics) => {
            summary.errors = diagnostics.render("keel.yaml").lines().map(str::to_owned).collect();
            problems.push(format!(
                "{CONFIG_LABEL}: keel.yaml does not validate ({} errors)",
                diagnostics.errors().count()
            ));
        }
    }
    Some(summary)
}

fn read_file(dir: &fatfs::Dir<'_, PartitionReader>, path: &str) -> Option<Vec<u8>> {
    let mut f = dir.open_file(path).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// Size of a regular file or block device (seeking to the end works for both).
pub fn device_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    let size = f.seek(std::io::SeekFrom::End(0))?;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(size)
}

/// The human-readable report.
pub fn render(i: &Inspection) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let _ = writeln!(
        s,
        "{}: {:.0} MiB, GPT disk {}",
        i.path.display(),
        mib(i.size),
        i.disk_guid
    );
    let _ = writeln!(s, "\nPartitions:");
    let _ = writeln!(
        s,
        "  {:<3} {:<12} {:>10} {:>10}  {:<22} partition GUID",
        "#", "label", "start", "size", "type"
    );
    for p in &i.partitions {
        let _ = writeln!(
            s,
            "  {:<3} {:<12} {:>8.0}Mi {:>8.0}Mi  {:<22} {}",
            p.number,
            p.label,
            mib(p.offset),
            mib(p.size),
            p.type_name,
            p.guid
        );
    }
    if let Some(esp) = &i.esp {
        let _ = writeln!(s, "\nInstalled versions (ESP, newest boots first):");
        for v in &esp.versions {
            let counter = match (v.name.tries_left, v.name.tries_done) {
                (None, _) => String::new(),
                (Some(l), None) => format!(", {l} tries left"),
                (Some(l), Some(d)) => format!(", {l} tries left, {d} done"),
            };
            let check = match &v.verification {
                Verification::Verified => "sha256 verified".to_owned(),
                Verification::Mismatch { .. } => "sha256 MISMATCH".to_owned(),
                Verification::NoManifest => "no manifest".to_owned(),
            };
            let _ = writeln!(
                s,
                "  {:<10} {} ({}{counter}), {:.1} MiB, {check}",
                v.name.version,
                v.file,
                v.state,
                mib(v.size)
            );
            if let Some(cmdline) = &v.cmdline {
                let _ = writeln!(s, "             cmdline: {cmdline}");
            }
        }
        let _ = writeln!(
            s,
            "  boot loader: {}, ESP free: {:.0} MiB",
            if esp.boot_loader { "systemd-boot" } else { "MISSING" },
            mib(esp.free_bytes)
        );
    }
    if let Some(c) = &i.config {
        let edited = match c.as_built {
            Some(true) => "as built",
            Some(false) => "edited since the build",
            None => "no build record",
        };
        let validity = if c.valid { "valid" } else { "INVALID" };
        let _ = writeln!(
            s,
            "\nConfig (KEEL-CONFIG/keel.yaml, {} bytes, {edited}, {validity}):",
            c.size
        );
        if let Some(h) = &c.hostname {
            let _ = writeln!(s, "  hostname: {h}");
        }
        let _ = writeln!(
            s,
            "  bridges:  {}",
            if c.bridges.is_empty() {
                "-".into()
            } else {
                c.bridges.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "  pools:    {}",
            if c.pools.is_empty() {
                "-".into()
            } else {
                c.pools.join(", ")
            }
        );
        let _ = writeln!(s, "  guests:   {}", c.guests.len());
        for g in &c.guests {
            let auto = if g.autostart { "autostart" } else { "manual" };
            let _ = writeln!(s, "    {:<16} {} vCPU, {}, {auto}", g.name, g.vcpus, g.memory);
        }
        for e in &c.errors {
            let _ = writeln!(s, "  {e}");
        }
    }
    if i.problems.is_empty() {
        let _ = writeln!(s, "\nOK: every UKI matches its manifest");
    } else {
        let _ = writeln!(s, "\nProblems:");
        for p in &i.problems {
            let _ = writeln!(s, "  - {p}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_counter_names_parse() {
        let n = UkiName::parse("keel-1.2.0+2-1.efi").expect("counted");
        assert_eq!(
            (n.version.as_str(), n.tries_left, n.tries_done),
            ("1.2.0", Some(2), Some(1))
        );
        assert_eq!(n.state(), "on trial");
        let n = UkiName::parse("keel-1.1.0+3.efi").expect("fresh");
        assert_eq!((n.tries_left, n.tries_done), (Some(3), None));
        let n = UkiName::parse("keel-1.0.0+0-3.efi").expect("failed");
        assert_eq!(n.state(), "failed (no tries left)");
        let n = UkiName::parse("keel-1.0.0.efi").expect("blessed");
        assert_eq!((n.tries_left, n.state()), (None, "blessed"));
        assert!(UkiName::parse("keel-1.0.0+x.efi").is_none());
        assert!(UkiName::parse("other-1.0.0.efi").is_none());
        assert!(UkiName::parse("keel-.efi").is_none());
    }
}
