//! Two `ferryd` agents on loopback, as real processes, driven through `ferry`: moves under the
//! host-wide limit, cancel, restart with running VMs, bad input. Processes killed mid-move:
//! `faults.rs`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn create(a: &Agent, name: &str, mem: &str, extra: &[&str]) -> Value {
    let mut args = vec!["vm", "create", "--name", name, "--memory", mem, "--guest", "synthetic"];
    args.extend_from_slice(extra);
    a.json(&args)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn eight_vms_move_under_a_limit_of_two() {
    let a = Agent::start("a", KEY, "max_live_migrations = 2\n");
    let b = Agent::start("b", KEY, "max_live_migrations = 2\n");
    let to = b.listen.to_string();
    let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
    for n in &names {
        let v = create(&a, n, "32MiB", &["--working-set", "4MiB", "--dirty-rate", "8MiB"]);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["epoch"], 1);
    }
    // All eight asked at once: the agent queues them.
    let ids: Vec<String> =
        names.iter().map(|n| a.json(&["move", n, "--to", &to])["id"].as_str().expect("an id").to_string()).collect();
    let ma = a.wait_all_final(8, Duration::from_secs(300));
    let mb = b.wait_all_final(8, Duration::from_secs(60));
    for m in &ma {
        assert_eq!(m["status"], "completed", "{m:#}\n{}", a.logs());
        assert_eq!(m["verified"], true, "{m:#}");
        assert_eq!(m["direction"], "outgoing");
        assert!(ids.contains(&m["id"].as_str().unwrap().to_string()));
        for k in ["started_at", "finished_at"] {
            let t = m[k].as_str().unwrap_or_else(|| panic!("{k} missing: {m:#}"));
            assert!(t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T", "{k} is not RFC 3339: {t}");
        }
    }
    for m in &mb {
        assert_eq!(m["status"], "completed", "{m:#}\n{}", b.logs());
        assert_eq!(m["direction"], "incoming");
    }
    assert!(max_concurrent(&ma) <= 2, "source ran {} at once: {ma:#?}", max_concurrent(&ma));
    assert!(max_concurrent(&mb) <= 2, "destination ran {} at once: {mb:#?}", max_concurrent(&mb));
    // All eight run on B, verified, guest checked, next epoch; none left on A.
    assert!(a.vms().is_empty(), "{:#?}", a.vms());
    let on_b = b.vms();
    assert_eq!(on_b.len(), 8, "{on_b:#?}");
    for v in &on_b {
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["epoch"], 2, "{v}");
        assert_eq!(v["arrived_verified"], true, "{v}");
        assert_eq!(v["guest_check"], "ok", "{v}");
    }
    // The guests keep running on B.
    let before: Vec<u64> = on_b.iter().map(|v| v["guest_counter"].as_u64().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<u64> = b.vms().iter().map(|v| v["guest_counter"].as_u64().unwrap()).collect();
    assert!(before.iter().zip(&after).all(|(x, y)| y > x), "guests stopped on B: {before:?} -> {after:?}");
}

#[test]
fn move_wait_json_and_the_journal_have_the_fixed_fields() {
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    create(&a, "web", "64MiB", &[]);
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--wait", "--channels", "2"]);
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["verified"], true, "{out}");
    assert!(out["total_ms"].as_f64().unwrap() > 0.0, "{out}");
    assert!(out["downtime_ms"].as_f64().is_some(), "{out}");
    let m = a.migrations();
    assert_eq!(m.len(), 1);
    for k in ["id", "vm", "direction", "status", "started_at", "finished_at"] {
        assert!(!m[0][k].is_null(), "{k} missing: {:#}", m[0]);
    }
    assert_eq!(m[0]["vm"], "web");
    let st: Vec<&str> = m[0]["events"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(st.first(), Some(&"queued"));
    assert_eq!(st.last(), Some(&"completed"));
    assert!(st.contains(&"setup"), "{st:?}");
    // And back: the destination owns it now and can move it on.
    let back = b.json(&["move", "web", "--to", &a.listen.to_string(), "--wait"]);
    assert_eq!(back["status"], "completed", "{back}");
    assert_eq!(a.json(&["vm", "show", "web"])["epoch"], 3);
}

#[test]
fn cancel_a_queued_and_an_active_move() {
    let a = Agent::start("a", KEY, "max_live_migrations = 1\n");
    let b = Agent::start("b", KEY, "");
    let to = b.listen.to_string();
    // A guest that rewrites its working set flat out cannot fit a 1 ms pause: it stays active.
    create(&a, "busy", "128MiB", &["--working-set", "64MiB", "--dirty-rate", "0"]);
    create(&a, "idle", "32MiB", &[]);
    let active = a.json(&["move", "busy", "--to", &to, "--downtime-ms", "1"])["id"].as_str().unwrap().to_string();
    let queued = a.json(&["move", "idle", "--to", &to])["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let m = a.json(&["migration", &active]);
        if m["status"] == "active" {
            break;
        }
        assert!(!["completed", "failed"].contains(&m["status"].as_str().unwrap()), "{m:#}");
        assert!(t0.elapsed() < Duration::from_secs(60), "never active: {m:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.json(&["migration", &queued])["status"], "queued");
    let q = a.json(&["cancel", &queued]);
    assert_eq!(q["status"], "cancelled", "{q:#}");
    a.json(&["cancel", &active]);
    let ms = a.wait_all_final(2, Duration::from_secs(60));
    for m in &ms {
        assert_eq!(m["status"], "cancelled", "{m:#}");
    }
    // Both keep running on A; nothing is left on B, whose journal says why.
    let vms = a.vms();
    assert_eq!(vms.len(), 2);
    assert!(vms.iter().all(|v| v["state"] == "running" && v["epoch"] == 1), "{vms:#?}");
    let c0 = a.json(&["vm", "show", "busy"])["guest_counter"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.json(&["vm", "show", "busy"])["guest_counter"].as_u64().unwrap() > c0, "the guest stopped on A");
    let mb = b.wait_all_final(1, Duration::from_secs(60));
    assert_eq!(mb.len(), 1, "the queued move never reached B: {mb:#?}");
    assert_eq!(mb[0]["status"], "failed");
    assert!(b.vms().is_empty(), "{:#?}", b.vms());
    // A cancelled move can be asked again.
    let again = a.json(&["move", "idle", "--to", &to, "--wait"]);
    assert_eq!(again["status"], "completed", "{again}");
}

#[test]
fn a_restarted_agent_adopts_its_running_vms() {
    let mut a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    let v = create(&a, "db", "32MiB", &[]);
    let pid = v["pid"].as_u64().unwrap();
    a.kill();
    // The VM runs on without its agent.
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the VMM died with the agent");
    a.restart();
    let v2 = a.json(&["vm", "show", "db"]);
    assert_eq!(v2["pid"].as_u64().unwrap(), pid, "{v2}");
    assert_eq!(v2["state"], "running");
    let c0 = v2["guest_counter"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.json(&["vm", "show", "db"])["guest_counter"].as_u64().unwrap() > c0);
    // And it can still move it.
    let out = a.json(&["move", "db", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
}

use std::path::Path;

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let a = Agent::start("a", KEY, "");
    let other = Agent::start("other", "q0KjJ5mXwz8N0p1LbQ7tYcVrE2sHdUaF9gIiOkMnB3w=", "");
    create(&a, "app", "32MiB", &[]);
    // The API socket is the owner's only.
    let mode = std::fs::metadata(&a.api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "api socket mode {mode:o}");

    // Malformed JSON, straight to the API.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ep = ferry_agent::client::Endpoint::Unix(a.api.clone());
    let (st, body) = rt
        .block_on(ferry_agent::client::request(
            &ep,
            "POST",
            "/v1/moves",
            Some(b"{\"vm\": ".to_vec()),
            &[],
            Duration::from_secs(10),
        ))
        .unwrap();
    assert_eq!(st, 400);
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("malformed JSON"), "{e}");
    let (st, body) = rt
        .block_on(ferry_agent::client::request(
            &ep,
            "POST",
            "/v1/vms",
            Some(br#"{"name":"x","memory_bytes":4096,"guest":"synthetic"}"#.to_vec()),
            &[],
            Duration::from_secs(10),
        ))
        .unwrap();
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));

    // Unknown VM: refused (exit 2), with the reason.
    let o = a.ferry(&["move", "nope", "--to", &other.listen.to_string()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no VM named \"nope\""), "{}", stderr(&o));
    // A destination that is not an address.
    let o = a.ferry(&["move", "app", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not an agent address"), "{}", stderr(&o));

    // Unreachable destination: the move fails (exit 1), the VM keeps running here.
    let nobody = free_addr().to_string();
    let o = a.ferry(&["--json", "move", "app", "--to", &nobody, "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["status"], "failed");
    assert!(out["error"].as_str().unwrap().contains("cannot reach"), "{out}");

    // A destination holding another key refuses, and says so.
    let o = a.ferry(&["--json", "move", "app", "--to", &other.listen.to_string(), "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(out["error"].as_str().unwrap().contains("different key"), "{out}");
    assert!(other.migrations().is_empty(), "the refusing host journaled something");
    assert!(other.vms().is_empty());
    let v = a.json(&["vm", "show", "app"]);
    assert_eq!(v["state"], "running");
    assert_eq!(v["epoch"], 1);

    // A bad config is refused at start with the key and the reason.
    for (extra, want) in [
        ("max_live_migrations = 0\n", "max_live_migrations: 0 is not in 1 ..= 64"),
        ("[[networks]]\nsubnet = \"198.18.0.0/40\"\n", "networks[0].subnet"),
    ] {
        let err = refused_config(Creds::Key(KEY), extra);
        assert!(err.contains(want), "{extra}: {err}");
    }
}

#[test]
fn a_kvm_guest_moves_and_its_counter_continues() {
    if !ferry_test_support::kvm_or_skip("a_kvm_guest_moves_and_its_counter_continues") {
        return;
    }
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    move_kvm_guest(&a, &b, "k1");
}

#[test]
fn events_stream_and_metrics_follow_a_move() {
    let a = Agent::start("a", KEY, "");
    let b = Agent::start("b", KEY, "");
    create(&a, "ev", "32MiB", &[]);
    let reader = watch_states(&a);
    let out = a.json(&["move", "ev", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    let states = reader.join().unwrap();
    assert_eq!(states.first().map(String::as_str), Some("queued"), "{states:?}");
    assert!(states.iter().any(|s| s == "setup"), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("completed"), "{states:?}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ep = ferry_agent::client::Endpoint::Unix(a.api.clone());
    // The slot is handed back just after the outcome is journaled (the source VMM is stopped
    // in between): look again for a moment until the gauge shows it.
    let t0 = Instant::now();
    let text = loop {
        let (st, body) = rt
            .block_on(ferry_agent::client::request(&ep, "GET", "/metrics", None, &[], Duration::from_secs(10)))
            .unwrap();
        assert_eq!(st, 200);
        let text = String::from_utf8(body).unwrap();
        if text.contains("ferry_migrations_active 0") || t0.elapsed() > Duration::from_secs(10) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for want in [
        "ferry_migrations_active 0",
        "ferry_max_live_migrations 2",
        "ferry_migrations_total{direction=\"outgoing\",status=\"completed\",reason=\"\"} 1",
        "ferry_migration_downtime_milliseconds_count 1",
        "# EOF",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}
