//! KEEL-DATA: the partition that holds pools, leases and other state — XFS with
//! reflinks when Keel creates it (ext4 when it is under 512 MiB), and an ext4 made by
//! an earlier Keel is kept and used as it is.
//!
//! On every boot [`prepare_data`] finds it by GPT partition label, then:
//! 1. grows the partition to the end of the disk when the image was flashed to a
//!    larger disk (rewrites the GPT with the `gpt` crate, moving the backup
//!    header to the real end, and tells the kernel with BLKPG_RESIZE_PARTITION,
//!    which works while other partitions of the disk are in use);
//! 2. creates the filesystem on first boot (`mkfs.xfs -m reflink=1 -L KEEL-DATA`), but
//!    only on a partition that is still all zeros, never over foreign data;
//! 3. mounts it, and grows the filesystem online (`xfs_growfs`, or `resize2fs` for
//!    ext4) when it is smaller than its partition.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{StorageError, human};

/// The smallest KEEL-DATA made XFS (mkfs.xfs refuses below 300 MiB); a smaller one is ext4.
const MIN_XFS: u64 = 512 << 20;

/// Where to look and what to do.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// GPT partition name of the data partition.
    pub label: String,
    pub mount_point: PathBuf,
    /// sysfs block class (tests point it elsewhere only to test lookup).
    pub sys_class_block: PathBuf,
    pub dev_dir: PathBuf,
    /// How long to wait for the partition to appear (disk drivers probe late).
    pub device_timeout: Duration,
    /// Grow partition and filesystem to the end of the disk.
    pub grow: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            label: "KEEL-DATA".into(),
            mount_point: PathBuf::from("/data"),
            sys_class_block: PathBuf::from("/sys/class/block"),
            dev_dir: PathBuf::from("/dev"),
            device_timeout: Duration::from_secs(10),
            grow: true,
        }
    }
}

/// The mounted data partition and what was done to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFs {
    /// The partition's device node, e.g. /dev/vda3.
    pub device: PathBuf,
    /// The whole disk, e.g. /dev/vda.
    pub disk: PathBuf,
    pub partition: u32,
    pub mount_point: PathBuf,
    /// The filesystem was created on this boot.
    pub formatted: bool,
    /// The partition was grown on this boot: (old, new) size in bytes.
    pub grown: Option<(u64, u64)>,
    /// The filesystem was resized on this boot: (old, new) size in bytes.
    pub resized: Option<(u64, u64)>,
}

/// A partition found through sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub device: PathBuf,
    pub disk: PathBuf,
    pub number: u32,
    /// Size in bytes as the kernel sees it.
    pub size: u64,
}

fn part_err(label: &str, message: impl Into<String>) -> StorageError {
    StorageError::DataPartition {
        label: label.to_owned(),
        message: message.into(),
    }
}

/// Finds, grows, formats and mounts the data partition. Idempotent: on a
/// second call everything is found in place and only mounting is skipped.
pub fn prepare_data(opts: &DataOptions) -> Result<DataFs, StorageError> {
    let label = opts.label.as_str();
    let mut part = wait_for_partition(opts)?;
    tracing::info!(label, device = %part.device.display(), "data partition found ({})", human(part.size));

    let mounted = is_mounted(&opts.mount_point, &part.device)?;
    let mut grown = None;
    if opts.grow
        && !mounted
        && let Some((old, new)) = grow_partition_table(&part.disk, part.number, label)?
    {
        tell_kernel_new_size(&part, new)?;
        part = wait_for_size(opts, &part, new)?;
        tracing::info!(label, "partition grown from {} to {}", human(old), human(new));
        grown = Some((old, new));
    }

    let read_superblock = || {
        probe(&part.device).map_err(|source| StorageError::Io {
            path: part.device.clone(),
            op: "read superblock",
            source,
        })
    };
    let mut found = read_superblock()?;
    let mut formatted = false;
    if !mounted {
        match found {
            Probe::Ext { .. } | Probe::Xfs { .. } => {}
            Probe::Blank if part.size >= MIN_XFS => {
                // XFS with reflinks: a volume seeded from an image shares its blocks
                // (storage::clone), instant and allocating nothing.
                tracing::info!(label, device = %part.device.display(), "first boot: creating the xfs filesystem (reflink=1)");
                run(Command::new("mkfs.xfs")
                    .args(["-q", "-f", "-m", "reflink=1", "-L", label])
                    .arg(&part.device))?;
                formatted = true;
            }
            Probe::Blank => {
                tracing::info!(label, device = %part.device.display(), "first boot: creating the ext4 filesystem (too small for xfs)");
                run(Command::new("mke2fs")
                    .args([
                        "-t",
                        "ext4",
                        "-q",
                        "-F",
                        "-L",
                        label,
                        "-E",
                        "lazy_itable_init=1,lazy_journal_init=1",
                    ])
                    .arg(&part.device))?;
                formatted = true;
            }
            Probe::Foreign => {
                return Err(part_err(
                    label,
                    format!(
                        "{} holds data that is not an xfs or ext2/3/4 filesystem; refusing to format it (wipe it with `wipefs -a` to let Keel create the filesystem)",
                        part.device.display()
                    ),
                ));
            }
        }
        if formatted {
            found = read_superblock()?;
        }
        let fstype = match found {
            Probe::Xfs { .. } => "xfs",
            _ => "ext4",
        };
        std::fs::create_dir_all(&opts.mount_point).map_err(|source| StorageError::Io {
            path: opts.mount_point.clone(),
            op: "create mount point",
            source,
        })?;
        use nix::mount::{MsFlags, mount};
        mount(
            Some(&part.device),
            &opts.mount_point,
            Some(fstype),
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(|e| StorageError::Io {
            path: opts.mount_point.clone(),
            op: if fstype == "xfs" { "mount xfs" } else { "mount ext4" },
            source: e.into(),
        })?;
    }

    // Grow the filesystem when the partition has room for at least 1 MiB more.
    // (Mounting does not change the size the superblock read above says.)
    let mut resized = None;
    let fs_size = match found {
        Probe::Ext { size } | Probe::Xfs { size } => Some(size),
        Probe::Blank | Probe::Foreign => None,
    };
    if opts.grow
        && let Some(size) = fs_size
        && part.size > size + (1 << 20)
    {
        // resize2fs takes the device, xfs_growfs the mount point (both grow online).
        match found {
            Probe::Xfs { .. } => run(Command::new("xfs_growfs").arg("-d").arg(&opts.mount_point))?,
            _ => run(Command::new("resize2fs").arg(&part.device))?,
        }
        tracing::info!(label, "filesystem grown from {} to {}", human(size), human(part.size));
        resized = Some((size, part.size));
    }
    Ok(DataFs {
        device: part.device,
        disk: part.disk,
        partition: part.number,
        mount_point: opts.mount_point.clone(),
        formatted,
        grown,
        resized,
    })
}

fn run(cmd: &mut Command) -> Result<(), StorageError> {
    // PID 1 may have no PATH; the initramfs keeps these tools in /sbin.
    cmd.env("PATH", "/sbin:/usr/sbin:/bin:/usr/bin");
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| StorageError::Command {
        command: shown.clone(),
        message: format!("cannot run: {e}"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(StorageError::Command {
            command: shown,
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

// ------------------------------------------------------------------ finding it

fn wait_for_partition(opts: &DataOptions) -> Result<PartitionInfo, StorageError> {
    let start = Instant::now();
    loop {
        if let Some(p) = find_partition(opts)? {
            return Ok(p);
        }
        if start.elapsed() >= opts.device_timeout {
            return Err(part_err(
                &opts.label,
                format!(
                    "no partition with this GPT name appeared within {:?}; is the disk attached and was the image written by keel-image?",
                    opts.device_timeout
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_size(opts: &DataOptions, part: &PartitionInfo, size: u64) -> Result<PartitionInfo, StorageError> {
    let start = Instant::now();
    loop {
        if let Some(p) = find_partition(opts)?
            && p.device == part.device
            && p.size == size
        {
            return Ok(p);
        }
        if start.elapsed() >= Duration::from_secs(5) {
            return Err(part_err(
                &opts.label,
                format!(
                    "the kernel still reports the old size of {} after resizing",
                    part.device.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The partition named `opts.label`: via /dev/disk/by-partlabel when udev made
/// it, else by scanning `PARTNAME=` in sysfs uevents.
pub fn find_partition(opts: &DataOptions) -> Result<Option<PartitionInfo>, StorageError> {
    let by_label = opts.dev_dir.join("disk/by-partlabel").join(&opts.label);
    if let Ok(real) = std::fs::canonicalize(&by_label)
        && let Some(name) = real.file_name().and_then(|n| n.to_str())
        && let Some(p) = partition_info(opts, name)
    {
        return Ok(Some(p));
    }
    let rd = match std::fs::read_dir(&opts.sys_class_block) {
        Ok(rd) => rd,
        Err(source) => {
            return Err(StorageError::Io {
                path: opts.sys_class_block.clone(),
                op: "list block devices",
                source,
            });
        }
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut found = Vec::new();
    for name in names {
        let Ok(uevent) = std::fs::read_to_string(opts.sys_class_block.join(&name).join("uevent")) else {
            continue;
        };
        if uevent
            .lines()
            .any(|l| l.strip_prefix("PARTNAME=") == Some(opts.label.as_str()))
            && let Some(p) = partition_info(opts, &name)
        {
            found.push(p);
        }
    }
    if found.len() > 1 {
        tracing::warn!(label = %opts.label, "several partitions carry this name; using {}", found[0].device.display());
    }
    Ok(found.into_iter().next())
}

fn partition_info(opts: &DataOptions, name: &str) -> Option<PartitionInfo> {
    let sys = opts.sys_class_block.join(name);
    let read = |f: &str| std::fs::read_to_string(sys.join(f)).ok().map(|s| s.trim().to_owned());
    let number: u32 = read("partition")?.parse().ok()?;
    let sectors: u64 = read("size")?.parse().ok()?;
    // /sys/class/block/vda3 -> .../block/vda/vda3: the parent is the disk.
    let real = std::fs::canonicalize(&sys).ok()?;
    let disk = real.parent()?.file_name()?.to_str()?.to_owned();
    Some(PartitionInfo {
        device: opts.dev_dir.join(name),
        disk: opts.dev_dir.join(disk),
        number,
        size: sectors * 512,
    })
}

fn is_mounted(mount_point: &Path, device: &Path) -> Result<bool, StorageError> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Ok(false);
    };
    let mp = std::fs::canonicalize(mount_point).unwrap_or_else(|_| mount_point.to_owned());
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(4).map(Path::new) == Some(mp.as_path()) {
            if f.get(sep + 2).map(Path::new) == Some(device) {
                return Ok(true);
            }
            return Err(StorageError::DataPartition {
                label: device.display().to_string(),
                message: format!(
                    "{} is already a mount point of {}",
                    mp.display(),
                    f.get(sep + 2).unwrap_or(&"?")
                ),
            });
        }
    }
    Ok(false)
}

// ------------------------------------------------------------------ filesystem probe

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// An ext2/3/4 filesystem of `size` bytes.
    Ext {
        size: u64,
    },
    /// An XFS of this many bytes.
    Xfs {
        size: u64,
    },
    /// Nothing but zeros where a filesystem would start.
    Blank,
    Foreign,
}

fn probe(device: &Path) -> io::Result<Probe> {
    let mut f = File::open(device)?;
    let mut head = vec![0u8; 1 << 20];
    let n = super::read_up_to(&mut f, &mut head)?;
    head.truncate(n);
    Ok(probe_bytes(&head))
}

/// Reads the ext superblock at offset 1024: magic 0xEF53 at 0x38, block count
/// (lo at 0x04, hi at 0x150 with the 64bit feature), log block size at 0x18.
fn probe_bytes(head: &[u8]) -> Probe {
    // XFS: "XFSB" at 0, then sb_blocksize (be32) and sb_dblocks (be64).
    if head.len() >= 16 && &head[..4] == b"XFSB" {
        let block = u64::from(u32::from_be_bytes([head[4], head[5], head[6], head[7]]));
        let blocks = u64::from_be_bytes([
            head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
        ]);
        return Probe::Xfs {
            size: blocks.saturating_mul(block),
        };
    }
    let sb = match head.get(1024..2048) {
        Some(sb) => sb,
        None => {
            return if head.iter().all(|b| *b == 0) {
                Probe::Blank
            } else {
                Probe::Foreign
            };
        }
    };
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16_at(0x38) == 0xEF53 {
        let incompat = u32_at(0x60);
        let hi = if incompat & 0x80 != 0 {
            u64::from(u32_at(0x150))
        } else {
            0
        };
        let blocks = (hi << 32) | u64::from(u32_at(0x04));
        let block_size = 1024u64 << u32_at(0x18).min(16);
        return Probe::Ext {
            size: blocks * block_size,
        };
    }
    if head.iter().all(|b| *b == 0) {
        Probe::Blank
    } else {
        Probe::Foreign
    }
}

// ------------------------------------------------------------------ growing the partition

/// Extends partition `number` (named `label`, the last one on the disk) to the
/// end of `disk`, moving the backup GPT there. Returns (old, new) size in bytes,
/// or `None` when less than 1 MiB would be gained. Works on block devices and
/// on image files alike.
pub fn grow_partition_table(disk: &Path, number: u32, label: &str) -> Result<Option<(u64, u64)>, StorageError> {
    let gerr = |e: gpt::GptError| part_err(label, format!("{}: GPT: {e}", disk.display()));
    let lb = logical_block_size(disk);
    let lb_bytes = lb.as_u64();
    let mut gdisk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .open(disk)
        .map_err(gerr)?;
    let mut parts = gdisk.partitions().clone();
    let Some(me) = parts.get(&number).cloned() else {
        return Err(part_err(
            label,
            format!("{}: GPT has no partition {number}", disk.display()),
        ));
    };
    if me.name != label {
        return Err(part_err(
            label,
            format!("{}: partition {number} is named `{}`", disk.display(), me.name),
        ));
    }
    if parts.values().any(|p| p.is_used() && p.first_lba > me.last_lba) {
        tracing::warn!(label, "not the last partition on {}; not growing it", disk.display());
        return Ok(None);
    }
    // The last usable sector once the backup GPT sits at the end of the disk:
    // disk end minus backup header (1) and entry array (num_parts * 128 bytes).
    let disk_bytes = device_size(disk).map_err(|source| StorageError::Io {
        path: disk.to_owned(),
        op: "size",
        source,
    })?;
    let total = disk_bytes / lb_bytes;
    let array = (u64::from(gdisk.header().num_parts) * u64::from(gdisk.header().part_size)).div_ceil(lb_bytes);
    let last_usable = total.saturating_sub(2 + array);
    // Keep the size a whole number of MiB.
    let per_mib = (1u64 << 20) / lb_bytes;
    let sectors = (last_usable + 1 - me.first_lba) / per_mib * per_mib;
    let new_last = me.first_lba + sectors - 1;
    if new_last < me.last_lba + per_mib {
        return Ok(None);
    }
    let old = (me.last_lba + 1 - me.first_lba) * lb_bytes;
    let new = (new_last + 1 - me.first_lba) * lb_bytes;
    if let Some(p) = parts.get_mut(&number) {
        p.last_lba = new_last;
    }
    gdisk.update_partitions(parts).map_err(gerr)?;
    gdisk.write_inplace().map_err(gerr)?;
    // Keep the protective MBR's size in step (its partition record only).
    let pmbr = gpt::mbr::ProtectiveMBR::with_lb_size((total - 1).min(u64::from(u32::MAX)) as u32);
    pmbr.update_conservative(gdisk.device_mut())
        .map_err(|e| part_err(label, format!("{}: protective MBR: {e}", disk.display())))?;
    Ok(Some((old, new)))
}

fn logical_block_size(disk: &Path) -> gpt::disk::LogicalBlockSize {
    let name = disk.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let sys = format!("/sys/class/block/{name}/queue/logical_block_size");
    match std::fs::read_to_string(sys)
        .ok()
        .map(|s| s.trim().to_owned())
        .as_deref()
    {
        Some("4096") => gpt::disk::LogicalBlockSize::Lb4096,
        _ => gpt::disk::LogicalBlockSize::Lb512,
    }
}

fn device_size(p: &Path) -> io::Result<u64> {
    let mut f = File::open(p)?;
    f.seek(SeekFrom::End(0))
}

/// struct blkpg_partition (linux/blkpg.h).
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// struct blkpg_ioctl_arg.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
nix::ioctl_write_ptr_bad!(blkpg, 0x1269, BlkpgIoctlArg);
nix::ioctl_none_bad!(blkrrpart, 0x125f);

/// Tells the kernel partition `part` now has `new_len` bytes. BLKPG works while
/// other partitions of the disk are in use; BLKRRPART (re-read the whole table)
/// is the fallback for kernels or devices that refuse it.
fn tell_kernel_new_size(part: &PartitionInfo, new_len: u64) -> Result<(), StorageError> {
    let err = |op, source| StorageError::Io {
        path: part.disk.clone(),
        op,
        source,
    };
    let disk = File::open(&part.disk).map_err(|e| err("open", e))?;
    let start = partition_start(part).map_err(|e| err("read partition start", e))?;
    let mut p = BlkpgPartition {
        start: start as i64,
        length: new_len as i64,
        pno: part.number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut p as *mut BlkpgPartition).cast(),
    };
    // SAFETY: valid fd of a block device; `arg` points to a live blkpg_partition.
    match unsafe { blkpg(disk.as_raw_fd(), &arg) } {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::debug!("BLKPG_RESIZE_PARTITION failed ({e}); re-reading the partition table");
            // SAFETY: valid fd of a block device; BLKRRPART takes no argument.
            unsafe { blkrrpart(disk.as_raw_fd()) }
                .map(|_| ())
                .map_err(|e2| err("tell the kernel the new partition size (BLKPG, BLKRRPART)", e2.into()))
        }
    }
}

fn partition_start(part: &PartitionInfo) -> io::Result<u64> {
    let name = part.device.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let s = std::fs::read_to_string(format!("/sys/class/block/{name}/start"))?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_tells_blank_ext_and_foreign_apart() {
        let mut head = vec![0u8; 4096];
        assert_eq!(probe_bytes(&head), Probe::Blank);
        head[1024 + 0x38] = 0x53;
        head[1024 + 0x39] = 0xEF;
        head[1024 + 0x04..1024 + 0x08].copy_from_slice(&1000u32.to_le_bytes());
        head[1024 + 0x18] = 2; // 4 KiB blocks
        assert_eq!(probe_bytes(&head), Probe::Ext { size: 1000 * 4096 });
        let mut foreign = vec![0u8; 4096];
        foreign[0] = 0xEB;
        assert_eq!(probe_bytes(&foreign), Probe::Foreign);
    }

    /// What Keel creates now: the file systems mkfs.xfs and mke2fs write, as probed.
    #[test]
    fn probe_reads_the_size_of_what_mkfs_xfs_and_mke2fs_write() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        for (tool, args) in [
            ("mkfs.xfs", &["-q", "-f", "-m", "reflink=1"][..]),
            ("mke2fs", &["-q", "-F", "-t", "ext4"][..]),
        ] {
            std::fs::File::create(&img).unwrap().set_len(MIN_XFS).unwrap();
            let out = Command::new(tool)
                .args(args)
                .arg(&img)
                .output()
                .unwrap_or_else(|e| panic!("{tool}: {e}; run ci/setup (xfsprogs, e2fsprogs)"));
            assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
            let size = match probe(&img).unwrap() {
                Probe::Xfs { size } if tool == "mkfs.xfs" => size,
                Probe::Ext { size } if tool == "mke2fs" => size,
                other => panic!("{tool}: probed as {other:?}"),
            };
            assert_eq!(size, MIN_XFS, "{tool}");
        }
    }
}
