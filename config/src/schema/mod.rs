//! The types of keel.yaml, version 1, and how each is read.
//!
//! Every type derives `Serialize` (JSON output, round trips) and `JsonSchema`
//! (`keel-image schema`); the serde attributes describe the schema, the `Decode`
//! impls below read the file. A round-trip test keeps the two in step.

use std::net::Ipv4Addr;

use schemars::JsonSchema;
use serde::Serialize;

use crate::decode::{Decode, MapReader, Spanned, one_of, scalar};
use crate::diag::Diagnostics;
use crate::units::{ByteSize, Duration, Ipv4Cidr, Ipv4Range, MacAddr};
use crate::yaml::Node;

/// Collects the results of a struct's fields, then builds it only if all decoded.
macro_rules! build {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        (|| Some($ty { $($field: $field.ok()?),* }))()
    };
}

mod cloud_init;
mod guest;
mod host;
mod network;
mod storage;

pub use cloud_init::*;
pub use guest::*;
pub use host::*;
pub use network::*;
pub use storage::*;

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
