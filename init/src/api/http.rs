//! What the API's handlers share: the body type, the error answer, JSON and text
//! responses, query-string parsing and the waits. A leaf below the server and the
//! per-guest handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

use super::ErrorBody;
use crate::guest::OpError;

pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long `start` waits for the VMM to come up before answering.
pub(super) const START_WAIT: Duration = Duration::from_secs(15);
/// Extra time, past a stop's own timeout, allowed for the kill and the reaping.
pub(super) const STOP_SLACK: Duration = Duration::from_secs(8);

/// An error answer.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) body: ErrorBody,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: msg.into(),
                details: Vec::new(),
            },
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match e {
            OpError::NoSuchGuest(_) => StatusCode::NOT_FOUND,
            OpError::WrongState { .. } | OpError::Blocked { .. } => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.to_string())
    }
}

pub(super) fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    text(
        status,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

pub(super) fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

pub(super) fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key)
        .is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "yes"))
}

pub(super) fn number<T: std::str::FromStr>(q: &HashMap<String, String>, key: &str) -> Result<Option<T>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("query `{key}={v}`: expected a number")))
        })
        .transpose()
}

pub(super) fn seconds(q: &HashMap<String, String>, key: &str) -> Result<Option<Duration>, ApiError> {
    match number::<f64>(q, key)? {
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("query `{key}`: expected seconds, 0 or more"),
        )),
        None => Ok(None),
    }
}
