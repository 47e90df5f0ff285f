//! End-to-end: real Linux kernels boot, under QEMU's software emulation (issue 3).
//!
//! Run by `ci/e2e` (not by `cargo test`/nextest: `test = false` in Cargo.toml), which passes:
//!   KEEL_E2E_KERNEL        Debian's cloud kernel (vmlinuz): QEMU's guest and keel-vmm's guest
//!   KEEL_E2E_MODULES       its modules directory, depmod already run (kernel-config/fetch-host)
//!   KEEL_E2E_GUEST_KERNEL  Keel's default guest kernel (kernel-config/build-guest)
//!   KEEL_E2E_VMM           a static keel-vmm
//!   KEEL_E2E_BUSYBOX       optional, default /bin/busybox (busybox-static)
//!   KEEL_E2E_QEMU          optional, default qemu-system-x86_64
//!
//! Part 1: QEMU boots Keel's guest kernel straight into a busybox initramfs (tinyconfig +
//! kernel-config/guest.config reaches userspace).
//!
//! Part 2, nested: QEMU (`-cpu max` offers AMD SVM) boots the cloud kernel with an initramfs
//! built by keel-image's cpio writer. Its /init loads irqbypass → kvm → kvm-amd in the order of
//! the load list `modules.keel`, then runs keel-vmm three times: the cloud kernel with 1 and
//! with 2 vCPUs, and Keel's guest kernel with 2 vCPUs. Each inner guest prints a marker with
//! its vCPU count, writes the boot timer and reboots; keel-vmm must exit with its reboot code.
//!
//! Part 3 (issue 11): the same QEMU starts and tears down 60 keel-vmm VMs back to back; each
//! one flips a static key KVM patches into the kernel's scheduler (see `FLIPS`).
//!
//! Every stage waits for its console line with its own timeout. Prints
//! `e2e_vmm: N passed, N failed` last; exits non-zero on any failure.

#[path = "e2e_support/console.rs"]
mod console;
#[path = "e2e_support/env.rs"]
mod env;
#[path = "e2e_support/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use console::{Console, Report, StageFailure};
use env::env_path;
use guest::GUEST_MARKER;
use keel_image::initramfs::Builder;

/// keel-vmm's exit code when the guest asked to reboot (`EXIT_REBOOT` in vmm/src/control.rs).
const VMM_REBOOT_EXIT: i32 = 3;

/// Inner guests boot quiet: every serial byte costs the nested VMM several exits.
const INNER_CMDLINE: &str = "console=ttyS0 reboot=k quiet loglevel=1";

/// Lines that end a stage at once: no point waiting for a timeout after these.
const FATAL: &[&str] = &["Kernel panic", "KEEL-E2E: FAIL"];

struct Inputs {
    kernel: PathBuf,
    modules: PathBuf,
    guest_kernel: PathBuf,
    vmm: PathBuf,
    busybox: PathBuf,
    qemu: String,
}

fn inputs() -> Result<Inputs, String> {
    Ok(Inputs {
        kernel: env_path("KEEL_E2E_KERNEL")?,
        modules: env_path("KEEL_E2E_MODULES")?,
        guest_kernel: env_path("KEEL_E2E_GUEST_KERNEL")?,
        vmm: env_path("KEEL_E2E_VMM")?,
        busybox: std::env::var_os("KEEL_E2E_BUSYBOX").map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from),
        qemu: std::env::var("KEEL_E2E_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
    })
}

/// QEMU's software-emulated q35 with a direct kernel boot, serial on stdout.
fn qemu(inputs: &Inputs, kernel: &Path, initrd: &Path, cmdline: &str, cpus: u32, memory_mib: u32) -> Command {
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
    ])
    .args(["-m", &memory_mib.to_string(), "-smp", &cpus.to_string()])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", cmdline]);
    cmd
}

/// The outer /init: load KVM by the load list, then run keel-vmm once per inner boot.
fn outer_init(runs: &[(&str, &str, u32)]) -> String {
    let mut script = String::from(
        r#"#!/bin/sh
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
if [ -c /dev/kvm ]; then echo "KEEL-E2E: /dev/kvm ready"; else echo "KEEL-E2E: FAIL no /dev/kvm"; fi
"#,
    );
    for (label, kernel, cpus) in runs {
        script.push_str(&format!(
            "echo \"KEEL-E2E: run {label}\"\n\
             /keel-vmm --kernel {kernel} --initrd /guest/initrd.cpio --cmdline '{INNER_CMDLINE}' \
             --cpus {cpus} --memory 256MiB --serial stdio --boot-timer\n\
             echo \"KEEL-E2E: keel-vmm exit=$? ({label})\"\n"
        ));
    }
    script.push_str("echo \"KEEL-E2E: done\"\npoweroff -f\n");
    script
}

fn run() -> Result<bool, String> {
    let inputs = inputs()?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let boot_timer = guest::build_boot_timer(work.path())?;
    let guest_initrd = work.path().join("guest-initrd.cpio");
    std::fs::write(&guest_initrd, guest::guest_initramfs(&inputs.busybox, &boot_timer)?).map_err(|e| e.to_string())?;
    let mut report = Report::new("e2e_vmm");

    // Part 1: Keel's guest kernel on QEMU directly. One vCPU: the kernel has no ACPI and
    // SeaBIOS's MP table lists only the boot CPU, so SMP is checked under keel-vmm (part 2).
    println!(
        "e2e_vmm: part 1: Keel's guest kernel {} under QEMU",
        inputs.guest_kernel.display()
    );
    {
        let mut console = Console::spawn(qemu(
            &inputs,
            &inputs.guest_kernel,
            &guest_initrd,
            "console=ttyS0 reboot=k",
            1,
            256,
        ))
        .map_err(|e| format!("{}: {e} (ci/setup installs qemu-system-x86)", inputs.qemu))?;
        let marker = format!("{GUEST_MARKER} cpus=1");
        let reached = console_expect(&mut console, &marker, 60).map(drop);
        report.stage(&console, "guest kernel: reaches userspace under QEMU", reached);
        let exit = console.wait_exit(Duration::from_secs(30)).map(drop);
        report.stage(&console, "guest kernel: reboot -f ends QEMU", exit);
    }

    // Part 2: keel-vmm nested in QEMU.
    let runs = [
        ("cloud kernel, 1 vCPU", "/guest/vmlinuz", 1),
        ("cloud kernel, 2 vCPUs", "/guest/vmlinuz", 2),
        ("keel guest kernel, 2 vCPUs", "/guest/bzImage", 2),
    ];
    let mut outer = Builder::from_env().map_err(|e| e.to_string())?;
    guest::add_busybox(&mut outer, &inputs.busybox)?;
    outer
        .kernel_modules(&inputs.modules, &["kvm_amd"])
        .map_err(|e| e.to_string())?;
    let add = |b: &mut Builder, path: &str, host: &Path, mode: u32| {
        b.host_file(path, host, mode).map(|_| ()).map_err(|e| e.to_string())
    };
    add(&mut outer, "/keel-vmm", &inputs.vmm, 0o755)?;
    add(&mut outer, "/guest/vmlinuz", &inputs.kernel, 0o644)?;
    add(&mut outer, "/guest/bzImage", &inputs.guest_kernel, 0o644)?;
    add(&mut outer, "/guest/initrd.cpio", &guest_initrd, 0o644)?;
    outer
        .file("/init", 0o755, outer_init(&runs))
        .map_err(|e| e.to_string())?;
    let outer_initrd = work.path().join("outer-initrd.cpio");
    outer.write_to_file(&outer_initrd).map_err(|e| e.to_string())?;

    println!(
        "e2e_vmm: part 2: keel-vmm inside QEMU (cloud kernel {}, kvm-amd nested)",
        inputs.kernel.display()
    );
    let mut console = Console::spawn(qemu(
        &inputs,
        &inputs.kernel,
        &outer_initrd,
        "console=ttyS0 panic=-1 quiet",
        2,
        2048,
    ))
    .map_err(|e| format!("{}: {e}", inputs.qemu))?;
    let mut stages: Vec<String> = vec!["outer init started".into(), "/dev/kvm ready inside QEMU".into()];
    for (label, _, cpus) in &runs {
        stages.push(format!("{label}: marker cpus={cpus}"));
        stages.push(format!("{label}: boot-timer line"));
        stages.push(format!("{label}: keel-vmm exit {VMM_REBOOT_EXIT}"));
    }
    stages.push("QEMU powers off".into());

    let mut next = 0;
    // Records the outcome of stage `next`; false ends the run (later stages depend on it).
    let mut record = |report: &mut Report, console: &Console, result: Result<(), StageFailure>| {
        let ok = report.stage(console, &stages[next], result).is_some();
        next += 1;
        ok
    };
    'run: {
        let r = console_expect(&mut console, "KEEL-E2E: outer init started", 90).map(drop);
        if !record(&mut report, &console, r) {
            break 'run;
        }
        let r = console_expect(&mut console, "KEEL-E2E: /dev/kvm ready", 60).map(drop);
        if !record(&mut report, &console, r) {
            break 'run;
        }
        for (label, _, cpus) in &runs {
            let r = console_expect(&mut console, &format!("{GUEST_MARKER} cpus={cpus}"), 120).map(drop);
            if !record(&mut report, &console, r) {
                break 'run;
            }
            let r = console_expect(&mut console, "boot-timer: guest ready", 30).map(drop);
            if !record(&mut report, &console, r) {
                break 'run;
            }
            let want = format!("exit={VMM_REBOOT_EXIT} ({label})");
            let r = console_expect(&mut console, "KEEL-E2E: keel-vmm exit=", 60).and_then(|line| {
                if line.contains(&want) {
                    Ok(())
                } else {
                    Err(StageFailure(format!("expected `{want}`, got `{line}`")))
                }
            });
            if !record(&mut report, &console, r) {
                break 'run;
            }
        }
        let r = console_expect(&mut console, "KEEL-E2E: done", 30)
            .and_then(|_| console.wait_exit(Duration::from_secs(30)).map(drop));
        record(&mut report, &console, r);
    }
    let not_reached: Vec<&str> = stages[next..].iter().map(String::as_str).collect();
    report.skipped_as_failed(&not_reached);
    drop(console);

    flip_stress(&inputs, work.path(), &mut report)?;
    Ok(report.finish())
}

/// VMs created and destroyed back to back in part 3. Each creation of the only VM and
/// each destruction of the last one flips a static key inlined in the kernel's
/// `__schedule` (`preempt_notifier_key`, through KVM's `preempt_notifier_inc`/`dec`),
/// which the kernel patches live with int3 breakpoints. Issue 11's hang was this patch
/// wedging both vCPUs of a multi-threaded TCG appliance in `__schedule`.
const FLIPS: u32 = 60;
/// vCPUs of part 3's QEMU: what `keel-image run` gives a TCG appliance by default, which
/// the appliance suites boot. Measured on 2 vCPUs (multi-threaded TCG): wedged at run
/// ~250 of 1000, and once at run ~10 of 60. On 1 vCPU: 400 of 400 in 68.7 s.
const FLIP_CPUS: u32 = keel_image::qemu::Accel::Tcg.default_cpus();

/// Part 3: QEMU as `keel-image run` starts an appliance (see `keel_image::qemu`), the
/// cloud kernel, KVM loaded, and keel-vmm started and stopped FLIPS times: each run
/// creates its VM and starts its vCPUs, then fails to bind its control socket in a
/// directory that does not exist and exits 1, tearing the VM down.
fn flip_stress(inputs: &Inputs, work: &Path, report: &mut Report) -> Result<(), String> {
    let mut outer = Builder::from_env().map_err(|e| e.to_string())?;
    guest::add_busybox(&mut outer, &inputs.busybox)?;
    outer
        .kernel_modules(&inputs.modules, &["kvm_amd"])
        .map_err(|e| e.to_string())?;
    outer
        .host_file("/keel-vmm", &inputs.vmm, 0o755)
        .and_then(|b| b.host_file("/guest/bzImage", &inputs.guest_kernel, 0o644))
        .map_err(|e| e.to_string())?;
    let mut script = outer_init(&[]).replace("echo \"KEEL-E2E: done\"\npoweroff -f\n", "");
    script.push_str(&format!(
        r#"i=0
while [ $i -lt {FLIPS} ]; do
  /keel-vmm --kernel /guest/bzImage --memory 32MiB --serial none --api-socket /no/such/dir/sock 2>/dev/null
  rc=$?
  [ $rc = 1 ] || echo "KEEL-E2E: FAIL keel-vmm exit=$rc, expected 1"
  i=$((i + 1))
  [ $((i % 10)) = 0 ] && echo "KEEL-E2E: flips $i"
done
echo "KEEL-E2E: done"
poweroff -f
"#
    ));
    outer.file("/init", 0o755, script).map_err(|e| e.to_string())?;
    let initrd = work.join("flip-initrd.cpio");
    outer.write_to_file(&initrd).map_err(|e| e.to_string())?;
    println!("e2e_vmm: part 3: {FLIPS} VMs created and destroyed in an appliance-like QEMU ({FLIP_CPUS} vCPUs)");
    let mut console = Console::spawn(qemu(
        inputs,
        &inputs.kernel,
        &initrd,
        "console=ttyS0 panic=-1 quiet",
        FLIP_CPUS,
        1024,
    ))
    .map_err(|e| format!("{}: {e}", inputs.qemu))?;
    let stage = format!("{FLIPS} keel-vmm VMs created and destroyed, none wedges the kernel");
    let started = std::time::Instant::now();
    let mut result = console_expect(&mut console, "KEEL-E2E: /dev/kvm ready", 120).map(drop);
    let mut done = 0;
    while result.is_ok() && done < FLIPS {
        // Each batch of 10 takes a few seconds; a wedged kernel prints nothing more.
        result = console_expect(&mut console, "KEEL-E2E: flips ", 60).and_then(|line| {
            done = line
                .rsplit(' ')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| StageFailure(format!("unreadable progress line `{line}`")))?;
            Ok(())
        });
    }
    let result = result
        .and_then(|()| console_expect(&mut console, "KEEL-E2E: done", 30).map(drop))
        .and_then(|()| console.wait_exit(Duration::from_secs(30)).map(drop));
    println!(
        "e2e_vmm: part 3: {done} of {FLIPS} VMs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    report.stage(&console, &stage, result);
    Ok(())
}

fn console_expect(console: &mut Console, needle: &str, timeout_s: u64) -> Result<String, StageFailure> {
    console.expect(needle, FATAL, Duration::from_secs(timeout_s))
}

fn main() -> ExitCode {
    console::exit_code("e2e_vmm", run())
}
