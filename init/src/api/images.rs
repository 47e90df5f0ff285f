//! The image endpoints: `PUT /v1/images/NAME[?pool=P][&sha256=HEX]` (the body is the
//! image file, raw or qcow2, streamed into `storage::image::import`),
//! `GET /v1/images` and `DELETE /v1/images/NAME[?pool=P]`.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use hyper::StatusCode;

use super::ApiContext;
use super::http::ApiError;
use crate::storage::image::{self, ImageError, ImageInfo, ImportRequest};
use crate::storage::{self, pool};

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        use ImageError::*;
        let status = match &e {
            BadName(_) | BadChecksumArg(_) | PoolNeeded(_) | UnknownPool(_) | Interrupted { .. } => {
                StatusCode::BAD_REQUEST
            }
            Exists(_) | Busy(_) => StatusCode::CONFLICT,
            NotFound(_) => StatusCode::NOT_FOUND,
            Checksum { .. } | BadQcow2(_) | BackingFile(_) | Unsupported(_) | TooLarge { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The declared pools (name, directory, cap).
fn pools(ctx: &ApiContext) -> Vec<(String, PathBuf, Option<u64>)> {
    ctx.applied()
        .as_ref()
        .map(|a| {
            a.config
                .storage
                .pools
                .iter()
                .map(|p| {
                    let dir = pool::dir(&ctx.data_root, &p.name);
                    (p.name.value.clone(), dir, p.size.as_ref().map(|s| s.bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pool `?pool=` names, or the only one declared.
fn pick_pool(ctx: &ApiContext, q: &HashMap<String, String>) -> Result<(String, PathBuf, Option<u64>), ImageError> {
    let all: Vec<_> = pools(ctx).into_iter().filter(|(_, dir, _)| dir.is_dir()).collect();
    match q.get("pool").filter(|p| !p.is_empty()) {
        Some(name) => all
            .into_iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| ImageError::UnknownPool(name.clone())),
        None if all.len() == 1 => Ok(all.into_iter().next().expect("one pool")),
        None if all.is_empty() => Err(ImageError::UnknownPool("(none declared)".into())),
        None => Err(ImageError::PoolNeeded(
            all.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", "),
        )),
    }
}

/// What an import may allocate in the pool: the free space of KEEL-DATA, and under
/// the pool's cap what the cap leaves.
fn budget(dir: &std::path::Path, cap: Option<u64>) -> Result<u64, ImageError> {
    let to_image = |e: storage::StorageError| ImageError::Io {
        path: dir.to_owned(),
        op: "measure free space",
        source: std::io::Error::other(e.to_string()),
    };
    let free = pool::available(dir).map_err(to_image)?;
    Ok(match cap {
        Some(cap) => free.min(cap.saturating_sub(pool::allocated(dir).map_err(to_image)?)),
        None => free,
    })
}

pub(super) async fn import<B>(
    ctx: &ApiContext,
    name: &str,
    q: &HashMap<String, String>,
    body: B,
) -> Result<ImageInfo, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    image::check_name(name)?;
    let (pool, dir, cap) = pick_pool(ctx, q)?;
    let budget = budget(&dir, cap)?;
    let req = ImportRequest {
        name: name.to_owned(),
        sha256: q.get("sha256").cloned(),
    };
    tracing::info!(image = name, pool = pool.as_str(), budget, "image import started");
    let result = super::upload::into_blocking(body, move |reader| image::import(&pool, &dir, budget, &req, reader))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the import task failed: {e}"),
            )
        })?;
    if let Err(e) = &result {
        tracing::warn!(image = name, "image import refused: {e}");
    }
    Ok(result?)
}

pub(super) fn list(ctx: &ApiContext) -> Vec<ImageInfo> {
    let pools: Vec<(String, PathBuf)> = pools(ctx).into_iter().map(|(n, d, _)| (n, d)).collect();
    image::list(&pools)
}

pub(super) fn remove(ctx: &ApiContext, name: &str, q: &HashMap<String, String>) -> Result<ImageInfo, ApiError> {
    let (pool, dir, _) = pick_pool(ctx, q)?;
    let info = image::list(&[(pool, dir.clone())])
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| ImageError::NotFound(name.to_owned()))?;
    image::remove(&dir, name)?;
    tracing::info!(image = name, pool = info.pool.as_str(), "image removed");
    Ok(info)
}
