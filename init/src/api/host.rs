//! What `keelctl host` shows: versions, boot slots, uptime, CPU, memory, pools.
//! Everything is read from /proc, the ESP and the data partition on request.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::update::slots;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    /// keel-init's own version.
    pub keel_version: String,
    /// IMAGE_VERSION of the running image (from os-release), if known.
    pub os_version: Option<String>,
    pub kernel: String,
    pub uptime_secs: f64,
    pub boot_slots: Vec<BootSlot>,
    pub cpus: usize,
    /// Busy share of all CPUs over a short sample, 0-100.
    pub cpu_busy_percent: f64,
    pub load_average: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub pools: Vec<PoolUsage>,
    /// How images are cloned into volumes on this appliance's KEEL-DATA.
    #[serde(default)]
    pub clones: Clones,
}

/// Whether clones are instant here, and why not when they are not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Clones {
    /// `reflink` (instant, shared blocks) or `sparse copy`.
    pub method: String,
    /// KEEL-DATA's file system type.
    pub filesystem: String,
    /// For the operator, when clones are not instant.
    pub note: Option<String>,
}

/// Probes KEEL-DATA (a reflink of a scratch file) for how clones are made.
pub fn clones(data_root: &Path) -> Clones {
    let filesystem = nix::sys::statfs::statfs(data_root)
        .map(|s| fs_name(s.filesystem_type().0))
        .unwrap_or_else(|_| "unknown".into());
    match crate::storage::clone::supports_reflink(data_root) {
        Ok(true) => Clones {
            method: "reflink".into(),
            filesystem,
            note: None,
        },
        Ok(false) => Clones {
            method: "sparse copy".into(),
            note: Some(format!(
                "clones are not instant on this appliance: KEEL-DATA is {filesystem} (made by an earlier Keel, or on a file system without reflinks), so a volume seeded from an image is a sparse copy of its data; every volume works as before"
            )),
            filesystem,
        },
        Err(e) => Clones {
            method: "unknown".into(),
            note: Some(format!("cannot probe KEEL-DATA at {}: {e}", data_root.display())),
            filesystem,
        },
    }
}

fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        other => format!("{other:#x}"),
    }
}

/// One installed OS version on the ESP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootSlot {
    pub file: String,
    pub version: String,
    /// blessed, on-trial or failed.
    pub state: String,
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    /// The version this appliance is running.
    pub running: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolUsage {
    pub name: String,
    /// Bytes the pool's files occupy on disk (sparse volumes count what they use).
    pub used_bytes: u64,
    /// Free bytes on the filesystem that holds the pool.
    pub available_bytes: u64,
    /// The pool's configured cap, if any.
    pub size_limit_bytes: Option<u64>,
}

/// The IMAGE_VERSION field of an os-release file.
pub fn os_version(os_release: &Path) -> Option<String> {
    let text = std::fs::read_to_string(os_release).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .map(|v| v.trim_matches('"').to_string())
}

/// The UKIs on the ESP, newest first as systemd-boot orders them.
pub fn boot_slots(esp: &Path, running_version: Option<&str>) -> Vec<BootSlot> {
    let mut list = match slots::list(esp) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("no boot slots under {}: {e}", esp.display());
            return Vec::new();
        }
    };
    slots::sort_boot_order(&mut list);
    list.into_iter()
        .map(|s| BootSlot {
            running: Some(s.name.version.as_str()) == running_version,
            // The kebab-case form (`on-trial`) is the stable JSON one.
            state: serde_json::to_value(s.name.state())
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_else(|| s.name.state().as_str().to_string()),
            version: s.name.version.clone(),
            tries_left: s.name.tries_left,
            tries_done: s.name.tries_done,
            file: s.file,
        })
        .collect()
}

/// CPU time counters of the whole machine (first line of /proc/stat), in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub nice: f64,
    pub system: f64,
    pub idle: f64,
    pub iowait: f64,
    pub irq: f64,
    pub softirq: f64,
    pub steal: f64,
}

impl CpuTimes {
    pub fn read() -> Option<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<f64>().unwrap_or(0.0) / hz)
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        Some(CpuTimes {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
        })
    }

    fn total(&self) -> f64 {
        self.user + self.nice + self.system + self.idle + self.iowait + self.irq + self.softirq + self.steal
    }

    fn idle_total(&self) -> f64 {
        self.idle + self.iowait
    }

    pub fn modes(&self) -> [(&'static str, f64); 8] {
        [
            ("user", self.user),
            ("nice", self.nice),
            ("system", self.system),
            ("idle", self.idle),
            ("iowait", self.iowait),
            ("irq", self.irq),
            ("softirq", self.softirq),
            ("steal", self.steal),
        ]
    }
}

/// MemTotal and MemAvailable from /proc/meminfo, in bytes.
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub fn uptime_secs() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Usage of each configured pool.
pub fn pools(cfg: Option<&Config>, data_root: &Path) -> Vec<PoolUsage> {
    let Some(cfg) = cfg else { return Vec::new() };
    cfg.storage
        .pools
        .iter()
        .map(|p| {
            let dir = crate::storage::pool::dir(data_root, &p.name);
            PoolUsage {
                name: p.name.value.clone(),
                used_bytes: crate::storage::pool::allocated(&dir).unwrap_or(0),
                available_bytes: crate::storage::pool::available(if dir.exists() { &dir } else { data_root })
                    .unwrap_or(0),
                size_limit_bytes: p.size.as_ref().map(|s| s.value.bytes()),
            }
        })
        .collect()
}

/// Gathers everything; samples the CPU for `sample` to report how busy it is.
pub async fn collect(
    cfg: Option<&Config>,
    esp: &Path,
    os_release: &Path,
    data_root: &Path,
    sample: Duration,
) -> HostInfo {
    let before = CpuTimes::read();
    tokio::time::sleep(sample).await;
    let after = CpuTimes::read();
    let cpu_busy_percent = match (before, after) {
        (Some(a), Some(b)) if b.total() > a.total() => {
            let total = b.total() - a.total();
            let idle = b.idle_total() - a.idle_total();
            ((total - idle) / total * 100.0).clamp(0.0, 100.0)
        }
        _ => 0.0,
    };
    let os_version = os_version(os_release);
    let (memory_total_bytes, memory_available_bytes) = memory();
    HostInfo {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        keel_version: env!("CARGO_PKG_VERSION").to_string(),
        boot_slots: boot_slots(esp, os_version.as_deref()),
        os_version,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_secs: uptime_secs(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_busy_percent,
        load_average: load_average(),
        memory_total_bytes,
        memory_available_bytes,
        pools: pools(cfg, data_root),
        clones: clones(data_root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_boot_slots_newest_first_and_marks_the_running_one() {
        let esp = tempfile::tempdir().unwrap();
        let linux = esp.path().join("EFI/Linux");
        std::fs::create_dir_all(&linux).unwrap();
        for f in ["keel-1.0.0.efi", "keel-1.1.0+2-1.efi", "notes.txt"] {
            std::fs::write(linux.join(f), b"x").unwrap();
        }
        let s = boot_slots(esp.path(), Some("1.0.0"));
        let files: Vec<&str> = s.iter().map(|b| b.file.as_str()).collect();
        assert_eq!(files, ["keel-1.1.0+2-1.efi", "keel-1.0.0.efi"]);
        assert_eq!(s[0].state, "on-trial");
        assert_eq!((s[0].tries_left, s[0].tries_done), (Some(2), Some(1)));
        assert!(s[1].running && !s[0].running);
        assert_eq!(s[1].state, "blessed");
    }

    #[test]
    fn reads_the_machine() {
        let (total, avail) = memory();
        assert!(total > 0 && avail <= total);
        assert!(CpuTimes::read().is_some_and(|c| c.total() > 0.0));
        assert!(uptime_secs() > 0.0);
    }
}
