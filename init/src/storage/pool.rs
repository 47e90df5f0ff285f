//! Pools: directories under `<data>/pools/`, with an optional cap on the space
//! their files allocate.

use std::path::{Path, PathBuf};

use super::{StorageError, human};
use crate::config::Pool;

/// The directory of pool `name`.
pub fn dir(data_root: &Path, name: &str) -> PathBuf {
    data_root.join("pools").join(name)
}

/// Creates the pool's directory when missing. Returns a summary line.
pub fn ensure(data_root: &Path, p: &Pool) -> Result<String, StorageError> {
    let d = dir(data_root, &p.name);
    match std::fs::symlink_metadata(&d) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StorageError::Io {
                path: d,
                op: "use as pool directory",
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a directory"),
            });
        }
        Err(_) => std::fs::create_dir_all(&d).map_err(|source| StorageError::Io {
            path: d.clone(),
            op: "create pool directory",
            source,
        })?,
    }
    let used = allocated(&d)?;
    Ok(match &p.size {
        Some(cap) => format!("{} allocated of {} cap", human(used), cap.value),
        None => format!("{} allocated", human(used)),
    })
}

/// Bytes the files under `dir` occupy on disk (st_blocks, so holes count nothing).
pub fn allocated(dir: &Path) -> Result<u64, StorageError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|source| StorageError::Io {
            path: d.clone(),
            op: "list",
            source,
        })?;
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// Bytes an unprivileged writer may still allocate on the filesystem of `path`.
pub fn available(path: &Path) -> Result<u64, StorageError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| StorageError::Io {
        path: path.to_owned(),
        op: "statvfs",
        source: e.into(),
    })?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}
