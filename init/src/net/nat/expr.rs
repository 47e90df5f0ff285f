//! nftables expressions, built as `nft` itself encodes the statements they are named
//! after, so `nft list table ip keel` prints them back readably.

use std::net::Ipv4Addr;

use netlink_packet_core::DefaultNla;
use netlink_packet_netfilter::nftables::{
    Bitwise, Cmp, DataAttribute, ExpressionAttribute, Expressions, Immediate, ListAttribute, Meta, MetaKey, Operator,
    Payload, Register, Verdict, VerdictAttribute,
};

use crate::config::Ipv4Cidr;

pub(super) type Expr = ListAttribute<ExpressionAttribute>;
pub(super) const NF_DROP: u32 = 0;
pub(super) const NF_ACCEPT: u32 = 1;
pub(super) const ICMP: u8 = 1;
pub(super) const TCP: u8 = 6;
pub(super) const UDP: u8 = 17;
/// Payload bases (enum nft_payload_bases).
pub(super) const BASE_NETWORK: u32 = 1;
pub(super) const BASE_TRANSPORT: u32 = 2;
/// NFTA_CT_DREG / NFTA_CT_KEY and NFT_CT_STATE.
pub(super) const NFTA_CT_DREG: u16 = 1;
pub(super) const NFTA_CT_KEY: u16 = 2;
pub(super) const NFT_CT_STATE: u32 = 0;
/// IP_CT_ESTABLISHED and IP_CT_RELATED as ct state bits.
pub(super) const CT_STATE_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
/// NFT_CT_STATUS (enum nft_ct_keys: STATE=0, DIRECTION=1, STATUS=2) and IPS_DST_NAT
/// (bit 5 of enum ip_conntrack_status).
pub(super) const NFT_CT_STATUS: u32 = 2;
pub(super) const IPS_DST_NAT: u32 = 1 << 5;
/// NFTA_FIB_* attributes, NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR and RTN_LOCAL.
pub(super) const NFTA_FIB_DREG: u16 = 1;
pub(super) const NFTA_FIB_RESULT: u16 = 2;
pub(super) const NFTA_FIB_FLAGS: u16 = 3;
pub(super) const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub(super) const NFTA_FIB_F_DADDR: u32 = 1 << 1;
pub(super) const RTN_LOCAL: u32 = 2;
/// NFTA_NAT_* attributes, NFT_NAT_DNAT and NFPROTO_IPV4.
pub(super) const NFTA_NAT_TYPE: u16 = 1;
pub(super) const NFTA_NAT_FAMILY: u16 = 2;
pub(super) const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
pub(super) const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
pub(super) const NFT_NAT_DNAT: u32 = 1;
pub(super) const NFPROTO_IPV4: u32 = 2;

pub(super) fn cmp(op: Operator, data: Vec<u8>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
    .into()
}

pub(super) fn meta(key: MetaKey) -> Expr {
    Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(Register::Reg1)]).into()
}

/// Interface names compare as IFNAMSIZ (16) bytes, zero padded.
pub(super) fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

pub(super) fn iifname(name: &str) -> Vec<Expr> {
    vec![meta(MetaKey::Iifname), cmp(Operator::Equal, ifname_bytes(name))]
}

pub(super) fn iifname_not(name: &str) -> Vec<Expr> {
    vec![meta(MetaKey::Iifname), cmp(Operator::NotEqual, ifname_bytes(name))]
}

pub(super) fn oifname(name: &str) -> Vec<Expr> {
    vec![meta(MetaKey::Oifname), cmp(Operator::Equal, ifname_bytes(name))]
}

pub(super) fn l4proto(proto: u8) -> Vec<Expr> {
    vec![meta(MetaKey::L4Proto), cmp(Operator::Equal, vec![proto])]
}

pub(super) fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

pub(super) fn bitwise(mask: Vec<u8>) -> Expr {
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
pub(super) fn dport(port: u16) -> Vec<Expr> {
    vec![
        payload(BASE_TRANSPORT, 2, 2),
        cmp(Operator::Equal, port.to_be_bytes().to_vec()),
    ]
}

/// `icmp type echo-request`.
pub(super) fn icmp_echo_request() -> Vec<Expr> {
    vec![payload(BASE_TRANSPORT, 0, 1), cmp(Operator::Equal, vec![8])]
}

/// `ip saddr NET/PREFIX`.
pub(super) fn saddr_in(subnet: Ipv4Cidr) -> Vec<Expr> {
    let net: Ipv4Addr = subnet.network();
    let mut v = vec![payload(BASE_NETWORK, 12, 4)];
    if subnet.prefix < 32 {
        v.push(bitwise(subnet.mask().to_be_bytes().to_vec()));
    }
    v.push(cmp(Operator::Equal, net.octets().to_vec()));
    v
}

/// `ct KEY & BITS != 0` (ct state and ct status are host-endian bit fields).
fn ct_any_of(key: u32, bits: u32) -> Vec<Expr> {
    let ct: Expr = Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(NFTA_CT_DREG, u32::from(Register::Reg1).to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_CT_KEY, key.to_be_bytes().to_vec()),
        ],
    }
    .into();
    vec![
        ct,
        bitwise(bits.to_ne_bytes().to_vec()),
        cmp(Operator::NotEqual, vec![0; 4]),
    ]
}

/// `ct state established,related`.
pub(super) fn ct_established() -> Vec<Expr> {
    ct_any_of(NFT_CT_STATE, CT_STATE_ESTABLISHED_RELATED)
}

/// `ct status dnat`: the connection was opened through a port forward.
pub(super) fn ct_dnat() -> Vec<Expr> {
    ct_any_of(NFT_CT_STATUS, IPS_DST_NAT)
}

/// `fib daddr type local`: the packet is addressed to one of this host's addresses.
pub(super) fn daddr_is_local() -> Vec<Expr> {
    let fib: Expr = Expressions::Other {
        expression_type: "fib".into(),
        attributes: vec![
            DefaultNla::new(NFTA_FIB_DREG, u32::from(Register::Reg1).to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR.to_be_bytes().to_vec()),
        ],
    }
    .into();
    vec![fib, cmp(Operator::Equal, RTN_LOCAL.to_ne_bytes().to_vec())]
}

/// `dnat to ADDR:PORT`: the address into register 1, the port into register 2.
pub(super) fn dnat_to(addr: Ipv4Addr, port: u16) -> Vec<Expr> {
    let load = |reg: Register, data: Vec<u8>| -> Expr {
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(reg),
            Immediate::Data(DataAttribute::Value(data)),
        ])
        .into()
    };
    let reg = |r: Register| u32::from(r).to_be_bytes().to_vec();
    let nat: Expr = Expressions::Other {
        expression_type: "nat".into(),
        attributes: vec![
            DefaultNla::new(NFTA_NAT_TYPE, NFT_NAT_DNAT.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_NAT_FAMILY, NFPROTO_IPV4.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_NAT_REG_ADDR_MIN, reg(Register::Reg1)),
            DefaultNla::new(NFTA_NAT_REG_PROTO_MIN, reg(Register::Reg2)),
        ],
    }
    .into();
    vec![
        load(Register::Reg1, addr.octets().to_vec()),
        load(Register::Reg2, port.to_be_bytes().to_vec()),
        nat,
    ]
}

pub(super) fn named(name: &str) -> Expr {
    ListAttribute::Element(vec![ExpressionAttribute::Name(name.into())])
}

pub(super) fn counter() -> Vec<Expr> {
    vec![named("counter")]
}

pub(super) fn masquerade() -> Vec<Expr> {
    vec![named("masq")]
}

pub(super) fn verdict(code: u32) -> Vec<Expr> {
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

pub(super) fn accept() -> Vec<Expr> {
    verdict(NF_ACCEPT)
}

pub(super) fn drop() -> Vec<Expr> {
    verdict(NF_DROP)
}
