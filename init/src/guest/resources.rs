//! What the host provides to guests and whether it is there: volumes on
//! KEEL-DATA, bridges, and each guest NIC's tap. Kept up to date at boot (after
//! `host::bring_up`) and on every config apply, and asked before each guest is
//! added so a guest whose bridge or volume is missing is held back with the
//! reason instead of failing inside keel-vmm.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::warn;

use crate::config::{Bridge, Config, Guest};
use crate::guest::Prepared;
use crate::logging::LevelHandle;
use crate::{layout, net, storage};

/// Ready volumes and bridges.
#[derive(Debug, Default)]
pub struct Readiness {
    pub volumes: HashSet<String>,
    pub bridges: HashSet<String>,
    /// The applied config's bridges (cloud-init seeds give a NIC its static lease).
    pub bridge_specs: Vec<Bridge>,
}

impl Readiness {
    pub fn update_storage(&mut self, cfg: &Config, report: &storage::Report) {
        self.volumes = storage::volume::declared(cfg)
            .into_iter()
            .filter(|v| report.volume_ok(&v.volume))
            .map(|v| v.volume.to_string())
            .collect();
    }

    pub fn update_network(&mut self, cfg: &Config, report: &net::Report) {
        self.bridge_specs = cfg.network.bridges.clone();
        self.bridges = cfg
            .network
            .bridges
            .iter()
            .filter(|b| report.bridge_ok(&b.name))
            .map(|b| b.name.value.clone())
            .collect();
    }

    /// Why `g` cannot start now.
    pub fn blockers(&self, g: &Guest, networking: bool) -> Vec<String> {
        let mut why = Vec::new();
        for d in &g.disks {
            if !self.volumes.contains(&d.volume.to_string()) {
                why.push(format!("volume {} is not ready", d.volume.value));
            }
        }
        for n in &g.nics {
            if !networking {
                why.push(format!("bridge {}: no host networking in test mode", n.bridge.value));
            } else if !self.bridges.contains(n.bridge.as_str()) {
                why.push(format!("bridge {} is not up", n.bridge.value));
            }
        }
        why
    }
}

/// Creates a tap on a worker thread with its own small event loop: the netlink
/// future holds raw pointers across awaits (it is not `Send`), and API handlers
/// run on tasks that must be.
async fn create_tap(name: String, bridge: String) -> Result<net::tap::Tap, String> {
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tap {name}: cannot start an event loop: {e}"))?;
        rt.block_on(net::tap::create(&name, &bridge)).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("tap worker failed: {e}")))
}

/// The host side of guests, shared by boot and the API.
#[derive(Clone)]
pub struct GuestResources {
    readiness: Arc<Mutex<Readiness>>,
    /// Whether keel-init manages host networking (PID 1) or not (test mode).
    networking: bool,
    /// Whether the data partition is there (volumes can exist).
    data_ready: bool,
    data_root: PathBuf,
    level: Option<Arc<LevelHandle>>,
    /// The network services to restart or start on an apply (PID 1 only).
    services: Option<crate::host::SharedServices>,
}

impl GuestResources {
    pub fn new(readiness: Readiness, networking: bool, data_ready: bool, data_root: PathBuf) -> Self {
        GuestResources {
            readiness: Arc::new(Mutex::new(readiness)),
            networking,
            data_ready,
            data_root,
            level: None,
            services: None,
        }
    }

    /// Restarts the bridges' DHCP servers and DNS forwarders on each config apply
    /// (or starts every network service when there were none: boot config invalid).
    pub fn with_services(mut self, services: crate::host::SharedServices) -> Self {
        self.services = Some(services);
        self
    }

    /// Applies `host.log_level` on each config apply (PID 1 only).
    pub fn with_log_level(mut self, level: Arc<LevelHandle>) -> Self {
        self.level = Some(level);
        self
    }

    fn readiness(&self) -> std::sync::MutexGuard<'_, Readiness> {
        self.readiness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blockers and taps for one guest. A tap that cannot be made blocks the guest.
    pub async fn prepare(&self, g: &Guest) -> Prepared {
        let (mut blockers, nic_networks) = {
            let r = self.readiness();
            let nets = crate::guest::cloud_init::nic_networks(g, &r.bridge_specs);
            (r.blockers(g, self.networking), nets)
        };
        let mut taps = Vec::new();
        if blockers.is_empty() {
            for (i, nic) in g.nics.iter().enumerate() {
                let name = net::tap::name_for(&g.name, i);
                match create_tap(name, nic.bridge.value.clone()).await {
                    Ok(t) => taps.push(t),
                    Err(e) => blockers.push(e),
                }
            }
        }
        if !blockers.is_empty() {
            warn!(guest = g.name.as_str(), "held back: {}", blockers.join("; "));
            taps.clear();
        }
        Prepared {
            taps,
            blockers,
            nic_networks,
        }
    }

    /// The host-level part of applying `cfg`: storage (and on the appliance the
    /// networks, hostname and log level). Returns one line per problem.
    pub async fn reconcile(&self, cfg: Config) -> Vec<String> {
        let mut problems = Vec::new();
        if self.data_ready {
            let root = self.data_root.clone();
            let c = cfg.clone();
            let report = tokio::task::spawn_blocking(move || storage::reconcile(&c, &root))
                .await
                .unwrap_or_default();
            for item in report.errors() {
                if let Err(e) = &item.result {
                    problems.push(format!("storage {}: {e}", item.name));
                }
            }
            self.readiness().update_storage(&cfg, &report);
        }
        if self.networking {
            let opts = net::Options {
                lease_dir: if self.data_ready {
                    PathBuf::from(layout::DATA_MOUNT).join("dhcp")
                } else {
                    PathBuf::from(layout::RUN_DIR).join("dhcp")
                },
                ..net::Options::default()
            };
            let report = net::apply(&cfg, &opts).await;
            for item in report.errors() {
                if let Err(e) = &item.result {
                    problems.push(format!("network {} {}: {e}", item.kind, item.name));
                }
            }
            self.readiness().update_network(&cfg, &report);
            if let Some(shared) = &self.services {
                let mut services = shared.lock().await;
                let items = match services.as_mut() {
                    Some(s) => s.restart_bridges(&cfg, &report, &opts).await,
                    None => {
                        let (s, items) = net::Services::start(&cfg, &report, &opts).await;
                        *services = Some(s);
                        items
                    }
                };
                for item in &items {
                    if let Err(e) = &item.result {
                        problems.push(format!("network service {} {}: {e}", item.kind, item.name));
                    }
                }
            }
            if let Some(level) = &self.level {
                level.set(cfg.host.log_level.as_str());
            }
            if let Err(e) = nix::unistd::sethostname(cfg.host.hostname.as_str()) {
                problems.push(format!("hostname {}: {e}", cfg.host.hostname.value));
            }
        }
        problems
    }

    /// As the API's hooks.
    pub fn hooks(&self) -> (crate::api::HostReconcile, crate::api::PrepareGuest) {
        let r = self.clone();
        let reconcile: crate::api::HostReconcile = Arc::new(move |cfg| {
            let r = r.clone();
            async move { r.reconcile(cfg).await }.boxed()
        });
        let p = self.clone();
        let prepare: crate::api::PrepareGuest = Arc::new(move |g: Guest| -> BoxFuture<'static, Prepared> {
            let p = p.clone();
            async move { p.prepare(&g).await }.boxed()
        });
        (reconcile, prepare)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_waits_for_its_volume_and_bridge() {
        let text = "version: 1\nstorage: {pools: [{name: p}]}\nnetwork:\n  bridges:\n    - {name: br0, mode: isolated, address: 10.1.0.1/24}\nguests:\n  - name: g\n    memory: 64MiB\n    disks: [{volume: p/root, size: 1GiB}]\n    nics: [{bridge: br0}]\n";
        let cfg = crate::config::parse_str(text).expect("valid").config;
        let g = &cfg.guests[0];
        let mut r = Readiness::default();
        assert_eq!(
            r.blockers(g, true),
            ["volume p/root is not ready", "bridge br0 is not up"]
        );
        assert_eq!(r.blockers(g, false)[1], "bridge br0: no host networking in test mode");
        r.volumes.insert("p/root".into());
        r.bridges.insert("br0".into());
        assert!(r.blockers(g, true).is_empty());
    }
}
