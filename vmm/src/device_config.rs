//! Virtio device settings in a [`crate::VmConfig`]: disks, network interfaces, the entropy
//! device; parsed from the CLI's `key=value,...` syntax and from JSON.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::types::Mac;

/// Most virtio devices one guest may have (the MMIO windows and interrupt lines reserved).
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// One disk: `--disk path=P[,readonly=on][,serial=S][,direct=on]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file; its size (rounded down to 512 bytes) is the disk's capacity.
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// Returned by GET_ID (at most 20 ASCII bytes): /dev/disk/by-id/virtio-<serial>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
}

/// One network interface: `--net tap=NAME|fd=N[,mac=M]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap device to open (or create) by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An open tap fd inherited from the parent (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// Guest MAC address; random locally administered when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

/// A bad `--disk` / `--net` value or device list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceConfigError(pub String);

fn parse_on_off(key: &str, value: &str, whole: &str) -> Result<bool, DeviceConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(DeviceConfigError(format!("{whole}: {key}={value}: expected on or off"))),
    }
}

/// Splits `a=1,b=2` into pairs, naming the whole option on error.
fn pairs<'a>(what: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, DeviceConfigError> {
    s.split(',')
        .map(|kv| {
            kv.split_once('=')
                .ok_or_else(|| DeviceConfigError(format!("{what} {s:?}: {kv:?} is not key=value")))
        })
        .collect()
}

impl FromStr for DiskConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let whole = format!("--disk {s:?}");
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            serial: None,
            direct: false,
        };
        for (k, v) in pairs("--disk", s)? {
            match k {
                "path" => disk.path = PathBuf::from(v),
                "readonly" => disk.readonly = parse_on_off(k, v, &whole)?,
                "direct" => disk.direct = parse_on_off(k, v, &whole)?,
                "serial" => disk.serial = Some(v.to_string()),
                _ => {
                    return Err(DeviceConfigError(format!(
                        "{whole}: unknown key {k:?} (keys: path, readonly, serial, direct)"
                    )));
                }
            }
        }
        disk.validate()?;
        Ok(disk)
    }
}

impl DiskConfig {
    pub fn validate(&self) -> Result<(), DeviceConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(DeviceConfigError("disk: path=FILE is required".into()));
        }
        if let Some(serial) = &self.serial
            && (serial.len() > 20 || !serial.is_ascii())
        {
            return Err(DeviceConfigError(format!(
                "disk {}: serial {serial:?}: at most 20 ASCII characters",
                self.path.display()
            )));
        }
        Ok(())
    }
}

impl FromStr for NetConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let whole = format!("--net {s:?}");
        let mut net = NetConfig {
            tap: None,
            fd: None,
            mac: None,
        };
        for (k, v) in pairs("--net", s)? {
            match k {
                "tap" => net.tap = Some(v.to_string()),
                "fd" => {
                    net.fd = Some(
                        v.parse()
                            .map_err(|_| DeviceConfigError(format!("{whole}: fd={v}: expected a number")))?,
                    )
                }
                "mac" => net.mac = Some(v.parse().map_err(|e| DeviceConfigError(format!("{whole}: {e}")))?),
                _ => {
                    return Err(DeviceConfigError(format!(
                        "{whole}: unknown key {k:?} (keys: tap, fd, mac)"
                    )));
                }
            }
        }
        net.validate()?;
        Ok(net)
    }
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), DeviceConfigError> {
        match (&self.tap, self.fd) {
            (Some(_), None) => Ok(()),
            (None, Some(fd)) if fd >= 0 => Ok(()),
            (None, Some(fd)) => Err(DeviceConfigError(format!("net: fd={fd} is not a file descriptor"))),
            (Some(_), Some(_)) => Err(DeviceConfigError("net: give tap=NAME or fd=N, not both".into())),
            (None, None) => Err(DeviceConfigError("net: tap=NAME or fd=N is required".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "path=/var/a.img,readonly=on,serial=root,direct=on".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/var/a.img"));
        assert!(d.readonly && d.direct);
        assert_eq!(d.serial.as_deref(), Some("root"));
        let d: DiskConfig = "path=b.img".parse().unwrap();
        assert!(!d.readonly && !d.direct && d.serial.is_none());
        let e = "path=a,readonly=maybe".parse::<DiskConfig>().unwrap_err().0;
        assert!(e.contains("readonly=maybe: expected on or off"), "{e}");
        let e = "path=a,size=3".parse::<DiskConfig>().unwrap_err().0;
        assert!(e.contains("unknown key \"size\""), "{e}");
        assert!("readonly=on".parse::<DiskConfig>().is_err(), "path required");
        assert!("path=a,serial=123456789012345678901".parse::<DiskConfig>().is_err());
        assert!("/just/a/path".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        let n: NetConfig = "fd=7".parse().unwrap();
        assert_eq!(n.fd, Some(7));
        assert!("tap=a,fd=3".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:12:34:56".parse::<NetConfig>().is_err());
        assert!("fd=x".parse::<NetConfig>().is_err());
        let e = "tap=a,mac=01:00:00:00:00:01".parse::<NetConfig>().unwrap_err().0;
        assert!(e.contains("multicast"), "{e}");
        assert!("tap=a,mac=52:54:00:12:34".parse::<NetConfig>().is_err());
    }

    #[test]
    fn json_round_trip() {
        let n = NetConfig {
            tap: None,
            fd: Some(3),
            mac: Some(Mac([2, 0, 0, 0, 0, 1])),
        };
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(text, r#"{"fd":3,"mac":"02:00:00:00:00:01"}"#);
        assert_eq!(serde_json::from_str::<NetConfig>(&text).unwrap(), n);
        let d: DiskConfig = serde_json::from_str(r#"{"path":"/x","readonly":true}"#).unwrap();
        assert!(d.readonly);
    }
}
