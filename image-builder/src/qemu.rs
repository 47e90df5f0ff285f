//! `keel-image run`: boots a disk image in QEMU with OVMF, the way a real UEFI machine
//! would boot it. The invocation is built by a library function so tests (ci/e2e,
//! the API tests that forward a port) start QEMU exactly the same way.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{}: {source} (install the `ovmf` package: ci/setup does)", path.display())]
    Firmware { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Disk { path: PathBuf, source: std::io::Error },
    #[error("port forward {0:?}: use HOST:GUEST with two TCP ports, e.g. 8080:80")]
    BadForward(String),
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Accel {
    /// Software emulation (`-accel tcg -cpu max`): works everywhere; the max CPU model
    /// is AMD with SVM here, so the image's KVM works nested.
    Tcg,
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
}

impl Accel {
    /// KVM when `/dev/kvm` exists and is real KVM. A PVM host (`/sys/module/kvm_pvm`)
    /// cannot run QEMU's firmware and kernels usefully, so it gets TCG.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    fn detect_in(root: &Path) -> Self {
        let kvm = root.join("dev/kvm").exists();
        let pvm = root.join("sys/module/kvm_pvm").exists();
        if kvm && !pvm { Accel::Kvm } else { Accel::Tcg }
    }

    /// vCPUs when the operator does not say. Under TCG: one. The appliance's kernel
    /// patches `__schedule` live (int3, `text_poke_bp`) whenever KVM's first VM is created
    /// or its last destroyed (the `preempt_notifier_key` static key), and under
    /// multi-threaded TCG that patch can leave every vCPU trapping on the breakpoint
    /// forever: measured about one wedge in 55 appliance boots with 2 vCPUs, none in 400
    /// VM create/destroy cycles with 1 (ci/e2e e2e_vmm part 3 gates on it). Real hardware
    /// patches jump labels safely, so KVM gets two.
    pub const fn default_cpus(self) -> u32 {
        match self {
            Accel::Tcg => 1,
            Accel::Kvm => 2,
        }
    }
}

/// A TCP port forwarded from the host's loopback to the appliance (user-mode network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for PortForward {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, QemuError> {
        let bad = || QemuError::BadForward(s.to_owned());
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            host: h.parse().map_err(|_| bad())?,
            guest: g.parse().map_err(|_| bad())?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub disk: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// Discard the disk's changes when QEMU exits (`-snapshot`).
    pub snapshot: bool,
    /// Ports forwarded from 127.0.0.1 on the host; adds one virtio NIC (user-mode network).
    pub forwards: Vec<PortForward>,
    /// Let that NIC reach past the forwards (QEMU's `restrict=off`). Off by default: the
    /// appliance then reaches only what is forwarded (tests never leave the machine).
    pub open_network: bool,
    /// More arguments, appended last.
    pub extra_args: Vec<OsString>,
    pub ovmf_code: PathBuf,
    pub ovmf_vars_template: PathBuf,
}

impl QemuOptions {
    pub fn new(disk: impl Into<PathBuf>) -> Self {
        let accel = Accel::detect();
        Self {
            disk: disk.into(),
            memory_mib: 4096,
            cpus: accel.default_cpus(),
            accel,
            snapshot: false,
            forwards: Vec::new(),
            open_network: false,
            extra_args: Vec::new(),
            ovmf_code: OVMF_CODE.into(),
            ovmf_vars_template: OVMF_VARS.into(),
        }
    }
}

/// A ready QEMU command. Holds the fresh copy of the firmware's variable store, which is
/// deleted when this is dropped: keep it alive while QEMU runs.
#[derive(Debug)]
pub struct QemuInvocation {
    pub program: OsString,
    pub args: Vec<OsString>,
    _vars: tempfile::NamedTempFile,
}

impl QemuInvocation {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }

    /// The command line, shell-quoted enough to paste.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                let a = a.to_string_lossy();
                if a.contains([' ', '"', '\'']) {
                    format!("'{a}'")
                } else {
                    a.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Builds the QEMU invocation: q35, OVMF code read-only as pflash unit 0 and a fresh
/// copy of the VARS template as unit 1 (a new machine's empty NVRAM every run), no
/// default devices, serial on stdio, no reboot (a reboot ends QEMU, so a test sees it),
/// the disk as a raw virtio drive and the only boot device.
pub fn invocation(opts: &QemuOptions) -> Result<QemuInvocation, QemuError> {
    std::fs::metadata(&opts.ovmf_code).map_err(|source| QemuError::Firmware {
        path: opts.ovmf_code.clone(),
        source,
    })?;
    std::fs::metadata(&opts.disk).map_err(|source| QemuError::Disk {
        path: opts.disk.clone(),
        source,
    })?;
    let vars = tempfile::Builder::new()
        .prefix("keel-ovmf-vars-")
        .suffix(".fd")
        .tempfile()
        .map_err(|source| QemuError::Firmware {
            path: std::env::temp_dir(),
            source,
        })?;
    std::fs::copy(&opts.ovmf_vars_template, vars.path()).map_err(|source| QemuError::Firmware {
        path: opts.ovmf_vars_template.clone(),
        source,
    })?;

    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    push(&["-M", "q35"]);
    match opts.accel {
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &opts.memory_mib.to_string(), "-smp", &opts.cpus.to_string()]);
    push(&["-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot"]);
    let mut drive = |spec: OsString| {
        args.push("-drive".into());
        args.push(spec);
    };
    drive(pflash(0, &opts.ovmf_code, true));
    drive(pflash(1, vars.path(), false));
    let mut disk = OsString::from("if=none,id=keel-disk,format=raw,file=");
    disk.push(escape_commas(&opts.disk));
    drive(disk);
    // The disk is the only boot device. Otherwise, when the boot loader exits to the
    // firmware (a UKI it cannot start), OVMF goes on to network boot through the NIC of
    // `--forward` (iPXE, PXE, HTTP: about a minute each) before its UEFI shell, which
    // runs startup.nsh on test images (`keel-image build --firmware-reset-on-exit`).
    args.extend(
        [
            "-device",
            "virtio-blk-pci,drive=keel-disk,bootindex=0",
            "-boot",
            "strict=on",
        ]
        .map(OsString::from),
    );
    if opts.snapshot {
        args.push("-snapshot".into());
    }
    if !opts.forwards.is_empty() {
        let mut nic = String::from("user,model=virtio-net-pci");
        if !opts.open_network {
            nic.push_str(",restrict=on");
        }
        for f in &opts.forwards {
            nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
        }
        args.push("-nic".into());
        args.push(nic.into());
    }
    args.extend(opts.extra_args.iter().cloned());
    Ok(QemuInvocation {
        program: QEMU.into(),
        args,
        _vars: vars,
    })
}

fn pflash(unit: u32, path: &Path, readonly: bool) -> OsString {
    let mut s = OsString::from(format!("if=pflash,format=raw,unit={unit},"));
    if readonly {
        s.push("readonly=on,");
    }
    s.push("file=");
    s.push(escape_commas(path));
    s
}

/// QEMU's option syntax separates with commas; a comma in a path is written twice.
fn escape_commas(path: &Path) -> OsString {
    OsString::from(path.to_string_lossy().replace(',', ",,"))
}

/// Runs QEMU in the foreground (serial console on this terminal) and returns its exit
/// code (128 + signal when it was killed).
pub fn run(opts: &QemuOptions) -> Result<i32, RunError> {
    let inv = invocation(opts)?;
    tracing::info!(command = %inv.display(), "starting QEMU");
    let mut cmd = inv.command();
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches only the child. It makes QEMU
        // die with keel-image, so a test harness that kills us leaves no VM running.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let status = cmd.status().map_err(|source| RunError::Spawn {
        program: inv.program.clone(),
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Setup(#[from] QemuError),
    #[error("cannot start {}: {source} (install qemu-system-x86: ci/setup does)", program.to_string_lossy())]
    Spawn { program: OsString, source: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_hosts_get_tcg() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(Accel::detect_in(root.path()), Accel::Tcg, "no /dev/kvm");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::write(root.path().join("dev/kvm"), b"").expect("touch");
        assert_eq!(Accel::detect_in(root.path()), Accel::Kvm);
        std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).expect("mkdir");
        assert_eq!(Accel::detect_in(root.path()), Accel::Tcg, "PVM");
    }

    #[test]
    fn forwards_parse() {
        assert_eq!(
            "8080:80".parse::<PortForward>().expect("ok"),
            PortForward { host: 8080, guest: 80 }
        );
        assert!("8080".parse::<PortForward>().is_err());
        assert!("a:80".parse::<PortForward>().is_err());
    }

    #[test]
    fn paths_with_commas_are_escaped() {
        assert_eq!(
            escape_commas(Path::new("/tmp/a,b.img")),
            OsString::from("/tmp/a,,b.img")
        );
    }
}
