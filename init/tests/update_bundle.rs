//! The bundle format: what verifies and every way a bundle is refused.

#[path = "update_support/mod.rs"]
mod support;

use ed25519_dalek::Signer;
use keel_init::update::bundle::{self, BundleError, verify_stream};
use support::{key, make_bundle, manifest, payload, payload_offset};

#[test]
fn intact_bundle_verifies_and_returns_its_manifest() {
    let uki = payload(100_000, 1);
    let b = make_bundle(&key(1), "2.0.0", Some("1.0.0"), &uki);
    let m = verify_stream(&b[..], &[key(1).verifying_key()]).expect("verifies");
    assert_eq!(m, manifest("2.0.0", Some("1.0.0"), &uki));
    assert_eq!(&b[..8], b"KEELBNDL");
}

#[test]
fn any_trusted_key_may_have_signed() {
    let b = make_bundle(&key(2), "2.0.0", None, &payload(1000, 2));
    let keys = [key(1).verifying_key(), key(2).verifying_key()];
    assert!(verify_stream(&b[..], &keys).is_ok());
}

#[test]
fn tampered_payload_is_refused_by_hash() {
    let mut b = make_bundle(&key(1), "2.0.0", None, &payload(50_000, 3));
    let at = payload_offset(&b) + 12_345;
    b[at] ^= 0x01;
    let err = verify_stream(&b[..], &[key(1).verifying_key()]).expect_err("refused");
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("does not match its signed manifest"), "{err}");
}

#[test]
fn tampered_manifest_is_refused_by_signature() {
    let b = make_bundle(&key(1), "2.0.0", None, &payload(1000, 4));
    // Same length, different version: only the signature can tell.
    let text = String::from_utf8_lossy(&b).into_owned();
    let at = text.find("\"2.0.0\"").expect("version in manifest") + 5;
    let mut t = b.clone();
    t[at] = b'9';
    let err = verify_stream(&t[..], &[key(1).verifying_key()]).expect_err("refused");
    assert!(matches!(err, BundleError::BadSignature { keys: 1 }), "{err}");
    // Flipping the signature itself is refused the same way.
    let mut t = b.clone();
    let sig_at = payload_offset(&b) - 10;
    t[sig_at] ^= 0x80;
    let err = verify_stream(&t[..], &[key(1).verifying_key()]).expect_err("refused");
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
}

#[test]
fn wrong_key_is_refused() {
    let b = make_bundle(&key(1), "2.0.0", None, &payload(1000, 5));
    let err = verify_stream(&b[..], &[key(7).verifying_key()]).expect_err("refused");
    assert!(
        err.to_string().contains("does not match any of the 1 trusted key"),
        "{err}"
    );
}

#[test]
fn no_trusted_keys_refuses_everything() {
    let b = make_bundle(&key(1), "2.0.0", None, &payload(1000, 5));
    let err = verify_stream(&b[..], &[]).expect_err("refused");
    assert!(matches!(err, BundleError::NoTrustedKeys), "{err}");
}

#[test]
fn truncated_bundle_is_refused_wherever_it_stops() {
    let b = make_bundle(&key(1), "2.0.0", None, &payload(20_000, 6));
    let p = payload_offset(&b);
    for cut in [0, 5, 11, 12, 40, p - 64, p - 1, p, p + 1, p + 10_000, b.len() - 1] {
        let err = verify_stream(&b[..cut], &[key(1).verifying_key()]).expect_err("refused");
        assert!(
            matches!(err, BundleError::Truncated(_)),
            "cut at {cut}: {err} (expected a truncation error)"
        );
        assert!(err.to_string().contains("ends early"), "{err}");
    }
}

#[test]
fn data_after_the_payload_is_refused() {
    let mut b = make_bundle(&key(1), "2.0.0", None, &payload(1000, 7));
    b.push(0);
    let err = verify_stream(&b[..], &[key(1).verifying_key()]).expect_err("refused");
    assert!(matches!(err, BundleError::TrailingData { expected: 1000 }), "{err}");
}

#[test]
fn not_a_bundle_and_oversized_manifest_are_refused_before_reading_on() {
    let err = verify_stream(
        &b"MZ\x90\x00 this is a PE file, not a bundle"[..],
        &[key(1).verifying_key()],
    )
    .expect_err("refused");
    assert!(matches!(err, BundleError::BadMagic), "{err}");
    let mut huge = b"KEELBNDL".to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let err = verify_stream(&huge[..], &[key(1).verifying_key()]).expect_err("refused");
    assert!(matches!(err, BundleError::ManifestTooLarge(_)), "{err}");
}

/// A header signed by hand, so a manifest the writer would refuse can be tested.
fn hand_signed(json: &str, uki: &[u8]) -> Vec<u8> {
    let mut b = b"KEELBNDL".to_vec();
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json.as_bytes());
    let sig = key(1).sign(&b);
    b.extend_from_slice(&sig.to_bytes());
    b.extend_from_slice(uki);
    b
}

#[test]
fn signed_but_unusable_manifests_are_refused() {
    let uki = payload(100, 8);
    let sha = bundle::sha256_hex(&uki);
    let cases = [
        (
            format!(r#"{{"format":2,"os":"keel","version":"2.0","uki_sha256":"{sha}","uki_size":100,"created":0}}"#),
            "format 2",
        ),
        (
            format!(r#"{{"format":1,"os":"other","version":"2.0","uki_sha256":"{sha}","uki_size":100,"created":0}}"#),
            "not `keel`",
        ),
        (
            format!(r#"{{"format":1,"os":"keel","version":"2.0+3","uki_sha256":"{sha}","uki_size":100,"created":0}}"#),
            "version \"2.0+3\"",
        ),
        (
            r#"{"format":1,"os":"keel","version":"2.0","uki_sha256":"xyz","uki_size":100,"created":0}"#.to_owned(),
            "64 lower-case hex",
        ),
        (
            format!(
                r#"{{"format":1,"os":"keel","version":"2.0","uki_sha256":"{sha}","uki_size":100,"created":0,"extra":1}}"#
            ),
            "unknown field",
        ),
        ("not json".to_owned(), "expected"),
    ];
    for (json, expect) in cases {
        let b = hand_signed(&json, &uki);
        let err = verify_stream(&b[..], &[key(1).verifying_key()]).expect_err("refused");
        assert!(matches!(err, BundleError::BadManifest(_)), "{json}: {err}");
        assert!(err.to_string().contains(expect), "{json}: {err} (expected `{expect}`)");
    }
}
