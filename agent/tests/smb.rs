//! `performance_option = "smb"`: two agents in two namespaces joined by two veth NICs
//! (`scripts/testbed.sh`); a move opens channels on both NICs (the interface exchange on
//! channel 0 pairs them under the migration networks) and moves bytes over each; a VM with a
//! disk moves the same way with `--include-storage` (shared-nothing). The same with host
//! certificates (`tls_dir`) instead of the key: every channel on both NICs authenticated by
//! the hosts' certificates, the destination requiring the source's name.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use ferry_test_support::testbed::{testbed_or_skip, Side, Testbed};

/// Bytes each destination NIC carried in migration `id` (from the engine's per-channel
/// statistics), after checking the plan has two paths and tcp channels.
fn bytes_per_nic(a: &Agent, id: &str) -> BTreeMap<String, u64> {
    let m = a.json(&["migration", id]);
    let st = &m["stats"];
    let planned = st["multichannel"]["channels"].as_array().unwrap_or_else(|| panic!("no channels: {m:#}"));
    let mut per_nic: BTreeMap<String, u64> = BTreeMap::new();
    for c in planned {
        assert_eq!(c["transport"], "tcp", "no RDMA device here: {c}");
        let i = c["index"].as_u64().unwrap() as usize;
        let remote: std::net::SocketAddr = c["remote"].as_str().unwrap().parse().unwrap();
        let bytes = st["channels"][i]["wire_bytes"].as_u64().unwrap_or_else(|| panic!("channel {i}: {st:#}"));
        *per_nic.entry(remote.ip().to_string()).or_default() += bytes;
    }
    assert_eq!(st["multichannel"]["paths"].as_array().unwrap().len(), 2, "{st:#}");
    per_nic
}

#[test]
fn an_smb_move_with_host_certificates_uses_both_nics() {
    let Some(tb) = testbed_or_skip("an_smb_move_with_host_certificates_uses_both_nics", 2) else {
        return;
    };
    let certs = Scratch::new("certs");
    let (a0, a1) = (Testbed::addr(Side::Src, 0).to_string(), Testbed::addr(Side::Src, 1).to_string());
    let (b0, b1) = (Testbed::addr(Side::Dst, 0).to_string(), Testbed::addr(Side::Dst, 1).to_string());
    tls_certs(&certs.0, &[&format!("a={a0},{a1}"), &format!("b={b0},{b1}")]);
    let cfg = "performance_option = \"smb\"\n[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n\
               [[networks]]\nsubnet = \"198.18.1.0/24\"\npriority = 2\n";
    let a_addr = std::net::SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = std::net::SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let tls = |n: &str| certs.0.join(n);
    let a = Agent::start_as(Some(tb.netns(Side::Src)), "a", Creds::TlsDir(&tls("a")), cfg, a_addr, Vec::new());
    let b = Agent::start_as(Some(tb.netns(Side::Dst)), "b", Creds::TlsDir(&tls("b")), cfg, b_addr, Vec::new());
    assert_eq!(a.json(&["host", "show"])["credentials"], "tls");
    a.json(&["vm", "create", "--name", "mc", "--memory", "64MiB", "--guest", "synthetic"]);
    let pf = a.json(&["preflight", "mc", "--to", &b_addr.to_string()]);
    assert_eq!(pf["compatible"], true, "{pf:#}");
    assert!(pf["credentials"].as_str().unwrap().starts_with("tls:"), "{pf:#}");
    let out = a.json(&["move", "mc", "--to", &b_addr.to_string(), "--wait", "--channels", "1"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    let per_nic = bytes_per_nic(&a, out["id"].as_str().unwrap());
    for nic in [&b0, &b1] {
        assert!(per_nic.get(nic).is_some_and(|b| *b > 1 << 20), "NIC {nic} carried too little: {per_nic:?}");
    }
    let on_b = b.json(&["vm", "show", "mc"]);
    assert_eq!((on_b["state"].as_str(), on_b["guest_check"].as_str()), (Some("running"), Some("ok")), "{on_b}");
    // b's VMM took the channels with host certificates, requiring a's name.
    let line = std::fs::read(format!("/proc/{}/cmdline", on_b["pid"].as_u64().unwrap()))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap();
    assert!(line.contains("--tls-dir") && line.contains("--expect-peer a"), "{line}");
    let _ = b.wait_all_final(1, Duration::from_secs(60));
}

#[test]
fn an_smb_move_uses_both_nics_and_reports_its_channels() {
    let Some(tb) = testbed_or_skip("an_smb_move_uses_both_nics_and_reports_its_channels", 2) else {
        return;
    };
    let cfg = "performance_option = \"smb\"\n[[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\n\
               [[networks]]\nsubnet = \"198.18.1.0/24\"\npriority = 2\n";
    let a_addr = std::net::SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = std::net::SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let a = Agent::start_in(Some(tb.netns(Side::Src)), "a", KEY, cfg, a_addr);
    let b = Agent::start_in(Some(tb.netns(Side::Dst)), "b", KEY, cfg, b_addr);
    assert_eq!(a.json(&["host", "show"])["performance_option"], "smb");
    a.json(&["vm", "create", "--name", "mc", "--memory", "64MiB", "--guest", "synthetic"]);
    let out = a.json(&["move", "mc", "--to", &b_addr.to_string(), "--wait", "--channels", "1"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    let m = a.json(&["migration", out["id"].as_str().unwrap()]);
    let st = &m["stats"];
    let per_nic = bytes_per_nic(&a, out["id"].as_str().unwrap());
    let want = [Testbed::addr(Side::Dst, 0).to_string(), Testbed::addr(Side::Dst, 1).to_string()];
    for nic in &want {
        assert!(per_nic.get(nic).is_some_and(|b| *b > 1 << 20), "NIC {nic} carried too little: {per_nic:?}\n{st:#}");
    }
    let on_b = b.json(&["vm", "show", "mc"]);
    assert_eq!((on_b["state"].as_str(), on_b["guest_check"].as_str()), (Some("running"), Some("ok")), "{on_b}");
    let _ = b.wait_all_final(1, Duration::from_secs(60));

    // Shared-nothing over smb: the disk blocks ride the same channels on both NICs.
    a.json(&[
        "vm",
        "create",
        "--name",
        "mcd",
        "--memory",
        "32MiB",
        "--guest",
        "synthetic",
        "--disk",
        &format!("root:{}", (4 << 20) + 999),
        "--disk-working-set",
        "2MiB",
        "--disk-write-rate",
        "16MiB",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let out = a.json(&["move", "mcd", "--to", &b_addr.to_string(), "--wait", "--channels", "1", "--include-storage"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!((out["kind"].as_str(), out["verified"].as_bool()), (Some("shared-nothing"), Some(true)), "{out}");
    assert!(out["disks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["verified"] == true && d["data_blocks"].as_u64() > Some(0)));
    let m = a.json(&["migration", out["id"].as_str().unwrap()]);
    assert_eq!(m["stats"]["multichannel"]["paths"].as_array().unwrap().len(), 2, "{m:#}");
    let on_b = b.json(&["vm", "show", "mcd"]);
    assert_eq!(on_b["disks"].as_array().unwrap().len(), 1, "{on_b}");
    drop(a);
    drop(b);
    drop(tb);
}

/// With frames not encrypted (`integrity`), a destination checks every channel of a
/// multichannel session, not only the address the source reached: B trusts only the first
/// network (and lists only it, so it admits the move with `integrity`), A pairs both NICs, and
/// the channel arriving on the second network is refused in its handshake with the reason. The
/// source drops that path (`stats.multichannel.unusable` says why) and the move runs on the
/// trusted NIC only; once B trusts the second network too, a move uses both NICs.
#[test]
fn an_unencrypted_smb_channel_on_a_network_the_destination_does_not_trust_is_refused() {
    let Some(tb) =
        testbed_or_skip("an_unencrypted_smb_channel_on_a_network_the_destination_does_not_trust_is_refused", 2)
    else {
        return;
    };
    let a_cfg = "performance_option = \"smb\"\nencryption = \"integrity\"\n\
                 [[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\ntrusted = true\n\
                 [[networks]]\nsubnet = \"198.18.1.0/24\"\npriority = 2\ntrusted = true\n";
    let b_cfg = "performance_option = \"smb\"\nencryption = \"integrity\"\n\
                 [[networks]]\nsubnet = \"198.18.0.0/24\"\npriority = 1\ntrusted = true\n";
    let a_addr = std::net::SocketAddr::new(Testbed::addr(Side::Src, 0).into(), 7700);
    let b_addr = std::net::SocketAddr::new(Testbed::addr(Side::Dst, 0).into(), 7700);
    let a = Agent::start_in(Some(tb.netns(Side::Src)), "a", KEY, a_cfg, a_addr);
    let b = Agent::start_in(Some(tb.netns(Side::Dst)), "b", KEY, b_cfg, b_addr);
    // Remote NIC address of each channel the engine ran, with its bytes.
    let used = |m: &serde_json::Value| -> BTreeMap<String, u64> {
        let st = &m["stats"];
        let mut per_nic = BTreeMap::new();
        for c in st["multichannel"]["channels"].as_array().unwrap_or_else(|| panic!("no channels: {m:#}")) {
            let i = c["index"].as_u64().unwrap() as usize;
            let remote: std::net::SocketAddr = c["remote"].as_str().unwrap().parse().unwrap();
            *per_nic.entry(remote.ip().to_string()).or_default() += st["channels"][i]["wire_bytes"].as_u64().unwrap();
        }
        per_nic
    };
    let (first, second) = (Testbed::addr(Side::Dst, 0).to_string(), Testbed::addr(Side::Dst, 1).to_string());
    for vm in ["mc", "mc2"] {
        a.json(&["vm", "create", "--name", vm, "--memory", "64MiB", "--guest", "synthetic"]);
    }
    let out = a.json(&["move", "mc", "--to", &b_addr.to_string(), "--wait", "--channels", "1"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    let m = a.json(&["migration", out["id"].as_str().unwrap()]);
    assert_eq!(m["encryption"], "integrity", "{m:#}");
    let unusable = m["stats"]["multichannel"]["unusable"].to_string();
    assert!(
        unusable.contains("not on a network the destination trusts") && unusable.contains("198.18.1."),
        "the refused path and its reason: {:#}\n{}",
        m["stats"]["multichannel"],
        b.logs()
    );
    let per_nic = used(&m);
    assert_eq!(per_nic.keys().cloned().collect::<Vec<_>>(), vec![first.clone()], "only the trusted NIC: {m:#}");
    assert_eq!(b.json(&["vm", "show", "mc"])["state"], "running");
    // B trusts the second network too: a move uses both NICs, with integrity.
    b.json(&["network", "add", "198.18.1.0/24", "--priority", "2", "--trusted"]);
    let out = a.json(&["move", "mc2", "--to", &b_addr.to_string(), "--wait", "--channels", "1"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    let m = a.json(&["migration", out["id"].as_str().unwrap()]);
    assert_eq!(m["encryption"], "integrity", "{m:#}");
    assert_eq!(m["stats"]["multichannel"]["unusable"].as_array().map(Vec::len), Some(0), "{m:#}");
    let per_nic = used(&m);
    for nic in [&first, &second] {
        assert!(per_nic.get(nic).is_some_and(|b| *b > 1 << 20), "NIC {nic} carried too little: {per_nic:?}");
    }
    drop(a);
    drop(b);
    drop(tb);
}
