//! `migration-bench stream`: a page set streamed from a source process to a destination process
//! over one channel of the `tcp` or `zstd` option, on real sockets.
//!
//! ```text
//!  driver (migration-bench stream)
//!    | spawns                                  | spawns
//!    v                                         v
//!  stream-dst                                stream-src
//!    map + prefault sink memory                map + fill the page set (seed, mix)
//!    bind, print "LISTENING <addr>"            print "READY"
//!    <---------------- driver writes "GO <addr>" to the source's stdin
//!    accept + handshake  <------------------   connect + handshake (PSK from the environment)
//!    recv batch -> memory, send ack   <----    send batches (window of unacked batches),
//!          ... ---------------------------->   acks read on a second thread; clock stops at
//!                                              the last ack
//!    <---------------------------------------- Goodbye
//!    verify every page against the expected
//!    content, print "RESULT {json}"            print "RESULT {json}"
//! ```
//!
//! Nothing that is not network time is timed: the source fills its memory and the destination
//! prefaults its sink before the clock starts (a fresh page fault costs 2-13 us here, more than
//! the page's time on the wire), and verification happens after it stops. CPU time is each
//! process's own `getrusage` over its timed phase.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Psk, ServerConfig, SessionId};
use ferry_transport::memory::{AnonMemory, MemoryMap};
use ferry_transport::pagemix::{expected_page, fill_page, Mix, PageKind};
use ferry_transport::tcp::{self, TcpAcceptor, TcpOptions};
use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, MAX_BATCH_PAGES, PAGE_SIZE};
use ferry_transport::{Channel, Incoming};
use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};
use crate::procstat::Usage;
use crate::testbed::{in_netns, register_child, unregister_child, Side, Testbed};
use crate::units::parse_size;

/// Environment variable that carries the pre-shared key (hex) from the driver to its children.
pub const PSK_ENV: &str = "FERRY_BENCH_PSK";

/// Time allowed for a channel handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A transport option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportOption {
    /// One TCP stream, pages raw.
    Tcp,
    /// The same stream, batches compressed with zstd where that pays: per batch, compressed or
    /// raw by which has been delivering faster.
    Zstd,
    /// zstd on every batch (raw only where compressing saves less than 1/8).
    #[value(name = "zstd-always")]
    #[serde(rename = "zstd-always")]
    ZstdAlways,
}

impl TransportOption {
    /// Name as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Zstd => "zstd",
            Self::ZstdAlways => "zstd-always",
        }
    }
}

fn parse_mix(s: &str) -> std::result::Result<Mix, String> {
    s.parse()
}

/// What the two children are told (the driver turns a [`StreamConfig`] into these arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// Bytes of guest memory.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Page mixture.
    #[arg(long, value_parser = parse_mix)]
    pub mix: Mix,
    /// Seed of the page contents.
    #[arg(long)]
    pub seed: u64,
    /// Transport option.
    #[arg(long, value_enum)]
    pub option: TransportOption,
    /// zstd level.
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Pages per batch.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH_PAGES)))]
    pub batch_pages: u32,
    /// Most unacknowledged batches.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub window: u32,
    /// Session id, 32 hex digits.
    #[arg(long)]
    pub session: String,
}

/// One stream run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamConfig {
    /// Bytes of guest memory (a multiple of the page size).
    pub size: u64,
    /// Page mixture.
    pub mix: Mix,
    /// Seed of the page contents.
    pub seed: u64,
    /// Transport option.
    pub option: TransportOption,
    /// zstd level (zstd only).
    pub zstd_level: i32,
    /// Pages per batch (1..=1024).
    pub batch_pages: u32,
    /// Most batches sent and not yet acknowledged.
    pub window: u32,
}

impl StreamConfig {
    /// Check the numbers.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 || self.size % PAGE_SIZE as u64 != 0 {
            return Err(BenchError::Usage(format!("size {} is not a positive multiple of 4 KiB", self.size)));
        }
        if usize::try_from(self.size).is_err() {
            return Err(BenchError::Usage("size does not fit this machine's address space".into()));
        }
        if self.batch_pages == 0 || self.batch_pages > MAX_BATCH_PAGES {
            return Err(BenchError::Usage(format!("batch pages must be 1..={MAX_BATCH_PAGES}")));
        }
        if self.window == 0 {
            return Err(BenchError::Usage("window must be at least 1".into()));
        }
        if !(-131_072..=22).contains(&self.zstd_level) {
            return Err(BenchError::Usage(format!("zstd level {} is outside -131072..=22", self.zstd_level)));
        }
        Ok(())
    }

    fn child_args(&self, session: &SessionId) -> Vec<String> {
        vec![
            "--size".into(),
            self.size.to_string(),
            "--mix".into(),
            self.mix.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--option".into(),
            self.option.as_str().into(),
            "--zstd-level".into(),
            self.zstd_level.to_string(),
            "--batch-pages".into(),
            self.batch_pages.to_string(),
            "--window".into(),
            self.window.to_string(),
            "--session".into(),
            hex(session),
        ]
    }

    fn tcp_options(&self) -> TcpOptions {
        match self.option {
            TransportOption::Tcp => TcpOptions::default(),
            TransportOption::Zstd => TcpOptions { zstd_level: Some(self.zstd_level), ..TcpOptions::zstd() },
            TransportOption::ZstdAlways => {
                TcpOptions { zstd_level: Some(self.zstd_level), adaptive: false, ..TcpOptions::zstd() }
            }
        }
    }

    fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

impl ChildArgs {
    fn config(&self) -> Result<(StreamConfig, SessionId)> {
        let cfg = StreamConfig {
            size: self.size,
            mix: self.mix,
            seed: self.seed,
            option: self.option,
            zstd_level: self.zstd_level,
            batch_pages: self.batch_pages,
            window: self.window,
        };
        cfg.validate()?;
        let s =
            unhex(&self.session).filter(|s| s.len() == 16).ok_or_else(|| BenchError::Usage("bad --session".into()))?;
        let mut session = [0u8; 16];
        session.copy_from_slice(&s);
        Ok((cfg, session))
    }
}

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

/// What the source reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SrcReport {
    /// First batch sent to last ack received.
    pub seconds: f64,
    /// Bytes written to the channel.
    pub wire_bytes: u64,
    /// Batches sent.
    pub batches: u64,
    /// Batches that went compressed.
    pub compressed_batches: u64,
    /// Pages sent as data.
    pub data_pages: u64,
    /// Pages sent as a zero bit.
    pub zero_pages: u64,
    /// CPU seconds in the timed phase.
    pub cpu_s: f64,
    /// Peak RSS, bytes.
    pub peak_rss_bytes: u64,
    /// Seconds spent filling memory before the clock started.
    pub fill_seconds: f64,
}

/// What the destination reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DstReport {
    /// Pages received (zero pages included).
    pub pages: u64,
    /// Batches received.
    pub batches: u64,
    /// Bytes taken from the channel.
    pub wire_bytes: u64,
    /// First batch received to Goodbye.
    pub seconds: f64,
    /// CPU seconds in the timed phase.
    pub cpu_s: f64,
    /// Peak RSS, bytes.
    pub peak_rss_bytes: u64,
    /// Every page matched its expected content and every page arrived.
    pub verified: bool,
    /// Pages that did not match.
    pub mismatched_pages: u64,
    /// Index of the first page that did not match.
    pub first_mismatch: Option<u64>,
    /// Seconds spent verifying (after the clock stopped).
    pub verify_seconds: f64,
}

fn threads() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8)
}

/// Fill `mem` with the page set (zero pages left as they are: fresh memory is zero).
fn fill(mem: &AnonMemory, mix: &Mix, seed: u64) {
    let pages = (mem.len() / PAGE_SIZE) as u64;
    let t = threads() as u64;
    let per = pages.div_ceil(t);
    thread::scope(|s| {
        for k in 0..t {
            s.spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE];
                for i in k * per..((k + 1) * per).min(pages) {
                    let kind = mix.kind(seed, i);
                    if kind != PageKind::Zero {
                        fill_page(&mut buf, kind, seed, i);
                        mem.write_from(i as usize * PAGE_SIZE, &buf);
                    }
                }
            });
        }
    });
}

/// Compare every page of `mem` with its expected content: (mismatches, first mismatch).
fn verify(mem: &AnonMemory, mix: &Mix, seed: u64) -> (u64, Option<u64>) {
    let pages = (mem.len() / PAGE_SIZE) as u64;
    let t = threads() as u64;
    let per = pages.div_ceil(t);
    let parts: Vec<(u64, Option<u64>)> = thread::scope(|s| {
        let hs: Vec<_> = (0..t)
            .map(|k| {
                s.spawn(move || {
                    let mut got = vec![0u8; PAGE_SIZE];
                    let mut want = vec![0u8; PAGE_SIZE];
                    let mut bad = 0u64;
                    let mut first = None;
                    for i in k * per..((k + 1) * per).min(pages) {
                        mem.read_into(i as usize * PAGE_SIZE, &mut got);
                        expected_page(mix, seed, i, &mut want);
                        if got != want {
                            bad += 1;
                            first.get_or_insert(i);
                        }
                    }
                    (bad, first)
                })
            })
            .collect();
        // A verifier thread only panics on a bug; count its whole share as unverified then.
        hs.into_iter().map(|h| h.join().unwrap_or((u64::MAX, None))).collect()
    });
    let bad = parts.iter().fold(0u64, |a, p| a.saturating_add(p.0));
    (bad, parts.iter().find_map(|p| p.1))
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

/// Sent/acked bookkeeping between the sending thread and the ack thread.
struct Flow {
    state: Mutex<FlowState>,
    cv: Condvar,
}

struct FlowState {
    acked: u64,
    failed: Option<String>,
}

impl Flow {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until batch `next` may be sent (fewer than `window` outstanding).
    fn wait_window(&self, next: u64, window: u64) -> std::result::Result<(), String> {
        let mut st = self.lock();
        while next - st.acked >= window && st.failed.is_none() {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        match &st.failed {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    fn acked(&self, n: u64) {
        self.lock().acked = n;
        self.cv.notify_one();
    }

    fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct SendTotals {
    wire_bytes: u64,
    batches: u64,
    compressed: u64,
    data_pages: u64,
    zero_pages: u64,
}

/// Send the whole page set over `ch` with at most `window` unacknowledged batches; returns the
/// totals and the seconds from the first send to the last ack.
fn send_all(ch: Channel, map: &MemoryMap, cfg: &StreamConfig) -> Result<(SendTotals, f64)> {
    let Channel { mut tx, mut rx, killer, .. } = ch;
    let pages = cfg.pages();
    let bp = u64::from(cfg.batch_pages);
    let n = pages.div_ceil(bp);
    let window = u64::from(cfg.window);
    let flow = Flow { state: Mutex::new(FlowState { acked: 0, failed: None }), cv: Condvar::new() };
    // Only acknowledgements should come back: a batch from the peer finds no memory to land in.
    // SAFETY: a map without regions hands out no pointers, so there is nothing to keep valid.
    let nowhere = unsafe { MemoryMap::new(Vec::new()) }?;
    let t0 = Instant::now();
    let (sent, acks) = thread::scope(|s| {
        let (flow, killer, rx, nowhere) = (&flow, &killer, &mut rx, &nowhere);
        let acker = s.spawn(move || -> std::result::Result<(), String> {
            let mut next = 0u64;
            while next < n {
                let why = match rx.recv(nowhere) {
                    // One stream: acknowledgements come in order.
                    Ok(Incoming::Ack(a)) if a.id == next && a.round == 0 => {
                        next += 1;
                        flow.acked(next);
                        continue;
                    }
                    Ok(Incoming::Ack(a)) => {
                        format!("acknowledgement out of order: {a:?}, expected batch {next}")
                    }
                    Ok(other) => format!("unexpected {other:?} while waiting for acknowledgements"),
                    Err(e) => format!("receiving acknowledgements: {e}"),
                };
                flow.fail(why.clone());
                killer();
                return Err(why);
            }
            Ok(())
        });
        let mut tot = SendTotals::default();
        let mut sent: std::result::Result<(), String> = Ok(());
        for i in 0..n {
            if let Err(e) = flow.wait_window(i, window) {
                sent = Err(e);
                break;
            }
            let first = i * bp;
            let count = bp.min(pages - first) as u32;
            let run = [PageRun { gpa: first * PAGE_SIZE as u64, pages: count }];
            match tx.send_batch(i, 0, BATCH_DEST_ZEROED, &run, map) {
                Ok(sb) => {
                    tot.wire_bytes += sb.wire_bytes;
                    tot.batches += 1;
                    tot.compressed += u64::from(sb.compressed);
                    tot.data_pages += u64::from(sb.data_pages);
                    tot.zero_pages += u64::from(sb.zero_pages);
                }
                Err(e) => {
                    let why = format!("sending batch {i}: {e}");
                    flow.fail(why.clone());
                    killer();
                    sent = Err(why);
                    break;
                }
            }
        }
        let acks = acker.join().unwrap_or_else(|_| Err("the acknowledgement thread panicked".into()));
        (sent.map(|()| tot), acks)
    });
    let seconds = t0.elapsed().as_secs_f64();
    let tot = match (sent, acks) {
        (Ok(t), Ok(())) => t,
        (Err(e), _) | (Ok(_), Err(e)) => return Err(BenchError::Child { role: "source", detail: e }),
    };
    tx.close()?;
    Ok((tot, seconds))
}

/// The source process (`migration-bench stream-src`).
pub fn src_main(a: &ChildArgs) -> Result<()> {
    die_with_parent();
    let psk = psk_from_env()?;
    let (cfg, session) = a.config()?;
    let mem = AnonMemory::new(cfg.size as usize, false)?;
    // Like a running guest's memory: every page resident, zero pages included.
    mem.prefault();
    let t = Instant::now();
    fill(&mem, &cfg.mix, cfg.seed);
    let fill_seconds = t.elapsed().as_secs_f64();
    // SAFETY: `mem` outlives `map` (declared before it, so dropped after); as a source the map is
    // only read, and nothing writes `mem` any more.
    let map = unsafe { mem.map_at(0) }?;
    say("READY")?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| BenchError::io("reading the driver's GO", e))?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("GO ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| BenchError::Usage(format!("expected `GO <addr>` from the driver, got {line:?}")))?;
    let hs = ClientConfig {
        psk,
        binding: ChannelBinding { session, channel: 0 },
        caps: Caps::ALL,
        timeout: HANDSHAKE_TIMEOUT,
    };
    let ch = tcp::connect(addr, &cfg.tcp_options(), hs)?;
    if ch.info.backend != cfg.option.as_str() {
        return Err(BenchError::Child {
            role: "source",
            detail: format!("asked for {} but the channel is {}", cfg.option.as_str(), ch.info.backend),
        });
    }
    let u0 = Usage::current()?;
    let (tot, seconds) = send_all(ch, &map, &cfg)?;
    let u = Usage::current()?.since(&u0);
    let rep = SrcReport {
        seconds,
        wire_bytes: tot.wire_bytes,
        batches: tot.batches,
        compressed_batches: tot.compressed,
        data_pages: tot.data_pages,
        zero_pages: tot.zero_pages,
        cpu_s: u.cpu_s(),
        peak_rss_bytes: u.peak_rss_bytes,
        fill_seconds,
    };
    say(&format!(
        "RESULT {}",
        serde_json::to_string(&rep).map_err(|e| BenchError::Parse { what: "report", detail: e.to_string() })?
    ))
}

/// The destination process (`migration-bench stream-dst`).
pub fn dst_main(a: &ChildArgs, listen: SocketAddr) -> Result<()> {
    die_with_parent();
    let psk = psk_from_env()?;
    let (cfg, session) = a.config()?;
    let mem = AnonMemory::new(cfg.size as usize, false)?;
    // Fault the sink in now (huge pages where THP allows), so receiving costs no page faults.
    mem.prefault();
    // SAFETY: `mem` outlives `map`; only this thread writes `mem` through the map (in `recv`),
    // and verification reads it after the channel is closed.
    let map = unsafe { mem.map_at(0) }?;
    let caps = match cfg.option {
        TransportOption::Tcp => Caps(0),
        TransportOption::Zstd | TransportOption::ZstdAlways => Caps::ALL,
    };
    let acc = TcpAcceptor::bind(listen, cfg.tcp_options(), ServerConfig { psk, caps, timeout: HANDSHAKE_TIMEOUT })?;
    say(&format!("LISTENING {}", acc.local_addr()?))?;
    let ch = acc.accept(&|est| {
        if est.binding.session == session {
            Ok(())
        } else {
            Err("not this benchmark's session".into())
        }
    })?;
    let Channel { mut tx, mut rx, .. } = ch;
    let u0 = Usage::current()?;
    let mut t0 = None;
    let (mut pages, mut batches, mut wire) = (0u64, 0u64, 0u64);
    loop {
        match rx.recv(&map)? {
            Incoming::Batch(b) => {
                t0.get_or_insert_with(Instant::now);
                pages += u64::from(b.pages);
                batches += 1;
                wire += b.wire_bytes;
                tx.send_ack(b.ack())?;
            }
            Incoming::Closed => break,
            other => {
                return Err(BenchError::Child { role: "destination", detail: format!("unexpected {other:?}") });
            }
        }
    }
    let seconds = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let u = Usage::current()?.since(&u0);
    // The source may already be gone; its Goodbye was all we needed.
    let _ = tx.close();
    let tv = Instant::now();
    let (bad, first) = verify(&mem, &cfg.mix, cfg.seed);
    let rep = DstReport {
        pages,
        batches,
        wire_bytes: wire,
        seconds,
        cpu_s: u.cpu_s(),
        peak_rss_bytes: u.peak_rss_bytes,
        verified: bad == 0 && pages == cfg.pages(),
        mismatched_pages: bad,
        first_mismatch: first,
        verify_seconds: tv.elapsed().as_secs_f64(),
    };
    say(&format!(
        "RESULT {}",
        serde_json::to_string(&rep).map_err(|e| BenchError::Parse { what: "report", detail: e.to_string() })?
    ))
}

/// Where the two processes run.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// Both here, on 127.0.0.1.
    Loopback,
    /// Source in the testbed's source namespace, destination in its destination namespace, over
    /// NIC 0.
    Netns(&'a Testbed),
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

/// Run one stream: spawn the destination and the source (`exe stream-dst`, `exe stream-src`),
/// let them run, collect their reports. Children are killed after `timeout`.
pub fn run(exe: &Path, cfg: &StreamConfig, place: Placement<'_>, timeout: Duration) -> Result<(SrcReport, DstReport)> {
    cfg.validate()?;
    let session: SessionId = random_bytes();
    let args = cfg.child_args(&session);
    let (src_ns, dst_ns, listen) = match place {
        Placement::Loopback => (None, None, "127.0.0.1:0".to_string()),
        Placement::Netns(tb) => {
            (Some(tb.netns(Side::Src)), Some(tb.netns(Side::Dst)), format!("{}:0", Testbed::addr(Side::Dst, 0)))
        }
    };
    drive_pair(exe, "stream", &args, src_ns.as_deref(), dst_ns.as_deref(), &listen, timeout, |io| {
        let addr = read_line(&mut io.dout, "LISTENING ", "destination")?;
        read_line(&mut io.sout, "READY", "source")?;
        writeln!(io.sin, "GO {addr}").map_err(|e| BenchError::io("telling the source to go", e))?;
        let s = read_line(&mut io.sout, "RESULT ", "source")?;
        let d = read_line(&mut io.dout, "RESULT ", "destination")?;
        let s: SrcReport = serde_json::from_str(&s)
            .map_err(|e| BenchError::Parse { what: "the source's report", detail: e.to_string() })?;
        let d: DstReport = serde_json::from_str(&d)
            .map_err(|e| BenchError::Parse { what: "the destination's report", detail: e.to_string() })?;
        Ok((s, d))
    })
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

    #[test]
    fn fill_then_verify() {
        let mix = Mix::default();
        let m = AnonMemory::new(300 * PAGE_SIZE, false).unwrap();
        fill(&m, &mix, 7);
        assert_eq!(verify(&m, &mix, 7), (0, None));
        m.write_from(5 * PAGE_SIZE + 8, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(verify(&m, &mix, 7), (1, Some(5)));
        assert_ne!(verify(&m, &mix, 8).0, 0);
    }
}
