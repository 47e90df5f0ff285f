//! Volumes: raw disk images in a pool, sparse from the start.
//!
//! A new volume is a file of the declared size with nothing allocated
//! (ftruncate), or a clone of its `source` image (`clone`: a reflink where KEEL-DATA
//! shares blocks, else a copy that keeps the image's holes — SEEK_DATA/SEEK_HOLE,
//! and all-zero blocks are skipped too), finished under a
//! temporary name and renamed into place so a crash never leaves half a volume
//! that looks complete. An existing volume is grown when its declared size
//! grew; it is never shrunk, and never deleted.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{StorageError, human, pool};
use crate::config::{Config, PoolPath};

/// A volume some guest declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub volume: PoolPath,
    pub size: u64,
    pub source: Option<PoolPath>,
}

/// The file that backs `v`.
pub fn volume_path(data_root: &Path, v: &PoolPath) -> PathBuf {
    pool::dir(data_root, &v.pool).join(&v.path)
}

/// Every volume the guests declare, once each (a volume shared by several
/// guests takes the largest size any of them declares).
pub fn declared(cfg: &Config) -> Vec<VolumeSpec> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for g in &cfg.guests {
        for d in &g.disks {
            let size = d.size.bytes();
            match out.iter_mut().find(|v| v.volume == d.volume.value) {
                Some(v) => {
                    v.size = v.size.max(size);
                    if v.source.is_none() {
                        v.source = d.seed_source();
                    }
                }
                None => out.push(VolumeSpec {
                    volume: d.volume.value.clone(),
                    size,
                    source: d.seed_source(),
                }),
            }
        }
    }
    out
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Makes volume `spec` exist at its declared size. `cap` is the pool's size cap.
pub fn ensure(data_root: &Path, cap: Option<u64>, spec: &VolumeSpec) -> Result<String, StorageError> {
    let path = volume_path(data_root, &spec.volume);
    let pool_dir = pool::dir(data_root, &spec.volume.pool);
    let name = spec.volume.to_string();
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.is_file() => Err(StorageError::NotAFile { volume: name, path }),
        Ok(m) => {
            let len = m.len();
            if len >= spec.size {
                let note = if len > spec.size {
                    format!(" (declared {}; volumes are never shrunk)", human(spec.size))
                } else {
                    String::new()
                };
                return Ok(format!(
                    "exists, {}, {} allocated{note}",
                    human(len),
                    human(m.blocks() * 512)
                ));
            }
            check_space(&pool_dir, cap, &spec.volume, spec.size - len)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path, "open"))?;
            f.set_len(spec.size).map_err(io_err(&path, "grow"))?;
            f.sync_all().map_err(io_err(&path, "sync"))?;
            Ok(format!("grown from {} to {}", human(len), human(spec.size)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(&path, &pool_dir, cap, spec, data_root),
        Err(e) => Err(io_err(&path, "stat")(e)),
    }
}

/// Fails when `needed` more bytes would not fit the filesystem or the pool's cap.
fn check_space(pool_dir: &Path, cap: Option<u64>, v: &PoolPath, needed: u64) -> Result<(), StorageError> {
    let available = pool::available(pool_dir)?;
    if needed > available {
        return Err(StorageError::NoSpace {
            pool: v.pool.clone(),
            volume: v.to_string(),
            needed,
            available,
        });
    }
    if let Some(cap) = cap {
        let allocated = pool::allocated(pool_dir)?;
        if allocated.saturating_add(needed) > cap {
            return Err(StorageError::PoolCap {
                pool: v.pool.clone(),
                volume: v.to_string(),
                cap,
                allocated,
                needed,
            });
        }
    }
    Ok(())
}

fn create(
    path: &Path,
    pool_dir: &Path,
    cap: Option<u64>,
    spec: &VolumeSpec,
    data_root: &Path,
) -> Result<String, StorageError> {
    let name = spec.volume.to_string();
    let source = match &spec.source {
        Some(s) => {
            let sp = volume_path(data_root, s);
            let meta = std::fs::metadata(&sp).map_err(|_| StorageError::SourceMissing {
                volume: name.clone(),
                pool: s.pool.clone(),
                source_path: sp.clone(),
            })?;
            if meta.len() > spec.size {
                return Err(StorageError::SourceTooLarge {
                    volume: name,
                    source_len: meta.len(),
                    size: spec.size,
                });
            }
            Some(sp)
        }
        None => None,
    };
    check_space(pool_dir, cap, &spec.volume, spec.size)?;

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.partial"));
    let dst = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    let copied = match &source {
        Some(sp) => {
            let src = File::open(sp).map_err(io_err(sp, "open source"))?;
            let how = super::clone::clone_into(&src, &dst, &name).map_err(io_err(&tmp, "clone source"))?;
            Some((sp, how))
        }
        None => None,
    };
    dst.set_len(spec.size).map_err(io_err(&tmp, "set size"))?;
    dst.sync_all().map_err(io_err(&tmp, "sync"))?;
    drop(dst);
    std::fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(match copied {
        Some((sp, (super::clone::CloneMethod::Reflink, _))) => format!(
            "created {} from {} (reflink: shares its blocks, nothing copied)",
            human(spec.size),
            sp.display()
        ),
        Some((sp, (super::clone::CloneMethod::SparseCopy, n))) => format!(
            "created {} from {} (sparse copy: {} of data copied; this file system has no reflinks)",
            human(spec.size),
            sp.display(),
            human(n)
        ),
        None => format!("created {} (sparse)", human(spec.size)),
    })
}
