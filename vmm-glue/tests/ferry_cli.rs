//! The `ferry-harness` command as real processes: live ping-pong between two processes over loopback
//! (tcp and zstd), a quick-migration round trip through a temporary directory, and bad input.
//! Needs /dev/kvm for the migrations; prints `SKIP: <reason>` where there is none.

use std::process::{Command, Output};

use ferry_test_support::kvm_or_skip;
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry-harness");
/// The key both ends use (hex of 32 random bytes).
const KEY: &str = "b2f8767205854390488a34baaac71d9be7b9d4dc29b905a9b95ffd74931d42b2";

fn run(args: &[&str]) -> Output {
    Command::new(FERRY).args(args).env("FERRY_PSK", KEY).output().expect("run ferry")
}

fn json_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ferry failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn live_pingpong(option: &str) {
    // Correctness, not speed: a generous downtime limit so that unoptimized builds converge.
    let out = run(&[
        "pingpong",
        "--mem",
        "64MiB",
        "--working-set",
        "8MiB",
        "--trips",
        "4",
        "--option",
        option,
        "--channels",
        "2",
        "--downtime-ms",
        "2000",
        "--hold-ms",
        "100",
        "--json",
    ]);
    let v = json_of(&out);
    let trips = v["trips"].as_array().expect("trips");
    assert_eq!(trips.len(), 4);
    let mut last_after = 0;
    for t in trips {
        let g = &t["guest"];
        let (pause, first, after) = (
            t["passes_at_pause"].as_u64().unwrap(),
            g["passes_first"].as_u64().unwrap(),
            g["passes_after"].as_u64().unwrap(),
        );
        assert!(pause >= last_after, "{option}: counter went back before trip {}: {t}", t["trip"]);
        assert!(first >= pause && after > first, "{option}: counter did not continue: {t}");
        assert_eq!(g["errors"], 0, "{option}: corruption: {t}");
        assert_eq!(g["checksum_ok"], true, "{option}: checksum: {t}");
        assert_eq!(t["stats"]["verified"], true, "{option}: not verified: {t}");
        assert_eq!(t["stats"]["status"], "completed");
        last_after = after;
    }
    eprintln!("{option}: {}", v["summary"]);
}

#[test]
fn live_pingpong_tcp_between_two_processes() {
    if !kvm_or_skip("live_pingpong_tcp_between_two_processes") {
        return;
    }
    live_pingpong("tcp");
}

#[test]
fn live_pingpong_zstd_between_two_processes() {
    if !kvm_or_skip("live_pingpong_zstd_between_two_processes") {
        return;
    }
    live_pingpong("zstd");
}

#[test]
fn quick_round_trip_through_a_directory() {
    if !kvm_or_skip("quick_round_trip_through_a_directory") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-cli-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_string_lossy().to_string();
    let out = run(&["quick", "--dir", &d, "--mem", "64MiB", "--working-set", "8MiB", "--trips", "2", "--json"]);
    let v = json_of(&out);
    let trips = v["trips"].as_array().expect("trips");
    assert_eq!(trips.len(), 2);
    for t in trips {
        let g = &t["guest"];
        assert!(g["passes_first"].as_u64() >= t["passes_at_save"].as_u64(), "{t}");
        assert!(g["passes_after"].as_u64() > g["passes_first"].as_u64(), "{t}");
        assert_eq!(g["errors"], 0, "{t}");
        assert_eq!(g["checksum_ok"], true, "{t}");
        assert!(t["file_bytes"].as_u64().unwrap() > 8 << 20, "{t}");
        assert!(t["save_ms"].as_f64().unwrap() > 0.0 && t["load_ms"].as_f64().unwrap() > 0.0);
    }
    // Nothing left behind: no record, no image, no lock.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left in the shared directory: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn fails_with(args: &[&str], env_key: bool, needle: &str) {
    let mut c = Command::new(FERRY);
    c.args(args);
    if env_key {
        c.env("FERRY_PSK", KEY);
    } else {
        c.env_remove("FERRY_PSK");
    }
    let out = c.output().expect("run ferry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    // These fail before any VM exists, so they need no KVM.
    fails_with(&["pingpong", "--mem", "1XB"], true, "unknown size unit");
    fails_with(&["pingpong", "--option", "carrier-pigeon"], true, "invalid value");
    fails_with(&["pingpong", "--mem", "64MiB", "--working-set", "64MiB"], true, "does not fit");
    fails_with(&["pingpong", "--mem", "8GiB"], true, "3 GiB");
    fails_with(&["pingpong", "--channels", "0"], true, "--channels");
    fails_with(&["receive", "--listen", "not-an-address"], true, "invalid value");
    fails_with(&["receive", "--listen", "127.0.0.1:0"], false, "no key");
    fails_with(&["receive", "--listen", "127.0.0.1:0", "--keep-last"], true, "--then-send-to");
    fails_with(&["frobnicate"], true, "unrecognized subcommand");
    // A short key is refused.
    let out = Command::new(FERRY)
        .args(["receive", "--listen", "127.0.0.1:0"])
        .env("FERRY_PSK", "short")
        .output()
        .expect("run ferry");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key"));
}

#[test]
fn unreachable_destination_fails_and_the_vm_stays_running() {
    if !kvm_or_skip("unreachable_destination_fails_and_the_vm_stays_running") {
        return;
    }
    // A port nobody listens on: bind one and close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let to = format!("127.0.0.1:{port}");
    let out = run(&["run-and-migrate", "--mem", "16MiB", "--working-set", "1MiB", "--warmup-ms", "50", "--to", &to]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("keeps running here"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A `ferry-harness receive` child with key `key`; returns it and the address it listens on.
fn spawn_receiver(
    key: &str,
    extra: &[&str],
) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>, String) {
    use std::io::BufRead;
    let mut child = Command::new(FERRY)
        .args(["receive", "--listen", "127.0.0.1:0", "--json"])
        .args(extra)
        .env("FERRY_PSK", key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry-harness receive");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["event"], "listening", "{v}");
    let addr = v["addr"].as_str().unwrap().to_string();
    (child, out, addr)
}

#[test]
fn run_and_migrate_to_a_separate_receive_process() {
    if !kvm_or_skip("run_and_migrate_to_a_separate_receive_process") {
        return;
    }
    use std::io::Read;
    let key = KEY;
    // The receiver keeps a memory reserve: the guest's memory is carved from it.
    let (mut child, mut out, addr) =
        spawn_receiver(key, &["--count", "1", "--run-for-ms", "300", "--hold-ms", "50", "--reserve", "40MiB"]);
    let src = run(&[
        "run-and-migrate",
        "--mem",
        "32MiB",
        "--working-set",
        "4MiB",
        "--warmup-ms",
        "100",
        "--downtime-ms",
        "2000",
        "--to",
        &addr,
        "--json",
    ]);
    let s = json_of(&src);
    assert_eq!(s["stats"]["status"], "completed", "{s}");
    assert_eq!(s["stats"]["verified"], true, "{s}");
    let st = child.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(st.success(), "receive failed: {rest}");
    let events: Vec<Value> = rest.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let arrived = events.iter().find(|e| e["event"] == "arrived").unwrap_or_else(|| panic!("{rest}"));
    let g = &arrived["guest"];
    assert!(g["passes_first"].as_u64() >= s["passes_at_pause"].as_u64(), "{s} / {arrived}");
    assert!(g["passes_after"].as_u64() > g["passes_first"].as_u64(), "{arrived}");
    assert_eq!(g["errors"], 0);
    assert_eq!(g["checksum_ok"], true);
    let done = events.iter().find(|e| e["event"] == "done").unwrap_or_else(|| panic!("{rest}"));
    assert_eq!(done["failures"], 0, "{done}");
    assert_eq!(done["reserve"]["misses"], 0, "the guest's memory did not come from the reserve: {done}");
    assert!(done["reserve"]["hits"].as_u64() >= Some(1), "{done}");
}

#[test]
fn a_destination_with_another_key_is_refused_and_the_vm_stays_running() {
    if !kvm_or_skip("a_destination_with_another_key_is_refused_and_the_vm_stays_running") {
        return;
    }
    let (mut child, _out, addr) =
        spawn_receiver("4f3a1c9e0b7d26e85a1f3c4b9d0e2a7c6b5d8e1f0a3c2b4d6e8f7a9c1b3d5e7f", &[]);
    let out = run(&["run-and-migrate", "--mem", "16MiB", "--working-set", "1MiB", "--warmup-ms", "50", "--to", &addr]);
    let _ = child.kill();
    let _ = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("keeps running here"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
