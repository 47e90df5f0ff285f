//! `keel-image validate` and `keel-image schema`: check configs before building.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keel_config::{self as config, Diagnostic, LoadError};
use serde::Serialize;

/// One file's result, as `--json` prints it.
#[derive(Serialize)]
struct Report {
    file: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    diagnostics: Vec<Diagnostic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_error: Option<String>,
}

#[derive(Serialize)]
struct Summary {
    guests: usize,
    bridges: usize,
    pools: usize,
}

fn check(path: &Path) -> Report {
    let file = path.display().to_string();
    match config::load_file(path) {
        Ok(loaded) => {
            let c = &loaded.config;
            Report {
                file,
                ok: true,
                summary: Some(Summary {
                    guests: c.guests.len(),
                    bridges: c.network.bridges.len(),
                    pools: c.storage.pools.len(),
                }),
                diagnostics: loaded.warnings.sorted(),
                io_error: None,
            }
        }
        Err(LoadError::Invalid { diagnostics, .. }) => Report {
            file,
            ok: false,
            summary: None,
            diagnostics: diagnostics.sorted(),
            io_error: None,
        },
        Err(e @ LoadError::Io { .. }) => Report {
            file,
            ok: false,
            summary: None,
            diagnostics: Vec::new(),
            io_error: Some(e.to_string()),
        },
    }
}

/// Validates every file; exit 0 only when all are valid (warnings allowed).
pub fn run(files: &[PathBuf], json: bool) -> ExitCode {
    let reports: Vec<Report> = files.iter().map(|f| check(f)).collect();
    let all_ok = reports.iter().all(|r| r.ok);
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keel-image: error: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        for r in &reports {
            for d in &r.diagnostics {
                let sev = match d.severity {
                    config::Severity::Error => "error",
                    config::Severity::Warning => "warning",
                };
                eprintln!("{}:{}:{}: {sev}: {}", r.file, d.line, d.col, d.message);
            }
            if let Some(e) = &r.io_error {
                eprintln!("{e}");
            }
            if let Some(s) = &r.summary {
                println!(
                    "ok: {} ({} guests, {} bridges, {} pools)",
                    r.file, s.guests, s.bridges, s.pools
                );
            }
        }
    }
    if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

pub fn print_schema() -> ExitCode {
    match serde_json::to_string_pretty(&config::json_schema()) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-image: error: cannot encode the schema: {e}");
            ExitCode::FAILURE
        }
    }
}
