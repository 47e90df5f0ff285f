//! Every crate of the workspace has a one-way module import graph.

use std::path::Path;

#[test]
fn no_crate_has_an_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
    let members: Vec<&str> = manifest
        .lines()
        .skip_while(|l| !l.starts_with("members"))
        .take_while(|l| !l.trim().is_empty())
        .flat_map(|l| l.split('"').skip(1).step_by(2))
        .collect();
    assert!(members.len() >= 3, "members not found in {manifest:.200}");
    let mut report = String::new();
    for m in members {
        let g = keel_import_graph::read_crate(&root.join(m).join("src")).expect("read crate");
        for c in keel_import_graph::cycles(&g) {
            let names: Vec<String> = c.iter().map(keel_import_graph::display).collect();
            report.push_str(&format!("{m}: {}\n", names.join(" -> ")));
        }
    }
    assert!(report.is_empty(), "import cycles:\n{report}");
}
