//! `keelctl image import | list | rm` against keel-init in test mode: a qcow2 made by
//! `qemu-img` goes over the API socket into a pool and comes out as the raw disk
//! `qemu-img convert` makes of it; a wrong checksum leaves nothing behind.

mod common;
mod supervisor_support;

use supervisor_support::*;

const CONFIG: &str = "\
version: 1
storage:
  pools:
    - name: images
    - name: bulk
      size: 1GiB
";

#[test]
fn images_go_in_with_progress_checksums_and_come_out_as_qemu_img_converts_them() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (keel-init's API socket is root-only); run it as root"
    );
    let app = Appliance::start(CONFIG, &[]);
    let work = tempfile::tempdir().unwrap();
    let w = |n: &str| work.path().join(n).to_str().unwrap().to_owned();
    // 48 MiB of disk with 8 MiB of data, as a zlib-compressed qcow2.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(w("disk.raw")).unwrap();
        f.set_len(48 << 20).unwrap();
        f.seek(SeekFrom::Start(20 << 20)).unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 0x10).collect();
        f.write_all(&data).unwrap();
    }
    common::qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &w("disk.raw"),
        &w("disk.qcow2"),
    ]);
    common::qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &w("disk.qcow2"),
        &w("reference.raw"),
    ]);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(w("disk.qcow2")).unwrap()))
    };
    let images_dir = app.path("var/lib/keel/pools/bulk/images");

    // Two pools: keelctl must be told which.
    let out = app.keelctl(&["image", "import", "deb", &w("disk.qcow2")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pool"), "{out:?}");

    // A wrong checksum: refused, nothing kept.
    let wrong = "ab".repeat(32);
    let out = app.keelctl(&[
        "image",
        "import",
        "--pool",
        "bulk",
        "--sha256",
        &wrong,
        "deb",
        &w("disk.qcow2"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{out:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&images_dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    let imported = app.ok(&[
        "--json",
        "image",
        "import",
        "--pool",
        "bulk",
        "--sha256",
        &sha,
        "deb",
        &w("disk.qcow2"),
    ]);
    let info: serde_json::Value = serde_json::from_str(&imported).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual_size"], 48u64 << 20, "{info}");
    assert_eq!(info["source"], "bulk/images/deb.raw", "{info}");
    assert!(
        std::fs::read(images_dir.join("deb.raw")).unwrap() == std::fs::read(w("reference.raw")).unwrap(),
        "the imported disk differs from qemu-img's conversion"
    );

    let list: serde_json::Value = serde_json::from_str(&app.ok(&["--json", "image", "list"])).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");
    assert_eq!(list[0]["sha256"], sha.as_str());
    assert!(app.ok(&["image", "list"]).contains("bulk/images/deb.raw"));
    let again = app.keelctl(&["image", "import", "--pool", "bulk", "deb", &w("disk.raw")]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );

    // More than the pool's 1 GiB cap of virtual disk: refused before anything is written.
    common::qemu_img(&["create", "-q", "-f", "qcow2", &w("big.qcow2"), "4G"]);
    let big = app.keelctl(&["image", "import", "--pool", "bulk", "big", &w("big.qcow2")]);
    assert!(String::from_utf8_lossy(&big.stderr).contains("to spare"), "{big:?}");

    app.ok(&["image", "rm", "--pool", "bulk", "deb"]);
    assert_eq!(app.ok(&["--json", "image", "list"]).trim(), "[]");
    assert!(std::fs::read_dir(&images_dir).unwrap().next().is_none());
}

#[test]
fn volumes_are_created_grown_cloned_and_removed_only_by_the_operator() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (keel-init's API socket is root-only)"
    );
    let config = "\
version: 1
storage:
  pools:
    - name: images
guests:
  - name: web
    memory: 32MiB
    autostart: false
    disks: [{volume: images/web-root, size: 64MiB}]
";
    let app = Appliance::start(config, &[]);
    let vols = |app: &Appliance| -> serde_json::Value {
        serde_json::from_str(&app.ok(&["--json", "volume", "list"])).unwrap()
    };
    let listed = vols(&app);
    assert_eq!(listed[0]["name"], "images/web-root", "{listed}");
    assert_eq!(listed[0]["used_by"][0], "web", "{listed}");

    app.ok(&["volume", "create", "images/scratch", "64MiB"]);
    let again = app.keelctl(&["volume", "create", "images/scratch", "64MiB"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(app.path("var/lib/keel/pools/images/scratch"))
            .unwrap();
        f.write_all_at(b"keel volume data", 5 << 20).unwrap();
    }
    let grown: serde_json::Value =
        serde_json::from_str(&app.ok(&["--json", "volume", "resize", "images/scratch", "128MiB"])).unwrap();
    assert_eq!(grown["size"], 128u64 << 20);
    let shrink = app.keelctl(&["volume", "resize", "images/scratch", "32MiB"]);
    assert!(
        String::from_utf8_lossy(&shrink.stderr).contains("never shrunk"),
        "{shrink:?}"
    );

    app.ok(&["volume", "clone", "images/scratch", "images/copy"]);
    assert_eq!(
        std::fs::read(app.path("var/lib/keel/pools/images/copy")).unwrap(),
        std::fs::read(app.path("var/lib/keel/pools/images/scratch")).unwrap()
    );

    let refused = app.keelctl(&["volume", "rm", "images/web-root"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("used by web"),
        "{refused:?}"
    );
    app.ok(&["volume", "rm", "--force", "images/web-root"]);
    app.ok(&["volume", "rm", "images/copy"]);
    let names: Vec<String> = vols(&app)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["images/scratch"]);
}
