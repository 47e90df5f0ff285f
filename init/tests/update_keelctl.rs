//! `keelctl update` and `keelctl rollback` end to end: the keelctl binary talks to
//! the control API served on a unix socket (root-only, as on the appliance) whose
//! update agent installs on a temporary ESP. Bundles come from a file and from an
//! http:// URL served by the test.

#[path = "update_support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use keel_init::api::{ApiContext, serve_unix};
use keel_init::guest::vmm_command::Paths;
use keel_init::guest::{Prepared, Supervisor};
use keel_init::update::Agent;
use support::{Esp, key, make_bundle, payload, payload_offset};

/// Serves the control API with an update agent for `running` on `esp`.
async fn serve(esp: &Esp, running: &str) -> PathBuf {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: the API socket serves only uid 0 (run the tests as root, as CI does)"
    );
    let socket = esp.dir.path().join("api.sock");
    let ctx = Arc::new(ApiContext {
        sup: Arc::new(Mutex::new(Supervisor::new(Paths::default(), &[], false))),
        applied: Mutex::new(None),
        config_applied_at: Mutex::new(None),
        config_dir: esp.dir.path().join("config"),
        esp_dir: esp.root(),
        os_release: esp.dir.path().join("os-release"),
        data_root: esp.dir.path().join("data"),
        apply_lock: tokio::sync::Mutex::new(()),
        host_reconcile: Arc::new(|_| async { Vec::new() }.boxed()),
        prepare_guest: Arc::new(|_| async { Prepared::default() }.boxed()),
        update: Some(Arc::new(Agent::new(
            esp.root(),
            esp.efivars.clone(),
            running.into(),
            vec![key(1).verifying_key()],
        ))),
    });
    serve_unix(ctx, &socket).await.expect("serve the API");
    socket
}

async fn keelctl(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keelctl"));
    cmd.arg("--socket").arg(socket).args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run keelctl"))
        .await
        .expect("join")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A one-request HTTP/1.1 server for `body`; returns its URL.
fn http_once(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}/update.keel", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&body));
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelctl_updates_from_a_file_and_a_url_and_rolls_back() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi"]);
    let socket = serve(&esp, "1.0.0").await;

    let file = esp.dir.path().join("keel-1.1.0.keel");
    std::fs::write(&file, make_bundle(&key(1), "1.1.0", None, &payload(2_000_000, 1))).expect("bundle");
    let o = keelctl(&socket, &["update", file.to_str().expect("path")]).await;
    assert!(o.status.success(), "update from a file: {}", text(&o));
    assert!(
        text(&o).contains("installed Keel 1.1.0 as EFI/Linux/keel-1.1.0+3.efi"),
        "{}",
        text(&o)
    );
    assert_eq!(esp.names(), ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.1.0+3.efi"]);

    let uki = payload(3_000_000, 2);
    let url = http_once(make_bundle(&key(1), "1.2.0", None, &uki));
    let o = keelctl(&socket, &["--json", "update", &url]).await;
    assert!(o.status.success(), "update from a URL: {}", text(&o));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json answer");
    assert_eq!(answer["installed"]["version"], "1.2.0");
    assert_eq!(answer["rebooting"], false);
    assert_eq!(esp.names(), ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.2.0+3.efi"]);
    assert_eq!(std::fs::read(esp.linux().join("keel-1.2.0+3.efi")).expect("read"), uki);

    let o = keelctl(&socket, &["--json", "rollback"]).await;
    assert!(o.status.success(), "rollback: {}", text(&o));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json answer");
    assert_eq!(answer["rolled_back"]["to"], "0.9.0");
    assert_eq!(esp.boots_next(), "keel-0.9.0.efi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelctl_reports_a_refused_bundle_with_exit_code_8_and_nothing_changes() {
    let esp = Esp::new(&["keel-1.0.0.efi"]);
    let socket = serve(&esp, "1.0.0").await;
    let before = esp.snapshot();
    let good = make_bundle(&key(1), "1.1.0", None, &payload(1_500_000, 3));
    let mut tampered = good.clone();
    tampered[payload_offset(&good) + 1_000_000] ^= 0x40;
    let cases = [
        ("tampered", tampered, "does not match its signed manifest"),
        (
            "wrong key",
            make_bundle(&key(5), "1.1.0", None, &payload(1000, 4)),
            "signature does not match",
        ),
        (
            "downgrade",
            make_bundle(&key(1), "0.5.0", None, &payload(1000, 5)),
            "--allow-downgrade",
        ),
    ];
    for (what, bundle, expect) in cases {
        let file = esp.dir.path().join("bad.keel");
        std::fs::write(&file, bundle).expect("bundle");
        let o = keelctl(&socket, &["update", file.to_str().expect("path")]).await;
        assert_eq!(o.status.code(), Some(8), "{what}: {}", text(&o));
        assert!(text(&o).contains(expect), "{what}: {}", text(&o));
        assert_eq!(esp.snapshot(), before, "{what}: the ESP changed");
    }
    let o = keelctl(&socket, &["update", "/nonexistent/bundle.keel"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/bundle.keel"), "{}", text(&o));
}
