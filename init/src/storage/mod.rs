//! Storage: the KEEL-DATA partition, pools and volumes.
//!
//! [`prepare_data`] finds, formats (first boot), grows (flashed to a bigger
//! disk) and mounts KEEL-DATA. [`reconcile`] then makes every declared pool a
//! directory and every guest disk a volume file in it. Volumes are only ever
//! created or grown, never shrunk or deleted by Keel: a guest that disappears
//! from the config leaves its data where it was.

pub mod boot_entry;
pub mod clone;
pub mod datafs;
pub mod image;
pub mod pool;
pub mod sparse;
pub mod volume;
pub mod volume_admin;

use std::fmt;
use std::path::{Path, PathBuf};

pub use datafs::{DataFs, DataOptions, prepare_data};
pub use volume::volume_path;

use crate::config::{Config, PoolPath};
use crate::outcome;

/// Everything a storage error can be; each names the pool, volume or device.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "volume {volume} in pool {pool} needs {} but only {} is free on the data partition; free space or declare a smaller size",
        human(*needed),
        human(*available)
    )]
    NoSpace {
        pool: String,
        volume: String,
        needed: u64,
        available: u64,
    },
    #[error(
        "volume {volume} does not fit pool {pool}'s cap of {}: the pool's volumes already allocate {} and this one needs {}; raise the pool's `size` or declare a smaller volume",
        human(*cap),
        human(*allocated),
        human(*needed)
    )]
    PoolCap {
        pool: String,
        volume: String,
        cap: u64,
        allocated: u64,
        needed: u64,
    },
    #[error("volume {volume}: source {source_file} does not exist in pool {pool}; import it first (keelctl image import --pool {pool} NAME FILE makes {pool}/images/NAME.raw)", source_file = source_path.display())]
    SourceMissing {
        volume: String,
        pool: String,
        source_path: PathBuf,
    },
    #[error("volume {volume}: source image is {} but the volume is declared {}; declare at least the image's size", human(*source_len), human(*size))]
    SourceTooLarge { volume: String, source_len: u64, size: u64 },
    #[error("volume {volume}: {} exists and is not a regular file; move it away", path.display())]
    NotAFile { volume: String, path: PathBuf },
    #[error("volume {volume} refers to pool {pool}, which is not declared or not available")]
    NoPool { volume: String, pool: String },
    #[error("data partition {label}: {message}")]
    DataPartition { label: String, message: String },
    #[error("{command}: {message}")]
    Command { command: String, message: String },
}

/// Sizes in operator units: exact binary units when they divide, else MiB with decimals.
pub fn human(bytes: u64) -> String {
    let b = crate::config::ByteSize(bytes);
    let exact = b.to_string();
    if !exact.ends_with('B') || exact.ends_with("iB") || bytes < 1024 {
        return exact;
    }
    format!("{:.1}MiB ({bytes} bytes)", bytes as f64 / (1u64 << 20) as f64)
}

/// Which part of storage an [`Item`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pool,
    Volume,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pool => "pool",
            Kind::Volume => "volume",
        })
    }
}

/// The outcome of one pool or volume (named POOL/NAME) of [`reconcile`].
pub type Item = crate::outcome::Item<Kind, StorageError>;

#[derive(Debug, Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    fn push(&mut self, kind: Kind, name: &str, result: Result<String, StorageError>) {
        self.items.push(Item::logged(kind, name, result));
    }

    pub fn is_ok(&self) -> bool {
        outcome::all_ok(&self.items)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Item> {
        outcome::errors(&self.items)
    }

    /// Whether volume `v` is ready (guests using it can start).
    pub fn volume_ok(&self, v: &PoolPath) -> bool {
        outcome::succeeded(&self.items, Kind::Volume, &v.to_string())
    }
}

/// Makes the declared pools and every guest's volumes exist under `data_root`.
/// Idempotent; each pool and volume is reported on its own, and a failure in one
/// does not stop the others.
pub fn reconcile(cfg: &Config, data_root: &Path) -> Report {
    let mut report = Report::default();
    let mut ready = Vec::new();
    for p in &cfg.storage.pools {
        let r = pool::ensure(data_root, p);
        if r.is_ok() {
            ready.push(p.name.value.clone());
        }
        report.push(Kind::Pool, &p.name, r);
    }
    for spec in volume::declared(cfg) {
        let name = spec.volume.to_string();
        let r = if ready.contains(&spec.volume.pool) {
            let pool = cfg.storage.pools.iter().find(|p| p.name.value == spec.volume.pool);
            volume::ensure(data_root, pool.and_then(|p| p.size.as_ref().map(|s| s.bytes())), &spec)
        } else {
            Err(StorageError::NoPool {
                volume: name.clone(),
                pool: spec.volume.pool.clone(),
            })
        };
        report.push(Kind::Volume, &name, r);
    }
    report
}

/// Reads until `buf` is full or the input ends; the bytes read.
pub(crate) fn read_up_to(f: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
