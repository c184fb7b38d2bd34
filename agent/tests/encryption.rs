//! Frame protection through the agents (issue 13): `aead` by default; `integrity` and `off` only
//! where the operator marks the network trusted on both hosts, refused with `untrusted_network`
//! before anything moves where it is not; the protection reported in the move's output, both
//! journals, the engine's statistics, preflight and the metrics; a config asking for `off`
//! without a trusted network refused at start; a source forcing a mode its destination did not
//! agree to refused in the channel handshake, naming both modes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TRUSTED: &str = "[[networks]]\nsubnet = \"127.0.0.0/8\"\ntrusted = true\n";
const UNTRUSTED: &str = "[[networks]]\nsubnet = \"127.0.0.0/8\"\n";

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn create(a: &Agent, name: &str) {
    a.json(&["vm", "create", "--name", name, "--memory", "32MiB", "--guest", "synthetic"]);
}

/// The journal entry of `id` on `a`.
fn migration(a: &Agent, id: &str) -> Value {
    a.json(&["migration", id])
}

/// The only migration `a` journaled with `vm`, newest first.
fn latest(a: &Agent, vm: &str) -> Value {
    a.migrations().into_iter().find(|m| m["vm"] == vm).unwrap_or_else(|| panic!("no migration of {vm}"))
}

/// A completed move with the protection `want`, reported alike everywhere.
fn moved_with(a: &Agent, b: &Agent, out: &Value, want: &str) {
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    assert_eq!(out["encryption"], want, "move --wait --json: {out}");
    let id = out["id"].as_str().unwrap();
    let src = migration(a, id);
    assert_eq!(src["encryption"], want, "source journal: {src:#}");
    assert_eq!(src["stats"]["encryption"], want, "the engine's own statistics: {src:#}");
    let listed = a.migrations().into_iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(listed["encryption"], want, "migrations --json: {listed:#}");
    let dst = b.wait_all_final(1, Duration::from_secs(60)).into_iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(dst["encryption"], want, "destination journal: {dst:#}");
}

#[test]
fn aead_by_default_and_off_or_integrity_only_over_a_network_trusted_on_both_sides() {
    let a = Agent::start("a", KEY, TRUSTED);
    let b = Agent::start("b", KEY, TRUSTED);
    assert_eq!(a.json(&["host", "show"])["encryption"], "aead");
    assert_eq!(a.json(&["network", "list"])[0]["trusted"], true);
    create(&a, "web");
    // Trusted or not, a move that asks for nothing is encrypted.
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--wait"]);
    moved_with(&a, &b, &out, "aead");
    // Preflight says what a move asking for off would use, and why.
    let pf = b.json(&["preflight", "web", "--to", &a.listen.to_string(), "--encryption", "off"]);
    assert_eq!(pf["compatible"], true, "{pf:#}");
    assert_eq!(pf["encryption"], "off", "{pf:#}");
    assert!(pf["encryption_reason"].as_str().unwrap().contains("127.0.0.0/8 trusted"), "{pf:#}");
    // Trusted on both sides: off as asked, and the VM moves.
    let out = b.json(&["move", "web", "--to", &a.listen.to_string(), "--wait", "--encryption", "off"]);
    moved_with(&b, &a, &out, "off");
    assert_eq!(a.json(&["vm", "show", "web"])["guest_check"], "ok");
    // The host's setting, changed at run time, applies to the next move.
    let h = a.json(&["host", "set", "--encryption", "integrity"]);
    assert_eq!(h["encryption"], "integrity", "{h:#}");
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["encryption"], "integrity", "{out}");
    assert_eq!(out["status"], "completed", "{out}");
    // The metrics count moves by protection.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ep = ferry_agent::client::Endpoint::Unix(a.api.clone());
    let (st, body) =
        rt.block_on(ferry_agent::client::request(&ep, "GET", "/metrics", None, &[], Duration::from_secs(10))).unwrap();
    assert_eq!(st, 200);
    let m = String::from_utf8(body).unwrap();
    for (dir, mode) in [("outgoing", "aead"), ("incoming", "off"), ("outgoing", "integrity")] {
        let want = format!(
            "ferry_migrations_by_encryption_total{{direction=\"{dir}\",status=\"completed\",encryption=\"{mode}\"}} 1"
        );
        assert!(m.contains(&want), "{want} missing:\n{m}");
    }
}

#[test]
fn off_over_an_untrusted_network_is_refused_before_anything_moves() {
    // Untrusted here: refused at once, nothing journaled, nothing asked of the destination.
    let a = Agent::start("a", KEY, UNTRUSTED);
    let b = Agent::start("b", KEY, TRUSTED);
    create(&a, "db");
    let to = b.listen.to_string();
    let o = a.ferry(&["move", "db", "--to", &to, "--encryption", "off"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("untrusted_network") && e.contains("asks for encryption off"), "{e}");
    assert!(a.migrations().is_empty() && b.migrations().is_empty());
    let pf = a.ferry(&["--json", "preflight", "db", "--to", &to, "--encryption", "integrity"]);
    assert_eq!(pf.status.code(), Some(2));
    let pf: Value = serde_json::from_slice(&pf.stdout).unwrap();
    assert!(pf["incompatibilities"].to_string().contains("untrusted_network"), "{pf:#}");
    // Without asking, the same move is encrypted.
    assert_eq!(a.json(&["preflight", "db", "--to", &to])["encryption"], "aead");

    // Trusted here but not at the destination: the destination refuses it at admission.
    let a = Agent::start("a2", KEY, TRUSTED);
    let b = Agent::start("b2", KEY, UNTRUSTED);
    let to = b.listen.to_string();
    create(&a, "db");
    let pf = a.ferry(&["--json", "preflight", "db", "--to", &to, "--encryption", "off"]);
    assert_eq!(pf.status.code(), Some(2));
    let pf: Value = serde_json::from_slice(&pf.stdout).unwrap();
    let dst = pf["destination"]["incompatibilities"].to_string();
    assert!(dst.contains("untrusted_network") && dst.contains("only aead is accepted"), "{pf:#}");
    let o = a.ferry(&["--json", "move", "db", "--to", &to, "--encryption", "off", "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["status"], "failed", "{out}");
    assert!(out["error"].as_str().unwrap().contains("untrusted_network"), "{out}");
    let v = a.json(&["vm", "show", "db"]);
    assert_eq!((v["state"].as_str(), v["epoch"].as_u64()), (Some("running"), Some(1)), "{v}");
    assert!(b.vms().is_empty() && b.migrations().is_empty(), "the refusing host kept something");
    // The host's setting (not the move's request) falls back to aead where B does not trust.
    a.json(&["host", "set", "--encryption", "off"]);
    let out = a.json(&["move", "db", "--to", &to, "--wait"]);
    moved_with(&a, &b, &out, "aead");
    assert!(latest(&a, "db")["status"] == "completed");
}

#[test]
fn integrity_or_off_without_a_trusted_network_is_refused_at_start_and_at_run_time() {
    for (extra, want) in [
        ("encryption = \"off\"\n", "encryption: is off but no migration network is marked trusted"),
        (
            "encryption = \"integrity\"\n[[networks]]\nsubnet = \"198.18.0.0/24\"\n",
            "encryption: is integrity but no migration network is marked trusted",
        ),
        ("encryption = \"none\"\n", "encryption: unknown encryption mode \"none\""),
    ] {
        let err = refused_config(Creds::Key(KEY), extra);
        assert!(err.contains(want), "{extra}: {err}");
    }
    // At run time the same rule holds, and a refused change changes nothing.
    let a = Agent::start("a", KEY, UNTRUSTED);
    let o = a.ferry(&["host", "set", "--encryption", "off"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no migration network is marked trusted"), "{}", stderr(&o));
    assert_eq!(a.json(&["host", "show"])["encryption"], "aead");
    a.json(&["network", "add", "198.18.0.0/24", "--priority", "1", "--trusted"]);
    assert_eq!(a.json(&["host", "set", "--encryption", "off"])["encryption"], "off");
    // The last trusted network cannot go while the setting needs it.
    let o = a.ferry(&["network", "remove", "198.18.0.0/24"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("encryption: is off"), "{}", stderr(&o));
    let nets = a.json(&["network", "list"]);
    assert_eq!(nets.as_array().unwrap().len(), 2, "{nets}");
}

#[test]
fn a_source_forcing_a_mode_the_destination_did_not_agree_to_is_refused_in_the_handshake() {
    let b = Agent::start("b", KEY, TRUSTED);
    let psk = ferry_transport::handshake::Psk::from_file(&b.dir.0.join("key")).unwrap();
    // Admitted as an aead move (the peer request is signed with the key, as an agent's is)...
    let req = serde_json::json!({
        "id": "forced-1", "vm": "forced", "guest": "synthetic", "memory_bytes": 32u64 << 20,
        "epoch": 1, "source": "rogue", "encryption": "aead",
    });
    let body = req.to_string().into_bytes();
    let path = "/peer/v1/incoming";
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let auth = ferry_agent::peer::sign(psk.bytes(), ms, "POST", path, &body);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ep = ferry_agent::client::Endpoint::Tcp(b.listen.to_string());
    let (status, out) = rt
        .block_on(ferry_agent::client::request(
            &ep,
            "POST",
            path,
            Some(body),
            &[(ferry_agent::peer::AUTH_HEADER, auth)],
            Duration::from_secs(60),
        ))
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
    let acc: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(acc["encryption"], "aead", "{acc}");
    let addr: std::net::SocketAddr = acc["migration_addr"].as_str().unwrap().parse().unwrap();
    // ...then its channel asks for off: the destination's server refuses it, naming both.
    for mode in [ferry_transport::Encryption::Off, ferry_transport::Encryption::Integrity] {
        let opts =
            ferry_transport::tcp::TcpOptions { encryption: Some(mode), ..ferry_transport::tcp::TcpOptions::default() };
        let e = match ferry_migrate::server::connect_simple(addr, 1, &opts, &psk) {
            Ok(_) => panic!("a channel asking for {mode} was accepted by a destination that agreed to aead"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("encryption mode mismatch") && e.contains(mode.as_str()) && e.contains("aead"), "{e}");
    }
    // No session ever started: the destination gives up (its VMM waits 30 s) and keeps nothing.
    let t0 = Instant::now();
    let m = loop {
        let m = b.migrations();
        if m.first().is_some_and(|m| m["status"] == "failed") {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "{m:#?}\n{}", b.logs());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(m[0]["encryption"], "aead", "{m:#?}");
    assert!(b.vms().iter().all(|v| v["name"] != "forced"), "{:#?}", b.vms());
    // An honest move still completes afterwards.
    let a = Agent::start("a", KEY, TRUSTED);
    create(&a, "honest");
    let out = a.json(&["move", "honest", "--to", &b.listen.to_string(), "--wait", "--encryption", "integrity"]);
    assert_eq!((out["status"].as_str(), out["encryption"].as_str()), (Some("completed"), Some("integrity")), "{out}");
}
