//! Boot Loader Specification type #1 entries (`/loader/entries/*.conf`), as Fedora-style
//! images (and GRUB's `blscfg`) keep them: `linux`, `initrd` (repeatable), `options`
//! (repeatable), `version`, `sort-key`. The entry booted is the first in the
//! specification's order: by `sort-key`, then `machine-id`, ascending, then `version`,
//! newest first; entries without a sort key after those with one, newest file name first.

use std::cmp::Ordering;

/// Entry files read at most, and the size of each.
pub(crate) const MAX_ENTRIES: usize = 256;
pub(crate) const MAX_ENTRY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BlsEntry {
    pub file: String,
    pub title: String,
    pub version: String,
    pub sort_key: Option<String>,
    pub machine_id: String,
    pub linux: String,
    pub initrds: Vec<String>,
    pub options: String,
}

/// Parses one entry file; None when it has no `linux` line (e.g. a UKI or EFI entry).
pub(crate) fn parse(file: &str, text: &str) -> Option<BlsEntry> {
    let mut e = BlsEntry {
        file: file.to_string(),
        ..BlsEntry::default()
    };
    let mut options = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => continue,
        };
        match key {
            "title" => e.title = value.to_string(),
            "version" => e.version = value.to_string(),
            "sort-key" => e.sort_key = Some(value.to_string()),
            "machine-id" => e.machine_id = value.to_string(),
            "linux" => e.linux = value.to_string(),
            "initrd" => e.initrds.push(value.to_string()),
            "options" => options.push(value),
            _ => {}
        }
    }
    e.options = options.join(" ");
    (!e.linux.is_empty()).then_some(e)
}

/// The entry a BLS boot loader boots first.
pub(crate) fn first(entries: &[BlsEntry]) -> Option<&BlsEntry> {
    entries.iter().min_by(|a, b| order(a, b))
}

fn order(a: &BlsEntry, b: &BlsEntry) -> Ordering {
    match (&a.sort_key, &b.sort_key) {
        (Some(ka), Some(kb)) => ka
            .cmp(kb)
            .then_with(|| a.machine_id.cmp(&b.machine_id))
            .then_with(|| version_cmp(&b.version, &a.version)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => version_cmp(&b.file, &a.file),
    }
}

/// Version order as systemd's `strverscmp_improved`, reduced to what kernel versions
/// need: runs of digits compare as numbers, other characters as bytes, `~` sorts first.
pub(crate) fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {}
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (da, db) = (trim_zeros(da), trim_zeros(db));
                let c = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if c != Ordering::Equal {
                    return c;
                }
                (a, b) = (ra, rb);
                continue;
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => {}
        }
        (a, b) = (&a[1..], &b[1..]);
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&c| c == b'0').count();
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-28", "6.1.0-9"), Ordering::Greater);
        assert_eq!(version_cmp("1.0~rc1", "1.0"), Ordering::Less);
        assert_eq!(version_cmp("007", "7"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn parses_and_picks_the_newest() {
        let a = parse(
            "z.conf",
            "title Fedora (6.9.1)\nversion 6.9.1\nlinux /vmlinuz-6.9.1\ninitrd /initramfs-6.9.1.img\noptions root=UUID=r ro\noptions quiet\n",
        )
        .expect("entry");
        assert_eq!(a.options, "root=UUID=r ro quiet");
        assert_eq!(a.initrds, ["/initramfs-6.9.1.img"]);
        let b = parse("b.conf", "version 6.10.2\nlinux /vmlinuz-6.10.2\n").expect("entry");
        assert_eq!(
            first(&[a.clone(), b.clone()]).map(|e| e.version.as_str()),
            Some("6.9.1"),
            "no sort keys: by file name, z.conf first"
        );
        let mut a2 = a.clone();
        a2.sort_key = Some("fedora".into());
        let mut b2 = b.clone();
        b2.sort_key = Some("fedora".into());
        assert_eq!(
            first(&[a2, b2]).map(|e| e.version.as_str()),
            Some("6.10.2"),
            "same sort key: newest version"
        );
        assert_eq!(parse("uki.conf", "title x\nefi /EFI/Linux/x.efi\n"), None);
    }
}
