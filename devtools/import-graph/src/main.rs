//! `keel-import-graph SRC...`: prints each crate's module import graph and its
//! cycles; exits 1 when there is one. `ci/test` runs it through the test in
//! `tests/workspace.rs`; this binary is for reading the graph by hand.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut failed = false;
    for src in std::env::args().skip(1) {
        match keel_import_graph::read_crate(std::path::Path::new(&src)) {
            Ok(g) => {
                println!("{src}:");
                for (m, deps) in &g.edges {
                    let deps: Vec<String> = deps.iter().map(keel_import_graph::display).collect();
                    println!("  {} -> {}", keel_import_graph::display(m), deps.join(", "));
                }
                for c in keel_import_graph::cycles(&g) {
                    failed = true;
                    let names: Vec<String> = c.iter().map(keel_import_graph::display).collect();
                    println!("  CYCLE: {}", names.join(" -> "));
                }
            }
            Err(e) => {
                eprintln!("keel-import-graph: {src}: {e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
