//! The namespace testbed (scripts/testbed.sh through `ferry_perf::testbed`): two NICs, each
//! passing traffic; a link taken down and back; removal. Needs root and `ip netns`: otherwise the
//! tests print `SKIP: <reason>`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use ferry_perf::testbed::{check_permitted, unique_name, Side, Testbed};
use ferry_perf::units::Rate;

fn permitted(test: &str) -> bool {
    match check_permitted() {
        Ok(()) => true,
        Err(why) => {
            ferry_test_support::skip(test, &why);
            false
        }
    }
}

fn namespaces() -> String {
    let o = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Listen on the destination side of `nic`, connect from the source side (bound to the source
/// address of that NIC), exchange a few bytes. Err on any failure.
fn exchange(tb: &Testbed, nic: u32, timeout: Duration) -> Result<(), String> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let server = s.spawn(move || -> Result<(), String> {
            tb.enter_thread(Side::Dst).map_err(|e| e.to_string())?;
            let l = TcpListener::bind((Testbed::addr(Side::Dst, nic), 0)).map_err(|e| format!("bind: {e}"))?;
            tx.send(l.local_addr().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let t = std::time::Instant::now();
            let (mut c, peer) = loop {
                match l.accept() {
                    Ok(x) => break x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t.elapsed() < timeout => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            c.set_nonblocking(false).map_err(|e| e.to_string())?;
            if peer.ip() != Testbed::addr(Side::Src, nic) {
                return Err(format!("peer {peer} is not the source side of nic{nic}"));
            }
            let mut b = [0u8; 4];
            c.read_exact(&mut b).map_err(|e| e.to_string())?;
            c.write_all(&b).map_err(|e| e.to_string())
        });
        let client = (|| -> Result<(), String> {
            let addr = rx.recv().map_err(|_| "server did not start".to_string())?;
            tb.enter_thread(Side::Src).map_err(|e| e.to_string())?;
            let mut c = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect to {addr}: {e}"))?;
            c.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            c.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            c.read_exact(&mut b).map_err(|e| e.to_string())?;
            if &b != b"ping" {
                return Err("echo differs".into());
            }
            Ok(())
        })();
        let server = server.join().map_err(|_| "server thread panicked".to_string())?;
        client.and(server)
    })
}

#[test]
fn two_nic_testbed_passes_traffic_and_is_removed() {
    if !permitted("two_nic_testbed_passes_traffic_and_is_removed") {
        return;
    }
    let name = unique_name("fbt");
    let rates: Vec<Rate> = ["500mbit", "1gbit"].iter().map(|r| r.parse().unwrap()).collect();
    let mut tb = Testbed::up(&name, &rates).expect("testbed up");
    assert!(namespaces().contains(&format!("{name}-src")));
    for nic in 0..2 {
        exchange(&tb, nic, Duration::from_secs(5)).unwrap_or_else(|e| panic!("nic{nic}: {e}"));
    }
    // A link taken down passes nothing; the other one still does; back up, it passes again.
    tb.link_down(1).expect("link down");
    assert!(exchange(&tb, 1, Duration::from_millis(500)).is_err(), "nic1 passed traffic while down");
    exchange(&tb, 0, Duration::from_secs(5)).expect("nic0 with nic1 down");
    tb.link_up(1).expect("link up");
    exchange(&tb, 1, Duration::from_secs(5)).expect("nic1 back up");
    tb.set_rate(0, "100mbit".parse::<Rate>().unwrap()).expect("set rate");
    let q = Command::new("tc").args(["-n", &tb.netns(Side::Src), "qdisc", "show", "dev", "nic0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&q.stdout).contains("rate 100Mbit"), "{}", String::from_utf8_lossy(&q.stdout));
    assert!(tb.set_rate(2, "1gbit".parse::<Rate>().unwrap()).is_err(), "nic2 does not exist");
    tb.down().expect("down");
    assert!(!namespaces().contains(&name), "namespaces left: {}", namespaces());
}

#[test]
fn dropped_testbed_is_removed_and_down_is_idempotent() {
    if !permitted("dropped_testbed_is_removed_and_down_is_idempotent") {
        return;
    }
    let name = unique_name("fbt");
    {
        let _tb = Testbed::up(&name, &["1gbit".parse::<Rate>().unwrap()]).expect("testbed up");
        assert!(namespaces().contains(&name));
    }
    assert!(!namespaces().contains(&name), "drop left namespaces");
    ferry_perf::testbed::run_script(&["down", "--name", &name]).expect("down again is fine");
    // Bad arguments are refused before anything is made.
    assert!(ferry_perf::testbed::run_script(&["up", "--name", &name, "--nics", "2", "--rate", "1gbit,slow"]).is_err());
    assert!(ferry_perf::testbed::run_script(&["up", "--name", "Bad Name", "--rate", "1gbit"]).is_err());
    assert!(!namespaces().contains(&name));
}

#[test]
fn stream_over_a_rate_limited_link() {
    if !permitted("stream_over_a_rate_limited_link") {
        return;
    }
    let o = Command::new(env!("CARGO_BIN_EXE_migration-bench"))
        .args(["stream", "--size", "16MiB", "--link-rate", "1gbit", "--json", "--reference-seconds", "1"])
        .output()
        .expect("run migration-bench");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["testbed"], "netns", "{v}");
        assert_eq!(v["link_rate_bits_per_s"].as_u64(), Some(1_000_000_000), "{v}");
        assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");
    }
    let left = namespaces();
    assert!(!left.lines().any(|l| l.starts_with("fb") && !l.starts_with("fbt")), "namespaces left: {left}");
}
