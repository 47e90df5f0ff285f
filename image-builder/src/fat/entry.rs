//! FAT32 directory entries: 8.3 short entries, VFAT long-name entries, short-name
//! generation, volume labels and the DOS timestamp they carry.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Timelike};

use super::{ATTR_LONG_NAME, ATTR_VOLUME_ID, FatError, LFN_CHARS_PER_ENTRY};

pub(super) fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, t: FatTime) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[0..11].copy_from_slice(name);
    e[11] = attr;
    if attr != ATTR_VOLUME_ID {
        e[14..16].copy_from_slice(&t.time.to_le_bytes()); // created
        e[16..18].copy_from_slice(&t.date.to_le_bytes());
        e[18..20].copy_from_slice(&t.date.to_le_bytes()); // accessed
    }
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&t.time.to_le_bytes()); // written
    e[24..26].copy_from_slice(&t.date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The long-name entries that precede an 8.3 entry, in on-disk order (last part first).
pub(super) fn long_name_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let checksum = short.iter().fold(0u8, |sum, &c| sum.rotate_right(1).wrapping_add(c));
    let units: Vec<u16> = name.encode_utf16().collect();
    let parts = units.len().div_ceil(LFN_CHARS_PER_ENTRY);
    let mut entries = Vec::with_capacity(parts);
    for part in (0..parts).rev() {
        // Each entry holds 13 UTF-16 units; after the name comes one 0x0000, then 0xFFFF.
        let mut chars = [0xFFFFu16; LFN_CHARS_PER_ENTRY];
        for (k, c) in chars.iter_mut().enumerate() {
            let idx = part * LFN_CHARS_PER_ENTRY + k;
            if idx < units.len() {
                *c = units[idx];
            } else if idx == units.len() {
                *c = 0;
            }
        }
        let mut e = [0u8; 32];
        e[0] = (part as u8 + 1) | if part == parts - 1 { 0x40 } else { 0 };
        e[11] = ATTR_LONG_NAME;
        e[13] = checksum;
        let positions = (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2));
        for (pos, c) in positions.zip(chars) {
            e[pos..pos + 2].copy_from_slice(&c.to_le_bytes());
        }
        entries.push(e);
    }
    entries
}

/// Characters allowed in 8.3 names besides A-Z and 0-9.
pub(super) const SHORT_NAME_SPECIALS: &[u8] = b"!#$%&'()-@^_`{}~";

pub(super) fn short_char_ok(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || SHORT_NAME_SPECIALS.contains(&c)
}

/// The 8.3 form of `name` when `name` is already a valid upper-case 8.3 name.
pub(super) fn exact_short_name(name: &str) -> Option<[u8; 11]> {
    let (base, ext) = match name.rsplit_once('.') {
        Some((b, e)) => (b, e),
        None => (name, ""),
    };
    let ok = |s: &str, max: usize| s.len() <= max && s.bytes().all(short_char_ok);
    if base.is_empty() || !ok(base, 8) || !ok(ext, 3) || (name.contains('.') && ext.is_empty()) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// A unique 8.3 alias for a long name, the way Windows forms it: upper-case, invalid
/// characters as `_`, then `BASE~N.EXT` (or the plain upper-case name when only the case
/// differed and it is free).
pub(super) fn generated_short_name(name: &str, taken: &mut HashSet<[u8; 11]>) -> [u8; 11] {
    let convert = |s: &str| -> Vec<u8> {
        s.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| {
                let u = c.to_ascii_uppercase();
                if u.is_ascii() && short_char_ok(u as u8) {
                    u as u8
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rsplit_once('.') {
        Some((b, e)) => (convert(b), convert(e)),
        None => (convert(trimmed), Vec::new()),
    };
    let base = if base.is_empty() { b"_".to_vec() } else { base };
    let ext = &ext[..ext.len().min(3)];
    let compose = |base: &[u8]| -> [u8; 11] {
        let mut out = [b' '; 11];
        out[..base.len()].copy_from_slice(base);
        out[8..8 + ext.len()].copy_from_slice(ext);
        out
    };
    if base.len() <= 8 && name.to_ascii_uppercase().bytes().all(|c| c == b'.' || short_char_ok(c)) {
        let plain = compose(&base);
        if exact_short_name(&name.to_ascii_uppercase()).is_some() && taken.insert(plain) {
            return plain;
        }
    }
    for n in 1u32.. {
        let tail = format!("~{n}");
        let keep = (8 - tail.len()).min(base.len());
        let mut b = base[..keep].to_vec();
        b.extend_from_slice(tail.as_bytes());
        let candidate = compose(&b);
        if taken.insert(candidate) {
            return candidate;
        }
    }
    unreachable!("u32 ran out of ~N suffixes")
}

/// Checks one path component against what FAT long names allow.
pub(super) fn validate_long_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty path component");
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not file names");
    }
    if name.encode_utf16().count() > 255 {
        return Err("a name is longer than 255 characters");
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("a name ends with '.' or ' ' (FAT drops those)");
    }
    if name.chars().any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c)) {
        return Err("a name contains a control character or one of \" * / : < > ? \\ |");
    }
    Ok(())
}

pub(super) fn label_bytes(label: &str) -> Result<[u8; 11], FatError> {
    let ok = !label.is_empty()
        && label.len() <= 11
        && label
            .bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
    if !ok {
        return Err(FatError::BadLabel(label.into()));
    }
    let mut out = [b' '; 11];
    out[..label.len()].copy_from_slice(label.as_bytes());
    Ok(out)
}

/// A FAT date and time (two-second resolution, no time zone: Keel writes UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatTime {
    pub date: u16,
    pub time: u16,
}

impl FatTime {
    pub fn from_unix(secs: i64) -> Result<Self, FatError> {
        let t = DateTime::from_timestamp(secs, 0).ok_or(FatError::BadTimestamp(secs))?;
        if !(1980..=2107).contains(&t.year()) {
            return Err(FatError::BadTimestamp(secs));
        }
        let date = (((t.year() - 1980) as u16) << 9) | ((t.month() as u16) << 5) | t.day() as u16;
        let time = ((t.hour() as u16) << 11) | ((t.minute() as u16) << 5) | (t.second() as u16 / 2);
        Ok(Self { date, time })
    }
}
