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

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_memory::{AnonMemory, MemoryMap};
use ferry_transport::endpoint::Path as ChannelPath;
use ferry_transport::handshake::{
    random_bytes, Caps, ChannelBinding, ClientConfig, Established, ServerConfig, SessionId,
};
use ferry_transport::option::TransportOption;
use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, MAX_BATCH_PAGES, PAGE_SIZE};
use ferry_transport::{Channel, Encryption, Incoming};
use ferry_vmm_glue::pagemix::{expected_page, fill_page, Mix, PageKind};
use serde::{Deserialize, Serialize};

use crate::driver::{die_with_parent, drive_pair, hex, read_go, read_line, read_result, say, say_result, unhex};
use crate::error::{BenchError, Result};
use crate::procstat::Usage;
use crate::testbed::{Side, Testbed};
use crate::units::parse_size;

/// Time allowed for a channel handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the two children are told (the driver turns a [`StreamConfig`] into these arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// Bytes of guest memory.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Page mixture.
    #[arg(long)]
    pub mix: Mix,
    /// Seed of the page contents.
    #[arg(long)]
    pub seed: u64,
    /// Transport option.
    #[arg(long)]
    pub option: TransportOption,
    /// zstd level.
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Protection of the frames (`aead`, `integrity`, `off`).
    #[arg(long, default_value = "aead")]
    pub encryption: Encryption,
    /// Authenticate with host certificates in this directory (both ends) instead of the key the
    /// driver hands its children.
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
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
#[derive(Debug, Clone, PartialEq)]
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
    /// Protection of the frames (quic: `aead` only, its TLS).
    pub encryption: Encryption,
    /// Host certificates both ends authenticate with (`None`: the key the driver hands them).
    pub tls_dir: Option<std::path::PathBuf>,
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
        if !crate::live::encryption_applies(self.option, self.encryption) {
            return Err(BenchError::Usage(format!(
                "{} is always encrypted (TLS 1.3): encryption {} applies to tcp options only",
                self.option, self.encryption
            )));
        }
        if !(-131_072..=22).contains(&self.zstd_level) {
            return Err(BenchError::Usage(format!("zstd level {} is outside -131072..=22", self.zstd_level)));
        }
        Ok(())
    }

    fn child_args(&self, session: &SessionId) -> Vec<String> {
        let mut v = vec![
            "--size".into(),
            self.size.to_string(),
            "--mix".into(),
            self.mix.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--option".into(),
            self.option.to_string(),
            "--zstd-level".into(),
            self.zstd_level.to_string(),
            "--encryption".into(),
            self.encryption.to_string(),
            "--batch-pages".into(),
            self.batch_pages.to_string(),
            "--window".into(),
            self.window.to_string(),
            "--session".into(),
            hex(session),
        ];
        if let Some(d) = &self.tls_dir {
            v.extend(["--tls-dir".into(), d.display().to_string()]);
        }
        v
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
            encryption: self.encryption,
            tls_dir: self.tls_dir.clone(),
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
    let nowhere = MemoryMap::empty();
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
    let creds = crate::driver::creds(a.tls_dir.as_deref())?;
    let (cfg, session) = a.config()?;
    let mem = Arc::new(AnonMemory::new(cfg.size as usize, false)?);
    // Like a running guest's memory: every page resident, zero pages included.
    mem.prefault();
    let t = Instant::now();
    fill(&mem, &cfg.mix, cfg.seed);
    let fill_seconds = t.elapsed().as_secs_f64();
    let map = mem.map_at(0)?;
    say("READY")?;
    let addr = read_go()?;
    let hs = ClientConfig {
        creds,
        binding: ChannelBinding { session, channel: 0 },
        caps: Caps::ALL,
        timeout: HANDSHAKE_TIMEOUT,
        encryption: cfg.encryption,
    };
    let connector = crate::live::connector(cfg.option, cfg.zstd_level, cfg.encryption)?;
    let ch = connector.connect(&ChannelPath::to(addr), hs)?;
    if ch.info.backend != connector.transport() {
        return Err(BenchError::Child {
            role: "source",
            detail: format!("asked for {} but the channel is {}", cfg.option, ch.info.backend),
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
    say_result(&rep)
}

/// The destination process (`migration-bench stream-dst`).
pub fn dst_main(a: &ChildArgs, listen: SocketAddr) -> Result<()> {
    die_with_parent();
    let creds = crate::driver::creds(a.tls_dir.as_deref())?;
    let (cfg, session) = a.config()?;
    let mem = Arc::new(AnonMemory::new(cfg.size as usize, false)?);
    // Fault the sink in now (huge pages where THP allows), so receiving costs no page faults.
    mem.prefault();
    let map = mem.map_at(0)?;
    let caps = cfg.option.caps();
    let acc = cfg.option.bind(
        listen,
        cfg.zstd_level,
        ServerConfig { creds, caps, timeout: HANDSHAKE_TIMEOUT, encryption: cfg.encryption },
    )?;
    say(&format!("LISTENING {}", acc.local_addr()?))?;
    let admit = |est: &Established| {
        if est.binding.session == session {
            Ok(())
        } else {
            Err("not this benchmark's session".into())
        }
    };
    // The driver kills this process if the source never comes.
    let ch = loop {
        if let Some(ch) = acc.accept_within(Duration::from_secs(1), &admit)? {
            break ch;
        }
    };
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
    say_result(&rep)
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
        let s: SrcReport = read_result(&mut io.sout, "source")?;
        let d: DstReport = read_result(&mut io.dout, "destination")?;
        Ok((s, d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
