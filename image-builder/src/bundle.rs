//! `keel-image keygen`, `bundle` and `verify`: the build side of over-the-air updates.
//!
//! The bundle format and its verification live in keel-init
//! (`keel_config::bundle`), so the appliance and this tool cannot disagree
//! about it. This module finds the UKI (a file, or the newest version on a disk
//! image's ESP), checks that its `.osrel` names the version being bundled (the
//! version systemd-boot orders it by), and writes the bundle atomically.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use keel_config::bundle::{self, BundleError, KeyError, Manifest};
use keel_config::slots::{self, EFI_LINUX, SlotName};

use crate::gpt_layout::{self, ESP_LABEL, PartitionReader};
use crate::identity::sha256_hex;
use crate::uki;

#[derive(Debug, thiserror::Error)]
pub enum BundleToolError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: already exists; keygen never overwrites a key (choose another --output or remove it)", .0.display())]
    KeyExists(PathBuf),
    #[error("{}: {source}", path.display())]
    Key { path: PathBuf, source: KeyError },
    #[error("cannot get random bytes for the key: {0}")]
    Random(String),
    #[error("{}: {reason}", path.display())]
    Uki { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Bundle { path: PathBuf, source: BundleError },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleToolError + '_ {
    move |source| BundleToolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The two files `keygen` writes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyPair {
    pub secret: PathBuf,
    pub public: PathBuf,
    /// `ed25519:BASE64`, the line for `update.trusted_keys`.
    pub public_key: String,
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Generates an ed25519 key pair: `PREFIX.key` (mode 0600) and `PREFIX.pub`.
pub fn keygen(prefix: &Path) -> Result<KeyPair, BundleToolError> {
    let secret_path = with_suffix(prefix, ".key");
    let public_path = with_suffix(prefix, ".pub");
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(BundleToolError::KeyExists(p.clone()));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| BundleToolError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let public_key = bundle::format_public_key(&key.verifying_key());
    write_new(&secret_path, 0o600, bundle::format_secret_key(&key).as_bytes())?;
    write_new(&public_path, 0o644, format!("{public_key}\n").as_bytes())?;
    Ok(KeyPair {
        secret: secret_path,
        public: public_path,
        public_key,
    })
}

/// Creates `path` (never overwriting) with `mode` from the start, so a secret is
/// never readable by others, not even briefly.
fn write_new(path: &Path, mode: u32, bytes: &[u8]) -> Result<(), BundleToolError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => BundleToolError::KeyExists(path.to_owned()),
            _ => io_err(path)(e),
        })?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(path))
}

pub fn read_secret_key(path: &Path) -> Result<SigningKey, BundleToolError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    bundle::parse_secret_key(&text).map_err(|source| BundleToolError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Reads a `.pub` file (or any file whose content is one `ed25519:BASE64` line).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, BundleToolError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    bundle::parse_public_key(&text).map_err(|source| BundleToolError::Key {
        path: path.to_owned(),
        source,
    })
}

/// A UKI and the version it carries.
#[derive(Debug, Clone)]
pub struct UkiSource {
    pub bytes: Vec<u8>,
    pub version: String,
    pub cmdline: String,
}

/// The `.osrel` `IMAGE_VERSION` and `.cmdline` of a UKI.
fn uki_identity(bytes: &[u8], path: &Path) -> Result<(Option<String>, String), BundleToolError> {
    let bad = |reason: String| BundleToolError::Uki {
        path: path.to_owned(),
        reason,
    };
    let osrel = uki::section_data(bytes, ".osrel")
        .map_err(|e| bad(format!("not a UKI: {e}")))?
        .ok_or_else(|| bad("not a UKI: it has no .osrel section".into()))?;
    let version = uki::parse_os_release(&String::from_utf8_lossy(osrel))
        .into_iter()
        .find(|(k, _)| k == "IMAGE_VERSION")
        .map(|(_, v)| v);
    let cmdline = uki::section_data(bytes, ".cmdline")
        .ok()
        .flatten()
        .map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').trim().to_owned())
        .unwrap_or_default();
    Ok((version, cmdline))
}

/// A UKI file whose `.osrel` must say `IMAGE_VERSION=<version>`.
pub fn uki_from_file(path: &Path, version: &str) -> Result<UkiSource, BundleToolError> {
    slots::validate_version(version).map_err(|reason| BundleToolError::Uki {
        path: path.to_owned(),
        reason,
    })?;
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let (osrel_version, cmdline) = uki_identity(&bytes, path)?;
    if osrel_version.as_deref() != Some(version) {
        return Err(BundleToolError::Uki {
            path: path.to_owned(),
            reason: format!(
                "its .osrel says IMAGE_VERSION={}, not {version}; systemd-boot orders UKIs by that field, so they must agree (rebuild with --version {version})",
                osrel_version.as_deref().unwrap_or("(none)")
            ),
        });
    }
    Ok(UkiSource {
        bytes,
        version: version.to_owned(),
        cmdline,
    })
}

/// The newest Keel UKI on a disk image's ESP (a freshly built image has one).
pub fn uki_from_image(image: &Path) -> Result<UkiSource, BundleToolError> {
    let bad = |reason: String| BundleToolError::Image {
        path: image.to_owned(),
        reason,
    };
    let file = File::open(image).map_err(io_err(image))?;
    let size = crate::inspect::device_size(&file).map_err(io_err(image))?;
    let reader = PartitionReader::new(file.try_clone().map_err(io_err(image))?, 0, size);
    let (_, partitions) = gpt_layout::read_gpt(reader).map_err(|e| bad(format!("no GPT: {e}")))?;
    let esp = partitions
        .iter()
        .find(|p| p.label == ESP_LABEL)
        .ok_or_else(|| bad(format!("no {ESP_LABEL} partition")))?;
    let fs = fatfs::FileSystem::new(
        PartitionReader::new(file, esp.offset, esp.size),
        fatfs::FsOptions::new(),
    )
    .map_err(|e| bad(format!("{ESP_LABEL} is not a FAT volume: {e}")))?;
    let dir = fs
        .root_dir()
        .open_dir(EFI_LINUX)
        .map_err(|e| bad(format!("{ESP_LABEL}: no {EFI_LINUX}: {e}")))?;
    let newest = dir
        .iter()
        .flatten()
        .filter(|e| e.is_file())
        .filter_map(|e| SlotName::parse(&e.file_name()).map(|n| (e.file_name(), n)))
        .max_by(|a, b| slots::compare_versions(&a.1.version, &b.1.version))
        .ok_or_else(|| bad(format!("{ESP_LABEL}: no keel-*.efi in {EFI_LINUX}")))?;
    let mut bytes = Vec::new();
    dir.open_file(&newest.0)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| bad(format!("{EFI_LINUX}/{}: {e}", newest.0)))?;
    let inner = image.join(EFI_LINUX).join(&newest.0);
    let (osrel_version, cmdline) = uki_identity(&bytes, &inner)?;
    if osrel_version.as_deref() != Some(newest.1.version.as_str()) {
        return Err(bad(format!(
            "{EFI_LINUX}/{}: .osrel IMAGE_VERSION is {osrel_version:?}, not {}",
            newest.0, newest.1.version
        )));
    }
    Ok(UkiSource {
        bytes,
        version: newest.1.version,
        cmdline,
    })
}

/// What `bundle` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleReport {
    pub output: PathBuf,
    pub manifest: Manifest,
    pub bundle_size: u64,
    pub public_key: String,
}

/// Signs `uki` into a bundle at `output` (temporary file, fsync, rename).
pub fn create(
    uki: &UkiSource,
    min_version: Option<&str>,
    key: &SigningKey,
    created: i64,
    output: &Path,
) -> Result<BundleReport, BundleToolError> {
    let manifest = Manifest {
        format: bundle::FORMAT,
        os: bundle::OS.to_owned(),
        version: uki.version.clone(),
        min_version: min_version.map(str::to_owned),
        uki_sha256: sha256_hex(&uki.bytes),
        uki_size: uki.bytes.len() as u64,
        cmdline: uki.cmdline.clone(),
        created,
    };
    let header = bundle::encode_header(&manifest, key).map_err(|source| BundleToolError::Bundle {
        path: output.to_owned(),
        source,
    })?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".keel-bundle-")
        .tempfile_in(&dir)
        .map_err(io_err(&dir))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        w.write_all(&header)
            .and_then(|()| w.write_all(&uki.bytes))
            .and_then(|()| w.flush())
            .map_err(io_err(tmp.path()))?;
    }
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(output).map_err(|e| io_err(output)(e.error))?;
    Ok(BundleReport {
        output: output.to_owned(),
        manifest,
        bundle_size: (header.len() + uki.bytes.len()) as u64,
        public_key: bundle::format_public_key(&key.verifying_key()),
    })
}

/// Checks a bundle file against one public key: signature, manifest, size, sha256.
pub fn verify(path: &Path, key: &VerifyingKey) -> Result<Manifest, BundleToolError> {
    let f = File::open(path).map_err(io_err(path))?;
    bundle::verify_stream(BufReader::with_capacity(1 << 20, f), std::slice::from_ref(key)).map_err(|source| {
        BundleToolError::Bundle {
            path: path.to_owned(),
            source,
        }
    })
}
