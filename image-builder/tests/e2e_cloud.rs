//! End-to-end: a stock-style Debian cloud image as a guest (issue 13). The appliance
//! (configs/ci.yaml) boots in QEMU; the test imports the Debian 12 qcow2 that
//! `ci/debian-cloud-image` built from Debian's packages with `keelctl image import`
//! over the forwarded API (KEEL-DATA is XFS: `keelctl host` must report reflink clones);
//! `keelctl apply` adds a guest with `boot: disk` (Debian's own
//! kernel and initramfs from its own disk), `cloud_init` (an SSH key made here with
//! ssh-keygen, a runcmd that writes a marker) and a port forward; once cloud-init says
//! it finished on the guest's console, OpenSSH logs in through QEMU's forwarded port and
//! the appliance's port forward and checks the hostname, the marker and the disk size,
//! writes a file, and finds it again after a guest reboot and after an appliance reboot.
//!
//! Run by `ci/e2e` (`test = false`), which passes KEEL_E2E_HOST_KERNEL,
//! KEEL_E2E_HOST_MODULES, KEEL_E2E_GUEST_KERNEL, KEEL_E2E_BIN_DIR (as for e2e_image)
//! and KEEL_E2E_DEBIAN_IMAGE (the qcow2). Every QEMU network is `restrict=on` with only
//! the API and SSH ports forwarded: the Debian guest reaches nothing past the appliance.
//! Prints `e2e_cloud: apply_to_ssh_ms=N` and `e2e_cloud: N passed, N failed` last.

#[path = "e2e_support/appliance.rs"]
mod appliance;
#[path = "e2e_support/console.rs"]
mod console;
#[path = "e2e_support/env.rs"]
mod env;
#[path = "e2e_support/keelctl.rs"]
mod keelctl;
#[path = "e2e_support/run.rs"]
mod run;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use appliance::keel_image;
use console::{Console, Report, StageFailure};
use env::{env_path, free_port};
use keelctl::{Keelctl, state_of};

const SUITE: &str = "e2e_cloud";
const GUEST: &str = "deb";
const API_PORT: u16 = 7070;
/// The appliance's port forward to the guest's sshd.
const SSH_PORT: u16 = 2222;
const FATAL: [&str; 4] = [
    "Kernel panic",
    "did not report the guest running",
    "stuck in the kernel",
    "keel-init: internal error",
];

/// configs/ci.yaml's network and pool with the Debian guest instead of ci-guest.
fn cloud_config(work: &Path, key: &str) -> Result<PathBuf, String> {
    let text = format!(
        r#"version: 1
host:
  hostname: keel-ci
  log_level: debug
  on_idle: poweroff
  api: {{listen: 0.0.0.0:{API_PORT}, token_file: api-token}}
network:
  uplink: {{interface: auto, address: dhcp}}
  bridges:
    - name: br-ci
      mode: nat
      address: 10.123.0.1/24
      dhcp:
        range: 10.123.0.100-10.123.0.150
        static_leases: [{{mac: "52:54:00:12:34:56", address: 10.123.0.20}}]
      forwards: [{{host_port: {SSH_PORT}, guest: {GUEST}, guest_port: 22}}]
storage:
  pools:
    - name: default
guests:
  - name: {GUEST}
    vcpus: 1
    memory: 768MiB
    boot: disk
    disks: [{{volume: default/deb-root, size: 4GiB, image: default/debian-12}}]
    nics: [{{bridge: br-ci, mac: "52:54:00:12:34:56"}}]
    cloud_init:
      ssh_authorized_keys: ["{key}"]
      runcmd: ["echo keel-cloud-marker > /etc/keel-marker"]
    restart: {{policy: on-failure}}
"#
    );
    let path = work.join("cloud.yaml");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn boot(image: &Path, api_port: u16, ssh_port: u16) -> Result<Console, String> {
    let mut qemu = keel_image();
    qemu.args(["run", "--accel", "tcg", "--memory", "3GiB"])
        .arg("--forward")
        .arg(format!("{api_port}:{API_PORT}"))
        .arg("--forward")
        .arg(format!("{ssh_port}:{SSH_PORT}"))
        .arg(image);
    Console::spawn(qemu).map_err(|e| format!("keel-image run: {e}"))
}

/// OpenSSH as the image's default user through the forwarded port; its stdout.
fn ssh(key: &Path, port: u16, command: &str) -> Result<String, String> {
    let mut cmd = Command::new("ssh");
    cmd.arg("-i").arg(key).args(["-p", &port.to_string()]).args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "LogLevel=ERROR",
        "debian@127.0.0.1",
        command,
    ]);
    let out = run::run_timeout(cmd, Duration::from_secs(90))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ssh {command:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Retries `ssh` until it succeeds (sshd starting, the guest rebooting).
fn ssh_until(key: &Path, port: u16, command: &str, timeout: Duration) -> Result<String, StageFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        match ssh(key, port, command) {
            Ok(out) => return Ok(out),
            Err(e) if Instant::now() > deadline => {
                return Err(StageFailure(format!(
                    "no SSH login within {} s: {e}",
                    timeout.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(5)),
        }
    }
}

/// The guest's cloud-init final message, through the `[guest deb]` relay.
fn cloud_init_finished(console: &mut Console, timeout: u64) -> Result<String, StageFailure> {
    loop {
        let line = console.expect("finished at", &FATAL, Duration::from_secs(timeout))?;
        if line.contains(&format!("[guest {GUEST}]")) && line.contains("Cloud-init") {
            return Ok(line);
        }
    }
}

fn run() -> Result<bool, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let token = "e2e-token-0123456789abcdef";
    let token_file = work.path().join("api-token");
    std::fs::write(&token_file, format!("{token}\n")).map_err(|e| e.to_string())?;
    let qcow2 = env_path("KEEL_E2E_DEBIAN_IMAGE")?;
    let image = appliance::build_image(SUITE, work.path(), &token_file, "")?;
    // Room on KEEL-DATA for the image and the guest's volume (keel-init grows it).
    let grown = std::fs::metadata(&image).map_err(|e| e.to_string())?.len() + (8 << 30);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(grown))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let key = work.path().join("id_ed25519");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e-cloud", "-f"])
        .arg(&key)
        .status()
        .map_err(|e| format!("ssh-keygen: {e} (package openssh-client)"))?;
    if !keygen.success() {
        return Err(format!("ssh-keygen: {keygen}"));
    }
    let public = std::fs::read_to_string(key.with_extension("pub")).map_err(|e| e.to_string())?;
    let config = cloud_config(work.path(), public.trim())?;
    let (api_port, ssh_port) = (free_port()?, free_port()?);
    let api = Keelctl {
        suite: SUITE,
        binary: env_path("KEEL_E2E_BIN_DIR")?.join("keelctl"),
        url: format!("http://127.0.0.1:{api_port}"),
        token: token.to_string(),
    };
    let mut report = Report::new(SUITE);
    let stages = [
        "appliance boots and serves the API",
        "keelctl image import of the Debian qcow2 over the forwarded API; KEEL-DATA (xfs) clones by reflink",
        "keelctl apply: boot: disk + cloud_init + port forward; cloud-init finishes on the guest console",
        "OpenSSH login through both forwards: hostname, cloud-init marker, disk size",
        "a file written over SSH survives a guest reboot",
        "the file survives an appliance reboot (guest autostarts from its volume)",
    ];

    let mut console = boot(&image, api_port, ssh_port)?;
    let up = console
        .expect("/dev/kvm ready", &FATAL, Duration::from_secs(240))
        .and_then(|_| api.wait_until("the API answers", Duration::from_secs(120), |_| true));
    if report.stage(&console, stages[0], up).is_none() {
        report.skipped_as_failed(&stages[1..]);
        return Ok(report.finish());
    }

    let started = Instant::now();
    let imported = api
        .run(&[
            "image",
            "import",
            "--pool",
            "default",
            "debian-12",
            &qcow2.display().to_string(),
        ])
        .map_err(StageFailure)
        .and_then(|_| api.run(&["host", "--json"]).map_err(StageFailure))
        .and_then(|text| {
            // A KEEL-DATA this Keel made is XFS with reflinks: the guest's volume will be
            // a clone of the image that allocates nothing.
            let host: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| StageFailure(format!("host --json: {e}")))?;
            match (host["clones"]["method"].as_str(), host["clones"]["filesystem"].as_str()) {
                (Some("reflink"), Some("xfs")) => Ok(()),
                other => Err(StageFailure(format!(
                    "KEEL-DATA clones: {other:?}, not reflinks on xfs"
                ))),
            }
        });
    println!("{SUITE}: image import took {} ms", started.elapsed().as_millis());
    if report.stage(&console, stages[1], imported).is_none() {
        report.skipped_as_failed(&stages[2..]);
        return Ok(report.finish());
    }

    let applied_at = Instant::now();
    let finished = api
        .run(&["apply", &config.display().to_string()])
        .map_err(StageFailure)
        .and_then(|_| cloud_init_finished(&mut console, 900));
    if report.stage(&console, stages[2], finished).is_none() {
        report.skipped_as_failed(&stages[3..]);
        return Ok(report.finish());
    }

    let login = ssh_until(
        &key,
        ssh_port,
        "hostname; cat /etc/keel-marker; lsblk -bdno SIZE /dev/vda",
        Duration::from_secs(180),
    )
    .and_then(|out| {
        println!("{SUITE}: apply_to_ssh_ms={}", applied_at.elapsed().as_millis());
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        if lines == [GUEST, "keel-cloud-marker", "4294967296"] {
            Ok(())
        } else {
            Err(StageFailure(format!(
                "expected hostname, marker and a 4 GiB vda; got {lines:?}"
            )))
        }
    });
    if report.stage(&console, stages[3], login).is_none() {
        report.skipped_as_failed(&stages[4..]);
        return Ok(report.finish());
    }

    let check_file = "cat ~/keel-persist";
    let rebooted = ssh(&key, ssh_port, "echo survives > ~/keel-persist && sync")
        .map_err(StageFailure)
        .and_then(|_| api.run(&["reboot", GUEST]).map_err(StageFailure))
        .and_then(|_| ssh_until(&key, ssh_port, check_file, Duration::from_secs(600)))
        .and_then(|out| match out.trim() {
            "survives" => Ok(()),
            other => Err(StageFailure(format!("after the guest reboot the file holds {other:?}"))),
        });
    if report.stage(&console, stages[4], rebooted).is_none() {
        report.skipped_as_failed(&stages[5..]);
        return Ok(report.finish());
    }

    // Stopping the only guest leaves the appliance idle: it powers off (on_idle).
    let appliance_rebooted = api
        .run(&["stop", GUEST])
        .map_err(StageFailure)
        .and_then(|_| console.wait_exit(Duration::from_secs(180)))
        .and_then(|status| {
            if status.success() {
                Ok(())
            } else {
                Err(StageFailure(format!("QEMU exited with {status}")))
            }
        })
        .and_then(|()| {
            console = boot(&image, api_port, ssh_port).map_err(StageFailure)?;
            api.wait_until("the guest running again", Duration::from_secs(300), |s| {
                state_of(s, GUEST) == Some("running")
            })
        })
        .and_then(|_| ssh_until(&key, ssh_port, check_file, Duration::from_secs(600)))
        .and_then(|out| match out.trim() {
            "survives" => Ok(()),
            other => Err(StageFailure(format!(
                "after the appliance reboot the file holds {other:?}"
            ))),
        });
    if report.stage(&console, stages[5], appliance_rebooted).is_some() {
        let _ = api.run(&["stop", GUEST]);
        let _ = console.wait_exit(Duration::from_secs(120));
    }
    Ok(report.finish())
}

fn main() -> ExitCode {
    console::exit_code(SUITE, run())
}
