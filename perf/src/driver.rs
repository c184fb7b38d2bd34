//! The child-process driver every benchmark shares: the driver spawns a destination process and
//! a source process (each in its namespace, the pre-shared key in the environment), talks to them
//! over their stdin/stdout in lines (`LISTENING <addr>`, `READY`, `GO <addr>`, `RESULT {json}`),
//! kills both if the run takes too long, and reaps them; a child that fails on its own explains
//! the error.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use ferry_transport::handshake::{random_bytes, Psk};

use crate::error::{BenchError, Result};
use crate::testbed::{in_netns, register_child, unregister_child};

/// Environment variable that carries the pre-shared key (hex) from the driver to its children.
pub const PSK_ENV: &str = "FERRY_BENCH_PSK";

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

pub(crate) fn psk_from_env() -> Result<Psk> {
    let h = std::env::var(PSK_ENV)
        .map_err(|_| BenchError::Usage(format!("{PSK_ENV} is not set (run through `migration-bench stream`)")))?;
    let k = unhex(&h).ok_or_else(|| BenchError::Usage(format!("{PSK_ENV} is not hex")))?;
    Psk::new(k).map_err(|e| BenchError::Usage(format!("{PSK_ENV}: {e}")))
}

/// The children's credentials: host certificates from `tls_dir` (both ends use the same
/// directory), or the key the driver handed them.
pub(crate) fn creds(tls_dir: Option<&std::path::Path>) -> Result<ferry_transport::Credentials> {
    match tls_dir {
        Some(d) => ferry_transport::TlsCredentials::from_dir(d)
            .map(Into::into)
            .map_err(|e| BenchError::Usage(format!("--tls-dir {}: {e}", d.display()))),
        None => psk_from_env().map(Into::into),
    }
}

/// Die with the driver: a child must not outlive it (it holds memory and a testbed namespace).
pub(crate) fn die_with_parent() {
    // Best effort: without it the watchdog and Ctrl-C cleanup still kill the children.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
}

pub(crate) fn say(line: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}").and_then(|_| o.flush()).map_err(|e| BenchError::io("writing to the driver", e))
}

/// In a child: wait for the driver's `GO <addr>` line on stdin; the address to connect to.
pub(crate) fn read_go() -> Result<std::net::SocketAddr> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| BenchError::io("reading the driver's GO", e))?;
    line.trim()
        .strip_prefix("GO ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| BenchError::Usage(format!("expected `GO <addr>` from the driver, got {line:?}")))
}

/// In a child: tell the driver `RESULT <report as JSON>`.
pub(crate) fn say_result(report: &impl serde::Serialize) -> Result<()> {
    let json =
        serde_json::to_string(report).map_err(|e| BenchError::Parse { what: "report", detail: e.to_string() })?;
    say(&format!("RESULT {json}"))
}

/// In the driver: read a child's `RESULT <json>` line as its report.
pub(crate) fn read_result<T: serde::de::DeserializeOwned>(
    r: &mut BufReader<ChildStdout>,
    role: &'static str,
) -> Result<T> {
    let line = read_line(r, "RESULT ", role)?;
    parse_result(&line, role)
}

/// A child's report from the JSON of its `RESULT` line.
pub(crate) fn parse_result<T: serde::de::DeserializeOwned>(json: &str, role: &'static str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| BenchError::Child { role, detail: format!("unreadable report: {e}") })
}

/// Kills the children if the run takes too long.
pub(crate) struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(crate) fn start(pids: Vec<u32>, timeout: Duration) -> Self {
        let (stop, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let thread = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                f.store(true, Ordering::SeqCst);
                for p in pids {
                    if let Ok(p) = i32::try_from(p) {
                        let _ =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        });
        Self { stop: Some(stop), fired, thread: Some(thread) }
    }

    /// Stop watching; whether it fired.
    pub(crate) fn finish(mut self) -> bool {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}

pub(crate) fn read_line(r: &mut BufReader<ChildStdout>, prefix: &str, role: &'static str) -> Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|e| BenchError::io(format!("reading the {role} process"), e))?;
    if n == 0 {
        return Err(BenchError::Child { role, detail: format!("exited before saying {}", prefix.trim()) });
    }
    line.trim_end().strip_prefix(prefix.trim_end()).map(|s| s.trim().to_string()).ok_or_else(|| BenchError::Child {
        role,
        detail: format!("said {:?}, expected {}", line.trim_end(), prefix.trim()),
    })
}

pub(crate) fn reap(child: &mut Child, role: &'static str) -> Result<()> {
    let st = child.wait().map_err(|e| BenchError::io(format!("waiting for the {role} process"), e));
    unregister_child(child.id());
    let st = st?;
    if st.success() {
        Ok(())
    } else {
        Err(exit_error(role, st))
    }
}

/// The two children of one benchmark run, as [`drive_pair`] hands them to its body.
pub(crate) struct PairIo {
    /// The destination's stdout.
    pub dout: BufReader<ChildStdout>,
    /// The source's stdout.
    pub sout: BufReader<ChildStdout>,
    /// The source's stdin (for the GO line).
    pub sin: std::process::ChildStdin,
}

/// Spawn `exe <prefix>-dst ARGS --listen LISTEN` and `exe <prefix>-src ARGS` (each in its
/// namespace, the PSK in the environment), run `body` on their pipes, then reap both. A child
/// that fails on its own explains the error; both are killed after `timeout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn drive_pair<T>(
    exe: &Path,
    prefix: &str,
    args: &[String],
    src_ns: Option<&str>,
    dst_ns: Option<&str>,
    listen: &str,
    timeout: Duration,
    body: impl FnOnce(&mut PairIo) -> Result<T>,
) -> Result<T> {
    let psk: [u8; 32] = random_bytes();
    let mut dst = in_netns(dst_ns, exe)
        .arg(format!("{prefix}-dst"))
        .args(args)
        .args(["--listen", listen])
        .env(PSK_ENV, hex(&psk))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::io(format!("starting {} {prefix}-dst", exe.display()), e))?;
    register_child(dst.id());
    let mut src = match in_netns(src_ns, exe)
        .arg(format!("{prefix}-src"))
        .args(args)
        .env(PSK_ENV, hex(&psk))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = dst.kill();
            let _ = reap(&mut dst, "destination");
            return Err(BenchError::io(format!("starting {} {prefix}-src", exe.display()), e));
        }
    };
    register_child(src.id());
    let dog = Watchdog::start(vec![dst.id(), src.id()], timeout);
    let result = (|| -> Result<T> {
        let mut io = PairIo {
            dout: BufReader::new(
                dst.stdout.take().ok_or(BenchError::Child { role: "destination", detail: "no stdout".into() })?,
            ),
            sout: BufReader::new(
                src.stdout.take().ok_or(BenchError::Child { role: "source", detail: "no stdout".into() })?,
            ),
            sin: src.stdin.take().ok_or(BenchError::Child { role: "source", detail: "no stdin".into() })?,
        };
        let r = body(&mut io)?;
        // Drain what is left (nothing, normally) so that the children never block on a full pipe.
        drop(io.sin);
        let _ = io.sout.read_to_end(&mut Vec::new());
        let _ = io.dout.read_to_end(&mut Vec::new());
        Ok(r)
    })();
    if let Err(e) = result {
        // A child that failed on its own explains more than "it stopped talking".
        let own = failed_on_its_own(&mut src, "source").or_else(|| failed_on_its_own(&mut dst, "destination"));
        let _ = src.kill();
        let _ = dst.kill();
        let _ = reap(&mut src, "source");
        let _ = reap(&mut dst, "destination");
        if dog.finish() {
            return Err(BenchError::Timeout(timeout.as_secs()));
        }
        return Err(own.unwrap_or(e));
    }
    let src_exit = reap(&mut src, "source");
    let dst_exit = reap(&mut dst, "destination");
    if dog.finish() {
        return Err(BenchError::Timeout(timeout.as_secs()));
    }
    src_exit?;
    dst_exit?;
    result
}

pub(crate) fn exit_error(role: &'static str, st: std::process::ExitStatus) -> BenchError {
    let detail = match st.code() {
        Some(_) => format!("{st} (its error is above)"),
        None => format!("killed ({st})"),
    };
    BenchError::Child { role, detail }
}

/// If `child` has exited (or exits within a moment) with a failure, that failure.
pub(crate) fn failed_on_its_own(child: &mut Child, role: &'static str) -> Option<BenchError> {
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if !st.success() => return Some(exit_error(role, st)),
            Ok(None) if t.elapsed() < Duration::from_millis(300) => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001abff"), Some(b.to_vec()));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("é1"), None);
    }
}
