//! The iperf3 reference: one TCP stream between the same endpoints as the benchmark, in the same
//! run, parsed from `iperf3 -J`.
//!
//! A reference must be the best a user gets from the tool, so iperf3 writes in blocks of the size
//! Ferry writes (`-l`, a batch: 1 MiB by default; iperf3 takes at most [`MAX_WRITE_BYTES`]): on
//! loopback here `-l 1M` moved 2.8 GB/s where iperf3's default 128 KiB writes moved 1.8 GB/s.
//! Every result carries the client arguments that produced it ([`IperfResult::args`]).

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{BenchError, Result};
use crate::testbed::in_netns;

/// Make sure `iperf3` can be run; install Debian's package with apt-get if it is missing.
pub fn ensure_iperf3() -> Result<()> {
    let have = || Command::new("iperf3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if matches!(have(), Ok(s) if s.success()) {
        return Ok(());
    }
    eprintln!("migration-bench: iperf3 is missing; installing Debian's iperf3 with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !apt(&["install", "-y", "-q", "iperf3"]) {
        // The package lists may be missing or stale.
        let _ = apt(&["update", "-q"]);
        if !apt(&["install", "-y", "-q", "iperf3"]) {
            return Err(BenchError::MissingTool { tool: "iperf3", why: "apt-get install iperf3 failed".into() });
        }
    }
    match have() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(BenchError::MissingTool { tool: "iperf3", why: "still not runnable after installing".into() }),
    }
}

/// A free TCP port on `addr` of this namespace (bound and released; good enough for a test port).
pub fn free_port(addr: IpAddr) -> Result<u16> {
    let l = TcpListener::bind(SocketAddr::new(addr, 0)).map_err(|e| BenchError::io(format!("binding {addr}:0"), e))?;
    Ok(l.local_addr().map_err(|e| BenchError::io("local_addr", e))?.port())
}

/// Largest write iperf3 accepts for TCP (`-l`; its `MAX_BLOCKSIZE`).
pub const MAX_WRITE_BYTES: usize = 1 << 20;

/// What iperf3 measured.
#[derive(Debug, Clone, PartialEq)]
pub struct IperfResult {
    /// Received TCP payload, bytes per second.
    pub bytes_per_s: f64,
    /// Seconds measured.
    pub seconds: f64,
    /// Sender retransmits, where reported.
    pub retransmits: Option<u64>,
    /// The client's arguments (`-c ADDR -p PORT -t SECONDS -l BYTES -J`).
    pub args: String,
}

/// Parse `iperf3 -c ... -J` output.
pub fn parse_client_json(text: &str) -> Result<IperfResult> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| BenchError::Parse { what: "iperf3 JSON", detail: e.to_string() })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(BenchError::Command { what: "iperf3 client".into(), detail: err.to_string() });
    }
    let recv = &v["end"]["sum_received"];
    let bits = recv["bits_per_second"].as_f64().filter(|b| b.is_finite() && *b > 0.0).ok_or_else(|| {
        BenchError::Parse { what: "iperf3 JSON", detail: "no end.sum_received.bits_per_second".into() }
    })?;
    Ok(IperfResult {
        bytes_per_s: bits / 8.0,
        seconds: recv["seconds"].as_f64().unwrap_or(0.0),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
        args: String::new(),
    })
}

/// [`measure`] on loopback (127.0.0.1, a free port, this namespace).
pub fn measure_loopback(seconds: u32, write_bytes: usize) -> Result<IperfResult> {
    let lo = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    measure(None, None, lo, free_port(lo)?, seconds, write_bytes)
}

/// The client's arguments: `seconds` whole seconds (at least 1), writes of `write_bytes` (1 ..=
/// [`MAX_WRITE_BYTES`]), JSON output.
pub fn client_args(addr: &str, port: u16, seconds: u32, write_bytes: usize) -> Vec<String> {
    let l = write_bytes.clamp(1, MAX_WRITE_BYTES);
    ["-c", addr, "-p", &port.to_string(), "-t", &seconds.max(1).to_string(), "-l", &l.to_string(), "-J"]
        .map(String::from)
        .to_vec()
}

/// Run one single-stream iperf3 test for `seconds` with writes of `write_bytes` (see
/// [`client_args`]): the server listens on `server_addr:port` in namespace `server_ns` (`None`:
/// this namespace), the client runs in `client_ns`.
pub fn measure(
    server_ns: Option<&str>,
    client_ns: Option<&str>,
    server_addr: IpAddr,
    port: u16,
    seconds: u32,
    write_bytes: usize,
) -> Result<IperfResult> {
    let addr = server_addr.to_string();
    let port_s = port.to_string();
    let args = client_args(&addr, port, seconds, write_bytes);
    let mut server = in_netns(server_ns, "iperf3")
        .args(["-s", "-1", "-B", &addr, "-p", &port_s])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io("starting the iperf3 server", e))?;
    let result = (|| {
        // The server needs a moment to listen: retry the client while the connection is refused.
        let t0 = Instant::now();
        loop {
            let out = in_netns(client_ns, "iperf3")
                .args(&args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|e| BenchError::io("running the iperf3 client", e))?;
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_client_json(&text) {
                Err(BenchError::Command { detail, .. })
                    if detail.contains("unable to connect") && t0.elapsed() < Duration::from_secs(5) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r.map(|r| IperfResult { args: args.join(" "), ..r }),
            }
        }
    })();
    // `-1`: the server exits after one test; make sure it is gone either way.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match server.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = server.kill();
                let _ = server.wait();
                break;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json() {
        let j = r#"{"start":{},"end":{"sum_sent":{"retransmits":3,"bits_per_second":9.0e9},
            "sum_received":{"seconds":3.0,"bits_per_second":8.0e9}}}"#;
        let r = parse_client_json(j).unwrap();
        assert_eq!(r.bytes_per_s, 1.0e9);
        assert_eq!(r.retransmits, Some(3));
        assert!(parse_client_json(r#"{"error":"unable to connect to server"}"#).is_err());
        assert!(parse_client_json("not json").is_err());
        assert!(parse_client_json(r#"{"end":{}}"#).is_err());
    }

    #[test]
    fn the_client_writes_in_ferrys_batches_within_iperf3s_limit() {
        let a = client_args("127.0.0.1", 5201, 0, 1 << 20);
        assert_eq!(a.join(" "), "-c 127.0.0.1 -p 5201 -t 1 -l 1048576 -J");
        let big = client_args("198.18.0.2", 5202, 3, 4 << 20);
        assert_eq!(big[big.iter().position(|x| x == "-l").unwrap() + 1], MAX_WRITE_BYTES.to_string());
    }
}
