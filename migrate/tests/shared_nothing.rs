//! Shared-nothing live migration over real sockets (loopback): a synthetic guest with disks of
//! sizes that are not a multiple of the 64 KiB block moves with its disks over tcp, zstd and
//! several channels; the disks arrive byte-identical and sparse, named only at the commit, and
//! the source's files go (or stay, when retained). Faults at every step (a channel killed during
//! the disk copy and during memory pre-copy, the destination gone, its file system full, a
//! cancel) leave the VM running on the source with its disks byte-identical to what the guest
//! wrote, and nothing at the destination that passes as a disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_disk::image;
use ferry_migrate::server::connect_simple;
use ferry_migrate::source::{migrate, CancelToken, MigrationConfig};
use ferry_migrate::stats::{Progress, Status};
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_migrate::MigrateError;
use ferry_test_support::guest::{into_synthetic, same_memory};
use ferry_test_support::server;
use ferry_transport::handshake::Psk;
use ferry_transport::tcp::TcpOptions;
use ferry_vmm_glue::guestdisk::{create_image, DiskSpec};
use ferry_vmm_glue::synthetic::{SyntheticConfig, SyntheticFactory, SyntheticVm};

const KEY: &[u8] = b"shared-nothing-test-key-0123456789";

/// Sizes that are not a multiple of the 64 KiB block (nor of 4 KiB).
const SIZES: [u64; 2] = [8 * (1 << 20) + 12_345, 2 * (1 << 20) + 777];

struct Guest {
    vm: SyntheticVm,
    specs: Vec<DiskSpec>,
    _dir: tempfile::TempDir,
}

/// A running guest of 32 MiB with two disks; `disk_rate`: its disk writer's pace (0: idle),
/// `mem_rate`: its memory writer's (MiB/s).
fn guest(id: &str, disk_rate_mib: u64, mem_rate_mib: u64) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<DiskSpec> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &size_bytes)| DiskSpec {
            path: dir.path().join(format!("{id}-disk{i}.img")),
            size_bytes,
            allocated_pct: 40,
            seed: 11 + i as u64,
        })
        .collect();
    for s in &specs {
        create_image(s).unwrap();
    }
    let cfg = SyntheticConfig {
        vm_id: id.into(),
        memory_bytes: 32 << 20,
        working_set_bytes: if mem_rate_mib > 0 { 4 << 20 } else { 0 },
        dirty_rate_bytes_per_s: mem_rate_mib << 20,
        disks: specs.clone(),
        disk_working_set_bytes: if disk_rate_mib > 0 { 1 << 20 } else { 0 },
        disk_write_rate_bytes_per_s: disk_rate_mib << 20,
        seed: 5,
        ..Default::default()
    };
    let mut vm = SyntheticVm::new(&cfg).unwrap();
    vm.resume().unwrap();
    Guest { vm, specs, _dir: dir }
}

type Outcomes = std::sync::mpsc::Receiver<Result<TargetOutcome, MigrateError>>;

fn destination(dir: Option<&Path>, tcp: TcpOptions) -> (SocketAddr, Outcomes, std::thread::JoinHandle<()>) {
    let factory = Arc::new(SyntheticFactory::new(1 << 30, false));
    let cfg = TargetConfig { disk_dir: dir.map(Path::to_path_buf), ..Default::default() };
    let s = server::loopback(Psk::new(KEY).unwrap(), tcp, factory, cfg, Some(1));
    (s.addr, s.outcomes, s.thread)
}

fn allocated(p: &Path) -> u64 {
    image::allocated_bytes(&std::fs::File::open(p).unwrap()).unwrap()
}

/// Entries of `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn files(specs: &[DiskSpec]) -> Vec<Vec<u8>> {
    specs.iter().map(|s| std::fs::read(&s.path).unwrap()).collect()
}

/// Move `g` to a fresh destination; returns the stats, the destination's disks (paths) and dir.
fn move_guest(
    g: &mut Guest,
    tcp: TcpOptions,
    channels: usize,
    cfg: &MigrationConfig,
) -> (ferry_migrate::stats::MigrationStats, TargetOutcome, tempfile::TempDir) {
    let dst = tempfile::tempdir().unwrap();
    let (addr, outcomes, h) = destination(Some(dst.path()), tcp.clone());
    let chans = connect_simple(addr, channels, &tcp, Psk::new(KEY).unwrap()).unwrap();
    let st = migrate(&mut g.vm, chans, cfg, &|_| {}).unwrap();
    let out = outcomes.recv().unwrap().unwrap();
    h.join().unwrap();
    (st, out, dst)
}

#[test]
fn a_busy_guest_moves_with_its_disks_byte_identical_and_sparse() {
    for (tcp, nch) in [(TcpOptions::default(), 1), (TcpOptions::zstd(), 1), (TcpOptions::default(), 4)] {
        let mut g = guest("busy", 4, 16);
        std::thread::sleep(Duration::from_millis(100));
        let cfg = MigrationConfig { retain_source_disks: true, verify_full: true, ..Default::default() };
        let (st, out, dst) = move_guest(&mut g, tcp, nch, &cfg);
        assert_eq!(st.status, Status::Completed);
        assert!(st.verified);
        assert_eq!(st.disks.len(), 2);
        assert!(st.disks.iter().all(|d| d.verified && !d.source_removed), "{:?}", st.disks);
        assert!(st.disks.iter().all(|d| d.data_blocks > 0), "{:?}", st.disks);
        assert!(st.disks.iter().any(|d| d.zero_blocks > 0), "allocated zero blocks go as zeros: {:?}", st.disks);
        assert!(g.vm.disk_writes().0 > 0, "the disk writer wrote during the move");
        assert!(!g.vm.is_running());
        // The guest's own check: every sector of the (retained) source disks is what it wrote.
        assert_eq!(g.vm.check_disks().unwrap(), vec![0, 0]);
        let want: Vec<PathBuf> = g.specs.iter().map(|s| dst.path().join(s.path.file_name().unwrap())).collect();
        assert_eq!(out.disks, want);
        let (mut src_alloc, mut dst_alloc, mut size) = (0, 0, 0);
        for (s, p) in g.specs.iter().zip(&out.disks) {
            let (a, b) = (std::fs::read(&s.path).unwrap(), std::fs::read(p).unwrap());
            assert_eq!(a.len() as u64, s.size_bytes);
            assert!(a == b, "{} differs at the destination", p.display());
            // Holes stay holes.
            assert!(allocated(p) <= allocated(&s.path), "{}: {} > {}", p.display(), allocated(p), allocated(&s.path));
            (src_alloc, dst_alloc, size) =
                (src_alloc + allocated(&s.path), dst_alloc + allocated(p), size + s.size_bytes);
        }
        // Zero blocks the source had allocated became holes, and the holes stayed.
        assert!(dst_alloc < src_alloc && src_alloc < size, "allocated: source {src_alloc}, destination {dst_alloc}");
        assert_eq!(listing(dst.path()).len(), 2, "only the disks: {:?}", listing(dst.path()));
        same_memory(&g.vm, &into_synthetic(out));
    }
}

#[test]
fn the_source_files_go_once_the_destination_runs_the_vm() {
    let mut g = guest("idle", 0, 0);
    let before = files(&g.specs);
    let (st, out, _dst) = move_guest(&mut g, TcpOptions::default(), 2, &MigrationConfig::default());
    assert!(st.verified && st.disks.iter().all(|d| d.verified && d.source_removed), "{:?}", st.disks);
    for s in &g.specs {
        assert!(!s.path.exists(), "{} was kept", s.path.display());
    }
    for (p, want) in out.disks.iter().zip(&before) {
        assert!(&std::fs::read(p).unwrap() == want, "{} differs", p.display());
    }
}

/// The destination's disks hold exactly the bytes of the source VM's disks (read through the
/// VM's open disks, so also after their files were removed).
fn assert_same_as_source(g: &Guest, paths: &[PathBuf]) {
    assert_eq!(paths.len(), g.vm.disks().len());
    for (d, p) in g.vm.disks().iter().zip(paths) {
        let mut want = vec![0u8; d.size_bytes() as usize];
        d.read_at(0, &mut want).unwrap();
        assert!(std::fs::read(p).unwrap() == want, "{} differs from the source", p.display());
    }
}

/// The VM still runs on the source, its disks are what the guest wrote, and the destination
/// holds nothing that passes as a disk.
fn assert_on_source(g: &mut Guest, dst: &Path) {
    assert!(g.vm.is_running(), "the VM must keep running on the source");
    for s in &g.specs {
        assert!(s.path.exists());
    }
    let names = listing(dst);
    assert!(names.iter().all(|n| n.ends_with(".ferry-partial")), "a disk at the destination: {names:?}");
    g.vm.pause().unwrap();
    assert_eq!(g.vm.check_disks().unwrap(), vec![0, 0], "the source disks lost a write");
    for s in &g.specs {
        assert_eq!(std::fs::metadata(&s.path).unwrap().len(), s.size_bytes);
    }
    assert!(g.vm.disks().iter().all(|d| !d.dirty_log().is_logging()), "a dirty log left on");
    g.vm.resume().unwrap();
}

/// Wait until the destination's server thread is over (the partial copies removed).
fn settle(outcomes: &Outcomes, h: std::thread::JoinHandle<()>) -> Result<TargetOutcome, MigrateError> {
    let r = outcomes.recv_timeout(Duration::from_secs(60)).expect("the destination ends");
    h.join().unwrap();
    r
}

#[test]
fn cancel_during_the_disk_copy_leaves_the_vm_on_its_disks() {
    let mut g = guest("cancel", 4, 8);
    let dst = tempfile::tempdir().unwrap();
    let (addr, outcomes, h) = destination(Some(dst.path()), TcpOptions::default());
    let chans = connect_simple(addr, 2, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let cancel = CancelToken::new();
    let cfg = MigrationConfig { cancel: cancel.clone(), ..Default::default() };
    // Cancel as soon as the destination has a partial copy with blocks in it.
    let (d2, c2) = (dst.path().to_path_buf(), cancel.clone());
    let done = Arc::new(AtomicBool::new(false));
    let d3 = done.clone();
    let watcher = std::thread::spawn(move || {
        while !d3.load(Ordering::SeqCst) {
            let any = std::fs::read_dir(&d2).map(|r| r.flatten().any(|e| allocated(&e.path()) > 0)).unwrap_or(false);
            if any {
                c2.cancel();
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let r = migrate(&mut g.vm, chans, &cfg, &|_| {});
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(matches!(r, Err(MigrateError::Cancelled)), "{r:?}");
    assert!(settle(&outcomes, h).is_err());
    assert_on_source(&mut g, dst.path());
    assert!(listing(dst.path()).is_empty(), "partial copies left: {:?}", listing(dst.path()));
}

#[test]
fn a_destination_without_a_disk_directory_refuses() {
    let mut g = guest("nodir", 0, 0);
    let (addr, outcomes, h) = destination(None, TcpOptions::default());
    let chans = connect_simple(addr, 1, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let r = migrate(&mut g.vm, chans, &MigrationConfig::default(), &|_| {});
    assert!(matches!(&r, Err(MigrateError::Refused(why)) if why.contains("disk directory")), "{r:?}");
    assert!(settle(&outcomes, h).is_err());
    assert!(g.vm.is_running());
}

/// Cancel once `progress` reports memory pre-copy (after the disks are in sync).
#[test]
fn cancel_during_memory_precopy_leaves_the_vm_on_its_disks() {
    let mut g = guest("cancel-mem", 4, 8);
    let dst = tempfile::tempdir().unwrap();
    let (addr, outcomes, h) = destination(Some(dst.path()), TcpOptions::default());
    let chans = connect_simple(addr, 2, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let cancel = CancelToken::new();
    let cfg = MigrationConfig { cancel: cancel.clone(), ..Default::default() };
    let seen = AtomicBool::new(false);
    let r = migrate(&mut g.vm, chans, &cfg, &|p: &Progress| {
        if p.status == Status::Active && p.pages_sent == 0 && !seen.swap(true, Ordering::SeqCst) {
            cancel.cancel();
        }
    });
    assert!(seen.load(Ordering::SeqCst), "memory pre-copy never started");
    assert!(matches!(r, Err(MigrateError::Cancelled)), "{r:?}");
    assert!(settle(&outcomes, h).is_err());
    assert_on_source(&mut g, dst.path());
    assert!(listing(dst.path()).is_empty(), "partial copies left: {:?}", listing(dst.path()));
}

/// A fault during a move: `when` decides the moment (`Disk`: once the destination has disk
/// blocks; `Memory`: once memory pre-copy reports its start), `kill` which channels are cut.
#[derive(Clone, Copy, Debug)]
enum When {
    Disk,
    Memory,
}

fn move_with_fault(
    g: &mut Guest,
    dst: &Path,
    channels: usize,
    when: When,
    kill: &[usize],
) -> (Result<ferry_migrate::stats::MigrationStats, MigrateError>, Result<TargetOutcome, MigrateError>) {
    let (addr, outcomes, h) = destination(Some(dst), TcpOptions::default());
    let chans = connect_simple(addr, channels, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let killers: Vec<_> = kill.iter().map(|&i| chans[i].killer.clone()).collect();
    let fire = {
        let killers = killers.clone();
        let fired = Arc::new(AtomicBool::new(false));
        move || {
            if !fired.swap(true, Ordering::SeqCst) {
                killers.iter().for_each(|k| k());
            }
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (dst, done, fire) = (dst.to_path_buf(), done.clone(), fire.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if matches!(when, When::Disk)
                    && std::fs::read_dir(&dst).map(|r| r.flatten().any(|e| allocated(&e.path()) > 0)).unwrap_or(false)
                {
                    fire();
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let r = migrate(&mut g.vm, chans, &MigrationConfig::default(), &|p: &Progress| {
        if matches!(when, When::Memory) && p.status == Status::Active && p.pages_sent == 0 && p.round == 0 {
            fire();
        }
    });
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    (r, settle(&outcomes, h))
}

#[test]
fn channel_zero_killed_during_the_disk_copy_or_memory_precopy_leaves_the_vm_on_its_disks() {
    for when in [When::Disk, When::Memory] {
        let mut g = guest("kill0", 4, 8);
        let dst = tempfile::tempdir().unwrap();
        let (r, t) = move_with_fault(&mut g, dst.path(), 2, when, &[0]);
        assert!(matches!(r, Err(MigrateError::Channel(0, _))), "{when:?}: {r:?}");
        assert!(t.is_err());
        assert_on_source(&mut g, dst.path());
        assert!(listing(dst.path()).is_empty(), "{when:?}: partial copies left: {:?}", listing(dst.path()));
    }
}

#[test]
fn the_destination_gone_during_the_disk_copy_leaves_the_vm_on_its_disks() {
    // Every channel cut at once, as when the destination's process dies: both halves fail.
    let mut g = guest("gone", 4, 8);
    let dst = tempfile::tempdir().unwrap();
    let (r, t) = move_with_fault(&mut g, dst.path(), 3, When::Disk, &[0, 1, 2]);
    assert!(r.is_err(), "{r:?}");
    assert!(t.is_err());
    assert_on_source(&mut g, dst.path());
    assert!(listing(dst.path()).is_empty(), "partial copies left: {:?}", listing(dst.path()));
}

#[test]
fn a_data_channel_killed_during_the_disk_copy_fails_over_and_the_disks_arrive_whole() {
    // Its unacknowledged disk blocks are sent again on the others once the destination
    // confirms the channel stopped; the move completes byte-identical.
    let mut g = guest("failover", 4, 8);
    let dst = tempfile::tempdir().unwrap();
    let (r, t) = move_with_fault(&mut g, dst.path(), 3, When::Disk, &[1]);
    // The source's files are removed on success: compare with what the guest must hold.
    let st = r.unwrap();
    let out = t.unwrap();
    assert!(st.verified && st.disks.iter().all(|d| d.verified), "{st:?}");
    assert!(st.channels[1].failed, "{:?}", st.channels);
    assert!(g.specs.iter().all(|s| !s.path.exists()), "the source files go after the commit");
    // The paused source still holds its (unlinked) files open: the guest's check on them, and
    // the destination's copies byte for byte against them.
    assert_eq!(g.vm.check_disks().unwrap(), vec![0, 0]);
    assert_same_as_source(&g, &out.disks);
    same_memory(&g.vm, &into_synthetic(out));
}

#[test]
fn a_full_destination_file_system_leaves_the_vm_on_its_disks() {
    let dst = tempfile::tempdir().unwrap();
    let Some(tmpfs) = ferry_test_support::tmpfs::SmallTmpfs::mount(
        dst.path(),
        "1m",
        "a_full_destination_file_system_leaves_the_vm_on_its_disks",
    ) else {
        return;
    };
    let mnt = tmpfs.path().to_path_buf();
    let mut g = guest("full", 4, 8);
    let (addr, outcomes, h) = destination(Some(&mnt), TcpOptions::default());
    let chans = connect_simple(addr, 2, &TcpOptions::default(), Psk::new(KEY).unwrap()).unwrap();
    let r = migrate(&mut g.vm, chans, &MigrationConfig::default(), &|_| {});
    // The source hears the refusal, or a channel the refusing destination already closed.
    assert!(r.is_err(), "{r:?}");
    let t = settle(&outcomes, h);
    assert!(matches!(&t, Err(MigrateError::Disk(why)) if why.contains("No space left")), "{t:?}");
    assert_on_source(&mut g, &mnt);
    assert!(listing(&mnt).is_empty(), "partial copies left: {:?}", listing(&mnt));
}
