//! UKI names with boot counters, systemd's version comparison, and the boot order
//! of systemd-boot 252 (LAB-NOTES.md's measurements as test cases).

#[path = "update_support/mod.rs"]
mod support;

use std::cmp::Ordering::{self, Equal, Greater, Less};

use keel_init::update::slots::{self, Slot, SlotName, SlotState, compare_versions, validate_version};
use support::Esp;

#[test]
fn versions_compare_like_systemd() {
    let cases: &[(&str, &str, Ordering)] = &[
        ("1.0", "1.1", Less),
        ("1.9", "1.10", Less),
        ("1.10.0", "1.9.9", Greater),
        ("2", "10", Less),
        ("1.0", "1.0.1", Less),
        ("1.0", "1.0", Equal),
        ("1.0", "1.00", Equal),
        ("01", "1", Equal),
        ("123456789012345678901", "123456789012345678902", Less),
        // `~` marks a pre-release: older than the release.
        ("1.0~rc1", "1.0", Less),
        ("1.0~rc1", "1.0~rc2", Less),
        ("1.0~rc2", "1.0~beta", Greater),
        // `-` separates a release; the side with `-` where the other goes on is older.
        ("123-9", "123.1", Less),
        ("1.0", "1.0-1", Less),
        ("1.0-1", "1.0-2", Less),
        // `^` marks a patched release: newer than the release, older than a point release.
        ("1.0^1", "1.0", Greater),
        ("1.0^1", "1.0.1", Less),
        // Digits beat letters; letters compare alphabetically, the longer is newer.
        ("1.0", "1.a", Greater),
        ("1.a", "1.b", Less),
        ("1.ab", "1.a", Greater),
        ("1.0a", "1.0", Greater),
        // Characters outside the version alphabet are skipped.
        ("1_0", "1.0", Greater),
        ("", "1", Less),
    ];
    for (a, b, want) in cases {
        assert_eq!(compare_versions(a, b), *want, "{a} vs {b}");
        assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
    }
}

#[test]
fn version_strings_are_checked_for_file_names() {
    for ok in ["1.2.0", "2026.11.22", "1.0-rc1", "1_2", "a1"] {
        assert!(validate_version(ok).is_ok(), "{ok}");
    }
    for bad in ["", "1.0+3", "1.0/x", "V1", ".1", "1 0", &"9".repeat(65)] {
        let err = validate_version(bad).expect_err(bad);
        assert!(err.contains("e.g. 1.2.0"), "{err}");
    }
}

#[test]
fn boot_counter_names_parse() {
    let n = SlotName::parse("keel-1.2.0+2-1.efi").expect("on trial");
    assert_eq!(
        (n.version.as_str(), n.tries_left, n.tries_done),
        ("1.2.0", Some(2), Some(1))
    );
    assert_eq!(n.state(), SlotState::OnTrial);
    let n = SlotName::parse("keel-1.1.0+3.efi").expect("fresh");
    assert_eq!((n.tries_left, n.tries_done), (Some(3), None));
    let n = SlotName::parse("keel-1.0.0+0-3.efi").expect("failed");
    assert_eq!(n.state(), SlotState::Failed);
    let n = SlotName::parse("keel-1.0.0.efi").expect("blessed");
    assert_eq!(n.state(), SlotState::Blessed);
    let n = SlotName::parse("keel-1.0-rc1+1-2.efi").expect("dash in the version");
    assert_eq!((n.version.as_str(), n.tries_left), ("1.0-rc1", Some(1)));
    for bad in [
        "keel-1.0.0+x.efi",
        "keel-1.0.0+-1.efi",
        "keel-1.0.0+1-.efi",
        "keel-1.0.0+1-2-3.efi",
        "keel-.efi",
        "other-1.0.0.efi",
        "keel-1.0.0.efi.partial",
        ".keel-1.0.0.efi.partial",
        "keel-1.0.0",
        "keel-1.0.0+99999999999.efi",
    ] {
        assert_eq!(SlotName::parse(bad), None, "{bad}");
    }
}

fn order(names: &[&str]) -> Vec<String> {
    let mut v: Vec<Slot> = names
        .iter()
        .map(|f| Slot {
            file: (*f).to_owned(),
            name: SlotName::parse(f).expect("valid name"),
        })
        .collect();
    slots::sort_boot_order(&mut v);
    v.into_iter().map(|s| s.file).collect()
}

#[test]
fn boot_order_matches_systemd_boot_252() {
    // A new version with tries boots before the blessed old one.
    assert_eq!(order(&["keel-1.0.0.efi", "keel-1.1.0+3.efi"])[0], "keel-1.1.0+3.efi");
    // Still while it has tries left…
    assert_eq!(
        order(&["keel-1.0.0.efi", "keel-1.2.0+1-2.efi"])[0],
        "keel-1.2.0+1-2.efi"
    );
    // …and after the third try the previous version boots (LAB-NOTES: `+0-3`).
    assert_eq!(order(&["keel-1.2.0+0-3.efi", "keel-1.0.0.efi"])[0], "keel-1.0.0.efi");
    // Versions, not file names: 1.10 is newer than 1.9.
    assert_eq!(
        order(&["keel-1.9.0.efi", "keel-1.10.0.efi", "keel-1.2.0.efi"]),
        ["keel-1.10.0.efi", "keel-1.9.0.efi", "keel-1.2.0.efi"]
    );
    // Only failed entries left: the newest boots (systemd-boot does not give up).
    assert_eq!(
        order(&["keel-1.0.0+0.efi", "keel-1.1.0+0-3.efi"])[0],
        "keel-1.1.0+0-3.efi"
    );
}

#[test]
fn listing_an_esp_ignores_other_and_partial_files() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-2.0.0+3.efi", "README.txt", "linux.efi"]);
    std::fs::write(esp.linux().join(".keel-3.0.0.efi.partial"), b"x").expect("partial");
    let found: Vec<String> = slots::list(&esp.root())
        .expect("list")
        .into_iter()
        .map(|s| s.file)
        .collect();
    assert_eq!(found, ["keel-2.0.0+3.efi", "keel-1.0.0.efi"]);
    assert_eq!(
        slots::list_partial(&esp.root()).expect("partial"),
        [".keel-3.0.0.efi.partial"]
    );
}

#[test]
fn the_systemd_boot_model_counts_down_like_the_measurements() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-1.2.0+3.efi"]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        esp.boot();
        seen.push(esp.names());
    }
    assert_eq!(seen[0], ["keel-1.0.0.efi", "keel-1.2.0+2-1.efi"]);
    assert_eq!(seen[1], ["keel-1.0.0.efi", "keel-1.2.0+1-2.efi"]);
    assert_eq!(seen[2], ["keel-1.0.0.efi", "keel-1.2.0+0-3.efi"]);
    // The fourth boot runs 1.0.0 and leaves `+0-3` in place.
    assert_eq!(seen[3], ["keel-1.0.0.efi", "keel-1.2.0+0-3.efi"]);
}
