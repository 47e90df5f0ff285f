//! What goes into the appliance's initramfs, the whole host userland (assembled with
//! `initramfs::Builder`): Keel's programs, the kernel modules of
//! `kernel-config/modules.list` with their dependencies, e2fsprogs with its libraries,
//! and the default guest kernel (and initramfs) that `kernel: default` in keel.yaml
//! names.
//!
//! The paths below are the contract with keel-init, which looks for these files there.

use std::path::PathBuf;

use crate::initramfs::{Builder, InitramfsError};

/// PID 1.
pub const INIT: &str = "/init";
pub const KEEL_VMM: &str = "/usr/bin/keel-vmm";
pub const KEELCTL: &str = "/usr/bin/keelctl";
/// The guest kernel for `kernel: default`.
pub const DEFAULT_GUEST_KERNEL: &str = "/usr/lib/keel/guest/bzImage";
/// The guest initramfs for `initrd: default`.
pub const DEFAULT_GUEST_INITRD: &str = "/usr/lib/keel/guest/initrd";
/// The image's os-release (the same text as the UKI's `.osrel`), so PID 1 knows its version.
pub const OS_RELEASE: &str = "/etc/os-release";
/// The update keys (`update.trusted_keys`, one `ed25519:BASE64` per line). keel-init
/// reads them only from here, never from KEEL-CONFIG, which is writable.
pub const TRUSTED_KEYS: &str = keel_config::bundle::TRUSTED_KEYS_FILE;
/// Host tools PID 1 runs: formatting, checking and growing KEEL-DATA and pool volumes.
pub const HOST_PROGRAMS: [&str; 5] = [
    "/sbin/mke2fs",
    "/sbin/e2fsck",
    "/sbin/resize2fs",
    "/sbin/mkfs.xfs",
    "/sbin/xfs_growfs",
];

/// The host files an appliance initramfs is made of.
#[derive(Debug, Clone)]
pub struct HostInitramfs {
    /// Directory with the static `keel-init`, `keel-vmm` and `keelctl`.
    pub bin_dir: PathBuf,
    /// The host kernel's `lib/modules/<kver>` (depmod run).
    pub modules_dir: PathBuf,
    /// Names of the modules to include (from kernel-config/modules.list, see
    /// [`crate::initramfs::read_modules_list`]).
    pub modules: Vec<String>,
    pub guest_kernel: PathBuf,
    /// The guest initramfs for `initrd: default` (`guest_initramfs::build` makes Keel's).
    pub guest_initrd: Vec<u8>,
    /// `.osrel` text of the image.
    pub os_release: String,
    /// Public keys update bundles must be signed with (`update.trusted_keys`).
    pub trusted_keys: Vec<String>,
    /// mtime of every entry (seconds since 1970).
    pub mtime: u32,
}

impl HostInitramfs {
    /// The newc cpio archive (uncompressed).
    pub fn build(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut b = Builder::with_mtime(self.mtime);
        for (path, name) in [(INIT, "keel-init"), (KEEL_VMM, "keel-vmm"), (KEELCTL, "keelctl")] {
            b.host_file(path, &self.bin_dir.join(name), 0o755)?;
        }
        for program in HOST_PROGRAMS {
            b.host_program(program)?;
        }
        b.kernel_modules(&self.modules_dir, &self.modules)?;
        b.host_file(DEFAULT_GUEST_KERNEL, &self.guest_kernel, 0o644)?;
        b.file(DEFAULT_GUEST_INITRD, 0o644, self.guest_initrd.as_slice())?;
        b.file(OS_RELEASE, 0o644, self.os_release.as_bytes())?;
        let keys: String = self.trusted_keys.iter().map(|k| format!("{}\n", k.trim())).collect();
        b.file(TRUSTED_KEYS, 0o644, keys)?;
        b.build()
    }
}
