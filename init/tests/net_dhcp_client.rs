//! Keel's uplink DHCP client against busybox `udhcpd` in a peer namespace:
//! lease, address/route/resolv.conf applied, renewal at T1 (a 4 s lease), and
//! release at shutdown (the server then lists the lease as expired).

mod common;

use std::time::Duration;

use common::{Netns, config, require_root, veth};
use keel_init::net::{self, Options, dhcp_client::State};

#[test]
fn gets_renews_and_releases_a_lease_from_udhcpd() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("dcc");
    let server = Netns::new("dcs");
    veth(&host, "wan0", &server, "srv0");
    host.ip(&["link", "set", "wan0", "address", "02:00:00:00:99:01"]);
    server.ip(&["addr", "add", "192.168.77.1/24", "dev", "srv0"]);
    let leases = dir.path().join("udhcpd.leases");
    let conf = dir.path().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 192.168.77.100\nend 192.168.77.110\ninterface srv0\nlease_file {}\npidfile {}\nmin_lease 4\n\
             option subnet 255.255.255.0\noption router 192.168.77.1\noption dns 192.168.77.53\noption domain lan.test\noption lease 4\n",
            leases.display(),
            dir.path().join("udhcpd.pid").display()
        ),
    )
    .unwrap();
    std::fs::write(&leases, b"").unwrap();
    server.spawn(&["busybox", "udhcpd", "-f", "-a", "100", conf.to_str().unwrap()]);

    let cfg = config("version: 1\nhost: {hostname: keel-test}\nnetwork:\n  uplink: {interface: wan0, address: dhcp}\n");
    let o = Options {
        lease_dir: dir.path().join("leases"),
        resolv_conf: dir.path().join("resolv.conf"),
        carrier_timeout: Duration::from_secs(1),
        dns_forwarder: false,
    };
    let (addr_bound, routes, resolv, renewed_same, released_addrs) = host.run(|| async {
        let report = net::apply(&cfg, &o).await;
        assert!(report.is_ok(), "{:?}", report.items);
        let (services, items) = net::Services::start(&cfg, &report, &o).await;
        assert!(items.iter().all(|i| i.result.is_ok()), "{items:?}");
        let mut state = services.uplink_state();
        let bound = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                if let State::Bound { lease, .. } = &*state.borrow_and_update() {
                    return lease.clone();
                }
                state.changed().await.unwrap();
            }
        })
        .await
        .expect("a lease within 15 s");
        let addrs = host.ipv4_addrs();
        let routes = host.ip_json(&["-4", "route", "show", "default"]);
        let resolv = std::fs::read_to_string(dir.path().join("resolv.conf")).unwrap();
        // T1 is 2 s: wait for a renewal of the same address.
        let renewed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                state.changed().await.unwrap();
                if let State::Bound { lease, renewals } = &*state.borrow()
                    && *renewals >= 1
                {
                    return lease.address == bound.address;
                }
            }
        })
        .await
        .expect("a renewal within 10 s");
        assert!(
            addrs.contains(&("wan0".to_string(), bound.address.to_string())),
            "{addrs:?}"
        );
        services.shutdown(Duration::from_secs(3)).await;
        assert_eq!(*state.borrow(), State::Released);
        (bound, routes, resolv, renewed, host.ipv4_addrs())
    });
    let ip = addr_bound.address.addr.octets();
    assert_eq!(&ip[..3], &[192, 168, 77], "{addr_bound:?}");
    assert!((100..=110).contains(&ip[3]), "{addr_bound:?}");
    assert_eq!(addr_bound.address.prefix, 24);
    assert_eq!(addr_bound.router, Some("192.168.77.1".parse().unwrap()));
    assert_eq!(routes[0]["gateway"], "192.168.77.1", "{routes}");
    assert!(
        resolv.contains("nameserver 192.168.77.53") && resolv.contains("search lan.test"),
        "{resolv}"
    );
    assert!(renewed_same, "renewal changed the address");
    assert!(
        !released_addrs.iter().any(|(i, _)| i == "wan0"),
        "address left on wan0 after release: {released_addrs:?}"
    );

    // The server saw the RELEASE: after writing its lease file it shows our MAC as expired.
    let pid = std::fs::read_to_string(dir.path().join("udhcpd.pid")).unwrap();
    server.exec_ok(&["busybox", "kill", "-USR1", pid.trim()]);
    let listed = common::wait_until(Duration::from_secs(3), || {
        // The file is rewritten asynchronously; a half-written one reads short.
        let out = server.exec(&["busybox", "dumpleases", "-f", leases.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains("02:00:00:00:99:01") && l.contains("expired"))
    });
    let out = server.exec(&["busybox", "dumpleases", "-f", leases.to_str().unwrap()]);
    assert!(
        listed,
        "lease not released on the server:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
