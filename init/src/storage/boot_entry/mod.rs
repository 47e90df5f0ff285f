//! `boot: disk`: the kernel, initramfs and command line a guest's own disk would boot,
//! found the way its boot loader would find them, and copied out for keel-vmm.
//!
//! Looked for in this order, on every ext2/3/4 file system of the disk:
//! 1. GRUB's `grub.cfg` (`/boot/grub/` in the root file system, `/grub/` on a separate
//!    boot partition; `grub2` too): its default entry ([`grub`]). Debian's and Ubuntu's
//!    cloud images boot this way.
//! 2. Boot Loader Specification entries, `/loader/entries/*.conf` ([`bls`]).
//! 3. The `/vmlinuz` and `/initrd.img` links Debian's kernel packages keep (in `/` or
//!    `/boot`), with `root=UUID=` of the file system that holds `/etc/os-release`.
//!
//! Only reads: the disk is opened read-only and never mounted, so a guest's broken or
//! hostile file system cannot reach the host kernel's ext4 code. Sizes are bounded
//! ([`MAX_KERNEL`], [`MAX_INITRD`], [`MAX_CONFIG`]).

mod bls;
mod disk;
mod grub;
mod initrd;

use std::io::Write;
use std::path::{Path, PathBuf};

use disk::Volume;

/// The largest kernel copied out (Debian's is 8 MiB).
pub const MAX_KERNEL: u64 = 128 << 20;
/// The largest initramfs, all of an entry's initrds together.
pub const MAX_INITRD: u64 = 1 << 30;
/// The largest `grub.cfg` or `grubenv` read.
pub const MAX_CONFIG: u64 = 1 << 20;

const GRUB_CONFIGS: [&str; 4] = [
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];
const BLS_DIRS: [&str; 2] = ["/loader/entries", "/boot/loader/entries"];
const LINKS: [(&str, &str); 2] = [("/vmlinuz", "/initrd.img"), ("/boot/vmlinuz", "/boot/initrd.img")];
const ROOT_MARKERS: [&str; 3] = ["/etc/os-release", "/usr/lib/os-release", "/sbin/init"];

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{}: {source}", disk.display())]
    Open { disk: PathBuf, source: std::io::Error },
    #[error(
        "{}: nothing bootable found ({tried}); `boot: disk` needs a GRUB grub.cfg, Boot Loader \
         Specification entries or /vmlinuz and /initrd.img links on an ext2/3/4 partition: \
         import a cloud image, or use `kernel:` instead",
        disk.display()
    )]
    NothingBootable { disk: PathBuf, tried: String },
    #[error("{}: {found_by}: {msg}", disk.display())]
    Entry {
        disk: PathBuf,
        found_by: String,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// A file on one of the disk's file systems.
#[derive(Debug, Clone)]
struct FileRef {
    volume: usize,
    path: String,
}

/// What the disk would boot, before anything is copied.
#[derive(Debug)]
struct Found {
    found_by: String,
    kernel: FileRef,
    initrds: Vec<FileRef>,
    cmdline: String,
}

/// The boot files copied out of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The image's own command line (Keel's console settings go after it).
    pub cmdline: String,
    /// Where it was found, for the log: "GRUB entry 'Debian GNU/Linux' in
    /// /boot/grub/grub.cfg on partition 1".
    pub found_by: String,
    /// What the initramfs check said, when it has something to say.
    pub warning: Option<String>,
}

/// Finds what `disk` would boot and copies its kernel and initramfs into `out_dir`
/// (`vmlinuz`, `initrd.img`; replaced atomically).
pub fn prepare(disk: &Path, out_dir: &Path) -> Result<Prepared, BootError> {
    let (volumes, skipped) = disk::filesystems(disk)?;
    let found = find(&volumes, skipped).map_err(|tried| BootError::NothingBootable {
        disk: disk.to_path_buf(),
        tried,
    })?;
    let entry_err = |msg: String| BootError::Entry {
        disk: disk.to_path_buf(),
        found_by: found.found_by.clone(),
        msg,
    };
    std::fs::create_dir_all(out_dir).map_err(|source| BootError::Write {
        path: out_dir.into(),
        source,
    })?;
    let kernel = out_dir.join("vmlinuz");
    copy_out(&volumes, std::slice::from_ref(&found.kernel), &kernel, MAX_KERNEL)
        .map_err(|e| e.into_boot(&entry_err))?;
    check_kernel(&kernel).map_err(&entry_err)?;
    let initrd = if found.initrds.is_empty() {
        let _ = std::fs::remove_file(out_dir.join("initrd.img"));
        None
    } else {
        let path = out_dir.join("initrd.img");
        copy_out(&volumes, &found.initrds, &path, MAX_INITRD).map_err(|e| e.into_boot(&entry_err))?;
        Some(path)
    };
    let warning = initrd::check_virtio_mmio(&volumes[found.kernel.volume].fs, &found.kernel.path, initrd.as_deref());
    Ok(Prepared {
        kernel,
        initrd,
        cmdline: found.cmdline,
        found_by: found.found_by,
        warning,
    })
}

/// The first way the disk says it boots, or what was tried.
fn find(volumes: &[Volume], mut tried: Vec<String>) -> Result<Found, String> {
    for (i, v) in volumes.iter().enumerate() {
        for cfg in GRUB_CONFIGS {
            let Some(text) = read_text(v, cfg) else { continue };
            let env = read_text(v, &cfg.replace("grub.cfg", "grubenv"));
            match grub::default_entry(&text, env.as_deref()) {
                Ok(e) => return Ok(from_grub(volumes, i, cfg, e)),
                Err(why) => tried.push(format!("{cfg} on {}: {why}", v.describe())),
            }
        }
    }
    for (i, v) in volumes.iter().enumerate() {
        for dir in BLS_DIRS {
            if let Some(found) = from_bls(v, i, dir, &mut tried) {
                return Ok(found);
            }
        }
    }
    for (i, v) in volumes.iter().enumerate() {
        for (kernel, initrd) in LINKS {
            if !is_file(v, kernel) {
                continue;
            }
            let root = volumes
                .iter()
                .find(|r| ROOT_MARKERS.iter().any(|m| exists(r, m)))
                .unwrap_or(v);
            return Ok(Found {
                found_by: format!("the {kernel} link on {}", v.describe()),
                kernel: FileRef {
                    volume: i,
                    path: kernel.into(),
                },
                initrds: is_file(v, initrd)
                    .then(|| FileRef {
                        volume: i,
                        path: initrd.into(),
                    })
                    .into_iter()
                    .collect(),
                cmdline: format!("root=UUID={} ro", root.uuid),
            });
        }
    }
    if volumes.is_empty() {
        tried.push("no ext2/3/4 file system".into());
    } else {
        tried.push(format!(
            "no grub.cfg, loader entries or /vmlinuz on {}",
            volumes.iter().map(Volume::describe).collect::<Vec<_>>().join(", ")
        ));
    }
    Err(tried.join("; "))
}

fn from_grub(volumes: &[Volume], at: usize, cfg: &str, e: grub::GrubEntry) -> Found {
    use grub::RootSpec;
    // GRUB's paths are relative to its `root`: the entry's `search` or device, else the
    // file system grub.cfg is on.
    let root = match &e.root {
        Some(RootSpec::Uuid(u)) => volumes.iter().position(|v| v.uuid.eq_ignore_ascii_case(u)),
        Some(RootSpec::Label(l)) => volumes.iter().position(|v| &v.label == l),
        Some(RootSpec::Partition(n)) => volumes.iter().position(|v| v.partition == Some(*n)),
        None => None,
    }
    .unwrap_or(at);
    Found {
        found_by: format!("GRUB entry '{}' in {cfg} on {}", e.title, volumes[at].describe()),
        kernel: FileRef {
            volume: root,
            path: e.linux,
        },
        initrds: e
            .initrds
            .into_iter()
            .map(|path| FileRef { volume: root, path })
            .collect(),
        cmdline: e.args,
    }
}

fn from_bls(v: &Volume, at: usize, dir: &str, tried: &mut Vec<String>) -> Option<Found> {
    let entries = v.fs.read_dir(dir).ok()?;
    let mut parsed = Vec::new();
    for entry in entries.flatten().take(bls::MAX_ENTRIES) {
        let Ok(name) = entry.file_name().as_str().map(str::to_string) else {
            continue;
        };
        if !name.ends_with(".conf") {
            continue;
        }
        let path = format!("{dir}/{name}");
        match read_text(v, &path) {
            Some(text) if text.len() <= bls::MAX_ENTRY_BYTES => parsed.extend(bls::parse(&name, &text)),
            _ => tried.push(format!(
                "{path} on {}: unreadable or over {} bytes",
                v.describe(),
                bls::MAX_ENTRY_BYTES
            )),
        }
    }
    let e = bls::first(&parsed)?;
    // Entries in /boot/loader/entries of a root file system name paths below /boot.
    let resolve = |p: &str| {
        if dir.starts_with("/boot") && !exists(v, p) {
            format!("/boot{p}")
        } else {
            p.to_string()
        }
    };
    Some(Found {
        found_by: format!("boot loader entry {dir}/{} on {}", e.file, v.describe()),
        kernel: FileRef {
            volume: at,
            path: resolve(&e.linux),
        },
        initrds: e
            .initrds
            .iter()
            .map(|p| FileRef {
                volume: at,
                path: resolve(p),
            })
            .collect(),
        cmdline: e.options.clone(),
    })
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

fn exists(v: &Volume, path: &str) -> bool {
    v.fs.exists(absolute(path).as_str()).unwrap_or(false)
}

fn is_file(v: &Volume, path: &str) -> bool {
    v.fs.metadata(absolute(path).as_str())
        .is_ok_and(|m| m.file_type().is_regular_file())
}

/// A small text file (a boot loader config), or None when absent, too big or not UTF-8.
fn read_text(v: &Volume, path: &str) -> Option<String> {
    let meta = v.fs.metadata(path).ok()?;
    if !meta.file_type().is_regular_file() || meta.len() > MAX_CONFIG {
        return None;
    }
    String::from_utf8(v.fs.read(path).ok()?).ok()
}

enum CopyError {
    Source(String),
    Write(PathBuf, std::io::Error),
}

impl CopyError {
    fn into_boot(self, entry_err: &impl Fn(String) -> BootError) -> BootError {
        match self {
            CopyError::Source(msg) => entry_err(msg),
            CopyError::Write(path, source) => BootError::Write { path, source },
        }
    }
}

/// Copies `files` one after the other into `out` (initrds are concatenated, each
/// padded to 4 bytes as boot loaders do, which the kernel's cpio reader expects), at
/// most `limit` bytes, through a temporary file renamed into place.
fn copy_out(volumes: &[Volume], files: &[FileRef], out: &Path, limit: u64) -> Result<(), CopyError> {
    let tmp = out.with_extension("part");
    let werr = |e| CopyError::Write(tmp.clone(), e);
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(werr)?);
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let v = &volumes[f.volume];
        let path = absolute(&f.path);
        let src = |e: ext4_view::Ext4Error| CopyError::Source(format!("{path} on {}: {e}", v.describe()));
        let mut file = v.fs.open(path.as_str()).map_err(src)?;
        total += file.metadata().len();
        if total > limit {
            drop(w);
            let _ = std::fs::remove_file(&tmp);
            return Err(CopyError::Source(format!(
                "{path} on {}: more than {} MiB of boot files",
                v.describe(),
                limit >> 20
            )));
        }
        loop {
            let n = file.read_bytes(&mut buf).map_err(src)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(werr)?;
        }
        let pad = (4 - (total % 4)) % 4;
        if files.len() > 1 && pad != 0 {
            w.write_all(&[0u8; 3][..pad as usize]).map_err(werr)?;
            total += pad;
        }
    }
    w.into_inner()
        .map_err(|e| werr(e.into_error()))?
        .sync_all()
        .map_err(werr)?;
    std::fs::rename(&tmp, out).map_err(|e| CopyError::Write(out.to_path_buf(), e))
}

/// keel-vmm boots x86 bzImages (or ELF vmlinux); anything else would fail obscurely.
fn check_kernel(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 0x206];
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    use std::os::unix::fs::FileExt;
    let n = file.read_at(&mut head, 0).map_err(|e| e.to_string())?;
    let bzimage = n == head.len() && &head[0x202..0x206] == b"HdrS";
    if bzimage || head.starts_with(b"\x7fELF") {
        Ok(())
    } else {
        Err("the kernel is neither an x86 bzImage nor an ELF vmlinux".into())
    }
}
