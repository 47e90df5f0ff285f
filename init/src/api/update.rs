//! The update endpoints: `POST /v1/update` (the request body is a bundle, streamed
//! straight into the update agent) and `POST /v1/rollback`. Both take `?reboot=1`.
//!
//! The agent works with blocking file I/O (fsyncs on the ESP), so it reads the body
//! on a blocking thread (`upload::into_blocking`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::update::{Agent, BundleError, InstallError, Installed, RollbackError, RolledBack};

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

/// `POST /v1/update[?allow_downgrade=1][&reboot=1]`.
pub async fn install<B>(
    agent: Option<Arc<Agent>>,
    body: B,
    allow_downgrade: bool,
    reboot: bool,
) -> Result<UpdateResult, UpdateApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let agent = agent.ok_or_else(unavailable)?;
    let installer = super::upload::into_blocking(body, move |reader| {
        let mut logged = 0;
        agent.apply(reader, allow_downgrade, |done, total| {
            let quarter = done * 4 / total.max(1);
            if quarter > logged {
                logged = quarter;
                info!("update: {done} of {total} bytes verified and written");
            }
        })
    });
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
