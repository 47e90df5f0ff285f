//! The API client `keelctl` uses: HTTP/1.1 over the unix socket, or over TCP with
//! a bearer token. One connection per request (the API is local or on a LAN, and
//! requests are few).

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use super::{CONSOLE_PROTOCOL, ErrorBody};

/// Where the API is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port` and the bearer token.
    Tcp {
        authority: String,
        token: String,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { authority, .. } => write!(f, "http://{authority}"),
        }
    }
}

impl Endpoint {
    /// From `--host http://HOST:PORT` (plain HTTP only).
    pub fn from_url(url: &str, token: String) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--host {url}: write http://HOST:PORT (the API speaks plain HTTP with a bearer token)")
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("--host {url}: write http://HOST:PORT without a path"));
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Endpoint::Tcp { authority, token })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Keel API at {endpoint}: {source}{}", hint(source))]
    Connect { endpoint: String, source: std::io::Error },
    #[error("talking to the Keel API: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The API answered with an error status.
    #[error("{}", body.error)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from the Keel API: {0}")]
    Decode(String),
}

/// How long reaching the API may take (TCP connect plus the HTTP handshake): an
/// endpoint that does not answer is reported rather than waited on forever.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::TimedOut => " (no answer within 10 s: check the address, the port and any firewall)",
        std::io::ErrorKind::PermissionDenied => " (the API socket is root-only: run keelctl as root)",
        std::io::ErrorKind::NotFound => " (is keel-init running? use --socket PATH or --host URL)",
        std::io::ErrorKind::ConnectionRefused => " (nothing listens there)",
        _ => "",
    }
}

type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Client { endpoint }
    }

    async fn connect<B>(&self) -> Result<Sender<B>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let err = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let connect = async {
            match &self.endpoint {
                Endpoint::Unix(path) => {
                    let s = UnixStream::connect(path).await.map_err(err)?;
                    handshake(TokioIo::new(s)).await
                }
                Endpoint::Tcp { authority, .. } => {
                    let s = TcpStream::connect(authority).await.map_err(err)?;
                    handshake(TokioIo::new(s)).await
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(err(std::io::ErrorKind::TimedOut.into())),
        }
    }

    fn builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut b = Request::builder().method(method).uri(path);
        match &self.endpoint {
            Endpoint::Unix(_) => b = b.header(HOST, "keel"),
            Endpoint::Tcp { authority, token } => {
                b = b.header(HOST, authority.as_str());
                b = b.header(AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        b
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Response<Incoming>, ClientError> {
        let mut sender = self.connect::<Full<Bytes>>().await?;
        let mut b = self.builder(method, path);
        let data = match body {
            Some((content_type, data)) => {
                b = b.header(CONTENT_TYPE, content_type);
                data
            }
            None => Vec::new(),
        };
        let resp = sender.send_request(b.body(Full::new(Bytes::from(data)))?).await?;
        if resp.status().is_success() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            Ok(resp)
        } else {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
                details: Vec::new(),
            });
            Err(ClientError::Api { status, body })
        }
    }

    /// Sends a request whose body is streamed (an update bundle) and returns the response.
    pub async fn send_streaming<B>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: B,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut sender = self.connect::<B>().await?;
        let req = self
            .builder(method, path)
            .header(CONTENT_TYPE, content_type)
            .body(body)?;
        let resp = sender.send_request(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            details: Vec::new(),
        });
        Err(ClientError::Api { status, body })
    }

    /// A request whose whole answer is wanted.
    pub async fn call(&self, method: Method, path: &str, body: Option<(&str, Vec<u8>)>) -> Result<Bytes, ClientError> {
        let resp = self.send(method, path, body).await?;
        Ok(resp.into_body().collect().await?.to_bytes())
    }

    /// A request whose JSON answer is decoded into `T`.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<T, ClientError> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Opens a guest's console: an upgraded connection carrying raw bytes both ways.
    pub async fn console(&self, guest: &str, replay: usize) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let mut sender = self.connect::<Empty<Bytes>>().await?;
        let req = self
            .builder(Method::GET, &format!("/v1/guests/{guest}/console?replay={replay}"))
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, CONSOLE_PROTOCOL)
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                error: format!("HTTP {status}"),
                details: Vec::new(),
            });
            return Err(ClientError::Api { status, body });
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
    }
}

async fn handshake<IO, B>(io: TokioIo<IO>) -> Result<Sender<B>, ClientError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_urls() {
        match Endpoint::from_url("http://10.0.0.2:8080/", "t".into()).unwrap() {
            Endpoint::Tcp { authority, token } => {
                assert_eq!((authority.as_str(), token.as_str()), ("10.0.0.2:8080", "t"))
            }
            other => panic!("{other:?}"),
        }
        assert!(Endpoint::from_url("https://x:1", "t".into()).is_err());
        assert!(Endpoint::from_url("http://x:1/v1", "t".into()).is_err());
    }
}
