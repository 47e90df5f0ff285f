//! Building the appliance image the e2e suites boot.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::env::env_path;

pub fn keel_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
}

pub fn repo_file(path: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// `keel-image build` of configs/ci.yaml into `work/ci.img`, with the API token file on
/// KEEL-CONFIG and `extra_cmdline` after the default kernel command line.
pub fn build_image(suite: &str, work: &Path, token_file: &Path, extra_cmdline: &str) -> Result<PathBuf, String> {
    let config = repo_file("configs/ci.yaml");
    let image = work.join("ci.img");
    let cmdline = std::fs::read_to_string(repo_file("kernel-config/cmdline"))
        .map_err(|e| format!("kernel-config/cmdline: {e}"))?;
    let cmdline = format!("{} {extra_cmdline}", cmdline.trim());
    let started = Instant::now();
    let out = keel_image()
        .args(["build", "--cmdline", &cmdline, "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&image)
        .arg("--kernel")
        .arg(env_path("KEEL_E2E_HOST_KERNEL")?)
        .arg("--modules")
        .arg(env_path("KEEL_E2E_HOST_MODULES")?)
        .arg("--guest-kernel")
        .arg(env_path("KEEL_E2E_GUEST_KERNEL")?)
        .arg("--bin-dir")
        .arg(env_path("KEEL_E2E_BIN_DIR")?)
        .arg("--config-file")
        .arg(format!("api-token={}", token_file.display()))
        .output()
        .map_err(|e| format!("keel-image build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "keel-image build failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    println!(
        "{suite}: built {} from {} in {} ms ({size} bytes)",
        image.display(),
        config.display(),
        started.elapsed().as_millis()
    );
    Ok(image)
}
