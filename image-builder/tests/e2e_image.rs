//! End-to-end: the appliance image (issue 4). `keel-image build` turns configs/ci.yaml into a
//! disk image, `keel-image run` boots it in QEMU (OVMF → systemd-boot → UKI → keel-init),
//! keel-init loads kvm-amd, starts the declared guest through keel-vmm and relays its
//! console, and powers the appliance off once the guest has ended (`host.on_idle: poweroff`
//! in ci.yaml).
//!
//! Run by `ci/e2e` (`test = false` keeps it out of `cargo test`/nextest), which passes:
//!   KEEL_E2E_HOST_KERNEL     Debian's linux-image-amd64 vmlinuz (kernel-config/fetch-host)
//!   KEEL_E2E_HOST_MODULES    its modules directory
//!   KEEL_E2E_GUEST_KERNEL    Keel's default guest kernel (kernel-config/build-guest)
//!   KEEL_E2E_BIN_DIR         static keel-init, keel-vmm, keelctl
//!
//! Prints `e2e: firmware_to_init_ms=N init_to_kvm_ms=N kvm_to_guest_ms=N total_ms=N`
//! (total: QEMU start to the guest's marker) and `e2e_image: N passed, N failed` last.

#[path = "e2e_support/console.rs"]
mod console;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use console::{Console, Report, StageFailure};

/// The guest configs/ci.yaml declares, and the line its default /init prints once up.
const GUEST: &str = "ci-guest";

fn env_path(name: &str) -> Result<PathBuf, String> {
    let value = std::env::var_os(name).ok_or_else(|| format!("{name} is not set; run this through ci/e2e"))?;
    let path = PathBuf::from(value);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{name}={} does not exist", path.display()))
    }
}

fn keel_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
}

fn build_image(work: &Path) -> Result<PathBuf, String> {
    let config = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../configs/ci.yaml");
    let image = work.join("ci.img");
    let started = Instant::now();
    let out = keel_image()
        .args(["build", "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&image)
        .arg("--kernel")
        .arg(env_path("KEEL_E2E_HOST_KERNEL")?)
        .arg("--modules")
        .arg(env_path("KEEL_E2E_HOST_MODULES")?)
        .arg("--guest-kernel")
        .arg(env_path("KEEL_E2E_GUEST_KERNEL")?)
        .arg("--bin-dir")
        .arg(env_path("KEEL_E2E_BIN_DIR")?)
        .output()
        .map_err(|e| format!("keel-image build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "keel-image build failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    println!(
        "e2e_image: built {} from {} in {} ms ({size} bytes)",
        image.display(),
        config.display(),
        started.elapsed().as_millis()
    );
    Ok(image)
}

fn run() -> Result<bool, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = build_image(work.path())?;
    let mut report = Report::new("e2e_image");

    let inspect = keel_image()
        .arg("inspect")
        .arg(&image)
        .output()
        .map_err(|e| format!("keel-image inspect: {e}"))?;
    print!("{}", String::from_utf8_lossy(&inspect.stdout));
    let verified = if inspect.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            inspect.status,
            String::from_utf8_lossy(&inspect.stderr)
        ))
    };
    if !report.check("keel-image inspect verifies the image", verified) {
        report.skipped_as_failed(&["the image boots (not attempted)"]);
        return Ok(report.finish());
    }

    let mut qemu = keel_image();
    qemu.args(["run", "--accel", "tcg", "--memory", "2GiB", "--cpus", "2", "--snapshot"])
        .arg(&image);
    let mut console = Console::spawn(qemu).map_err(|e| format!("keel-image run: {e}"))?;
    let fatal = [
        "Kernel panic",
        "keel-init: internal error",
        "no DHCP lease",
        "keel-guest: selftest done",
    ];
    let mut times = Vec::new();
    let stages: [(&str, &str, u64); 4] = [
        ("keel-init started as PID 1", "keel-init started as PID 1", 180),
        ("/dev/kvm ready", "/dev/kvm ready", 60),
        (
            "guest marker through the [guest] relay",
            "keel-guest: ci-guest is up",
            180,
        ),
        // ci.yaml's `keel.selftest`: the guest writes its disk, gets a DHCP lease from the NAT
        // bridge and pings the gateway, then reboots, which ends its VM (restart policy never).
        (
            "guest self-test: DHCP and ping through the NAT bridge",
            "keel-guest: ping 10.123.0.1 ok",
            120,
        ),
    ];
    let mut reached = 0;
    for (stage, needle, timeout) in stages {
        let result = console
            .expect(needle, &fatal, Duration::from_secs(timeout))
            .and_then(|line| {
                if needle.contains(GUEST) && !line.contains(&format!("[guest {GUEST}]")) {
                    Err(StageFailure(format!(
                        "marker without the `[guest {GUEST}]` relay prefix: {line}"
                    )))
                } else {
                    Ok(())
                }
            });
        times.push(console.elapsed());
        if report.stage(&console, stage, result).is_none() {
            break;
        }
        reached += 1;
    }
    if reached == stages.len() {
        let off = console.wait_exit(Duration::from_secs(120)).and_then(|status| {
            if status.success() {
                Ok(())
            } else {
                Err(StageFailure(format!("QEMU exited with {status}")))
            }
        });
        let at = console.elapsed();
        report.stage(&console, "appliance powers off cleanly", off);
        let ms = |d: Duration| d.as_millis();
        println!(
            "e2e: firmware_to_init_ms={} init_to_kvm_ms={} kvm_to_guest_ms={} total_ms={}",
            ms(times[0]),
            ms(times[1] - times[0]),
            ms(times[2] - times[1]),
            ms(times[2])
        );
        println!("e2e: guest_to_poweroff_ms={}", ms(at - times[2]));
    } else {
        let left: Vec<&str> = stages[reached + 1..]
            .iter()
            .map(|s| s.0)
            .chain(["appliance powers off cleanly"])
            .collect();
        report.skipped_as_failed(&left);
    }
    Ok(report.finish())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("e2e_image: error: {e}");
            println!("e2e_image: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}
