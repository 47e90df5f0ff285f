//! The API's update handlers with a real agent on a temporary ESP: the bundle is
//! streamed in chunks through the handler into the installer; refusals map to
//! HTTP statuses and leave the ESP as it was.

#[path = "update_support/mod.rs"]
mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::StatusCode;
use hyper::body::Frame;
use keel_init::api::update;
use keel_init::update::Agent;
use support::{Esp, key, make_bundle, payload, payload_offset};

fn agent(esp: &Esp, running: &str) -> Option<Arc<Agent>> {
    Some(Arc::new(Agent::new(
        esp.root(),
        esp.efivars.clone(),
        running.into(),
        vec![key(1).verifying_key()],
    )))
}

type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// The bytes as a body of 64 KiB frames, optionally failing after `fail_after` frames.
fn body(bytes: &[u8], fail_after: Option<usize>) -> StreamBody<futures::stream::Iter<std::vec::IntoIter<Chunk>>> {
    let mut frames: Vec<Chunk> = bytes
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    if let Some(n) = fail_after {
        frames.truncate(n);
        frames.push(Err(std::io::Error::other("client went away")));
    }
    StreamBody::new(futures::stream::iter(frames))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_bundle_is_installed() {
    let esp = Esp::new(&["keel-1.0.0.efi"]);
    let uki = payload(1_000_000, 1);
    let b = make_bundle(&key(1), "1.1.0", None, &uki);
    let r = update::install(agent(&esp, "1.0.0"), body(&b, None), false, false)
        .await
        .expect("installed");
    assert_eq!(r.installed.file, "EFI/Linux/keel-1.1.0+3.efi");
    assert!(!r.rebooting);
    assert_eq!(std::fs::read(esp.linux().join("keel-1.1.0+3.efi")).expect("read"), uki);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_map_to_statuses_and_write_nothing() {
    let uki = payload(300_000, 2);
    let good = make_bundle(&key(1), "1.1.0", None, &uki);
    let mut tampered = good.clone();
    tampered[payload_offset(&good) + 5] ^= 1;
    let cases: Vec<(&str, Vec<u8>, Option<usize>, StatusCode)> = vec![
        ("tampered", tampered, None, StatusCode::UNPROCESSABLE_ENTITY),
        (
            "wrong key",
            make_bundle(&key(2), "1.1.0", None, &uki),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "downgrade",
            make_bundle(&key(1), "0.9.0", None, &uki),
            None,
            StatusCode::CONFLICT,
        ),
        ("upload broke off", good.clone(), Some(3), StatusCode::BAD_REQUEST),
    ];
    for (what, bundle, fail_after, status) in cases {
        let esp = Esp::new(&["keel-1.0.0.efi"]);
        let before = esp.snapshot();
        let err = update::install(agent(&esp, "1.0.0"), body(&bundle, fail_after), false, false)
            .await
            .expect_err(what);
        assert_eq!(err.status, status, "{what}: {}", err.message);
        assert_eq!(esp.snapshot(), before, "{what}: the ESP changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_updates_are_unavailable() {
    let b = make_bundle(&key(1), "1.1.0", None, &payload(100, 3));
    let err = update::install(None, body(&b, None), false, false)
        .await
        .expect_err("no agent");
    assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
    let err = update::rollback(None, false).await.expect_err("no agent");
    assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_through_the_handler() {
    let esp = Esp::new(&["keel-1.1.0.efi", "keel-1.0.0.efi"]);
    let r = update::rollback(agent(&esp, "1.1.0"), false)
        .await
        .expect("rolled back");
    assert_eq!(r.rolled_back.to, "1.0.0");
    assert_eq!(esp.boots_next(), "keel-1.0.0.efi");
    let esp = Esp::new(&["keel-1.0.0.efi"]);
    let err = update::rollback(agent(&esp, "1.0.0"), false)
        .await
        .expect_err("nothing older");
    assert_eq!(err.status, StatusCode::CONFLICT);
}
