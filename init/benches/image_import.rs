//! ci/bench: importing a qcow2 image into a pool, beside `qemu-img convert` of the same
//! file in the same run, and seeding a volume from the imported image (clone time and
//! allocation) on the file system of $KEEL_BENCH_DIR (default: the system temp dir).
//!
//! The image: 1 GiB virtual with 256 MiB of data (pseudo-random, so compression and
//! zero detection do not flatter either side), made by `qemu-img convert` plain and
//! zlib-compressed. Each measurement is the median of 3 runs, page cache warm (the
//! qcow2 file is read once before), output fsynced.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_init::config::PoolPath;
use keel_init::storage::image::{self, ImportRequest};
use keel_init::storage::volume::{self, VolumeSpec};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (package qemu-utils; ci/setup installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn raw_sample(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create sample");
    f.set_len(1 << 30).expect("size sample");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 4 << 20];
    for i in 0..64u64 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&chunk, i * 16 * MIB).expect("write sample");
    }
}

fn main() {
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let d = |n: &str| dir.path().join(n);
    raw_sample(&d("sample.raw"));
    let data_mib = 256.0;
    for (label, extra) in [("qcow2", &[][..]), ("qcow2, zlib-compressed", &["-c"][..])] {
        let q = d("sample.qcow2");
        let raw = d("sample.raw");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([raw.to_str().unwrap(), q.to_str().unwrap()]);
        qemu_img(&args);
        let _ = std::fs::read(&q);
        let qcow2_mib = std::fs::metadata(&q).expect("qcow2").len() as f64 / MIB as f64;

        let mut keel = Vec::new();
        let mut qemu = Vec::new();
        for run in 0..RUNS {
            let pool = d(&format!("pool-{run}"));
            std::fs::create_dir_all(&pool).expect("pool");
            let started = Instant::now();
            let req = ImportRequest {
                name: "bench".into(),
                sha256: None,
            };
            let file = std::fs::File::open(&q).expect("open qcow2");
            image::import("p", &pool, u64::MAX, &req, file).expect("import");
            keel.push(started.elapsed());
            std::fs::remove_dir_all(&pool).expect("clean pool");

            let out = d("qemu.raw");
            let started = Instant::now();
            qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                q.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            std::fs::File::open(&out).and_then(|f| f.sync_all()).expect("sync");
            qemu.push(started.elapsed());
            std::fs::remove_file(&out).expect("clean");
        }
        let (k, q) = (median(keel), median(qemu));
        println!(
            "import {label} ({qcow2_mib:.0} MiB file, 1 GiB disk, {data_mib:.0} MiB data): keel {:.0} MiB/s of file ({:.2} s), qemu-img convert {:.0} MiB/s ({:.2} s): {:.2}x qemu-img's time (keel also hashes the file and writes it to the pool first)",
            qcow2_mib / k.as_secs_f64(),
            k.as_secs_f64(),
            qcow2_mib / q.as_secs_f64(),
            q.as_secs_f64(),
            k.as_secs_f64() / q.as_secs_f64()
        );
    }

    // Seeding a 2 GiB volume from the imported 1 GiB image.
    let root = d("data");
    let pool = root.join("pools/p");
    std::fs::create_dir_all(&pool).expect("pool");
    let req = ImportRequest {
        name: "img".into(),
        sha256: None,
    };
    image::import(
        "p",
        &pool,
        u64::MAX,
        &req,
        std::fs::File::open(d("sample.raw")).expect("raw"),
    )
    .expect("import raw");
    let mut times = Vec::new();
    let mut summary = String::new();
    let mut allocated = 0;
    for run in 0..RUNS {
        let spec = VolumeSpec {
            volume: format!("p/vol-{run}").parse::<PoolPath>().expect("path"),
            size: 2 << 30,
            source: Some("p/images/img.raw".parse::<PoolPath>().expect("path")),
        };
        let free = || {
            let s = nix::sys::statvfs::statvfs(&pool).expect("statvfs");
            s.blocks_free() as u64 * s.fragment_size() as u64
        };
        let before = free();
        let started = Instant::now();
        summary = volume::ensure(&root, None, &spec).expect("seed");
        times.push(started.elapsed());
        allocated = before.saturating_sub(free());
    }
    let clones = keel_init::api::host::clones(&pool);
    let t = median(times);
    println!(
        "clone a 1 GiB image ({data_mib:.0} MiB data) into a 2 GiB volume on {} ({}): {:.1} ms, {:.1} MiB allocated — {summary}",
        clones.filesystem,
        clones.method,
        t.as_secs_f64() * 1e3,
        allocated as f64 / MIB as f64
    );
}
