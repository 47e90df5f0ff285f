//! Cloning a file into a new one: a reflink where the file system shares blocks
//! (XFS with `reflink=1`, btrfs: `FICLONE`, constant time, nothing allocated until
//! either side is written), else a sparse copy of the data regions (ext4).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

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
    let copied = super::volume::copy_sparse(src, dst, label)?;
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
