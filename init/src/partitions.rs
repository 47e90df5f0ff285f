//! Finding Keel's partitions by their GPT label.
//!
//! There is no udev on the appliance, so /dev/disk/by-partlabel does not exist;
//! the kernel publishes each partition's GPT name as `PARTNAME=` in its uevent file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The device node of the partition labelled `label`, if the kernel knows one.
pub fn find_by_label(sys_block: &Path, label: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("uevent")).ok())
        .filter_map(|uevent| {
            let mut devname = None;
            let mut partname = None;
            for line in uevent.lines() {
                if let Some(v) = line.strip_prefix("DEVNAME=") {
                    devname = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("PARTNAME=") {
                    partname = Some(v.to_string());
                }
            }
            (partname.as_deref() == Some(label)).then_some(devname).flatten()
        })
        .collect();
    // Deterministic if two disks carry Keel (e.g. a USB stick during install).
    found.sort();
    found.into_iter().next().map(|d| Path::new("/dev").join(d))
}

/// Waits for the partition to appear (disk drivers probe asynchronously).
pub fn wait_for_label(label: &str, timeout: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_by_label(Path::new("/sys/class/block"), label)
            && dev.exists()
        {
            return Some(dev);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_partitions_by_label_in_uevent_files() {
        let dir = tempfile::tempdir().unwrap();
        for (name, uevent) in [
            ("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n"),
            (
                "vda1",
                "MAJOR=254\nMINOR=1\nDEVNAME=vda1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=KEEL-ESP\n",
            ),
            (
                "vda2",
                "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=KEEL-CONFIG\n",
            ),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("uevent"), uevent).unwrap();
        }
        assert_eq!(
            find_by_label(dir.path(), "KEEL-CONFIG"),
            Some(PathBuf::from("/dev/vda2"))
        );
        assert_eq!(find_by_label(dir.path(), "KEEL-DATA"), None);
    }
}
