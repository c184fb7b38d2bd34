//! Quick migration (migrate::quick) of a real KVM guest through a shared directory. Needs
//! /dev/kvm; prints `SKIP: <reason>` where there is none.

use std::time::{Duration, Instant};

use ferry_migrate::quick::{quick_load_into, quick_save, QuickError, SharedDir, VmRunState};
use ferry_migrate::vm::{SourceVm, VmError};
use ferry_vmm_glue::kvm::guest::expected_checksum;
use ferry_vmm_glue::kvm::{kvm_usable, GuestConfig, KvmFactory, KvmVm};

fn wait_passes(vm: &KvmVm, passes: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.report().passes < passes {
        assert!(vm.vcpu_failure().is_none(), "vCPU failed: {:?}", vm.vcpu_failure());
        assert!(Instant::now() < deadline, "guest stuck at {} passes", vm.report().passes);
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn quick_migration_round_trips_a_kvm_guest() {
    if let Err(why) = kvm_usable() {
        eprintln!("SKIP: quick_migration_round_trips_a_kvm_guest: {why}");
        println!("SKIP: quick_migration_round_trips_a_kvm_guest: {why}");
        return;
    }
    let root = std::env::temp_dir().join(format!("ferry-quick-kvm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = SharedDir::new(&root);
    // Two "hosts", each with its own factory.
    let hosts = [("host-a", KvmFactory::new(1 << 30)), ("host-b", KvmFactory::new(1 << 30))];
    let cfg = GuestConfig {
        vm_id: "quick-vm".into(),
        mem_bytes: 128 << 20,
        slot_bytes: 64 << 20,
        ws_pages: 4096, // 16 MiB rewritten
        ..Default::default()
    };
    dir.register(&cfg.vm_id, "host-a", VmRunState::Running).unwrap();
    let mut vm = KvmVm::boot(&cfg).unwrap();
    hosts[0].1.adopt(&mut vm).unwrap();
    vm.start().unwrap();
    wait_passes(&vm, 3);
    for trip in 0..4 {
        let (from, to) = (hosts[trip % 2].0, &hosts[(trip + 1) % 2]);
        let before = vm.report().passes;
        let s = quick_save(&dir, &mut vm, from, to.0).unwrap();
        let at_save = vm.report();
        assert!(!vm.is_running());
        // The old owner cannot save again: the record moved.
        assert!(matches!(quick_save(&dir, &mut vm, from, to.0), Err(QuickError::NotOwner { .. })));
        drop(vm);
        let (mut b, l) =
            quick_load_into(&dir, &cfg.vm_id, to.0, |shape| to.1.create_vm(shape).map_err(|e| Box::new(e) as VmError))
                .unwrap();
        assert_eq!(dir.record(&cfg.vm_id).unwrap().owner, to.0);
        wait_passes(&b, at_save.passes + 3);
        b.pause().unwrap();
        let r = b.report();
        assert_eq!(r.errors, 0, "corruption after quick migration: {:?}", r.error_records);
        assert_eq!(r.checksum, expected_checksum(cfg.ws_base, cfg.ws_pages, cfg.stride, r.passes));
        assert!(r.passes > before);
        eprintln!(
            "trip {trip} {from}->{}: save {:?} (pause {:?}), load {:?}, file {} KiB ({} of {} pages stored, state {} B); passes {} -> {}",
            to.0,
            s.total,
            s.pause,
            l.total,
            s.file_bytes / 1024,
            s.pages_stored,
            s.pages_total,
            s.state_bytes,
            at_save.passes,
            r.passes
        );
        b.resume().unwrap();
        vm = b;
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(&root);
}
