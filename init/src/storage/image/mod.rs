//! Images: disk images imported into a pool, kept as sparse raw files that guests'
//! volumes are seeded from (`source: POOL/images/NAME.raw`).
//!
//! A pool's images live in its `images/` directory: `NAME.raw` and beside it
//! `NAME.json` (what was imported: format, checksum, sizes, when). An import
//! (`import`) writes only hidden `.NAME.*` files until everything checked out, then
//! renames; a failed or cut-off import leaves nothing an operator or a guest can see,
//! and its leftovers are removed by the next import of that name.

mod import;
pub mod qcow2;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use import::{ImportRequest, import};

use super::human;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "image name `{0}`: use lowercase letters, digits, `.`, `_` and `-` (at most 64), starting with a letter or digit"
    )]
    BadName(String),
    #[error("pool `{0}` is not declared in the applied config (or KEEL-DATA is not mounted)")]
    UnknownPool(String),
    #[error("several pools are declared ({0}); say which with --pool")]
    PoolNeeded(String),
    #[error("image {0} already exists; remove it first (keelctl image rm {0})")]
    Exists(String),
    #[error("image {0} is being imported right now")]
    Busy(String),
    #[error("image {0} does not exist")]
    NotFound(String),
    #[error("--sha256 `{0}` is not 64 hex digits")]
    BadChecksumArg(String),
    #[error("checksum mismatch: expected sha256 {expected}, the received file has {actual}; nothing was kept")]
    Checksum { expected: String, actual: String },
    #[error("the image needs {} but the pool has {} to spare; free space or raise the pool's size", human(*needed), human(*available))]
    NoSpace { needed: u64, available: u64 },
    #[error("the image's virtual size {} is above Keel's limit of {}", human(*virtual_size), human(*limit))]
    TooLarge { virtual_size: u64, limit: u64 },
    #[error(
        "the image has a backing file (`{0}`); import a self-contained image: qemu-img convert -O qcow2 IMAGE FLAT.qcow2"
    )]
    BackingFile(String),
    #[error("not a usable qcow2 image: {0}")]
    BadQcow2(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the upload broke off after {received} bytes: {why}; nothing was kept")]
    Interrupted { received: u64, why: String },
}

impl ImageError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}

/// An imported image, as `keelctl image list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub pool: String,
    /// What a disk's `source:` says to use it: `POOL/images/NAME.raw`.
    pub source: String,
    /// The format it was imported from: `raw` or `qcow2`.
    pub format: String,
    /// The disk size it holds.
    pub virtual_size: u64,
    /// Bytes it occupies on KEEL-DATA (a sparse file).
    pub allocated: u64,
    /// sha256 of the file as it was received.
    pub sha256: String,
    /// Unix time of the import.
    pub imported_at: u64,
}

pub fn check_name(name: &str) -> Result<(), ImageError> {
    if crate::config::is_image_name(name) {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// A pool's image directory.
pub fn dir(pool_dir: &Path) -> PathBuf {
    pool_dir.join("images")
}

fn raw_path(pool_dir: &Path, name: &str) -> PathBuf {
    dir(pool_dir).join(format!("{name}.raw"))
}

fn meta_path(pool_dir: &Path, name: &str) -> PathBuf {
    dir(pool_dir).join(format!("{name}.json"))
}

/// The images of the pools in `pools` (name, directory), by pool then name.
pub fn list(pools: &[(String, PathBuf)]) -> Vec<ImageInfo> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for (pool, pool_dir) in pools {
        let Ok(rd) = std::fs::read_dir(dir(pool_dir)) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        for name in names {
            // Bounded: a metadata file is a few hundred bytes.
            let Ok(text) = std::fs::read(meta_path(pool_dir, &name)) else {
                continue;
            };
            let Ok(mut info) = serde_json::from_slice::<ImageInfo>(&text[..text.len().min(64 * 1024)]) else {
                continue;
            };
            let Ok(m) = std::fs::metadata(raw_path(pool_dir, &name)) else {
                continue;
            };
            info.allocated = m.blocks() * 512;
            info.pool = pool.clone();
            out.push(info);
        }
    }
    out
}

/// Removes image `name` from the pool (its raw file and metadata). Volumes already
/// seeded from it are separate files and stay.
pub fn remove(pool_dir: &Path, name: &str) -> Result<(), ImageError> {
    check_name(name)?;
    let meta = meta_path(pool_dir, name);
    let raw = raw_path(pool_dir, name);
    if !meta.exists() && !raw.exists() {
        return Err(ImageError::NotFound(name.to_owned()));
    }
    // Metadata first: from then on the image is not listed, whatever happens next.
    for p in [meta, raw] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(&p, "remove", e)),
        }
    }
    Ok(())
}
