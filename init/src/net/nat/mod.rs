//! Keel's nftables table `keel`, written over netlink (nfnetlink batches).
//!
//! The whole table is replaced in ONE batch: "create table keel" (a no-op when it
//! exists, so the delete that follows never fails on first boot), "delete table
//! keel", then the table, its chains and rules. The kernel applies a batch
//! atomically, so there is never a moment without rules, applying twice leaves
//! identical state, and no other table is touched.
//!
//! What the rules say, per bridge (`nft list table ip keel` shows them this way):
//! - `postrouting` (nat): `ip saddr SUBNET oifname UPLINK counter masquerade` for
//!   every `nat` bridge.
//! - `input` (filter): guests on `nat` and `isolated` bridges may reach the host
//!   only for DHCP (udp 67), DNS (udp/tcp 53), ping (so a guest can check its
//!   gateway) and replies to connections the host opened; everything else is dropped.
//! - `forward` (filter): `nat` guests may go out of the uplink and get replies
//!   back; `isolated` bridges are never forwarded, in either direction.
//! - `prerouting` (nat): a port forward is `iifname != BRIDGE fib daddr type local
//!   meta l4proto tcp th dport HOST_PORT counter dnat to GUEST_ADDR:GUEST_PORT`: only
//!   connections to the host's own addresses, from outside the guest's bridge, are
//!   rewritten; `forward` lets them in with `oifname BRIDGE ct status dnat accept`.

mod batch;
mod expr;

use std::net::Ipv4Addr;

use netlink_packet_netfilter::nftables::{InetHookNumber, NfTablesMessage};

use crate::config::{BridgeMode, Config, Ipv4Cidr, Proto};

pub use batch::{apply, remove};
use batch::{base_chain, rule, table};
use expr::*;

/// The name of Keel's table (family `ip`).
pub const TABLE: &str = "keel";

/// What the ruleset is built from: the bridges and the interface NAT leaves by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// The interface that carries the host's uplink address (the uplink NIC, or
    /// the `bridged` bridge it joined). `None` when no uplink could be found:
    /// then nothing is masqueraded, but guests are still fenced in.
    pub uplink: Option<String>,
    pub nat: Vec<(String, Ipv4Cidr)>,
    pub isolated: Vec<String>,
    pub forwards: Vec<PortForward>,
}

/// One `forwards:` entry with the guest's address resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortForward {
    pub bridge: String,
    pub proto: Proto,
    pub host_port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
}

impl Ruleset {
    pub fn from_config(cfg: &Config, uplink: Option<&str>) -> Ruleset {
        let mut r = Ruleset {
            uplink: uplink.map(str::to_owned),
            nat: Vec::new(),
            isolated: Vec::new(),
            forwards: Vec::new(),
        };
        for b in &cfg.network.bridges {
            match (*b.mode, &b.address) {
                (BridgeMode::Nat, Some(addr)) => {
                    r.nat.push((b.name.value.clone(), addr.value));
                    // A validated config resolves every forward; one that does not is
                    // left out rather than guessed.
                    for f in &b.forwards {
                        if let Ok(guest) = b.forward_address(&cfg.guests, f) {
                            r.forwards.push(PortForward {
                                bridge: b.name.value.clone(),
                                proto: *f.proto,
                                host_port: *f.host_port,
                                guest,
                                guest_port: *f.guest_port,
                            });
                        }
                    }
                }
                (BridgeMode::Isolated, _) => r.isolated.push(b.name.value.clone()),
                _ => {}
            }
        }
        r
    }

    /// The bridges whose guests are fenced off from the host (nat and isolated).
    fn guarded(&self) -> impl Iterator<Item = &str> {
        self.nat
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.isolated.iter().map(String::as_str))
    }

    /// The nfnetlink messages (without batch begin/end) that replace table `keel`.
    fn messages(&self) -> Vec<NfTablesMessage> {
        let mut m = vec![
            NfTablesMessage::NewTable(table()),
            NfTablesMessage::DeleteTable(table()),
            NfTablesMessage::NewTable(table()),
            base_chain("input", "filter", InetHookNumber::LocalIn, 0),
            base_chain("forward", "filter", InetHookNumber::Forward, 0),
            // srcnat priority, as `nft` names it.
            base_chain("postrouting", "nat", InetHookNumber::PostRouting, 100),
            // dstnat priority.
            base_chain("prerouting", "nat", InetHookNumber::PreRouting, -100),
        ];
        let mut rule = |chain: &str, exprs: Vec<Expr>| m.push(rule(chain, exprs));

        for br in self.guarded() {
            rule("input", [iifname(br), ct_established(), accept()].concat());
            rule("input", [iifname(br), l4proto(UDP), dport(67), accept()].concat());
            rule("input", [iifname(br), l4proto(UDP), dport(53), accept()].concat());
            rule("input", [iifname(br), l4proto(TCP), dport(53), accept()].concat());
            rule(
                "input",
                [iifname(br), l4proto(ICMP), icmp_echo_request(), accept()].concat(),
            );
            rule("input", [iifname(br), counter(), drop()].concat());
        }
        for br in &self.isolated {
            rule("forward", [iifname(br), counter(), drop()].concat());
            rule("forward", [oifname(br), counter(), drop()].concat());
        }
        for (br, _) in &self.nat {
            if let Some(up) = &self.uplink {
                rule("forward", [iifname(br), oifname(up), accept()].concat());
            }
            rule("forward", [oifname(br), ct_established(), accept()].concat());
            if self.forwards.iter().any(|f| f.bridge == *br) {
                rule("forward", [oifname(br), ct_dnat(), accept()].concat());
            }
            rule("forward", [iifname(br), counter(), drop()].concat());
            rule("forward", [oifname(br), counter(), drop()].concat());
        }
        if let Some(up) = &self.uplink {
            for (_, subnet) in &self.nat {
                rule(
                    "postrouting",
                    [saddr_in(*subnet), oifname(up), counter(), masquerade()].concat(),
                );
            }
        }
        for f in &self.forwards {
            let proto = match f.proto {
                Proto::Tcp => TCP,
                Proto::Udp => UDP,
            };
            rule(
                "prerouting",
                [
                    iifname_not(&f.bridge),
                    daddr_is_local(),
                    l4proto(proto),
                    dport(f.host_port),
                    counter(),
                    dnat_to(f.guest, f.guest_port),
                ]
                .concat(),
            );
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::nftables::Operator;

    #[test]
    fn ruleset_from_homelab_shape() {
        let text = "version: 1\nnetwork:\n  uplink: {interface: eth0, address: 192.168.1.10/24}\n  bridges:\n    - {name: br-nat, mode: nat, address: 10.100.0.1/24}\n    - {name: br-lab, mode: isolated, address: 10.200.0.1/24}\n    - {name: br-lan, mode: bridged}\n";
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let r = Ruleset::from_config(&cfg, Some("eth0"));
        assert_eq!(r.nat, vec![("br-nat".to_string(), "10.100.0.1/24".parse().unwrap())]);
        assert_eq!(r.isolated, vec!["br-lab".to_string()]);
        let msgs = r.messages();
        // table create+delete+create, four chains, 6 input rules per guarded
        // bridge (2), 2 forward rules for the isolated one, 4 for the nat one, 1 masquerade.
        assert_eq!(msgs.len(), 3 + 4 + 12 + 2 + 4 + 1);
        assert!(matches!(msgs[1], NfTablesMessage::DeleteTable(_)));
    }

    #[test]
    fn names_are_padded_and_masks_big_endian() {
        assert_eq!(ifname_bytes("br0").len(), 16);
        assert_eq!(&ifname_bytes("br0")[..4], b"br0\0");
        let s = saddr_in("10.100.0.1/24".parse().unwrap());
        assert_eq!(s.len(), 3);
        assert_eq!(s[1], bitwise(vec![255, 255, 255, 0]));
        assert_eq!(s[2], cmp(Operator::Equal, vec![10, 100, 0, 0]));
    }

    #[test]
    fn forwards_resolve_the_guests_static_lease() {
        let text = "version: 1\nnetwork:\n  uplink: {interface: eth0, address: 192.168.1.10/24}\n  bridges:\n    - name: br-nat\n      mode: nat\n      address: 10.100.0.1/24\n      dhcp: {range: 10.100.0.100-10.100.0.199, static_leases: [{mac: \"02:00:00:00:00:10\", address: 10.100.0.10}]}\n      forwards: [{host_port: 2222, guest: web, guest_port: 22}, {host_port: 5353, guest: web, guest_port: 53, proto: udp}]\nguests:\n  - {name: web, memory: 256MiB, nics: [{bridge: br-nat, mac: \"02:00:00:00:00:10\"}]}\n";
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let r = Ruleset::from_config(&cfg, Some("eth0"));
        let web: Ipv4Addr = "10.100.0.10".parse().unwrap();
        assert_eq!(
            r.forwards,
            vec![
                PortForward {
                    bridge: "br-nat".into(),
                    proto: Proto::Tcp,
                    host_port: 2222,
                    guest: web,
                    guest_port: 22
                },
                PortForward {
                    bridge: "br-nat".into(),
                    proto: Proto::Udp,
                    host_port: 5353,
                    guest: web,
                    guest_port: 53
                },
            ]
        );
        // One more forward rule (ct status dnat) and one prerouting rule per forward.
        assert_eq!(r.messages().len(), 3 + 4 + 6 + 5 + 1 + 2);
    }
}
