//! Live migration over the `quic` backend on loopback: the migration server, the drivers and
//! the session helpers take it unchanged (the same `Acceptor`/`Connector` traits as tcp). A busy
//! guest moves and verifies over one channel, four connections and four streams of one
//! connection; a source without the key is refused and keeps running; a channel cut in the
//! middle of a round (a stream of a shared connection, or a connection) fails over to the others.

use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::server::{connect_simple, RunningServer};
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::vm::SourceVm;
use ferry_test_support::fault::{inject, FaultAction, FaultPoint, Misbehave};
use ferry_test_support::guest::{guest, into_synthetic, same_memory};
use ferry_test_support::server;
use ferry_transport::handshake::Psk;
use ferry_transport::quic::QuicOptions;
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticFactory};

const SEED: u64 = 11;
const KEY: &[u8] = b"quic-live-migration-test-key-0123";

fn server(max: usize) -> RunningServer {
    let factory = Arc::new(SyntheticFactory::new(1 << 30, false));
    server::quic_loopback(Psk::new(KEY).unwrap(), factory, Some(max))
}

#[test]
fn busy_guest_moves_over_quic_and_verifies() {
    for (opts, nch) in [(QuicOptions::default(), 1), (QuicOptions::default(), 4), (QuicOptions::shared(), 4)] {
        let what = format!("{nch} channel(s), shared connection: {}", opts.share_connection);
        let s = server(1);
        let mut vm = guest("busy-quic", 64, 16, 64, SEED);
        std::thread::sleep(Duration::from_millis(50));
        let chans = connect_simple(s.addr, nch, &opts, Psk::new(KEY).unwrap()).unwrap();
        let cfg = MigrationConfig { verify_full: true, ..Default::default() };
        let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
        assert_eq!(st.status, Status::Completed, "{what}");
        assert!(st.verified && st.rounds >= 2, "{what}: {st:?}");
        assert_eq!(st.channels.len(), nch, "{what}");
        assert!(st.channels.iter().all(|c| c.backend == "quic" && c.batches > 0), "{what}: {:?}", st.channels);
        let out = s.outcomes.recv().unwrap().unwrap();
        assert!(out.stats.verified, "{what}");
        let t = into_synthetic(out);
        same_memory(&vm, &t);
        assert_eq!(check_stamps(&t.into_vm().unwrap()).unwrap(), 0, "{what}: moved stamps");
        s.thread.join().unwrap();
    }
}

#[test]
fn a_source_without_the_key_is_refused_and_keeps_running() {
    let s = server(1);
    let mut vm = guest("stranger", 16, 0, 0, SEED);
    let wrong = Psk::new(b"some-other-key-0123456789abcdefghij".to_vec()).unwrap();
    let e = connect_simple(s.addr, 1, &QuicOptions::default(), &wrong).unwrap_err();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(vm.is_running());
    // The listener still serves a source with the key.
    let chans = connect_simple(s.addr, 1, &QuicOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let st = migrate(&mut vm, chans, &MigrationConfig::default(), &|_| {}).unwrap();
    assert!(st.verified);
    assert!(s.outcomes.recv().unwrap().unwrap().stats.verified);
    s.thread.join().unwrap();
}

#[test]
fn a_cut_channel_fails_over_to_the_others() {
    for opts in [QuicOptions::default(), QuicOptions::shared()] {
        let what = format!("shared connection: {}", opts.share_connection);
        let s = server(1);
        let mut vm = guest("failover-quic", 64, 8, 32, SEED);
        let chans = connect_simple(s.addr, 3, &opts, Psk::new(KEY).unwrap()).unwrap();
        let cfg = MigrationConfig { verify_full: true, ..Default::default() };
        let fault = Some((FaultPoint::InRound(0), FaultAction::KillChannel(1)));
        let chans = inject(chans, fault, Misbehave::None, &cfg.cancel);
        let st = migrate(&mut vm, chans, &cfg, &|_| {}).unwrap();
        assert!(st.verified, "{what}");
        assert!(st.channels[1].failed, "{what}: {:?}", st.channels);
        assert!(st.events.iter().any(|e| e.contains("channel 1 failed")), "{what}: {:?}", st.events);
        let t = into_synthetic(s.outcomes.recv().unwrap().unwrap());
        same_memory(&vm, &t);
        s.thread.join().unwrap();
    }
}
