//! Sending a ruleset: nfnetlink batches the kernel applies atomically, and the
//! table, chain and rule messages they carry.

use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Hook, HookNumber, InetHookNumber, NfTablesMessage, RuleAttribute, RuleMessage,
    TableAttribute, TableMessage,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::expr::{Expr, NF_ACCEPT};
use super::{Ruleset, TABLE};

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

pub(super) fn table() -> TableMessage {
    TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    }
}

pub(super) fn base_chain(name: &str, kind: &str, hook: InetHookNumber, priority: i32) -> NfTablesMessage {
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

pub(super) fn rule(chain: &str, exprs: Vec<Expr>) -> NfTablesMessage {
    NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(chain.into()),
            RuleAttribute::Expressions(exprs),
        ],
    })
}
