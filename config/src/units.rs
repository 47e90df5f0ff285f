//! Typed values of the config: sizes, durations, IPv4 networks, MAC addresses.
//!
//! Each parses from the text an operator writes and prints back the same way
//! (`Display` ∘ `FromStr` round-trips; property tests check it). Parse errors say
//! what was expected, with an example, because they end up in front of an operator.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Serialize, Serializer};

/// Implements `Serialize` (as the display string) and a string JSON Schema.
macro_rules! string_typed {
    ($ty:ty, $name:literal, $pattern:literal, $desc:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern, "description": $desc })
            }
        }
    };
}

// ---------------------------------------------------------------- sizes

/// A number of bytes, written with a unit: `512MiB`, `2GiB`, `10GB`, `4096B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("kB", 1_000),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = (&s[..split], s[split..].trim());
        if num.is_empty() {
            return Err(format!(
                "`{s}` is not a size; write a whole number and a unit, e.g. 512MiB or 2GiB"
            ));
        }
        if unit.is_empty() {
            return Err(format!("size `{s}` has no unit; write e.g. {s}MiB or {s}B"));
        }
        let Some(&(_, mult)) = SIZE_UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(format!(
                "unknown size unit `{unit}`; use B, KiB, MiB, GiB, TiB, PiB (or kB, MB, GB, TB)"
            ));
        };
        let n: u64 = num.parse().map_err(|_| format!("size `{s}` is too large"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large (more than 2^64 bytes)"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the value exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, mult) = [
            ("PiB", 1u64 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ]
        .into_iter()
        .find(|(_, m)| self.0 != 0 && self.0.is_multiple_of(*m))
        .unwrap_or(("B", 1));
        write!(f, "{}{}", self.0 / mult, unit)
    }
}

string_typed!(
    ByteSize,
    "ByteSize",
    r"^[0-9]+\s*(B|KiB|MiB|GiB|TiB|PiB|kB|KB|MB|GB|TB)$",
    "A size with a unit, e.g. 512MiB or 2GiB"
);

// ---------------------------------------------------------------- durations

/// A span of time, written with units: `500ms`, `30s`, `5m`, `1h30m`, `2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

const DURATION_UNITS: &[(&str, u64)] = &[
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let bad =
            || format!("`{text}` is not a duration; write a number and a unit (ms, s, m, h, d), e.g. 30s or 1h30m");
        if text.is_empty() {
            return Err(bad());
        }
        let mut rest = text;
        let mut total: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            if unit.is_empty() {
                return Err(format!("duration `{text}` has no unit; write e.g. {text}s"));
            }
            let &(_, ms) = DURATION_UNITS.iter().find(|(u, _)| *u == unit).ok_or_else(bad)?;
            total = n
                .checked_mul(ms)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("duration `{text}` is too long"))?;
            rest = &rest[unit_len..];
        }
        Ok(Duration(std::time::Duration::from_millis(total)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis() as u64;
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit, size) in DURATION_UNITS {
            if ms >= *size {
                write!(f, "{}{}", ms / size, unit)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

string_typed!(
    Duration,
    "Duration",
    r"^([0-9]+(ms|s|m|h|d))+$",
    "A duration, e.g. 30s, 5m or 1h30m"
);

// ---------------------------------------------------------------- IPv4 networks

/// An IPv4 address with its prefix length: `10.100.0.1/24` (the host's address
/// on that network and the network itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
    /// Whether the two networks share any address.
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an IPv4 address with prefix; write e.g. 10.100.0.1/24");
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(format!("prefix length /{prefix} in `{s}` is larger than 32"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

string_typed!(
    Ipv4Cidr,
    "Ipv4Cidr",
    r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$",
    "An IPv4 address with prefix length, e.g. 10.100.0.1/24"
);

/// An inclusive range of IPv4 addresses: `10.100.0.100-10.100.0.199`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Range {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Ipv4Range {
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }
    /// How many addresses the range holds (never zero: start <= end).
    pub fn count(self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }
}

impl FromStr for Ipv4Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an address range; write FIRST-LAST, e.g. 10.100.0.100-10.100.0.199");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let start: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let end: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if start > end {
            return Err(format!("range `{s}` ends before it starts"));
        }
        Ok(Ipv4Range { start, end })
    }
}

impl fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

string_typed!(
    Ipv4Range,
    "Ipv4Range",
    r"^[0-9]{1,3}(\.[0-9]{1,3}){3}\s*-\s*[0-9]{1,3}(\.[0-9]{1,3}){3}$",
    "An inclusive IPv4 range, e.g. 10.100.0.100-10.100.0.199"
);

// ---------------------------------------------------------------- MAC addresses

/// An Ethernet MAC address, `52:54:00:12:34:56` (`-` separators accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }
    pub fn is_locally_administered(self) -> bool {
        self.0[0] & 0x02 != 0
    }
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address; write six hex bytes, e.g. 52:54:00:12:34:56");
        let parts: Vec<&str> = s.trim().split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

string_typed!(
    MacAddr,
    "MacAddr",
    r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$",
    "A MAC address, e.g. 52:54:00:12:34:56"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().to_string(), "2GiB");
        assert_eq!("10GB".parse::<ByteSize>().unwrap(), ByteSize(10_000_000_000));
        assert_eq!("1536MiB".parse::<ByteSize>().unwrap().to_string(), "1536MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert!("512".parse::<ByteSize>().unwrap_err().contains("no unit"));
        assert!(
            "5 parsecs"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!("20000000PiB".parse::<ByteSize>().unwrap_err().contains("too large"));
        assert!(
            "99999999999999999999999B"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("too large")
        );
        assert!("-1GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!("1h30m".parse::<Duration>().unwrap(), Duration::secs(5400));
        assert_eq!(Duration::secs(5400).to_string(), "1h30m");
        assert_eq!("500ms".parse::<Duration>().unwrap().to_string(), "500ms");
        assert!("30".parse::<Duration>().unwrap_err().contains("no unit"));
        assert!("5x".parse::<Duration>().is_err());
        assert!("".parse::<Duration>().is_err());
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "10.100.0.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 100, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 100, 0, 255));
        assert!(c.contains(Ipv4Addr::new(10, 100, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 100, 1, 1)));
        assert!(c.overlaps("10.0.0.0/8".parse().unwrap()));
        assert!(!c.overlaps("10.101.0.1/24".parse().unwrap()));
        assert!("10.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn macs() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!(!m.is_multicast());
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_multicast());
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<MacAddr>().is_err());
    }

    proptest! {
        #[test]
        fn size_round_trips(n in any::<u64>()) {
            let s = ByteSize(n);
            prop_assert_eq!(s.to_string().parse::<ByteSize>().unwrap(), s);
        }

        #[test]
        fn duration_round_trips(ms in 0u64..(1u64 << 50)) {
            let d = Duration(std::time::Duration::from_millis(ms));
            prop_assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }

        #[test]
        fn cidr_round_trips(a in any::<u32>(), p in 0u8..=32) {
            let c = Ipv4Cidr { addr: Ipv4Addr::from(a), prefix: p };
            prop_assert_eq!(c.to_string().parse::<Ipv4Cidr>().unwrap(), c);
            prop_assert!(c.contains(c.addr));
            prop_assert!(c.overlaps(c));
        }

        #[test]
        fn mac_round_trips(b in any::<[u8; 6]>()) {
            let m = MacAddr(b);
            prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        }

        #[test]
        fn range_round_trips(a in any::<u32>(), b in any::<u32>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let r = Ipv4Range { start: Ipv4Addr::from(lo), end: Ipv4Addr::from(hi) };
            prop_assert_eq!(r.to_string().parse::<Ipv4Range>().unwrap(), r);
        }
    }
}
