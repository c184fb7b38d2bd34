//! The destination side of a live migration: accept the VM's shape, receive pages on every
//! channel straight into the new VM's memory, enforce the round rule, verify the image, and take
//! ownership only at `Commit`. Until then any failure discards the VM.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::memory::{populate_write, MemoryMap, MemorySink, MemorySource, NoSink};
use ferry_transport::wire::{PageRun, PAGE_SIZE};
use ferry_transport::{Channel, ChannelTx, Incoming, Killer};

use crate::hash::{scan_run, zero_page_hash, PageTable};
use crate::protocol::{Msg, MAX_STATE, MIGRATION_VERSION};
use crate::vm::{TargetFactory, TargetVm, VmShape};
use crate::MigrateError;

/// A fault the destination injects on itself (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFault {
    /// Flip a bit of the last page once every page has landed: verification must fail.
    CorruptPage,
    /// Drop every channel after the first batch of round N (as if the process died).
    DieInRound(u32),
    /// Take the commit and resume, then vanish without confirming (the source cannot know).
    DieAfterCommit,
    /// Channel `channel` stops reading after `after_batches` batches, as if its path hung: no
    /// error, no close, just silence (its kernel keeps acknowledging with a zero window; TCP
    /// notices only through a user timeout, if one is set). It resumes only to be closed
    /// (`ChannelDrop`).
    StallChannel {
        /// Data channel index (not 0).
        channel: u16,
        /// Batches it takes first.
        after_batches: u64,
    },
}

/// Destination configuration.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// How long to wait for the session's other channels after `Prepare`.
    pub channel_wait: Duration,
    /// Silence from the source longer than this aborts.
    pub idle_timeout: Duration,
    /// Fault injection (tests).
    pub fault: Option<TargetFault>,
    /// During round 0, fault guest memory in on a helper thread just ahead of where batches
    /// land, so the receive path does not take the page faults of cold memory itself (cheap when
    /// the memory is already present, as with a reserve).
    pub fault_ahead: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            channel_wait: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            fault: None,
            fault_ahead: true,
        }
    }
}

/// Numbers of a received migration (serializable with the `serde` feature, as
/// [`crate::stats`] describes).
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TargetStats {
    /// VM id.
    pub vm_id: String,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Pages written (all rounds).
    pub pages: u64,
    /// Batches received.
    pub batches: u64,
    /// Bytes taken from the wire.
    pub wire_bytes: u64,
    /// Time spent verifying the image at switchover.
    #[cfg_attr(feature = "serde", serde(rename = "verify_ms", with = "crate::stats::ms"))]
    pub verify: Duration,
    /// Image verified.
    pub verified: bool,
    /// Channels used.
    pub channels: usize,
    /// Channels lost on the way (and not back).
    pub lost_channels: Vec<u16>,
    /// Channels that came back after a loss.
    pub rejoined_channels: Vec<u16>,
}

/// A VM received and committed: it runs here now.
pub struct TargetOutcome {
    /// The VM (resumed).
    pub vm: Box<dyn TargetVm>,
    /// Numbers.
    pub stats: TargetStats,
}

impl std::fmt::Debug for TargetOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetOutcome").field("stats", &self.stats).finish_non_exhaustive()
    }
}

enum Event {
    Control(Vec<u8>),
    Failed(u16, String),
    Closed(u16),
}

struct Shared {
    map: MemoryMap,
    regions: Vec<(u64, u64, u64)>, // gpa, len, first page index
    table: PageTable,
    max_round: AtomicU32,
    pages: AtomicU64,
    batches: AtomicU64,
    wire: AtomicU64,
    corrupt: AtomicBool,
    die_round: Option<u32>,
    dead: AtomicBool,
    /// Highest guest-physical end address a batch has written (round 0 goes up through memory).
    frontier: AtomicU64,
    /// Injected stall: (channel, batches before it stops reading).
    stall: Option<(u16, u64)>,
    /// Channels the source dropped (`ChannelDrop`): a stalled receiver gives up on seeing it.
    dropped: Mutex<Vec<u16>>,
}

impl Shared {
    fn index_of(&self, gpa: u64) -> Option<u64> {
        let i = self.regions.partition_point(|r| r.0 + r.1 <= gpa);
        let r = self.regions.get(i)?;
        (gpa >= r.0).then(|| r.2 + (gpa - r.0) / PAGE_SIZE as u64)
    }

    /// Hash the pages of one received run into the table (one lookup per run, not per page).
    fn hash_run(&self, r: &PageRun) {
        let (Some(first), Some(base)) = (self.index_of(r.gpa), self.map.source_ptr(r.gpa, r.len())) else { return };
        // SAFETY: the run the map vouched for, page aligned; reads only.
        unsafe {
            scan_run(base, r.pages as usize, |p, s| {
                self.table.set(first as usize + p, s.hash);
            })
        };
    }
}

/// Keep page faults off the receive path while round 0 fills cold memory: populate the 2 MiB
/// steps just ahead of the highest address written so far (at most `AHEAD` beyond it), skipping
/// what the receivers already passed. Populating does not change contents, so it may race with
/// the receivers freely. Ends with round 0, or when the migration ends.
fn fault_ahead(sh: &Shared) {
    const STEP: u64 = 2 << 20;
    const AHEAD: u64 = 64 << 20;
    for &(gpa, len, _) in &sh.regions {
        let end = gpa + len;
        let mut at = gpa;
        while at < end {
            if sh.dead.load(Ordering::SeqCst) || sh.max_round.load(Ordering::SeqCst) > 0 {
                return;
            }
            let f = sh.frontier.load(Ordering::Relaxed);
            if f >= end {
                break; // the receivers are past this region
            }
            if f > at + STEP {
                at = gpa + (f - gpa) / STEP * STEP;
                continue;
            }
            if at > f + AHEAD {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let n = STEP.min(end - at);
            if let Some(p) = sh.map.sink_ptr(at, n as usize) {
                // SAFETY: the map vouches for this range of our own guest memory (anonymous); the
                // advice only faults pages in and never changes contents.
                unsafe { populate_write(p, n as usize) };
            }
            at += n;
        }
    }
}

/// The killers of the session's channels, by channel index (a rejoined index appears twice).
type Killers = Arc<Mutex<Vec<(u16, Killer)>>>;

/// Cut channel `only`, or every channel (`None`).
fn kill(killers: &Killers, only: Option<u16>) {
    for (_, k) in
        killers.lock().map(|k| k.clone()).unwrap_or_default().into_iter().filter(|e| only.is_none_or(|c| e.0 == c))
    {
        k();
    }
}

fn rx_loop(
    idx: u16,
    mut rx: Box<dyn ferry_transport::ChannelRx>,
    tx: Arc<Mutex<Box<dyn ChannelTx>>>,
    sh: Arc<Shared>,
    ev: mpsc::Sender<Event>,
    killers: Killers,
) {
    let mut taken = 0u64;
    loop {
        if sh.dead.load(Ordering::SeqCst) {
            return;
        }
        match rx.recv(&sh.map) {
            Ok(Incoming::Batch(b)) => {
                // The round rule: never let an older round's copy land after a newer one.
                let seen = sh.max_round.fetch_max(b.round, Ordering::SeqCst);
                if b.round < seen {
                    let _ = ev.send(Event::Failed(
                        idx,
                        format!("batch of round {} after round {seen} began: round rule violated", b.round),
                    ));
                    return;
                }
                for r in &b.runs {
                    sh.hash_run(r);
                }
                if let Some(r) = b.runs.last() {
                    sh.frontier.fetch_max(r.gpa + r.len() as u64, Ordering::Relaxed);
                }
                sh.pages.fetch_add(u64::from(b.pages), Ordering::Relaxed);
                sh.wire.fetch_add(b.wire_bytes, Ordering::Relaxed);
                sh.batches.fetch_add(1, Ordering::Relaxed);
                if sh.die_round == Some(b.round) {
                    sh.dead.store(true, Ordering::SeqCst);
                    kill(&killers, None);
                    let _ = ev.send(Event::Failed(idx, "injected destination death".into()));
                    return;
                }
                taken += 1;
                if sh.stall.is_some_and(|(c, n)| c == idx && taken > n) {
                    // Injected hang: no ack, no more reads, until the source drops the channel.
                    while !sh.dead.load(Ordering::SeqCst) && !sh.dropped.lock().is_ok_and(|d| d.contains(&idx)) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let _ = ev.send(Event::Failed(idx, "stalled (injected), then dropped by the source".into()));
                    return;
                }
                let r = tx.lock().map(|mut t| t.send_ack(b.ack()));
                if let Ok(Err(e)) = r {
                    let _ = ev.send(Event::Failed(idx, format!("ack: {e}")));
                    return;
                }
            }
            Ok(Incoming::Control(m)) => {
                if idx != 0 {
                    let _ = ev.send(Event::Failed(idx, "control message on a data channel".into()));
                    return;
                }
                let _ = ev.send(Event::Control(m));
            }
            Ok(Incoming::Ack(_)) => {
                let _ = ev.send(Event::Failed(idx, "the source sent an ack".into()));
                return;
            }
            Ok(Incoming::Closed) => {
                let _ = ev.send(Event::Closed(idx));
                return;
            }
            Err(e) => {
                let _ = ev.send(Event::Failed(idx, e.to_string()));
                return;
            }
        }
    }
}

/// Receive one migration whose channel 0 is `ch0`; the session's other channels arrive on `more`.
/// Returns the committed, resumed VM. Any error before commit discards the VM.
pub fn receive(
    factory: &dyn TargetFactory,
    ch0: Channel,
    more: &mpsc::Receiver<Channel>,
    cfg: &TargetConfig,
) -> Result<TargetOutcome, MigrateError> {
    receive_after(factory, ch0, None, more, cfg)
}

/// [`receive`], when the caller has already read the first control message of channel 0 (to
/// answer an interface exchange first, say): `first` is then the Prepare (or `None` to read it).
pub fn receive_after(
    factory: &dyn TargetFactory,
    mut ch0: Channel,
    first: Option<Vec<u8>>,
    more: &mpsc::Receiver<Channel>,
    cfg: &TargetConfig,
) -> Result<TargetOutcome, MigrateError> {
    // Prepare comes first, before any page may move.
    let m = match first {
        Some(m) => m,
        None => match ch0.rx.recv(&NoSink).map_err(|e| MigrateError::Channel(0, e.to_string()))? {
            Incoming::Control(m) => m,
            _ => {
                let _ = ch0.tx.send_abort(2, "expected Prepare");
                return Err(MigrateError::Unexpected("a non-control frame before Prepare".into()));
            }
        },
    };
    let (shape, nch, verify_full) = match Msg::decode(&m) {
        Ok(Msg::Prepare { version, shape, channels, verify_full }) => {
            if version != MIGRATION_VERSION {
                let r = format!("migration protocol version {version} not supported");
                let _ = ch0.tx.send_control(&Msg::Refuse(r.clone()).encode());
                return Err(MigrateError::Refused(r));
            }
            (shape, channels as usize, verify_full)
        }
        Ok(other) => {
            let _ = ch0.tx.send_abort(2, "expected Prepare");
            return Err(MigrateError::Unexpected(format!("{other:?} before Prepare")));
        }
        Err(e) => {
            let _ = ch0.tx.send_abort(2, &e.to_string());
            return Err(e.into());
        }
    };
    let mut vm = match factory.create(&shape) {
        Ok(v) => v,
        Err(e) => {
            let r = format!("cannot host VM {:?}: {e}", shape.vm_id);
            let _ = ch0.tx.send_control(&Msg::Refuse(r.clone()).encode());
            return Err(MigrateError::Refused(r));
        }
    };
    let session = ch0.info.established.binding.session;
    let mut channels: Vec<Option<Channel>> = (0..nch).map(|_| None).collect();
    channels[0] = Some(ch0);
    let deadline = Instant::now() + cfg.channel_wait;
    while channels.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let c = match more.recv_timeout(left) {
            Ok(c) => c,
            Err(_) => {
                let r = "the session's other channels did not all arrive".to_string();
                if let Some(c0) = channels[0].as_mut() {
                    let _ = c0.tx.send_control(&Msg::Refuse(r.clone()).encode());
                }
                return Err(MigrateError::Refused(r));
            }
        };
        let b = c.info.established.binding;
        let i = b.channel as usize;
        if b.session != session || i >= nch || channels[i].is_some() {
            (c.killer)();
            continue;
        }
        channels[i] = Some(c);
    }
    let channels: Vec<Channel> = channels.into_iter().flatten().collect();
    let mut regions = Vec::new();
    let mut acc = 0u64;
    for &(g, l) in &shape.regions {
        regions.push((g, l, acc));
        acc += l / PAGE_SIZE as u64;
    }
    let total_pages = acc;
    let zh = zero_page_hash();
    let sh = Arc::new(Shared {
        map: vm.memory(),
        regions,
        table: PageTable::new(total_pages as usize, zh),
        max_round: AtomicU32::new(0),
        pages: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        wire: AtomicU64::new(0),
        corrupt: AtomicBool::new(cfg.fault == Some(TargetFault::CorruptPage)),
        die_round: match cfg.fault {
            Some(TargetFault::DieInRound(r)) => Some(r),
            _ => None,
        },
        dead: AtomicBool::new(false),
        frontier: AtomicU64::new(0),
        stall: match cfg.fault {
            Some(TargetFault::StallChannel { channel, after_batches }) => Some((channel, after_batches)),
            _ => None,
        },
        dropped: Mutex::new(Vec::new()),
    });
    let killers: Killers =
        Arc::new(Mutex::new(channels.iter().enumerate().map(|(i, c)| (i as u16, c.killer.clone())).collect()));
    let (ev_tx, ev_rx) = mpsc::channel();
    let mut txs = Vec::new();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for (i, c) in channels.into_iter().enumerate() {
        let tx = Arc::new(Mutex::new(c.tx));
        txs.push(tx.clone());
        let (sh, ev, k) = (sh.clone(), ev_tx.clone(), killers.clone());
        let rx = c.rx;
        threads.push(std::thread::spawn(move || rx_loop(i as u16, rx, tx, sh, ev, k)));
    }
    let mut threads = threads;
    if cfg.fault_ahead {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || fault_ahead(&sh)));
    }
    let send0 = |m: &Msg| -> Result<(), MigrateError> {
        txs[0]
            .lock()
            .map_err(|_| MigrateError::Internal("control lock"))?
            .send_control(&m.encode())
            .map_err(|e| MigrateError::Channel(0, e.to_string()))
    };
    let mut stats = TargetStats {
        vm_id: shape.vm_id.clone(),
        guest_bytes: shape.memory_bytes(),
        channels: nch,
        ..Default::default()
    };
    let mut committed = false;
    let result = (|| -> Result<(), MigrateError> {
        send0(&Msg::PrepareOk)?;
        let mut state: Vec<u8> = Vec::new();
        let mut ready = false;
        let mut idle_since = Instant::now();
        loop {
            // A lost channel may come back (same session, same index) while pages move.
            while let Ok(c) = more.try_recv() {
                let b = c.info.established.binding;
                let i = b.channel;
                let welcome = b.session == session && stats.lost_channels.contains(&i) && !ready;
                if !welcome {
                    (c.killer)();
                    continue;
                }
                stats.lost_channels.retain(|&x| x != i);
                stats.rejoined_channels.push(i);
                let tx = Arc::new(Mutex::new(c.tx));
                if let Ok(mut k) = killers.lock() {
                    k.push((i, c.killer.clone()));
                }
                let (sh, ev, k) = (sh.clone(), ev_tx.clone(), killers.clone());
                let rx = c.rx;
                threads.push(std::thread::spawn(move || rx_loop(i, rx, tx, sh, ev, k)));
            }
            let ev = match ev_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(e) => {
                    idle_since = Instant::now();
                    e
                }
                Err(_) if idle_since.elapsed() < cfg.idle_timeout => continue,
                Err(_) => return Err(MigrateError::Timeout("source went silent")),
            };
            match ev {
                Event::Failed(0, why) => return Err(MigrateError::Channel(0, why)),
                Event::Closed(0) => return Err(MigrateError::Channel(0, "source closed the control channel".into())),
                Event::Failed(i, why) => {
                    if sh.dead.load(Ordering::SeqCst) {
                        return Err(MigrateError::Channel(i, why));
                    }
                    stats.lost_channels.push(i);
                    send0(&Msg::ChannelLost { channel: i })?;
                }
                Event::Closed(i) => {
                    stats.lost_channels.push(i);
                    send0(&Msg::ChannelLost { channel: i })?;
                }
                Event::Control(m) => match Msg::decode(&m)? {
                    Msg::RoundEnd { .. } | Msg::Switchover { .. } => {}
                    Msg::ChannelDrop { channel } if channel != 0 && (channel as usize) < nch => {
                        // Close our end: the receiver stops and reports; ChannelLost follows
                        // from the Failed event (once per loss).
                        if let Ok(mut d) = sh.dropped.lock() {
                            d.push(channel);
                        }
                        kill(&killers, Some(channel));
                    }
                    Msg::StateChunk { offset, data } => {
                        if offset != state.len() as u64 || state.len() as u64 + data.len() as u64 > MAX_STATE {
                            return Err(MigrateError::Unexpected("state chunk out of order or too large".into()));
                        }
                        state.extend_from_slice(&data);
                    }
                    Msg::Complete { state_len, state_crc, digest: want, pages } => {
                        let t = Instant::now();
                        if pages != total_pages {
                            let r = format!("source has {pages} pages, destination {total_pages}");
                            send0(&Msg::Refuse(r.clone()))?;
                            return Err(MigrateError::Verify(r));
                        }
                        if state.len() as u64 != state_len || crc32fast::hash(&state) != state_crc {
                            let r = "VM state blob incomplete or corrupt".to_string();
                            send0(&Msg::Refuse(r.clone()))?;
                            return Err(MigrateError::Verify(r));
                        }
                        if sh.corrupt.load(Ordering::SeqCst) {
                            // Injected fault: one flipped bit in the last page, after it landed.
                            if let Some(&(g, l, _)) = sh.regions.last() {
                                if let Some(p) = sh.map.sink_ptr(g + l - PAGE_SIZE as u64, PAGE_SIZE) {
                                    // SAFETY: our own guest memory, not running; a byte inside the page.
                                    unsafe {
                                        p.as_ptr().add(100).write_volatile(p.as_ptr().add(100).read_volatile() ^ 1)
                                    };
                                }
                            }
                        }
                        if verify_full {
                            const CHUNK: u64 = 1 << 20; // pages per run
                            for &(g, l, _) in &sh.regions {
                                let pages = l / PAGE_SIZE as u64;
                                for c in (0..pages).step_by(CHUNK as usize) {
                                    let n = (pages - c).min(CHUNK) as u32;
                                    sh.hash_run(&PageRun { gpa: g + c * PAGE_SIZE as u64, pages: n });
                                }
                            }
                        }
                        let got = sh.table.digest();
                        stats.verify = t.elapsed();
                        if got != want {
                            let r =
                                "image digest mismatch: the destination's memory differs from the source's".to_string();
                            send0(&Msg::Refuse(r.clone()))?;
                            return Err(MigrateError::Verify(r));
                        }
                        if let Err(e) = vm.restore_state(&state) {
                            let r = format!("restoring VM state failed: {e}");
                            send0(&Msg::Refuse(r.clone()))?;
                            return Err(MigrateError::Vm(r));
                        }
                        stats.verified = true;
                        ready = true;
                        send0(&Msg::Ready)?;
                    }
                    Msg::Commit if ready => {
                        // Ownership is ours from here on: never abort after this point.
                        committed = true;
                        vm.resume().map_err(|e| MigrateError::Vm(format!("resume after commit: {e}")))?;
                        if cfg.fault == Some(TargetFault::DieAfterCommit) {
                            kill(&killers, None);
                            return Ok(());
                        }
                        send0(&Msg::Resumed)?;
                        return Ok(());
                    }
                    other => return Err(MigrateError::Unexpected(format!("{other:?} at the destination"))),
                },
            }
        }
    })();
    sh.dead.store(true, Ordering::SeqCst);
    if result.is_ok() {
        if let Ok(mut t) = txs[0].lock() {
            let _ = t.close();
        }
    } else if committed {
        // We own the VM but could not confirm: say nothing that could look like an abort.
    } else if let Ok(mut t) = txs[0].try_lock() {
        let _ = t.send_abort(1, &result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
    }
    // Give the source a moment to read Resumed before the sockets go away.
    if result.is_ok() {
        let _ = ev_rx.recv_timeout(Duration::from_millis(200));
    }
    kill(&killers, None);
    for t in threads {
        let _ = t.join();
    }
    stats.pages = sh.pages.load(Ordering::Relaxed);
    stats.batches = sh.batches.load(Ordering::Relaxed);
    stats.wire_bytes = sh.wire.load(Ordering::Relaxed);
    match result {
        Ok(()) => Ok(TargetOutcome { vm, stats }),
        // Committed and resumed: the VM is ours even though the confirmation failed.
        Err(e) if committed => {
            let _ = e;
            Ok(TargetOutcome { vm, stats })
        }
        Err(e) => Err(e),
    }
}

/// The shape carried by a prepare (for callers that want to look before receiving).
pub fn shape_of(msg: &[u8]) -> Option<VmShape> {
    match Msg::decode(msg) {
        Ok(Msg::Prepare { shape, .. }) => Some(shape),
        _ => None,
    }
}
