//! End-to-end: over-the-air updates (issue 8), on a real image in QEMU (OVMF → systemd-boot
//! 252 → UKI → keel-init), driven through the TCP control API with the static keelctl.
//!
//! 1. keygen; configs/ci.yaml with the public key under `update.trusted_keys` (validated);
//!    v1 built with `--firmware-reset-on-exit` (startup.nsh) and booted without `-snapshot`,
//!    so every later boot is the same disk.
//! 2. `keelctl update v2.keel --reboot` → 0.2.0 boots as a trial (`+2-1`, keel-init reads
//!    `LoaderBootCountPath`), is blessed a health window after its guest started, 0.1.0
//!    stays as the previous version.
//! 3. 0.3.0 whose kernel panics (`rdinit=` names nothing, `panic=1`): three tries, each
//!    ending QEMU (`-no-reboot`), then systemd-boot boots 0.2.0 by itself; 0.3.0 is out of
//!    tries and pruned once 0.2.0 is healthy.
//! 4. 0.4.0 whose UKI systemd-boot cannot start (not a kernel): systemd-boot spends a try
//!    and exits to the firmware; the image's startup.nsh (`reset`) makes OVMF's shell reset,
//!    three times, then 0.2.0 boots by itself.
//! 5. Power cuts: `keelctl update` of a newer bundle, QEMU SIGKILLed at a random point
//!    (seeded; `KEEL_E2E_SEED` repeats a run), `keel-image inspect` (every keel-*.efi on the
//!    ESP matches its record), boot: the version that boots reaches a blessed state and its
//!    guest comes up. `KEEL_E2E_POWER_CUTS` sets the number of runs (default 10).
//!
//! `keel-image run` passes `-no-reboot`, so every reboot ends QEMU and the test starts it
//! again on the same image. Run by `ci/e2e` (`test = false`), which passes
//! KEEL_E2E_HOST_KERNEL, KEEL_E2E_HOST_MODULES, KEEL_E2E_GUEST_KERNEL and KEEL_E2E_BIN_DIR
//! (static keel-init, keel-vmm, keelctl). Prints one `e2e_update: PASS|FAIL` line per
//! stage, the time of each, and `e2e_update: N passed, N failed` last.

#[path = "e2e_support/console.rs"]
mod console;
#[path = "e2e_support/env.rs"]
mod env;
#[path = "e2e_support/run.rs"]
mod run;

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use console::{Console, Report, StageFailure};
use env::{env_path, free_port};
use run::{run_timeout, wait_output};
use serde_json::Value;

const NAME: &str = "e2e_update";
/// The guest of configs/ci.yaml and what it prints through the relay once booted.
const GUEST_UP: &str = "keel-guest: ci-guest is up";
const GUEST_RELAY: &str = "[guest ci-guest]";
const TOKEN: &str = "e2e-update-token-8d41c07a9b2e";
const PID1: &str = "keel-init started as PID 1 (Keel ";
/// keel-init's line when the health check starts: says whether systemd-boot counted the boot.
const HEALTH_ARMED: &str = "boot health check armed";
/// The fallback keel-init uses when it cannot read LoaderBootCountPath (no efivarfs).
const NO_BOOT_COUNT_PATH: &str = "booted without systemd-boot?";
/// Lines that end any stage that expects a working boot.
const FATAL: &[&str] = &[
    "Kernel panic",
    "keel-init: internal error",
    "keel-init is in emergency mode",
    // keel-init's start deadline and its stuck-VMM report (issue 11): never expected.
    "did not report the guest running",
    "stuck in the kernel",
];
/// Tries systemd-boot gives a fresh install (`+3`).
const TRIES: usize = 3;
const HEALTH_WINDOW: Duration = Duration::from_secs(10);
/// 0.3.0: the real kernel, told to run an init that does not exist: it panics and, with
/// `panic=1`, reboots a second later. `loglevel=6`: the command line (a notice) shows on
/// the console, the bulk of the boot log (info) does not.
const PANIC_CMDLINE: &str = "console=ttyS0,115200 panic=1 loglevel=6 rdinit=/keel-missing";

/// The keel-image this suite runs: a copy taken at start (see `main`), so a build in a
/// shared target directory cannot swap the binary during the ~15 minutes of the suite.
static KEEL_IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn keel_image() -> Command {
    Command::new(
        KEEL_IMAGE
            .get()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new(env!("CARGO_BIN_EXE_keel-image"))),
    )
}

fn fail(msg: impl Into<String>) -> StageFailure {
    StageFailure(msg.into())
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

/// splitmix64: a tiny seeded generator, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One entry of `keelctl host --json`'s `boot_slots`.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    file: String,
    version: String,
    state: String,
    tries_left: Option<u64>,
    tries_done: Option<u64>,
    running: bool,
}

fn slots(host: &Value) -> Vec<Slot> {
    host["boot_slots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| Slot {
                    file: s["file"].as_str().unwrap_or_default().to_owned(),
                    version: s["version"].as_str().unwrap_or_default().to_owned(),
                    state: s["state"].as_str().unwrap_or_default().to_owned(),
                    tries_left: s["tries_left"].as_u64(),
                    tries_done: s["tries_done"].as_u64(),
                    running: s["running"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `running 0.2.0: keel-0.2.0+2-1.efi on-trial*, keel-0.1.0.efi blessed` (`*`: running).
fn describe(host: &Value) -> String {
    let list: Vec<String> = slots(host)
        .iter()
        .map(|s| format!("{} {}{}", s.file, s.state, if s.running { "*" } else { "" }))
        .collect();
    format!(
        "running {}: {}",
        host["os_version"].as_str().unwrap_or("?"),
        list.join(", ")
    )
}

/// The appliance runs `version` and its entry is blessed (`keel-<version>.efi`).
fn running_blessed(host: &Value, version: &str) -> Result<(), String> {
    if host["os_version"].as_str() != Some(version) {
        return Err(format!("not running {version} ({})", describe(host)));
    }
    let blessed = format!("keel-{version}.efi");
    if slots(host)
        .iter()
        .any(|s| s.file == blessed && s.state == "blessed" && s.running)
    {
        Ok(())
    } else {
        Err(format!("{blessed} is not blessed and running ({})", describe(host)))
    }
}

fn files(host: &Value) -> Vec<String> {
    slots(host).into_iter().map(|s| s.file).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Images,
    BootV1,
    UpdateV2,
    TrialV2,
    BlessV2,
    UpdateV3,
    RollbackV3,
    BackOnV2,
    UpdateV4,
    FirmwareExitV4,
    PowerCut(usize, usize),
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::Images => "keygen, ci.yaml + trusted key validates, images and bundles built and verified, startup.nsh only on the test image".into(),
            Step::BootV1 => "0.1.0 boots (efivarfs mounted, not a trial); API: 0.1.0 running and blessed".into(),
            Step::UpdateV2 => "keelctl update v2.keel --reboot: installed as keel-0.2.0+3.efi, the appliance reboots".into(),
            Step::TrialV2 => "0.2.0 boots as a trial: systemd-boot counted it (+2-1), keel-init sees LoaderBootCountPath".into(),
            Step::BlessV2 => "0.2.0 is blessed a health window after its guest started; 0.1.0 kept as previous".into(),
            Step::UpdateV3 => "keelctl update v3.keel --reboot (a kernel that panics): installed as keel-0.3.0+3.efi".into(),
            Step::RollbackV3 => "0.3.0 panics on each of its 3 tries, then systemd-boot boots 0.2.0 by itself".into(),
            Step::BackOnV2 => "back on 0.2.0: 0.3.0 shown out of tries (+0-3), pruned once 0.2.0 is healthy; guest up".into(),
            Step::UpdateV4 => "keelctl update v4.keel --reboot (a UKI systemd-boot cannot start): installed as keel-0.4.0+3.efi".into(),
            Step::FirmwareExitV4 => "0.4.0: systemd-boot exits to the firmware on each of 3 tries, startup.nsh resets, then 0.2.0 boots blessed with 0.4.0 pruned".into(),
            Step::PowerCut(i, n) => format!("power cut {i}/{n}: QEMU killed during keelctl update; ESP consistent; next boot reaches a blessed version and its guest"),
        }
    }
}

/// The suite's state: inputs, the appliance disk, the QEMU running now.
struct Suite {
    report: Report,
    started: Instant,
    work: tempfile::TempDir,
    host_kernel: PathBuf,
    host_modules: PathBuf,
    guest_kernel: PathBuf,
    bin_dir: PathBuf,
    config: PathBuf,
    token_file: PathBuf,
    key: PathBuf,
    disk: PathBuf,
    console: Option<Console>,
    port: u16,
    boots: usize,
    /// The version the appliance runs (blessed) after the last stage.
    running: String,
    /// Seconds `keelctl update` of v2 took (upload, verify, write, rename): the window the
    /// power cuts fall in.
    update_secs: f64,
    rng: Rng,
    seed: u64,
    /// Power-cut targets: the next version to install (built when first needed).
    next_minor: u32,
    target: Option<(String, PathBuf)>,
    timings: Vec<(String, f64)>,
    cuts: Vec<String>,
}

impl Suite {
    fn new() -> Result<Self, String> {
        let host_kernel = env_path("KEEL_E2E_HOST_KERNEL")?;
        let host_modules = env_path("KEEL_E2E_HOST_MODULES")?;
        let guest_kernel = env_path("KEEL_E2E_GUEST_KERNEL")?;
        let bin_dir = env_path("KEEL_E2E_BIN_DIR")?;
        // Images are 4 GiB sparse files: keep them off a small /tmp.
        let work = tempfile::Builder::new()
            .prefix("keel-e2e-update-")
            .tempdir_in("/var/tmp")
            .map_err(|e| format!("tempdir in /var/tmp: {e}"))?;
        let seed = match std::env::var("KEEL_E2E_SEED") {
            Ok(s) => s.parse().map_err(|e| format!("KEEL_E2E_SEED={s}: {e}"))?,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        };
        let w = work.path().to_owned();
        let copy = w.join("keel-image");
        std::fs::copy(env!("CARGO_BIN_EXE_keel-image"), &copy).map_err(|e| format!("copying keel-image: {e}"))?;
        let _ = KEEL_IMAGE.set(copy);
        Ok(Self {
            report: Report::new(NAME),
            started: Instant::now(),
            host_kernel,
            host_modules,
            guest_kernel,
            bin_dir,
            config: w.join("keel.yaml"),
            token_file: w.join("api-token"),
            key: w.join("release"),
            disk: w.join("v1.img"),
            work,
            console: None,
            port: 0,
            boots: 0,
            running: String::new(),
            update_secs: 0.0,
            rng: Rng(seed),
            seed,
            next_minor: 5,
            target: None,
            timings: Vec::new(),
            cuts: Vec::new(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut s = self.key.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    }

    // ----- building -----

    /// `keel-image build` of the test config as `version` into `<name>.img`, with the
    /// host kernel unless `extra` names another `--kernel`.
    fn build(&self, name: &str, version: &str, extra: &[OsString]) -> Result<PathBuf, StageFailure> {
        let image = self.path(&format!("{name}.img"));
        let started = Instant::now();
        let mut cmd = keel_image();
        cmd.args(["build", "--version", version, "--config"])
            .arg(&self.config)
            .arg("--output")
            .arg(&image);
        if !extra.iter().any(|a| a == "--kernel") {
            cmd.arg("--kernel").arg(&self.host_kernel);
        }
        cmd.arg("--modules")
            .arg(&self.host_modules)
            .arg("--guest-kernel")
            .arg(&self.guest_kernel)
            .arg("--bin-dir")
            .arg(&self.bin_dir)
            .arg("--config-file")
            .arg(format!("api-token={}", self.token_file.display()))
            .args(extra);
        let out = run_timeout(cmd, Duration::from_secs(300)).map_err(fail)?;
        if !out.status.success() {
            return Err(fail(format!(
                "keel-image build {version} failed ({}): {}",
                out.status,
                output_text(&out)
            )));
        }
        println!(
            "{NAME}: built {} ({version}) in {:.1} s",
            image.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(image)
    }

    /// Bundles the UKI of `image` (then deletes the image), checks it with `keel-image verify`.
    fn bundle(&self, image: &Path, version: &str) -> Result<PathBuf, StageFailure> {
        let bundle = self.path(&format!("{version}.keel"));
        let mut cmd = keel_image();
        cmd.args(["bundle", "--image"])
            .arg(image)
            .arg("--key")
            .arg(self.with_suffix(".key"))
            .arg("-o")
            .arg(&bundle);
        let out = run_timeout(cmd, Duration::from_secs(120)).map_err(fail)?;
        if !out.status.success() {
            return Err(fail(format!("keel-image bundle {version}: {}", output_text(&out))));
        }
        if image != self.disk {
            let _ = std::fs::remove_file(image);
        }
        let mut cmd = keel_image();
        cmd.args(["verify", "--json"])
            .arg(&bundle)
            .arg("--key")
            .arg(self.with_suffix(".pub"));
        let out = run_timeout(cmd, Duration::from_secs(120)).map_err(fail)?;
        let manifest: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() || manifest["version"].as_str() != Some(version) {
            return Err(fail(format!(
                "keel-image verify {}: {}",
                bundle.display(),
                output_text(&out)
            )));
        }
        Ok(bundle)
    }

    fn images(&mut self) -> Result<(), StageFailure> {
        let mut cmd = keel_image();
        cmd.args(["keygen", "--output"]).arg(&self.key);
        let out = run_timeout(cmd, Duration::from_secs(30)).map_err(fail)?;
        if !out.status.success() {
            return Err(fail(format!("keel-image keygen: {}", output_text(&out))));
        }
        let public = std::fs::read_to_string(self.with_suffix(".pub"))
            .map_err(|e| fail(format!("reading the public key: {e}")))?;
        let manifest_dir =
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| fail("CARGO_MANIFEST_DIR is not set"))?);
        let ci = std::fs::read_to_string(manifest_dir.join("../configs/ci.yaml"))
            .map_err(|e| fail(format!("configs/ci.yaml: {e}")))?;
        let mut config = String::new();
        let mut added = false;
        for line in ci.lines() {
            config.push_str(line);
            config.push('\n');
            if line.trim_end() == "update:" {
                config.push_str(&format!("  trusted_keys: [\"{}\"]\n", public.trim()));
                added = true;
            }
        }
        if !added || !ci.contains("health_window: 10s") {
            return Err(fail(
                "configs/ci.yaml has no top-level `update:` section with `health_window: 10s`",
            ));
        }
        std::fs::write(&self.config, &config).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&self.token_file, TOKEN).map_err(|e| fail(e.to_string()))?;
        let mut cmd = keel_image();
        cmd.arg("validate").arg(&self.config);
        let out = run_timeout(cmd, Duration::from_secs(30)).map_err(fail)?;
        if !out.status.success() {
            return Err(fail(format!(
                "keel-image validate rejects ci.yaml with the key: {}",
                output_text(&out)
            )));
        }

        // v1: the appliance's disk, with startup.nsh. v2: a normal build, bundled.
        let v1 = self.build("v1", "0.1.0", &["--firmware-reset-on-exit".into()])?;
        assert_eq!(v1, self.disk);
        let v2 = self.build("v2", "0.2.0", &[])?;
        match (esp_file(&v1, "startup.nsh"), esp_file(&v2, "startup.nsh")) {
            (Ok(Some(script)), Ok(None)) if String::from_utf8_lossy(&script).trim() == "reset" => {}
            (a, b) => {
                return Err(fail(format!(
                    "startup.nsh: v1 (--firmware-reset-on-exit) has {a:?}, v2 has {b:?}; expected `reset` and none"
                )));
            }
        }
        self.bundle(&v2, "0.2.0")?;
        // v3 and v4 never reach an initramfs: a small stand-in keeps their UKIs small, so
        // each failing try is quick.
        let stand_in = self.path("not-an-initramfs");
        std::fs::write(&stand_in, b"keel e2e_update: not an initramfs\n").map_err(|e| fail(e.to_string()))?;
        let v3 = self.build(
            "v3",
            "0.3.0",
            &[
                "--cmdline".into(),
                PANIC_CMDLINE.into(),
                "--initramfs".into(),
                stand_in.clone().into(),
            ],
        )?;
        self.bundle(&v3, "0.3.0")?;
        // v4: "kernel" bytes the UKI stub cannot start.
        let not_a_kernel = self.path("not-a-kernel");
        let junk: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(&not_a_kernel, junk).map_err(|e| fail(e.to_string()))?;
        let mut extra: Vec<OsString> = vec!["--initramfs".into(), stand_in.into()];
        extra.extend(["--kernel".into(), not_a_kernel.into()]);
        let v4 = self.build("v4", "0.4.0", &extra)?;
        self.bundle(&v4, "0.4.0")?;
        Ok(())
    }

    // ----- QEMU and the API -----

    /// Starts `keel-image run` on the appliance disk with a fresh forwarded port.
    fn boot(&mut self) -> Result<(), StageFailure> {
        self.console = None; // a previous QEMU, if any, is gone
        self.port = free_port().map_err(fail)?;
        self.boots += 1;
        let mut cmd = keel_image();
        cmd.args(["run", "--accel", "tcg", "--memory", "2GiB", "--forward"])
            .arg(format!("{}:7070", self.port))
            .arg(&self.disk);
        println!(
            "{NAME}: boot #{} (QEMU start, API forwarded from 127.0.0.1:{}), suite t={:.1} s",
            self.boots,
            self.port,
            self.started.elapsed().as_secs_f64()
        );
        self.console = Some(Console::spawn(cmd).map_err(|e| fail(format!("keel-image run: {e}")))?);
        Ok(())
    }

    fn console(&mut self) -> Result<&mut Console, StageFailure> {
        self.console.as_mut().ok_or_else(|| fail("QEMU is not running"))
    }

    fn keelctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("keelctl"));
        cmd.arg("--host")
            .arg(format!("http://127.0.0.1:{}", self.port))
            .args(["--token", TOKEN])
            .args(args);
        cmd
    }

    /// Polls `keelctl host --json` (echoing the console in between) until `check` accepts
    /// the answer; fails after `timeout` with the last answer or error.
    fn wait_host(
        &mut self,
        what: &str,
        timeout: Duration,
        fatal: &[&str],
        check: impl Fn(&Value) -> Result<(), String>,
    ) -> Result<Value, StageFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match run_timeout(self.keelctl(&["--json", "host"]), Duration::from_secs(20)) {
                Ok(out) if out.status.success() => match serde_json::from_slice::<Value>(&out.stdout) {
                    Ok(host) => match check(&host) {
                        Ok(()) => {
                            println!("{NAME}: host: {}", describe(&host));
                            return Ok(host);
                        }
                        Err(e) => e,
                    },
                    Err(e) => format!("keelctl host --json: not JSON: {e}"),
                },
                Ok(out) => format!("keelctl host: {} {}", out.status, output_text(&out)),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "{what}: not within {} s; last: {last}",
                    timeout.as_secs()
                )));
            }
            self.console()?.watch(Duration::from_secs(1), fatal)?;
        }
    }

    /// Waits for keel-init and returns the version it reports.
    fn expect_pid1(&mut self, fatal: &[&str]) -> Result<String, StageFailure> {
        let line = self.console()?.expect(PID1, fatal, Duration::from_secs(180))?;
        Ok(pid1_version(&line))
    }

    fn expect_guest_up(&mut self) -> Result<(), StageFailure> {
        let line = self.console()?.expect(GUEST_UP, FATAL, Duration::from_secs(180))?;
        if !line.contains(GUEST_RELAY) {
            return Err(fail(format!(
                "guest marker without the {GUEST_RELAY} relay prefix: {line}"
            )));
        }
        Ok(())
    }

    /// `keelctl update BUNDLE --reboot`, then QEMU ends (the reboot, `-no-reboot`).
    fn update_and_reboot(&mut self, bundle: &str, version: &str) -> Result<f64, StageFailure> {
        let bundle = self.path(bundle);
        let started = Instant::now();
        let out = run_timeout(
            self.keelctl(&["update", &bundle.to_string_lossy(), "--reboot"]),
            Duration::from_secs(300),
        )
        .map_err(fail)?;
        let secs = started.elapsed().as_secs_f64();
        let text = output_text(&out);
        println!("{NAME}: keelctl update took {secs:.2} s: {text}");
        let file = format!("keel-{version}+3.efi");
        if !out.status.success() || !text.contains(&file) {
            return Err(fail(format!(
                "keelctl update ({}): {text}; expected {file}",
                out.status
            )));
        }
        let status = self.console()?.wait_exit(Duration::from_secs(120))?;
        if !status.success() {
            return Err(fail(format!("QEMU ended with {status} after the update's reboot")));
        }
        self.console = None;
        Ok(secs)
    }

    // ----- the stages -----

    fn boot_v1(&mut self) -> Result<(), StageFailure> {
        self.boot()?;
        let version = self.expect_pid1(FATAL)?;
        if version != "0.1.0" {
            return Err(fail(format!("keel-init reports {version}, expected 0.1.0")));
        }
        let c = self.console()?;
        c.expect("efivarfs mounted on", FATAL, Duration::from_secs(60))?;
        let armed = c.expect(HEALTH_ARMED, FATAL, Duration::from_secs(120))?;
        if !armed.contains("on_trial=false") {
            return Err(fail(format!(
                "the first boot of a built image is blessed, not a trial: {armed}"
            )));
        }
        self.expect_guest_up()?;
        let host = self.wait_host("0.1.0 running and blessed", Duration::from_secs(60), FATAL, |h| {
            running_blessed(h, "0.1.0")
        })?;
        if files(&host) != ["keel-0.1.0.efi"] {
            return Err(fail(format!("unexpected boot slots: {}", describe(&host))));
        }
        self.running = "0.1.0".into();
        Ok(())
    }

    fn update_v2(&mut self) -> Result<(), StageFailure> {
        self.update_secs = self.update_and_reboot("0.2.0.keel", "0.2.0")?;
        Ok(())
    }

    fn trial_v2(&mut self) -> Result<(), StageFailure> {
        self.boot()?;
        let fatal: Vec<&str> = FATAL.iter().copied().chain([NO_BOOT_COUNT_PATH]).collect();
        let version = self.expect_pid1(&fatal)?;
        if version != "0.2.0" {
            return Err(fail(format!("keel-init reports {version}, expected 0.2.0")));
        }
        let c = self.console()?;
        let armed = c.expect(HEALTH_ARMED, &fatal, Duration::from_secs(120))?;
        if !armed.contains("on_trial=true") {
            return Err(fail(format!(
                "keel-init does not see a trial boot (LoaderBootCountPath unread?): {armed}"
            )));
        }
        c.expect("control API listening on tcp", &fatal, Duration::from_secs(60))?;
        // Asked at once: the health window (10 s after the guest starts) is still open.
        let host = self.wait_host("0.2.0 on trial", Duration::from_secs(30), &fatal, |h| {
            if h["os_version"].as_str() != Some("0.2.0") {
                return Err(format!("not running 0.2.0 ({})", describe(h)));
            }
            Ok(())
        })?;
        let want = Slot {
            file: "keel-0.2.0+2-1.efi".into(),
            version: "0.2.0".into(),
            state: "on-trial".into(),
            tries_left: Some(2),
            tries_done: Some(1),
            running: true,
        };
        let all = slots(&host);
        if all.first() != Some(&want) || files(&host) != ["keel-0.2.0+2-1.efi", "keel-0.1.0.efi"] {
            return Err(fail(format!(
                "expected keel-0.2.0+2-1.efi (on trial, 2 left, 1 done, running) then keel-0.1.0.efi: {}",
                describe(&host)
            )));
        }
        Ok(())
    }

    fn bless_v2(&mut self) -> Result<(), StageFailure> {
        let fatal: Vec<&str> = FATAL.iter().copied().chain([NO_BOOT_COUNT_PATH]).collect();
        let c = self.console()?;
        let blessed = c.expect(
            "blessed EFI/Linux/keel-0.2.0+2-1.efi as EFI/Linux/keel-0.2.0.efi",
            &fatal,
            Duration::from_secs(120),
        )?;
        // keel-init's lines carry the kernel's uptime: the bless must come a health
        // window after the guest's keel-vmm started (health::GuestHealth::running_since).
        let started = c
            .seen("guest starting guest=\"ci-guest\"")
            .ok_or_else(|| fail("blessed, but keel-init never logged the guest's start"))?;
        let (Some(t0), Some(t1)) = (uptime(started), uptime(&blessed)) else {
            return Err(fail(format!("no uptime on {started:?} / {blessed:?}")));
        };
        if t1 - t0 < HEALTH_WINDOW.as_secs_f64() {
            return Err(fail(format!(
                "blessed {:.1} s after the guest's VMM started, inside the {} s health window",
                t1 - t0,
                HEALTH_WINDOW.as_secs()
            )));
        }
        println!("{NAME}: 0.2.0 blessed {:.1} s after its guest's VMM started", t1 - t0);
        let host = self.wait_host("0.2.0 blessed", Duration::from_secs(60), &fatal, |h| {
            running_blessed(h, "0.2.0")
        })?;
        if files(&host) != ["keel-0.2.0.efi", "keel-0.1.0.efi"] {
            return Err(fail(format!(
                "expected 0.2.0 and 0.1.0 (previous): {}",
                describe(&host)
            )));
        }
        if self.console()?.seen(GUEST_UP).is_none() {
            self.expect_guest_up()?;
        }
        self.running = "0.2.0".into();
        Ok(())
    }

    fn update_v3(&mut self) -> Result<(), StageFailure> {
        self.update_and_reboot("0.3.0.keel", "0.3.0").map(|_| ())
    }

    fn rollback_v3(&mut self) -> Result<(), StageFailure> {
        let mut panics = 0;
        for _ in 0..=TRIES + 1 {
            self.boot()?;
            let c = self.console()?;
            let (which, line) = c.expect_any(
                &["Kernel command line:", PID1],
                &["keel-init: internal error"],
                Duration::from_secs(180),
            )?;
            if which == 1 {
                let version = pid1_version(&line);
                if version != "0.2.0" {
                    return Err(fail(format!(
                        "after {panics} panics keel-init reports {version}, expected 0.2.0"
                    )));
                }
                if panics != TRIES {
                    return Err(fail(format!(
                        "0.2.0 booted after {panics} tries of 0.3.0, expected {TRIES}"
                    )));
                }
                return Ok(());
            }
            if !line.contains("rdinit=/keel-missing") {
                return Err(fail(format!("a kernel with another command line booted: {line}")));
            }
            c.expect("Kernel panic", &[PID1], Duration::from_secs(120))?;
            let status = c.wait_exit(Duration::from_secs(60))?;
            panics += 1;
            println!("{NAME}: 0.3.0 try {panics}: kernel panic, QEMU ended ({status})");
        }
        Err(fail(format!("0.2.0 did not come back within {} boots", TRIES + 2)))
    }

    /// After a failed version's last try: it shows as out of tries, then is pruned once
    /// the running version is healthy.
    fn back_on_v2(&mut self, failed: &str) -> Result<(), StageFailure> {
        self.console()?
            .expect("control API listening on tcp", FATAL, Duration::from_secs(120))?;
        let failed_file = format!("keel-{failed}+0-3.efi");
        let first = self.wait_host("the API", Duration::from_secs(30), FATAL, |_| Ok(()))?;
        let want = Slot {
            file: failed_file.clone(),
            version: failed.into(),
            state: "failed".into(),
            tries_left: Some(0),
            tries_done: Some(TRIES as u64),
            running: false,
        };
        if running_blessed(&first, "0.2.0").is_err() || !slots(&first).contains(&want) {
            return Err(fail(format!(
                "expected 0.2.0 blessed and running, {failed_file} failed: {}",
                describe(&first)
            )));
        }
        self.console()?.expect(
            &format!("pruned EFI/Linux/{failed_file} (failed)"),
            FATAL,
            Duration::from_secs(120),
        )?;
        self.wait_host(&format!("{failed} pruned"), Duration::from_secs(60), FATAL, |h| {
            running_blessed(h, "0.2.0")?;
            if files(h) == ["keel-0.2.0.efi", "keel-0.1.0.efi"] {
                Ok(())
            } else {
                Err(format!("expected only 0.2.0 and 0.1.0: {}", describe(h)))
            }
        })?;
        if self.console()?.seen(GUEST_UP).is_none() {
            self.expect_guest_up()?;
        }
        Ok(())
    }

    fn update_v4(&mut self) -> Result<(), StageFailure> {
        self.update_and_reboot("0.4.0.keel", "0.4.0").map(|_| ())
    }

    fn firmware_exit_v4(&mut self) -> Result<(), StageFailure> {
        let mut exits = 0;
        for _ in 0..=TRIES + 1 {
            self.boot()?;
            let c = self.console()?;
            let (which, line) = c.expect_any(&["startup.nsh", PID1], FATAL, Duration::from_secs(240))?;
            if which == 1 {
                let version = pid1_version(&line);
                if version != "0.2.0" || exits != TRIES {
                    return Err(fail(format!(
                        "keel-init {version} booted after {exits} firmware exits; expected 0.2.0 after {TRIES}"
                    )));
                }
                return self.back_on_v2("0.4.0");
            }
            if c.seen("Failed to execute Keel 0.4.0").is_none() {
                return Err(fail(format!(
                    "the UEFI shell ran startup.nsh, but systemd-boot did not report failing 0.4.0: {line}"
                )));
            }
            let status = c.wait_exit(Duration::from_secs(120))?;
            exits += 1;
            println!("{NAME}: 0.4.0 try {exits}: systemd-boot exited to the firmware, startup.nsh reset ({status})");
        }
        Err(fail(format!("0.2.0 did not come back within {} boots", TRIES + 2)))
    }

    /// The next power-cut target's bundle, built when first needed.
    fn target(&mut self) -> Result<(String, PathBuf), StageFailure> {
        if let Some(t) = &self.target {
            return Ok(t.clone());
        }
        let version = format!("0.{}.0", self.next_minor);
        self.next_minor += 1;
        let image = self.build("target", &version, &[])?;
        let bundle = self.bundle(&image, &version)?;
        self.target = Some((version.clone(), bundle.clone()));
        Ok((version, bundle))
    }

    fn power_cut(&mut self, run: usize) -> Result<(), StageFailure> {
        if self.console.is_none() {
            return Err(fail("no appliance running (an earlier stage failed)"));
        }
        let (target, bundle) = self.target()?;
        let from = self.running.clone();
        // Anywhere from before the first byte to a little after keelctl normally returns.
        let delay = Duration::from_secs_f64(self.rng.unit() * self.update_secs * 1.2);
        let mut cmd = self.keelctl(&["update", &bundle.to_string_lossy()]);
        let keelctl = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("keelctl: {e}")))?;
        let c = self.console()?;
        c.watch(delay, FATAL)?;
        let qemu = qemu_pid(c.pid()).ok_or_else(|| fail("cannot find QEMU under keel-image run"))?;
        // SAFETY: kill(2) on a process id we just read as QEMU, our grandchild.
        if unsafe { libc::kill(qemu as i32, libc::SIGKILL) } != 0 {
            return Err(fail(format!("kill -9 {qemu}: {}", std::io::Error::last_os_error())));
        }
        c.wait_exit(Duration::from_secs(30))?;
        self.console = None;
        let out = wait_output(keelctl, Duration::from_secs(60)).map_err(fail)?;
        let installed = out.status.success();
        let said = output_text(&out).lines().next().unwrap_or_default().to_owned();
        println!(
            "{NAME}: power cut {run}: seed {} kill -9 QEMU {} ms after keelctl update {target} started (window {:.0} ms); keelctl: {}",
            self.seed,
            delay.as_millis(),
            self.update_secs * 1200.0,
            if installed {
                format!("installed ({said})")
            } else {
                format!("failed: {said}")
            }
        );

        // Whatever the moment: every keel-*.efi on the ESP is whole, one is blessed.
        let mut cmd = keel_image();
        cmd.args(["inspect", "--json"]).arg(&self.disk);
        let out = run_timeout(cmd, Duration::from_secs(120)).map_err(fail)?;
        let inspection: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let versions = inspection["esp"]["versions"].as_array().cloned().unwrap_or_default();
        let listed: Vec<String> = versions
            .iter()
            .map(|v| {
                format!(
                    "{} ({})",
                    v["file"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!("{NAME}: power cut {run}: ESP after the cut: {}", listed.join(", "));
        if !out.status.success() {
            return Err(fail(format!(
                "keel-image inspect after the power cut ({}): {}",
                out.status, inspection["problems"]
            )));
        }
        if !versions
            .iter()
            .any(|v| v["state"] == "blessed" && v["verification"] == "verified")
        {
            return Err(fail(format!(
                "no verified blessed UKI on the ESP: {}",
                listed.join(", ")
            )));
        }
        let fresh = format!("EFI/Linux/keel-{target}+3.efi");
        let target_there = versions.iter().any(|v| v["file"] == fresh.as_str());
        if installed && !target_there {
            return Err(fail(format!(
                "keelctl reported {fresh} installed, but it is not on the ESP"
            )));
        }

        self.boot()?;
        let version = self.expect_pid1(FATAL)?;
        let expected = if target_there { &target } else { &from };
        if &version != expected {
            return Err(fail(format!(
                "keel-init reports {version}; the ESP {} {fresh}, so {expected} should boot",
                if target_there { "has" } else { "does not have" }
            )));
        }
        self.expect_guest_up()?;
        // A trial boot is blessed after the health window; a blessed one already is.
        self.wait_host(
            &format!("{version} running and blessed"),
            Duration::from_secs(120),
            FATAL,
            |h| running_blessed(h, &version),
        )?;
        self.cuts.push(format!(
            "{run}: {} ms, keelctl {}, booted {version}",
            delay.as_millis(),
            if installed { "done" } else { "cut" }
        ));
        if version == target {
            self.target = None;
        }
        self.running = version;
        Ok(())
    }

    fn run_step(&mut self, step: Step) -> Result<(), StageFailure> {
        match step {
            Step::Images => self.images(),
            Step::BootV1 => self.boot_v1(),
            Step::UpdateV2 => self.update_v2(),
            Step::TrialV2 => self.trial_v2(),
            Step::BlessV2 => self.bless_v2(),
            Step::UpdateV3 => self.update_v3(),
            Step::RollbackV3 => self.rollback_v3(),
            Step::BackOnV2 => self.back_on_v2("0.3.0"),
            Step::UpdateV4 => self.update_v4(),
            Step::FirmwareExitV4 => self.firmware_exit_v4(),
            Step::PowerCut(i, _) => self.power_cut(i),
        }
    }

    /// Runs the steps in order; after the first failure the rest count as failed.
    fn run(&mut self, steps: &[Step]) -> bool {
        for (i, step) in steps.iter().enumerate() {
            let name = step.name();
            let started = Instant::now();
            let result = self.run_step(*step);
            let secs = started.elapsed().as_secs_f64();
            if result.is_err()
                && let Some(c) = self.console.as_mut()
            {
                // Show what QEMU printed that no stage read yet (e.g. during a keelctl call).
                let _ = c.watch(Duration::ZERO, &[]);
            }
            let ok = match &self.console {
                Some(c) => self.report.stage(c, &name, result).is_some(),
                None => self.report.check(&name, result.map_err(|e| e.0)),
            };
            println!(
                "{NAME}: stage took {secs:.1} s (suite t={:.1} s)",
                self.started.elapsed().as_secs_f64()
            );
            self.timings.push((name, secs));
            if !ok {
                let rest: Vec<String> = steps[i + 1..].iter().map(Step::name).collect();
                let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                self.report.skipped_as_failed(&rest);
                break;
            }
        }
        self.console = None;
        println!("{NAME}: stage times:");
        for (name, secs) in &self.timings {
            println!("{NAME}:   {secs:6.1} s  {name}");
        }
        if !self.cuts.is_empty() {
            println!(
                "{NAME}: power cuts (seed {}, KEEL_E2E_SEED={} repeats them):",
                self.seed, self.seed
            );
            for c in &self.cuts {
                println!("{NAME}:   {c}");
            }
        }
        println!(
            "{NAME}: {} boots, suite time {:.1} s",
            self.boots,
            self.started.elapsed().as_secs_f64()
        );
        self.report.finish()
    }
}

/// The kernel uptime a keel-init log line starts with (`[   26.401770]  INFO ...`).
fn uptime(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

/// The version in keel-init's start line.
fn pid1_version(line: &str) -> String {
    line.split(PID1)
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_default()
        .to_owned()
}

/// QEMU's pid: the child of `keel-image run`.
fn qemu_pid(parent: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu-system"))
        })
}

/// A file at the root of an image's ESP: `Ok(None)` when it is not there.
fn esp_file(image: &Path, name: &str) -> Result<Option<Vec<u8>>, String> {
    use keel_image::gpt_layout::{self, PartitionReader};
    let open = || std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()));
    let f = open()?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let (_, parts) = gpt_layout::read_gpt(PartitionReader::new(f, 0, len)).map_err(|e| e.to_string())?;
    let esp = parts
        .iter()
        .find(|p| p.label == gpt_layout::ESP_LABEL)
        .ok_or("no ESP")?;
    let fs = fatfs::FileSystem::new(
        PartitionReader::new(open()?, esp.offset, esp.size),
        fatfs::FsOptions::new(),
    )
    .map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    match fs.root_dir().open_file(name) {
        Ok(mut f) => {
            f.read_to_end(&mut data).map_err(|e| e.to_string())?;
            Ok(Some(data))
        }
        Err(_) => Ok(None),
    }
}

fn main() -> ExitCode {
    let mut suite = match Suite::new() {
        Ok(s) => s,
        Err(e) => return console::exit_code(NAME, Err(e)),
    };
    // A value that does not parse is an error, not the default: a soak run (ci/soak) that
    // silently did 10 cuts would report far less than it claims.
    let cuts: usize = match std::env::var("KEEL_E2E_POWER_CUTS") {
        Err(_) => 10,
        Ok(n) => match n.parse() {
            Ok(n) => n,
            Err(e) => return console::exit_code(NAME, Err(format!("KEEL_E2E_POWER_CUTS={n}: {e}"))),
        },
    };
    let mut steps = vec![
        Step::Images,
        Step::BootV1,
        Step::UpdateV2,
        Step::TrialV2,
        Step::BlessV2,
        Step::UpdateV3,
        Step::RollbackV3,
        Step::BackOnV2,
        Step::UpdateV4,
        Step::FirmwareExitV4,
    ];
    steps.extend((1..=cuts).map(|i| Step::PowerCut(i, cuts)));
    println!(
        "{NAME}: work dir {}, power-cut seed {}",
        suite.work.path().display(),
        suite.seed
    );
    if suite.run(&steps) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
