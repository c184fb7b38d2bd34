//! Host settings at run time through `ferry host set` and `ferry network list|add|remove`:
//! checked (a bad value changes nothing), kept across a restart of `ferryd`, used by the next
//! move; a raised limit admits a queued move at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn subnets(a: &Agent) -> Vec<String> {
    a.json(&["network", "list"]).as_array().unwrap().iter().map(|n| n["subnet"].as_str().unwrap().to_string()).collect()
}

#[test]
fn networks_change_at_run_time_persist_and_steer_the_next_move() {
    let mut a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    let to = b.listen.to_string();
    for n in ["n1", "n2"] {
        a.json(&["vm", "create", "--name", n, "--memory", "32MiB", "--guest", "synthetic"]);
    }
    assert!(subnets(&a).is_empty());
    assert_eq!(a.json(&["host", "show"])["use_any_network"], true);
    a.json(&["network", "add", "198.19.0.0/24", "--priority", "2"]);
    let l = a.json(&["network", "add", "127.0.0.0/8", "--priority", "1"]);
    assert_eq!(l[0]["subnet"], "127.0.0.0/8", "by priority: {l}");
    assert_eq!(subnets(&a), ["127.0.0.0/8", "198.19.0.0/24"]);
    // Listing a network closes the others (use_any_network was not given).
    assert_eq!(a.json(&["host", "show"])["use_any_network"], false);

    // Bad input: a clear error, nothing changes.
    for (args, want) in [
        (vec!["network", "add", "198.18.0.0/40"], "subnet: prefix \"40\" is not 0 ..= 32"),
        (vec!["network", "add", "not-a-subnet"], "is not a subnet"),
        (vec!["network", "add", "127.0.0.0/8"], "listed already"),
        (vec!["network", "remove", "10.0.0.0/8"], "is not listed"),
    ] {
        let o = a.ferry(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(err(&o).contains(want), "{args:?}: {}", err(&o));
        assert_eq!(subnets(&a), ["127.0.0.0/8", "198.19.0.0/24"], "{args:?} changed the list");
    }

    let out = a.json(&["move", "n1", "--to", &to, "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");

    // Without the one network that pairs with B, the next move is refused with that reason.
    a.json(&["network", "remove", "127.0.0.0/8"]);
    let refused = |a: &Agent| {
        let o = a.ferry(&["move", "n2", "--to", &to]);
        assert_eq!(o.status.code(), Some(2));
        let e = err(&o);
        assert!(e.contains("none of the migration networks (198.19.0.0/24)"), "{e}");
        assert_eq!(a.json(&["vm", "show", "n2"])["state"], "running");
    };
    refused(&a);
    // The last network cannot go while use_any_network is false.
    let o = a.ferry(&["network", "remove", "198.19.0.0/24"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("last migration network"), "{}", err(&o));

    // Kept across a restart of the agent.
    a.kill();
    a.restart();
    assert_eq!(subnets(&a), ["198.19.0.0/24"]);
    refused(&a);
    a.json(&["host", "set", "--use-any-network", "true"]);
    let out = a.json(&["move", "n2", "--to", &to, "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    a.kill();
    a.restart();
    let h = a.json(&["host", "show"]);
    assert_eq!(h["use_any_network"], true, "{h}");
    assert_eq!(h["networks"], serde_json::json!(["198.19.0.0/24 priority 2"]), "{h}");
    assert_eq!(b.vms().len(), 2);
}

#[test]
fn raising_the_limit_admits_a_queued_move_at_once_and_settings_persist() {
    let mut a = Agent::start("a", KEY, "max_live_migrations = 1\n");
    let b = Agent::start("b", KEY, "");
    let to = b.listen.to_string();
    a.json(&["vm", "create", "--name", "busy", "--memory", "32MiB", "--guest", "synthetic"]);
    a.json(&["vm", "create", "--name", "idle", "--memory", "32MiB", "--guest", "synthetic"]);

    // Bad values: a clear error, nothing changes.
    for (args, want) in [
        (vec!["host", "set", "--max-live-migrations", "0"], "max_live_migrations: 0 is not in 1 ..= 64"),
        (vec!["host", "set", "--option", "fast"], "performance_option: \"fast\" is not"),
        (vec!["host", "set"], "nothing to change"),
    ] {
        let o = a.ferry(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(err(&o).contains(want), "{args:?}: {}", err(&o));
    }
    let h = a.json(&["host", "show"]);
    assert_eq!((h["max_live_migrations"].as_u64(), h["performance_option"].as_str()), (Some(1), Some("tcp")), "{h}");

    // A destination that takes the connection and never answers: the first move holds the only
    // slot (setup, asking for admission) until the listener goes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = a.json(&["move", "busy", "--to", &silent.local_addr().unwrap().to_string()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = Instant::now();
    while a.json(&["migration", &held])["status"] != "setup" {
        assert!(t0.elapsed() < Duration::from_secs(60), "never in setup");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The performance option changed now applies to the next move.
    a.json(&["host", "set", "--option", "compression"]);
    let queued = a.json(&["move", "idle", "--to", &to])["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.json(&["migration", &queued])["status"], "queued", "over the limit of 1");
    let h = a.json(&["host", "set", "--max-live-migrations", "2"]);
    assert_eq!(h["max_live_migrations"], 2, "{h}");
    let t0 = Instant::now();
    let done: Value = loop {
        let m = a.json(&["migration", &queued]);
        if m["status"] == "completed" {
            break m;
        }
        assert!(!["failed", "cancelled"].contains(&m["status"].as_str().unwrap()), "{m:#}");
        assert!(t0.elapsed() < Duration::from_secs(120), "the queued move was not admitted: {m:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(a.json(&["migration", &held])["status"], "setup", "the first move still holds its slot");
    let backends: Vec<&str> =
        done["stats"]["channels"].as_array().unwrap().iter().map(|c| c["backend"].as_str().unwrap()).collect();
    assert!(!backends.is_empty() && backends.iter().all(|b| *b == "zstd"), "option compression not used: {backends:?}");
    drop(silent);
    let ms = a.wait_all_final(2, Duration::from_secs(120));
    assert!(ms.iter().any(|m| m["id"] == held.as_str() && m["status"] == "failed"), "{ms:#?}");
    assert_eq!(a.json(&["vm", "show", "busy"])["state"], "running");

    a.kill();
    a.restart();
    let h = a.json(&["host", "show"]);
    assert_eq!(
        (h["max_live_migrations"].as_u64(), h["performance_option"].as_str()),
        (Some(2), Some("compression")),
        "{h}"
    );
}
