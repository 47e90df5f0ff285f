//! `keel-image`: the operator's and CI's tool for Keel disk images.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keel-image", version, about = "Build, check, inspect and boot Keel appliance images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check appliance configs (keel.yaml) and report every error at once.
    #[command(after_help = "Examples:\n  keel-image validate configs/*.yaml\n  keel-image validate --json keel.yaml")]
    Validate {
        /// Print a machine-readable JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// Config files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON Schema of keel.yaml (for yaml-language-server and editors).
    #[command(after_help = "Example:\n  keel-image schema > keel.schema.json\n  # then in keel.yaml:  # yaml-language-server: $schema=keel.schema.json")]
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { json, files } => keel_image::validate::run(&files, json),
        Command::Schema => keel_image::validate::print_schema(),
    }
}
