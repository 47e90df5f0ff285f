//! Plain value types of a VM's description that devices use too: where the serial
//! console goes ([`SerialOutput`]) and a NIC's address ([`Mac`]). A leaf: it imports
//! nothing from the crate, so devices need not import the config that holds them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use keel_vmm_api::MemorySize;

/// Where serial output goes (and, for stdio on a terminal and unix sockets, where input
/// comes from).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// The VMM's stdout; stdin feeds the guest when it is a terminal.
    #[default]
    Stdio,
    /// Append to a file (created if missing).
    File(PathBuf),
    /// Connect to a listening unix stream socket (the supervisor's); both directions.
    Unix(PathBuf),
    /// Discard output.
    None,
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdio => f.write_str("stdio"),
            SerialOutput::None => f.write_str("none"),
            SerialOutput::File(p) => write!(f, "file:{}", p.display()),
            SerialOutput::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for SerialOutput {
    type Err = ParseSerialError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let nonempty = |p: &str| {
            if p.is_empty() {
                Err(ParseSerialError(s.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            _ => {
                if let Some(p) = s.strip_prefix("file:") {
                    Ok(SerialOutput::File(nonempty(p)?))
                } else if let Some(p) = s.strip_prefix("unix:") {
                    Ok(SerialOutput::Unix(nonempty(p)?))
                } else {
                    Err(ParseSerialError(s.to_string()))
                }
            }
        }
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `--serial` value that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("serial '{0}': expected stdio, none, file:PATH or unix:PATH")]
pub struct ParseSerialError(pub String);

/// MAC address, printed and parsed as aa:bb:cc:dd:ee:ff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random locally administered unicast address (02:xx:xx:xx:xx:xx style).
    pub fn random() -> Mac {
        let mut b = [0u8; 6];
        // SAFETY: writing into a local buffer; on failure the bytes stay zero and the
        // fixed first octet still makes a valid local address.
        unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("mac {s:?}: expected six hex bytes like 52:54:00:12:34:56");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(err());
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if b[0] & 1 != 0 {
            return Err(format!("mac {s}: a multicast address cannot be a NIC's address"));
        }
        Ok(Mac(b))
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_parse_roundtrip() {
        for s in ["stdio", "none", "file:/tmp/x", "unix:/run/a.sock"] {
            let parsed: SerialOutput = s.parse().unwrap();
            assert_eq!(parsed.to_string(), s);
        }
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tcp:1".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn mac_parse_and_print() {
        assert_eq!(
            "52:54:00:ab:cd:ef".parse::<Mac>().unwrap().to_string(),
            "52:54:00:ab:cd:ef"
        );
        assert!("01:00:00:00:00:01".parse::<Mac>().unwrap_err().contains("multicast"));
        assert!("52:54:00:12:34".parse::<Mac>().is_err());
        let m = Mac::random();
        assert_eq!(m.0[0] & 0x03, 0x02, "locally administered unicast");
    }
}
