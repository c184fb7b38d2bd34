//! The destination's memory reserve (`memory_reserve_bytes`): a standby VMM process keeps guest
//! memory faulted in, and the next incoming live migration that fits is received into it (no
//! page faults on the receive path). Real `ferryd` processes on loopback.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A 64 MiB synthetic guest needs this much reserve (each of its regions is carved on a 2 MiB
/// boundary).
const RESERVE_BYTES: u64 = (64 << 20) + (8 << 20);

/// Wait until `b`'s standby VMM has its whole reserve faulted in; the host info then.
fn wait_reserve_ready(b: &Agent) -> Value {
    let t0 = Instant::now();
    loop {
        let h = b.json(&["host", "show"]);
        if h["memory_reserve_ready_bytes"].as_u64() == Some(RESERVE_BYTES) {
            return h;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the reserve did not fill: {h}\n{}", b.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The control sockets of the standby VMMs in `b`'s state directory.
fn standby_sockets(b: &Agent) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(b.state_dir().join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with(".standby-") && n.ends_with(".sock")
        })
        .collect();
    out.sort();
    out
}

/// The status a VMM process answers on `socket`.
fn status_at(socket: &Path) -> Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str::<Value>(&out).unwrap()["status"].clone()
}

#[test]
fn an_incoming_vm_that_fits_lands_in_the_reserve_and_a_new_standby_replaces_it() {
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, &format!("memory_reserve_bytes = {RESERVE_BYTES}\n"));
    let h = wait_reserve_ready(&b);
    assert_eq!(h["memory_reserve_bytes"], RESERVE_BYTES, "{h}");
    assert_eq!(a.json(&["host", "show"])["memory_reserve_bytes"], 0);
    let first = standby_sockets(&b);
    assert_eq!(first.len(), 1, "{first:?}");
    let standby_pid = status_at(&first[0])["pid"].as_u64().unwrap();

    // Too big for the reserve: received into cold memory, the standby stays for the next one.
    for (name, mem) in [("big", "128MiB"), ("small", "64MiB")] {
        a.json(&["vm", "create", "--name", name, "--memory", mem, "--guest", "synthetic"]);
    }
    let out = a.json(&["move", "big", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    let big = b.json(&["vm", "show", "big"]);
    assert_eq!(big["state"], "running", "{big}");
    assert_eq!(big["arrived_verified"], true, "{big}");
    assert!(big["arrived_from_reserve"].is_null(), "{big}");
    assert_eq!(standby_sockets(&b), first, "the standby was used for a VM it cannot hold");

    // Fits: the standby VMM becomes the VM's VMM and receives into its reserve.
    let out = a.json(&["move", "small", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    let small = b.json(&["vm", "show", "small"]);
    assert_eq!(small["state"], "running", "{small}");
    assert_eq!(small["arrived_verified"], true, "{small}");
    assert_eq!(small["guest_check"], "ok", "{small}");
    assert_eq!(small["arrived_from_reserve"], true, "{small}");
    assert_eq!(small["pid"].as_u64(), Some(standby_pid), "{small}");
    // Its control socket and log follow the VM's name, as a fresh VMM's do.
    assert!(b.state_dir().join("vms/small.sock").exists());
    assert!(b.state_dir().join("vms/small.log").exists());
    assert_eq!(vmm_status(&b.state_dir(), "small").unwrap()["from_reserve"], true);

    // A new standby fills after the arrival, for the next one.
    wait_reserve_ready(&b);
    let next = standby_sockets(&b);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_ne!(next, first);
    // The VM keeps running (and can leave again).
    let back = b.json(&["move", "small", "--to", &a.listen.to_string(), "--wait"]);
    assert_eq!(back["status"], "completed", "{back}");
}

#[test]
fn a_standby_vmm_ends_with_its_agent_and_the_restarted_agent_keeps_its_own() {
    let mut b = Agent::start("b", KEY, &format!("memory_reserve_bytes = {RESERVE_BYTES}\n"));
    wait_reserve_ready(&b);
    let s = standby_sockets(&b);
    assert_eq!(s.len(), 1, "{s:?}");
    let pid = status_at(&s[0])["pid"].as_u64().unwrap();
    assert_eq!(status_at(&s[0])["state"], "standby");
    // A standby holds no VM: it does not outlive its agent (a VM's VMM does).
    b.kill();
    wait_gone(pid, Duration::from_secs(10));
    b.restart();
    wait_reserve_ready(&b);
    let s2 = standby_sockets(&b);
    assert_eq!(s2.len(), 1, "{s2:?}");
    assert_ne!(status_at(&s2[0])["pid"].as_u64().unwrap(), pid);
}
