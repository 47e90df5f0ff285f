//! The control API: HTTP/1.1 + JSON on `/run/keel/api.sock` (mode 0600, root
//! only, checked with SO_PEERCRED) and, when `host.api.listen` is set, on TCP
//! with a bearer token. `keelctl` is its client ([`client`]).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/guests` | every guest's status |
//! | `GET /v1/guests/NAME` | one guest's status and its VMM's live stats |
//! | `POST /v1/guests/NAME/{start,stop,reboot,reset,pause,resume,destroy}` | lifecycle; `stop?timeout=SECS`, `stop?force=1` |
//! | `GET /v1/guests/NAME/console` | `Upgrade: keel-console`: raw bytes both ways; `?replay=BYTES` |
//! | `GET /v1/guests/NAME/logs` | console output as text; `?lines=N`, `?follow=1` streams |
//! | `GET /v1/config` | the applied keel.yaml |
//! | `POST /v1/config` | apply a keel.yaml: validate → plan → reconcile; `?dry_run=1` returns the plan only |
//! | `GET /v1/host` | versions, boot slots, uptime, CPU, memory, pools |
//! | `GET /metrics` | Prometheus text |
//! | `POST /v1/update` | body: an update bundle, streamed; `?allow_downgrade=1`, `?reboot=1` ([`update`]) |
//! | `POST /v1/rollback` | make the previous OS version boot next; `?reboot=1` |
//!
//! Errors are `{"error": "...", "details": ["..."]}` with a fitting status:
//! 400 bad request, 401/403 not allowed, 404 no such guest or path, 409 the
//! guest's state does not allow it, 422 invalid config, 500/502 failures.

pub mod client;
pub mod config_store;
mod guests;
pub mod host;
mod http;
mod images;
pub mod metrics;
pub mod plan;
mod server;
pub mod update;
mod upload;
mod volumes;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use server::{serve_tcp, serve_unix};

use crate::config::{Config, Guest};
use crate::guest::{GuestStatus, Prepared, Supervisor};

/// The Upgrade protocol name of a console stream.
pub const CONSOLE_PROTOCOL: &str = "keel-console";

/// The config in force and the text it was read from (kept verbatim, comments and all).
#[derive(Clone, Debug)]
pub struct AppliedConfig {
    pub config: Config,
    pub text: String,
}

/// Reconciles the host's parts of a newly applied config (storage pools and
/// volumes, networks, hostname, log level); returns one line per problem.
/// Supplied by whoever runs the API (PID 1 or test mode).
pub type HostReconcile = Arc<dyn Fn(Config) -> BoxFuture<'static, Vec<String>> + Send + Sync>;

/// Prepares the host side of a guest about to be added or changed: its taps,
/// and why it cannot start if its bridge or volume is missing.
pub type PrepareGuest = Arc<dyn Fn(Guest) -> BoxFuture<'static, Prepared> + Send + Sync>;

/// Everything request handlers act on.
pub struct ApiContext {
    pub sup: Arc<Mutex<Supervisor>>,
    pub applied: Mutex<Option<AppliedConfig>>,
    /// When a config was last applied successfully (boot or API): the update
    /// agent's health check waits for it.
    pub config_applied_at: Mutex<Option<Instant>>,
    /// KEEL-CONFIG's mount point: `keel.yaml` and `keel.yaml.prev` are written here.
    pub config_dir: PathBuf,
    /// KEEL-ESP's mount point (boot slots).
    pub esp_dir: PathBuf,
    pub os_release: PathBuf,
    pub data_root: PathBuf,
    /// One apply at a time.
    pub apply_lock: tokio::sync::Mutex<()>,
    pub host_reconcile: HostReconcile,
    pub prepare_guest: PrepareGuest,
    /// The update agent (PID 1 with a mounted ESP only): for the update and
    /// rollback endpoints of issue 8.
    pub update: Option<Arc<crate::update::Agent>>,
}

impl ApiContext {
    pub fn sup(&self) -> MutexGuard<'_, Supervisor> {
        self.sup.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn applied(&self) -> MutexGuard<'_, Option<AppliedConfig>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The answer to `POST /v1/config`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResult {
    pub plan: plan::Plan,
    /// False for a dry run.
    pub applied: bool,
    /// Validation warnings (they do not block).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Problems reconciling host parts (storage, network).
    #[serde(default)]
    pub host_errors: Vec<String>,
    /// The guests after the apply.
    #[serde(default)]
    pub guests: Vec<GuestStatus>,
}

/// The answer to `GET /v1/guests/NAME`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestDetail {
    #[serde(flatten)]
    pub status: GuestStatus,
    /// Live numbers from the VMM while it runs.
    pub stats: Option<crate::guest::vmm_control::VmmStats>,
}

/// The error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}
