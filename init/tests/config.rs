//! keel.yaml: every shipped config is valid and round-trips; every file in the
//! bad-config corpus fails with exactly the diagnostics its `# expect:` lines name.

use std::fs;
use std::path::{Path, PathBuf};

use keel_init::config::{self, Severity};

fn repo_root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn shipped_configs_are_valid() {
    let files = yaml_files(&repo_root().join("configs"));
    assert!(files.len() >= 3, "configs/ should hold minimal, homelab and ci");
    for f in files {
        if let Err(e) = config::load_file(&f) {
            panic!("{e}");
        }
    }
}

/// The example in README's config reference is a config that validates, field by field
/// what an operator copies from.
#[test]
fn the_readme_config_example_is_valid() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = &readme[readme
        .find("## Config reference")
        .expect("README has a config reference")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    if let Err(d) = config::parse_str(text) {
        panic!("README's config example:\n{}", d.render("README.md (config reference)"));
    }
}

#[test]
fn shipped_configs_round_trip_through_yaml() {
    for f in yaml_files(&repo_root().join("configs")) {
        let loaded = config::load_file(&f).unwrap_or_else(|e| panic!("{e}"));
        let yaml = loaded.config.to_yaml();
        let again =
            config::parse_str(&yaml).unwrap_or_else(|d| panic!("{}:\n{}\n{yaml}", f.display(), d.render("re-emitted")));
        assert_eq!(
            again.config,
            loaded.config,
            "{} changed after a YAML round trip",
            f.display()
        );
    }
}

#[test]
fn schema_accepts_every_shipped_config() {
    let schema = config::json_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema is itself valid JSON Schema");
    for f in yaml_files(&repo_root().join("configs")) {
        let text = fs::read_to_string(&f).expect("read config");
        let doc: serde_json::Value = serde_yaml::from_str(&text).expect("YAML");
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{} rejected by the schema: {errors:#?}", f.display());
    }
}

#[test]
fn schema_rejects_unknown_fields_and_wrong_types() {
    let validator = jsonschema::validator_for(&config::json_schema()).expect("valid schema");
    let bad: serde_json::Value =
        serde_json::json!({ "version": 1, "guests": [{ "name": "a", "memory": "64MiB", "memroy": 1 }] });
    assert!(!validator.is_valid(&bad));
    let bad: serde_json::Value = serde_json::json!({ "version": 1, "guests": [{ "name": "a", "memory": 64 }] });
    assert!(!validator.is_valid(&bad));
    let good: serde_json::Value = serde_json::json!({ "version": 1, "guests": [{ "name": "a", "memory": "64MiB" }] });
    assert!(validator.is_valid(&good));
}

/// `# expect: LINE:COL: message fragment` lines at the top of a corpus file.
fn expectations(text: &str) -> Vec<(usize, usize, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let mut parts = e.splitn(3, ':');
            let line = parts.next().and_then(|s| s.trim().parse().ok()).expect("expect LINE");
            let col = parts.next().and_then(|s| s.trim().parse().ok()).expect("expect COL");
            (line, col, parts.next().expect("expect message").trim().to_string())
        })
        .collect()
}

#[test]
fn bad_config_corpus() {
    let files = yaml_files(
        &Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("tests/bad-configs"),
    );
    assert!(
        files.len() >= 30,
        "the corpus should hold at least 30 invalid configs, has {}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).expect("read corpus file");
        let expected = expectations(&text);
        assert!(!expected.is_empty(), "{} has no `# expect:` line", f.display());
        let diags = match config::parse_str(&text) {
            Ok(_) => {
                failures.push(format!("{}: accepted, but should fail", f.display()));
                continue;
            }
            Err(d) => d.sorted(),
        };
        let actual: Vec<String> = diags
            .iter()
            .map(|d| format!("{}:{}: {:?}: {}", d.line, d.col, d.severity, d.message))
            .collect();
        // Every expectation is met by a diagnostic at exactly that position...
        for (line, col, frag) in &expected {
            if !diags
                .iter()
                .any(|d| d.line == *line && d.col == *col && d.message.contains(frag.as_str()))
            {
                failures.push(format!(
                    "{}: expected {line}:{col}: {frag}\n  got: {actual:#?}",
                    f.display()
                ));
            }
        }
        // ...and there is no diagnostic the file does not expect.
        for d in &diags {
            if !expected
                .iter()
                .any(|(l, c, frag)| d.line == *l && d.col == *c && d.message.contains(frag.as_str()))
            {
                failures.push(format!(
                    "{}: unexpected {}:{}: {:?}: {}",
                    f.display(),
                    d.line,
                    d.col,
                    d.severity,
                    d.message
                ));
            }
        }
        assert!(
            diags.iter().any(|d| d.severity == Severity::Error),
            "{}: no error",
            f.display()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn errors_render_as_file_line_col() {
    let text = "version: 1\nguests:\n  - name: a\n    memory: 8MiB\n    nics: [{bridge: nope}]\n";
    let d = config::parse_str(text).unwrap_err();
    let out = d.render("keel.yaml");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("keel.yaml:4:13: error: memory 8MiB is below"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("keel.yaml:5:21: error: guest `a` nic 0 refers to bridge `nope`"),
        "{out}"
    );
}

#[test]
fn auto_macs_are_stable_unique_and_local() {
    let mut seen = std::collections::HashSet::new();
    for g in 0..50 {
        for i in 0..4 {
            let m = config::auto_mac(&format!("guest-{g}"), i);
            assert_eq!(m, config::auto_mac(&format!("guest-{g}"), i));
            assert!(m.is_locally_administered() && !m.is_multicast(), "{m}");
            assert!(seen.insert(m), "collision at {m}");
        }
    }
}
