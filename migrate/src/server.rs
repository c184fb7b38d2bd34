//! The destination host's migration service and the source's session connector, for every
//! transport.
//!
//! One [`MigrationServer`] serves every incoming migration on one or more listeners
//! ([`Acceptor`]s: `tcp`, `rdma`, ...), each accepting on its own thread. Every channel is
//! authenticated by its listener, and its binding (session id, channel index) routes it, whatever
//! transport it came on: channel 0 opens a session; the other channels of the session are
//! admitted only while that session is open. A channel naming an unknown session, or opening a
//! session twice, is refused in the handshake. With host certificates every channel of a
//! session must present the certificate its channel 0 presented.
//!
//! A listener nobody can hold down ([`ListenerConfig`]): an accept thread only accepts; each
//! handshake runs on its own thread, bounded in number, under a wall-clock deadline for the
//! whole handshake (however slowly the peer sends). At most `max_pending_per_source` handshakes
//! are pending per source address (an IPv6 /64 counts as one) and `max_pending` in total: beyond
//! the first a new connection is closed at once; beyond the second the oldest pending handshake
//! of the source holding the most is closed to make room (a genuine handshake takes a few round
//! trips, an attacker's idles; a lone source is not evicted for a flood from others). The
//! listening socket's backlog is 4096 (capped by `net.core.somaxconn`): a burst of connections
//! must not overflow it, or the kernel drops a genuine source's SYN and it retries a second later.
//! At most `max_sessions` migration sessions are open at once (beyond it, a new session is
//! refused in its handshake, after authentication, with that reason). Channel 0 must send its
//! first message within `prepare_timeout`. Accept errors (out of file
//! descriptors, say) back off exponentially. Stopping closes every pending handshake and every
//! session still waiting for its first message, so [`MigrationServer::serve`] returns promptly;
//! migrations under way run to their end. Every refusal is counted ([`ListenerStats`]) and
//! logged (at most once a second).
//!
//! On the source, a [`Connector`] (the options value of the chosen transport: `TcpOptions` for
//! `tcp`/`zstd`, `RdmaOptions` for `rdma`) opens each channel of a session on its [`Path`].

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::endpoint::{Acceptor, Connector, PendingChannel};
use ferry_transport::error::{HandshakeError, TransportError};
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Established, SessionId};
use ferry_transport::Credentials;
use ferry_transport::{Channel, Killer};

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
    creds: impl Into<Credentials>,
    session: SessionId,
    index: u16,
) -> Result<Channel, MigrateError> {
    let cfg = ClientConfig {
        creds: creds.into(),
        binding: ChannelBinding { session, channel: index },
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    connector.connect(path, cfg).map_err(|e| MigrateError::Connect(index, e.to_string()))
}

/// Open a session of channels, one per path, channel 0 first, under a fresh session id.
/// `creds`: a pre-shared key or host certificates ([`Credentials`]).
pub fn connect_session(
    paths: &[Path],
    connector: &dyn Connector,
    creds: impl Into<Credentials>,
) -> Result<Vec<Channel>, MigrateError> {
    connect_session_with(random_bytes(), paths, connector, creds)
}

/// Open a session of channels under a given session id (keep it to re-open a lost channel with
/// [`connect_one`]).
pub fn connect_session_with(
    session: SessionId,
    paths: &[Path],
    connector: &dyn Connector,
    creds: impl Into<Credentials>,
) -> Result<Vec<Channel>, MigrateError> {
    let creds = creds.into();
    paths.iter().enumerate().map(|(i, p)| connect_one(p, connector, &creds, session, i as u16)).collect()
}

/// `n` channels to one address (loopback benches and tests).
pub fn connect_simple(
    addr: SocketAddr,
    n: usize,
    connector: &dyn Connector,
    creds: impl Into<Credentials>,
) -> Result<Vec<Channel>, MigrateError> {
    let paths: Vec<Path> = (0..n).map(|_| Path::to(addr)).collect();
    connect_session(&paths, connector, creds)
}

/// Read channel 0's first message: a multichannel interface exchange is answered here (this
/// host's interfaces and the listening port, so the source can open channels on every NIC both
/// share), and the message after it is the migration's Prepare, which is returned.
fn read_prepare(ch: &mut Channel, port: u16) -> Result<Vec<u8>, MigrateError> {
    use ferry_transport::Incoming;
    let mut exchanged = false;
    loop {
        match ch.rx.recv(&NoSink).map_err(|e| MigrateError::Channel(0, e.to_string()))? {
            Incoming::Control(m) if !exchanged && ferry_multichannel::is_exchange(&m) => {
                ferry_multichannel::session::answer_offer(ch, &m, port)
                    .map_err(|e| MigrateError::Unexpected(format!("interface exchange: {e}")))?;
                exchanged = true;
            }
            Incoming::Control(m) => return Ok(m),
            _ => {
                let _ = ch.tx.send_abort(2, "expected Prepare");
                return Err(MigrateError::Unexpected("a non-control frame before Prepare".into()));
            }
        }
    }
}

/// Limits that keep a listener serving whatever its peers do (see the module docs).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Wall-clock time allowed from accepting a connection to an authenticated, set-up channel.
    pub handshake_timeout: Duration,
    /// Time allowed between channel 0's handshake and its first message (Prepare, or the
    /// interface exchange before it) and between that exchange and Prepare.
    pub prepare_timeout: Duration,
    /// Handshakes pending at once, in total (each has its own thread); beyond it, the oldest of
    /// the source with the most pending is closed to make room.
    pub max_pending: usize,
    /// Handshakes pending at once from one source address (an IPv6 /64 counts as one address);
    /// beyond it, a new connection from there is closed at once.
    pub max_pending_per_source: usize,
    /// Longest pause after failing accepts (the pause starts at 5 ms and doubles).
    pub accept_backoff_max: Duration,
    /// Migration sessions open at once (from channel 0's handshake to the migration's end);
    /// beyond it, a new session's channel 0 is refused in its handshake.
    pub max_sessions: usize,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            prepare_timeout: Duration::from_secs(30),
            max_pending: 64,
            max_pending_per_source: 8,
            accept_backoff_max: Duration::from_secs(1),
            max_sessions: 16,
        }
    }
}

/// What the listeners of a [`MigrationServer`] have done, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Handshakes that produced a channel.
    pub established: u64,
    /// Handshakes that failed (wrong key, refused session, bad frames, peer gone).
    pub failed: u64,
    /// Handshakes closed at their deadline.
    pub timed_out: u64,
    /// Connections closed at once: their source had `max_pending_per_source` pending.
    pub refused_per_source: u64,
    /// Pending handshakes closed to make room under `max_pending`.
    pub evicted: u64,
    /// Channels 0 closed because their first message did not come within `prepare_timeout`.
    pub prepare_timed_out: u64,
    /// Pending handshakes and waits closed by stopping the server.
    pub closed_at_stop: u64,
    /// Failed accepts (each followed by a pause).
    pub accept_errors: u64,
    /// Sessions refused in their handshake: `max_sessions` were open.
    pub refused_sessions: u64,
}

impl ListenerStats {
    /// Connections the listener closed to protect itself (per-source refusals and evictions).
    pub fn refused(&self) -> u64 {
        self.refused_per_source + self.evicted
    }
}

/// The live counters behind [`ListenerStats`] (shared with the serving threads).
#[derive(Debug, Default)]
pub struct ListenerCounters {
    accepted: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    refused_per_source: AtomicU64,
    evicted: AtomicU64,
    prepare_timed_out: AtomicU64,
    closed_at_stop: AtomicU64,
    accept_errors: AtomicU64,
    refused_sessions: AtomicU64,
    /// When a refusal was last logged (to log at most once a second).
    last_log: Mutex<Option<Instant>>,
}

impl ListenerCounters {
    /// The counts now.
    pub fn snapshot(&self) -> ListenerStats {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ListenerStats {
            accepted: g(&self.accepted),
            established: g(&self.established),
            failed: g(&self.failed),
            timed_out: g(&self.timed_out),
            refused_per_source: g(&self.refused_per_source),
            evicted: g(&self.evicted),
            prepare_timed_out: g(&self.prepare_timed_out),
            closed_at_stop: g(&self.closed_at_stop),
            accept_errors: g(&self.accept_errors),
            refused_sessions: g(&self.refused_sessions),
        }
    }

    fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::SeqCst);
    }

    /// Log a refusal, at most once a second, with the counts so far.
    fn log_refusal(&self, what: &str) {
        let now = Instant::now();
        let mut last = lock(&self.last_log);
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
        drop(last);
        let s = self.snapshot();
        eprintln!(
            "ferry listener: {what} (so far: {} refused per source, {} evicted, {} timed out, {} failed)",
            s.refused_per_source, s.evicted, s.timed_out, s.failed
        );
    }
}

/// The unit a per-source limit counts: an IPv4 address, or an IPv6 /64.
fn source_of(addr: Option<SocketAddr>) -> Option<IpAddr> {
    match addr?.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None => Some(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
        },
        v4 => Some(v4),
    }
}

/// Why the warden closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Deadline,
    Evicted,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Handshake,
    Prepare,
}

struct Watched {
    wait: Wait,
    source: Option<IpAddr>,
    since: Instant,
    deadline: Instant,
    close: Killer,
    closed: Option<Closed>,
}

/// The waits on peers a server has under way (pending handshakes, channels 0 before their
/// first message), each with its deadline and a handle that closes its connection.
#[derive(Default)]
struct Warden {
    table: Mutex<WardenTable>,
}

#[derive(Default)]
struct WardenTable {
    next: u64,
    entries: HashMap<u64, Watched>,
}

enum Admission {
    Watched(u64),
    RefusedPerSource,
}

impl Warden {
    /// Register a pending handshake under the limits (if the total is reached, closing the
    /// oldest pending handshake of the source that has the most).
    fn admit_handshake(
        &self,
        source: Option<IpAddr>,
        close: Killer,
        limits: &ListenerConfig,
        counters: &ListenerCounters,
    ) -> Admission {
        let now = Instant::now();
        let mut t = lock(&self.table);
        let open = |w: &&Watched| w.wait == Wait::Handshake && w.closed.is_none();
        if source.is_some()
            && t.entries.values().filter(open).filter(|w| w.source == source).count() >= limits.max_pending_per_source
        {
            return Admission::RefusedPerSource;
        }
        if t.entries.values().filter(open).count() >= limits.max_pending.max(1) {
            // Room is made at the expense of whoever holds the most: the oldest pending handshake
            // of the source with the most pending (a flood's), not a lone peer's that happens
            // to be older (a genuine source opens its few channels and is done in milliseconds).
            let mut per_source: HashMap<Option<IpAddr>, usize> = HashMap::new();
            for w in t.entries.values().filter(open) {
                *per_source.entry(w.source).or_default() += 1;
            }
            let victim = t
                .entries
                .iter()
                .filter(|(_, w)| open(w))
                .min_by_key(|(_, w)| (std::cmp::Reverse(per_source.get(&w.source).copied().unwrap_or(0)), w.since))
                .map(|(id, _)| *id);
            if let Some(w) = victim.and_then(|id| t.entries.get_mut(&id)) {
                w.closed = Some(Closed::Evicted);
                (w.close)();
                ListenerCounters::bump(&counters.evicted);
            }
        }
        let id = t.watch(Wait::Handshake, source, now + limits.handshake_timeout, close);
        Admission::Watched(id)
    }

    /// Watch a wait that `close` ends, until `deadline`.
    fn watch(&self, wait: Wait, deadline: Instant, close: Killer) -> u64 {
        lock(&self.table).watch(wait, None, deadline, close)
    }

    /// The wait is over: whether (and why) the warden closed it meanwhile.
    fn done(&self, id: u64) -> Option<Closed> {
        lock(&self.table).entries.remove(&id).and_then(|w| w.closed)
    }

    /// Close every wait whose deadline passed (`stop`: every wait); returns how many it closed.
    fn sweep(&self, stop: bool, counters: &ListenerCounters) {
        let now = Instant::now();
        let mut t = lock(&self.table);
        for w in t.entries.values_mut().filter(|w| w.closed.is_none()) {
            let why = if stop {
                Closed::Stopped
            } else if now >= w.deadline {
                Closed::Deadline
            } else {
                continue;
            };
            w.closed = Some(why);
            (w.close)();
            if why == Closed::Stopped {
                ListenerCounters::bump(&counters.closed_at_stop);
            }
        }
    }
}

impl WardenTable {
    fn watch(&mut self, wait: Wait, source: Option<IpAddr>, deadline: Instant, close: Killer) -> u64 {
        self.next += 1;
        let w = Watched { wait, source, since: Instant::now(), deadline, close, closed: None };
        self.entries.insert(self.next, w);
        self.next
    }
}

/// How long an accept loop waits for a connection before it looks at the stop conditions again.
const ACCEPT_WAIT: Duration = Duration::from_millis(10);

/// How often the warden looks for waits past their deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(20);

/// The first pause after a failed accept (doubling up to [`ListenerConfig::accept_backoff_max`]).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// A session open on this server: channel 0 was admitted; its receiver has not finished.
struct Session {
    /// Where the session's other channels go.
    tx: mpsc::Sender<Channel>,
    /// The receiving end, until channel 0 is set up and its receiver takes it.
    rx: Option<mpsc::Receiver<Channel>>,
    /// With host certificates: the certificate channel 0's peer presented; every other channel
    /// of the session must present the same (a host of the same CA cannot join another's
    /// session).
    peer_cert: Option<[u8; 32]>,
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
    limits: ListenerConfig,
    counters: Arc<ListenerCounters>,
    check: Option<ChannelCheck>,
}

/// Where a channel arrives: the address it comes from and the local address it reached
/// (`None` where the transport does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelEnds {
    /// The source's address.
    pub peer: Option<SocketAddr>,
    /// This host's address the channel reached.
    pub local: Option<SocketAddr>,
}

/// A check of every channel, made in its handshake once the peer is authenticated and before
/// the channel is admitted: `Err` refuses that channel, and the source is told the reason.
pub type ChannelCheck = Arc<dyn Fn(&ChannelEnds, &Established) -> Result<(), String> + Send + Sync>;

/// Counters and outcome callback of one [`MigrationServer::serve`] call.
struct Serving {
    max: Option<usize>,
    /// Sessions opened (changed under the sessions lock).
    started: AtomicUsize,
    finished: Arc<AtomicUsize>,
    done: Arc<dyn Fn(Result<TargetOutcome, MigrateError>) + Send + Sync>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    warden: Arc<Warden>,
    /// Accept loops still running.
    accepting: AtomicUsize,
}

/// A [`MigrationServer`] serving on its own thread ([`MigrationServer::spawn`]).
pub struct RunningServer {
    /// The first listener's address.
    pub addr: SocketAddr,
    /// One item per finished migration, in the order they finished.
    pub outcomes: mpsc::Receiver<Result<TargetOutcome, MigrateError>>,
    /// Set to make the server return (see [`MigrationServer::stopper`]).
    pub stop: Arc<AtomicBool>,
    /// The serving thread; it returns after `max` migrations or once stopped.
    pub thread: JoinHandle<()>,
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
            limits: ListenerConfig::default(),
            counters: Default::default(),
            check: None,
        }
    }

    /// Check every channel with `check` before admitting it (see [`ChannelCheck`]).
    pub fn with_channel_check(mut self, check: ChannelCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Use these listener limits instead of [`ListenerConfig::default`].
    pub fn with_listener_config(mut self, limits: ListenerConfig) -> Self {
        self.limits = limits;
        self
    }

    /// The listeners' counters (live: keep the handle and call
    /// [`ListenerCounters::snapshot`]).
    pub fn listener_counters(&self) -> Arc<ListenerCounters> {
        self.counters.clone()
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

    /// A switch that makes [`MigrationServer::serve`] return: the listeners stop accepting, pending
    /// handshakes and channels 0 still waiting for their first message are closed, and
    /// migrations under way run to their end.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serve on a new thread until `max` migrations have finished (`None`: until stopped);
    /// each migration's outcome arrives on [`RunningServer::outcomes`] in the order they finish.
    pub fn spawn(self, max: Option<usize>) -> Result<RunningServer, MigrateError> {
        let addr = self.local_addr()?;
        let stop = self.stopper();
        let (tx, outcomes) = mpsc::channel();
        let tx = Mutex::new(tx);
        let thread = std::thread::spawn(move || {
            self.serve(
                max,
                Arc::new(move |r| {
                    // The receiver may be gone (its owner stopped listening): nothing to tell.
                    if let Ok(t) = tx.lock() {
                        let _ = t.send(r);
                    }
                }),
            )
        });
        Ok(RunningServer { addr, outcomes, stop, thread })
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
            warden: Default::default(),
            accepting: AtomicUsize::new(self.acceptors.len()),
        };
        std::thread::scope(|sc| {
            for acc in &self.acceptors {
                let serving = &serving;
                sc.spawn(move || {
                    self.accept_loop(sc, acc.as_ref(), serving);
                    serving.accepting.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // The warden: closes waits past their deadline; once every accept loop is over, it
            // closes the rest (so the handshake threads of this scope end promptly).
            let serving = &serving;
            sc.spawn(move || loop {
                let over = serving.accepting.load(Ordering::SeqCst) == 0;
                serving.warden.sweep(over, &self.counters);
                if over {
                    return;
                }
                std::thread::sleep(SWEEP_EVERY);
            });
        });
        // Channels 0 that reached their worker after the warden's last sweep.
        serving.warden.sweep(true, &self.counters);
        for w in lock(&serving.workers).drain(..) {
            let _ = w.join();
        }
    }

    fn stopping(&self, serving: &Serving) -> bool {
        self.stop.load(Ordering::SeqCst) || serving.max.is_some_and(|m| serving.finished.load(Ordering::SeqCst) >= m)
    }

    /// One listener's loop: accept, and hand each connection to a handshake thread of its own
    /// (within the limits); until stopped or `max` finished. A failed accept pauses the loop,
    /// doubling the pause while accepts keep failing.
    fn accept_loop<'s>(&'s self, sc: &'s std::thread::Scope<'s, '_>, acc: &'s dyn Acceptor, serving: &'s Serving) {
        let port = acc.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut backoff = Duration::ZERO;
        while !self.stopping(serving) {
            match acc.accept_pending(ACCEPT_WAIT) {
                Ok(None) => backoff = Duration::ZERO,
                Ok(Some(p)) => {
                    backoff = Duration::ZERO;
                    ListenerCounters::bump(&self.counters.accepted);
                    self.start_handshake(sc, p, port, serving);
                }
                Err(e) => {
                    ListenerCounters::bump(&self.counters.accept_errors);
                    backoff =
                        (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, self.limits.accept_backoff_max.max(ACCEPT_BACKOFF_MIN));
                    eprintln!("ferry listener: accept on {} failed: {e}; pausing {backoff:?}", acc.transport());
                    let until = Instant::now() + backoff;
                    while !self.stopping(serving) && Instant::now() < until {
                        std::thread::sleep(ACCEPT_WAIT.min(until.saturating_duration_since(Instant::now())));
                    }
                }
            }
        }
    }

    /// Run one connection's handshake on a thread of its own, under the limits and the deadline.
    ///
    /// A session is opened when its channel 0 is admitted (inside the handshake), so that its
    /// other channels are admitted at once, on whichever listener they arrive; if channel 0 then
    /// fails its handshake or setup, the session is closed again.
    fn start_handshake<'s>(
        &'s self,
        sc: &'s std::thread::Scope<'s, '_>,
        p: Box<dyn PendingChannel>,
        port: u16,
        serving: &'s Serving,
    ) {
        let peer = p.peer_addr();
        let ends = ChannelEnds { peer, local: p.local_addr() };
        let Ok(close) = p.closer() else {
            ListenerCounters::bump(&self.counters.failed);
            return;
        };
        let deadline = Instant::now() + self.limits.handshake_timeout;
        let id = match serving.warden.admit_handshake(source_of(peer), close, &self.limits, &self.counters) {
            Admission::Watched(id) => id,
            Admission::RefusedPerSource => {
                ListenerCounters::bump(&self.counters.refused_per_source);
                self.counters.log_refusal(&format!(
                    "closed a connection from {}: {} handshakes pending from there",
                    peer.map_or("?".into(), |a| a.ip().to_string()),
                    self.limits.max_pending_per_source
                ));
                return; // dropping `p` closes it
            }
        };
        let run = move || {
            let sessions = &self.sessions;
            let opened = Cell::new(None);
            let admit = |est: &Established| -> Result<(), String> {
                let b = est.binding;
                if let Some(check) = &self.check {
                    if let Err(why) = check(&ends, est) {
                        self.counters.log_refusal(&format!("refused channel {} of a session: {why}", b.channel));
                        return Err(why);
                    }
                }
                let mut m = lock(sessions);
                match (b.channel, m.contains_key(&b.session)) {
                    (0, false) if m.len() >= self.limits.max_sessions.max(1) => {
                        ListenerCounters::bump(&self.counters.refused_sessions);
                        self.counters.log_refusal(&format!("refused a session: {} open", m.len()));
                        Err(format!("too many migration sessions open ({})", m.len()))
                    }
                    (0, false) => {
                        let (tx, rx) = mpsc::channel();
                        m.insert(b.session, Session { tx, rx: Some(rx), peer_cert: est.peer_cert });
                        opened.set(Some(b.session));
                        Ok(())
                    }
                    (0, true) => Err("session already open".into()),
                    (_, true) if m.get(&b.session).is_some_and(|s| s.peer_cert != est.peer_cert) => {
                        Err("this channel's certificate is not the one channel 0 of the session presented".into())
                    }
                    (_, true) => Ok(()),
                    (_, false) => Err("no migration session with that id".into()),
                }
            };
            let r = p.establish(deadline, &admit);
            let closed = serving.warden.done(id);
            match (r, closed) {
                (Ok(ch), None) => {
                    ListenerCounters::bump(&self.counters.established);
                    self.route(ch, port, serving);
                    return;
                }
                (Ok(ch), Some(_)) => (ch.killer)(),
                (Err(e), None) => {
                    if matches!(e, TransportError::Handshake(HandshakeError::Timeout)) {
                        ListenerCounters::bump(&self.counters.timed_out);
                    } else {
                        ListenerCounters::bump(&self.counters.failed);
                    }
                }
                (Err(_), Some(why)) => {
                    if why == Closed::Deadline {
                        ListenerCounters::bump(&self.counters.timed_out);
                    }
                }
            }
            if let Some(session) = opened.take() {
                lock(sessions).remove(&session);
            }
        };
        let spawned = std::thread::Builder::new().name("ferry-handshake".into()).spawn_scoped(sc, run);
        if let Err(e) = spawned {
            // The closure (and the connection in it) is gone with the error.
            serving.warden.done(id);
            ListenerCounters::bump(&self.counters.failed);
            self.counters.log_refusal(&format!("cannot start a handshake thread: {e}"));
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
        let (warden, counters, prepare_timeout) =
            (serving.warden.clone(), self.counters.clone(), self.limits.prepare_timeout);
        let worker = std::thread::spawn(move || {
            let mut ch = ch;
            let id = warden.watch(Wait::Prepare, Instant::now() + prepare_timeout, ch.killer.clone());
            let first = read_prepare(&mut ch, port);
            let first = match (first, warden.done(id)) {
                (Ok(m), None) => Ok(m),
                (Err(e), None) => Err(e),
                (_, Some(Closed::Deadline)) => {
                    ListenerCounters::bump(&counters.prepare_timed_out);
                    Err(MigrateError::Timeout("waiting for the source's Prepare"))
                }
                (_, Some(_)) => Err(MigrateError::Cancelled),
            };
            let r = first.and_then(|m| receive_after(factory.as_ref(), ch, Some(m), &rx, &cfg));
            lock(&sessions).remove(&b.session);
            done(r);
            finished.fetch_add(1, Ordering::SeqCst);
        });
        lock(&serving.workers).push(worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn closer() -> (Killer, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        (Arc::new(move || f.store(true, Ordering::SeqCst)), flag)
    }

    /// A full table makes room at the flood's expense: the lone peer's handshake, older than
    /// every flood connection, stays; the flood's oldest goes.
    #[test]
    fn eviction_takes_from_the_source_with_the_most_pending() {
        let limits = ListenerConfig { max_pending: 4, max_pending_per_source: 8, ..Default::default() };
        let counters = ListenerCounters::default();
        let w = Warden::default();
        let lone: Option<IpAddr> = Some([198, 18, 0, 1].into());
        let flood: Option<IpAddr> = Some([198, 18, 0, 66].into());
        let (c, lone_closed) = closer();
        assert!(matches!(w.admit_handshake(lone, c, &limits, &counters), Admission::Watched(_)));
        let mut flood_closed = Vec::new();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(2));
            let (c, f) = closer();
            assert!(matches!(w.admit_handshake(flood, c, &limits, &counters), Admission::Watched(_)));
            flood_closed.push(f);
        }
        // The table is full (4): the next flood connection evicts the flood's oldest.
        let (c, _) = closer();
        assert!(matches!(w.admit_handshake(flood, c, &limits, &counters), Admission::Watched(_)));
        assert!(!lone_closed.load(Ordering::SeqCst), "the lone peer was evicted for the flood");
        assert!(flood_closed[0].load(Ordering::SeqCst), "the flood's oldest stayed");
        assert!(!flood_closed[1].load(Ordering::SeqCst) && !flood_closed[2].load(Ordering::SeqCst));
        assert_eq!(counters.snapshot().evicted, 1);
        // A source that holds as many as any other loses its oldest: ties go by age.
        let (c, _) = closer();
        assert!(matches!(w.admit_handshake(lone, c, &limits, &counters), Admission::Watched(_)));
        assert!(flood_closed[1].load(Ordering::SeqCst));
        assert!(!lone_closed.load(Ordering::SeqCst));
    }
}
