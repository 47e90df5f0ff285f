//! keel-init in test mode supervising tiny guests on /dev/kvm, driven through
//! keelctl: lifecycle, pause/resume, restart backoff, console.

mod supervisor_support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use supervisor_support::*;

const COUNTER_CONFIG: &str = "\
version: 1
storage:
  pools:
    - name: images
guests:
  - name: counter
    memory: 32MiB
    kernel: images/counter.elf
    restart: {policy: never}
";

fn console_bytes(app: &Appliance) -> u64 {
    app.status("counter")["console_bytes"].as_u64().unwrap_or(0)
}

#[test]
fn start_stop_pause_and_resume_a_guest() {
    if !require_kvm_and_root() {
        return;
    }
    let app = Appliance::start(COUNTER_CONFIG, &[("counter.elf", elf_kernel(&counter_guest()))]);
    app.wait_status("counter", Duration::from_secs(10), |s| state(s) == "running");
    let list = app.ok(&["list"]);
    assert!(list.contains("counter") && list.contains("running"), "{list}");

    // It counts.
    let a = console_bytes(&app);
    std::thread::sleep(Duration::from_millis(400));
    let b = console_bytes(&app);
    assert!(b > a, "a running guest must produce output ({a} -> {b})");

    // Paused, it stops counting; its vCPUs use no more CPU time.
    assert!(app.ok(&["pause", "counter"]).contains("paused"));
    let detail = app.status("counter");
    assert_eq!(state(&detail), "paused");
    assert_eq!(detail["stats"]["paused"], true);
    std::thread::sleep(Duration::from_millis(100));
    let frozen = console_bytes(&app);
    let cpu_frozen = app.status("counter")["stats"]["vcpus"][0]["cpu_seconds"]
        .as_f64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(console_bytes(&app), frozen, "a paused guest must not count");
    let cpu_later = app.status("counter")["stats"]["vcpus"][0]["cpu_seconds"]
        .as_f64()
        .unwrap();
    assert!(
        cpu_later - cpu_frozen < 0.05,
        "paused vCPU burned CPU: {cpu_frozen} -> {cpu_later}"
    );

    // Pausing twice is refused with the wrong-state exit code.
    assert_eq!(app.keelctl(&["pause", "counter"]).status.code(), Some(5));

    // Resumed, it counts again.
    assert!(app.ok(&["resume", "counter"]).contains("running"));
    std::thread::sleep(Duration::from_millis(400));
    assert!(console_bytes(&app) > frozen, "a resumed guest must count again");

    // A graceful stop: the tiny guest ignores the power button, so it is killed
    // at the deadline and ends stopped.
    let t = Instant::now();
    assert!(app.ok(&["stop", "--timeout", "0.5", "counter"]).contains("stopped"));
    assert!(t.elapsed() < Duration::from_secs(8), "stop took {:?}", t.elapsed());
    let s = app.status("counter");
    assert_eq!(state(&s), "stopped");
    assert!(s["stats"].is_null(), "no VMM, no stats: {s}");

    // Started again by hand.
    assert!(app.ok(&["start", "counter"]).contains("running"));
    // Reset: a new VMM at once; reboot: graceful stop (killed at the deadline), then started.
    let pid = app.status("counter")["pid"].as_i64();
    assert!(app.ok(&["reset", "counter"]).contains("running"));
    let after_reset = app.status("counter");
    assert_ne!(after_reset["pid"].as_i64(), pid, "reset must replace the VMM");
    assert!(app.ok(&["reboot", "--timeout", "0.3", "counter"]).contains("running"));
    let after_reboot = app.status("counter");
    assert_ne!(after_reboot["pid"].as_i64(), after_reset["pid"].as_i64());
    assert_eq!(after_reboot["restarts"].as_u64(), Some(2));
    // Unknown guests are reported with their own exit code.
    let out = app.keelctl(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest named `nope`"));

    // Forced stop.
    assert!(app.ok(&["stop", "--force", "counter"]).contains("stopped"));
    // The console log file on the data partition has the output.
    let log = std::fs::read_to_string(app.path("var/lib/keel/logs/counter.log")).unwrap();
    assert!(log.starts_with("counting\n.."), "{log:.40}");
    // `logs` serves the same bytes; `-n 1` the last line of them.
    assert_eq!(app.ok(&["logs", "counter"]), log);
    let last = app.ok(&["logs", "counter", "-n", "1"]);
    assert!(
        log.ends_with(&last) && !last[..last.len().saturating_sub(1)].contains('\n'),
        "{last:?}"
    );
}

#[test]
fn a_triple_faulting_guest_is_restarted_with_growing_backoff() {
    if !require_kvm_and_root() {
        return;
    }
    let config = "\
version: 1
storage: {pools: [{name: images}]}
guests:
  - name: faulty
    memory: 32MiB
    kernel: images/faulty.elf
    restart: {policy: on-failure, backoff: 200ms, max_backoff: 10s, max_restarts: 20, window: 1m}
";
    let app = Appliance::start(config, &[("faulty.elf", elf_kernel(&triple_fault_guest()))]);
    // The largest `restart in` seen while in backoff, per restart count.
    let mut delays: Vec<f64> = Vec::new();
    let start = Instant::now();
    while delays.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "too few restarts: {delays:?}\n{}",
            app.log()
        );
        let s = app.status("faulty");
        if state(&s) == "backoff" {
            let restarts = s["restarts"].as_u64().unwrap() as usize;
            let wait = s["restart_in_secs"].as_f64().unwrap();
            assert!(s["reason"].as_str().unwrap().contains("guest rebooted"), "{s}");
            if restarts == delays.len() {
                delays.push(wait);
            } else if restarts + 1 == delays.len() {
                let last = delays.len() - 1;
                delays[last] = delays[last].max(wait);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // 200ms, 400ms, 800ms, 1.6s: each seen within one poll of its start.
    for (i, w) in delays.iter().enumerate() {
        let expected = 0.2 * f64::from(1u32 << i);
        assert!(
            *w <= expected + 0.01 && *w >= expected - 0.35,
            "backoff {i} was {w}s, expected about {expected}s: {delays:?}"
        );
    }
    assert!(delays.windows(2).all(|p| p[1] > p[0]), "backoff must grow: {delays:?}");
    // keelctl's table shows it too.
    let text = app.ok(&["status", "faulty"]);
    assert!(text.contains("Restarts:"), "{text}");
}

#[test]
fn console_shows_output_and_delivers_input() {
    if !require_kvm_and_root() {
        return;
    }
    let config = "\
version: 1
storage: {pools: [{name: images}]}
guests:
  - name: echo
    memory: 32MiB
    kernel: images/echo.elf
";
    let app = Appliance::start(config, &[("echo.elf", elf_kernel(&echo_guest()))]);
    app.wait_status("echo", Duration::from_secs(10), |s| {
        state(s) == "running" && s["console_bytes"].as_u64() >= Some(7)
    });
    let mut child = Command::new(keelctl_bin())
        .arg("--socket")
        .arg(&app.socket)
        .args(["console", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend(&buf[..n]);
                    if String::from_utf8_lossy(&seen).contains("got:k") {
                        break;
                    }
                }
            }
        }
        // Hand the pipe back: keelctl must be able to write until it detaches.
        (seen, stdout)
    });
    // The replayed history shows the prompt; then a key goes in and comes back.
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"k").unwrap();
    stdin.flush().unwrap();
    let (seen, _stdout) = reader.join().unwrap();
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert!(seen.contains("ready>"), "replay missing: {seen:?}");
    assert!(seen.contains("got:k"), "input not delivered: {seen:?}\n{}", app.log());
    // Ctrl-] detaches with success.
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "keelctl console did not detach"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    // The output is in the logs too.
    assert!(app.ok(&["logs", "echo"]).contains("got:k"));
}

#[test]
fn a_crash_loop_ends_in_crashed_until_started_by_hand() {
    if !require_kvm_and_root() {
        return;
    }
    let config = "\
version: 1
storage: {pools: [{name: images}]}
guests:
  - name: faulty
    memory: 32MiB
    kernel: images/faulty.elf
    restart: {policy: always, backoff: 50ms, max_backoff: 100ms, max_restarts: 2, window: 1m}
";
    let app = Appliance::start(config, &[("faulty.elf", elf_kernel(&triple_fault_guest()))]);
    let s = app.wait_status("faulty", Duration::from_secs(15), |s| state(s) == "crashed");
    assert!(s["reason"].as_str().unwrap().starts_with("crash loop"), "{s}");
    assert_eq!(s["restarts"].as_u64(), Some(2));
    let list = app.ok(&["list"]);
    assert!(list.contains("crashed") && list.contains("crash loop"), "{list}");
    // An operator's start forgives the history: it runs (and loops) again.
    let out = app.keelctl(&["start", "faulty"]);
    assert!(out.status.code() == Some(0) || out.status.code() == Some(1), "{out:?}");
    app.wait_status("faulty", Duration::from_secs(15), |s| s["restarts"].as_u64() >= Some(3));
}

/// A wrapper around keel-vmm that, the first time it runs, stops itself before
/// exec'ing keel-vmm: a VMM hung at start-up, as in issue 11. Later runs exec
/// keel-vmm at once.
fn hang_once_wrapper(root: &std::path::Path) -> std::path::PathBuf {
    let marker = root.join("hang-next-start");
    std::fs::write(&marker, b"").unwrap();
    let script = root.join("hanging-vmm");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e '{m}' ]; then rm '{m}'; echo 'about to hang' >&2; kill -STOP $$; fi\nexec '{vmm}' \"$@\"\n",
            m = marker.display(),
            vmm = vmm_bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_vmm_that_hangs_before_running_is_killed_logged_and_restarted() {
    if !require_kvm_and_root() {
        return;
    }
    let config = "\
version: 1
storage: {pools: [{name: images}]}
guests:
  - name: counter
    memory: 32MiB
    kernel: images/counter.elf
    start_timeout: 1s
    restart: {policy: on-failure, backoff: 2s, max_backoff: 2s, max_restarts: 5, window: 1m}
";
    let t = Instant::now();
    let app = Appliance::start_with_vmm(
        config,
        &[("counter.elf", elf_kernel(&counter_guest()))],
        &[],
        hang_once_wrapper,
    );
    // Killed at the start deadline, then in backoff with the reason shown.
    let s = app.wait_status("counter", Duration::from_secs(10), |s| state(s) == "backoff");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("did not report the guest running within 1s"),
        "{s:#}\n{}",
        app.log()
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "killed before its deadline");
    let text = app.ok(&["status", "counter"]);
    assert!(text.contains("did not report the guest running within 1s"), "{text}");
    // The log names the guest, has the VMM's last stderr line and its thread's
    // kernel stack (a stopped process: it sits in the signal-stop code).
    let log = app.log();
    assert!(log.contains("keel-vmm did not report the guest running"), "{log}");
    assert!(log.contains("counter"), "{log}");
    assert!(
        log.contains("keel-vmm said: ") && log.contains("about to hang"),
        "{log}"
    );
    assert!(log.contains("keel-vmm thread: "), "{log}");
    // The restart policy applies: the second VMM runs.
    let s = app.wait_status("counter", Duration::from_secs(15), |s| state(s) == "running");
    assert_eq!(s["restarts"].as_u64(), Some(1), "{s:#}");
}

#[test]
fn a_vmm_frozen_while_running_is_stopped_at_the_guests_stop_timeout() {
    if !require_kvm_and_root() {
        return;
    }
    let config = "\
version: 1
storage: {pools: [{name: images}]}
guests:
  - name: counter
    memory: 32MiB
    kernel: images/counter.elf
    stop_timeout: 1s
    restart: {policy: never}
";
    let app = Appliance::start(config, &[("counter.elf", elf_kernel(&counter_guest()))]);
    let s = app.wait_status("counter", Duration::from_secs(10), |s| state(s) == "running");
    let pid = s["pid"].as_i64().expect("a running guest has a pid") as i32;
    // Frozen: its control socket accepts connections but nothing answers.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    // No --timeout: the guest's own stop_timeout (1s) applies.
    assert!(app.ok(&["stop", "counter"]).contains("stopped"));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "stop took {took:?}"
    );
    let s = app.status("counter");
    assert_eq!(state(&s), "stopped", "{s:#}");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("did not stop in time"), "{s:#}");
    // Started again, it runs.
    assert!(app.ok(&["start", "counter"]).contains("running"));
}
