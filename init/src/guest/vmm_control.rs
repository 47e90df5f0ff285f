//! Client of keel-vmm's per-VM control socket (`keel-vmm --api-socket PATH`).
//!
//! The wire format is keel-vmm's (`keel_vmm::api`): one JSON request per line,
//! one JSON answer per line. The types are mirrored here rather than shared so
//! keel-init does not link the VMM and its KVM crates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

/// The operations keel-vmm's control socket offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Ping,
    Pause,
    Resume,
    /// Graceful stop: Ctrl-Alt-Del; any end of the guest now counts as stopped.
    PowerButton,
    /// Just Ctrl-Alt-Del (a Linux guest reboots).
    CtrlAltDel,
    /// Hard stop.
    Stop,
    Stats,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::PowerButton => "power-button",
            Op::CtrlAltDel => "ctrl-alt-del",
            Op::Stop => "stop",
            Op::Stats => "stats",
        }
    }
}

/// keel-vmm's `stats` answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmmStats {
    pub paused: bool,
    pub vcpus: Vec<VcpuStats>,
    pub rss_bytes: u64,
    pub devices: Vec<DeviceStats>,
}

impl VmmStats {
    pub fn vcpu_seconds(&self) -> f64 {
        self.vcpus.iter().map(|v| v.cpu_seconds).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuStats {
    pub id: u32,
    pub cpu_seconds: f64,
}

/// One device's counters; "in" is towards the guest (disk reads, received packets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub name: String,
    /// block, net, rng, console or other.
    pub kind: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ops_in: u64,
    pub ops_out: u64,
}

#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    stats: Option<VmmStats>,
}

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
    let line = format!("{{\"op\":\"{}\"}}\n", op.name());
    stream.write_all(line.as_bytes()).await.map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let n = reader.read_line(&mut answer).await.map_err(io)?;
    if n == 0 {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without answering",
        )));
    }
    let parsed: Answer = serde_json::from_str(answer.trim()).map_err(|e| VmmControlError::BadAnswer {
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
