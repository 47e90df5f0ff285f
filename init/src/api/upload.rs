//! A request body handed to blocking code as a `Read`: update bundles and disk images
//! are written with blocking file I/O (fsyncs, sparse writes), so the consumer runs on
//! a blocking thread and reads the body through a small channel. The body is never
//! held in memory whole, and a slow disk slows the upload down instead of buffering.

use std::io::Read;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;

/// Chunks in flight between the connection and the consumer.
const CHANNEL_DEPTH: usize = 8;

/// A blocking `Read` over the chunks the connection task sends.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Runs `consume` on a blocking thread with the body as its reader, and feeds it.
/// A body that breaks off reaches the reader as an error. When `consume` stops
/// reading early (it refused the input), the rest of the body is still read, so the
/// client sees the answer instead of a reset connection.
pub async fn into_blocking<B, T, F>(mut body: B, consume: F) -> Result<T, tokio::task::JoinError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    F: FnOnce(ChannelReader) -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_DEPTH);
    let consumer = tokio::task::spawn_blocking(move || {
        consume(ChannelReader {
            rx,
            current: Bytes::new(),
        })
    });
    while let Some(frame) = body.frame().await {
        let chunk = match frame {
            Ok(f) => match f.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue, // trailers
            },
            Err(e) => Err(std::io::Error::other(format!("the upload broke off: {e}"))),
        };
        let failed = chunk.is_err();
        if tx.send(chunk).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    while let Some(Ok(_)) = body.frame().await {}
    consumer.await
}
