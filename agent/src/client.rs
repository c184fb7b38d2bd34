//! A small HTTP/1.1 client (hyper) for the agent's APIs: the local one on a unix socket (used by
//! `ferry`) and the peer one on TCP (used by `ferryd` to reach another agent).

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Where an API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A unix socket (the local API).
    Unix(PathBuf),
    /// A TCP address (a peer agent).
    Tcp(String),
    /// A TCP address spoken to over TLS (a peer agent with host certificates): the client
    /// configuration (this host's certificate, the CA, the name the peer must carry).
    Tls {
        /// The address.
        addr: String,
        /// The client configuration.
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
        /// The server name sent (SNI).
        name: tokio_rustls::rustls::pki_types::ServerName<'static>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) | Endpoint::Tls { addr: a, .. } => f.write_str(a),
        }
    }
}

/// Errors reaching an API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot connect.
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificates refused on either side).
    #[error("{} {endpoint}: {message}", TLS_FAILED)]
    Tls {
        /// Where.
        endpoint: String,
        /// Why (names the certificate problem).
        message: String,
    },
    /// The HTTP exchange failed.
    #[error("talking to {endpoint}: {message}")]
    Http {
        /// Where.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// No answer in time.
    #[error("{endpoint} did not answer within {after:?}")]
    Timeout {
        /// Where.
        endpoint: String,
        /// How long we waited.
        after: Duration,
    },
}

/// How a [`ClientError::Tls`] starts (callers tell certificate refusals by it).
pub const TLS_FAILED: &str = "TLS failed with";

/// Largest answer body read.
const MAX_BODY_BYTES: usize = 16 << 20;

/// One request: `(status, body)`.
pub async fn request(
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let endpoint = ep.to_string();
    tokio::time::timeout(timeout, request_inner(ep, method, path, body, headers))
        .await
        .map_err(|_| ClientError::Timeout { endpoint, after: timeout })?
}

async fn request_inner(
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, String)],
) -> Result<(u16, Vec<u8>), ClientError> {
    let endpoint = ep.to_string();
    let connect = |source| ClientError::Connect { endpoint: endpoint.clone(), source };
    match ep {
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
            exchange(TokioIo::new(s), &endpoint, "localhost", method, path, body, headers).await
        }
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a.as_str()).await.map_err(connect)?;
            let _ = s.set_nodelay(true);
            exchange(TokioIo::new(s), &endpoint, a, method, path, body, headers).await
        }
        Endpoint::Tls { addr, config, name } => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await.map_err(connect)?;
            let _ = s.set_nodelay(true);
            let tls = |e: &dyn std::error::Error| ClientError::Tls {
                endpoint: endpoint.clone(),
                message: crate::peer::tls_reason(e),
            };
            let s =
                tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), s).await.map_err(|e| tls(&e))?;
            // In TLS 1.3 the server judges the client's certificate after the client finished:
            // a refusal arrives as an alert on the first read, so it is told as a TLS failure.
            exchange(TokioIo::new(s), &endpoint, addr, method, path, body, headers).await.map_err(|e| match e {
                ClientError::Http { endpoint, message } if message.contains("alert") => {
                    ClientError::Tls { endpoint, message }
                }
                e => e,
            })
        }
    }
}

async fn exchange<T>(
    io: TokioIo<T>,
    endpoint: &str,
    host: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, String)],
) -> Result<(u16, Vec<u8>), ClientError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: &dyn std::error::Error| ClientError::Http {
        endpoint: endpoint.to_string(),
        message: crate::peer::tls_reason(e),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let mut b = hyper::Request::builder().method(method).uri(path).header("host", host);
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    let status = resp.status().as_u16();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_BODY_BYTES);
    let bytes = limited.collect().await.map_err(|e| http(&*e))?.to_bytes();
    Ok((status, bytes.to_vec()))
}
