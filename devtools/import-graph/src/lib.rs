//! The module import graph of a crate, read from its source text, and its cycles.
//!
//! A node is one module file (`src/a/b.rs` or `src/a/b/mod.rs` is `a::b`). An edge
//! `m → n` is any path in `m` that names `n` or an item inside it: `use crate::…`,
//! `use super::…`, `use self::…`, brace groups expanded, and `crate::…` paths written
//! inline in code. A path resolves to the longest module prefix that exists. Edges
//! between a module and its own ancestors or descendants are not counted: a folder's
//! `mod.rs` declares and re-exports its children and children reach their siblings
//! through it, which is structure, not a dependency loop. `#[cfg(test)]` modules at
//! the end of a file are left out (tests may reach anywhere). What is left must be a
//! DAG: "binaries → guest/net/storage/update → config" and "vm → vcpu → devices →
//! memory" read one way.
//!
//! The reading is lexical (no macro expansion, no `#[path]`), which is enough for
//! this workspace's style: every cross-module reference is a `crate::`/`super::` path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside one crate, e.g. `["cpu", "vcpu"]`; the crate root is `[]`.
pub type ModPath = Vec<String>;

/// The graph of one crate: module → the modules it refers to.
#[derive(Debug, Default)]
pub struct Graph {
    pub edges: BTreeMap<ModPath, BTreeSet<ModPath>>,
}

/// Reads every `.rs` file under `src` (a crate's `src/` folder) into a graph.
pub fn read_crate(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let mut sources = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap_or(&f);
        let Some(m) = module_of(rel) else { continue };
        sources.insert(m, std::fs::read_to_string(&f)?);
    }
    Ok(graph_of(&sources))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                collect(&path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `a/b.rs` → `a::b`; `a/mod.rs` → `a`; `lib.rs` → the root; `main.rs` is a separate
/// crate (a binary) and is left out, as are `bin/`.
fn module_of(rel: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    match (parts.is_empty(), stem) {
        (true, "lib") => Some(Vec::new()),
        (true, "main") => None,
        (_, "mod") => Some(parts),
        _ => {
            parts.push(stem.to_string());
            Some(parts)
        }
    }
}

/// Builds the graph from (module, source text) pairs.
pub fn graph_of(sources: &BTreeMap<ModPath, String>) -> Graph {
    let modules: BTreeSet<&ModPath> = sources.keys().collect();
    let mut g = Graph::default();
    for (m, text) in sources {
        let deps = g.edges.entry(m.clone()).or_default();
        for path in referenced_paths(&strip_tests(&strip_comments(text))) {
            let Some(abs) = absolute(m, &path) else { continue };
            let Some(target) = longest_module(&modules, &abs) else {
                continue;
            };
            if !related(m, target) {
                deps.insert(target.clone());
            }
        }
    }
    g
}

/// One is an ancestor of (or the same as) the other.
fn related(a: &ModPath, b: &ModPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn longest_module<'a>(modules: &BTreeSet<&'a ModPath>, path: &[String]) -> Option<&'a ModPath> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()).copied())
}

/// `crate::a::b` → `a::b`; `super::x` from `p::q` → `p::x`; `self::x` → `p::q::x`.
fn absolute(module: &ModPath, path: &[String]) -> Option<ModPath> {
    let first = path.first()?;
    let mut base: ModPath = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => {
            let mut b = module.clone();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                b.pop()?;
                rest = &rest[1..];
            }
            b.extend(rest.iter().cloned());
            return Some(b);
        }
        _ => return None,
    };
    base.extend(path[1..].iter().cloned());
    Some(base)
}

/// Drops `//` and `/* */` comments and string literals' contents, so doc text that
/// mentions a path does not count.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            let c = text[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Cuts the file at its `#[cfg(test)] mod …` (this workspace keeps tests last).
fn strip_tests(text: &str) -> String {
    let mut search = 0;
    while let Some(at) = text[search..].find("#[cfg(test)]") {
        let at = search + at;
        let after = text[at + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod ") || after.starts_with("pub mod ") || after.starts_with("pub(crate) mod ") {
            return text[..at].to_string();
        }
        search = at + 1;
    }
    text.to_string()
}

/// Every `crate::`/`super::`/`self::` path in the text, `use` groups expanded.
fn referenced_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':');
        if word_start {
            for root in ["crate::", "super::", "self::"] {
                if b[i..].starts_with(root.as_bytes()) {
                    let (paths, len) = parse_tree(&text[i..]);
                    out.extend(paths);
                    i += len.max(1) - 1;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// Parses a use tree (`a::b::{c, d::e}`) at the start of `s`; returns its paths and
/// how many bytes it took.
fn parse_tree(s: &str) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut prefix = Vec::new();
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            prefix.push(s[start..i].to_string());
        }
        if s[i..].starts_with("::") {
            i += 2;
            if s[i..].starts_with('{') {
                i += 1;
                let mut paths = Vec::new();
                loop {
                    while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
                        i += 1;
                    }
                    if i >= b.len() || b[i] == b'}' {
                        return (paths, i + 1);
                    }
                    let (inner, len) = parse_tree(&s[i..]);
                    for p in inner {
                        let mut full = prefix.clone();
                        full.extend(p.into_iter().filter(|seg| seg != "self"));
                        paths.push(full);
                    }
                    if paths.is_empty() {
                        paths.push(prefix.clone());
                    }
                    i += len.max(1);
                }
            }
            if s[i..].starts_with('*') {
                return (vec![prefix], i + 1);
            }
            continue;
        }
        // Skip `as name`.
        return (vec![prefix], i);
    }
}

/// Every cycle, each as the modules on it in order (shortest found per strongly
/// connected component).
pub fn cycles(g: &Graph) -> Vec<Vec<ModPath>> {
    let nodes: Vec<&ModPath> = g.edges.keys().collect();
    let mut found = Vec::new();
    let mut seen_in_cycle: BTreeSet<ModPath> = BTreeSet::new();
    for start in nodes {
        if seen_in_cycle.contains(start) {
            continue;
        }
        if let Some(cycle) = shortest_cycle_through(g, start) {
            seen_in_cycle.extend(cycle.iter().cloned());
            found.push(cycle);
        }
    }
    found
}

/// Breadth-first from `start`'s successors back to `start`.
fn shortest_cycle_through(g: &Graph, start: &ModPath) -> Option<Vec<ModPath>> {
    let mut parent: BTreeMap<ModPath, ModPath> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::new();
    for n in g.edges.get(start)? {
        if !parent.contains_key(n) {
            parent.insert(n.clone(), start.clone());
            queue.push_back(n.clone());
        }
    }
    while let Some(n) = queue.pop_front() {
        if &n == start {
            // Walk back from the node that closed the loop to `start`'s successor.
            let mut back = Vec::new();
            let mut cur = parent.get(start)?.clone();
            while &cur != start {
                back.push(cur.clone());
                cur = parent.get(&cur)?.clone();
            }
            back.reverse();
            let mut cycle = vec![start.clone()];
            cycle.extend(back);
            cycle.push(start.clone());
            return Some(cycle);
        }
        for m in g.edges.get(&n).into_iter().flatten() {
            if !parent.contains_key(m) {
                parent.insert(m.clone(), n.clone());
                queue.push_back(m.clone());
            }
        }
    }
    None
}

/// `a::b`, or `crate` for the root.
pub fn display(m: &ModPath) -> String {
    if m.is_empty() { "crate".into() } else { m.join("::") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> Graph {
        let sources = files
            .iter()
            .map(|(f, t)| (module_of(Path::new(f)).unwrap(), t.to_string()))
            .collect();
        graph_of(&sources)
    }

    #[test]
    fn finds_a_cycle_between_two_modules() {
        let g = crate_of(&[
            ("lib.rs", "pub mod api; pub mod cpu;"),
            ("api.rs", "use crate::cpu::vcpu::Vcpu;"),
            ("cpu/mod.rs", "pub mod vcpu;"),
            ("cpu/vcpu.rs", "fn f() { crate::api::serve(); }"),
        ]);
        let c = cycles(&g);
        assert_eq!(c.len(), 1, "{c:?}");
        let names: Vec<String> = c[0].iter().map(display).collect();
        assert!(
            names == ["api", "cpu::vcpu", "api"] || names == ["cpu::vcpu", "api", "cpu::vcpu"],
            "{names:?}"
        );
    }

    #[test]
    fn groups_super_self_and_tests_resolve_as_rust_does() {
        let g = crate_of(&[
            ("lib.rs", "pub mod a; pub mod b;"),
            ("a/mod.rs", "pub mod x; pub mod y; pub use x::X;"),
            ("a/x.rs", "use super::y::{self, Y as Z};"),
            (
                "a/y.rs",
                "use crate::b::{B, c::{C}};\n// crate::a::x in a comment\nconst S: &str = \"crate::a::x\";",
            ),
            ("b/mod.rs", "pub mod c;\n#[cfg(test)]\nmod tests { use crate::a::x; }"),
            ("b/c.rs", ""),
        ]);
        assert!(cycles(&g).is_empty(), "{g:?}");
        let y = g.edges.get(&vec!["a".to_string(), "y".to_string()]).unwrap();
        assert!(
            y.contains(&vec!["b".to_string()]) && y.contains(&vec!["b".to_string(), "c".to_string()]),
            "{y:?}"
        );
        let x = g.edges.get(&vec!["a".to_string(), "x".to_string()]).unwrap();
        assert!(x.contains(&vec!["a".to_string(), "y".to_string()]), "{x:?}");
        // b's test module reaches a::x, but tests do not count.
        assert!(g.edges.get(&vec!["b".to_string()]).unwrap().is_empty());
    }
}
