//! Does the guest's kernel find Keel's devices? They are virtio-mmio, described in ACPI;
//! a kernel with `CONFIG_VIRTIO_MMIO=m` needs `virtio_mmio.ko` in its initramfs, or it
//! waits for its root disk forever. Debian's cloud kernel is built that way and
//! initramfs-tools' default `MODULES=most` carries the module; `MODULES=dep` does not.
//!
//! The kernel's `config-VERSION` beside it says `y`, `m` or not set; for `m` the
//! initramfs is read as the kernel reads it: cpio archives (newc), one after another,
//! the last usually compressed (gzip or zstd here; other compressions are reported as
//! not checked). Bounded: at most [`MAX_UNPACKED`] bytes and [`MAX_MEMBERS`] files.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use ext4_view::Ext4;

const MAX_UNPACKED: u64 = 4 << 30;
const MAX_MEMBERS: usize = 200_000;
/// The module's file name in an initramfs (`.ko`, `.ko.xz`, `.ko.zst`).
const MODULE: &str = "virtio_mmio.ko";
const FIX: &str = "in the guest, add `virtio_mmio` to /etc/initramfs-tools/modules (or set MODULES=most \
                   in /etc/initramfs-tools/initramfs.conf) and run `update-initramfs -u`";

/// None when the kernel will find its devices (or nothing can be said); otherwise a
/// warning that says why it may not, and how to fix the image.
pub(super) fn check_virtio_mmio(fs: &Ext4, kernel: &str, initrd: Option<&Path>) -> Option<String> {
    let real = fs.canonicalize(kernel).ok()?;
    let real = real.to_str().ok()?.to_string();
    let (dir, name) = real.rsplit_once('/')?;
    let version = name.strip_prefix("vmlinuz-")?;
    let config = fs.read_to_string(format!("{dir}/config-{version}").as_str()).ok()?;
    let setting = config.lines().find_map(|l| {
        if l == "# CONFIG_VIRTIO_MMIO is not set" {
            Some("n")
        } else {
            l.strip_prefix("CONFIG_VIRTIO_MMIO=")
        }
    });
    match setting {
        Some("y") => None,
        Some("m") => match initrd.map(has_module) {
            Some(Ok(true)) => None,
            Some(Ok(false)) => Some(format!(
                "kernel {version} has virtio_mmio as a module and its initramfs does not carry it: \
                 the guest will not find its disk; {FIX}"
            )),
            Some(Err(why)) => Some(format!("virtio_mmio in the initramfs not checked: {why}")),
            None => Some(format!(
                "kernel {version} has virtio_mmio as a module and boots without an initramfs: \
                 the guest will not find its disk; {FIX}"
            )),
        },
        _ => Some(format!(
            "kernel {version} is built without CONFIG_VIRTIO_MMIO: it cannot see Keel's virtio-mmio devices"
        )),
    }
}

/// Whether the initramfs at `path` has a `virtio_mmio.ko*` member.
fn has_module(path: &Path) -> Result<bool, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut r: Box<dyn BufRead> = Box::new(BufReader::new(file));
    let mut budget = Budget {
        bytes: MAX_UNPACKED,
        members: MAX_MEMBERS,
    };
    loop {
        let head = r.fill_buf().map_err(|e| e.to_string())?;
        if head.is_empty() {
            return Ok(false);
        }
        if head.starts_with(b"0707") {
            if scan_cpio(&mut r, &mut budget)? {
                return Ok(true);
            }
        } else if head.starts_with(&[0x1f, 0x8b]) {
            r = Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(r)));
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let z = ruzstd::decoding::StreamingDecoder::new(r).map_err(|e| format!("zstd: {e}"))?;
            r = Box::new(BufReader::new(z));
        } else {
            let kind = if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
                "xz"
            } else {
                "an unknown format"
            };
            return Err(format!("initramfs compressed with {kind}"));
        }
    }
}

struct Budget {
    bytes: u64,
    members: usize,
}

/// Reads one newc cpio archive up to its trailer and the zero padding after it.
/// True as soon as the module is seen.
fn scan_cpio(r: &mut Box<dyn BufRead>, budget: &mut Budget) -> Result<bool, String> {
    let io = |e: std::io::Error| format!("initramfs: {e}");
    loop {
        if budget.members == 0 {
            return Err(format!("initramfs has more than {MAX_MEMBERS} files"));
        }
        budget.members -= 1;
        let mut header = [0u8; 110];
        r.read_exact(&mut header).map_err(io)?;
        if !header.starts_with(b"07070") {
            return Err("initramfs: a cpio header that is not newc".into());
        }
        let field = |i: usize| {
            std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| "initramfs: a cpio header with a bad number".to_string())
        };
        let (size, namesize) = (field(6)?, field(11)?);
        if namesize > 4096 {
            return Err("initramfs: a cpio name over 4 KiB".into());
        }
        let mut name = vec![0u8; namesize as usize + pad4(110 + namesize) as usize];
        r.read_exact(&mut name).map_err(io)?;
        let name = String::from_utf8_lossy(&name[..(namesize as usize).saturating_sub(1)]).into_owned();
        if name == "TRAILER!!!" {
            skip_zeros(r).map_err(io)?;
            return Ok(false);
        }
        if name.rsplit('/').next().is_some_and(|base| base.starts_with(MODULE)) {
            return Ok(true);
        }
        let skip = size + pad4(size);
        budget.bytes = budget
            .bytes
            .checked_sub(skip)
            .ok_or("initramfs: unpacks to more than 4 GiB")?;
        let copied = std::io::copy(&mut r.by_ref().take(skip), &mut std::io::sink()).map_err(io)?;
        if copied != skip {
            return Err("initramfs: truncated cpio archive".into());
        }
    }
}

fn pad4(n: u64) -> u64 {
    (4 - n % 4) % 4
}

/// The zero bytes between archives (early microcode archives are padded to a block).
fn skip_zeros(r: &mut Box<dyn BufRead>) -> std::io::Result<()> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        let zeros = buf.iter().take_while(|&&b| b == 0).count();
        let done = zeros < buf.len();
        r.consume(zeros);
        if done {
            return Ok(());
        }
    }
}
