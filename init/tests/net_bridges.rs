//! Bridges, addresses, VLANs, forwarding and the nftables table, applied in a
//! throw-away network namespace and read back with `ip -j` and `nft -j`.

mod common;

use common::{Netns, config, require_root, veth};
use keel_init::net::{self, Component, Options};

fn opts(dir: &std::path::Path) -> Options {
    Options {
        lease_dir: dir.join("leases"),
        resolv_conf: dir.join("resolv.conf"),
        carrier_timeout: std::time::Duration::from_secs(2),
        dns_forwarder: true,
    }
}

const CONFIG: &str = "
version: 1
network:
  uplink:
    interface: up0
    address: 192.0.2.10/24
    gateway: 192.0.2.1
    dns: [192.0.2.53]
  bridges:
    - name: br-nat
      mode: nat
      address: 10.50.0.1/24
    - name: br-iso
      mode: isolated
      address: 10.60.0.1/24
    - name: br-v30
      mode: bridged
      vlan: 30
";

#[test]
fn bridges_addresses_rules_as_declared_and_applying_twice_changes_nothing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("br");
    let upstream = Netns::new("brup");
    veth(&host, "up0", &upstream, "eth0");
    let cfg = config(CONFIG);
    let o = opts(dir.path());

    // Whether this kernel can make VLANs at all (8021q may be missing).
    host.ip(&["link", "add", "probe0", "type", "veth", "peer", "name", "probe1"]);
    let vlans = host
        .exec(&[
            "ip", "link", "add", "link", "probe0", "name", "probe0.9", "type", "vlan", "id", "9",
        ])
        .status
        .success();
    host.ip(&["link", "del", "probe0"]);

    let report = host.run(|| async { net::apply(&cfg, &o).await });
    for i in report.items.iter().filter(|i| i.name != "br-v30") {
        assert!(i.result.is_ok(), "{} {}: {:?}", i.kind, i.name, i.result);
    }
    let v30 = report
        .items
        .iter()
        .find(|i| i.name == "br-v30")
        .expect("br-v30 reported");
    if vlans {
        assert!(v30.result.is_ok(), "{:?}", v30.result);
    } else {
        // Reported with the interface and the reason; everything else is up.
        let msg = v30.result.as_ref().unwrap_err().to_string();
        assert!(msg.contains("up0.30") && msg.contains("802.1Q"), "{msg}");
    }
    assert_eq!(
        report.uplink,
        Some(net::UplinkState {
            nic: "up0".into(),
            host_interface: "up0".into(),
            dhcp: false
        })
    );

    // Links: three bridges (the VLAN as br-v30's port where the kernel has VLANs), all up.
    for br in ["br-nat", "br-iso", "br-v30"] {
        let l = host.link(br);
        assert_eq!(l["linkinfo"]["info_kind"], "bridge", "{br}: {l}");
        assert!(
            l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{br} is not up: {l}"
        );
    }
    if vlans {
        let vlan = host.link("up0.30");
        assert_eq!(vlan["linkinfo"]["info_kind"], "vlan");
        assert_eq!(vlan["linkinfo"]["info_data"]["id"], 30);
        assert_eq!(vlan["master"], "br-v30");
        assert_eq!(vlan["link"], "up0");
    }

    // Addresses and the default route.
    let addrs = host.ipv4_addrs();
    for want in [
        ("br-nat", "10.50.0.1/24"),
        ("br-iso", "10.60.0.1/24"),
        ("up0", "192.0.2.10/24"),
    ] {
        assert!(
            addrs.contains(&(want.0.into(), want.1.into())),
            "{want:?} missing in {addrs:?}"
        );
    }
    let routes = host.ip_json(&["-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "192.0.2.1", "{routes}");
    assert_eq!(routes[0]["dev"], "up0");
    let resolv = std::fs::read_to_string(dir.path().join("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 192.0.2.53"), "{resolv}");

    // Forwarding on for NAT, off on the isolated bridge.
    assert_eq!(host.sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(host.sysctl("net.ipv4.conf.br-iso.forwarding"), "0");
    assert_eq!(host.sysctl("net.ipv4.conf.br-nat.forwarding"), "1");

    // The rules, as nft prints them.
    let text = host.nft_table_text("ip", "keel");
    for want in [
        "ip saddr 10.50.0.0/24 oifname \"up0\" counter packets 0 bytes 0 masquerade",
        "iifname \"br-nat\" udp dport 67 accept",
        "iifname \"br-iso\" udp dport 53 accept",
        "iifname \"br-iso\" tcp dport 53 accept",
        "iifname \"br-iso\" ct state established,related accept",
        "iifname \"br-iso\" counter packets 0 bytes 0 drop",
        "oifname \"br-iso\" counter packets 0 bytes 0 drop",
        "iifname \"br-nat\" oifname \"up0\" accept",
        "type nat hook postrouting priority srcnat; policy accept;",
        "type filter hook input priority filter; policy accept;",
    ] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }
    assert!(!text.contains("br-v30"), "bridged bridges get no rules:\n{text}");

    // Somebody else's table, which Keel must never touch.
    host.exec_ok(&["nft", "add", "table", "inet", "othertest"]);
    host.exec_ok(&[
        "nft",
        "add chain inet othertest c { type filter hook input priority 10; policy accept; }",
    ]);
    host.exec_ok(&["nft", "add rule inet othertest c tcp dport 2222 counter accept"]);

    let links1 = host.link_state();
    let addrs1 = host.ipv4_addrs();
    let rules1 = host.nft_ruleset();
    let report2 = host.run(|| async { net::apply(&cfg, &o).await });
    assert_eq!(
        report2.errors().map(|i| i.name.clone()).collect::<Vec<_>>(),
        report.errors().map(|i| i.name.clone()).collect::<Vec<_>>()
    );
    assert_eq!(host.link_state(), links1, "link state changed on the second apply");
    assert_eq!(host.ipv4_addrs(), addrs1, "addresses changed on the second apply");
    assert_eq!(host.nft_ruleset(), rules1, "ruleset changed on the second apply");
    let other = host.nft_table_text("inet", "othertest");
    assert!(
        other.contains("tcp dport 2222 counter packets 0 bytes 0 accept"),
        "{other}"
    );
    // Exactly one keel table (a re-apply must not stack a second copy of the rules).
    let masq = host.nft_table_text("ip", "keel").matches("masquerade").count();
    assert_eq!(masq, 1);
}

#[test]
fn a_broken_bridge_is_reported_and_the_others_still_come_up() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("brbad");
    // A non-bridge already holds one of the names.
    host.ip(&["link", "add", "br-bad", "type", "veth", "peer", "name", "br-bad-peer"]);
    let cfg = config(
        "
version: 1
network:
  uplink: {interface: nosuch0, address: 192.0.2.10/24}
  bridges:
    - {name: br-bad, mode: nat, address: 10.51.0.1/24}
    - {name: br-good, mode: nat, address: 10.52.0.1/24}
",
    );
    let o = opts(dir.path());
    let report = host.run(|| async { net::apply(&cfg, &o).await });

    let bad = report
        .items
        .iter()
        .find(|i| i.name == "br-bad")
        .expect("br-bad reported");
    let msg = bad.result.as_ref().unwrap_err().to_string();
    assert!(msg.contains("br-bad") && msg.contains("veth"), "{msg}");
    let up = report.items.iter().find(|i| i.kind == Component::Uplink).unwrap();
    let msg = up.result.as_ref().unwrap_err().to_string();
    assert!(msg.contains("nosuch0") && msg.contains("does not exist"), "{msg}");
    assert!(report.bridge_ok("br-good"));
    assert!(host.ipv4_addrs().contains(&("br-good".into(), "10.52.0.1/24".into())));
    // Rules exist for both, with no masquerade (no uplink was found).
    let text = host.nft_table_text("ip", "keel");
    assert!(text.contains("iifname \"br-good\""), "{text}");
    assert!(!text.contains("masquerade"), "{text}");
}

#[test]
fn taps_attach_to_their_bridge_and_vanish_with_their_descriptor() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("tap");
    let cfg = config(
        "
version: 1
network:
  uplink: {interface: auto}
  bridges:
    - {name: br-t, mode: isolated, address: 10.53.0.1/24}
",
    );
    let o = opts(dir.path());
    let name = net::tap::name_for("web", 0);
    let n = name.clone();
    let tap = host.run(|| async move {
        let r = net::apply(&cfg, &o).await;
        assert!(r.bridge_ok("br-t"));
        net::tap::create(&n, "br-t").await.expect("tap created")
    });
    let l = host.link(&name);
    assert_eq!(l["linkinfo"]["info_kind"], "tun", "{l}");
    assert_eq!(l["linkinfo"]["info_data"]["type"], "tap", "{l}");
    assert_eq!(l["master"], "br-t");
    assert_eq!(l["linkinfo"]["info_data"]["vnet_hdr"], true, "{l}");
    assert_eq!(l["linkinfo"]["info_data"]["pi"], false, "{l}");
    assert_eq!(l["linkinfo"]["info_data"]["persist"], false, "{l}");

    // A leftover of the same name is replaced, not an error.
    let n = name.clone();
    drop(tap);
    assert!(common::wait_until(std::time::Duration::from_secs(2), || host
        .exec(&["ip", "link", "show", &name])
        .status
        .code()
        != Some(0)));
    let tap2 = host.run(|| async move { net::tap::create(&n, "br-t").await.expect("recreated") });
    let n = name.clone();
    host.run(|| async move { net::tap::delete(&n).await.expect("deleted") });
    assert!(!host.exec(&["ip", "link", "show", &name]).status.success());
    drop(tap2);
    // Refuses a bridge that does not exist, naming both.
    let n = name.clone();
    let err = host.run(|| async move { net::tap::create(&n, "br-none").await.unwrap_err() });
    let msg = err.to_string();
    assert!(msg.contains(&name) && msg.contains("br-none"), "{msg}");
}
