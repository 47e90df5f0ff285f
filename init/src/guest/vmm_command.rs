//! How a guest in keel.yaml becomes a `keel-vmm` command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::{BootFile, Guest, PoolPath};
use crate::layout;
use crate::storage::boot_entry::Prepared;

/// Where the files a guest names are found, and where its sockets and logs go.
#[derive(Clone, Debug)]
pub struct Paths {
    pub vmm: PathBuf,
    pub default_kernel: PathBuf,
    pub default_initrd: PathBuf,
    /// KEEL-DATA's mount point (pools live under it).
    pub data_root: PathBuf,
    /// Runtime state: per-guest sockets live in `run_dir/guests/NAME/`.
    pub run_dir: PathBuf,
    /// Console log files (on the data partition).
    pub log_dir: PathBuf,
    /// Seconds keel-vmm's own SIGTERM path gives the guest (appliance shutdown).
    pub shutdown_timeout_secs: u64,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            vmm: layout::KEEL_VMM.into(),
            default_kernel: layout::DEFAULT_GUEST_KERNEL.into(),
            default_initrd: layout::DEFAULT_GUEST_INITRD.into(),
            data_root: layout::DATA_MOUNT.into(),
            run_dir: layout::RUN_DIR.into(),
            log_dir: PathBuf::from(layout::DATA_MOUNT).join("logs"),
            shutdown_timeout_secs: 25,
        }
    }
}

impl Paths {
    /// The same layout below `root` (keel-init's test mode).
    pub fn under(root: &Path, vmm: PathBuf) -> Paths {
        let rooted = |p: &str| root.join(p.trim_start_matches('/'));
        let data_root = rooted(layout::DATA_MOUNT);
        Paths {
            vmm,
            default_kernel: rooted(layout::DEFAULT_GUEST_KERNEL),
            default_initrd: rooted(layout::DEFAULT_GUEST_INITRD),
            log_dir: data_root.join("logs"),
            data_root,
            run_dir: rooted(layout::RUN_DIR),
            shutdown_timeout_secs: 25,
        }
    }

    pub fn guest_run_dir(&self, guest: &str) -> PathBuf {
        self.run_dir.join("guests").join(guest)
    }

    /// The socket keel-init listens on and keel-vmm's serial port connects to.
    pub fn console_socket(&self, guest: &str) -> PathBuf {
        self.guest_run_dir(guest).join("console.sock")
    }

    /// keel-vmm's control socket (pause, resume, power button, stats).
    pub fn vmm_socket(&self, guest: &str) -> PathBuf {
        self.guest_run_dir(guest).join("vmm.sock")
    }

    /// Where a `boot: disk` guest's kernel and initramfs are copied out of its disk
    /// (on KEEL-DATA: an initramfs can be tens of MiB, too much for tmpfs per guest).
    pub fn disk_boot_dir(&self, guest: &str) -> PathBuf {
        self.data_root.join("boot").join(guest)
    }

    /// A guest's cloud-init seed disk, made again at every start (in the run dir:
    /// a few KiB of a sparse image).
    pub fn cloud_init_seed(&self, guest: &str) -> PathBuf {
        self.guest_run_dir(guest).join("cidata.img")
    }

    pub fn pool_file(&self, p: &PoolPath) -> PathBuf {
        layout::pool_dir(&self.data_root, &p.pool).join(&p.path)
    }

    fn boot_file(&self, f: &BootFile, default: &Path) -> PathBuf {
        match f {
            BootFile::Default => default.to_path_buf(),
            BootFile::Pool(p) => self.pool_file(p),
        }
    }
}

/// The first fd number taps are passed at (`--net fd=3`, `fd=4`, ...).
pub const FIRST_PASSED_FD: i32 = 3;

pub use crate::config::base_cmdline;

/// The arguments for `keel-vmm` (without the program name). `disk_boot` is what a
/// `boot: disk` guest's disk said it boots (see `storage::boot_entry`).
pub fn args(g: &Guest, paths: &Paths, disk_boot: Option<&Prepared>) -> Vec<OsString> {
    let cmdline = g.kernel_cmdline_after(disk_boot.map(|p| p.cmdline.as_str()));
    let (kernel, initrd) = match disk_boot {
        Some(p) => (p.kernel.clone(), p.initrd.clone()),
        None => (
            paths.boot_file(&g.kernel, &paths.default_kernel),
            g.initrd.as_ref().map(|i| paths.boot_file(i, &paths.default_initrd)),
        ),
    };
    let mut a: Vec<OsString> = vec![
        "--kernel".into(),
        kernel.into(),
        "--cpus".into(),
        g.vcpus.to_string().into(),
        "--memory".into(),
        g.memory.to_string().into(),
        "--cmdline".into(),
        cmdline.into(),
        "--serial".into(),
        {
            let mut s = OsString::from("unix:");
            s.push(paths.console_socket(&g.name));
            s
        },
        "--api-socket".into(),
        paths.vmm_socket(&g.name).into(),
        "--shutdown-timeout".into(),
        paths.shutdown_timeout_secs.to_string().into(),
    ];
    if let Some(initrd) = initrd {
        a.push("--initrd".into());
        a.push(initrd.into());
    }
    // Disks in declaration order: vda, vdb, ...
    for d in &g.disks {
        let mut spec = OsString::from("path=");
        spec.push(paths.pool_file(&d.volume));
        if d.readonly {
            spec.push(",readonly=on");
        }
        a.push("--disk".into());
        a.push(spec);
    }
    // The cloud-init seed after the guest's own disks, so they keep vda, vdb, ...
    if g.cloud_init.is_some() {
        let mut spec = OsString::from("path=");
        spec.push(paths.cloud_init_seed(&g.name));
        spec.push(",readonly=on");
        a.push("--disk".into());
        a.push(spec);
    }
    // NICs: the taps keel-init opened, passed as fds 3, 4, ... (see supervisor).
    for (i, _) in g.nics.iter().enumerate() {
        a.push("--net".into());
        a.push(format!("fd={},mac={}", FIRST_PASSED_FD + i as i32, g.nic_mac(i)).into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    /// KEEL-DATA at /data, the run dir at /run/keel.
    fn test_paths() -> Paths {
        Paths {
            data_root: "/data".into(),
            run_dir: "/run/keel".into(),
            ..Paths::default()
        }
    }

    /// The keel-vmm arguments of the first guest of `text`, with [`test_paths`].
    fn args_of(text: &str) -> (crate::config::Guest, Vec<String>) {
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let g = cfg.guests[0].clone();
        let a = strings(args(&g, &test_paths(), None));
        (g, a)
    }

    #[test]
    fn builds_the_vmm_arguments() {
        let text = "version: 1\nstorage: {pools: [{name: img}]}\nguests:\n  - name: web\n    vcpus: 2\n    memory: 256MiB\n    kernel: img/vmlinuz\n    initrd: default\n    cmdline: quiet\n";
        let (_, a) = args_of(text);
        assert_eq!(
            a[0..6],
            [
                "--kernel",
                "/data/pools/img/vmlinuz",
                "--cpus",
                "2",
                "--memory",
                "256MiB"
            ]
        );
        assert_eq!(a[7], "console=ttyS0 reboot=k panic=1 pci=off keel.guest=web quiet");
        assert_eq!(
            a[8..14],
            [
                "--serial",
                "unix:/run/keel/guests/web/console.sock",
                "--api-socket",
                "/run/keel/guests/web/vmm.sock",
                "--shutdown-timeout",
                "25"
            ]
        );
        assert_eq!(a[14..], ["--initrd", layout::DEFAULT_GUEST_INITRD]);
    }

    #[test]
    fn disks_and_nics_become_vmm_devices() {
        let text = "version: 1\nstorage: {pools: [{name: p}]}\nnetwork:\n  bridges:\n    - {name: br0, mode: isolated, address: 10.1.0.1/24}\nguests:\n  - name: g\n    memory: 64MiB\n    disks:\n      - {volume: p/root, size: 1GiB}\n      - {volume: p/iso, size: 1GiB, readonly: true}\n    nics: [{bridge: br0, mac: '52:54:00:00:00:01'}, {bridge: br0}]\n";
        let (g, a) = args_of(text);
        let tail = &a[a.len() - 8..];
        assert_eq!(
            tail[..6],
            [
                "--disk",
                "path=/data/pools/p/root",
                "--disk",
                "path=/data/pools/p/iso,readonly=on",
                "--net",
                "fd=3,mac=52:54:00:00:00:01"
            ]
        );
        assert_eq!(tail[7], format!("fd=4,mac={}", g.nic_mac(1)));
    }

    #[test]
    fn the_cloud_init_seed_comes_after_the_guests_own_disks() {
        let text = "version: 1\nstorage: {pools: [{name: p}]}\nguests:\n  - name: g\n    memory: 64MiB\n    boot: disk\n    disks: [{volume: p/root, size: 1GiB}]\n    cloud_init: {runcmd: [\"true\"]}\n";
        let (_, a) = args_of(text);
        assert_eq!(
            a[a.len() - 4..],
            [
                "--disk",
                "path=/data/pools/p/root",
                "--disk",
                "path=/run/keel/guests/g/cidata.img,readonly=on"
            ]
        );
    }

    #[test]
    fn disk_boot_takes_the_images_kernel_and_command_line() {
        let text = "version: 1\nstorage: {pools: [{name: p}]}\nguests:\n  - name: deb\n    memory: 1GiB\n    boot: disk\n    cmdline: quiet\n    disks: [{volume: p/deb, size: 10GiB}]\n";
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let paths = Paths {
            data_root: "/data".into(),
            ..Paths::default()
        };
        let prepared = Prepared {
            kernel: paths.disk_boot_dir("deb").join("vmlinuz"),
            initrd: Some(paths.disk_boot_dir("deb").join("initrd.img")),
            cmdline: "root=PARTUUID=x ro console=tty0 console=ttyS0,115200".into(),
            found_by: "test".into(),
            warning: None,
        };
        let a = strings(args(&cfg.guests[0], &paths, Some(&prepared)));
        assert_eq!(a[0..2], ["--kernel", "/data/boot/deb/vmlinuz"]);
        // The image's part, then Keel's (its console last), then the operator's.
        assert_eq!(
            a[7],
            "root=PARTUUID=x ro console=tty0 console=ttyS0,115200 console=ttyS0 reboot=k panic=1 pci=off keel.guest=deb quiet"
        );
        let i = a.iter().position(|x| x == "--initrd").expect("--initrd");
        assert_eq!(a[i + 1], "/data/boot/deb/initrd.img");
    }
}
