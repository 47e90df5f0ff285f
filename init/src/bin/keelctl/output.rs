//! What keelctl prints: JSON for `--json`, otherwise tables and details for a person.

use keel_init::api::GuestDetail;
use keel_init::api::host::HostInfo;
use keel_init::api::plan::{GuestAction, Plan};
use keel_init::guest::GuestStatus;

pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as left-aligned columns.
pub fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == r.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

pub fn human_secs(s: f64) -> String {
    let s = s.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s < 86400.0 {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    } else {
        format!("{}d{:02}h", (s / 86400.0) as u64, ((s % 86400.0) / 3600.0) as u64)
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

pub fn info_column(g: &GuestStatus) -> String {
    match (&g.restart_in_secs, &g.reason) {
        (Some(t), Some(r)) => format!("restart in {} ({r})", human_secs(*t)),
        (None, Some(r)) => r.clone(),
        _ => String::new(),
    }
}

pub fn print_guest_table(guests: &[GuestStatus]) {
    let mut rows = vec![vec![
        "NAME".into(),
        "STATE".into(),
        "VCPUS".into(),
        "MEMORY".into(),
        "UPTIME".into(),
        "RESTARTS".into(),
        "INFO".into(),
    ]];
    for g in guests {
        rows.push(vec![
            g.name.clone(),
            g.state.clone(),
            g.vcpus.to_string(),
            g.memory.clone(),
            g.uptime_secs.map(human_secs).unwrap_or_else(|| "-".into()),
            g.restarts.to_string(),
            info_column(g),
        ]);
    }
    table(&rows);
}

pub fn print_guest_detail(d: &GuestDetail) {
    let g = &d.status;
    let mut rows = vec![
        vec!["Name:".into(), g.name.clone()],
        vec!["State:".into(), g.state.clone()],
    ];
    if let Some(r) = &g.reason {
        rows.push(vec!["Reason:".into(), r.clone()]);
    }
    if let Some(t) = g.restart_in_secs {
        rows.push(vec!["Restart in:".into(), human_secs(t)]);
    }
    if let Some(pid) = g.pid {
        rows.push(vec!["VMM pid:".into(), pid.to_string()]);
    }
    if let Some(u) = g.uptime_secs {
        rows.push(vec!["Uptime:".into(), human_secs(u)]);
    }
    rows.push(vec!["vCPUs:".into(), g.vcpus.to_string()]);
    rows.push(vec!["Memory:".into(), g.memory.clone()]);
    rows.push(vec!["Autostart:".into(), g.autostart.to_string()]);
    rows.push(vec!["Restart policy:".into(), g.restart_policy.clone()]);
    rows.push(vec!["Restarts:".into(), g.restarts.to_string()]);
    if let Some(e) = &g.last_exit {
        rows.push(vec!["Last exit:".into(), e.clone()]);
    }
    rows.push(vec!["Console output:".into(), human_bytes(g.console_bytes)]);
    if let Some(s) = &d.stats {
        rows.push(vec!["vCPU time:".into(), format!("{:.2}s", s.vcpu_seconds())]);
        rows.push(vec!["VMM RSS:".into(), human_bytes(s.rss_bytes)]);
        for dev in &s.devices {
            rows.push(vec![
                format!("{}:", dev.name),
                format!(
                    "{} in / {} out, {} / {} requests",
                    human_bytes(dev.bytes_in),
                    human_bytes(dev.bytes_out),
                    dev.ops_in,
                    dev.ops_out
                ),
            ]);
        }
    }
    table(&rows);
}

pub fn print_plan(plan: &Plan, details: bool) {
    for g in &plan.guests {
        let mark = match g.action {
            GuestAction::Start | GuestAction::Add => "+",
            GuestAction::Remove => "-",
            GuestAction::Restart | GuestAction::Update => "~",
            GuestAction::Unchanged => " ",
        };
        if details && g.action == GuestAction::Unchanged {
            continue;
        }
        let summary: Vec<String> = g
            .changes
            .iter()
            .map(|c| {
                format!(
                    "{}: {} -> {}",
                    c.field,
                    c.old.as_deref().unwrap_or("(none)"),
                    c.new.as_deref().unwrap_or("(none)")
                )
            })
            .collect();
        if details && !summary.is_empty() {
            println!("{mark} guest {} ({})", g.guest, g.action.as_str());
            for s in summary {
                println!("      {s}");
            }
        } else {
            let line = format!("{mark} {:<20} {:<9} {}", g.guest, g.action.as_str(), summary.join("; "));
            println!("{}", line.trim_end());
        }
        if !g.kept_volumes.is_empty() {
            println!(
                "      keeps its volumes {} (Keel never deletes one; keelctl volume rm does)",
                g.kept_volumes.join(", ")
            );
        }
    }
    for s in &plan.sections {
        println!(
            "~ {:<20} {:<9} {} field(s) change",
            s.section,
            "reconcile",
            s.changes.len()
        );
        if details {
            for c in &s.changes {
                println!(
                    "      {}: {} -> {}",
                    c.field,
                    c.old.as_deref().unwrap_or("(none)"),
                    c.new.as_deref().unwrap_or("(none)")
                );
            }
        }
    }
    if plan.is_noop() {
        println!("no changes");
    }
}

pub fn print_host(h: &HostInfo) {
    table(&[
        vec!["Hostname:".into(), h.hostname.clone()],
        vec![
            "OS version:".into(),
            h.os_version.clone().unwrap_or_else(|| "unknown".into()),
        ],
        vec!["keel-init:".into(), h.keel_version.clone()],
        vec!["Kernel:".into(), h.kernel.clone()],
        vec!["Uptime:".into(), human_secs(h.uptime_secs)],
        vec![
            "CPU:".into(),
            format!(
                "{} CPUs, {:.0}% busy, load {:.2} {:.2} {:.2}",
                h.cpus, h.cpu_busy_percent, h.load_average[0], h.load_average[1], h.load_average[2]
            ),
        ],
        vec![
            "Memory:".into(),
            format!(
                "{} available of {}",
                human_bytes(h.memory_available_bytes),
                human_bytes(h.memory_total_bytes)
            ),
        ],
        vec![
            "Clones:".into(),
            format!("{} (KEEL-DATA is {})", h.clones.method, h.clones.filesystem),
        ],
    ]);
    if let Some(note) = &h.clones.note {
        println!("  note: {note}");
    }
    println!();
    if h.boot_slots.is_empty() {
        println!("Boot slots: none found on the ESP");
    } else {
        let mut rows = vec![vec![
            "BOOT SLOT".into(),
            "VERSION".into(),
            "STATE".into(),
            "TRIES".into(),
            "".into(),
        ]];
        for s in &h.boot_slots {
            rows.push(vec![
                s.file.clone(),
                s.version.clone(),
                s.state.clone(),
                match (s.tries_left, s.tries_done) {
                    (Some(l), Some(d)) => format!("{l} left, {d} done"),
                    (Some(l), None) => format!("{l} left"),
                    _ => "-".into(),
                },
                if s.running { "running".into() } else { String::new() },
            ]);
        }
        table(&rows);
    }
    if !h.pools.is_empty() {
        println!();
        let mut rows = vec![vec!["POOL".into(), "USED".into(), "AVAILABLE".into(), "LIMIT".into()]];
        for p in &h.pools {
            rows.push(vec![
                p.name.clone(),
                human_bytes(p.used_bytes),
                human_bytes(p.available_bytes),
                p.size_limit_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            ]);
        }
        table(&rows);
    }
}
