//! Quick migration (migrate::quick) of a real KVM guest through a shared directory. Needs
//! /dev/kvm; prints `SKIP: <reason>` where there is none. `FERRY_KVM_MEM_MIB` (default 128) and
//! `FERRY_KVM_WS_MIB` (default 16) size the round-trip test's guest; `FERRY_QUICK_DIR` puts the
//! shared directory somewhere else than the temporary directory.

use std::time::Duration;

use ferry_migrate::quick::{quick_load_into, quick_save, QuickError, SharedDir, VmRunState};
use ferry_migrate::vm::{SourceVm, VmError};
use ferry_test_support::kvm_or_skip;
use ferry_vmm_glue::kvm::guest::expected_checksum;
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};

#[test]
fn quick_migration_round_trips_a_kvm_guest() {
    if !kvm_or_skip("quick_migration_round_trips_a_kvm_guest") {
        return;
    }
    let base = std::env::var_os("FERRY_QUICK_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("ferry-quick-kvm-{}", std::process::id()));
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = SharedDir::new(&root);
    // Two "hosts", each with its own factory.
    let hosts = [("host-a", KvmFactory::new(1 << 30)), ("host-b", KvmFactory::new(1 << 30))];
    let cfg = GuestConfig {
        vm_id: "quick-vm".into(),
        mem_bytes: env("FERRY_KVM_MEM_MIB", 128) << 20,
        slot_bytes: 64 << 20,
        ws_pages: env("FERRY_KVM_WS_MIB", 16) << 8, // rewritten as fast as the guest can
        ..Default::default()
    };
    dir.register(&cfg.vm_id, "host-a", VmRunState::Running).unwrap();
    let mut vm = KvmVm::boot(&cfg).unwrap();
    hosts[0].1.adopt(&mut vm).unwrap();
    vm.start().unwrap();
    vm.wait_passes(3, Duration::from_secs(30)).unwrap();
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
        b.wait_passes(at_save.passes + 3, Duration::from_secs(30)).unwrap();
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

#[test]
fn a_corrupt_image_is_refused_and_the_target_keeps_ownership() {
    if !kvm_or_skip("a_corrupt_image_is_refused_and_the_target_keeps_ownership") {
        return;
    }
    let root = std::env::temp_dir().join(format!("ferry-quick-corrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = SharedDir::new(&root);
    let cfg = GuestConfig { vm_id: "corrupt-vm".into(), mem_bytes: 16 << 20, ws_pages: 64, ..Default::default() };
    dir.register(&cfg.vm_id, "host-a", VmRunState::Running).unwrap();
    let mut vm = KvmVm::boot(&cfg).unwrap();
    vm.start().unwrap();
    vm.wait_passes(3, Duration::from_secs(30)).unwrap();
    let s = quick_save(&dir, &mut vm, "host-a", "host-b").unwrap();
    let at_save = vm.report();
    drop(vm);
    let image = root.join(s.record.image.clone().unwrap());
    let good = std::fs::read(&image).unwrap();
    let factory = KvmFactory::new(1 << 30);
    let load = |f: &KvmFactory| {
        quick_load_into(&dir, &cfg.vm_id, "host-b", |shape| f.create_vm(shape).map_err(|e| Box::new(e) as VmError))
    };
    // Only the owner may load.
    assert!(matches!(
        quick_load_into(&dir, &cfg.vm_id, "host-a", |shape| factory
            .create_vm(shape)
            .map_err(|e| Box::new(e) as VmError)),
        Err(QuickError::NotOwner { .. })
    ));
    // A flipped bit in a page, a truncated file, a flipped bit in the header: refused.
    for (what, bad) in [
        ("page bit", {
            let mut b = good.clone();
            let i = good.len() - 5000;
            b[i] ^= 0x10;
            b
        }),
        ("truncated", good[..good.len() - 30].to_vec()),
        ("header bit", {
            let mut b = good.clone();
            b[20] ^= 1;
            b
        }),
    ] {
        std::fs::write(&image, &bad).unwrap();
        match load(&factory) {
            Err(QuickError::BadImage(e)) => eprintln!("{what}: refused: {e}"),
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
        let rec = dir.record(&cfg.vm_id).unwrap();
        assert_eq!((rec.owner.as_str(), rec.state), ("host-b", VmRunState::Saved), "target still owns it");
    }
    // The intact image (still there) loads and the guest goes on.
    std::fs::write(&image, &good).unwrap();
    let (mut b, _) = load(&factory).unwrap();
    b.wait_passes(at_save.passes + 2, Duration::from_secs(30)).unwrap();
    b.pause().unwrap();
    assert_eq!(b.report().errors, 0);
    assert_eq!(dir.record(&cfg.vm_id).unwrap().state, VmRunState::Running);
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
}
