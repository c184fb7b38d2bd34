//! Shared-nothing live migration through two `ferryd`: `ferry move VM --to B --include-storage`
//! carries the VM's disks on the migration session. They arrive byte-identical and sparse,
//! named only at the commit; the source's files go (or stay with `--retain-source-disks`);
//! the journals say `shared-nothing`. Without `--include-storage` a VM with disks is refused
//! (`has_disks`) and nothing changes. Faults during the disk copy (a cancel, the destination's
//! VMM or agent killed with `kill -9`, its disk directory full) leave the VM running on its
//! source with every sector as its guest wrote it, the reason journaled, and nothing at the
//! destination that passes as a disk. The KVM guest's own disk checks stay clean across a move
//! (SKIP where /dev/kvm is not usable).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Disk sizes that are not a multiple of the 64 KiB block, nor of 4 KiB.
const SIZES: [u64; 2] = [(5 << 20) + 12_345, (3 << 20) + 777];

fn counter_grows(a: &Agent, vm: &str, by: u64) {
    let c0 = a.json(&["vm", "show", vm])["guest_counter"].as_u64().unwrap();
    let t0 = Instant::now();
    while a.json(&["vm", "show", vm])["guest_counter"].as_u64().unwrap() < c0 + by {
        assert!(t0.elapsed() < Duration::from_secs(60), "{vm} does not run on {}", a.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the VM's disks occupy at least `bytes` in all (its guest writes them).
fn wait_allocated(a: &Agent, vm: &str, bytes: u64) {
    let t0 = Instant::now();
    loop {
        let v = a.json(&["vm", "show", vm]);
        let sum: u64 = v["disks"].as_array().unwrap().iter().map(|d| d["allocated_bytes"].as_u64().unwrap()).sum();
        if sum >= bytes {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the guest does not write its disks: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A synthetic VM with the two disks of [`SIZES`], its guest writing 1 MiB of each at 8 MiB/s.
fn create_writer(a: &Agent, vm: &str) {
    a.json(&[
        "vm",
        "create",
        "--name",
        vm,
        "--memory",
        "32MiB",
        "--guest",
        "synthetic",
        "--working-set",
        "4MiB",
        "--disk",
        &format!("root:{}", SIZES[0]),
        "--disk",
        &format!("data:{}", SIZES[1]),
        "--disk-working-set",
        "1MiB",
        "--disk-write-rate",
        "8MiB",
    ]);
    // Most of both working sets written: more than the two disk messages a held copy lets by.
    wait_allocated(a, vm, 3 << 19);
}

/// Names in `dir` (none if it is not there).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn codes(report: &Value) -> Vec<String> {
    report["incompatibilities"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap().to_string()).collect()
}

fn metrics(a: &Agent) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ep = ferry_agent::client::Endpoint::Unix(a.api.clone());
    let (st, body) =
        rt.block_on(ferry_agent::client::request(&ep, "GET", "/metrics", None, &[], Duration::from_secs(10))).unwrap();
    assert_eq!(st, 200);
    String::from_utf8(body).unwrap()
}

#[test]
fn a_vm_moves_with_its_disks_byte_identical_and_sparse_and_back() {
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    let (to_b, to_a) = (b.listen.to_string(), a.listen.to_string());
    create_writer(&a, "sn");

    // Without --include-storage its disks would stay behind: refused, nothing changes.
    let o = a.ferry(&["move", "sn", "--to", &to_b, "--wait"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has_disks") && err.contains("--include-storage"), "{err}");
    assert!(a.migrations().is_empty() && b.migrations().is_empty() && b.vms().is_empty());
    assert_eq!(a.json(&["vm", "show", "sn"])["state"], "running");
    // Preflight says the same, and with --include-storage whether B has room.
    let o = a.ferry(&["--json", "preflight", "sn", "--to", &to_b]);
    assert_eq!(o.status.code(), Some(2));
    let p: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(codes(&p), vec!["has_disks"], "{p:#}");
    let p = a.json(&["preflight", "sn", "--to", &to_b, "--include-storage"]);
    assert_eq!(p["compatible"], true, "{p:#}");
    let d = &p["destination"];
    let need = d["disk_needed_bytes"].as_u64().unwrap();
    assert!(need >= 3 << 19 && d["disk_available_bytes"].as_u64().unwrap() >= need, "{p:#}");
    assert_eq!(PathBuf::from(d["disk_dir"].as_str().unwrap()), b.state_dir().join("disks").join("sn"));

    // A -> B while the guest writes, the source's files kept.
    let src = disk_paths(&a, "sn");
    let out = a.json(&["move", "sn", "--to", &to_b, "--include-storage", "--retain-source-disks", "--wait"]);
    assert_eq!(out["status"], "completed", "{out:#}\n{}", a.logs());
    assert_eq!((out["verified"].as_bool(), out["kind"].as_str()), (Some(true), Some("shared-nothing")), "{out:#}");
    let disks = out["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{out:#}");
    for d in disks {
        assert_eq!((d["verified"].as_bool(), d["source_removed"].as_bool()), (Some(true), Some(false)), "{out:#}");
        assert!(d["data_blocks"].as_u64().unwrap() > 0, "{out:#}");
    }
    assert!(a.vms().is_empty(), "the VM left A");
    let on_b = b.json(&["vm", "show", "sn"]);
    assert_eq!(on_b["state"], "running", "{on_b:#}");
    let dst = disk_paths(&b, "sn");
    let b_dir = b.state_dir().join("disks").join("sn");
    assert_eq!(dst, vec![b_dir.join("root.img"), b_dir.join("data.img")], "{on_b:#}");
    assert_eq!(listing(&b_dir), vec!["data.img", "root.img"], "no partial copy left");
    for (i, (s, d)) in src.iter().zip(&dst).enumerate() {
        // The source's copy is final (its guest paused at the switch) and the synthetic guest
        // does not write its disks at B: the bytes must be the same.
        let (x, y) = (std::fs::read(s).unwrap(), std::fs::read(d).unwrap());
        assert_eq!(y.len() as u64, SIZES[i]);
        assert!(x == y, "disk {i} differs at B");
        // Holes stay holes: only the 64 KiB blocks of the guest's 1 MiB working set hold data.
        assert!(allocated(d) <= 1 << 20, "disk {i} is not sparse at B: {} bytes allocated", allocated(d));
        assert_eq!(on_b["disks"][i]["size_bytes"], SIZES[i]);
    }
    let ma = &a.migrations()[0];
    assert_eq!((ma["kind"].as_str(), ma["direction"].as_str()), (Some("shared-nothing"), Some("outgoing")), "{ma:#}");
    assert_eq!(ma["stats"]["disks"].as_array().unwrap().len(), 2, "{ma:#}");
    let mb = &b.migrations()[0];
    assert_eq!((mb["kind"].as_str(), mb["status"].as_str()), (Some("shared-nothing"), Some("completed")), "{mb:#}");
    let text = metrics(&a);
    let line = text.lines().find(|l| l.starts_with("ferry_disk_bytes_moved_total{kind=\"shared-nothing\"}"));
    let moved: u64 = line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(moved >= 3 << 19, "disk bytes moved: {line:?}\n{text}");

    // Back to A: refused while A still has the retained copies (a disk never replaces a file).
    let o = b.ferry(&["--json", "move", "sn", "--to", &to_a, "--include-storage", "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["error"].as_str().unwrap().contains("disk_exists"), "{r:#}");
    assert_eq!(b.json(&["vm", "show", "sn"])["state"], "running");
    assert!(a.vms().is_empty());
    // Without them it moves (compressed this time), and B's files go.
    for s in &src {
        std::fs::remove_file(s).unwrap();
    }
    let snapshot: Vec<Vec<u8>> = dst.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let out = b.json(&["move", "sn", "--to", &to_a, "--include-storage", "--option", "zstd", "--wait"]);
    assert_eq!(out["status"], "completed", "{out:#}\n{}", b.logs());
    assert!(out["disks"].as_array().unwrap().iter().all(|d| d["source_removed"] == true), "{out:#}");
    assert!(dst.iter().all(|p| !p.exists()), "B's files are removed after the move");
    let back = disk_paths(&a, "sn");
    assert_eq!(back, src, "the disks arrive in A's disk directory under their names");
    for (i, p) in back.iter().enumerate() {
        assert!(std::fs::read(p).unwrap() == snapshot[i], "disk {i} differs after the second move");
    }
    assert_eq!(a.json(&["vm", "show", "sn"])["state"], "running");
    counter_grows(&a, "sn", 1000);
}

#[test]
fn a_kvm_guest_moves_with_its_disks_and_its_disk_checks_stay_clean() {
    if !ferry_test_support::kvm_or_skip("a_kvm_guest_moves_with_its_disks_and_its_disk_checks_stay_clean") {
        return;
    }
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    // 256 KiB of request slots on disk 0 (64 slots of 4 KiB, each checked by the guest when it
    // rewrites it); disk 1 the guest leaves as it is (all zeros).
    create_kvm_vm(&a, "kd", &[&format!("data:{}", (7 << 20) + 7)]);
    let src = disk_paths(&a, "kd");
    counter_grows(&a, "kd", 100);
    let out =
        a.json(&["move", "kd", "--to", &b.listen.to_string(), "--include-storage", "--retain-source-disks", "--wait"]);
    assert_eq!(out["status"], "completed", "{out:#}\n{}", a.logs());
    assert!(out["disks"].as_array().unwrap().iter().all(|d| d["verified"] == true), "{out:#}");
    let on_b = b.json(&["vm", "show", "kd"]);
    assert_eq!((on_b["state"].as_str(), on_b["guest_check"].as_str()), (Some("running"), Some("ok")), "{on_b:#}");
    counter_grows(&b, "kd", 200); // every slot read back and checked at least twice at B
    let (bad, errors) = check_disks(&b, "kd");
    assert_eq!(errors, 0, "the KVM guest found wrong disk words or failed requests at B");
    assert_eq!(bad, vec![0, 0], "the files at B hold what the KVM guest wrote");
    let dst = disk_paths(&b, "kd");
    assert_eq!(dst.len(), 2);
    assert!(std::fs::read(&dst[1]).unwrap() == std::fs::read(&src[1]).unwrap(), "disk 1 differs at B");
    assert_eq!(allocated(&dst[1]), 0, "disk 1 stays a hole at B");
    assert!(allocated(&dst[0]) <= 1 << 20, "disk 0 is not sparse at B");
}

/// Two agents, A's VMM holding the disk copy after its first two messages until `go` exists
/// (or the move is cancelled), and a synthetic VM writing two disks on A.
struct Held {
    a: Agent,
    b: Agent,
    go: PathBuf,
    _release: Scratch,
    src: Vec<PathBuf>,
    /// Where the VM's disks arrive at B.
    b_dir: PathBuf,
}

const VM: &str = "held";

impl Held {
    fn new(b_extra: &str, b_disk_dir: Option<&Path>) -> Self {
        Self::with_guest(b_extra, b_disk_dir, create_writer)
    }

    fn with_guest(b_extra: &str, b_disk_dir: Option<&Path>, create: impl Fn(&Agent, &str)) -> Self {
        let release = Scratch::new("release");
        let go = release.0.join("go");
        let env = vec![("FERRY_VMM_TEST_HOLD_DISK_COPY_UNTIL".to_string(), go.display().to_string())];
        let a = Agent::start_with_env(None, "a", KEY, "", free_addr(), env);
        let b = Agent::start("b", KEY, b_extra);
        create(&a, VM);
        let src = disk_paths(&a, VM);
        let b_dir = b_disk_dir.map_or_else(|| b.state_dir().join("disks"), Path::to_path_buf).join(VM);
        Self { a, b, go, _release: release, src, b_dir }
    }

    /// Start the move and wait until the destination's partial copies exist (the copy runs,
    /// then holds).
    fn start_move(&self) -> String {
        let id = self.a.json(&["move", VM, "--to", &self.b.listen.to_string(), "--include-storage"])["id"]
            .as_str()
            .unwrap()
            .to_string();
        let t0 = Instant::now();
        while !self.b_dir.join(".root.img.ferry-partial").exists() {
            assert!(t0.elapsed() < Duration::from_secs(60), "no partial copy at B: {}", self.a.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the first messages land (the rest are held).
        std::thread::sleep(Duration::from_millis(300));
        assert!(self.a.json(&["migration", &id])["finished_at"].is_null(), "the copy did not hold");
        id
    }

    fn release(&self) {
        std::fs::write(&self.go, b"").unwrap();
    }

    /// The move ended without moving the VM: it runs on A on its own files, every sector as
    /// its guest wrote it, the journal says why; at B no VM and nothing named like a disk.
    fn check_stayed(&self, id: &str, status: &str) -> Value {
        self.check_stayed_with(id, status, 1000, 2)
    }

    /// [`Held::check_stayed`] for a guest whose counter must grow by `grows` and whose first
    /// `guest_disks` disks are the ones it writes (and checks).
    fn check_stayed_with(&self, id: &str, status: &str, grows: u64, guest_disks: usize) -> Value {
        let (a, b) = (&self.a, &self.b);
        let t0 = Instant::now();
        let m = loop {
            let m = a.json(&["migration", id]);
            if !m["finished_at"].is_null() {
                break m;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{id} does not end: {m:#}\n{}", a.logs());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(m["status"], status, "{m:#}\n{}", a.logs());
        assert_eq!(m["kind"], "shared-nothing");
        assert!(!m["error"].as_str().unwrap_or("").is_empty(), "the journal says why: {m:#}");
        let v = a.json(&["vm", "show", VM]);
        assert_eq!(v["state"], "running", "{v:#}");
        assert_eq!(disk_paths(a, VM), self.src, "the VM stays on its own files");
        counter_grows(a, VM, grows);
        let (bad, errors) = check_disks(a, VM);
        assert_eq!(errors, 0, "the guest saw disk errors on A");
        assert_eq!(bad[..guest_disks], vec![0; guest_disks], "every sector on A as the guest wrote it");
        let mb = b.wait_all_final(1, Duration::from_secs(60));
        assert_eq!(mb[0]["status"], "failed", "{mb:#?}");
        assert!(b.vms().is_empty(), "no VM at B: {:#?}", b.vms());
        assert!(listing(&self.b_dir).is_empty(), "nothing left at B: {:?}", listing(&self.b_dir));
        m
    }
}

#[test]
fn a_cancel_during_the_disk_copy_leaves_the_vm_on_its_disks() {
    let h = Held::new("", None);
    let id = h.start_move();
    h.a.json(&["cancel", &id]);
    let m = h.check_stayed(&id, "cancelled");
    assert!(m["error"].as_str().unwrap().contains("cancel"), "{m:#}");
    // Nothing stuck: the next move carries the disks.
    h.release();
    let out = h.a.json(&["move", VM, "--to", &h.b.listen.to_string(), "--include-storage", "--wait"]);
    assert_eq!(out["status"], "completed", "{out:#}\n{}", h.a.logs());
    assert!(h.src.iter().all(|p| !p.exists()), "the source's files go after the move");
    assert_eq!(h.b.json(&["vm", "show", VM])["disks"].as_array().unwrap().len(), 2);
}

#[test]
fn the_destination_vmm_killed_during_the_disk_copy_leaves_the_vm_on_its_disks() {
    let h = Held::new("", None);
    let id = h.start_move();
    let pid = vmm_status(&h.b.state_dir(), VM).expect("the incoming VMM answers")["pid"].as_u64().unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    wait_gone(pid, Duration::from_secs(10));
    h.release();
    h.check_stayed(&id, "failed");
}

#[test]
fn a_kvm_guest_stays_on_its_disks_when_the_destination_vmm_dies_during_the_disk_copy() {
    if !ferry_test_support::kvm_or_skip(
        "a_kvm_guest_stays_on_its_disks_when_the_destination_vmm_dies_during_the_disk_copy",
    ) {
        return;
    }
    // Disk 0: the guest program's 64 request slots, which it checks as it rewrites them;
    // disk 1: 2 MiB of data the test wrote (the guest never touches it), so the copy holds.
    let data = std::cell::RefCell::new(Vec::new());
    let h = Held::with_guest("", None, |a, vm| {
        create_kvm_vm(a, vm, &[&format!("data:{}", (3 << 20) + 777)]);
        let p = disk_paths(a, vm)[1].clone();
        let bytes: Vec<u8> = (0..2u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&std::fs::File::options().write(true).open(&p).unwrap(), &bytes, 4096)
            .unwrap();
        *data.borrow_mut() = std::fs::read(&p).unwrap();
        counter_grows(a, vm, 100);
    });
    let id = h.start_move();
    let pid = vmm_status(&h.b.state_dir(), VM).expect("the incoming VMM answers")["pid"].as_u64().unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    wait_gone(pid, Duration::from_secs(10));
    h.release();
    // The guest's own check covers disk 0; disk 1 holds the test's data, which must be
    // byte-identical.
    h.check_stayed_with(&id, "failed", 200, 1);
    assert!(std::fs::read(&h.src[1]).unwrap() == *data.borrow(), "disk 1 on A changed");
}

#[test]
fn the_destination_agent_killed_during_the_disk_copy_leaves_the_vm_on_its_disks() {
    let mut h = Held::new("", None);
    let id = h.start_move();
    h.b.kill();
    // The source agent finds the destination's agent gone and cancels before commit (that ends
    // the hold); the restarted destination agent cleans up what arrived.
    let t0 = Instant::now();
    while h.a.json(&["migration", &id])["finished_at"].is_null() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the source never gave up: {}", h.a.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    h.b.restart();
    let m = h.check_stayed(&id, "failed");
    assert!(m["error"].as_str().unwrap().contains("destination agent"), "{m:#}");
    h.release();
}

#[test]
fn a_full_destination_disk_directory_fails_the_move_and_leaves_the_vm_on_its_disks() {
    let scratch = Scratch::new("b-disks");
    let Some(tmpfs) = ferry_test_support::tmpfs::SmallTmpfs::mount(
        &scratch.0,
        "8m",
        "a_full_destination_disk_directory_fails_the_move_and_leaves_the_vm_on_its_disks",
    ) else {
        return;
    };
    let mnt = tmpfs.path().to_path_buf();
    let h = Held::new(&format!("disk_dir = \"{}\"\n", mnt.display()), Some(&mnt));
    let id = h.start_move();
    // Fill B's disk directory, then let the copy go on.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    h.release();
    let m = h.check_stayed(&id, "failed");
    let why = m["error"].as_str().unwrap();
    assert!(why.contains("No space left"), "the destination's reason is journaled: {m:#}");
    assert_eq!(listing(&mnt), vec!["filler"], "only the filler is left at B");
    // Preflight and the move itself now say B has no room for the disks.
    let o = h.a.ferry(&["--json", "preflight", VM, "--to", &h.b.listen.to_string(), "--include-storage"]);
    assert_eq!(o.status.code(), Some(2));
    let p: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(codes(&p).contains(&"no_disk_space".to_string()), "{p:#}");
    let o = h.a.ferry(&["--json", "move", VM, "--to", &h.b.listen.to_string(), "--include-storage", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["error"].as_str().unwrap().contains("no_disk_space"), "{r:#}");
    assert_eq!(h.a.json(&["vm", "show", VM])["state"], "running");
    assert!(h.b.vms().is_empty());
    drop(h);
    drop(tmpfs);
}

/// Bytes `vm`'s disks occupy on `a`.
fn vm_allocated(a: &Agent, vm: &str) -> u64 {
    a.json(&["vm", "show", vm])["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["allocated_bytes"].as_u64().unwrap())
        .sum()
}

fn disk_reserved(b: &Agent) -> u64 {
    b.json(&["host", "show"])["disk_reserved_bytes"].as_u64().expect("host show gives disk_reserved_bytes")
}

/// Start a shared-nothing move of `vm` from `a` to `b` and wait until its copy holds (the
/// partial copies at `b_dir` exist and the first messages landed).
fn start_held_move(a: &Agent, b: &Agent, vm: &str, b_dir: &Path) -> String {
    let id =
        a.json(&["move", vm, "--to", &b.listen.to_string(), "--include-storage"])["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while !b_dir.join(".root.img.ferry-partial").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no partial copy at B: {}", a.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.json(&["migration", &id])["finished_at"].is_null(), "the copy did not hold");
    id
}

/// The second of two shared-nothing moves to one host whose disks do not both fit its disk
/// directory: the first was promised its room when it was admitted, so the second is refused
/// (`no_disk_space`) while the first still copies, even though the free space alone would
/// have let it in. The promise survives a restart of the destination agent (journaled), is
/// given back when the move is cancelled, and when it completes; the first completes.
#[test]
fn the_second_of_two_concurrent_moves_that_do_not_both_fit_is_refused_while_the_first_completes() {
    let release = Scratch::new("release");
    let go = release.0.join("go");
    let env = vec![("FERRY_VMM_TEST_HOLD_DISK_COPY_UNTIL".to_string(), go.display().to_string())];
    let a = Agent::start_with_env(None, "a", KEY, "", free_addr(), env);
    for vm in ["one", "two"] {
        create_writer(&a, vm);
        // Both working sets (1 MiB of each disk) written: the sizes stay put from here.
        wait_allocated(&a, vm, 2 << 20);
    }
    let (need1, need2) = (vm_allocated(&a, "one"), vm_allocated(&a, "two"));
    // Room for the first and 5/8 of the second: with the first copy held after at most two
    // 512 KiB messages, the free space alone would still take the second.
    let size_kib = (need1 + need2 * 5 / 8).div_ceil(4096) * 4;
    let scratch = Scratch::new("b-disks");
    let name = "the_second_of_two_concurrent_moves_that_do_not_both_fit_is_refused_while_the_first_completes";
    let Some(tmpfs) = ferry_test_support::tmpfs::SmallTmpfs::mount(&scratch.0, &format!("{size_kib}k"), name) else {
        return;
    };
    let mnt = tmpfs.path().to_path_buf();
    let mut b = Agent::start("b", KEY, &format!("disk_dir = \"{}\"\n", mnt.display()));
    let to_b = b.listen.to_string();
    assert_eq!(disk_reserved(&b), 0);

    let refused = |b: &Agent| {
        let free = ferry_agent_free_bytes(&mnt);
        assert!(free >= need2, "the free space alone ({free}) would take the second move ({need2})");
        let o = a.ferry(&["--json", "move", "two", "--to", &to_b, "--include-storage", "--wait"]);
        assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let why = r["error"].as_str().unwrap();
        assert!(why.contains("no_disk_space") && why.contains("promised"), "{r:#}");
        assert_eq!(a.json(&["vm", "show", "two"])["state"], "running");
        assert!(b.vms().iter().all(|v| v["name"] != "two"), "{:#?}", b.vms());
        assert!(listing(&mnt.join("two")).is_empty(), "nothing of the second at B");
    };

    // The first move holds in its disk copy: its room is promised, the second is refused.
    let id1 = start_held_move(&a, &b, "one", &mnt.join("one"));
    let promised = disk_reserved(&b);
    assert!(promised > 0 && promised <= need1, "promised {promised} of {need1}");
    refused(&b);
    // A restarted destination agent keeps the promise of the arrival it adopts.
    b.kill();
    b.restart();
    assert!(disk_reserved(&b) > 0, "the promise is gone after a restart");
    refused(&b);

    // Cancelled: the promise goes with the move.
    a.json(&["cancel", &id1]);
    let t0 = Instant::now();
    while a.json(&["migration", &id1])["finished_at"].is_null() || disk_reserved(&b) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the cancel did not give the room back: {}", b.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.json(&["migration", &id1])["status"], "cancelled");

    // Again, and this time the first completes: the second is refused meanwhile.
    let id1 = start_held_move(&a, &b, "one", &mnt.join("one"));
    refused(&b);
    std::fs::write(&go, b"").unwrap();
    let t0 = Instant::now();
    let m = loop {
        let m = a.json(&["migration", &id1]);
        if !m["finished_at"].is_null() {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the first move does not end: {}", a.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m["status"], "completed", "{m:#}\n{}", a.logs());
    // B lists the VM once its agent took it over (a moment after the source's engine returned).
    let t0 = Instant::now();
    while !b.vms().iter().any(|v| v["name"] == "one") {
        assert!(t0.elapsed() < Duration::from_secs(30), "B does not list the VM: {}", b.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let one = b.json(&["vm", "show", "one"]);
    assert_eq!(one["state"], "running");
    assert_eq!(one["disks"].as_array().unwrap().len(), 2);
    // Its promise is given back: with its disks gone again, all of the room is the second's.
    b.json(&["vm", "delete", "one"]);
    for f in listing(&mnt.join("one")) {
        std::fs::remove_file(mnt.join("one").join(f)).unwrap();
    }
    assert_eq!(disk_reserved(&b), 0, "the completed move still holds a promise");
    // The stopped VMM lets go of the unlinked files as it exits.
    let t0 = Instant::now();
    while ferry_agent_free_bytes(&mnt) < need2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the deleted disks still take the room");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = a.json(&["move", "two", "--to", &to_b, "--include-storage", "--wait"]);
    assert_eq!(out["status"], "completed", "{out:#}\n{}", b.logs());
    drop(b);
    drop(tmpfs);
}

/// Bytes an unprivileged writer may still write to the file system of `dir`.
fn ferry_agent_free_bytes(dir: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(dir).unwrap();
    v.blocks_available() * v.fragment_size()
}
