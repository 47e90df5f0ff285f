//! Host networking from the config: uplink, bridges, VLANs, NAT, DHCP, taps.
//!
//! [`apply`] reconciles the kernel's state with `network:` idempotently and
//! reports each part separately, so one broken bridge does not stop the others.
//! [`Services`] then runs what must keep running: the uplink's DHCP client, a
//! DHCP server and a DNS forwarder on each `nat`/`isolated` bridge with `dhcp:`.
//! [`tap`] makes the per-guest-NIC taps keel-vmm is handed.
//!
//! Everything acts on the network namespace of the calling thread, which is how
//! the integration tests run it inside throw-away namespaces.

pub mod bridge;
pub mod dhcp_client;
pub mod dhcp_server;
pub mod dns;
pub mod link;
pub mod nat;
mod services;
pub mod sysctl;
pub mod tap;
pub mod uplink;
pub mod vlan;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use services::Services;

use crate::config::{BridgeMode, Config, UplinkAddress};
use crate::outcome;
use link::{KEEL_ALIAS, Link, Rtnl};

/// Everything a network error can be; each names the interface, bridge or file.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: cannot open a route-netlink socket: {source}")]
    Netlink { source: std::io::Error },
    #[error("interface {name}: {op}: {source}")]
    Link {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("uplink interface {name} does not exist; check network.uplink.interface (or use `auto`)")]
    NoSuchInterface { name: String },
    #[error("uplink `auto`: {}", no_uplink_text(candidates, *waited))]
    NoUplink { candidates: Vec<String>, waited: Duration },
    #[error("bridge {name}: {message}")]
    Bridge { name: String, message: String },
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("nftables table `keel`: {source}")]
    Nftables { source: std::io::Error },
    #[error("{}: {op}: {source}", path.display())]
    File {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("tap {name}: {op}: {source}")]
    Tap {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("DHCP server on {bridge}: {op}: {source}")]
    DhcpServer {
        bridge: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("DHCP client on {interface}: {message}")]
    DhcpClient { interface: String, message: String },
    #[error("DNS forwarder on {bridge}: {op}: {source}")]
    Dns {
        bridge: String,
        op: &'static str,
        source: std::io::Error,
    },
}

fn no_uplink_text(candidates: &[String], waited: Duration) -> String {
    if candidates.is_empty() {
        "no physical NIC found; name the interface in network.uplink.interface".into()
    } else {
        format!(
            "none of the physical NICs ({}) reported carrier within {:?}; plug in a cable or name the interface",
            candidates.join(", "),
            waited
        )
    }
}

/// Where [`apply`] and [`Services`] keep state and how long they wait.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory of the DHCP servers' lease files, one per bridge
    /// (`<bridge>.leases.json`); on the data partition so leases survive reboots.
    pub lease_dir: PathBuf,
    /// The host's resolver file, written from the static DNS list or the DHCP lease.
    pub resolv_conf: PathBuf,
    /// How long `interface: auto` waits for a NIC to report carrier.
    pub carrier_timeout: Duration,
    /// Run a DNS forwarder on the address of each bridge with a DHCP server
    /// (the DHCP server announces that address as the guests' DNS server).
    pub dns_forwarder: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lease_dir: PathBuf::from("/data/keel/dhcp"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            carrier_timeout: Duration::from_secs(10),
            dns_forwarder: true,
        }
    }
}

/// Which part of the network an [`Item`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Uplink,
    Bridge,
    Forwarding,
    Nat,
    Cleanup,
    DhcpServer,
    DhcpClient,
    Dns,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Uplink => "uplink",
            Component::Bridge => "bridge",
            Component::Forwarding => "forwarding",
            Component::Nat => "nftables",
            Component::Cleanup => "cleanup",
            Component::DhcpServer => "dhcp-server",
            Component::DhcpClient => "dhcp-client",
            Component::Dns => "dns",
        })
    }
}

/// The outcome of one part of [`apply`] or [`Services::start`].
pub type Item = crate::outcome::Item<Component, NetError>;

/// The uplink as [`apply`] found and configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkState {
    /// The NIC (e.g. enp1s0).
    pub nic: String,
    /// Where the host's uplink address lives: the NIC, or the `bridged` bridge
    /// it joined. NAT leaves through it and the DHCP client runs on it.
    pub host_interface: String,
    pub dhcp: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub items: Vec<Item>,
    pub uplink: Option<UplinkState>,
}

impl Report {
    fn push(&mut self, component: Component, name: &str, result: Result<String, NetError>) {
        self.items.push(Item::logged(component, name, result));
    }

    pub fn is_ok(&self) -> bool {
        outcome::all_ok(&self.items)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Item> {
        outcome::errors(&self.items)
    }

    /// Whether bridge `name` came up as declared (guests on it can start).
    pub fn bridge_ok(&self, name: &str) -> bool {
        outcome::succeeded(&self.items, Component::Bridge, name)
    }
}

/// Reconciles uplink, bridges, VLANs, forwarding and the nftables table with
/// `cfg.network`. Idempotent: a second call with the same config changes nothing.
/// Dynamic pieces (DHCP, DNS) are started afterwards with [`Services::start`].
pub async fn apply(cfg: &Config, opts: &Options) -> Report {
    let mut report = Report::default();
    let rtnl = match Rtnl::connect() {
        Ok(r) => r,
        Err(source) => {
            report.push(Component::Uplink, "netlink", Err(NetError::Netlink { source }));
            return report;
        }
    };
    let up = &cfg.network.uplink;

    // 1. The uplink NIC.
    let nic = match uplink::resolve(&rtnl, up, opts.carrier_timeout).await {
        Ok(l) => Some(l),
        Err(e) => {
            report.push(Component::Uplink, &up.interface, Err(e));
            None
        }
    };

    // 2. Bridges, each on its own.
    for b in &cfg.network.bridges {
        let r = bridge::reconcile(&rtnl, b, nic.as_ref()).await;
        report.push(Component::Bridge, &b.name, r);
    }

    // 3. Links Keel made earlier that the config no longer declares, and an
    //    uplink still enslaved to a bridge it should have left.
    cleanup(&rtnl, cfg, nic.as_ref(), &mut report).await;

    // 4. The uplink's addressing, on the bridge it joined when there is one.
    let host_if_name = cfg
        .network
        .bridges
        .iter()
        .find(|b| *b.mode == BridgeMode::Bridged && b.vlan.is_none() && report.bridge_ok(&b.name))
        .map(|b| b.name.value.clone());
    if let Some(nic) = &nic {
        let host_name = host_if_name.clone().unwrap_or_else(|| nic.name.clone());
        let result = configure_uplink(&rtnl, cfg, opts, nic, &host_name).await;
        report.push(Component::Uplink, &nic.name, result);
        report.uplink = Some(UplinkState {
            nic: nic.name.clone(),
            host_interface: host_name,
            dhcp: *up.address == UplinkAddress::Dhcp,
        });
    }

    // 5. Forwarding: on when a nat bridge exists; never on isolated bridges.
    let r = configure_forwarding(cfg);
    report.push(Component::Forwarding, "ipv4", r);

    // 6. The nftables table, replaced whole.
    let host_if = report.uplink.as_ref().map(|u| u.host_interface.clone());
    let rules = nat::Ruleset::from_config(cfg, host_if.as_deref());
    let r = nat::apply(&rules)
        .map(|()| {
            format!(
                "table ip {}: {} nat, {} isolated bridge(s), masquerade via {}",
                nat::TABLE,
                rules.nat.len(),
                rules.isolated.len(),
                host_if.as_deref().unwrap_or("(no uplink)")
            )
        })
        .map_err(|source| NetError::Nftables { source });
    report.push(Component::Nat, nat::TABLE, r);
    report
}

async fn configure_uplink(
    rtnl: &Rtnl,
    cfg: &Config,
    opts: &Options,
    nic: &Link,
    host_name: &str,
) -> Result<String, NetError> {
    let up = &cfg.network.uplink;
    let host_if = rtnl
        .link(host_name)
        .await
        .map_err(|source| NetError::Link {
            name: host_name.to_owned(),
            op: "look up",
            source,
        })?
        .ok_or_else(|| NetError::NoSuchInterface {
            name: host_name.to_owned(),
        })?;
    match *up.address {
        UplinkAddress::Static(addr) => {
            let gw = up.gateway.as_ref().map(|g| g.value);
            uplink::configure_static(rtnl, nic, &host_if, addr, gw).await?;
            let dns: Vec<_> = up.dns.iter().map(|d| d.value).collect();
            uplink::write_resolv_conf(&opts.resolv_conf, &dns, None)?;
            Ok(format!(
                "{} on {}{}",
                addr,
                host_name,
                gw.map(|g| format!(", default via {g}")).unwrap_or_default()
            ))
        }
        UplinkAddress::Dhcp => {
            if nic.index != host_if.index {
                rtnl.set_ipv4_addrs(nic.index, &[])
                    .await
                    .map_err(|source| NetError::Link {
                        name: nic.name.clone(),
                        op: "move address off",
                        source,
                    })?;
            }
            Ok(format!("DHCP on {host_name} (client started with the services)"))
        }
    }
}

fn configure_forwarding(cfg: &Config) -> Result<String, NetError> {
    let any_nat = cfg.network.bridges.iter().any(|b| *b.mode == BridgeMode::Nat);
    let sys = |key: String, v: &str, r: std::io::Result<()>| {
        r.map_err(|source| NetError::Sysctl {
            key: format!("{key}={v}"),
            source,
        })
    };
    let v = if any_nat { "1" } else { "0" };
    // Writing ip_forward resets every interface's `forwarding`, so it goes first.
    sys("net.ipv4.ip_forward".into(), v, sysctl::set("net.ipv4.ip_forward", v))?;
    for b in &cfg.network.bridges {
        let v = match *b.mode {
            BridgeMode::Nat => "1",
            BridgeMode::Isolated => "0",
            BridgeMode::Bridged => continue,
        };
        let key = format!("net.ipv4.conf.{}.forwarding", b.name.value);
        match sysctl::set_conf(&b.name, "forwarding", v) {
            // A bridge that failed to come up was already reported.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => sys(key, v, r)?,
        }
    }
    Ok(format!("ip_forward={v}"))
}

async fn cleanup(rtnl: &Rtnl, cfg: &Config, nic: Option<&Link>, report: &mut Report) {
    let links = match rtnl.links().await {
        Ok(l) => l,
        Err(source) => {
            report.push(
                Component::Cleanup,
                "links",
                Err(NetError::Link {
                    name: "*".into(),
                    op: "list links",
                    source,
                }),
            );
            return;
        }
    };
    let declared: HashSet<&str> = cfg.network.bridges.iter().map(|b| b.name.value.as_str()).collect();
    let wanted_vlans: HashSet<String> = match nic {
        Some(nic) => cfg
            .network
            .bridges
            .iter()
            .filter(|b| *b.mode == BridgeMode::Bridged)
            .filter_map(|b| b.vlan.as_ref().map(|v| vlan::name(&nic.name, v.value)))
            .collect(),
        None => HashSet::new(),
    };
    for l in &links {
        if l.alias.as_deref() != Some(KEEL_ALIAS) {
            continue;
        }
        let stale = match l.kind.as_deref() {
            Some("bridge") => !declared.contains(l.name.as_str()),
            Some("vlan") => nic.is_some() && !wanted_vlans.contains(&l.name),
            _ => false,
        };
        if stale {
            let r = rtnl
                .delete(l.index)
                .await
                .map(|()| {
                    format!(
                        "removed {} {} (no longer declared)",
                        l.kind.as_deref().unwrap_or("link"),
                        l.name
                    )
                })
                .map_err(|source| NetError::Link {
                    name: l.name.clone(),
                    op: "delete",
                    source,
                });
            report.push(Component::Cleanup, &l.name, r);
        }
    }
    // The uplink leaves a bridge when no `bridged` bridge without VLAN claims it.
    if let Some(nic) = nic {
        let claimed = cfg
            .network
            .bridges
            .iter()
            .any(|b| *b.mode == BridgeMode::Bridged && b.vlan.is_none());
        let current = links.iter().find(|l| l.index == nic.index).and_then(|l| l.controller);
        if !claimed && current.is_some() {
            let r = rtnl
                .set_controller(nic.index, None)
                .await
                .map(|()| format!("{} left its bridge", nic.name))
                .map_err(|source| NetError::Link {
                    name: nic.name.clone(),
                    op: "leave bridge",
                    source,
                });
            report.push(Component::Cleanup, &nic.name, r);
        }
    }
}
