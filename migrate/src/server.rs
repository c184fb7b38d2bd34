//! The destination host's migration service and the source's session connector, for every
//! transport.
//!
//! One [`MigrationServer`] serves every incoming migration on one or more listeners
//! ([`Acceptor`]s: `tcp`, `rdma`, ...), each accepting on its own thread. Every channel is
//! authenticated by its listener, and its binding (session id, channel index) routes it, whatever
//! transport it came on: channel 0 opens a session; the other channels of the session are
//! admitted only while that session is open. A channel naming an unknown session, or opening a
//! session twice, is refused in the handshake.
//!
//! On the source, a [`Connector`] (the options value of the chosen transport: `TcpOptions` for
//! `tcp`/`zstd`, `RdmaOptions` for `rdma`) opens each channel of a session on its [`Path`].

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_transport::endpoint::{Acceptor, Connector};
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Established, Psk, SessionId};
use ferry_transport::Channel;

use crate::target::{receive_after, TargetConfig, TargetOutcome};
use crate::vm::TargetFactory;
use crate::MigrateError;
use ferry_memory::NoSink;

pub use ferry_transport::endpoint::Path;

/// Open one channel of `session` with index `index` on `path`, over the transport `connector`
/// stands for.
pub fn connect_one(
    path: &Path,
    connector: &dyn Connector,
    psk: &Psk,
    session: SessionId,
    index: u16,
) -> Result<Channel, MigrateError> {
    let cfg = ClientConfig {
        psk: psk.clone(),
        binding: ChannelBinding { session, channel: index },
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
    };
    connector.connect(path, cfg).map_err(|e| MigrateError::Connect(index, e.to_string()))
}

/// Open a session of channels, one per path, channel 0 first, under a fresh session id.
pub fn connect_session(paths: &[Path], connector: &dyn Connector, psk: &Psk) -> Result<Vec<Channel>, MigrateError> {
    connect_session_with(random_bytes(), paths, connector, psk)
}

/// Open a session of channels under a given session id (keep it to re-open a lost channel with
/// [`connect_one`]).
pub fn connect_session_with(
    session: SessionId,
    paths: &[Path],
    connector: &dyn Connector,
    psk: &Psk,
) -> Result<Vec<Channel>, MigrateError> {
    paths.iter().enumerate().map(|(i, p)| connect_one(p, connector, psk, session, i as u16)).collect()
}

/// `n` channels to one address (loopback benches and tests).
pub fn connect_simple(
    addr: SocketAddr,
    n: usize,
    connector: &dyn Connector,
    psk: &Psk,
) -> Result<Vec<Channel>, MigrateError> {
    let paths: Vec<Path> = (0..n).map(|_| Path::to(addr)).collect();
    connect_session(&paths, connector, psk)
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

/// How long an accept loop waits for a connection before it looks at the stop conditions again.
const ACCEPT_WAIT: Duration = Duration::from_millis(10);

/// A session open on this server: channel 0 was admitted; its receiver has not finished.
struct Session {
    /// Where the session's other channels go.
    tx: mpsc::Sender<Channel>,
    /// The receiving end, until channel 0 is set up and its receiver takes it.
    rx: Option<mpsc::Receiver<Channel>>,
}

type Sessions = Mutex<HashMap<SessionId, Session>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The destination's migration service.
pub struct MigrationServer {
    acceptors: Vec<Box<dyn Acceptor>>,
    factory: Arc<dyn TargetFactory>,
    cfg: TargetConfig,
    sessions: Arc<Sessions>,
    stop: Arc<AtomicBool>,
}

/// Counters and outcome callback of one [`MigrationServer::serve`] call.
struct Serving {
    max: Option<usize>,
    /// Sessions opened (changed under the sessions lock).
    started: AtomicUsize,
    finished: Arc<AtomicUsize>,
    done: Arc<dyn Fn(Result<TargetOutcome, MigrateError>) + Send + Sync>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl MigrationServer {
    /// Serve on one listener (add more with [`MigrationServer::with_acceptor`]).
    pub fn new(acceptor: impl Acceptor + 'static, factory: Arc<dyn TargetFactory>, cfg: TargetConfig) -> Self {
        Self {
            acceptors: vec![Box::new(acceptor)],
            factory,
            cfg,
            sessions: Default::default(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Also serve on `acceptor` (another transport, or another address): its channels join the
    /// same sessions, routed by their binding.
    pub fn with_acceptor(mut self, acceptor: impl Acceptor + 'static) -> Self {
        self.acceptors.push(Box::new(acceptor));
        self
    }

    /// The first listener's address.
    pub fn local_addr(&self) -> Result<SocketAddr, MigrateError> {
        self.acceptors[0].local_addr().map_err(|e| MigrateError::Connect(0, e.to_string()))
    }

    /// Every listener: its transport and address.
    pub fn local_addrs(&self) -> Result<Vec<(&'static str, SocketAddr)>, MigrateError> {
        self.acceptors
            .iter()
            .map(|a| Ok((a.transport(), a.local_addr().map_err(|e| MigrateError::Connect(0, e.to_string()))?)))
            .collect()
    }

    /// A switch that makes [`MigrationServer::serve`] return after the current connection.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Accept and receive migrations on every listener until `max` have finished (or forever),
    /// calling `done` with each outcome (from the migration's own thread). Returns once every
    /// migration it started has finished.
    pub fn serve(&self, max: Option<usize>, done: Arc<dyn Fn(Result<TargetOutcome, MigrateError>) + Send + Sync>) {
        let serving = Serving {
            max,
            started: AtomicUsize::new(0),
            finished: Arc::new(AtomicUsize::new(0)),
            done,
            workers: Mutex::new(Vec::new()),
        };
        std::thread::scope(|sc| {
            for acc in &self.acceptors {
                let serving = &serving;
                sc.spawn(move || self.accept_loop(acc.as_ref(), serving));
            }
        });
        for w in lock(&serving.workers).drain(..) {
            let _ = w.join();
        }
    }

    /// One listener's loop: accept, authenticate, route; until stopped or `max` finished.
    ///
    /// A session is opened when its channel 0 is admitted (inside the handshake), so that its
    /// other channels are admitted at once, on whichever listener they arrive; if channel 0 then
    /// fails its handshake or setup, the session is closed again.
    fn accept_loop(&self, acc: &dyn Acceptor, serving: &Serving) {
        let port = acc.local_addr().map(|a| a.port()).unwrap_or(0);
        let sessions = &self.sessions;
        let opened = Cell::new(None);
        let admit = |est: &Established| -> Result<(), String> {
            let b = est.binding;
            let mut m = lock(sessions);
            match (b.channel, m.contains_key(&b.session)) {
                (0, false) => {
                    let (tx, rx) = mpsc::channel();
                    m.insert(b.session, Session { tx, rx: Some(rx) });
                    opened.set(Some(b.session));
                    Ok(())
                }
                (0, true) => Err("session already open".into()),
                (_, true) => Ok(()),
                (_, false) => Err("no migration session with that id".into()),
            }
        };
        loop {
            if self.stop.load(Ordering::SeqCst)
                || serving.max.is_some_and(|m| serving.finished.load(Ordering::SeqCst) >= m)
            {
                return;
            }
            let r = acc.accept_within(ACCEPT_WAIT, &admit);
            let opened = opened.take();
            match r {
                Ok(Some(ch)) => self.route(ch, port, serving),
                // An error concerns that connection only (refused, failed handshake or setup).
                _ => {
                    if let Some(session) = opened {
                        lock(sessions).remove(&session);
                    }
                }
            }
        }
    }

    /// Channel 0 starts its session's receiver; another channel joins its open session. A
    /// channel 0 beyond `max` is cut (and its session closed), as is a channel whose session
    /// closed meanwhile.
    fn route(&self, ch: Channel, port: u16, serving: &Serving) {
        let b = ch.info.established.binding;
        let mut sessions = lock(&self.sessions);
        if b.channel != 0 {
            match sessions.get(&b.session) {
                Some(s) => {
                    let _ = s.tx.send(ch);
                }
                None => (ch.killer)(),
            }
            return;
        }
        if serving.max.is_some_and(|m| serving.started.load(Ordering::SeqCst) >= m) {
            sessions.remove(&b.session);
            (ch.killer)();
            return;
        }
        let Some(rx) = sessions.get_mut(&b.session).and_then(|s| s.rx.take()) else {
            (ch.killer)(); // not admitted by this server (cannot happen: admission opens it)
            return;
        };
        serving.started.fetch_add(1, Ordering::SeqCst);
        drop(sessions);
        let (factory, cfg, sessions, done, finished) = (
            self.factory.clone(),
            self.cfg.clone(),
            self.sessions.clone(),
            serving.done.clone(),
            serving.finished.clone(),
        );
        let worker = std::thread::spawn(move || {
            let r =
                first_message(ch, port).and_then(|(ch, first)| receive_after(factory.as_ref(), ch, first, &rx, &cfg));
            lock(&sessions).remove(&b.session);
            done(r);
            finished.fetch_add(1, Ordering::SeqCst);
        });
        lock(&serving.workers).push(worker);
    }
}
