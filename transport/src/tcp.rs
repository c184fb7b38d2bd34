//! The `tcp` and `zstd` backends: one TCP stream per channel, tuned with socket2.
//!
//! - large socket buffers (a batch is up to 4 MiB), `TCP_NODELAY` (control messages and acks are
//!   small and latency matters at switchover);
//! - bind to a chosen local address and/or interface (`SO_BINDTODEVICE`) so a channel uses the NIC
//!   it was planned on;
//! - keepalive and `TCP_USER_TIMEOUT`, so a dead peer is noticed within seconds instead of the
//!   kernel's default of many minutes.
//!
//! `zstd` is this backend with the `ZSTD` capability negotiated and a compression level set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::channel::{Channel, ChannelInfo, Killer};
use crate::crypto::{ChannelKeys, Encryption};
use crate::endpoint::{Acceptor, Admit, Connector, Path, PendingChannel};
use crate::error::{HandshakeError, Result, TransportError};
use crate::handshake::{
    random_bytes, Caps, ClientConfig, ClientHandshake, Established, Psk, ServerConfig, ServerHandshake, Step,
};
use crate::stream::{StreamRx, StreamTx};
use crate::tls::{fingerprint, Credentials, EXPORTER_LABEL};
use crate::wire::{encode_frame, FrameHeader, FrameKind, HEADER_LEN, MAGIC, MAX_SMALL_LEN};

/// Options of a TCP channel.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Local address to bind before connecting (choose the NIC by address).
    pub bind: Option<SocketAddr>,
    /// Interface to bind to (`SO_BINDTODEVICE`).
    pub device: Option<String>,
    /// Socket send and receive buffer size.
    pub buffer_bytes: Option<usize>,
    /// Keepalive idle time (probes follow every second, 3 of them).
    pub keepalive: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: unacknowledged data older than this kills the connection.
    pub user_timeout: Option<Duration>,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Compress batches with zstd at this level (the `zstd` option); `None` sends raw.
    pub zstd_level: Option<i32>,
    /// With zstd: choose per batch between compressed and raw by which has been delivering data
    /// faster ([`crate::stream::CompressChooser`]): compression pays only where the link is slower
    /// than the compressor. `false` compresses every batch (still raw when it saves < 1/8).
    pub adaptive: bool,
    /// Protection of the channels these options open: overrides the client configuration's
    /// mode, so an operator's choice made with the transport option reaches every channel a
    /// session opens (`None`: the configuration's).
    pub encryption: Option<Encryption>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            bind: None,
            device: None,
            buffer_bytes: Some(4 << 20),
            keepalive: Some(Duration::from_secs(2)),
            user_timeout: Some(Duration::from_secs(3)),
            connect_timeout: Duration::from_secs(5),
            zstd_level: None,
            adaptive: true,
            encryption: None,
        }
    }
}

impl TcpOptions {
    /// Default options of the `zstd` backend (fast level).
    pub fn zstd() -> Self {
        Self { zstd_level: Some(1), ..Self::default() }
    }
}

fn tune(s: &SockRef<'_>, o: &TcpOptions) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    if let Some(b) = o.buffer_bytes {
        s.set_send_buffer_size(b)?;
        s.set_recv_buffer_size(b)?;
    }
    if let Some(k) = o.keepalive {
        let ka = TcpKeepalive::new().with_time(k).with_interval(Duration::from_secs(1)).with_retries(3);
        s.set_tcp_keepalive(&ka)?;
    }
    if let Some(t) = o.user_timeout {
        s.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

/// Fill `buf` from `s`, giving up at `deadline`: the socket's read timeout is set to the time
/// left before every read, so a peer that dribbles a byte at a time cannot stretch the wait
/// (a per-read timeout alone would restart with every byte).
fn read_before(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(TransportError::Truncated),
            Ok(n) => got += n,
            Err(e) => match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    return Err(HandshakeError::Timeout.into())
                }
                _ => return Err(TransportError::Io(e)),
            },
        }
    }
    Ok(())
}

fn finish(sock: TcpStream, est: Established, keys: ChannelKeys, opts: &TcpOptions) -> Result<Channel> {
    let zstd_level = opts.zstd_level;
    sock.set_read_timeout(None)?;
    let zstd = est.caps.contains(Caps::ZSTD);
    let level = if zstd { zstd_level } else { None };
    let info = ChannelInfo {
        established: est,
        backend: if level.is_some() { "zstd" } else { "tcp" },
        local: sock.local_addr().ok(),
        peer: sock.peer_addr().ok(),
        image_key: keys.image.clone(),
    };
    let k = sock.try_clone()?;
    let killer = Arc::new(move || {
        let _ = k.shutdown(std::net::Shutdown::Both);
    });
    Ok(Channel {
        tx: Box::new(StreamTx::new(sock.try_clone()?, level, keys.sealer())?.adaptive(opts.adaptive)),
        rx: Box::new(StreamRx::new(sock, zstd, keys.opener())?),
        info,
        killer,
    })
}

/// Connect a channel to `addr` and run the client handshake (the `rdma` capability is not
/// offered: this channel carries its pages on the stream).
pub fn connect(addr: SocketAddr, opts: &TcpOptions, mut hs: ClientConfig) -> Result<Channel> {
    hs.caps = Caps(hs.caps.0 & !Caps::RDMA.0);
    let (s, est, keys) = connect_stream(addr, opts, hs)?;
    finish(s, est, keys, opts)
}

impl Connector for TcpOptions {
    fn transport(&self) -> &'static str {
        if self.zstd_level.is_some() {
            "zstd"
        } else {
            "tcp"
        }
    }

    fn connect(&self, path: &Path, hs: ClientConfig) -> Result<Channel> {
        let o = TcpOptions {
            bind: path.local.or(self.bind),
            device: path.device.clone().or_else(|| self.device.clone()),
            ..self.clone()
        };
        connect(path.remote, &o, hs)
    }
}

/// Connect to `addr` and run the client handshake; return the authenticated socket itself (for
/// backends that carry their control path on it, such as `rdma`) with the channel's keys. With
/// host certificates the handshake runs inside mutual TLS first ([`crate::tls`]).
pub fn connect_stream(
    addr: SocketAddr,
    opts: &TcpOptions,
    mut hs: ClientConfig,
) -> Result<(TcpStream, Established, ChannelKeys)> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(dev) = &opts.device {
        sock.bind_device(Some(dev.as_bytes()))?;
    }
    if let Some(b) = opts.bind {
        sock.bind(&b.into())?;
    }
    tune(&SockRef::from(&sock), opts)?;
    sock.connect_timeout(&addr.into(), opts.connect_timeout)?;
    let mut s: TcpStream = sock.into();
    if let Some(m) = opts.encryption {
        hs.encryption = m;
    }
    if opts.zstd_level.is_none() {
        hs.caps = Caps(hs.caps.0 & !Caps::ZSTD.0);
    }
    let deadline = Instant::now() + hs.timeout;
    let (est, keys) = match hs.creds.clone() {
        Credentials::Psk(_) => client_exchange(&mut RawIo { r: Pre::new(&mut s) }, hs, deadline)?,
        Credentials::Tls(t) => {
            let conn = rustls::ClientConnection::new(t.client(), t.server_name())
                .map_err(|e| HandshakeError::Tls(e.to_string()))?;
            let mut io = TlsIo { r: Pre::new(&mut s), conn: conn.into(), plain: Vec::new() };
            io.handshake(deadline)?;
            let (key, peer) = io.exporter()?;
            hs.creds = Credentials::Psk(key);
            let (mut est, keys) = client_exchange(&mut io, hs, deadline)?;
            io.leave()?;
            est.peer_cert = peer;
            (est, keys)
        }
    };
    s.set_read_timeout(None)?;
    Ok((s, est, keys))
}

/// Ferry's client handshake over `io`.
fn client_exchange(io: &mut dyn FrameIo, hs: ClientConfig, deadline: Instant) -> Result<(Established, ChannelKeys)> {
    let (mut m, hello) = ClientHandshake::start(hs, random_bytes(), Instant::now());
    let deadline = deadline.min(m.poll_timeout());
    io.send(&hello)?;
    loop {
        let (k, p) = io.recv(deadline)?;
        match m.handle_frame(k, &p, Instant::now())? {
            Step::Send(f) => io.send(&f)?,
            Step::Done(est) => {
                let keys = m.take_keys().ok_or(crate::error::WireError::Unexpected(k))?;
                return Ok((est, keys));
            }
            Step::Verified(_) => return Err(crate::error::WireError::Unexpected(k).into()),
        }
    }
}

/// A socket's bytes, after some that were already read (`pre`).
struct Pre<'a> {
    s: &'a mut TcpStream,
    pre: Vec<u8>,
}

impl<'a> Pre<'a> {
    fn new(s: &'a mut TcpStream) -> Self {
        Self { s, pre: Vec::new() }
    }

    fn fill(&mut self, buf: &mut [u8], deadline: Instant) -> Result<()> {
        let n = self.pre.len().min(buf.len());
        buf[..n].copy_from_slice(&self.pre[..n]);
        self.pre.drain(..n);
        if n < buf.len() {
            read_before(self.s, &mut buf[n..], deadline)?;
        }
        Ok(())
    }
}

/// Handshake frames in and out.
trait FrameIo {
    fn send(&mut self, frame: &[u8]) -> Result<()>;
    fn recv(&mut self, deadline: Instant) -> Result<(FrameKind, Vec<u8>)>;
}

/// Frames straight on the socket (a pre-shared key).
struct RawIo<'a> {
    r: Pre<'a>,
}

impl FrameIo for RawIo<'_> {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        Ok(self.r.s.write_all(frame)?)
    }

    fn recv(&mut self, deadline: Instant) -> Result<(FrameKind, Vec<u8>)> {
        let mut hb = [0u8; HEADER_LEN];
        self.r.fill(&mut hb, deadline)?;
        let h = FrameHeader::decode(&hb)?;
        if h.len > MAX_SMALL_LEN {
            return Err(crate::error::WireError::Unexpected(h.kind).into());
        }
        let mut p = vec![0u8; h.len as usize];
        self.r.fill(&mut p, deadline)?;
        Ok((h.kind, p))
    }
}

/// The largest TLS record accepted (2^14 bytes of plaintext plus what sealing adds).
const MAX_TLS_RECORD: usize = (1 << 14) + 256;

/// Frames inside a TLS session (host certificates). Records are read one at a time, by their
/// length, so rustls never holds bytes that follow the last record of the exchange.
struct TlsIo<'a> {
    r: Pre<'a>,
    conn: rustls::Connection,
    /// Decrypted bytes not yet taken as frames.
    plain: Vec<u8>,
}

impl TlsIo<'_> {
    fn flush(&mut self) -> Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.r.s)?;
        }
        Ok(())
    }

    fn read_record(&mut self, deadline: Instant) -> Result<()> {
        let mut hdr = [0u8; 5];
        self.r.fill(&mut hdr, deadline)?;
        if hdr[..4] == MAGIC {
            // A Ferry frame where TLS was expected: a destination with a pre-shared key
            // refusing this one (it says so in a Reject).
            let mut fh = [0u8; HEADER_LEN];
            fh[..5].copy_from_slice(&hdr);
            self.r.fill(&mut fh[5..], deadline)?;
            let h = FrameHeader::decode(&fh)?;
            if h.kind != FrameKind::Reject || h.len > MAX_SMALL_LEN {
                return Err(HandshakeError::Credentials("the peer answered TLS with a Ferry frame".into()).into());
            }
            let mut p = vec![0u8; h.len as usize];
            self.r.fill(&mut p, deadline)?;
            let why = crate::wire::AbortMsg::decode(&p)?.reason;
            return Err(HandshakeError::Rejected(why).into());
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len > MAX_TLS_RECORD {
            return Err(HandshakeError::Tls(format!("a TLS record of {len} bytes")).into());
        }
        let mut rec = vec![0u8; 5 + len];
        rec[..5].copy_from_slice(&hdr);
        self.r.fill(&mut rec[5..], deadline)?;
        let mut rd = &rec[..];
        while !rd.is_empty() {
            self.conn.read_tls(&mut rd)?;
        }
        match self.conn.process_new_packets() {
            Ok(st) => {
                let n = st.plaintext_bytes_to_read();
                if n > 0 {
                    let at = self.plain.len();
                    self.plain.resize(at + n, 0);
                    self.conn.reader().read_exact(&mut self.plain[at..])?;
                }
                Ok(())
            }
            Err(e) => {
                // Send our alert, so the peer learns why.
                let _ = self.flush();
                Err(HandshakeError::Tls(e.to_string()).into())
            }
        }
    }

    /// Run the TLS handshake to its end.
    fn handshake(&mut self, deadline: Instant) -> Result<()> {
        loop {
            self.flush()?;
            if !self.conn.is_handshaking() {
                return Ok(());
            }
            self.read_record(deadline)?;
        }
    }

    /// The key Ferry's handshake runs under (the session's exporter secret) and the SHA-256 of
    /// the certificate the peer presented.
    fn exporter(&self) -> Result<(Psk, Option<[u8; 32]>)> {
        let ekm = self
            .conn
            .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .map_err(|e| HandshakeError::Tls(format!("exporter: {e}")))?;
        let key = Psk::from_secret(&ekm);
        let peer = self.conn.peer_certificates().and_then(|c| c.first()).map(fingerprint);
        Ok((key, peer))
    }

    /// Leave TLS: nothing may be left over (the channel's frames follow raw).
    fn leave(&mut self) -> Result<()> {
        self.flush()?;
        if !self.plain.is_empty() || !self.r.pre.is_empty() {
            return Err(HandshakeError::Tls("data after the handshake inside TLS".into()).into());
        }
        Ok(())
    }
}

impl FrameIo for TlsIo<'_> {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.conn.writer().write_all(frame)?;
        self.flush()
    }

    fn recv(&mut self, deadline: Instant) -> Result<(FrameKind, Vec<u8>)> {
        loop {
            if self.plain.len() >= HEADER_LEN {
                let mut hb = [0u8; HEADER_LEN];
                hb.copy_from_slice(&self.plain[..HEADER_LEN]);
                let h = FrameHeader::decode(&hb)?;
                if h.len > MAX_SMALL_LEN {
                    return Err(crate::error::WireError::Unexpected(h.kind).into());
                }
                let end = HEADER_LEN + h.len as usize;
                if self.plain.len() >= end {
                    let p = self.plain[HEADER_LEN..end].to_vec();
                    self.plain.drain(..end);
                    return Ok((h.kind, p));
                }
            }
            self.read_record(deadline)?;
        }
    }
}

/// Connections the kernel queues before they are accepted (it caps this at
/// `net.core.somaxconn`, 4096 by default). A flood that reconnects hundreds of connections at once
/// must not overflow the queue: the kernel then drops a genuine source's SYN and its connect
/// retries only after a second (the initial retransmission timeout).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Accepts channels on a listening socket.
pub struct TcpAcceptor {
    listener: TcpListener,
    opts: TcpOptions,
    hs: ServerConfig,
}

impl TcpAcceptor {
    /// Listen on `addr` (port 0 picks a free port). The `rdma` capability is never offered (a
    /// client that needs it learns in the handshake that this listener has no RDMA data path).
    pub fn bind(addr: SocketAddr, opts: TcpOptions, mut hs: ServerConfig) -> Result<Self> {
        hs.caps = Caps(hs.caps.0 & !Caps::RDMA.0);
        Self::bind_offering(addr, opts, hs)
    }

    /// [`TcpAcceptor::bind`] offering exactly `hs.caps` (the `rdma` backend's control streams).
    pub(crate) fn bind_offering(addr: SocketAddr, opts: TcpOptions, hs: ServerConfig) -> Result<Self> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        if let Some(dev) = &opts.device {
            sock.bind_device(Some(dev.as_bytes()))?;
        }
        // Buffers set on the listener are inherited by accepted sockets (needed for window scaling).
        if let Some(b) = opts.buffer_bytes {
            sock.set_recv_buffer_size(b)?;
            sock.set_send_buffer_size(b)?;
        }
        sock.bind(&addr.into())?;
        sock.listen(LISTEN_BACKLOG)?;
        Ok(Self { listener: sock.into(), opts, hs })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The listening socket (to poll or close it).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Accept one connection and run the server handshake. `admit` decides whether the
    /// authenticated session and channel are welcome (`Err(reason)` rejects). A failed handshake
    /// closes that connection only and is returned as an error; the acceptor stays usable.
    pub fn accept(&self, admit: Admit<'_>) -> Result<Channel> {
        let s = self.accept_socket(None)?.ok_or(TransportError::Closed)?;
        self.handshake(s, admit)
    }

    /// Accept one connection, waiting at most `wait` (`None`: as long as it takes); `Ok(None)`
    /// when none arrived in time. The socket comes back blocking, with no read timeout.
    pub(crate) fn accept_socket(&self, wait: Option<Duration>) -> Result<Option<TcpStream>> {
        // On Linux the receive timeout of a listening socket bounds accept(2) itself: no polling.
        let wait = wait.map(|w| w.max(Duration::from_millis(1)));
        SockRef::from(&self.listener).set_read_timeout(wait)?;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    // An accepted socket inherits the listener's options, the timeout included.
                    s.set_read_timeout(None)?;
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted && wait.is_none() => continue,
                // The peer gave up before we took the connection: that connection only.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(e)
                    if wait.is_some()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Run the server handshake on an accepted socket.
    pub fn handshake(&self, s: TcpStream, admit: Admit<'_>) -> Result<Channel> {
        let (s, est, keys) = self.handshake_stream(s, admit)?;
        finish(s, est, keys, &self.opts)
    }

    /// Accept one connection and run the server handshake; return the authenticated socket
    /// itself (for backends that carry their control path on it, such as `rdma`).
    pub fn accept_stream(&self, admit: Admit<'_>) -> Result<(TcpStream, Established, ChannelKeys)> {
        let s = self.accept_socket(None)?.ok_or(TransportError::Closed)?;
        self.handshake_stream(s, admit)
    }

    /// Run the server handshake on an accepted socket and return the socket.
    pub fn handshake_stream(&self, s: TcpStream, admit: Admit<'_>) -> Result<(TcpStream, Established, ChannelKeys)> {
        let deadline = Instant::now() + self.hs.timeout;
        server_handshake(s, &self.opts, &self.hs, deadline, admit)
    }

    /// Accept one connection, waiting at most `wait`, without authenticating it: the caller runs
    /// [`TcpPending::establish`] (on another thread, under its own deadline).
    pub fn accept_pending_tcp(&self, wait: Duration) -> Result<Option<TcpPending>> {
        Ok(self.accept_socket(Some(wait))?.map(|sock| TcpPending {
            sock,
            opts: self.opts.clone(),
            hs: self.hs.clone(),
        }))
    }
}

/// The server handshake on `s`, given up at `deadline` or after `hs.timeout`, whichever is first.
/// With host certificates it runs inside mutual TLS ([`crate::tls`]). A client that
/// authenticates the other way (a pre-shared key against certificates, or the reverse) is told
/// so in a `Reject` before the connection closes.
fn server_handshake(
    mut s: TcpStream,
    opts: &TcpOptions,
    hs: &ServerConfig,
    deadline: Instant,
    admit: Admit<'_>,
) -> Result<(TcpStream, Established, ChannelKeys)> {
    tune(&SockRef::from(&s), opts)?;
    let deadline = deadline.min(Instant::now() + hs.timeout);
    // The first bytes say which the client speaks: a Ferry hello starts with the frame magic,
    // TLS with a handshake record (0x16).
    let mut first = vec![0u8; 5];
    read_before(&mut s, &mut first, deadline)?;
    let ferry = first[..4] == MAGIC;
    let refuse = |s: &mut TcpStream, why: &str| -> TransportError {
        let r = encode_frame(FrameKind::Reject, &crate::wire::AbortMsg { code: 1, reason: why.to_string() }.encode());
        let _ = s.write_all(&r);
        HandshakeError::Credentials(why.to_string()).into()
    };
    let (est, keys) = match &hs.creds {
        Credentials::Psk(_) if !ferry && first[0] == 0x16 => {
            return Err(refuse(
                &mut s,
                "this destination authenticates with a pre-shared key, the source with host certificates",
            ))
        }
        Credentials::Psk(_) => {
            let mut io = RawIo { r: Pre { s: &mut s, pre: first } };
            server_exchange(&mut io, hs.clone(), deadline, admit, None)?
        }
        Credentials::Tls(_) if ferry => {
            return Err(refuse(
                &mut s,
                "this destination authenticates with host certificates (TLS), the source with a pre-shared key",
            ))
        }
        Credentials::Tls(t) => {
            let conn = rustls::ServerConnection::new(t.server()).map_err(|e| HandshakeError::Tls(e.to_string()))?;
            let mut io = TlsIo { r: Pre { s: &mut s, pre: first }, conn: conn.into(), plain: Vec::new() };
            io.handshake(deadline)?;
            let (key, peer) = io.exporter()?;
            let hs = ServerConfig { creds: Credentials::Psk(key), ..hs.clone() };
            let r = server_exchange(&mut io, hs, deadline, admit, peer)?;
            io.leave()?;
            r
        }
    };
    s.set_read_timeout(None)?;
    Ok((s, est, keys))
}

/// Ferry's server handshake over `io`; `peer_cert` is what TLS authenticated (shown to `admit`).
fn server_exchange(
    io: &mut dyn FrameIo,
    hs: ServerConfig,
    deadline: Instant,
    admit: Admit<'_>,
    peer_cert: Option<[u8; 32]>,
) -> Result<(Established, ChannelKeys)> {
    let mut m = ServerHandshake::new(hs, random_bytes(), Instant::now());
    let deadline = deadline.min(m.poll_timeout());
    loop {
        let (k, p) = io.recv(deadline)?;
        let step = match m.handle_frame(k, &p, Instant::now()) {
            Ok(step) => step,
            Err(e @ HandshakeError::ModeMismatch { .. }) => {
                // Say why: the operator on the other side must see which modes disagree.
                let _ = io.send(&m.reject(&e.to_string()));
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        match step {
            Step::Send(f) => io.send(&f)?,
            Step::Verified(mut est) => {
                est.peer_cert = peer_cert;
                return match admit(&est) {
                    Ok(()) => {
                        io.send(&m.accept()?)?;
                        let keys = m.take_keys().ok_or(crate::error::WireError::Unexpected(k))?;
                        Ok((est, keys))
                    }
                    Err(reason) => {
                        let _ = io.send(&m.reject(&reason));
                        Err(HandshakeError::Rejected(reason).into())
                    }
                };
            }
            Step::Done(_) => return Err(crate::error::WireError::Unexpected(k).into()),
        }
    }
}

/// A TCP connection accepted and not yet authenticated.
pub struct TcpPending {
    sock: TcpStream,
    opts: TcpOptions,
    hs: ServerConfig,
}

impl TcpPending {
    /// Run the server handshake, giving up at `deadline`; return the authenticated socket.
    pub fn establish_stream(
        self,
        deadline: Instant,
        admit: Admit<'_>,
    ) -> Result<(TcpStream, Established, ChannelKeys)> {
        server_handshake(self.sock, &self.opts, &self.hs, deadline, admit)
    }

    /// A handle that closes the connection from any thread (a handshake in progress fails).
    pub fn closer(&self) -> Result<Killer> {
        let k = self.sock.try_clone()?;
        Ok(Arc::new(move || {
            let _ = k.shutdown(std::net::Shutdown::Both);
        }))
    }
}

impl PendingChannel for TcpPending {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.sock.peer_addr().ok()
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok()
    }

    fn closer(&self) -> Result<Killer> {
        TcpPending::closer(self)
    }

    fn establish(self: Box<Self>, deadline: Instant, admit: Admit<'_>) -> Result<Channel> {
        let opts = self.opts.clone();
        let (s, est, keys) = self.establish_stream(deadline, admit)?;
        finish(s, est, keys, &opts)
    }
}

impl Acceptor for TcpAcceptor {
    fn transport(&self) -> &'static str {
        "tcp"
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        TcpAcceptor::local_addr(self)
    }

    fn accept_within(&self, wait: Duration, admit: Admit<'_>) -> Result<Option<Channel>> {
        match self.accept_socket(Some(wait))? {
            Some(s) => self.handshake(s, admit).map(Some),
            None => Ok(None),
        }
    }

    fn accept_pending(&self, wait: Duration) -> Result<Option<Box<dyn PendingChannel>>> {
        Ok(self.accept_pending_tcp(wait)?.map(|p| Box::new(p) as Box<dyn PendingChannel>))
    }
}
