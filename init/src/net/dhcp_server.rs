//! A DHCPv4 server for one `nat` or `isolated` bridge.
//!
//! Leases come from the declared range or from the static leases (by MAC); the
//! bridge's own address is announced as router and DNS server. Leases are kept
//! in a JSON file on the data partition, rewritten atomically on every change,
//! so a guest keeps its address across appliance reboots.
//!
//! The server is authoritative for its bridge: a REQUEST for an address it
//! would not give is answered with a NAK. Replies to clients without an address
//! are broadcast (a client cannot answer ARP for an address it does not have
//! yet); renewals are unicast to the client's address.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::NetError;
use crate::config::{Bridge, BridgeMode, Ipv4Cidr, Ipv4Range, MacAddr};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// How long an offered address stays reserved for the client it was offered to.
const OFFER_HOLD: Duration = Duration::from_secs(60);

/// What one bridge's server hands out.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub bridge: String,
    /// The bridge's own address and subnet; router, DNS and server identifier.
    pub address: Ipv4Cidr,
    pub range: Ipv4Range,
    pub lease_time: Duration,
    pub static_leases: Vec<StaticLease>,
    pub lease_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StaticLease {
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub hostname: Option<String>,
}

impl ServerConfig {
    /// The server for bridge `b`, when it is `nat`/`isolated` with `dhcp:`.
    pub fn from_bridge(b: &Bridge, lease_dir: &Path) -> Option<ServerConfig> {
        let dhcp = b.dhcp.as_ref()?;
        let address = b.address.as_ref()?.value;
        if *b.mode == BridgeMode::Bridged {
            return None;
        }
        Some(ServerConfig {
            bridge: b.name.value.clone(),
            address,
            range: dhcp.range.value,
            lease_time: dhcp.lease_time.get(),
            static_leases: dhcp
                .static_leases
                .iter()
                .map(|s| StaticLease {
                    mac: s.mac.value,
                    address: s.address.value,
                    hostname: s.hostname.as_ref().map(|h| h.value.clone()),
                })
                .collect(),
            lease_file: lease_dir.join(format!("{}.leases.json", b.name.value)),
        })
    }
}

/// One lease as stored in the lease file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: String,
    pub address: Ipv4Addr,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    leases: Vec<Lease>,
}

/// The server's state: leases, pending offers, declined addresses. Pure logic,
/// driven by [`Server::handle`]; [`run`] feeds it packets.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    leases: HashMap<MacAddr, Lease>,
    offers: HashMap<MacAddr, (Ipv4Addr, SystemTime)>,
    declined: HashMap<Ipv4Addr, SystemTime>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Server {
    /// Loads the lease file (a missing one is an empty start; an unreadable one
    /// is moved aside with a warning so the bridge still gets DHCP).
    pub fn load(cfg: ServerConfig) -> Result<Server, NetError> {
        let mut leases = HashMap::new();
        match std::fs::read(&cfg.lease_file) {
            Ok(bytes) => match serde_json::from_slice::<LeaseFile>(&bytes) {
                Ok(file) => {
                    for l in file.leases {
                        if let Ok(mac) = l.mac.parse::<MacAddr>() {
                            leases.insert(mac, l);
                        }
                    }
                }
                Err(e) => {
                    let aside = cfg.lease_file.with_extension("json.corrupt");
                    tracing::warn!(bridge = %cfg.bridge, file = %cfg.lease_file.display(), "lease file unreadable ({e}); moved to {} and starting empty", aside.display());
                    let _ = std::fs::rename(&cfg.lease_file, &aside);
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetError::File {
                    path: cfg.lease_file.clone(),
                    op: "read lease file",
                    source,
                });
            }
        }
        Ok(Server {
            cfg,
            leases,
            offers: HashMap::new(),
            declined: HashMap::new(),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    fn static_for(&self, mac: MacAddr) -> Option<&StaticLease> {
        self.cfg.static_leases.iter().find(|s| s.mac == mac)
    }

    /// Whether `ip` may go to `mac` now: in the subnet, not the bridge, not
    /// network/broadcast, not reserved or leased or offered to someone else.
    fn available(&self, ip: Ipv4Addr, mac: MacAddr, now: SystemTime) -> bool {
        let net = self.cfg.address;
        if !net.contains(ip) || ip == net.addr {
            return false;
        }
        if net.prefix < 31 && (ip == net.network() || ip == net.broadcast()) {
            return false;
        }
        if self.cfg.static_leases.iter().any(|s| s.address == ip && s.mac != mac) {
            return false;
        }
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        let t = unix(now);
        if self
            .leases
            .iter()
            .any(|(m, l)| *m != mac && l.address == ip && l.expires > t)
        {
            return false;
        }
        !self
            .offers
            .iter()
            .any(|(m, (a, until))| *m != mac && *a == ip && *until > now)
    }

    /// The address `mac` gets: its static lease, its previous lease, the one it
    /// asks for, or the first free one in the range (then the longest expired).
    fn choose(&self, mac: MacAddr, requested: Option<Ipv4Addr>, now: SystemTime) -> Option<Ipv4Addr> {
        if let Some(s) = self.static_for(mac) {
            return Some(s.address);
        }
        let in_range_free = |ip: Ipv4Addr| self.cfg.range.contains(ip) && self.available(ip, mac, now);
        if let Some(l) = self.leases.get(&mac)
            && in_range_free(l.address)
        {
            return Some(l.address);
        }
        if let Some((ip, _)) = self.offers.get(&mac)
            && in_range_free(*ip)
        {
            return Some(*ip);
        }
        if let Some(ip) = requested.filter(|ip| in_range_free(*ip)) {
            return Some(ip);
        }
        let (start, end) = (u32::from(self.cfg.range.start), u32::from(self.cfg.range.end));
        let never_leased = |ip: Ipv4Addr| !self.leases.values().any(|l| l.address == ip);
        if let Some(ip) = (start..=end)
            .map(Ipv4Addr::from)
            .find(|ip| in_range_free(*ip) && never_leased(*ip))
        {
            return Some(ip);
        }
        // Range exhausted by history: reuse the address whose lease ended first.
        let mut expired: Vec<&Lease> = self.leases.values().filter(|l| in_range_free(l.address)).collect();
        expired.sort_by_key(|l| l.expires);
        expired.first().map(|l| l.address)
    }

    /// Answers one client message; `None` when there is nothing to send.
    /// `Ok(true)` in the second element means the lease table changed (save it).
    pub fn handle(&mut self, req: &Message, now: SystemTime) -> (Option<Message>, bool) {
        if req.opcode() != Opcode::BootRequest || req.chaddr().len() != 6 {
            return (None, false);
        }
        let mut m = [0u8; 6];
        m.copy_from_slice(req.chaddr());
        let mac = MacAddr(m);
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let hostname = match req.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        };
        match req.opts().msg_type() {
            Some(MessageType::Discover) => {
                let Some(ip) = self.choose(mac, requested, now) else {
                    tracing::warn!(bridge = %self.cfg.bridge, %mac, "no free address in {}", self.cfg.range);
                    return (None, false);
                };
                self.offers.insert(mac, (ip, now + OFFER_HOLD));
                (Some(self.reply(req, MessageType::Offer, ip, mac)), false)
            }
            Some(MessageType::Request) => {
                if let Some(sid) = server_id
                    && sid != self.cfg.address.addr
                {
                    // The client took another server's offer.
                    self.offers.remove(&mac);
                    return (None, false);
                }
                let ciaddr = req.ciaddr();
                let Some(want) = requested.or((!ciaddr.is_unspecified()).then_some(ciaddr)) else {
                    return (None, false);
                };
                let ok = match self.static_for(mac) {
                    Some(s) => s.address == want,
                    None => self.cfg.range.contains(want) && self.available(want, mac, now),
                };
                if !ok {
                    return (Some(self.nak(req)), false);
                }
                self.offers.remove(&mac);
                let hostname = hostname.or_else(|| self.static_for(mac).and_then(|s| s.hostname.clone()));
                self.leases.insert(
                    mac,
                    Lease {
                        mac: mac.to_string(),
                        address: want,
                        expires: unix(now + self.cfg.lease_time),
                        hostname,
                    },
                );
                tracing::info!(bridge = %self.cfg.bridge, %mac, address = %want, "lease granted");
                (Some(self.reply(req, MessageType::Ack, want, mac)), true)
            }
            Some(MessageType::Release) => match self.leases.get_mut(&mac) {
                // Keep the record, so the client gets the same address next time.
                Some(l) if l.address == req.ciaddr() => {
                    l.expires = unix(now);
                    tracing::info!(bridge = %self.cfg.bridge, %mac, address = %l.address, "lease released");
                    (None, true)
                }
                _ => (None, false),
            },
            Some(MessageType::Decline) => {
                if let Some(ip) = requested {
                    tracing::warn!(bridge = %self.cfg.bridge, %mac, address = %ip, "client declined address (in use by someone else?)");
                    self.declined.insert(ip, now + self.cfg.lease_time);
                    let changed = self.leases.get(&mac).is_some_and(|l| l.address == ip);
                    if changed {
                        self.leases.remove(&mac);
                    }
                    return (None, changed);
                }
                (None, false)
            }
            Some(MessageType::Inform) => {
                let mut r = self.reply(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED, mac);
                r.opts_mut().remove(OptionCode::AddressLeaseTime);
                r.opts_mut().remove(OptionCode::Renewal);
                r.opts_mut().remove(OptionCode::Rebinding);
                (Some(r), false)
            }
            _ => (None, false),
        }
    }

    fn base_reply(&self, req: &Message, kind: MessageType) -> Message {
        let mut r = Message::default();
        r.set_opcode(Opcode::BootReply)
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr());
        r.opts_mut().insert(DhcpOption::MessageType(kind));
        r.opts_mut().insert(DhcpOption::ServerIdentifier(self.cfg.address.addr));
        r
    }

    fn reply(&self, req: &Message, kind: MessageType, ip: Ipv4Addr, mac: MacAddr) -> Message {
        let mut r = self.base_reply(req, kind);
        r.set_yiaddr(ip).set_ciaddr(req.ciaddr());
        let secs = self.cfg.lease_time.as_secs().min(u32::MAX as u64) as u32;
        let net = self.cfg.address;
        let o = r.opts_mut();
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::from(net.mask())));
        o.insert(DhcpOption::BroadcastAddr(net.broadcast()));
        o.insert(DhcpOption::Router(vec![net.addr]));
        o.insert(DhcpOption::DomainNameServer(vec![net.addr]));
        o.insert(DhcpOption::AddressLeaseTime(secs));
        o.insert(DhcpOption::Renewal(secs / 2));
        o.insert(DhcpOption::Rebinding(secs / 8 * 7));
        if let Some(h) = self.static_for(mac).and_then(|s| s.hostname.clone()) {
            o.insert(DhcpOption::Hostname(h));
        }
        r
    }

    fn nak(&self, req: &Message) -> Message {
        self.base_reply(req, MessageType::Nak)
    }

    /// Writes the lease table (temp file, fsync, rename).
    pub fn save(&self) -> Result<(), NetError> {
        let path = &self.cfg.lease_file;
        let err = |source| NetError::File {
            path: path.clone(),
            op: "write lease file",
            source,
        };
        let mut leases: Vec<Lease> = self.leases.values().cloned().collect();
        leases.sort_by_key(|l| l.address);
        let text = serde_json::to_vec_pretty(&LeaseFile { version: 1, leases })
            .map_err(io::Error::other)
            .map_err(err)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&text).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// Where a reply goes (RFC 2131 4.1): to the relay, to the client's current
/// address, or broadcast on the bridge.
fn destination(req: &Message, reply: &Message) -> SocketAddrV4 {
    let nak = reply.opts().has_msg_type(MessageType::Nak);
    if !req.giaddr().is_unspecified() {
        SocketAddrV4::new(req.giaddr(), SERVER_PORT)
    } else if !req.ciaddr().is_unspecified() && !nak {
        SocketAddrV4::new(req.ciaddr(), CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }
}

/// A UDP socket on `port` bound to one interface, able to broadcast. Several
/// such sockets (one per bridge) share the port because each is bound to a
/// different device.
pub(crate) fn bound_udp(iface: &str, addr: Ipv4Addr, port: u16) -> io::Result<UdpSocket> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(addr, port)),
    )?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// A server bound to its bridge, ready to [`BoundServer::run`].
pub struct BoundServer {
    server: Server,
    socket: UdpSocket,
}

/// Loads the leases and binds UDP port 67 on the bridge. Errors here are
/// reported by the caller; the bridge's guests then get no DHCP.
pub fn bind(cfg: ServerConfig) -> Result<BoundServer, NetError> {
    let bridge = cfg.bridge.clone();
    let server = Server::load(cfg)?;
    let socket = bound_udp(&bridge, Ipv4Addr::UNSPECIFIED, SERVER_PORT).map_err(|source| NetError::DhcpServer {
        bridge,
        op: "bind udp/67",
        source,
    })?;
    Ok(BoundServer { server, socket })
}

impl BoundServer {
    /// Serves until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), NetError> {
        let bridge = self.server.cfg.bridge.clone();
        let mut buf = vec![0u8; 1500];
        loop {
            let (n, from) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => r.map_err(|source| NetError::DhcpServer { bridge: bridge.clone(), op: "receive", source })?,
                _ = shutdown.changed() => return Ok(()),
            };
            let req = match Message::decode(&mut Decoder::new(&buf[..n])) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(bridge, %from, "ignoring malformed DHCP packet: {e}");
                    continue;
                }
            };
            let (reply, changed) = self.server.handle(&req, SystemTime::now());
            if changed && let Err(e) = self.server.save() {
                tracing::error!(bridge, "{e}");
            }
            let Some(reply) = reply else { continue };
            let mut out = Vec::with_capacity(576);
            if let Err(e) = reply.encode(&mut Encoder::new(&mut out)) {
                tracing::error!(bridge, "cannot encode DHCP reply: {e}");
                continue;
            }
            let to = destination(&req, &reply);
            if let Err(e) = self.socket.send_to(&out, to).await {
                tracing::warn!(bridge, %to, "cannot send DHCP reply: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> ServerConfig {
        ServerConfig {
            bridge: "br-test".into(),
            address: "10.9.0.1/24".parse().unwrap(),
            range: "10.9.0.100-10.9.0.102".parse().unwrap(),
            lease_time: Duration::from_secs(600),
            static_leases: vec![StaticLease {
                mac: "52:54:00:00:00:10".parse().unwrap(),
                address: "10.9.0.10".parse().unwrap(),
                hostname: Some("db".into()),
            }],
            lease_file: dir.join("br-test.leases.json"),
        }
    }

    fn request(kind: MessageType, mac: [u8; 6], requested: Option<Ipv4Addr>, server: Option<Ipv4Addr>) -> Message {
        let mut m = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(ip) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        if let Some(ip) = server {
            m.opts_mut().insert(DhcpOption::ServerIdentifier(ip));
        }
        m
    }

    fn lease(s: &mut Server, mac: [u8; 6], now: SystemTime) -> Ipv4Addr {
        let (offer, _) = s.handle(&request(MessageType::Discover, mac, None, None), now);
        let offer = offer.expect("offer");
        assert!(offer.opts().has_msg_type(MessageType::Offer));
        let sid = Some(s.cfg.address.addr);
        let (ack, changed) = s.handle(&request(MessageType::Request, mac, Some(offer.yiaddr()), sid), now);
        let ack = ack.expect("ack");
        assert!(ack.opts().has_msg_type(MessageType::Ack), "{ack:?}");
        assert!(changed);
        ack.yiaddr()
    }

    #[test]
    fn leases_from_range_static_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut s = Server::load(cfg(dir.path())).unwrap();
        let a = lease(&mut s, [2, 0, 0, 0, 0, 1], now);
        let b = lease(&mut s, [2, 0, 0, 0, 0, 2], now);
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 100));
        assert_eq!(b, Ipv4Addr::new(10, 9, 0, 101));
        // Static lease wins, whatever the client asks for.
        let st = lease(&mut s, [0x52, 0x54, 0, 0, 0, 0x10], now);
        assert_eq!(st, Ipv4Addr::new(10, 9, 0, 10));
        s.save().unwrap();

        // After a "reboot" the same client gets the same address.
        let mut s2 = Server::load(cfg(dir.path())).unwrap();
        assert_eq!(lease(&mut s2, [2, 0, 0, 0, 0, 2], now), b);
    }

    #[test]
    fn naks_foreign_and_taken_addresses_and_exhausts() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut s = Server::load(cfg(dir.path())).unwrap();
        let a = lease(&mut s, [2, 0, 0, 0, 0, 1], now);
        // Another client asking for a's address is refused.
        let (r, _) = s.handle(&request(MessageType::Request, [2, 0, 0, 0, 0, 9], Some(a), None), now);
        assert!(r.unwrap().opts().has_msg_type(MessageType::Nak));
        // The static address is reserved for its MAC.
        let (r, _) = s.handle(
            &request(
                MessageType::Request,
                [2, 0, 0, 0, 0, 9],
                Some(Ipv4Addr::new(10, 9, 0, 10)),
                None,
            ),
            now,
        );
        assert!(r.unwrap().opts().has_msg_type(MessageType::Nak));
        // A request addressed to another server is ignored.
        let (r, _) = s.handle(
            &request(
                MessageType::Request,
                [2, 0, 0, 0, 0, 9],
                Some(a),
                Some(Ipv4Addr::new(10, 9, 0, 2)),
            ),
            now,
        );
        assert!(r.is_none());
        lease(&mut s, [2, 0, 0, 0, 0, 2], now);
        lease(&mut s, [2, 0, 0, 0, 0, 3], now);
        // Range of three is used up.
        let (r, _) = s.handle(&request(MessageType::Discover, [2, 0, 0, 0, 0, 4], None, None), now);
        assert!(r.is_none());
        // Once the leases expire, their addresses are reused.
        let later = now + Duration::from_secs(601);
        assert!(s.cfg.range.contains(lease(&mut s, [2, 0, 0, 0, 0, 4], later)));
    }

    #[test]
    fn options_name_the_bridge_as_router_and_dns() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Server::load(cfg(dir.path())).unwrap();
        let (r, _) = s.handle(
            &request(MessageType::Discover, [2, 0, 0, 0, 0, 1], None, None),
            SystemTime::now(),
        );
        let r = r.unwrap();
        let gw = Ipv4Addr::new(10, 9, 0, 1);
        assert_eq!(r.opts().get(OptionCode::Router), Some(&DhcpOption::Router(vec![gw])));
        assert_eq!(
            r.opts().get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![gw]))
        );
        assert_eq!(
            r.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            r.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(600))
        );
    }

    #[test]
    fn corrupt_lease_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        std::fs::write(&c.lease_file, b"{not json").unwrap();
        let s = Server::load(c.clone()).unwrap();
        assert_eq!(s.leases().count(), 0);
        assert!(c.lease_file.with_extension("json.corrupt").exists());
    }
}
