//! The `quic` backend (cargo feature `quic`, on by default): each channel is one bidirectional
//! QUIC stream (quinn), with TLS 1.3 (rustls, `aws-lc-rs` provider) built in.
//!
//! # Channels, streams and connections
//! A channel is one bidirectional stream carrying the same frames as the stream backends
//! ([`crate::wire`]). [`QuicOptions::share_connection`] picks how the channels of one session
//! travel: each on a connection of its own (the default: measured faster, see below), or all as
//! streams of one connection. Raw pages only: zstd is never negotiated on this backend.
//!
//! Measured on loopback (2 cores, `migration-bench stream`/`live`): a connection's packets are
//! sealed, sent, received and opened by one task at a time, so `quic:4` as four connections
//! spreads that work over the runtime's threads, where four streams of one connection share one
//! task. Four connections were the faster (README, bench section); both pass the conformance suite.
//!
//! # Threads: a tokio runtime inside, plain threads on the data path
//! quinn is async. The data path of Ferry is plain threads (one sender and one receiver per
//! channel half: faster here than tasks, and the layers above are written for them). A small
//! multi-threaded tokio runtime ([`runtime`], 2 worker threads, created once per process) runs
//! the endpoints and connection drivers (packet sealing, GSO sends, GRO receives, timers); a
//! data-path thread waits on a stream operation with `Handle::block_on` on the future itself.
//! No task or queue sits between a channel's thread and its stream: a write hands the batch's
//! buffer (`Bytes`) to the stream without a copy, and a read takes up to 64 received chunks
//! (`read_chunks`) per wake-up and copies them straight to their guest pages. A relay task per
//! stream would add a thread hop and a queue per batch for nothing.
//!
//! Copies: the sender copies the batch's data pages out of guest memory (volatile reads) into one
//! buffer, once: QUIC must seal them into packets anyway and must keep them until acknowledged, and
//! no `&[u8]` may be formed over live guest memory. Buffers are reused once the stream has let go
//! of them (no fresh 1 MiB allocation, so no page faults, per batch). The receiver copies each
//! decrypted chunk straight into the destination's guest memory at the batch's GPA.
//!
//! # Authentication: Ferry's handshake bound to the TLS session
//! With a pre-shared key the peers share no certificates: the acceptor makes a self-signed certificate
//! at bind time; the client accepts any certificate whose TLS 1.3 signature verifies (TLS alone
//! authenticates nobody here). Then Ferry's own handshake ([`crate::handshake`]) runs on the
//! stream under a key bound to this TLS session: `HMAC(psk, "ferry/1 quic" | exporter)`, where
//! `exporter` is 32 bytes of the connection's keying material exporter (RFC 5705 / RFC 8446 7.5,
//! label `EXPORTER-ferry/1 channel`). Both sides prove the pre-shared key over fresh nonces, as
//! on tcp, and the proof only verifies on the TLS session it was made on. A man in the middle
//! holds two TLS sessions with two different exporters: relaying the handshake between them
//! fails (`BadMac`), and without the key he cannot make proofs of his own. So nobody without the
//! key joins a session, and nobody at all reads or alters a channel (TLS 1.3 seals every packet).
//! This was chosen over pinning a certificate derived from the key: it reuses the one handshake
//! every backend runs (versions, capabilities, session binding, admission with a reason), and a
//! key never becomes a long-lived signing key.
//!
//! With host certificates ([`crate::tls`]) the same TLS session authenticates both hosts instead:
//! each presents its certificate, each verifies the other's against its CA (and the source the
//! destination's name when one is expected), and Ferry's handshake runs under the exporter
//! secret itself (as on tcp with certificates).
//!
//! # Tuning (what is set and why)
//! - Stream receive window 8 MiB and connection window 32 MiB: several 1 MiB batches in flight
//!   per channel, far over the bandwidth-delay product of a LAN, while a reader that stops still
//!   stalls its sender within a few batches (conformance: backpressure).
//! - Send window 16 MiB: what a connection may have unacknowledged.
//! - UDP socket buffers of 8 MiB (forced as root when `rmem_max` is lower): bursts of a batch
//!   must not be dropped by the kernel before quinn reads them.
//! - GSO/GRO: quinn's default (segmentation offload on); [`gso_segments`] reports what the kernel
//!   grants (64 on Linux with UDP GSO, 1 without).
//! - MTU discovery on, searching up to 65527 bytes (quinn's default stops at 1452): on loopback
//!   (MTU 64 KiB) a datagram carries 45 times as much per packet cost; on an Ethernet path
//!   discovery settles at its MTU (1452 on the 1500-byte testbed links).
//! - Acknowledgement delay 1 ms (the QUIC acknowledgement-frequency extension asks the peer for
//!   it; quinn's default is 25 ms): a live migration sends a batch and waits for Ferry's
//!   acknowledgement before the window moves on, and the last packets of a burst waited up to
//!   25 ms for their QUIC ACK before the sender's congestion and send windows opened again.
//!   Measured on loopback (`migration-bench live --options tcp,quic --workload idle --size
//!   512MiB`, same binary, same minute): 6110 ms with quinn's default (512 batches, one every
//!   12 ms against a 25 ms batch latency: about 2 of the engine's window of 16 in flight),
//!   970-1320 ms with 1 ms (the window full: 26 ms latency, one batch every 1.9 ms; tcp:
//!   270-750 ms). Tried and not kept: BBR instead of Cubic, and 4x the stream, connection and
//!   send windows (no change within the noise). What is left is CPU: quinn seals and parses
//!   every packet in user space (1.1 CPU-s against tcp's 0.3 for the same 512 MiB).
//! - Keepalive every 1 s and an idle timeout of 5 s: a dead peer is noticed in seconds (tcp uses
//!   keepalive and `TCP_USER_TIMEOUT` of 3 s for the same).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, MtuDiscoveryConfig, RecvStream, SendStream, TransportConfig, VarInt,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;

use crate::channel::{check_data_map, check_send_request, Channel, ChannelInfo, ChannelRx, ChannelTx, Incoming};
use crate::channel::{Killer, ReceivedBatch, SentBatch};
use crate::endpoint::{Acceptor, Admit, Connector, Path, PendingChannel};
use crate::error::{HandshakeError, Result, TransportError, WireError};
use crate::handshake::{
    random_bytes, Caps, ClientConfig, ClientHandshake, Established, Psk, ServerConfig, ServerHandshake, SessionId, Step,
};
use crate::tls::Credentials;
use crate::wire::{
    encode_frame, AbortMsg, Ack, BatchFixed, BatchHeader, Encoding, FrameHeader, FrameKind, PageRun, BATCH_DEST_ZEROED,
    BATCH_FIXED_LEN, HEADER_LEN, MAX_CONTROL_LEN, MAX_SMALL_LEN, PAGE_SIZE,
};
use ferry_memory::volatile::{copy_from_guest, page_is_zero};
use ferry_memory::{MemorySink, MemorySource};

/// ALPN of Ferry's channels.
const ALPN: &[u8] = b"ferry/1";
/// Exporter label binding Ferry's handshake to the TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry/1 channel";
/// Label of the key derived from the pre-shared key and the exporter.
const KEY_LABEL: &[u8] = b"ferry/1 quic";
/// Application error codes on streams and connections.
const CODE_CUT: u32 = 1;
/// Received chunks taken per wake-up of a reading thread.
const CHUNKS_PER_READ: usize = 64;
/// Send buffers kept for reuse per channel.
const POOL: usize = 32;

/// The process's runtime for every QUIC endpoint: 2 worker threads (the machines this runs on
/// have 2 cores; connection drivers of several connections then run in parallel).
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-quic")
            .enable_all()
            .build()
            // Creating two threads and an epoll instance fails only when the process is out of them.
            .expect("the QUIC runtime cannot start (out of threads or file descriptors)")
    })
}

/// How many segments the kernel sends per `sendmsg` on a UDP socket (GSO): 1 means no GSO.
pub fn gso_segments() -> usize {
    match UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => quinn::udp::UdpSocketState::new((&s).into()).map(|st| st.max_gso_segments()).unwrap_or(1),
        Err(_) => 1,
    }
}

/// Options of the `quic` backend (also its [`Connector`]).
#[derive(Clone)]
pub struct QuicOptions {
    /// Local address to bind (choose the NIC by address).
    pub bind: Option<SocketAddr>,
    /// Interface to bind to (`SO_BINDTODEVICE`).
    pub device: Option<String>,
    /// Carry every channel of a session as a stream of one connection (per destination and local
    /// address); `false` opens a connection per channel.
    pub share_connection: bool,
    /// Per-stream receive window.
    pub stream_window_bytes: u32,
    /// Per-connection receive window.
    pub connection_window_bytes: u32,
    /// Unacknowledged bytes a connection may have in flight.
    pub send_window_bytes: u64,
    /// UDP socket send and receive buffers.
    pub socket_buffer_bytes: usize,
    /// Largest UDP payload MTU discovery searches for (`None`: no discovery, 1200-byte packets).
    pub mtu_upper_bound: Option<u16>,
    /// The longest the peer may hold back an acknowledgement (QUIC acknowledgement-frequency
    /// extension; `None`: the peer's own, 25 ms in quinn). See the module docs, Tuning.
    pub max_ack_delay: Option<Duration>,
    /// Keepalive interval; the idle timeout is five of them.
    pub keepalive: Duration,
    /// Time allowed to set up a connection (TLS handshake).
    pub connect_timeout: Duration,
    /// Connections of the sessions opened through this value (`share_connection`).
    shared: Arc<Mutex<HashMap<SharedKey, Weak<Conn>>>>,
}

type SharedKey = (SessionId, SocketAddr, Option<SocketAddr>, Option<String>);

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            bind: None,
            device: None,
            share_connection: false,
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 32 << 20,
            send_window_bytes: 16 << 20,
            socket_buffer_bytes: 8 << 20,
            mtu_upper_bound: Some(65527),
            max_ack_delay: Some(Duration::from_millis(1)),
            keepalive: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            shared: Arc::default(),
        }
    }
}

impl std::fmt::Debug for QuicOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicOptions")
            .field("bind", &self.bind)
            .field("device", &self.device)
            .field("share_connection", &self.share_connection)
            .field("stream_window_bytes", &self.stream_window_bytes)
            .field("connection_window_bytes", &self.connection_window_bytes)
            .field("send_window_bytes", &self.send_window_bytes)
            .field("socket_buffer_bytes", &self.socket_buffer_bytes)
            .field("mtu_upper_bound", &self.mtu_upper_bound)
            .field("max_ack_delay", &self.max_ack_delay)
            .finish_non_exhaustive()
    }
}

impl QuicOptions {
    /// Every channel of a session as a stream of one connection.
    pub fn shared() -> Self {
        Self { share_connection: true, ..Self::default() }
    }

    fn transport_config(&self, incoming_streams: u32) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_window_bytes))
            .receive_window(VarInt::from_u32(self.connection_window_bytes))
            .send_window(self.send_window_bytes)
            .max_concurrent_bidi_streams(VarInt::from_u32(incoming_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(self.keepalive))
            .max_idle_timeout(Some((self.keepalive * 5).try_into().unwrap_or(VarInt::from_u32(5000).into())))
            .enable_segmentation_offload(true);
        if let Some(d) = self.max_ack_delay {
            // Ask the peer to acknowledge every other packet (quinn's threshold) and to hold a
            // lone packet's acknowledgement at most `d` (module docs, Tuning).
            let mut af = quinn::AckFrequencyConfig::default();
            af.ack_eliciting_threshold(VarInt::from_u32(1)).max_ack_delay(Some(d));
            t.ack_frequency_config(Some(af));
        }
        match self.mtu_upper_bound {
            Some(b) => {
                let mut m = MtuDiscoveryConfig::default();
                m.upper_bound(b);
                t.mtu_discovery_config(Some(m));
            }
            None => {
                t.mtu_discovery_config(None);
            }
        }
        t
    }

    /// A UDP socket bound to `addr` (and the device), with large buffers.
    fn socket(&self, addr: SocketAddr, device: Option<&str>) -> Result<UdpSocket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if let Some(d) = device {
            s.bind_device(Some(d.as_bytes()))?;
        }
        set_buffers(&s, self.socket_buffer_bytes);
        s.bind(&addr.into())?;
        Ok(s.into())
    }
}

/// Ask for `bytes` of socket buffers; where `rmem_max`/`wmem_max` are lower and we may (root),
/// force them. Smaller buffers only cost throughput, so failures are ignored.
fn set_buffers(s: &Socket, bytes: usize) {
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
    let want = bytes.min(i32::MAX as usize) as libc::c_int;
    for (opt, have) in [
        (libc::SO_RCVBUFFORCE, s.recv_buffer_size().unwrap_or(0)),
        (libc::SO_SNDBUFFORCE, s.send_buffer_size().unwrap_or(0)),
    ] {
        if have < bytes {
            use std::os::fd::AsRawFd;
            // SAFETY: setsockopt reads one int from the pointer for the length given; fd is ours.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&want as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(std::io::Error::other(format!("quic: TLS setup: {e}")))
}

fn quic_error(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(std::io::Error::other(format!("quic: {what}: {e}")))
}

/// Accepts any server certificate whose TLS 1.3 signature verifies: the peer is authenticated
/// by Ferry's handshake bound to the TLS exporter (module docs), not by the certificate.
#[derive(Debug)]
struct BoundByHandshake(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for BoundByHandshake {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured; QUIC has no TLS 1.2.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(o: &QuicOptions, creds: &Credentials) -> Result<quinn::ClientConfig> {
    let tls = match creds {
        Credentials::Tls(t) => t.client_with_alpn(ALPN).map_err(tls_error)?,
        Credentials::Psk(_) => {
            let p = provider();
            let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls_error)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(BoundByHandshake(p)))
                .with_no_client_auth();
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls
        }
    };
    let mut c = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(tls_error)?));
    c.transport_config(Arc::new(o.transport_config(0)));
    Ok(c)
}

fn server_config(o: &QuicOptions, creds: &Credentials) -> Result<quinn::ServerConfig> {
    let tls = match creds {
        Credentials::Tls(t) => t.server_with_alpn(ALPN),
        Credentials::Psk(_) => {
            let ck = rcgen::generate_simple_self_signed(vec!["ferry".to_string()]).map_err(tls_error)?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
            let mut tls = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(tls_error)?
                .with_no_client_auth()
                .with_single_cert(vec![ck.cert.der().clone()], key)
                .map_err(tls_error)?;
            tls.alpn_protocols = vec![ALPN.to_vec()];
            tls
        }
    };
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(tls_error)?));
    // A session has at most a few dozen channels.
    s.transport_config(Arc::new(o.transport_config(64)));
    s.max_incoming(256);
    Ok(s)
}

/// The key Ferry's handshake runs under on this connection (module docs), and with host
/// certificates the SHA-256 of the peer's.
fn bound_key(creds: &Credentials, conn: &Connection) -> Result<(Credentials, Option<[u8; 32]>)> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, &[])
        .map_err(|_| quic_error("TLS exporter", "unavailable"))?;
    match creds {
        Credentials::Psk(psk) => Ok((Credentials::Psk(psk.derive(KEY_LABEL, &ekm)), None)),
        Credentials::Tls(_) => {
            let peer = conn
                .peer_identity()
                .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|c| c.first().map(crate::tls::fingerprint));
            Ok((Credentials::Psk(Psk::from_secret(&ekm)), peer))
        }
    }
}

/// A connection and the endpoint it lives on, held by every channel on it (the connection closes
/// when the last channel lets go).
struct Conn {
    conn: Connection,
    /// The endpoint it lives on, kept alive with it.
    _endpoint: Option<Endpoint>,
}

/// Cuts a channel: wakes its threads out of any wait (they reset/stop their stream on the way
/// out).
#[derive(Default)]
struct Cut {
    cut: AtomicBool,
    notify: Notify,
}

/// A data-path thread's way into the runtime: wait on a future, giving up when cut or at a
/// deadline.
#[derive(Clone)]
struct Bridge {
    rt: Handle,
    cut: Arc<Cut>,
}

impl Bridge {
    fn new() -> Self {
        Self { rt: runtime().handle().clone(), cut: Arc::default() }
    }

    fn wait<T>(&self, deadline: Option<Instant>, fut: impl Future<Output = T>) -> Result<T> {
        let cut = &self.cut;
        self.rt.block_on(async move {
            let notified = cut.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cut.cut.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = fut => Ok(r),
                _ = notified => Err(TransportError::Closed),
                _ = timer => Err(HandshakeError::Timeout.into()),
            }
        })
    }
}

/// The reading side of a stream, bridged: chunks taken from quinn, copied out on demand.
struct Reader {
    recv: RecvStream,
    chunks: VecDeque<Bytes>,
    slots: Vec<Bytes>,
    bridge: Bridge,
    eof: bool,
}

impl Reader {
    fn new(recv: RecvStream, bridge: Bridge) -> Self {
        Self { recv, chunks: VecDeque::new(), slots: vec![Bytes::new(); CHUNKS_PER_READ], bridge, eof: false }
    }

    /// Take more chunks; `false` at the end of the stream.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let (recv, slots) = (&mut self.recv, &mut self.slots);
        let r = self.bridge.wait(deadline, recv.read_chunks(slots));
        match r {
            Err(e) => {
                let _ = self.recv.stop(VarInt::from_u32(CODE_CUT));
                Err(e)
            }
            Ok(Err(e)) => Err(TransportError::Io(e.into())),
            Ok(Ok(None)) => {
                self.eof = true;
                Ok(false)
            }
            Ok(Ok(Some(n))) => {
                for s in &mut self.slots[..n] {
                    self.chunks.push_back(std::mem::take(s));
                }
                Ok(true)
            }
        }
    }

    /// Copy the next `len` bytes to `dst` through `put(dst_offset, bytes)`.
    fn read_with(&mut self, len: usize, deadline: Option<Instant>, mut put: impl FnMut(usize, &[u8])) -> Result<()> {
        let mut done = 0;
        while done < len {
            let Some(c) = self.chunks.front_mut() else {
                if !self.fill(deadline)? {
                    return Err(TransportError::Truncated);
                }
                continue;
            };
            let n = c.len().min(len - done);
            put(done, &c[..n]);
            if n == c.len() {
                self.chunks.pop_front();
            } else {
                let _ = c.split_to(n);
            }
            done += n;
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
        self.read_with(buf.len(), deadline, |off, b| buf[off..off + b.len()].copy_from_slice(b))
    }

    /// Copy the next `len` bytes into memory at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes (destination guest memory under the
    /// [`MemorySink`] contract, borrowed for the call) and not overlap the received chunks.
    unsafe fn read_to(&mut self, dst: NonNull<u8>, len: usize, deadline: Option<Instant>) -> Result<()> {
        self.read_with(len, deadline, |off, b| {
            // SAFETY: off + b.len() <= len, inside the range the caller vouched for; chunks are
            // quinn's buffers, never guest memory.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.as_ptr().add(off), b.len()) }
        })
    }

    /// Whether the stream ended before another byte.
    fn at_eof(&mut self, deadline: Option<Instant>) -> Result<bool> {
        while self.chunks.front().is_none_or(|c| c.is_empty()) {
            self.chunks.pop_front();
            if self.chunks.is_empty() && !self.fill(deadline)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The writing side of a stream, bridged.
struct Writer {
    send: SendStream,
    bridge: Bridge,
}

impl Writer {
    fn write(&mut self, b: Bytes) -> Result<()> {
        let send = &mut self.send;
        match self.bridge.wait(None, send.write_chunk(b)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TransportError::Io(e.into())),
            Err(e) => {
                let _ = self.send.reset(VarInt::from_u32(CODE_CUT));
                Err(e)
            }
        }
    }
}

fn read_handshake_frame(r: &mut Reader, deadline: Instant) -> Result<(FrameKind, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    r.read_exact(&mut hb, Some(deadline))?;
    let h = FrameHeader::decode(&hb)?;
    if h.len > MAX_SMALL_LEN {
        return Err(WireError::Unexpected(h.kind).into());
    }
    let mut p = vec![0u8; h.len as usize];
    r.read_exact(&mut p, Some(deadline))?;
    Ok((h.kind, p))
}

fn build_channel(
    conn: Arc<Conn>,
    shared: bool,
    send: SendStream,
    reader: Reader,
    (est, image_key): (Established, crate::crypto::ImageKey),
    local: Option<SocketAddr>,
) -> Channel {
    let bridge = reader.bridge.clone();
    // Frames on a quic stream are protected by its TLS 1.3 session, not sealed again; the
    // handshake still yields the image key that keys the migration's digest.
    let info =
        ChannelInfo { established: est, backend: "quic", local, peer: Some(conn.conn.remote_address()), image_key };
    let cut = bridge.cut.clone();
    let whole = (!shared).then(|| conn.conn.clone());
    let killer: Killer = Arc::new(move || {
        cut.cut.store(true, Ordering::Release);
        cut.notify.notify_waiters();
        if let Some(c) = &whole {
            c.close(VarInt::from_u32(CODE_CUT), b"channel cut");
        }
    });
    Channel {
        tx: Box::new(QuicTx { w: Writer { send, bridge }, pool: Vec::new(), spans: Vec::new(), _conn: conn.clone() }),
        rx: Box::new(QuicRx { r: reader, var: Vec::new(), _conn: conn }),
        info,
        killer,
    }
}

impl QuicOptions {
    fn endpoint_for(&self, path: &Path, creds: &Credentials) -> Result<Endpoint> {
        let local = path.local.or(self.bind).unwrap_or_else(|| match path.remote {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        });
        let device = path.device.as_deref().or(self.device.as_deref());
        let sock = self.socket(local, device)?;
        let _g = runtime().enter();
        let mut ep = Endpoint::new(EndpointConfig::default(), None, sock, Arc::new(quinn::TokioRuntime))?;
        ep.set_default_client_config(client_config(self, creds)?);
        Ok(ep)
    }

    /// The connection a channel on `path` rides on: a new one, or the session's (shared).
    fn connection(&self, path: &Path, session: SessionId, creds: &Credentials, bridge: &Bridge) -> Result<Arc<Conn>> {
        let key: SharedKey = (session, path.remote, path.local.or(self.bind), path.device.clone());
        if self.share_connection {
            let mut m = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, w| w.strong_count() > 0);
            if let Some(c) = m.get(&key).and_then(Weak::upgrade) {
                if c.conn.close_reason().is_none() {
                    return Ok(c);
                }
            }
        }
        let ep = self.endpoint_for(path, creds)?;
        let name = match creds {
            Credentials::Tls(t) => t.server_name().to_str().into_owned(),
            Credentials::Psk(_) => "ferry".to_string(),
        };
        let connecting = {
            // quinn spawns the connection's driver task here: inside the runtime.
            let _g = runtime().enter();
            ep.connect(path.remote, &name).map_err(|e| quic_error("connect", e))?
        };
        let deadline = Instant::now() + self.connect_timeout;
        let conn = bridge.wait(Some(deadline), connecting)?.map_err(|e| quic_error("connect", e))?;
        let c = Arc::new(Conn { conn, _endpoint: Some(ep) });
        if self.share_connection {
            self.shared.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Arc::downgrade(&c));
        }
        Ok(c)
    }
}

impl Connector for QuicOptions {
    fn transport(&self) -> &'static str {
        "quic"
    }

    fn connect(&self, path: &Path, hs: ClientConfig) -> Result<Channel> {
        let (conn, w, reader, est) = self.connect_stream(path, hs)?;
        let local = conn._endpoint.as_ref().and_then(|e| e.local_addr().ok());
        Ok(build_channel(conn, self.share_connection, w.send, reader, est, local))
    }
}

impl QuicOptions {
    /// Open a stream on `path` (a new connection, or the session's) and run the client handshake.
    #[allow(clippy::type_complexity)]
    fn connect_stream(
        &self,
        path: &Path,
        mut hs: ClientConfig,
    ) -> Result<(Arc<Conn>, Writer, Reader, (Established, crate::crypto::ImageKey))> {
        // Pages go raw: no zstd, no rdma on this backend.
        hs.caps = Caps(0);
        let bridge = Bridge::new();
        let deadline = Instant::now() + hs.timeout;
        let conn = self.connection(path, hs.binding.session, &hs.creds, &bridge)?;
        let r = (|| {
            let (send, recv) =
                bridge.wait(Some(deadline), conn.conn.open_bi())?.map_err(|e| quic_error("open stream", e))?;
            let (key, peer) = bound_key(&hs.creds, &conn.conn)?;
            hs.creds = key;
            let mut reader = Reader::new(recv, bridge.clone());
            let (mut m, hello) = ClientHandshake::start(hs, random_bytes(), Instant::now());
            let mut w = Writer { send, bridge };
            w.write(Bytes::from(hello))?;
            loop {
                let (k, p) = read_handshake_frame(&mut reader, m.poll_timeout())?;
                match m.handle_frame(k, &p, Instant::now())? {
                    Step::Send(f) => w.write(Bytes::from(f))?,
                    Step::Done(mut est) => {
                        let keys = m.take_keys().ok_or(WireError::Unexpected(k))?;
                        est.peer_cert = peer;
                        return Ok((w, reader, (est, keys.image)));
                    }
                    Step::Verified(_) => return Err(WireError::Unexpected(k).into()),
                }
            }
        })();
        match r {
            Ok((w, reader, est)) => Ok((conn, w, reader, est)),
            // The peer closed the connection (a TLS alert for our certificate, say): its reason
            // says more than the stream's error.
            Err(e) => Err(match conn.conn.close_reason() {
                Some(why) => quic_error("connection closed by the peer", why),
                None => e,
            }),
        }
    }
}

/// A stream accepted on a connection, not yet authenticated.
struct Incomer {
    conn: Arc<Conn>,
    send: SendStream,
    recv: RecvStream,
}

/// Accepts `quic` channels on a UDP port.
pub struct QuicAcceptor {
    endpoint: Endpoint,
    incoming: Mutex<mpsc::Receiver<Incomer>>,
    hs: ServerConfig,
    stop: Arc<Notify>,
}

impl QuicAcceptor {
    /// Listen on `addr` (port 0 picks a free port). Connections are accepted (TLS handshake
    /// under `hs.timeout`) by the runtime; each stream opened on them is a pending channel.
    pub fn bind(addr: SocketAddr, opts: QuicOptions, mut hs: ServerConfig) -> Result<Self> {
        hs.caps = Caps(0);
        let sock = opts.socket(addr, opts.device.as_deref())?;
        let _g = runtime().enter();
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(server_config(&opts, &hs.creds)?),
            sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (tx, rx) = mpsc::sync_channel(64);
        let stop = Arc::new(Notify::new());
        runtime().spawn(serve(endpoint.clone(), tx, hs.timeout, stop.clone()));
        Ok(Self { endpoint, incoming: Mutex::new(rx), hs, stop })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    fn next(&self, wait: Duration) -> Result<Option<QuicPending>> {
        let rx = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(wait) {
            Ok(i) => Ok(Some(QuicPending { i, hs: self.hs.clone(), local: self.endpoint.local_addr().ok() })),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::Closed),
        }
    }
}

impl Drop for QuicAcceptor {
    fn drop(&mut self) {
        // Stop taking connections; the channels already accepted live on (as a TCP socket
        // outlives its listener), and the port is released when the last of them closes.
        self.endpoint.set_server_config(None);
        self.stop.notify_one();
    }
}

/// The acceptor's task: take connections, then their streams, and queue the streams.
async fn serve(endpoint: Endpoint, tx: mpsc::SyncSender<Incomer>, handshake: Duration, stop: Arc<Notify>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = stop.notified() => return,
        };
        let tx = tx.clone();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(handshake, incoming).await else { return };
            let c = Arc::new(Conn { conn: conn.clone(), _endpoint: Some(ep) });
            while let Ok((send, recv)) = conn.accept_bi().await {
                match tx.try_send(Incomer { conn: c.clone(), send, recv }) {
                    Ok(()) => {}
                    // Too many unauthenticated streams queued: this one is refused (dropped).
                    Err(mpsc::TrySendError::Full(_)) => {}
                    Err(mpsc::TrySendError::Disconnected(_)) => return,
                }
            }
        });
    }
}

/// A `quic` stream accepted and not yet authenticated.
pub struct QuicPending {
    i: Incomer,
    hs: ServerConfig,
    local: Option<SocketAddr>,
}

impl PendingChannel for QuicPending {
    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.i.conn.conn.remote_address())
    }

    fn closer(&self) -> Result<Killer> {
        let c = self.i.conn.conn.clone();
        Ok(Arc::new(move || c.close(VarInt::from_u32(CODE_CUT), b"handshake closed")))
    }

    fn establish(self: Box<Self>, deadline: Instant, admit: Admit<'_>) -> Result<Channel> {
        let Incomer { conn, send, recv } = self.i;
        let bridge = Bridge::new();
        let mut hs = self.hs;
        let (key, peer) = bound_key(&hs.creds, &conn.conn)?;
        hs.creds = key;
        let mut reader = Reader::new(recv, bridge.clone());
        let mut w = Writer { send, bridge: bridge.clone() };
        let mut m = ServerHandshake::new(hs, random_bytes(), Instant::now());
        let deadline = deadline.min(m.poll_timeout());
        let est = loop {
            let (k, p) = read_handshake_frame(&mut reader, deadline)?;
            match m.handle_frame(k, &p, Instant::now())? {
                Step::Send(f) => w.write(Bytes::from(f))?,
                Step::Verified(mut est) => {
                    est.peer_cert = peer;
                    match admit(&est) {
                        Ok(()) => {
                            w.write(Bytes::from(m.accept()?))?;
                            let keys = m.take_keys().ok_or(WireError::Unexpected(k))?;
                            break (est, keys.image);
                        }
                        Err(reason) => {
                            let _ = w.write(Bytes::from(m.reject(&reason)));
                            let _ = w.send.finish();
                            return Err(HandshakeError::Rejected(reason).into());
                        }
                    }
                }
                Step::Done(_) => return Err(WireError::Unexpected(k).into()),
            }
        };
        // A server's channels share its connection only if the client opened them so; cutting
        // one cuts its stream, never the connection.
        Ok(build_channel(conn, true, w.send, reader, est, self.local))
    }
}

impl Acceptor for QuicAcceptor {
    fn transport(&self) -> &'static str {
        "quic"
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        QuicAcceptor::local_addr(self)
    }

    fn accept_within(&self, wait: Duration, admit: Admit<'_>) -> Result<Option<Channel>> {
        match self.next(wait)? {
            Some(p) => {
                let deadline = Instant::now() + self.hs.timeout;
                Box::new(p).establish(deadline, admit).map(Some)
            }
            None => Ok(None),
        }
    }

    fn accept_pending(&self, wait: Duration) -> Result<Option<Box<dyn PendingChannel>>> {
        Ok(self.next(wait)?.map(|p| Box::new(p) as Box<dyn PendingChannel>))
    }
}

/// Sending half of a `quic` channel.
struct QuicTx {
    w: Writer,
    /// Batch buffers handed to the stream; reused once the stream has dropped them.
    pool: Vec<Bytes>,
    spans: Vec<(NonNull<u8>, usize)>,
    _conn: Arc<Conn>,
}

// SAFETY: `spans` holds addresses only between the resolution of a batch's runs and its copy,
// within one `send_pages` call (cleared at its start); they are never dereferenced elsewhere.
unsafe impl Send for QuicTx {}

impl QuicTx {
    /// A buffer of `len` bytes to fill: a pooled one the stream has let go of, or a new one.
    fn buffer(&mut self, len: usize) -> BytesMut {
        let mut b = match self.pool.iter().position(Bytes::is_unique) {
            Some(i) => self.pool.swap_remove(i).try_into_mut().unwrap_or_else(|_| BytesMut::new()),
            None => BytesMut::new(),
        };
        // Keep the old contents (they are overwritten): only growth is zero-filled.
        if b.len() > len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    fn send_small(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        self.w.write(Bytes::from(encode_frame(kind, payload)))
    }

    fn send_pages(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        known: Option<&[u8]>,
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        let total = check_send_request(runs, flags)?;
        if let Some(k) = known {
            check_data_map(total, k)?;
        }
        let mut map = vec![0u8; (total as usize).div_ceil(8)];
        self.spans.clear();
        let mut i = 0usize;
        for r in runs {
            if r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(TransportError::InvalidBatch("unaligned run"));
            }
            let base = src
                .source_slice(r.gpa, r.len())
                .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                .as_ptr();
            let mut open: Option<(NonNull<u8>, usize)> = None;
            for p in 0..r.pages as usize {
                // SAFETY: p < r.pages, so the page lies inside the run the source vouched for.
                let page = unsafe { base.add(p * PAGE_SIZE) };
                let zero = match known {
                    Some(k) => k[i / 8] & (1 << (i % 8)) == 0,
                    // SAFETY: page aligned (gpa aligned, regions page aligned), 4096 bytes valid.
                    None => unsafe { page_is_zero(page) },
                };
                if zero {
                    self.spans.extend(open.take());
                } else {
                    map[i / 8] |= 1 << (i % 8);
                    match &mut open {
                        Some((_, len)) => *len += PAGE_SIZE,
                        None => open = Some((page, PAGE_SIZE)),
                    }
                }
                i += 1;
            }
            self.spans.extend(open.take());
        }
        let data_pages: u32 = map.iter().map(|b| b.count_ones()).sum();
        let raw_len = data_pages as usize * PAGE_SIZE;
        let header = BatchHeader {
            id,
            round,
            encoding: Encoding::Raw,
            flags,
            runs: runs.to_vec(),
            data_map: map,
            data_len: raw_len as u32,
        };
        let mut hdr = Vec::with_capacity(HEADER_LEN + header.encoded_len());
        hdr.extend_from_slice(&FrameHeader::new(FrameKind::PageBatch, header.encoded_len() + raw_len).encode());
        header.encode_into(&mut hdr);
        let wire = hdr.len() + raw_len;
        let mut buf = self.buffer(wire);
        buf[..hdr.len()].copy_from_slice(&hdr);
        let mut off = hdr.len();
        for &(p, len) in &self.spans {
            // SAFETY: the span lies in a run resolved above through `src`, borrowed for this call,
            // page aligned and valid for `len` bytes; it is read with volatile word reads.
            unsafe { copy_from_guest(&mut buf[off..off + len], p) };
            off += len;
        }
        self.spans.clear();
        let b = buf.freeze();
        if self.pool.len() >= POOL {
            self.pool.remove(0);
        }
        self.pool.push(b.clone());
        self.w.write(b)?;
        Ok(SentBatch {
            pages: total,
            data_pages,
            zero_pages: total - data_pages,
            wire_bytes: wire as u64,
            compressed: false,
        })
    }
}

impl ChannelTx for QuicTx {
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.send_pages(id, round, flags, runs, None, src)
    }

    fn send_batch_mapped(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        data_map: &[u8],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.send_pages(id, round, flags, runs, Some(data_map), src)
    }

    fn send_control(&mut self, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_CONTROL_LEN as usize {
            return Err(TransportError::InvalidBatch("control message longer than 1 MiB"));
        }
        self.send_small(FrameKind::Control, msg)
    }

    fn send_ack(&mut self, ack: Ack) -> Result<()> {
        self.send_small(FrameKind::BatchAck, &ack.encode())
    }

    fn send_abort(&mut self, code: u16, reason: &str) -> Result<()> {
        self.send_small(FrameKind::Abort, &AbortMsg { code, reason: reason.to_string() }.encode())
    }

    fn close(&mut self) -> Result<()> {
        self.send_small(FrameKind::Goodbye, &[])?;
        let _ = self.w.send.finish();
        // Wait (bounded) until the peer has every byte: a connection closed while data is
        // unacknowledged would drop it, Goodbye included.
        let stopped = self.w.send.stopped();
        let _ = self.w.bridge.wait(Some(Instant::now() + Duration::from_secs(5)), stopped);
        Ok(())
    }
}

/// Receiving half of a `quic` channel.
struct QuicRx {
    r: Reader,
    var: Vec<u8>,
    _conn: Arc<Conn>,
}

impl QuicRx {
    fn recv_batch(&mut self, len: usize, sink: &dyn MemorySink) -> Result<ReceivedBatch> {
        let mut fixed = [0u8; BATCH_FIXED_LEN];
        self.r.read_exact(&mut fixed, None)?;
        let f = BatchFixed::decode(&fixed)?;
        if f.frame_len() != len {
            return Err(WireError::BadBatch("frame length does not match the batch").into());
        }
        self.var.resize(f.var_len(), 0);
        let mut var = std::mem::take(&mut self.var);
        let r = self.r.read_exact(&mut var, None);
        let h = r.and_then(|()| Ok(BatchHeader::decode_var(&f, &var)?));
        self.var = var;
        let h = h?;
        if h.encoding != Encoding::Raw {
            return Err(TransportError::NotNegotiated("zstd"));
        }
        // The receiver's word on the batch (its round) before any page is touched.
        sink.admit_batch(h.round).map_err(TransportError::BatchRefused)?;
        let zeroed = h.flags & BATCH_DEST_ZEROED != 0;
        // Resolve every run before touching memory: a bad address fails the batch whole.
        let mut bases = Vec::with_capacity(h.runs.len());
        for r in &h.runs {
            bases.push(
                sink.sink_slice(r.gpa, r.len())
                    .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                    .as_ptr(),
            );
        }
        let mut i = 0;
        for (r, base) in h.runs.iter().zip(&bases) {
            let mut p = 0usize;
            while p < r.pages as usize {
                // A stretch of data pages goes in one copy loop; a zero page is zeroed here.
                let start = p;
                while p < r.pages as usize && h.is_data(i + p) {
                    p += 1;
                }
                if p > start {
                    // SAFETY: start < p <= pages: inside the run the sink vouched for.
                    let at = unsafe { NonNull::new_unchecked(base.as_ptr().add(start * PAGE_SIZE)) };
                    // SAFETY: sink memory valid for (p - start) pages while `sink` is borrowed, a
                    // raw write under ferry_memory's access contract.
                    unsafe { self.r.read_to(at, (p - start) * PAGE_SIZE, None)? };
                    continue;
                }
                if !zeroed {
                    // SAFETY: p < pages; sink memory, written raw under the access contract.
                    unsafe { base.as_ptr().add(p * PAGE_SIZE).write_bytes(0, PAGE_SIZE) };
                }
                p += 1;
            }
            i += r.pages as usize;
        }
        Ok(ReceivedBatch {
            id: h.id,
            round: h.round,
            pages: h.total_pages(),
            data_pages: h.data_pages(),
            wire_bytes: (HEADER_LEN + len) as u64,
            runs: h.runs,
        })
    }
}

impl ChannelRx for QuicRx {
    fn recv(&mut self, sink: &dyn MemorySink) -> Result<Incoming> {
        if self.r.at_eof(None)? {
            return Err(TransportError::Closed);
        }
        let mut hb = [0u8; HEADER_LEN];
        self.r.read_exact(&mut hb, None)?;
        let h = FrameHeader::decode(&hb)?;
        let len = h.len as usize;
        match h.kind {
            FrameKind::PageBatch => Ok(Incoming::Batch(self.recv_batch(len, sink)?)),
            FrameKind::Control => {
                let mut p = vec![0u8; len];
                self.r.read_exact(&mut p, None)?;
                Ok(Incoming::Control(p))
            }
            FrameKind::BatchAck => {
                let mut p = [0u8; crate::wire::ACK_LEN];
                if len != p.len() {
                    return Err(WireError::Truncated.into());
                }
                self.r.read_exact(&mut p, None)?;
                Ok(Incoming::Ack(Ack::decode(&p)?))
            }
            FrameKind::Goodbye => Ok(Incoming::Closed),
            FrameKind::Abort => {
                let mut p = vec![0u8; len];
                self.r.read_exact(&mut p, None)?;
                let m = AbortMsg::decode(&p)?;
                Err(TransportError::PeerAborted { code: m.code, reason: m.reason })
            }
            k => Err(WireError::Unexpected(k).into()),
        }
    }
}

/// A test peer: a stream that completed a genuine handshake, to write raw bytes on (conformance
/// suite: malformed frames after the handshake).
pub struct RawStream {
    w: Writer,
    _r: Reader,
    _conn: Arc<Conn>,
}

impl RawStream {
    /// Connect to `addr` and run the client handshake with `hs`, then hand over the stream.
    pub fn connect(addr: SocketAddr, hs: ClientConfig) -> Result<Self> {
        let (conn, w, r, _) = QuicOptions::default().connect_stream(&Path::to(addr), hs)?;
        Ok(Self { w, _r: r, _conn: conn })
    }

    /// Write bytes as they are.
    pub fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        self.w.write(Bytes::copy_from_slice(b))
    }

    /// Reset the stream (an abrupt close).
    pub fn close(&mut self) {
        let _ = self.w.send.finish();
        let stopped = self.w.send.stopped();
        let _ = self.w.bridge.wait(Some(Instant::now() + Duration::from_secs(2)), stopped);
    }
}
