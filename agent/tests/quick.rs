//! Quick moves through two `ferryd` agents sharing a directory (`shared_storage`): the VM is
//! saved there by its source VMM, handed over by the ownership record, loaded and resumed by
//! the destination's VMM, and checked against the source's digest. Without shared storage a
//! quick move is refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn shared(dir: &Scratch) -> String {
    format!("shared_storage = \"{}\"\n", dir.0.display())
}

/// What is left in the shared directory (nothing, after a move ended).
fn leftovers(dir: &Scratch) -> Vec<String> {
    std::fs::read_dir(&dir.0).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

fn counter_grows(a: &Agent, vm: &str) {
    let c0 = a.json(&["vm", "show", vm])["guest_counter"].as_u64().unwrap();
    let t0 = Instant::now();
    while a.json(&["vm", "show", vm])["guest_counter"].as_u64().unwrap() <= c0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "{vm} does not run on {}", a.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn quick_move_ends_on_b(a: &Agent, b: &Agent, dir: &Scratch, vm: &str) -> Value {
    let out = a.json(&["move", vm, "--to", &b.listen.to_string(), "--quick", "--wait"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    assert!(out["total_ms"].as_f64().unwrap() > 0.0 && out["downtime_ms"].as_f64().unwrap() > 0.0, "{out}");
    let on_b = b.json(&["vm", "show", vm]);
    assert_eq!(on_b["state"], "running", "{on_b}");
    assert_eq!(on_b["arrived_verified"], true, "{on_b}");
    assert_eq!(on_b["guest_check"], "ok", "{on_b}");
    assert_eq!(on_b["epoch"], 2, "{on_b}");
    assert!(a.vms().is_empty(), "{:#?}", a.vms());
    let ma = a.migrations();
    assert_eq!((ma[0]["kind"].as_str(), ma[0]["direction"].as_str()), (Some("quick"), Some("outgoing")), "{ma:#?}");
    let mb = b.wait_all_final(1, Duration::from_secs(60));
    assert_eq!(mb[0]["kind"], "quick", "{mb:#?}");
    assert_eq!(mb[0]["status"], "completed", "{mb:#?}");
    assert_eq!(mb[0]["id"], ma[0]["id"]);
    let st = ma[0]["stats"].clone();
    assert_eq!(st["kind"], "quick", "{st}");
    assert!(st["image_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(leftovers(dir).is_empty(), "left in the shared directory: {:?}", leftovers(dir));
    counter_grows(b, vm);
    out
}

#[test]
fn a_quick_move_through_shared_storage_ends_running_on_b_verified() {
    let dir = Scratch::new("shared");
    let a = Agent::start("a", KEY, &shared(&dir));
    let b = Agent::start("b", KEY, &shared(&dir));
    a.json(&["vm", "create", "--name", "qs", "--memory", "64MiB", "--guest", "synthetic", "--working-set", "8MiB"]);
    quick_move_ends_on_b(&a, &b, &dir, "qs");
    // And back, live this time: the record of the quick move does not stand in the way of
    // another quick move later.
    let back = b.json(&["move", "qs", "--to", &a.listen.to_string(), "--wait"]);
    assert_eq!(back["status"], "completed", "{back}");
    let again = a.json(&["move", "qs", "--to", &b.listen.to_string(), "--quick", "--wait"]);
    assert_eq!(again["status"], "completed", "{again}");
    assert_eq!(b.json(&["vm", "show", "qs"])["epoch"], 4);

    if ferry_test_support::kvm_or_skip("a_quick_move_through_shared_storage (KVM guest)") {
        a.json(&["vm", "create", "--name", "qk", "--memory", "64MiB", "--guest", "kvm", "--working-set", "8MiB"]);
        counter_grows(&a, "qk");
        let c0 = a.json(&["vm", "show", "qk"])["guest_counter"].as_u64().unwrap();
        let mut ma = a.migrations().len();
        let out = a.json(&["move", "qk", "--to", &b.listen.to_string(), "--quick", "--wait"]);
        assert_eq!(out["status"], "completed", "{out}");
        assert_eq!(out["verified"], true, "{out}");
        ma += 1;
        assert_eq!(a.migrations().len(), ma);
        let on_b = b.json(&["vm", "show", "qk"]);
        assert_eq!(on_b["guest_check"], "ok", "{on_b}");
        assert!(on_b["guest_counter"].as_u64().unwrap() >= c0, "the KVM guest's counter went back: {on_b}");
        counter_grows(&b, "qk");
    }
}

#[test]
fn a_quick_move_without_shared_storage_is_refused_and_the_vm_stays() {
    let dir = Scratch::new("shared");
    let other = Scratch::new("other");
    let a_plain = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, &shared(&dir));
    a_plain.json(&["vm", "create", "--name", "q1", "--memory", "32MiB", "--guest", "synthetic"]);
    // The source has no shared storage: refused at once (exit 2), nothing journaled.
    let o = a_plain.ferry(&["move", "q1", "--to", &b.listen.to_string(), "--quick", "--wait"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs shared storage") && err.contains("no_shared_storage"), "{err}");
    assert!(a_plain.migrations().is_empty());
    assert_eq!(a_plain.json(&["vm", "show", "q1"])["state"], "running");

    // The destination has none (or another directory): the move fails with that reason, the VM
    // keeps running here, nothing is left on either host or in the directory.
    let a = Agent::start("a2", KEY, &shared(&dir));
    let b_plain = Agent::start("b2", KEY, "");
    let b_other = Agent::start("b3", KEY, &shared(&other));
    a.json(&["vm", "create", "--name", "q2", "--memory", "32MiB", "--guest", "synthetic"]);
    for (dst, want) in [(&b_plain, "no shared_storage"), (&b_other, "do not share that directory")] {
        let o = a.ferry(&["--json", "move", "q2", "--to", &dst.listen.to_string(), "--quick", "--wait"]);
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        let out: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(out["status"], "failed", "{out}");
        assert!(out["error"].as_str().unwrap().contains(want), "{out}");
        assert!(dst.vms().is_empty() && dst.migrations().is_empty(), "the refusing host kept something");
        let v = a.json(&["vm", "show", "q2"]);
        assert_eq!((v["state"].as_str(), v["epoch"].as_u64()), (Some("running"), Some(1)), "{v}");
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    }
    counter_grows(&a, "q2");
}
