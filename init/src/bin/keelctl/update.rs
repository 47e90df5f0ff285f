//! `keelctl update FILE|URL` and `keelctl rollback`.
//!
//! The bundle is streamed, never held whole: a reader thread reads the file (or
//! downloads the URL) in chunks, drives the progress bar and hands the chunks to
//! the upload; the appliance verifies while it receives and writes nothing final
//! unless the whole bundle checks out. A download is not trusted for being HTTPS:
//! the appliance checks the signature either way.

use std::io::Read;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::Method;
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_init::api::client::Client;
use keel_init::api::update::{RollbackResult, UpdateResult};

/// Read size of the reader thread.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the reader thread and the upload.
const DEPTH: usize = 8;

/// Where a bundle comes from.
enum Source {
    File(std::path::PathBuf),
    Url(String),
}

impl Source {
    fn parse(s: &str) -> Source {
        if s.starts_with("http://") || s.starts_with("https://") {
            Source::Url(s.to_owned())
        } else {
            Source::File(s.into())
        }
    }

    /// Opens the bundle: a reader and its size when known.
    fn open(&self) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>)> {
        use anyhow::Context;
        match self {
            Source::File(path) => {
                let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
                let len = f.metadata().ok().map(|m| m.len());
                Ok((Box::new(f), len))
            }
            Source::Url(url) => {
                let resp = ureq::get(url).call().with_context(|| format!("downloading {url}"))?;
                let len = resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
                Ok((Box::new(reader), len))
            }
        }
    }
}

fn progress_bar(len: Option<u64>) -> ProgressBar {
    // Drawn on stderr only when it is a terminal.
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let template = if len.is_some() {
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}"
    } else {
        "{spinner} {bytes} {bytes_per_sec} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

pub async fn update(
    client: &Client,
    source: &str,
    reboot: bool,
    allow_downgrade: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let source = Source::parse(source);
    let (mut reader, len) = tokio::task::spawn_blocking({
        let src = match &source {
            Source::File(p) => Source::File(p.clone()),
            Source::Url(u) => Source::Url(u.clone()),
        };
        move || src.open()
    })
    .await??;
    let bar = progress_bar(len);
    bar.set_message("uploading and verifying");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let reader_bar = bar.clone();
    let reader_thread = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let chunk = match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    reader_bar.inc(n as u64);
                    Ok(Bytes::copy_from_slice(&buf[..n]))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(|c| c.map(Frame::data))));
    let body = StreamBody::new(stream).boxed();
    let query = format!(
        "/v1/update?allow_downgrade={}&reboot={}",
        u8::from(allow_downgrade),
        u8::from(reboot)
    );
    let answer = client
        .send_streaming(Method::POST, &query, "application/vnd.keel.bundle", body)
        .await;
    bar.finish_and_clear();
    let _ = reader_thread.join();
    let bytes = answer?.into_body().collect().await?.to_bytes();
    let result: UpdateResult = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let i = &result.installed;
        println!(
            "installed Keel {} as {} ({:.1} MiB, sha256 {})",
            i.version,
            i.file,
            i.size as f64 / 1048576.0,
            i.sha256
        );
        for r in &i.removed {
            println!("  removed {r}");
        }
        if let Some(d) = &i.demoted {
            println!(
                "  downgrade: the running version is now {d} (boots only if {} fails)",
                i.version
            );
        }
        if result.rebooting {
            println!(
                "rebooting into {} now; it is blessed once healthy, or rolled back after 3 tries",
                i.version
            );
        } else {
            println!(
                "reboot to start it (`keelctl update --reboot` does); it is blessed once healthy, or rolled back after 3 tries"
            );
        }
    }
    Ok(0)
}

pub async fn rollback(client: &Client, reboot: bool, json: bool) -> anyhow::Result<u8> {
    let r: RollbackResult = client
        .json(Method::POST, &format!("/v1/rollback?reboot={}", u8::from(reboot)), None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let rb = &r.rolled_back;
        println!("Keel {} boots next (running: {})", rb.to, rb.from);
        for x in &rb.renamed {
            println!("  renamed {} → {}", x.from, x.to);
        }
        for x in &rb.removed {
            println!("  removed {x}");
        }
        if r.rebooting {
            println!("rebooting now");
        } else {
            println!("reboot to start it (`keelctl rollback --reboot` does)");
        }
    }
    Ok(0)
}
