//! Network sysctls under /proc/sys/net.
//!
//! /proc/sys/net belongs to the network namespace of the thread that opens the
//! file, so these follow whatever namespace the caller runs in (tests rely on it).

use std::io;
use std::path::PathBuf;

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Writes `value` to sysctl `key` (dotted form, e.g. `net.ipv4.ip_forward`).
/// Interface names may contain dots, so per-interface keys use [`set_conf`].
pub fn set(key: &str, value: &str) -> io::Result<()> {
    write(path(key), value)
}

pub fn get(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(path(key))?.trim().to_owned())
}

/// Writes `net.ipv4.conf.<iface>.<knob>`.
pub fn set_conf(iface: &str, knob: &str, value: &str) -> io::Result<()> {
    write(PathBuf::from("/proc/sys/net/ipv4/conf").join(iface).join(knob), value)
}

fn write(p: PathBuf, value: &str) -> io::Result<()> {
    std::fs::write(&p, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}
