//! One declared bridge, reconciled: exists, is up, has the declared address (nat,
//! isolated) or the uplink as its port (bridged, optionally through a VLAN).

use super::link::{Link, Rtnl};
use super::{NetError, vlan};
use crate::config::{Bridge, BridgeMode};

/// Makes `b` exist as declared. `uplink` is the resolved uplink NIC, needed only
/// by `bridged` bridges. Returns a one-line summary for the report.
pub async fn reconcile(rtnl: &Rtnl, b: &Bridge, uplink: Option<&Link>) -> Result<String, NetError> {
    let name = b.name.value.as_str();
    let err = |op: &'static str| {
        move |source| NetError::Link {
            name: name.to_owned(),
            op,
            source,
        }
    };
    let br = ensure_bridge(rtnl, name).await?;
    rtnl.set_up(br.index).await.map_err(err("set up"))?;

    match *b.mode {
        BridgeMode::Bridged => {
            let Some(nic) = uplink else {
                return Err(NetError::Bridge {
                    name: name.to_owned(),
                    message: "created, but no uplink was found to join it (see the uplink error)".into(),
                });
            };
            let port = match &b.vlan {
                Some(id) => vlan::ensure(rtnl, nic, id.value)
                    .await
                    .map_err(|source| NetError::Link {
                        name: vlan::name(&nic.name, id.value),
                        op: "create VLAN",
                        source,
                    })?,
                None => nic.clone(),
            };
            if port.controller != Some(br.index) {
                rtnl.set_controller(port.index, Some(br.index))
                    .await
                    .map_err(|source| NetError::Link {
                        name: port.name.clone(),
                        op: "join bridge",
                        source,
                    })?;
            }
            // The bridge takes the port's MAC, so the LAN's DHCP server and ARP
            // caches see the same host before and after the uplink moved.
            if let Some(mac) = port.mac
                && br.mac != Some(mac)
            {
                rtnl.set_mac(br.index, mac).await.map_err(err("set MAC"))?;
            }
            rtnl.set_up(port.index).await.map_err(|source| NetError::Link {
                name: port.name.clone(),
                op: "set up",
                source,
            })?;
            Ok(format!("bridged, port {}", port.name))
        }
        BridgeMode::Nat | BridgeMode::Isolated => {
            let Some(addr) = &b.address else {
                return Err(NetError::Bridge {
                    name: name.to_owned(),
                    message: format!("mode {} needs an address", b.mode.as_str()),
                });
            };
            rtnl.set_ipv4_addrs(br.index, &[addr.value])
                .await
                .map_err(err("set address"))?;
            Ok(format!("{} {}", b.mode.as_str(), addr.value))
        }
    }
}

/// The bridge called `name`, created when absent. A non-bridge link of that
/// name is left alone and reported.
async fn ensure_bridge(rtnl: &Rtnl, name: &str) -> Result<Link, NetError> {
    let lookup = |op| {
        move |source| NetError::Link {
            name: name.to_owned(),
            op,
            source,
        }
    };
    if let Some(l) = rtnl.link(name).await.map_err(lookup("look up"))? {
        if !l.is_bridge() {
            return Err(NetError::Bridge {
                name: name.to_owned(),
                message: format!(
                    "an interface of that name exists and is a {}, not a bridge; rename the bridge in the config",
                    l.kind.as_deref().unwrap_or("physical NIC")
                ),
            });
        }
        return Ok(l);
    }
    rtnl.create_bridge(name).await.map_err(lookup("create bridge"))?;
    rtnl.link(name)
        .await
        .map_err(lookup("look up"))?
        .ok_or_else(|| NetError::Bridge {
            name: name.to_owned(),
            message: "vanished right after it was created".into(),
        })
}
