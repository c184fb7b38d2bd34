//! Hostile clients and a man in the middle against real processes: a destination
//! (`migration-bench live-dst`, the engine's `MigrationServer` with its default limits) and a
//! source (`live-src`, a synthetic idle guest), each in its own network namespace of a testbed
//! this test creates (198.18.0.0/15), the attackers on the source's side.
//!
//! Attacks on the listener (a slow sender, a flood of idle connections, a wrong key, a replayed
//! captured handshake) run while a legitimate migration arrives: it completes and verifies, and
//! the attacker is refused. A man in the middle ([`ferry_test_support::mitm`]) flips a byte,
//! drops a frame, injects a frame or replays a frame in each phase (pre-copy, switchover,
//! commit): the migration must abort with the source's guest running and its memory intact.
//!
//! The migrations run one at a time (a lock), each with a deadline generous for a loaded
//! 2-core machine; nothing here measures time.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_perf::live::{self, DstMemory, LiveChildArgs, LiveDstReport, LiveSrcReport, Place, Workload};
use ferry_test_support::flood::IdleFlood;
use ferry_test_support::mitm::{Attack, Mitm, Phase};
use ferry_test_support::testbed::{testbed_or_skip, Side, Testbed};
use ferry_transport::handshake::Psk;
use ferry_transport::option::TransportOption;
use ferry_transport::tcp::TcpOptions;
use ferry_transport::wire::{encode_frame, FrameHeader, FrameKind, HEADER_LEN};
use ferry_vmm_glue::pagemix::Mix;

const EXE: &str = env!("CARGO_BIN_EXE_migration-bench");
/// Longest a migration (or an attacker's wait) may take before it counts as a hang.
const PATIENCE: Duration = Duration::from_secs(180);

/// One testbed migration at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn args() -> LiveChildArgs {
    LiveChildArgs {
        size: 64 << 20,
        mix: Mix::default(),
        image: None,
        seed: 7,
        workload: Workload::Idle,
        working_set: 4 << 20, // unused: the guest is idle
        dirty_rate: 1 << 20,
        option: "tcp".parse::<TransportOption>().unwrap(),
        encryption: Default::default(),
        tls_dir: None,
        channels: 1,
        downtime_ms: 300,
        verify_full: false,
        dst_memory: DstMemory::Cold,
        zstd_level: 1,
        batch_pages: 256,
        multichannel: false,
        scheduling: "adaptive".into(),
        policy: None,
        disks: Default::default(),
    }
}

/// Run `f` on a thread inside the source's namespace (threads it spawns stay there).
fn in_src<T: Send + 'static>(tb: &Testbed, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = tb.netns(Side::Src);
    std::thread::spawn(move || {
        ferry_test_support::testbed::enter_netns(&ns).expect("entering the source's namespace");
        f()
    })
    .join()
    .expect("a thread in the source's namespace")
}

/// A migration between the two namespaces; `interpose` gets the destination's address first.
fn migrate(
    tb: &Testbed,
    label: &str,
    interpose: &mut dyn FnMut(SocketAddr) -> ferry_perf::Result<SocketAddr>,
) -> (LiveSrcReport, LiveDstReport) {
    live::run_with(Path::new(EXE), &args(), PATIENCE, label, Place::Testbed(tb, &[]), interpose)
        .unwrap_or_else(|e| panic!("{label}: the migration's processes failed: {e}"))
}

fn assert_completed(label: &str, s: &LiveSrcReport, d: &LiveDstReport) {
    assert!(s.error.is_none() && d.ok, "{label}: the legitimate migration failed: {:?} / {:?}", s.error, d.error);
    assert!(s.migration.verified && d.verified, "{label}: not verified");
}

fn testbed(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Testbed)> {
    let g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    testbed_or_skip(test, 1).map(|tb| (g, tb))
}

/// Whether the peer closed `s` (end of stream or reset), reading within [`PATIENCE`].
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

#[test]
fn a_slow_sender_is_cut_and_a_migration_completes() {
    let Some((_g, tb)) = testbed("a_slow_sender_is_cut_and_a_migration_completes") else { return };
    let hello = encode_frame(FrameKind::ClientHello, &[1u8; 58]);
    let mut dribbler = None;
    let (s, d) = migrate(&tb, "slow sender", &mut |to| {
        let hello = hello.clone();
        dribbler = Some(in_src(&tb, move || {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(to).expect("the slow sender connects");
                let mut sent = 0;
                for b in &hello {
                    if c.write_all(std::slice::from_ref(b)).is_err() {
                        break;
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_secs(2));
                }
                (sent, closed_by_peer(&mut c))
            })
        }));
        Ok(to)
    });
    assert_completed("slow sender", &s, &d);
    let (sent, closed) = dribbler.unwrap().join().unwrap();
    assert!(sent < hello.len(), "one byte every 2 s got a whole hello through ({sent} bytes)");
    assert!(closed, "the listener did not close the slow sender");
    tb.down().unwrap();
}

#[test]
fn a_flood_of_idle_connections_is_refused_and_a_migration_completes() {
    let Some((_g, tb)) = testbed("a_flood_of_idle_connections_is_refused_and_a_migration_completes") else {
        return;
    };
    // The attacker's own addresses on the source's network (the legitimate source keeps
    // 198.18.0.1): 32 of them, so the flood reaches the listener's total limit, not only its
    // per-address one.
    let ns = tb.netns(Side::Src);
    let sources: Vec<IpAddr> = (10..42u8).map(|i| IpAddr::V4([198, 18, 0, i].into())).collect();
    for ip in &sources {
        let st = std::process::Command::new("ip")
            .args(["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "nic0"])
            .status()
            .expect("ip");
        assert!(st.success(), "adding {ip} to the source's namespace");
    }
    let mut flood = None;
    let (s, d) = migrate(&tb, "idle flood", &mut |to| {
        let sources = sources.clone();
        let f = in_src(&tb, move || IdleFlood::start(to, 500, sources, Duration::from_secs(1)));
        // The legitimate source connects once the flood holds its 500 connections.
        assert!(f.wait_opened(500, PATIENCE), "the flood could not open its connections");
        flood = Some(f);
        Ok(to)
    });
    let f = flood.unwrap().stop();
    assert_completed("idle flood", &s, &d);
    assert!(f.opened >= 500, "the flood did not get its connections in: {f:?}");
    assert!(f.closed_by_listener > 0, "the listener kept 500 idle connections open: {f:?}");
    tb.down().unwrap();
}

#[test]
fn a_wrong_key_is_refused_and_a_migration_completes() {
    let Some((_g, tb)) = testbed("a_wrong_key_is_refused_and_a_migration_completes") else { return };
    let mut refused = None;
    let (s, d) = migrate(&tb, "wrong key", &mut |to| {
        refused = Some(in_src(&tb, move || {
            let wrong = Psk::new(b"not-the-key-0123456789abcdefghijklmn".to_vec()).unwrap();
            ferry_migrate::server::connect_simple(to, 1, &TcpOptions::default(), &wrong).map(drop)
        }));
        Ok(to)
    });
    assert_completed("wrong key", &s, &d);
    let e = refused.unwrap().expect_err("a wrong key must be refused");
    assert!(e.to_string().contains("authentication failed"), "unclear error: {e}");
    tb.down().unwrap();
}

/// Read frames from `s` until it closes; the kinds seen.
fn kinds_until_closed(s: &mut TcpStream) -> Vec<FrameKind> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut kinds = Vec::new();
    let mut h = [0u8; HEADER_LEN];
    while s.read_exact(&mut h).is_ok() {
        let Ok(fh) = FrameHeader::decode(&h) else { break };
        kinds.push(fh.kind);
        let mut p = vec![0u8; fh.len as usize];
        if s.read_exact(&mut p).is_err() {
            break;
        }
    }
    kinds
}

/// The legitimate source's handshake, recorded on the way by a relay, sent again on a new
/// connection: the listener's fresh challenge makes the recorded proof worthless, it never
/// accepts, and the legitimate migration completes.
#[test]
fn a_replayed_handshake_is_refused_and_a_migration_completes() {
    let Some((_g, tb)) = testbed("a_replayed_handshake_is_refused_and_a_migration_completes") else { return };
    let src_ip = IpAddr::V4(Testbed::addr(Side::Src, 0));
    let mut relay = None;
    let (s, d) = migrate(&tb, "replayed handshake", &mut |to| {
        let m = in_src(&tb, move || Mitm::start(src_ip, to, Phase::Commit, Attack::Record)).expect("relay");
        let at = m.addr();
        relay = Some((m, to));
        Ok(at)
    });
    assert_completed("replayed handshake (through the recording relay)", &s, &d);
    let (m, to) = relay.unwrap();
    let captured = m.recorded();
    assert!(captured.len() >= 2, "the relay recorded no handshake: {} frames", captured.len());
    // The destination served its one migration (at `to`) and is gone: replay against the next
    // migration's listener, as an attacker would.
    let _ = to;
    let mut replay = None;
    let (s, d) = migrate(&tb, "during the replay", &mut |to| {
        let (hello, proof) = (captured[0].clone(), captured[1].clone());
        replay = Some(in_src(&tb, move || {
            let mut c = TcpStream::connect(to).expect("the replayer connects");
            c.write_all(&hello).unwrap();
            let mut h = [0u8; HEADER_LEN];
            c.read_exact(&mut h).expect("a challenge");
            let fh = FrameHeader::decode(&h).unwrap();
            let mut p = vec![0u8; fh.len as usize];
            c.read_exact(&mut p).unwrap();
            let _ = c.write_all(&proof);
            (fh.kind, kinds_until_closed(&mut c))
        }));
        Ok(to)
    });
    assert_completed("during the replay", &s, &d);
    let (first, after) = replay.unwrap();
    assert_eq!(first, FrameKind::ServerChallenge);
    assert!(!after.contains(&FrameKind::Accept), "a replayed handshake was accepted: {after:?}");
    tb.down().unwrap();
}

/// One man-in-the-middle case: the relay strikes once; the migration aborts, the source's
/// guest runs again with its memory intact, and the destination discarded its copy.
fn mitm_case(phase: Phase, attack: Attack) {
    let (name, struck, s, d) = mitm_run(phase, attack);
    let Some(struck) = struck else { return };
    assert!(s.error.is_some(), "{name}: {struck}: the migration completed anyway (undetected)");
    assert!(!d.ok, "{name}: {struck}: the destination committed");
    assert!(s.source_running, "{name}: {struck}: the source's guest is not running ({:?})", s.error);
    assert_eq!(s.source_intact, Some(true), "{name}: {struck}: the source's memory changed");
}

/// A migration through a relay that strikes once; `None` for `struck` when the test skips.
fn mitm_run(phase: Phase, attack: Attack) -> (String, Option<String>, LiveSrcReport, LiveDstReport) {
    let name = format!("mitm_{phase:?}_{attack:?}");
    let Some((_g, tb)) = testbed(&name) else {
        return (name, None, LiveSrcReport::default(), LiveDstReport::default());
    };
    let src_ip = IpAddr::V4(Testbed::addr(Side::Src, 0));
    let relay: Arc<Mutex<Option<Mitm>>> = Arc::default();
    let r2 = relay.clone();
    let (s, d) = migrate(&tb, &name, &mut |to| {
        let m = in_src(&tb, move || Mitm::start(src_ip, to, phase, attack)).expect("relay");
        let at = m.addr();
        *r2.lock().unwrap() = Some(m);
        Ok(at)
    });
    let struck = relay.lock().unwrap().as_ref().and_then(Mitm::struck);
    drop(relay);
    tb.down().unwrap();
    let struck = struck.unwrap_or_else(|| panic!("{name}: the relay never struck"));
    (name, Some(struck), s, d)
}

/// A frame injected or replayed right behind the genuine `Commit`: the destination already owns
/// the VM when the forgery arrives (ownership passed with the authentic `Commit`), so aborting
/// then would make two running copies. The forgery fails its tag and is recorded; the migration
/// stands, with the VM running at the destination only.
fn mitm_after_commit_case(attack: Attack) {
    let (name, struck, s, d) = mitm_run(Phase::Commit, attack);
    let Some(struck) = struck else { return };
    assert!(
        d.ok && s.error.is_none(),
        "{name}: {struck}: the genuine Commit did not stand: {:?} / {:?}",
        s.error,
        d.error
    );
    assert!(s.migration.verified && d.verified, "{name}: not verified");
    assert!(!s.source_running, "{name}: {struck}: the source's guest runs too");
    assert!(
        d.events.iter().any(|e| e.contains("after Commit") && e.contains("authentic")),
        "{name}: {struck}: the forged frame went unnoticed: {:?}",
        d.events
    );
}

macro_rules! mitm {
    ($($(#[$m:meta])* $t:ident: $p:ident $a:ident;)*) => {
        $(
            #[test]
            $(#[$m])*
            fn $t() {
                mitm_case(Phase::$p, Attack::$a);
            }
        )*
    };
}

// Every frame is sealed (AES-256-GCM with a per-direction frame count as the nonce): a flipped,
// injected, replayed or dropped frame fails the tag of the frame the receiver opens next. A
// dropped `Commit` has no next frame: the destination gives up waiting for it (its commit
// timeout, 10 s, under the source's 30 s wait for `Resumed`) and aborts, which the source
// trusts (sealed), and resumes.
mitm! {
    mitm_flips_a_byte_in_pre_copy: PreCopy Flip;
    mitm_drops_a_frame_in_pre_copy: PreCopy Drop;
    mitm_injects_a_frame_in_pre_copy: PreCopy Inject;
    mitm_replays_a_frame_in_pre_copy: PreCopy Replay;
    mitm_flips_a_byte_at_switchover: Switchover Flip;
    mitm_drops_a_frame_at_switchover: Switchover Drop;
    mitm_injects_a_frame_at_switchover: Switchover Inject;
    mitm_replays_a_frame_at_switchover: Switchover Replay;
    mitm_flips_a_byte_at_commit: Commit Flip;
    mitm_drops_a_frame_at_commit: Commit Drop;
}

#[test]
fn mitm_injects_a_frame_at_commit() {
    mitm_after_commit_case(Attack::Inject);
}

#[test]
fn mitm_replays_a_frame_at_commit() {
    mitm_after_commit_case(Attack::Replay);
}
