//! The NoCloud seed as a disk: a vfat image labelled `CIDATA` holding the seed's files
//! in its root directory, which cloud-init finds by that label (blkid) and mounts.
//!
//! Written with `fatfs` (with long names: `network-config` is no 8.3 name). Its known
//! flaw, long-name entries in front of a subdirectory's `.` and `..`, cannot occur:
//! the seed has no subdirectories, and the tests run `fsck.fat` on what it writes.
//! The image is written beside its final name and renamed over it, so a VMM that is
//! starting never sees half a seed.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// What cloud-init's NoCloud datasource looks for (it compares without case).
pub const LABEL: [u8; 11] = *b"CIDATA     ";
const MIB: u64 = 1 << 20;

/// Writes `files` into a fresh vfat image at `path`: their size plus 1 MiB of room,
/// rounded up to whole MiB (a FAT12 volume; the file is sparse).
pub fn write(path: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    let content: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let size = (content + MIB).div_ceil(MIB) * MIB;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        disk.set_len(size)?;
        fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(LABEL))?;
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
            let root = fs.root_dir();
            for (name, data) in files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(data)?;
                f.flush()?;
            }
            drop(root);
            fs.unmount()?;
        }
        disk.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn files_read_back_with_their_long_names_and_the_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        let big = vec![b'x'; 3 * MIB as usize / 2];
        write(&path, &[("meta-data", b"instance-id: a\n"), ("network-config", &big)]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
        let disk = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.read_volume_label_from_root_dir().unwrap().as_deref(), Some("CIDATA"));
        let mut text = Vec::new();
        fs.root_dir()
            .open_file("network-config")
            .unwrap()
            .read_to_end(&mut text)
            .unwrap();
        assert_eq!(text, big);
        assert!(!dir.path().join("cidata.tmp").exists());
    }
}
