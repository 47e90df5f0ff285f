//! `keel-image keygen`, `bundle` and `verify` through the binary, and a bundle it
//! writes installed by keel-init's update agent on a temporary ESP.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_image::uki;

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

fn keel_image(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run keel-image")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A real UKI (Debian's stub) with fake kernel and initramfs.
fn write_uki(dir: &Path, version: &str) -> PathBuf {
    assert!(
        Path::new(STUB).exists(),
        "{STUB} is missing: install the Debian package systemd-boot-efi (ci/setup does)"
    );
    let stub = std::fs::read(STUB).expect("stub");
    let kernel: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let osrel = uki::os_release(version);
    let bytes = uki::assemble(
        &stub,
        &[
            (".osrel", osrel.as_bytes()),
            (".cmdline", b"console=ttyS0 quiet"),
            (".linux", &kernel),
            (".initrd", b"initramfs"),
        ],
    )
    .expect("assemble");
    let path = dir.join(format!("keel-{version}.efi"));
    std::fs::write(&path, bytes).expect("write uki");
    path
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let prefix = dir.join(name);
    let o = keel_image(&["keygen", "--output", s(&prefix)]);
    assert!(o.status.success(), "keygen: {}", text(&o));
    (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")))
}

#[test]
fn keygen_writes_a_private_secret_and_a_public_key_the_config_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, public) = keygen(dir.path(), "release");
    let mode = std::fs::metadata(&secret).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key is readable by its owner only");
    let pub_text = std::fs::read_to_string(&public).expect("pub");
    assert!(pub_text.starts_with("ed25519:"), "{pub_text}");
    keel_init::config::parse_public_key(&pub_text).expect("config's trusted_keys takes the .pub content");
    // Never overwrites.
    let before = std::fs::read(&secret).expect("key");
    let o = keel_image(&["keygen", "--output", s(&dir.path().join("release"))]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    assert_eq!(std::fs::read(&secret).expect("key"), before);
}

#[test]
fn bundle_verifies_with_its_key_only_and_installs_on_an_esp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, public) = keygen(dir.path(), "release");
    let (_, other_public) = keygen(dir.path(), "other");
    let uki_path = write_uki(dir.path(), "2.0.0");
    let bundle = dir.path().join("update.keel");
    let o = keel_image(&[
        "bundle",
        "--uki",
        s(&uki_path),
        "--version",
        "2.0.0",
        "--key",
        s(&secret),
        "-o",
        s(&bundle),
        "--min-version",
        "1.0.0",
    ]);
    assert!(o.status.success(), "bundle: {}", text(&o));

    let o = keel_image(&["verify", s(&bundle), "--key", s(&public), "--json"]);
    assert!(o.status.success(), "verify: {}", text(&o));
    let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(manifest["version"], "2.0.0");
    assert_eq!(manifest["min_version"], "1.0.0");
    assert_eq!(manifest["cmdline"], "console=ttyS0 quiet");

    let o = keel_image(&["verify", s(&bundle), "--key", s(&other_public)]);
    assert!(!o.status.success(), "another key must not verify");
    assert!(text(&o).contains("signature does not match"), "{}", text(&o));

    let mut bytes = std::fs::read(&bundle).expect("bundle");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = dir.path().join("tampered.keel");
    std::fs::write(&tampered, &bytes).expect("write");
    let o = keel_image(&["verify", s(&tampered), "--key", s(&public)]);
    assert!(!o.status.success(), "a flipped payload bit must not verify");
    assert!(text(&o).contains("sha256"), "{}", text(&o));

    // keel-init installs what keel-image wrote.
    let esp = dir.path().join("esp");
    std::fs::create_dir_all(esp.join("EFI/Linux")).expect("esp");
    std::fs::write(esp.join("EFI/Linux/keel-1.0.0.efi"), b"v1").expect("v1");
    let key = keel_init::update::bundle::parse_public_key(&std::fs::read_to_string(&public).expect("pub"))
        .expect("public key");
    let installed = keel_init::update::apply_stream(
        std::fs::File::open(&bundle).expect("open"),
        &[key],
        &esp,
        "1.0.0",
        false,
    )
    .expect("installs");
    assert_eq!(installed.file, "EFI/Linux/keel-2.0.0+3.efi");
    assert_eq!(
        std::fs::read(esp.join("EFI/Linux/keel-2.0.0+3.efi")).expect("installed"),
        std::fs::read(&uki_path).expect("uki")
    );
}

#[test]
fn bundle_refuses_a_uki_whose_osrel_names_another_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, _) = keygen(dir.path(), "k");
    let uki_path = write_uki(dir.path(), "2.0.0");
    let bundle = dir.path().join("update.keel");
    let o = keel_image(&[
        "bundle",
        "--uki",
        s(&uki_path),
        "--version",
        "2.0.1",
        "--key",
        s(&secret),
        "-o",
        s(&bundle),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("IMAGE_VERSION=2.0.0, not 2.0.1"), "{}", text(&o));
    assert!(!bundle.exists(), "nothing written");
    // The .pub is not a secret key.
    let o = keel_image(&[
        "bundle",
        "--uki",
        s(&uki_path),
        "--version",
        "2.0.0",
        "--key",
        s(&dir.path().join("k.pub")),
        "-o",
        s(&bundle),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a Keel secret key"), "{}", text(&o));
}

#[test]
fn bundle_from_a_built_image_takes_its_uki_and_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (secret, public) = keygen(dir.path(), "k");
    let kernel = dir.path().join("vmlinuz");
    let initramfs = dir.path().join("initrd");
    std::fs::write(&kernel, vec![0x4b; 1 << 20]).expect("kernel");
    std::fs::write(&initramfs, vec![0x49; 100_000]).expect("initramfs");
    let image = dir.path().join("disk.img");
    let config = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../configs/minimal.yaml");
    let o = keel_image(&[
        "build",
        "--size",
        "400MiB",
        "--version",
        "1.4.2",
        "--config",
        s(&config),
        "-o",
        s(&image),
        "--kernel",
        s(&kernel),
        "--initramfs",
        s(&initramfs),
    ]);
    assert!(o.status.success(), "build: {}", text(&o));
    let bundle = dir.path().join("update.keel");
    let o = keel_image(&[
        "bundle",
        "--image",
        s(&image),
        "--key",
        s(&secret),
        "-o",
        s(&bundle),
        "--json",
    ]);
    assert!(o.status.success(), "bundle: {}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(report["manifest"]["version"], "1.4.2");
    // The same sha256 `keel-image build` recorded for the UKI.
    let o = keel_image(&["inspect", "--json", s(&image)]);
    let inspection: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect json");
    assert_eq!(
        report["manifest"]["uki_sha256"],
        inspection["esp"]["versions"][0]["sha256"]
    );
    let o = keel_image(&["verify", s(&bundle), "--key", s(&public)]);
    assert!(o.status.success(), "verify: {}", text(&o));
}

/// The file `name` in a newc cpio archive (what `HostInitramfs::build` returns).
fn cpio_file<'a>(archive: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    let mut at = 0;
    while at + 110 <= archive.len() && &archive[at..at + 6] == b"070701" {
        let size = hex(&archive[at + 54..at + 62])?;
        let name_len = hex(&archive[at + 94..at + 102])?;
        let name_start = at + 110;
        let entry = std::str::from_utf8(&archive[name_start..name_start + name_len - 1]).ok()?;
        let data_start = (name_start + name_len).next_multiple_of(4);
        if entry == "TRAILER!!!" {
            return None;
        }
        if entry.trim_start_matches('/') == name.trim_start_matches('/') {
            return archive.get(data_start..data_start + size);
        }
        at = (data_start + size).next_multiple_of(4);
    }
    None
}

#[test]
fn the_initramfs_carries_the_trusted_keys_for_the_update_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    for name in ["keel-init", "keel-vmm", "keelctl"] {
        std::fs::write(bin.join(name), name).expect("fake binary");
    }
    let modules = dir.path().join("6.1.0-test");
    std::fs::create_dir_all(&modules).expect("modules");
    std::fs::write(modules.join("modules.dep"), "").expect("modules.dep");
    let guest_kernel = dir.path().join("bzImage");
    std::fs::write(&guest_kernel, b"guest").expect("guest kernel");
    let verifying = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
    let key = keel_init::update::bundle::format_public_key(&verifying);
    let spec = keel_image::host_initramfs::HostInitramfs {
        bin_dir: bin,
        modules_dir: modules,
        modules: Vec::new(),
        guest_kernel,
        guest_initrd: Vec::new(),
        os_release: uki::os_release("1.0.0"),
        trusted_keys: vec![key.clone()],
        mtime: 1_700_000_000,
    };
    let archive = spec
        .build()
        .expect("initramfs (needs e2fsprogs for the host tools: ci/setup installs it)");
    let keys = cpio_file(&archive, keel_init::update::TRUSTED_KEYS_FILE).expect("trusted keys file");
    let text = std::str::from_utf8(keys).expect("text");
    assert_eq!(text, format!("{key}\n"));
    // Read back the way the update agent reads it.
    let parsed = keel_init::update::bundle::parse_trusted_keys(text).expect("parses");
    assert_eq!(parsed, [verifying]);
}
