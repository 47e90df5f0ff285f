//! The volume endpoints, each naming the volume in the query (`name=POOL/PATH`, which
//! has slashes of its own): `GET /v1/volumes`, `POST /v1/volumes?name=&size=`,
//! `POST /v1/volumes/resize?name=&size=`, `POST /v1/volumes/clone?name=&to=`,
//! `DELETE /v1/volumes?name=[&force=1]`.

use std::collections::HashMap;

use hyper::StatusCode;

use super::ApiContext;
use super::http::{ApiError, flag};
use crate::config::{ByteSize, Config, PoolPath};
use crate::storage::volume_admin::{self, VolumeAdminError, VolumeInfo};

impl From<VolumeAdminError> for ApiError {
    fn from(e: VolumeAdminError) -> Self {
        use VolumeAdminError::*;
        let status = match &e {
            UnknownPool(_) | Bad(_) | Shrink { .. } => StatusCode::BAD_REQUEST,
            NotFound(_) => StatusCode::NOT_FOUND,
            Exists(_) | InUse { .. } | Open { .. } => StatusCode::CONFLICT,
            Storage(crate::storage::StorageError::NoSpace { .. } | crate::storage::StorageError::PoolCap { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

fn config(ctx: &ApiContext) -> Result<Config, ApiError> {
    ctx.applied().as_ref().map(|a| a.config.clone()).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no config has been applied, so no pools are declared",
        )
    })
}

fn pool_path(q: &HashMap<String, String>, key: &str) -> Result<PoolPath, ApiError> {
    let v = q
        .get(key)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("query `{key}=POOL/NAME` is missing")))?;
    v.parse().map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))
}

fn size(q: &HashMap<String, String>) -> Result<u64, ApiError> {
    let v = q
        .get("size")
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "query `size=` is missing (e.g. 20GiB)"))?;
    v.parse::<ByteSize>()
        .map(|b| b.0)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("size `{v}`: {e}")))
}

pub(super) fn list(ctx: &ApiContext) -> Result<Vec<VolumeInfo>, ApiError> {
    Ok(volume_admin::list(&config(ctx)?, &ctx.data_root))
}

/// Runs a storage operation off the async threads (a sparse copy can take a while).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeAdminError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the volume task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

pub(super) async fn action(
    ctx: &ApiContext,
    action: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<VolumeInfo, ApiError> {
    let cfg = config(ctx)?;
    let root = ctx.data_root.clone();
    let v = pool_path(q, "name")?;
    match action {
        None => {
            let size = size(q)?;
            blocking(move || volume_admin::create(&cfg, &root, &v, size, None)).await
        }
        Some("resize") => {
            let size = size(q)?;
            blocking(move || volume_admin::resize(&cfg, &root, &v, size)).await
        }
        Some("clone") => {
            let to = pool_path(q, "to")?;
            blocking(move || volume_admin::clone_volume(&cfg, &root, &v, &to)).await
        }
        Some(other) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no volume action `{other}` (resize, clone)"),
        )),
    }
}

pub(super) fn remove(ctx: &ApiContext, q: &HashMap<String, String>) -> Result<VolumeInfo, ApiError> {
    let cfg = config(ctx)?;
    let v = pool_path(q, "name")?;
    let sup = ctx.sup();
    let active = |g: &str| sup.state(g).is_some_and(|s| s.is_active());
    Ok(volume_admin::remove(
        &cfg,
        &ctx.data_root,
        &v,
        flag(q, "force"),
        active,
    )?)
}
