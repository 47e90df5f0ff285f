//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde-based YAML readers stop at the first error and forget positions once a
//! value is decoded, but Keel reports *every* problem with `FILE:LINE:COL`, semantic
//! ones included. So the file is first read into this tree (with saphyr-parser's
//! event stream, which carries a position for every event), and `decode` walks it.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column in the source file, as editors count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    pub fn new(line: usize, col: usize) -> Self {
        Pos { line, col }
    }

    fn from_span(span: &Span) -> Self {
        // saphyr: line is 1-based, column 0-based.
        Pos::new(span.start.line(), span.start.col() + 1)
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A scalar's text plus whether it was quoted: `"8"` is a string, `8` a number.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub text: String,
    pub quoted: bool,
}

impl Scalar {
    /// YAML 1.2 core schema null: empty, `~` or `null`, unquoted.
    pub fn is_null(&self) -> bool {
        !self.quoted && matches!(self.text.as_str(), "" | "~" | "null" | "Null" | "NULL")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Keys in file order; duplicates are rejected while reading.
    Map(Vec<(Key, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// What kind of node this is, in the words an error message uses.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(s) if s.is_null() => "null",
            Value::Scalar(s) if s.quoted => "a string",
            Value::Scalar(_) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A syntax error: the file is not YAML at all, so nothing else can be checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Largest config text read: a real keel.yaml is a few KiB.
pub const MAX_BYTES: usize = 1 << 20;
/// Deepest nesting of lists and mappings (a keel.yaml needs about 6).
pub const MAX_DEPTH: usize = 64;
/// Most nodes in the tree with every alias expanded where it is used: bounds the
/// tree's memory (an alias is a copy) whatever a file's anchors and aliases multiply
/// to ("billion laughs").
pub const MAX_NODES: usize = 100_000;

/// Reads one YAML document. An empty file is an empty mapping. Bounded: at most
/// [`MAX_BYTES`] of text, [`MAX_DEPTH`] levels and [`MAX_NODES`] nodes once aliases are
/// expanded; past any of them it stops with an error at the place it gave up.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if text.len() > MAX_BYTES {
        return Err(SyntaxError {
            pos: Pos::new(1, 1),
            message: format!(
                "the file is {} bytes; a config is at most {MAX_BYTES} bytes (1 MiB)",
                text.len()
            ),
        });
    }
    let mut builder = TreeBuilder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| SyntaxError {
            pos: Pos::new(e.marker().line(), e.marker().col() + 1),
            message: e.info().to_string(),
        })?;
        builder.push(event, &span)?;
    }
    builder.finish()
}

enum Open {
    Seq(Pos, usize, Vec<Node>),
    /// Entries, the key waiting for its value, and the keys seen (duplicates are found
    /// in constant time: a map with many keys must not cost quadratic time).
    Map(Pos, usize, Vec<(Key, Node)>, Option<Key>, HashMap<String, Pos>),
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Open>,
    /// Each anchored node with how many nodes it counts for when an alias repeats it.
    anchors: HashMap<usize, (Node, usize)>,
    documents: Vec<Node>,
    /// Nodes so far, aliases counted at their expanded size.
    nodes: usize,
    /// The node count at each open collection's start, to size it when it ends.
    starts: Vec<usize>,
}

impl TreeBuilder {
    fn push(&mut self, event: Event<'_>, span: &Span) -> Result<(), SyntaxError> {
        let pos = Pos::from_span(span);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                self.count(1, pos)?;
                let node = Node {
                    value: Value::Scalar(Scalar {
                        text: text.into_owned(),
                        quoted: style != ScalarStyle::Plain,
                    }),
                    pos,
                };
                self.complete(node, anchor)
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, size)| *size) {
                Some(size) => {
                    // Counted before it is copied, so a bomb is refused before it grows.
                    self.count(size, pos)?;
                    let Some((node, _)) = self.anchors.get(&id) else {
                        return Ok(());
                    };
                    // An alias stands where it is used: report positions there.
                    let node = Node { pos, ..node.clone() };
                    self.complete_sized(node, 0, size)
                }
                None => Err(SyntaxError {
                    pos,
                    message: "alias to an unknown anchor".into(),
                }),
            },
            Event::SequenceStart(anchor, _) => {
                self.open(pos)?;
                self.stack.push(Open::Seq(pos, anchor, Vec::new()));
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.open(pos)?;
                self.stack
                    .push(Open::Map(pos, anchor, Vec::new(), None, HashMap::new()));
                Ok(())
            }
            Event::SequenceEnd => match self.stack.pop() {
                Some(Open::Seq(pos, anchor, items)) => self.close(
                    Node {
                        value: Value::Seq(items),
                        pos,
                    },
                    anchor,
                ),
                _ => Err(SyntaxError {
                    pos,
                    message: "unbalanced sequence end".into(),
                }),
            },
            Event::MappingEnd => match self.stack.pop() {
                Some(Open::Map(pos, anchor, entries, _, _)) => self.close(
                    Node {
                        value: Value::Map(entries),
                        pos,
                    },
                    anchor,
                ),
                _ => Err(SyntaxError {
                    pos,
                    message: "unbalanced mapping end".into(),
                }),
            },
            Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::DocumentEnd | Event::Nothing => {
                Ok(())
            }
        }
    }

    /// Counts `n` more nodes; past [`MAX_NODES`] the file is refused at `pos`.
    fn count(&mut self, n: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "more than {MAX_NODES} values once aliases are expanded; a config this large is refused \
                     (are anchors and aliases multiplying each other?)"
                ),
            });
        }
        Ok(())
    }

    /// A list or mapping starts at `pos`: one node, one level deeper.
    fn open(&mut self, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError {
                pos,
                message: format!("lists and mappings nest more than {MAX_DEPTH} deep"),
            });
        }
        self.count(1, pos)?;
        self.starts.push(self.nodes - 1);
        Ok(())
    }

    /// A list or mapping ends: placed with its size (itself and everything in it).
    fn close(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        let start = self.starts.pop().unwrap_or(0);
        let size = self.nodes - start;
        self.complete_sized(node, anchor, size)
    }

    /// Places a finished scalar in its parent (or as a document).
    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        self.complete_sized(node, anchor, 1)
    }

    /// Places a finished node of `size` nodes in its parent (or as a document).
    fn complete_sized(&mut self, node: Node, anchor: usize, size: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some(Open::Seq(_, _, items)) => items.push(node),
            Some(Open::Map(_, _, entries, pending, keys)) => match pending.take() {
                None => {
                    let Value::Scalar(s) = &node.value else {
                        return Err(SyntaxError {
                            pos: node.pos,
                            message: format!("mapping keys must be plain names, found {}", node.kind()),
                        });
                    };
                    if let Some(first) = keys.get(&s.text) {
                        return Err(SyntaxError {
                            pos: node.pos,
                            message: format!("duplicate key `{}` (first defined at {first})", s.text),
                        });
                    }
                    keys.insert(s.text.clone(), node.pos);
                    *pending = Some(Key {
                        name: s.text.clone(),
                        pos: node.pos,
                    });
                }
                Some(key) => entries.push((key, node)),
            },
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Node, SyntaxError> {
        match self.documents.len() {
            0 => Ok(Node {
                value: Value::Map(Vec::new()),
                pos: Pos::new(1, 1),
            }),
            1 => Ok(self.documents.remove(0)),
            _ => Err(SyntaxError {
                pos: self.documents[1].pos,
                message: "a config file holds exactly one YAML document; remove the extra `---` section".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let node = parse("a: 1\nb:\n  - x\n  - y: z\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.pos, Pos::new(1, 1));
        assert_eq!(entries[0].1.pos, Pos::new(1, 4));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("not a seq")
        };
        assert_eq!(items[0].pos, Pos::new(3, 5));
        assert_eq!(items[1].pos, Pos::new(4, 5));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos, Pos::new(3, 1));
        assert!(err.message.contains("duplicate key `a`"), "{}", err.message);
    }

    #[test]
    fn aliases_resolve_at_the_use_site() {
        let node = parse("x: &v 5\ny: *v\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[1].1.pos, Pos::new(2, 4));
        assert_eq!(entries[1].1.value, entries[0].1.value);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }

    #[test]
    fn empty_file_is_empty_map() {
        assert_eq!(parse("").unwrap().value, Value::Map(Vec::new()));
    }
}
