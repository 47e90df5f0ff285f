//! The installed OS versions ("slots"): UKIs on the ESP named
//! `EFI/Linux/keel-<version>[+LEFT[-DONE]].efi`, and the order in which
//! systemd-boot 252 tries them.
//!
//! systemd's boot counting lives in the file name: `+3` is a fresh entry with three
//! tries; before each try systemd-boot renames `+L-D` to `+(L-1)-(D+1)`; no counter
//! means blessed (known good). Versions compare with systemd's
//! `strverscmp_improved` (the UAPI version format), reimplemented in
//! [`compare_versions`]: systemd-boot uses it on the `.osrel` `IMAGE_VERSION`, which
//! Keel keeps equal to the version in the file name.

use std::cmp::Ordering;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the UKIs live, relative to the ESP's root.
pub const EFI_LINUX: &str = "EFI/Linux";
/// Tries a freshly installed version gets.
pub const INITIAL_TRIES: u32 = 3;
/// Prefix of the temporary file an install streams into. systemd-boot ignores
/// names that start with a dot or do not end in `.efi`; this one does both.
pub const PARTIAL_PREFIX: &str = ".keel-";
pub const PARTIAL_SUFFIX: &str = ".efi.partial";

/// Checks a version for use in `.osrel` and in `keel-<version>[+N[-M]].efi`:
/// os-release's `VERSION_ID` characters (lower case letters, digits, `.`, `_`, `-`),
/// starting with a digit or letter. A `+` would be read as a boot counter.
pub fn validate_version(version: &str) -> Result<(), String> {
    let first_ok = version
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
    let rest_ok = version
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || ".-_".contains(c));
    if version.len() > 64 || !first_ok || !rest_ok {
        return Err(format!(
            "version {version:?}: use 1-64 characters from 0-9 a-z . _ - starting with a digit or letter, e.g. 1.2.0"
        ));
    }
    Ok(())
}

/// systemd's version comparison (`strverscmp_improved`, systemd ≥ 250, used by
/// systemd-boot 252 to order entries): the strings are split into alternating runs
/// of digits and letters; digit runs compare numerically (leading zeros ignored),
/// letter runs alphabetically; a digit run is newer than a letter run. Separators:
/// `~` makes the side that has it older (pre-releases: `1.0~rc1` < `1.0`); `-`
/// separates a release (`123-9` < `123.1`); `^` marks a patched release; `.` a
/// point release. When one string ends, the one with more segments is newer.
/// Characters outside `0-9 A-Z a-z ~ - ^ .` are skipped.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let valid = |c: &u8| c.is_ascii_alphanumeric() || b"~-^.".contains(c);
    loop {
        // Skip characters that carry no version meaning.
        while a.first().is_some_and(|c| !valid(c)) {
            a = &a[1..];
        }
        while b.first().is_some_and(|c| !valid(c)) {
            b = &b[1..];
        }
        // `~`: the side that has one here is older.
        if a.first() == Some(&b'~') || b.first() == Some(&b'~') {
            let r = (a.first() != Some(&b'~')).cmp(&(b.first() != Some(&b'~')));
            if r != Ordering::Equal {
                return r;
            }
            a = &a[1..];
            b = &b[1..];
        }
        // One side ended: the longer string (more segments) is newer.
        if a.is_empty() || b.is_empty() {
            return a.cmp(b);
        }
        // `-`, `^`, `.`: the side that has the separator where the other has a
        // segment is older (`-` and `^` and `.` are each checked in that order).
        for sep in [b'-', b'^', b'.'] {
            if a.first() == Some(&sep) || b.first() == Some(&sep) {
                let r = (a.first() != Some(&sep)).cmp(&(b.first() != Some(&sep)));
                if r != Ordering::Equal {
                    return r;
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
        let a_digits = a.first().is_some_and(u8::is_ascii_digit);
        let b_digits = b.first().is_some_and(u8::is_ascii_digit);
        let (a_len, b_len);
        if a_digits || b_digits {
            a_len = a.iter().take_while(|c| c.is_ascii_digit()).count();
            b_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
            // A numeric segment is newer than a non-numeric (or empty) one.
            let r = (a_len != 0).cmp(&(b_len != 0));
            if r != Ordering::Equal {
                return r;
            }
            // Compare the numbers without parsing them (they may be long): after
            // their leading zeros, the longer one is larger, else byte order.
            let a_num = trim_zeros(&a[..a_len]);
            let b_num = trim_zeros(&b[..b_len]);
            let r = a_num.len().cmp(&b_num.len()).then_with(|| a_num.cmp(b_num));
            if r != Ordering::Equal {
                return r;
            }
        } else {
            a_len = a.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            b_len = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            let common = a_len.min(b_len);
            let r = a[..common].cmp(&b[..common]).then(a_len.cmp(&b_len));
            if r != Ordering::Equal {
                return r;
            }
        }
        a = &a[a_len..];
        b = &b[b_len..];
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|c| **c == b'0').count();
    &digits[zeros..]
}

/// A UKI file name, `keel-<version>[+LEFT[-DONE]].efi`, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotName {
    pub version: String,
    /// Tries left; `None` when the name has no counter (blessed).
    pub tries_left: Option<u32>,
    /// Tries done; `None` when the counter has no `-DONE` part.
    pub tries_done: Option<u32>,
}

impl SlotName {
    /// Parses a file name (no directory). `None` for anything that is not a Keel
    /// UKI name with a valid version and counter.
    pub fn parse(file_name: &str) -> Option<Self> {
        let stem = file_name.strip_prefix("keel-")?;
        // FAT is case-insensitive and so is systemd-boot's suffix check.
        let stem = stem
            .len()
            .checked_sub(4)
            .filter(|&n| stem.is_char_boundary(n) && stem[n..].eq_ignore_ascii_case(".efi"))
            .map(|n| &stem[..n])?;
        let (version, counter) = match stem.split_once('+') {
            Some((v, c)) => (v, Some(c)),
            None => (stem, None),
        };
        validate_version(version).ok()?;
        let number = |s: &str| -> Option<u32> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let (tries_left, tries_done) = match counter {
            None => (None, None),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(number(l)?), Some(number(d)?)),
                None => (Some(number(c)?), None),
            },
        };
        Some(Self {
            version: version.to_owned(),
            tries_left,
            tries_done,
        })
    }

    /// A fresh install: `keel-<version>+3.efi`.
    pub fn fresh(version: &str) -> Self {
        Self {
            version: version.to_owned(),
            tries_left: Some(INITIAL_TRIES),
            tries_done: None,
        }
    }

    /// The same version without a counter (blessed).
    pub fn blessed(&self) -> Self {
        Self {
            version: self.version.clone(),
            tries_left: None,
            tries_done: None,
        }
    }

    /// The same version with no tries left (systemd-boot sorts it last), keeping
    /// the count of tries done.
    pub fn failed(&self) -> Self {
        Self {
            version: self.version.clone(),
            tries_left: Some(0),
            tries_done: self.tries_done,
        }
    }

    pub fn file_name(&self) -> String {
        match (self.tries_left, self.tries_done) {
            (None, _) => format!("keel-{}.efi", self.version),
            (Some(l), None) => format!("keel-{}+{l}.efi", self.version),
            (Some(l), Some(d)) => format!("keel-{}+{l}-{d}.efi", self.version),
        }
    }

    pub fn is_blessed(&self) -> bool {
        self.tries_left.is_none()
    }

    /// No tries left: systemd-boot boots it only when nothing else is left.
    pub fn is_failed(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// Has tries left but is not blessed yet: installed and not yet booted, or
    /// booted and not yet found healthy.
    pub fn is_on_trial(&self) -> bool {
        self.tries_left.is_some_and(|l| l > 0)
    }

    pub fn state(&self) -> SlotState {
        match self.tries_left {
            None => SlotState::Blessed,
            Some(0) => SlotState::Failed,
            Some(_) => SlotState::OnTrial,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    Blessed,
    OnTrial,
    Failed,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Blessed => "blessed",
            SlotState::OnTrial => "on trial",
            SlotState::Failed => "failed",
        }
    }
}

/// One UKI on the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// File name inside `EFI/Linux`, as found (case preserved).
    pub file: String,
    #[serde(flatten)]
    pub name: SlotName,
}

impl Slot {
    /// Path relative to the ESP root, `EFI/Linux/<file>`.
    pub fn esp_path(&self) -> String {
        format!("{EFI_LINUX}/{}", self.file)
    }
}

/// The Keel UKIs in `<esp>/EFI/Linux`, in systemd-boot's boot order (the first
/// one boots next). Other files (partial installs included) are not slots.
pub fn list(esp: &Path) -> std::io::Result<Vec<Slot>> {
    let mut slots = Vec::new();
    for entry in std::fs::read_dir(esp.join(EFI_LINUX))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(name) = SlotName::parse(&file) {
            slots.push(Slot { file, name });
        }
    }
    sort_boot_order(&mut slots);
    Ok(slots)
}

/// Partial-install files left in `<esp>/EFI/Linux` (by a power cut mid-update).
pub fn list_partial(esp: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(esp.join(EFI_LINUX))? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(PARTIAL_PREFIX)
            && name.ends_with(PARTIAL_SUFFIX)
        {
            found.push(name.to_owned());
        }
    }
    found.sort();
    Ok(found)
}

/// systemd-boot 252's entry order for Keel's UKIs (all carry `IMAGE_ID=keel`, so all
/// have the same sort key): entries with no tries left go last; then newest version
/// first; then file name, descending (version comparison); then, for the same
/// version with counters, more tries left first and fewer tries done first.
pub fn boot_order(a: &Slot, b: &Slot) -> Ordering {
    a.name
        .is_failed()
        .cmp(&b.name.is_failed())
        .then_with(|| compare_versions(&b.name.version, &a.name.version))
        .then_with(|| compare_versions(&b.file, &a.file))
        .then_with(|| match (a.name.tries_left, b.name.tries_left) {
            (Some(la), Some(lb)) => lb
                .cmp(&la)
                .then_with(|| a.name.tries_done.unwrap_or(0).cmp(&b.name.tries_done.unwrap_or(0))),
            _ => Ordering::Equal,
        })
}

pub fn sort_boot_order(slots: &mut [Slot]) {
    slots.sort_by(boot_order);
}

/// Where a version's record (sha256, size) is kept on the ESP, relative to its root:
/// the same place and format as `keel-image build` writes for the first version.
pub fn record_path(version: &str) -> String {
    format!("{RECORDS_DIR}/keel-{version}.json")
}

/// See [`record_path`].
pub const RECORDS_DIR: &str = "keel/manifests";

/// The record of one installed UKI on the ESP (`keel/manifests/keel-<v>.json`), in
/// the format `keel-image build` writes for the first version and `keel-image
/// inspect` checks each UKI against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspRecord {
    pub format: u32,
    pub version: String,
    /// The UKI's path on the ESP as installed (before any boot-counter rename).
    pub uki: String,
    pub sha256: String,
    pub size: u64,
    pub cmdline: String,
    /// sha256 of keel.yaml as built. An update does not change keel.yaml, so the
    /// running version's value is carried over.
    pub config_sha256: String,
    pub source_date_epoch: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        for name in [
            "keel-1.2.0.efi",
            "keel-1.2.0+3.efi",
            "keel-1.2.0+0-3.efi",
            "keel-2+1-2.efi",
        ] {
            let parsed = SlotName::parse(name).unwrap_or_else(|| panic!("{name} parses"));
            assert_eq!(parsed.file_name(), name);
        }
        assert_eq!(SlotName::fresh("3.0").file_name(), "keel-3.0+3.efi");
        let trial = SlotName::parse("keel-3.0+2-1.efi").expect("parses");
        assert_eq!(trial.blessed().file_name(), "keel-3.0.efi");
        assert_eq!(trial.failed().file_name(), "keel-3.0+0-1.efi");
    }

    #[test]
    fn upper_case_suffix_is_a_uki_like_on_fat() {
        assert!(SlotName::parse("keel-1.0.EFI").is_some());
    }
}
