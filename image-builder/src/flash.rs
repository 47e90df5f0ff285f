//! `keel-image flash`: writes an image to a disk, then proves it arrived.
//!
//! Refuses, before writing anything: a target that does not exist, is neither a block
//! device nor a regular file, is smaller than the image, is the image itself, is in
//! use as swap, or is mounted — itself or any of its partitions, found by device
//! number in `/proc/self/mountinfo` and by the mount source's path. On a block device
//! the kernel is asked too: `O_EXCL` fails while a filesystem or device mapper holds it.
//! After writing it fsyncs, drops the target's cached pages, reads the bytes back from
//! the device and compares their sha256 with the image's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

const CHUNK: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: does not exist (flash writes an existing disk or file)", .0.display())]
    Missing(PathBuf),
    #[error("{}: is neither a block device nor a regular file", .0.display())]
    NotADisk(PathBuf),
    #[error("{}: is the image itself", .0.display())]
    SameFile(PathBuf),
    #[error("{}: is mounted ({what} on {mount_point}); unmount it first", target.display())]
    Mounted {
        target: PathBuf,
        what: String,
        mount_point: String,
    },
    #[error("{}: is in use as swap; swapoff it first", .0.display())]
    Swap(PathBuf),
    #[error("{}: is in use (the kernel refused exclusive access: {source}); is it mounted or part of a RAID/LVM?", target.display())]
    Busy { target: PathBuf, source: std::io::Error },
    #[error("{}: is {size} bytes, smaller than the {image_size}-byte image", target.display())]
    TooSmall {
        target: PathBuf,
        size: u64,
        image_size: u64,
    },
    #[error("{}: read back sha256 {read_back} differs from the image's {image}: the device did not store the image", target.display())]
    VerifyFailed {
        target: PathBuf,
        image: String,
        read_back: String,
    },
}

/// What `flash` found out about its target before writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    pub block_device: bool,
    pub size: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FlashReport {
    pub target: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub write_secs: f64,
    pub verify_secs: f64,
}

/// One line of `/proc/self/mountinfo`, the fields flash cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mount_point: String,
    pub source: String,
}

/// Parses mountinfo text (`man 5 proc`: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point: unescape(fields.get(4)?),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push(d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')) as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks `target` for `image` without writing anything.
pub fn check_target(image: &Path, target: &Path) -> Result<Target, FlashError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| FlashError::Io { path, source }
    };
    let image_meta = std::fs::metadata(image).map_err(io_err(image))?;
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FlashError::Missing(target.to_owned())),
        Err(e) => return Err(io_err(target)(e)),
    };
    let block_device = meta.file_type().is_block_device();
    if !block_device && !meta.is_file() {
        return Err(FlashError::NotADisk(target.to_owned()));
    }
    if meta.dev() == image_meta.dev() && meta.ino() == image_meta.ino() {
        return Err(FlashError::SameFile(target.to_owned()));
    }

    let canonical = std::fs::canonicalize(target).map_err(io_err(target))?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    let mounts = parse_mountinfo(&mountinfo);
    // Devices whose mounting makes the target busy: the device, its partitions, and for
    // a regular file the loop devices it backs.
    let mut devices: Vec<(u32, u32, String)> = Vec::new();
    if block_device {
        let (major, minor) = (
            nix::sys::stat::major(meta.rdev()) as u32,
            nix::sys::stat::minor(meta.rdev()) as u32,
        );
        devices.push((major, minor, canonical.display().to_string()));
        devices.extend(partitions_of(major, minor));
    } else {
        devices.extend(loop_devices_backed_by(&canonical));
    }
    for m in &mounts {
        let by_number = devices.iter().find(|(ma, mi, _)| *ma == m.major && *mi == m.minor);
        let by_path = std::fs::canonicalize(&m.source).ok().filter(|p| *p == canonical);
        if let Some((_, _, what)) = by_number {
            return Err(FlashError::Mounted {
                target: target.to_owned(),
                what: what.clone(),
                mount_point: m.mount_point.clone(),
            });
        }
        if by_path.is_some() {
            return Err(FlashError::Mounted {
                target: target.to_owned(),
                what: m.source.clone(),
                mount_point: m.mount_point.clone(),
            });
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        let in_swap = swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .any(|p| std::fs::canonicalize(unescape(p)).ok().as_deref() == Some(canonical.as_path()));
        if in_swap {
            return Err(FlashError::Swap(target.to_owned()));
        }
    }

    let size = crate::inspect::device_size(&File::open(target).map_err(io_err(target))?).map_err(io_err(target))?;
    if size < image_meta.len() {
        return Err(FlashError::TooSmall {
            target: target.to_owned(),
            size,
            image_size: image_meta.len(),
        });
    }
    Ok(Target {
        path: target.to_owned(),
        block_device,
        size,
    })
}

/// `(major, minor, name)` of the partitions of block device `major:minor`, from sysfs.
fn partitions_of(major: u32, minor: u32) -> Vec<(u32, u32, String)> {
    let dir = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| {
            let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
            let (ma, mi) = dev.trim().split_once(':')?;
            Some((
                ma.parse().ok()?,
                mi.parse().ok()?,
                format!("/dev/{}", e.file_name().to_string_lossy()),
            ))
        })
        .collect()
}

/// Loop devices (and their partitions) whose backing file is `file`.
fn loop_devices_backed_by(file: &Path) -> Vec<(u32, u32, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if backing.trim_end_matches('\n') != file.to_string_lossy() {
            continue;
        }
        let Ok(dev) = std::fs::read_to_string(e.path().join("dev")) else {
            continue;
        };
        let Some((ma, mi)) = dev.trim().split_once(':') else {
            continue;
        };
        let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) else {
            continue;
        };
        out.push((
            ma,
            mi,
            format!("/dev/{} (backed by this file)", e.file_name().to_string_lossy()),
        ));
        out.extend(partitions_of(ma, mi));
    }
    out
}

/// Writes `image` to `target` and verifies it. `progress` counts bytes, twice the image
/// size in all (write, then read back).
pub fn flash(image: &Path, target: &Path, progress: &ProgressBar) -> Result<FlashReport, FlashError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| FlashError::Io { path, source }
    };
    let checked = check_target(image, target)?;
    let mut src = File::open(image).map_err(io_err(image))?;
    let image_size = src.metadata().map_err(io_err(image))?.len();
    progress.set_length(2 * image_size);

    let mut opts = OpenOptions::new();
    opts.write(true);
    if checked.block_device {
        opts.custom_flags(libc::O_EXCL);
    }
    let mut dst = opts.open(target).map_err(|source| {
        if source.raw_os_error() == Some(libc::EBUSY) {
            FlashError::Busy {
                target: target.to_owned(),
                source,
            }
        } else {
            FlashError::Io {
                path: target.to_owned(),
                source,
            }
        }
    })?;

    progress.set_message("writing");
    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_full(&mut src, &mut buf).map_err(io_err(image))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(io_err(target))?;
        progress.inc(n as u64);
    }
    progress.set_message("syncing");
    dst.sync_all().map_err(io_err(target))?;
    let write_time = started.elapsed();
    if checked.block_device {
        reread_partition_table(&dst, target);
    }
    let image_sha = hex::encode(hasher.finalize());

    // Read back from the device, not from the page cache we just filled.
    progress.set_message("verifying");
    let started = Instant::now();
    let _ = nix::fcntl::posix_fadvise(&dst, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    drop(dst);
    let mut back = File::open(target).map_err(io_err(target))?;
    let _ = nix::fcntl::posix_fadvise(&back, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    let mut hasher = Sha256::new();
    let mut left = image_size;
    while left > 0 {
        let want = (left as usize).min(CHUNK);
        let n = read_full(&mut back, &mut buf[..want]).map_err(io_err(target))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
        progress.inc(n as u64);
    }
    let read_sha = hex::encode(hasher.finalize());
    if left != 0 || read_sha != image_sha {
        return Err(FlashError::VerifyFailed {
            target: target.to_owned(),
            image: image_sha,
            read_back: read_sha,
        });
    }
    Ok(FlashReport {
        target: target.to_owned(),
        bytes: image_size,
        sha256: image_sha,
        write_secs: secs(write_time),
        verify_secs: secs(started.elapsed()),
    })
}

nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Asks the kernel to read the new partition table, so the new partitions appear without
/// replugging the disk. Failure is not fatal: the image is written either way.
fn reread_partition_table(device: &File, path: &Path) {
    use std::os::fd::AsRawFd;
    // SAFETY: BLKRRPART takes no argument and only acts on the block device behind the
    // descriptor, which we hold open (exclusively) for the call.
    if let Err(e) = unsafe { blkrrpart(device.as_raw_fd()) } {
        tracing::warn!(
            "{}: the kernel did not re-read the partition table ({e}); replug the disk or run `partprobe` to see the new partitions",
            path.display()
        );
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Reads until `buf` is full or the end of the file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let text = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    90 27 7:3 / /mnt/my\\040disk rw - vfat /dev/loop3p2 rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].major, m[0].minor, m[0].source.as_str()), (254, 0, "/dev/vda"));
        assert_eq!(m[1].mount_point, "/mnt/my disk");
        assert_eq!(m[1].source, "/dev/loop3p2");
    }
}
