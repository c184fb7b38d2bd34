//! Peer requests between agents are signed with the key both hosts hold (the key file): header
//! `x-ferry-auth: <unix ms>:<hex HMAC-SHA256(key, "ferry-peer-v1\n" ms "\n" method "\n" path "\n" body)>`.
//! The receiver refuses a wrong signature and a time more than 60 s off its own clock; the key
//! itself never crosses the wire.

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
