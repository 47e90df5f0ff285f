//! Pools and volumes on a real filesystem (a temp dir): sparse creation,
//! seeding that keeps holes, space errors, idempotence, and volumes that outlive
//! the guests that declared them.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use keel_init::config::{Config, PoolPath, parse_str};
use keel_init::storage::{self, Kind, volume_path};

fn cfg(text: &str) -> Config {
    match parse_str(text) {
        Ok(l) => l.config,
        Err(d) => panic!("{}", d.render("test.yaml")),
    }
}

fn pp(s: &str) -> PoolPath {
    s.parse().unwrap()
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

const BASE: &str = "
version: 1
storage:
  pools:
    - name: fast
    - name: images
guests:
  - name: web
    memory: 64MiB
    disks:
      - {volume: fast/web-root, size: 1GiB}
      - {volume: fast/web-seeded, size: 64MiB, source: images/base.raw}
";

/// A 16 MiB image: data at 0 and at 8 MiB, holes elsewhere, one all-zero
/// (but allocated) megabyte at 4 MiB.
fn write_source(root: &Path) -> Vec<u8> {
    let dir = root.join("pools/images");
    std::fs::create_dir_all(&dir).unwrap();
    let f = File::create(dir.join("base.raw")).unwrap();
    f.set_len(16 << 20).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 4 << 20).unwrap();
    f.write_all_at(&data, 8 << 20).unwrap();
    f.sync_all().unwrap();
    data
}

#[test]
fn volumes_are_sparse_seeded_with_holes_and_reconcile_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = write_source(root);
    let c = cfg(BASE);

    let r = storage::reconcile(&c, root);
    assert!(r.is_ok(), "{:?}", r.items);
    assert_eq!(r.items.iter().filter(|i| i.kind == Kind::Pool).count(), 2);
    assert!(r.volume_ok(&pp("fast/web-root")));

    // Sparse: 1 GiB long, (almost) nothing allocated.
    let root_vol = volume_path(root, &pp("fast/web-root"));
    assert_eq!(root_vol, root.join("pools/fast/web-root"));
    assert_eq!(std::fs::metadata(&root_vol).unwrap().len(), 1 << 30);
    assert!(allocated(&root_vol) < 64 << 10, "allocated {}", allocated(&root_vol));

    // Seeded: declared size, same content, holes kept (including the zero MiB).
    let seeded = volume_path(root, &pp("fast/web-seeded"));
    assert_eq!(std::fs::metadata(&seeded).unwrap().len(), 64 << 20);
    let f = File::open(&seeded).unwrap();
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data);
    f.read_exact_at(&mut buf, 8 << 20).unwrap();
    assert_eq!(buf, data);
    let mut z = vec![1u8; 1 << 20];
    f.read_exact_at(&mut z, 4 << 20).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    let alloc = allocated(&seeded);
    assert!(
        alloc <= 2 * data.len() as u64 + (64 << 10),
        "holes lost: {alloc} bytes allocated"
    );
    assert!(
        allocated(&root.join("pools/images/base.raw")) > alloc,
        "the source's zero MiB was copied"
    );

    // Idempotent: nothing changes, contents untouched.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seeded)
        .unwrap()
        .write_all_at(b"guest wrote this", 100)
        .unwrap();
    let r2 = storage::reconcile(&c, root);
    assert!(r2.is_ok(), "{:?}", r2.items);
    for i in r2.items.iter().filter(|i| i.kind == Kind::Volume) {
        assert!(i.result.as_ref().unwrap().starts_with("exists"), "{i:?}");
    }
    let mut got = [0u8; 16];
    File::open(&seeded).unwrap().read_exact_at(&mut got, 100).unwrap();
    assert_eq!(&got, b"guest wrote this");
    assert!(!root.join("pools/fast/.web-seeded.partial").exists());
}

#[test]
fn volumes_survive_their_guest_and_grow_but_never_shrink() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_source(root);
    storage::reconcile(&cfg(BASE), root);
    let vol = volume_path(root, &pp("fast/web-root"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vol)
        .unwrap()
        .write_all_at(b"data", 0)
        .unwrap();

    // The guest is gone from the config: its volumes stay, untouched.
    let r = storage::reconcile(&cfg("version: 1\nstorage:\n  pools:\n    - name: fast\n"), root);
    assert!(r.is_ok());
    assert!(vol.exists());
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 1 << 30);
    assert!(volume_path(root, &pp("fast/web-seeded")).exists());

    // Declared larger: grown. Declared smaller: kept, and the report says so.
    let bigger = BASE.replace("size: 1GiB", "size: 2GiB");
    let r = storage::reconcile(&cfg(&bigger), root);
    assert!(r.is_ok(), "{:?}", r.items);
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 2 << 30);
    let smaller = BASE.replace("size: 1GiB", "size: 512MiB");
    let r = storage::reconcile(&cfg(&smaller), root);
    let item = r.items.iter().find(|i| i.name == "fast/web-root").unwrap();
    assert!(item.result.as_ref().unwrap().contains("never shrunk"), "{item:?}");
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 2 << 30);
    let mut got = [0u8; 4];
    File::open(&vol).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"data");
}

#[test]
fn space_errors_name_the_pool_the_volume_and_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // 1 PiB does not fit the free space of any test machine's disk.
    let c = cfg("
version: 1
storage:
  pools:
    - name: bulk
    - name: capped
      size: 10MiB
guests:
  - name: big
    memory: 64MiB
    disks:
      - {volume: bulk/huge, size: 1PiB}
      - {volume: capped/too-big, size: 20MiB}
      - {volume: capped/fits, size: 8MiB}
");
    let r = storage::reconcile(&c, root);
    let err = |name: &str| {
        r.items
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| i.result.as_ref().err())
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{name} should have failed: {:?}", r.items))
    };
    let huge = err("bulk/huge");
    assert!(
        huge.contains("bulk/huge")
            && huge.contains("pool bulk")
            && huge.contains("needs 1PiB")
            && huge.contains("free"),
        "{huge}"
    );
    let capped = err("capped/too-big");
    assert!(
        capped.contains("capped/too-big")
            && capped.contains("pool capped")
            && capped.contains("10MiB")
            && capped.contains("20MiB"),
        "{capped}"
    );
    // The others still went ahead.
    assert!(r.volume_ok(&pp("capped/fits")));
    assert!(!volume_path(root, &pp("bulk/huge")).exists());
    assert!(!volume_path(root, &pp("capped/too-big")).exists());
}

#[test]
fn a_missing_source_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let r = storage::reconcile(&cfg(BASE), tmp.path());
    let e = r
        .items
        .iter()
        .find(|i| i.name == "fast/web-seeded")
        .unwrap()
        .result
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(e.contains("base.raw") && e.contains("images"), "{e}");
    assert!(r.volume_ok(&pp("fast/web-root")));
}
