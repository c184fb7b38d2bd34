//! Live migrations authenticated with host certificates (mutual TLS) instead of a key, over real
//! loopback sockets: tcp, tcp with four channels, zstd and quic move a busy guest byte-identical;
//! a source or destination whose certificate comes from another CA, an expired certificate, a
//! destination with the wrong name, and a source with a key against a destination with
//! certificates (and the reverse) are each refused with the reason, the source's guest keeps
//! running with its memory intact, and the same listener then completes a legitimate migration;
//! a channel presenting another host's certificate cannot join a session; a destination that
//! expects the source's name refuses a host of the same CA with another name, over tcp and
//! quic; a certificate the CA's revocation list (`crl.pem`) names is refused both ways over
//! tcp and quic, naming revocation; credentials read again after the list changes refuse a
//! host they accepted before.

use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::server::{connect_one, connect_simple, Path, RunningServer};
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::TargetConfig;
use ferry_migrate::vm::SourceVm;
use ferry_test_support::certs::Certs;
use ferry_test_support::guest::{guest, into_synthetic, same_memory};
use ferry_test_support::server;
use ferry_transport::endpoint::Connector;
use ferry_transport::handshake::{random_bytes, Psk};
use ferry_transport::quic::QuicOptions;
use ferry_transport::tcp::TcpOptions;
use ferry_transport::Credentials;
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticFactory, SyntheticVm};

const SEED: u64 = 13;
const KEY: &[u8] = b"tls-test-key-that-is-not-used-0123456";

fn tcp_server(creds: impl Into<Credentials>, max: usize) -> RunningServer {
    let factory = Arc::new(SyntheticFactory::new(1 << 30, false));
    server::loopback(creds, TcpOptions::default(), factory, TargetConfig::default(), Some(max))
}

fn quic_server(creds: impl Into<Credentials>, max: usize) -> RunningServer {
    let factory = Arc::new(SyntheticFactory::new(1 << 30, false));
    server::quic_loopback(creds, factory, Some(max))
}

/// Migrate `vm` to `s` over `nch` channels of `opts` and check both images match.
fn migrate_ok(s: &RunningServer, vm: &mut SyntheticVm, opts: &dyn Connector, nch: usize, creds: &Credentials) {
    let what = format!("{} x{nch}", opts.transport());
    let chans = connect_simple(s.addr, nch, opts, creds).unwrap_or_else(|e| panic!("{what}: {e}"));
    let cfg = MigrationConfig { verify_full: true, ..Default::default() };
    let st = migrate(vm, chans, &cfg, &|_| {}).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(st.status, Status::Completed, "{what}");
    assert!(st.verified, "{what}: {st:?}");
    assert_eq!(st.channels.len(), nch, "{what}");
    assert!(st.channels.iter().all(|c| c.batches > 0), "{what}: {:?}", st.channels);
    let out = s.outcomes.recv().unwrap().unwrap();
    assert!(out.stats.verified, "{what}");
    let t = into_synthetic(out);
    same_memory(vm, &t);
    assert_eq!(check_stamps(&t.into_vm().unwrap()).unwrap(), 0, "{what}: moved stamps");
}

#[test]
fn busy_guests_move_with_certificates_over_tcp_zstd_and_quic() {
    let certs = Certs::new("moves");
    let src: Credentials = certs.host("src").expect_peer("dst").unwrap().into();
    let dst = certs.host("dst");
    let cases: Vec<(Box<dyn Connector>, usize, bool)> = vec![
        (Box::new(TcpOptions::default()), 1, false),
        (Box::new(TcpOptions::default()), 4, false),
        (Box::new(TcpOptions::zstd()), 2, false),
        (Box::new(QuicOptions::default()), 2, true),
    ];
    for (opts, nch, quic) in cases {
        let s = if quic { quic_server(&dst, 1) } else { tcp_server(&dst, 1) };
        let mut vm = guest("tls-busy", 48, 8, 64, SEED);
        std::thread::sleep(Duration::from_millis(30));
        migrate_ok(&s, &mut vm, &*opts, nch, &src);
        assert!(!vm.is_running(), "the source copy stays paused after commit");
        s.thread.join().unwrap();
    }
}

/// Each refused source: its credentials, and what the error must say over tcp and over quic
/// (quinn reports the destination's TLS alert in its own words).
fn refusals(certs: &Certs) -> Vec<(&'static str, Credentials, [&'static str; 2])> {
    vec![
        ("a source of another CA", certs.host("stranger").into(), ["UnknownCA", "UnknownIssuer"]),
        ("an expired source", certs.host("expired").into(), ["CertificateExpired", "certificate expired"]),
        (
            "a source expecting another name",
            certs.host("src").expect_peer("elsewhere").unwrap().into(),
            ["not valid for name", "not valid for name"],
        ),
        ("a source with a key", Psk::new(KEY).unwrap().into(), ["host certificates", "peer sent no certificates"]),
    ]
}

#[test]
fn bad_certificates_are_refused_both_ways_and_the_source_keeps_running() {
    let certs = Certs::new("refused");
    let good: Credentials = certs.host("src").expect_peer("dst").unwrap().into();
    for quic in [false, true] {
        let s = if quic { quic_server(certs.host("dst"), 1) } else { tcp_server(certs.host("dst"), 1) };
        let opts: Box<dyn Connector> =
            if quic { Box::new(QuicOptions::default()) } else { Box::new(TcpOptions::default()) };
        let mut vm = guest("tls-refused", 16, 4, 32, SEED);
        for (what, creds, says) in refusals(&certs) {
            let e = connect_simple(s.addr, 2, &*opts, &creds).unwrap_err().to_string();
            assert!(e.contains(says[usize::from(quic)]), "quic {quic}, {what}: {e}");
            assert!(vm.is_running(), "quic {quic}, {what}: the source stopped");
        }
        // The listener still serves a legitimate source; the guest's memory moved intact.
        migrate_ok(&s, &mut vm, &*opts, 2, &good);
        s.thread.join().unwrap();
    }
    // A destination whose certificate the source must refuse: another CA, expired, or a key.
    for (what, dst, says) in [
        ("a destination of another CA", Credentials::from(certs.host("rogue")), "UnknownIssuer"),
        ("an expired destination", certs.host("expired").into(), "certificate expired"),
        ("a destination with a key", Psk::new(KEY).unwrap().into(), "pre-shared key"),
    ] {
        let s = tcp_server(dst, 1);
        let vm = guest("tls-bad-dst", 8, 0, 0, SEED);
        let src: Credentials = if what == "an expired destination" { certs.host("src").into() } else { good.clone() };
        let e = connect_simple(s.addr, 1, &TcpOptions::default(), &src).unwrap_err().to_string();
        assert!(e.contains(says), "{what}: {e}");
        assert!(vm.is_running(), "{what}: the source stopped");
        s.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        s.thread.join().unwrap();
    }
}

#[test]
fn a_channel_with_another_hosts_certificate_cannot_join_a_session() {
    let certs = Certs::new("splice");
    let s = tcp_server(certs.host("dst"), 1);
    let (src, other) = (Credentials::from(certs.host("src")), Credentials::from(certs.host("dst")));
    let session = random_bytes();
    let to = Path::to(s.addr);
    let tcp = TcpOptions::default();
    let ch0 = connect_one(&to, &tcp, &src, session, 0).unwrap();
    // Another host of the same CA that learnt the session id is refused in the handshake.
    let e = connect_one(&to, &tcp, &other, session, 1).unwrap_err().to_string();
    assert!(e.contains("not the one channel 0"), "{e}");
    // The session goes on with the source's own channels.
    let ch1 = connect_one(&to, &tcp, &src, session, 1).unwrap();
    let mut vm = guest("tls-splice", 16, 4, 32, SEED);
    let st = migrate(&mut vm, vec![ch0, ch1], &MigrationConfig { verify_full: true, ..Default::default() }, &|_| {})
        .unwrap();
    assert!(st.verified);
    let t = into_synthetic(s.outcomes.recv().unwrap().unwrap());
    same_memory(&vm, &t);
    s.thread.join().unwrap();
}

#[test]
fn a_destination_expecting_the_source_refuses_another_host_of_the_ca_over_tcp_and_quic() {
    let certs = Certs::new("named-client");
    let dst = certs.host("dst").expect_client("src").unwrap();
    assert_eq!(dst.client_name().as_deref(), Some("src"));
    let good: Credentials = certs.host("src").expect_peer("dst").unwrap().into();
    // `revoked` (not revoked here) is a valid host of the same CA, named revoked/dst/127.0.0.1.
    let other: Credentials = certs.host("revoked").expect_peer("dst").unwrap().into();
    for quic in [false, true] {
        let s = if quic { quic_server(&dst, 1) } else { tcp_server(&dst, 1) };
        let opts: Box<dyn Connector> =
            if quic { Box::new(QuicOptions::default()) } else { Box::new(TcpOptions::default()) };
        let mut vm = guest("tls-named", 16, 4, 32, SEED);
        let e = connect_simple(s.addr, 2, &*opts, &other).unwrap_err().to_string();
        // quinn passes the destination's reason on; over tcp the source sees the TLS alert.
        let says = if quic { "certificate not valid for name \"src\"" } else { "BadCertificate" };
        assert!(e.contains(says), "quic {quic}: {e}");
        assert!(vm.is_running(), "quic {quic}: the source stopped");
        // The expected source still moves its guest through the same listener.
        migrate_ok(&s, &mut vm, &*opts, 2, &good);
        s.thread.join().unwrap();
    }
    // A name no certificate can hold is refused when asked for.
    assert!(certs.host("dst").expect_client("not a name!").is_err());
}

#[test]
fn a_revoked_certificate_is_refused_both_ways_naming_revocation() {
    let certs = Certs::new("revoked");
    certs.revoke_in(&["src", "dst"]);
    let good: Credentials = certs.host("src").expect_peer("dst").unwrap().into();
    let revoked: Credentials = certs.host("revoked").expect_peer("dst").unwrap().into();
    for quic in [false, true] {
        let opts: Box<dyn Connector> =
            if quic { Box::new(QuicOptions::default()) } else { Box::new(TcpOptions::default()) };
        let server = |c: ferry_transport::TlsCredentials| if quic { quic_server(c, 1) } else { tcp_server(c, 1) };
        // A destination holding the list refuses a revoked source; the source keeps running,
        // and a legitimate source still moves its guest.
        let s = server(certs.host("dst"));
        let mut vm = guest("tls-revoked", 16, 4, 32, SEED);
        let e = connect_simple(s.addr, 2, &*opts, &revoked).unwrap_err().to_string();
        let says = if quic { "invalid peer certificate: Revoked" } else { "CertificateRevoked" };
        assert!(e.contains(says), "quic {quic}: {e}");
        assert!(vm.is_running(), "quic {quic}: the source stopped");
        migrate_ok(&s, &mut vm, &*opts, 2, &good);
        s.thread.join().unwrap();
        // A source holding the list refuses a revoked destination (named `dst`, of the CA).
        let s = server(certs.host("revoked"));
        let vm = guest("tls-revoked-dst", 8, 0, 0, SEED);
        let e = connect_simple(s.addr, 1, &*opts, &good).unwrap_err().to_string();
        assert!(e.contains("Revoked"), "quic {quic}: {e}");
        assert!(vm.is_running(), "quic {quic}: the source stopped");
        s.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        s.thread.join().unwrap();
    }
    // A crl.pem that is no revocation list is refused when the credentials load.
    std::fs::write(certs.dir("dst").join("crl.pem"), "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
        .unwrap();
    let e = ferry_transport::TlsCredentials::from_dir(&certs.dir("dst")).unwrap_err().to_string();
    assert!(e.contains("crl.pem"), "{e}");
}

#[test]
fn credentials_read_again_after_a_new_revocation_list_refuse_a_host_they_accepted() {
    let certs = Certs::new("refresh");
    let dst = ferry_transport::TlsCredentials::from_dir(&certs.dir("dst")).unwrap();
    assert!(!dst.changed_on_disk());
    let revoked: Credentials = certs.host("revoked").expect_peer("dst").unwrap().into();
    let tcp = TcpOptions::default();
    // Before the list: `revoked` is a host of the CA like any other.
    let s = tcp_server(dst.clone(), 1);
    let mut vm = guest("tls-refresh", 16, 4, 32, SEED);
    migrate_ok(&s, &mut vm, &tcp, 1, &revoked);
    s.thread.join().unwrap();
    // The list appears in dst's directory: the loaded credentials see the change, and read
    // again they refuse it (as a running VMM does at its next migration).
    certs.revoke_in(&["dst"]);
    assert!(dst.changed_on_disk());
    let fresh = dst.refreshed().unwrap();
    assert!(!fresh.changed_on_disk());
    let s = tcp_server(fresh, 1);
    let vm = guest("tls-refresh-2", 8, 0, 0, SEED);
    let e = connect_simple(s.addr, 1, &tcp, &revoked).unwrap_err().to_string();
    assert!(e.contains("CertificateRevoked"), "{e}");
    assert!(vm.is_running(), "the source stopped");
    s.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    s.thread.join().unwrap();
    // A list that cannot be used: refreshing fails (the caller keeps what it had).
    std::fs::write(certs.dir("dst").join("crl.pem"), "not a list").unwrap();
    let e = dst.refreshed().unwrap_err().to_string();
    assert!(e.contains("crl.pem"), "{e}");
}
