//! End-to-end: keel-vmm's virtio devices and ACPI power button with a real Linux guest,
//! nested under QEMU's software emulation (issue 5).
//!
//! Run by `ci/e2e` (harness-less, `test = false`), which passes the same variables as for
//! e2e_vmm: KEEL_E2E_KERNEL (Debian's cloud kernel), KEEL_E2E_MODULES (its modules,
//! depmod run), KEEL_E2E_VMM (a static keel-vmm); optional KEEL_E2E_BUSYBOX, KEEL_E2E_QEMU.
//!
//! The test builds an ext4 image with `mke2fs -d` holding `hello.txt` and gives it to QEMU
//! as the outer guest's virtio disk. The outer /init loads kvm-amd and virtio-blk, then runs
//! keel-vmm with that disk (`--disk path=/dev/vda`), a tap (`--net tap=ktap0`, which the
//! outer addresses as 10.0.2.1/24) and `--rng`. The inner guest, the same cloud kernel, has
//! no command-line virtio devices: it finds them through the ACPI DSDT once its /init has
//! loaded virtio_mmio, virtio_blk, virtio_net, virtio_rng (and button, evdev for the power
//! button). It mounts the disk, reads hello.txt, writes from-guest.txt, pings 10.0.2.1,
//! checks the hardware RNG, then waits on the power button's input device. The outer sends
//! keel-vmm SIGTERM; keel-vmm presses the ACPI power button; the inner guest powers off
//! and keel-vmm exits 0 within the grace period. After QEMU exits the test reads
//! from-guest.txt out of the image with debugfs.
//!
//! Every stage waits for its console line with its own timeout. Prints
//! `e2e_devices: N passed, N failed` last; exits non-zero on any failure.

#[path = "e2e_support/console.rs"]
mod console;
#[path = "e2e_support/env.rs"]
mod env;
// Only the busybox helper of the shared guest pieces is used here.
#[allow(dead_code)]
#[path = "e2e_support/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use console::{Console, Report, StageFailure};
use env::env_path;
use keel_image::initramfs::Builder;

const HELLO: &str = "hello from the host side of keel-e2e";
const FROM_GUEST: &str = "written by the inner guest through virtio-blk";
const FATAL: &[&str] = &["Kernel panic", "KEEL-E2E: FAIL", "KEEL-E2E-INNER: FAIL"];
/// Applets the two /init scripts use beyond guest::add_busybox's.
const MORE_APPLETS: &[&str] = &[
    "ip", "ping", "dd", "umount", "mkdir", "kill", "tail", "touch", "sync", "sed", "seq", "cut", "wc",
];

/// The inner guest's /init. Device discovery is ACPI only: the cloud kernel has no
/// VIRTIO_MMIO_CMDLINE_DEVICES.
const INNER_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
kver=$(uname -r)
while read -r name path; do
  case "$name" in ''|'#'*) continue ;; esac
  insmod "/lib/modules/$kver/$path" || echo "KEEL-E2E-INNER: FAIL insmod $name"
done < "/lib/modules/$kver/modules.keel"
echo "KEEL-E2E-INNER: modules loaded"
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
if [ -b /dev/vda ]; then
  echo "KEEL-E2E-INNER: found /dev/vda serial=$(cat /sys/block/vda/serial)"
else
  echo "KEEL-E2E-INNER: FAIL no /dev/vda"; ls /sys/bus/platform/devices; poweroff -f
fi
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || echo "KEEL-E2E-INNER: FAIL mount"
echo "KEEL-E2E-INNER: read $(cat /mnt/hello.txt)"
echo "FROM_GUEST" > /mnt/from-guest.txt
umount /mnt && echo "KEEL-E2E-INNER: wrote from-guest.txt"
ip link set eth0 up
ip addr add 10.0.2.2/24 dev eth0
if ping -c 3 -w 30 10.0.2.1 >/dev/null; then echo "KEEL-E2E-INNER: ping 10.0.2.1 ok"; else echo "KEEL-E2E-INNER: FAIL ping"; fi
echo "KEEL-E2E-INNER: hwrng $(cat /sys/class/misc/hw_random/rng_current) $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c) bytes"
ev=""
for d in /sys/class/input/input*; do
  if grep -q "Power Button" "$d/name"; then ev=$(ls "$d" | grep '^event'); fi
done
[ -n "$ev" ] || echo "KEEL-E2E-INNER: FAIL no power button input device"
echo "KEEL-E2E-INNER: waiting for the power button on $ev"
dd if="/dev/input/$ev" of=/dev/null bs=24 count=1 2>/dev/null
echo "KEEL-E2E-INNER: power button pressed, powering off"
poweroff -f
"#;

/// The outer /init: KVM and the outer virtio disk, then one keel-vmm run ended by SIGTERM.
const OUTER_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KEEL-E2E: outer init started"
kver=$(uname -r)
while read -r name path; do
  case "$name" in ''|'#'*) continue ;; esac
  insmod "/lib/modules/$kver/$path" || echo "KEEL-E2E: FAIL insmod $name"
done < "/lib/modules/$kver/modules.keel"
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
if [ -c /dev/kvm ] && [ -b /dev/vda ]; then echo "KEEL-E2E: /dev/kvm and /dev/vda ready"; else echo "KEEL-E2E: FAIL no /dev/kvm or /dev/vda"; fi
# keel-vmm creates the tap; address it as soon as it exists.
(while ! ip link show ktap0 >/dev/null 2>&1; do sleep 0.1; done
 ip addr add 10.0.2.1/24 dev ktap0; ip link set ktap0 up; echo "KEEL-E2E: tap ktap0 is 10.0.2.1/24") &
touch /inner.log
/keel-vmm --kernel /guest/vmlinuz --initrd /guest/initrd.cpio --memory 256MiB \
  --cmdline "console=ttyS0 reboot=k panic=1 quiet loglevel=1" \
  --disk path=/dev/vda,serial=e2e-data --net tap=ktap0,mac=52:54:00:e2:e2:01 --rng \
  --serial file:/inner.log --shutdown-timeout 60 &
vmm=$!
tail -f /inner.log &
tailer=$!
n=0
while ! grep -q "waiting for the power button" /inner.log; do
  kill -0 $vmm 2>/dev/null || break
  n=$((n + 1)); [ $n -gt 600 ] && break
  sleep 0.5
done
sleep 1
echo "KEEL-E2E: SIGTERM to keel-vmm"
kill -TERM $vmm
wait $vmm
rc=$?
sleep 1
kill $tailer
echo "KEEL-E2E: keel-vmm exit=$rc"
sync
echo "KEEL-E2E: done"
poweroff -f
"#;

struct Inputs {
    kernel: PathBuf,
    modules: PathBuf,
    vmm: PathBuf,
    busybox: PathBuf,
    qemu: String,
}

fn inputs() -> Result<Inputs, String> {
    Ok(Inputs {
        kernel: env_path("KEEL_E2E_KERNEL")?,
        modules: env_path("KEEL_E2E_MODULES")?,
        vmm: env_path("KEEL_E2E_VMM")?,
        busybox: std::env::var_os("KEEL_E2E_BUSYBOX").map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from),
        qemu: std::env::var("KEEL_E2E_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
    })
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: {e} (ci/setup installs e2fsprogs)"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A 32 MiB ext4 image holding hello.txt, made with `mke2fs -d`.
fn data_disk(dir: &Path) -> Result<PathBuf, String> {
    let tree = dir.join("disk-tree");
    std::fs::create_dir_all(&tree).map_err(|e| e.to_string())?;
    std::fs::write(tree.join("hello.txt"), format!("{HELLO}\n")).map_err(|e| e.to_string())?;
    let image = dir.join("data.img");
    run_tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "e2e-data", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("32M"),
        "mke2fs",
    )?;
    Ok(image)
}

fn add_applets(b: &mut Builder, busybox: &Path) -> Result<(), String> {
    guest::add_busybox(b, busybox)?;
    for applet in MORE_APPLETS {
        b.symlink(&format!("/bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn run() -> Result<bool, String> {
    let inputs = inputs()?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let disk = data_disk(work.path())?;

    let mut inner = Builder::from_env().map_err(|e| e.to_string())?;
    add_applets(&mut inner, &inputs.busybox)?;
    inner
        .kernel_modules(
            &inputs.modules,
            &[
                "virtio_mmio",
                "virtio_blk",
                "virtio_net",
                "virtio_rng",
                "button",
                "evdev",
            ],
        )
        .map_err(|e| e.to_string())?;
    inner
        .file("/init", 0o755, INNER_INIT.replace("FROM_GUEST", FROM_GUEST))
        .map_err(|e| e.to_string())?;
    let inner_initrd = work.path().join("inner.cpio");
    inner.write_to_file(&inner_initrd).map_err(|e| e.to_string())?;

    let mut outer = Builder::from_env().map_err(|e| e.to_string())?;
    add_applets(&mut outer, &inputs.busybox)?;
    outer
        .kernel_modules(&inputs.modules, &["kvm_amd", "virtio_pci", "virtio_blk", "tun"])
        .map_err(|e| e.to_string())?;
    let add = |b: &mut Builder, path: &str, host: &Path, mode: u32| {
        b.host_file(path, host, mode).map(|_| ()).map_err(|e| e.to_string())
    };
    add(&mut outer, "/keel-vmm", &inputs.vmm, 0o755)?;
    add(&mut outer, "/guest/vmlinuz", &inputs.kernel, 0o644)?;
    add(&mut outer, "/guest/initrd.cpio", &inner_initrd, 0o644)?;
    outer.file("/init", 0o755, OUTER_INIT).map_err(|e| e.to_string())?;
    let outer_initrd = work.path().join("outer.cpio");
    outer.write_to_file(&outer_initrd).map_err(|e| e.to_string())?;

    println!(
        "e2e_devices: keel-vmm inside QEMU, inner cloud kernel {} with virtio-blk/net/rng found through ACPI",
        inputs.kernel.display()
    );
    let mut cmd = Command::new(&inputs.qemu);
    cmd.args([
        "-M",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-m",
        "2048",
        "-smp",
        "2",
    ])
    .arg("-kernel")
    .arg(&inputs.kernel)
    .arg("-initrd")
    .arg(&outer_initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .arg("-drive")
    .arg(format!("file={},format=raw,if=virtio", disk.display()));
    let mut console = Console::spawn(cmd).map_err(|e| format!("{}: {e}", inputs.qemu))?;
    let mut report = Report::new("e2e_devices");

    // (stage name, console line, timeout in seconds)
    let stages: Vec<(String, String, u64)> = vec![
        ("outer init started".into(), "KEEL-E2E: outer init started".into(), 90),
        (
            "/dev/kvm and the outer disk".into(),
            "KEEL-E2E: /dev/kvm and /dev/vda ready".into(),
            60,
        ),
        ("tap created by keel-vmm".into(), "KEEL-E2E: tap ktap0 is".into(), 60),
        (
            "inner guest loads its modules".into(),
            "KEEL-E2E-INNER: modules loaded".into(),
            120,
        ),
        (
            "virtio-blk found through ACPI, GET_ID serial".into(),
            "KEEL-E2E-INNER: found /dev/vda serial=e2e-data".into(),
            30,
        ),
        (
            "ext4 mounted, file read".into(),
            format!("KEEL-E2E-INNER: read {HELLO}"),
            30,
        ),
        (
            "file written back".into(),
            "KEEL-E2E-INNER: wrote from-guest.txt".into(),
            30,
        ),
        (
            "virtio-net: ping the tap".into(),
            "KEEL-E2E-INNER: ping 10.0.2.1 ok".into(),
            60,
        ),
        (
            "virtio-rng is the hardware RNG".into(),
            "KEEL-E2E-INNER: hwrng virtio_rng.0 16 bytes".into(),
            30,
        ),
        (
            "guest waits on the power button".into(),
            "KEEL-E2E-INNER: waiting for the power button on event".into(),
            30,
        ),
        (
            "SIGTERM presses the power button".into(),
            "KEEL-E2E-INNER: power button pressed".into(),
            60,
        ),
        (
            "keel-vmm exits 0 after the guest's poweroff".into(),
            "KEEL-E2E: keel-vmm exit=".into(),
            90,
        ),
    ];
    let mut reached = 0;
    let mut all_ok = true;
    for (name, line, timeout) in &stages {
        let result = console
            .expect(line, FATAL, Duration::from_secs(*timeout))
            .and_then(|got| {
                if line.ends_with("exit=") && !got.contains("exit=0") {
                    Err(StageFailure(format!("expected exit=0, got `{got}`")))
                } else {
                    Ok(())
                }
            });
        reached += 1;
        if report.stage(&console, name, result).is_none() {
            all_ok = false;
            break;
        }
    }
    let not_reached: Vec<&str> = stages[reached..].iter().map(|s| s.0.as_str()).collect();
    report.skipped_as_failed(&not_reached);
    if all_ok {
        let r = console
            .expect("KEEL-E2E: done", FATAL, Duration::from_secs(30))
            .and_then(|_| console.wait_exit(Duration::from_secs(30)).map(drop));
        report.stage(&console, "QEMU powers off", r);
        let r = run_tool(
            Command::new("debugfs").args(["-R", "cat /from-guest.txt"]).arg(&disk),
            "debugfs",
        )
        .map_err(StageFailure)
        .and_then(|text| {
            if text.trim_end() == FROM_GUEST {
                Ok(())
            } else {
                Err(StageFailure(format!("from-guest.txt holds {text:?}")))
            }
        });
        report.stage(&console, "host reads the guest's file from the image", r);
    } else {
        report.skipped_as_failed(&["QEMU powers off", "host reads the guest's file from the image"]);
    }
    Ok(report.finish())
}

fn main() -> ExitCode {
    console::exit_code("e2e_devices", run())
}
