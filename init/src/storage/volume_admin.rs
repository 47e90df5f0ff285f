//! What an operator does to volumes by hand (`keelctl volume ...`): list, create,
//! grow, clone, remove. Keel itself never removes a volume; `remove` is the operator's
//! explicit act, refused for a volume a declared guest uses unless forced, and always
//! for one a running guest has open.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::volume::{self, VolumeSpec};
use super::{StorageError, human, image, pool};
use crate::config::{Config, PoolPath};

/// One volume file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// POOL/PATH.
    pub name: String,
    pub size: u64,
    /// Bytes it occupies on KEEL-DATA.
    pub allocated: u64,
    /// The guests of the applied config that declare it.
    pub used_by: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeAdminError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("pool `{0}` is not declared in the applied config")]
    UnknownPool(String),
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error(
        "volume {volume} is used by {guests} (declared in the applied config); remove it from their disks first, or pass --force"
    )]
    InUse { volume: String, guests: String },
    #[error("volume {volume} is open by the running guest {guest}; stop it first")]
    Open { volume: String, guest: String },
    #[error("volume {volume} is {}; volumes are never shrunk (a guest's file system would be cut off)", human(*size))]
    Shrink { volume: String, size: u64 },
    #[error("{0}")]
    Bad(String),
}

fn io(path: &Path, op: &'static str, source: std::io::Error) -> VolumeAdminError {
    VolumeAdminError::Storage(StorageError::Io {
        path: path.to_owned(),
        op,
        source,
    })
}

fn users(cfg: &Config, v: &PoolPath) -> Vec<String> {
    cfg.guests
        .iter()
        .filter(|g| g.disks.iter().any(|d| d.volume.value == *v))
        .map(|g| g.name.value.clone())
        .collect()
}

fn check_pool(cfg: &Config, v: &PoolPath) -> Result<(), VolumeAdminError> {
    if cfg.storage.pools.iter().any(|p| p.name.value == v.pool) {
        Ok(())
    } else {
        Err(VolumeAdminError::UnknownPool(v.pool.clone()))
    }
}

/// Every volume file in the declared pools (images excluded), by name.
pub fn list(cfg: &Config, data_root: &Path) -> Vec<VolumeInfo> {
    let mut out = Vec::new();
    for p in &cfg.storage.pools {
        let dir = pool::dir(data_root, &p.name);
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                let Ok(m) = e.metadata() else { continue };
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                if m.is_dir() && path != image::dir(&dir) && !hidden {
                    stack.push(path);
                } else if m.is_file() && !hidden {
                    let Ok(rel) = path.strip_prefix(&dir) else { continue };
                    let v = PoolPath {
                        pool: p.name.value.clone(),
                        path: rel.to_string_lossy().into_owned(),
                    };
                    out.push(VolumeInfo {
                        name: v.to_string(),
                        size: m.len(),
                        allocated: m.blocks() * 512,
                        used_by: users(cfg, &v),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn cap(cfg: &Config, pool: &str) -> Option<u64> {
    cfg.storage
        .pools
        .iter()
        .find(|p| p.name.value == pool)
        .and_then(|p| p.size.as_ref().map(|s| s.bytes()))
}

fn info(cfg: &Config, data_root: &Path, v: &PoolPath) -> Result<VolumeInfo, VolumeAdminError> {
    let path = volume::volume_path(data_root, v);
    let m = std::fs::metadata(&path).map_err(|_| VolumeAdminError::NotFound(v.to_string()))?;
    Ok(VolumeInfo {
        name: v.to_string(),
        size: m.len(),
        allocated: m.blocks() * 512,
        used_by: users(cfg, v),
    })
}

/// A new sparse volume of `size` (or seeded from `source`).
pub fn create(
    cfg: &Config,
    data_root: &Path,
    v: &PoolPath,
    size: u64,
    source: Option<PoolPath>,
) -> Result<VolumeInfo, VolumeAdminError> {
    check_pool(cfg, v)?;
    if size == 0 {
        return Err(VolumeAdminError::Bad("a volume needs a size above 0".into()));
    }
    if volume::volume_path(data_root, v).exists() {
        return Err(VolumeAdminError::Exists(v.to_string()));
    }
    let spec = VolumeSpec {
        volume: v.clone(),
        size,
        source,
    };
    volume::ensure(data_root, cap(cfg, &v.pool), &spec)?;
    info(cfg, data_root, v)
}

/// Grows a volume to `size` (never shrinks). The guest sees it at its next start.
pub fn resize(cfg: &Config, data_root: &Path, v: &PoolPath, size: u64) -> Result<VolumeInfo, VolumeAdminError> {
    check_pool(cfg, v)?;
    let current = info(cfg, data_root, v)?;
    if size < current.size {
        return Err(VolumeAdminError::Shrink {
            volume: v.to_string(),
            size: current.size,
        });
    }
    let spec = VolumeSpec {
        volume: v.clone(),
        size,
        source: None,
    };
    volume::ensure(data_root, cap(cfg, &v.pool), &spec)?;
    info(cfg, data_root, v)
}

/// A new volume `to` with `from`'s content: a reflink where KEEL-DATA can, else a
/// sparse copy. `from` should not be written meanwhile (stop its guest for a
/// consistent copy).
pub fn clone_volume(
    cfg: &Config,
    data_root: &Path,
    from: &PoolPath,
    to: &PoolPath,
) -> Result<VolumeInfo, VolumeAdminError> {
    check_pool(cfg, to)?;
    let src = info(cfg, data_root, from)?;
    create(cfg, data_root, to, src.size, Some(from.clone()))
}

/// Removes a volume. `active` says whether a guest is running now.
pub fn remove(
    cfg: &Config,
    data_root: &Path,
    v: &PoolPath,
    force: bool,
    active: impl Fn(&str) -> bool,
) -> Result<VolumeInfo, VolumeAdminError> {
    let found = info(cfg, data_root, v)?;
    if let Some(g) = found.used_by.iter().find(|g| active(g)) {
        return Err(VolumeAdminError::Open {
            volume: v.to_string(),
            guest: g.clone(),
        });
    }
    if !found.used_by.is_empty() && !force {
        return Err(VolumeAdminError::InUse {
            volume: v.to_string(),
            guests: found.used_by.join(", "),
        });
    }
    let path = volume::volume_path(data_root, v);
    std::fs::remove_file(&path).map_err(|e| io(&path, "remove", e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    tracing::info!(volume = %v, force, "volume removed by the operator");
    Ok(found)
}
