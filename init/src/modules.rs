//! Loading the kernel modules the image carries, in the order keel-image wrote.
//!
//! The initramfs has no modprobe: `keel-image` resolved dependencies at build time
//! and wrote `/lib/modules/<kver>/modules.keel`, one `NAME PATH` per line with every
//! module after the ones it needs. Loading is finit_module on each file. The KVM
//! module for the other CPU vendor is skipped (it would only fail).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::kmod::{ModuleInitFlags, finit_module};
use tracing::{debug, info, warn};

use crate::layout::MODULE_LOAD_LIST;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    Amd,
    Intel,
    Other,
}

/// The CPU vendor from /proc/cpuinfo.
pub fn cpu_vendor() -> CpuVendor {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    vendor_from_cpuinfo(&info)
}

pub fn vendor_from_cpuinfo(info: &str) -> CpuVendor {
    for line in info.lines() {
        if let Some((key, value)) = line.split_once(':')
            && key.trim() == "vendor_id"
        {
            return match value.trim() {
                "AuthenticAMD" | "HygonGenuine" => CpuVendor::Amd,
                "GenuineIntel" => CpuVendor::Intel,
                _ => CpuVendor::Other,
            };
        }
    }
    CpuVendor::Other
}

/// One line of the load list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub path: String,
}

/// Parses `modules.keel`: comments and blank lines ignored.
pub fn parse_load_list(text: &str) -> Vec<Entry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some(Entry {
                name: parts.next()?.to_string(),
                path: parts.next()?.to_string(),
            })
        })
        .collect()
}

/// Whether a module should be skipped on this CPU.
pub fn skip_for_vendor(name: &str, vendor: CpuVendor) -> bool {
    match name {
        "kvm_intel" => vendor != CpuVendor::Intel,
        "kvm_amd" => vendor != CpuVendor::Amd,
        _ => false,
    }
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub already: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// The modules directory of the running kernel.
pub fn modules_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

/// Loads every module of the load list that is not loaded yet. A failure is
/// logged and recorded; the rest still load.
pub fn load_all(dir: &Path, vendor: CpuVendor) -> LoadReport {
    let mut report = LoadReport::default();
    let list = dir.join(MODULE_LOAD_LIST);
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => {
            report.failed.push((list.display().to_string(), e.to_string()));
            return report;
        }
    };
    for entry in parse_load_list(&text) {
        if skip_for_vendor(&entry.name, vendor) {
            report.skipped.push(entry.name);
            continue;
        }
        if Path::new("/sys/module").join(&entry.name).exists() {
            report.already.push(entry.name);
            continue;
        }
        match load_one(&dir.join(&entry.path)) {
            Ok(()) => {
                debug!(module = entry.name, "loaded");
                report.loaded.push(entry.name);
            }
            Err(nix::errno::Errno::EEXIST) => report.already.push(entry.name),
            Err(e) => {
                warn!(module = entry.name, "cannot load {}: {e}", entry.path);
                report.failed.push((entry.name, e.to_string()));
            }
        }
    }
    info!(
        "modules: {} loaded, {} already present, {} skipped, {} failed",
        report.loaded.len(),
        report.already.len(),
        report.skipped.len(),
        report.failed.len()
    );
    report
}

fn load_one(path: &Path) -> nix::Result<()> {
    let file = File::open(path).map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // Compressed modules (.ko.xz/.zst) are decompressed by the kernel when it can.
    let flags = match path.extension().and_then(|e| e.to_str()) {
        Some("xz" | "zst" | "gz") => ModuleInitFlags::from_bits_retain(4), // MODULE_INIT_COMPRESSED_FILE
        _ => ModuleInitFlags::empty(),
    };
    finit_module(&file, c"", flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_load_list() {
        let text = "# keel load list\nirqbypass kernel/virt/lib/irqbypass.ko\n\nkvm kernel/arch/x86/kvm/kvm.ko\n";
        let list = parse_load_list(text);
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[1],
            Entry {
                name: "kvm".into(),
                path: "kernel/arch/x86/kvm/kvm.ko".into()
            }
        );
    }

    #[test]
    fn picks_the_kvm_module_by_vendor() {
        assert_eq!(
            vendor_from_cpuinfo("processor: 0\nvendor_id\t: AuthenticAMD\n"),
            CpuVendor::Amd
        );
        assert_eq!(vendor_from_cpuinfo("vendor_id : GenuineIntel"), CpuVendor::Intel);
        assert!(skip_for_vendor("kvm_intel", CpuVendor::Amd));
        assert!(!skip_for_vendor("kvm_amd", CpuVendor::Amd));
        assert!(skip_for_vendor("kvm_amd", CpuVendor::Intel));
        assert!(!skip_for_vendor("bridge", CpuVendor::Other));
    }
}
