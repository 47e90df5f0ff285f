//! Writing the applied config to KEEL-CONFIG so the next boot uses it.
//!
//! A power cut at any point must leave a usable `keel.yaml`: the new text goes to
//! a temporary file that is fsynced and then renamed over `keel.yaml`; the
//! previous text is first saved as `keel.yaml.prev` the same way. There is never
//! a moment without a complete `keel.yaml` (FAT has no hard links, so "rename
//! the old one away" would open such a gap).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::layout;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the config to {}: {op}: {source}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub op: &'static str,
    pub source: std::io::Error,
}

/// Writes `text` as `dir/keel.yaml`, keeping the current one as `keel.yaml.prev`.
pub fn write(dir: &Path, text: &str) -> Result<(), StoreError> {
    let target = dir.join(layout::CONFIG_FILE);
    let prev = dir.join(format!("{}.prev", layout::CONFIG_FILE));
    match std::fs::read(&target) {
        Ok(old) => replace(&prev, &old)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError {
                path: target,
                op: "reading the current config",
                source,
            });
        }
    }
    replace(&target, text.as_bytes())?;
    sync_dir(dir);
    Ok(())
}

/// Replaces `path` with `bytes` through a fsynced temporary file and a rename.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |op, source| StoreError {
        path: tmp.clone(),
        op,
        source,
    };
    let mut f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| err("create", e))?;
    f.write_all(bytes).map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("fsync", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|source| StoreError {
        path: path.to_path_buf(),
        op: "rename",
        source,
    })?;
    // KEEL-CONFIG is FAT: Linux's vfat gives the renamed entry the file's size and first
    // cluster only when the file's inode is written back, so sync it under its new name.
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError {
            path: path.to_path_buf(),
            op: "fsync after rename",
            source,
        })
}

/// Makes the renames durable. Some filesystems refuse fsync on a directory; the
/// file data is already on disk then, so that is not an error worth failing on.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_previous_config() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "version: 1\n# one\n").unwrap();
        assert!(!dir.path().join("keel.yaml.prev").exists());
        write(dir.path(), "version: 1\n# two\n").unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read("keel.yaml"), "version: 1\n# two\n");
        assert_eq!(read("keel.yaml.prev"), "version: 1\n# one\n");
        assert!(!dir.path().join("keel.yaml.tmp").exists());
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let e = write(Path::new("/nonexistent/keel-config"), "version: 1\n").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/keel-config"), "{e}");
    }
}
