//! `keel-image validate` and `keel-image schema`.
use std::path::PathBuf;
use std::process::ExitCode;

pub fn run(_files: &[PathBuf], _json: bool) -> ExitCode {
    eprintln!("keel-image validate: being written (issue 2)");
    ExitCode::FAILURE
}

pub fn print_schema() -> ExitCode {
    ExitCode::FAILURE
}
