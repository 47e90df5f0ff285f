//! What reconciling one part of the host produced, item by item.
//!
//! Networks and storage are reconciled the same way: every bridge, service, pool and
//! volume is tried on its own and its outcome recorded, so one failure is reported
//! (and keeps only the guests that need that item from starting) without stopping the
//! others. An outcome is logged when it is recorded, so the console shows the host coming
//! up in order.

use std::fmt;

/// The outcome of one item: which kind of thing, which one, and what now holds or why it
/// failed.
#[derive(Debug)]
pub struct Item<K, E> {
    pub kind: K,
    /// The interface, bridge, table, pool or volume (POOL/NAME) the item is about.
    pub name: String,
    /// A one-line summary of what now holds, or why it failed.
    pub result: Result<String, E>,
}

impl<K: fmt::Display, E: fmt::Display> Item<K, E> {
    /// Records an outcome and logs it: success at info, failure at error.
    pub fn logged(kind: K, name: &str, result: Result<String, E>) -> Self {
        match &result {
            Ok(msg) => tracing::info!(%kind, name, "{msg}"),
            Err(e) => tracing::error!(%kind, name, "{e}"),
        }
        Item {
            kind,
            name: name.to_owned(),
            result,
        }
    }
}

/// Whether every item succeeded.
pub fn all_ok<K, E>(items: &[Item<K, E>]) -> bool {
    items.iter().all(|i| i.result.is_ok())
}

/// The items that failed.
pub fn errors<K, E>(items: &[Item<K, E>]) -> impl Iterator<Item = &Item<K, E>> {
    items.iter().filter(|i| i.result.is_err())
}

/// Whether the item `kind` `name` succeeded (what depends on it can go ahead).
pub fn succeeded<K: PartialEq, E>(items: &[Item<K, E>], kind: K, name: &str) -> bool {
    items
        .iter()
        .any(|i| i.kind == kind && i.name == name && i.result.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum K {
        A,
        B,
    }

    impl fmt::Display for K {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(if *self == K::A { "a" } else { "b" })
        }
    }

    #[test]
    fn one_failure_is_found_without_hiding_the_rest() {
        let items = vec![
            Item::logged(K::A, "x", Ok::<_, String>("up".into())),
            Item::logged(K::B, "x", Err("down".into())),
            Item::logged(K::A, "y", Ok("up".into())),
        ];
        assert!(!all_ok(&items));
        let failed: Vec<_> = errors(&items).map(|i| (i.kind, i.name.as_str())).collect();
        assert_eq!(failed, [(K::B, "x")]);
        assert!(succeeded(&items, K::A, "x"));
        assert!(!succeeded(&items, K::B, "x"), "same name, other kind, failed");
        assert!(!succeeded(&items, K::A, "z"), "never tried");
        assert!(all_ok(&items[..1]));
    }
}
