//! The types of keel.yaml, version 1, and how each is read.
//!
//! Every type derives `Serialize` (JSON output, round trips) and `JsonSchema`
//! (`keel-image schema`); the serde attributes describe the schema, the `Decode`
//! impls below read the file. A round-trip test keeps the two in step.

use std::net::Ipv4Addr;

use schemars::JsonSchema;
use serde::Serialize;

use super::decode::{Decode, MapReader, Spanned, one_of, scalar};
use super::diag::Diagnostics;
use super::units::{ByteSize, Duration, Ipv4Cidr, Ipv4Range, MacAddr};
use super::yaml::Node;

/// Collects the results of a struct's fields, then builds it only if all decoded.
macro_rules! build {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        (|| Some($ty { $($field: $field.ok()?),* }))()
    };
}

/// A Keel appliance: its host settings, networks, storage pools, guests and update policy.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Keel appliance config (keel.yaml)")]
pub struct Config {
    /// Schema version of this file. Always 1.
    pub version: Spanned<u32>,
    #[serde(default)]
    pub host: Host,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<Guest>,
    #[serde(default)]
    pub update: Update,
}

impl Decode for Config {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "the config", d)?;
        let version = m.required::<Spanned<u32>>("version");
        let host = m.or_default("host");
        let network = m.or_default("network");
        let storage = m.or_default("storage");
        let guests = m.or_default("guests");
        let update = m.or_default("update");
        m.finish();
        build!(Config {
            version,
            host,
            network,
            storage,
            guests,
            update
        })
    }
}

// ------------------------------------------------------------------ host

/// Settings of the appliance itself.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The appliance's hostname (a DNS label, or dotted labels).
    #[serde(default = "default_hostname")]
    pub hostname: Spanned<String>,
    /// Kernel console device for the appliance's logs, e.g. ttyS0 or tty0.
    #[serde(default = "default_console")]
    pub console: Spanned<String>,
    /// How much keel-init logs.
    #[serde(default)]
    pub log_level: LogLevel,
    /// What the appliance does once every guest has stopped and none is waiting
    /// to restart: `stay` up (the default), or `poweroff` (batch appliances, CI).
    #[serde(default)]
    pub on_idle: OnIdle,
    /// The control API on TCP, with a bearer token. Off unless set; the root-only
    /// unix socket /run/keel/api.sock is always there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiListener>,
}

/// `host.api`: where the control API listens on TCP.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiListener {
    /// Address and port, e.g. 0.0.0.0:7070. Plain HTTP: use a management network.
    pub listen: Spanned<std::net::SocketAddr>,
    /// File on KEEL-CONFIG holding the bearer token (16 characters or more).
    #[serde(default = "default_token_file")]
    pub token_file: Spanned<String>,
}

fn default_token_file() -> Spanned<String> {
    Spanned::new("api-token".into(), Default::default())
}

impl Decode for ApiListener {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "api", d)?;
        let listen = m.required("listen");
        let token_file = m.optional("token_file").map(|v| v.unwrap_or_else(default_token_file));
        m.finish();
        build!(ApiListener { listen, token_file })
    }
}

impl Decode for std::net::SocketAddr {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "an address and port such as 0.0.0.0:7070", d)?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                d.error(
                    node.pos,
                    format!("`{text}` is not an address and port; write e.g. 0.0.0.0:7070"),
                );
                None
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    #[default]
    Stay,
    Poweroff,
}

impl Decode for OnIdle {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        one_of(node, &[("stay", OnIdle::Stay), ("poweroff", OnIdle::Poweroff)], d)
    }
}

fn default_hostname() -> Spanned<String> {
    Spanned::new("keel".into(), Default::default())
}
fn default_console() -> Spanned<String> {
    Spanned::new("ttyS0".into(), Default::default())
}

impl Default for Host {
    fn default() -> Self {
        Host {
            hostname: default_hostname(),
            console: default_console(),
            log_level: LogLevel::default(),
            on_idle: OnIdle::Stay,
            api: None,
        }
    }
}

impl Decode for Host {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "host", d)?;
        let hostname = m.optional("hostname").map(|v| v.unwrap_or_else(default_hostname));
        let console = m.optional("console").map(|v| v.unwrap_or_else(default_console));
        let log_level = m.or_default("log_level");
        let on_idle = m.or_default("on_idle");
        let api = m.optional("api");
        m.finish();
        build!(Host {
            hostname,
            console,
            log_level,
            on_idle,
            api
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl Decode for LogLevel {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        use LogLevel::*;
        one_of(
            node,
            &[
                ("error", Error),
                ("warn", Warn),
                ("info", Info),
                ("debug", Debug),
                ("trace", Trace),
            ],
            d,
        )
    }
}

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
}

impl Decode for Bridge {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "bridge", d)?;
        let name = m.required("name");
        let mode = m.required("mode");
        let address = m.optional("address");
        let vlan = m.optional("vlan");
        let dhcp = m.optional("dhcp");
        m.finish();
        build!(Bridge {
            name,
            mode,
            address,
            vlan,
            dhcp
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

// ------------------------------------------------------------------ storage

#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// Named pools: directories on the KEEL-DATA partition holding volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
}

impl Decode for Storage {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "storage", d)?;
        let pools = m.or_default("pools");
        m.finish();
        build!(Storage { pools })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Pool name: letters, digits, `-` and `_`.
    pub name: Spanned<String>,
    /// Optional cap on the space the pool's volumes may allocate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Spanned<ByteSize>>,
}

impl Decode for Pool {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "pool", d)?;
        let name = m.required("name");
        let size = m.optional("size");
        m.finish();
        build!(Pool { name, size })
    }
}

/// A file in a storage pool, written `POOL/PATH`, e.g. `images/vmlinuz-6.12`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolPath {
    pub pool: String,
    pub path: String,
}

impl std::str::FromStr for PoolPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}` is not a pool path ({why}); write POOL/NAME, e.g. default/web-root");
        let (pool, path) = s.split_once('/').ok_or_else(|| bad("no `/`"))?;
        if pool.is_empty() || path.is_empty() {
            return Err(bad("empty pool or name"));
        }
        if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(bad("empty, `.` or `..` component"));
        }
        Ok(PoolPath {
            pool: pool.into(),
            path: path.into(),
        })
    }
}

impl std::fmt::Display for PoolPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.path)
    }
}

impl Serialize for PoolPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for PoolPath {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PoolPath".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[^/]+/.+$",
            "description": "A file in a storage pool: POOL/NAME, e.g. default/web-root"
        })
    }
}

super::decode::decode_via_fromstr!(PoolPath => "a pool path such as default/web-root");

// ------------------------------------------------------------------ guests

/// A virtual machine run by keel-vmm.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// Guest name: lowercase letters, digits and `-`, at most 32 characters.
    pub name: Spanned<String>,
    /// Number of virtual CPUs (1-32, keel-vmm's limit).
    #[serde(default = "default_vcpus")]
    pub vcpus: Spanned<u32>,
    /// Guest RAM, e.g. 512MiB (at least 16MiB).
    pub memory: Spanned<ByteSize>,
    /// `default` (the appliance's bundled guest kernel) or a file in a pool.
    #[serde(default = "default_kernel")]
    pub kernel: Spanned<BootFile>,
    /// Initramfs: `default` (the appliance's bundled minimal guest userland) or a
    /// file in a pool. None when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Spanned<BootFile>>,
    /// Kernel command line (Keel adds the console and virtio-mmio devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Start the guest when the appliance boots.
    #[serde(default = "default_true")]
    pub autostart: bool,
    #[serde(default)]
    pub restart: Restart,
    /// How long keel-vmm may take to report the guest running (devices attached,
    /// vCPUs started) before it is killed and the restart policy applies.
    #[serde(default = "default_guest_timeout")]
    pub start_timeout: Spanned<Duration>,
    /// How long a graceful stop (power button) waits before the VMM is killed, unless
    /// `keelctl stop --timeout` says otherwise.
    #[serde(default = "default_guest_timeout")]
    pub stop_timeout: Spanned<Duration>,
}

/// The default start and stop timeout (30 s).
pub const DEFAULT_GUEST_TIMEOUT: Duration = Duration::secs(30);
/// The longest start or stop timeout accepted.
pub const MAX_GUEST_TIMEOUT: Duration = Duration::secs(3600);

fn default_guest_timeout() -> Spanned<Duration> {
    Spanned::new(DEFAULT_GUEST_TIMEOUT, Default::default())
}

fn default_vcpus() -> Spanned<u32> {
    Spanned::new(1, Default::default())
}
fn default_kernel() -> Spanned<BootFile> {
    Spanned::new(BootFile::Default, Default::default())
}
fn default_true() -> bool {
    true
}

impl Decode for Guest {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "guest", d)?;
        let name = m.required("name");
        let vcpus = m.optional("vcpus").map(|v| v.unwrap_or_else(default_vcpus));
        let memory = m.required("memory");
        let kernel = m.optional("kernel").map(|v| v.unwrap_or_else(default_kernel));
        let initrd = m.optional("initrd");
        let cmdline = m.optional("cmdline");
        let disks = m.or_default("disks");
        let nics = m.or_default("nics");
        let autostart = m.optional("autostart").map(|v| v.unwrap_or(true));
        let restart = m.or_default("restart");
        let start_timeout = m
            .optional("start_timeout")
            .map(|v| v.unwrap_or_else(default_guest_timeout));
        let stop_timeout = m
            .optional("stop_timeout")
            .map(|v| v.unwrap_or_else(default_guest_timeout));
        m.finish();
        build!(Guest {
            name,
            vcpus,
            memory,
            kernel,
            initrd,
            cmdline,
            disks,
            nics,
            autostart,
            restart,
            start_timeout,
            stop_timeout
        })
    }
}

/// A guest's kernel or initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootFile {
    /// The one bundled in the appliance image.
    Default,
    /// A file in a storage pool.
    Pool(PoolPath),
}

impl std::fmt::Display for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootFile::Default => f.write_str("default"),
            BootFile::Pool(p) => p.fmt(f),
        }
    }
}

impl Serialize for BootFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for BootFile {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "BootFile".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let path = g.subschema_for::<PoolPath>();
        schemars::json_schema!({
            "description": "`default` (bundled in the appliance) or POOL/FILE",
            "anyOf": [{ "const": "default" }, path]
        })
    }
}

impl Decode for BootFile {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "`default` or a pool path such as images/vmlinuz", d)?;
        if text == "default" {
            return Some(BootFile::Default);
        }
        match text.parse() {
            Ok(p) => Some(BootFile::Pool(p)),
            Err(msg) => {
                d.error(node.pos, format!("{msg}, or `default`"));
                None
            }
        }
    }
}

/// A virtio-blk disk backed by a volume (a sparse raw file) in a pool.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The volume, POOL/NAME. Created on first use; never deleted by Keel.
    pub volume: Spanned<PoolPath>,
    /// Size of the volume when Keel creates it.
    pub size: Spanned<ByteSize>,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Seed a new volume from this image (POOL/FILE), copying sparsely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Spanned<PoolPath>>,
}

impl Decode for Disk {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "disk", d)?;
        let volume = m.required("volume");
        let size = m.required("size");
        let readonly = m.optional("readonly").map(|v| v.unwrap_or(false));
        let source = m.optional("source");
        m.finish();
        build!(Disk {
            volume,
            size,
            readonly,
            source
        })
    }
}

/// A virtio-net NIC on a bridge.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Name of a bridge declared under network.bridges.
    pub bridge: Spanned<String>,
    /// `auto` (stable, derived from the guest name and NIC index, locally
    /// administered) or a fixed unicast MAC.
    #[serde(default = "default_mac")]
    pub mac: Spanned<MacSpec>,
}

fn default_mac() -> Spanned<MacSpec> {
    Spanned::new(MacSpec::Auto, Default::default())
}

impl Decode for Nic {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "nic", d)?;
        let bridge = m.required("bridge");
        let mac = m.optional("mac").map(|v| v.unwrap_or_else(default_mac));
        m.finish();
        build!(Nic { bridge, mac })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacSpec {
    Auto,
    Fixed(MacAddr),
}

impl std::fmt::Display for MacSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MacSpec::Auto => f.write_str("auto"),
            MacSpec::Fixed(m) => m.fmt(f),
        }
    }
}

impl Serialize for MacSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for MacSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MacSpec".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mac = g.subschema_for::<MacAddr>();
        schemars::json_schema!({ "anyOf": [{ "const": "auto" }, mac] })
    }
}

impl Decode for MacSpec {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "`auto` or a MAC address", d)?;
        if text == "auto" {
            return Some(MacSpec::Auto);
        }
        match text.parse() {
            Ok(m) => Some(MacSpec::Fixed(m)),
            Err(msg) => {
                d.error(node.pos, format!("{msg}, or `auto`"));
                None
            }
        }
    }
}

/// What the supervisor does when the guest's VMM exits.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Delay before the first restart; it doubles on each further restart.
    #[serde(default = "default_backoff")]
    pub backoff: Spanned<Duration>,
    /// Upper bound of the delay.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Spanned<Duration>,
    /// Crash-loop limit: after this many restarts within `window`, the guest
    /// stays `crashed` until an operator starts it.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: Spanned<u32>,
    #[serde(default = "default_window")]
    pub window: Spanned<Duration>,
}

fn default_backoff() -> Spanned<Duration> {
    Spanned::new(Duration::secs(1), Default::default())
}
fn default_max_backoff() -> Spanned<Duration> {
    Spanned::new(Duration::secs(300), Default::default())
}
fn default_max_restarts() -> Spanned<u32> {
    Spanned::new(10, Default::default())
}
fn default_window() -> Spanned<Duration> {
    Spanned::new(Duration::secs(600), Default::default())
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::default(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            max_restarts: default_max_restarts(),
            window: default_window(),
        }
    }
}

impl Decode for Restart {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "restart", d)?;
        let policy = m.or_default("policy");
        let backoff = m.optional("backoff").map(|v| v.unwrap_or_else(default_backoff));
        let max_backoff = m.optional("max_backoff").map(|v| v.unwrap_or_else(default_max_backoff));
        let max_restarts = m
            .optional("max_restarts")
            .map(|v| v.unwrap_or_else(default_max_restarts));
        let window = m.optional("window").map(|v| v.unwrap_or_else(default_window));
        m.finish();
        build!(Restart {
            policy,
            backoff,
            max_backoff,
            max_restarts,
            window
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever the guest stops, even after a clean poweroff.
    Always,
    /// Restart when the VMM fails or the guest crashes; a guest poweroff stays off.
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

impl Decode for RestartPolicy {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        use RestartPolicy::*;
        one_of(
            node,
            &[("always", Always), ("on-failure", OnFailure), ("never", Never)],
            d,
        )
    }
}

// ------------------------------------------------------------------ update

/// Over-the-air update policy.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Public keys (the content of a `keel-image keygen` .pub file,
    /// `ed25519:BASE64`) whose signatures updates must carry. Baked into the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<Spanned<String>>,
    /// How long the new version must stay healthy before it is blessed.
    #[serde(default = "default_health_window")]
    pub health_window: Spanned<Duration>,
}

fn default_health_window() -> Spanned<Duration> {
    Spanned::new(Duration::secs(60), Default::default())
}

impl Default for Update {
    fn default() -> Self {
        Update {
            trusted_keys: Vec::new(),
            health_window: default_health_window(),
        }
    }
}

impl Decode for Update {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "update", d)?;
        let trusted_keys = m.or_default("trusted_keys");
        let health_window = m
            .optional("health_window")
            .map(|v| v.unwrap_or_else(default_health_window));
        m.finish();
        build!(Update {
            trusted_keys,
            health_window
        })
    }
}

impl Guest {
    /// The kernel command line keel-vmm is given: Keel's part, then the operator's.
    /// keel-vmm appends one `virtio_mmio.device=` entry per device after it.
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = base_cmdline(&self.name);
        if let Some(extra) = &self.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        cmdline
    }

    /// The virtio devices keel-vmm gives this guest (disks, then NICs): what counts
    /// against its device limit.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + self.nics.len()
    }

    /// The MAC of NIC `index`: the fixed one, or for `auto` one derived from the
    /// guest's name and the index, so it stays the same across reboots and
    /// re-applies. Locally administered (bit 1) and unicast (bit 0 clear).
    pub fn nic_mac(&self, index: usize) -> MacAddr {
        match self.nics.get(index).map(|n| n.mac.value) {
            Some(MacSpec::Fixed(m)) => m,
            _ => auto_mac(&self.name, index),
        }
    }
}

/// What Keel puts on every guest's command line before the operator's part:
/// the serial console, reboot through the i8042 (which ends keel-vmm with its
/// reboot code), no PCI probing (devices are virtio-mmio), and the guest's name
/// for its own init to read.
pub fn base_cmdline(guest: &str) -> String {
    format!("console=ttyS0 reboot=k panic=1 pci=off keel.guest={guest}")
}

/// The stable `auto` MAC for a guest's NIC.
pub fn auto_mac(guest: &str, index: usize) -> MacAddr {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("keel-nic-mac\0{guest}\0{index}").as_bytes());
    MacAddr([(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]])
}
