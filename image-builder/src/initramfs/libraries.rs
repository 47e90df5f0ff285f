//! Finding the shared libraries a host tool needs (e2fsprogs' mke2fs, e2fsck, resize2fs), so
//! it runs inside the initramfs: its program interpreter (`PT_INTERP`, the dynamic loader)
//! and, transitively, every `DT_NEEDED` library, searched the way glibc's loader does
//! without an ld.so.cache: the object's `DT_RPATH`/`DT_RUNPATH` (`$ORIGIN` expanded), then
//! Debian's multiarch and default directories.
//!
//! Libraries keep the path they were found under (`/lib/x86_64-linux-gnu/libc.so.6`, not
//! the `/usr/lib/...` a merged-/usr system resolves it to), because that is where the loader
//! will look for them in the initramfs; their content is read through symlinks.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use object::elf::{DT_NEEDED, DT_NULL, DT_RPATH, DT_RUNPATH, FileHeader64};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::{Endianness, FileKind};

use super::InitramfsError;

/// Where glibc's loader looks on Debian amd64 when there is no ld.so.cache.
pub const DEBIAN_LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// What the dynamic section and program headers of one ELF file say.
#[derive(Debug, Default, PartialEq, Eq)]
struct ElfDeps {
    interpreter: Option<String>,
    needed: Vec<String>,
    search_path: Vec<String>,
}

fn parse_elf(path: &Path, data: &[u8]) -> Result<ElfDeps, InitramfsError> {
    let bad = |reason: String| InitramfsError::BadElf {
        path: path.to_owned(),
        reason,
    };
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => {}
        Ok(kind) => return Err(bad(format!("{kind:?} is not a 64-bit ELF file"))),
        Err(e) => return Err(bad(e.to_string())),
    }
    let header = FileHeader64::<Endianness>::parse(data).map_err(|e| bad(e.to_string()))?;
    let endian = header.endian().map_err(|e| bad(e.to_string()))?;
    let mut deps = ElfDeps::default();
    for ph in header.program_headers(endian, data).map_err(|e| bad(e.to_string()))? {
        if let Some(interp) = ph.interpreter(endian, data).map_err(|e| bad(e.to_string()))? {
            deps.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).map_err(|e| bad(e.to_string()))?;
    if let Some((dynamics, strings_index)) = sections.dynamic(endian, data).map_err(|e| bad(e.to_string()))? {
        let strings = sections
            .strings(endian, data, strings_index)
            .map_err(|e| bad(e.to_string()))?;
        for d in dynamics {
            let tag = d.tag(endian);
            if tag == DT_NULL {
                break; // the end of the table; what follows is padding
            }
            if tag != DT_NEEDED && tag != DT_RPATH && tag != DT_RUNPATH {
                continue;
            }
            let value =
                String::from_utf8_lossy(d.string(endian, strings).map_err(|e| bad(e.to_string()))?).into_owned();
            if tag == DT_NEEDED {
                deps.needed.push(value);
            } else {
                deps.search_path
                    .extend(value.split(':').filter(|s| !s.is_empty()).map(str::to_owned));
            }
        }
    }
    Ok(deps)
}

/// Resolves the files a dynamically linked program needs, against the host's root
/// filesystem or another root.
#[derive(Debug, Clone)]
pub struct LibraryResolver {
    /// Prefix for every looked-up path (`/` for the host).
    root: PathBuf,
    dirs: Vec<String>,
}

impl Default for LibraryResolver {
    fn default() -> Self {
        Self::new("/")
    }
}

impl LibraryResolver {
    /// A resolver over the tree at `root` with Debian's default library directories.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            dirs: DEBIAN_LIBRARY_DIRS.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn host(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Absolute in-image paths of the loader and every library `program` (an in-image
    /// absolute path, read from `root`) needs, sorted. Empty for a static program.
    pub fn needed_by(&self, program: &str) -> Result<Vec<String>, InitramfsError> {
        let mut found = BTreeSet::new();
        let mut queue = vec![program.to_owned()];
        let mut missing = Vec::new();
        while let Some(object) = queue.pop() {
            let host = self.host(&object);
            let data = fs::read(&host).map_err(|source| InitramfsError::Read {
                path: host.clone(),
                source,
            })?;
            let deps = parse_elf(&host, &data)?;
            if let Some(interp) = deps.interpreter
                && found.insert(interp.clone())
            {
                // The loader must exist at exactly this path; it needs nothing itself.
                if !self.host(&interp).is_file() {
                    missing.push(format!("{interp} (interpreter of {object})"));
                }
            }
            let origin = Path::new(&object)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let search: Vec<String> = deps
                .search_path
                .iter()
                .map(|d| d.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin))
                .chain(self.dirs.iter().cloned())
                .collect();
            for name in deps.needed {
                let candidate = if name.contains('/') {
                    Some(name.clone()).filter(|p| self.host(p).is_file())
                } else {
                    search
                        .iter()
                        .map(|dir| format!("{}/{name}", dir.trim_end_matches('/')))
                        .find(|p| self.host(p).is_file())
                };
                match candidate {
                    Some(path) => {
                        if found.insert(path.clone()) {
                            queue.push(path);
                        }
                    }
                    None => missing.push(format!("{name} (needed by {object})")),
                }
            }
        }
        if missing.is_empty() {
            Ok(found.into_iter().collect())
        } else {
            Err(InitramfsError::MissingLibraries {
                program: program.to_owned(),
                missing,
            })
        }
    }

    /// The host path to read an in-image path's content from.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.host(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mke2fs_needs_libext2fs_libc_and_the_loader() {
        let libs = LibraryResolver::default()
            .needed_by("/sbin/mke2fs")
            .expect("mke2fs from e2fsprogs must be installed (ci/setup)");
        for want in [
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libext2fs.so.2",
        ] {
            assert!(libs.iter().any(|l| l == want), "{want} missing from {libs:?}");
        }
    }

    #[test]
    fn not_elf_and_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("script"), "#!/bin/sh\n").unwrap();
        let r = LibraryResolver::new(dir.path());
        let err = r.needed_by("/script").unwrap_err().to_string();
        assert!(err.contains("script") && err.contains("ELF"), "{err}");
        let err = r.needed_by("/nonexistent").unwrap_err().to_string();
        assert!(err.contains("nonexistent"), "{err}");
    }

    #[test]
    fn a_missing_library_is_named() {
        // A copy of a real dynamically linked program inside a root that has no libraries.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::copy("/sbin/mke2fs", dir.path().join("bin/mke2fs")).unwrap();
        let err = LibraryResolver::new(dir.path())
            .needed_by("/bin/mke2fs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("libext2fs.so.2 (needed by /bin/mke2fs)"), "{err}");
        assert!(err.contains("/lib64/ld-linux-x86-64.so.2 (interpreter"), "{err}");
    }
}
