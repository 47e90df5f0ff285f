//! NAT end to end: a "guest" namespace behind a Keel bridge pings an "upstream"
//! namespace that has no route back to the guest subnet; then port forwards bring
//! upstream's connections to the host's port in to the guest.
//!
//!   guest (g0 10.77.0.50) ── gp0 ─[br-nat 10.77.0.1]─ router ── up0 ── eth0 (198.51.100.1) upstream

mod common;

use common::{Netns, config, require_root, veth};
use keel_init::net::{self, Options};

fn cfg(mode: &str) -> keel_init::config::Config {
    config(&format!(
        "
version: 1
network:
  uplink: {{interface: up0, address: 198.51.100.10/24}}
  bridges:
    - {{name: br-nat, mode: {mode}, address: 10.77.0.1/24}}
"
    ))
}

fn options(dir: &std::path::Path) -> Options {
    Options {
        lease_dir: dir.join("leases"),
        resolv_conf: dir.join("resolv.conf"),
        carrier_timeout: std::time::Duration::from_secs(1),
        dns_forwarder: false,
    }
}

/// The namespaces of the diagram above: (router, guest, upstream), addressed.
fn topology(tag: &str) -> (Netns, Netns, Netns) {
    let router = Netns::new(&format!("{tag}r"));
    let guest = Netns::new(&format!("{tag}g"));
    let upstream = Netns::new(&format!("{tag}u"));
    veth(&router, "up0", &upstream, "eth0");
    veth(&router, "gp0", &guest, "g0");
    upstream.ip(&["addr", "add", "198.51.100.1/24", "dev", "eth0"]);
    guest.ip(&["addr", "add", "10.77.0.50/24", "dev", "g0"]);
    guest.ip(&["route", "add", "default", "via", "10.77.0.1"]);
    (router, guest, upstream)
}

#[test]
fn guests_reach_upstream_only_through_nat() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path());
    let (router, guest, upstream) = topology("nat");

    // 1. Isolated: the bridge exists, but nothing is forwarded.
    let c = cfg("isolated");
    let r = router.run(|| async { net::apply(&c, &o).await });
    assert!(r.is_ok(), "{:?}", r.errors().collect::<Vec<_>>());
    router.ip(&["link", "set", "gp0", "master", "br-nat"]);
    assert!(guest.ping("10.77.0.1"), "guest cannot ping its gateway");
    assert!(!guest.ping("198.51.100.1"), "isolated bridge forwarded traffic");

    // 2. Forwarding by hand, no NAT: packets leave, but upstream has no route back.
    router.exec_ok(&["nft", "delete", "table", "ip", "keel"]);
    router.exec_ok(&["busybox", "sysctl", "-w", "net.ipv4.ip_forward=1"]);
    router.exec_ok(&["busybox", "sysctl", "-w", "net.ipv4.conf.br-nat.forwarding=1"]);
    assert!(
        !guest.ping("198.51.100.1"),
        "reply came back without NAT: the test topology is wrong"
    );

    // 3. NAT: now it works, and conntrack shows the source translation.
    let c = cfg("nat");
    let r = router.run(|| async { net::apply(&c, &o).await });
    assert!(r.is_ok(), "{:?}", r.errors().collect::<Vec<_>>());
    assert!(guest.ping("198.51.100.1"), "guest cannot reach upstream through NAT");
    let ct = router.exec_ok(&["conntrack", "-L", "-p", "icmp"]);
    assert!(
        ct.lines()
            .any(|l| l.contains("src=10.77.0.50") && l.contains("dst=198.51.100.10")),
        "no source NAT in conntrack:\n{ct}"
    );

    // The host accepts guests only for DHCP/DNS/ping: a TCP service on the
    // host is unreachable from the guest, yet reachable from the uplink side.
    router.spawn(&["busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/echo", "hello"]);
    assert!(common::wait_until(std::time::Duration::from_secs(3), || upstream
        .exec(&["busybox", "nc", "-w", "1", "198.51.100.10", "8080"])
        .stdout
        .starts_with(b"hello")));
    let from_guest = guest.exec(&["busybox", "nc", "-w", "1", "10.77.0.1", "8080"]);
    assert!(
        !from_guest.stdout.starts_with(b"hello"),
        "guest reached a host TCP port"
    );
    // Inbound from upstream to the guest subnet is never forwarded.
    upstream.ip(&["route", "add", "10.77.0.0/24", "via", "198.51.100.10"]);
    assert!(
        !upstream.ping("10.77.0.50"),
        "upstream opened a connection into the NAT subnet"
    );
}

/// The same topology, with guest `web` (static lease 10.77.0.50) and a forward of the
/// host's tcp 2222 to its port 22 — checked with the real `nft`, conntrack and busybox nc.
#[test]
fn port_forwards_reach_the_guest_and_go_away_with_the_config() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path());
    let (router, guest, upstream) = topology("fwd");
    let forwards = |list: &str| {
        config(&format!(
            "
version: 1
network:
  uplink: {{interface: up0, address: 198.51.100.10/24}}
  bridges:
    - name: br-nat
      mode: nat
      address: 10.77.0.1/24
      dhcp: {{range: 10.77.0.100-10.77.0.199, static_leases: [{{mac: \"02:00:00:00:77:50\", address: 10.77.0.50}}]}}
      forwards: [{list}]
guests:
  - {{name: web, memory: 64MiB, nics: [{{bridge: br-nat, mac: \"02:00:00:00:77:50\"}}]}}
"
        ))
    };
    let c = forwards("{host_port: 2222, guest: web, guest_port: 22}");
    let r = router.run(|| async { net::apply(&c, &o).await });
    assert!(r.is_ok(), "{:?}", r.errors().collect::<Vec<_>>());
    router.ip(&["link", "set", "gp0", "master", "br-nat"]);

    // nft reads the rule back as the statement it stands for.
    let table = router.nft_table_text("ip", "keel");
    assert!(
        table.contains("tcp dport 2222") && table.contains("dnat to 10.77.0.50:22"),
        "no port forward in:\n{table}"
    );
    assert!(
        table.contains("fib daddr type local"),
        "forward not limited to local addresses:\n{table}"
    );

    guest.spawn(&["busybox", "nc", "-ll", "-p", "22", "-e", "/bin/echo", "guest-sshd"]);
    assert!(
        common::wait_until(std::time::Duration::from_secs(5), || upstream
            .exec(&["busybox", "nc", "-w", "1", "198.51.100.10", "2222"])
            .stdout
            .starts_with(b"guest-sshd")),
        "upstream did not reach the guest through the host's port 2222:\n{table}"
    );
    let ct = router.exec_ok(&["conntrack", "-L", "-p", "tcp"]);
    assert!(
        ct.lines()
            .any(|l| l.contains("dport=2222") && l.contains("src=10.77.0.50")),
        "no destination NAT in conntrack:\n{ct}"
    );
    // The guest port itself is still closed from outside: only the forward leads in.
    upstream.ip(&["route", "add", "10.77.0.0/24", "via", "198.51.100.10"]);
    assert!(
        !upstream
            .exec(&["busybox", "nc", "-w", "1", "10.77.0.50", "22"])
            .stdout
            .starts_with(b"guest-sshd"),
        "upstream reached the guest's port 22 without a forward"
    );

    // Re-applied without the forward, the rule is gone in the same batch as the rest.
    let c = forwards("");
    let r = router.run(|| async { net::apply(&c, &o).await });
    assert!(r.is_ok(), "{:?}", r.errors().collect::<Vec<_>>());
    let table = router.nft_table_text("ip", "keel");
    assert!(!table.contains("dnat"), "forward left behind:\n{table}");
    assert!(
        table.contains("masquerade"),
        "the rest of the table went with it:\n{table}"
    );
    assert!(
        !upstream
            .exec(&["busybox", "nc", "-w", "1", "198.51.100.10", "2222"])
            .stdout
            .starts_with(b"guest-sshd"),
        "the removed forward still leads to the guest"
    );
}
