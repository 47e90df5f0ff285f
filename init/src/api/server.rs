//! Listeners, authentication, routing and the request handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use super::http::{ApiError, Body, STOP_SLACK, flag, json, seconds, text};
use super::{ApiContext, AppliedConfig, ApplyResult, ErrorBody, config_store, host, metrics, plan};
use super::{guests, images, volumes};
use crate::guest::vmm_control;
use crate::guest::{DEFAULT_STOP_TIMEOUT, StopHandle};

/// Largest config accepted by `POST /v1/config`.
const MAX_BODY: usize = 1 << 20;

/// Who is on the other end of a connection.
#[derive(Clone)]
enum Access {
    Allowed,
    /// Refused for every request, with this reason (a non-root unix peer).
    Forbidden(String),
    /// TCP: each request must carry this bearer token.
    Token(Arc<String>),
}

/// Serves the API on a unix socket: created mode 0600, replacing a stale file;
/// only peers with uid 0 (SO_PEERCRED) are served.
pub async fn serve_unix(ctx: Arc<ApiContext>, path: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!("control API listening on {}", path.display());
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let access = match stream.peer_cred() {
                Ok(c) if c.uid() == 0 => Access::Allowed,
                Ok(c) => {
                    warn!(uid = c.uid(), pid = ?c.pid(), "control API: refusing a non-root client");
                    Access::Forbidden(format!(
                        "the Keel API accepts only root (your uid is {}); run keelctl as root",
                        c.uid()
                    ))
                }
                Err(e) => Access::Forbidden(format!("cannot identify the client: {e}")),
            };
            tokio::spawn(serve_connection(TokioIo::new(stream), ctx.clone(), access));
        }
    }))
}

/// Serves the API on TCP with a bearer token (plain HTTP: put it on a management
/// network, or behind a TLS proxy).
pub async fn serve_tcp(
    ctx: Arc<ApiContext>,
    addr: SocketAddr,
    token: String,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    info!("control API listening on tcp {addr} (bearer token required)");
    let token = Arc::new(token);
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, peer)) => {
                    debug!(%peer, "control API tcp client");
                    tokio::spawn(serve_connection(
                        TokioIo::new(s),
                        ctx.clone(),
                        Access::Token(token.clone()),
                    ));
                }
                Err(e) => {
                    warn!("control API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn serve_connection<IO>(io: TokioIo<IO>, ctx: Arc<ApiContext>, access: Access)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let access = access.clone();
        async move { Ok::<_, Infallible>(handle(ctx, access, req).await) }
    });
    // A client that does not finish its request headers in time is dropped, so
    // idle or half-open TCP connections cannot pile up.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(io, service)
        .with_upgrades()
        .await
    {
        debug!("control API connection ended: {e}");
    }
}

fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn handle(ctx: Arc<ApiContext>, access: Access, req: Request<Incoming>) -> Response<Body> {
    match &access {
        Access::Allowed => {}
        Access::Forbidden(why) => return json(StatusCode::FORBIDDEN, &ApiError::new(StatusCode::FORBIDDEN, why).body),
        Access::Token(expected) => {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !token_matches(given.as_bytes(), expected.as_bytes()) {
                let e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (keelctl --token or KEEL_TOKEN)",
                );
                return json(e.status, &e.body);
            }
        }
    }
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = match route(ctx, req).await {
        Ok(r) => r,
        Err(e) => json(e.status, &e.body),
    };
    debug!(%method, path, status = response.status().as_u16(), elapsed = ?started.elapsed(), "API request");
    response
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

async fn route(ctx: Arc<ApiContext>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').collect();
    let q = query(&req);
    let method = req.method().clone();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["metrics"]) => Ok(text(StatusCode::OK, metrics::CONTENT_TYPE, render_metrics(&ctx).await)),
        (&Method::GET, ["v1", "guests"]) => Ok(json(StatusCode::OK, &ctx.sup().statuses())),
        (&Method::GET, ["v1", "guests", name]) => guests::guest_detail(&ctx, name).await,
        (&Method::GET, ["v1", "guests", name, "console"]) => guests::console(&ctx, name, &q, req),
        (&Method::GET, ["v1", "guests", name, "logs"]) => guests::logs(&ctx, name, &q),
        (&Method::POST, ["v1", "guests", name, action]) => guests::guest_action(&ctx, name, action, &q).await,
        (&Method::GET, ["v1", "config"]) => match &*ctx.applied() {
            Some(a) => Ok(text(StatusCode::OK, "application/yaml", a.text.clone())),
            None => Err(ApiError::new(StatusCode::NOT_FOUND, "no config has been applied")),
        },
        (&Method::POST, ["v1", "config"]) => apply(&ctx, &q, req).await,
        (&Method::GET, ["v1", "host"]) => {
            let cfg = ctx.applied().as_ref().map(|a| a.config.clone());
            let info = host::collect(
                cfg.as_ref(),
                &ctx.esp_dir,
                &ctx.os_release,
                &ctx.data_root,
                Duration::from_millis(200),
            )
            .await;
            Ok(json(StatusCode::OK, &info))
        }
        (&Method::POST, ["v1", "update"]) => super::update::install(
            ctx.update.clone(),
            req.into_body(),
            flag(&q, "allow_downgrade"),
            flag(&q, "reboot"),
        )
        .await
        .map(|r| json(StatusCode::OK, &r))
        .map_err(|e| ApiError::new(e.status, e.message)),
        (&Method::GET, ["v1", "images"]) => Ok(json(StatusCode::OK, &images::list(&ctx))),
        (&Method::PUT, ["v1", "images", name]) => images::import(&ctx, name, &q, req.into_body())
            .await
            .map(|i| json(StatusCode::CREATED, &i)),
        (&Method::DELETE, ["v1", "images", name]) => images::remove(&ctx, name, &q).map(|i| json(StatusCode::OK, &i)),
        (&Method::GET, ["v1", "volumes"]) => volumes::list(&ctx).map(|v| json(StatusCode::OK, &v)),
        (&Method::POST, ["v1", "volumes"]) => volumes::action(&ctx, None, &q)
            .await
            .map(|v| json(StatusCode::CREATED, &v)),
        (&Method::POST, ["v1", "volumes", action]) => volumes::action(&ctx, Some(action), &q)
            .await
            .map(|v| json(StatusCode::OK, &v)),
        (&Method::DELETE, ["v1", "volumes"]) => volumes::remove(&ctx, &q).map(|v| json(StatusCode::OK, &v)),
        (&Method::POST, ["v1", "rollback"]) => super::update::rollback(ctx.update.clone(), flag(&q, "reboot"))
            .await
            .map(|r| json(StatusCode::OK, &r))
            .map_err(|e| ApiError::new(e.status, e.message)),
        (
            _,
            ["v1", "guests" | "images" | "volumes", ..]
            | ["v1", "config"]
            | ["v1", "host"]
            | ["metrics"]
            | ["v1", "update" | "rollback"],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on /{path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such API path: /{path}"),
        )),
    }
}

async fn apply(
    ctx: &ApiContext,
    q: &HashMap<String, String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let dry_run = flag(q, "dry_run");
    let stop_timeout = seconds(q, "stop_timeout")?.unwrap_or(DEFAULT_STOP_TIMEOUT);
    let file = q.get("file").cloned().unwrap_or_else(|| "keel.yaml".into());
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the config: {e}")))?
        .to_bytes();
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{file}: not UTF-8 text")))?;
    let loaded = crate::config::parse_str(&text).map_err(|d| ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: ErrorBody {
            error: format!("{file} is not a valid Keel config; nothing was changed"),
            details: d.render(&file).lines().map(String::from).collect(),
        },
    })?;
    let warnings: Vec<String> = loaded.warnings.render(&file).lines().map(String::from).collect();

    let _one_at_a_time = ctx.apply_lock.lock().await;
    let old = ctx.applied().as_ref().map(|a| a.config.clone());
    let plan = {
        let sup = ctx.sup();
        plan::compute(old.as_ref(), &loaded.config, |n| {
            sup.state(n).is_some_and(|s| s.is_active())
        })
    };
    if dry_run {
        let guests = ctx.sup().statuses();
        return Ok(json(
            StatusCode::OK,
            &ApplyResult {
                plan,
                applied: false,
                warnings,
                host_errors: Vec::new(),
                guests,
            },
        ));
    }

    // Persist first: if this fails nothing has changed, and once it succeeds a
    // reboot at any point comes up with the new config.
    config_store::write(&ctx.config_dir, &text)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}; nothing was changed")))?;
    let config = loaded.config;
    *ctx.applied() = Some(AppliedConfig {
        config: config.clone(),
        text,
    });
    info!(
        "config applied: {}",
        plan.guests
            .iter()
            .filter(|g| g.action != plan::GuestAction::Unchanged)
            .map(|g| format!("{} {}", g.action.as_str(), g.guest))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let host_errors = (ctx.host_reconcile)(config.clone()).await;

    let mut stops: Vec<StopHandle> = Vec::new();
    let affected: Vec<String> = plan
        .guests
        .iter()
        .filter(|g| g.action != plan::GuestAction::Unchanged)
        .map(|g| g.guest.clone())
        .collect();
    for g in &plan.guests {
        let Some(spec) = config.guests.iter().find(|s| s.name.value == g.guest).cloned() else {
            if g.action == plan::GuestAction::Remove {
                stops.extend(ctx.sup().remove_guest(&g.guest, stop_timeout));
            }
            continue;
        };
        // Taps and blockers first (async), then the supervisor (sync, locked).
        match g.action {
            plan::GuestAction::Start | plan::GuestAction::Add => {
                let prepared = (ctx.prepare_guest)(spec.clone()).await;
                ctx.sup().add_guest(spec, prepared);
            }
            plan::GuestAction::Restart => {
                let prepared = (ctx.prepare_guest)(spec.clone()).await;
                stops.extend(ctx.sup().replace_and_restart(spec, prepared, stop_timeout));
            }
            plan::GuestAction::Update if g.affects_vm() => {
                // Not running: the new settings (and taps) are used at its next start.
                let prepared = (ctx.prepare_guest)(spec.clone()).await;
                stops.extend(ctx.sup().replace_and_restart(spec, prepared, stop_timeout));
            }
            plan::GuestAction::Update => ctx.sup().update_spec(spec),
            plan::GuestAction::Remove | plan::GuestAction::Unchanged => {}
        }
    }
    futures::future::join_all(stops.iter().map(|h| h.press_power_button())).await;
    for name in &affected {
        guests::wait_for(ctx, name, stop_timeout + STOP_SLACK, guests::at_rest).await;
    }
    *ctx.config_applied_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let guests = ctx.sup().statuses();
    Ok(json(
        StatusCode::OK,
        &ApplyResult {
            plan,
            applied: true,
            warnings,
            host_errors,
            guests,
        },
    ))
}

async fn render_metrics(ctx: &ApiContext) -> String {
    let (statuses, sockets): (Vec<_>, Vec<_>) = {
        let sup = ctx.sup();
        sup.statuses()
            .into_iter()
            .map(|s| {
                let sock = sup.control_socket(&s.name);
                (s, sock)
            })
            .unzip()
    };
    let stats = futures::future::join_all(sockets.iter().map(|s| async move {
        match s {
            Some(s) => vmm_control::stats(s).await.ok(),
            None => None,
        }
    }))
    .await;
    let guests: Vec<_> = statuses.into_iter().zip(stats).collect();
    let cfg = ctx.applied().as_ref().map(|a| a.config.clone());
    let pools = host::pools(cfg.as_ref(), &ctx.data_root);
    let (memory_total, memory_available) = host::memory();
    metrics::render(&metrics::Snapshot {
        guests: &guests,
        cpu: host::CpuTimes::read(),
        memory_total,
        memory_available,
        uptime_secs: host::uptime_secs(),
        pools: &pools,
        version: env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret2", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }
}
