//! `keel-image validate` and `keel-image schema` as an operator runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn keel_image(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run keel-image")
}

#[test]
fn shipped_configs_validate() {
    let out = keel_image(&[
        "validate",
        "configs/minimal.yaml",
        "configs/homelab.yaml",
        "configs/ci.yaml",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok: configs/homelab.yaml (3 guests, 3 bridges, 2 pools)"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

#[test]
fn three_errors_point_at_their_nodes() {
    let file = "init/tests/bad-configs/06-three-errors.yaml";
    let out = keel_image(&["validate", file]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{file}:12:16: error: DHCP range")),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:16:5: error: unknown field `memroy`")),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{file}:18:17: error: guest `web` nic 0 refers to bridge `br-missing`"
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn json_report_lists_every_file() {
    let out = keel_image(&[
        "validate",
        "--json",
        "configs/minimal.yaml",
        "init/tests/bad-configs/06-three-errors.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report[0]["ok"], true);
    assert_eq!(report[0]["summary"]["guests"], 1);
    assert_eq!(report[1]["ok"], false);
    assert_eq!(report[1]["diagnostics"].as_array().map(Vec::len), Some(3));
    assert_eq!(report[1]["diagnostics"][0]["line"], 12);
    assert_eq!(report[1]["diagnostics"][0]["severity"], "error");
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let out = keel_image(&["validate", "no/such/keel.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/keel.yaml: cannot read"), "{stderr}");
}

#[test]
fn schema_is_json_schema() {
    let out = keel_image(&["schema"]);
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        schema["$schema"]
            .as_str()
            .is_some_and(|s| s.contains("json-schema.org")),
        "{schema}"
    );
    assert_eq!(schema["properties"]["version"]["type"], "integer");
    assert_eq!(schema["additionalProperties"], false);
}
