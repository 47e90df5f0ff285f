//! Blessing, pruning and rollback on a temporary ESP with a fake efivarfs, and the
//! whole A/B cycle against a model of systemd-boot 252's boot counting.

#[path = "update_support/mod.rs"]
mod support;

use keel_init::update::bless::{self, BOOT_COUNT_PATH_VAR, BlessError};
use keel_init::update::rollback::{self, RollbackError};
use keel_init::update::{Agent, apply_stream};
use support::{Esp, key, make_bundle, payload};

#[test]
fn efivarfs_strings_are_read_past_their_attribute_bytes() {
    let esp = Esp::new(&[]);
    assert_eq!(bless::boot_count_path(&esp.efivars).expect("absent is fine"), None);
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\EFI\\Linux\\keel-1.1.0+2-1.efi");
    assert_eq!(
        bless::boot_count_path(&esp.efivars).expect("reads").as_deref(),
        Some("\\EFI\\Linux\\keel-1.1.0+2-1.efi")
    );
    assert_eq!(
        bless::esp_relative("\\EFI\\Linux\\keel-1.1.0+2-1.efi"),
        "EFI/Linux/keel-1.1.0+2-1.efi"
    );
    let path = esp
        .efivars
        .join(format!("{BOOT_COUNT_PATH_VAR}-{}", bless::LOADER_VENDOR_GUID));
    std::fs::write(&path, [7, 0, 0]).expect("short");
    let err = bless::boot_count_path(&esp.efivars).expect_err("too short");
    assert!(err.to_string().contains("4 attribute bytes"), "{err}");
    std::fs::write(&path, [7, 0, 0, 0, b'a', 0, b'b']).expect("odd");
    assert!(matches!(
        bless::boot_count_path(&esp.efivars),
        Err(BlessError::BadVariable { .. })
    ));
}

#[test]
fn bless_renames_the_booted_file_and_prune_keeps_only_the_previous_version() {
    let esp = Esp::new(&[
        "keel-1.1.0+2-1.efi",
        "keel-1.0.0.efi",
        "keel-0.9.0.efi",
        "keel-0.8.0+0-3.efi",
        "keel-1.2.0+0-3.efi",
    ]);
    let records = esp.root().join("keel/manifests");
    std::fs::create_dir_all(&records).expect("records");
    for v in ["1.1.0", "1.0.0", "0.9.0", "0.8.0", "1.2.0", "0.1.0"] {
        std::fs::write(records.join(format!("keel-{v}.json")), b"{}").expect("record");
    }
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\EFI\\Linux\\keel-1.1.0+2-1.efi");
    let report = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.1.0").expect("blessed");
    let renamed = report.blessed.expect("renamed");
    assert_eq!(
        (renamed.from.as_str(), renamed.to.as_str()),
        ("EFI/Linux/keel-1.1.0+2-1.efi", "EFI/Linux/keel-1.1.0.efi")
    );
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-1.1.0.efi"]);
    let mut left: Vec<String> = std::fs::read_dir(&records)
        .expect("records")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["keel-1.0.0.json", "keel-1.1.0.json"]);
    // Again in the same boot: nothing left to do.
    let again = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.1.0").expect("idempotent");
    assert_eq!((again.blessed, again.removed.len()), (None, 0));
}

#[test]
fn bless_refuses_a_booted_entry_of_another_version_and_writes_nothing() {
    let esp = Esp::new(&["keel-1.1.0+2-1.efi", "keel-1.0.0.efi"]);
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\EFI\\Linux\\keel-1.1.0+2-1.efi");
    let before = esp.snapshot();
    let err = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.0.0").expect_err("mismatch");
    assert!(matches!(err, BlessError::VersionMismatch { .. }), "{err}");
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\efi\\linux\\keel-1.1.0+2-1.efi");
    let err = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.0.0").expect_err("mismatch");
    assert!(
        matches!(err, BlessError::VersionMismatch { .. }),
        "the directory's case does not matter: {err}"
    );
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\EFI\\BOOT\\BOOTX64.EFI");
    let err = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.1.0").expect_err("not keel");
    assert!(matches!(err, BlessError::NotAKeelEntry { .. }), "{err}");
    esp.set_var(BOOT_COUNT_PATH_VAR, "\\EFI\\Linux\\keel-1.1.0+1-2.efi");
    let err = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.1.0").expect_err("gone");
    assert!(matches!(err, BlessError::Missing { .. }), "{err}");
    assert_eq!(esp.snapshot(), before);
}

#[test]
fn without_the_variable_the_running_versions_counted_entry_is_blessed_by_version() {
    let esp = Esp::new(&["keel-1.1.0+2-1.efi", "keel-1.0.0.efi"]);
    let report = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.1.0").expect("blessed");
    assert!(report.blessed.is_some());
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-1.1.0.efi"]);
}

#[test]
fn prune_keeps_an_install_that_has_not_booted_yet() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi", "keel-0.8.0.efi", "keel-1.1.0+3.efi"]);
    let removed = bless::prune(&esp.root(), "1.0.0").expect("pruned");
    assert_eq!(removed, ["EFI/Linux/keel-0.8.0.efi"]);
    assert_eq!(esp.names(), ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.1.0+3.efi"]);
}

#[test]
fn rollback_makes_the_previous_version_boot_next() {
    let esp = Esp::new(&["keel-1.1.0.efi", "keel-1.0.0.efi", "keel-1.2.0+3.efi"]);
    let r = rollback::rollback(&esp.root(), "1.1.0").expect("rolled back");
    assert_eq!((r.from.as_str(), r.to.as_str()), ("1.1.0", "1.0.0"));
    assert_eq!(r.removed, ["EFI/Linux/keel-1.2.0+3.efi"]);
    assert_eq!(r.renamed[0].to, "EFI/Linux/keel-1.1.0+0.efi");
    assert_eq!(esp.boots_next(), "keel-1.0.0.efi");
    // The previous version boots, is blessed already, and once healthy prunes the
    // rolled-back one.
    assert_eq!(esp.boot(), "1.0.0");
    let report = bless::bless_and_prune(&esp.root(), &esp.efivars, "1.0.0").expect("prune");
    assert_eq!(report.blessed, None);
    assert_eq!(esp.names(), ["keel-1.0.0.efi"]);
}

#[test]
fn rollback_during_a_trial_keeps_the_tries_done_and_refuses_without_a_previous_version() {
    let esp = Esp::new(&["keel-1.1.0+2-1.efi", "keel-1.0.0.efi"]);
    rollback::rollback(&esp.root(), "1.1.0").expect("rolled back");
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-1.1.0+0-1.efi"]);
    assert_eq!(esp.boots_next(), "keel-1.0.0.efi");

    let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0+0-3.efi"]);
    let before = esp.snapshot();
    let err = rollback::rollback(&esp.root(), "1.0.0").expect_err("nothing to go back to");
    assert!(matches!(err, RollbackError::NoPreviousVersion(_)), "{err}");
    assert_eq!(esp.snapshot(), before);
}

/// The A/B cycle of issue 8 with systemd-boot modelled: v1 → v2 blessed after
/// its health window; v3 never healthy → three tries → back on v2 by itself.
#[test]
fn full_cycle_update_bless_bad_update_and_automatic_rollback() {
    let esp = Esp::new(&["keel-1.0.0.efi"]);
    let keys = vec![key(1).verifying_key()];
    assert_eq!(esp.boot(), "1.0.0");

    // v2 installed from v1, boots on trial, is healthy, blessed.
    let b = make_bundle(&key(1), "2.0.0", None, &payload(10_000, 2));
    apply_stream(&b[..], &keys, &esp.root(), "1.0.0", false).expect("v2 installs");
    assert_eq!(esp.boot(), "2.0.0");
    let agent = Agent::new(esp.root(), esp.efivars.clone(), "2.0.0".into(), keys.clone());
    assert!(agent.on_trial());
    agent.bless().expect("v2 blessed");
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-2.0.0.efi"]);
    assert_eq!(esp.boot(), "2.0.0");
    assert!(!agent.on_trial(), "a blessed entry boots without a counter");

    // v3 installed from v2 never becomes healthy: nobody blesses it.
    let b = make_bundle(&key(1), "3.0.0", None, &payload(10_000, 3));
    agent.apply(&b[..], false, |_, _| {}).expect("v3 installs");
    for _ in 0..3 {
        assert_eq!(esp.boot(), "3.0.0");
    }
    // The fourth boot is v2 again, and v2 (healthy) prunes the failed v3.
    assert_eq!(esp.boot(), "2.0.0");
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-2.0.0.efi", "keel-3.0.0+0-3.efi"]);
    let report = agent.bless().expect("prune");
    assert_eq!(
        report.removed,
        ["EFI/Linux/keel-3.0.0+0-3.efi", "keel/manifests/keel-3.0.0.json"]
    );
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-2.0.0.efi"]);
    let status = agent.status().expect("status");
    assert!(status[0].running && status[0].boots_next);
    assert_eq!(status[0].slot.file, "keel-2.0.0.efi");
}
