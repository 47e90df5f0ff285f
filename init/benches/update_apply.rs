//! ci/bench: the cost of installing an update bundle of a real UKI's size (25 MiB of
//! random bytes) compared with writing the same bytes plainly.
//!
//! - verify: signature + streamed sha256 of the bundle, nothing written;
//! - install: `apply_stream` from the bundle file onto a directory laid out like the
//!   ESP (verify while writing to the partial file, fsync, record, rename, fsync dir);
//! - plain copy: the bundle file (the same bytes plus a header of a few hundred
//!   bytes) copied into the same directory and fsynced.
//!
//! Each is run 5 times; the median is printed. The target directory is under
//! $KEEL_BENCH_DIR (default: the system temp dir), so install and copy hit the same
//! file system.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use keel_init::update::bundle::{self, Manifest};
use keel_init::update::{apply_stream, bundle::verify_stream};

const UKI_SIZE: usize = 25 << 20;
const RUNS: usize = 5;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn fresh_esp(root: &Path) -> std::path::PathBuf {
    let esp = root.join(format!("esp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&esp);
    std::fs::create_dir_all(esp.join("EFI/Linux")).expect("create ESP dir");
    std::fs::write(esp.join("EFI/Linux/keel-1.0.0.efi"), b"running").expect("running UKI");
    esp
}

fn main() {
    let base = std::env::var_os("KEEL_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let key = SigningKey::from_bytes(&[42; 32]);
    let uki = random_bytes(UKI_SIZE);
    let manifest = Manifest {
        format: bundle::FORMAT,
        os: bundle::OS.into(),
        version: "2.0.0".into(),
        min_version: None,
        uki_sha256: bundle::sha256_hex(&uki),
        uki_size: uki.len() as u64,
        cmdline: String::new(),
        created: 0,
    };
    let bundle_path = dir.path().join("update.keel");
    {
        let mut f = std::fs::File::create(&bundle_path).expect("bundle file");
        f.write_all(&bundle::encode_header(&manifest, &key).expect("header"))
            .and_then(|()| f.write_all(&uki))
            .and_then(|()| f.sync_all())
            .expect("write bundle");
    }
    let trusted = [key.verifying_key()];

    let mut verify = Vec::new();
    let mut install = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..RUNS {
        let f = std::fs::File::open(&bundle_path).expect("open bundle");
        let t = Instant::now();
        verify_stream(std::io::BufReader::with_capacity(1 << 20, f), &trusted).expect("verifies");
        verify.push(t.elapsed());

        let esp = fresh_esp(dir.path());
        let f = std::fs::File::open(&bundle_path).expect("open bundle");
        let t = Instant::now();
        apply_stream(f, &trusted, &esp, "1.0.0", false).expect("installs");
        install.push(t.elapsed());

        let esp = fresh_esp(dir.path());
        let t = Instant::now();
        let target = esp.join("EFI/Linux/keel-2.0.0+3.efi");
        std::fs::copy(dir.path().join("update.keel"), &target).expect("copy");
        std::fs::File::open(&target).and_then(|f| f.sync_all()).expect("fsync");
        copy.push(t.elapsed());
    }
    let (v, i, c) = (median(verify), median(install), median(copy));
    println!(
        "update bundle of {} MiB (median of {RUNS}, {}):",
        UKI_SIZE >> 20,
        dir.path().display()
    );
    println!(
        "  verify only (signature + sha256):   {:7.1} ms  {:7.0} MiB/s",
        v.as_secs_f64() * 1e3,
        mib_per_s(UKI_SIZE, v)
    );
    println!(
        "  verify + install (fsync, rename):   {:7.1} ms  {:7.0} MiB/s",
        i.as_secs_f64() * 1e3,
        mib_per_s(UKI_SIZE, i)
    );
    println!(
        "  plain copy + fsync of the same bytes: {:5.1} ms  {:7.0} MiB/s",
        c.as_secs_f64() * 1e3,
        mib_per_s(UKI_SIZE, c)
    );
    println!(
        "update: verify_ms={:.1} install_ms={:.1} copy_ms={:.1} install_over_copy={:.2}",
        v.as_secs_f64() * 1e3,
        i.as_secs_f64() * 1e3,
        c.as_secs_f64() * 1e3,
        i.as_secs_f64() / c.as_secs_f64()
    );
}
