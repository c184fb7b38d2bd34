//! Live migration of the synthetic guest over the `rdma` backend (soft-RoCE in CI:
//! `scripts/softroce/run.sh`), through the product's `MigrationServer` listening on rdma and tcp
//! at once: byte-identical result on each transport, and a queue pair forced into the error state
//! mid-migration ends in failover or a clean abort with the source running.
//! Needs `FERRY_RDMA_DEVICE`; without it each test prints `SKIP: <reason>`.
#![cfg(feature = "rdma")]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_memory::MemoryMap;
use ferry_migrate::server::{connect_simple, MigrationServer};
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::{MigrationStats, Status};
use ferry_migrate::target::TargetConfig;
use ferry_migrate::vm::{DirtyBitmap, SourceVm, TargetFactory, TargetVm, VmError, VmShape};
use ferry_transport::endpoint::Connector;
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Psk, ServerConfig};
use ferry_transport::rdma::{self, RdmaAcceptor, RdmaOptions};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::{Channel, Killer};
use ferry_vmm_glue::synthetic::{SyntheticFactory, SyntheticVm};

use ferry_test_support::guest::{guest, into_synthetic, same_memory};
use ferry_test_support::server::{self, RunningServer};

/// Seed of the guests' page contents.
const SEED: u64 = 11;
const KEY: &[u8] = b"rdma-live-migration-key-0123456789";

/// One device test at a time: one of them reads the process-wide window counters
/// ([`rdma::window_stats`]), which every migration's channels move.
static SERIAL: Mutex<()> = Mutex::new(());

fn opts(test: &str) -> Option<(RdmaOptions, MutexGuard<'static, ()>)> {
    if let Some(r) = rdma::skip_reason() {
        let _ = writeln!(std::io::stderr(), "SKIP: rdma migration {test}: {r}");
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut o = RdmaOptions::from_env()?;
    o.completion_timeout = Duration::from_secs(5);
    Some((o, serial))
}

/// The destination service as a host runs it: one `MigrationServer` listening on rdma and on
/// tcp, serving `max` migrations on its own thread.
struct Destination {
    rdma: SocketAddr,
    tcp: SocketAddr,
    server: RunningServer,
}

/// The destinations' handshake: the test key, every capability, the default encryption.
fn handshake() -> ServerConfig {
    ServerConfig {
        creds: Psk::new(KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}

/// An rdma listener on loopback with [`handshake`].
fn rdma_acceptor(o: &RdmaOptions) -> RdmaAcceptor {
    RdmaAcceptor::bind("127.0.0.1:0".parse().unwrap(), o.clone(), handshake()).unwrap()
}

fn destination(o: &RdmaOptions, max: usize) -> Destination {
    let rdma = rdma_acceptor(o);
    let tcp = TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), handshake()).unwrap();
    let srv = MigrationServer::new(rdma, Arc::new(SyntheticFactory::new(1 << 30, false)), TargetConfig::default())
        .with_acceptor(tcp);
    let addrs = srv.local_addrs().unwrap();
    assert_eq!(addrs.iter().map(|a| a.0).collect::<Vec<_>>(), ["rdma", "tcp"]);
    Destination { rdma: addrs[0].1, tcp: addrs[1].1, server: server::spawn(srv, Some(max)).unwrap() }
}

/// Source channels opened by hand, keeping each queue pair's fault injector.
fn connect_with_faults(addr: SocketAddr, o: &RdmaOptions, n: usize) -> (Vec<Channel>, Vec<Killer>) {
    let session = random_bytes();
    let mut chans = Vec::new();
    let mut faults = Vec::new();
    for i in 0..n {
        let cfg = ClientConfig {
            creds: Psk::new(KEY).unwrap().into(),
            binding: ChannelBinding { session, channel: i as u16 },
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let c = rdma::connect(addr, o, cfg).expect("rdma connect");
        chans.push(c.channel);
        faults.push(c.qp_fault);
    }
    (chans, faults)
}

/// Migrate a busy guest on `connector`'s transport to `addr` and check the destination's copy.
fn migrate_busy_guest(id: &str, addr: SocketAddr, connector: &dyn Connector, dst: &Destination) -> MigrationStats {
    // A guest that keeps writing while it moves.
    let mut vm = guest(id, 32, 4, 2, SEED);
    let chans = connect_simple(addr, 2, connector, Psk::new(KEY).unwrap()).expect("connect");
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let t = std::time::Instant::now();
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).expect("migration");
    eprintln!(
        "{} migration: {:?} in {:?}, {} rounds, channels {:?}",
        connector.transport(),
        st.status,
        t.elapsed(),
        st.rounds,
        st.channels
    );
    assert_eq!(st.status, Status::Completed);
    assert!(st.verified);
    assert!(!vm.is_running(), "the source copy stays paused after commit");
    let out = dst.server.outcomes.recv().expect("destination outcome").expect("destination received the VM");
    assert!(out.stats.verified);
    same_memory(&vm, &into_synthetic(out));
    st
}

#[test]
fn rdma_live_migration_is_byte_identical() {
    let Some((o, _serial)) = opts("rdma_live_migration_is_byte_identical") else { return };
    // One server, two transports: an rdma migration and then a tcp one, both through it.
    let dst = destination(&o, 2);
    let st = migrate_busy_guest("rdma-busy", dst.rdma, &o, &dst);
    assert!(st.channels.iter().all(|c| c.backend == "rdma"), "{:?}", st.channels);
    let st = migrate_busy_guest("tcp-busy", dst.tcp, &TcpOptions::default(), &dst);
    assert!(st.channels.iter().all(|c| c.backend == "tcp"), "{:?}", st.channels);
    dst.server.thread.join().expect("server thread");
}

#[test]
fn rdma_qp_error_mid_migration_fails_over_or_aborts_cleanly() {
    let Some((o, _serial)) = opts("rdma_qp_error_mid_migration_fails_over_or_aborts_cleanly") else { return };
    let dst = destination(&o, 1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut vm = BarrierWatch { vm: guest("rdma-fault", 32, 0, 0, SEED), seen: seen.clone() };
    let (chans, faults) = connect_with_faults(dst.rdma, &o, 2);
    let fired = Arc::new(AtomicBool::new(false));
    let f2 = fired.clone();
    let fault = faults[1].clone();
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let r = migrate(&mut vm, chans, &cfg, &move |p| {
        // Mid-way through round 0, once both channels carry batches (the destination then has
        // windows bound on channel 1).
        let midway = p.status == Status::Active && p.round == 0 && p.remaining_bytes <= p.guest_bytes * 3 / 4;
        if midway && !f2.swap(true, Ordering::SeqCst) {
            eprintln!("forcing channel 1's queue pair into the error state at {p:?}");
            fault();
        }
    });
    assert!(fired.load(Ordering::SeqCst), "the fault never fired");
    let out = dst.server.outcomes.recv().expect("destination outcome");
    dst.server.thread.join().expect("server thread");
    match r {
        Ok(st) => {
            eprintln!("failed over: {:?}, channels {:?}", st.status, st.channels);
            assert!(st.verified);
            assert!(st.channels[1].failed && st.channels[1].batches > 0, "channel 1 carried batches, then failed");
            // The channel the source gave up was sealed at the destination (its `ChannelDrop`)
            // before the source moved past any barrier: no window of it was still bound then.
            let seen = seen.lock().unwrap().clone();
            eprintln!("windows bound when the source moved past each barrier: {seen:?}");
            assert!(!seen.is_empty(), "the source took the dirty pages: {seen:?}");
            assert!(seen.iter().all(|&n| n == 0), "a window of a round was bound past its barrier: {seen:?}");
            same_memory(&vm.vm, &into_synthetic(out.expect("destination outcome")));
        }
        Err(e) => {
            eprintln!("clean abort: {e}");
            assert!(vm.vm.is_running(), "the source must keep running after an abort");
            assert!(out.is_err(), "the destination must discard the VM");
        }
    }
}

/// A write with round 0's memory-window key once round 0 is over (issue 13: memory writable
/// only while a round is open): on one channel, from the first progress report of a later round,
/// the source's queue pair writes a page with the first window table it got, outside any batch.
/// The destination's device refuses it (the window was invalidated at round 0's barrier), the
/// channel breaks, and with no channel left the migration aborts cleanly: the source keeps
/// running and the destination discards its copy.
#[test]
fn rdma_write_with_a_closed_rounds_key_aborts_cleanly() {
    let Some((o, _serial)) = opts("rdma_write_with_a_closed_rounds_key_aborts_cleanly") else { return };
    let dst = destination(&o, 1);
    let mut vm = guest("rdma-stale", 32, 4, 2, SEED);
    let cfg = ClientConfig {
        creds: Psk::new(KEY).unwrap().into(),
        binding: ChannelBinding { session: random_bytes(), channel: 0 },
        caps: Caps::RDMA,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let c = rdma::connect(dst.rdma, &o, cfg).expect("rdma connect");
    let probe = Arc::new(c.probe);
    let fired = Arc::new(std::sync::Mutex::new(None::<String>));
    let (f2, p2) = (fired.clone(), probe.clone());
    let mcfg = MigrationConfig { verify_full: true, ..Default::default() };
    let r = migrate(&mut vm, vec![c.channel], &mcfg, &move |p| {
        let mut f = f2.lock().unwrap();
        if p.round >= 1 && f.is_none() {
            let res = p2.write_first(0x1000, 0x5a);
            eprintln!("stale write in round {}: {res:?}", p.round);
            *f = Some(format!("{res:?}"));
        }
    });
    let what = fired.lock().unwrap().clone().expect("no round after round 0: the stale write never fired");
    assert!(!what.starts_with("Ok"), "a write with round 0's key landed in round 1: {what}");
    let out = dst.server.outcomes.recv().expect("destination outcome");
    dst.server.thread.join().expect("server thread");
    let e = r.expect_err("the migration cannot complete on a broken channel");
    eprintln!("clean abort: {e}");
    assert!(vm.is_running(), "the source must keep running after an abort");
    assert!(out.is_err(), "the destination must discard the VM");
}

#[test]
fn rdma_shared_nothing_moves_the_disks_on_the_control_path() {
    // Disk blocks ride as control messages (two-sided SEND) on every rdma channel, beside the
    // one-sided page writes; the disks arrive byte-identical, named only at the commit.
    let Some((o, _serial)) = opts("rdma_shared_nothing_moves_the_disks_on_the_control_path") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (src, dstd) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dstd).unwrap();
    let specs: Vec<ferry_vmm_glue::guestdisk::DiskSpec> = [3 * (1 << 20) + 4321, (1 << 20) + 1]
        .iter()
        .enumerate()
        .map(|(i, &size_bytes)| ferry_vmm_glue::guestdisk::DiskSpec {
            path: src.join(format!("d{i}.img")),
            size_bytes,
            allocated_pct: 50,
            seed: 3 + i as u64,
        })
        .collect();
    for s in &specs {
        ferry_vmm_glue::guestdisk::create_image(s).unwrap();
    }
    let cfg = ferry_vmm_glue::synthetic::SyntheticConfig {
        vm_id: "rdma-disks".into(),
        memory_bytes: 16 << 20,
        disks: specs.clone(),
        disk_working_set_bytes: 1 << 20,
        disk_write_rate_bytes_per_s: 2 << 20,
        seed: SEED,
        ..Default::default()
    };
    let mut vm = ferry_vmm_glue::synthetic::SyntheticVm::new(&cfg).unwrap();
    vm.resume().unwrap();
    let acc = rdma_acceptor(&o);
    let tcfg = TargetConfig { disk_dir: Some(dstd.clone()), ..Default::default() };
    let srv = MigrationServer::new(acc, Arc::new(SyntheticFactory::new(1 << 30, false)), tcfg);
    let addr = srv.local_addrs().unwrap()[0].1;
    let server = server::spawn(srv, Some(1)).unwrap();
    let chans = connect_simple(addr, 2, &o, Psk::new(KEY).unwrap()).expect("connect");
    let mcfg = MigrationConfig { retain_source_disks: true, ..Default::default() };
    let st = migrate(&mut vm, chans, &mcfg, &|_| {}).expect("migration");
    assert!(st.verified && st.disks.iter().all(|d| d.verified), "{st:?}");
    assert!(st.channels.iter().all(|c| c.backend == "rdma"), "{:?}", st.channels);
    let out = server.outcomes.recv().unwrap().expect("the destination runs the VM");
    assert_eq!(vm.check_disks().unwrap(), vec![0, 0]);
    for (s, p) in specs.iter().zip(&out.disks) {
        assert!(std::fs::read(&s.path).unwrap() == std::fs::read(p).unwrap(), "{} differs", p.display());
    }
    same_memory(&vm, &into_synthetic(out));
    server.thread.join().unwrap();
}

/// The synthetic guest, reading the destination's (same process) window counters each time the
/// source moves past a round barrier: when it takes the dirty pages and when it saves the state.
struct BarrierWatch {
    vm: SyntheticVm,
    /// `bound_now` at each of those moments.
    seen: Arc<Mutex<Vec<u64>>>,
}

impl BarrierWatch {
    fn look(&self) {
        self.seen.lock().unwrap().push(rdma::window_stats().bound_now);
    }
}

impl SourceVm for BarrierWatch {
    fn shape(&self) -> VmShape {
        self.vm.shape()
    }
    fn memory(&self) -> MemoryMap {
        SourceVm::memory(&self.vm)
    }
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.vm.start_dirty_log()
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        self.look();
        self.vm.take_dirty()
    }
    fn return_dirty(&mut self, pages: &DirtyBitmap) {
        self.vm.return_dirty(pages)
    }
    fn stop_dirty_log(&mut self) {
        self.vm.stop_dirty_log()
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        SourceVm::resume(&mut self.vm)
    }
    fn is_running(&self) -> bool {
        self.vm.is_running()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.look();
        self.vm.save_state()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.vm.set_throttle(percent)
    }
}

/// Runs `hook` when the destination loads the state: after `Complete`, after the final check
/// (the destination restores only a verified image), before the commit.
struct AtRestore {
    inner: SyntheticFactory,
    hook: Arc<dyn Fn() + Send + Sync>,
}

struct AtRestoreVm {
    vm: Box<dyn TargetVm>,
    hook: Arc<dyn Fn() + Send + Sync>,
}

impl TargetFactory for AtRestore {
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError> {
        Ok(Box::new(AtRestoreVm { vm: self.inner.create(shape)?, hook: self.hook.clone() }))
    }
}

impl TargetVm for AtRestoreVm {
    fn memory(&self) -> MemoryMap {
        self.vm.memory()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        (self.hook)();
        self.vm.restore_state(state)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self.vm.into_any()
    }
}

/// Issue 13's order, end to end on two rdma channels of a busy guest: every time the source
/// moves past a round barrier (takes the dirty pages, saves the state) no memory window of the
/// destination is bound on any channel; at `Complete` the destination seals every channel
/// before its final check (each queue pair moved to the error state, none refused it), so when
/// it loads the state no window exists and a one-sided write of the source's channel 1 with its
/// last round's key, issued then, fails at the source; the migration still completes, verified,
/// and the destination's memory is byte-identical to the source's (the write landed nowhere).
#[test]
fn rdma_rounds_close_before_the_source_moves_on_and_complete_seals_every_queue_pair() {
    let Some((o, _serial)) = opts("rdma_rounds_close_before_the_source_moves_on_and_complete_seals_every_queue_pair")
    else {
        return;
    };
    let acc = rdma_acceptor(&o);
    // What the destination saw when it loaded the state, and the write's outcome then.
    let at_restore: Arc<Mutex<Option<(rdma::WindowStats, String)>>> = Arc::default();
    let probe: Arc<Mutex<Option<rdma::WriteProbe>>> = Arc::default();
    let (ar, pr) = (at_restore.clone(), probe.clone());
    let hook: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let stats = rdma::window_stats();
        let res = match pr.lock().unwrap().as_ref() {
            Some(p) => format!("{:?}", p.write_last(0x1000, 0x5a)),
            None => "no probe".into(),
        };
        eprintln!("at restore: {stats:?}, write with channel 1's last key: {res}");
        *ar.lock().unwrap() = Some((stats, res));
    });
    let factory = AtRestore { inner: SyntheticFactory::new(1 << 30, false), hook };
    let srv = MigrationServer::new(acc, Arc::new(factory), TargetConfig::default());
    let addr = srv.local_addrs().unwrap()[0].1;
    let server = server::spawn(srv, Some(1)).unwrap();
    let session = random_bytes();
    let mut chans = Vec::new();
    for i in 0..2u16 {
        let cfg = ClientConfig {
            creds: Psk::new(KEY).unwrap().into(),
            binding: ChannelBinding { session, channel: i },
            caps: Caps::RDMA,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let c = rdma::connect(addr, &o, cfg).expect("rdma connect");
        chans.push(c.channel);
        if i == 1 {
            *probe.lock().unwrap() = Some(c.probe);
        }
    }
    let before = rdma::window_stats();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut vm = BarrierWatch { vm: guest("rdma-order", 32, 4, 2, SEED), seen: seen.clone() };
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let st = migrate(&mut vm, chans, &cfg, &|_| {}).expect("migration");
    eprintln!("migration: {:?}, {} rounds, channels {:?}", st.status, st.rounds, st.channels);
    assert_eq!(st.status, Status::Completed);
    assert!(st.verified);
    let out = server.outcomes.recv().expect("destination outcome").expect("destination received the VM");
    server.thread.join().expect("server thread");
    let seen = seen.lock().unwrap().clone();
    eprintln!("windows bound when the source moved past each barrier: {seen:?}");
    assert!(seen.len() >= 2, "the source took the dirty pages and saved the state: {seen:?}");
    assert!(seen.iter().all(|&n| n == 0), "a window was bound when the source's round ended: {seen:?}");
    let (stats, write) = at_restore.lock().unwrap().clone().expect("the destination restored the state");
    assert_eq!(stats.bound_now, 0, "a window outlived Complete");
    assert!(stats.seals - before.seals >= 2, "both channels sealed before the restore: {stats:?}");
    assert_eq!(stats.seal_qp_failures, before.seal_qp_failures, "a queue pair refused the error state");
    assert!(write.starts_with("Err"), "a write after Complete was taken: {write}");
    same_memory(&vm.vm, &into_synthetic(out));
}
