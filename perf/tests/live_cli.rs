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
        // Encrypted by default, and the channels said so.
        assert_eq!(v["encryption"], "aead", "{v}");
        assert_eq!(v["migration"]["encryption"], "aead", "{v}");
        assert_eq!(v["guest_bytes"].as_u64(), Some(32 << 20));
        assert_eq!(v["reference"], "iperf3");
        // iperf3 wrote in Ferry's batches (256 pages by default).
        assert!(v["reference_args"].as_str().is_some_and(|a| a.contains("-l 1048576")), "{v}");
        let m = &v["migration"];
        for k in ["total_ms", "downtime_ms", "transferred_bytes", "throughput_bytes_per_s"] {
            assert!(m[k].as_f64().is_some_and(|x| x > 0.0), "{k} not positive: {v}");
        }
        assert!(v["reference_bytes_per_s"].as_f64().is_some_and(|x| x > 0.0), "reference not positive: {v}");
        assert!(m["rounds"].as_u64().is_some_and(|r| r >= 2), "{v}");
        assert!(m["zero_pages"].as_u64().is_some_and(|z| z > 0), "{v}");
        assert!(v["peak_rss_bytes"]["src"].as_u64().is_some_and(|x| x > 0), "{v}");
        assert!(v["peak_rss_bytes"]["dst"].as_u64().is_some_and(|x| x > 0), "{v}");
        let ch = v["channels"].as_u64().unwrap_or(0) as usize;
        assert_eq!(m["channels"].as_array().map(Vec::len), Some(ch), "{v}");
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

/// `--encryption` runs each mode in turn, the channels negotiate the mode asked for (the
/// engine's own `encryption`), and the table adds what each mode costs against `off`.
#[test]
fn each_encryption_mode_is_run_and_reported() {
    let o = bench(&[
        "live",
        "--size",
        "16MiB",
        "--workload",
        "idle",
        "--working-set",
        "4MiB",
        "--options",
        "tcp,tcp:2",
        "--encryption",
        "aead,integrity,off",
        "--repeat",
        "2",
        "--no-reference",
        "--json",
    ]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    let got: Vec<(u64, String, u64, String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["run"].as_u64().unwrap_or(9),
                v["option"].as_str().unwrap_or("").into(),
                v["channels"].as_u64().unwrap_or(0),
                v["encryption"].as_str().unwrap_or("").into(),
                v["migration"]["encryption"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want: Vec<(u64, String, u64, String, String)> = (0..2)
        .flat_map(|run| {
            [1, 2].into_iter().flat_map(move |ch| {
                ["aead", "integrity", "off"].map(|e| (run, "tcp".to_string(), ch, e.to_string(), e.to_string()))
            })
        })
        .collect();
    assert_eq!(got, want, "{text}");
    assert!(lines.iter().all(|v| v["verified"] == true), "{text}");
    let table = twice("reserve", &["--encryption", "aead,off"]);
    assert!(table.contains("what protection costs"), "{table}");
    assert!(table.lines().any(|l| l.contains("aead") && l.contains('x')), "{table}");
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
        &["live", "--encryption", "rot13"],
        &["live", "--options", "quic", "--encryption", "off"],
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
        ferry_test_support::skip("adaptive_zstd_compresses_where_the_link_is_the_bottleneck", &why);
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
    let wire = |i: usize| lines[i]["migration"]["transferred_bytes"].as_f64().expect("transferred_bytes");
    assert!(wire(1) < 0.8 * wire(0), "zstd moved {} bytes, tcp {}: adaptive zstd did not compress", wire(1), wire(0));
}

/// A raw memory image through the CLI: the guest is the file (its length rounded up to whole
/// pages), migrated over one and two channels and verified, page by page, against the file.
#[test]
fn live_migrates_a_raw_image_and_the_destination_holds_the_file() {
    let dir = std::env::temp_dir().join(format!("ferry-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("guest.raw");
    // 3 MiB and 100 bytes: zero stretches, text, random bytes, and a tail short of a page.
    let len = (3 << 20) + 100;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let img: Vec<u8> = (0..len)
        .map(|i| match (i / 4096) % 4 {
            0 => 0,
            1 => b"ferry migrates memory images "[i % 29],
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect();
    std::fs::write(&path, &img).expect("writing the image");
    let nonzero_pages = img.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
    let path_s = path.to_str().expect("utf-8 path");
    let o = bench(&[
        "live",
        "--image",
        path_s,
        "--workload",
        "idle",
        "--options",
        "tcp,zstd:2",
        "--working-set",
        "1MiB",
        "--no-reference",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "exit {:?}: {stderr}", o.status);
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    for v in &lines {
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["image_matches"], true, "{v}");
        assert_eq!(v["guest_bytes"].as_u64(), Some((3 << 20) + 4096), "{v}");
        assert_eq!(v["nonzero_guest_bytes"].as_u64(), Some(nonzero_pages * 4096), "{v}");
        assert!(v["image"].as_str().is_some_and(|p| p.ends_with("guest.raw")), "{v}");
    }
    // Bad images are usage errors, not panics.
    let empty = dir.join("empty.raw");
    std::fs::write(&empty, b"").expect("writing an empty image");
    let missing = dir.join("missing.raw");
    for args in [
        vec!["live", "--image", empty.to_str().unwrap_or(""), "--no-reference"],
        vec!["live", "--image", missing.to_str().unwrap_or(""), "--no-reference"],
        vec!["live", "--image", dir.to_str().unwrap_or(""), "--no-reference"],
        vec!["live", "--image", path_s, "--size", "8MiB", "--no-reference"],
    ] {
        let o = bench(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("error") && !err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `migration-bench live` of a 16 MiB guest with host certificates from `dir`, over `options`.
fn live_with_certs(dir: &std::path::Path, options: &str, extra: &[&str]) -> Output {
    let base = ["live", "--size", "16MiB", "--working-set", "4MiB", "--options", options, "--tls-dir"];
    bench(&[&base[..], &[dir.to_str().unwrap()], extra].concat())
}

/// `--tls-dir`: both processes authenticate with host certificates (mutual TLS) over tcp,
/// several tcp channels and quic, and verify; a directory whose key others may read is refused
/// before anything runs, naming the file.
#[test]
fn host_certificates_authenticate_the_runs() {
    let certs = ferry_test_support::certs::Certs::new("bench");
    let dir = certs.dir("dst");
    let o = live_with_certs(&dir, "tcp,tcp:2,quic", &["--workload", "idle", "--json", "--reference-seconds", "1"]);
    assert!(o.status.success(), "exit {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    for v in &lines {
        assert_eq!(v["verified"], true, "{v}");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = live_with_certs(&dir, "tcp", &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("key.pem") && err.contains("0644") && !err.contains("panicked"), "{err}");
}
