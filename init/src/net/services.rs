//! The long-running parts of host networking, as tokio tasks: the uplink's DHCP
//! client, and a DHCP server plus DNS forwarder per `nat`/`isolated` bridge
//! with `dhcp:`. Started after [`super::apply`], stopped by [`Services::shutdown`]
//! (which releases the uplink's lease). A config apply restarts only the bridges'
//! services ([`Services::restart_bridges`]): the uplink keeps its lease.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Component, Item, NetError, Options, Report, dhcp_client, dhcp_server, dns};
use crate::config::{Config, UplinkAddress};

type Tasks = Vec<(String, JoinHandle<Result<(), NetError>>)>;

/// Running network services.
pub struct Services {
    shutdown: watch::Sender<bool>,
    /// The uplink's DHCP client and the upstream-DNS relay.
    tasks: Tasks,
    uplink: watch::Receiver<dhcp_client::State>,
    /// Upstream DNS servers for the guests' forwarders (static, or the lease's).
    upstream: watch::Receiver<Vec<SocketAddr>>,
    bridges: BridgeServices,
}

/// The DHCP servers and DNS forwarders of the bridges, restarted together.
struct BridgeServices {
    shutdown: watch::Sender<bool>,
    tasks: Tasks,
    /// What they were started for: the bridges' config and which of them were up.
    started_for: String,
}

fn push_item(items: &mut Vec<Item>, component: Component, name: &str, result: Result<String, NetError>) {
    items.push(Item::logged(component, name, result));
}

/// Stops `tasks` (their stop signal already sent), waiting at most until `deadline`.
async fn join_all(tasks: Tasks, deadline: tokio::time::Instant, grace: Duration) {
    for (name, mut task) in tasks {
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(service = name, "{e}"),
            Ok(Err(e)) => tracing::warn!(service = name, "task failed: {e}"),
            Err(_) => {
                tracing::warn!(service = name, "did not stop within {grace:?}; aborted");
                task.abort();
            }
        }
    }
}

impl BridgeServices {
    fn fingerprint(cfg: &Config, report: &Report) -> String {
        let up: Vec<bool> = cfg.network.bridges.iter().map(|b| report.bridge_ok(&b.name)).collect();
        format!("{:?} {up:?}", cfg.network.bridges)
    }

    async fn start(
        cfg: &Config,
        report: &Report,
        opts: &Options,
        upstream_rx: &watch::Receiver<Vec<SocketAddr>>,
        items: &mut Vec<Item>,
    ) -> BridgeServices {
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        for b in &cfg.network.bridges {
            let Some(scfg) = dhcp_server::ServerConfig::from_bridge(b, &opts.lease_dir) else {
                continue;
            };
            if !report.bridge_ok(&b.name) {
                push_item(
                    items,
                    Component::DhcpServer,
                    &b.name,
                    Err(NetError::Bridge {
                        name: b.name.value.clone(),
                        message: "not started: the bridge did not come up".into(),
                    }),
                );
                continue;
            }
            let addr = scfg.address.addr;
            let summary = format!("serving {} (router/DNS {})", scfg.range, addr);
            match dhcp_server::bind(scfg) {
                Ok(server) => {
                    tasks.push((
                        format!("dhcp-server {}", b.name.value),
                        tokio::spawn(server.run(stop.clone())),
                    ));
                    push_item(items, Component::DhcpServer, &b.name, Ok(summary));
                }
                Err(e) => push_item(items, Component::DhcpServer, &b.name, Err(e)),
            }
            if opts.dns_forwarder {
                match dns::bind(&b.name, SocketAddrV4::new(addr, 53), upstream_rx.clone()).await {
                    Ok(f) => {
                        tasks.push((format!("dns {}", b.name.value), tokio::spawn(f.run(stop.clone()))));
                        push_item(items, Component::Dns, &b.name, Ok(format!("forwarding on {addr}:53")));
                    }
                    Err(e) => push_item(items, Component::Dns, &b.name, Err(e)),
                }
            }
        }
        BridgeServices {
            shutdown,
            tasks,
            started_for: Self::fingerprint(cfg, report),
        }
    }

    async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        join_all(self.tasks, tokio::time::Instant::now() + grace, grace).await;
    }
}

impl Services {
    /// Starts what `cfg` needs on the interfaces `report` says are up. Binding
    /// errors come back as items (a bridge without DHCP does not stop others).
    pub async fn start(cfg: &Config, report: &Report, opts: &Options) -> (Services, Vec<Item>) {
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut items = Vec::new();
        // Upstream DNS for the guests' forwarders: the static list, or the lease's.
        let static_dns: Vec<Ipv4Addr> = cfg.network.uplink.dns.iter().map(|d| d.value).collect();
        let (dns_tx, dns_rx) = watch::channel(static_dns);
        let (upstream_tx, upstream_rx) = watch::channel(Vec::<SocketAddr>::new());
        // Forwarders take socket addresses; translate the IP list once per change.
        {
            let mut dns_rx = dns_rx.clone();
            let mut stop = stop.clone();
            let to_addrs = |v: &[Ipv4Addr]| {
                v.iter()
                    .map(|ip| SocketAddr::from(SocketAddrV4::new(*ip, 53)))
                    .collect()
            };
            let _ = upstream_tx.send(to_addrs(&dns_rx.borrow()));
            tasks.push((
                "dns-upstreams".to_owned(),
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            r = dns_rx.changed() => {
                                if r.is_err() { return Ok(()); }
                                let v = to_addrs(&dns_rx.borrow());
                                let _ = upstream_tx.send(v);
                            }
                            _ = stop.changed() => return Ok(()),
                        }
                    }
                }),
            ));
        }

        let (state_tx, state_rx) = watch::channel(dhcp_client::State::Searching);
        if let Some(up) = &report.uplink
            && *cfg.network.uplink.address == UplinkAddress::Dhcp
        {
            let ccfg = dhcp_client::ClientConfig {
                interface: up.host_interface.clone(),
                resolv_conf: opts.resolv_conf.clone(),
                hostname: Some(cfg.host.hostname.value.clone()),
            };
            let name = up.host_interface.clone();
            tasks.push((
                format!("dhcp-client {name}"),
                tokio::spawn(dhcp_client::run(ccfg, stop.clone(), state_tx, dns_tx)),
            ));
            push_item(&mut items, Component::DhcpClient, &name, Ok("started".into()));
        }

        let bridges = BridgeServices::start(cfg, report, opts, &upstream_rx, &mut items).await;
        (
            Services {
                shutdown,
                tasks,
                uplink: state_rx,
                upstream: upstream_rx,
                bridges,
            },
            items,
        )
    }

    /// The uplink DHCP client's state (stays `Searching` with a static uplink).
    pub fn uplink_state(&self) -> watch::Receiver<dhcp_client::State> {
        self.uplink.clone()
    }

    /// After a config apply: restarts the bridges' DHCP servers and DNS forwarders
    /// for `cfg` when the bridges (or which of them are up) changed; leases are kept
    /// in their files. The uplink's DHCP client keeps running. Returns the items
    /// started (none when nothing changed).
    pub async fn restart_bridges(&mut self, cfg: &Config, report: &Report, opts: &Options) -> Vec<Item> {
        if self.bridges.started_for == BridgeServices::fingerprint(cfg, report) {
            return Vec::new();
        }
        let mut items = Vec::new();
        let fresh = BridgeServices {
            shutdown: watch::channel(false).0,
            tasks: Vec::new(),
            started_for: String::new(),
        };
        std::mem::replace(&mut self.bridges, fresh)
            .shutdown(Duration::from_secs(3))
            .await;
        self.bridges = BridgeServices::start(cfg, report, opts, &self.upstream, &mut items).await;
        items
    }

    /// Stops every service; the DHCP client releases its lease first. Waits at
    /// most `grace` for them to finish, then aborts what is left.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let _ = self.bridges.shutdown.send(true);
        let _ = self.shutdown.send(true);
        join_all(self.bridges.tasks, deadline, grace).await;
        join_all(self.tasks, deadline, grace).await;
    }
}
