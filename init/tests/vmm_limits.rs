//! Issue 12: a keel.yaml that validates is one keel-vmm accepts. Each of keel-vmm's
//! limits (keel-vmm-api) is walked through both sides: at the limit the config
//! validates and `keel-vmm --check`, given the very arguments keel-init would pass,
//! accepts it; one past the limit the validator refuses it at the field's line and
//! column (and keel-vmm would have refused it too).

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_init::config;
use keel_init::guest::vmm_command::{self, Paths};
use keel_vmm_api::limits;

fn vmm_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_keel-init")).parent().expect("target dir");
    let vmm = dir.join("keel-vmm");
    assert!(
        vmm.exists(),
        "{} not found: build it first (`cargo build -p keel-vmm`, or run the tests with --workspace)",
        vmm.display()
    );
    vmm
}

/// One guest `g` with `fields` (YAML lines at guest level), `disks` disks and `nics`
/// NICs, in a config with a pool and a bridge.
fn config_text(fields: &str, disks: usize, nics: usize) -> String {
    let mut t = String::from(
        "version: 1\nstorage:\n  pools:\n    - name: p\nnetwork:\n  bridges:\n    - name: br0\n      mode: isolated\n      address: 10.9.0.1/24\nguests:\n  - name: g\n    kernel: p/vmlinuz\n",
    );
    t.push_str(fields);
    if disks > 0 {
        t.push_str("    disks:\n");
        for i in 0..disks {
            t.push_str(&format!("      - {{volume: p/d{i}, size: 1MiB}}\n"));
        }
    }
    if nics > 0 {
        t.push_str("    nics:\n");
        for _ in 0..nics {
            t.push_str("      - bridge: br0\n");
        }
    }
    t
}

/// Validates `text`; when valid, runs `keel-vmm --check` with keel-init's arguments
/// for it (in a root holding the kernel and volume files) and returns its exit code.
fn both_sides(text: &str) -> Result<i32, Vec<config::Diagnostic>> {
    let loaded = config::parse_str(text).map_err(|d| d.errors().cloned().collect::<Vec<_>>())?;
    let root = tempfile::tempdir().unwrap();
    let paths = Paths::under(root.path(), vmm_bin());
    let pool = root.path().join("var/lib/keel/pools/p");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::write(pool.join("vmlinuz"), b"not booted: --check reads no further").unwrap();
    let g = &loaded.config.guests[0];
    for d in &g.disks {
        std::fs::write(paths.pool_file(&d.volume), b"").unwrap();
    }
    let out = Command::new(vmm_bin())
        .arg("--check")
        .args(vmm_command::args(g, &paths, None))
        .output()
        .expect("run keel-vmm --check");
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!("keel-vmm --check: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(code)
}

/// The one error of an invalid config, as (line, col, message).
fn refused(text: &str) -> (usize, usize, String) {
    match both_sides(text) {
        Ok(code) => panic!("validated (keel-vmm --check exited {code}):\n{text}"),
        Err(errors) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            let e = &errors[0];
            (e.line, e.col, e.message.clone())
        }
    }
}

fn accepted(text: &str) {
    match both_sides(text) {
        Ok(0) => {}
        Ok(code) => panic!("validated, but keel-vmm --check refused it (exit {code}):\n{text}"),
        Err(errors) => panic!("refused by the validator: {errors:?}\n{text}"),
    }
}

#[test]
fn vcpus_at_and_past_the_vmm_limit() {
    let max = limits::MAX_VCPUS as u32;
    accepted(&config_text(&format!("    vcpus: {max}\n    memory: 64MiB\n"), 0, 0));
    let (line, col, msg) = refused(&config_text(
        &format!("    vcpus: {}\n    memory: 64MiB\n", max + 1),
        0,
        0,
    ));
    assert_eq!((line, col), (13, 12), "{msg}");
    assert!(msg.contains(&format!("between 1 and {max}")), "{msg}");
}

#[test]
fn memory_at_and_past_the_vmm_limits() {
    let max_gib = limits::MAX_MEMORY >> 30;
    accepted(&config_text(&format!("    memory: {max_gib}GiB\n"), 0, 0));
    let (line, col, msg) = refused(&config_text(
        &format!("    memory: {}MiB\n", (limits::MAX_MEMORY >> 20) + 4),
        0,
        0,
    ));
    assert_eq!((line, col), (13, 13), "{msg}");
    assert!(msg.contains("maximum"), "{msg}");
    let min_mib = limits::MIN_MEMORY >> 20;
    accepted(&config_text(&format!("    memory: {min_mib}MiB\n"), 0, 0));
    let (line, col, msg) = refused(&config_text(
        &format!("    memory: {}KiB\n", (limits::MIN_MEMORY >> 10) - 4),
        0,
        0,
    ));
    assert_eq!((line, col), (13, 13), "{msg}");
    assert!(msg.contains("minimum"), "{msg}");
}

#[test]
fn devices_at_and_past_the_vmm_limit() {
    let max = limits::MAX_DEVICES;
    // Disks and NICs count together.
    accepted(&config_text("    memory: 64MiB\n", max - 2, 2));
    let text = config_text("    memory: 64MiB\n", max - 2, 3);
    let (line, col, msg) = refused(&text);
    // At the NIC that is one too many: the last line of the file.
    assert_eq!(line, text.lines().count(), "{msg}");
    assert_eq!(col, 17, "{msg}");
    assert!(msg.contains(&format!("at most {max} virtio devices")), "{msg}");
}

#[test]
fn the_kernel_command_line_at_and_past_the_vmm_limit() {
    // With two disks keel-vmm appends two device entries; Keel's own part comes first.
    let devices = 2;
    let base = config::base_cmdline("g").len() + 1; // and the space before the operator's part
    let room = limits::MAX_CMDLINE_LEN - 1 - devices * limits::DEVICE_CMDLINE_ENTRY_MAX - base;
    let fits = "x".repeat(room);
    accepted(&config_text(
        &format!("    memory: 64MiB\n    cmdline: \"{fits}\"\n"),
        devices,
        0,
    ));
    let (line, col, msg) = refused(&config_text(
        &format!("    memory: 64MiB\n    cmdline: \"{fits}y\"\n"),
        devices,
        0,
    ));
    assert_eq!((line, col), (14, 14), "{msg}");
    assert!(
        msg.contains("cmdline") && msg.contains(&limits::MAX_CMDLINE_LEN.to_string()),
        "{msg}"
    );
}
