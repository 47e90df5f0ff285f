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

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netlink_packet_core::DefaultNla;
use netlink_packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, HookNumber,
    Immediate, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register,
    RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::config::{BridgeMode, Config, Ipv4Cidr};

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
}

impl Ruleset {
    pub fn from_config(cfg: &Config, uplink: Option<&str>) -> Ruleset {
        let mut r = Ruleset {
            uplink: uplink.map(str::to_owned),
            nat: Vec::new(),
            isolated: Vec::new(),
        };
        for b in &cfg.network.bridges {
            match (*b.mode, &b.address) {
                (BridgeMode::Nat, Some(addr)) => r.nat.push((b.name.value.clone(), addr.value)),
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
        m
    }
}

type Expr = ListAttribute<ExpressionAttribute>;

/// Replaces table `keel` with `rules` in one atomic batch.
pub fn apply(rules: &Ruleset) -> io::Result<()> {
    let mut msgs: Vec<(NetlinkMessage<NetfilterMessage>, bool)> = Vec::new();
    msgs.push((batch_marker(true), false));
    for m in rules.messages() {
        msgs.push((nft_message(m), true));
    }
    msgs.push((batch_marker(false), false));
    send_batch(msgs)
}

/// Deletes table `keel` if it exists (used when networking is torn down).
pub fn remove() -> io::Result<()> {
    send_batch(vec![
        (batch_marker(true), false),
        (nft_message(NfTablesMessage::NewTable(table())), true),
        (nft_message(NfTablesMessage::DeleteTable(table())), true),
        (batch_marker(false), false),
    ])
}

fn send_batch(mut msgs: Vec<(NetlinkMessage<NetfilterMessage>, bool)>) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    set_recv_timeout(&sock, std::time::Duration::from_secs(5))?;

    let mut buf = Vec::new();
    let mut pending = Vec::new();
    for (seq, (msg, ack)) in msgs.iter_mut().enumerate() {
        let seq = seq as u32 + 1;
        msg.header.sequence_number = seq;
        msg.header.flags |= NLM_F_REQUEST;
        if *ack {
            msg.header.flags |= NLM_F_ACK;
            pending.push(seq);
        }
        msg.finalize();
        let start = buf.len();
        buf.resize(start + msg.buffer_len(), 0);
        msg.serialize(&mut buf[start..]);
    }
    // A batch must reach the kernel in one datagram.
    sock.send(&buf, 0)?;

    // Every message we flagged is answered by an NLMSG_ERROR carrying 0 (done)
    // or a negative errno; the first error aborts the whole batch.
    let mut rx = vec![0u8; 1 << 16];
    while !pending.is_empty() {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(rx[off..off + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
            let seq = u32::from_ne_bytes(rx[off + 8..off + 12].try_into().unwrap_or_default());
            if len < 16 || off + len > n {
                break;
            }
            if kind == libc::NLMSG_ERROR as u16 && len >= 20 {
                let code = i32::from_ne_bytes(rx[off + 16..off + 20].try_into().unwrap_or_default());
                if code != 0 {
                    let what = describe_seq(&msgs, seq);
                    let e = io::Error::from_raw_os_error(-code);
                    return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
                }
                pending.retain(|s| *s != seq);
            }
            off += (len + 3) & !3;
        }
    }
    Ok(())
}

fn describe_seq(msgs: &[(NetlinkMessage<NetfilterMessage>, bool)], seq: u32) -> String {
    msgs.get(seq.saturating_sub(1) as usize)
        .map(|(m, _)| format!("nftables message {seq} ({:?})", m.header.message_type & 0xff))
        .unwrap_or_else(|| format!("nftables message {seq}"))
}

fn set_recv_timeout(sock: &Socket, d: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a valid fd and a pointer to a live timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ------------------------------------------------------------------ messages

const NFNL_SUBSYS_NFTABLES: u16 = 10;

fn batch_marker(begin: bool) -> NetlinkMessage<NetfilterMessage> {
    use netlink_packet_netfilter::none::ControlMessage;
    let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
    let body = if begin {
        ControlMessage::BatchBegin
    } else {
        ControlMessage::BatchEnd
    };
    NetlinkMessage::from(NetfilterMessage::new(header, body))
}

fn nft_message(m: NfTablesMessage) -> NetlinkMessage<NetfilterMessage> {
    let create = matches!(
        m,
        NfTablesMessage::NewTable(_) | NfTablesMessage::NewChain(_) | NfTablesMessage::NewRule(_)
    );
    let append = matches!(m, NfTablesMessage::NewRule(_));
    let header = NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0);
    let mut msg = NetlinkMessage::from(NetfilterMessage::new(header, m));
    if create {
        msg.header.flags |= NLM_F_CREATE;
    }
    if append {
        msg.header.flags |= NLM_F_APPEND;
    }
    msg
}

fn table() -> TableMessage {
    TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    }
}

fn base_chain(name: &str, kind: &str, hook: InetHookNumber, priority: i32) -> NfTablesMessage {
    NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(name.into()),
            ChainAttribute::Hook(vec![
                Hook::Number(HookNumber::Inet(hook)),
                Hook::Priority(priority as u32),
            ]),
            ChainAttribute::Policy(NF_ACCEPT),
            ChainAttribute::Type(kind.into()),
        ],
    })
}

fn rule(chain: &str, exprs: Vec<Expr>) -> NfTablesMessage {
    NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(chain.into()),
            RuleAttribute::Expressions(exprs),
        ],
    })
}

// ------------------------------------------------------------------ expressions
//
// Each helper returns the expressions `nft` itself would generate for the
// statement it is named after, so `nft list` prints them back readably.

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// Payload bases (enum nft_payload_bases).
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;
/// NFTA_CT_DREG / NFTA_CT_KEY and NFT_CT_STATE.
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
/// IP_CT_ESTABLISHED and IP_CT_RELATED as ct state bits.
const CT_STATE_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);

fn cmp(op: Operator, data: Vec<u8>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
    .into()
}

fn meta(key: MetaKey) -> Expr {
    Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(Register::Reg1)]).into()
}

/// Interface names compare as IFNAMSIZ (16) bytes, zero padded.
fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

fn iifname(name: &str) -> Vec<Expr> {
    vec![meta(MetaKey::Iifname), cmp(Operator::Equal, ifname_bytes(name))]
}

fn oifname(name: &str) -> Vec<Expr> {
    vec![meta(MetaKey::Oifname), cmp(Operator::Equal, ifname_bytes(name))]
}

fn l4proto(proto: u8) -> Vec<Expr> {
    vec![meta(MetaKey::L4Proto), cmp(Operator::Equal, vec![proto])]
}

fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

fn bitwise(mask: Vec<u8>) -> Expr {
    let len = mask.len();
    Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::Reg1),
        Bitwise::DestinationRegister(Register::Reg1),
        Bitwise::Length(len as u32),
        Bitwise::Mask(DataAttribute::Value(mask)),
        Bitwise::Xor(DataAttribute::Value(vec![0; len])),
    ])
    .into()
}

/// `th dport N` for the protocol matched just before.
fn dport(port: u16) -> Vec<Expr> {
    vec![
        payload(BASE_TRANSPORT, 2, 2),
        cmp(Operator::Equal, port.to_be_bytes().to_vec()),
    ]
}

/// `icmp type echo-request`.
fn icmp_echo_request() -> Vec<Expr> {
    vec![payload(BASE_TRANSPORT, 0, 1), cmp(Operator::Equal, vec![8])]
}

/// `ip saddr NET/PREFIX`.
fn saddr_in(subnet: Ipv4Cidr) -> Vec<Expr> {
    let net: Ipv4Addr = subnet.network();
    let mut v = vec![payload(BASE_NETWORK, 12, 4)];
    if subnet.prefix < 32 {
        v.push(bitwise(subnet.mask().to_be_bytes().to_vec()));
    }
    v.push(cmp(Operator::Equal, net.octets().to_vec()));
    v
}

/// `ct state established,related` (ct state is a host-endian bit field).
fn ct_established() -> Vec<Expr> {
    let ct: Expr = Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(NFTA_CT_DREG, u32::from(Register::Reg1).to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_CT_KEY, NFT_CT_STATE.to_be_bytes().to_vec()),
        ],
    }
    .into();
    vec![
        ct,
        bitwise(CT_STATE_ESTABLISHED_RELATED.to_ne_bytes().to_vec()),
        cmp(Operator::NotEqual, vec![0; 4]),
    ]
}

fn named(name: &str) -> Expr {
    ListAttribute::Element(vec![ExpressionAttribute::Name(name.into())])
}

fn counter() -> Vec<Expr> {
    vec![named("counter")]
}

fn masquerade() -> Vec<Expr> {
    vec![named("masq")]
}

fn verdict(code: u32) -> Vec<Expr> {
    vec![
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(Verdict::Other(
                code,
            ))])),
        ])
        .into(),
    ]
}

fn accept() -> Vec<Expr> {
    verdict(NF_ACCEPT)
}

fn drop() -> Vec<Expr> {
    verdict(NF_DROP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_from_homelab_shape() {
        let text = "version: 1\nnetwork:\n  uplink: {interface: eth0, address: 192.168.1.10/24}\n  bridges:\n    - {name: br-nat, mode: nat, address: 10.100.0.1/24}\n    - {name: br-lab, mode: isolated, address: 10.200.0.1/24}\n    - {name: br-lan, mode: bridged}\n";
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let r = Ruleset::from_config(&cfg, Some("eth0"));
        assert_eq!(r.nat, vec![("br-nat".to_string(), "10.100.0.1/24".parse().unwrap())]);
        assert_eq!(r.isolated, vec!["br-lab".to_string()]);
        let msgs = r.messages();
        // table create+delete+create, three chains, 6 input rules per guarded
        // bridge (2), 2 forward rules for the isolated one, 4 for the nat one, 1 masquerade.
        assert_eq!(msgs.len(), 3 + 3 + 12 + 2 + 4 + 1);
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
}
