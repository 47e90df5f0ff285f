//! Image import against QEMU's own tools: qcow2 files made by `qemu-img` (v2, v3,
//! zlib-compressed, sparse) are imported and compared byte for byte with what
//! `qemu-img convert -O raw` makes of the same file; bad images are refused with
//! nothing left behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use keel_init::storage::image::{self, ImageError, ImportRequest};

const MIB: u64 = 1 << 20;

/// A 64 MiB raw disk with data in a few places (patterns, not zeros) and holes
/// between: a partition-table-like start, a block mid-way, the last sector.
fn sample_raw(dir: &Path) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let p = dir.join("sample.raw");
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    for (at, len, seed) in [
        (0u64, 1 << 20, 1u8),
        (17 * MIB + 4096, 3 * 65536 + 100, 7),
        (64 * MIB - 512, 512, 9),
    ] {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&data).unwrap();
    }
    p
}

struct Pool {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pools/p");
    std::fs::create_dir_all(&path).unwrap();
    Pool { _dir: dir, path }
}

fn import_file(
    pool: &Pool,
    name: &str,
    file: &Path,
    sha256: Option<&str>,
    budget: u64,
) -> Result<image::ImageInfo, ImageError> {
    let req = ImportRequest {
        name: name.into(),
        sha256: sha256.map(str::to_owned),
    };
    image::import("p", &pool.path, budget, &req, std::fs::File::open(file).unwrap())
}

/// What is in the pool's image directory, hidden files included.
fn image_dir_files(pool: &Pool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(image::dir(&pool.path))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn qcow2_v2_v3_and_compressed_import_as_qemu_img_converts_them() {
    let work = tempfile::tempdir().unwrap();
    let raw = sample_raw(work.path());
    let raw_s = raw.to_str().unwrap();
    let p = pool();
    for (name, opts) in [
        ("v3", vec!["-o", "compat=1.1"]),
        ("v2", vec!["-o", "compat=0.10"]),
        ("v3-zlib", vec!["-c", "-o", "compat=1.1,compression_type=zlib"]),
        ("v3-4k", vec!["-o", "compat=1.1,cluster_size=4096"]),
    ] {
        let q = work.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(opts.iter().copied());
        args.extend([raw_s, q.to_str().unwrap()]);
        common::qemu_img(&args);
        let reference = work.path().join(format!("{name}.ref.raw"));
        common::qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            q.to_str().unwrap(),
            reference.to_str().unwrap(),
        ]);

        let info = import_file(&p, name, &q, None, u64::MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 64 * MIB);
        assert_eq!(info.source, format!("p/images/{name}.raw"));
        let imported = p.path.join("images").join(format!("{name}.raw"));
        assert!(
            std::fs::read(&imported).unwrap() == std::fs::read(&reference).unwrap(),
            "{name}: the imported disk differs from qemu-img's conversion"
        );
        // Sparse: the data is ~1.2 MiB; holes stay holes.
        let allocated = std::fs::metadata(&imported).unwrap().blocks() * 512;
        assert!(
            allocated < 2 * MIB,
            "{name}: {allocated} bytes allocated for ~1.2 MiB of data"
        );
    }
    let listed: Vec<String> = image::list(&[("p".into(), p.path.clone())])
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(listed, ["v2", "v3", "v3-4k", "v3-zlib"]);
    assert!(
        !image_dir_files(&p).iter().any(|f| f.starts_with('.')),
        "{:?}",
        image_dir_files(&p)
    );
}

#[test]
fn raw_imports_sparse_and_checks_the_checksum() {
    let work = tempfile::tempdir().unwrap();
    let raw = sample_raw(work.path());
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&raw).unwrap()))
    };
    let p = pool();
    let bad = "0".repeat(64);
    let e = import_file(&p, "disk", &raw, Some(&bad), u64::MAX).unwrap_err();
    assert!(matches!(e, ImageError::Checksum { .. }), "{e}");
    assert!(image_dir_files(&p).is_empty(), "left behind: {:?}", image_dir_files(&p));

    let info = import_file(&p, "disk", &raw, Some(&sha.to_uppercase()), u64::MAX).unwrap();
    assert_eq!(
        (info.format.as_str(), info.virtual_size, info.sha256.as_str()),
        ("raw", 64 * MIB, sha.as_str())
    );
    assert!(info.allocated < 2 * MIB, "{} allocated", info.allocated);
    assert_eq!(
        std::fs::read(p.path.join("images/disk.raw")).unwrap(),
        std::fs::read(&raw).unwrap()
    );

    let e = import_file(&p, "disk", &raw, None, u64::MAX).unwrap_err();
    assert!(e.to_string().contains("keelctl image rm disk"), "{e}");
    image::remove(&p.path, "disk").unwrap();
    assert!(image_dir_files(&p).is_empty());
    assert!(matches!(image::remove(&p.path, "disk"), Err(ImageError::NotFound(_))));
}

#[test]
fn bad_images_are_refused_with_nothing_left_behind() {
    let work = tempfile::tempdir().unwrap();
    let w = |n: &str| work.path().join(n).to_str().unwrap().to_owned();
    let raw = sample_raw(work.path());
    common::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        &w("good.qcow2"),
    ]);
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &w("good.qcow2"),
        "-F",
        "qcow2",
        &w("overlay.qcow2"),
    ]);
    common::qemu_img(&["create", "-q", "-f", "qcow2", &w("huge.qcow2"), "2T"]);
    common::qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        &w("zlib.qcow2"),
    ]);
    let good = std::fs::read(w("good.qcow2")).unwrap();
    std::fs::write(w("truncated.qcow2"), &good[..good.len() / 3]).unwrap();
    let zlib = std::fs::read(w("zlib.qcow2")).unwrap();
    std::fs::write(w("truncated-zlib.qcow2"), &zlib[..zlib.len() * 2 / 3]).unwrap();
    let mut zeroed_l1 = good.clone();
    zeroed_l1[36..40].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    std::fs::write(w("huge-l1.qcow2"), &zeroed_l1).unwrap();

    let p = pool();
    let cases: [(&str, u64, &str); 5] = [
        ("overlay.qcow2", u64::MAX, "backing file"),
        ("huge.qcow2", 1 << 30, "pool has"),
        ("truncated.qcow2", u64::MAX, "not a usable qcow2"),
        ("truncated-zlib.qcow2", u64::MAX, "not a usable qcow2"),
        ("huge-l1.qcow2", u64::MAX, "L1 table"),
    ];
    for (file, budget, want) in cases {
        let e = import_file(&p, "bad", Path::new(&w(file)), None, budget).unwrap_err();
        assert!(e.to_string().contains(want), "{file}: {e}");
        assert!(
            image_dir_files(&p).is_empty(),
            "{file} left behind: {:?}",
            image_dir_files(&p)
        );
    }
    // A pool with room for less than the data is refused while receiving.
    let e = import_file(&p, "bad", &raw, None, 512 * 1024).unwrap_err();
    assert!(matches!(e, ImageError::NoSpace { .. }), "{e}");
    assert!(image_dir_files(&p).is_empty());
    let e = import_file(&p, "Bad/Name", &raw, None, u64::MAX).unwrap_err();
    assert!(matches!(e, ImageError::BadName(_)), "{e}");
}

#[test]
fn a_disk_declared_with_an_image_is_seeded_from_it() {
    let work = tempfile::tempdir().unwrap();
    let raw = sample_raw(work.path());
    let p = pool();
    import_file(&p, "deb", &raw, None, u64::MAX).unwrap();
    let data_root = p.path.parent().unwrap().parent().unwrap().to_owned();
    let text = "version: 1\nstorage: {pools: [{name: p}]}\nguests:\n  - name: web\n    memory: 256MiB\n    disks: [{volume: p/web, size: 128MiB, image: p/deb}]\n";
    let cfg = keel_init::config::parse_str(text).expect("valid").config;
    let report = keel_init::storage::reconcile(&cfg, &data_root);
    assert_eq!(report.errors().count(), 0, "{report:?}");
    let volume = std::fs::read(p.path.join("web")).unwrap();
    assert_eq!(volume.len() as u64, 128 * MIB);
    assert!(
        volume[..64 * MIB as usize] == std::fs::read(&raw).unwrap()[..],
        "the volume is not the image"
    );

    // An image that was never imported: the error says how to import it.
    let text = text.replace("p/web", "p/web2").replace("p/deb", "p/nope");
    let cfg = keel_init::config::parse_str(&text).expect("valid").config;
    let report = keel_init::storage::reconcile(&cfg, &data_root);
    let errors: Vec<String> = report
        .errors()
        .filter_map(|i| i.result.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(errors.iter().any(|e| e.contains("keelctl image import")), "{errors:?}");
}

/// Fuzzing the qcow2 path: a small real qcow2 (made by qemu-img, 4 KiB clusters so its
/// tables are in the first few KiB) with random bytes overwritten in its first 64 KiB
/// — header, L1, refcount and L2 tables. Every import must end (no panic, no hang),
/// and one that succeeds must be exactly the image's virtual size and leave no hidden
/// files; one that fails must leave nothing at all.
#[test]
fn mangled_qcow2_headers_and_tables_never_panic_or_leave_files() {
    use proptest::prelude::*;
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("small.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&[0x5a; 8192], MIB).unwrap();
    }
    let q = work.path().join("small.qcow2");
    common::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let good = std::fs::read(&q).unwrap();
    let p = pool();
    let mangled = work.path().join("mangled.qcow2");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    let edits = proptest::collection::vec((0usize..good.len().min(65536), any::<u8>()), 1..16);
    // [imported as raw (magic gone), imported as qcow2, refused]
    let outcomes = std::cell::RefCell::new([0u32; 3]);
    runner
        .run(&edits, |edits| {
            let mut bytes = good.clone();
            for (at, b) in edits {
                bytes[at] = b;
            }
            std::fs::write(&mangled, &bytes).unwrap();
            match import_file(&p, "fuzz", &mangled, None, 64 * MIB) {
                Ok(info) => {
                    outcomes.borrow_mut()[usize::from(info.format == "qcow2")] += 1;
                    let len = std::fs::metadata(p.path.join("images/fuzz.raw")).unwrap().len();
                    prop_assert_eq!(len, info.virtual_size);
                    image::remove(&p.path, "fuzz").unwrap();
                }
                Err(_) => outcomes.borrow_mut()[2] += 1,
            }
            prop_assert!(image_dir_files(&p).is_empty(), "left: {:?}", image_dir_files(&p));
            Ok(())
        })
        .unwrap();
    let [raw, qcow2, refused] = *outcomes.borrow();
    eprintln!("mangled qcow2: {raw} imported as raw, {qcow2} as qcow2, {refused} refused");
    assert!(
        qcow2 > 0 && refused > 0,
        "the fuzzing reached only one outcome: {:?}",
        outcomes.borrow()
    );
}
