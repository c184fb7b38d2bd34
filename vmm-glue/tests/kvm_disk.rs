//! The KVM guest with a disk on its paravirtual block device: live-migrated over loopback TCP
//! (the disk on storage both "hosts" share), then its disk moved to another directory while it
//! runs (`ferry_disk::move_storage`), the guest checking every disk block it wrote as it
//! rewrites it, and the host checking the whole file after each step. A block corrupted behind
//! the guest's back is reported by the guest. Needs /dev/kvm; prints `SKIP: <reason>` where
//! there is none.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ferry_disk::{move_storage, CancelToken, Disk, MoveOptions};
use ferry_migrate::server::connect_simple;
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::MigrateError;
use ferry_test_support::{kvm_or_skip, server};
use ferry_transport::handshake::Psk;
use ferry_transport::tcp::TcpOptions;
use ferry_vmm_glue::kvm::block::{check_guest_disk, SECTOR_BYTES};
use ferry_vmm_glue::kvm::guest::{expected_checksum, PARAMS, P_DISK_ERRORS, P_DISK_IO_ERRORS};
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};

const KEY: &[u8] = b"kvm-disk-migration-test-key-0123456789";
const SLOTS: u64 = 48;
const REQUEST_SECTORS: u32 = 8;
/// Not a multiple of 64 KiB, nor of a sector.
const DISK_BYTES: u64 = (6 << 20) + 70_001;

fn config() -> GuestConfig {
    GuestConfig {
        vm_id: "kvm-disk".into(),
        mem_bytes: 64 << 20,
        ws_pages: 1024,
        disk_slots: SLOTS,
        disk_request_sectors: REQUEST_SECTORS,
        ..Default::default()
    }
}

/// Wait until every disk slot has been read back and checked at least once after now.
fn wait_disk_round(vm: &KvmVm) {
    let now = vm.report().passes;
    vm.wait_passes(now + SLOTS + 2, Duration::from_secs(60)).unwrap();
}

/// Pause, check everything the guest and the host can check, and return the guest's report.
fn check(vm: &mut KvmVm, what: &str) {
    vm.stop().unwrap();
    let cfg = config();
    let r = vm.report();
    assert_eq!(r.errors, 0, "{what}: the guest found stale or lost pages: {:?}", r.error_records);
    assert_eq!(r.checksum, expected_checksum(cfg.ws_base, cfg.ws_pages, cfg.stride, r.passes), "{what}");
    assert_eq!(r.disk_errors, 0, "{what}: the guest found wrong disk words: {:?}", r.disk_error_records);
    assert_eq!(vm.read_u64(PARAMS + P_DISK_ERRORS).unwrap(), 0, "{what}");
    assert_eq!(r.disk_failed, 0, "{what}: disk requests failed");
    assert_eq!(vm.read_u64(PARAMS + P_DISK_IO_ERRORS).unwrap(), 0, "{what}");
    assert!(r.disk_writes > SLOTS, "{what}: the guest wrote its disk ({} writes)", r.disk_writes);
    let disks = vm.disks();
    let gen = vm.guest_disk_generation().unwrap();
    assert!(gen > SLOTS, "{what}: generation {gen}");
    assert_eq!(check_guest_disk(&disks[0], SLOTS, REQUEST_SECTORS, gen).unwrap(), 0, "{what}: host check of the file");
    vm.start().unwrap();
}

fn server(factory: KvmFactory) -> (std::net::SocketAddr, mpsc::Receiver<Result<TargetOutcome, MigrateError>>) {
    let s = server::loopback(
        Psk::new(KEY).unwrap(),
        TcpOptions::default(),
        Arc::new(factory),
        TargetConfig::default(),
        Some(1),
    );
    (s.addr, s.outcomes)
}

fn open_disk(path: &Path) -> Arc<Disk> {
    Arc::new(Disk::open(path).unwrap())
}

#[test]
fn kvm_guest_with_a_disk_live_migrates_and_moves_its_storage() {
    if !kvm_or_skip("kvm_guest_with_a_disk_live_migrates_and_moves_its_storage") {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let moved = tempfile::tempdir().unwrap();
    let img = shared.path().join("root.img");
    ferry_disk::image::create_sparse(&img, DISK_BYTES).unwrap();

    let mut vm = KvmVm::boot(&config()).unwrap();
    vm.attach_disks(vec![open_disk(&img)]);
    vm.start().unwrap();
    wait_disk_round(&vm);
    check(&mut vm, "before any move");

    // Live migration; the destination opens the same file (shared storage).
    let img_b = img.clone();
    let factory = KvmFactory::new(1 << 30).with_disks(Arc::new(move |_| Ok(vec![open_disk(&img_b)])));
    let (addr, outcomes) = server(factory);
    let chans = connect_simple(addr, 2, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let st = migrate(&mut vm, chans, &MigrationConfig::default(), &|_| {}).unwrap();
    assert_eq!(st.status, Status::Completed);
    drop(vm);
    let out = outcomes.recv().unwrap().unwrap();
    let any: Box<dyn std::any::Any> = out.vm.into_any();
    let mut b = *any.downcast::<KvmVm>().expect("a KVM VM");
    wait_disk_round(&b);
    check(&mut b, "after the live migration");

    // Storage live migration while the guest runs.
    let disks = b.disks();
    let stats =
        move_storage(&disks, moved.path(), &mut b, &MoveOptions::default(), &CancelToken::new(), &mut |_| {}).unwrap();
    assert!(!img.exists(), "the old file is removed after the switch");
    assert_eq!(b.disks()[0].path(), moved.path().join("root.img"));
    assert!(stats.disks[0].new_allocated_bytes < DISK_BYTES, "the copy stays sparse");
    eprintln!("storage move: total {:?}, pause {:?}", stats.total, stats.downtime);
    wait_disk_round(&b);
    check(&mut b, "after the storage move");

    // A block changed behind the guest's back is found by the guest.
    b.stop().unwrap();
    let disk = b.disks()[0].clone();
    let off = 5 * u64::from(REQUEST_SECTORS) * SECTOR_BYTES + 64;
    disk.write_at(off, &[0x77; 8]).unwrap();
    b.start().unwrap();
    wait_disk_round(&b);
    b.stop().unwrap();
    let r = b.report();
    assert_eq!(r.disk_errors, 1, "the guest reports the one word changed: {:?}", r.disk_error_records);
    assert_eq!(r.disk_error_records[0], (off, u64::from_le_bytes([0x77; 8])));
}
