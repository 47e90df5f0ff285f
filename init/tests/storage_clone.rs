//! Seeding a volume from an image, on the file systems KEEL-DATA can be: XFS made
//! with `mkfs.xfs -m reflink=1` (the volume shares the image's blocks: nothing is
//! allocated, whatever the image's size) and ext4 (an appliance from before: a sparse
//! copy, and `keelctl host`'s probe says clones are not instant there). Both are real
//! kernel file systems on loop devices.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use keel_init::config::PoolPath;
use keel_init::storage::volume::{self, VolumeSpec};

const MIB: u64 = 1 << 20;

/// A file system of `kind` on a loop device, mounted at `dir/mnt`; unmounted on drop.
struct Mounted {
    mnt: PathBuf,
}

impl Mounted {
    fn new(dir: &Path, kind: &str) -> Mounted {
        let img = dir.join(format!("{kind}.img"));
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(8 << 30).unwrap();
        let out = match kind {
            "xfs" => Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&img)
                .output(),
            _ => Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4"])
                .arg(&img)
                .output(),
        }
        .unwrap_or_else(|e| panic!("mkfs {kind}: {e}; run ci/setup (xfsprogs, e2fsprogs)"));
        assert!(
            out.status.success(),
            "mkfs {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mnt = dir.join(format!("{kind}-mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        common::run_ok("mount", &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()]);
        Mounted { mnt }
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mnt).unwrap();
        s.blocks_free() as u64 * s.fragment_size() as u64
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// A 2 GiB image with 64 MiB of data spread over it.
fn write_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(2 << 30).unwrap();
    let chunk: Vec<u8> = (0..4 * MIB).map(|i| (i % 253) as u8 | 1).collect();
    for i in 0..16u64 {
        f.write_all_at(&chunk, i * 128 * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

fn seed(root: &Path) -> (String, u64, f64) {
    let spec = VolumeSpec {
        volume: "p/web".parse::<PoolPath>().unwrap(),
        size: 4 << 30,
        source: Some("p/images/deb.raw".parse::<PoolPath>().unwrap()),
    };
    let started = Instant::now();
    let summary = volume::ensure(root, None, &spec).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let len = std::fs::metadata(root.join("pools/p/web")).unwrap().len();
    (summary, len, secs)
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let nb = fb.read(&mut bb).unwrap();
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

#[test]
fn on_xfs_a_volume_shares_the_images_blocks_and_on_ext4_it_is_a_sparse_copy() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    for kind in ["xfs", "ext4"] {
        let fs = Mounted::new(dir.path(), kind);
        let image = fs.mnt.join("pools/p/images/deb.raw");
        write_image(&image);
        let free_before = fs.free();
        let (summary, len, secs) = seed(&fs.mnt);
        let allocated = free_before.saturating_sub(fs.free());
        eprintln!(
            "{kind}: seeded a 4 GiB volume from a 2 GiB image in {:.1} ms, {allocated} bytes allocated: {summary}",
            secs * 1e3
        );
        assert_eq!(len, 4 << 30, "{kind}: the volume has its declared size");
        let volume = fs.mnt.join("pools/p/web");
        {
            // The first 2 GiB are the image's.
            let v = std::fs::File::open(&volume).unwrap();
            let head = fs.mnt.join("head");
            let out = std::fs::File::create(&head).unwrap();
            std::io::copy(&mut std::io::Read::take(v, 2 << 30), &mut &out).unwrap();
            assert!(
                same_bytes(&head, &image),
                "{kind}: the volume's data differs from the image's"
            );
            std::fs::remove_file(&head).unwrap();
        }
        let probe = keel_init::api::host::clones(&fs.mnt);
        assert_eq!(probe.filesystem, kind);
        match kind {
            "xfs" => {
                assert!(summary.contains("reflink"), "{summary}");
                assert!(allocated < MIB, "xfs: the clone allocated {allocated} bytes");
                assert_eq!(probe.method, "reflink");
                assert!(probe.note.is_none());
            }
            _ => {
                assert!(summary.contains("sparse copy"), "{summary}");
                assert!(
                    (64 * MIB..80 * MIB).contains(&allocated),
                    "ext4: {allocated} bytes for 64 MiB of data"
                );
                assert_eq!(probe.method, "sparse copy");
                assert!(probe.note.as_deref().unwrap_or("").contains("not instant"), "{probe:?}");
            }
        }
    }
}
