//! `migration-bench live` end to end on loopback: two processes, the real engine, JSON output.
//! Asserts correctness and the shape of the output, never a speed.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migration-bench")).args(args).output().expect("run migration-bench")
}

#[test]
fn live_json_is_verified_for_every_workload_and_option() {
    let o = bench(&[
        "live",
        "--size",
        "32MiB",
        "--working-set",
        "8MiB",
        "--dirty-rate",
        "16MiB",
        "--options",
        "tcp,zstd,zstd-always,tcp:3",
        "--json",
        "--reference-seconds",
        "1",
    ]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    let runs: Vec<(String, String, u64)> = lines
        .iter()
        .map(|v| {
            (
                v["workload"].as_str().unwrap_or("").into(),
                v["option"].as_str().unwrap_or("").into(),
                v["channels"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = ["idle", "busy"]
        .iter()
        .flat_map(|w| {
            [("tcp", 1), ("zstd", 1), ("zstd-always", 1), ("tcp", 3)].map(|(o, n)| (w.to_string(), o.to_string(), n))
        })
        .collect();
    assert_eq!(runs, want, "{text}");
    for v in &lines {
        assert_eq!(v["bench"], "live");
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["guest_bytes"].as_u64(), Some(32 << 20));
        assert_eq!(v["reference"], "iperf3");
        for k in ["total_ms", "downtime_ms", "transferred_bytes", "throughput_bps", "reference_bps"] {
            assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} not positive: {v}");
        }
        assert!(v["rounds"].as_u64().is_some_and(|r| r >= 2), "{v}");
        assert!(v["zero_pages"].as_u64().is_some_and(|z| z > 0), "{v}");
        assert!(v["peak_rss_bytes"]["src"].as_u64().is_some_and(|x| x > 0), "{v}");
        assert!(v["peak_rss_bytes"]["dst"].as_u64().is_some_and(|x| x > 0), "{v}");
        let ch = v["channels"].as_u64().unwrap_or(0) as usize;
        assert_eq!(v["per_channel"].as_array().map(Vec::len), Some(ch), "{v}");
        // The default destination memory is the reserve, and the guest came from it.
        assert_eq!(v["dst_memory"], "reserve", "{v}");
        assert_eq!(v["dst_reserve_hit"], true, "{v}");
    }
}

/// A small idle migration over tcp, twice, with the given destination memory and extra flags.
fn twice(dst_memory: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "live",
        "--size",
        "16MiB",
        "--working-set",
        "4MiB",
        "--workload",
        "idle",
        "--options",
        "tcp",
        "--repeat",
        "2",
        "--no-reference",
        "--dst-memory",
        dst_memory,
    ];
    args.extend_from_slice(extra);
    let o = bench(&args);
    assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf-8")
}

#[test]
fn repeat_and_destination_memory_modes() {
    let text = twice("cold", &["--json"]);
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(lines.iter().map(|v| v["run"].as_u64()).collect::<Vec<_>>(), vec![Some(0), Some(1)], "{text}");
    for v in &lines {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["dst_memory"], "cold", "{v}");
        assert_eq!(v["dst_reserve_hit"], Value::Null, "{v}");
        assert_eq!(v["reference"], "none", "{v}");
    }
    // The table form prints the medians of the repetitions.
    let text = twice("prefault", &[]);
    assert!(text.contains("medians over the repetitions"), "{text}");
    assert!(text.contains("prefault"), "{text}");
}

#[test]
fn bad_live_input_is_a_clear_error() {
    for args in [
        &["live", "--options", "tcp:0"][..],
        &["live", "--options", "carrier-pigeon"],
        &["live", "--size", "12345"],
        &["live", "--link-event", "1s:nic1:down"],
        &["live", "--testbed", "nics=2"],
        &["live", "--repeat", "0"],
        &["live", "--dst-memory", "lukewarm"],
        &["live", "--batch-pages", "2048"],
    ] {
        let o = bench(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains("error"), "{args:?}: {err}");
    }
}

#[test]
fn adaptive_zstd_compresses_where_the_link_is_the_bottleneck() {
    if let Err(why) = ferry_perf::testbed::check_permitted() {
        println!("SKIP: adaptive_zstd_compresses_where_the_link_is_the_bottleneck: {why}");
        return;
    }
    // One 200 Mbit link: the link, not the sender, is the bottleneck, so the adaptive zstd
    // option must compress most batches (wire bytes well under tcp's for the same guest).
    let o = bench(&[
        "live",
        "--size",
        "64MiB",
        "--working-set",
        "4MiB",
        "--workload",
        "idle",
        "--options",
        "tcp,zstd",
        "--testbed",
        "nics=1,rate=200mbit",
        "--json",
        "--no-reference",
    ]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines.iter().all(|v| v["verified"] == true), "{text}");
    let wire = |i: usize| lines[i]["transferred_bytes"].as_f64().expect("transferred_bytes");
    assert!(wire(1) < 0.8 * wire(0), "zstd moved {} bytes, tcp {}: adaptive zstd did not compress", wire(1), wire(0));
}
