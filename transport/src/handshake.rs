//! Channel handshake: mutual authentication with a pre-shared key, binding of the channel to one
//! migration session and channel index, and version/capability negotiation. Sans-IO: the state
//! machines take frames and the current time and return frames to send; backends do the I/O.
//!
//! ```text
//! hello     = min_ver u8 | max_ver u8 | caps u32 | session [16] | channel u16 | nonce_c [32]
//! challenge = version u8 | caps u32 | nonce_s [32] | MAC_s [32]
//! proof     = MAC_c [32]
//! MAC_s = HMAC-SHA256(psk, "ferry/1 server" | hello | challenge without MAC_s)
//! MAC_c = HMAC-SHA256(psk, "ferry/1 client" | hello | challenge without MAC_s)
//! ```
//!
//! Each side proves the key over a transcript that holds a nonce the *other* side just chose, so
//! a recorded handshake replayed to either side fails. The labels differ, so one side's MAC can
//! never be reflected as the other's. The session id and channel index are inside the MACed
//! transcript: a channel cannot be moved into another session. A TLS or QUIC backend replaces
//! this module with its own handshake and presents the same [`Established`].

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{HandshakeError, WireError};
use crate::wire::{encode_frame, AbortMsg, FrameKind, VERSION_MAX, VERSION_MIN};

type HmacSha256 = Hmac<Sha256>;

/// A 16-byte migration session id.
pub type SessionId = [u8; 16];

/// Length of nonces and MACs.
pub const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = 1 + 1 + 4 + 16 + 2 + NONCE_LEN;
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

/// A pre-shared key (at least 16 bytes).
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl Psk {
    /// Wrap key bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, HandshakeError> {
        let key = key.into();
        if key.len() < 16 {
            return Err(HandshakeError::WeakKey(key.len()));
        }
        Ok(Self(key))
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

    /// A key bound to `context`: HMAC-SHA256(key, `label` | `context`). The `quic` backend runs
    /// this handshake under the key bound to its TLS session's exporter secret, so the proofs
    /// hold only on that one TLS session (see `quic`'s module docs).
    pub fn derive(&self, label: &[u8], context: &[u8]) -> Psk {
        Psk(self.mac(label, &[context]).finalize().into_bytes().to_vec())
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
}

/// Client (source side) configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Key.
    pub psk: Psk,
    /// Session and channel to join.
    pub binding: ChannelBinding,
    /// Capabilities offered.
    pub caps: Caps,
    /// Time allowed for the whole handshake.
    pub timeout: Duration,
}

/// Server (destination side) configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Key.
    pub psk: Psk,
    /// Capabilities offered.
    pub caps: Caps,
    /// Time allowed for the whole handshake.
    pub timeout: Duration,
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
    state: ClientState,
    deadline: Instant,
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
        hello.extend_from_slice(&nonce);
        let frame = encode_frame(FrameKind::ClientHello, &hello);
        let deadline = now + cfg.timeout;
        (Self { cfg, hello, state: ClientState::SentHello, deadline }, frame)
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
                self.cfg
                    .psk
                    .mac(b"ferry/1 server", &[&self.hello, body])
                    .verify_slice(mac)
                    .map_err(|_| HandshakeError::BadMac)?;
                let version = body[0];
                if !(VERSION_MIN..=VERSION_MAX).contains(&version) {
                    return Err(HandshakeError::BadChoice(version));
                }
                let caps = Caps(u32::from_le_bytes([body[1], body[2], body[3], body[4]]));
                let proof = self.cfg.psk.mac(b"ferry/1 client", &[&self.hello, body]).finalize().into_bytes();
                let est = Established { version, caps: caps.intersect(self.cfg.caps), binding: self.cfg.binding };
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
    WaitProof { hello: Vec<u8>, body: Vec<u8>, est: Established },
    Verified,
    Done,
}

/// Server side of the handshake.
pub struct ServerHandshake {
    cfg: ServerConfig,
    nonce: [u8; NONCE_LEN],
    state: ServerState,
    deadline: Instant,
}

impl ServerHandshake {
    /// Start waiting for a hello.
    pub fn new(cfg: ServerConfig, nonce: [u8; NONCE_LEN], now: Instant) -> Self {
        let deadline = now + cfg.timeout;
        Self { cfg, nonce, state: ServerState::WaitHello, deadline }
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
                let mut body = Vec::with_capacity(CHALLENGE_BODY_LEN);
                body.push(version);
                body.extend_from_slice(&caps.0.to_le_bytes());
                body.extend_from_slice(&self.nonce);
                let mac = self.cfg.psk.mac(b"ferry/1 server", &[payload, &body]).finalize().into_bytes();
                let mut challenge = body.clone();
                challenge.extend_from_slice(&mac);
                let est = Established { version, caps, binding: ChannelBinding { session, channel } };
                self.state = ServerState::WaitProof { hello: payload.to_vec(), body, est };
                Ok(Step::Send(encode_frame(FrameKind::ServerChallenge, &challenge)))
            }
            (ServerState::WaitProof { hello, body, est }, FrameKind::ClientProof) => {
                self.cfg
                    .psk
                    .mac(b"ferry/1 client", &[hello, body])
                    .verify_slice(payload)
                    .map_err(|_| HandshakeError::BadMac)?;
                let est = *est;
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

    fn split(f: &[u8]) -> (FrameKind, Vec<u8>) {
        match decode_frame(f).unwrap().unwrap().0 {
            Frame::Handshake(k, p) => (k, p.to_vec()),
            other => panic!("not a handshake frame: {other:?}"),
        }
    }

    fn cfgs(ck: &[u8], sk: &[u8]) -> (ClientConfig, ServerConfig) {
        let binding = ChannelBinding { session: [7; 16], channel: 3 };
        (
            ClientConfig { psk: Psk::new(ck).unwrap(), binding, caps: Caps::ALL, timeout: Duration::from_secs(5) },
            ServerConfig { psk: Psk::new(sk).unwrap(), caps: Caps::ZSTD, timeout: Duration::from_secs(5) },
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
        let (c, s) = cfgs(b"0123456789abcdef", b"0123456789abcdef");
        let (a, b) = run(c, s);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(a.binding.channel, 3);
        assert_eq!(a.caps, Caps::ZSTD);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, s) = cfgs(b"0123456789abcdef", b"0123456789abcdeX");
        let (a, _) = run(c, s);
        assert_eq!(a.unwrap_err(), HandshakeError::BadMac);
    }

    #[test]
    fn replayed_proof_is_refused() {
        let now = Instant::now();
        let (c, s) = cfgs(b"0123456789abcdef", b"0123456789abcdef");
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
        let (c, s) = cfgs(b"0123456789abcdef", b"0123456789abcdef");
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
        let (c, s) = cfgs(b"0123456789abcdef", b"0123456789abcdef");
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
    fn version_negotiation() {
        let now = Instant::now();
        let (_, s) = cfgs(b"0123456789abcdef", b"0123456789abcdef");
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
