//! End-to-end: the appliance image (issues 4, 6 and 7). `keel-image build` turns
//! configs/ci.yaml into a disk image and `keel-image run` boots it in QEMU (OVMF →
//! systemd-boot → UKI → keel-init); keel-init loads kvm-amd, brings up the NAT bridge and
//! the storage pool, starts the declared guest through keel-vmm and relays its console.
//! The test then drives the appliance the way an operator does, with `keelctl` through the
//! TCP control API that `keel-image run --forward` exposes on loopback:
//!
//! boot 1: the guest gets a DHCP lease from the bridge, pings it and writes a file into
//!         its volume (`keel.selftest` in ci.yaml); `keelctl list`; `keelctl apply` of a
//!         config with a second guest starts it; `keelctl stop`/`start` of the first guest;
//!         12 `keelctl reset`s of the second (each VMM must report running before its
//!         start deadline and the guest must boot again: issue 11's regression test);
//!         stopping both leaves the appliance idle, and it powers off (`on_idle: poweroff`).
//! boot 2: the same disk, made 1 GiB larger in between (as when an image is flashed to a
//!         bigger disk): keel-init grows KEEL-DATA's partition and filesystem; the guest
//!         finds the file it wrote in boot 1 (the volume survived the appliance's reboot
//!         and the growth) and the applied config (second guest) is still the one in force;
//!         stopping both powers it off again.
//!
//! Run by `ci/e2e` (`test = false` keeps it out of `cargo test`/nextest), which passes:
//!   KEEL_E2E_HOST_KERNEL     Debian's linux-image-amd64 vmlinuz (kernel-config/fetch-host)
//!   KEEL_E2E_HOST_MODULES    its modules directory
//!   KEEL_E2E_GUEST_KERNEL    Keel's default guest kernel (kernel-config/build-guest)
//!   KEEL_E2E_BIN_DIR         static keel-init, keel-vmm, keelctl
//!
//! Prints `e2e: firmware_to_init_ms=N init_to_kvm_ms=N kvm_to_guest_ms=N total_ms=N` for
//! boot 1 (total: QEMU start to the guest's marker) and `e2e_image: N passed, N failed` last.

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
use std::process::ExitCode;
use std::time::{Duration, Instant};

use appliance::{keel_image, repo_file};
use console::{Console, Report, StageFailure};
use env::{env_path, free_port};
use keelctl::{Keelctl, state_of};

/// The guest configs/ci.yaml declares, and the one `keelctl apply` adds.
const GUEST: &str = "ci-guest";
const SECOND: &str = "ci-guest2";
/// Where ci.yaml's `host.api` listens inside the appliance.
const API_PORT: u16 = 7070;
/// Lines that end any stage at once.
const FATAL: [&str; 7] = [
    "Kernel panic",
    // keel-init's start deadline and its stuck-VMM report (issue 11): never expected.
    "did not report the guest running",
    "stuck in the kernel",
    "keel-init: internal error",
    "no DHCP lease",
    "ping 10.123.0.1 failed",
    "disk: cannot mount",
];

/// On the appliance's kernel command line; the kernel passes it to init as `argv[1]`.
const UNKNOWN_KERNEL_WORD: &str = "nokaslr";

fn boot(image: &Path, host_port: u16) -> Result<Console, String> {
    let mut qemu = keel_image();
    qemu.args(["run", "--accel", "tcg", "--memory", "2GiB"])
        .arg("--forward")
        .arg(format!("{host_port}:{API_PORT}"))
        .arg(image);
    Console::spawn(qemu).map_err(|e| format!("keel-image run: {e}"))
}

/// A line with `needle` that came through the `[guest NAME]` relay.
fn guest_line(console: &mut Console, guest: &str, needle: &str, timeout: u64) -> Result<String, StageFailure> {
    let line = console.expect(needle, &FATAL, Duration::from_secs(timeout))?;
    if line.contains(&format!("[guest {guest}]")) {
        Ok(line)
    } else {
        Err(StageFailure(format!(
            "marker without the `[guest {guest}]` relay prefix: {line}"
        )))
    }
}

/// How many times the reset stage restarts the second guest's VMM.
const RESETS: usize = 12;
const RESET_STAGE: &str = "boot 1: 12 resets of the second guest: each VMM reports running and the guest boots again";

/// Issue 11's reproduction, kept as a regression test: a keel-vmm hung at start-up
/// (there: after a power cut) was never noticed. Each `keelctl reset` replaces the
/// VMM at once; keel-init must see the new one running (its start deadline would
/// otherwise kill it and log "did not report the guest running", which is FATAL)
/// and the nested Linux must reach userspace again.
fn reset_loop(console: &mut Console, api: &Keelctl) -> Result<(), StageFailure> {
    for i in 1..=RESETS {
        let started = Instant::now();
        api.run(&["reset", SECOND]).map_err(StageFailure)?;
        guest_line(console, SECOND, "keel-guest: ci-guest2 is up", 120)
            .map_err(|e| StageFailure(format!("reset {i} of {RESETS}: {}", e.0)))?;
        println!(
            "e2e_image: reset {i}/{RESETS}: guest up again in {} ms",
            started.elapsed().as_millis()
        );
    }
    api.wait_until("ci-guest2 running after the resets", Duration::from_secs(30), |s| {
        state_of(s, SECOND) == Some("running")
    })
}

/// Stops both guests through the API; the idle appliance then powers off by itself.
fn stop_all_and_power_off(report: &mut Report, console: &mut Console, api: &Keelctl, boot: &str) -> bool {
    let stopped = [GUEST, SECOND]
        .iter()
        .try_for_each(|g| api.run(&["stop", g]).map(drop))
        .map_err(StageFailure);
    if report
        .stage(console, &format!("{boot}: keelctl stop of both guests"), stopped)
        .is_none()
    {
        return false;
    }
    let off = console.wait_exit(Duration::from_secs(120)).and_then(|status| {
        if status.success() {
            Ok(())
        } else {
            Err(StageFailure(format!("QEMU exited with {status}")))
        }
    });
    report
        .stage(console, &format!("{boot}: idle appliance powers off cleanly"), off)
        .is_some()
}

/// The guest has written a file into its volume and pinged the bridge: keel-vmm's device
/// counters, read by keel-init over the VMM's control socket, must show it in
/// `keelctl status` and in the Prometheus metrics.
fn device_traffic(api: &Keelctl) -> Result<(), String> {
    let text = api.run(&["status", GUEST, "--json"])?;
    let detail: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("status --json: {e}: {text}"))?;
    let devices = detail["stats"]["devices"]
        .as_array()
        .ok_or_else(|| format!("status --json has no stats.devices: {text}"))?;
    let device = |name: &str| {
        devices
            .iter()
            .find(|d| d["name"] == name)
            .ok_or_else(|| format!("no device {name} in stats.devices: {text}"))
    };
    let number = |d: &serde_json::Value, k: &str| d[k].as_u64().unwrap_or(0);
    let blk = device("virtio-blk0")?;
    if number(blk, "bytes_out") < 512 || number(blk, "ops_in") == 0 {
        return Err(format!("virtio-blk0 shows no record write / read: {blk}"));
    }
    let net = device("virtio-net0")?;
    if number(net, "ops_out") == 0 || number(net, "ops_in") == 0 {
        return Err(format!("virtio-net0 shows no frames both ways: {net}"));
    }
    let metrics = api.run(&["metrics"])?;
    let wanted = format!("guest=\"{GUEST}\"");
    let has = |family: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with(family) && l.contains(&wanted) && !l.trim_end().ends_with(" 0"))
    };
    for family in ["keel_guest_disk_bytes", "keel_guest_net_bytes"] {
        if !has(family) {
            return Err(format!("`keelctl metrics` has no non-zero {family} for {GUEST}"));
        }
    }
    Ok(())
}

/// The config `keelctl apply` installs: ci.yaml plus a second NAT bridge with DHCP and a
/// second guest on it (so the apply must start that bridge's DHCP server).
fn config_with_second_guest(work: &Path) -> Result<PathBuf, String> {
    let base = std::fs::read_to_string(repo_file("configs/ci.yaml")).map_err(|e| format!("ci.yaml: {e}"))?;
    let storage = base
        .find("\nstorage:")
        .ok_or("configs/ci.yaml has no top-level `storage:` to insert a bridge before")?;
    let bridge = "    - name: br-two\n      mode: nat\n      address: 10.124.0.1/24\n      dhcp:\n        \
                  range: 10.124.0.100-10.124.0.150\n";
    let base = format!("{}\n{bridge}{}", base[..storage].trim_end(), &base[storage..]);
    let marker = "\nupdate:";
    let at = base
        .find(marker)
        .ok_or("configs/ci.yaml has no top-level `update:` to insert the second guest before")?;
    let second = format!(
        "  - name: {SECOND}\n    vcpus: 1\n    memory: 96MiB\n    kernel: default\n    initrd: default\n    \
         cmdline: \"quiet\"\n    nics:\n      - bridge: br-two\n    restart:\n      policy: never\n"
    );
    let text = format!("{}\n{second}{}", base[..at].trim_end(), &base[at..]);
    let path = work.join("ci-two-guests.yaml");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn run() -> Result<bool, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let token = "e2e-token-0123456789abcdef";
    let token_file = work.path().join("api-token");
    std::fs::write(&token_file, format!("{token}\n")).map_err(|e| e.to_string())?;
    // The default command line plus a word the kernel does not know and hands to init as
    // an argument: keel-init must log it, not exit (which panics the kernel).
    let image = appliance::build_image("e2e_image", work.path(), &token_file, UNKNOWN_KERNEL_WORD)?;
    let two_guests = config_with_second_guest(work.path())?;
    let port = free_port()?;
    let api = Keelctl {
        suite: "e2e_image",
        binary: env_path("KEEL_E2E_BIN_DIR")?.join("keelctl"),
        url: format!("http://127.0.0.1:{port}"),
        token: token.to_string(),
    };
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
    let boot1_stages = [
        "boot 1: keel-init started as PID 1",
        "boot 1: keel-init logs the kernel word it was passed (nokaslr) and goes on",
        "boot 1: /dev/kvm ready",
        "boot 1: VLAN 30 of the uplink (eth0.30) joins bridge br-vlan",
        "boot 1: guest marker through the [guest] relay",
        "boot 1: guest DHCP lease and ping through the NAT bridge, file written to its volume",
        "boot 1: keelctl list through the forwarded API",
        "boot 1: keelctl status and metrics show the guest's disk and network traffic",
        "boot 1: keelctl apply adds a NAT bridge and a second guest on it, which starts and gets a DHCP lease there",
        "boot 1: keelctl stop, then start, of the first guest",
        RESET_STAGE,
        "boot 1: keelctl stop of both guests",
        "boot 1: idle appliance powers off cleanly",
    ];
    let boot2_stages = [
        "boot 2: KEEL-DATA's partition and filesystem grow to the bigger disk",
        "boot 2: the volume kept the file the guest wrote across the appliance reboot",
        "boot 2: the applied config is in force (second guest up)",
        "boot 2: keelctl stop of both guests",
        "boot 2: idle appliance powers off cleanly",
    ];
    let not_reached =
        |from: usize| -> Vec<&str> { boot1_stages[from..].iter().chain(&boot2_stages).copied().collect() };
    if !report.check("keel-image inspect verifies the image", verified) {
        report.skipped_as_failed(&not_reached(0));
        return Ok(report.finish());
    }

    // Boot 1.
    let mut console = boot(&image, port)?;
    let mut times = Vec::new();
    let passed_word = format!("kernel command-line words passed to init (ignored): {UNKNOWN_KERNEL_WORD}");
    let markers: [(&str, &str, u64); 6] = [
        (boot1_stages[0], "keel-init started as PID 1", 180),
        (boot1_stages[1], &passed_word, 30),
        (boot1_stages[2], "/dev/kvm ready", 60),
        (boot1_stages[3], "bridged, port eth0.30", 60),
        (boot1_stages[4], "keel-guest: ci-guest is up", 180),
        (boot1_stages[5], "keel-guest: ping 10.123.0.1 ok", 120),
    ];
    for (i, (stage, needle, timeout)) in markers.into_iter().enumerate() {
        let result = if needle.contains("keel-guest") {
            guest_line(&mut console, GUEST, needle, timeout)
        } else {
            console.expect(needle, &FATAL, Duration::from_secs(timeout))
        };
        times.push(console.elapsed());
        if report.stage(&console, stage, result).is_none() {
            report.skipped_as_failed(&not_reached(i + 1));
            return Ok(report.finish());
        }
    }
    let ms = |d: Duration| d.as_millis();
    println!(
        "e2e: firmware_to_init_ms={} init_to_kvm_ms={} kvm_to_guest_ms={} total_ms={}",
        ms(times[0]),
        ms(times[2] - times[0]),
        ms(times[4] - times[2]),
        ms(times[4])
    );

    let listed = api.wait_until("ci-guest running in `keelctl list`", Duration::from_secs(60), |s| {
        state_of(s, GUEST) == Some("running")
    });
    if report.stage(&console, boot1_stages[6], listed).is_none() {
        report.skipped_as_failed(&not_reached(7));
        return Ok(report.finish());
    }

    let traffic = device_traffic(&api).map_err(StageFailure);
    if report.stage(&console, boot1_stages[7], traffic).is_none() {
        report.skipped_as_failed(&not_reached(8));
        return Ok(report.finish());
    }

    let applied = api
        .run(&["apply", &two_guests.display().to_string()])
        .map_err(StageFailure)
        .and_then(|_| guest_line(&mut console, SECOND, "keel-guest: ci-guest2 is up", 180))
        .and_then(|_| guest_line(&mut console, SECOND, "keel-guest: eth0 10.124.0.", 120))
        .and_then(|_| {
            api.wait_until("both guests running", Duration::from_secs(30), |s| {
                state_of(s, GUEST) == Some("running") && state_of(s, SECOND) == Some("running")
            })
        });
    if report.stage(&console, boot1_stages[8], applied).is_none() {
        report.skipped_as_failed(&not_reached(9));
        return Ok(report.finish());
    }

    // The guest's record in its volume: boot=1 was written above; a restarted guest reads it.
    let restarted = api
        .run(&["stop", GUEST])
        .map_err(StageFailure)
        .and_then(|_| {
            api.wait_until("ci-guest stopped", Duration::from_secs(60), |s| {
                state_of(s, GUEST) == Some("stopped") && state_of(s, SECOND) == Some("running")
            })
        })
        .and_then(|_| api.run(&["start", GUEST]).map_err(StageFailure))
        .and_then(|_| {
            guest_line(
                &mut console,
                GUEST,
                "keel-guest: disk: previous record: keel-selftest boot=1",
                180,
            )
        });
    if report.stage(&console, boot1_stages[9], restarted).is_none() {
        report.skipped_as_failed(&not_reached(10));
        return Ok(report.finish());
    }
    // The restarted guest writes boot=2; wait for that before stopping it.
    let wrote = guest_line(&mut console, GUEST, "keel-guest: selftest done", 120);
    if report
        .stage(&console, "boot 1: restarted guest finished its self-test", wrote)
        .is_none()
    {
        report.skipped_as_failed(&not_reached(10));
        return Ok(report.finish());
    }
    let resets = reset_loop(&mut console, &api);
    if report.stage(&console, RESET_STAGE, resets).is_none() {
        report.skipped_as_failed(&not_reached(11));
        return Ok(report.finish());
    }
    if !stop_all_and_power_off(&mut report, &mut console, &api, "boot 1") {
        report.skipped_as_failed(&boot2_stages);
        return Ok(report.finish());
    }
    drop(console);

    // Boot 2: the same disk, 1 GiB larger.
    let grown_to = std::fs::metadata(&image).map_err(|e| e.to_string())?.len() + (1 << 30);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(grown_to))
        .map_err(|e| format!("{}: cannot grow: {e}", image.display()))?;
    let mut console = boot(&image, port)?;
    let grown = console
        .expect("partition grown from", &FATAL, Duration::from_secs(300))
        .and_then(|_| console.expect("filesystem grown from", &FATAL, Duration::from_secs(120)));
    if report.stage(&console, boot2_stages[0], grown).is_none() {
        report.skipped_as_failed(&boot2_stages[1..]);
        return Ok(report.finish());
    }
    let kept = guest_line(
        &mut console,
        GUEST,
        "keel-guest: disk: previous record: keel-selftest boot=2",
        300,
    );
    if report.stage(&console, boot2_stages[1], kept).is_none() {
        report.skipped_as_failed(&boot2_stages[2..]);
        return Ok(report.finish());
    }
    let second_up = api.wait_until("both guests running after the reboot", Duration::from_secs(120), |s| {
        state_of(s, GUEST) == Some("running") && state_of(s, SECOND) == Some("running")
    });
    if report.stage(&console, boot2_stages[2], second_up).is_none() {
        report.skipped_as_failed(&boot2_stages[3..]);
        return Ok(report.finish());
    }
    stop_all_and_power_off(&mut report, &mut console, &api, "boot 2");
    Ok(report.finish())
}

fn main() -> ExitCode {
    console::exit_code("e2e_image", run())
}
