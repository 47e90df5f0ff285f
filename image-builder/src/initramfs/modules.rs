//! Resolving kernel module names (kernel-config/modules.list) to the module files of an
//! unpacked kernel tree, with their dependencies, in an order they can be loaded in.
//!
//! Input: a modules directory `.../lib/modules/<kver>` on which `depmod` has run (Debian's
//! package ships none of the index files; `kernel-config/fetch-host` runs depmod). Read:
//! `modules.dep` (hard dependencies), `modules.softdep` (`pre:`/`post:` soft dependencies,
//! e.g. ext4 → crypto-crc32c, which the kernel would otherwise request through a
//! modprobe that the initramfs does not have), `modules.alias` (names such as `fs-vfat`),
//! `modules.builtin` (names built into the kernel: nothing to load).
//!
//! Names compare with `-` and `_` as the same character, as modprobe does.
//!
//! Output in the initramfs, under `/lib/modules/<kver>/`: the module files at their tree
//! paths, `modules.dep` limited to those files, `modules.alias` and `modules.builtin` copied
//! as they are (for coldplug later), and the load list `modules.keel`:
//!
//! ```text
//! # keel load list: <module name> <path relative to /lib/modules/<kver>>, dependencies first
//! irqbypass kernel/virt/lib/irqbypass.ko
//! kvm kernel/arch/x86/kvm/kvm.ko
//! kvm_amd kernel/arch/x86/kvm/kvm-amd.ko
//! ```
//!
//! Every module appears once, after everything it needs. keel-init reads it top to bottom,
//! calls finit_module for each line, skips modules already in `/sys/module/<name>`, may skip
//! by name (kvm_intel on an AMD CPU), and logs a failed load without stopping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use super::InitramfsError;

/// The name of the load list written next to the modules.
pub const LOAD_LIST: &str = "modules.keel";

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The module's name as the kernel knows it (`kvm_amd`).
    pub name: String,
    /// Its file relative to the modules directory (`kernel/arch/x86/kvm/kvm-amd.ko`).
    pub path: String,
}

/// The result of resolving a list of names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Modules in load order: every module after all of its dependencies.
    pub load_order: Vec<Module>,
    /// Requested names that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

impl Resolved {
    /// The text of `modules.keel`.
    pub fn load_list(&self) -> String {
        let mut out =
            String::from("# keel load list: <module name> <path relative to this directory>, dependencies first\n");
        for m in &self.load_order {
            out.push_str(&format!("{} {}\n", m.name, m.path));
        }
        out
    }
}

/// The index files of one kernel's modules directory.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    kernel_version: String,
    /// module name → (file path, direct and indirect dependencies as listed by depmod)
    modules: HashMap<String, (String, Vec<String>)>,
    /// file path → module name
    by_path: HashMap<String, String>,
    builtin: BTreeSet<String>,
    /// (pattern, module name); patterns may hold `*`, `?` and `[...]` globs
    aliases: Vec<(String, String)>,
    /// module name → (pre, post) soft dependencies, as names or aliases
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
}

/// `kvm-amd`, `kvm_amd` → `kvm_amd`.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/arch/x86/kvm/kvm-amd.ko.xz` → `kvm_amd`.
fn name_of_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    canonical_name(stem)
}

impl ModuleTree {
    /// Reads the index files of `dir` (a `lib/modules/<kver>` directory).
    pub fn open(dir: &Path) -> Result<Self, InitramfsError> {
        let kernel_version = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| InitramfsError::BadModulesDir {
                dir: dir.to_owned(),
                reason: "its name is not a kernel version".into(),
            })?
            .to_owned();
        let read = |name: &str, required: bool| -> Result<String, InitramfsError> {
            let path = dir.join(name);
            match fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(InitramfsError::BadModulesDir {
                    dir: dir.to_owned(),
                    reason: format!("{name} is missing; run `depmod -b <root> {kernel_version}` on the unpacked tree"),
                }),
                Err(source) => Err(InitramfsError::Read { path, source }),
            }
        };

        let mut modules = HashMap::new();
        let mut by_path = HashMap::new();
        for line in read("modules.dep", true)?.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = relative(path, &kernel_version);
            let deps = deps.split_whitespace().map(|d| relative(d, &kernel_version)).collect();
            let name = name_of_path(&path);
            by_path.insert(path.clone(), name.clone());
            modules.insert(name, (path, deps));
        }
        let builtin = read("modules.builtin", false)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(name_of_path)
            .collect();
        let aliases = read("modules.alias", false)?
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("alias"), Some(pattern), Some(module)) => Some((pattern.to_owned(), canonical_name(module))),
                    _ => None,
                }
            })
            .collect();
        let mut softdeps: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
        for line in read("modules.softdep", false)?.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = softdeps.entry(canonical_name(module)).or_default();
            // modprobe.d(5): "softdep MOD pre: A B post: C"; names before any "pre:" count as pre.
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.1.push(name.to_owned()),
                    name => entry.0.push(name.to_owned()),
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            kernel_version,
            modules,
            by_path,
            builtin,
            aliases,
            softdeps,
        })
    }

    /// The kernel version (`uname -r`) this tree belongs to.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The modules directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves names (module names or aliases) to modules in load order. Names that match
    /// nothing are all reported in one error.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<Resolved, InitramfsError> {
        let mut resolved = Resolved::default();
        let mut seen = BTreeSet::new();
        let mut unknown = Vec::new();
        for name in names {
            let name = name.as_ref();
            let targets = self.lookup(name);
            if targets.is_empty() {
                if self.builtin.contains(&canonical_name(name)) {
                    resolved.builtin.push(canonical_name(name));
                } else {
                    unknown.push(name.to_owned());
                }
                continue;
            }
            for target in targets {
                self.visit(&target, &mut seen, &mut resolved.load_order);
            }
        }
        if unknown.is_empty() {
            Ok(resolved)
        } else {
            Err(InitramfsError::UnknownModules {
                names: unknown,
                dir: self.dir.clone(),
            })
        }
    }

    /// Module names a name stands for: itself if it is a loadable module, else every module
    /// an alias pattern of modules.alias matching it names (as modprobe loads them all).
    fn lookup(&self, name: &str) -> Vec<String> {
        let canonical = canonical_name(name);
        if self.modules.contains_key(&canonical) {
            return vec![canonical];
        }
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if glob_match(pattern.as_bytes(), name.as_bytes())
                && self.modules.contains_key(module)
                && !found.contains(module)
            {
                found.push(module.clone());
            }
        }
        found
    }

    /// Depth-first: pre soft dependencies, hard dependencies, the module, post soft
    /// dependencies. `seen` is marked before recursing, so a cycle cannot loop.
    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<Module>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return;
        };
        let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
        // A soft dependency that matches nothing is not an error, as for modprobe.
        for soft in &pre {
            for target in self.lookup(soft) {
                self.visit(&target, seen, order);
            }
        }
        // depmod lists the dependencies nearest first; the farthest must load first.
        for dep in deps.iter().rev() {
            if let Some(dep_name) = self.by_path.get(dep) {
                self.visit(dep_name, seen, order);
            }
        }
        order.push(Module {
            name: name.to_owned(),
            path: path.clone(),
        });
        for soft in &post {
            for target in self.lookup(soft) {
                self.visit(&target, seen, order);
            }
        }
    }

    /// `modules.dep` limited to the resolved modules, for tools that read it.
    pub fn dep_file_for(&self, resolved: &Resolved) -> String {
        let mut lines = BTreeMap::new();
        for m in &resolved.load_order {
            if let Some((path, deps)) = self.modules.get(&m.name) {
                lines.insert(
                    path.clone(),
                    format!("{path}: {}", deps.join(" ")).trim_end().to_owned(),
                );
            }
        }
        lines.into_values().map(|l| l + "\n").collect()
    }
}

/// depmod may write absolute paths (`/lib/modules/<kver>/kernel/...`); keep them relative.
fn relative(path: &str, kernel_version: &str) -> String {
    let prefix = format!("/lib/modules/{kernel_version}/");
    path.trim().strip_prefix(&prefix).unwrap_or(path.trim()).to_owned()
}

/// fnmatch(3)-style matching of `*`, `?` and `[...]` (with `!`/`^` negation and ranges),
/// the subset modules.alias patterns use.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some(b'*') => (0..=text.len()).any(|i| glob_match(&pattern[1..], &text[i..])),
        Some(b'?') => !text.is_empty() && glob_match(&pattern[1..], &text[1..]),
        Some(b'[') => {
            let Some(&c) = text.first() else { return false };
            let Some(close) = pattern.iter().skip(2).position(|&b| b == b']').map(|p| p + 2) else {
                return c == b'[' && glob_match(&pattern[1..], &text[1..]);
            };
            let mut set = &pattern[1..close];
            let negate = matches!(set.first(), Some(b'!' | b'^'));
            if negate {
                set = &set[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob_match(&pattern[close + 1..], &text[1..])
        }
        Some(&p) => text.first() == Some(&p) && glob_match(&pattern[1..], &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tree shaped like Debian's (paths, dash/underscore names, aliases, softdeps).
    fn tree() -> (tempfile::TempDir, ModuleTree) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("6.1.0-56-amd64");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/virt/lib/irqbypass.ko:\n\
             kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
             kernel/drivers/crypto/ccp/ccp.ko:\n\
             kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
             kernel/lib/crc16.ko:\n\
             kernel/fs/mbcache.ko:\n\
             kernel/fs/jbd2/jbd2.ko:\n\
             kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
             kernel/crypto/crc32c_generic.ko:\n\
             kernel/fs/nls/nls_iso8859-1.ko:\n\
             kernel/fs/fat/fat.ko:\n\
             kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\n",
        )
        .unwrap();
        fs::write(
            dir.join("modules.softdep"),
            "# Soft dependencies\nsoftdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\n",
        )
        .unwrap();
        fs::write(dir.join("modules.alias"), "alias crypto-crc32c crc32c_generic\nalias fs-vfat vfat\nalias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_net\n").unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/drivers/virtio/virtio.ko\n").unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        (root, tree)
    }

    fn names(r: &Resolved) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let (_root, t) = tree();
        let r = t.resolve(&["kvm-amd", "kvm_amd", "kvm"]).unwrap();
        assert_eq!(names(&r), ["irqbypass", "kvm", "ccp", "kvm_amd"]);
        assert_eq!(r.load_order[3].path, "kernel/arch/x86/kvm/kvm-amd.ko");
        assert_eq!(t.kernel_version(), "6.1.0-56-amd64");
    }

    #[test]
    fn soft_dependencies_resolve_through_aliases() {
        let (_root, t) = tree();
        let r = t.resolve(&["ext4"]).unwrap();
        assert_eq!(names(&r), ["crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"]);
    }

    #[test]
    fn aliases_builtins_and_dashed_file_names() {
        let (_root, t) = tree();
        let r = t.resolve(&["fs-vfat", "nls_iso8859-1", "virtio"]).unwrap();
        assert_eq!(names(&r), ["fat", "vfat", "nls_iso8859_1"]);
        assert_eq!(r.load_order[2].path, "kernel/fs/nls/nls_iso8859-1.ko");
        assert_eq!(r.builtin, ["virtio"]);
    }

    #[test]
    fn unknown_names_are_all_reported() {
        let (_root, t) = tree();
        let err = t.resolve(&["kvm", "nosuch", "fs-nosuch"]).unwrap_err();
        match &err {
            InitramfsError::UnknownModules { names, .. } => {
                assert_eq!(names, &["nosuch", "fs-nosuch"])
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("nosuch, fs-nosuch"), "{err}");
    }

    #[test]
    fn load_list_and_filtered_dep_file() {
        let (_root, t) = tree();
        let r = t.resolve(&["kvm"]).unwrap();
        assert_eq!(
            r.load_list().lines().skip(1).collect::<Vec<_>>(),
            [
                "irqbypass kernel/virt/lib/irqbypass.ko",
                "kvm kernel/arch/x86/kvm/kvm.ko"
            ]
        );
        assert_eq!(
            t.dep_file_for(&r),
            "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\nkernel/virt/lib/irqbypass.ko:\n"
        );
    }

    #[test]
    fn a_tree_without_depmod_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("6.1.0-56-amd64");
        fs::create_dir_all(&dir).unwrap();
        let err = ModuleTree::open(&dir).unwrap_err().to_string();
        assert!(
            err.contains("modules.dep is missing") && err.contains("depmod"),
            "{err}"
        );
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match(b"pci:v00001AF4d*sv*", b"pci:v00001AF4d00001000sv0"));
        assert!(!glob_match(b"pci:v00001AF4d*sv*", b"pci:v00008086d00001000sv0"));
        assert!(glob_match(b"a?c", b"abc") && !glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"x[0-9]y", b"x5y") && !glob_match(b"x[!0-9]y", b"x5y"));
        assert!(glob_match(b"*", b"") && !glob_match(b"", b"a"));
    }
}
