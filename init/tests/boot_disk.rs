//! `boot: disk` on disks laid out like Debian 12's genericcloud image (root ext4 on
//! partition 1 with /boot inside, GRUB, an ESP on 15) and Ubuntu 24.04's cloud images
//! (an ESP on 15, /boot on its own ext4 partition 16), built here with e2fsprogs'
//! `mke2fs -d`, util-linux's `sfdisk`, GNU `cpio`, `zstd` and `gzip`: the boot entry
//! finder reads what those tools wrote, not what this crate wrote.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use keel_init::storage::boot_entry::{self, BootError};

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is missing: apt-get install {package} (ci/setup does)");
}

fn sh(cmd: &mut Command) {
    let o = cmd.output().expect("spawn");
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A kernel keel-vmm would take: a bzImage header ("HdrS" at 0x202) and some bytes.
fn fake_kernel(tag: u8) -> Vec<u8> {
    let mut k: Vec<u8> = (0..64 * 1024u32).map(|i| (i as u8) ^ tag).collect();
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k
}

/// A newc initramfs of `files` (relative paths with contents), compressed by `compress`.
fn initramfs(work: &Path, files: &[(&str, &[u8])], compress: &str) -> Vec<u8> {
    let tree = tempfile::tempdir_in(work).expect("tempdir");
    for (p, data) in files {
        let path = tree.path().join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, data).expect("write");
    }
    let out = work.join(format!("initrd.{compress}"));
    let script = format!(
        "find . | sort | cpio -o -H newc --quiet | {compress} -c > {}",
        out.display()
    );
    sh(Command::new("sh").arg("-c").arg(script).current_dir(tree.path()));
    std::fs::read(out).expect("read initrd")
}

/// An ext4 image of `size_mib` filled from `tree` (paths → contents; a content starting
/// with "->" makes a symlink).
fn ext4(work: &Path, name: &str, size_mib: u64, uuid: &str, label: &str, tree: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = work.join(format!("{name}.d"));
    for (p, data) in tree {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        match data.strip_prefix(b"->") {
            Some(target) => {
                std::os::unix::fs::symlink(std::str::from_utf8(target).expect("utf8"), &path).expect("symlink")
            }
            None => std::fs::write(&path, data).expect("write"),
        }
    }
    let img = work.join(format!("{name}.ext4"));
    sh(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-U", uuid, "-L", label, "-d"])
        .arg(&dir)
        .arg(&img)
        .arg(format!("{size_mib}M")));
    img
}

/// A GPT disk with `parts` (number, type GUID, file system image or size in MiB).
fn gpt_disk(work: &Path, parts: &[(u32, &str, Result<&Path, u64>)]) -> PathBuf {
    let disk = work.join("disk.raw");
    let mut script = String::from("label: gpt\n");
    let mut start_mib = 1u64;
    let mut placed = Vec::new();
    for (n, ty, content) in parts {
        let mib = match content {
            Ok(img) => std::fs::metadata(img).expect("image").len().div_ceil(1 << 20),
            Err(mib) => *mib,
        };
        script += &format!(
            "{}{n} : start={}, size={}, type={ty}\n",
            disk.display(),
            start_mib * 2048,
            mib * 2048
        );
        if let Ok(img) = content {
            placed.push((start_mib << 20, img.to_path_buf()));
        }
        start_mib += mib;
    }
    let f = std::fs::File::create(&disk).expect("disk");
    f.set_len((start_mib + 1) << 20).expect("size");
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(child.wait().expect("wait").success(), "sfdisk: {script}");
    for (offset, img) in placed {
        f.write_all_at(&std::fs::read(img).expect("read"), offset)
            .expect("place");
    }
    disk
}

const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_UUID: &str = "0f3d2c1a-1111-2222-3333-444455556666";
const BOOT_UUID: &str = "5c2e0000-aaaa-bbbb-cccc-ddddeeeeffff";

fn tools() {
    require("mke2fs", "e2fsprogs");
    require("sfdisk", "fdisk");
    require("cpio", "cpio");
    require("zstd", "zstd");
}

#[test]
fn debian_genericcloud_layout_boots_grubs_default_entry() {
    tools();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let kernel = fake_kernel(1);
    let initrd = initramfs(
        w,
        &[(
            "usr/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko",
            b"module",
        )],
        "zstd",
    );
    let grub = format!(
        "set default=\"0\"\nmenuentry 'Debian GNU/Linux' --class debian {{\n\tsearch --no-floppy --fs-uuid --set=root {ROOT_UUID}\n\tlinux\t/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=aa-bb ro console=tty0 console=ttyS0,115200\n\tinitrd\t/boot/initrd.img-6.1.0-28-cloud-amd64\n}}\n"
    );
    let root = ext4(
        w,
        "root",
        16,
        ROOT_UUID,
        "",
        &[
            ("etc/os-release", b"ID=debian\n".to_vec()),
            ("boot/vmlinuz-6.1.0-28-cloud-amd64", kernel.clone()),
            ("boot/initrd.img-6.1.0-28-cloud-amd64", initrd.clone()),
            ("boot/config-6.1.0-28-cloud-amd64", b"CONFIG_VIRTIO_MMIO=m\n".to_vec()),
            ("boot/grub/grub.cfg", grub.into_bytes()),
            // An older kernel the links do not point at: GRUB's entry wins over links.
            ("vmlinuz", b"->boot/vmlinuz-6.1.0-27-cloud-amd64".to_vec()),
            ("boot/vmlinuz-6.1.0-27-cloud-amd64", fake_kernel(2)),
        ],
    );
    let disk = gpt_disk(w, &[(1, LINUX, Ok(&root)), (15, ESP, Err(2))]);
    let out = w.join("out");
    let p = boot_entry::prepare(&disk, &out).expect("bootable");
    assert!(
        p.found_by
            .contains("GRUB entry 'Debian GNU/Linux' in /boot/grub/grub.cfg on partition 1"),
        "{}",
        p.found_by
    );
    assert_eq!(p.cmdline, "root=PARTUUID=aa-bb ro console=tty0 console=ttyS0,115200");
    assert_eq!(std::fs::read(&p.kernel).expect("kernel"), kernel);
    assert_eq!(
        std::fs::read(p.initrd.as_ref().expect("initrd")).expect("initrd"),
        initrd
    );
    assert_eq!(p.warning, None, "the initramfs carries virtio_mmio");
}

#[test]
fn ubuntu_layout_with_a_separate_boot_partition_and_a_missing_module() {
    tools();
    require("gzip", "gzip");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let kernel = fake_kernel(3);
    // initramfs-tools with MODULES=dep: no virtio_mmio.
    let initrd = initramfs(
        w,
        &[(
            "usr/lib/modules/6.8.0-31-generic/kernel/drivers/block/virtio_blk.ko",
            b"m",
        )],
        "gzip",
    );
    let grub = format!(
        "set default=0\nset vt_handoff=vt.handoff=7\nmenuentry 'Ubuntu' {{\n\tsearch --no-floppy --fs-uuid --set=root {BOOT_UUID}\n\tlinux\t/vmlinuz-6.8.0-31-generic root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0 $vt_handoff\n\tinitrd\t/initrd.img-6.8.0-31-generic\n}}\n"
    );
    let root = ext4(
        w,
        "root",
        8,
        ROOT_UUID,
        "cloudimg-rootfs",
        &[("etc/os-release", b"ID=ubuntu\n".to_vec())],
    );
    let boot = ext4(
        w,
        "boot",
        16,
        BOOT_UUID,
        "BOOT",
        &[
            ("vmlinuz-6.8.0-31-generic", kernel.clone()),
            ("vmlinuz", b"->vmlinuz-6.8.0-31-generic".to_vec()),
            ("initrd.img-6.8.0-31-generic", initrd.clone()),
            ("config-6.8.0-31-generic", b"CONFIG_VIRTIO_MMIO=m\n".to_vec()),
            ("grub/grub.cfg", grub.into_bytes()),
        ],
    );
    let disk = gpt_disk(w, &[(1, LINUX, Ok(&root)), (15, ESP, Err(2)), (16, LINUX, Ok(&boot))]);
    let p = boot_entry::prepare(&disk, &w.join("out")).expect("bootable");
    assert!(
        p.found_by.contains("/grub/grub.cfg on partition 16 (BOOT)"),
        "{}",
        p.found_by
    );
    assert_eq!(
        p.cmdline,
        "root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0 vt.handoff=7"
    );
    assert_eq!(std::fs::read(&p.kernel).expect("kernel"), kernel);
    assert_eq!(
        std::fs::read(p.initrd.as_ref().expect("initrd")).expect("initrd"),
        initrd
    );
    let warning = p.warning.expect("virtio_mmio is missing");
    assert!(
        warning.contains("6.8.0-31-generic") && warning.contains("update-initramfs -u"),
        "{warning}"
    );
}

#[test]
fn links_without_a_boot_loader_and_a_disk_without_a_partition_table() {
    tools();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let kernel = fake_kernel(4);
    // The whole disk is one ext4 (no GPT), /boot inside, only Debian's links.
    let disk = ext4(
        w,
        "whole",
        16,
        ROOT_UUID,
        "",
        &[
            ("etc/os-release", b"ID=debian\n".to_vec()),
            ("boot/vmlinuz-6.1.0-28-amd64", kernel.clone()),
            ("boot/config-6.1.0-28-amd64", b"CONFIG_VIRTIO_MMIO=y\n".to_vec()),
            ("vmlinuz", b"->boot/vmlinuz-6.1.0-28-amd64".to_vec()),
        ],
    );
    let p = boot_entry::prepare(&disk, &w.join("out")).expect("bootable");
    assert!(
        p.found_by.contains("the /vmlinuz link on the whole disk"),
        "{}",
        p.found_by
    );
    assert_eq!(p.cmdline, format!("root=UUID={ROOT_UUID} ro"));
    assert_eq!(p.initrd, None);
    assert_eq!(std::fs::read(&p.kernel).expect("kernel"), kernel);
    assert_eq!(p.warning, None, "virtio_mmio is built in");
}

#[test]
fn boot_loader_spec_entries_pick_the_newest_kernel() {
    tools();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let (old, new) = (fake_kernel(5), fake_kernel(6));
    let boot = ext4(
        w,
        "boot",
        8,
        BOOT_UUID,
        "boot",
        &[
            (
                "loader/entries/a-6.9.1.conf",
                b"title Fedora\nversion 6.9.1\nsort-key fedora\nlinux /vmlinuz-6.9.1\noptions root=UUID=r ro\n"
                    .to_vec(),
            ),
            (
                "loader/entries/a-6.10.2.conf",
                b"title Fedora\nversion 6.10.2\nsort-key fedora\nlinux /vmlinuz-6.10.2\noptions root=UUID=r ro quiet\n"
                    .to_vec(),
            ),
            ("vmlinuz-6.9.1", old),
            ("vmlinuz-6.10.2", new.clone()),
        ],
    );
    let disk = gpt_disk(w, &[(1, LINUX, Ok(&boot))]);
    let p = boot_entry::prepare(&disk, &w.join("out")).expect("bootable");
    assert!(p.found_by.contains("/loader/entries/a-6.10.2.conf"), "{}", p.found_by);
    assert_eq!(p.cmdline, "root=UUID=r ro quiet");
    assert_eq!(std::fs::read(&p.kernel).expect("kernel"), new);
}

#[test]
fn disks_with_nothing_bootable_say_what_was_tried() {
    tools();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let data = ext4(
        w,
        "data",
        8,
        ROOT_UUID,
        "data",
        &[("etc/os-release", b"ID=x\n".to_vec())],
    );
    let disk = gpt_disk(w, &[(1, LINUX, Ok(&data)), (2, ESP, Err(1))]);
    let err = boot_entry::prepare(&disk, &w.join("out")).expect_err("nothing to boot");
    let text = err.to_string();
    assert!(matches!(err, BootError::NothingBootable { .. }), "{text}");
    assert!(
        text.contains("partition 2: not ext2/3/4")
            && text.contains("partition 1 (data)")
            && text.contains("use `kernel:`"),
        "{text}"
    );

    // GRUB names a kernel that is not there; a kernel that is not a kernel.
    let grub = b"menuentry 'x' {\n linux /vmlinuz-gone root=/dev/vda1\n}\n".to_vec();
    let bad = ext4(
        w,
        "bad",
        8,
        BOOT_UUID,
        "",
        &[("boot/grub/grub.cfg", grub), ("vmlinuz", b"not a kernel".to_vec())],
    );
    let err = boot_entry::prepare(&bad, &w.join("out"))
        .expect_err("kernel missing")
        .to_string();
    assert!(err.contains("GRUB entry 'x'") && err.contains("/vmlinuz-gone"), "{err}");
    let links = ext4(
        w,
        "links",
        8,
        BOOT_UUID,
        "",
        &[("vmlinuz", b"not a kernel, just text".to_vec())],
    );
    let err = boot_entry::prepare(&links, &w.join("out"))
        .expect_err("not a bzImage")
        .to_string();
    assert!(err.contains("neither an x86 bzImage nor an ELF vmlinux"), "{err}");
    assert!(!w.join("out/vmlinuz.part").exists(), "no partial file left behind");
}
