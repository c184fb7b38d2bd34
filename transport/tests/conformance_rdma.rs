//! The conformance suite and RDMA-specific tests against the `rdma` backend.
//!
//! These need an RDMA device named by `FERRY_RDMA_DEVICE` (e.g. `rxe0`, optional
//! `FERRY_RDMA_GID`); without it each test prints `SKIP: <reason>` and returns (except the
//! transport-mismatch test, which opens no device).
//! `scripts/softroce/run.sh` runs them on soft-RoCE inside a qemu VM.
#![cfg(feature = "rdma")]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_memory::{AnonMemory, MemoryMap};
use ferry_test_support::conformance::{self, Backend, RawPeer, TEST_KEY};
use ferry_test_support::pagemix::{fill_page, PageKind};
use ferry_transport::endpoint::{Acceptor, Connector, Path};
use ferry_transport::handshake::{Caps, ChannelBinding, ClientConfig, Psk, ServerConfig};
use ferry_transport::rdma::{self, QpState, RdmaAcceptor, RdmaChannel, RdmaOptions};
use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, PAGE_SIZE};
use ferry_transport::{Channel, Incoming, RdmaError, TransportError};

struct Rdma {
    opts: RdmaOptions,
    _watchdog: Watchdog,
    /// One device test at a time: some read the process-wide window counters
    /// ([`rdma::window_stats`]), which every other test's channels move too.
    _serial: MutexGuard<'static, ()>,
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Ends the test process if one test hangs, so that a hang is a visible failure.
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(test: String, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            while t.elapsed() < limit {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = writeln!(std::io::stderr(), "HUNG: rdma test {test} ran longer than {limit:?}");
            std::process::exit(3);
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn backend(test: &str) -> Option<Rdma> {
    if let Some(r) = rdma::skip_reason() {
        ferry_test_support::skip(&format!("rdma {test}"), &r);
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut opts = RdmaOptions::from_env().expect("FERRY_RDMA_DEVICE");
    opts.completion_timeout = Duration::from_secs(5);
    match rdma::probe(&opts) {
        Ok(d) => eprintln!("rdma {test}: {d}"),
        Err(e) => panic!("FERRY_RDMA_DEVICE={} is set but unusable: {e}", opts.device),
    }
    Some(Rdma { opts, _watchdog: Watchdog::start(test.to_string(), Duration::from_secs(90)), _serial: serial })
}

fn client_cfg(psk: Psk) -> ClientConfig {
    ClientConfig {
        creds: psk.into(),
        binding: ChannelBinding { session: [5; 16], channel: 0 },
        caps: Caps::RDMA,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}

impl Rdma {
    fn acceptor(&self, psk: Psk) -> RdmaAcceptor {
        let hs = ServerConfig {
            creds: psk.into(),
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), self.opts.clone(), hs).unwrap()
    }

    fn rdma_pair(&self) -> (RdmaChannel, RdmaChannel) {
        let acc = self.acceptor(Psk::new(TEST_KEY).unwrap());
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
            let c = rdma::connect(addr, &self.opts, client_cfg(Psk::new(TEST_KEY).unwrap())).expect("connect");
            (c, srv.join().unwrap().expect("accept"))
        })
    }
}

impl Backend for Rdma {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn pair(&self) -> Result<(Channel, Channel), TransportError> {
        let (c, s) = self.pair_keys(Psk::new(TEST_KEY).unwrap(), Psk::new(TEST_KEY).unwrap());
        Ok((c?, s?))
    }

    fn pair_keys(
        &self,
        client: Psk,
        server: Psk,
    ) -> (Result<Channel, TransportError>, Result<Channel, TransportError>) {
        let acc = self.acceptor(server);
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())).map(|c| c.channel));
            let c = rdma::connect(addr, &self.opts, client_cfg(client)).map(|c| c.channel);
            (c, srv.join().unwrap())
        })
    }

    fn raw_pair(&self) -> Result<(Box<dyn RawPeer>, Channel), TransportError> {
        let acc = self.acceptor(Psk::new(TEST_KEY).unwrap());
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
            let raw = rdma::RawRdmaPeer::connect(addr, &self.opts, client_cfg(Psk::new(TEST_KEY).unwrap()))?;
            let ch = srv.join().unwrap()?;
            Ok((Box::new(RawRdma(raw)) as Box<dyn RawPeer>, ch.channel))
        })
    }

    fn zstd(&self) -> bool {
        false
    }

    fn one_sided(&self) -> bool {
        true
    }
}

/// The backend's raw peer, as the suite's [`RawPeer`].
struct RawRdma(rdma::RawRdmaPeer);

impl RawPeer for RawRdma {
    fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write_raw(b)
    }
    fn close(&mut self) {
        self.0.close();
    }
}

macro_rules! suite {
    ($($t:ident),*) => {
        $(
            #[test]
            fn $t() {
                if let Some(b) = backend(stringify!($t)) {
                    conformance::$t(&b);
                }
            }
        )*
    };
}

suite!(
    round_trip_mixed,
    peer_closes_mid_batch,
    slow_reader_backpressure,
    malformed_frames,
    wrong_key,
    control_and_abort,
    refused_batch
);

fn random_memory(pages: usize, seed: u64) -> Arc<AnonMemory> {
    let m = Arc::new(AnonMemory::new(pages * PAGE_SIZE, true).unwrap());
    let mut buf = vec![0u8; PAGE_SIZE];
    for i in 0..pages {
        fill_page(&mut buf, PageKind::Random, seed, i as u64);
        m.write_from(i * PAGE_SIZE, &buf);
    }
    m
}

/// What the fault tests start from: `pages` random pages on the source, as many zero pages on
/// the destination, a map of each at guest address 0, and an rdma channel pair between them.
struct Transfer {
    src: Arc<AnonMemory>,
    dst: Arc<AnonMemory>,
    smap: MemoryMap,
    dmap: MemoryMap,
    /// The source's (connecting) end.
    s: RdmaChannel,
    /// The destination's (accepting) end.
    d: RdmaChannel,
}

fn transfer(b: &Rdma, pages: usize, seed: u64) -> Transfer {
    let src = random_memory(pages, seed);
    let dst = Arc::new(AnonMemory::new(pages * PAGE_SIZE, true).unwrap());
    let (smap, dmap) = (src.map_at(0).unwrap(), dst.map_at(0).unwrap());
    let (s, d) = b.rdma_pair();
    Transfer { src, dst, smap, dmap, s, d }
}

/// The destination's first `landed` pages equal the source's; every later page is still zero.
fn assert_only_first_landed(src: &AnonMemory, dst: &AnonMemory, landed: usize, why: &str) {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for i in 0..dst.len() / PAGE_SIZE {
        dst.read_into(i * PAGE_SIZE, &mut page);
        if i < landed {
            src.read_into(i * PAGE_SIZE, &mut want);
            assert_eq!(page, want, "page {i} of the batch that landed");
        } else {
            assert!(page.iter().all(|&x| x == 0), "page {i} was written {why}");
        }
    }
}

/// Which queue pair the fault hits.
#[derive(Clone, Copy, Debug)]
enum Side {
    Source,
    Destination,
}

/// A queue pair forced into the error state in the middle of a transfer: the source's
/// `send_batch` (or close) fails with a transport error, no panic, no hang; the destination
/// then learns of the end (abort from the source, or its own QP error).
fn qp_error_mid_transfer(side: Side) {
    let Some(b) = backend(&format!("qp_error_mid_transfer_{side:?}")) else { return };
    const PAGES: usize = 8192;
    let Transfer { smap, dmap, s, d, .. } = transfer(&b, PAGES, 3);
    let fault = match side {
        Side::Source => s.qp_fault.clone(),
        Side::Destination => d.qp_fault.clone(),
    };
    let mut s = s.channel;
    let mut d = d.channel;
    let faulted = Arc::new(AtomicBool::new(false));
    std::thread::scope(|sc| {
        let dmap = &dmap;
        let recv = sc.spawn(move || {
            let mut got = 0u32;
            let end = loop {
                match d.rx.recv(dmap) {
                    Ok(Incoming::Batch(_)) => got += 1,
                    Ok(other) => break Ok(other),
                    Err(e) => break Err(e),
                }
            };
            (got, end)
        });
        let mut err = None;
        for i in 0..(PAGES / 256) {
            if i == 4 {
                fault();
                faulted.store(true, Ordering::SeqCst);
            }
            let run = [PageRun { gpa: (i * 256 * PAGE_SIZE) as u64, pages: 256 }];
            if let Err(e) = s.tx.send_batch(i as u64, 0, BATCH_DEST_ZEROED, &run, &smap) {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => e,
            None => s.tx.close().expect_err("a QP in error cannot deliver every batch"),
        };
        eprintln!("source error after QP fault ({side:?}): {err}");
        assert!(matches!(err, TransportError::Rdma(_)), "source: unexpected error kind {err}");
        // The source keeps running: it aborts the channel over the control stream.
        let _ = s.tx.send_abort(9, "queue pair failed");
        let (got, end) = recv.join().expect("receiver thread");
        eprintln!("destination got {got} batches, then {end:?}");
        assert!(got < (PAGES / 256) as u32, "every batch arrived despite the fault");
        match end {
            Err(TransportError::PeerAborted { code: 9, .. })
            | Err(TransportError::Rdma(_))
            | Err(TransportError::Closed) => {}
            other => panic!("destination: expected an error, got {other:?}"),
        }
    });
    assert!(faulted.load(Ordering::SeqCst));
}

#[test]
fn qp_error_on_source_mid_transfer() {
    qp_error_mid_transfer(Side::Source);
}

#[test]
fn qp_error_on_destination_mid_transfer() {
    qp_error_mid_transfer(Side::Destination);
}

/// The destination seals its memory (as it does at `Complete`, before its final check): a batch
/// sent before lands; the destination's queue pair is then in the error state as its device
/// reports it; the source's next batch fails with a transport error and not a byte of it lands;
/// no panic, no hang.
#[test]
fn sealed_memory_refuses_remote_writes() {
    let Some(b) = backend("sealed_memory_refuses_remote_writes") else { return };
    const PAGES: usize = 512;
    let Transfer { src, dst, smap, dmap, s, d } = transfer(&b, PAGES, 5);
    let dst_qp = d.qp_state.clone();
    let (mut s, mut d) = (s.channel, d.channel);
    let seal = d.rx.memory_sealer().expect("rdma has a memory sealer");
    std::thread::scope(|sc| {
        let dmap = &dmap;
        let (to_recv, received) = std::sync::mpsc::channel();
        let recv = sc.spawn(move || loop {
            let r = d.rx.recv(dmap);
            let end = !matches!(r, Ok(Incoming::Batch(_)));
            let _ = to_recv.send(r);
            if end {
                return;
            }
        });
        let first = [PageRun { gpa: 0, pages: 256 }];
        s.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &first, &smap).expect("a batch before the seal");
        let got = received.recv_timeout(Duration::from_secs(30)).expect("the first batch");
        assert!(matches!(got, Ok(Incoming::Batch(_))), "{got:?}");
        assert_eq!(dst_qp.query().expect("ibv_query_qp"), QpState::ReadyToSend);
        seal();
        assert_eq!(dst_qp.query().expect("ibv_query_qp"), QpState::Error, "the seal moves the queue pair to ERR");
        let second = [PageRun { gpa: (256 * PAGE_SIZE) as u64, pages: 256 }];
        let err = match s.tx.send_batch(1, 0, BATCH_DEST_ZEROED, &second, &smap) {
            Ok(_) => s.tx.close().expect_err("a write into sealed memory cannot complete"),
            Err(e) => e,
        };
        eprintln!("source after the seal: {err}");
        assert!(matches!(err, TransportError::Rdma(_)), "source: unexpected error kind {err}");
        let _ = s.tx.send_abort(9, "sealed");
        (s.killer)();
        let _ = recv.join();
        // The first batch landed; not one byte of the second did.
        assert_only_first_landed(&src, &dst, 256, "after the seal");
        while let Ok(r) = received.try_recv() {
            assert!(!matches!(r, Ok(Incoming::Batch(_))), "a batch was received after the seal");
        }
    });
}

/// When the stale write is made.
#[derive(Clone, Copy, Debug)]
enum Stale {
    /// After the round barrier (`end_round`), before the next round.
    BetweenRounds,
    /// After the destination sealed its memory (as at `Complete`), the round still open.
    AfterSeal,
}

/// A source writes one-sided with the keys of the last window table it got, outside any batch,
/// once those windows are gone, issued the moment `end_round` (or the seal) returned: the write
/// fails at the source, not a byte of it lands, the pages of the batch before are intact, the
/// channel then fails cleanly at both ends (the source's next batch and the destination's
/// receive end in errors; no panic, no hang), and the source stays free to abort and carry on
/// (here: it aborts over the control stream).
///
/// Between rounds the destination's queue pair is up and its device refuses the dead window's
/// rkey: a remote access error. When `end_round` returns no window of the channel is bound on
/// the destination (issue 13: the round's windows are deallocated before the source's round
/// ends). After the seal (as at `Complete`) the destination's queue pair is in the error state
/// (asked of the device) and drops the write, which fails at the source when its retries run
/// out; the source's next batch is refused up front: the destination told it its memory is
/// sealed.
fn stale_keys_are_refused(when: Stale) {
    let Some(b) = backend(&format!("stale_keys_are_refused_{when:?}")) else { return };
    const PAGES: usize = 512;
    let Transfer { src, dst, smap, dmap, s, d } = transfer(&b, PAGES, 6);
    let dst_qp = d.qp_state.clone();
    let probe = s.probe;
    let (mut s, mut d) = (s.channel, d.channel);
    let seal = d.rx.memory_sealer().expect("rdma has a memory sealer");
    std::thread::scope(|sc| {
        let dmap = &dmap;
        let (to_recv, received) = std::sync::mpsc::channel();
        let recv = sc.spawn(move || loop {
            let r = d.rx.recv(dmap);
            let end = !matches!(r, Ok(Incoming::Batch(_)));
            let _ = to_recv.send(r);
            if end {
                return;
            }
        });
        let first = [PageRun { gpa: 0, pages: 256 }];
        s.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &first, &smap).expect("a batch of round 0");
        let got = received.recv_timeout(Duration::from_secs(30)).expect("the first batch");
        assert!(matches!(got, Ok(Incoming::Batch(_))), "{got:?}");
        assert_eq!(rdma::window_stats().bound_now, 1, "round 0's windows are bound while it is open");
        match when {
            Stale::BetweenRounds => {
                s.tx.end_round().expect("the round barrier");
                assert_eq!(rdma::window_stats().bound_now, 0, "a window outlived end_round");
                assert_eq!(dst_qp.query().expect("ibv_query_qp"), QpState::ReadyToSend);
            }
            Stale::AfterSeal => {
                seal();
                assert_eq!(rdma::window_stats().bound_now, 0, "a window outlived the seal");
                assert_eq!(dst_qp.query().expect("ibv_query_qp"), QpState::Error, "the seal moves the QP to ERR");
            }
        }
        let target = (300 * PAGE_SIZE) as u64;
        let err = probe.write_last(target, 0xA5).expect_err("a write with a dead window's key cannot land");
        eprintln!("stale write ({when:?}): {err}");
        match (when, &err) {
            (Stale::BetweenRounds, TransportError::Rdma(RdmaError::WorkCompletion { status, .. })) => {
                assert_eq!(*status, 10, "expected a remote access error (IBV_WC_REM_ACCESS_ERR), got {err}")
            }
            // A queue pair in the error state answers nothing: the source's retries run out
            // (IBV_WC_RETRY_EXC_ERR), or soft-RoCE keeps quiet and the probe's wait ends.
            (Stale::AfterSeal, TransportError::Rdma(RdmaError::WorkCompletion { status, .. })) => {
                assert_eq!(*status, 12, "expected the transport retries to run out, got {err}")
            }
            (Stale::AfterSeal, TransportError::Rdma(RdmaError::Stalled { .. })) => {}
            (_, other) => panic!("expected a work completion error, got {other}"),
        }
        // The channel is broken now: the next round's batch fails, bounded, without a panic.
        let second = [PageRun { gpa: (256 * PAGE_SIZE) as u64, pages: 256 }];
        let next = match s.tx.send_batch(1, 1, BATCH_DEST_ZEROED, &second, &smap) {
            Ok(_) => s.tx.close().expect_err("a broken queue pair cannot deliver the next round"),
            Err(e) => e,
        };
        eprintln!("source after the stale write: {next}");
        if let Stale::AfterSeal = when {
            assert!(matches!(next, TransportError::Rdma(RdmaError::Sealed)), "expected the seal's error, got {next}");
        }
        let _ = s.tx.send_abort(9, "stale write");
        (s.killer)();
        recv.join().expect("receiver thread");
        assert_only_first_landed(&src, &dst, 256, "by a stale key");
        let mut ended = false;
        while let Ok(r) = received.try_recv() {
            assert!(!matches!(r, Ok(Incoming::Batch(_))), "a batch was received after the stale write");
            ended = true;
        }
        assert!(ended, "the destination's receive must end (error or abort)");
    });
}

#[test]
fn stale_keys_are_refused_between_rounds() {
    stale_keys_are_refused(Stale::BetweenRounds);
}

#[test]
fn stale_keys_are_refused_after_seal() {
    stale_keys_are_refused(Stale::AfterSeal);
}

/// Rounds over one channel: each round's batch lands with fresh windows (bound when the round's
/// first batch goes, invalidated at `end_round`: bound while the round is open, none left when
/// `end_round` returns), the destination ends identical to the source, and every round bound
/// and invalidated its windows once. Prints `RDMA_MW` (per-round bind, invalidate and whole
/// barrier time; the soft-RoCE log keeps it); asserts no time.
#[test]
fn windows_per_round() {
    let Some(b) = backend("windows_per_round") else { return };
    const ROUNDS: usize = 24;
    const PAGES: usize = 64;
    let Transfer { src, dst, smap, dmap, s, d } = transfer(&b, ROUNDS * PAGES, 8);
    let (mut s, mut d) = (s.channel, d.channel);
    let before = rdma::window_stats();
    let barrier = Mutex::new(Duration::ZERO);
    std::thread::scope(|sc| {
        let dmap = &dmap;
        let recv = sc.spawn(move || {
            let mut n = 0;
            loop {
                match d.rx.recv(dmap) {
                    Ok(Incoming::Batch(b)) => {
                        d.tx.send_ack(b.ack()).expect("ack");
                        n += 1;
                    }
                    Ok(Incoming::Closed) => return n,
                    other => panic!("destination: {other:?}"),
                }
            }
        });
        for r in 0..ROUNDS {
            let run = [PageRun { gpa: (r * PAGES * PAGE_SIZE) as u64, pages: PAGES as u32 }];
            s.tx.send_batch(r as u64, r as u32, BATCH_DEST_ZEROED, &run, &smap).expect("batch");
            assert_eq!(rdma::window_stats().bound_now, 1, "round {r}: its windows are bound");
            let t = std::time::Instant::now();
            s.tx.end_round().expect("round barrier");
            *barrier.lock().unwrap() += t.elapsed();
            assert_eq!(rdma::window_stats().bound_now, 0, "round {r}: a window outlived end_round");
        }
        s.tx.close().expect("close");
        assert_eq!(recv.join().expect("receiver"), ROUNDS);
    });
    let after = rdma::window_stats();
    let (opens, closes) = (after.opens - before.opens, after.closes - before.closes);
    assert_eq!(opens, ROUNDS as u64, "one window bind per round");
    assert_eq!(closes, ROUNDS as u64, "one invalidation per round");
    let mut page = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for i in 0..ROUNDS * PAGES {
        dst.read_into(i * PAGE_SIZE, &mut page);
        src.read_into(i * PAGE_SIZE, &mut want);
        assert_eq!(page, want, "page {i}");
    }
    let us = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    eprintln!(
        "RDMA_MW rounds {ROUNDS}, 1 region: bind {:.0} us/round, invalidate {:.0} us/round, end_round (close asked, windows deallocated, confirmed) {:.0} us/round",
        us(after.open_time - before.open_time, opens),
        us(after.close_time - before.close_time, closes),
        us(barrier.into_inner().unwrap(), ROUNDS as u64)
    );
}

/// The killer cuts a channel while the source is blocked on a destination that never reads:
/// send_batch returns an error promptly.
#[test]
fn killer_unblocks_a_waiting_sender() {
    let Some(b) = backend("killer_unblocks_a_waiting_sender") else { return };
    let src = random_memory(256, 4);
    let smap = src.map_at(0).unwrap();
    let (s, _d) = b.rdma_pair();
    let mut s = s.channel;
    let k = s.killer.clone();
    std::thread::scope(|sc| {
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            k();
        });
        let run = [PageRun { gpa: 0, pages: 256 }];
        let t = std::time::Instant::now();
        let e =
            s.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &run, &smap)
                .expect_err("killed while waiting for the region table");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        eprintln!("killed sender: {e}");
    });
}

/// A client that would carry its pages on the stream is refused by an rdma listener in the
/// handshake, with the reason; an rdma client of a tcp listener fails before any queue pair
/// exists (no `rdma` capability negotiated). Neither needs a device.
#[test]
fn transports_that_do_not_match_are_refused() {
    let opts = RdmaOptions::new("no-such-device");
    let hs = ServerConfig {
        creds: Psk::new(TEST_KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let racc = RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), opts.clone(), hs.clone()).unwrap();
    let tacc = ferry_transport::tcp::TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), Default::default(), hs).unwrap();
    assert_eq!(Acceptor::transport(&racc), "rdma");
    let cfg = || ClientConfig { caps: Caps::ALL, ..client_cfg(Psk::new(TEST_KEY).unwrap()) };
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| racc.accept_within(Duration::from_secs(30), &|_| Ok(())));
        let tcp: &dyn Connector = &ferry_transport::tcp::TcpOptions::default();
        let e = tcp.connect(&Path::to(racc.local_addr().unwrap()), cfg()).unwrap_err();
        assert!(e.to_string().contains("serves rdma"), "{e}");
        assert!(srv.join().unwrap().is_err(), "the rdma listener must not set a tcp client up");
    });
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| tacc.accept(&|_| Ok(())));
        let e = (&opts as &dyn Connector).connect(&Path::to(tacc.local_addr().unwrap()), cfg()).unwrap_err();
        assert!(matches!(e, TransportError::NotNegotiated("rdma")), "{e}");
        let ch = srv.join().unwrap().expect("the tcp listener saw a valid handshake");
        assert!(!ch.info.established.caps.contains(Caps::RDMA));
    });
}

/// What registering guest memory for remote writes costs on this device, per registration: the
/// price of registering it anew at every round (issue 13: memory registered only while a round
/// is open). Prints `RDMA_REG` lines (the soft-RoCE suite's log keeps them); asserts only that
/// registration and deregistration work, never a time.
#[test]
fn registration_cost_per_round() {
    let Some(b) = backend("registration_cost_per_round") else { return };
    for mib in [64usize, 256] {
        let c = rdma::registration_cost(&b.opts, mib << 20, 5).expect("registering resident memory");
        let per_gib = |d: Duration| d.as_secs_f64() * 1e3 * 1024.0 / mib as f64;
        eprintln!(
            "RDMA_REG {mib} MiB: first {:.1} ms, again {:.1} ms ({:.0} ms/GiB), dereg {:.1} ms ({:.0} ms/GiB)",
            c.first_reg.as_secs_f64() * 1e3,
            c.again_reg.as_secs_f64() * 1e3,
            per_gib(c.again_reg),
            c.dereg.as_secs_f64() * 1e3,
            per_gib(c.dereg)
        );
        assert_eq!(c.bytes, mib << 20);
    }
}
