//! The meaning of `network:`: interface names, bridge subnets and their overlaps,
//! DHCP ranges and leases, MACs on the uplink.

use super::*;

pub(super) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An address that is the network's or broadcast address cannot be a host's.
pub(super) fn host_address_problem(c: Ipv4Cidr) -> Option<String> {
    if c.prefix < 31 && (c.addr == c.network() || c.addr == c.broadcast()) {
        Some(format!(
            "{c} is the network or broadcast address of its subnet; use a host address such as {}",
            Ipv4Addr::from(u32::from(c.network()) + 1)
        ))
    } else {
        None
    }
}

pub(super) fn check_network(cfg: &Config, d: &mut Diagnostics) {
    let up = &cfg.network.uplink;
    if up.interface.value != "auto" && !valid_ifname(&up.interface) {
        d.error(
            up.interface.pos,
            format!(
                "uplink interface `{}` is not a valid interface name (1-15 letters, digits, `-`, `_`, `.`) or `auto`",
                up.interface.value
            ),
        );
    }
    // Subnets that must not overlap: the uplink's (when static) and each routed bridge's.
    let mut subnets: Vec<(Ipv4Cidr, String, Pos)> = Vec::new();
    match *up.address {
        UplinkAddress::Static(cidr) => {
            if let Some(p) = host_address_problem(cidr) {
                d.error(up.address.pos, p);
            }
            if let Some(gw) = &up.gateway {
                if !cidr.contains(gw.value) {
                    d.error(
                        gw.pos,
                        format!(
                            "gateway {} is outside the uplink subnet {}/{}",
                            gw.value,
                            cidr.network(),
                            cidr.prefix
                        ),
                    );
                } else if gw.value == cidr.addr {
                    d.error(gw.pos, format!("gateway {} is the uplink's own address", gw.value));
                }
            }
            subnets.push((cidr, "the uplink".into(), up.address.pos));
        }
        UplinkAddress::Dhcp => {
            if let Some(gw) = &up.gateway {
                d.error(gw.pos, "a gateway applies only to a static uplink address; remove it or set `address` to e.g. 192.168.1.10/24");
            }
        }
    }

    let mut names: HashMap<&str, Pos> = HashMap::new();
    let mut bridged_on: HashMap<Option<u16>, (&str, Pos)> = HashMap::new();
    for b in &cfg.network.bridges {
        if !valid_ifname(&b.name) {
            d.error(
                b.name.pos,
                format!(
                    "bridge name `{}` is not a valid interface name (1-15 letters, digits, `-`, `_`, `.`)",
                    b.name.value
                ),
            );
        }
        if let Some(first) = names.insert(&b.name, b.name.pos) {
            d.error(
                b.name.pos,
                format!(
                    "duplicate bridge name `{}` (first declared at line {})",
                    b.name.value, first.line
                ),
            );
        }
        if b.name.value == up.interface.value {
            d.error(
                b.name.pos,
                format!("bridge `{}` has the uplink's interface name", b.name.value),
            );
        }
        if let Some(v) = &b.vlan
            && !(1..=4094).contains(&v.value)
        {
            d.error(v.pos, format!("VLAN id {} is out of range; use 1-4094", v.value));
        }
        match *b.mode {
            BridgeMode::Bridged => {
                if let Some(a) = &b.address {
                    d.error(a.pos, format!("bridge `{}` is `bridged`: it takes the uplink's address; remove `address` (or use mode nat/isolated for an own subnet)", b.name.value));
                }
                if let Some(dhcp) = &b.dhcp {
                    d.error(dhcp.range.pos, format!("bridge `{}` is `bridged`: guests get addresses from the LAN; Keel runs DHCP only on nat and isolated bridges", b.name.value));
                }
                let vlan = b.vlan.as_ref().map(|v| v.value);
                if let Some((other, at)) = bridged_on.insert(vlan, (&b.name, b.mode.pos)) {
                    d.error(b.mode.pos, format!("bridge `{}` is the second `bridged` bridge on the uplink{} (`{other}` at line {} already is); the uplink can join only one bridge", b.name.value, vlan.map(|v| format!(" VLAN {v}")).unwrap_or_default(), at.line));
                }
            }
            BridgeMode::Nat | BridgeMode::Isolated => {
                let Some(addr) = &b.address else {
                    d.error(
                        b.mode.pos,
                        format!(
                            "bridge `{}` in mode `{}` needs an `address` for its subnet, e.g. 10.100.0.1/24",
                            b.name.value,
                            b.mode.as_str()
                        ),
                    );
                    continue;
                };
                if let Some(p) = host_address_problem(addr.value) {
                    d.error(addr.pos, p);
                }
                for (other, what, _) in &subnets {
                    if other.overlaps(addr.value) {
                        d.error(
                            addr.pos,
                            format!(
                                "subnet {}/{} of bridge `{}` overlaps {}/{} of {what}",
                                addr.network(),
                                addr.prefix,
                                b.name.value,
                                other.network(),
                                other.prefix
                            ),
                        );
                    }
                }
                subnets.push((addr.value, format!("bridge `{}`", b.name.value), addr.pos));
                if let Some(dhcp) = &b.dhcp {
                    check_dhcp(&b.name, addr.value, dhcp, d);
                }
            }
        }
    }
}

pub(super) fn check_dhcp(bridge: &str, subnet: Ipv4Cidr, dhcp: &crate::schema::Dhcp, d: &mut Diagnostics) {
    let r = &dhcp.range;
    let net = format!("{}/{}", subnet.network(), subnet.prefix);
    if !subnet.contains(r.start) || !subnet.contains(r.end) {
        d.error(
            r.pos,
            format!(
                "DHCP range {} is outside the subnet {net} of bridge `{bridge}`",
                r.value
            ),
        );
    } else if r.contains(subnet.addr) {
        d.error(
            r.pos,
            format!(
                "DHCP range {} includes the bridge's own address {}",
                r.value, subnet.addr
            ),
        );
    } else if subnet.prefix < 31 && (r.contains(subnet.network()) || r.contains(subnet.broadcast())) {
        d.error(
            r.pos,
            format!(
                "DHCP range {} includes the network or broadcast address of {net}",
                r.value
            ),
        );
    }
    if dhcp.lease_time.get().as_secs() < 60 {
        d.error(
            dhcp.lease_time.pos,
            format!("lease time {} is too short; use at least 1m", dhcp.lease_time.value),
        );
    }
    let mut macs: HashMap<MacAddr, Pos> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, Pos> = HashMap::new();
    for lease in &dhcp.static_leases {
        if lease.mac.is_multicast() || lease.mac.is_zero() {
            d.error(
                lease.mac.pos,
                format!("static lease MAC {} is not a unicast address", lease.mac.value),
            );
        }
        if let Some(first) = macs.insert(lease.mac.value, lease.mac.pos) {
            d.error(
                lease.mac.pos,
                format!(
                    "MAC {} has two static leases (first at line {})",
                    lease.mac.value, first.line
                ),
            );
        }
        let a = lease.address.value;
        if !subnet.contains(a) {
            d.error(
                lease.address.pos,
                format!("static lease address {a} is outside the subnet {net} of bridge `{bridge}`"),
            );
        } else if a == subnet.addr {
            d.error(
                lease.address.pos,
                format!("static lease address {a} is the bridge's own address"),
            );
        }
        if let Some(first) = addrs.insert(a, lease.address.pos) {
            d.error(
                lease.address.pos,
                format!("address {a} is leased twice (first at line {})", first.line),
            );
        }
    }
}
