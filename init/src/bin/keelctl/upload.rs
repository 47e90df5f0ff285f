//! Streaming a file or a download to the API with a progress bar: `keelctl update`
//! (bundles) and `keelctl image import` (disk images).
//!
//! Nothing is held whole: a reader thread reads the file (or downloads the URL) in
//! chunks, drives the progress bar (bytes, rate, ETA; on stderr, only when it is a
//! terminal) and hands the chunks to the upload.

use std::io::Read;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::Method;
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_init::api::client::Client;

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
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
    } else {
        "{spinner} {bytes} {bytes_per_sec} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Sends `source` (a path, or an http(s) URL downloaded on the way) as the body of
/// `method path` and returns the answer's body.
pub async fn upload(
    client: &Client,
    method: Method,
    path: &str,
    content_type: &str,
    source: &str,
    message: &'static str,
) -> anyhow::Result<Bytes> {
    let source = Source::parse(source);
    let (mut reader, len) = tokio::task::spawn_blocking(move || source.open()).await??;
    let bar = progress_bar(len);
    bar.set_message(message);
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
    let answer = client.send_streaming(method, path, content_type, body).await;
    bar.finish_and_clear();
    let _ = reader_thread.join();
    Ok(answer?.into_body().collect().await?.to_bytes())
}
