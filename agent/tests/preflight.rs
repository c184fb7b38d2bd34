//! `ferry preflight VM --to HOST`: the destination and this host checked, nothing moved; exit
//! 0 when compatible, 2 with every incompatibility (a code and a sentence) when not.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Run `ferry --json preflight ...`: (exit code, report).
fn preflight(a: &Agent, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json", "preflight"];
    all.extend_from_slice(args);
    let o = a.ferry(&all);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{args:?}: not JSON ({e}): {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    });
    (o.status.code(), v)
}

fn codes(r: &Value) -> Vec<String> {
    r["incompatibilities"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_compatible_destination_says_how_the_move_would_run_and_nothing_moves() {
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "max_live_migrations = 3\n");
    a.json(&["vm", "create", "--name", "p1", "--memory", "32MiB", "--guest", "synthetic"]);
    let (code, r) = preflight(&a, &["p1", "--to", &b.listen.to_string(), "--channels", "3", "--option", "zstd"]);
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["compatible"], true, "{r:#}");
    assert!(codes(&r).is_empty(), "{r:#}");
    assert_eq!(r["network"], "any network (use_any_network)");
    assert_eq!((r["option"].as_str(), r["channels"].as_u64()), (Some("zstd"), Some(3)), "{r:#}");
    assert_eq!(r["would_queue"], false);
    let d = &r["destination"];
    assert_eq!(d["name"], "b");
    assert_eq!(d["max_live_migrations"], 3);
    assert!(d["memory_available_bytes"].as_u64().unwrap() >= 32 << 20, "{d}");
    // Nothing moved, nothing was journaled on either host.
    assert!(a.migrations().is_empty() && b.migrations().is_empty() && b.vms().is_empty());
    assert_eq!(a.json(&["vm", "show", "p1"])["state"], "running");
    // An unknown VM is a refused request, not a report.
    let o = a.ferry(&["preflight", "nope", "--to", &b.listen.to_string()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no VM named \"nope\""));
    // An option the agent does not serve is refused by the preflight as by the move.
    for cmd in ["preflight", "move"] {
        let o = a.ferry(&[cmd, "p1", "--to", &b.listen.to_string(), "--option", "quic"]);
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("not served by the agent"), "{cmd}: {o:?}");
    }
    assert!(a.migrations().is_empty() && b.vms().is_empty());
}

#[test]
fn incompatibilities_are_listed_with_a_code_and_a_reason() {
    let shared = Scratch::new("pf-shared");
    let a = Agent::start("a", KEY, &format!("shared_storage = \"{}\"\n", shared.0.display()));
    let b = Agent::start("b", KEY, "");
    let stranger = Agent::start("c", "q0KjJ5mXwz8N0p1LbQ7tYcVrE2sHdUaF9gIiOkMnB3w=", "");
    a.json(&["vm", "create", "--name", "dup", "--memory", "32MiB", "--guest", "synthetic"]);
    b.json(&["vm", "create", "--name", "dup", "--memory", "32MiB", "--guest", "synthetic"]);
    let to_b = b.listen.to_string();

    // The name is taken there; a quick move needs shared storage there too.
    let (code, r) = preflight(&a, &["dup", "--to", &to_b, "--quick"]);
    assert_eq!(code, Some(2), "{r:#}");
    assert_eq!(r["compatible"], false);
    assert_eq!(codes(&r), ["name_taken", "no_shared_storage"], "{r:#}");
    for i in r["incompatibilities"].as_array().unwrap() {
        assert!(i["message"].as_str().unwrap().contains("host b"), "{i}");
    }
    // A destination with another key.
    let (code, r) = preflight(&a, &["dup", "--to", &stranger.listen.to_string()]);
    assert_eq!(code, Some(2));
    assert_eq!(codes(&r), ["key_mismatch"], "{r:#}");
    assert!(r["destination"].is_null());
    // No configured network pairs with the destination.
    a.json(&["network", "add", "198.19.0.0/24"]);
    let (code, r) = preflight(&a, &["dup", "--to", &stranger.listen.to_string()]);
    assert_eq!(code, Some(2));
    assert!(r["network"].is_null(), "{r:#}");
    assert_eq!(codes(&r)[0], "no_network", "{r:#}");
    assert!(r["incompatibilities"][0]["message"].as_str().unwrap().contains("198.19.0.0/24"), "{r:#}");
    // Nothing changed anywhere.
    assert!(a.migrations().is_empty() && b.migrations().is_empty() && stranger.migrations().is_empty());
    assert!(std::fs::read_dir(&shared.0).unwrap().next().is_none(), "the probe file was left");

    // A KVM guest to a host where KVM is not usable (FERRY_NO_KVM there).
    if !ferry_test_support::kvm_or_skip("incompatibilities (KVM guest to a host without KVM)") {
        return;
    }
    let mut nokvm = Agent::start("d", KEY, "");
    nokvm.kill();
    let log = std::fs::File::create(nokvm.dir.0.join("ferryd-nokvm.log")).unwrap();
    nokvm.child = Some(
        std::process::Command::new(FERRYD)
            .args(["--config", nokvm.config.to_str().unwrap()])
            .env("FERRY_NO_KVM", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !nokvm.ferry(&["host", "show"]).status.success() {
        assert!(t0.elapsed() < Duration::from_secs(60), "ferryd d did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.json(&["host", "set", "--use-any-network", "true"]);
    a.json(&["network", "remove", "198.19.0.0/24"]);
    a.json(&["vm", "create", "--name", "k", "--memory", "16MiB", "--guest", "kvm"]);
    let (code, r) = preflight(&a, &["k", "--to", &nokvm.listen.to_string()]);
    assert_eq!(code, Some(2), "{r:#}");
    assert_eq!(codes(&r), ["no_kvm"], "{r:#}");
    assert_eq!(r["destination"]["kvm"], false);
    assert!(r["incompatibilities"][0]["message"].as_str().unwrap().contains("FERRY_NO_KVM"), "{r:#}");
}

#[test]
fn a_destination_without_memory_for_the_vm_says_no_memory_and_refuses_the_move() {
    let a = Agent::start("a", KEY, "");
    // B gives its VMs 96 MiB in all, and already runs one of 48 MiB.
    let b = Agent::start("b", KEY, &format!("max_vm_memory_bytes = {}\n", 96u64 << 20));
    b.json(&["vm", "create", "--name", "there", "--memory", "48MiB", "--guest", "synthetic"]);
    a.json(&["vm", "create", "--name", "big", "--memory", "64MiB", "--guest", "synthetic"]);
    a.json(&["vm", "create", "--name", "small", "--memory", "32MiB", "--guest", "synthetic"]);
    let to_b = b.listen.to_string();

    let (code, r) = preflight(&a, &["big", "--to", &to_b]);
    assert_eq!(code, Some(2), "{r:#}");
    assert_eq!(r["compatible"], false, "{r:#}");
    assert_eq!(codes(&r), ["no_memory"], "{r:#}");
    let why = r["incompatibilities"][0]["message"].as_str().unwrap();
    assert!(why.contains("host b can give 48 MiB") && why.contains("needs 64 MiB"), "{why}");
    assert_eq!(r["destination"]["memory_available_bytes"], 48u64 << 20, "{r:#}");

    // The move is refused the same way; nothing moved or changed on either host.
    let o = a.ferry(&["--json", "move", "big", "--to", &to_b, "--wait"]);
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("no_memory") || text.contains("can give 48 MiB"), "{text}");
    assert_eq!(a.json(&["vm", "show", "big"])["state"], "running");
    assert!(b.migrations().is_empty(), "{:#?}", b.migrations());
    let names: Vec<String> = b.vms().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["there"]);

    // What fits is compatible and moves.
    let (code, r) = preflight(&a, &["small", "--to", &to_b]);
    assert_eq!(code, Some(0), "{r:#}");
    let out = a.json(&["move", "small", "--to", &to_b, "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
}
