//! Hostile clients against the destination's listener, in real sockets on loopback: a slow
//! sender, a flood of idle connections, a wrong key, a channel 0 that never speaks, and a stop
//! with all of these open. In each, the listener keeps serving: a legitimate migration arriving
//! meanwhile completes and verifies, and the server counts what it refused.
//!
//! Outcomes only, never speed: every wait has a deadline generous for a loaded machine, and a
//! missed deadline fails the test with what it was waiting for.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migrate::server::{connect_one, connect_simple, ListenerConfig, ListenerCounters, MigrationServer, Path};
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::MigrateError;
use ferry_test_support::guest::{guest, into_synthetic, same_memory};
use ferry_test_support::server;
use ferry_transport::handshake::{random_bytes, Caps, Psk, ServerConfig};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::{encode_frame, FrameKind};
use ferry_vmm_glue::synthetic::SyntheticFactory;
use socket2::{Domain, Protocol, Socket, Type};

const KEY: &[u8] = b"listener-test-key-0123456789abcdef";
const SEED: u64 = 11;
/// What any single wait in these tests may take on a loaded 2-core machine before it counts as
/// a hang.
const PATIENCE: Duration = Duration::from_secs(120);

fn psk() -> Psk {
    Psk::new(KEY).unwrap()
}

struct Running {
    addr: SocketAddr,
    outcomes: mpsc::Receiver<Result<TargetOutcome, MigrateError>>,
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    counters: Arc<ListenerCounters>,
}

/// A server on 127.0.0.1 with these listener limits, serving until stopped.
fn start(limits: ListenerConfig) -> Running {
    let hs = ServerConfig {
        creds: psk().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let acc = TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), hs).unwrap();
    let srv = MigrationServer::new(acc, Arc::new(SyntheticFactory::new(1 << 30, false)), TargetConfig::default())
        .with_listener_config(limits);
    let (stop, counters) = (srv.stopper(), srv.listener_counters());
    let r = server::spawn(srv, None).unwrap();
    Running { addr: r.addr, outcomes: r.outcomes, thread: r.thread, stop, counters }
}

impl Running {
    /// Stop the server and wait (within [`PATIENCE`]) for `serve` to return; the outcomes that
    /// are left.
    fn stop(self) -> mpsc::Receiver<Result<TargetOutcome, MigrateError>> {
        self.stop.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let t = self.thread;
        std::thread::spawn(move || {
            let _ = tx.send(t.join().is_ok());
        });
        assert_eq!(rx.recv_timeout(PATIENCE), Ok(true), "serve did not return after stop (or panicked)");
        self.outcomes
    }

    /// Wait until `what` holds of the counters.
    fn wait_for(&self, what: &str, ok: impl Fn(&ferry_migrate::server::ListenerStats) -> bool) {
        let until = Instant::now() + PATIENCE;
        loop {
            let s = self.counters.snapshot();
            if ok(&s) {
                return;
            }
            assert!(Instant::now() < until, "waiting for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A legitimate migration of a small guest over two channels: completes, verifies, and the
    /// destination holds the same memory.
    fn legit_migration(&self, name: &str) {
        let mut vm = guest(name, 32, 0, 0, SEED);
        let chans = connect_simple(self.addr, 2, &TcpOptions::default(), psk()).expect("legitimate channels");
        let cfg = MigrationConfig { verify_full: true, ..Default::default() };
        let st = migrate(&mut vm, chans, &cfg, &|_| {}).expect("the legitimate migration");
        assert_eq!(st.status, Status::Completed);
        assert!(st.verified);
        let t = self.outcomes.recv_timeout(PATIENCE).expect("the destination's outcome");
        same_memory(&vm, &into_synthetic(t.expect("the destination received the VM")));
    }
}

/// An idle TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all loopback).
fn idle_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), PATIENCE).unwrap();
    s.into()
}

/// Whether the server closed `s` (a read sees end of stream or a reset, not a timeout).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a challenge or a refusal: read on to the close
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// A client that sends a well-formed hello one byte per `every`, far slower than the handshake
/// deadline allows, cannot hold the listener: the server closes it at its deadline (before the
/// hello is even complete), counts it as timed out, and a legitimate migration arriving while
/// it dribbles completes and verifies.
#[test]
fn slow_sender_is_cut_at_the_handshake_deadline() {
    let limits = ListenerConfig { handshake_timeout: Duration::from_secs(2), ..Default::default() };
    let srv = start(limits);
    let every = Duration::from_millis(300);
    let hello = encode_frame(FrameKind::ClientHello, &[1u8; 58]);
    // At this pace the hello alone takes over 20 s, ten times the deadline.
    assert!(every * hello.len() as u32 > Duration::from_secs(20));
    let addr = srv.addr;
    let dribblers: Vec<_> = (0..3)
        .map(|_| {
            let hello = hello.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let mut sent = 0;
                for b in &hello {
                    if s.write_all(std::slice::from_ref(b)).is_err() {
                        break;
                    }
                    sent += 1;
                    std::thread::sleep(every);
                }
                (sent, closed_by_server(&mut s))
            })
        })
        .collect();
    srv.wait_for("the dribblers to be accepted", |s| s.accepted >= 3);
    srv.legit_migration("during-slow-senders");
    for d in dribblers {
        let (sent, closed) = d.join().unwrap();
        assert!(sent < hello.len(), "a slow sender got its whole hello through ({sent} bytes)");
        assert!(closed, "the server did not close the slow sender");
    }
    srv.wait_for("three handshakes timed out", |s| s.timed_out >= 3);
    let s = srv.counters.snapshot();
    assert!(s.established >= 2, "{s:?}");
    let _ = srv.stop();
}

/// 200 idle connections: 100 from one address (beyond the per-source limit) and 100 from 50
/// others (beyond the total). The listener refuses and evicts, counting both; a legitimate
/// migration from yet another address then completes and verifies.
#[test]
fn idle_flood_is_refused_and_a_migration_still_completes() {
    let limits = ListenerConfig {
        handshake_timeout: Duration::from_secs(600), // the flood stays pending unless refused
        max_pending: 32,
        max_pending_per_source: 8,
        ..Default::default()
    };
    let srv = start(limits);
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(idle_from([127, 0, 0, 2], srv.addr));
    }
    for i in 0..100u8 {
        flood.push(idle_from([127, 0, 1, 10 + i / 2], srv.addr));
    }
    srv.wait_for("the flood to be accepted", |s| s.accepted >= 200);
    let s = srv.counters.snapshot();
    assert!(s.refused_per_source >= 100 - 8 - 32, "one address kept more than its share pending: {s:?}");
    assert!(s.evicted >= 200 - 32 - s.refused_per_source, "more than max_pending stayed pending: {s:?}");
    assert_eq!(s.established, 0);
    srv.legit_migration("during-flood");
    let s = srv.counters.snapshot();
    assert!(s.established >= 2, "{s:?}");
    assert!(s.refused() >= 168, "{s:?}");
    // The refused connections were closed, not left hanging.
    assert!(closed_by_server(&mut flood[99]), "a connection beyond the per-source limit stayed open");
    assert!(closed_by_server(&mut flood[0]), "an evicted connection stayed open");
    let _ = srv.stop();
}

/// A client with the wrong key is refused with a clear error, and the listener keeps serving.
#[test]
fn wrong_key_is_refused_and_the_listener_keeps_serving() {
    let srv = start(ListenerConfig::default());
    let wrong = Psk::new(b"not-the-key-0123456789abcdefghijklmn".to_vec()).unwrap();
    let e = connect_simple(srv.addr, 1, &TcpOptions::default(), &wrong).expect_err("a wrong key must be refused");
    assert!(e.to_string().contains("authentication failed"), "unclear error: {e}");
    srv.wait_for("the failed handshake to be counted", |s| s.failed >= 1);
    srv.legit_migration("after-wrong-key");
    let _ = srv.stop();
}

/// Channel 0 authenticated but silent: its session is closed at `prepare_timeout` with a
/// timeout outcome, and the listener keeps serving.
#[test]
fn silent_channel_zero_times_out_waiting_for_prepare() {
    let limits = ListenerConfig { prepare_timeout: Duration::from_secs(1), ..Default::default() };
    let srv = start(limits);
    let _silent = connect_one(&Path::to(srv.addr), &TcpOptions::default(), psk(), random_bytes(), 0).unwrap();
    let r = srv.outcomes.recv_timeout(PATIENCE).expect("an outcome for the silent session");
    assert!(matches!(r, Err(MigrateError::Timeout(_))), "{:?}", r.map(|o| o.stats));
    assert_eq!(srv.counters.snapshot().prepare_timed_out, 1);
    srv.legit_migration("after-silent-session");
    let _ = srv.stop();
}

/// Stopping returns promptly with idle connections and a silent channel 0 open (their deadlines
/// are far away: only the stop can end them), and closes them.
#[test]
fn stop_returns_with_idle_connections_open() {
    let limits = ListenerConfig {
        handshake_timeout: Duration::from_secs(600),
        prepare_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let srv = start(limits);
    let mut idle: Vec<_> = (0..20u8).map(|i| idle_from([127, 0, 2, 1 + i], srv.addr)).collect();
    let _silent = connect_one(&Path::to(srv.addr), &TcpOptions::default(), psk(), random_bytes(), 0).unwrap();
    srv.wait_for("the connections to be accepted", |s| s.accepted >= 21 && s.established >= 1);
    let counters = srv.counters.clone();
    let outcomes = srv.stop();
    let r = outcomes.recv_timeout(PATIENCE).expect("an outcome for the silent session");
    assert!(matches!(r, Err(MigrateError::Cancelled)), "{:?}", r.map(|o| o.stats));
    assert!(counters.snapshot().closed_at_stop >= 21, "{:?}", counters.snapshot());
    for s in &mut idle {
        assert!(closed_by_server(s), "an idle connection stayed open after stop");
    }
}

/// Sessions beyond `max_sessions` are refused in their handshake (after authentication, with
/// that reason); once the open session ends, a legitimate migration completes.
#[test]
fn sessions_beyond_the_limit_are_refused() {
    let limits = ListenerConfig { max_sessions: 1, prepare_timeout: Duration::from_secs(2), ..Default::default() };
    let srv = start(limits);
    let _silent = connect_one(&Path::to(srv.addr), &TcpOptions::default(), psk(), random_bytes(), 0).unwrap();
    let e = connect_one(&Path::to(srv.addr), &TcpOptions::default(), psk(), random_bytes(), 0)
        .expect_err("a second session beyond max_sessions must be refused");
    assert!(e.to_string().contains("too many migration sessions"), "unclear error: {e}");
    assert_eq!(srv.counters.snapshot().refused_sessions, 1);
    // The silent session times out waiting for Prepare; its slot is free again.
    let r = srv.outcomes.recv_timeout(PATIENCE).expect("an outcome for the silent session");
    assert!(matches!(r, Err(MigrateError::Timeout(_))), "{:?}", r.map(|o| o.stats));
    srv.legit_migration("after-session-limit");
    let _ = srv.stop();
}
