//! Two `ferryd` agents in two network namespaces joined by two veth NICs
//! (`scripts/testbed.sh`), with a migration network configured: moves take that network, and a
//! destination on another network is refused with the reason, never reached some other way.

mod common;

use std::time::Duration;

use common::*;
use ferry_test_support::testbed::{testbed_or_skip, Side, Testbed};

#[test]
fn agents_in_two_namespaces_move_vms_over_the_configured_network() {
    let Some(tb) = testbed_or_skip("agents_in_two_namespaces_move_vms_over_the_configured_network", 2) else {
        return;
    };
    let net = "[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n";
    let a_addr = std::net::SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = std::net::SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let a = Agent::start_in(Some(tb.netns(Side::Src)), "a", KEY, net, a_addr);
    let b = Agent::start_in(Some(tb.netns(Side::Dst)), "b", KEY, net, b_addr);
    let kvm = ferry_test_support::kvm_or_skip("agents_in_two_namespaces (KVM guest)");
    let mut names = Vec::new();
    for i in 0..4 {
        let n = format!("ns{i}");
        a.json(&["vm", "create", "--name", &n, "--memory", "32MiB", "--guest", "synthetic"]);
        names.push(n);
    }
    if kvm {
        a.json(&["vm", "create", "--name", "nskvm", "--memory", "64MiB", "--guest", "kvm", "--working-set", "8MiB"]);
        names.push("nskvm".into());
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
    assert!(on_b.iter().all(|v| v["state"] == "running" && v["guest_check"] == "ok" && v["epoch"] == 2), "{on_b:#?}");
    assert!(a.vms().is_empty());
    drop(a);
    drop(b);
    drop(tb);
}
