//! `network:` — the uplink, bridges (NAT, isolated, bridged, VLANs), DHCP and static leases.

use super::*;

// ------------------------------------------------------------------ network

/// The uplink and the bridges guests attach to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub uplink: Uplink,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<Bridge>,
}

impl Decode for Network {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "network", d)?;
        let uplink = m.or_default("uplink");
        let bridges = m.or_default("bridges");
        m.finish();
        build!(Network { uplink, bridges })
    }
}

/// The host's connection to the outside network.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Interface name (e.g. enp1s0), or `auto`: the first physical NIC with carrier.
    #[serde(default = "default_auto")]
    pub interface: Spanned<String>,
    /// `dhcp`, or a static address with prefix such as 192.168.1.10/24.
    #[serde(default = "default_dhcp")]
    pub address: Spanned<UplinkAddress>,
    /// Default gateway (static addressing only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Spanned<Ipv4Addr>>,
    /// DNS servers (static addressing; with DHCP they come from the lease).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Spanned<Ipv4Addr>>,
}

fn default_auto() -> Spanned<String> {
    Spanned::new("auto".into(), Default::default())
}
fn default_dhcp() -> Spanned<UplinkAddress> {
    Spanned::new(UplinkAddress::Dhcp, Default::default())
}

impl Default for Uplink {
    fn default() -> Self {
        Uplink {
            interface: default_auto(),
            address: default_dhcp(),
            gateway: None,
            dns: Vec::new(),
        }
    }
}

impl Decode for Uplink {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "uplink", d)?;
        let interface = m.optional("interface").map(|v| v.unwrap_or_else(default_auto));
        let address = m.optional("address").map(|v| v.unwrap_or_else(default_dhcp));
        let gateway = m.optional("gateway");
        let dns = m.or_default("dns");
        m.finish();
        build!(Uplink {
            interface,
            address,
            gateway,
            dns
        })
    }
}

/// How the uplink gets its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkAddress {
    Dhcp,
    Static(Ipv4Cidr),
}

impl std::fmt::Display for UplinkAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UplinkAddress::Dhcp => f.write_str("dhcp"),
            UplinkAddress::Static(c) => c.fmt(f),
        }
    }
}

impl Serialize for UplinkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for UplinkAddress {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UplinkAddress".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let cidr = g.subschema_for::<Ipv4Cidr>();
        schemars::json_schema!({
            "description": "`dhcp`, or a static address with prefix such as 192.168.1.10/24",
            "anyOf": [{ "const": "dhcp" }, cidr]
        })
    }
}

impl Decode for UplinkAddress {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "`dhcp` or an address such as 192.168.1.10/24", d)?;
        if text == "dhcp" {
            return Some(UplinkAddress::Dhcp);
        }
        match text.parse() {
            Ok(c) => Some(UplinkAddress::Static(c)),
            Err(msg) => {
                d.error(node.pos, format!("{msg}, or `dhcp`"));
                None
            }
        }
    }
}

/// A Linux bridge that guest NICs attach to.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// Interface name of the bridge (at most 15 characters), e.g. br-lan.
    pub name: Spanned<String>,
    pub mode: Spanned<BridgeMode>,
    /// The host's address on the bridge with the subnet's prefix, e.g. 10.100.0.1/24.
    /// Required for `nat` and `isolated`; not allowed for `bridged` (the uplink's
    /// address moves to the bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Spanned<Ipv4Cidr>>,
    /// 802.1Q VLAN id (1-4094): the bridge joins a VLAN sub-interface of the uplink
    /// (`bridged`) or tags nothing but is kept for documentation otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<Spanned<u16>>,
    /// DHCP server for guests on this bridge (`nat` and `isolated` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<Dhcp>,
    /// Ports of the appliance that lead to a guest on this bridge (`nat` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
}

impl Decode for Bridge {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "bridge", d)?;
        let name = m.required("name");
        let mode = m.required("mode");
        let address = m.optional("address");
        let vlan = m.optional("vlan");
        let dhcp = m.optional("dhcp");
        let forwards = m.or_default("forwards");
        m.finish();
        build!(Bridge {
            name,
            mode,
            address,
            vlan,
            dhcp,
            forwards
        })
    }
}

/// What a bridge connects guests to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BridgeMode {
    /// The uplink joins the bridge: guests sit on the LAN.
    Bridged,
    /// Own subnet, masqueraded out of the uplink.
    Nat,
    /// Own subnet, no forwarding: guests reach only each other and the host.
    Isolated,
}

impl BridgeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeMode::Bridged => "bridged",
            BridgeMode::Nat => "nat",
            BridgeMode::Isolated => "isolated",
        }
    }
}

impl Decode for BridgeMode {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        one_of(
            node,
            &[
                ("bridged", BridgeMode::Bridged),
                ("nat", BridgeMode::Nat),
                ("isolated", BridgeMode::Isolated),
            ],
            d,
        )
    }
}

/// Keel's DHCP server on a bridge.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dhcp {
    /// Addresses handed out dynamically, e.g. 10.100.0.100-10.100.0.199.
    pub range: Spanned<Ipv4Range>,
    /// How long a lease lasts.
    #[serde(default = "default_lease_time")]
    pub lease_time: Spanned<Duration>,
    /// Fixed addresses by MAC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_leases: Vec<StaticLease>,
}

fn default_lease_time() -> Spanned<Duration> {
    Spanned::new(Duration::secs(3600), Default::default())
}

impl Decode for Dhcp {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "dhcp", d)?;
        let range = m.required("range");
        let lease_time = m.optional("lease_time").map(|v| v.unwrap_or_else(default_lease_time));
        let static_leases = m.or_default("static_leases");
        m.finish();
        build!(Dhcp {
            range,
            lease_time,
            static_leases
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticLease {
    pub mac: Spanned<MacAddr>,
    pub address: Spanned<Ipv4Addr>,
    /// Hostname given to the client with the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Spanned<String>>,
}

impl Decode for StaticLease {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "static lease", d)?;
        let mac = m.required("mac");
        let address = m.required("address");
        let hostname = m.optional("hostname");
        m.finish();
        build!(StaticLease { mac, address, hostname })
    }
}

/// A port forward: connections to `host_port` on any of the appliance's own addresses
/// (from anywhere but the guest's bridge) go to `guest_port` of the guest, like
/// libvirt's and Proxmox's NAT port forwarding. The guest needs a fixed address: a
/// static lease on this bridge for the MAC of its NIC here.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// The port on the appliance (1-65535).
    pub host_port: Spanned<u16>,
    /// The guest it leads to (one with a NIC on this bridge).
    pub guest: Spanned<String>,
    /// The port in the guest (1-65535).
    pub guest_port: Spanned<u16>,
    /// `tcp` (the default) or `udp`.
    #[serde(default = "default_proto")]
    pub proto: Spanned<Proto>,
}

fn default_proto() -> Spanned<Proto> {
    Spanned::new(Proto::Tcp, Default::default())
}

impl Decode for Forward {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "forward", d)?;
        let host_port = m.required("host_port");
        let guest = m.required("guest");
        let guest_port = m.required("guest_port");
        let proto = m.optional("proto").map(|v| v.unwrap_or_else(default_proto));
        m.finish();
        build!(Forward {
            host_port,
            guest,
            guest_port,
            proto
        })
    }
}

/// The transport protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl Decode for Proto {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        one_of(node, &[("tcp", Proto::Tcp), ("udp", Proto::Udp)], d)
    }
}

impl Bridge {
    /// The static lease this bridge's DHCP server gives `mac`, if any.
    pub fn static_lease(&self, mac: MacAddr) -> Option<&StaticLease> {
        self.dhcp
            .iter()
            .flat_map(|d| &d.static_leases)
            .find(|l| l.mac.value == mac)
    }

    /// The address a forward on this bridge leads to: the static lease of the MAC the
    /// guest's NIC on this bridge has. The error says what to add to the config.
    pub fn forward_address(&self, guests: &[Guest], f: &Forward) -> Result<Ipv4Addr, String> {
        let Some(guest) = guests.iter().find(|g| g.name.value == f.guest.value) else {
            return Err(format!(
                "forward to guest `{}`, which is not declared under guests",
                f.guest.value
            ));
        };
        let Some(index) = guest.nics.iter().position(|n| n.bridge.value == self.name.value) else {
            return Err(format!(
                "guest `{}` has no NIC on bridge `{}`; add `{{bridge: {}}}` to its nics",
                f.guest.value, self.name.value, self.name.value
            ));
        };
        let mac = guest.nic_mac(index);
        match self.static_lease(mac) {
            Some(l) => Ok(l.address.value),
            None => Err(format!(
                "a forward needs a fixed address: add a static lease for guest `{}`'s NIC on `{}` (MAC {mac}) to the bridge's dhcp, e.g. `static_leases: [{{mac: \"{mac}\", address: ...}}]`",
                f.guest.value, self.name.value
            )),
        }
    }
}
