//! Live migration of the synthetic guest between two engines over loopback TCP: success paths,
//! a fault injected at every protocol step (by wrapping the source's channels, see
//! `ferry_test_support::fault`), channel failover, and the host-wide limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_migrate::scheduler::HostScheduler;
use ferry_migrate::server::{connect_one, connect_session_with, connect_simple, MigrationServer, Path};
use ferry_migrate::source::{
    migrate, CancelToken, ConvergeConfig, ConvergePolicy, MigrationConfig, Rejoin, Scheduling,
};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_migrate::MigrateError;
use ferry_test_support::fault::{inject, FaultAction, FaultPoint, Misbehave};
use ferry_test_support::guest::{guest, into_synthetic, same_memory};
use ferry_test_support::server;
use ferry_transport::handshake::{Caps, Psk, ServerConfig};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::PAGE_SIZE;
use ferry_vmm_glue::pagemix::{expected_page, Mix};
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticFactory, SyntheticVm};

/// Seed of the guests' page contents.
const SEED: u64 = 7;
const KEY: &[u8] = b"live-migration-test-key-0123456789";

type Outcomes = mpsc::Receiver<Result<TargetOutcome, MigrateError>>;

fn server(limit: u64, cfg: TargetConfig, max: usize) -> (SocketAddr, Outcomes, std::thread::JoinHandle<()>) {
    server_with(limit, cfg, max, TcpOptions::default())
}

fn server_with(
    limit: u64,
    cfg: TargetConfig,
    max: usize,
    tcp: TcpOptions,
) -> (SocketAddr, Outcomes, std::thread::JoinHandle<()>) {
    let factory = Arc::new(SyntheticFactory::new(limit, false));
    let s = server::loopback(Psk::new(KEY).unwrap(), tcp, factory, cfg, Some(max));
    (s.addr, s.outcomes, s.thread)
}

/// Every page outside the working set still holds its generated content; working-set pages hold
/// the writer's last stamp. (VM paused by the caller.)
fn assert_intact(vm: &SyntheticVm, ws_pages: u64) {
    assert_eq!(check_stamps(vm).unwrap(), 0, "a page of the working set lost its last write");
    let mut got = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    for i in (ws_pages..vm.pages()).step_by(7) {
        vm.read_page(i, &mut got);
        expected_page(&Mix::default(), SEED, i, &mut want);
        assert!(got == want, "page {i} changed");
    }
}

fn opts(zstd: bool) -> TcpOptions {
    if zstd {
        TcpOptions::zstd()
    } else {
        TcpOptions::default()
    }
}

#[test]
fn idle_guest_moves_byte_identical() {
    for (zstd, nch) in [(false, 1), (true, 2)] {
        let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
        let mut vm = guest("idle", 48, 0, 0, SEED);
        let chans = connect_simple(addr, nch, &opts(zstd), Psk::new(KEY).unwrap()).unwrap();
        let cfg = MigrationConfig { verify_full: true, ..Default::default() };
        let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
        assert_eq!(st.status, Status::Completed);
        assert!(st.verified);
        assert!(!vm.is_running(), "the source copy must stay paused after commit");
        assert!(st.zero_pages > 0 && st.data_pages > 0);
        assert_eq!(st.channels.len(), nch);
        assert!(st.channels.iter().all(|c| c.batches > 0), "a channel carried nothing: {:?}", st.channels);
        let out = outcomes.recv().unwrap().unwrap();
        assert!(out.stats.verified);
        let t = into_synthetic(out);
        same_memory(&vm, &t);
        h.join().unwrap();
    }
}

#[test]
fn busy_guest_converges_and_continues() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("busy", 64, 16, 64, SEED);
    std::thread::sleep(Duration::from_millis(50));
    let chans = connect_simple(addr, 2, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let events = Arc::new(AtomicUsize::new(0));
    let e2 = events.clone();
    let st = migrate(&mut vm, chans, &cfg, &move |_| {
        e2.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert!(st.verified && st.rounds >= 2, "{st:?}");
    assert!(events.load(Ordering::Relaxed) >= 3, "no progress events");
    let gen_at_pause = vm.generation();
    let t = into_synthetic(outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    assert_eq!(check_stamps(&vm).unwrap(), 0, "source stamps");
    let mut moved = t.into_vm().unwrap();
    assert_eq!(check_stamps(&moved).unwrap(), 0, "moved stamps before resume");
    assert_eq!(moved.generation(), gen_at_pause, "writer state did not move");
    moved.resume().unwrap();
    while moved.generation() < gen_at_pause + 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    moved.pause().unwrap();
    assert_eq!(check_stamps(&moved).unwrap(), 0);
    h.join().unwrap();
}

fn expect_source_survives(fault: Option<(FaultPoint, FaultAction)>, misbehave: Misbehave, nch: usize) -> MigrateError {
    let tfault = misbehave;
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("faulty", 32, 4, 32, SEED);
    // Pages lost on the way: those of the last region (away from the working set, so never
    // sent again in a later round).
    let misbehave = match misbehave {
        Misbehave::CorruptFrom { .. } => Misbehave::CorruptFrom { from_gpa: vm.shape().regions.last().unwrap().0 },
        m => m,
    };
    let cfg = MigrationConfig {
        failover: false,
        verify_full: true,
        reply_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let chans = connect_simple(addr, nch, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let chans = inject(chans, fault, misbehave, &cfg.cancel);
    let err = match migrate(&mut vm, chans, &cfg, &|_| {}) {
        Err(e) => e,
        // Cutting a data channel after its last batch cannot hurt the image: completing is right.
        // So is cutting it at the switchover when the final round gave it nothing to send (a
        // writer starved of CPU dirtied nothing, or the final round fit in one batch that went
        // to channel 0): the source then records that the channel closed after its last batch.
        Ok(st)
            if matches!(
                fault,
                Some((FaultPoint::BeforeComplete | FaultPoint::BeforeCommit, FaultAction::KillChannel(1)))
            ) || (fault == Some((FaultPoint::AtSwitchover, FaultAction::KillChannel(1)))
                && (st.pages_per_round.last() == Some(&0)
                    || st.events.iter().any(|e| e.contains("channel 1 closed after the last batch")))) =>
        {
            assert!(st.verified);
            assert!(outcomes.recv().unwrap().is_ok());
            h.join().unwrap();
            return MigrateError::Internal("completed");
        }
        Ok(st) => panic!("the migration must fail with {fault:?}/{tfault:?}: {st:?}"),
    };
    assert!(vm.is_running(), "source VM not running after {err} ({fault:?}/{tfault:?})");
    let g = vm.generation();
    while vm.generation() < g + 50 {
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.pause().unwrap();
    assert_intact(&vm, (4 << 20) / PAGE_SIZE as u64);
    assert!(outcomes.recv_timeout(Duration::from_secs(20)).unwrap().is_err(), "destination kept a VM");
    h.join().unwrap();
    err
}

#[test]
fn fault_at_every_step_leaves_the_source_running() {
    let points = [
        FaultPoint::AfterPrepare,
        FaultPoint::InRound(0),
        FaultPoint::InRound(1),
        FaultPoint::AtSwitchover,
        FaultPoint::BeforeComplete,
        FaultPoint::BeforeCommit,
    ];
    for p in points {
        for a in
            [FaultAction::KillChannel(0), FaultAction::KillChannel(1), FaultAction::Cancel, FaultAction::CorruptControl]
        {
            // InRound(1) may not happen if the guest converges in one round: then nothing fails.
            if p == FaultPoint::InRound(1) {
                continue;
            }
            let e = expect_source_survives(Some((p, a)), Misbehave::None, 2);
            if a == FaultAction::Cancel {
                assert!(matches!(e, MigrateError::Cancelled), "{p:?}: {e}");
            }
        }
    }
}

#[test]
fn destination_faults_leave_the_source_running() {
    // Pages that land wrong (here: lost on the way) fail verification.
    let e = expect_source_survives(None, Misbehave::CorruptFrom { from_gpa: 0 }, 1);
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    // Every channel dies in round 0, as if the destination process died.
    expect_source_survives(Some((FaultPoint::InRound(0), FaultAction::KillAll)), Misbehave::None, 2);
}

#[test]
fn refused_when_the_destination_cannot_host() {
    let (addr, outcomes, h) = server(1 << 20, TargetConfig::default(), 1);
    let mut vm = guest("big", 16, 0, 0, SEED);
    let chans = connect_simple(addr, 1, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let e = migrate(&mut vm, chans, &MigrationConfig::default(), &|_| {}).unwrap_err();
    assert!(matches!(e, MigrateError::Refused(_)), "{e}");
    assert!(vm.is_running());
    assert!(outcomes.recv().unwrap().is_err());
    h.join().unwrap();
}

#[test]
fn not_converging_aborts_by_policy() {
    // A writer starved of CPU on a loaded machine may leave a round with nothing dirty, and then
    // the guest honestly converges: try a few times for the case under test.
    for attempt in 0..5 {
        let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
        let mut vm = guest("hot", 64, 32, 0, SEED); // writer as fast as it can
        let chans = connect_simple(addr, 1, &opts(false), Psk::new(KEY).unwrap()).unwrap();
        let cfg = MigrationConfig {
            converge: ConvergeConfig {
                downtime_limit: Duration::from_micros(1),
                max_rounds: 3,
                auto_converge: false,
                policy: ConvergePolicy::Abort,
                ..Default::default()
            },
            ..Default::default()
        };
        match migrate(&mut vm, chans, &cfg, &|_| {}) {
            Err(e) => {
                assert!(matches!(e, MigrateError::NotConverging { rounds: 3, .. }), "{e}");
                assert!(vm.is_running());
                assert!(outcomes.recv().unwrap().is_err());
                h.join().unwrap();
                return;
            }
            Ok(st) => {
                eprintln!("attempt {attempt}: converged anyway ({:?} pages per round)", st.pages_per_round);
                let _ = outcomes.recv();
                h.join().unwrap();
            }
        }
    }
    panic!("a guest writing as fast as it can converged five times under a 1 us downtime limit");
}

#[test]
fn lost_channel_fails_over_and_completes() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("failover", 64, 8, 32, SEED);
    let chans = connect_simple(addr, 3, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let fault = Some((FaultPoint::InRound(0), FaultAction::KillChannel(1)));
    let chans = inject(chans, fault, Misbehave::None, &cfg.cancel);
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
    assert!(st.verified);
    assert!(st.channels[1].failed);
    assert!(st.events.iter().any(|e| e.contains("channel 1 failed")), "{:?}", st.events);
    let t = into_synthetic(outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    h.join().unwrap();
}

#[test]
fn a_stalled_channel_is_dropped_and_its_batches_resent() {
    // Channel 2's path hangs after 3 acknowledgements: no error, no close, nothing more heard.
    // The stall detector drops it; the others finish the job.
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("stall", 64, 8, 32, SEED);
    let chans = connect_simple(addr, 3, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let chans = inject(chans, None, Misbehave::Stall { channel: 2, after_acks: 3 }, &CancelToken::new());
    let cfg = MigrationConfig {
        verify_full: true,
        stall_timeout: Some(Duration::from_millis(300)),
        // Small batches: channel 2 is stalled well before round 0 ends.
        batch_pages: 64,
        ..Default::default()
    };
    let t0 = Instant::now();
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
    assert_eq!(st.status, Status::Completed);
    assert!(st.verified);
    assert!(st.channels[2].failed, "{:?}", st.channels);
    assert!(st.events.iter().any(|e| e.contains("channel 2 failed: stalled")), "{:?}", st.events);
    assert!(st.events.iter().any(|e| e.contains("channel 2:") && e.contains("resent")), "{:?}", st.events);
    assert!(t0.elapsed() < cfg.reply_timeout, "finished by failover, not by a timeout");
    let t = into_synthetic(outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    h.join().unwrap();
}

#[test]
fn without_the_stall_detector_a_hung_channel_aborts_cleanly() {
    // No TCP user timeout either (it would notice the zero window after ~3 s and race the
    // engine's own timeout): only the engine's reply timeout ends this migration.
    let tcp = TcpOptions { user_timeout: None, ..TcpOptions::default() };
    let (addr, outcomes, h) = server_with(1 << 30, TargetConfig::default(), 1, tcp.clone());
    let mut vm = guest("stall-nodetect", 32, 4, 16, SEED);
    let chans = connect_simple(addr, 2, &tcp, Psk::new(KEY).unwrap()).unwrap();
    let chans = inject(chans, None, Misbehave::Stall { channel: 1, after_acks: 2 }, &CancelToken::new());
    let cfg = MigrationConfig {
        stall_timeout: None,
        reply_timeout: Duration::from_secs(2),
        batch_pages: 64,
        ..Default::default()
    };
    let err = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap_err();
    assert!(matches!(err, MigrateError::Timeout(_)), "{err}");
    assert!(vm.is_running(), "the source keeps running after an abort");
    assert!(outcomes.recv().unwrap().is_err(), "the destination keeps nothing");
    h.join().unwrap();
}

#[test]
fn host_limit_of_two_runs_eight_migrations() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 8);
    let sched = Arc::new(HostScheduler::new(2));
    let active = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..8)
        .map(|i| {
            let (sched, active, max) = (sched.clone(), active.clone(), max.clone());
            let ticket = sched.ticket();
            std::thread::spawn(move || {
                let mut vm = guest(&format!("vm-{i}"), 8, 1, 16, SEED);
                let _slot = sched.acquire(ticket);
                let n = active.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                let chans = connect_simple(addr, 2, &opts(i % 2 == 1), Psk::new(KEY).unwrap()).unwrap();
                let r = migrate(&mut vm, chans, &MigrationConfig { verify_full: true, ..Default::default() }, &|_| {});
                active.fetch_sub(1, Ordering::SeqCst);
                r.map(|s| s.verified)
            })
        })
        .collect();
    for h in hs {
        assert!(h.join().unwrap().unwrap(), "a migration did not verify");
    }
    assert!(max.load(Ordering::SeqCst) <= 2, "more than two migrations ran at once");
    for _ in 0..8 {
        assert!(outcomes.recv().unwrap().unwrap().stats.verified);
    }
    h.join().unwrap();
}

#[test]
fn lost_commit_confirmation_never_runs_the_vm_twice() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("uncertain", 16, 2, 16, SEED);
    let chans = connect_simple(addr, 1, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    // The destination commits and resumes, but its confirmation never reaches the source.
    let chans = inject(chans, None, Misbehave::LoseResumed, &CancelToken::new());
    let e = migrate(
        &mut vm,
        chans,
        &MigrationConfig { reply_timeout: Duration::from_secs(5), ..Default::default() },
        &|_| {},
    )
    .unwrap_err();
    let MigrateError::Uncertain(st) = e else { panic!("expected Uncertain, got {e}") };
    assert_eq!(st.status, Status::Uncertain);
    assert!(!vm.is_running(), "the source resumed a VM the destination may be running");
    assert!(outcomes.recv().unwrap().is_ok(), "the destination must keep the VM it committed");
    h.join().unwrap();
}

#[test]
fn lost_channel_rejoins_and_carries_work_again() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("rejoin", 256, 8, 32, SEED);
    let psk = Psk::new(KEY).unwrap();
    let session = ferry_transport::handshake::random_bytes();
    let path = Path { remote: addr, local: None, device: None };
    let paths = vec![path.clone(), path.clone(), path.clone()];
    let chans = connect_session_with(session, &paths, &opts(false), &psk).unwrap();
    let rj = {
        let psk = psk.clone();
        Rejoin(Arc::new(move |i| connect_one(&path, &opts(false), &psk, session, i).map_err(|e| e.to_string())))
    };
    let cfg = MigrationConfig {
        verify_full: true,
        rejoin: Some(rj),
        rejoin_interval: Duration::from_millis(5),
        window: 4,
        ..Default::default()
    };
    let chans =
        inject(chans, Some((FaultPoint::InRound(0), FaultAction::KillChannel(2))), Misbehave::None, &cfg.cancel);
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
    assert!(st.verified);
    assert!(st.events.iter().any(|e| e.contains("channel 2 failed")), "{:?}", st.events);
    assert!(st.events.iter().any(|e| e.contains("channel 2 rejoined")), "{:?}", st.events);
    assert!(!st.channels[2].failed, "the rejoined channel is counted as failed");
    assert!(st.channels[2].batches > 0, "the rejoined channel carried nothing");
    let out = outcomes.recv().unwrap().unwrap();
    assert_eq!(out.stats.rejoined_channels, vec![2]);
    let t = into_synthetic(out);
    same_memory(&vm, &t);
    h.join().unwrap();
}

#[test]
fn round_robin_spreads_evenly_and_survives_a_loss() {
    let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
    let mut vm = guest("rr", 64, 4, 16, SEED);
    let chans = connect_simple(addr, 3, &opts(false), Psk::new(KEY).unwrap()).unwrap();
    let cfg = MigrationConfig { verify_full: true, scheduling: Scheduling::RoundRobin, ..Default::default() };
    let chans =
        inject(chans, Some((FaultPoint::InRound(0), FaultAction::KillChannel(1))), Misbehave::None, &cfg.cancel);
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
    assert!(st.verified);
    assert!(st.channels[1].failed);
    assert!(st.channels[0].batches > 0 && st.channels[2].batches > 0);
    let t = into_synthetic(outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    h.join().unwrap();
}

/// One server on two listeners: channel 0 opens its session on one, channel 1 finds it on the
/// other (routed by the session id alone); a second channel 0 of that session is refused on
/// either listener.
#[test]
fn session_channels_join_across_listeners() {
    let hs = ServerConfig {
        creds: Psk::new(KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let a = TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), hs.clone()).unwrap();
    let b = TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), hs).unwrap();
    let srv = MigrationServer::new(a, Arc::new(SyntheticFactory::new(1 << 30, false)), TargetConfig::default())
        .with_acceptor(b);
    let addrs = srv.local_addrs().unwrap();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|a| a.0 == "tcp"));
    let running = server::spawn(srv, Some(1)).unwrap();
    let psk = Psk::new(KEY).unwrap();
    let session = ferry_transport::handshake::random_bytes();
    let paths = [Path::to(addrs[0].1), Path::to(addrs[1].1)];
    let chans = connect_session_with(session, &paths, &opts(false), &psk).unwrap();
    for p in &paths {
        let e = connect_one(p, &opts(false), &psk, session, 0).unwrap_err();
        assert!(e.to_string().contains("session already open"), "{e}");
    }
    let mut vm = guest("two-listeners", 32, 0, 0, SEED);
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
    assert_eq!(st.status, Status::Completed);
    assert!(st.channels.iter().all(|c| c.batches > 0 && !c.failed), "{:?}", st.channels);
    let t = into_synthetic(running.outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    running.thread.join().unwrap();
}

/// A loopback relay between the source and the server that flips one bit of the `conn`-th
/// connection's source-to-destination stream at byte `at` (well past its handshake), as a man in
/// the middle would. Returns the address to connect to.
fn tampering_relay(to: SocketAddr, conn: usize, at: u64) -> SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(c) = c else { return };
            let Ok(s) = std::net::TcpStream::connect(to) else { return };
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            // Destination to source, untouched.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let (mut c, mut s) = (c, s);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = 0u64;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if i == conn && seen <= at && at < seen + n as u64 {
                        buf[(at - seen) as usize] ^= 0x01;
                    }
                    seen += n as u64;
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn a_tampered_frame_aborts_the_migration_and_the_source_keeps_running() {
    // Channel 1 carries pages from round 0 on; one bit flipped 1 MiB into its stream lands in a
    // sealed batch (data or header): its tag fails, the destination aborts, the source resumes.
    for conn in [1usize, 0] {
        let (addr, outcomes, h) = server(1 << 30, TargetConfig::default(), 1);
        let relay = tampering_relay(addr, conn, 1 << 20);
        let mut vm = guest("tampered", 32, 4, 32, SEED);
        let cfg = MigrationConfig { failover: false, reply_timeout: Duration::from_secs(10), ..Default::default() };
        let chans = connect_simple(relay, 2, &opts(false), Psk::new(KEY).unwrap()).unwrap();
        let err = migrate(&mut vm, chans, &cfg, &|_| {}).expect_err("a tampered stream must not complete");
        assert!(vm.is_running(), "source VM not running after {err}");
        let dst = outcomes.recv_timeout(Duration::from_secs(20)).unwrap();
        let derr = dst.expect_err("the destination must discard the VM").to_string();
        assert!(
            [&derr, &err.to_string()].iter().any(|m| m.contains("authentication") || m.contains("checksum")),
            "neither side names the tampered frame: source {err}, destination {derr}"
        );
        let g = vm.generation();
        while vm.generation() < g + 50 {
            std::thread::sleep(Duration::from_millis(2));
        }
        vm.pause().unwrap();
        assert_intact(&vm, (4 << 20) / PAGE_SIZE as u64);
        h.join().unwrap();
    }
}
