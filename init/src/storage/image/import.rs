//! One import: receive the file (hashing it, writing it sparsely, bounded by the
//! pool's room), verify the checksum, convert qcow2 to raw, and only then give the
//! image its name.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tracing::info;

use super::{ImageError, ImageInfo, check_name, dir, meta_path, qcow2, raw_path};
use crate::storage::sparse::{OverBudget, SparseWriter};

/// Read size while receiving.
const CHUNK: usize = 1 << 20;

/// Names being imported right now (by raw path), so two imports of one name do not
/// write the same hidden files.
static IN_PROGRESS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

#[derive(Clone, Debug, Default)]
pub struct ImportRequest {
    pub name: String,
    /// Expected sha256 of the file as sent (hex).
    pub sha256: Option<String>,
}

/// Removes the hidden files of an import unless it succeeded, and releases the name.
struct Scratch {
    key: PathBuf,
    files: Vec<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        let mut set = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.key);
        }
    }
}

/// Imports `reader` as image `req.name` into the pool at `pool_dir`, allocating at
/// most `budget` bytes there.
pub fn import(
    pool: &str,
    pool_dir: &Path,
    budget: u64,
    req: &ImportRequest,
    mut reader: impl Read,
) -> Result<ImageInfo, ImageError> {
    let name = req.name.as_str();
    check_name(name)?;
    let expected = req.sha256.as_deref().map(parse_sha256).transpose()?;
    let raw = raw_path(pool_dir, name);
    let meta = meta_path(pool_dir, name);
    {
        let mut set = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
        if !set.get_or_insert_with(HashSet::new).insert(raw.clone()) {
            return Err(ImageError::Busy(name.to_owned()));
        }
    }
    let images = dir(pool_dir);
    let upload = images.join(format!(".{name}.upload"));
    let partial = images.join(format!(".{name}.partial"));
    // Removed on every way out but success (and leftovers of a cut-off import now).
    let scratch = Scratch {
        key: raw.clone(),
        files: vec![
            upload.clone(),
            partial.clone(),
            images.join(format!(".{name}.json.tmp")),
        ],
    };
    for f in &scratch.files {
        let _ = std::fs::remove_file(f);
    }
    if raw.exists() || meta.exists() {
        return Err(ImageError::Exists(name.to_owned()));
    }
    std::fs::create_dir_all(&images).map_err(|e| ImageError::io(&images, "create", e))?;

    // Receive.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&upload)
        .map_err(|e| ImageError::io(&upload, "create", e))?;
    let mut w = SparseWriter::new(file, budget);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ImageError::Interrupted {
                    received,
                    why: e.to_string(),
                });
            }
        };
        received += n as u64;
        if received > qcow2::MAX_VIRTUAL_SIZE {
            return Err(ImageError::TooLarge {
                virtual_size: received,
                limit: qcow2::MAX_VIRTUAL_SIZE,
            });
        }
        hasher.update(&buf[..n]);
        if let Err(OverBudget { needed, budget }) =
            w.write(&buf[..n]).map_err(|e| ImageError::io(&upload, "write", e))?
        {
            return Err(ImageError::NoSpace {
                needed,
                available: budget,
            });
        }
    }
    let upload_allocated = w.allocated;
    let mut file = w.finish(received).map_err(|e| ImageError::io(&upload, "sync", e))?;
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = expected
        && expected != sha256
    {
        return Err(ImageError::Checksum {
            expected,
            actual: sha256,
        });
    }
    if received == 0 {
        return Err(ImageError::BadQcow2("the file is empty".into()));
    }

    // Convert, or take as it is.
    let mut magic = [0u8; 4];
    if received >= 4 {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_exact(&mut magic))
            .map_err(|e| ImageError::io(&upload, "read", e))?;
    }
    drop(file);
    let (format, virtual_size) = if magic == qcow2::MAGIC {
        let room = budget.saturating_sub(upload_allocated);
        let size = qcow2::convert(&upload, &partial, room)?;
        std::fs::rename(&partial, &raw).map_err(|e| ImageError::io(&raw, "rename", e))?;
        ("qcow2", size)
    } else {
        if received > budget {
            return Err(ImageError::NoSpace {
                needed: received,
                available: budget,
            });
        }
        std::fs::rename(&upload, &raw).map_err(|e| ImageError::io(&raw, "rename", e))?;
        ("raw", received)
    };
    let mut info = ImageInfo {
        name: name.to_owned(),
        pool: pool.to_owned(),
        source: format!("{pool}/images/{name}.raw"),
        format: format.to_owned(),
        virtual_size,
        allocated: 0,
        sha256,
        imported_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    {
        use std::os::unix::fs::MetadataExt;
        info.allocated = std::fs::metadata(&raw).map(|m| m.blocks() * 512).unwrap_or(0);
    }
    let tmp = images.join(format!(".{name}.json.tmp"));
    let written = serde_json::to_vec_pretty(&info)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &meta));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&raw);
        return Err(ImageError::io(&meta, "write", e));
    }
    drop(scratch);
    info!(
        image = name,
        pool,
        format,
        virtual_size,
        allocated = info.allocated,
        sha256 = info.sha256.as_str(),
        "image imported"
    );
    Ok(info)
}

fn parse_sha256(s: &str) -> Result<String, ImageError> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(ImageError::BadChecksumArg(s))
    }
}
