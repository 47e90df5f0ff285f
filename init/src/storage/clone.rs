//! Cloning a file into a new one: a reflink where the file system shares blocks
//! (XFS with `reflink=1`, btrfs: `FICLONE`, constant time, nothing allocated until
//! either side is written), else a sparse copy of the data regions (ext4).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::unistd::{Whence, lseek};

use super::human;
use super::sparse::{OverBudget, SparseWriter};

// FICLONE = _IOW(0x94, 9, int): linux/fs.h.
nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How a clone was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shared blocks: instant, nothing allocated.
    Reflink,
    /// The data regions were copied (holes stay holes).
    SparseCopy,
}

impl CloneMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::SparseCopy => "sparse copy",
        }
    }
}

/// Makes `dst` (an empty file) share `src`'s blocks. `Ok(false)`: this file system
/// (or this pair of files, e.g. on two file systems) cannot.
pub fn reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE reads the int argument (an fd we hold open) and touches no
    // memory of ours.
    match unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as nix::sys::ioctl::ioctl_param_type) } {
        Ok(_) => Ok(true),
        Err(
            nix::errno::Errno::EOPNOTSUPP
            | nix::errno::Errno::ENOTTY
            | nix::errno::Errno::EXDEV
            | nix::errno::Errno::EINVAL
            | nix::errno::Errno::ENOSYS,
        ) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Clones `src` into the empty file `dst`: a reflink if it can, else a sparse copy.
/// Returns how, and the bytes copied (0 for a reflink).
pub fn clone_into(src: &File, dst: &File, label: &str) -> io::Result<(CloneMethod, u64)> {
    if reflink(src, dst)? {
        return Ok((CloneMethod::Reflink, 0));
    }
    let copied = copy_sparse(src, dst, label)?;
    Ok((CloneMethod::SparseCopy, copied))
}

/// Whether files in `dir` can be reflinked: tries it on two small scratch files.
pub fn supports_reflink(dir: &Path) -> io::Result<bool> {
    use std::io::Write;
    let probe = dir.join(".keel-reflink-probe");
    let copy = dir.join(".keel-reflink-probe.clone");
    let result = (|| {
        // The source of FICLONE must be open for reading.
        let mut a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)?;
        a.write_all(&[0x4b; 4096])?;
        a.sync_all()?;
        let b = File::create(&copy)?;
        reflink(&a, &b)
    })();
    let _ = std::fs::remove_file(&probe);
    let _ = std::fs::remove_file(&copy);
    result
}

/// Copies the data regions of `src` to the same offsets in `dst`, leaving holes
/// (and blocks of zeros) unwritten. Returns the bytes written.
pub fn copy_sparse(src: &File, dst: &File, label: &str) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut w = SparseWriter::new(dst, u64::MAX);
    let mut next_log = len / 10;
    while w.position() < len {
        let data = match lseek(src, w.position() as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = (lseek(src, data as i64, Whence::SeekHole)? as u64).min(len);
        w.skip(data - w.position());
        while w.position() < hole {
            let pos = w.position();
            let n = ((hole - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            // An unbounded writer is never over its budget.
            let _: Result<(), OverBudget> = w.write(&buf[..n])?;
            if len >= 1 << 30 && w.position() >= next_log {
                tracing::info!(
                    volume = label,
                    "seeding: {}% ({} of {})",
                    w.position() * 100 / len,
                    human(w.position()),
                    human(len)
                );
                next_log = w.position() + len / 10;
            }
        }
    }
    Ok(w.allocated)
}
