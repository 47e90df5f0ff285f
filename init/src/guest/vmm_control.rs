//! Client of keel-vmm's per-VM control socket (`keel-vmm --api-socket PATH`).
//!
//! The wire format and its types are keel-vmm-api's (`keel_vmm_api::control`), shared
//! with keel-vmm: one JSON request per line, one JSON answer per line. That crate is
//! small, so keel-init does not link the VMM and its KVM crates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one request may take (pause waits up to 2 s for the vCPUs to park).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmmControlError {
    #[error("keel-vmm control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("keel-vmm control socket {}: no answer within {REQUEST_TIMEOUT:?}", path.display())]
    Timeout { path: PathBuf },
    #[error("keel-vmm control socket {}: bad answer `{line}`: {reason}", path.display())]
    BadAnswer {
        path: PathBuf,
        line: String,
        reason: String,
    },
    #[error("keel-vmm refused `{op}`: {message}")]
    Refused { op: &'static str, message: String },
}

use keel_vmm_api::control::Response;
pub use keel_vmm_api::control::{DeviceKind, DeviceStats, Request as Op, Stats as VmmStats, VcpuStats};

/// Longest answer line read: a `stats` answer is a few hundred bytes per device; a
/// line past this is a broken or hostile VMM, not one to buffer without end.
const MAX_ANSWER: u64 = 256 * 1024;

/// Sends one request; returns the stats for `Op::Stats`, `None` otherwise.
pub async fn request(path: &Path, op: Op) -> Result<Option<VmmStats>, VmmControlError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(path, op)).await {
        Ok(r) => r,
        Err(_) => Err(VmmControlError::Timeout { path: path.into() }),
    }
}

async fn exchange(path: &Path, op: Op) -> Result<Option<VmmStats>, VmmControlError> {
    let io = |source| VmmControlError::Io {
        path: path.into(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(io)?;
    let mut line = serde_json::to_string(&op).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(io)?;
    let mut reader = BufReader::new(stream).take(MAX_ANSWER);
    let mut answer = String::new();
    let n = reader.read_line(&mut answer).await.map_err(io)?;
    if n == 0 {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without answering",
        )));
    }
    let parsed: Response = serde_json::from_str(answer.trim()).map_err(|e| VmmControlError::BadAnswer {
        path: path.into(),
        line: answer.trim().to_string(),
        reason: e.to_string(),
    })?;
    if !parsed.ok {
        return Err(VmmControlError::Refused {
            op: op.name(),
            message: parsed.error.unwrap_or_else(|| "no reason given".into()),
        });
    }
    Ok(parsed.stats)
}

pub async fn stats(path: &Path) -> Result<VmmStats, VmmControlError> {
    request(path, Op::Stats)
        .await?
        .ok_or_else(|| VmmControlError::BadAnswer {
            path: path.into(),
            line: String::new(),
            reason: "stats missing".into(),
        })
}
