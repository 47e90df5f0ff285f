//! Host bring-up between reading the config and starting guests: KEEL-DATA, the
//! storage pools and volumes on it, then the networks and their services (DHCP
//! client on the uplink, DHCP servers and DNS forwarders on bridges).
//!
//! Each part reports per item and never stops the others: a bridge that fails
//! only holds back the guests attached to it, a volume that cannot be created
//! only the guest that uses it ([`Host::blockers`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::{Config, Guest};
use crate::layout;
use crate::net;
use crate::storage::{self, DataOptions};

/// The network services, shared with config applies (which restart the bridges'
/// services, or start them all when the boot config was invalid).
pub type SharedServices = Arc<tokio::sync::Mutex<Option<net::Services>>>;

/// What bring-up achieved, kept for the guests' dependency checks and shutdown.
pub struct Host {
    /// KEEL-DATA is mounted at [`layout::DATA_MOUNT`].
    pub data_mounted: bool,
    pub storage: storage::Report,
    pub net: net::Report,
    pub services: SharedServices,
}

/// Where the DHCP servers keep their leases: on KEEL-DATA so they survive
/// reboots, or in /run when the data partition is not there.
fn lease_dir(data_mounted: bool) -> PathBuf {
    if data_mounted {
        Path::new(layout::DATA_MOUNT).join("dhcp")
    } else {
        Path::new(layout::RUN_DIR).join("dhcp")
    }
}

/// Brings the host up for `cfg`. Without a valid config only KEEL-DATA is mounted (it
/// does not depend on the config); the first valid apply does the rest.
pub async fn bring_up(cfg: Option<&Config>) -> Host {
    let data_opts = DataOptions {
        mount_point: PathBuf::from(layout::DATA_MOUNT),
        ..DataOptions::default()
    };
    let data = tokio::task::spawn_blocking(move || storage::prepare_data(&data_opts)).await;
    let data_mounted = match data {
        Ok(Ok(fs)) => {
            info!(
                device = %fs.device.display(),
                formatted = fs.formatted,
                "KEEL-DATA mounted at {}{}",
                layout::DATA_MOUNT,
                fs.grown.map(|(a, b)| format!(", partition grown from {a} to {b} bytes")).unwrap_or_default()
            );
            true
        }
        Ok(Err(e)) => {
            error!("KEEL-DATA: {e}; guests with disks cannot start");
            false
        }
        Err(e) => {
            error!("KEEL-DATA: {e}");
            false
        }
    };

    let Some(cfg) = cfg else {
        return Host {
            data_mounted,
            storage: storage::Report::default(),
            net: net::Report::default(),
            services: SharedServices::default(),
        };
    };
    let storage = if data_mounted {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || storage::reconcile(&cfg, Path::new(layout::DATA_MOUNT)))
            .await
            .unwrap_or_default()
    } else {
        storage::Report::default()
    };

    let opts = net::Options {
        lease_dir: lease_dir(data_mounted),
        ..net::Options::default()
    };
    let report = net::apply(cfg, &opts).await;
    let (services, items) = net::Services::start(cfg, &report, &opts).await;
    for item in items.iter().filter(|i| i.result.is_err()) {
        warn!("network service {} did not start", item.name);
    }
    Host {
        data_mounted,
        storage,
        net: report,
        services: Arc::new(tokio::sync::Mutex::new(Some(services))),
    }
}

impl Host {
    /// Why a guest cannot start now: its volumes or bridges did not come up.
    pub fn blockers(&self, g: &Guest) -> Vec<String> {
        let mut why = Vec::new();
        for disk in &g.disks {
            if !self.data_mounted {
                why.push(format!("volume {}: KEEL-DATA is not mounted", disk.volume.value));
            } else if !self.storage.volume_ok(&disk.volume) {
                why.push(format!("volume {} is not ready", disk.volume.value));
            }
        }
        for nic in &g.nics {
            if !self.net.bridge_ok(&nic.bridge) {
                why.push(format!("bridge {} is not up", nic.bridge.value));
            }
        }
        why
    }

    /// Stops the network services (the uplink's DHCP lease is released).
    pub async fn shut_down(&mut self) {
        if let Some(services) = self.services.lock().await.take() {
            services.shutdown(Duration::from_secs(3)).await;
        }
    }
}
