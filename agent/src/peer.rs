//! Peer requests between agents are signed with the key both hosts hold (the key file): header
//! `x-ferry-auth: <unix ms>:<hex HMAC-SHA256(key, "ferry-peer-v1\n" ms "\n" method "\n" path "\n" body)>`.
//! The receiver refuses a wrong signature and a time more than 60 s off its own clock; the key
//! itself never crosses the wire.
//!
//! With host certificates (`tls_dir`) the peer API runs over mutual TLS instead ([`TlsListener`]
//! on the server side, [`crate::client::Endpoint::Tls`] on the client side): a connection is
//! served only once its client presented a certificate chained to this host's CA and not
//! revoked, each request only if that certificate names the host the request claims to come
//! from (the source of the move it is about, [`Caller`]), and a caller accepts only a server
//! whose certificate chains to its CA and names the host it called. The requests then carry no
//! signature (TLS authenticated both ends and protects every byte). The certificates are read
//! again when their files change (checked at each new connection).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const AUTH_HEADER: &str = "x-ferry-auth";

/// How far the signer's clock may be from ours.
const SKEW_MS: i64 = 60_000;

fn mac(key: &[u8], ts_ms: i64, method: &str, path: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(b"ferry-peer-v1\n");
    m.update(ts_ms.to_string().as_bytes());
    m.update(b"\n");
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path.as_bytes());
    m.update(b"\n");
    m.update(body);
    m
}

/// The header value for a request made at `ts_ms`.
pub fn sign(key: &[u8], ts_ms: i64, method: &str, path: &str, body: &[u8]) -> String {
    let tag = mac(key, ts_ms, method, path, body).finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("{ts_ms}:{hex}")
}

/// Check a header value at time `now_ms`.
pub fn verify(
    key: &[u8],
    header: Option<&str>,
    now_ms: i64,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), String> {
    let h = header.ok_or("no x-ferry-auth header: peer requests must be signed with the agents' key")?;
    let (ts, hex) = h.split_once(':').ok_or("malformed x-ferry-auth header")?;
    let ts: i64 = ts.parse().map_err(|_| "malformed x-ferry-auth time")?;
    if (now_ms - ts).abs() > SKEW_MS {
        return Err(format!("signature time is {} s off this host's clock", (now_ms - ts) / 1000));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("malformed x-ferry-auth signature".into());
    }
    let tag: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0)).collect();
    mac(key, ts, method, path, body)
        .verify_slice(&tag)
        .map_err(|_| "signature does not match: the peer holds a different key".to_string())
}

/// How long a peer has for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Who made a peer request: the connection's address and, with host certificates, the
/// certificate its TLS handshake verified (the handlers check that it names the host the
/// request claims to come from).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The peer's address.
    pub addr: std::net::SocketAddr,
    /// Its certificate chain, its own certificate first (empty on the key's plain HTTP
    /// listener).
    pub chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
}

impl Caller {
    /// Its own certificate, if it presented one.
    pub fn certificate(&self) -> Option<&tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
        self.chain.first()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Caller {
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self { addr: *s.remote_addr(), chain: Vec::new() }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Caller {
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let chain = s.io().get_ref().1.peer_certificates().unwrap_or_default();
        Self { addr: *s.remote_addr(), chain: chain.iter().map(|c| c.clone().into_owned()).collect() }
    }
}

/// The peer API's listener with host certificates: TCP connections go through the TLS
/// handshake (client certificate required) in their own tasks, so a slow or refused peer holds
/// up nobody; only established sessions reach the HTTP server. Refused handshakes are logged
/// with the peer's address and the reason.
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
}

/// A peer connection after its TLS handshake.
pub type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The server configuration for the next connection (the host's certificates as they are then).
pub type ConfigSource = std::sync::Arc<dyn Fn() -> std::sync::Arc<tokio_rustls::rustls::ServerConfig> + Send + Sync>;

impl TlsListener {
    /// Serve TLS on `tcp`, each connection with the configuration `config` gives at its accept
    /// (so a changed revocation list or certificate counts from the next connection on).
    pub fn new(tcp: tokio::net::TcpListener, config: ConfigSource) -> Self {
        let local = tcp.local_addr().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (sock, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("peer API accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, ready) = (tokio_rustls::TlsAcceptor::from(config()), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = ready.send((s, addr)).await;
                        }
                        Ok(Err(e)) => tracing::warn!("refused a peer connection from {addr}: TLS: {}", tls_reason(&e)),
                        Err(_) => tracing::warn!(
                            "refused a peer connection from {addr}: no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"
                        ),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Self { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended: nothing more will arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A TLS failure as a sentence: what rustls said, and what it means for host certificates.
pub fn tls_reason(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text = format!("{text}: {t}");
        }
        src = s.source();
    }
    let hint = if text.contains("UnknownIssuer") || text.contains("UnknownCA") || text.contains("BadSignature") {
        " (the two hosts' certificates are not from the same CA: each host's tls_dir/ca.pem must have signed the other's cert.pem)"
    } else if text.contains("Revoked") {
        " (the certificate is revoked: it is listed in the CA's crl.pem)"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        " (the peer's certificate does not name the host it was called by)"
    } else if text.contains("Expired") || text.contains("NotValidYet") {
        " (a certificate is outside its validity period)"
    } else if text.contains("CertificateRequired") || text.contains("NoCertificatesPresented") {
        " (the peer presented no certificate: does it use a key_file instead of tls_dir?)"
    } else {
        ""
    };
    format!("{text}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_key_and_request_verify() {
        let k = b"0123456789abcdef";
        let h = sign(k, 1_000_000, "POST", "/peer/v1/incoming", b"{}");
        assert!(verify(k, Some(&h), 1_000_500, "POST", "/peer/v1/incoming", b"{}").is_ok());
        assert!(verify(b"another-key-0123", Some(&h), 1_000_500, "POST", "/peer/v1/incoming", b"{}")
            .unwrap_err()
            .contains("different key"));
        assert!(verify(k, Some(&h), 1_000_500, "POST", "/peer/v1/incoming", b"{\"x\":1}").is_err());
        assert!(verify(k, Some(&h), 1_000_500, "GET", "/peer/v1/incoming", b"{}").is_err());
        assert!(verify(k, Some(&h), 1_100_000, "POST", "/peer/v1/incoming", b"{}").unwrap_err().contains("off"));
        assert!(verify(k, None, 1_000_000, "POST", "/", b"").is_err());
        assert!(verify(k, Some("garbage"), 1_000_000, "POST", "/", b"").is_err());
        assert!(verify(k, Some("1000000:zz"), 1_000_000, "POST", "/", b"").is_err());
    }
}
