//! The per-guest requests: detail, lifecycle actions (start, stop, reboot, reset,
//! pause, resume, destroy) with their waits, the console stream and the log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::http::{ApiError, Body, START_WAIT, STOP_SLACK, flag, json, number, seconds, text};
use super::{ApiContext, CONSOLE_PROTOCOL, GuestDetail};
use crate::guest::vmm_control::{self, Op};
use crate::guest::{AfterStop, DEFAULT_STOP_TIMEOUT, OpError, State};

pub(super) async fn guest_detail(ctx: &ApiContext, name: &str) -> Result<Response<Body>, ApiError> {
    let (status, socket) = {
        let sup = ctx.sup();
        let status = sup.status(name).ok_or_else(|| OpError::NoSuchGuest(name.into()))?;
        (status, sup.control_socket(name))
    };
    let stats = match socket {
        Some(s) => vmm_control::stats(&s).await.ok(),
        None => None,
    };
    Ok(json(StatusCode::OK, &GuestDetail { status, stats }))
}

/// Waits until `done` holds for the guest's state (`None`: the guest is gone) or
/// `timeout` passes. Returns whether it held.
pub(super) async fn wait_for(
    ctx: &ApiContext,
    name: &str,
    timeout: Duration,
    done: impl Fn(Option<&State>) -> bool,
) -> bool {
    let mut changes = ctx.sup().subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done(ctx.sup().state(name)) {
            return true;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return done(ctx.sup().state(name)),
        }
    }
}

pub(super) fn at_rest(s: Option<&State>) -> bool {
    !matches!(s, Some(State::Stopping { .. } | State::Starting { .. }))
}

pub(super) async fn guest_action(
    ctx: &ApiContext,
    name: &str,
    action: &str,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let timeout = match seconds(q, "timeout")? {
        Some(t) => t,
        None => ctx.sup().stop_timeout(name).unwrap_or(DEFAULT_STOP_TIMEOUT),
    };
    match action {
        "start" => {
            ctx.sup().start(name)?;
            wait_for(ctx, name, START_WAIT, at_rest).await;
        }
        "stop" if flag(q, "force") => hard_stop(ctx, name, AfterStop::Stop).await?,
        "destroy" => hard_stop(ctx, name, AfterStop::Stop).await?,
        "stop" => graceful(ctx, name, timeout, AfterStop::Stop).await?,
        "reboot" => graceful(ctx, name, timeout, AfterStop::Restart).await?,
        "reset" => hard_stop(ctx, name, AfterStop::Restart).await?,
        "pause" | "resume" => {
            let pause = action == "pause";
            let socket = ctx.sup().check_pausable(name, pause)?;
            vmm_control::request(&socket, if pause { Op::Pause } else { Op::Resume })
                .await
                .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
            ctx.sup().mark_paused(name, pause);
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no guest action `{other}`; use start, stop, reboot, reset, pause, resume or destroy"),
            ));
        }
    }
    let status = ctx.sup().status(name);
    match status {
        Some(s) => Ok(json(StatusCode::OK, &s)),
        None => Err(OpError::NoSuchGuest(name.into()).into()),
    }
}

async fn graceful(ctx: &ApiContext, name: &str, timeout: Duration, then: AfterStop) -> Result<(), ApiError> {
    let handle = ctx.sup().begin_stop(name, timeout, then)?;
    if let Some(h) = handle {
        // Bounded by the stop timeout: a VMM that does not answer its control socket
        // (frozen, stuck) is killed at the deadline, and the answer must not wait longer.
        if tokio::time::timeout(timeout, h.press_power_button()).await.is_err() {
            warn!(
                guest = name,
                "the power button press did not finish within the stop timeout"
            );
        }
    }
    wait_for(ctx, name, timeout + STOP_SLACK, at_rest).await;
    if then == AfterStop::Restart {
        wait_for(ctx, name, START_WAIT, at_rest).await;
    }
    Ok(())
}

async fn hard_stop(ctx: &ApiContext, name: &str, then: AfterStop) -> Result<(), ApiError> {
    ctx.sup().hard_stop(name, then)?;
    wait_for(ctx, name, STOP_SLACK, at_rest).await;
    if then == AfterStop::Restart {
        wait_for(ctx, name, START_WAIT, at_rest).await;
    }
    Ok(())
}

pub(super) fn console(
    ctx: &ApiContext,
    name: &str,
    q: &HashMap<String, String>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let hub = ctx
        .sup()
        .console(name)
        .ok_or_else(|| OpError::NoSuchGuest(name.into()))?;
    let wants_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    if !wants_upgrade {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!(
                "the console is a bidirectional stream: send `Connection: Upgrade` and `Upgrade: {CONSOLE_PROTOCOL}` (keelctl console does)"
            ),
        ));
    }
    let replay = number::<usize>(q, "replay")?.unwrap_or(0);
    let name = name.to_string();
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(upgraded) => attach_console(TokioIo::new(upgraded), hub, replay, &name).await,
            Err(e) => warn!(guest = name, "console upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, CONSOLE_PROTOCOL)
        .body(Full::new(Bytes::new()).boxed_unsync())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Copies guest output to the client and the client's keys to the guest until
/// the client hangs up.
async fn attach_console<IO>(mut io: IO, hub: Arc<crate::guest::console::ConsoleHub>, replay: usize, name: &str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    info!(guest = name, "console attached");
    let (history, mut rx) = hub.subscribe(replay);
    if io.write_all(&history).await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Ok(bytes) => if io.write_all(&bytes).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let note = format!("\r\n[keel: console output too fast, {n} chunks skipped]\r\n");
                    if io.write_all(note.as_bytes()).await.is_err() { break }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            input = io.read(&mut buf) => match input {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !hub.send_input(&buf[..n]) {
                        debug!(guest = name, "console input dropped: the guest is not running");
                    }
                }
            },
        }
    }
    info!(guest = name, "console detached");
}

pub(super) fn logs(ctx: &ApiContext, name: &str, q: &HashMap<String, String>) -> Result<Response<Body>, ApiError> {
    let hub = ctx
        .sup()
        .console(name)
        .ok_or_else(|| OpError::NoSuchGuest(name.into()))?;
    let lines = number::<usize>(q, "lines")?.unwrap_or(0);
    if !flag(q, "follow") {
        return Ok(text(StatusCode::OK, "text/plain; charset=utf-8", hub.tail_lines(lines)));
    }
    let (head, rx) = hub.tail_and_subscribe(lines);
    // The first chunk is the tail; then everything the guest writes, until the
    // client hangs up (hyper drops the body) or the guest is removed.
    let stream = futures::stream::unfold((Some(head), rx), |(head, mut rx)| async move {
        if let Some(h) = head {
            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(h))), (None, rx)));
        }
        loop {
            match rx.recv().await {
                Ok(b) => return Some((Ok(Frame::data(b)), (None, rx))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
