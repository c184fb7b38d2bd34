//! Storage live migration of the synthetic guest: its disks move to another directory while its
//! disk writer and its memory writer run, every sector checked after the move.

use std::time::Duration;

use ferry_disk::{move_storage, CancelToken, MoveError, MoveOptions, Phase};
use ferry_migrate::vm::SourceVm;
use ferry_vmm_glue::guestdisk::{create_image, DiskSpec};
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticConfig, SyntheticVm};

fn guest(dir: &std::path::Path, rate: u64) -> SyntheticVm {
    let specs = vec![
        DiskSpec { path: dir.join("root.img"), size_bytes: (24 << 20) + 4097, allocated_pct: 50, seed: 1 },
        DiskSpec { path: dir.join("data.img"), size_bytes: (9 << 20) - 511, allocated_pct: 30, seed: 2 },
    ];
    for s in &specs {
        create_image(s).unwrap();
    }
    let cfg = SyntheticConfig {
        memory_bytes: 8 << 20,
        working_set_bytes: 1 << 20,
        dirty_rate_bytes_per_s: 20 << 20,
        disks: specs,
        disk_working_set_bytes: 4 << 20,
        disk_write_rate_bytes_per_s: rate,
        ..Default::default()
    };
    SyntheticVm::new(&cfg).unwrap()
}

fn wait_disk_writes(vm: &SyntheticVm, n: u64) {
    let w0 = vm.disk_writes().0;
    while vm.disk_writes().0 < w0 + n {
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_synthetic_guest_moves_its_disks_while_writing() {
    for rate in [20 << 20, 0] {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let mut vm = guest(src.path(), rate);
        vm.start_dirty_log().unwrap();
        SourceVm::resume(&mut vm).unwrap();
        wait_disk_writes(&vm, 100);
        let disks = vm.disks().to_vec();
        let st = move_storage(&disks, dst.path(), &mut vm, &MoveOptions::default(), &CancelToken::new(), &mut |_| {})
            .unwrap();
        assert!(vm.is_running());
        wait_disk_writes(&vm, 100); // the guest keeps writing, now to the copies
        SourceVm::pause(&mut vm).unwrap();
        assert_eq!(vm.disk_write_errors(), 0);
        assert_eq!(vm.check_disks().unwrap(), vec![0, 0], "rate {rate}: every sector as the guest wrote it");
        assert_eq!(check_stamps(&vm).unwrap(), 0, "memory untouched by the move");
        for (d, s) in vm.disks().iter().zip(&st.disks) {
            assert_eq!(d.path(), dst.path().join(d.name()));
            assert!(!s.from.exists(), "old file removed");
            assert!(s.new_allocated_bytes < d.size_bytes(), "{}: the copy stays sparse", d.name());
        }
    }
}

#[test]
fn a_cancelled_move_leaves_the_guest_on_its_disks_and_retain_keeps_them() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut vm = guest(src.path(), 20 << 20);
    SourceVm::resume(&mut vm).unwrap();
    wait_disk_writes(&vm, 50);
    let disks = vm.disks().to_vec();
    let cancel = CancelToken::new();
    let r = move_storage(&disks, dst.path(), &mut vm, &MoveOptions::default(), &cancel, &mut |p| {
        if matches!(p, Phase::DirtyPass(_) | Phase::Sync) {
            cancel.cancel();
        }
    });
    assert!(matches!(r, Err(MoveError::Cancelled)), "{r:?}");
    assert!(vm.is_running());
    assert_eq!(std::fs::read_dir(dst.path()).unwrap().count(), 0);
    wait_disk_writes(&vm, 50);
    let opts = MoveOptions { retain_source: true, ..Default::default() };
    let st = move_storage(&disks, dst.path(), &mut vm, &opts, &CancelToken::new(), &mut |_| {}).unwrap();
    assert!(st.disks.iter().all(|d| d.from.exists() && !d.source_removed), "retained");
    SourceVm::pause(&mut vm).unwrap();
    assert_eq!(vm.check_disks().unwrap(), vec![0, 0]);
}
