//! keel-config: what more than one Keel binary reads. keel.yaml, the appliance's
//! declarative config (schema, units, reading, validation and diagnostics), and the
//! on-disk formats of updates: the signed bundle ([`bundle`]) and the ESP's slot
//! names and records ([`slots`]). keel-init, keel-image and keelctl all build on
//! it; it links no async runtime, HTTP or netlink crate.
//!
//! Reading happens in three steps, each reporting every problem it finds with
//! its position: YAML syntax (`yaml`), structure and types (`decode`, driven by
//! the types in `schema`), and meaning (`validate`). Nothing acts on a file that
//! has an error; warnings do not block.
//!
//! ```
//! let text = "version: 1\nguests:\n  - name: web\n    memory: 256MiB\n";
//! let loaded = keel_config::parse_str(text).expect("valid");
//! assert_eq!(loaded.config.guests[0].memory.to_string(), "256MiB");
//! assert_eq!(loaded.warnings.warnings().count(), 1); // the guest has no NIC
//! ```

pub mod bundle;
pub(crate) mod decode;
mod diag;
mod schema;
pub mod slots;
mod units;
mod validate;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use decode::Spanned;
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use schema::*;
pub use units::{ByteSize, Duration, Ipv4Cidr, Ipv4Range, MacAddr};
pub use validate::{
    MAX_GUEST_MEMORY, MAX_USER_DATA, MAX_VCPUS, MIN_GUEST_MEMORY, check_cloud_config, parse_public_key,
};

use decode::Decode;

/// A config that passed validation, with its warnings.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Diagnostics,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The file has errors; `diagnostics` holds all of them (and any warnings).
    #[error("{}", diagnostics.render(&path.display().to_string()).trim_end())]
    Invalid { path: PathBuf, diagnostics: Diagnostics },
}

impl LoadError {
    pub fn diagnostics(&self) -> Option<&Diagnostics> {
        match self {
            LoadError::Invalid { diagnostics, .. } => Some(diagnostics),
            LoadError::Io { .. } => None,
        }
    }
}

/// Reads and validates config text. `Err` holds every diagnostic when there is
/// at least one error.
pub fn parse_str(text: &str) -> Result<Loaded, Diagnostics> {
    let mut d = Diagnostics::default();
    let node = match yaml::parse(text) {
        Ok(node) => node,
        Err(e) => {
            d.error(e.pos, format!("YAML syntax: {}", e.message));
            return Err(d);
        }
    };
    let config = Config::decode(&node, &mut d);
    match config {
        Some(config) => {
            validate::check(&config, &mut d);
            if d.has_errors() {
                Err(d)
            } else {
                Ok(Loaded { config, warnings: d })
            }
        }
        None => Err(d),
    }
}

/// Reads and validates a config file: at most [`yaml::MAX_BYTES`] (never more is
/// read), UTF-8 (the first bad byte is reported at its line and column).
pub fn load_file(path: &Path) -> Result<Loaded, LoadError> {
    use std::io::Read;
    let io = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(yaml::MAX_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(io)?;
    let invalid = |pos: yaml::Pos, message: String| {
        let mut diagnostics = Diagnostics::default();
        diagnostics.error(pos, message);
        LoadError::Invalid {
            path: path.to_owned(),
            diagnostics,
        }
    };
    if bytes.len() > yaml::MAX_BYTES {
        return Err(invalid(
            yaml::Pos::new(1, 1),
            format!(
                "the file is larger than {} bytes (1 MiB), the most a config may be",
                yaml::MAX_BYTES
            ),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Columns count characters, as editors do.
        let col = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
        invalid(
            yaml::Pos::new(line, col),
            format!(
                "byte {} is not UTF-8; a config is UTF-8 text",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    parse_str(&text).map_err(|diagnostics| LoadError::Invalid {
        path: path.to_owned(),
        diagnostics,
    })
}

/// The JSON Schema of keel.yaml (draft 2020-12), for editors and `keel-image schema`.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Config);
    serde_json::to_value(schema).unwrap_or_default()
}

impl Config {
    /// The config as YAML, the way an operator would write it (defaults included).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}
