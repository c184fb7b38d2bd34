//! Two `ferryd` agents in two network namespaces joined by two veth NICs
//! (`scripts/testbed.sh`), with a migration network configured: 8 VMs (KVM guests where /dev/kvm
//! works, synthetic ones in any case) move under the limit 2 over that network, and a
//! destination on another network is refused with the reason, never reached some other way.

mod common;

use std::time::Duration;

use common::*;
use ferry_test_support::testbed::{testbed_or_skip, Side, Testbed};

#[test]
fn eight_vms_move_between_two_namespaces_under_a_limit_of_two() {
    let Some(tb) = testbed_or_skip("eight_vms_move_between_two_namespaces_under_a_limit_of_two", 2) else {
        return;
    };
    let net = "[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n";
    let a_addr = std::net::SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = std::net::SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let net = format!("max_live_migrations = 2\n{net}");
    let net = net.as_str();
    let a = Agent::start_in(Some(tb.netns(Side::Src)), "a", KEY, net, a_addr);
    let b = Agent::start_in(Some(tb.netns(Side::Dst)), "b", KEY, net, b_addr);
    let kvm =
        ferry_test_support::kvm_or_skip("agents_in_two_namespaces (the KVM guests; 8 synthetic ones move instead)");
    let kvm_names: Vec<String> = if kvm { (0..2).map(|i| format!("nskvm{i}")).collect() } else { Vec::new() };
    let mut names = Vec::new();
    for i in 0..8 - kvm_names.len() {
        let n = format!("ns{i}");
        a.json(&["vm", "create", "--name", &n, "--memory", "32MiB", "--guest", "synthetic"]);
        names.push(n);
    }
    for n in &kvm_names {
        a.json(&["vm", "create", "--name", n, "--memory", "64MiB", "--guest", "kvm", "--working-set", "8MiB"]);
        names.push(n.clone());
    }
    assert_eq!(names.len(), 8);
    // The KVM guests' counters before the move: they continue on B.
    let mut kvm_before = Vec::new();
    for n in &kvm_names {
        let t0 = std::time::Instant::now();
        loop {
            let c = a.json(&["vm", "show", n])["guest_counter"].as_u64().unwrap();
            if c >= 2 {
                kvm_before.push(c);
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "KVM guest {n} makes no progress");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // B's address on the second NIC is on no migration network of A: refused, with the reason.
    let elsewhere = format!("{}:7700", Testbed::addr(Side::Dst, 1));
    let o = a.ferry(&["move", "ns0", "--to", &elsewhere]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("none of the migration networks") && err.contains("198.18.0.0/24"), "{err}");
    for n in &names {
        a.json(&["move", n, "--to", &b_addr.to_string()]);
    }
    let ma = a.wait_all_final(names.len(), Duration::from_secs(300));
    let mb = b.wait_all_final(names.len(), Duration::from_secs(60));
    assert!(ma.iter().all(|m| m["status"] == "completed" && m["verified"] == true), "{ma:#?}\n{}", a.logs());
    assert!(mb.iter().all(|m| m["status"] == "completed"), "{mb:#?}\n{}", b.logs());
    assert!(max_concurrent(&ma) <= 2 && max_concurrent(&mb) <= 2, "{ma:#?}\n{mb:#?}");
    let on_b = b.vms();
    assert_eq!(on_b.len(), names.len(), "{on_b:#?}");
    assert!(
        on_b.iter().all(|v| v["state"] == "running"
            && v["guest_check"] == "ok"
            && v["arrived_verified"] == true
            && v["epoch"] == 2),
        "{on_b:#?}"
    );
    assert!(a.vms().is_empty());
    for (n, c0) in kvm_names.iter().zip(kvm_before) {
        let c1 = b.json(&["vm", "show", n])["guest_counter"].as_u64().unwrap();
        assert!(c1 >= c0, "{n}: the counter went back: {c0} on A, {c1} on B");
        let t0 = std::time::Instant::now();
        while b.json(&["vm", "show", n])["guest_counter"].as_u64().unwrap() <= c1 {
            assert!(t0.elapsed() < Duration::from_secs(30), "{n} does not run on B");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(a);
    drop(b);
    drop(tb);
}
