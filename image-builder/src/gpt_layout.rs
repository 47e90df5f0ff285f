//! The partition layout of a Keel disk and its GUID Partition Table.
//!
//! | # | label         | type (UAPI Discoverable Partitions Spec where one fits) | size |
//! |---|---------------|---------------------------------------------------------|------|
//! | 1 | `KEEL-ESP`    | EFI System Partition `c12a7328-f81f-11d2-ba4b-00a0c93ec93b` | 256 MiB |
//! | 2 | `KEEL-CONFIG` | Microsoft basic data `ebd0a0a2-b9e5-4433-87c0-68b6b72699c7` | 64 MiB |
//! | 3 | `KEEL-DATA`   | Linux generic data `0fc63daf-8483-4772-8e79-3d69d8477de4`  | the rest |
//!
//! Why these types: the ESP must be an ESP for the firmware to boot from it. The spec
//! has no type for "a small FAT volume the operator edits": XBOOTLDR would make
//! systemd-boot look for boot entries on it, and Linux generic data would hide it from
//! the Windows and macOS laptops that operators edit `keel.yaml` on before first boot;
//! "basic data" is what those systems mount. KEEL-DATA holds storage pools that only
//! Keel's PID 1 opens (by label); the spec's `/var` and `/srv` types would invite
//! systemd-gpt-auto-generator on a rescue system to mount it, so it is generic data.
//!
//! The ESP holds systemd-boot and up to three UKIs during an update (running,
//! previous, new), hence 256 MiB. Partitions start on 1 MiB boundaries. KEEL-DATA is
//! left unformatted: PID 1 formats it on first boot and grows it (and the GPT) to the
//! end of a larger device, so a small `--size` is fine for flashing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use gpt::partition_types::{OperatingSystem, Type};
use uuid::Uuid;

pub const SECTOR: u64 = 512;
pub const MIB: u64 = 1 << 20;
pub const ALIGNMENT: u64 = MIB;

pub const ESP_LABEL: &str = "KEEL-ESP";
pub const CONFIG_LABEL: &str = "KEEL-CONFIG";
pub const DATA_LABEL: &str = "KEEL-DATA";

pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const BASIC_DATA_TYPE: &str = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7";
pub const LINUX_DATA_TYPE: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

pub const ESP_SIZE: u64 = 256 * MIB;
pub const CONFIG_SIZE: u64 = 64 * MIB;
/// KEEL-DATA's smallest size at build time (PID 1 grows it on a larger device).
pub const MIN_DATA_SIZE: u64 = 64 * MIB;
/// Primary GPT (LBA 0-33) before the first partition, backup GPT (33 sectors) after the last.
const BACKUP_GPT_SECTORS: u64 = 33;

/// The smallest disk that holds the layout.
pub const MIN_DISK_SIZE: u64 = ALIGNMENT + ESP_SIZE + CONFIG_SIZE + MIN_DATA_SIZE + ALIGNMENT;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("disk size {size} bytes is too small: a Keel disk needs at least {min} bytes ({} MiB)", min / MIB)]
    TooSmall { size: u64, min: u64 },
    #[error("disk size {0} bytes is not a multiple of 512 bytes")]
    NotSectorMultiple(u64),
    #[error("writing the partition table: {0}")]
    Gpt(#[from] gpt::GptError),
    #[error("writing the protective MBR: {0}")]
    Mbr(#[from] gpt::mbr::MBRError),
    #[error("reading the partition table: {0}")]
    Read(String),
}

/// One partition of the layout, in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlan {
    pub number: u32,
    pub label: &'static str,
    pub type_guid: &'static str,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl PartitionPlan {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// Where every partition of a disk of `disk_size` bytes goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub esp: PartitionPlan,
    pub config: PartitionPlan,
    pub data: PartitionPlan,
}

impl Layout {
    pub fn plan(disk_size: u64) -> Result<Self, LayoutError> {
        if !disk_size.is_multiple_of(SECTOR) {
            return Err(LayoutError::NotSectorMultiple(disk_size));
        }
        if disk_size < MIN_DISK_SIZE {
            return Err(LayoutError::TooSmall {
                size: disk_size,
                min: MIN_DISK_SIZE,
            });
        }
        let lba = |bytes: u64| bytes / SECTOR;
        let esp_first = lba(ALIGNMENT);
        let esp_last = esp_first + lba(ESP_SIZE) - 1;
        let config_first = esp_last + 1;
        let config_last = config_first + lba(CONFIG_SIZE) - 1;
        let data_first = config_last + 1;
        // End KEEL-DATA on a 1 MiB boundary before the backup GPT.
        let last_usable = lba(disk_size) - BACKUP_GPT_SECTORS - 1;
        let align = lba(ALIGNMENT);
        let data_last = (last_usable + 1) / align * align - 1;
        let part = |number, label, type_guid, first_lba, last_lba| PartitionPlan {
            number,
            label,
            type_guid,
            first_lba,
            last_lba,
        };
        Ok(Self {
            disk_size,
            esp: part(1, ESP_LABEL, ESP_TYPE, esp_first, esp_last),
            config: part(2, CONFIG_LABEL, BASIC_DATA_TYPE, config_first, config_last),
            data: part(3, DATA_LABEL, LINUX_DATA_TYPE, data_first, data_last),
        })
    }

    pub fn partitions(&self) -> [&PartitionPlan; 3] {
        [&self.esp, &self.config, &self.data]
    }
}

/// GUIDs of a disk and its partitions (derived from the build's inputs by the caller).
#[derive(Debug, Clone)]
pub struct DiskIds {
    pub disk: Uuid,
    /// Indexed like `Layout::partitions()`.
    pub partitions: [Uuid; 3],
}

/// Writes the protective MBR, the primary and the backup GPT for `layout` to `file`,
/// whose length must already be the disk size.
pub fn write_gpt(file: &mut File, layout: &Layout, ids: &DiskIds) -> Result<(), LayoutError> {
    let sectors = layout.disk_size / SECTOR;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(file)?;

    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(&mut *file, Some(ids.disk))?;
    let mut table = BTreeMap::new();
    for (plan, guid) in layout.partitions().into_iter().zip(ids.partitions) {
        let part_type = Type {
            guid: Uuid::parse_str(plan.type_guid).map_err(|e| LayoutError::Read(e.to_string()))?,
            os: OperatingSystem::None,
        };
        table.insert(
            plan.number,
            gpt::partition::Partition {
                part_type_guid: part_type,
                part_guid: guid,
                first_lba: plan.first_lba,
                last_lba: plan.last_lba,
                flags: 0,
                name: plan.label.to_owned(),
            },
        );
    }
    disk.update_partitions(table)?;
    disk.write()?;
    Ok(())
}

/// A partition as read back from a disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionEntry {
    pub number: u32,
    pub label: String,
    pub type_guid: String,
    pub type_name: String,
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub offset: u64,
    pub size: u64,
}

/// The disk GUID and partitions of a GPT disk image or device.
pub fn read_gpt<D: Read + Seek + std::io::Write + std::fmt::Debug>(
    device: D,
) -> Result<(String, Vec<PartitionEntry>), LayoutError> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(device)
        .map_err(|e| LayoutError::Read(e.to_string()))?;
    let entries = disk
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(&number, p)| {
            let type_guid = p.part_type_guid.guid.to_string();
            PartitionEntry {
                number,
                label: p.name.clone(),
                type_name: type_name(&type_guid).to_owned(),
                type_guid,
                guid: p.part_guid.to_string(),
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                offset: p.first_lba * SECTOR,
                size: (p.last_lba + 1 - p.first_lba) * SECTOR,
            }
        })
        .collect();
    Ok((disk.guid().to_string(), entries))
}

/// A human name for the partition types Keel uses.
pub fn type_name(type_guid: &str) -> &'static str {
    match type_guid.to_ascii_lowercase().as_str() {
        ESP_TYPE => "EFI System",
        BASIC_DATA_TYPE => "Microsoft basic data",
        LINUX_DATA_TYPE => "Linux filesystem",
        _ => "other",
    }
}

/// A read-only view of `len` bytes of a file from `start`, for the FAT reader (which
/// wants `Write` too: writes fail).
#[derive(Debug)]
pub struct PartitionReader {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl PartitionReader {
    pub fn new(file: File, start: u64, len: u64) -> Self {
        Self {
            file,
            start,
            len,
            pos: 0,
        }
    }
}

impl Read for PartitionReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl std::io::Write for PartitionReader {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "partition opened read-only",
        ))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for PartitionReader {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start"))?;
        self.pos = new;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_fills_the_disk() {
        let l = Layout::plan(4 << 30).expect("4 GiB");
        for p in l.partitions() {
            assert_eq!(p.offset() % ALIGNMENT, 0, "{} starts aligned", p.label);
        }
        assert_eq!(l.esp.size(), ESP_SIZE);
        assert_eq!(l.config.first_lba, l.esp.last_lba + 1);
        assert_eq!((l.data.last_lba + 1) * SECTOR, (4 << 30) - MIB);
        assert!(matches!(Layout::plan(100 * MIB), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(
            Layout::plan(MIN_DISK_SIZE + 1),
            Err(LayoutError::NotSectorMultiple(_))
        ));
        Layout::plan(MIN_DISK_SIZE).expect("the minimum fits");
    }
}
