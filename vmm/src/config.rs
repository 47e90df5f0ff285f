//! The VM description: what `--config FILE` holds as JSON and what the CLI flags fill in.
//!
//! Parsing accepts human units ("512MiB", "2GiB"); [`VmConfig::validate`] checks every
//! field against what the VMM can actually boot and names the field and the fix on error.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::device_config::{DeviceConfigError, DiskConfig, MAX_VIRTIO_DEVICES, Mac, NetConfig};
use crate::error::os_message;

/// Smallest guest the boot layout fits in (page tables, boot_params, kernel at 1 MiB, initrd).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest accepted: far beyond any appliance guest, but keeps address math safe.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs the MP table layout is sized for.
pub const MAX_VCPUS: u8 = 32;
/// Kernel command line used when none is given: serial console, i8042 reset on reboot,
/// reboot on panic instead of hanging, no PCI probing (there is no PCI bus).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// How long a guest gets to shut down after Ctrl-Alt-Del before it is stopped hard.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: bzImage (boot protocol >= 2.06) or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs, loaded below the kernel's `initrd_addr_max`.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs, 1..=32.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest RAM size.
    #[serde(default)]
    pub memory: MemorySize,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Log `boot-timer: guest ready N us after VMM start` when the guest writes 123 to
    /// port 0x3f0.
    #[serde(default)]
    pub boot_timer: bool,
    /// Grace period after SIGTERM (power button or Ctrl-Alt-Del) before the VM is
    /// stopped hard.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_ms: u64,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces (eth0, eth1, ... in order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng entropy device.
    #[serde(default)]
    pub rng: bool,
    /// Run under the seccomp filter (on unless turned off, e.g. to rule it out while
    /// debugging).
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
}

fn default_seccomp() -> bool {
    true
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_cpus() -> u8 {
    1
}
fn default_shutdown_timeout() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory: MemorySize::default(),
            serial: SerialOutput::default(),
            boot_timer: false,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            seccomp: true,
        }
    }

    /// Parses a JSON config (the format of `keel-vmm --config FILE`).
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// Reads and parses a JSON config file.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            what: "config",
            path: path.to_path_buf(),
            reason: os_message(&e),
        })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::JsonFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory.0 < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if self.memory.0 > MAX_MEMORY {
            return Err(ConfigError::MemoryTooLarge(self.memory));
        }
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.rng);
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for disk in &self.disks {
            disk.validate()?;
        }
        for net in &self.nets {
            net.validate()?;
        }
        check_readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file("initrd", initrd)?;
        }
        Ok(())
    }
}

/// Opening the file is the only honest readability check (permissions, ACLs, dirs).
fn check_readable_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let file = File::open(path).map_err(|e| ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason: os_message(&e),
    })?;
    let meta = file.metadata().map_err(|e| ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason: os_message(&e),
    })?;
    if !meta.is_file() {
        return Err(ConfigError::File {
            what,
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(())
}

/// Errors in a [`VmConfig`]; each message names the field and how to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory {0} is below the minimum of 16 MiB: use --memory 16MiB or more")]
    MemoryTooSmall(MemorySize),
    #[error("memory {0} is above the maximum of 1 TiB")]
    MemoryTooLarge(MemorySize),
    #[error("memory '{0}': expected a size like 512MiB, 2GiB or a byte count")]
    MemorySyntax(String),
    #[error("cpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    Cpus(u8),
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("serial '{0}': expected stdio, none, file:PATH or unix:PATH")]
    Serial(String),
    #[error("{what} {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{devices} virtio devices (disks + nets + rng): at most {MAX_VIRTIO_DEVICES} fit", devices = .0)]
    TooManyDevices(usize),
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    #[error("config: {0}")]
    Json(String),
    #[error("config {}: {reason}", path.display())]
    JsonFile { path: PathBuf, reason: String },
}

/// A guest memory size in bytes; parses and prints with binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub u64);

impl MemorySize {
    pub const fn mib(n: u64) -> Self {
        MemorySize(n << 20)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl Default for MemorySize {
    fn default() -> Self {
        MemorySize::mib(512)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{name}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for MemorySize {
    type Err = ConfigError;

    /// Accepts `N`, `NB`, `NK`/`NKiB`/`NKB`, `NM`/`NMiB`, `NG`/`NGiB`, `NT`/`NTiB`;
    /// all units are binary (a guest's RAM is never sized in powers of ten).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::MemorySyntax(s.to_string());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| err())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" | "kb" => 10,
            "m" | "mib" | "mb" => 20,
            "g" | "gib" | "gb" => 30,
            "t" | "tib" | "tb" => 40,
            _ => return Err(err()),
        };
        n.checked_mul(1u64 << shift).map(MemorySize).ok_or_else(err)
    }
}

impl Serialize for MemorySize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(MemorySize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Where serial output goes (and, for stdio on a terminal and unix sockets, where input
/// comes from).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// The VMM's stdout; stdin feeds the guest when it is a terminal.
    #[default]
    Stdio,
    /// Append to a file (created if missing).
    File(PathBuf),
    /// Connect to a listening unix stream socket (the supervisor's); both directions.
    Unix(PathBuf),
    /// Discard output.
    None,
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdio => f.write_str("stdio"),
            SerialOutput::None => f.write_str("none"),
            SerialOutput::File(p) => write!(f, "file:{}", p.display()),
            SerialOutput::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for SerialOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let nonempty = |p: &str| {
            if p.is_empty() {
                Err(ConfigError::Serial(s.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            _ => {
                if let Some(p) = s.strip_prefix("file:") {
                    Ok(SerialOutput::File(nonempty(p)?))
                } else if let Some(p) = s.strip_prefix("unix:") {
                    Ok(SerialOutput::Unix(nonempty(p)?))
                } else {
                    Err(ConfigError::Serial(s.to_string()))
                }
            }
        }
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units_parse() {
        assert_eq!("512MiB".parse::<MemorySize>(), Ok(MemorySize(512 << 20)));
        assert_eq!("2GiB".parse::<MemorySize>(), Ok(MemorySize(2 << 30)));
        assert_eq!("128M".parse::<MemorySize>(), Ok(MemorySize(128 << 20)));
        assert_eq!("1g".parse::<MemorySize>(), Ok(MemorySize(1 << 30)));
        assert_eq!("4096".parse::<MemorySize>(), Ok(MemorySize(4096)));
        assert_eq!("64 KiB".parse::<MemorySize>(), Ok(MemorySize(64 << 10)));
        assert!("".parse::<MemorySize>().is_err());
        assert!("12 parsecs".parse::<MemorySize>().is_err());
        assert!("MiB".parse::<MemorySize>().is_err());
        assert!("99999999999999T".parse::<MemorySize>().is_err());
    }

    #[test]
    fn memory_prints_largest_exact_unit() {
        assert_eq!(MemorySize(512 << 20).to_string(), "512MiB");
        assert_eq!(MemorySize(3 << 30).to_string(), "3GiB");
        assert_eq!(MemorySize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(MemorySize(100).to_string(), "100B");
    }

    #[test]
    fn serial_parse_roundtrip() {
        for s in ["stdio", "none", "file:/tmp/x", "unix:/run/a.sock"] {
            let parsed: SerialOutput = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tcp:1".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn json_defaults_and_units() {
        let c = VmConfig::from_json(r#"{"kernel":"/k","memory":"1GiB","cpus":2}"#).unwrap();
        assert_eq!(c.memory, MemorySize(1 << 30));
        assert_eq!(c.cpus, 2);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, SerialOutput::Stdio);
        let c = VmConfig::from_json(r#"{"kernel":"/k","memory":33554432}"#).unwrap();
        assert_eq!(c.memory, MemorySize(32 << 20));
        let err = VmConfig::from_json(r#"{"kernel":"/k","memroy":"1GiB"}"#).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(VmConfig::from_json(&json).unwrap(), c);
    }

    #[test]
    fn validation_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let mut c = VmConfig::new(&kernel);
        assert_eq!(c.validate(), Ok(()));

        c.memory = MemorySize::mib(8);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "memory 8MiB is below the minimum of 16 MiB: use --memory 16MiB or more"
        );
        c.memory = MemorySize::mib(16);
        c.cpus = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "cpus 0 is out of range: use 1 to 32"
        );
        c.cpus = 33;
        assert!(c.validate().is_err());
        c.cpus = 32;
        c.initrd = Some(dir.path().join("missing"));
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.starts_with("initrd ") && msg.ends_with("No such file or directory"));
        c.initrd = Some(dir.path().to_path_buf());
        assert!(c.validate().unwrap_err().to_string().ends_with("not a regular file"));
    }
}
