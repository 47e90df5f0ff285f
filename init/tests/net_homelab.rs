//! configs/homelab.yaml, unchanged, applied in a test namespace whose uplink
//! is a veth named like the config's NIC (enp1s0); the resulting links,
//! addresses and rules are checked, and a guest on br-nat reaches the LAN.

mod common;

use std::time::Duration;

use common::{Netns, require_root, veth};
use keel_init::net::{self, Options};

#[test]
fn homelab_config_applies_as_declared() {
    require_root();
    // Read at run time: the test binary may have been built from a checkout elsewhere.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let path = std::path::Path::new(&manifest_dir).join("../configs/homelab.yaml");
    let cfg = keel_init::config::load_file(&path)
        .expect("homelab.yaml is valid")
        .config;
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        lease_dir: dir.path().join("leases"),
        resolv_conf: dir.path().join("resolv.conf"),
        carrier_timeout: Duration::from_secs(1),
        dns_forwarder: true,
    };
    let host = Netns::new("hl");
    let lan = Netns::new("hllan");
    let guest = Netns::new("hlg");
    veth(&host, "enp1s0", &lan, "eth0");
    veth(&host, "gp0", &guest, "g0");
    lan.ip(&["addr", "add", "192.168.1.1/24", "dev", "eth0"]);
    let nic_mac = host.link("enp1s0")["address"].as_str().unwrap().to_owned();

    let report = host.run(|| async { net::apply(&cfg, &o).await });
    for i in &report.items {
        assert!(i.result.is_ok(), "{} {}: {:?}", i.kind, i.name, i.result);
    }
    assert_eq!(report.uplink.as_ref().unwrap().host_interface, "br-lan");

    // br-lan took the uplink and its address (and its MAC, so the LAN sees the same host).
    let nic = host.link("enp1s0");
    assert_eq!(nic["master"], "br-lan", "{nic}");
    let br_lan = host.link("br-lan");
    assert_eq!(br_lan["address"], nic_mac.as_str());
    let addrs = host.ipv4_addrs();
    assert_eq!(
        addrs,
        vec![
            ("br-lab".to_string(), "10.200.0.1/24".to_string()),
            ("br-lan".to_string(), "192.168.1.10/24".to_string()),
            ("br-nat".to_string(), "10.100.0.1/24".to_string()),
            ("lo".to_string(), "127.0.0.1/8".to_string()),
        ]
    );
    for br in ["br-lan", "br-nat", "br-lab"] {
        assert_eq!(host.link(br)["linkinfo"]["info_kind"], "bridge");
    }
    let routes = host.ip_json(&["-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "192.168.1.1");
    assert_eq!(routes[0]["dev"], "br-lan");
    let resolv = std::fs::read_to_string(dir.path().join("resolv.conf")).unwrap();
    assert!(
        resolv.contains("nameserver 192.168.1.1\nnameserver 9.9.9.9\n"),
        "{resolv}"
    );
    assert_eq!(host.sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(host.sysctl("net.ipv4.conf.br-lab.forwarding"), "0");

    let text = host.nft_table_text("ip", "keel");
    for want in [
        "ip saddr 10.100.0.0/24 oifname \"br-lan\" counter packets 0 bytes 0 masquerade",
        "iifname \"br-nat\" oifname \"br-lan\" accept",
        "iifname \"br-lab\" counter packets 0 bytes 0 drop",
        "oifname \"br-lab\" counter packets 0 bytes 0 drop",
        "iifname \"br-nat\" udp dport 67 accept",
        "iifname \"br-lab\" udp dport 67 accept",
    ] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }
    assert!(
        !text.contains("10.200.0.0/24"),
        "isolated subnet must not be masqueraded:\n{text}"
    );

    // The LAN is reachable from the host over br-lan, and a guest on br-nat
    // reaches it through NAT (the LAN has no route to 10.100.0.0/24).
    assert!(host.ping("192.168.1.1"));
    host.ip(&["link", "set", "gp0", "master", "br-nat"]);
    guest.ip(&["addr", "add", "10.100.0.10/24", "dev", "g0"]);
    guest.ip(&["route", "add", "default", "via", "10.100.0.1"]);
    assert!(guest.ping("192.168.1.1"), "guest on br-nat cannot reach the LAN");

    // Applying again changes nothing.
    let (links, rules) = (host.link_state(), host.nft_ruleset());
    let again = host.run(|| async { net::apply(&cfg, &o).await });
    assert!(again.is_ok(), "{:?}", again.errors().collect::<Vec<_>>());
    assert_eq!(host.link_state(), links);
    assert_eq!(host.nft_ruleset(), rules);
}
