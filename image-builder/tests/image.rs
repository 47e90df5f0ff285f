//! `keel-image build`, `inspect` and `flash` end to end through the binary, checked with
//! independent tools: `sfdisk --verify`, `fsck.vfat -n`, the `gpt`, `fatfs` and `object`
//! readers. The kernel and initramfs are small fakes (their content is not the point
//! here); the EFI stub and systemd-boot are Debian's real ones.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_image::gpt_layout::{self, PartitionReader};
use keel_image::identity::sha256_hex;
use keel_image::uki::{self, UkiInfo};

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
const EPOCH: &str = "1700000000";
/// Small enough to build and flash quickly, large enough for the layout.
const SIZE: &str = "400MiB";

fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("..")
}

fn minimal_config() -> PathBuf {
    repo().join("configs/minimal.yaml")
}

/// Panics with a clear message when a tool the test relies on is missing.
fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")])
                .any(|d| d.join(tool).exists())
        })
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install the Debian package {package} (ci/setup does)"
    );
}

fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package {package} (ci/setup does)"
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Deterministic filler bytes that do not repeat within `len` (so a search finds one spot).
fn pattern(tag: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut counter = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{tag}{counter:012}").as_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

struct Fixture {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
    kernel_bytes: Vec<u8>,
    initramfs_bytes: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        require_file(STUB, "systemd-boot-efi");
        require_file(SYSTEMD_BOOT, "systemd-boot-efi");
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel_bytes = pattern("KERNEL", 1 << 20);
        let initramfs_bytes = pattern("INITRD", 300_001);
        let kernel = dir.path().join("vmlinuz");
        let initramfs = dir.path().join("initrd.cpio");
        std::fs::write(&kernel, &kernel_bytes).expect("write kernel");
        std::fs::write(&initramfs, &initramfs_bytes).expect("write initramfs");
        Self {
            dir,
            kernel,
            initramfs,
            kernel_bytes,
            initramfs_bytes,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build_cmd(&self, config: &Path, output: &Path, epoch: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel-image"));
        c.args(["build", "--size", SIZE, "--version", "1.0.0", "--config"])
            .arg(config)
            .arg("--output")
            .arg(output)
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initramfs")
            .arg(&self.initramfs)
            .env("SOURCE_DATE_EPOCH", epoch);
        c
    }

    fn build(&self, config: &Path, name: &str, epoch: &str) -> PathBuf {
        let out = self.path(name);
        let o = run(&mut self.build_cmd(config, &out, epoch));
        assert!(o.status.success(), "build failed: {}", text(&o));
        out
    }
}

fn file_sha256(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).expect("read image"))
}

fn partitions(image: &Path) -> Vec<gpt_layout::PartitionEntry> {
    let f = std::fs::File::open(image).expect("open image");
    let len = f.metadata().expect("stat").len();
    gpt_layout::read_gpt(PartitionReader::new(f, 0, len)).expect("GPT").1
}

fn partition(image: &Path, label: &str) -> gpt_layout::PartitionEntry {
    partitions(image)
        .into_iter()
        .find(|p| p.label == label)
        .unwrap_or_else(|| panic!("no {label}"))
}

/// Copies a partition out of the image into its own file (what `dd skip= count=` does).
fn extract(image: &Path, label: &str, to: &Path) {
    let p = partition(image, label);
    let mut f = std::fs::File::open(image).expect("open");
    f.seek(SeekFrom::Start(p.offset)).expect("seek");
    let mut out = std::fs::File::create(to).expect("create");
    std::io::copy(&mut f.take(p.size), &mut out).expect("copy");
}

fn fat(image: &Path, label: &str) -> fatfs::FileSystem<PartitionReader> {
    let p = partition(image, label);
    let f = std::fs::File::open(image).expect("open");
    fatfs::FileSystem::new(PartitionReader::new(f, p.offset, p.size), fatfs::FsOptions::new()).expect("FAT volume")
}

fn read_fat_file(fs: &fatfs::FileSystem<PartitionReader>, path: &str) -> Vec<u8> {
    let mut data = Vec::new();
    fs.root_dir()
        .open_file(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .read_to_end(&mut data)
        .expect("read");
    data
}

#[test]
fn built_image_passes_sfdisk_and_fsck_and_holds_the_boot_files() {
    require("sfdisk", "fdisk");
    require("fsck.vfat", "dosfstools");
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);

    let o = run(Command::new("sfdisk").arg("--verify").arg(&image));
    assert!(
        o.status.success() && text(&o).contains("No errors detected"),
        "sfdisk --verify: {}",
        text(&o)
    );

    // Labels, types (UAPI discoverable partitions / basic data) and 1 MiB alignment.
    let parts = partitions(&image);
    let summary: Vec<(&str, &str)> = parts.iter().map(|p| (p.label.as_str(), p.type_guid.as_str())).collect();
    assert_eq!(
        summary,
        [
            ("KEEL-ESP", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"),
            ("KEEL-CONFIG", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"),
            ("KEEL-DATA", "0fc63daf-8483-4772-8e79-3d69d8477de4")
        ]
    );
    assert!(parts.iter().all(|p| p.offset % (1 << 20) == 0));
    let o = run(Command::new("sfdisk").arg("--json").arg(&image));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("sfdisk --json");
    let names: Vec<&str> = json["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["KEEL-ESP", "KEEL-CONFIG", "KEEL-DATA"],
        "sfdisk reads the labels too"
    );

    for label in ["KEEL-ESP", "KEEL-CONFIG"] {
        let vol = fx.path(&format!("{label}.vfat"));
        extract(&image, label, &vol);
        let o = run(Command::new("fsck.vfat").args(["-n", "-v"]).arg(&vol));
        let out = text(&o);
        assert!(o.status.success(), "fsck.vfat -n {label}: {out}");
        assert!(
            !out.contains("Expected") && !out.contains("differ") && !out.contains("uninitialized"),
            "{label}: {out}"
        );
        assert!(
            out.contains("FAT32") || out.contains("32 bit"),
            "{label} is not FAT32: {out}"
        );
        // The boot sector says FAT32 and the cluster count makes it FAT32 for every reader.
        let mut boot = [0u8; 512];
        std::fs::File::open(&vol)
            .expect("open")
            .read_exact(&mut boot)
            .expect("read");
        assert_eq!(&boot[82..90], b"FAT32   ");
        let fs = fat(&image, label);
        let stats = fs.stats().expect("stats");
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32, "{label}");
        assert!(
            stats.total_clusters() >= 65_525,
            "{label}: {} clusters",
            stats.total_clusters()
        );
        assert_eq!(fs.volume_label().trim_end(), label);
    }

    let esp = fat(&image, "KEEL-ESP");
    let sd_boot = std::fs::read(SYSTEMD_BOOT).expect("systemd-boot");
    assert_eq!(read_fat_file(&esp, "EFI/BOOT/BOOTX64.EFI"), sd_boot);
    assert_eq!(read_fat_file(&esp, "EFI/systemd/systemd-bootx64.efi"), sd_boot);
    let loader = String::from_utf8(read_fat_file(&esp, "loader/loader.conf")).expect("utf-8");
    assert!(loader.lines().any(|l| l.trim() == "timeout 0"), "{loader}");
    assert!(
        !loader.lines().any(|l| l.trim_start().starts_with("default")),
        "no pinned default: {loader}"
    );
    let uki_bytes = read_fat_file(&esp, "EFI/Linux/keel-1.0.0.efi");
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_fat_file(&esp, "keel/manifests/keel-1.0.0.json")).expect("manifest json");
    assert_eq!(manifest["sha256"].as_str(), Some(sha256_hex(&uki_bytes).as_str()));
    assert_eq!(manifest["size"].as_u64(), Some(uki_bytes.len() as u64));

    let config = fat(&image, "KEEL-CONFIG");
    assert_eq!(
        read_fat_file(&config, "keel.yaml"),
        std::fs::read(minimal_config()).expect("config")
    );

    // KEEL-DATA is left for PID 1: all zero, and (sparse) not even allocated.
    let data = partition(&image, "KEEL-DATA");
    let mut f = std::fs::File::open(&image).expect("open");
    f.seek(SeekFrom::Start(data.offset)).expect("seek");
    let mut head = vec![0u8; 1 << 20];
    f.read_exact(&mut head).expect("read");
    assert!(head.iter().all(|&b| b == 0), "KEEL-DATA starts zeroed");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&image).expect("stat").blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "sparse image allocates {allocated} bytes for a ~2 MiB payload"
    );
}

#[test]
fn firmware_reset_on_exit_puts_startup_nsh_on_test_images_only() {
    let fx = Fixture::new();
    let plain = fx.build(&minimal_config(), "plain.img", EPOCH);
    let out = fx.path("test.img");
    let o = run(fx
        .build_cmd(&minimal_config(), &out, EPOCH)
        .arg("--firmware-reset-on-exit"));
    assert!(o.status.success(), "build failed: {}", text(&o));
    let esp = fat(&out, "KEEL-ESP");
    assert_eq!(read_fat_file(&esp, "startup.nsh"), b"reset\r\n");
    assert!(
        fat(&plain, "KEEL-ESP").root_dir().open_file("startup.nsh").is_err(),
        "an appliance image carries no startup.nsh"
    );
}

#[test]
fn uki_sections_are_appended_aligned_and_hold_the_payload() {
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);
    let uki_bytes = read_fat_file(&fat(&image, "KEEL-ESP"), "EFI/Linux/keel-1.0.0.efi");
    let stub_bytes = std::fs::read(STUB).expect("stub");
    let stub = UkiInfo::parse(&stub_bytes).expect("stub parses");
    let info = UkiInfo::parse(&uki_bytes).expect("UKI parses");

    // The stub's sections are untouched, the four new ones follow in order.
    assert_eq!(info.sections[..stub.sections.len()], stub.sections[..]);
    let added: Vec<&str> = info.sections[stub.sections.len()..]
        .iter()
        .map(|s| s.name.trim_end_matches('\0'))
        .collect();
    assert_eq!(added, [".osrel", ".cmdline", ".linux", ".initrd"]);
    let stub_end = stub
        .sections
        .iter()
        .map(|s| s.virtual_address + s.virtual_size.max(s.raw_size))
        .max()
        .expect("sections");
    let mut prev_end = stub_end;
    let file_end = stub
        .sections
        .iter()
        .map(|s| s.raw_offset + s.raw_size)
        .max()
        .expect("sections");
    for s in &info.sections[stub.sections.len()..] {
        assert_eq!(s.virtual_address % info.section_alignment, 0, "{} VA aligned", s.name);
        assert_eq!(s.raw_offset % info.file_alignment, 0, "{} file offset aligned", s.name);
        assert_eq!(s.raw_size % info.file_alignment, 0);
        assert!(
            s.virtual_address >= prev_end,
            "{} overlaps the section before it",
            s.name
        );
        assert!(s.raw_offset >= file_end, "{} data overlaps the stub's", s.name);
        prev_end = s.virtual_address + s.virtual_size;
    }
    assert!(info.size_of_image >= prev_end && info.size_of_image.is_multiple_of(info.section_alignment));

    let section = |name| {
        uki::section_data(&uki_bytes, name)
            .expect("parse")
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(section(".linux"), fx.kernel_bytes.as_slice());
    assert_eq!(section(".initrd"), fx.initramfs_bytes.as_slice());
    let cmdline = String::from_utf8(section(".cmdline").to_vec()).expect("utf-8");
    let default_cmdline = std::fs::read_to_string(repo().join("kernel-config/cmdline")).expect("kernel-config/cmdline");
    assert_eq!(cmdline, default_cmdline.trim());
    let osrel = String::from_utf8(section(".osrel").to_vec()).expect("utf-8");
    for line in [
        "NAME=\"Keel\"",
        "ID=keel",
        "PRETTY_NAME=\"Keel 1.0.0\"",
        "VERSION_ID=1.0.0",
        "IMAGE_ID=keel",
        "IMAGE_VERSION=1.0.0",
    ] {
        assert!(osrel.lines().any(|l| l == line), "{line} missing from .osrel:\n{osrel}");
    }

    // The PE checksum is right, as recomputed independently of the writer's field choice.
    let pe = object::read::pe::PeFile64::parse(&*uki_bytes).expect("object parses the UKI");
    let nt = pe.dos_header().nt_headers_offset() as usize;
    let checksum_at = nt + 4 + 20 + 64;
    assert_eq!(uki::pe_checksum(&uki_bytes, checksum_at), info.checksum);
    assert_eq!(
        pe.nt_headers().file_header.number_of_sections.get(object::LittleEndian) as usize,
        stub.sections.len() + 4
    );
}

#[test]
fn builds_are_reproducible_and_depend_on_their_inputs() {
    let fx = Fixture::new();
    let a = fx.build(&minimal_config(), "a.img", EPOCH);
    let b = fx.build(&minimal_config(), "b.img", EPOCH);
    assert_eq!(
        file_sha256(&a),
        file_sha256(&b),
        "same inputs and SOURCE_DATE_EPOCH, different bytes"
    );

    let later = fx.build(&minimal_config(), "later.img", "1700000600");
    assert_ne!(
        file_sha256(&a),
        file_sha256(&later),
        "SOURCE_DATE_EPOCH must reach the image"
    );

    let edited = fx.path("edited.yaml");
    let mut yaml = std::fs::read_to_string(minimal_config()).expect("config");
    yaml.push_str("# edited\n");
    std::fs::write(&edited, yaml).expect("write");
    let other = fx.build(&edited, "other.img", EPOCH);
    assert_ne!(file_sha256(&a), file_sha256(&other), "the config must reach the image");
    assert_ne!(
        partitions(&a)[0].guid,
        partitions(&other)[0].guid,
        "GUIDs derive from the inputs"
    );
}

#[test]
fn invalid_config_is_refused_with_its_diagnostics() {
    let fx = Fixture::new();
    let bad = fx.path("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nguests:\n  - name: web\n    memory: lots\n    colour: blue\n",
    )
    .expect("write");
    let out = fx.path("never.img");
    let o = run(&mut fx.build_cmd(&bad, &out, EPOCH));
    let t = text(&o);
    assert!(!o.status.success(), "an invalid config was built: {t}");
    assert!(t.contains("bad.yaml:"), "diagnostics name the file and line: {t}");
    assert!(t.contains("colour"), "the unknown field is reported: {t}");
    assert!(!out.exists(), "nothing may be written for an invalid config");
}

#[test]
fn inspect_reports_partitions_versions_config_and_verifies_the_uki() {
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);
    let inspect = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel-image"));
        c.arg("inspect");
        if json {
            c.arg("--json");
        }
        run(c.arg(&image))
    };
    let o = inspect(false);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in [
        "KEEL-ESP",
        "KEEL-CONFIG",
        "KEEL-DATA",
        "EFI/Linux/keel-1.0.0.efi",
        "blessed",
        "sha256 verified",
        "keel-minimal",
        "hello",
        "as built",
    ] {
        assert!(t.contains(needle), "inspect output lacks {needle:?}:\n{t}");
    }
    let o = inspect(true);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect --json");
    assert_eq!(j["esp"]["versions"][0]["version"], "1.0.0");
    assert_eq!(j["esp"]["versions"][0]["verification"], "verified");
    assert_eq!(j["config"]["hostname"], "keel-minimal");
    assert_eq!(j["config"]["guests"][0]["name"], "hello");
    assert_eq!(j["partitions"].as_array().map(Vec::len), Some(3));

    // Boot counters: rename the UKI the way systemd-boot does before a try.
    let esp_part = partition(&image, "KEEL-ESP");
    {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("open rw");
        file.seek(SeekFrom::Start(esp_part.offset)).expect("seek");
        let mut vol = vec![0u8; esp_part.size as usize];
        file.read_exact(&mut vol).expect("read ESP");
        let mut cursor = std::io::Cursor::new(vol);
        {
            let fs = fatfs::FileSystem::new(&mut cursor, fatfs::FsOptions::new()).expect("mount ESP");
            {
                let dir = fs.root_dir().open_dir("EFI/Linux").expect("EFI/Linux");
                dir.rename("keel-1.0.0.efi", &dir, "keel-1.0.0+2-1.efi")
                    .expect("rename");
            }
            fs.unmount().expect("unmount");
        }
        file.seek(SeekFrom::Start(esp_part.offset)).expect("seek");
        file.write_all(cursor.get_ref()).expect("write ESP back");
    }
    let o = inspect(true);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let v = &j["esp"]["versions"][0];
    assert_eq!(
        (v["tries_left"].as_u64(), v["tries_done"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    assert_eq!(
        v["verification"], "verified",
        "a renamed UKI still matches its manifest"
    );
    assert!(text(&inspect(false)).contains("2 tries left, 1 done"));

    // A damaged UKI: flip one byte of the kernel inside the image.
    let mut bytes = std::fs::read(&image).expect("read");
    let needle = &fx.kernel_bytes[4096..4160];
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("kernel bytes in the image");
    bytes[at] ^= 0xff;
    std::fs::write(&image, &bytes).expect("write");
    let o = inspect(false);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "a mismatching UKI must fail inspect: {t}");
    assert!(t.contains("MISMATCH") && t.contains("damaged or was replaced"), "{t}");
}

fn flash_cmd(image: &Path, target: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel-image"));
    c.arg("flash").arg("--yes").arg(image).arg(target);
    c
}

#[test]
fn flash_writes_and_verifies_a_file_and_refuses_bad_targets() {
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);
    let size = std::fs::metadata(&image).expect("stat").len();

    let target = fx.path("disk.raw");
    let f = std::fs::File::create(&target).expect("create");
    f.set_len(size + (1 << 20)).expect("size");
    drop(f);
    let o = run(&mut flash_cmd(&image, &target));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("verified"), "{}", text(&o));
    let mut written = vec![0u8; size as usize];
    std::fs::File::open(&target)
        .expect("open")
        .read_exact(&mut written)
        .expect("read");
    assert_eq!(sha256_hex(&written), file_sha256(&image));

    let small = fx.path("small.raw");
    std::fs::File::create(&small)
        .expect("create")
        .set_len(size - 512)
        .expect("size");
    let o = run(&mut flash_cmd(&image, &small));
    assert!(!o.status.success() && text(&o).contains("smaller than"), "{}", text(&o));
    let untouched = std::fs::read(&small).expect("read");
    assert!(
        untouched.iter().all(|&b| b == 0),
        "a refused target must not be written"
    );

    let o = run(&mut flash_cmd(&image, &fx.path("missing.raw")));
    assert!(
        !o.status.success() && text(&o).contains("does not exist"),
        "{}",
        text(&o)
    );
    let o = run(&mut flash_cmd(&image, &image));
    assert!(
        !o.status.success() && text(&o).contains("is the image itself"),
        "{}",
        text(&o)
    );
    let o = run(&mut flash_cmd(&image, fx.dir.path()));
    assert!(
        !o.status.success() && text(&o).contains("neither a block device"),
        "{}",
        text(&o)
    );

    // Without --yes and without a terminal, nothing happens.
    let o = run(Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .arg("flash")
        .arg(&image)
        .arg(&target)
        .stdin(std::process::Stdio::null()));
    assert!(!o.status.success() && text(&o).contains("--yes"), "{}", text(&o));
}

/// `losetup` a file; detached again on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Self {
        require("losetup", "mount");
        let o = run(Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(file));
        assert!(
            o.status.success(),
            "losetup failed (this test needs root and loop devices; CI runs as root): {}",
            text(&o)
        );
        Self(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn flash_refuses_a_mounted_loop_device_and_writes_it_once_unmounted() {
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);
    let size = std::fs::metadata(&image).expect("stat").len();

    // A loop device holding a copy of the image, KEEL-DATA formatted (as PID 1 would)
    // and mounted. (ext4, not vfat: some kernels, like this sandbox's, have no vfat.)
    require("mke2fs", "e2fsprogs");
    let backing = fx.path("backing.raw");
    std::fs::copy(&image, &backing).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .expect("open")
        .set_len(size + (4 << 20))
        .expect("grow");
    let dev = Loop::attach(&backing);
    let part = format!("{}p3", dev.0);
    // Some kernels (this sandbox's) do not scan loop devices for a GPT; partx tells the
    // kernel about the partitions with BLKPG instead.
    if !Path::new(&part).exists() {
        let _ = Command::new("partx").arg("-a").arg(&dev.0).status();
    }
    for _ in 0..50 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        Path::new(&part).exists(),
        "{part} did not appear after losetup --partscan and partx -a"
    );
    let o = run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "KEEL-DATA"])
        .arg(&part));
    assert!(o.status.success(), "mke2fs {part}: {}", text(&o));
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let o = run(Command::new("mount").arg(&part).arg(&mnt));
    assert!(o.status.success(), "mount {part}: {}", text(&o));
    let mounted = Mounted(mnt.clone());

    // The whole disk (a partition is mounted), the partition itself, and the backing file.
    for target in [PathBuf::from(&dev.0), PathBuf::from(&part), backing.clone()] {
        let o = run(&mut flash_cmd(&image, &target));
        assert!(
            !o.status.success(),
            "flash to {} while mounted succeeded",
            target.display()
        );
        assert!(text(&o).contains("is mounted"), "{}: {}", target.display(), text(&o));
    }
    drop(mounted);

    // Unmounted: flash the loop device (a block device, opened O_EXCL) and verify.
    let o = run(&mut flash_cmd(&image, Path::new(&dev.0)));
    assert!(o.status.success(), "{}", text(&o));
    let mut written = vec![0u8; size as usize];
    std::fs::File::open(&backing)
        .expect("open")
        .read_exact(&mut written)
        .expect("read");
    assert_eq!(sha256_hex(&written), file_sha256(&image));
}

#[test]
fn run_prints_the_documented_qemu_invocation() {
    require_file("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf");
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk,odd.img", EPOCH);
    let o = run(Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args([
            "run",
            "--print",
            "--accel",
            "tcg",
            "--memory",
            "2GiB",
            "--forward",
            "8443:443",
        ])
        .arg(&image)
        .args(["--", "-d", "guest_errors"]));
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    // No --cpus: one vCPU under TCG (issue 11, `Accel::default_cpus`), and no warning.
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    for needle in [
        "qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 2048 -smp 1",
        "-nodefaults -nographic -serial stdio -no-reboot",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "if=pflash,format=raw,unit=1,file=",
        "disk,,odd.img",
        // Only the disk boots: no network boot when the boot loader exits to OVMF.
        "-device virtio-blk-pci,drive=keel-disk,bootindex=0 -boot strict=on",
        // A test's NIC never leaves the machine: only the forwards get through.
        "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:8443-:443",
        "-d guest_errors",
    ] {
        assert!(t.contains(needle), "{needle:?} missing from: {t}");
    }
    assert!(
        !t.contains("OVMF_VARS_4M.fd"),
        "the VARS template itself must never be written: {t}"
    );
}

#[test]
fn run_warns_when_tcg_gets_more_than_one_vcpu() {
    require_file("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf");
    let fx = Fixture::new();
    let image = fx.build(&minimal_config(), "disk.img", EPOCH);
    let o = run(Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["run", "--print", "--accel", "tcg", "--cpus", "2"])
        .arg(&image));
    assert!(o.status.success(), "{}", text(&o));
    // The operator's choice stands, with the reason it is risky.
    assert!(String::from_utf8_lossy(&o.stdout).contains("-smp 2"), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: --cpus 2 under TCG") && err.contains("drop --cpus"),
        "{err}"
    );
}

#[test]
fn default_build_assembles_the_host_initramfs_from_programs_modules_and_guest_files() {
    require("cpio", "cpio");
    require_file("/bin/busybox", "busybox-static");
    let kernel_dir = std::fs::canonicalize("/var/cache/keel/kernels/linux-image-amd64")
        .expect("Debian's host kernel in /var/cache/keel/kernels: run ci/setup");
    let kver = std::fs::read_to_string(kernel_dir.join(".kernel-version")).expect(".kernel-version");
    let fx = Fixture::new();
    // Stand-ins for the static programs and the guest kernel: assembly is what is tested.
    let bin = fx.path("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    for name in ["keel-init", "keel-vmm", "keelctl"] {
        std::fs::write(bin.join(name), pattern(name, 4096)).expect("write");
    }
    let guest_kernel = fx.path("guest-bzImage");
    std::fs::write(&guest_kernel, pattern("GUEST", 8192)).expect("write");
    let image = fx.path("disk.img");
    let o = run(Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(["build", "--size", SIZE, "--version", "1.0.0", "--json", "--config"])
        .arg(minimal_config())
        .arg("-o")
        .arg(&image)
        .arg("--kernel")
        .arg(&fx.kernel)
        .arg("--modules")
        .arg(kernel_dir.join("lib/modules").join(kver.trim()))
        .arg("--guest-kernel")
        .arg(&guest_kernel)
        .arg("--bin-dir")
        .arg(&bin)
        .env("SOURCE_DATE_EPOCH", EPOCH));
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("build --json");
    eprintln!("build report: {report}");

    let uki_bytes = read_fat_file(&fat(&image, "KEEL-ESP"), "EFI/Linux/keel-1.0.0.efi");
    let packed = uki::section_data(&uki_bytes, ".initrd")
        .expect("parse")
        .expect(".initrd");
    assert_eq!(
        &packed[..4],
        &[0x28, 0xb5, 0x2f, 0xfd],
        "the initramfs is zstd-compressed"
    );
    let cpio = zstd::stream::decode_all(packed).expect("zstd");
    assert!(cpio.starts_with(b"070701"), "a newc archive inside");
    let mut child = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cpio");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&cpio));
    let listing = child.wait_with_output().expect("cpio -t");
    writer.join().expect("writer").expect("write to cpio");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let modules = format!("lib/modules/{}", kver.trim());
    for path in [
        "init".to_owned(),
        "usr/bin/keel-vmm".into(),
        "usr/bin/keelctl".into(),
        "sbin/mke2fs".into(),
        "sbin/e2fsck".into(),
        "sbin/resize2fs".into(),
        "sbin/mkfs.xfs".into(),
        "sbin/xfs_growfs".into(),
        format!("{modules}/modules.keel"),
        format!("{modules}/modules.dep"),
        format!("{modules}/modules.alias"),
        "usr/lib/keel/guest/bzImage".into(),
        "usr/lib/keel/guest/initrd".into(),
        "etc/os-release".into(),
    ] {
        assert!(
            listing.lines().any(|l| l == path),
            "{path} missing from the initramfs:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&modules) && l.ends_with("/kvm-amd.ko")),
        "kvm-amd module"
    );
}
