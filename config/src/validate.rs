//! Semantic checks: what a well-formed file can still get wrong.
//!
//! Runs after decoding succeeded, on the typed config, and points every problem at
//! the node that causes it. Names are checked against what Linux and the rest of
//! Keel accept (interface names feed netlink, guest names become tap and file names).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use base64::Engine;

use super::decode::{Spanned, did_you_mean};
use super::diag::Diagnostics;
use super::schema::{BootFile, BridgeMode, Config, MacSpec, PoolPath, UplinkAddress};
use super::units::{ByteSize, Ipv4Cidr, MacAddr};
use super::yaml::Pos;

// The guest limits are keel-vmm's own (keel-vmm-api), so a config that validates is
// one keel-vmm accepts: tests/vmm_limits.rs walks each through both.
/// Smallest guest RAM keel-vmm boots.
pub const MIN_GUEST_MEMORY: ByteSize = ByteSize(keel_vmm_api::limits::MIN_MEMORY);
/// Largest guest RAM keel-vmm accepts.
pub const MAX_GUEST_MEMORY: ByteSize = ByteSize(keel_vmm_api::limits::MAX_MEMORY);
/// Most vCPUs keel-vmm boots.
pub const MAX_VCPUS: u32 = keel_vmm_api::limits::MAX_VCPUS as u32;
/// Linux's IFNAMSIZ is 16 including the terminating NUL.
const MAX_IFNAME: usize = 15;
const MAX_GUEST_NAME: usize = 32;

pub fn check(cfg: &Config, d: &mut Diagnostics) {
    if *cfg.version != 1 {
        d.error(
            cfg.version.pos,
            format!("unsupported config version {}; this Keel reads version 1", *cfg.version),
        );
    }
    check_host(cfg, d);
    check_network(cfg, d);
    check_storage(cfg, d);
    check_guests(cfg, d);
    check_update(cfg, d);
}

fn check_host(cfg: &Config, d: &mut Diagnostics) {
    let h = &cfg.host.hostname;
    let labels_ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !labels_ok {
        d.error(
            h.pos,
            format!(
                "hostname `{}` is not valid; use letters, digits and `-` (e.g. keel-01)",
                h.value
            ),
        );
    }
    let c = &cfg.host.console;
    if c.is_empty() || c.contains(char::is_whitespace) {
        d.error(
            c.pos,
            format!("console `{}` is not a device name; write e.g. ttyS0 or tty0", c.value),
        );
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An address that is the network's or broadcast address cannot be a host's.
fn host_address_problem(c: Ipv4Cidr) -> Option<String> {
    if c.prefix < 31 && (c.addr == c.network() || c.addr == c.broadcast()) {
        Some(format!(
            "{c} is the network or broadcast address of its subnet; use a host address such as {}",
            Ipv4Addr::from(u32::from(c.network()) + 1)
        ))
    } else {
        None
    }
}

fn check_network(cfg: &Config, d: &mut Diagnostics) {
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

fn check_dhcp(bridge: &str, subnet: Ipv4Cidr, dhcp: &super::schema::Dhcp, d: &mut Diagnostics) {
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

fn valid_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_storage(cfg: &Config, d: &mut Diagnostics) {
    let mut names: HashMap<&str, Pos> = HashMap::new();
    for p in &cfg.storage.pools {
        if !valid_pool_name(&p.name) {
            d.error(
                p.name.pos,
                format!(
                    "pool name `{}` is not valid; use 1-64 letters, digits, `-` or `_`",
                    p.name.value
                ),
            );
        }
        if let Some(first) = names.insert(&p.name, p.name.pos) {
            d.error(
                p.name.pos,
                format!(
                    "duplicate pool name `{}` (first declared at line {})",
                    p.name.value, first.line
                ),
            );
        }
        if let Some(size) = &p.size
            && size.bytes() == 0
        {
            d.error(
                size.pos,
                "pool size cap must be larger than zero (leave `size` out for no cap)",
            );
        }
    }
}

/// Reports a reference to a pool that is not declared.
fn check_pool_ref(cfg: &Config, r: &Spanned<PoolPath>, what: &str, d: &mut Diagnostics) {
    let pools: Vec<&str> = cfg.storage.pools.iter().map(|p| p.name.value.as_str()).collect();
    if !pools.contains(&r.pool.as_str()) {
        d.error(
            r.pos,
            format!(
                "{what} `{}` is in pool `{}`, which is not declared under storage.pools{}",
                r.value,
                r.pool,
                suggest(&r.pool, &pools)
            ),
        );
    }
}

fn suggest(word: &str, known: &[&str]) -> String {
    match did_you_mean(word, known) {
        Some(s) => format!("; did you mean `{s}`?"),
        None if known.is_empty() => " (none are declared)".into(),
        None => format!(" (declared: {})", known.join(", ")),
    }
}

fn check_guests(cfg: &Config, d: &mut Diagnostics) {
    let bridges: Vec<&str> = cfg.network.bridges.iter().map(|b| b.name.value.as_str()).collect();
    let mut names: HashMap<&str, Pos> = HashMap::new();
    // Volume → (guest, read-only?, size, position) of its first attachment.
    let mut volumes: HashMap<&PoolPath, (&str, bool, ByteSize, Pos)> = HashMap::new();
    let mut macs: HashMap<MacAddr, (String, Pos)> = HashMap::new();
    // Declared volume bytes per pool, for the pool cap warning.
    let mut pool_use: HashMap<&str, u64> = HashMap::new();

    for g in &cfg.guests {
        let name = g.name.value.as_str();
        let name_ok = (1..=MAX_GUEST_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !name_ok {
            d.error(
                g.name.pos,
                format!("guest name `{name}` is not valid; use 1-{MAX_GUEST_NAME} lowercase letters, digits and `-`"),
            );
        }
        if let Some(first) = names.insert(name, g.name.pos) {
            d.error(
                g.name.pos,
                format!("duplicate guest name `{name}` (first declared at line {})", first.line),
            );
        }
        if *g.vcpus == 0 || *g.vcpus > MAX_VCPUS {
            d.error(
                g.vcpus.pos,
                format!("vcpus must be between 1 and {MAX_VCPUS}, found {}", *g.vcpus),
            );
        }
        let mem = g.memory.value;
        if mem < MIN_GUEST_MEMORY {
            d.error(
                g.memory.pos,
                format!("memory {mem} is below the minimum of {MIN_GUEST_MEMORY}"),
            );
        } else if mem > MAX_GUEST_MEMORY {
            d.error(
                g.memory.pos,
                format!("memory {mem} is above keel-vmm's maximum of {MAX_GUEST_MEMORY}"),
            );
        } else if mem.bytes() % 4096 != 0 {
            d.error(
                g.memory.pos,
                format!("memory {mem} is not a whole number of 4KiB pages"),
            );
        }
        if let BootFile::Pool(p) = &g.kernel.value {
            check_pool_ref(cfg, &Spanned::new(p.clone(), g.kernel.pos), "kernel", d);
        }
        if let Some(Spanned {
            value: BootFile::Pool(p),
            pos,
        }) = &g.initrd
        {
            check_pool_ref(cfg, &Spanned::new(p.clone(), *pos), "initrd", d);
        }
        if let Some(c) = &g.cmdline
            && c.contains(['\n', '\0'])
        {
            d.error(c.pos, "cmdline must be one line");
        }
        let devices = g.virtio_devices();
        if keel_vmm_api::limits::check_devices(devices).is_err() {
            // At the first device past the limit (disks come first, then NICs).
            let over = keel_vmm_api::limits::MAX_DEVICES;
            let at = match g.disks.get(over) {
                Some(disk) => disk.volume.pos,
                None => g.nics.get(over - g.disks.len()).map_or(g.name.pos, |n| n.bridge.pos),
            };
            d.error(
                at,
                format!(
                    "guest `{name}` has {devices} disks and NICs; keel-vmm gives a guest at most {} virtio devices",
                    keel_vmm_api::limits::MAX_DEVICES
                ),
            );
        } else if let Err(e) = keel_vmm_api::limits::check_cmdline(g.kernel_cmdline().len(), devices) {
            let at = g.cmdline.as_ref().map(|c| c.pos).unwrap_or(g.name.pos);
            d.error(
                at,
                format!("guest `{name}`: the kernel {e} (Keel's own part included); shorten it"),
            );
        }

        for disk in &g.disks {
            check_pool_ref(cfg, &disk.volume, "volume", d);
            if disk.size.bytes() == 0 {
                d.error(
                    disk.size.pos,
                    format!(
                        "volume `{}` has size zero; give it a size such as 10GiB",
                        disk.volume.value
                    ),
                );
            } else if disk.size.bytes() % 512 != 0 {
                d.error(
                    disk.size.pos,
                    format!(
                        "volume size {} is not a multiple of 512 bytes (the disk sector size)",
                        disk.size.value
                    ),
                );
            }
            if let Some(src) = &disk.source {
                check_pool_ref(cfg, src, "source image", d);
                if src.value == disk.volume.value {
                    d.error(src.pos, "a volume cannot be seeded from itself");
                }
            }
            match volumes.get(&disk.volume.value) {
                Some(&(other, ro, size, at)) => {
                    if !(ro && disk.readonly) {
                        d.error(disk.volume.pos, format!("volume `{}` is already attached to guest `{other}` (line {}); a volume shared between attachments must be readonly in all of them", disk.volume.value, at.line));
                    } else if size != disk.size.value {
                        d.error(
                            disk.size.pos,
                            format!(
                                "volume `{}` is declared with size {} here and {size} at line {}",
                                disk.volume.value, disk.size.value, at.line
                            ),
                        );
                    }
                }
                None => {
                    volumes.insert(
                        &disk.volume.value,
                        (name, disk.readonly, disk.size.value, disk.volume.pos),
                    );
                    let used = pool_use.entry(disk.volume.pool.as_str()).or_default();
                    *used = used.saturating_add(disk.size.bytes());
                }
            }
        }

        if g.nics.is_empty() {
            d.warning(g.name.pos, format!("guest `{name}` has no network interface"));
        }
        for (i, nic) in g.nics.iter().enumerate() {
            if !bridges.contains(&nic.bridge.as_str()) {
                d.error(
                    nic.bridge.pos,
                    format!(
                        "guest `{name}` nic {i} refers to bridge `{}`, which is not declared under network.bridges{}",
                        nic.bridge.value,
                        suggest(&nic.bridge, &bridges)
                    ),
                );
            }
            let mac = g.nic_mac(i);
            if let MacSpec::Fixed(m) = nic.mac.value
                && (m.is_multicast() || m.is_zero())
            {
                d.error(
                    nic.mac.pos,
                    format!("MAC {m} is not a unicast address (the low bit of the first byte must be 0)"),
                );
            }
            let pos = if nic.mac.value == MacSpec::Auto {
                nic.bridge.pos
            } else {
                nic.mac.pos
            };
            let who = format!("guest `{name}` nic {i}");
            if let Some((other, at)) = macs.insert(mac, (who, pos)) {
                d.error(pos, format!("MAC {mac} is also used by {other} (line {})", at.line));
            }
        }

        let r = &g.restart;
        if r.backoff.get().is_zero() {
            d.error(r.backoff.pos, "restart backoff must be larger than zero, e.g. 1s");
        }
        if r.backoff.value > r.max_backoff.value {
            d.error(
                r.max_backoff.pos,
                format!(
                    "max_backoff {} is shorter than backoff {}",
                    r.max_backoff.value, r.backoff.value
                ),
            );
        }
        if *r.max_restarts == 0 {
            d.error(
                r.max_restarts.pos,
                "max_restarts must be at least 1 (use policy `never` for no restarts)",
            );
        }
        if r.window.get().is_zero() {
            d.error(r.window.pos, "restart window must be larger than zero, e.g. 10m");
        }
        for (what, t) in [("start_timeout", &g.start_timeout), ("stop_timeout", &g.stop_timeout)] {
            if t.get().is_zero() || t.get() > super::schema::MAX_GUEST_TIMEOUT.get() {
                d.error(
                    t.pos,
                    format!(
                        "{what} {} is out of range: give a duration from 1s to {}, e.g. 30s",
                        t.value,
                        super::schema::MAX_GUEST_TIMEOUT
                    ),
                );
            }
        }
    }

    for p in &cfg.storage.pools {
        if let (Some(cap), Some(used)) = (&p.size, pool_use.get(p.name.as_str()))
            && *used > cap.bytes()
        {
            d.warning(cap.pos, format!("volumes declared in pool `{}` add up to {}, more than its cap of {}; they are sparse, but can fill it", p.name.value, ByteSize(*used), cap.value));
        }
    }
}

/// Parses an update key, `ed25519:BASE64` (32 bytes), as `keel-image keygen` writes it.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let b64 = text.trim().strip_prefix("ed25519:").ok_or_else(|| format!("`{text}` is not a Keel public key; it starts with `ed25519:` (the content of a `keel-image keygen` .pub file)"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("public key is not valid base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("an ed25519 public key is 32 bytes, this one has {}", b.len()))
}

fn check_update(cfg: &Config, d: &mut Diagnostics) {
    let mut seen: HashMap<[u8; 32], Pos> = HashMap::new();
    for key in &cfg.update.trusted_keys {
        match parse_public_key(key) {
            Ok(k) => {
                if let Some(first) = seen.insert(k, key.pos) {
                    d.warning(
                        key.pos,
                        format!("this key is listed twice (first at line {})", first.line),
                    );
                }
            }
            Err(msg) => d.error(key.pos, msg),
        }
    }
    if cfg.update.health_window.get().as_secs() < 1 {
        d.error(cfg.update.health_window.pos, "health_window must be at least 1s");
    }
}
