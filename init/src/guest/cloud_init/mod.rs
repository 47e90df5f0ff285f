//! A guest's cloud-init NoCloud seed: the three files cloud-init reads from a disk
//! labelled `CIDATA` (`meta-data`, `user-data`, `network-config`), made from the
//! guest's `cloud_init:` settings and its NICs' addresses, and written to a small vfat
//! image (`seed_disk`) that keel-vmm attaches read-only after the guest's own disks.
//!
//! The documents are written line by line with every string in double quotes (JSON
//! string syntax, which YAML's double-quoted scalars include): cloud-init reads them
//! with PyYAML, a YAML 1.1 parser, where an unquoted MAC such as `02:00:00:00:00:10` is
//! a base-60 integer and `no` is false. Nothing here is left to a YAML emitter's
//! notion of what needs quoting.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::vmm_command::Paths;
use crate::config::{Bridge, BridgeMode, CloudInit, Guest, MacAddr};

pub mod seed_disk;

/// How one NIC of the guest gets its address: the static lease of its MAC on its
/// bridge (what Keel's DHCP server would hand it anyway), or DHCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicNetwork {
    pub mac: MacAddr,
    pub fixed: Option<FixedAddress>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedAddress {
    /// `10.100.0.10/24`
    pub address: String,
    /// The bridge's own address: router and DNS server, as the DHCP server announces.
    pub gateway: String,
}

/// The three files of a NoCloud seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

impl Seed {
    /// The files as the seed disk holds them.
    pub fn files(&self) -> [(&'static str, &[u8]); 3] {
        [
            ("meta-data", self.meta_data.as_bytes()),
            ("user-data", self.user_data.as_bytes()),
            ("network-config", self.network_config.as_bytes()),
        ]
    }
}

/// Each NIC's addressing, from the bridges of the applied config (a bridge not in
/// `bridges`, as in keel-init's test mode, means DHCP).
pub fn nic_networks(g: &Guest, bridges: &[Bridge]) -> Vec<NicNetwork> {
    (0..g.nics.len())
        .map(|i| {
            let mac = g.nic_mac(i);
            let bridge = bridges.iter().find(|b| b.name.value == g.nics[i].bridge.value);
            let fixed = bridge.and_then(|b| {
                let cidr = b.address.as_ref()?;
                if *b.mode == BridgeMode::Bridged {
                    return None;
                }
                let lease = b.static_lease(mac)?;
                Some(FixedAddress {
                    address: format!("{}/{}", lease.address.value, cidr.prefix),
                    gateway: cidr.addr.to_string(),
                })
            });
            NicNetwork { mac, fixed }
        })
        .collect()
}

/// The seed for `g`. `user_data_file` is the text of its `user_data_file`, read by
/// the caller ([`read_user_data_file`]).
pub fn seed(g: &Guest, c: &CloudInit, nics: &[NicNetwork], user_data_file: Option<String>) -> Seed {
    let user_data = match (user_data_file, &c.user_data) {
        (Some(text), _) => text,
        (None, Some(text)) => text.value.clone(),
        (None, None) => generated_user_data(c),
    };
    let network_config = network_config(nics);
    // Stable for a guest while its settings stay the same; any change makes cloud-init
    // treat the next boot as a new instance and run its first-boot modules again.
    let digest = Sha256::digest(format!("{}\0{user_data}\0{network_config}", g.name.value));
    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&format!("keel-{}-{}", g.name.value, &hex::encode(digest)[..16])),
        q(&g.name.value)
    );
    Seed {
        meta_data,
        user_data,
        network_config,
    }
}

/// Makes `g`'s seed disk where keel-vmm is told to find it (`Paths::cloud_init_seed`):
/// at every start, so an edited `user_data_file` or a changed lease is seen.
pub fn write_seed(g: &Guest, c: &CloudInit, nics: &[NicNetwork], paths: &Paths) -> Result<Seed, String> {
    let file_text = match &c.user_data_file {
        Some(f) => Some(read_user_data_file(&paths.pool_file(f))?),
        None => None,
    };
    let seed = seed(g, c, nics, file_text);
    let path = paths.cloud_init_seed(&g.name);
    seed_disk::write(&path, &seed.files()).map_err(|e| format!("cloud-init seed {}: {e}", path.display()))?;
    Ok(seed)
}

/// Reads a `user_data_file` (at most [`keel_config::MAX_USER_DATA`]) and checks it as
/// the config's `user_data` is checked.
pub fn read_user_data_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("user_data_file {shown}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(crate::config::MAX_USER_DATA as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("user_data_file {shown}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| format!("user_data_file {shown}: not UTF-8 text: {e}"))?;
    crate::config::check_cloud_config(&text).map_err(|e| format!("user_data_file {shown}: {e}"))?;
    Ok(text)
}

/// The `#cloud-config` document for the fields of `cloud_init:`.
fn generated_user_data(c: &CloudInit) -> String {
    let mut out = String::from("#cloud-config\n# made by Keel from the guest's cloud_init settings\n");
    list(
        &mut out,
        "",
        "ssh_authorized_keys",
        c.ssh_authorized_keys.iter().map(|k| k.trim()),
    );
    if !c.users.is_empty() {
        // `default` keeps the image's default user (and the keys above) besides these.
        out.push_str("users:\n  - default\n");
        for u in &c.users {
            let _ = writeln!(out, "  - name: {}", q(&u.name));
            let _ = writeln!(out, "    lock_passwd: true");
            let shell = u.shell.as_ref().map_or("/bin/bash", |s| s.as_str());
            let _ = writeln!(out, "    shell: {}", q(shell));
            if u.sudo {
                let _ = writeln!(out, "    sudo: {}", q("ALL=(ALL) NOPASSWD:ALL"));
            }
            if !u.groups.is_empty() {
                let groups: Vec<&str> = u.groups.iter().map(|g| g.as_str()).collect();
                let _ = writeln!(out, "    groups: {}", q(&groups.join(", ")));
            }
            list(
                &mut out,
                "    ",
                "ssh_authorized_keys",
                u.ssh_authorized_keys.iter().map(|k| k.trim()),
            );
        }
    }
    if !c.packages.is_empty() {
        out.push_str("package_update: true\n");
        list(&mut out, "", "packages", c.packages.iter().map(|p| p.as_str()));
    }
    list(&mut out, "", "runcmd", c.runcmd.iter().map(|r| r.as_str()));
    out
}

/// Network config version 2: each NIC matched by its MAC.
fn network_config(nics: &[NicNetwork]) -> String {
    let mut out = String::from("version: 2\nethernets:\n");
    if nics.is_empty() {
        out = String::from("version: 2\nethernets: {}\n");
    }
    for (i, n) in nics.iter().enumerate() {
        let _ = writeln!(
            out,
            "  nic{i}:\n    match:\n      macaddress: {}",
            q(&n.mac.to_string())
        );
        match &n.fixed {
            None => out.push_str("    dhcp4: true\n"),
            Some(f) => {
                let _ = writeln!(out, "    dhcp4: false\n    addresses: [{}]", q(&f.address));
                // `gateway4`, not a `routes:` entry: cloud-init's ifupdown renderer (what
                // Debian's cloud images use) turns a route into `post-up route add`, and
                // `route` (net-tools) is not installed there — the guest came up with no
                // default route in e2e_cloud. `gateway4` becomes ifupdown's `gateway`,
                // networkd's `Gateway=` and netplan's default route alike.
                let _ = writeln!(out, "    gateway4: {}", q(&f.gateway));
                let _ = writeln!(out, "    nameservers:\n      addresses: [{}]", q(&f.gateway));
            }
        }
    }
    out
}

/// `key:` and one quoted item per line, or nothing for no items.
fn list<'a>(out: &mut String, indent: &str, key: &str, items: impl Iterator<Item = &'a str>) {
    let mut items = items.peekable();
    if items.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "{indent}{key}:");
    for item in items {
        let _ = writeln!(out, "{indent}  - {}", q(item));
    }
}

/// A double-quoted scalar (JSON string syntax is a subset of YAML's).
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests;
