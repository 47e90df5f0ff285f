//! Keel's DHCP server on a nat bridge, exercised by busybox `udhcpc` in peer
//! namespaces: a dynamic lease from the range, a static lease by MAC, and the
//! same addresses again after a "reboot" (leases persisted in the lease file).

mod common;

use std::time::Duration;

use common::{Netns, config, require_root, veth};
use keel_init::net::{self, Options};

const SCRIPT: &str = "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mask=$mask router=$router dns=$dns hostname=$hostname lease=$lease\" > \"$OUT\"\nexit 0\n";

/// Runs udhcpc once in `ns` on `iface`; returns what its script saw on `bound`.
fn udhcpc(ns: &Netns, iface: &str, dir: &std::path::Path) -> String {
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join(format!("{iface}.out"));
    let _ = std::fs::remove_file(&out);
    let o = ns.exec(&[
        "env",
        &format!("OUT={}", out.display()),
        "busybox",
        "udhcpc",
        "-f",
        "-q",
        "-n",
        "-t",
        "5",
        "-T",
        "1",
        "-i",
        iface,
        "-s",
        script.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "udhcpc got no lease: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(&out).unwrap_or_default()
}

#[test]
fn leases_dynamic_and_static_addresses_and_remembers_them() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        lease_dir: dir.path().join("leases"),
        resolv_conf: dir.path().join("resolv.conf"),
        carrier_timeout: Duration::from_secs(1),
        dns_forwarder: true,
    };
    let cfg = config(
        "
version: 1
network:
  uplink: {interface: auto}
  bridges:
    - name: br-d
      mode: nat
      address: 10.88.0.1/24
      dhcp:
        range: 10.88.0.100-10.88.0.110
        lease_time: 10m
        static_leases:
          - {mac: 02:aa:bb:cc:dd:01, address: 10.88.0.9, hostname: fixed}
",
    );
    let host = Netns::new("dhs");
    let c1 = Netns::new("dhc1");
    let c2 = Netns::new("dhc2");
    veth(&host, "p1", &c1, "e1");
    veth(&host, "p2", &c2, "e2");
    c1.ip(&["link", "set", "e1", "address", "02:00:00:00:77:01"]);
    c2.ip(&["link", "set", "e2", "address", "02:aa:bb:cc:dd:01"]);

    // The bridge must exist before the client ports join it.
    host.run(|| async { net::apply(&cfg, &o).await });
    host.ip(&["link", "set", "p1", "master", "br-d"]);
    host.ip(&["link", "set", "p2", "master", "br-d"]);
    let first = serve(&host, &cfg, &o, || {
        (udhcpc(&c1, "e1", dir.path()), udhcpc(&c2, "e2", dir.path()))
    });
    let (dynamic, fixed) = first;
    assert!(
        dynamic.starts_with("ip=10.88.0.100 mask=24 router=10.88.0.1 dns=10.88.0.1"),
        "{dynamic}"
    );
    assert!(dynamic.contains("lease=600"), "{dynamic}");
    assert!(fixed.starts_with("ip=10.88.0.9 mask=24 router=10.88.0.1"), "{fixed}");
    assert!(fixed.contains("hostname=fixed"), "{fixed}");

    let file = std::fs::read_to_string(dir.path().join("leases/br-d.leases.json")).unwrap();
    assert!(
        file.contains("02:00:00:00:77:01") && file.contains("10.88.0.100"),
        "{file}"
    );

    // "Reboot": a new server reads the lease file. A new client asks first and
    // must not get the address remembered for the first one.
    let c3 = Netns::new("dhc3");
    veth(&host, "p3", &c3, "e3");
    host.ip(&["link", "set", "p3", "master", "br-d"]);
    let third = serve(&host, &cfg, &o, || udhcpc(&c3, "e3", dir.path()));
    assert!(third.starts_with("ip=10.88.0.101 "), "{third}");
    let (again, fixed_again) = serve(&host, &cfg, &o, || {
        (udhcpc(&c1, "e1", dir.path()), udhcpc(&c2, "e2", dir.path()))
    });
    assert!(again.starts_with("ip=10.88.0.100 "), "lease not remembered: {again}");
    assert!(fixed_again.starts_with("ip=10.88.0.9 "), "{fixed_again}");
}

/// Applies `cfg` in `host`, runs the services there while `body` runs on this
/// thread, then shuts them down.
fn serve<R>(host: &Netns, cfg: &keel_init::config::Config, o: &Options, body: impl FnOnce() -> R) -> R {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            host.run(|| async move {
                let report = net::apply(cfg, o).await;
                assert!(report.bridge_ok("br-d"), "{:?}", report.items);
                let (services, items) = net::Services::start(cfg, &report, o).await;
                for i in &items {
                    assert!(i.result.is_ok(), "{} {}: {:?}", i.kind, i.name, i.result);
                }
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
                services.shutdown(Duration::from_secs(2)).await;
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("services started");
        let r = body();
        stop_tx.send(()).unwrap();
        h.join().expect("services thread");
        r
    })
}
