//! Small, typed helpers over rtnetlink (links, addresses, routes).
//!
//! rtnetlink's builders are flexible but wordy and their errors print the whole
//! netlink message; everything here returns `io::Error` (the kernel's errno) so
//! callers can wrap it with the interface name an operator recognises.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVlan, RouteMessageBuilder};

use crate::config::Ipv4Cidr;

/// The `ifalias` Keel puts on links it creates, so a later apply can tell its own
/// bridges (safe to delete when they leave the config) from anyone else's.
pub const KEEL_ALIAS: &str = "keel-managed";

/// What Keel needs to know about one network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `vlan`, `veth`, `tun`...; `None` for physical NICs (no link info).
    pub kind: Option<String>,
    /// Index of the bridge this link is a port of.
    pub controller: Option<u32>,
    /// Index of the parent link (VLANs, veths).
    pub parent: Option<u32>,
    pub vlan_id: Option<u16>,
    pub up: bool,
    pub carrier: bool,
    pub loopback: bool,
    pub alias: Option<String>,
    pub mac: Option<[u8; 6]>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            controller: None,
            parent: None,
            vlan_id: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            carrier: msg.header.flags.contains(LinkFlags::LowerUp),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            alias: None,
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Link(p) => link.parent = Some(*p),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(a);
                    link.mac = Some(mac);
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                            LinkInfo::Data(InfoData::Vlan(v)) => {
                                link.vlan_id = v.iter().find_map(|i| match i {
                                    InfoVlan::Id(id) => Some(*id),
                                    _ => None,
                                })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    /// A NIC with no link kind: hardware (or virtio) rather than a software device.
    pub fn is_physical(&self) -> bool {
        self.kind.is_none() && !self.loopback
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Other(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The kernel's errno behind an rtnetlink error, as an `io::Error`.
pub fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// A route-netlink connection bound to the network namespace of the thread that
/// opened it. The connection task is aborted when this is dropped.
pub struct Rtnl {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rtnl {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> io::Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        Ok(Rtnl { handle, task })
    }

    pub async fn links(&self) -> io::Result<Vec<Link>> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(to_io)? {
            out.push(Link::from_message(&msg));
        }
        out.sort_by_key(|l| l.index);
        Ok(out)
    }

    /// The link called `name`, or `None` when there is none.
    pub async fn link(&self, name: &str) -> io::Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    pub async fn link_by_index(&self, index: u32) -> io::Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(m) => Ok(m.map(|m| Link::from_message(&m))),
            Err(e) => {
                let e = to_io(e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Creates a bridge marked as Keel's, with STP off and no forward delay so
    /// guest ports forward as soon as they are attached.
    pub async fn create_bridge(&self, name: &str) -> io::Result<()> {
        let msg = LinkBridge::new(name)
            .stp_state(netlink_packet_route::link::BridgeStpState::Disabled)
            .forward_delay(0)
            .append_extra_attribute(LinkAttribute::IfAlias(KEEL_ALIAS.into()))
            .build();
        self.handle.link().add(msg).execute().await.map_err(to_io)
    }

    pub async fn create_vlan(&self, name: &str, parent: u32, id: u16) -> io::Result<()> {
        let msg = LinkVlan::new(name, parent, id)
            .append_extra_attribute(LinkAttribute::IfAlias(KEEL_ALIAS.into()))
            .build();
        self.handle.link().add(msg).execute().await.map_err(to_io)
    }

    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> io::Result<()> {
        let msg = LinkUnspec::new_with_index(index).address(mac.to_vec()).build();
        self.handle.link().set(msg).execute().await.map_err(to_io)
    }

    pub async fn set_up(&self, index: u32) -> io::Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle.link().set(msg).execute().await.map_err(to_io)
    }

    /// Makes `index` a port of bridge `controller`, or frees it with `None`.
    pub async fn set_controller(&self, index: u32, controller: Option<u32>) -> io::Result<()> {
        let b = LinkUnspec::new_with_index(index);
        let msg = match controller {
            Some(c) => b.controller(c).build(),
            None => b.nocontroller().build(),
        };
        self.handle.link().set(msg).execute().await.map_err(to_io)
    }

    pub async fn delete(&self, index: u32) -> io::Result<()> {
        self.handle.link().del(index).execute().await.map_err(to_io)
    }

    /// The IPv4 addresses on a link, with their prefix lengths.
    pub async fn ipv4_addrs(&self, index: u32) -> io::Result<Vec<Ipv4Cidr>> {
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(to_io)? {
            if msg.header.index != index || msg.header.family != AddressFamily::Inet {
                continue;
            }
            if let Some(addr) = address_of(&msg) {
                out.push(Ipv4Cidr {
                    addr,
                    prefix: msg.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    pub async fn add_addr(&self, index: u32, cidr: Ipv4Cidr) -> io::Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(cidr.addr), cidr.prefix)
            .replace()
            .execute()
            .await
            .map_err(to_io)
    }

    pub async fn del_addr(&self, index: u32, cidr: Ipv4Cidr) -> io::Result<()> {
        let mut stream = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = stream.try_next().await.map_err(to_io)? {
            if msg.header.index == index && msg.header.prefix_len == cidr.prefix && address_of(&msg) == Some(cidr.addr)
            {
                return self.handle.address().del(msg).execute().await.map_err(to_io);
            }
        }
        Ok(())
    }

    /// Makes the addresses on `index` exactly `want`: adds what is missing and
    /// removes every other IPv4 address.
    pub async fn set_ipv4_addrs(&self, index: u32, want: &[Ipv4Cidr]) -> io::Result<()> {
        let have = self.ipv4_addrs(index).await?;
        for stale in have.iter().filter(|c| !want.contains(c)) {
            self.del_addr(index, *stale).await?;
        }
        for missing in want.iter().filter(|c| !have.contains(c)) {
            self.add_addr(index, *missing).await?;
        }
        Ok(())
    }

    /// Sets (or replaces) the IPv4 default route through `gateway` on `index`.
    pub async fn replace_default_route(&self, gateway: Ipv4Addr, index: u32) -> io::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .protocol(RouteProtocol::Static)
            .build();
        self.handle.route().add(msg).replace().execute().await.map_err(to_io)
    }

    /// Removes the IPv4 default route, if there is one.
    pub async fn delete_default_route(&self) -> io::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        match self.handle.route().del(msg).execute().await.map_err(to_io) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

fn address_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
    // point-to-point links. Prefer LOCAL when both are present.
    let mut addr = None;
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(v)) => return Some(*v),
            AddressAttribute::Address(IpAddr::V4(v)) => addr = Some(*v),
            _ => {}
        }
    }
    addr
}
