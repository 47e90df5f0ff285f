//! [`MemorySize`]: a guest memory size in bytes that parses and prints binary units, as
//! `--memory` and the JSON config write it ("512MiB", "2GiB", or a byte count).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A guest memory size in bytes; parses and prints with binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub u64);

impl MemorySize {
    pub const fn mib(n: u64) -> Self {
        MemorySize(n << 20)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl Default for MemorySize {
    fn default() -> Self {
        MemorySize::mib(512)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{name}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A memory size that is not a number with an optional binary unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory '{0}': expected a size like 512MiB, 2GiB or a byte count")]
pub struct ParseSizeError(pub String);

impl FromStr for MemorySize {
    type Err = ParseSizeError;

    /// Accepts `N`, `NB`, `NK`/`NKiB`/`NKB`, `NM`/`NMiB`, `NG`/`NGiB`, `NT`/`NTiB`;
    /// all units are binary (a guest's RAM is never sized in powers of ten).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSizeError(s.to_string());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| err())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" | "kb" => 10,
            "m" | "mib" | "mb" => 20,
            "g" | "gib" | "gb" => 30,
            "t" | "tib" | "tb" => 40,
            _ => return Err(err()),
        };
        n.checked_mul(1u64 << shift).map(MemorySize).ok_or_else(err)
    }
}

impl Serialize for MemorySize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(MemorySize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units_parse() {
        assert_eq!("512MiB".parse::<MemorySize>(), Ok(MemorySize(512 << 20)));
        assert_eq!("2GiB".parse::<MemorySize>(), Ok(MemorySize(2 << 30)));
        assert_eq!("128M".parse::<MemorySize>(), Ok(MemorySize(128 << 20)));
        assert_eq!("1g".parse::<MemorySize>(), Ok(MemorySize(1 << 30)));
        assert_eq!("4096".parse::<MemorySize>(), Ok(MemorySize(4096)));
        assert_eq!("64 KiB".parse::<MemorySize>(), Ok(MemorySize(64 << 10)));
        assert!("".parse::<MemorySize>().is_err());
        assert!("12 parsecs".parse::<MemorySize>().is_err());
        assert!("MiB".parse::<MemorySize>().is_err());
        assert!("99999999999999T".parse::<MemorySize>().is_err());
    }

    #[test]
    fn memory_prints_largest_exact_unit() {
        assert_eq!(MemorySize(512 << 20).to_string(), "512MiB");
        assert_eq!(MemorySize(3 << 30).to_string(), "3GiB");
        assert_eq!(MemorySize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(MemorySize(100).to_string(), "100B");
    }

    #[test]
    fn json_takes_units_or_bytes() {
        assert_eq!(
            serde_json::from_str::<MemorySize>(r#""1GiB""#).unwrap(),
            MemorySize(1 << 30)
        );
        assert_eq!(
            serde_json::from_str::<MemorySize>("33554432").unwrap(),
            MemorySize(32 << 20)
        );
        assert_eq!(serde_json::to_string(&MemorySize::mib(64)).unwrap(), r#""64MiB""#);
        let e = serde_json::from_str::<MemorySize>(r#""lots""#).unwrap_err().to_string();
        assert!(e.contains("expected a size like 512MiB"), "{e}");
    }
}
