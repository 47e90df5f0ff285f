//! What the end-to-end tests take from their surroundings: the paths `ci/e2e` passes in
//! environment variables, and free loopback ports for QEMU's forwards.

use std::path::PathBuf;

/// The path in environment variable `name`, which must exist.
pub fn env_path(name: &str) -> Result<PathBuf, String> {
    let value = std::env::var_os(name).ok_or_else(|| format!("{name} is not set; run this through ci/e2e"))?;
    let path = PathBuf::from(value);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{name}={} does not exist", path.display()))
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
#[allow(dead_code)] // used by the suites that forward the appliance's API, not by all
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}
