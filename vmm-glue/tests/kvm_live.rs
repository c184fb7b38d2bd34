//! Live migration of a real KVM guest with the engine (`ferry_migrate::source::migrate`) between
//! two "hosts" (two servers, two factories) over loopback TCP, back and forth while the guest
//! runs. Needs /dev/kvm; prints `SKIP: <reason>` where there is none. `FERRY_KVM_TRIPS` sets the
//! number of one-way trips (default 6), `FERRY_KVM_MEM_MIB` the guest memory (default 256) and
//! `FERRY_KVM_WS_MIB` its working set (default 16).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::server::connect_simple;
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_migrate::MigrateError;
use ferry_test_support::{kvm_or_skip, server};
use ferry_transport::handshake::Psk;
use ferry_transport::tcp::TcpOptions;
use ferry_vmm_glue::kvm::guest::expected_checksum;
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};

const KEY: &[u8] = b"kvm-live-migration-test-key-0123456789";

type Outcomes = mpsc::Receiver<Result<TargetOutcome, MigrateError>>;

fn server(factory: KvmFactory, max: usize) -> (std::net::SocketAddr, Outcomes, std::thread::JoinHandle<()>) {
    let s = server::loopback(
        Psk::new(KEY).unwrap(),
        TcpOptions::default(),
        Arc::new(factory),
        TargetConfig::default(),
        Some(max),
    );
    (s.addr, s.outcomes, s.thread)
}

#[test]
fn kvm_guest_live_migrates_back_and_forth() {
    if !kvm_or_skip("kvm_guest_live_migrates_back_and_forth") {
        return;
    }
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let trips = env("FERRY_KVM_TRIPS", 6) as usize;
    let cfg = GuestConfig {
        vm_id: "live-kvm".into(),
        mem_bytes: env("FERRY_KVM_MEM_MIB", 256) << 20,
        slot_bytes: 128 << 20,
        ws_pages: env("FERRY_KVM_WS_MIB", 16) << 8, // rewritten as fast as the guest can
        ..Default::default()
    };
    let factories = [KvmFactory::new(1 << 30), KvmFactory::new(1 << 30)];
    let servers = [server(factories[0].clone(), trips / 2), server(factories[1].clone(), trips.div_ceil(2))];
    let mut vm = KvmVm::boot(&cfg).unwrap();
    factories[0].adopt(&mut vm).unwrap();
    vm.start().unwrap();
    vm.wait_passes(3, Duration::from_secs(30)).unwrap();
    let psk = Psk::new(KEY).unwrap();
    for trip in 0..trips {
        let to = (trip + 1) % 2;
        let before = vm.report();
        let chans = connect_simple(servers[to].0, 2, &TcpOptions::default(), &psk).unwrap();
        let mcfg = MigrationConfig { verify_full: trip == 0, ..Default::default() };
        let st = migrate(&mut vm, chans, &mcfg, &|_| {}).unwrap();
        assert_eq!(st.status, Status::Completed);
        assert!(!vm.is_running(), "the source copy stays paused after commit");
        let at_pause = vm.report();
        drop(vm); // frees the id on the source host
        let out = servers[to].1.recv().unwrap().unwrap();
        let any: Box<dyn std::any::Any> = out.vm.into_any();
        let mut b = *any.downcast::<KvmVm>().expect("a KVM VM");
        b.wait_passes(at_pause.passes + 3, Duration::from_secs(30)).unwrap();
        b.pause().unwrap();
        let r = b.report();
        assert_eq!(r.errors, 0, "trip {trip}: guest found stale or lost pages: {:?}", r.error_records);
        assert_eq!(r.checksum, expected_checksum(cfg.ws_base, cfg.ws_pages, cfg.stride, r.passes), "trip {trip}");
        assert!(at_pause.passes >= before.passes);
        eprintln!(
            "trip {trip} -> host {to}: total {:?}, downtime {:?}, rounds {}, passes {} -> {} (target)",
            st.total, st.downtime, st.rounds, at_pause.passes, r.passes
        );
        b.start().unwrap();
        vm = b;
    }
    vm.stop().unwrap();
    drop(vm);
    for (_, _, h) in servers {
        h.join().unwrap();
    }
}
