//! `GET /metrics`: the Prometheus text exposition format (version 0.0.4).
//!
//! A few dozen series rendered from a snapshot; a metrics library would add a
//! registry and global state for what is here one pass over plain data.

use std::fmt::Write;

use crate::api::host::{CpuTimes, PoolUsage};
use crate::guest::vmm_control::{DeviceKind, VmmStats};
use crate::guest::{GuestStatus, State};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything one scrape reports.
pub struct Snapshot<'a> {
    pub guests: &'a [(GuestStatus, Option<VmmStats>)],
    pub cpu: Option<CpuTimes>,
    pub memory_total: u64,
    pub memory_available: u64,
    pub uptime_secs: f64,
    pub pools: &'a [PoolUsage],
    pub version: &'a str,
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }
}

/// Label values escape backslash, quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

pub fn render(s: &Snapshot<'_>) -> String {
    let mut o = Out(String::new());
    o.family("keel_build_info", "gauge", "Keel version of the running keel-init.");
    o.sample("keel_build_info", &[("version", s.version)], 1.0);

    o.family(
        "keel_guest_state",
        "gauge",
        "1 for the state each guest is in, 0 for the others.",
    );
    for (g, _) in s.guests {
        for state in State::NAMES {
            o.sample(
                "keel_guest_state",
                &[("guest", &g.name), ("state", state)],
                f64::from(u8::from(g.state == state)),
            );
        }
    }
    o.family(
        "keel_guest_restarts_total",
        "counter",
        "Restarts of the guest by the supervisor since keel-init started.",
    );
    for (g, _) in s.guests {
        o.sample("keel_guest_restarts_total", &[("guest", &g.name)], g.restarts as f64);
    }
    o.family(
        "keel_guest_console_bytes_total",
        "counter",
        "Bytes the guest wrote to its serial console.",
    );
    for (g, _) in s.guests {
        o.sample(
            "keel_guest_console_bytes_total",
            &[("guest", &g.name)],
            g.console_bytes as f64,
        );
    }

    let running: Vec<(&GuestStatus, &VmmStats)> = s
        .guests
        .iter()
        .filter_map(|(g, st)| st.as_ref().map(|st| (g, st)))
        .collect();
    o.family(
        "keel_guest_vcpu_seconds_total",
        "counter",
        "CPU time used by the guest's vCPU threads, per vCPU (current VMM run).",
    );
    for (g, st) in &running {
        for v in &st.vcpus {
            o.sample(
                "keel_guest_vcpu_seconds_total",
                &[("guest", &g.name), ("vcpu", &v.id.to_string())],
                v.cpu_seconds,
            );
        }
    }
    o.family(
        "keel_guest_memory_rss_bytes",
        "gauge",
        "Resident memory of the guest's keel-vmm process.",
    );
    for (g, st) in &running {
        o.sample(
            "keel_guest_memory_rss_bytes",
            &[("guest", &g.name)],
            st.rss_bytes as f64,
        );
    }
    for (kind, label, prefix, what_in, what_out) in [
        (DeviceKind::Block, "block", "keel_guest_disk", "read", "write"),
        (DeviceKind::Net, "net", "keel_guest_net", "rx", "tx"),
    ] {
        let bytes = format!("{prefix}_bytes_total");
        let ops = format!("{prefix}_ops_total");
        o.family(
            &bytes,
            "counter",
            &format!("Bytes through the guest's {label} devices."),
        );
        for (g, st) in &running {
            for d in st.devices.iter().filter(|d| d.kind == kind) {
                o.sample(
                    &bytes,
                    &[("guest", &g.name), ("device", &d.name), ("direction", what_in)],
                    d.bytes_in as f64,
                );
                o.sample(
                    &bytes,
                    &[("guest", &g.name), ("device", &d.name), ("direction", what_out)],
                    d.bytes_out as f64,
                );
            }
        }
        o.family(
            &ops,
            "counter",
            &format!("Requests through the guest's {label} devices."),
        );
        for (g, st) in &running {
            for d in st.devices.iter().filter(|d| d.kind == kind) {
                o.sample(
                    &ops,
                    &[("guest", &g.name), ("device", &d.name), ("direction", what_in)],
                    d.ops_in as f64,
                );
                o.sample(
                    &ops,
                    &[("guest", &g.name), ("device", &d.name), ("direction", what_out)],
                    d.ops_out as f64,
                );
            }
        }
    }

    if let Some(cpu) = s.cpu {
        o.family(
            "keel_host_cpu_seconds_total",
            "counter",
            "CPU time of the host, all CPUs, by mode.",
        );
        for (mode, secs) in cpu.modes() {
            o.sample("keel_host_cpu_seconds_total", &[("mode", mode)], secs);
        }
    }
    o.family("keel_host_memory_total_bytes", "gauge", "Host RAM.");
    o.sample("keel_host_memory_total_bytes", &[], s.memory_total as f64);
    o.family(
        "keel_host_memory_available_bytes",
        "gauge",
        "Host RAM available for new allocations (MemAvailable).",
    );
    o.sample("keel_host_memory_available_bytes", &[], s.memory_available as f64);
    o.family("keel_host_uptime_seconds", "gauge", "Seconds since the host booted.");
    o.sample("keel_host_uptime_seconds", &[], s.uptime_secs);

    o.family("keel_pool_used_bytes", "gauge", "Bytes the pool's files occupy.");
    for p in s.pools {
        o.sample("keel_pool_used_bytes", &[("pool", &p.name)], p.used_bytes as f64);
    }
    o.family(
        "keel_pool_available_bytes",
        "gauge",
        "Free bytes on the filesystem holding the pool.",
    );
    for p in s.pools {
        o.sample(
            "keel_pool_available_bytes",
            &[("pool", &p.name)],
            p.available_bytes as f64,
        );
    }
    o.family("keel_pool_size_limit_bytes", "gauge", "The pool's configured cap.");
    for p in s.pools {
        if let Some(cap) = p.size_limit_bytes {
            o.sample("keel_pool_size_limit_bytes", &[("pool", &p.name)], cap as f64);
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::vmm_control::{DeviceStats, VcpuStats};

    fn status(name: &str, state: &str) -> GuestStatus {
        GuestStatus {
            name: name.into(),
            state: state.into(),
            pid: None,
            uptime_secs: None,
            restart_in_secs: None,
            reason: None,
            restarts: 2,
            last_exit: None,
            vcpus: 1,
            memory: "64MiB".into(),
            autostart: true,
            restart_policy: "on-failure".into(),
            console_bytes: 10,
        }
    }

    #[test]
    fn renders_parseable_text_with_every_family() {
        let stats = VmmStats {
            paused: false,
            vcpus: vec![VcpuStats {
                id: 0,
                cpu_seconds: 1.5,
            }],
            rss_bytes: 4096,
            devices: vec![DeviceStats {
                name: "virtio-blk0".into(),
                kind: DeviceKind::Block,
                bytes_in: 512,
                bytes_out: 1024,
                ops_in: 1,
                ops_out: 2,
            }],
        };
        let guests = vec![
            (status("we\"b", "running"), Some(stats)),
            (status("db", "stopped"), None),
        ];
        let text = render(&Snapshot {
            guests: &guests,
            cpu: CpuTimes::read(),
            memory_total: 100,
            memory_available: 50,
            uptime_secs: 12.5,
            pools: &[],
            version: "0.1.0",
        });
        assert!(
            text.contains("keel_guest_state{guest=\"we\\\"b\",state=\"running\"} 1\n"),
            "{text}"
        );
        assert!(text.contains(
            "keel_guest_disk_bytes_total{guest=\"we\\\"b\",device=\"virtio-blk0\",direction=\"write\"} 1024\n"
        ));
        assert!(text.contains("keel_guest_vcpu_seconds_total{guest=\"we\\\"b\",vcpu=\"0\"} 1.5\n"));
        let lines: Vec<Result<String, std::io::Error>> = text.lines().map(|l| Ok(l.to_string())).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("valid Prometheus text");
        assert!(scrape.samples.iter().any(|s| s.metric == "keel_host_uptime_seconds"));
    }
}
