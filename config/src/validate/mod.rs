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
use super::schema::{BootFile, BootSource, BridgeMode, Config, Guest, MacSpec, PoolPath, UplinkAddress};
use super::units::{ByteSize, Ipv4Cidr, MacAddr};
use super::yaml::Pos;

mod cloud_init;
mod forwards;
mod guests;
mod network;

pub use cloud_init::{MAX_USER_DATA, check_cloud_config};
use forwards::check_forwards;
use guests::check_guests;
use network::check_network;

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
    for g in &cfg.guests {
        if let Some(c) = &g.cloud_init {
            cloud_init::check_cloud_init(cfg, g, c, d);
        }
    }
    check_forwards(cfg, d);
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

pub(super) fn valid_pool_name(name: &str) -> bool {
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
pub(super) fn check_pool_ref(cfg: &Config, r: &Spanned<PoolPath>, what: &str, d: &mut Diagnostics) {
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

pub(super) fn suggest(word: &str, known: &[&str]) -> String {
    match did_you_mean(word, known) {
        Some(s) => format!("; did you mean `{s}`?"),
        None if known.is_empty() => " (none are declared)".into(),
        None => format!(" (declared: {})", known.join(", ")),
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
