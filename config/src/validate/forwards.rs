//! `forwards:` on bridges: each leads to a guest with a fixed address on that bridge,
//! and no two claim one port of the appliance — nor a port Keel itself serves.

use super::*;
use crate::schema::{Forward, Proto};

/// Ports the appliance serves to guests on every bridge (DNS on 53, DHCP on 67): a
/// forward there would take those requests away from the guests of other bridges.
const KEEL_GUEST_PORTS: [(Proto, u16, &str); 3] = [
    (Proto::Udp, 53, "Keel's DNS forwarder"),
    (Proto::Tcp, 53, "Keel's DNS forwarder"),
    (Proto::Udp, 67, "Keel's DHCP server"),
];

pub(super) fn check_forwards(cfg: &Config, d: &mut Diagnostics) {
    let mut taken: HashMap<(Proto, u16), Pos> = HashMap::new();
    let names: Vec<&str> = cfg.guests.iter().map(|g| g.name.value.as_str()).collect();
    for b in &cfg.network.bridges {
        if b.forwards.is_empty() {
            continue;
        }
        if *b.mode != BridgeMode::Nat {
            d.error(
                b.forwards[0].host_port.pos,
                format!(
                    "bridge `{}` is `{}`: port forwards need a `nat` bridge (a `bridged` guest has its own LAN address; an `isolated` one is never reachable from outside)",
                    b.name.value,
                    b.mode.as_str()
                ),
            );
            continue;
        }
        for f in &b.forwards {
            check_ports(cfg, f, d);
            let key = (*f.proto, *f.host_port);
            if let Some(first) = taken.insert(key, f.host_port.pos) {
                d.error(
                    f.host_port.pos,
                    format!(
                        "{} port {} is forwarded twice (first at line {})",
                        f.proto.as_str(),
                        *f.host_port,
                        first.line
                    ),
                );
            }
            if !names.contains(&f.guest.as_str()) {
                d.error(
                    f.guest.pos,
                    format!(
                        "forward to guest `{}`, which is not declared under guests{}",
                        f.guest.value,
                        suggest(&f.guest, &names)
                    ),
                );
            } else if let Err(msg) = b.forward_address(&cfg.guests, f) {
                d.error(f.guest.pos, msg);
            }
        }
    }
}

fn check_ports(cfg: &Config, f: &Forward, d: &mut Diagnostics) {
    for p in [&f.host_port, &f.guest_port] {
        if p.value == 0 {
            d.error(p.pos, "port 0 cannot be forwarded; use 1-65535");
        }
    }
    if let Some(api) = &cfg.host.api
        && *f.proto == Proto::Tcp
        && api.listen.port() == *f.host_port
    {
        d.error(
            f.host_port.pos,
            format!(
                "tcp port {} is the control API's (host.api.listen at line {}); pick another host_port",
                *f.host_port, api.listen.pos.line
            ),
        );
    }
    for (proto, port, what) in KEEL_GUEST_PORTS {
        if *f.proto == proto && *f.host_port == port {
            d.error(
                f.host_port.pos,
                format!("{} port {port} is {what}'s; pick another host_port", proto.as_str()),
            );
        }
    }
}
