//! keel-vmm boot benchmark (run by `ci/bench`, or `cargo bench -p keel-vmm --bench boot`).
//!
//! For a tiny guest (1 vCPU, 128 MiB, ELF kernel that writes the boot timer), prints:
//! exec → boot-timer write (median of 20), VMM RSS overhead (VmRSS minus the guest
//! memory the guest touched), VMs started per second with 20 concurrent guests, and
//! exec → exit after the guest's i8042 reset (median of 20); each beside Firecracker
//! v1.16.1's figure on this kind of machine. It measures; it asserts nothing about time.
//!
//! Then the seccomp filter's cost against `--no-seccomp` in the same run: exec → boot
//! timer, and a guest making 20 000 port-I/O exits (each exit returns through the filter
//! on its next KVM_RUN), median of 10 each.
//!
//! `KEEL_VMM_BIN=PATH` measures that binary instead of this build's: `ci/bench` passes the
//! static one an appliance ships (ci/appliance-bins), which has no dynamic loader to run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;

const RUNS: usize = 20;
const CONCURRENT: usize = 20;
const RATE_ROUNDS: usize = 5;
const RSS_RUNS: usize = 5;
const MEMORY_MIB: u64 = 128;
/// Port-I/O exits the seccomp comparison's guest makes before it resets.
const EXITS: u32 = 20_000;
const SECCOMP_RUNS: usize = 10;

// Firecracker v1.16.1, same machine kind, same tiny guest (issue 3 / LAB-NOTES).
const FC_EXEC_TO_READY_MS: f64 = 7.8;
const FC_RSS_OVERHEAD_MIB: f64 = 2.44;
const FC_VMS_PER_SEC: f64 = 708.0;
const FC_EXEC_TO_EXIT_MS: f64 = 26.0;

fn main() {
    if !require_kvm() {
        return;
    }
    let bin = vmm();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!("binary: {bin} ({:.1} MiB)", size as f64 / 1048576.0);
    let dir = tempfile::tempdir().expect("tempdir");
    let ready_then_reset = write_file(dir.path(), "reset.elf", &elf_kernel(&hello_guest(b""), LOAD_ADDR, 0));
    let ready_then_halt = {
        let mut a = asm64();
        boot_timer(&mut a);
        halt_forever(&mut a);
        write_file(
            dir.path(),
            "halt.elf",
            &elf_kernel(&assemble(a, LOAD_ADDR), LOAD_ADDR, 0),
        )
    };
    let reset_path = ready_then_reset.to_str().expect("utf-8 path");
    let halt_path = ready_then_halt.to_str().expect("utf-8 path");

    // Warm the page cache and the binary.
    for _ in 0..3 {
        let _ = start(reset_path, &[]).wait();
    }

    let mut ready = Vec::new();
    let mut self_reported = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let mut child = start(reset_path, &[]);
        let line = wait_for_boot_timer(&mut child);
        ready.push(t0.elapsed());
        self_reported.push(parse_us(&line));
        let _ = child.wait();
    }

    let mut exit = Vec::new();
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let status = start(reset_path, &[]).wait().expect("wait");
        exit.push(t0.elapsed());
        assert_eq!(status.code(), Some(3), "tiny guest resets");
    }

    let mut rss = Vec::new();
    let mut guest_touched = Vec::new();
    let mut vm_rss = Vec::new();
    for _ in 0..RSS_RUNS {
        let mut child = start(halt_path, &[]);
        wait_for_boot_timer(&mut child);
        // The guest now sits in HLT; the VMM is in its steady state.
        std::thread::sleep(Duration::from_millis(50));
        let (total_kib, guest_kib) = rss_kib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        vm_rss.push(total_kib as f64 / 1024.0);
        guest_touched.push(guest_kib as f64 / 1024.0);
        rss.push((total_kib - guest_kib) as f64 / 1024.0);
    }

    let mut rates = Vec::new();
    for _ in 0..RATE_ROUNDS {
        let t0 = Instant::now();
        let mut children: Vec<Child> = (0..CONCURRENT).map(|_| start(reset_path, &[])).collect();
        for c in &mut children {
            wait_for_boot_timer(c);
        }
        let elapsed = t0.elapsed();
        for c in &mut children {
            let _ = c.wait();
        }
        rates.push(CONCURRENT as f64 / elapsed.as_secs_f64());
    }

    let register_ms = memory_registration_ms(reset_path);

    let ready_ms = median_ms(&mut ready);
    let exit_ms = median_ms(&mut exit);
    let rss_mib = median(&mut rss);
    let rate = median(&mut rates);
    println!("keel-vmm boot benchmark: tiny ELF guest, 1 vCPU, {MEMORY_MIB} MiB");
    println!(
        "{:<44} {:>10} {:>12} {:>8}",
        "metric", "keel-vmm", "firecracker", "ratio"
    );
    row(
        &format!("exec -> boot-timer write, ms (median of {RUNS})"),
        ready_ms,
        FC_EXEC_TO_READY_MS,
    );
    row(
        "VMM RSS overhead, MiB (VmRSS - guest memory)",
        rss_mib,
        FC_RSS_OVERHEAD_MIB,
    );
    row(
        &format!("VMs started/s, {CONCURRENT} concurrent (median of {RATE_ROUNDS})"),
        rate,
        FC_VMS_PER_SEC,
    );
    row(
        &format!("exec -> exit after i8042 reset, ms (median of {RUNS})"),
        exit_ms,
        FC_EXEC_TO_EXIT_MS,
    );
    println!("goals: time ratios <= 0.50, RSS ratio <= 0.80, rate ratio >= 1.50 (Firecracker = 1)");
    println!(
        "detail: boot timer as the VMM reports it (from main) {:.2} ms median; VmRSS {:.2} MiB \
         of which guest {:.2} MiB; registering {MEMORY_MIB} MiB with KVM {}",
        median(&mut self_reported) / 1000.0,
        median(&mut vm_rss),
        median(&mut guest_touched),
        register_ms
            .map(|ms| format!("{ms:.3} ms"))
            .unwrap_or_else(|| "not reported".into())
    );
    seccomp_cost(dir.path(), reset_path);
}

/// The filter's cost: the same guests with and without it, interleaved.
fn seccomp_cost(dir: &std::path::Path, reset_path: &str) {
    let busy = {
        let mut a = asm64();
        boot_timer(&mut a);
        a.mov(ecx, EXITS).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.out(0x80, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        i8042_reset(&mut a);
        write_file(dir, "exits.elf", &elf_kernel(&assemble(a, LOAD_ADDR), LOAD_ADDR, 0))
    };
    let busy_path = busy.to_str().expect("utf-8 path");
    let (mut ready_on, mut ready_off, mut exits_on, mut exits_off) = (vec![], vec![], vec![], vec![]);
    for _ in 0..SECCOMP_RUNS {
        for (args, ready, exits) in [
            (&[][..], &mut ready_on, &mut exits_on),
            (&["--no-seccomp"][..], &mut ready_off, &mut exits_off),
        ] {
            let t0 = Instant::now();
            let mut child = start_with(reset_path, &[], args);
            wait_for_boot_timer(&mut child);
            ready.push(t0.elapsed());
            let _ = child.wait();
            let t0 = Instant::now();
            let status = start_with(busy_path, &[], args).wait().expect("wait");
            exits.push(t0.elapsed());
            assert_eq!(status.code(), Some(3), "exit guest resets");
        }
    }
    let (on, off) = (median_ms(&mut ready_on), median_ms(&mut ready_off));
    println!("seccomp filter (median of {SECCOMP_RUNS}; baseline --no-seccomp, same run):");
    println!(
        "  exec -> boot-timer write:   {on:.2} ms vs {off:.2} ms = {:.2}x",
        on / off
    );
    let (on, off) = (median_ms(&mut exits_on), median_ms(&mut exits_off));
    println!(
        "  {EXITS} port-I/O exits + reset: {on:.1} ms vs {off:.1} ms = {:.3}x ({:+.0} ns per exit)",
        on / off,
        (on - off) * 1e6 / f64::from(EXITS)
    );
}

/// The keel-vmm to measure: `KEEL_VMM_BIN`, else this build's.
fn vmm() -> String {
    std::env::var("KEEL_VMM_BIN").unwrap_or_else(|_| vmm_bin().to_string())
}

fn start(kernel: &str, extra_env: &[(&str, &str)]) -> Child {
    start_with(kernel, extra_env, &[])
}

fn start_with(kernel: &str, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Child {
    Command::new(vmm())
        .args(extra_args)
        .args([
            "--kernel",
            kernel,
            "--memory",
            &format!("{MEMORY_MIB}MiB"),
            "--serial",
            "none",
            "--boot-timer",
        ])
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-vmm")
}

fn parse_us(line: &str) -> f64 {
    line.split("guest ready ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

/// (VmRSS, Rss of the guest-memory mapping) in KiB. The guest mapping is the one
/// anonymous mapping exactly as large as the guest's RAM.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut guest = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            let kib: u64 = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            in_guest = kib == MEMORY_MIB * 1024;
        } else if in_guest && let Some(v) = l.strip_prefix("Rss:") {
            guest += v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            in_guest = false;
        }
    }
    (vm_rss, guest)
}

/// The VMM's own debug log says how long KVM_SET_USER_MEMORY_REGION took.
fn memory_registration_ms(kernel: &str) -> Option<f64> {
    let out = start(kernel, &[("RUST_LOG", "debug")]).wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("registered with KVM in"))?;
    let dur = line.rsplit("in ").next()?.trim();
    parse_debug_duration(dur)
}

/// Parses Rust's `Duration` debug format ("1.234ms", "567.8µs", "12ns", "1.2s") to ms.
fn parse_debug_duration(s: &str) -> Option<f64> {
    for (unit, scale) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(n) = s.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_ms(v: &mut [Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    median(&mut ms)
}

fn row(name: &str, ours: f64, firecracker: f64) {
    println!(
        "{name:<44} {ours:>10.2} {firecracker:>12.2} {:>7.2}x",
        ours / firecracker
    );
}
