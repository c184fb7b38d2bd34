//! Live migration of the synthetic guest over the `rdma` backend (soft-RoCE in CI:
//! `scripts/softroce/run.sh`): byte-identical result, and a queue pair forced into the error
//! state mid-migration ends in failover or a clean abort with the source running.
//! Needs `FERRY_RDMA_DEVICE`; without it each test prints `SKIP: <reason>`.
#![cfg(feature = "rdma")]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{receive, TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_migrate::MigrateError;
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Psk, ServerConfig};
use ferry_transport::rdma::{self, RdmaAcceptor, RdmaOptions};
use ferry_transport::{Channel, Killer};
use ferry_vmm_glue::synthetic::SyntheticFactory;

use ferry_test_support::guest::{guest, into_synthetic, same_memory};

/// Seed of the guests' page contents.
const SEED: u64 = 11;
const KEY: &[u8] = b"rdma-live-migration-key-0123456789";

fn opts(test: &str) -> Option<RdmaOptions> {
    if let Some(r) = rdma::skip_reason() {
        let _ = writeln!(std::io::stderr(), "SKIP: rdma migration {test}: {r}");
        return None;
    }
    let mut o = RdmaOptions::from_env()?;
    o.completion_timeout = Duration::from_secs(5);
    Some(o)
}

/// The destination: accepts `n` rdma channels of one session and runs `receive`.
fn destination(
    o: &RdmaOptions,
    n: usize,
) -> (SocketAddr, std::thread::JoinHandle<Result<TargetOutcome, MigrateError>>) {
    let hs = ServerConfig { psk: Psk::new(KEY).unwrap(), caps: Caps::RDMA, timeout: Duration::from_secs(5) };
    let acc = RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), o.clone(), hs).unwrap();
    let addr = acc.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (tx, rx) = mpsc::channel::<Channel>();
        let mut worker = None;
        for _ in 0..n {
            let ch = acc.accept(&|_| Ok(())).expect("accept").channel;
            if ch.info.established.binding.channel == 0 {
                worker = Some(std::thread::spawn(move || {
                    let factory = SyntheticFactory::new(1 << 30, false);
                    receive(&factory, ch, &rx, &TargetConfig::default())
                }));
                // Channels 1.. go through the queue; the worker owns the receiver.
                break;
            }
            let _ = tx.send(ch);
        }
        for _ in 1..n {
            let ch = acc.accept(&|_| Ok(())).expect("accept").channel;
            let _ = tx.send(ch);
        }
        worker.expect("channel 0 first").join().expect("receive thread")
    });
    (addr, h)
}

fn connect(addr: SocketAddr, o: &RdmaOptions, n: usize) -> (Vec<Channel>, Vec<Killer>) {
    let session = random_bytes();
    let mut chans = Vec::new();
    let mut faults = Vec::new();
    for i in 0..n {
        let cfg = ClientConfig {
            psk: Psk::new(KEY).unwrap(),
            binding: ChannelBinding { session, channel: i as u16 },
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
        };
        let c = rdma::connect(addr, o, cfg).expect("rdma connect");
        chans.push(c.channel);
        faults.push(c.qp_fault);
    }
    (chans, faults)
}

#[test]
fn rdma_live_migration_is_byte_identical() {
    let Some(o) = opts("rdma_live_migration_is_byte_identical") else { return };
    let (addr, dst) = destination(&o, 2);
    // A guest that keeps writing while it moves.
    let mut vm = guest("rdma-busy", 32, 4, 2, SEED);
    let (chans, _faults) = connect(addr, &o, 2);
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let t = std::time::Instant::now();
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).expect("migration over rdma");
    eprintln!("rdma migration: {:?} in {:?}, {} rounds, channels {:?}", st.status, t.elapsed(), st.rounds, st.channels);
    assert_eq!(st.status, Status::Completed);
    assert!(st.verified);
    assert!(!vm.is_running(), "the source copy stays paused after commit");
    let out = dst.join().expect("destination thread").expect("destination outcome");
    assert!(out.stats.verified);
    same_memory(&vm, &into_synthetic(out));
}

#[test]
fn rdma_qp_error_mid_migration_fails_over_or_aborts_cleanly() {
    let Some(o) = opts("rdma_qp_error_mid_migration_fails_over_or_aborts_cleanly") else { return };
    let (addr, dst) = destination(&o, 2);
    let mut vm = guest("rdma-fault", 32, 0, 0, SEED);
    let (chans, faults) = connect(addr, &o, 2);
    let fired = Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    let fault = faults[1].clone();
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let r = migrate(&mut vm, chans, &cfg, &move |p| {
        if !f2.swap(true, Ordering::SeqCst) {
            eprintln!("forcing channel 1's queue pair into the error state at {p:?}");
            fault();
        }
    });
    assert!(fired.load(Ordering::SeqCst), "the fault never fired");
    let out = dst.join().expect("destination thread");
    match r {
        Ok(st) => {
            eprintln!("failed over: {:?}, channels {:?}", st.status, st.channels);
            assert!(st.verified);
            same_memory(&vm, &into_synthetic(out.expect("destination outcome")));
        }
        Err(e) => {
            eprintln!("clean abort: {e}");
            assert!(vm.is_running(), "the source must keep running after an abort");
            assert!(out.is_err(), "the destination must discard the VM");
        }
    }
}
