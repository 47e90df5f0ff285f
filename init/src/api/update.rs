//! The update endpoints: `POST /v1/update` (the request body is a bundle, streamed
//! straight into the update agent) and `POST /v1/rollback`. Both take `?reboot=1`.
//!
//! The agent works with blocking file I/O (fsyncs on the ESP), so it runs on a
//! blocking thread and reads the body through a small channel: the body is never
//! held in memory whole, and a slow ESP slows the upload down instead of buffering.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::update::{Agent, BundleError, InstallError, Installed, RollbackError, RolledBack};

/// Chunks in flight between the connection and the installer.
const CHANNEL_DEPTH: usize = 8;
/// Time for the answer to reach the client before PID 1 reboots.
const REBOOT_DELAY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateResult {
    pub installed: Installed,
    /// The appliance reboots into the new version now.
    pub rebooting: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RollbackResult {
    pub rolled_back: RolledBack,
    pub rebooting: bool,
}

/// An error answer: HTTP status and message.
#[derive(Debug)]
pub struct UpdateApiError {
    pub status: StatusCode,
    pub message: String,
}

fn unavailable() -> UpdateApiError {
    UpdateApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "updates are off on this appliance: no ESP mounted or no running version known (see the boot log)"
            .into(),
    }
}

impl From<InstallError> for UpdateApiError {
    fn from(e: InstallError) -> Self {
        let status = match &e {
            InstallError::Bundle(BundleError::Io(_)) => StatusCode::BAD_REQUEST,
            InstallError::Bundle(BundleError::Write(_)) | InstallError::Fs(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // Refused: bad signature, hash, truncated, not a bundle.
            InstallError::Bundle(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InstallError::SameVersion(_)
            | InstallError::Downgrade { .. }
            | InstallError::TooOld { .. }
            | InstallError::RunningOnTrial(_)
            | InstallError::RunningNotOnEsp(_) => StatusCode::CONFLICT,
            InstallError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        };
        UpdateApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<RollbackError> for UpdateApiError {
    fn from(e: RollbackError) -> Self {
        let status = match &e {
            RollbackError::NoPreviousVersion(_) => StatusCode::CONFLICT,
            RollbackError::WrongOrder { .. } | RollbackError::Fs(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        UpdateApiError {
            status,
            message: e.to_string(),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> UpdateApiError {
    UpdateApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("{what}: {e}"),
    }
}

/// A blocking `Read` over the chunks the connection task sends.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// `POST /v1/update[?allow_downgrade=1][&reboot=1]`.
pub async fn install<B>(
    agent: Option<Arc<Agent>>,
    mut body: B,
    allow_downgrade: bool,
    reboot: bool,
) -> Result<UpdateResult, UpdateApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let agent = agent.ok_or_else(unavailable)?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_DEPTH);
    let installer = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let mut logged = 0;
        agent.apply(reader, allow_downgrade, |done, total| {
            let quarter = done * 4 / total.max(1);
            if quarter > logged {
                logged = quarter;
                info!("update: {done} of {total} bytes verified and written");
            }
        })
    });
    while let Some(frame) = body.frame().await {
        let chunk = match frame {
            Ok(f) => match f.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue, // trailers
            },
            Err(e) => Err(std::io::Error::other(format!("the upload broke off: {e}"))),
        };
        let failed = chunk.is_err();
        // The installer stopped reading (it refused the bundle): stop feeding it.
        if tx.send(chunk).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    // Read what the client still sends, so it sees the answer instead of a reset.
    while let Some(Ok(_)) = body.frame().await {}
    let installed = installer
        .await
        .map_err(|e| internal("the installer task failed", e))??;
    info!(
        "update installed: {} ({} bytes, sha256 {})",
        installed.file, installed.size, installed.sha256
    );
    Ok(UpdateResult {
        installed,
        rebooting: reboot && schedule_reboot(),
    })
}

/// `POST /v1/rollback[?reboot=1]`.
pub async fn rollback(agent: Option<Arc<Agent>>, reboot: bool) -> Result<RollbackResult, UpdateApiError> {
    let agent = agent.ok_or_else(unavailable)?;
    let rolled_back = tokio::task::spawn_blocking(move || agent.rollback())
        .await
        .map_err(|e| internal("the rollback task failed", e))??;
    Ok(RollbackResult {
        rolled_back,
        rebooting: reboot && schedule_reboot(),
    })
}

/// Asks PID 1 for a clean reboot (SIGTERM: guests are stopped first) once the
/// answer had time to go out.
fn schedule_reboot() -> bool {
    tokio::spawn(async {
        tokio::time::sleep(REBOOT_DELAY).await;
        info!("rebooting for the update, as requested");
        if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM) {
            warn!("cannot request the reboot: {e}");
        }
    });
    true
}
