//! `migration-bench agent`: moves through two host agents (`ferryd` processes on loopback, each
//! with a temporary config and state directory), driven over their API sockets as an operator's
//! tooling would drive them.
//!
//! - `single`: the same idle synthetic guest moved through the agents (`POST /v1/moves` until the
//!   destination agent lists the VM running) and by the library path (`live`: the engine between
//!   two bench processes) in the same run; the overhead ratio is the agent's end-to-end time over
//!   the library's total time. Both use `tcp` with the same channel count and the same kind of
//!   destination memory: `reserve` (default; the destination agent's `memory_reserve_bytes`,
//!   a standby VMM with the guest's memory faulted in before the move, against the library's
//!   `--dst-memory reserve`) or `cold` (fresh memory on both: the receive path takes the page
//!   faults).
//! - `many`: N VMs moved at once under `max_live_migrations` = each given limit: the makespan (first
//!   `POST` to the last VM running on the destination), each VM's downtime and total time, and the
//!   most migrations either journal had open at once.
//!
//! The agent binaries are built with this bench's profile (`cargo build --release -p
//! ferry-agent`) when the source tree this bench was built from is still there (so they are never
//! stale), and taken from next to this program.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{BenchError, Result};
use crate::testbed::{register_child, unregister_child};

/// The agent's programs.
#[derive(Debug, Clone)]
pub struct AgentBins {
    /// `ferryd`.
    pub ferryd: PathBuf,
    /// Directory holding `ferryd`, `ferry` and `ferry-vmm` (ferryd finds `ferry-vmm` beside itself).
    pub dir: PathBuf,
}

fn bins_in(dir: &Path) -> Option<AgentBins> {
    let ok = ["ferryd", "ferry", "ferry-vmm"].iter().all(|b| dir.join(b).is_file());
    ok.then(|| AgentBins { ferryd: dir.join("ferryd"), dir: dir.to_path_buf() })
}

/// Build the agent with this bench's profile (`cargo build [--release] -p ferry-agent`) from the
/// source tree this bench came from, so the binaries are never stale, and take them from next to
/// this program; without that tree, take whatever is next to this program.
pub fn find_or_build() -> Result<AgentBins> {
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf);
    if let Some(root) = root.filter(|r| r.join("agent/Cargo.toml").is_file()) {
        let release = !cfg!(debug_assertions);
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.arg("build");
        if release {
            cmd.arg("--release");
        }
        cmd.args(["-p", "ferry-agent", "--bins", "--manifest-path"]).arg(root.join("Cargo.toml"));
        eprintln!(
            "migration-bench: building the agent (cargo build{} -p ferry-agent)",
            if release { " --release" } else { "" }
        );
        match cmd.stdout(Stdio::null()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("migration-bench: building the agent failed ({s}); looking next to this program"),
            Err(e) => eprintln!("migration-bench: cannot run cargo ({e}); looking next to this program"),
        }
    }
    exe.parent().and_then(bins_in).ok_or_else(|| {
        BenchError::Usage(format!(
            "ferryd, ferry and ferry-vmm are not next to {}: build them with `cargo build --release -p ferry-agent`",
            exe.display()
        ))
    })
}

/// One HTTP/1.1 request on an agent's API socket; the status and the JSON answer (`null` for
/// none).
pub fn http(api: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let io = |what: &str| {
        let what = format!("{what} {}", api.display());
        move |e| BenchError::io(what, e)
    };
    let mut s = UnixStream::connect(api).map_err(io("connecting to"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(io("configuring"))?;
    let b = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ferryd\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .map_err(io("writing to"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(io("reading from"))?;
    let text = String::from_utf8_lossy(&out);
    let bad = |d: &str| BenchError::Parse { what: "agent answer", detail: format!("{method} {path}: {d}") };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| bad("no status"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_string()
    };
    if body.trim().is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_str(&body).map_err(|e| bad(&e.to_string()))?;
    Ok((status, v))
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(len.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n + 2..)?;
    }
}

/// An agent's event stream (`GET /v1/events`, server-sent events), read as it comes.
pub struct Events {
    s: UnixStream,
    /// Bytes read, not yet dechunked.
    raw: Vec<u8>,
    /// Dechunked text, not yet split into events.
    text: String,
}

impl Events {
    /// Subscribe (the agent sends events from when it answered the request on).
    pub fn open(api: &Path) -> Result<Events> {
        let io = |what: &str| {
            let what = format!("{what} {}", api.display());
            move |e| BenchError::io(what, e)
        };
        let mut s = UnixStream::connect(api).map_err(io("connecting to"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("configuring"))?;
        write!(s, "GET /v1/events HTTP/1.1\r\nHost: ferryd\r\nAccept: text/event-stream\r\n\r\n")
            .map_err(io("writing to"))?;
        let mut raw = Vec::new();
        let mut b = [0u8; 4096];
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut b).map_err(io("reading the event stream of"))?;
            if n == 0 {
                return Err(BenchError::Parse { what: "event stream", detail: "closed before its header".into() });
            }
            raw.extend_from_slice(&b[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") || !head.contains("transfer-encoding: chunked") {
            return Err(BenchError::Parse { what: "event stream", detail: head });
        }
        raw.drain(..end + 4);
        Ok(Events { s, raw, text: String::new() })
    }

    /// The next event's data (JSON), or `None` when none came within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let t0 = Instant::now();
        loop {
            // Whole chunks into text.
            while let Some(i) = self.raw.windows(2).position(|w| w == b"\r\n") {
                let len =
                    std::str::from_utf8(&self.raw[..i]).ok().and_then(|l| usize::from_str_radix(l.trim(), 16).ok());
                let Some(len) = len else {
                    return Err(BenchError::Parse { what: "event stream", detail: "bad chunk size".into() });
                };
                if self.raw.len() < i + 2 + len + 2 {
                    break;
                }
                self.text.push_str(&String::from_utf8_lossy(&self.raw[i + 2..i + 2 + len]));
                self.raw.drain(..i + 2 + len + 2);
            }
            // Whole events out of the text.
            while let Some(i) = self.text.find("\n\n") {
                let ev: String = self.text.drain(..i + 2).collect();
                if let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data:")) {
                    if let Ok(v) = serde_json::from_str(data.trim()) {
                        return Ok(Some(v));
                    }
                }
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| BenchError::io("configuring the event stream", e))?;
            let mut b = [0u8; 4096];
            match self.s.read(&mut b) {
                Ok(0) => return Err(BenchError::Parse { what: "event stream", detail: "closed".into() }),
                Ok(n) => self.raw.extend_from_slice(&b[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(BenchError::io("reading the event stream", e)),
            }
        }
    }
}

/// A 2xx answer, or the agent's error as a bench error.
fn ok(api: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (st, v) = http(api, method, path, body)?;
    if (200..300).contains(&st) {
        return Ok(v);
    }
    Err(BenchError::Child { role: "ferryd", detail: format!("{method} {path}: HTTP {st}: {v}") })
}

/// One `ferryd` of the bench.
pub struct Host {
    /// Its name (`a`, `b`).
    pub name: String,
    /// API socket.
    pub api: PathBuf,
    /// Peer address (`listen`).
    pub listen: SocketAddr,
    state: PathBuf,
    child: Option<Child>,
}

impl Host {
    fn start(bins: &AgentBins, dir: &Path, name: &str, limit: u32, reserve_bytes: u64) -> Result<Host> {
        let io = |what: &'static str| move |e| BenchError::io(what, e);
        let home = dir.join(name);
        std::fs::create_dir_all(&home).map_err(io("creating the agent's directory"))?;
        let listen = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("finding a free loopback port"))?;
        let api = home.join("ferryd.sock");
        let state = home.join("state");
        let cfg = home.join("ferryd.toml");
        let text = format!(
            "name = \"{name}\"\nlisten = \"{listen}\"\napi_socket = \"{}\"\nstate_dir = \"{}\"\nkey_file = \"{}\"\n\
             max_live_migrations = {limit}\nmemory_reserve_bytes = {reserve_bytes}\n",
            api.display(),
            state.display(),
            dir.join("key").display()
        );
        std::fs::write(&cfg, text).map_err(io("writing the agent's config"))?;
        let log = std::fs::File::create(home.join("ferryd.log")).map_err(io("creating the agent's log"))?;
        let child = Command::new(&bins.ferryd)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting ferryd"))?;
        register_child(child.id());
        let mut h = Host { name: name.into(), api, listen, state, child: Some(child) };
        let t0 = Instant::now();
        while http(&h.api, "GET", "/v1/host", None).is_err() {
            if let Some(Ok(Some(st))) = h.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(home.join("ferryd.log")).unwrap_or_default();
                return Err(BenchError::Child { role: "ferryd", detail: format!("exited at start ({st}): {log}") });
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(BenchError::Child { role: "ferryd", detail: "did not come up within 60 s".into() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(h)
    }

    /// `GET` a JSON resource.
    pub fn get(&self, path: &str) -> Result<Value> {
        ok(&self.api, "GET", path, None)
    }

    /// `POST` a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        ok(&self.api, "POST", path, Some(body))
    }

    /// Create a synthetic VM; its VMM's pid is registered for Ctrl-C.
    pub fn create(&self, name: &str, memory_bytes: u64, working_set_bytes: Option<u64>) -> Result<Value> {
        let v = self.post(
            "/v1/vms",
            &json!({"name": name, "memory_bytes": memory_bytes, "guest": "synthetic",
                    "working_set_bytes": working_set_bytes}),
        )?;
        if let Some(pid) = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
            register_child(pid);
        }
        Ok(v)
    }

    fn stop(&mut self) {
        // The VMs outlive their agent by design: stop the agent first (so it starts no standby
        // VMM any more), then each VMM process.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            unregister_child(c.id());
        }
        if let Ok(rd) = std::fs::read_dir(self.state.join("vms")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "sock") {
                    if let Ok(mut s) = UnixStream::connect(e.path()) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = s.write_all(b"{\"op\":\"stop\"}\n");
                        let mut b = [0u8; 4096];
                        let _ = s.read(&mut b);
                    }
                }
            }
        }
    }
}

/// Two agents on loopback sharing a key, in a temporary directory removed on drop.
pub struct Pair {
    /// The source host.
    pub a: Host,
    /// The destination host.
    pub b: Host,
    dir: PathBuf,
}

impl Pair {
    /// Start two agents with `max_live_migrations = limit`; the destination with
    /// `memory_reserve_bytes = reserve_bytes` (the source needs none).
    pub fn start(bins: &AgentBins, limit: u32, reserve_bytes: u64) -> Result<Pair> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-bench-agent-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("creating the bench directory", e))?;
        let key: [u8; 32] = ferry_transport::handshake::random_bytes();
        let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
        // ferryd refuses a key file others can read.
        let write_key = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join("key"))?;
            f.write_all(format!("{key}\n").as_bytes())
        };
        write_key().map_err(|e| BenchError::io("writing the key", e))?;
        let a = Host::start(bins, &dir, "a", limit, 0)?;
        let b = match Host::start(bins, &dir, "b", limit, reserve_bytes) {
            Ok(b) => b,
            Err(e) => {
                let mut a = a;
                a.stop();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Pair { a, b, dir })
    }

    /// Wait until B's standby VMM has `bytes` of its memory reserve faulted in (the library
    /// path's reserve is filled before its clock starts too).
    pub fn wait_reserve(&self, bytes: u64, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let h = self.b.get("/v1/host")?;
            if h["memory_reserve_ready_bytes"].as_u64().unwrap_or(0) >= bytes {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Child { role: "ferryd", detail: format!("memory reserve not ready: {h}") });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `POST /v1/moves` of `vm` to B; the migration id.
    pub fn post_move(&self, vm: &str, channels: u16) -> Result<String> {
        let v = self.a.post(
            "/v1/moves",
            &json!({"vm": vm, "to": self.b.listen.to_string(), "option": "tcp", "channels": channels}),
        )?;
        v["id"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| BenchError::Child { role: "ferryd", detail: format!("a move without an id: {v}") })
    }

    /// Wait until B lists each of `vms` running; for each, the time since `t0` when B's answer
    /// listing it running came. `events` is B's event stream, opened before the moves were
    /// posted: B tells it at once when an arrived VM runs (`{"type":"vm","state":"running"}`),
    /// and each such event is checked with `GET /v1/vms/NAME` (the time is taken after that
    /// answer). The bench does not poll while the moves run (a poll every few milliseconds
    /// takes CPU from the migrations on a small machine); once a second without events it
    /// looks at B's list (in case an event was missed) and at A's journal (a failed move never
    /// arrives).
    pub fn wait_running_on_b(
        &self,
        events: &mut Events,
        vms: &[String],
        t0: Instant,
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let mut seen: Vec<Option<Duration>> = vec![None; vms.len()];
        let running_on_b = |n: &str| -> Result<bool> {
            let (st, v) = http(&self.b.api, "GET", &format!("/v1/vms/{n}"), None)?;
            Ok(st == 200 && v["state"] == "running")
        };
        while seen.iter().any(Option::is_none) {
            match events.next(Duration::from_secs(1))? {
                Some(ev) => {
                    let vm = ev["vm"].as_str().unwrap_or("");
                    if ev["type"] == "vm" && ev["state"] == "running" {
                        if let Some(i) = vms.iter().position(|n| n == vm).filter(|&i| seen[i].is_none()) {
                            if running_on_b(vm)? {
                                seen[i] = Some(t0.elapsed());
                            }
                        }
                    }
                }
                None => {
                    for (i, n) in vms.iter().enumerate() {
                        if seen[i].is_none() && running_on_b(n)? {
                            seen[i] = Some(t0.elapsed());
                        }
                    }
                    // A move that failed never arrives: say why instead of waiting.
                    for m in self.a.get("/v1/migrations")?.as_array().into_iter().flatten() {
                        if ["failed", "cancelled"].contains(&m["status"].as_str().unwrap_or("")) {
                            return Err(BenchError::Child { role: "ferryd", detail: format!("a move ended {m}") });
                        }
                    }
                }
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Child { role: "ferryd", detail: format!("moves not done in {timeout:?}") });
            }
        }
        Ok(seen.into_iter().flatten().collect())
    }

    /// A's journal entry of migration `id` once final.
    pub fn final_migration(&self, id: &str, timeout: Duration) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let m = self.a.get(&format!("/v1/migrations/{id}"))?;
            if ["completed", "failed", "cancelled"].contains(&m["status"].as_str().unwrap_or("")) {
                return Ok(m);
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Child { role: "ferryd", detail: format!("migration {id} not final: {m}") });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.a.stop();
        self.b.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Most migrations of an agent's journal (a JSON array) open at once.
fn max_concurrent(journal: &Value) -> u32 {
    ferry_test_support::journal::max_concurrent(journal.as_array().map_or(&[][..], Vec::as_slice)) as u32
}

/// `single`: one guest through the agents beside the library path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentSingleRecord {
    /// Always `"agent"`.
    pub bench: String,
    /// Always `"single"`.
    pub part: String,
    /// Index of the repetition.
    pub run: u32,
    /// Guest memory.
    pub guest_bytes: u64,
    /// Channels (tcp) of both paths.
    pub channels: u16,
    /// Destination memory of both paths: `reserve` or `cold`.
    #[serde(default)]
    pub dst_memory: String,
    /// Library path: the engine's total time (`migrate` called until it returned: the
    /// channels were connected before, and it returns once the destination resumed the VM).
    /// The agents' clock below covers strictly more (admission, connecting the channels, the
    /// destination agent taking the VM over and listing it), so the ratio is what an operator
    /// pays for the agents over calling the engine directly.
    pub library_total_ms: f64,
    /// Library path: downtime.
    pub library_downtime_ms: f64,
    /// Through the agents: `POST /v1/moves` until the destination agent lists the VM running
    /// (its `GET /v1/vms/NAME` answer after B's event stream said so).
    pub agent_total_ms: f64,
    /// Through the agents: the engine's total time (from the source journal).
    pub agent_engine_total_ms: f64,
    /// Through the agents: downtime.
    pub agent_downtime_ms: f64,
    /// `agent_total_ms / library_total_ms` (target: at most 1.05).
    pub overhead_ratio: f64,
    /// `agent_engine_total_ms / library_total_ms`.
    pub engine_ratio: f64,
    /// Both destinations verified the image.
    pub verified: bool,
}

/// `many`: N VMs under one limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentManyRecord {
    /// Always `"agent"`.
    pub bench: String,
    /// Always `"many"`.
    pub part: String,
    /// Index of the repetition.
    pub run: u32,
    /// `max_live_migrations` of both agents.
    pub limit: u32,
    /// VMs moved.
    pub vms: u32,
    /// Memory of each VM.
    pub vm_bytes: u64,
    /// First `POST /v1/moves` until the last VM runs on the destination.
    pub makespan_ms: f64,
    /// Each VM's downtime (source journal), in VM order.
    pub downtime_ms: Vec<f64>,
    /// Each VM's engine total time (source journal), in VM order.
    pub total_ms: Vec<f64>,
    /// Each VM: `POST` until it runs on the destination (queueing included).
    pub done_after_ms: Vec<f64>,
    /// Most migrations the source journal had open at once.
    pub max_concurrent_source: u32,
    /// Most migrations the destination journal had open at once.
    pub max_concurrent_destination: u32,
    /// Every image verified.
    pub verified: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Memory reserve of the agents for guests of `vm_bytes` (`reserve`: as much as one guest
/// needs, its regions each rounded to 2 MiB; otherwise none).
pub fn reserve_bytes(reserve: bool, vm_bytes: u64) -> u64 {
    if reserve {
        vm_bytes + 4 * (2 << 20)
    } else {
        0
    }
}

/// Move one idle synthetic guest of `guest_bytes` through the agents (`reserve`: into the
/// destination's memory reserve, filled before the clock starts); (record fields of the agent
/// side): end-to-end, engine total, downtime, verified.
pub fn agent_single(bins: &AgentBins, guest_bytes: u64, channels: u16, reserve: bool) -> Result<(f64, f64, f64, bool)> {
    let reserve_bytes = reserve_bytes(reserve, guest_bytes);
    let pair = Pair::start(bins, 2, reserve_bytes)?;
    // No working set: an idle guest, as the library path's.
    pair.a.create("big", guest_bytes, Some(0))?;
    if reserve {
        pair.wait_reserve(reserve_bytes, Duration::from_secs(600))?;
    }
    let mut events = Events::open(&pair.b.api)?;
    let t0 = Instant::now();
    let id = pair.post_move("big", channels)?;
    let seen = pair.wait_running_on_b(&mut events, &["big".to_string()], t0, Duration::from_secs(1800))?;
    let m = pair.final_migration(&id, Duration::from_secs(120))?;
    if m["status"] != "completed" {
        return Err(BenchError::Child { role: "ferryd", detail: format!("the move did not complete: {m}") });
    }
    let on_b = pair.b.get("/v1/vms/big")?;
    let verified = m["verified"] == true
        && on_b["arrived_verified"] == true
        && on_b["guest_check"] == "ok"
        && (!reserve || on_b["arrived_from_reserve"] == true);
    Ok((ms(seen[0]), f(&m["total_ms"]), f(&m["downtime_ms"]), verified))
}

/// Move `vms` synthetic guests of `vm_bytes` (default working set and dirty rate) at once under
/// `limit`.
/// `reserve`: the agents keep a standby reserve for one VM (the first arrival uses it; the next
/// standby fills after that arrival, at the lowest priority).
pub fn agent_many(
    bins: &AgentBins,
    vms: u32,
    vm_bytes: u64,
    limit: u32,
    channels: u16,
    reserve: bool,
) -> Result<AgentManyRecord> {
    let reserve_bytes = reserve_bytes(reserve, vm_bytes);
    let pair = Pair::start(bins, limit, reserve_bytes)?;
    let names: Vec<String> = (0..vms).map(|i| format!("vm{i}")).collect();
    for n in &names {
        pair.a.create(n, vm_bytes, None)?;
    }
    if reserve {
        pair.wait_reserve(reserve_bytes, Duration::from_secs(600))?;
    }
    let mut events = Events::open(&pair.b.api)?;
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for n in &names {
        ids.push(pair.post_move(n, channels)?);
    }
    let seen = pair.wait_running_on_b(&mut events, &names, t0, Duration::from_secs(3600))?;
    let makespan = seen.iter().copied().max().unwrap_or_default();
    let mut downtime_ms = Vec::new();
    let mut total_ms = Vec::new();
    let mut verified = true;
    for id in &ids {
        let m = pair.final_migration(id, Duration::from_secs(120))?;
        verified &= m["status"] == "completed" && m["verified"] == true;
        downtime_ms.push(f(&m["downtime_ms"]));
        total_ms.push(f(&m["total_ms"]));
    }
    // B journals an arrival complete a moment after it runs the VM.
    let t1 = Instant::now();
    let journal_b = loop {
        let j = pair.b.get("/v1/migrations")?;
        let done = j.as_array().is_some_and(|l| l.iter().all(|m| !m["finished_at"].is_null()));
        if done || t1.elapsed() > Duration::from_secs(60) {
            break j;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for v in pair.b.get("/v1/vms")?.as_array().into_iter().flatten() {
        verified &= v["arrived_verified"] == true && v["guest_check"] == "ok";
    }
    Ok(AgentManyRecord {
        bench: "agent".into(),
        part: "many".into(),
        run: 0,
        limit,
        vms,
        vm_bytes,
        makespan_ms: ms(makespan),
        downtime_ms,
        total_ms,
        done_after_ms: seen.into_iter().map(ms).collect(),
        max_concurrent_source: max_concurrent(&pair.a.get("/v1/migrations")?),
        max_concurrent_destination: max_concurrent(&journal_b),
        verified,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().filter(|x| x.is_finite()).fold(f64::NAN, f64::max)
}

/// The `single` table.
pub fn single_table(rs: &[AgentSingleRecord]) -> String {
    let mut s = format!(
        "{:>3}  {:>10}  {:>8}  {:>12}  {:>12}  {:>12}  {:>15}  {:>8}  {:>8}\n",
        "run", "guest", "channels", "library ms", "agent ms", "agent eng ms", "downtime lib/ag", "overhead", "verified"
    );
    for r in rs {
        s += &format!(
            "{:>3}  {:>10}  {:>8}  {:>12.0}  {:>12.0}  {:>12.0}  {:>7.1}/{:<7.1}  {:>7.3}x  {:>8}\n",
            r.run,
            crate::units::format_size(r.guest_bytes),
            r.channels,
            r.library_total_ms,
            r.agent_total_ms,
            r.agent_engine_total_ms,
            r.library_downtime_ms,
            r.agent_downtime_ms,
            r.overhead_ratio,
            r.verified
        );
    }
    s
}

/// The `many` table.
pub fn many_table(rs: &[AgentManyRecord]) -> String {
    let mut s = format!(
        "{:>3}  {:>5}  {:>4}  {:>8}  {:>11}  {:>18}  {:>18}  {:>11}  {:>8}\n",
        "run",
        "limit",
        "vms",
        "vm",
        "makespan ms",
        "downtime ms med/max",
        "total ms med/max",
        "most at once",
        "verified"
    );
    for r in rs {
        s += &format!(
            "{:>3}  {:>5}  {:>4}  {:>8}  {:>11.0}  {:>8.1}/{:<9.1}  {:>8.0}/{:<9.0}  {:>5}/{:<5}  {:>8}\n",
            r.run,
            r.limit,
            r.vms,
            crate::units::format_size(r.vm_bytes),
            r.makespan_ms,
            median(&r.downtime_ms),
            max(&r.downtime_ms),
            median(&r.total_ms),
            max(&r.total_ms),
            r.max_concurrent_source,
            r.max_concurrent_destination,
            r.verified
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_and_overlap() {
        assert_eq!(dechunk("3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n").as_deref(), Some("{\"a\":1}"));
        assert_eq!(dechunk("zz\r\n"), None);
        let j = json!([
            {"started_at": "2026-01-01T00:00:00.000Z", "finished_at": "2026-01-01T00:00:02.000Z"},
            {"started_at": "2026-01-01T00:00:01.000Z", "finished_at": "2026-01-01T00:00:03.000Z"},
            {"started_at": "2026-01-01T00:00:03.000Z", "finished_at": "2026-01-01T00:00:04.000Z"},
            {"started_at": null, "finished_at": null},
        ]);
        assert_eq!(max_concurrent(&j), 2);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(max(&[3.0, f64::NAN, 2.0]), 3.0);
    }
}
