//! Host certificates through the agents (issue 13): `tls_dir` instead of `key_file`. Two agents
//! with certificates from one CA move a VM verified (a synthetic guest, and a KVM guest where
//! /dev/kvm is usable) (peer API over mutual TLS, the VMMs'
//! migration channels on the same certificates); an agent with a certificate from another CA, or
//! one that does not name the host it is called by, is refused at preflight and at the move with
//! a reason naming the certificate, and nothing changes on either host; a config with both or
//! neither of `key_file`/`tls_dir`, or a tls_dir that is missing or unusable, is refused at start
//! naming the key. The called agent checks its caller too: a host of the same CA whose
//! certificate does not name the host it claims to be is refused (`certificate_refused` with
//! the name). `ferry tls-certs --revoke` while both agents run: the next preflight and move to
//! the revoked host (and from it) are refused as revoked and nothing changes; a renewed
//! certificate for that host is picked up without a restart and the move then completes. A
//! caller revoked after opening its connection is refused at its next request on that same
//! connection. A quick move runs with certificates too, and a revoked host cannot quick-move back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn create(a: &Agent, name: &str) {
    a.json(&["vm", "create", "--name", name, "--memory", "32MiB", "--guest", "synthetic", "--working-set", "4MiB"]);
}

/// The command line of process `pid`, as one string.
fn cmdline(pid: u64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap()
}

/// The VM's VMM runs with `--tls-dir DIR` (and no key file).
fn vmm_uses(a: &Agent, vm: &str, dir: &Path) {
    let v = a.json(&["vm", "show", vm]);
    let line = cmdline(v["pid"].as_u64().unwrap());
    assert!(line.contains(&format!("--tls-dir {}", dir.display())), "{line}");
    assert!(!line.contains("--key-file"), "{line}");
}

/// `ferry preflight VM --to TO` on `a` that finds the move not compatible (exit 2): the report.
fn not_compatible(a: &Agent, vm: &str, to: &Agent) -> Value {
    let o = a.ferry(&["--json", "preflight", vm, "--to", &to.listen.to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let pf: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(pf["compatible"], false, "{pf:#}");
    pf
}

/// `vm` still runs on `a`, owned, at epoch 1, and `other` saw nothing of it.
fn nothing_changed(a: &Agent, other: &Agent, vm: &str) {
    let v = a.json(&["vm", "show", vm]);
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(v["epoch"], 1, "{v:#}");
    assert!(other.vms().is_empty(), "{:?}", other.vms());
    assert!(other.migrations().is_empty(), "{:?}", other.migrations());
}

#[test]
fn two_agents_with_certificates_from_one_ca_move_a_vm_verified() {
    let certs = Scratch::new("certs");
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1"]);
    let a = Agent::start_tls("a", &certs.0.join("a"), "");
    let b = Agent::start_tls("b", &certs.0.join("b"), "");
    let h = a.json(&["host", "show"]);
    assert_eq!(h["credentials"], "tls", "{h:#}");
    assert_eq!(h["credentials_source"], format!("host certificates in {}", certs.0.join("a").display()), "{h:#}");
    create(&a, "web");
    vmm_uses(&a, "web", &certs.0.join("a"));

    let to = b.listen.to_string();
    let pf = a.json(&["preflight", "web", "--to", &to]);
    assert_eq!(pf["compatible"], true, "{pf:#}");
    assert_eq!(pf["destination"]["name"], "b", "{pf:#}");
    let c = pf["credentials"].as_str().unwrap();
    assert!(c.starts_with("tls: host certificates in") && c.contains("name 127.0.0.1"), "{pf:#}");

    let out = a.json(&["move", "web", "--to", &to, "--wait"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    let v = b.json(&["vm", "show", "web"]);
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(v["guest_check"], "ok", "{v:#}");
    vmm_uses(&b, "web", &certs.0.join("b"));
    assert!(a.vms().iter().all(|v| v["name"] != "web" || v["owned"] == false), "{:?}", a.vms());
    // And back, the other way round.
    let out = b.json(&["move", "web", "--to", &a.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["verified"], true, "{out}");
    assert_eq!(a.json(&["vm", "show", "web"])["epoch"], 3);
}

#[test]
fn a_kvm_guest_moves_between_agents_with_certificates() {
    if !ferry_test_support::kvm_or_skip("a_kvm_guest_moves_between_agents_with_certificates") {
        return;
    }
    let certs = Scratch::new("certs");
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1"]);
    let a = Agent::start_tls("a", &certs.0.join("a"), "");
    let b = Agent::start_tls("b", &certs.0.join("b"), "");
    move_kvm_guest(&a, &b, "k1");
    vmm_uses(&b, "k1", &certs.0.join("b"));
}

#[test]
fn a_host_of_another_ca_or_misnamed_is_refused_at_preflight_and_move_and_nothing_changes() {
    let ours = Scratch::new("certs");
    tls_certs(&ours.0, &["a=127.0.0.1", "misnamed=misnamed.example"]);
    let theirs = Scratch::new("certs-other");
    tls_certs(&theirs.0, &["c=127.0.0.1"]);
    let a = Agent::start_tls("a", &ours.0.join("a"), "");
    let c = Agent::start_tls("c", &theirs.0.join("c"), "");
    let m = Agent::start_tls("misnamed", &ours.0.join("misnamed"), "");
    create(&a, "db");

    let refused = |to: &Agent, want: &str| {
        let pf = not_compatible(&a, "db", to);
        let inc = &pf["incompatibilities"][0];
        assert_eq!(inc["code"], "certificate_refused", "{pf:#}");
        assert!(inc["message"].as_str().unwrap().contains(want), "{pf:#}");
        assert!(pf["destination"].is_null(), "{pf:#}");
        let o = a.ferry(&["--json", "move", "db", "--to", &to.listen.to_string(), "--wait"]);
        assert_eq!(o.status.code(), Some(1));
        let out: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(out["error"].as_str().unwrap().contains(want), "{out}");
        nothing_changed(&a, to, "db");
    };
    // Another CA: a does not accept c's certificate.
    refused(&c, "not from the same CA");
    // One CA, but the certificate names another host than the one called.
    refused(&m, "does not name the host");
    // The other way: c calling a is refused by c's own check, and a refuses c's certificate
    // in the handshake (logged with the reason).
    create(&c, "theirs");
    let pf = not_compatible(&c, "theirs", &a);
    assert_eq!(pf["incompatibilities"][0]["code"], "certificate_refused", "{pf:#}");
    let mut logged = false;
    for _ in 0..100 {
        logged = a.logs().contains("refused a peer connection");
        if logged {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(logged, "{}", a.logs());
    // A peer with the key instead of certificates cannot talk to a TLS agent either.
    let k = Agent::start("k", KEY, "");
    create(&k, "old");
    let pf = not_compatible(&k, "old", &a);
    assert_eq!(pf["incompatibilities"][0]["code"], "unreachable", "{pf:#}");
    assert_eq!(a.vms().len(), 1);
    assert_eq!(a.json(&["vm", "show", "db"])["state"], "running");
}

#[test]
fn a_config_with_both_neither_or_an_unusable_tls_dir_is_refused_at_start_naming_the_key() {
    let certs = Scratch::new("certs");
    tls_certs(&certs.0, &["a=127.0.0.1"]);
    let good = certs.0.join("a");
    let both = format!("key_file = \"/etc/ferry/key\"\ntls_dir = \"{}\"\n", good.display());
    let err = refused_config(Creds::Lines(&both), "");
    assert!(err.contains("key_file: and tls_dir are both given"), "{err}");
    let err = refused_config(Creds::Lines(""), "");
    assert!(err.contains("key_file: missing: give key_file") && err.contains("or tls_dir"), "{err}");
    let err = refused_config(Creds::TlsDir(&certs.0.join("nowhere")), "");
    assert!(err.contains("tls_dir:") && err.contains("nowhere is not a readable directory"), "{err}");
    // The private key readable by others.
    std::fs::set_permissions(good.join("key.pem"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = refused_config(Creds::TlsDir(&good), "");
    assert!(err.contains("tls_dir:") && err.contains("key.pem has mode 0644"), "{err}");
    std::fs::set_permissions(good.join("key.pem"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A file missing.
    std::fs::remove_file(good.join("ca.pem")).unwrap();
    let err = refused_config(Creds::TlsDir(&good), "");
    assert!(err.contains("tls_dir:") && err.contains("ca.pem"), "{err}");
    // Another host's key.
    std::fs::copy(certs.0.join("ca.pem"), good.join("ca.pem")).unwrap();
    tls_certs(&certs.0.join("again"), &["x"]);
    std::fs::copy(certs.0.join("again/x/key.pem"), good.join("key.pem")).unwrap();
    let err = refused_config(Creds::TlsDir(&good), "");
    assert!(err.contains("tls_dir:") && err.contains("is not the key of"), "{err}");
}

/// `ferry tls-certs --out OUT ARGS...`: stdout and stderr, expecting success.
fn tls_certs_cli(out: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new(FERRY).arg("tls-certs").arg("--out").arg(out).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "ferry tls-certs {args:?}: {text}");
    text
}

/// Preflight and move from `a` to `to` are refused with `certificate_refused` naming `want`
/// in the preflight and in the move's error; nothing changed on either host.
fn refused_with(a: &Agent, vm: &str, to: &Agent, want: &str) {
    let pf = not_compatible(a, vm, to);
    let inc = &pf["incompatibilities"][0];
    assert_eq!(inc["code"], "certificate_refused", "{pf:#}");
    assert!(inc["message"].as_str().unwrap().contains(want), "{pf:#}");
    let o = a.ferry(&["--json", "move", vm, "--to", &to.listen.to_string(), "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(out["error"].as_str().unwrap().contains(want), "{out}");
    nothing_changed(a, to, vm);
}

#[test]
fn the_called_agent_refuses_a_caller_whose_certificate_names_another_host() {
    let certs = Scratch::new("certs");
    // One CA; `mallory`'s certificate names mallory and the same address as a's.
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1", "mallory=127.0.0.1"]);
    // An agent that calls itself `a` but holds mallory's certificate.
    let m = Agent::start_tls("a", &certs.0.join("mallory"), "");
    let b = Agent::start_tls("b", &certs.0.join("b"), "");
    create(&m, "db");
    // Its own check of b passes (b's certificate names the address it calls); b refuses it.
    refused_with(&m, "db", &b, "does not name host \"a\"");
    let pf = not_compatible(&m, "db", &b);
    let msg = pf["incompatibilities"][0]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("it names mallory, 127.0.0.1"), "{msg}");
    assert!(b.logs().contains("refused a peer request"), "{}", b.logs());
    // The real a, with its own certificate, moves the same kind of VM to b.
    let a = Agent::start_tls("a", &certs.0.join("a"), "");
    create(&a, "web");
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    // b's VMM received with the source's name required on its channels.
    let v = b.json(&["vm", "show", "web"]);
    let line = cmdline(v["pid"].as_u64().unwrap());
    assert!(line.contains("--expect-peer a"), "{line}");
}

#[test]
fn a_host_revoked_while_agents_run_is_refused_both_ways_and_a_renewed_certificate_is_picked_up() {
    let certs = Scratch::new("certs");
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1"]);
    let a = Agent::start_tls("a", &certs.0.join("a"), "");
    let b = Agent::start_tls("b", &certs.0.join("b"), "");
    create(&a, "web");
    let pf = a.json(&["preflight", "web", "--to", &b.listen.to_string()]);
    assert_eq!(pf["compatible"], true, "{pf:#}");

    // Revoke b while both run: the list lands in every host directory (a's and b's tls_dir).
    let said = tls_certs_cli(&certs.0, &["--revoke", "b"]);
    assert!(said.contains("lists 1 certificate") && said.contains("number 1"), "{said}");
    for h in ["a", "b"] {
        assert!(certs.0.join(h).join("crl.pem").is_file(), "{said}");
    }
    // a's next preflight and move to b: refused as revoked, by a's own check of b.
    refused_with(&a, "web", &b, "revoked");
    assert!(a.logs().contains("host certificates read again"), "{}", a.logs());
    // b calling a: a refuses b's certificate in the handshake.
    create(&b, "theirs");
    let pf = not_compatible(&b, "theirs", &a);
    assert_eq!(pf["incompatibilities"][0]["code"], "certificate_refused", "{pf:#}");
    assert!(pf["incompatibilities"][0]["message"].as_str().unwrap().contains("Revoked"), "{pf:#}");
    assert_eq!(a.vms().len(), 1, "{:?}", a.vms());
    assert_eq!(b.vms().len(), 1, "{:?}", b.vms());
    // Revoking again keeps the list's entries; the same host is not listed twice.
    let said = tls_certs_cli(&certs.0, &["--revoke", "b"]);
    assert!(said.contains("listed already") && said.contains("lists 1 certificate"), "{said}");

    // A new certificate for b from the same CA (renewal): both agents pick it up at their next
    // connection, no restart; the move completes.
    let said = tls_certs_cli(&certs.0, &["b=127.0.0.1"]);
    assert!(said.contains("using the CA in"), "{said}");
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    assert_eq!(b.json(&["vm", "show", "web"])["state"], "running");
}

#[test]
fn tls_certs_revoke_refuses_bad_input_cleanly() {
    let certs = Scratch::new("certs");
    let run = |args: &[&str]| {
        let o =
            std::process::Command::new(FERRY).arg("tls-certs").arg("--out").arg(&certs.0).args(args).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    // No CA there yet.
    let (code, err) = run(&["--revoke", "b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds no CA"), "{err}");
    tls_certs(&certs.0, &["a=127.0.0.1"]);
    // A host that has no certificate there.
    let (code, err) = run(&["--revoke", "nobody"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nobody/cert.pem"), "{err}");
    assert!(!certs.0.join("crl.pem").exists());
    // A CA key that is not the CA's.
    let other = Scratch::new("other");
    tls_certs(&other.0, &["x"]);
    std::fs::copy(other.0.join("ca-key.pem"), certs.0.join("ca-key.pem")).unwrap();
    let (code, err) = run(&["--revoke", "a"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not the key of ca.pem"), "{err}");
    assert!(!certs.0.join("crl.pem").exists());
}

/// A GET on an open HTTP/1.1 connection (kept alive): the status and the body.
fn get_on(conn: &mut (impl std::io::Read + std::io::Write), path: &str) -> (u16, String) {
    write!(conn, "GET {path} HTTP/1.1\r\nhost: ferry\r\n\r\n").unwrap();
    conn.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).unwrap(),
            1,
            "connection closed in the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("a content-length");
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// A caller that keeps its peer connection open across a revocation: its next request on that
/// same connection is refused (`certificate_refused`, revoked), not served on the strength of the
/// handshake it made before.
#[test]
fn a_request_on_a_connection_opened_before_the_callers_revocation_is_refused() {
    use tokio_rustls::rustls;
    let certs = Scratch::new("certs");
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1"]);
    let b = Agent::start_tls("b", &certs.0.join("b"), "");
    // a's side of a peer connection, made by hand to keep it open.
    let creds = ferry_transport::tls::TlsCredentials::from_dir(&certs.0.join("a")).unwrap();
    let tls = rustls::ClientConnection::new(creds.client(), creds.server_name()).unwrap();
    let tcp = std::net::TcpStream::connect(b.listen).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut conn = rustls::StreamOwned::new(tls, tcp);
    // Accepted: the request is served (no such VM).
    let (status, body) = get_on(&mut conn, "/peer/v1/vms/none");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");

    tls_certs_cli(&certs.0, &["--revoke", "a"]);
    // The same connection, the same request: refused now, with the reason.
    let (status, body) = get_on(&mut conn, "/peer/v1/vms/none");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("certificate_refused") && body.contains("Revoked"), "{body}");
    assert!(b.logs().contains("the caller's certificate is not accepted now"), "{}", b.logs());
}

/// A quick move between agents with host certificates: the peer API's admission and hand-over
/// run over mutual TLS, the destination's VMM loads the image with the host's certificates, and
/// the VM runs on b verified. Once b is revoked, its quick move back is refused by a with the
/// reason, and the VM keeps running on b with nothing left in the shared directory.
#[test]
fn a_quick_move_with_certificates_completes_and_a_revoked_host_cannot_quick_move_back() {
    let certs = Scratch::new("certs");
    let shared = Scratch::new("shared");
    tls_certs(&certs.0, &["a=127.0.0.1", "b=127.0.0.1"]);
    let extra = format!("shared_storage = \"{}\"\n", shared.0.display());
    let a = Agent::start_tls("a", &certs.0.join("a"), &extra);
    let b = Agent::start_tls("b", &certs.0.join("b"), &extra);
    create(&a, "web");
    let out = a.json(&["move", "web", "--to", &b.listen.to_string(), "--quick", "--wait"]);
    assert_eq!(out["status"], "completed", "{out}\n{}\n{}", a.logs(), b.logs());
    assert_eq!(out["verified"], true, "{out}");
    let on_b = b.json(&["vm", "show", "web"]);
    assert_eq!((on_b["state"].as_str(), on_b["epoch"].as_u64()), (Some("running"), Some(2)), "{on_b}");
    assert_eq!(on_b["arrived_verified"], true, "{on_b}");
    assert_eq!(on_b["guest_check"], "ok", "{on_b}");
    assert!(a.vms().is_empty(), "{:?}", a.vms());
    assert_eq!(a.migrations()[0]["kind"], "quick");
    vmm_uses(&b, "web", &certs.0.join("b"));
    let left = || std::fs::read_dir(&shared.0).unwrap().count();
    assert_eq!(left(), 0, "the shared directory is empty after the move");

    tls_certs_cli(&certs.0, &["--revoke", "b"]);
    let o = b.ferry(&["--json", "move", "web", "--to", &a.listen.to_string(), "--quick", "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(out["error"].as_str().unwrap().contains("Revoked"), "{out}");
    let on_b = b.json(&["vm", "show", "web"]);
    assert_eq!((on_b["state"].as_str(), on_b["epoch"].as_u64()), (Some("running"), Some(2)), "{on_b}");
    assert!(a.vms().is_empty(), "{:?}", a.vms());
    assert_eq!(left(), 0, "nothing written to the shared directory by a refused move");
}
