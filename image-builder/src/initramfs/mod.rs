//! The appliance's initramfs: a reproducible newc cpio archive built in memory.
//!
//! ```no_run
//! use keel_image::initramfs::{self, Builder};
//! # fn main() -> Result<(), initramfs::InitramfsError> {
//! let mut b = Builder::from_env()?; // mtime = $SOURCE_DATE_EPOCH (0 when unset)
//! b.host_file("/init", "target/keel-init".as_ref(), 0o755)?;
//! b.host_program("/sbin/mke2fs")?; // the program and its loader + shared libraries
//! let names = initramfs::read_modules_list("kernel-config/modules.list".as_ref())?;
//! b.kernel_modules("/var/cache/keel/kernels/linux-image-amd64/lib/modules/6.1.0-56-amd64".as_ref(), &names)?;
//! b.symlink("/bin/sh", "busybox")?;
//! let cpio: Vec<u8> = b.build()?; // or b.write_to_file(path)
//! # Ok(()) }
//! ```
//!
//! The same entries and mtime always give the same bytes: entries are sorted by path,
//! parent directories are created implicitly (0755), inode numbers follow the order, owners
//! are root, and there are no device nodes (devtmpfs provides /dev). The archive is not
//! compressed; callers that want compression wrap it.
//!
//! Kernel modules land at `/lib/modules/<kver>/<tree path>` with `modules.keel`, the load
//! list keel-init follows (format in [`modules`]), a `modules.dep` of just those modules, and
//! the tree's `modules.alias` and `modules.builtin`.

pub mod cpio;
pub mod libraries;
pub mod modules;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cpio::{Archive, Entry};
use libraries::LibraryResolver;
pub use modules::{Module, ModuleTree, Resolved};

/// Everything that can go wrong while assembling an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("initramfs path {path:?} is empty or leaves the root (`..`); use an absolute path like /bin/tool")]
    BadPath { path: String },
    #[error("initramfs path {path} is added twice with different content or type")]
    Conflict { path: String },
    #[error("initramfs path {path} is a file, but something is being placed inside it")]
    NotADirectory { path: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is larger than the 4 GiB a newc cpio entry can hold")]
    TooLarge { path: String },
    #[error("kernel modules directory {dir}: {reason}")]
    BadModulesDir { dir: PathBuf, reason: String },
    #[error("unknown kernel module(s) {} in {dir}: not a module, alias or built-in of this kernel; fix the name in kernel-config/modules.list", names.join(", "))]
    UnknownModules { names: Vec<String>, dir: PathBuf },
    #[error("{path}:{line}: {reason}")]
    BadModulesList { path: PathBuf, line: usize, reason: String },
    #[error("{path}: not a usable ELF program: {reason}")]
    BadElf { path: PathBuf, reason: String },
    #[error("{program} needs libraries that were not found: {}", missing.join(", "))]
    MissingLibraries { program: String, missing: Vec<String> },
    #[error("SOURCE_DATE_EPOCH={value:?} is not a number of seconds between 0 and 4294967295")]
    BadSourceDateEpoch { value: String },
}

/// Assembles an initramfs. Add entries in any order; [`Builder::build`] sorts them.
#[derive(Debug)]
pub struct Builder {
    archive: Archive,
    mtime: u32,
    libraries: LibraryResolver,
}

impl Builder {
    /// A builder whose entries all get `mtime` (seconds since 1970).
    pub fn with_mtime(mtime: u32) -> Self {
        Self {
            archive: Archive::default(),
            mtime,
            libraries: LibraryResolver::default(),
        }
    }

    /// A builder whose mtime is `$SOURCE_DATE_EPOCH`, or 0 when it is unset.
    pub fn from_env() -> Result<Self, InitramfsError> {
        Ok(Self::with_mtime(source_date_epoch(
            std::env::var("SOURCE_DATE_EPOCH").ok().as_deref(),
        )?))
    }

    /// Adds a regular file with the given content and permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Result<&mut Self, InitramfsError> {
        let data = data.into();
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge { path: path.to_owned() });
        }
        self.archive.insert(path, Entry::File { mode, data })?;
        Ok(self)
    }

    /// Adds a copy of the host file `host` (symlinks followed) at `path`.
    pub fn host_file(&mut self, path: &str, host: &Path, mode: u32) -> Result<&mut Self, InitramfsError> {
        let data = fs::read(host).map_err(|source| InitramfsError::Read {
            path: host.to_owned(),
            source,
        })?;
        self.file(path, mode, data)
    }

    /// Adds a directory (parents of other entries are added implicitly with 0755).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.archive.insert(path, Entry::Dir { mode })?;
        Ok(self)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.archive.insert(
            path,
            Entry::Symlink {
                target: target.to_owned(),
            },
        )?;
        Ok(self)
    }

    /// Adds the host program at `path` (same path in the image, permission bits kept) and
    /// its dynamic loader and shared libraries. Returns the library paths added.
    pub fn host_program(&mut self, path: &str) -> Result<Vec<String>, InitramfsError> {
        let libraries = self.libraries.needed_by(path)?;
        for file in std::iter::once(path).chain(libraries.iter().map(String::as_str)) {
            let host = self.libraries.host_path(file);
            let meta = fs::metadata(&host).map_err(|source| InitramfsError::Read {
                path: host.clone(),
                source,
            })?;
            self.host_file(file, &host, meta.permissions().mode() & 0o7777)?;
        }
        Ok(libraries)
    }

    /// Adds the kernel modules `names` (module names or aliases) of the tree at
    /// `modules_dir` (`.../lib/modules/<kver>`, depmod already run) with their dependencies,
    /// the load list `modules.keel`, a matching `modules.dep`, and the tree's
    /// `modules.alias` and `modules.builtin`.
    pub fn kernel_modules<S: AsRef<str>>(
        &mut self,
        modules_dir: &Path,
        names: &[S],
    ) -> Result<Resolved, InitramfsError> {
        let tree = ModuleTree::open(modules_dir)?;
        let resolved = tree.resolve(names)?;
        let base = format!("/lib/modules/{}", tree.kernel_version());
        for module in &resolved.load_order {
            self.host_file(
                &format!("{base}/{}", module.path),
                &modules_dir.join(&module.path),
                0o644,
            )?;
        }
        self.file(&format!("{base}/{}", modules::LOAD_LIST), 0o644, resolved.load_list())?;
        self.file(&format!("{base}/modules.dep"), 0o644, tree.dep_file_for(&resolved))?;
        for index in ["modules.alias", "modules.builtin"] {
            let host = modules_dir.join(index);
            if host.exists() {
                self.host_file(&format!("{base}/{index}"), &host, 0o644)?;
            }
        }
        Ok(resolved)
    }

    /// The paths in the archive so far, in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.archive.paths()
    }

    /// The uncompressed newc cpio archive.
    pub fn build(&self) -> Result<Vec<u8>, InitramfsError> {
        // Sizes are checked when files are added, so this cannot hit newc's limits.
        self.archive
            .to_bytes(self.mtime)
            .map_err(|source| InitramfsError::Write {
                path: PathBuf::from("<memory>"),
                source,
            })
    }

    /// Writes the archive to `path` (replaced if it exists).
    pub fn write_to_file(&self, path: &Path) -> Result<(), InitramfsError> {
        let bytes = self.build()?;
        fs::write(path, bytes).map_err(|source| InitramfsError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

/// kernel-config/modules.list of the source tree this crate was built from, embedded so the
/// binary does not depend on where that tree was when it was compiled.
pub const DEFAULT_MODULES_LIST: &str = include_str!("../../../kernel-config/modules.list");

/// Reads a modules list (kernel-config/modules.list): one name per line, `#` comments,
/// blank lines ignored.
pub fn read_modules_list(path: &Path) -> Result<Vec<String>, InitramfsError> {
    let text = fs::read_to_string(path).map_err(|source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_modules_list(path, &text)
}

/// Parses a modules list's text; `path` names it in errors.
pub fn parse_modules_list(path: &Path, text: &str) -> Result<Vec<String>, InitramfsError> {
    let mut names = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.split_whitespace().count() != 1 || line.contains('/') {
            return Err(InitramfsError::BadModulesList {
                path: path.to_owned(),
                line: index + 1,
                reason: format!("{line:?} is not one module name (write one name per line, e.g. kvm_amd)"),
            });
        }
        names.push(line.to_owned());
    }
    Ok(names)
}

fn source_date_epoch(value: Option<&str>) -> Result<u32, InitramfsError> {
    match value {
        None | Some("") => Ok(0),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| InitramfsError::BadSourceDateEpoch { value: v.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_date_epoch_parsing() {
        assert_eq!(source_date_epoch(None).unwrap(), 0);
        assert_eq!(source_date_epoch(Some("1700000000")).unwrap(), 1_700_000_000);
        assert!(
            source_date_epoch(Some("yesterday"))
                .unwrap_err()
                .to_string()
                .contains("SOURCE_DATE_EPOCH")
        );
        assert!(source_date_epoch(Some("4294967296")).is_err());
    }

    #[test]
    fn modules_list_parsing() {
        let p = Path::new("modules.list");
        let names = parse_modules_list(p, "# comment\nkvm_amd\n\n  bridge  # trailing\nnls_iso8859-1\n").unwrap();
        assert_eq!(names, ["kvm_amd", "bridge", "nls_iso8859-1"]);
        let err = parse_modules_list(p, "kvm\nkvm amd\n").unwrap_err().to_string();
        assert!(err.starts_with("modules.list:2: "), "{err}");
    }

    /// Unpacks an archive with GNU cpio into a fresh directory.
    fn unpack(bytes: &[u8]) -> tempfile::TempDir {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--make-directories", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio not found: run ci/setup");
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(child.wait().unwrap().success());
        dir
    }

    /// The strongest check that library collection is complete: the collected files alone,
    /// in a chroot, run the program.
    #[test]
    fn host_program_runs_in_a_chroot_of_just_the_archive() {
        assert!(
            nix_is_root(),
            "this test chroots into the unpacked archive and needs root (CI runs as root)"
        );
        let mut b = Builder::with_mtime(0);
        let libs = b
            .host_program("/sbin/mke2fs")
            .expect("mke2fs from e2fsprogs (ci/setup)");
        assert!(libs.len() >= 3, "{libs:?}");
        let root = unpack(&b.build().unwrap());
        let out = std::process::Command::new("chroot")
            .arg(root.path())
            .args(["/sbin/mke2fs", "-V"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mke2fs -V in chroot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("mke2fs"), "{out:?}");
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// Against Debian's real host kernel tree unpacked by ci/setup: every name in
    /// kernel-config/modules.list resolves, the load list is in dependency order, and the
    /// archive holds each listed file.
    #[test]
    fn modules_list_resolves_against_debians_host_kernel() {
        let link = Path::new("/var/cache/keel/kernels/linux-image-amd64");
        let kernel_dir = fs::canonicalize(link).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run ci/setup (it unpacks Debian's linux-image-amd64 there)",
                link.display()
            )
        });
        let kver = fs::read_to_string(kernel_dir.join(".kernel-version")).unwrap();
        let modules_dir = kernel_dir.join("lib/modules").join(kver.trim());
        let names = parse_modules_list(Path::new("kernel-config/modules.list"), DEFAULT_MODULES_LIST).unwrap();

        let mut b = Builder::with_mtime(0);
        let resolved = b.kernel_modules(&modules_dir, &names).unwrap();
        let order: Vec<&str> = resolved.load_order.iter().map(|m| m.name.as_str()).collect();
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| *m == n)
                .unwrap_or_else(|| panic!("{n} not in {order:?}"))
        };
        assert!(pos("irqbypass") < pos("kvm") && pos("kvm") < pos("kvm_amd") && pos("kvm") < pos("kvm_intel"));
        assert!(pos("jbd2") < pos("ext4") && pos("mbcache") < pos("ext4") && pos("crc32c_generic") < pos("ext4"));
        assert!(pos("fat") < pos("vfat") && pos("nf_tables") < pos("nft_masq") && pos("llc") < pos("bridge"));
        for name in &names {
            assert!(
                order.contains(&modules::canonical_name(name).as_str()) || resolved.builtin.contains(name),
                "{name}"
            );
        }
        let base = format!("lib/modules/{}", kver.trim());
        let paths: Vec<&str> = b.paths().collect();
        for m in &resolved.load_order {
            assert!(
                paths.contains(&format!("{base}/{}", m.path).as_str()),
                "{} missing",
                m.path
            );
        }
        for index in ["modules.keel", "modules.dep", "modules.alias", "modules.builtin"] {
            assert!(paths.contains(&format!("{base}/{index}").as_str()), "{index} missing");
        }
    }

    #[test]
    fn same_input_same_bytes() {
        let build = || {
            let mut b = Builder::with_mtime(1_700_000_000);
            b.file("/etc/keel/version", 0o644, "1.0\n").unwrap();
            b.symlink("/bin/sh", "busybox").unwrap();
            b.file("/init", 0o755, "#!/bin/sh\n").unwrap();
            b.build().unwrap()
        };
        assert_eq!(build(), build());
    }
}
