//! The control API through keelctl against keel-init in test mode: config apply
//! (dry run, invalid, real), root-only socket, metrics.

mod supervisor_support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use supervisor_support::*;

const CONFIG: &str = "\
version: 1
storage:
  pools:
    - name: images
guests:
  - name: alpha
    memory: 32MiB
    kernel: images/counter.elf
  - name: beta
    memory: 32MiB
    kernel: images/counter.elf
    autostart: false
";

fn start() -> Appliance {
    let app = Appliance::start(CONFIG, &[("counter.elf", elf_kernel(&counter_guest()))]);
    app.wait_status("alpha", Duration::from_secs(10), |s| state(s) == "running");
    app
}

fn write(app: &Appliance, name: &str, text: &str) -> String {
    let p = app.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn apply_plans_rejects_invalid_configs_and_reconciles() {
    if !require_kvm_and_root() {
        return;
    }
    let app = start();
    let stored = || std::fs::read_to_string(app.path("run/keel/config/keel.yaml")).unwrap();
    assert_eq!(stored(), CONFIG);

    // alpha grows (restart), beta goes (remove), gamma comes (start), policy-only
    // change on delta is not needed: the plan is what matters.
    let next = "\
version: 1
storage:
  pools:
    - name: images
guests:
  - name: alpha
    memory: 48MiB
    kernel: images/counter.elf
  - name: gamma
    memory: 32MiB
    kernel: images/counter.elf
";
    let next_file = write(&app, "next.yaml", next);
    let plan = app.ok(&["apply", &next_file, "--dry-run"]);
    let line = |name: &str| {
        plan.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no plan line for {name}:\n{plan}"))
            .to_string()
    };
    assert!(
        line("alpha").starts_with("~ alpha") && line("alpha").contains("restart"),
        "{plan}"
    );
    assert!(line("alpha").contains("memory: 32MiB -> 48MiB"), "{plan}");
    assert!(
        line("gamma").starts_with("+ gamma") && line("gamma").contains("start"),
        "{plan}"
    );
    assert!(
        line("beta").starts_with("- beta") && line("beta").contains("remove"),
        "{plan}"
    );
    assert!(plan.contains("dry run: nothing was changed"), "{plan}");
    // JSON plan, and `diff` says it differs (exit 7).
    let json: serde_json::Value = serde_json::from_str(&app.ok(&["--json", "apply", &next_file, "--dry-run"])).unwrap();
    assert_eq!(json["applied"], false);
    assert_eq!(json["plan"]["guests"][0]["action"], "restart");
    let diff = app.keelctl(&["diff", &next_file]);
    assert_eq!(diff.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&diff.stdout).contains("memory: 32MiB -> 48MiB"));
    // Nothing changed.
    assert_eq!(stored(), CONFIG);
    assert_eq!(state(&app.status("alpha")), "running");
    assert!(!app.ok(&["list"]).contains("gamma"));

    // An invalid config is refused with its positions, exit code 6, and nothing changes.
    let bad = write(
        &app,
        "bad.yaml",
        &next.replace("memory: 48MiB", "memory: 48MiB\n    vcpus: 0"),
    );
    let out = app.keelctl(&["apply", &bad]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:8:") && err.contains("vcpus"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(stored(), CONFIG);
    assert!(!app.path("run/keel/config/keel.yaml.prev").exists());
    let alpha = app.status("alpha");
    assert_eq!((state(&alpha), alpha["memory"].as_str()), ("running", Some("32MiB")));

    // A config built to exhaust memory (10^9 values once its aliases are expanded)
    // is refused the same way, quickly, and keel-init stays responsive.
    let mut bomb = String::from("version: 1\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let bomb_file = write(&app, "bomb.yaml", &bomb);
    let t = std::time::Instant::now();
    let out = app.keelctl(&["apply", &bomb_file]);
    println!("alias bomb refused in {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bomb.yaml:") && err.contains("once aliases are expanded"),
        "{err}"
    );
    assert_eq!(stored(), CONFIG);
    assert!(app.ok(&["list"]).contains("alpha"));

    // A real apply of a config that only adds and removes (no slow graceful
    // restarts): gamma starts, beta is forgotten, alpha is untouched.
    let add_only = next.replace("memory: 48MiB", "memory: 32MiB");
    let add_file = write(&app, "add.yaml", &add_only);
    let pid_before = app.status("alpha")["pid"].as_i64();
    let out = app.ok(&["apply", &add_file]);
    assert!(out.contains("+ gamma"), "{out}");
    assert!(out.contains("  alpha") && out.contains("unchanged"), "{out}");
    assert_eq!(
        app.status("alpha")["pid"].as_i64(),
        pid_before,
        "an unchanged guest must not be touched"
    );
    app.wait_status("gamma", Duration::from_secs(10), |s| state(s) == "running");
    assert_eq!(app.keelctl(&["status", "beta"]).status.code(), Some(4));
    assert_eq!(stored(), add_only);
    assert_eq!(
        std::fs::read_to_string(app.path("run/keel/config/keel.yaml.prev")).unwrap(),
        CONFIG
    );
    // Applying the same file again is a no-op.
    let again = app.ok(&["diff", &add_file]);
    assert!(again.contains("no changes"), "{again}");

    // A changed guest is restarted with its new settings (graceful stop, killed
    // at the short deadline since the tiny guest ignores the button).
    let grow = write(&app, "grow.yaml", next);
    let out = app.ok(&["apply", &grow, "--stop-timeout", "0.3"]);
    assert!(out.contains("~ alpha") && out.contains("restart"), "{out}");
    let alpha = app.status("alpha");
    assert_eq!((state(&alpha), alpha["memory"].as_str()), ("running", Some("48MiB")));
    assert_ne!(alpha["pid"].as_i64(), pid_before, "a changed guest must get a new VMM");
    assert_eq!(app.status("gamma")["restarts"].as_u64(), Some(0), "gamma is unchanged");
}

#[test]
fn the_api_socket_refuses_non_root_clients() {
    if !require_kvm_and_root() {
        return;
    }
    let app = Appliance::start(CONFIG, &[("counter.elf", elf_kernel(&counter_guest()))]);
    let mode = std::fs::metadata(&app.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket must be root-only");
    // A copy of keelctl that nobody can execute wherever the build tree lives.
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let keelctl = bin_dir.path().join("keelctl");
    std::fs::copy(keelctl_bin(), &keelctl).unwrap();
    std::fs::set_permissions(&keelctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = || {
        Command::new(&keelctl)
            .arg("--socket")
            .arg(&app.socket)
            .arg("list")
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run keelctl as nobody")
    };
    // The file mode stops nobody at connect()...
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // ...and with the mode opened up, SO_PEERCRED still refuses a non-root peer.
    // The temp root must be traversable for that.
    for dir in [app.root.path().to_path_buf(), app.path("run"), app.path("run/keel")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&app.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("accepts only root") && err.contains("65534"), "{err}");
    // Root still gets in.
    assert!(app.ok(&["list"]).contains("alpha"));
}

#[test]
fn metrics_parse_as_prometheus_text() {
    if !require_kvm_and_root() {
        return;
    }
    let app = start();
    std::thread::sleep(Duration::from_millis(200));
    let text = app.ok(&["metrics"]);
    let lines: Vec<Result<String, std::io::Error>> = text.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("valid Prometheus text");
    let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {metric} {labels:?} in:\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("unexpected value {other:?}"),
        }
    };
    assert_eq!(
        value("keel_guest_state", &[("guest", "alpha"), ("state", "running")]),
        1.0
    );
    assert_eq!(
        value("keel_guest_state", &[("guest", "alpha"), ("state", "stopped")]),
        0.0
    );
    assert_eq!(
        value("keel_guest_state", &[("guest", "beta"), ("state", "defined")]),
        1.0
    );
    assert!(value("keel_guest_vcpu_seconds_total", &[("guest", "alpha"), ("vcpu", "0")]) > 0.0);
    assert!(value("keel_guest_memory_rss_bytes", &[("guest", "alpha")]) > 0.0);
    assert!(value("keel_guest_console_bytes_total", &[("guest", "alpha")]) > 0.0);
    assert!(value("keel_host_memory_total_bytes", &[]) > 0.0);
    assert!(value("keel_host_cpu_seconds_total", &[("mode", "idle")]) > 0.0);
    assert!(value("keel_pool_available_bytes", &[("pool", "images")]) > 0.0);
    // host info as JSON.
    let host: serde_json::Value = serde_json::from_str(&app.ok(&["--json", "host"])).unwrap();
    assert!(host["memory_total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(host["pools"][0]["name"], "images");
}

#[test]
fn the_tcp_listener_wants_the_bearer_token_and_streams_logs() {
    if !require_kvm_and_root() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = CONFIG.replace(
        "version: 1\n",
        &format!("version: 1\nhost: {{api: {{listen: 127.0.0.1:{port}}}}}\n"),
    );
    let token = "0123456789abcdef-test-token";
    let app = Appliance::start_with(
        &config,
        &[("counter.elf", elf_kernel(&counter_guest()))],
        &[("run/keel/config/api-token", token.as_bytes())],
    );
    app.wait_status("alpha", Duration::from_secs(10), |s| state(s) == "running");
    let url = format!("http://127.0.0.1:{port}");
    let tcp = |token: &str, args: &[&str]| {
        Command::new(keelctl_bin())
            .args(["--host", &url, "--token", token])
            .args(args)
            .output()
            .unwrap()
    };
    let ok = tcp(token, &["list"]);
    assert!(ok.status.success(), "{ok:?}\n{}", app.log());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("alpha"));
    let wrong = tcp("not-the-token-at-all", &["list"]);
    assert_eq!(wrong.status.code(), Some(3), "{wrong:?}");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("bearer token"));

    // `logs -f` over TCP keeps streaming: more arrives than the tail it starts with.
    let tail_len = tcp(token, &["logs", "-n", "1", "alpha"]).stdout.len();
    let want = tail_len + 30;
    let mut follow = Command::new(keelctl_bin())
        .args(["--host", &url, "--token", token, "logs", "-f", "-n", "1", "alpha"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let mut seen = 0usize;
    let mut buf = [0u8; 512];
    let start = std::time::Instant::now();
    while seen < want && start.elapsed() < Duration::from_secs(10) {
        use std::io::Read;
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen += n,
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen >= want,
        "logs -f streamed {seen} bytes, the tail alone was {tail_len}"
    );
}
