//! Real agents for the tests: `ferryd` processes on loopback, each with its own state directory,
//! driven through the `ferry` command.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FERRYD: &str = env!("CARGO_BIN_EXE_ferryd");
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// The agents' key file (base64 of 32 random bytes).
pub const KEY: &str = "DXk21ivN7CQ9tESbSNQOC2v0snc8Pt3Sb2GfmuCGxkA=";

/// A free loopback port (bound and released).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-agent-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a test agent proves who it is.
pub enum Creds<'a> {
    /// A key file (written into the agent's directory) holding this key.
    Key(&'a str),
    /// Host certificates in this directory (`tls_dir`).
    TlsDir(&'a Path),
    /// These config lines as they are (both keys, neither, a bad path...).
    Lines(&'a str),
}

impl Creds<'_> {
    /// The config lines, writing the key file into `dir` if there is one.
    pub fn lines(&self, dir: &Path) -> String {
        match self {
            Creds::Key(key) => {
                let key_file = dir.join("key");
                std::fs::write(&key_file, format!("{key}\n")).unwrap();
                std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
                format!("key_file = \"{}\"\n", key_file.display())
            }
            Creds::TlsDir(d) => format!("tls_dir = \"{}\"\n", d.display()),
            Creds::Lines(l) => l.to_string(),
        }
    }
}

/// A `ferryd` config: name, listen, the API socket and state under `dir`, `creds`, `extra`.
fn config_text(name: &str, listen: &str, dir: &Path, creds: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nlisten = \"{listen}\"\napi_socket = \"{}\"\nstate_dir = \"{}\"\n{creds}{extra}",
        dir.join("ferryd.sock").display(),
        dir.join("state").display(),
    )
}

/// Start `ferryd` on a config with `creds` and `extra` that it must refuse: asserts it exits 2
/// at once, and returns what it wrote on stderr.
pub fn refused_config(creds: Creds<'_>, extra: &str) -> String {
    let dir = Scratch::new("badcfg");
    let cfg = dir.0.join("c.toml");
    std::fs::write(&cfg, config_text("x", "127.0.0.1:1", &dir.0, &creds.lines(&dir.0), extra)).unwrap();
    let o = Command::new(FERRYD).args(["--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "ferryd took {extra:?}: {err}");
    err
}

/// `ferry tls-certs --out DIR HOSTS...`: a fresh CA and a directory per host (`DIR/HOST`).
pub fn tls_certs(out: &Path, hosts: &[&str]) {
    let o = Command::new(FERRY).arg("tls-certs").arg("--out").arg(out).args(hosts).output().unwrap();
    assert!(o.status.success(), "ferry tls-certs: {}", String::from_utf8_lossy(&o.stderr));
}

/// One `ferryd`.
pub struct Agent {
    pub name: String,
    pub dir: Scratch,
    pub config: PathBuf,
    pub api: PathBuf,
    pub listen: SocketAddr,
    pub child: Option<Child>,
    /// The network namespace it runs in (`None`: this one).
    pub netns: Option<String>,
    /// Extra environment of the agent (and so of its VMM processes).
    pub env: Vec<(String, String)>,
}

impl Agent {
    /// Write a config (with `extra` keys) and start the agent.
    pub fn start(name: &str, key: &str, extra: &str) -> Self {
        Self::start_in(None, name, key, extra, free_addr())
    }

    /// [`Agent::start`] in network namespace `netns`, listening on `listen`.
    pub fn start_in(netns: Option<String>, name: &str, key: &str, extra: &str, listen: SocketAddr) -> Self {
        Self::start_with_env(netns, name, key, extra, listen, Vec::new())
    }

    /// [`Agent::start_in`] with extra environment variables (kept for restarts).
    pub fn start_with_env(
        netns: Option<String>,
        name: &str,
        key: &str,
        extra: &str,
        listen: SocketAddr,
        env: Vec<(String, String)>,
    ) -> Self {
        Self::start_as(netns, name, Creds::Key(key), extra, listen, env)
    }

    /// Start an agent proving itself with host certificates (`tls_dir`) instead of a key.
    pub fn start_tls(name: &str, tls_dir: &Path, extra: &str) -> Self {
        Self::start_as(None, name, Creds::TlsDir(tls_dir), extra, free_addr(), Vec::new())
    }

    /// Write a config with credentials `creds` (and `extra` keys) and start the agent.
    pub fn start_as(
        netns: Option<String>,
        name: &str,
        creds: Creds<'_>,
        extra: &str,
        listen: SocketAddr,
        env: Vec<(String, String)>,
    ) -> Self {
        let dir = Scratch::new(name);
        let api = dir.0.join("ferryd.sock");
        let config = dir.0.join("ferryd.toml");
        std::fs::write(&config, config_text(name, &listen.to_string(), &dir.0, &creds.lines(&dir.0), extra)).unwrap();
        let mut a = Self { name: name.into(), dir, config, api, listen, child: None, netns, env };
        a.restart();
        a
    }

    /// Start (again) on the same config and state.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.0.join(format!("ferryd-{}.log", Instant::now().elapsed().as_nanos())))
            .unwrap();
        let child = ferry_test_support::testbed::in_netns(self.netns.as_deref(), FERRYD)
            .args(["--config", self.config.to_str().unwrap(), "--log-format", "json"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferryd");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let o = self.ferry(&["host", "show"]);
            if o.status.success() {
                break;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("ferryd {} exited at start ({st}): {}", self.name, self.logs());
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "ferryd {} did not come up: {}", self.name, self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every log line of this agent so far.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir.0) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("ferryd-") {
                    out += &std::fs::read_to_string(e.path()).unwrap_or_default();
                }
            }
        }
        out
    }

    /// `kill -9` the agent (its VMs keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run `ferry --api <this agent> ARGS`.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(FERRY).arg("--api").arg(&self.api).args(args).output().expect("run ferry")
    }

    /// Run `ferry --json ...`, expect success, parse stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ferry(&a);
        assert!(
            o.status.success(),
            "ferry {args:?} on {} failed ({}): {}{}",
            self.name,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("ferry {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
    }

    pub fn migrations(&self) -> Vec<Value> {
        self.json(&["migrations"]).as_array().cloned().expect("an array")
    }

    pub fn vms(&self) -> Vec<Value> {
        self.json(&["vm", "list"]).as_array().cloned().expect("an array")
    }

    /// Wait until every migration in this agent's journal has a final status.
    pub fn wait_all_final(&self, n: usize, within: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let m = self.migrations();
            if m.len() >= n
                && m.iter().all(|m| ["completed", "failed", "cancelled"].contains(&m["status"].as_str().unwrap_or("")))
            {
                return m;
            }
            assert!(t0.elapsed() < within, "{}: migrations not done in {within:?}: {m:#?}\n{}", self.name, self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }
}

/// Stop every VMM process of a state directory (its VMs outlive the agent by design).
pub fn stop_vmms(state: &Path) {
    let Ok(rd) = std::fs::read_dir(state.join("vms")) else { return };
    for e in rd.flatten() {
        if e.path().extension().is_some_and(|x| x == "sock") {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(e.path()) {
                let _ = s.write_all(b"{\"op\":\"stop\"}\n");
                let mut b = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut b);
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        stop_vmms(&self.state_dir());
    }
}

#[allow(unused_imports)] // not every test binary counts overlaps
pub use ferry_test_support::journal::max_concurrent;

/// A VMM process's status, straight from its control socket (`None`: it does not answer).
pub fn vmm_status(state: &Path, vm: &str) -> Option<Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(state.join("vms").join(format!("{vm}.sock"))).ok()?;
    s.write_all(b"{\"op\":\"status\"}\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    Some(v["status"].clone())
}

/// Is process `pid` alive (a zombie is not)?
pub fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(s) => s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Wait until process `pid` has ended.
pub fn wait_gone(pid: u64, within: Duration) {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < within, "process {pid} still runs after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until migration `id` on `a` is active with bytes on the wire (its pre-copy rounds).
pub fn wait_bytes_flowing(a: &Agent, id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let m = a.json(&["migration", id]);
        if m["status"] == "active" && m["transferred_bytes"].as_u64().unwrap_or(0) > 0 {
            return m;
        }
        assert!(!m.is_null() && m["finished_at"].is_null(), "the migration ended before its rounds: {m:#}");
        assert!(t0.elapsed() < Duration::from_secs(120), "never active with bytes flowing: {m:#}\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Subscribe to the agent's event stream and collect the `state` events' statuses until the
/// first terminal one (completed, failed, cancelled). Sleeps 200 ms after subscribing so the
/// subscription is in place before the caller starts the move.
pub fn watch_states(a: &Agent) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(&a.api).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: ferryd\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut states = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).expect("event data is JSON");
                if v["type"] == "state" {
                    let status = v["status"].as_str().expect("a state event has a status").to_string();
                    let end = ["completed", "failed", "cancelled"].contains(&status.as_str());
                    states.push(status);
                    if end {
                        break;
                    }
                }
            }
        }
        states
    });
    // The subscription is in place once the answer's headers came; a moment is enough here.
    std::thread::sleep(Duration::from_millis(200));
    reader
}

/// Ask a VM's VMM process directly (its control socket), as the agent does.
pub fn vmm_call(a: &Agent, vm: &str, req: &str) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(a.state_dir().join("vms").join(format!("{vm}.sock"))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{req}: {v}");
    v["status"].clone()
}

/// Pause the guest, check every disk against what it wrote, resume it: bad sectors per disk,
/// and the disk errors the guest saw.
pub fn check_disks(a: &Agent, vm: &str) -> (Vec<u64>, u64) {
    let st = vmm_call(a, vm, r#"{"op":"check_disks"}"#);
    let bad = st["disk_check"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    (bad, st["disk_guest_errors"].as_u64().unwrap())
}

pub fn disk_paths(a: &Agent, vm: &str) -> Vec<PathBuf> {
    let v = a.json(&["vm", "show", vm]);
    v["disks"].as_array().unwrap().iter().map(|d| PathBuf::from(d["path"].as_str().unwrap())).collect()
}

pub fn allocated(p: &Path) -> u64 {
    ferry_disk::image::allocated_bytes(&std::fs::File::open(p).unwrap()).unwrap()
}

/// A KVM VM of 64 MiB (4 MiB working set) whose guest program uses disk `root` (5000000 bytes,
/// not a multiple of the block) for 256 KiB of request slots, each checked as it is rewritten;
/// `extra_disks` (`NAME:SIZE`) are attached after it and left alone by the guest.
pub fn create_kvm_vm(a: &Agent, name: &str, extra_disks: &[&str]) -> Value {
    let mut args = vec!["vm", "create", "--name", name, "--memory", "64MiB", "--guest", "kvm"];
    args.extend(["--working-set", "4MiB", "--disk", "root:5000000"]);
    for d in extra_disks {
        args.extend(["--disk", d]);
    }
    args.extend(["--disk-working-set", "256KiB"]);
    a.json(&args)
}

/// Create a KVM guest `name` (64 MiB, no disk) on `a`, let it run, move it to `b` and check: the
/// move completed verified, the guest check is ok on `b`, its counter did not go back and keeps
/// counting there.
pub fn move_kvm_guest(a: &Agent, b: &Agent, name: &str) {
    let v = a.json(&["vm", "create", "--name", name, "--memory", "64MiB", "--guest", "kvm", "--working-set", "8MiB"]);
    assert_eq!(v["guest"], "kvm");
    let t0 = Instant::now();
    let c0 = loop {
        let c = a.json(&["vm", "show", name])["guest_counter"].as_u64().unwrap();
        if c >= 2 {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the KVM guest makes no progress");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = a.json(&["move", name, "--to", &b.listen.to_string(), "--wait"]);
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["verified"], true, "{out}");
    let on_b = b.json(&["vm", "show", name]);
    assert_eq!(on_b["guest_check"], "ok", "{on_b}");
    let c1 = on_b["guest_counter"].as_u64().unwrap();
    assert!(c1 >= c0, "the counter went back: {c0} on A, {c1} on B");
    let t0 = Instant::now();
    while b.json(&["vm", "show", name])["guest_counter"].as_u64().unwrap() <= c1 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the guest does not run on B");
        std::thread::sleep(Duration::from_millis(50));
    }
}
