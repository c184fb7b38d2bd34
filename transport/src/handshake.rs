//! Channel handshake: mutual authentication with a pre-shared key, binding of the channel to one
//! migration session and channel index, and version/capability negotiation. Sans-IO: the state
//! machines take frames and the current time and return frames to send; backends do the I/O.
//!
//! ```text
//! hello     = min_ver u8 | max_ver u8 | caps u32 | session [16] | channel u16 | mode u8 | nonce_c [32]
//! challenge = version u8 | caps u32 | nonce_s [32] | MAC_s [32]
//! proof     = MAC_c [32]
//! MAC_s = HMAC-SHA256(psk, "ferry/2 server" | hello | challenge without MAC_s)
//! MAC_c = HMAC-SHA256(psk, "ferry/2 client" | hello | challenge without MAC_s)
//! ```
//!
//! `mode` is the [`Encryption`] the client asks for; the server refuses a mode other than its own
//! (with a `Reject` that names both), and since the hello is inside both MACs a man in the middle
//! cannot change it. Once both sides are authenticated each derives the channel's traffic keys
//! from the key, both nonces, the session and the channel index ([`crate::crypto`]); every frame
//! after the handshake is sealed with them. Keys are at least 32 bytes ([`Psk`]).
//!
//! Each side proves the key over a transcript that holds a nonce the *other* side just chose, so
//! a recorded handshake replayed to either side fails. The labels differ, so one side's MAC can
//! never be reflected as the other's. The session id and channel index are inside the MACed
//! transcript: a channel cannot be moved into another session.
//!
//! With host certificates ([`crate::tls`]) the backend first runs a mutual TLS 1.3 handshake and
//! this handshake then runs inside it, with the TLS session's exporter secret as its key; the
//! `quic` backend runs it on a QUIC stream the same way.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use zeroize::Zeroizing;

use crate::crypto::{ChannelKeys, Encryption, KeyInput};
use crate::error::{HandshakeError, KeyError, WireError};
use crate::tls::Credentials;
use crate::wire::{encode_frame, AbortMsg, FrameKind, VERSION_MAX, VERSION_MIN};

type HmacSha256 = Hmac<Sha256>;

/// A 16-byte migration session id.
pub type SessionId = [u8; 16];

/// Length of nonces and MACs.
pub const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = 1 + 1 + 4 + 16 + 2 + 1 + NONCE_LEN;
const CHALLENGE_BODY_LEN: usize = 1 + 4 + NONCE_LEN;
const CHALLENGE_LEN: usize = CHALLENGE_BODY_LEN + 32;

/// Capability bits negotiated per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps(pub u32);

impl Caps {
    /// zstd-compressed page batches.
    pub const ZSTD: Caps = Caps(1);
    /// RDMA data path (control on this channel, pages by RDMA WRITE).
    pub const RDMA: Caps = Caps(2);
    /// Everything this build understands.
    pub const ALL: Caps = Caps(3);

    /// Both have these bits.
    pub fn intersect(self, o: Caps) -> Caps {
        Caps(self.0 & o.0)
    }

    /// Has all bits of `o`.
    pub fn contains(self, o: Caps) -> bool {
        self.0 & o.0 == o.0
    }
}

/// A pre-shared key: at least [`Psk::MIN_LEN`] random bytes, zeroed when dropped.
///
/// Key files hold the key as hex or base64 text (`head -c 32 /dev/urandom | base64`) and must
/// be readable by their owner only ([`Psk::from_file`]).
#[derive(Clone)]
pub struct Psk(Zeroizing<Vec<u8>>);

impl Psk {
    /// Fewest key bytes accepted.
    pub const MIN_LEN: usize = 32;

    /// Wrap raw key bytes: at least [`Psk::MIN_LEN`] of them, and not a pattern (a random
    /// 32-byte key has about 30 distinct byte values; fewer than 16 means it was not drawn at
    /// random).
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, HandshakeError> {
        let key = Zeroizing::new(key.into());
        if key.len() < Self::MIN_LEN {
            return Err(HandshakeError::WeakKey(format!("{} bytes, need at least {}", key.len(), Self::MIN_LEN)));
        }
        let mut seen = [false; 256];
        key.iter().for_each(|b| seen[*b as usize] = true);
        let distinct = seen.iter().filter(|s| **s).count();
        if distinct < 16 {
            return Err(HandshakeError::WeakKey(format!(
                "only {distinct} distinct byte values in {} bytes: not random",
                key.len()
            )));
        }
        Ok(Self(key))
    }

    /// Parse a key written as hex or base64 (standard or URL-safe alphabet, padded or not);
    /// surrounding whitespace is ignored.
    pub fn parse(text: &[u8]) -> Result<Self, KeyError> {
        use base64::Engine;
        let t = text.trim_ascii();
        let hex = t.len().is_multiple_of(2) && !t.is_empty() && t.iter().all(u8::is_ascii_hexdigit);
        let bytes = if hex {
            Zeroizing::new(
                t.chunks_exact(2)
                    .map(|c| {
                        let d = |x: u8| (x as char).to_digit(16).unwrap_or(0) as u8;
                        d(c[0]) << 4 | d(c[1])
                    })
                    .collect::<Vec<u8>>(),
            )
        } else {
            let engines = [
                base64::engine::general_purpose::STANDARD,
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            Zeroizing::new(engines.iter().find_map(|e| e.decode(t).ok()).ok_or(KeyError::Encoding)?)
        };
        Self::new(bytes.to_vec()).map_err(KeyError::Weak)
    }

    /// Read a key file: refused unless only its owner may read or write it (mode 0600 or
    /// stricter), then parsed with [`Psk::parse`].
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let io = |e: std::io::Error| KeyError::Io { path: path.display().to_string(), reason: e.to_string() };
        let f = std::fs::File::open(path).map_err(io)?;
        let mode = f.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.display().to_string(), mode });
        }
        let mut text = Zeroizing::new(Vec::new());
        f.take(4096).read_to_end(&mut text).map_err(io)?;
        Self::parse(&text)
    }

    /// The key bytes (for signing with the same key elsewhere; never print them).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }

    /// A key from a secret both ends derived (a TLS exporter): used as it is, not checked.
    pub(crate) fn from_secret(secret: &[u8; 32]) -> Psk {
        Psk(Zeroizing::new(secret.to_vec()))
    }

    /// A key bound to `context`: HMAC-SHA256(key, `label` | `context`). The `quic` backend runs
    /// this handshake under the key bound to its TLS session's exporter secret, so the proofs
    /// hold only on that one TLS session (see `quic`'s module docs).
    pub fn derive(&self, label: &[u8], context: &[u8]) -> Psk {
        Psk(Zeroizing::new(self.mac(label, &[context]).finalize().into_bytes().to_vec()))
    }

    /// HMAC-SHA256 of `parts` under the key, with a label that keeps uses apart (peer requests
    /// signed by the host agent, say).
    pub fn sign(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk(<{} bytes>)", self.0.len())
    }
}

/// Fresh random bytes for a nonce or session id.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom only fails if the OS has no entropy source at all; nothing sensible can go on.
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

/// What a channel is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding {
    /// Migration session.
    pub session: SessionId,
    /// Index of this channel in the session.
    pub channel: u16,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    /// Version both speak.
    pub version: u8,
    /// Capabilities both have.
    pub caps: Caps,
    /// Session and channel this channel belongs to.
    pub binding: ChannelBinding,
    /// How frames after the handshake are protected (both sides asked for this mode).
    pub encryption: Encryption,
    /// With host certificates: SHA-256 of the certificate the peer presented (the migration
    /// server requires every channel of a session to come from channel 0's peer). `None` with a
    /// pre-shared key.
    pub peer_cert: Option<[u8; 32]>,
}

/// Client (source side) configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Key or host certificates.
    pub creds: Credentials,
    /// Session and channel to join.
    pub binding: ChannelBinding,
    /// Capabilities offered.
    pub caps: Caps,
    /// Time allowed for the whole handshake.
    pub timeout: Duration,
    /// Protection of the channel's frames; the server must be configured the same.
    pub encryption: Encryption,
}

/// Server (destination side) configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Key or host certificates.
    pub creds: Credentials,
    /// Capabilities offered.
    pub caps: Caps,
    /// Time allowed for the whole handshake.
    pub timeout: Duration,
    /// The only protection accepted for channels (a client asking for another is refused).
    pub encryption: Encryption,
}

/// What the caller must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this frame and wait for the next one.
    Send(Vec<u8>),
    /// Handshake complete (client); nothing more to send.
    Done(Established),
    /// The client is authenticated (server): decide with [`ServerHandshake::accept`] or
    /// [`ServerHandshake::reject`] whether the session and channel are welcome.
    Verified(Established),
}

enum ClientState {
    SentHello,
    SentProof(Established),
    Done,
}

/// Client side of the handshake.
pub struct ClientHandshake {
    cfg: ClientConfig,
    hello: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    state: ClientState,
    deadline: Instant,
    keys: Option<ChannelKeys>,
}

impl ClientHandshake {
    /// Start: returns the machine and the hello frame to send.
    pub fn start(cfg: ClientConfig, nonce: [u8; NONCE_LEN], now: Instant) -> (Self, Vec<u8>) {
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.push(VERSION_MIN);
        hello.push(VERSION_MAX);
        hello.extend_from_slice(&cfg.caps.0.to_le_bytes());
        hello.extend_from_slice(&cfg.binding.session);
        hello.extend_from_slice(&cfg.binding.channel.to_le_bytes());
        hello.push(cfg.encryption.to_u8());
        hello.extend_from_slice(&nonce);
        let frame = encode_frame(FrameKind::ClientHello, &hello);
        let deadline = now + cfg.timeout;
        (Self { cfg, hello, nonce, state: ClientState::SentHello, deadline, keys: None }, frame)
    }

    /// The channel's keys, once the handshake is done (taken once).
    pub fn take_keys(&mut self) -> Option<ChannelKeys> {
        match self.state {
            ClientState::Done => self.keys.take(),
            _ => None,
        }
    }

    /// When the handshake gives up.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// Check the deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if now >= self.deadline && !matches!(self.state, ClientState::Done) {
            return Err(HandshakeError::Timeout);
        }
        Ok(())
    }

    /// Feed a received frame.
    pub fn handle_frame(&mut self, kind: FrameKind, payload: &[u8], now: Instant) -> Result<Step, HandshakeError> {
        self.handle_timeout(now)?;
        if kind == FrameKind::Reject {
            return Err(HandshakeError::Rejected(AbortMsg::decode(payload)?.reason));
        }
        match (&self.state, kind) {
            (ClientState::SentHello, FrameKind::ServerChallenge) => {
                if payload.len() != CHALLENGE_LEN {
                    return Err(WireError::Truncated.into());
                }
                let body = &payload[..CHALLENGE_BODY_LEN];
                let mac = &payload[CHALLENGE_BODY_LEN..];
                let psk = self.cfg.creds.handshake_key()?;
                psk.mac(b"ferry/2 server", &[&self.hello, body])
                    .verify_slice(mac)
                    .map_err(|_| HandshakeError::BadMac)?;
                let version = body[0];
                if !(VERSION_MIN..=VERSION_MAX).contains(&version) {
                    return Err(HandshakeError::BadChoice(version));
                }
                let caps = Caps(u32::from_le_bytes([body[1], body[2], body[3], body[4]]));
                let proof = psk.mac(b"ferry/2 client", &[&self.hello, body]).finalize().into_bytes();
                let est = Established {
                    version,
                    caps: caps.intersect(self.cfg.caps),
                    binding: self.cfg.binding,
                    encryption: self.cfg.encryption,
                    peer_cert: None,
                };
                self.keys = Some(ChannelKeys::derive(
                    &KeyInput {
                        psk: psk.bytes(),
                        nonce_client: &self.nonce,
                        nonce_server: &body[5..5 + NONCE_LEN],
                        session: &est.binding.session,
                        channel: est.binding.channel,
                        mode: est.encryption,
                    },
                    true,
                ));
                self.state = ClientState::SentProof(est);
                Ok(Step::Send(encode_frame(FrameKind::ClientProof, &proof)))
            }
            (ClientState::SentProof(est), FrameKind::Accept) => {
                let est = *est;
                self.state = ClientState::Done;
                Ok(Step::Done(est))
            }
            (_, k) => Err(WireError::Unexpected(k).into()),
        }
    }
}

enum ServerState {
    WaitHello,
    WaitProof { hello: Vec<u8>, body: Vec<u8>, est: Established, nonce_c: [u8; NONCE_LEN] },
    Verified,
    Done,
}

/// Server side of the handshake.
pub struct ServerHandshake {
    cfg: ServerConfig,
    nonce: [u8; NONCE_LEN],
    state: ServerState,
    deadline: Instant,
    keys: Option<ChannelKeys>,
}

impl ServerHandshake {
    /// Start waiting for a hello.
    pub fn new(cfg: ServerConfig, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        let deadline = now + cfg.timeout;
        Self { cfg, nonce, state: ServerState::WaitHello, deadline, keys: None }
    }

    /// The channel's keys, once the client is verified (taken once).
    pub fn take_keys(&mut self) -> Option<ChannelKeys> {
        match self.state {
            ServerState::Verified | ServerState::Done => self.keys.take(),
            _ => None,
        }
    }

    /// When the handshake gives up.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// Check the deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if now >= self.deadline && !matches!(self.state, ServerState::Done) {
            return Err(HandshakeError::Timeout);
        }
        Ok(())
    }

    /// Feed a received frame.
    pub fn handle_frame(&mut self, kind: FrameKind, payload: &[u8], now: Instant) -> Result<Step, HandshakeError> {
        self.handle_timeout(now)?;
        match (&self.state, kind) {
            (ServerState::WaitHello, FrameKind::ClientHello) => {
                if payload.len() != HELLO_LEN {
                    return Err(WireError::Truncated.into());
                }
                let (min, max) = (payload[0], payload[1]);
                let version = max.min(VERSION_MAX);
                if version < min.max(VERSION_MIN) {
                    return Err(HandshakeError::NoCommonVersion { min, max });
                }
                let caps = Caps(u32::from_le_bytes([payload[2], payload[3], payload[4], payload[5]]));
                let caps = caps.intersect(self.cfg.caps);
                let mut session = [0u8; 16];
                session.copy_from_slice(&payload[6..22]);
                let channel = u16::from_le_bytes([payload[22], payload[23]]);
                let mode = Encryption::from_u8(payload[24]).ok_or(HandshakeError::UnknownMode(payload[24]))?;
                if mode != self.cfg.encryption {
                    return Err(HandshakeError::ModeMismatch { client: mode, server: self.cfg.encryption });
                }
                let mut nonce_c = [0u8; NONCE_LEN];
                nonce_c.copy_from_slice(&payload[25..25 + NONCE_LEN]);
                let mut body = Vec::with_capacity(CHALLENGE_BODY_LEN);
                body.push(version);
                body.extend_from_slice(&caps.0.to_le_bytes());
                body.extend_from_slice(&self.nonce);
                let mac =
                    self.cfg.creds.handshake_key()?.mac(b"ferry/2 server", &[payload, &body]).finalize().into_bytes();
                let mut challenge = body.clone();
                challenge.extend_from_slice(&mac);
                let est = Established {
                    version,
                    caps,
                    binding: ChannelBinding { session, channel },
                    encryption: mode,
                    peer_cert: None,
                };
                self.state = ServerState::WaitProof { hello: payload.to_vec(), body, est, nonce_c };
                Ok(Step::Send(encode_frame(FrameKind::ServerChallenge, &challenge)))
            }
            (ServerState::WaitProof { hello, body, est, nonce_c }, FrameKind::ClientProof) => {
                let psk = self.cfg.creds.handshake_key()?;
                psk.mac(b"ferry/2 client", &[hello, body]).verify_slice(payload).map_err(|_| HandshakeError::BadMac)?;
                let est = *est;
                self.keys = Some(ChannelKeys::derive(
                    &KeyInput {
                        psk: psk.bytes(),
                        nonce_client: nonce_c,
                        nonce_server: &self.nonce,
                        session: &est.binding.session,
                        channel: est.binding.channel,
                        mode: est.encryption,
                    },
                    false,
                ));
                self.state = ServerState::Verified;
                Ok(Step::Verified(est))
            }
            (_, k) => Err(WireError::Unexpected(k).into()),
        }
    }

    /// Welcome a verified client: returns the frame to send.
    pub fn accept(&mut self) -> Result<Vec<u8>, HandshakeError> {
        match self.state {
            ServerState::Verified => {
                self.state = ServerState::Done;
                Ok(encode_frame(FrameKind::Accept, &[]))
            }
            _ => Err(WireError::Unexpected(FrameKind::Accept).into()),
        }
    }

    /// Refuse (e.g. unknown session): returns the frame to send before closing.
    pub fn reject(&mut self, reason: &str) -> Vec<u8> {
        self.state = ServerState::Done;
        encode_frame(FrameKind::Reject, &AbortMsg { code: 1, reason: reason.to_string() }.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, Frame};

    const K1: &[u8] = b"0123456789abcdef-handshake-test-key";
    const K2: &[u8] = b"0123456789abcdef-handshake-test-kez";

    fn split(f: &[u8]) -> (FrameKind, Vec<u8>) {
        match decode_frame(f).unwrap().unwrap().0 {
            Frame::Handshake(k, p) => (k, p.to_vec()),
            other => panic!("not a handshake frame: {other:?}"),
        }
    }

    fn cfgs(ck: &[u8], sk: &[u8]) -> (ClientConfig, ServerConfig) {
        let binding = ChannelBinding { session: [7; 16], channel: 3 };
        (
            ClientConfig {
                creds: Psk::new(ck).unwrap().into(),
                binding,
                caps: Caps::ALL,
                timeout: Duration::from_secs(5),
                encryption: Encryption::Aead,
            },
            ServerConfig {
                creds: Psk::new(sk).unwrap().into(),
                caps: Caps::ZSTD,
                timeout: Duration::from_secs(5),
                encryption: Encryption::Aead,
            },
        )
    }

    /// Runs a handshake; returns the client's and server's results.
    fn run(
        c: ClientConfig,
        s: ServerConfig,
    ) -> (Result<Established, HandshakeError>, Result<Established, HandshakeError>) {
        let now = Instant::now();
        let (mut cl, hello) = ClientHandshake::start(c, random_bytes(), now);
        let mut sv = ServerHandshake::new(s, random_bytes(), now);
        let (k, p) = split(&hello);
        let Step::Send(ch) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        let (k, p) = split(&ch);
        let proof = match cl.handle_frame(k, &p, now) {
            Ok(Step::Send(f)) => f,
            Ok(_) => panic!(),
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let (k, p) = split(&proof);
        let est = match sv.handle_frame(k, &p, now) {
            Ok(Step::Verified(e)) => e,
            Ok(_) => panic!(),
            Err(e) => return (Err(HandshakeError::Timeout), Err(e)),
        };
        let acc = sv.accept().unwrap();
        let (k, p) = split(&acc);
        let Step::Done(cest) = cl.handle_frame(k, &p, now).unwrap() else { panic!() };
        (Ok(cest), Ok(est))
    }

    #[test]
    fn same_key_agrees_on_binding_and_caps() {
        let (c, s) = cfgs(K1, K1);
        let (a, b) = run(c, s);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(a.binding.channel, 3);
        assert_eq!(a.caps, Caps::ZSTD);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, s) = cfgs(K1, K2);
        let (a, _) = run(c, s);
        assert_eq!(a.unwrap_err(), HandshakeError::BadMac);
    }

    #[test]
    fn replayed_proof_is_refused() {
        let now = Instant::now();
        let (c, s) = cfgs(K1, K1);
        let nonce_c = random_bytes();
        // Record one good handshake.
        let (mut cl, hello) = ClientHandshake::start(c.clone(), nonce_c, now);
        let mut sv = ServerHandshake::new(s.clone(), random_bytes(), now);
        let (k, p) = split(&hello);
        let Step::Send(ch) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        let (k, p) = split(&ch);
        let Step::Send(proof) = cl.handle_frame(k, &p, now).unwrap() else { panic!() };
        // Replay hello and proof to a fresh server: its new nonce makes the old proof worthless.
        let mut sv2 = ServerHandshake::new(s, random_bytes(), now);
        let (k, p) = split(&hello);
        sv2.handle_frame(k, &p, now).unwrap();
        let (k, p) = split(&proof);
        assert_eq!(sv2.handle_frame(k, &p, now).unwrap_err(), HandshakeError::BadMac);
        // Replay the old challenge to a fresh client: its new nonce makes the old MAC worthless.
        let (mut cl2, _) = ClientHandshake::start(c, random_bytes(), now);
        let (k, p) = split(&ch);
        assert_eq!(cl2.handle_frame(k, &p, now).unwrap_err(), HandshakeError::BadMac);
    }

    #[test]
    fn tampered_binding_is_refused() {
        let now = Instant::now();
        let (c, s) = cfgs(K1, K1);
        let (mut cl, hello) = ClientHandshake::start(c, random_bytes(), now);
        let mut sv = ServerHandshake::new(s, random_bytes(), now);
        let (k, mut p) = split(&hello);
        p[22] ^= 1; // a man in the middle moves the channel to another index
        let Step::Send(ch) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        let (k, p) = split(&ch);
        assert_eq!(cl.handle_frame(k, &p, now).unwrap_err(), HandshakeError::BadMac);
    }

    #[test]
    fn timeout_and_out_of_order_frames() {
        let now = Instant::now();
        let (c, s) = cfgs(K1, K1);
        let mut sv = ServerHandshake::new(s, random_bytes(), now);
        assert!(matches!(sv.handle_frame(FrameKind::ClientProof, &[0; 32], now), Err(HandshakeError::Wire(_))));
        let mut sv = ServerHandshake::new(
            ServerConfig { timeout: Duration::from_millis(10), ..sv.cfg.clone() },
            random_bytes(),
            now,
        );
        assert_eq!(sv.handle_timeout(now + Duration::from_secs(1)), Err(HandshakeError::Timeout));
        let (mut cl, _) = ClientHandshake::start(c, random_bytes(), now);
        assert!(cl.handle_frame(FrameKind::Accept, &[], now).is_err());
        assert!(Psk::new(b"short".to_vec()).is_err());
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_a_mode_mismatch_is_refused() {
        let now = Instant::now();
        let (c, s) = cfgs(K1, K1);
        let (mut cl, hello) = ClientHandshake::start(c.clone(), random_bytes(), now);
        let mut sv = ServerHandshake::new(s.clone(), random_bytes(), now);
        let (k, p) = split(&hello);
        let Step::Send(ch) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        let (k, p) = split(&ch);
        let Step::Send(proof) = cl.handle_frame(k, &p, now).unwrap() else { panic!() };
        assert!(cl.take_keys().is_none(), "no keys before the server accepted");
        let (k, p) = split(&proof);
        let Step::Verified(est) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        assert_eq!(est.encryption, Encryption::Aead);
        let (k, p) = split(&sv.accept().unwrap());
        cl.handle_frame(k, &p, now).unwrap();
        let (ck, sk) = (cl.take_keys().unwrap(), sv.take_keys().unwrap());
        assert_eq!((*ck.send, *ck.recv), (*sk.recv, *sk.send));
        assert_ne!(*ck.send, *ck.recv, "each direction has its own key");
        assert_eq!(ck.image, sk.image);
        // A second handshake with the same key and binding gets other keys (fresh nonces).
        let (a, b) = run(c.clone(), s.clone());
        assert_eq!(a.unwrap(), b.unwrap());
        // Modes must match; the server says which.
        for (cm, sm) in [(Encryption::Off, Encryption::Aead), (Encryption::Aead, Encryption::Integrity)] {
            let (mut cl, hello) =
                ClientHandshake::start(ClientConfig { encryption: cm, ..c.clone() }, random_bytes(), now);
            let mut sv = ServerHandshake::new(ServerConfig { encryption: sm, ..s.clone() }, random_bytes(), now);
            let (k, p) = split(&hello);
            let e = sv.handle_frame(k, &p, now).unwrap_err();
            assert_eq!(e, HandshakeError::ModeMismatch { client: cm, server: sm });
            assert!(e.to_string().contains(cm.as_str()) && e.to_string().contains(sm.as_str()), "{e}");
            let (k, p) = split(&sv.reject(&e.to_string()));
            let ce = cl.handle_frame(k, &p, now).unwrap_err();
            assert!(ce.to_string().contains("encryption mode mismatch"), "{ce}");
        }
        // A man in the middle who rewrites the mode in the hello breaks the server's MAC.
        let (mut cl, hello) = ClientHandshake::start(c.clone(), random_bytes(), now);
        let mut sv = ServerHandshake::new(ServerConfig { encryption: Encryption::Off, ..s }, random_bytes(), now);
        let (k, mut p) = split(&hello);
        p[24] = Encryption::Off.to_u8();
        let Step::Send(ch) = sv.handle_frame(k, &p, now).unwrap() else { panic!() };
        let (k, p) = split(&ch);
        assert_eq!(cl.handle_frame(k, &p, now).unwrap_err(), HandshakeError::BadMac);
    }

    #[test]
    fn weak_and_badly_written_keys_are_refused() {
        assert!(matches!(Psk::new(vec![7u8; 16]), Err(HandshakeError::WeakKey(_))), "16 bytes");
        assert!(matches!(Psk::new(vec![7u8; 64]), Err(HandshakeError::WeakKey(_))), "a pattern");
        let key: [u8; 32] = random_bytes();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        for text in [hex.clone(), hex.to_uppercase(), b64.clone(), format!("{b64}\n"), b64.trim_end_matches('=').into()]
        {
            let p = Psk::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(p.bytes(), &key[..], "{text:?}");
        }
        // The old style: a passphrase used as the key itself.
        assert!(matches!(Psk::parse(b"correct horse battery staple!!"), Err(KeyError::Encoding)));
        // 16 random bytes, well written, are still too few.
        let short = base64::engine::general_purpose::STANDARD.encode(&key[..16]);
        assert!(matches!(Psk::parse(short.as_bytes()), Err(KeyError::Weak(_))));
        let e = Psk::parse(short.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("/dev/urandom"), "{e}");
    }

    #[test]
    fn key_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferry-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let key: [u8; 32] = random_bytes();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::from_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::Permissions { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("0644") && e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(Psk::from_file(&path), Err(KeyError::Permissions { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Psk::from_file(&path).unwrap().bytes(), &key[..]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Psk::from_file(&path).is_ok());
        assert!(matches!(Psk::from_file(&dir.join("missing")), Err(KeyError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_negotiation() {
        let now = Instant::now();
        let (_, s) = cfgs(K1, K1);
        let mut sv = ServerHandshake::new(s, random_bytes(), now);
        let mut hello = vec![0u8; HELLO_LEN];
        hello[0] = 7;
        hello[1] = 9;
        assert_eq!(
            sv.handle_frame(FrameKind::ClientHello, &hello, now).unwrap_err(),
            HandshakeError::NoCommonVersion { min: 7, max: 9 }
        );
    }
}
