//! `storage:` — pools on KEEL-DATA and the POOL/NAME paths that point into them.

use super::*;

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

crate::decode::decode_via_fromstr!(PoolPath => "a pool path such as default/web-root");

/// The longest name of an imported image.
pub const MAX_IMAGE_NAME: usize = 64;

/// Whether `name` can name an imported image (`keelctl image import NAME`, a disk's
/// `image: POOL/NAME`): lowercase letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit, at most [`MAX_IMAGE_NAME`]. It becomes the file `images/NAME.raw`.
pub fn is_image_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= MAX_IMAGE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}
