//! `migration-bench stream` end to end on loopback: two processes, real sockets, the iperf3
//! reference, JSON output. Asserts correctness and the shape of the output, never a speed.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migration-bench")).args(args).output().expect("run migration-bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn stream_json_on_loopback_is_verified_and_complete() {
    const SIZE: u64 = 64 << 20;
    let o = bench(&["stream", "--size", "64MiB", "--json", "--reference-seconds", "1"]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    let options: Vec<&str> = lines.iter().filter_map(|v| v["option"].as_str()).collect();
    assert_eq!(options, ["tcp", "zstd"], "{text}");
    for v in &lines {
        let num = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number: {v}"));
        assert_eq!(v["bench"], "stream");
        assert_eq!(v["reference"], "iperf3");
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["bytes"].as_u64(), Some(SIZE), "{v}");
        assert_eq!(v["mix"], "zero=40,text=30,random=30");
        assert_eq!(v["testbed"], "loopback");
        assert_eq!(v["encryption"], "aead", "{v}");
        for k in ["wire_bytes", "seconds", "throughput_bytes_per_s", "reference_bytes_per_s", "ratio"] {
            assert!(num(k) > 0.0, "{k} not positive: {v}");
        }
        for k in ["src_cpu_s", "dst_cpu_s"] {
            assert!(num(k) >= 0.0, "{k} negative: {v}");
        }
        let ratio = num("throughput_bytes_per_s") / num("reference_bytes_per_s");
        assert!((ratio - num("ratio")).abs() < 1e-9 * ratio.max(1.0), "{v}");
        assert!((num("throughput_bytes_per_s") * num("seconds") - SIZE as f64).abs() < 1.0, "{v}");
        // Zero pages are never sent as data: with 40 % zero pages the wire carries less.
        assert!(num("wire_bytes") < SIZE as f64, "{v}");
        assert_eq!(v["data_pages"].as_u64().unwrap() + v["zero_pages"].as_u64().unwrap(), SIZE / 4096);
    }
    let zstd = &lines[1];
    assert!(zstd["compressed_batches"].as_u64().unwrap() > 0, "{zstd}");
    assert!(zstd["wire_bytes"].as_u64() < lines[0]["wire_bytes"].as_u64(), "zstd sent more than tcp");
}

#[test]
fn each_encryption_mode_streams_and_verifies() {
    let o = bench(&[
        "stream",
        "--size",
        "8MiB",
        "--option",
        "tcp,zstd",
        "--encryption",
        "integrity,off,aead",
        "--no-reference",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    let got: Vec<(&str, &str)> =
        lines.iter().map(|v| (v["option"].as_str().unwrap_or(""), v["encryption"].as_str().unwrap_or(""))).collect();
    assert_eq!(
        got,
        [
            ("tcp", "integrity"),
            ("tcp", "off"),
            ("tcp", "aead"),
            ("zstd", "integrity"),
            ("zstd", "off"),
            ("zstd", "aead")
        ],
        "{text}"
    );
    assert!(lines.iter().all(|v| v["verified"] == true), "{text}");
    // A sealed batch carries a tag per part: more wire bytes than the same batches unsealed.
    let wire = |i: usize| lines[i]["wire_bytes"].as_u64().unwrap_or(0);
    assert!(wire(0) > wire(1) && wire(2) > wire(1), "{text}");
    let o = bench(&["stream", "--size", "8MiB", "--option", "tcp", "--encryption", "aead,off", "--no-reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("what protection costs"));
}

#[test]
fn table_output_and_random_pages() {
    let o = bench(&["stream", "--size", "8MiB", "--mix", "random=100", "--option", "tcp", "--no-reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("verified") && text.contains("tcp") && text.contains("yes"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let cases: &[(&[&str], &str)] = &[
        (&["stream", "--size", "12345"], "multiple of the 4 KiB page size"),
        (&["stream", "--size", "0"], "zero"),
        (&["stream", "--size", "lots"], "does not start with a number"),
        (&["stream", "--size", "100TiB"], "larger than"),
        (&["stream", "--mix", "zero=50,text=10"], "add up to 60"),
        (&["stream", "--mix", "ones=100"], "unknown page kind"),
        (&["stream", "--link-rate", "fast"], "rate"),
        (&["stream", "--link-rate", "1gb"], "gbit"),
        (&["stream", "--option", "carrier-pigeon"], "carrier-pigeon"),
        (&["stream", "--zstd-level", "99"], "99"),
        (&["stream", "--batch-pages", "5000"], "5000"),
        (&["stream", "--encryption", "rot13"], "rot13"),
        (&["stream", "--option", "quic", "--encryption", "integrity"], "always encrypted"),
    ];
    for (args, want) in cases {
        let o = bench(args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    // A child started by hand, without the driver's key, says so.
    let o = bench(&[
        "stream-dst",
        "--listen",
        "127.0.0.1:0",
        "--size",
        "4096",
        "--mix",
        "random=100",
        "--seed",
        "1",
        "--option",
        "tcp",
        "--zstd-level",
        "1",
        "--batch-pages",
        "1",
        "--window",
        "1",
        "--session",
        "00",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("FERRY_BENCH_PSK"), "{}", stderr(&o));
}

/// `--tls-dir`: both processes authenticate with host certificates (mutual TLS) over tcp, zstd
/// and quic, and verify every page; with a `crl.pem` that revokes the directory's own
/// certificate the destination refuses the source (so the children really use the
/// certificates), and a directory whose key others may read is refused before anything runs.
#[test]
fn host_certificates_authenticate_the_stream() {
    let certs = ferry_test_support::certs::Certs::new("stream-bench");
    let run = |dir: &std::path::Path, extra: &[&str]| {
        let base = ["stream", "--size", "8MiB", "--reference-seconds", "1", "--tls-dir"];
        bench(&[&base[..], &[dir.to_str().unwrap()], extra].concat())
    };
    let dir = certs.dir("dst");
    let o = run(&dir, &["--option", "tcp,zstd,quic", "--json"]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    let options: Vec<&str> = lines.iter().filter_map(|v| v["option"].as_str()).collect();
    assert_eq!(options, ["tcp", "zstd", "quic"], "{text}");
    for v in &lines {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["bytes"].as_u64(), Some(8 << 20), "{v}");
    }
    certs.revoke_in(&["revoked"]);
    let o = run(&certs.dir("revoked"), &["--option", "tcp"]);
    assert!(!o.status.success(), "a revoked certificate streamed");
    assert!(stderr(&o).contains("Revoked") && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&dir, &["--option", "tcp"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("key.pem") && stderr(&o).contains("0644"), "{}", stderr(&o));
}
