//! The file systems on a guest's disk image, opened read-only: each GPT partition (or
//! the whole disk when it has no partition table) that holds ext2/3/4, through
//! `ext4-view`. Nothing here writes to the disk, and a guest's bytes are never trusted:
//! every read is bounded by its partition, every file by a size limit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Read};

use super::BootError;

/// Partitions looked at; GPT allows 128 by default and Keel reads no more.
const MAX_PARTITIONS: usize = 128;
/// The ext2/3/4 superblock starts 1,024 bytes in; its magic 56 bytes later.
const EXT4_MAGIC_OFFSET: u64 = 1024 + 56;

/// One ext2/3/4 file system of the disk.
pub(crate) struct Volume {
    /// The GPT partition number (1-based, as `/dev/vda1`), or None for the whole disk.
    pub partition: Option<u32>,
    pub uuid: String,
    pub label: String,
    pub fs: Ext4,
}

impl Volume {
    /// How an error message names it: "partition 16 (BOOT)".
    pub fn describe(&self) -> String {
        let place = match self.partition {
            Some(n) => format!("partition {n}"),
            None => "the whole disk".to_string(),
        };
        if self.label.is_empty() {
            place
        } else {
            format!("{place} ({})", self.label)
        }
    }
}

/// A byte window of the disk file: one partition, as ext4-view reads it.
struct Window {
    file: Arc<File>,
    start: u64,
    len: u64,
}

impl Ext4Read for Window {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(format!(
                "read of {} bytes at {start} is past the partition's {} bytes",
                dst.len(),
                self.len
            )
            .into());
        }
        self.file.read_exact_at(dst, self.start + start)?;
        Ok(())
    }
}

/// The disk's ext2/3/4 file systems in partition order, and a note for each partition
/// that was not one (for the error when nothing bootable is found).
pub(crate) fn filesystems(disk: &Path) -> Result<(Vec<Volume>, Vec<String>), BootError> {
    let open = |source| BootError::Open {
        disk: disk.to_path_buf(),
        source,
    };
    let file = Arc::new(File::open(disk).map_err(open)?);
    let size = file.metadata().map_err(open)?.len();
    let mut volumes = Vec::new();
    let mut skipped = Vec::new();
    let windows = match partitions(disk) {
        Some(parts) => parts,
        None => vec![(None, 0, size)],
    };
    for (partition, start, len) in windows {
        let len = len.min(size.saturating_sub(start));
        let window = Window {
            file: file.clone(),
            start,
            len,
        };
        let place = partition.map_or("the whole disk".to_string(), |n| format!("partition {n}"));
        let mut magic = [0u8; 2];
        if len < EXT4_MAGIC_OFFSET + 2
            || file.read_exact_at(&mut magic, start + EXT4_MAGIC_OFFSET).is_err()
            || magic != [0x53, 0xef]
        {
            skipped.push(format!("{place}: not ext2/3/4"));
            continue;
        }
        match Ext4::load(Box::new(window)) {
            Ok(fs) => volumes.push(Volume {
                partition,
                uuid: fs.uuid().to_string(),
                label: fs.label().to_str().unwrap_or("").to_string(),
                fs,
            }),
            Err(e) => skipped.push(format!("{place}: ext4 that cannot be read ({e})")),
        }
    }
    Ok((volumes, skipped))
}

/// GPT partitions as (number, start byte, length), or None when the disk has no GPT
/// (then the whole disk may be one file system).
fn partitions(disk: &Path) -> Option<Vec<(Option<u32>, u64, u64)>> {
    // Read-only, and one valid header is enough: a volume made bigger than the image it
    // was cloned from has its backup header in the middle until the guest moves it.
    let gpt = gpt::GptConfig::new().writable(false).open(disk).ok()?;
    let lb: u64 = (*gpt.logical_block_size()).into();
    let parts = gpt
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .take(MAX_PARTITIONS)
        .filter_map(|(&n, p)| {
            let start = p.first_lba.checked_mul(lb)?;
            let len = p.last_lba.checked_sub(p.first_lba)?.checked_add(1)?.checked_mul(lb)?;
            Some((Some(n), start, len))
        })
        .collect();
    Some(parts)
}
