//! The destination host's migration service and the source's session connector (TCP).
//!
//! One listener serves every incoming migration: each connection is authenticated, and its
//! binding (session id, channel index) routes it. Channel 0 opens a session; the other channels
//! of the session are admitted only while that session is open. A channel naming an unknown
//! session, or joining twice, is refused in the handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Psk, SessionId};
use ferry_transport::tcp::{self, TcpAcceptor, TcpOptions};
use ferry_transport::Channel;

use crate::target::{receive_after, TargetConfig, TargetOutcome};
use crate::vm::TargetFactory;
use crate::MigrateError;
use ferry_transport::memory::NoSink;

/// One path of a session: where to connect, and from which local address / interface.
#[derive(Debug, Clone)]
pub struct Path {
    /// Destination address.
    pub remote: SocketAddr,
    /// Local address to bind (chooses the NIC).
    pub local: Option<SocketAddr>,
    /// Interface to bind (`SO_BINDTODEVICE`).
    pub device: Option<String>,
}

/// Open one channel of `session` with index `index` on `path`.
pub fn connect_one(
    path: &Path,
    opts: &TcpOptions,
    psk: &Psk,
    session: SessionId,
    index: u16,
) -> Result<Channel, MigrateError> {
    let o = TcpOptions { bind: path.local, device: path.device.clone(), ..opts.clone() };
    let cfg = ClientConfig {
        psk: psk.clone(),
        binding: ChannelBinding { session, channel: index },
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
    };
    tcp::connect(path.remote, &o, cfg).map_err(|e| MigrateError::Connect(index, e.to_string()))
}

/// Open a session of channels, one per path, channel 0 first, under a fresh session id.
pub fn connect_session(paths: &[Path], opts: &TcpOptions, psk: &Psk) -> Result<Vec<Channel>, MigrateError> {
    connect_session_with(random_bytes(), paths, opts, psk)
}

/// Open a session of channels under a given session id (keep it to re-open a lost channel with
/// [`connect_one`]).
pub fn connect_session_with(
    session: SessionId,
    paths: &[Path],
    opts: &TcpOptions,
    psk: &Psk,
) -> Result<Vec<Channel>, MigrateError> {
    paths.iter().enumerate().map(|(i, p)| connect_one(p, opts, psk, session, i as u16)).collect()
}

/// `n` channels to one address (loopback benches and tests).
pub fn connect_simple(addr: SocketAddr, n: usize, opts: &TcpOptions, psk: &Psk) -> Result<Vec<Channel>, MigrateError> {
    let paths: Vec<Path> = (0..n).map(|_| Path { remote: addr, local: None, device: None }).collect();
    connect_session(&paths, opts, psk)
}

/// Read channel 0's first message: a multichannel interface exchange is answered here (this
/// host's interfaces and the listening port, so the source can open channels on every NIC both
/// share), and the message after it is the migration's Prepare.
fn first_message(mut ch: Channel, port: u16) -> Result<(Channel, Option<Vec<u8>>), MigrateError> {
    use ferry_transport::Incoming;
    match ch.rx.recv(&NoSink).map_err(|e| MigrateError::Channel(0, e.to_string()))? {
        Incoming::Control(m) if ferry_multichannel::is_exchange(&m) => {
            ferry_multichannel::session::answer_offer(&mut ch, &m, port)
                .map_err(|e| MigrateError::Unexpected(format!("interface exchange: {e}")))?;
            Ok((ch, None))
        }
        Incoming::Control(m) => Ok((ch, Some(m))),
        _ => {
            let _ = ch.tx.send_abort(2, "expected Prepare");
            Err(MigrateError::Unexpected("a non-control frame before Prepare".into()))
        }
    }
}

/// The destination's migration service.
pub struct MigrationServer {
    acceptor: TcpAcceptor,
    factory: Arc<dyn TargetFactory>,
    cfg: TargetConfig,
    sessions: Arc<Mutex<HashMap<SessionId, mpsc::Sender<Channel>>>>,
    stop: Arc<AtomicBool>,
}

impl MigrationServer {
    /// Serve on an acceptor.
    pub fn new(acceptor: TcpAcceptor, factory: Arc<dyn TargetFactory>, cfg: TargetConfig) -> Self {
        Self { acceptor, factory, cfg, sessions: Default::default(), stop: Arc::new(AtomicBool::new(false)) }
    }

    /// Listening address.
    pub fn local_addr(&self) -> Result<SocketAddr, MigrateError> {
        self.acceptor.local_addr().map_err(|e| MigrateError::Connect(0, e.to_string()))
    }

    /// A switch that makes [`MigrationServer::serve`] return after the current connection.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Accept and receive migrations until `max` have finished (or forever), calling `done`
    /// with each outcome (from the migration's own thread).
    pub fn serve(&self, max: Option<usize>, done: Arc<dyn Fn(Result<TargetOutcome, MigrateError>) + Send + Sync>) {
        let finished = Arc::new(AtomicUsize::new(0));
        let started = AtomicUsize::new(0);
        let mut workers = Vec::new();
        self.acceptor.listener().set_nonblocking(true).ok();
        loop {
            if self.stop.load(Ordering::SeqCst) || max.is_some_and(|m| finished.load(Ordering::SeqCst) >= m) {
                break;
            }
            let s = match self.acceptor.listener().accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(_) => continue,
            };
            let _ = s.set_nonblocking(false);
            let sessions = self.sessions.clone();
            let admit = move |est: &ferry_transport::handshake::Established| -> Result<(), String> {
                let b = est.binding;
                let known = sessions.lock().map(|m| m.contains_key(&b.session)).unwrap_or(false);
                match (b.channel, known) {
                    (0, false) => Ok(()),
                    (0, true) => Err("session already open".into()),
                    (_, true) => Ok(()),
                    (_, false) => Err("no migration session with that id".into()),
                }
            };
            let ch = match self.acceptor.handshake(s, &admit) {
                Ok(c) => c,
                Err(_) => continue, // that connection only
            };
            let b = ch.info.established.binding;
            if b.channel == 0 {
                if max.is_some_and(|m| started.load(Ordering::SeqCst) >= m) {
                    (ch.killer)();
                    continue;
                }
                started.fetch_add(1, Ordering::SeqCst);
                let (tx, rx) = mpsc::channel();
                if let Ok(mut m) = self.sessions.lock() {
                    m.insert(b.session, tx);
                }
                let (factory, cfg, sessions, done, finished) =
                    (self.factory.clone(), self.cfg.clone(), self.sessions.clone(), done.clone(), finished.clone());
                let port = self.acceptor.local_addr().map(|a| a.port()).unwrap_or(0);
                workers.push(std::thread::spawn(move || {
                    let r = first_message(ch, port)
                        .and_then(|(ch, first)| receive_after(factory.as_ref(), ch, first, &rx, &cfg));
                    if let Ok(mut m) = sessions.lock() {
                        m.remove(&b.session);
                    }
                    done(r);
                    finished.fetch_add(1, Ordering::SeqCst);
                }));
            } else {
                let tx = self.sessions.lock().ok().and_then(|m| m.get(&b.session).cloned());
                match tx {
                    Some(tx) => {
                        let _ = tx.send(ch);
                    }
                    None => (ch.killer)(),
                }
            }
        }
        for w in workers {
            let _ = w.join();
        }
    }
}
