//! KEEL-DATA: growing the GPT of an image "flashed" to a bigger disk (a file).
//! (Finding, formatting and mounting need a kernel that scans GPT partitions on
//! loop devices, which these machines' kernel does not; ci/e2e covers them.)

use std::path::Path;
use std::process::Command;

use keel_init::storage::datafs::grow_partition_table;

const MIB: u64 = 1 << 20;

/// Writes a GPT like keel-image's (an ESP-like partition, then KEEL-DATA to the
/// end) for a disk of `gpt_size`, on a file of `file_size`.
fn image(path: &Path, gpt_size: u64, file_size: u64, label: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(gpt_size).unwrap();
    // The kernel only reads a GPT behind a protective MBR.
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(((gpt_size / 512) - 1).min(u32::MAX as u64) as u32);
    mbr.overwrite_lba0(&mut f).unwrap();
    drop(f);
    let mut disk = gpt::GptConfig::new().writable(true).create(path).unwrap();
    disk.add_partition("ESP", 8 * MIB, gpt::partition_types::EFI, 0, None)
        .unwrap();
    let free = disk.find_free_sectors();
    let (start, len) = *free.last().unwrap();
    let len_bytes = (len * 512) / MIB * MIB;
    disk.add_partition_at(label, 2, start, len_bytes / 512, gpt::partition_types::LINUX_FS, 0)
        .unwrap();
    disk.write().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(file_size).unwrap();
}

fn sfdisk_verify(path: &Path) -> String {
    let out = Command::new("sfdisk")
        .arg("--verify")
        .arg(path)
        .output()
        .expect("sfdisk (package fdisk)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn grows_the_last_partition_to_the_end_of_a_bigger_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    image(&img, 48 * MIB, 96 * MIB, "KEEL-DATA");
    let (old, new) = grow_partition_table(&img, 2, "KEEL-DATA").unwrap().expect("grown");
    assert!(old < 40 * MIB, "{old}");
    assert!(new > 85 * MIB && new <= 96 * MIB - MIB, "{new}");
    assert_eq!(new % MIB, 0);
    let disk = gpt::GptConfig::new().open(&img).unwrap();
    assert_eq!(
        disk.header().backup_lba,
        96 * MIB / 512 - 1,
        "backup GPT not at the end"
    );
    let p = &disk.partitions()[&2];
    assert_eq!((p.last_lba + 1 - p.first_lba) * 512, new);
    let v = sfdisk_verify(&img);
    assert!(v.contains("No errors detected"), "{v}");
    // Nothing more to gain the second time; a wrong label is refused.
    assert_eq!(grow_partition_table(&img, 2, "KEEL-DATA").unwrap(), None);
    let e = grow_partition_table(&img, 1, "KEEL-DATA").unwrap_err().to_string();
    assert!(e.contains("KEEL-DATA") && e.contains("ESP"), "{e}");
}
