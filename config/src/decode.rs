//! Turning the positioned YAML tree into typed config, reporting every problem.
//!
//! Each config type implements [`Decode`] by asking a [`MapReader`] for its fields
//! by name. The reader remembers which names were asked for, so a key nobody asked
//! for is an unknown field, reported with the closest known name as a suggestion.
//! A decoder that finds a problem records it and returns `None`; its siblings keep
//! going, so one run reports everything that is wrong with the file's structure.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, Serializer};

use super::diag::Diagnostics;
use super::yaml::{Key, Node, Pos, Value};

/// A value and the position of the YAML node it came from, so that semantic
/// checks can point at it. Equality ignores the position: the same guest moved to
/// another line of the file is the same guest.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    pub value: T,
    pub pos: Pos,
}

impl<T> Spanned<T> {
    pub fn new(value: T, pos: Pos) -> Self {
        Spanned { value, pos }
    }
}

impl<T> Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: fmt::Display> fmt::Display for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A config type that can be read from a YAML node.
pub trait Decode: Sized {
    /// Decodes `node`, or records why not in `d` and returns `None`.
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self>;
}

impl<T: Decode> Decode for Spanned<T> {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        T::decode(node, d).map(|v| Spanned::new(v, node.pos))
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        match &node.value {
            Value::Seq(items) => {
                // Decode every item even after a failure, to report all problems.
                let decoded: Vec<Option<T>> = items.iter().map(|n| T::decode(n, d)).collect();
                decoded.into_iter().collect()
            }
            Value::Scalar(s) if s.is_null() => Some(Vec::new()),
            _ => {
                d.error(node.pos, format!("expected a list, found {}", node.kind()));
                None
            }
        }
    }
}

/// The scalar text of a node, or an error saying what was expected instead.
pub fn scalar<'n>(node: &'n Node, expected: &str, d: &mut Diagnostics) -> Option<&'n str> {
    match &node.value {
        Value::Scalar(s) if !s.is_null() => Some(&s.text),
        _ => {
            d.error(node.pos, format!("expected {expected}, found {}", node.kind()));
            None
        }
    }
}

impl Decode for String {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        scalar(node, "a string", d).map(str::to_owned)
    }
}

impl Decode for bool {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        match &node.value {
            Value::Scalar(s) if !s.quoted && s.text == "true" => Some(true),
            Value::Scalar(s) if !s.quoted && s.text == "false" => Some(false),
            _ => {
                d.error(node.pos, format!("expected true or false, found {}", describe(node)));
                None
            }
        }
    }
}

macro_rules! decode_int {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
                match &node.value {
                    Value::Scalar(s) if !s.quoted && !s.is_null() => match s.text.parse::<$t>() {
                        Ok(v) => Some(v),
                        Err(_) if s.text.bytes().all(|b| b.is_ascii_digit()) => {
                            d.error(node.pos, format!(
                                "`{}` is out of range; expected a whole number between {} and {}",
                                s.text, <$t>::MIN, <$t>::MAX
                            ));
                            None
                        }
                        Err(_) => {
                            d.error(node.pos, format!("expected a whole number, found `{}`", s.text));
                            None
                        }
                    },
                    _ => {
                        d.error(node.pos, format!("expected a whole number, found {}", describe(node)));
                        None
                    }
                }
            }
        }
    )*};
}
decode_int!(u8, u16, u32, u64);

/// Decodes a scalar through `FromStr`, whose error text becomes the message.
pub fn parse_scalar<T: FromStr<Err = String>>(node: &Node, expected: &str, d: &mut Diagnostics) -> Option<T> {
    let text = scalar(node, expected, d)?;
    match text.parse() {
        Ok(v) => Some(v),
        Err(msg) => {
            d.error(node.pos, msg);
            None
        }
    }
}

/// Implements `Decode` for types that parse from one scalar.
macro_rules! decode_via_fromstr {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl Decode for $t {
            fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
                $crate::decode::parse_scalar(node, $what, d)
            }
        }
    )*};
}
pub(crate) use decode_via_fromstr;

decode_via_fromstr!(
    super::units::ByteSize => "a size such as 512MiB",
    super::units::Duration => "a duration such as 30s",
    super::units::Ipv4Cidr => "an address with prefix such as 10.100.0.1/24",
    super::units::Ipv4Range => "an address range such as 10.100.0.100-10.100.0.199",
    super::units::MacAddr => "a MAC address such as 52:54:00:12:34:56",
);

impl Decode for std::net::Ipv4Addr {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "an IPv4 address such as 10.100.0.1", d)?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                d.error(
                    node.pos,
                    format!("`{text}` is not an IPv4 address; write e.g. 192.168.1.1"),
                );
                None
            }
        }
    }
}

/// A scalar chosen from a fixed set of words, e.g. a bridge mode.
pub fn one_of<T: Copy>(node: &Node, choices: &[(&str, T)], d: &mut Diagnostics) -> Option<T> {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let text = scalar(node, &format!("one of {}", names.join(", ")), d)?;
    if let Some((_, v)) = choices.iter().find(|(n, _)| *n == text) {
        return Some(*v);
    }
    let hint = did_you_mean(text, &names)
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    d.error(node.pos, format!("`{text}` is not one of {}{hint}", names.join(", ")));
    None
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar(s) if s.is_null() => "nothing".into(),
        Value::Scalar(s) => format!("`{}`", s.text),
        _ => node.kind().into(),
    }
}

/// The known name closest to a misspelt one, if it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(word, k), *k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// A field failed to decode; the reason is already in the diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reported;

/// Reads the fields of one YAML mapping by name.
pub struct MapReader<'n, 'd> {
    pos: Pos,
    what: &'static str,
    entries: &'n [(Key, Node)],
    asked: Vec<&'static str>,
    pub d: &'d mut Diagnostics,
}

impl<'n, 'd> MapReader<'n, 'd> {
    /// `what` names the mapping in messages, e.g. "guest". A null node (an empty
    /// section such as `storage:`) reads as an empty mapping.
    pub fn new(node: &'n Node, what: &'static str, d: &'d mut Diagnostics) -> Option<Self> {
        static EMPTY: [(Key, Node); 0] = [];
        let entries: &'n [(Key, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Scalar(s) if s.is_null() => &EMPTY,
            _ => {
                d.error(
                    node.pos,
                    format!("expected a mapping of {what} settings, found {}", node.kind()),
                );
                return None;
            }
        };
        Some(MapReader {
            pos: node.pos,
            what,
            entries,
            asked: Vec::new(),
            d,
        })
    }

    /// The raw node of a field, if present (and not null).
    pub fn node(&mut self, key: &'static str) -> Option<&'n Node> {
        self.asked.push(key);
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, n)| n)
            .filter(|n| !matches!(&n.value, Value::Scalar(s) if s.is_null()))
    }

    /// A field that must be present.
    pub fn required<T: Decode>(&mut self, key: &'static str) -> Result<T, Reported> {
        match self.node(key) {
            Some(node) => T::decode(node, self.d).ok_or(Reported),
            None => {
                self.d
                    .error(self.pos, format!("{} is missing the required field `{key}`", self.what));
                Err(Reported)
            }
        }
    }

    /// A field that may be absent (`Ok(None)`).
    pub fn optional<T: Decode>(&mut self, key: &'static str) -> Result<Option<T>, Reported> {
        match self.node(key) {
            Some(node) => T::decode(node, self.d).map(Some).ok_or(Reported),
            None => Ok(None),
        }
    }

    /// A field with a default when absent.
    pub fn or_default<T: Decode + Default>(&mut self, key: &'static str) -> Result<T, Reported> {
        self.optional(key).map(Option::unwrap_or_default)
    }

    /// Reports every key that no field asked for. Unknown keys do not stop the
    /// struct from decoding, so semantic checks still run and report their errors too.
    pub fn finish(self) {
        for (key, _) in self.entries {
            if self.asked.contains(&key.name.as_str()) {
                continue;
            }
            let hint = match did_you_mean(&key.name, &self.asked) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => format!("; known fields are: {}", self.asked.join(", ")),
            };
            self.d
                .error(key.pos, format!("unknown field `{}` in {}{hint}", key.name, self.what));
        }
    }
}
