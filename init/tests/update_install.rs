//! Installing bundles on a temporary ESP: the happy path, every refusal (each
//! leaves the ESP exactly as it was), and interrupted streams (a power cut or a
//! broken download never leaves a partial file under a `keel-*.efi` name).

#[path = "update_support/mod.rs"]
mod support;

use keel_init::update::install::{EspRecord, InstallError, Target, apply_stream_with_progress};
use keel_init::update::slots;
use keel_init::update::{BundleError, apply_stream};
use support::{CutReader, Esp, key, make_bundle, payload, payload_offset};

const RUNNING: &str = "1.0.0";

fn trusted() -> Vec<ed25519_dalek::VerifyingKey> {
    vec![key(1).verifying_key()]
}

#[test]
fn installs_a_verified_bundle_as_a_counted_entry() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi"]);
    let uki = payload(300_000, 1);
    let b = make_bundle(&key(1), "1.1.0", Some("1.0.0"), &uki);
    let mut seen = Vec::new();
    let target = Target {
        esp: &esp.root(),
        running_version: RUNNING,
        allow_downgrade: false,
    };
    let got = apply_stream_with_progress(&b[..], &trusted(), target, |done, total| seen.push((done, total)))
        .expect("installs");
    assert_eq!(got.file, "EFI/Linux/keel-1.1.0+3.efi");
    assert_eq!(got.demoted, None);
    assert_eq!(
        std::fs::read(esp.linux().join("keel-1.1.0+3.efi")).expect("installed"),
        uki
    );
    assert_eq!(
        esp.names(),
        ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.1.0+3.efi"],
        "nothing else written or removed in EFI/Linux"
    );
    assert_eq!(seen.last(), Some(&(300_000, 300_000)));
    // The record keel-image inspect verifies the UKI against.
    let record: EspRecord =
        serde_json::from_slice(&std::fs::read(esp.root().join("keel/manifests/keel-1.1.0.json")).expect("record"))
            .expect("record parses");
    assert_eq!(record.sha256, got.sha256);
    assert_eq!(record.size, 300_000);
    assert_eq!(record.uki, "EFI/Linux/keel-1.1.0+3.efi");
    // systemd-boot tries the new version first.
    assert_eq!(esp.boots_next(), "keel-1.1.0+3.efi");
}

/// Every refused bundle leaves every file on the ESP as it was.
#[test]
fn each_refused_bundle_writes_nothing() {
    let uki = payload(40_000, 2);
    let good = make_bundle(&key(1), "1.1.0", None, &uki);
    let mut tampered_payload = good.clone();
    let p = payload_offset(&good);
    tampered_payload[p + 100] ^= 0xff;
    let mut tampered_manifest = good.clone();
    tampered_manifest[20] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "tampered payload",
            tampered_payload,
            RUNNING,
            "does not match its signed manifest",
        ),
        (
            "tampered manifest",
            tampered_manifest,
            RUNNING,
            "signature does not match",
        ),
        (
            "wrong key",
            make_bundle(&key(9), "1.1.0", None, &uki),
            RUNNING,
            "signature does not match",
        ),
        ("truncated header", good[..p - 3].to_vec(), RUNNING, "ends early"),
        ("truncated payload", good[..p + 20_000].to_vec(), RUNNING, "ends early"),
        (
            "downgrade",
            make_bundle(&key(1), "0.9.1", None, &uki),
            RUNNING,
            "--allow-downgrade",
        ),
        (
            "same version",
            make_bundle(&key(1), "1.0.0", None, &uki),
            RUNNING,
            "already running",
        ),
        (
            "too old to apply",
            make_bundle(&key(1), "3.0.0", Some("2.0.0"), &uki),
            RUNNING,
            "2.0.0 or newer",
        ),
        ("running not on ESP", good.clone(), "0.5.0", "has no UKI in EFI/Linux"),
    ];
    for (what, bundle, running, expect) in cases {
        let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi", "keel-0.8.0+0-3.efi"]);
        let before = esp.snapshot();
        let err = apply_stream(&bundle[..], &trusted(), &esp.root(), running, false).expect_err(what);
        assert!(err.to_string().contains(expect), "{what}: {err} (expected `{expect}`)");
        assert_eq!(esp.snapshot(), before, "{what}: the ESP changed");
    }
}

#[test]
fn an_update_is_refused_while_the_running_version_is_on_trial() {
    let esp = Esp::new(&["keel-1.0.0+2-1.efi", "keel-0.9.0.efi"]);
    let before = esp.snapshot();
    let b = make_bundle(&key(1), "1.1.0", None, &payload(1000, 3));
    let err = apply_stream(&b[..], &trusted(), &esp.root(), RUNNING, false).expect_err("refused");
    assert!(matches!(err, InstallError::RunningOnTrial(_)), "{err}");
    assert_eq!(esp.snapshot(), before);
}

/// A power cut or a broken download at any point of the payload: at that moment
/// only a dot-file exists besides the old entries (systemd-boot boots the running
/// blessed version), and the failed install removes it.
#[test]
fn interrupted_streams_never_leave_a_final_named_file() {
    let uki = payload(1_000_000, 4);
    let b = make_bundle(&key(1), "1.1.0", None, &uki);
    let p = payload_offset(&b);
    for (at, eof) in [
        (p, false),
        (p + 1, true),
        (p + 300_000, false),
        (p + 999_999, true),
        (b.len() - 1, false),
    ] {
        let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi"]);
        let before = esp.snapshot();
        let mut at_cut = None;
        let reader = CutReader {
            data: &b,
            pos: 0,
            at,
            on_cut: || at_cut = Some((esp.names(), esp.boots_next())),
            cut: false,
            eof,
        };
        let err = apply_stream(reader, &trusted(), &esp.root(), RUNNING, false).expect_err("interrupted");
        if eof {
            assert!(matches!(err, InstallError::Bundle(BundleError::Truncated(_))), "{err}");
        } else {
            assert!(err.to_string().contains("power cut"), "{err}");
        }
        let (names, boots_next) = at_cut.expect("the reader was cut");
        assert_eq!(
            names,
            [".keel-1.1.0.efi.partial", "keel-0.9.0.efi", "keel-1.0.0.efi"],
            "cut at {at}: only the partial dot-file is new"
        );
        assert_eq!(boots_next, "keel-1.0.0.efi", "cut at {at}: the running version boots");
        assert_eq!(esp.snapshot(), before, "cut at {at}: the partial file was removed");
    }
}

#[test]
fn a_partial_file_left_by_a_power_cut_is_ignored_by_boot_and_cleaned_by_the_next_install() {
    let esp = Esp::new(&["keel-1.0.0.efi"]);
    std::fs::write(esp.linux().join(".keel-1.1.0.efi.partial"), b"half a UKI").expect("partial");
    assert_eq!(esp.boots_next(), "keel-1.0.0.efi");
    let b = make_bundle(&key(1), "1.1.0", None, &payload(5000, 5));
    let got = apply_stream(&b[..], &trusted(), &esp.root(), RUNNING, false).expect("installs");
    assert_eq!(got.removed, ["EFI/Linux/.keel-1.1.0.efi.partial"]);
    assert_eq!(esp.names(), ["keel-1.0.0.efi", "keel-1.1.0+3.efi"]);
}

#[test]
fn a_newer_install_replaces_one_that_never_booted() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-1.1.0+3.efi", "keel-0.9.0.efi"]);
    let b = make_bundle(&key(1), "1.2.0", None, &payload(5000, 6));
    let got = apply_stream(&b[..], &trusted(), &esp.root(), RUNNING, false).expect("installs");
    assert_eq!(got.removed, ["EFI/Linux/keel-1.1.0+3.efi"]);
    assert_eq!(esp.names(), ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.2.0+3.efi"]);
    // Re-sending the same version replaces the pending copy too.
    let b = make_bundle(&key(1), "1.2.0", None, &payload(6000, 7));
    apply_stream(&b[..], &trusted(), &esp.root(), RUNNING, false).expect("installs again");
    assert_eq!(esp.names(), ["keel-0.9.0.efi", "keel-1.0.0.efi", "keel-1.2.0+3.efi"]);
    assert_eq!(
        std::fs::read(esp.linux().join("keel-1.2.0+3.efi")).expect("read").len(),
        6000
    );
}

#[test]
fn an_allowed_downgrade_boots_next_and_keeps_the_newer_version_as_last_resort() {
    let esp = Esp::new(&["keel-1.0.0.efi", "keel-0.9.0.efi"]);
    let b = make_bundle(&key(1), "0.9.5", None, &payload(5000, 8));
    let got = apply_stream(&b[..], &trusted(), &esp.root(), RUNNING, true).expect("downgrade allowed");
    assert_eq!(got.demoted.as_deref(), Some("EFI/Linux/keel-1.0.0+0.efi"));
    let order: Vec<String> = slots::list(&esp.root())
        .expect("list")
        .into_iter()
        .map(|s| s.file)
        .collect();
    assert_eq!(order, ["keel-0.9.5+3.efi", "keel-0.9.0.efi", "keel-1.0.0+0.efi"]);
}
