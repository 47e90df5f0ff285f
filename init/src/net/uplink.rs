//! The uplink: which NIC it is, and its static addressing. (Dynamic addressing
//! is `dhcp_client`, run as a service.)

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::NetError;
use super::link::{Link, Rtnl};
use crate::config::{Ipv4Cidr, Uplink};

/// Finds the uplink NIC and brings it up. `auto` picks the first physical NIC
/// (lowest index) that reports carrier within `carrier_timeout`.
pub async fn resolve(rtnl: &Rtnl, up: &Uplink, carrier_timeout: Duration) -> Result<Link, NetError> {
    let link_err = |name: &str, op| {
        let name = name.to_owned();
        move |source| NetError::Link { name, op, source }
    };
    if up.interface.value != "auto" {
        let name = up.interface.value.as_str();
        let link = rtnl
            .link(name)
            .await
            .map_err(link_err(name, "look up"))?
            .ok_or_else(|| NetError::NoSuchInterface { name: name.to_owned() })?;
        rtnl.set_up(link.index).await.map_err(link_err(name, "set up"))?;
        return Ok(link);
    }

    let all = rtnl.links().await.map_err(link_err("auto", "list links"))?;
    let candidates: Vec<Link> = all.into_iter().filter(Link::is_physical).collect();
    if candidates.is_empty() {
        return Err(NetError::NoUplink {
            candidates: Vec::new(),
            waited: Duration::ZERO,
        });
    }
    // Carrier is only reported once a link is up.
    for c in &candidates {
        rtnl.set_up(c.index).await.map_err(link_err(&c.name, "set up"))?;
    }
    let start = Instant::now();
    loop {
        let now = rtnl.links().await.map_err(link_err("auto", "list links"))?;
        if let Some(l) = pick_auto(&now) {
            return Ok(l.clone());
        }
        if start.elapsed() >= carrier_timeout {
            return Err(NetError::NoUplink {
                candidates: candidates.iter().map(|c| c.name.clone()).collect(),
                waited: carrier_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `auto`'s choice among the current links: the first physical NIC with carrier.
pub fn pick_auto(links: &[Link]) -> Option<&Link> {
    links
        .iter()
        .filter(|l| l.is_physical() && l.carrier)
        .min_by_key(|l| l.index)
}

/// Puts the static address on `host_if` (with the default route through
/// `gateway`) and takes every IPv4 address off the NIC when the address lives on
/// a bridge instead.
pub async fn configure_static(
    rtnl: &Rtnl,
    nic: &Link,
    host_if: &Link,
    addr: Ipv4Cidr,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let err = |name: &str, op| {
        let name = name.to_owned();
        move |source| NetError::Link { name, op, source }
    };
    if nic.index != host_if.index {
        rtnl.set_ipv4_addrs(nic.index, &[])
            .await
            .map_err(err(&nic.name, "move address off"))?;
    }
    rtnl.set_ipv4_addrs(host_if.index, &[addr])
        .await
        .map_err(err(&host_if.name, "set address"))?;
    if let Some(gw) = gateway {
        rtnl.replace_default_route(gw, host_if.index)
            .await
            .map_err(err(&host_if.name, "set default route"))?;
    }
    Ok(())
}

/// Writes a resolv.conf listing `servers`, atomically (temp file + rename) so a
/// reader never sees half a file.
pub fn write_resolv_conf(path: &Path, servers: &[Ipv4Addr], search: Option<&str>) -> Result<(), NetError> {
    let err = |source| NetError::File {
        path: path.to_owned(),
        op: "write",
        source,
    };
    let mut text = String::from("# Written by keel-init from the uplink configuration.\n");
    if let Some(s) = search.filter(|s| !s.is_empty()) {
        text.push_str(&format!("search {s}\n"));
    }
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("keel-tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>, carrier: bool) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.map(str::to_owned),
            controller: None,
            parent: None,
            vlan_id: None,
            up: true,
            carrier,
            loopback: name == "lo",
            alias: None,
            mac: None,
        }
    }

    #[test]
    fn auto_picks_first_physical_nic_with_carrier() {
        let links = vec![
            link(1, "lo", None, true),
            link(2, "enp1s0", None, false),
            link(3, "br0", Some("bridge"), true),
            link(4, "enp2s0", None, true),
            link(5, "enp3s0", None, true),
        ];
        assert_eq!(pick_auto(&links).map(|l| l.name.as_str()), Some("enp2s0"));
        assert_eq!(pick_auto(&links[..3]), None);
    }

    #[test]
    fn resolv_conf_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("etc/resolv.conf");
        write_resolv_conf(
            &p,
            &[Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(9, 9, 9, 9)],
            Some("lan"),
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.contains("search lan\nnameserver 192.168.1.1\nnameserver 9.9.9.9\n"),
            "{text}"
        );
    }
}
