//! The VM description: what `--config FILE` holds as JSON and what the CLI flags fill in.
//!
//! Parsing accepts human units ("512MiB", "2GiB"); [`VmConfig::validate`] checks every
//! field against what the VMM can actually boot (the limits are keel-vmm-api's
//! [`keel_vmm_api::limits`]) and names the field and the fix on error.

use std::fs::File;
use std::path::{Path, PathBuf};

use keel_vmm_api::limits;
use serde::{Deserialize, Serialize};

pub use crate::device_config::{DeviceConfigError, DiskConfig, NetConfig};
use crate::os_error::os_message;
pub use crate::types::{Mac, MemorySize, ParseSerialError, SerialOutput};
pub use keel_vmm_api::limits::{MAX_DEVICES as MAX_VIRTIO_DEVICES, MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};
pub use keel_vmm_api::{LimitError, ParseSizeError};

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
        limits::check_memory(self.memory)?;
        limits::check_cpus(self.cpus)?;
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.rng);
        limits::check_devices(devices)?;
        limits::check_cmdline(self.cmdline.len(), devices)?;
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
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    MemorySyntax(#[from] ParseSizeError),
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    Serial(#[from] ParseSerialError),
    #[error("{what} {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    #[error("config: {0}")]
    Json(String),
    #[error("config {}: {reason}", path.display())]
    JsonFile { path: PathBuf, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

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
