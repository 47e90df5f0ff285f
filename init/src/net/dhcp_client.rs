//! A DHCPv4 client for the uplink (RFC 2131): DISCOVER → OFFER → REQUEST → ACK,
//! renewal with the server at T1, rebinding with any server at T2, a fresh start
//! when the lease runs out or a NAK arrives, and RELEASE at shutdown.
//!
//! It talks over a UDP socket bound to port 68 on the interface. Requests carry
//! the broadcast flag, so servers broadcast their replies: an interface without
//! an address could not receive a unicast one.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use super::NetError;
use super::dhcp_server::{CLIENT_PORT, SERVER_PORT, bound_udp};
use super::link::Rtnl;
use super::uplink::write_resolv_conf;
use crate::config::Ipv4Cidr;

/// What the client needs to know.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The interface that carries the uplink address (NIC or `bridged` bridge).
    pub interface: String,
    /// Written with the lease's DNS servers.
    pub resolv_conf: PathBuf,
    /// Sent as option 12 so the LAN's DHCP server can register the name.
    pub hostname: Option<String>,
}

/// A lease as the client holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Cidr,
    pub server: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_time: Duration,
    pub t1: Duration,
    pub t2: Duration,
    /// When the lease was granted (or last renewed).
    pub obtained: Instant,
}

/// The client's progress, for the caller (and tests) to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No lease yet (or it ran out).
    Searching,
    /// A lease is held; `renewals` counts successful renewals/rebinds of it.
    Bound { lease: Lease, renewals: u32 },
    /// Released at shutdown.
    Released,
}

struct Client {
    cfg: ClientConfig,
    rtnl: Rtnl,
    index: u32,
    mac: [u8; 6],
    socket: UdpSocket,
    state: watch::Sender<State>,
    dns: watch::Sender<Vec<Ipv4Addr>>,
}

fn client_err(iface: &str, message: impl std::fmt::Display) -> NetError {
    NetError::DhcpClient {
        interface: iface.to_owned(),
        message: message.to_string(),
    }
}

/// Runs the client until `shutdown` turns true, then releases the lease.
/// `state` follows its progress; `dns` gets the lease's DNS servers (for the
/// guests' DNS forwarder).
pub async fn run(
    cfg: ClientConfig,
    mut shutdown: watch::Receiver<bool>,
    state: watch::Sender<State>,
    dns: watch::Sender<Vec<Ipv4Addr>>,
) -> Result<(), NetError> {
    let iface = cfg.interface.clone();
    let rtnl = Rtnl::connect().map_err(|source| NetError::Netlink { source })?;
    let link = rtnl
        .link(&iface)
        .await
        .map_err(|e| client_err(&iface, format!("look up: {e}")))?
        .ok_or_else(|| client_err(&iface, "interface does not exist"))?;
    let mac = link
        .mac
        .ok_or_else(|| client_err(&iface, "interface has no MAC address"))?;
    let socket = bound_udp(&iface, Ipv4Addr::UNSPECIFIED, CLIENT_PORT)
        .map_err(|e| client_err(&iface, format!("bind udp/68: {e}")))?;
    let c = Client {
        cfg,
        rtnl,
        index: link.index,
        mac,
        socket,
        state,
        dns,
    };
    let mut lease: Option<Lease> = None;
    loop {
        let current = lease.take();
        let step = async {
            match current {
                None => c.acquire().await,
                Some(l) => c.keep(l).await,
            }
        };
        tokio::select! {
            r = step => lease = r?,
            _ = shutdown.changed() => break,
        }
    }
    // Shutdown: give the address back so the server can reuse it at once.
    let held = match &*c.state.borrow() {
        State::Bound { lease, .. } => Some(lease.clone()),
        _ => None,
    };
    if let Some(l) = held {
        c.release(&l).await;
    }
    let _ = c.state.send(State::Released);
    Ok(())
}

impl Client {
    fn base(&self, kind: MessageType, xid: u32) -> Message {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        m.set_flags(Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        o.insert(DhcpOption::ClientIdentifier(id));
        o.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
        ]));
        if let Some(h) = &self.cfg.hostname {
            o.insert(DhcpOption::Hostname(h.clone()));
        }
        m
    }

    async fn send(&self, m: &Message, to: SocketAddrV4) -> Result<(), NetError> {
        let mut buf = Vec::with_capacity(576);
        m.encode(&mut Encoder::new(&mut buf))
            .map_err(|e| client_err(&self.cfg.interface, format!("encode: {e}")))?;
        self.socket
            .send_to(&buf, to)
            .await
            .map_err(|e| client_err(&self.cfg.interface, format!("send to {to}: {e}")))?;
        Ok(())
    }

    /// Waits until `deadline` for a reply to `xid` of one of `kinds`.
    async fn receive(&self, xid: u32, kinds: &[MessageType], deadline: Instant) -> Option<Message> {
        let mut buf = vec![0u8; 1500];
        loop {
            let r = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await;
            let n = match r {
                Err(_) => return None,
                Ok(Err(e)) => {
                    tracing::warn!(interface = %self.cfg.interface, "receive: {e}");
                    tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(200))).await;
                    continue;
                }
                Ok(Ok((n, _))) => n,
            };
            let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            if m.xid() == xid && m.chaddr() == self.mac && m.opts().msg_type().is_some_and(|k| kinds.contains(&k)) {
                return Some(m);
            }
        }
    }

    /// INIT → SELECTING → REQUESTING → BOUND.
    async fn acquire(&self) -> Result<Option<Lease>, NetError> {
        let _ = self.state.send(State::Searching);
        let mut backoff = Duration::from_secs(1);
        loop {
            let xid: u32 = rand_xid();
            let discover = self.base(MessageType::Discover, xid);
            self.send(&discover, broadcast()).await?;
            let offer = self.receive(xid, &[MessageType::Offer], Instant::now() + backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(16));
            let Some(offer) = offer else { continue };
            let Some(server) = server_id(&offer) else { continue };
            let mut req = self.base(MessageType::Request, xid);
            req.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
            req.opts_mut().insert(DhcpOption::ServerIdentifier(server));
            for _ in 0..3 {
                self.send(&req, broadcast()).await?;
                match self
                    .receive(
                        xid,
                        &[MessageType::Ack, MessageType::Nak],
                        Instant::now() + Duration::from_secs(3),
                    )
                    .await
                {
                    Some(ack) if ack.opts().has_msg_type(MessageType::Ack) => {
                        let lease = parse_lease(&ack, server);
                        self.bind(&lease, 0).await?;
                        return Ok(Some(lease));
                    }
                    Some(_) => break, // NAK: start over
                    None => {}
                }
            }
        }
    }

    /// BOUND → RENEWING (T1) → REBINDING (T2) → expired. Returns the renewed
    /// lease, or `None` to start from scratch.
    async fn keep(&self, lease: Lease) -> Result<Option<Lease>, NetError> {
        let renewals = match &*self.state.borrow() {
            State::Bound { renewals, .. } => *renewals,
            _ => 0,
        };
        let t1 = lease.obtained + lease.t1;
        let t2 = lease.obtained + lease.t2;
        let end = lease.obtained + lease.lease_time;
        tokio::time::sleep_until(t1).await;
        let xid = rand_xid();
        let mut req = self.base(MessageType::Request, xid);
        req.set_ciaddr(lease.address.addr);
        // RENEWING: unicast to the server that granted the lease.
        while Instant::now() < t2 {
            self.send(&req, SocketAddrV4::new(lease.server, SERVER_PORT)).await?;
            let wait = retry_wait(t2);
            if let Some(r) = self.answer(&req, &lease, wait, renewals).await? {
                return Ok(r);
            }
        }
        // REBINDING: any server, broadcast.
        while Instant::now() < end {
            self.send(&req, broadcast()).await?;
            let wait = retry_wait(end);
            if let Some(r) = self.answer(&req, &lease, wait, renewals).await? {
                return Ok(r);
            }
        }
        tracing::warn!(interface = %self.cfg.interface, address = %lease.address, "lease expired");
        self.unbind(&lease).await;
        Ok(None)
    }

    /// Waits for the answer to a renew/rebind request. `Some(Some(l))` renewed,
    /// `Some(None)` refused (start over), `None` no answer yet.
    async fn answer(
        &self,
        req: &Message,
        lease: &Lease,
        until: Instant,
        renewals: u32,
    ) -> Result<Option<Option<Lease>>, NetError> {
        match self
            .receive(req.xid(), &[MessageType::Ack, MessageType::Nak], until)
            .await
        {
            Some(m) if m.opts().has_msg_type(MessageType::Ack) => {
                let server = server_id(&m).unwrap_or(lease.server);
                let renewed = parse_lease(&m, server);
                self.bind(&renewed, renewals + 1).await?;
                Ok(Some(Some(renewed)))
            }
            Some(_) => {
                tracing::warn!(interface = %self.cfg.interface, address = %lease.address, "server refused the renewal (NAK)");
                self.unbind(lease).await;
                Ok(Some(None))
            }
            None => Ok(None),
        }
    }

    /// Puts the lease on the interface: address, default route, resolv.conf.
    async fn bind(&self, lease: &Lease, renewals: u32) -> Result<(), NetError> {
        let iface = &self.cfg.interface;
        self.rtnl
            .set_ipv4_addrs(self.index, &[lease.address])
            .await
            .map_err(|e| client_err(iface, format!("set address {}: {e}", lease.address)))?;
        if let Some(gw) = lease.router {
            self.rtnl
                .replace_default_route(gw, self.index)
                .await
                .map_err(|e| client_err(iface, format!("default route via {gw}: {e}")))?;
        }
        write_resolv_conf(&self.cfg.resolv_conf, &lease.dns, lease.domain.as_deref())?;
        let _ = self.dns.send(lease.dns.clone());
        if renewals == 0 {
            tracing::info!(interface = %iface, address = %lease.address, router = ?lease.router, "DHCP lease for {:?}", lease.lease_time);
        } else {
            tracing::debug!(interface = %iface, address = %lease.address, "DHCP lease renewed");
        }
        let _ = self.state.send(State::Bound {
            lease: lease.clone(),
            renewals,
        });
        Ok(())
    }

    async fn unbind(&self, lease: &Lease) {
        if let Err(e) = self.rtnl.del_addr(self.index, lease.address).await {
            tracing::warn!(interface = %self.cfg.interface, "remove {}: {e}", lease.address);
        }
        let _ = self.state.send(State::Searching);
    }

    async fn release(&self, lease: &Lease) {
        let mut m = self.base(MessageType::Release, rand_xid());
        m.set_flags(Flags::default());
        m.set_ciaddr(lease.address.addr);
        m.opts_mut().remove(OptionCode::ParameterRequestList);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(lease.server));
        if let Err(e) = self.send(&m, SocketAddrV4::new(lease.server, SERVER_PORT)).await {
            tracing::warn!("{e}");
        }
        // The RELEASE is unicast: it may still wait for the server's ARP reply in the
        // kernel, and removing the address now would drop it. Give it a moment to leave.
        tokio::time::sleep(RELEASE_GRACE).await;
        tracing::info!(interface = %self.cfg.interface, address = %lease.address, "DHCP lease released");
        self.unbind(lease).await;
    }
}

/// How long a RELEASE gets to leave before the address is removed (see `release`).
const RELEASE_GRACE: Duration = Duration::from_millis(200);

fn broadcast() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT)
}

fn rand_xid() -> u32 {
    // dhcproto draws message ids from its RNG; borrow one.
    Message::default().xid()
}

/// RFC 2131 4.4.5: retry after half the time left, but not more often than
/// every 60 s (shortened for short test leases: never less than 1 s).
fn retry_wait(deadline: Instant) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    let wait = (left / 2).clamp(Duration::from_secs(1).min(left), Duration::from_secs(60));
    Instant::now() + wait.min(left)
}

fn server_id(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

fn parse_lease(ack: &Message, server: Ipv4Addr) -> Lease {
    let o = ack.opts();
    let mask = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => *m,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let lease_time = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(s)) => Duration::from_secs(u64::from(*s)),
        _ => Duration::from_secs(3600),
    };
    let t1 = match o.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(s)) => Duration::from_secs(u64::from(*s)),
        _ => lease_time / 2,
    };
    let t2 = match o.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(s)) => Duration::from_secs(u64::from(*s)),
        _ => lease_time * 7 / 8,
    };
    Lease {
        address: Ipv4Cidr {
            addr: ack.yiaddr(),
            prefix: u32::from(mask).leading_ones() as u8,
        },
        server,
        router: match o.get(OptionCode::Router) {
            Some(DhcpOption::Router(r)) => r.first().copied(),
            _ => None,
        },
        dns: match o.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(d)) => d.clone(),
            _ => Vec::new(),
        },
        domain: match o.get(OptionCode::DomainName) {
            Some(DhcpOption::DomainName(d)) => Some(d.clone()),
            _ => None,
        },
        lease_time,
        t1: t1.min(lease_time),
        t2: t2.clamp(t1.min(lease_time), lease_time),
        obtained: Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_default_and_clamp() {
        let mut ack = Message::default();
        ack.set_yiaddr(Ipv4Addr::new(192, 168, 7, 9));
        ack.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)));
        ack.opts_mut().insert(DhcpOption::AddressLeaseTime(100));
        ack.opts_mut().insert(DhcpOption::Rebinding(500));
        let l = parse_lease(&ack, Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(l.address.to_string(), "192.168.7.9/16");
        assert_eq!(l.t1, Duration::from_secs(50));
        assert_eq!(l.t2, Duration::from_secs(100));
        assert_eq!(l.router, None);
    }
}
