//! Processes killed in the middle of a move, as real processes (`kill -9`): the destination's
//! agent and the destination's VMM during the pre-copy rounds (the VM keeps running on the
//! source, the journal says why, nothing is left on the destination), and the source's agent
//! after the commit (the restarted agent asks the destination how the move ended; exactly one
//! copy runs).

mod common;

use std::process::Command;
use std::time::Duration;

use std::net::SocketAddr;

use common::*;
use ferry_test_support::testbed::{unique_name, Side, Testbed};
use serde_json::Value;

/// A guest that rewrites 64 MiB flat out: with a 1 ms downtime limit its move stays in its
/// pre-copy rounds until something ends it.
fn busy_guest(a: &Agent, name: &str) {
    let v = a.json(&[
        "vm",
        "create",
        "--name",
        name,
        "--memory",
        "128MiB",
        "--guest",
        "synthetic",
        "--working-set",
        "64MiB",
        "--dirty-rate",
        "0",
    ]);
    assert_eq!(v["state"], "running", "{v}");
}

fn kill9(pid: u64) {
    let st = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("run kill");
    assert!(st.success(), "kill -9 {pid}");
}

/// The VM runs on `a` and its guest advances.
fn runs_on(a: &Agent, vm: &str) {
    let v = a.json(&["vm", "show", vm]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["epoch"], 1, "{v}");
    let c0 = v["guest_counter"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let c1 = a.json(&["vm", "show", vm])["guest_counter"].as_u64().unwrap();
    assert!(c1 > c0, "the guest stopped on {}: {c0} -> {c1}", a.name);
}

/// After a failed incoming move: a restarted destination agent lists no such VM, journals the
/// migration failed, and the incoming VMM process has ended.
fn nothing_left_on(b: &mut Agent, vm: &str, vmm_pid: u64) -> Vec<Value> {
    b.kill();
    b.restart();
    let mb = b.wait_all_final(1, Duration::from_secs(120));
    assert_eq!(mb.len(), 1, "{mb:#?}");
    assert_eq!(mb[0]["status"], "failed", "{:#}", mb[0]);
    assert_eq!(mb[0]["direction"], "incoming");
    assert!(mb[0]["error"].as_str().is_some_and(|e| !e.is_empty()), "no reason recorded: {:#}", mb[0]);
    assert!(b.vms().is_empty(), "{:#?}", b.vms());
    assert!(!b.ferry(&["vm", "show", vm]).status.success(), "{vm} is still listed on {}", b.name);
    wait_gone(vmm_pid, Duration::from_secs(60));
    mb
}

/// Two agents in two namespaces joined by one slow link (50 Mbit/s): a move's first round of a
/// 128 MiB guest takes about 20 s, so a process killed once bytes flow dies in mid-round
/// whatever the machine's load. Returns the testbed (kept up while it lives), both agents and
/// the destination's address; `None` after printing SKIP where namespaces cannot be made.
fn slow_pair(test: &str) -> Option<(Testbed, Agent, Agent, SocketAddr)> {
    let tb = match ferry_test_support::testbed::check_permitted()
        .and_then(|()| Testbed::up(&unique_name("tf"), &["50mbit"]).map_err(|e| e.to_string()))
    {
        Ok(tb) => tb,
        Err(why) => {
            ferry_test_support::skip(test, &why);
            return None;
        }
    };
    let a_addr = SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let a = Agent::start_in(Some(tb.netns(Side::Src)), "a", KEY, "", a_addr);
    let b = Agent::start_in(Some(tb.netns(Side::Dst)), "b", KEY, "", b_addr);
    Some((tb, a, b, b_addr))
}

/// The destination's agent dies in mid-round (see [`slow_pair`]).
#[test]
fn killing_the_destination_agent_mid_round_leaves_the_vm_on_the_source() {
    let Some((tb, a, mut b, b_addr)) = slow_pair("killing_the_destination_agent_mid_round_leaves_the_vm_on_the_source")
    else {
        return;
    };
    let v = a.json(&["vm", "create", "--name", "victim", "--memory", "128MiB", "--guest", "synthetic"]);
    assert_eq!(v["state"], "running", "{v}");
    let id =
        a.json(&["move", "victim", "--to", &b_addr.to_string(), "--channels", "1"])["id"].as_str().unwrap().to_string();
    wait_bytes_flowing(&a, &id);
    let vmm = vmm_status(&b.state_dir(), "victim").expect("the incoming VMM answers");
    let vmm_pid = vmm["pid"].as_u64().unwrap();
    assert_eq!(vmm["state"], "receiving", "{vmm}");
    b.kill();
    // The source gives up on a destination without its agent, before commit.
    let ma = a.wait_all_final(1, Duration::from_secs(120));
    assert_eq!(ma[0]["status"], "failed", "{:#}\n{}", ma[0], a.logs());
    let err = ma[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("destination agent") && err.contains("gone"), "{:#}", ma[0]);
    runs_on(&a, "victim");
    nothing_left_on(&mut b, "victim", vmm_pid);
    drop(a);
    drop(b);
    drop(tb);
}

#[test]
fn killing_the_destination_vmm_mid_round_leaves_the_vm_on_the_source() {
    // On the slow link: on loopback an idle machine could finish the move before the kill.
    let Some((tb, a, mut b, b_addr)) = slow_pair("killing_the_destination_vmm_mid_round_leaves_the_vm_on_the_source")
    else {
        return;
    };
    busy_guest(&a, "victim");
    let id = a.json(&["move", "victim", "--to", &b_addr.to_string(), "--downtime-ms", "1"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_bytes_flowing(&a, &id);
    let pid = vmm_status(&b.state_dir(), "victim").expect("the destination's VMM answers")["pid"].as_u64().unwrap();
    kill9(pid);
    let ma = a.wait_all_final(1, Duration::from_secs(120));
    assert_eq!(ma[0]["status"], "failed", "{:#}", ma[0]);
    assert!(ma[0]["error"].as_str().is_some_and(|e| !e.is_empty()), "no reason recorded: {:#}", ma[0]);
    runs_on(&a, "victim");
    let mb = b.wait_all_final(1, Duration::from_secs(60));
    assert_eq!(mb[0]["status"], "failed", "{:#}", mb[0]);
    assert!(mb[0]["error"].as_str().unwrap().contains("VMM"), "{:#}", mb[0]);
    assert!(b.vms().is_empty());
    let mb = nothing_left_on(&mut b, "victim", pid);
    assert!(mb[0]["error"].as_str().unwrap().contains("VMM"), "{:#}", mb[0]);
    drop(a);
    drop(b);
    drop(tb);
}

#[test]
fn killing_the_source_agent_after_commit_is_settled_by_the_destination() {
    let key_dir = Scratch::new("hold");
    let release = key_dir.0.join("release");
    // Test hook of ferry-vmm: the source VMM keeps its outcome to itself until `release` exists,
    // so the agent can be killed after the commit and before it learns how the move ended.
    let env = vec![("FERRY_VMM_TEST_HOLD_OUTCOME_UNTIL".to_string(), release.display().to_string())];
    let mut a = Agent::start_with_env(None, "a", KEY, "", free_addr(), env);
    let b = Agent::start("b", KEY, "");
    let v = a.json(&["vm", "create", "--name", "one", "--memory", "64MiB", "--guest", "synthetic"]);
    let src_pid = v["pid"].as_u64().unwrap();
    let id = a.json(&["move", "one", "--to", &b.listen.to_string()])["id"].as_str().unwrap().to_string();
    // The destination committed and runs the VM ...
    let t0 = std::time::Instant::now();
    while !b.vms().iter().any(|v| v["name"] == "one" && v["state"] == "running") {
        assert!(t0.elapsed() < Duration::from_secs(120), "never arrived on B\n{}\n{}", a.logs(), b.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... while the source agent still has the move in flight.
    let m = a.json(&["migration", &id]);
    assert!(
        m["finished_at"].is_null() && !["completed", "failed", "cancelled"].contains(&m["status"].as_str().unwrap()),
        "{m:#}"
    );
    a.kill();
    // Its VMM finishes while nobody watches.
    std::fs::write(&release, b"").unwrap();
    let t0 = std::time::Instant::now();
    while vmm_status(&a.state_dir(), "one").is_none_or(|s| s["state"] != "released") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the source VMM never released the VM");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.restart();
    let ma = a.wait_all_final(1, Duration::from_secs(120));
    assert_eq!(ma[0]["status"], "completed", "{:#}\n{}", ma[0], a.logs());
    let ev: Vec<(&str, &str)> = ma[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["status"].as_str().unwrap(), e["detail"].as_str().unwrap_or("")))
        .collect();
    // In flight when the agent died; uncertain after its restart; settled by the destination.
    let n = ev.len();
    assert!(n >= 3, "{ev:?}");
    assert_eq!(ev[n - 2].0, "uncertain", "{ev:?}");
    assert_eq!(ev[n - 1], ("completed", "the destination confirmed it owns the VM"), "{ev:?}");
    assert!(!["completed", "failed", "cancelled", "uncertain"].contains(&ev[n - 3].0), "{ev:?}");
    // Exactly one copy: on B, running; none on A, whose VMM process ended.
    assert!(a.vms().is_empty(), "{:#?}", a.vms());
    wait_gone(src_pid, Duration::from_secs(60));
    let on_b = b.json(&["vm", "show", "one"]);
    assert_eq!(on_b["epoch"], 2, "{on_b}");
    assert_eq!(on_b["arrived_with"], id.as_str(), "{on_b}");
    let c0 = on_b["guest_counter"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.json(&["vm", "show", "one"])["guest_counter"].as_u64().unwrap() > c0, "the guest does not run on B");
    let mb = b.wait_all_final(1, Duration::from_secs(60));
    assert_eq!(mb[0]["status"], "completed", "{:#}", mb[0]);
}
