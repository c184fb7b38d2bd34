//! `ferry-harness`: the test harness that starts a KVM guest and migrates it between host processes
//! without an agent (the product command is `ferry`, in `ferry-agent`, talking to `ferryd`).
//!
//! ```text
//! ferry-harness receive --listen ADDR [--count N] [--then-send-to ADDR [--keep-last]] [--json] ...
//! ferry-harness run-and-migrate --to ADDR [--mem 1GiB] [--working-set 64MiB] [--option tcp|zstd]
//!                       [--channels N] [--downtime-ms 300] [--json]
//! ferry-harness pingpong [--mem 1GiB] [--working-set 64MiB] [--trips 10] [--option tcp|zstd] [--json]
//! ferry-harness quick --dir D [--mem 1GiB] [--working-set 64MiB] [--trips 2] [--json]
//! ```
//! Keys: `--psk-file F` (mode 0600) or the environment variable `FERRY_PSK` on both hosts: 32 or more random
//! bytes as hex or base64 (`head -c 32 /dev/urandom | base64`).
//!
//! # How the hosts talk
//! Live migration uses the engine (`ferry_migrate::source::migrate`) over authenticated channels
//! to the destination's `MigrationServer`; the guest's pass counter and checksum travel with its
//! device state. The destination (`receive`) reports what it sees as lines on its standard
//! output (JSON lines with `--json`): `listening`, `arrived` (counter when it got the VM and after
//! it ran a moment, verification errors, checksum check), `sent` (statistics of an onward
//! migration), `report` (periodic guest reports of a VM kept here), `error`, `done`.
//! `pingpong` runs a `receive --then-send-to <itself>` child and reads those lines, so its table
//! holds both sides of every trip.
//!
//! Quick migration needs no network: both processes watch the ownership record in the shared
//! directory (`ferry_migrate::quick`); the owner of a saved VM loads it, runs it a moment, and
//! saves it for the other host. `quick` runs the second host as a `quick-peer` child.
//!
//! # Failures
//! Bad input exits non-zero with a message. A migration that fails before commit leaves the VM
//! running where it was (the engine resumes it); the command says so and exits non-zero.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_memory::reserve::MemoryReserve;
use ferry_migrate::quick::{quick_load_into, quick_save, QuickError, Record, SharedDir, VmRunState};
use ferry_migrate::server::{connect_simple, MigrationServer, RunningServer};
use ferry_migrate::source::{migrate, ConvergeConfig, MigrationConfig};
use ferry_migrate::stats::MigrationStats;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::{SourceVm, VmError};
use ferry_migrate::MigrateError;
use ferry_transport::handshake::{random_bytes, Caps, Psk, ServerConfig};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::PAGE_SIZE;
use ferry_vmm_glue::kvm::guest::{self, stamp};
use ferry_vmm_glue::kvm::{GuestConfig, KvmError, KvmFactory, KvmVm};
use serde_json::{json, Value};

/// Errors of the `ferry-harness` command (the doc comment of each variant says what went wrong).
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The command line or a configuration value is not usable.
    #[error("{0}")]
    Usage(String),
    /// No usable pre-shared key.
    #[error("key: {0}")]
    Key(String),
    /// The KVM VMM failed.
    #[error("KVM: {0}")]
    Kvm(#[from] KvmError),
    /// A live migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] MigrateError),
    /// A quick migration step failed.
    #[error("quick migration: {0}")]
    Quick(#[from] QuickError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer process misbehaved, failed or went away.
    #[error("peer: {0}")]
    Peer(String),
    /// The guest shows a problem: stuck, counter went back, stale or lost pages.
    #[error("guest: {0}")]
    Guest(String),
    /// Interrupted (Ctrl-C / SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

type Result<T, E = CliError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry-harness",
    version,
    about = "Run a KVM guest and live- or quick-migrate it between host processes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Be a destination host: receive VMs, resume them, report their guests, optionally send
    /// them on.
    Receive(ReceiveArgs),
    /// Be a source host: start a VM, let it run, live-migrate it to a `ferry-harness receive`.
    RunAndMigrate(RunArgs),
    /// Live-migrate a running VM back and forth between this process and a child process.
    Pingpong(PingArgs),
    /// Quick-migrate a running VM back and forth through a shared directory (this process and a
    /// child process).
    Quick(QuickArgs),
    /// (internal) The second host of `quick`.
    #[command(hide = true)]
    QuickPeer(QuickPeerArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OptionArg {
    /// One TCP stream per channel, pages raw.
    Tcp,
    /// The same streams, zstd-compressed batches.
    Zstd,
}

impl OptionArg {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Args)]
struct KeyArgs {
    /// File holding the pre-shared key (at least 16 bytes; a trailing newline is ignored).
    /// Without it, the environment variable FERRY_PSK holds the key.
    #[arg(long)]
    psk_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct XportArgs {
    /// Transport option.
    #[arg(long, value_enum, default_value = "tcp")]
    option: OptionArg,
    /// Channels (TCP connections) per migration.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    channels: u16,
    /// Downtime limit: switch over once the remaining dirty pages fit in this pause.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    downtime_ms: u64,
    /// Never throttle the guest (the engine otherwise slows a guest that dirties memory faster
    /// than it can be sent).
    #[arg(long)]
    no_auto_converge: bool,
}

#[derive(Debug, Clone, Args)]
struct GuestArgs {
    /// Guest memory (B, KiB, MiB, GiB; a multiple of 4 KiB, 2 MiB ..= 3 GiB).
    #[arg(long, default_value = "1GiB", value_parser = ferry_memory::size::parse_bytes)]
    mem: u64,
    /// Working set the guest rewrites, pass after pass (a multiple of 4 KiB).
    #[arg(long, default_value = "64MiB", value_parser = ferry_memory::size::parse_bytes)]
    working_set: u64,
    /// PAUSE iterations after each page (0 = as fast as the guest can).
    #[arg(long, default_value_t = 0)]
    delay: u64,
    /// VM id.
    #[arg(long, default_value = "ferry-vm")]
    vm_id: String,
}

#[derive(Debug, Clone, Args)]
struct ReceiveArgs {
    /// Address to listen on for migrations.
    #[arg(long)]
    listen: SocketAddr,
    #[command(flatten)]
    key: KeyArgs,
    /// Receive this many migrations (failed ones count), then stop listening.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: Option<u64>,
    /// Once a received VM ran a moment, live-migrate it to this address.
    #[arg(long)]
    then_send_to: Option<SocketAddr>,
    /// With --then-send-to and --count: keep the last VM here instead of sending it on.
    #[arg(long, requires_all = ["then_send_to", "count"])]
    keep_last: bool,
    #[command(flatten)]
    xport: XportArgs,
    /// Run each received VM at least this long before sending it on.
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
    /// Once --count migrations are done, keep the VMs held here running this long, then stop
    /// them and exit (default: until Ctrl-C).
    #[arg(long)]
    run_for_ms: Option<u64>,
    /// Largest VM accepted.
    #[arg(long, default_value = "3GiB", value_parser = ferry_memory::size::parse_bytes)]
    max_mem: u64,
    /// Keep this much guest memory faulted in ahead of incoming VMs (0: none). Filled before
    /// listening, refilled in the background at idle priority after each VM takes its share.
    #[arg(long, default_value = "0", value_parser = ferry_memory::size::parse_bytes)]
    reserve: u64,
    /// JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// (internal) Die when the parent process dies.
    #[arg(long, hide = true)]
    die_with_parent: bool,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Destination (`ferry receive --listen`).
    #[arg(long)]
    to: SocketAddr,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    xport: XportArgs,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct PingArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// One-way migrations (A->B is one, A->B->A two).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    trips: u32,
    #[command(flatten)]
    xport: XportArgs,
    /// Run the guest at least this long on each host before it moves on.
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct QuickArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The shared directory (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// One-way quick migrations.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    trips: u32,
    /// Run the guest at least this long on each host before it moves on.
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct QuickPeerArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    host: String,
    #[arg(long)]
    peer: String,
    #[arg(long)]
    vm_id: String,
    #[arg(long)]
    trips: u32,
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

static STOP: AtomicBool = AtomicBool::new(false);

fn install_stop_handler() {
    // Only fails if a handler is already installed (then that one serves).
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
}

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        Err(CliError::Interrupted)
    } else {
        Ok(())
    }
}

fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
}

fn load_key(k: &KeyArgs) -> Result<Psk> {
    match &k.psk_file {
        Some(p) => Psk::from_file(p).map_err(|e| CliError::Key(e.to_string())),
        None => match std::env::var_os("FERRY_PSK") {
            Some(v) => Psk::parse(v.as_encoded_bytes()).map_err(|e| CliError::Key(format!("FERRY_PSK: {e}"))),
            None => Err(CliError::Key("no key: give --psk-file FILE or set FERRY_PSK".into())),
        },
    }
}

fn guest_config(g: &GuestArgs) -> Result<GuestConfig> {
    let page = PAGE_SIZE as u64;
    if g.working_set == 0 || !g.working_set.is_multiple_of(page) {
        return Err(CliError::Usage(format!("--working-set {} is not a positive multiple of 4 KiB", g.working_set)));
    }
    if g.working_set.saturating_add(guest::WS_MIN) > g.mem {
        return Err(CliError::Usage(format!(
            "--working-set {:.1} MiB does not fit in --mem {:.1} MiB (the first MiB is the guest's own)",
            mib(g.working_set),
            mib(g.mem)
        )));
    }
    if g.mem > GuestConfig::MAX_MEM || g.mem < (2 << 20) || !g.mem.is_multiple_of(page) {
        return Err(CliError::Usage(format!("--mem {} must be a multiple of 4 KiB in 2 MiB ..= 3 GiB", g.mem)));
    }
    Ok(GuestConfig {
        vm_id: g.vm_id.clone(),
        mem_bytes: g.mem,
        slot_bytes: 256 << 20,
        ws_pages: g.working_set / page,
        delay: g.delay,
        ..Default::default()
    })
}

/// The guest's running checksum, computed pass by pass and cached (the VM reports a growing pass
/// count; each check extends the sum).
#[derive(Default)]
struct Checksums {
    key: (u64, u64, u64),
    passes: u64,
    sum: u64,
}

impl Checksums {
    fn expected(&mut self, ws_base: u64, ws_pages: u64, stride: u64, passes: u64) -> u64 {
        if self.key != (ws_base, ws_pages, stride) || passes < self.passes {
            *self = Self { key: (ws_base, ws_pages, stride), passes: 0, sum: 0 };
        }
        while self.passes < passes {
            let g = self.passes + 1;
            for p in 0..ws_pages {
                let page = ws_base + p * PAGE_SIZE as u64;
                let mut off = 0;
                while off < PAGE_SIZE as u64 {
                    self.sum = self.sum.wrapping_add(stamp(page + off, g));
                    off += stride;
                }
            }
            self.passes = g;
        }
        self.sum
    }
}

/// What a host saw of the guest once it held the VM.
#[derive(Debug, Clone)]
struct GuestCheck {
    /// Pass counter when this host first looked (resumed just before).
    passes_first: u64,
    /// Pass counter after the guest ran here a moment.
    passes_after: u64,
    /// Words the guest found stale or lost, so far.
    errors: u64,
    /// The reported checksum equals the expected one for the reported pass count.
    checksum_ok: bool,
}

impl GuestCheck {
    fn json(&self) -> Value {
        json!({
            "passes_first": self.passes_first,
            "passes_after": self.passes_after,
            "errors": self.errors,
            "checksum_ok": self.checksum_ok,
        })
    }

    fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            passes_first: v.get("passes_first")?.as_u64()?,
            passes_after: v.get("passes_after")?.as_u64()?,
            errors: v.get("errors")?.as_u64()?,
            checksum_ok: v.get("checksum_ok")?.as_bool()?,
        })
    }

    /// Did the guest carry on from `at_pause` (the counter where its old host stopped it) with
    /// no page lost or stale?
    fn problems(&self, at_pause: u64) -> Option<String> {
        let mut p = Vec::new();
        if self.passes_first < at_pause {
            p.push(format!("counter went back: {} at pause, {} after resume", at_pause, self.passes_first));
        }
        if self.passes_after <= self.passes_first {
            p.push(format!("counter did not advance ({})", self.passes_first));
        }
        if self.errors > 0 {
            p.push(format!("guest found {} stale or lost words", self.errors));
        }
        if !self.checksum_ok {
            p.push(format!("checksum does not match {} passes", self.passes_after));
        }
        (!p.is_empty()).then(|| p.join("; "))
    }
}

/// Let the guest run at least `hold` and two more passes, then check what it reports.
fn watch_guest(vm: &KvmVm, hold: Duration, sums: &mut Checksums) -> Result<GuestCheck> {
    let t0 = Instant::now();
    let first = vm.report().passes;
    let deadline = t0 + hold + Duration::from_secs(30);
    let r = loop {
        if let Some(why) = vm.vcpu_failure() {
            return Err(CliError::Guest(format!("vCPU stopped: {why}")));
        }
        let r = vm.report();
        if r.passes >= first + 2 && t0.elapsed() >= hold {
            break r;
        }
        if Instant::now() > deadline {
            return Err(CliError::Guest(format!("stuck at {} passes for 30 s", r.passes)));
        }
        stopped()?;
        std::thread::sleep(Duration::from_millis(2));
    };
    let rd = |o: u64| vm.read_u64(guest::PARAMS + o);
    let (base, pages, stride) = (rd(guest::P_WS_BASE)?, rd(guest::P_WS_PAGES)?, rd(guest::P_STRIDE)?);
    if stride == 0 || stride > PAGE_SIZE as u64 || pages > (4 << 30) / PAGE_SIZE as u64 {
        return Err(CliError::Guest(format!("parameter block is damaged (stride {stride}, {pages} pages)")));
    }
    let checksum_ok = sums.expected(base, pages, stride, r.passes) == r.checksum;
    Ok(GuestCheck { passes_first: first, passes_after: r.passes, errors: r.errors, checksum_ok })
}

fn stats_json(s: &MigrationStats) -> Value {
    json!({
        "status": s.status.name(),
        "total_ms": ms(s.total),
        "setup_ms": ms(s.setup),
        "downtime_ms": ms(s.downtime),
        "expected_downtime_ms": ms(s.expected_downtime),
        "rounds": s.rounds,
        "guest_bytes": s.guest_bytes,
        "transferred_bytes": s.transferred_bytes,
        "zero_pages": s.zero_pages,
        "data_pages": s.data_pages,
        "pages_per_round": s.pages_per_round,
        "dirty_rate_bytes_per_s": s.dirty_rate_bytes_per_s,
        "throttle_pct": s.throttle_pct,
        "verified": s.verified,
        "channels": s.channels.len(),
        "events": s.events,
    })
}

/// Live-migrate `vm` to `to`. On an error before commit the VM runs here again.
fn live_migrate(vm: &mut KvmVm, to: SocketAddr, x: &XportArgs, psk: &Psk) -> Result<MigrationStats> {
    let opts = match x.option {
        OptionArg::Tcp => TcpOptions::default(),
        OptionArg::Zstd => TcpOptions::zstd(),
    };
    let chans = connect_simple(to, usize::from(x.channels), &opts, psk)?;
    let cfg = MigrationConfig {
        converge: ConvergeConfig {
            downtime_limit: Duration::from_millis(x.downtime_ms),
            auto_converge: !x.no_auto_converge,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(migrate(vm, chans, &cfg, &|_| {})?)
}

fn why_not_migrated(e: &CliError, vm: &KvmVm) -> String {
    match e {
        CliError::Migrate(MigrateError::Uncertain(_)) => {
            format!("{e}; the VM stays paused here until the destination is asked who owns it")
        }
        _ if vm.is_running() => format!("{e}; the VM keeps running here (counter {})", vm.report().passes),
        _ => format!("{e}; the VM is not running here"),
    }
}

type Outcomes = mpsc::Receiver<std::result::Result<TargetOutcome, MigrateError>>;

/// A migration server on its own thread; outcomes come out of the receiver.
struct Server {
    addr: SocketAddr,
    outcomes: Outcomes,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(listen: SocketAddr, psk: Psk, factory: KvmFactory, max: Option<usize>) -> Result<Self> {
        let hs = ServerConfig {
            creds: psk.into(),
            caps: Caps::ALL,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let acc = TcpAcceptor::bind(listen, TcpOptions::default(), hs)
            .map_err(|e| CliError::Usage(format!("cannot listen on {listen}: {e}")))?;
        let srv = MigrationServer::new(acc, Arc::new(factory), TargetConfig::default()).spawn(max)?;
        let RunningServer { addr, outcomes, stop, thread } = srv;
        Ok(Self { addr, outcomes, stop, thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn into_kvm(o: TargetOutcome) -> Result<KvmVm> {
    let any: Box<dyn std::any::Any> = o.vm.into_any();
    any.downcast::<KvmVm>().map(|b| *b).map_err(|_| CliError::Peer("received VM is not a KVM VM".into()))
}

/// Output of `receive`: JSON lines or text.
struct Out {
    json: bool,
}

impl Out {
    fn event(&self, v: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{}", text());
        }
    }
}

fn receive(a: ReceiveArgs) -> Result<()> {
    if a.die_with_parent {
        die_with_parent();
    }
    install_stop_handler();
    let psk = load_key(&a.key)?;
    let mut factory = KvmFactory::new(a.max_mem);
    let mut reserve = None;
    if a.reserve > 0 {
        let r = Arc::new(MemoryReserve::new(a.reserve as usize));
        reserve = Some(r.clone());
        let t = Instant::now();
        r.fill().map_err(|e| CliError::Usage(format!("filling the memory reserve: {e}")))?;
        eprintln!("memory reserve: {} MiB ready in {:.2} s", a.reserve >> 20, t.elapsed().as_secs_f64());
        r.start_refill();
        factory = factory.with_reserve(r);
    }
    let count = a.count.map(|c| c as usize);
    let srv = Server::start(a.listen, psk.clone(), factory, count)?;
    let out = Out { json: a.json };
    out.event(json!({"event": "listening", "addr": srv.addr.to_string()}), || format!("listening on {}", srv.addr));
    let mut sums = Checksums::default();
    let mut finished = 0usize;
    let mut failures = 0u64;
    let mut kept: Vec<KvmVm> = Vec::new();
    let mut done_at: Option<Instant> = None;
    let mut last_log = Instant::now();
    let mut server_done = false;
    loop {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        if count.is_some_and(|c| finished >= c) {
            let t = *done_at.get_or_insert_with(Instant::now);
            if kept.is_empty() || a.run_for_ms.is_some_and(|r| t.elapsed() >= Duration::from_millis(r)) {
                break;
            }
        }
        let next = if server_done {
            std::thread::sleep(Duration::from_millis(100));
            Err(mpsc::RecvTimeoutError::Timeout)
        } else {
            srv.outcomes.recv_timeout(Duration::from_millis(100))
        };
        let o = match next {
            Ok(o) => o,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if last_log.elapsed() >= Duration::from_secs(1) {
                    last_log = Instant::now();
                    for vm in &kept {
                        let r = vm.report();
                        out.event(
                            json!({"event": "report", "vm": vm.id(), "passes": r.passes, "checksum": r.checksum,
                                   "errors": r.errors, "running": vm.is_running()}),
                            || {
                                format!(
                                    "{}: counter {}, checksum {:#018x}, errors {}",
                                    vm.id(),
                                    r.passes,
                                    r.checksum,
                                    r.errors
                                )
                            },
                        );
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The server served its --count; VMs kept here run on until --run-for-ms / Ctrl-C.
                server_done = true;
                if kept.is_empty() {
                    break;
                }
                continue;
            }
        };
        finished += 1;
        let outcome = match o {
            Ok(o) => o,
            Err(e) => {
                failures += 1;
                out.event(json!({"event": "error", "what": "incoming migration", "error": e.to_string()}), || {
                    format!("incoming migration failed (nothing runs here): {e}")
                });
                continue;
            }
        };
        let ts = outcome.stats.clone();
        let mut vm = into_kvm(outcome)?;
        let check = match watch_guest(&vm, Duration::from_millis(a.hold_ms), &mut sums) {
            Ok(c) => c,
            Err(CliError::Interrupted) => {
                kept.push(vm);
                break;
            }
            Err(e) => {
                failures += 1;
                out.event(json!({"event": "error", "what": "guest", "vm": vm.id(), "error": e.to_string()}), || {
                    format!("{}: {e}", vm.id())
                });
                kept.push(vm);
                continue;
            }
        };
        if check.errors > 0 || !check.checksum_ok {
            failures += 1;
        }
        out.event(
            json!({"event": "arrived", "vm": vm.id(), "n": finished, "guest": check.json(),
                   "pages": ts.pages, "wire_bytes": ts.wire_bytes, "channels": ts.channels,
                   "verified": ts.verified, "verify_ms": ms(ts.verify)}),
            || {
                format!(
                    "received {} ({:.0} MiB on {} channels, verified {}): counter {} at resume, {} after {} ms; \
                     errors {}, checksum {}",
                    vm.id(),
                    mib(ts.wire_bytes),
                    ts.channels,
                    ts.verified,
                    check.passes_first,
                    check.passes_after,
                    a.hold_ms,
                    check.errors,
                    if check.checksum_ok { "ok" } else { "WRONG" }
                )
            },
        );
        let keep_this = a.keep_last && count.is_some_and(|c| finished >= c);
        let Some(to) = a.then_send_to.filter(|_| !keep_this) else {
            kept.push(vm);
            continue;
        };
        match live_migrate(&mut vm, to, &a.xport, &psk) {
            Ok(st) => {
                let r = vm.report();
                out.event(
                    json!({"event": "sent", "vm": vm.id(), "to": to.to_string(), "passes_at_pause": r.passes,
                           "errors_at_pause": r.errors, "stats": stats_json(&st)}),
                    || {
                        format!(
                            "sent {} to {to}: total {:.0} ms, downtime {:.1} ms, {} rounds, {:.0} MiB, verified {}; \
                             counter {} at pause",
                            vm.id(),
                            ms(st.total),
                            ms(st.downtime),
                            st.rounds,
                            mib(st.transferred_bytes),
                            st.verified,
                            r.passes
                        )
                    },
                );
                drop(vm);
            }
            Err(e) => {
                failures += 1;
                let msg = why_not_migrated(&e, &vm);
                out.event(json!({"event": "error", "what": "send", "vm": vm.id(), "error": msg}), || {
                    format!("sending {} to {to} failed: {msg}", vm.id())
                });
                kept.push(vm);
            }
        }
    }
    for vm in &mut kept {
        let _ = vm.stop();
    }
    let interrupted = STOP.load(Ordering::SeqCst);
    let rs = reserve.as_ref().map(|r| r.stats());
    let reserve_json = rs.map(|s| json!({"hits": s.hits, "misses": s.misses, "filled_bytes": s.filled_bytes}));
    out.event(
        json!({"event": "done", "received": finished, "failures": failures, "interrupted": interrupted,
               "reserve": reserve_json}),
        || {
            let r = rs.map_or(String::new(), |s| format!("; memory reserve: {} hits, {} misses", s.hits, s.misses));
            format!("done: {finished} migrations received, {failures} failures{r}")
        },
    );
    drop(kept);
    drop(srv);
    if failures > 0 {
        return Err(CliError::Peer(format!("{failures} failures (see above)")));
    }
    Ok(())
}

fn boot(cfg: &GuestConfig, warmup: Duration) -> Result<KvmVm> {
    let mut vm = KvmVm::boot(cfg)?;
    vm.start()?;
    let t0 = Instant::now();
    let deadline = t0 + warmup + Duration::from_secs(30);
    while vm.report().passes < 3 || t0.elapsed() < warmup {
        if let Some(why) = vm.vcpu_failure() {
            return Err(CliError::Guest(format!("vCPU stopped: {why}")));
        }
        if Instant::now() > deadline {
            return Err(CliError::Guest("the guest made no progress in 30 s".into()));
        }
        stopped()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(vm)
}

fn run_and_migrate(a: RunArgs) -> Result<()> {
    install_stop_handler();
    let cfg = guest_config(&a.guest)?;
    let psk = load_key(&a.key)?;
    let mut vm = boot(&cfg, Duration::from_millis(a.warmup_ms))?;
    let before = vm.report();
    let st = match live_migrate(&mut vm, a.to, &a.xport, &psk) {
        Ok(st) => st,
        Err(e) => return Err(CliError::Peer(why_not_migrated(&e, &vm))),
    };
    let at_pause = vm.report();
    drop(vm);
    if a.json {
        println!(
            "{}",
            json!({"vm": cfg.vm_id, "to": a.to.to_string(), "option": a.xport.option.name(),
                   "channels": a.xport.channels, "mem_bytes": cfg.mem_bytes,
                   "working_set_bytes": cfg.ws_pages * PAGE_SIZE as u64,
                   "passes_before": before.passes, "passes_at_pause": at_pause.passes,
                   "errors_at_pause": at_pause.errors, "stats": stats_json(&st)})
        );
    } else {
        println!(
            "migrated {} ({:.0} MiB, working set {:.0} MiB) to {} over {} x{}",
            cfg.vm_id,
            mib(cfg.mem_bytes),
            mib(cfg.ws_pages * PAGE_SIZE as u64),
            a.to,
            a.xport.option.name(),
            a.xport.channels
        );
        println!(
            "total {:.0} ms, setup {:.1} ms, downtime {:.1} ms, rounds {}, transferred {:.1} MiB, verified {}",
            ms(st.total),
            ms(st.setup),
            ms(st.downtime),
            st.rounds,
            mib(st.transferred_bytes),
            st.verified
        );
        println!(
            "guest counter {} when the migration began, {} at pause (the destination prints it after resume)",
            before.passes, at_pause.passes
        );
    }
    Ok(())
}

/// A child `ferry-harness` process whose stdout lines are parsed as JSON events; killed when dropped.
struct Peer {
    child: Child,
    events: mpsc::Receiver<Value>,
    reader: Option<JoinHandle<()>>,
}

impl Peer {
    fn spawn(args: &[String], envs: &[(&str, String)]) -> Result<Self> {
        let exe = std::env::current_exe().map_err(io("find the ferry executable"))?;
        let mut cmd = Command::new(exe);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(io("start the peer process"))?;
        let stdout: ChildStdout =
            child.stdout.take().ok_or_else(|| CliError::Peer("the peer process has no stdout".into()))?;
        let (tx, events) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str::<Value>(&line).unwrap_or_else(
                    |_| json!({"event": "unparsed", "line": line.chars().take(500).collect::<String>()}),
                );
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, events, reader: Some(reader) })
    }

    /// The next event named `name`, within `timeout` (other events are skipped; an `error` event or
    /// a line that is not JSON fails).
    fn expect(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            stopped()?;
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(v) => {
                    let ev = v.get("event").and_then(Value::as_str).unwrap_or("");
                    if ev == name {
                        return Ok(v);
                    }
                    if ev == "error" || ev == "unparsed" {
                        return Err(CliError::Peer(format!("{v}")));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(CliError::Peer(format!("exited ({st}) while {name:?} was expected")));
                }
            }
            if Instant::now() > deadline {
                return Err(CliError::Peer(format!("no {name:?} within {timeout:?}")));
            }
        }
    }

    /// Wait for the peer to exit by itself; it must succeed.
    fn finish(mut self, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait().map_err(io("wait for the peer"))? {
                Some(st) => {
                    if let Some(r) = self.reader.take() {
                        let _ = r.join();
                    }
                    let rest: Vec<Value> = self.events.try_iter().collect();
                    if !st.success() {
                        return Err(CliError::Peer(format!("exited with {st}; last events: {rest:?}")));
                    }
                    return Ok(rest);
                }
                None if Instant::now() > deadline => {
                    return Err(CliError::Peer(format!("did not exit within {timeout:?}")));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[derive(Debug, Clone)]
struct TripRow {
    trip: u32,
    from: &'static str,
    to: &'static str,
    stats: Value,
    at_pause: u64,
    check: GuestCheck,
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn pingpong(a: PingArgs) -> Result<()> {
    install_stop_handler();
    let cfg = guest_config(&a.guest)?;
    let key: [u8; 32] = random_bytes();
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let psk = Psk::parse(key_hex.as_bytes()).map_err(|e| CliError::Key(e.to_string()))?;
    let back = (a.trips / 2) as usize; // VMs that come back here
    let factory = KvmFactory::new(cfg.mem_bytes);
    let srv =
        Server::start("127.0.0.1:0".parse().expect("a socket address"), psk.clone(), factory.clone(), Some(back))?;
    let to_b = a.trips.div_ceil(2);
    let mut args: Vec<String> = [
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--json",
        "--die-with-parent",
        "--then-send-to",
        &srv.addr.to_string(),
        "--count",
        &to_b.to_string(),
        "--option",
        a.xport.option.name(),
        "--channels",
        &a.xport.channels.to_string(),
        "--downtime-ms",
        &a.xport.downtime_ms.to_string(),
        "--hold-ms",
        &a.hold_ms.to_string(),
        "--max-mem",
        &cfg.mem_bytes.to_string(),
        "--run-for-ms",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if a.trips % 2 == 1 {
        args.push("--keep-last".into());
    }
    if a.xport.no_auto_converge {
        args.push("--no-auto-converge".into());
    }
    let mut peer = Peer::spawn(&args, &[("FERRY_PSK", key_hex)])?;
    let l = peer.expect("listening", Duration::from_secs(20))?;
    let addr_b: SocketAddr = l
        .get("addr")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CliError::Peer(format!("bad listening event {l}")))?;
    let mut vm = Some(boot(&cfg, Duration::from_millis(a.hold_ms))?);
    if let Some(v) = vm.as_mut() {
        factory.adopt(v)?;
    }
    let mut sums = Checksums::default();
    let mut rows = Vec::new();
    let step_timeout = Duration::from_secs(120);
    for trip in 1..=a.trips {
        let row = if trip % 2 == 1 {
            let mut v = vm.take().ok_or(CliError::Peer("the VM is not here".into()))?;
            let st = match live_migrate(&mut v, addr_b, &a.xport, &psk) {
                Ok(st) => st,
                Err(e) => return Err(CliError::Peer(format!("trip {trip}: {}", why_not_migrated(&e, &v)))),
            };
            let at_pause = v.report().passes;
            drop(v);
            let ev = peer.expect("arrived", step_timeout)?;
            let check = ev
                .get("guest")
                .and_then(GuestCheck::from_json)
                .ok_or_else(|| CliError::Peer(format!("bad arrived event {ev}")))?;
            TripRow { trip, from: "A", to: "B", stats: stats_json(&st), at_pause, check }
        } else {
            let ev = peer.expect("sent", step_timeout)?;
            let at_pause = ev.get("passes_at_pause").and_then(Value::as_u64).unwrap_or(u64::MAX);
            let o = srv
                .outcomes
                .recv_timeout(step_timeout)
                .map_err(|_| CliError::Peer(format!("trip {trip}: the VM did not come back")))??;
            let v = into_kvm(o)?;
            let check = watch_guest(&v, Duration::from_millis(a.hold_ms), &mut sums)?;
            vm = Some(v);
            TripRow {
                trip,
                from: "B",
                to: "A",
                stats: ev.get("stats").cloned().unwrap_or(Value::Null),
                at_pause,
                check,
            }
        };
        if !a.json {
            print_trip_row(&row, rows.is_empty());
        }
        let problem = row.check.problems(row.at_pause);
        rows.push(row);
        if let Some(p) = problem {
            return Err(CliError::Guest(format!("trip {trip}: {p}")));
        }
    }
    if let Some(v) = vm.as_mut() {
        v.stop()?;
    }
    drop(vm);
    peer.finish(Duration::from_secs(30))?;
    drop(srv);
    let downs: Vec<f64> = rows.iter().map(|r| f(&r.stats, "downtime_ms")).collect();
    let max_down = downs.iter().cloned().fold(0.0, f64::max);
    let mut sorted = downs.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let all_verified = rows.iter().all(|r| r.stats.get("verified").and_then(Value::as_bool) == Some(true));
    let last = rows.last().map(|r| r.check.passes_after).unwrap_or(0);
    if a.json {
        let trips: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"trip": r.trip, "from": r.from, "to": r.to, "stats": r.stats,
                       "passes_at_pause": r.at_pause, "guest": r.check.json()})
            })
            .collect();
        println!(
            "{}",
            json!({"mode": "live", "option": a.xport.option.name(), "channels": a.xport.channels,
                   "mem_bytes": cfg.mem_bytes, "working_set_bytes": cfg.ws_pages * PAGE_SIZE as u64,
                   "downtime_limit_ms": a.xport.downtime_ms, "trips": trips,
                   "summary": {"trips": rows.len(), "downtime_ms_max": max_down, "downtime_ms_median": median,
                               "all_verified": all_verified, "corruption": false, "counter_continued": true,
                               "final_passes": last}})
        );
    } else {
        println!("ctr_pause: guest counter when the source paused it; ctr_first: the destination's first look");
        println!("after resume; ctr_after: after it ran there (>= --hold-ms). checksum: reported vs expected.");
        println!(
            "{} trips over {} x{}: downtime median {median:.1} ms, max {max_down:.1} ms; all verified: {all_verified}; \
             counter always continued, no corruption (final counter {last})",
            rows.len(),
            a.xport.option.name(),
            a.xport.channels
        );
    }
    Ok(())
}

fn print_trip_row(r: &TripRow, header: bool) {
    if header {
        println!(
            "{:>4} {:>4} {:>9} {:>9} {:>8} {:>6} {:>9} {:>8} {:>10} {:>10} {:>10} {:>6} {:>8}",
            "trip",
            "dir",
            "total_ms",
            "setup_ms",
            "down_ms",
            "rounds",
            "moved_MiB",
            "verified",
            "ctr_pause",
            "ctr_first",
            "ctr_after",
            "errors",
            "checksum"
        );
    }
    let s = &r.stats;
    println!(
        "{:>4} {:>4} {:>9.0} {:>9.1} {:>8.1} {:>6} {:>9.1} {:>8} {:>10} {:>10} {:>10} {:>6} {:>8}",
        r.trip,
        format!("{}>{}", r.from, r.to),
        f(s, "total_ms"),
        f(s, "setup_ms"),
        f(s, "downtime_ms"),
        s.get("rounds").and_then(Value::as_u64).unwrap_or(0),
        mib(s.get("transferred_bytes").and_then(Value::as_u64).unwrap_or(0)),
        s.get("verified").and_then(Value::as_bool).unwrap_or(false),
        r.at_pause,
        r.check.passes_first,
        r.check.passes_after,
        r.check.errors,
        if r.check.checksum_ok { "ok" } else { "WRONG" }
    );
}

/// One host of a quick migration ping-pong: alternately (load, run, check) and (run, save for
/// the peer), coordinated only by the ownership record. Emits one event per step.
struct QuickHost<'a> {
    dir: SharedDir,
    me: &'a str,
    peer: &'a str,
    vm_id: &'a str,
    trips: u32,
    hold: Duration,
    factory: KvmFactory,
    sums: Checksums,
}

impl QuickHost<'_> {
    fn run(
        &mut self,
        mut vm: Option<KvmVm>,
        emit: &mut dyn FnMut(Value),
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut k = 0u32;
        loop {
            if let Some(mut v) = vm.take() {
                if k == self.trips {
                    v.stop()?;
                    let rec = self.dir.record(self.vm_id)?;
                    let off = Record { owner: self.me.into(), state: VmRunState::Off, epoch: 0, image: None };
                    self.dir.transition(self.vm_id, self.me, &rec, off)?;
                    emit(json!({"event": "final", "host": self.me, "passes": v.report().passes}));
                    return Ok(());
                }
                let paused_at = unix_us();
                let s = match quick_save(&self.dir, &mut v, self.me, self.peer) {
                    Ok(s) => s,
                    Err(e) => {
                        let state = if v.is_running() { "keeps running here" } else { "is not running here" };
                        return Err(CliError::Peer(format!("trip {}: save failed: {e}; the VM {state}", k + 1)));
                    }
                };
                k += 1;
                let r = v.report();
                drop(v);
                emit(json!({"event": "saved", "trip": k, "host": self.me, "save_ms": ms(s.total),
                            "pause_ms": ms(s.pause), "file_bytes": s.file_bytes, "pages_stored": s.pages_stored,
                            "pages_total": s.pages_total, "state_bytes": s.state_bytes,
                            "passes_at_save": r.passes, "errors_at_save": r.errors, "paused_at_us": paused_at}));
                if k == self.trips {
                    return Ok(());
                }
            } else {
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    stopped()?;
                    alive()?;
                    match self.dir.record(self.vm_id) {
                        Ok(r) if r.owner == self.me && r.state == VmRunState::Saved => break,
                        Ok(_) => {}
                        Err(QuickError::BadRecord(_)) | Err(QuickError::Io { .. }) => {} // mid-rename
                        Err(e) => return Err(e.into()),
                    }
                    if Instant::now() > deadline {
                        return Err(CliError::Peer(format!("trip {}: the VM was not handed over in 120 s", k + 1)));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let f = self.factory.clone();
                let (v, l) = quick_load_into(&self.dir, self.vm_id, self.me, |shape| {
                    f.create_vm(shape).map_err(|e| Box::new(e) as VmError)
                })?;
                let resumed_at = unix_us();
                k += 1;
                let check = watch_guest(&v, self.hold, &mut self.sums)?;
                emit(json!({"event": "loaded", "trip": k, "host": self.me, "load_ms": ms(l.total),
                            "file_bytes": l.file_bytes, "pages_loaded": l.pages_loaded,
                            "resumed_at_us": resumed_at, "guest": check.json()}));
                vm = Some(v);
            }
        }
    }
}

fn quick_peer(a: QuickPeerArgs) -> Result<()> {
    die_with_parent();
    install_stop_handler();
    let mut h = QuickHost {
        dir: SharedDir::new(&a.dir),
        me: &a.host,
        peer: &a.peer,
        vm_id: &a.vm_id,
        trips: a.trips,
        hold: Duration::from_millis(a.hold_ms),
        factory: KvmFactory::new(GuestConfig::MAX_MEM),
        sums: Checksums::default(),
    };
    let r = h.run(None, &mut |v| println!("{v}"), &mut || Ok(()));
    if let Err(e) = &r {
        println!("{}", json!({"event": "error", "error": e.to_string()}));
    }
    r
}

fn quick(a: QuickArgs) -> Result<()> {
    install_stop_handler();
    let cfg = guest_config(&a.guest)?;
    std::fs::create_dir_all(&a.dir).map_err(io(format!("create {}", a.dir.display())))?;
    let dir = SharedDir::new(&a.dir);
    let pid = std::process::id();
    let (me, peer_name) = (format!("host-a-{pid}"), format!("host-b-{pid}"));
    dir.register(&cfg.vm_id, &me, VmRunState::Running)?;
    let result = quick_inner(&a, &cfg, &dir, &me, &peer_name);
    // The record is this run's; remove it once the VM is off (or was never started).
    if let Ok(r) = dir.record(&cfg.vm_id) {
        if r.state != VmRunState::Saved && (result.is_ok() || r.owner == me) {
            let _ = std::fs::remove_file(a.dir.join(format!("{}.owner", cfg.vm_id)));
        }
    }
    result
}

fn quick_inner(a: &QuickArgs, cfg: &GuestConfig, dir: &SharedDir, me: &str, peer_name: &str) -> Result<()> {
    let args: Vec<String> = [
        "quick-peer",
        "--dir",
        &a.dir.to_string_lossy(),
        "--host",
        peer_name,
        "--peer",
        me,
        "--vm-id",
        &cfg.vm_id,
        "--trips",
        &a.trips.to_string(),
        "--hold-ms",
        &a.hold_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = boot(cfg, Duration::from_millis(a.hold_ms))?;
    let factory = KvmFactory::new(cfg.mem_bytes);
    factory.adopt(&mut vm)?;
    let peer = Arc::new(Mutex::new(Peer::spawn(&args, &[])?));
    let mut mine = Vec::new();
    let mut host = QuickHost {
        dir: dir.clone(),
        me,
        peer: peer_name,
        vm_id: &cfg.vm_id,
        trips: a.trips,
        hold: Duration::from_millis(a.hold_ms),
        factory,
        sums: Checksums::default(),
    };
    let p2 = peer.clone();
    let mut alive = move || -> Result<()> {
        let mut p = p2.lock().map_err(|_| CliError::Peer("poisoned".into()))?;
        if let Some(st) = p.child.try_wait().map_err(io("wait for the peer"))? {
            let ev: Vec<Value> = p.events.try_iter().collect();
            return Err(CliError::Peer(format!("exited ({st}): {ev:?}")));
        }
        Ok(())
    };
    host.run(Some(vm), &mut |v| mine.push(v), &mut alive)?;
    drop(alive);
    let peer = Arc::try_unwrap(peer)
        .map_err(|_| CliError::Peer("still shared".into()))?
        .into_inner()
        .map_err(|_| CliError::Peer("poisoned".into()))?;
    let theirs = peer.finish(Duration::from_secs(60))?;
    let all: Vec<Value> = mine.into_iter().chain(theirs).collect();
    let find = |ev: &str, trip: u32| {
        all.iter()
            .find(|v| v.get("event").and_then(Value::as_str) == Some(ev) && v["trip"].as_u64() == Some(u64::from(trip)))
    };
    let mut rows = Vec::new();
    for trip in 1..=a.trips {
        let (Some(s), Some(l)) = (find("saved", trip), find("loaded", trip)) else {
            return Err(CliError::Peer(format!("trip {trip}: events missing")));
        };
        let check = l.get("guest").and_then(GuestCheck::from_json).ok_or(CliError::Peer("bad loaded event".into()))?;
        let at_save = s["passes_at_save"].as_u64().unwrap_or(u64::MAX);
        if let Some(p) = check.problems(at_save) {
            return Err(CliError::Guest(format!("trip {trip}: {p}")));
        }
        let (save, load) = (f(s, "save_ms"), f(l, "load_ms"));
        let wall =
            (l["resumed_at_us"].as_u64().unwrap_or(0) as f64 - s["paused_at_us"].as_u64().unwrap_or(0) as f64) / 1e3;
        rows.push(json!({"trip": trip, "from": if trip % 2 == 1 { "A" } else { "B" },
                         "to": if trip % 2 == 1 { "B" } else { "A" },
                         "save_ms": save, "pause_ms": f(s, "pause_ms"), "load_ms": load, "total_ms": save + load,
                         "paused_to_resumed_ms": wall, "file_bytes": s["file_bytes"], "pages_stored": s["pages_stored"],
                         "pages_total": s["pages_total"], "state_bytes": s["state_bytes"],
                         "passes_at_save": at_save, "guest": check.json()}));
    }
    if a.json {
        println!(
            "{}",
            json!({"mode": "quick", "dir": a.dir.to_string_lossy(), "mem_bytes": cfg.mem_bytes,
                   "working_set_bytes": cfg.ws_pages * PAGE_SIZE as u64, "trips": rows})
        );
    } else {
        println!(
            "{:>4} {:>4} {:>8} {:>8} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>6} {:>8}",
            "trip",
            "dir",
            "save_ms",
            "load_ms",
            "total_ms",
            "wall_ms",
            "file_MiB",
            "ctr_save",
            "ctr_first",
            "ctr_after",
            "errors",
            "checksum"
        );
        for r in &rows {
            let g = &r["guest"];
            println!(
                "{:>4} {:>4} {:>8.1} {:>8.1} {:>9.1} {:>10.1} {:>9.1} {:>10} {:>10} {:>10} {:>6} {:>8}",
                r["trip"].as_u64().unwrap_or(0),
                format!("{}>{}", r["from"].as_str().unwrap_or("?"), r["to"].as_str().unwrap_or("?")),
                f(r, "save_ms"),
                f(r, "load_ms"),
                f(r, "total_ms"),
                f(r, "paused_to_resumed_ms"),
                mib(r["file_bytes"].as_u64().unwrap_or(0)),
                r["passes_at_save"].as_u64().unwrap_or(0),
                g["passes_first"].as_u64().unwrap_or(0),
                g["passes_after"].as_u64().unwrap_or(0),
                g["errors"].as_u64().unwrap_or(0),
                if g["checksum_ok"].as_bool() == Some(true) { "ok" } else { "WRONG" }
            );
        }
        println!("save = pause + state + image + fsync + record; load = read + restore + record + resume;");
        println!("wall = source pause to target resume (includes the target noticing the record).");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Receive(a) => receive(a),
        Cmd::RunAndMigrate(a) => run_and_migrate(a),
        Cmd::Pingpong(a) => pingpong(a),
        Cmd::Quick(a) => quick(a),
        Cmd::QuickPeer(a) => quick_peer(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            ExitCode::FAILURE
        }
    }
}
