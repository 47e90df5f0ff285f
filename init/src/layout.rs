//! Where things are on a running appliance. `keel-image` puts files at these paths
//! in the initramfs and on the disk; keel-init looks for them here. One place, so
//! both sides cannot drift apart.

/// The VMM, one process per guest.
pub const KEEL_VMM: &str = "/usr/bin/keel-vmm";
pub const KEELCTL: &str = "/usr/bin/keelctl";
/// The guest kernel and initramfs that `kernel: default` / `initrd: default` name.
pub const DEFAULT_GUEST_KERNEL: &str = "/usr/lib/keel/guest/bzImage";
pub const DEFAULT_GUEST_INITRD: &str = "/usr/lib/keel/guest/initrd";
/// The image's os-release (same text as the UKI's `.osrel`).
pub const OS_RELEASE: &str = "/etc/os-release";
/// The kernel-module load list inside `/lib/modules/<kver>/` (format: keel-image's
/// `initramfs::modules`): `NAME PATH` per line, dependencies first.
pub const MODULE_LOAD_LIST: &str = "modules.keel";

/// GPT partition labels.
pub const ESP_LABEL: &str = "KEEL-ESP";
pub const CONFIG_LABEL: &str = "KEEL-CONFIG";
pub const DATA_LABEL: &str = "KEEL-DATA";
/// The config file on KEEL-CONFIG.
pub const CONFIG_FILE: &str = "keel.yaml";

/// Runtime state (tmpfs).
pub const RUN_DIR: &str = "/run/keel";
/// KEEL-CONFIG is mounted here.
pub const CONFIG_MOUNT: &str = "/run/keel/config";
/// KEEL-ESP is mounted here (updates and boot blessing).
pub const ESP_MOUNT: &str = "/run/keel/esp";
/// KEEL-DATA (storage pools, logs, leases) is mounted here.
pub const DATA_MOUNT: &str = "/var/lib/keel";
/// The control API socket.
pub const API_SOCKET: &str = "/run/keel/api.sock";

/// The directory of a storage pool on KEEL-DATA.
pub fn pool_dir(data_root: &std::path::Path, pool: &str) -> std::path::PathBuf {
    data_root.join("pools").join(pool)
}
