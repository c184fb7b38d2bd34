//! The source side of a live migration: pre-copy rounds sharded over every channel of the
//! session, convergence (bandwidth and dirty rate measured as it runs, auto-converge throttling),
//! switchover, commit, and abort with the VM left running.
//!
//! Threads: one sender per channel pulls batches from one shared queue (a faster channel simply
//! pulls more), bounded by a window of unacknowledged batches; one reader per channel turns acks,
//! control messages and errors into events for the engine thread, which owns the VM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::memory::{MemoryMap, MemorySource, NoSink};
use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, MAX_BATCH_RUNS, PAGE_SIZE};
use ferry_transport::{Channel, ChannelRx, ChannelTx, Incoming, Killer, TransportError};

use crate::hash::{scan_run, PageTable};
use crate::protocol::{Msg, MAX_CHUNK, MIGRATION_VERSION};
use crate::stats::{ChannelStats, MigrationStats, Progress, Status};
use crate::vm::{DirtyBitmap, RegionBitmap, SourceVm};
use crate::MigrateError;

/// What to do when the guest does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvergePolicy {
    /// Give up; the VM keeps running on the source.
    Abort,
    /// Switch over anyway (longer downtime).
    ForceSwitchover,
}

/// A step of the protocol at which a test injects a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Right after the destination accepted the VM.
    AfterPrepare,
    /// After the first acknowledgement of round N.
    InRound(u32),
    /// After the source paused, before the final round.
    AtSwitchover,
    /// After the final round, before `Complete`.
    BeforeComplete,
    /// After `Ready`, before `Commit`.
    BeforeCommit,
}

/// What the injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Cut channel N.
    KillChannel(u16),
    /// Cancel the migration.
    Cancel,
    /// Send a control message that does not decode.
    CorruptControl,
}

/// A cancel switch for a running migration.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the migration to stop; it aborts at the next check (never after commit).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Was cancel asked?
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How batches are spread over channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// Every channel pulls the next batch when it has room in its window: each gets work in
    /// proportion to what it actually delivers, and a link that slows down gets less at once.
    #[default]
    Adaptive,
    /// Batch i goes to channel i mod n, whatever the channel's speed (the comparison baseline).
    RoundRobin,
}

/// Re-opens a lost channel (same session, same index) when its path works again.
#[derive(Clone)]
pub struct Rejoin(pub Arc<dyn Fn(u16) -> Result<Channel, String> + Send + Sync>);

impl std::fmt::Debug for Rejoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rejoin(..)")
    }
}

/// Configuration of a live migration (source side).
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Switch over once the remaining dirty pages fit in this pause.
    pub downtime_limit: Duration,
    /// Rounds before the policy applies.
    pub max_rounds: u32,
    /// Time before the policy applies.
    pub timeout: Duration,
    /// What to do when not converging.
    pub policy: ConvergePolicy,
    /// Throttle the guest step by step when the dirty rate outruns the bandwidth.
    pub auto_converge: bool,
    /// Throttle step in percent points.
    pub throttle_step: u8,
    /// Lowest throttle (percent of guest speed).
    pub throttle_min: u8,
    /// Pages per batch.
    pub batch_pages: u32,
    /// Unacknowledged batches per channel.
    pub window: usize,
    /// Ask the destination to re-read all memory for the final check.
    pub verify_full: bool,
    /// Resend a failed channel's batches on the others instead of aborting.
    pub failover: bool,
    /// How long to wait for any single answer of the destination.
    pub reply_timeout: Duration,
    /// Cancel switch.
    pub cancel: CancelToken,
    /// Fault injection (tests).
    pub fault: Option<(FaultPoint, FaultAction)>,
    /// How batches are spread over channels.
    pub scheduling: Scheduling,
    /// Re-open lost channels while the migration runs (tried every `rejoin_interval`).
    pub rejoin: Option<Rejoin>,
    /// Pause between attempts to re-open a lost channel.
    pub rejoin_interval: Duration,
    /// Stall detector (with failover): a data channel that holds unacknowledged batches and has
    /// had no acknowledgement for this long (or 8 times its usual gap between acknowledgements,
    /// if longer) while another channel answers, is dropped and its batches resent on the others. A
    /// hung path is noticed in about this time instead of a TCP timeout (or never, if the peer
    /// stopped reading but its kernel still acknowledges). `None`: rely on TCP.
    pub stall_timeout: Option<Duration>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            timeout: Duration::from_secs(600),
            policy: ConvergePolicy::Abort,
            auto_converge: true,
            throttle_step: 20,
            throttle_min: 10,
            batch_pages: 256,
            window: 16,
            verify_full: false,
            failover: true,
            reply_timeout: Duration::from_secs(30),
            cancel: CancelToken::new(),
            fault: None,
            scheduling: Scheduling::Adaptive,
            rejoin: None,
            rejoin_interval: Duration::from_millis(500),
            stall_timeout: Some(Duration::from_secs(1)),
        }
    }
}

/// One batch of work.
#[derive(Debug, Clone)]
struct Work {
    id: u64,
    round: u32,
    flags: u8,
    runs: Vec<PageRun>,
    /// Global page index of each run's first page.
    first: Vec<u64>,
    /// Round-robin mode: the channel this batch must go to.
    pin: Option<u16>,
}

impl Work {
    fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }
}

enum Event {
    Acked {
        pages: u64,
    },
    Control(Vec<u8>),
    Failed(u16, String),
    /// The destination said it gives up (it never does so after taking ownership).
    Aborted(String),
    /// A lost channel was re-opened.
    Rejoined(u16, Channel),
}

#[derive(Default)]
struct Queue {
    items: std::collections::VecDeque<Work>,
    closed: bool,
}

struct ChanShared {
    inflight: Mutex<HashMap<u64, (Work, Instant)>>,
    slots: Condvar,
    dead: AtomicBool,
    wire: AtomicU64,
    batches: AtomicU64,
    pages: AtomicU64,
    zero: AtomicU64,
    compressed: AtomicU64,
    hist: Mutex<hdrhistogram::Histogram<u64>>,
    /// When the last acknowledgement arrived, and the smoothed gap between them (seconds).
    acks: Mutex<AckClock>,
}

/// Acknowledgement timing of one channel (for the stall detector).
struct AckClock {
    last: Instant,
    /// Smoothed gap between acknowledgements, seconds (`None` before the first one).
    gap_s: Option<f64>,
}

impl AckClock {
    fn tick(&mut self) {
        let now = Instant::now();
        let gap = now.duration_since(self.last).as_secs_f64();
        // The first gap (from the channel's start) seeds the average instead of pulling it up
        // from zero, so a slow path's usual gap is known from its first acknowledgement.
        self.gap_s = Some(self.gap_s.map_or(gap, |g| g + 0.125 * (gap - g)));
        self.last = now;
    }
}

struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    table: PageTable,
    mem: MemoryMap,
    window: usize,
}

struct Chan {
    tx: Arc<Mutex<Box<dyn ChannelTx>>>,
    killer: Killer,
    shared: Arc<ChanShared>,
    backend: String,
    threads: Vec<JoinHandle<()>>,
}

fn sender_loop(
    idx: u16,
    sh: Arc<Shared>,
    cs: Arc<ChanShared>,
    tx: Arc<Mutex<Box<dyn ChannelTx>>>,
    ev: mpsc::Sender<Event>,
) {
    loop {
        // Take a window slot first, then a batch, so that a full channel leaves work to others.
        {
            let mut inf = match cs.inflight.lock() {
                Ok(g) => g,
                Err(_) => return,
            };
            while inf.len() >= sh.window && !cs.dead.load(Ordering::SeqCst) {
                inf = match cs.slots.wait_timeout(inf, Duration::from_millis(100)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        }
        if cs.dead.load(Ordering::SeqCst) {
            return;
        }
        let work = {
            let mut q = match sh.queue.lock() {
                Ok(g) => g,
                Err(_) => return,
            };
            loop {
                if q.closed || cs.dead.load(Ordering::SeqCst) {
                    return;
                }
                let pos = q.items.iter().position(|w| w.pin.is_none_or(|p| p == idx));
                if let Some(w) = pos.and_then(|p| q.items.remove(p)) {
                    break w;
                }
                q = match sh.cv.wait_timeout(q, Duration::from_millis(100)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        };
        // Hash before sending: the ack may arrive before this thread runs again, and the table
        // must be complete when the last ack of the final round is counted. A page the guest
        // changes between hash and send is dirty again and will be re-sent and re-hashed.
        let data_map = scan_work(&sh, &work);
        {
            // Under the inflight lock: either the batch is recorded before a failover drains this
            // channel's batches, or the channel is already dead and the batch goes straight back.
            let Ok(mut inf) = cs.inflight.lock() else { return };
            if cs.dead.load(Ordering::SeqCst) {
                drop(inf);
                // Unpinned: a failover may already have re-pinned this channel's work to the
                // survivors; a batch still pinned here would wait for a dead channel forever.
                let mut work = work;
                work.pin = None;
                if let Ok(mut q) = sh.queue.lock() {
                    q.items.push_front(work);
                }
                sh.cv.notify_all();
                return;
            }
            inf.insert(work.id, (work.clone(), Instant::now()));
        }
        let res = match tx.lock() {
            Ok(mut t) => t.send_batch_mapped(work.id, work.round, work.flags, &work.runs, &data_map, &sh.mem),
            Err(_) => return,
        };
        match res {
            Ok(sb) => {
                cs.wire.fetch_add(sb.wire_bytes, Ordering::Relaxed);
                cs.batches.fetch_add(1, Ordering::Relaxed);
                cs.pages.fetch_add(u64::from(sb.pages), Ordering::Relaxed);
                cs.zero.fetch_add(u64::from(sb.zero_pages), Ordering::Relaxed);
                cs.compressed.fetch_add(u64::from(sb.compressed), Ordering::Relaxed);
            }
            Err(e) => {
                cs.dead.store(true, Ordering::SeqCst);
                let _ = ev.send(Event::Failed(idx, format!("send: {e}")));
                return;
            }
        }
    }
}

/// Scan every page of a batch about to be sent, once: record its hash (what the destination must
/// now hold, unless the page is dirty again, in which case it is re-sent and re-hashed in a later
/// round) and return the batch's data map (bit set = the page carried data), so the transport
/// need not scan again.
fn scan_work(sh: &Shared, w: &Work) -> Vec<u8> {
    let total: usize = w.runs.iter().map(|r| r.pages as usize).sum();
    let mut map = vec![0u8; total.div_ceil(8)];
    let mut i = 0usize;
    for (r, &first) in w.runs.iter().zip(&w.first) {
        let Some(base) = sh.mem.source_ptr(r.gpa, r.len()) else {
            // Unreachable for a run planned from our own regions; the transport refuses it.
            i += r.pages as usize;
            continue;
        };
        // SAFETY: the run the memory map vouched for, page aligned; the scan only does volatile
        // reads.
        unsafe {
            scan_run(base, r.pages as usize, |p, s| {
                let k = i + p;
                if !s.zero {
                    map[k / 8] |= 1 << (k % 8);
                }
                sh.table.set((first + p as u64) as usize, s.hash);
            })
        };
        i += r.pages as usize;
    }
    map
}

fn reader_loop(idx: u16, mut rx: Box<dyn ChannelRx>, cs: Arc<ChanShared>, ev: mpsc::Sender<Event>) {
    loop {
        match rx.recv(&NoSink) {
            Ok(Incoming::Ack(a)) => {
                let entry = cs.inflight.lock().ok().and_then(|mut m| m.remove(&a.id));
                cs.slots.notify_all();
                if let Ok(mut c) = cs.acks.lock() {
                    c.tick();
                }
                if let Some((w, t)) = entry {
                    let lat = t.elapsed();
                    if let Ok(mut h) = cs.hist.lock() {
                        h.saturating_record(lat.as_micros() as u64);
                    }
                    let _ = ev.send(Event::Acked { pages: w.pages() });
                }
            }
            Ok(Incoming::Control(m)) => {
                let _ = ev.send(Event::Control(m));
            }
            Ok(Incoming::Batch(_)) => {
                cs.dead.store(true, Ordering::SeqCst);
                let _ = ev.send(Event::Failed(idx, "destination sent pages to the source".into()));
                return;
            }
            Ok(Incoming::Closed) => {
                cs.dead.store(true, Ordering::SeqCst);
                cs.slots.notify_all();
                let _ = ev.send(Event::Failed(idx, "destination closed the channel".into()));
                return;
            }
            Err(e) => {
                cs.dead.store(true, Ordering::SeqCst);
                cs.slots.notify_all();
                let _ = match e {
                    TransportError::PeerAborted { reason, .. } => ev.send(Event::Aborted(reason)),
                    e => ev.send(Event::Failed(idx, format!("receive: {e}"))),
                };
                return;
            }
        }
    }
}

/// Split a dirty bitmap into batches.
fn plan_batches(bm: &DirtyBitmap, first_index: &[u64], round: u32, batch_pages: u32, next_id: &mut u64) -> Vec<Work> {
    let flags = if round == 0 { BATCH_DEST_ZEROED } else { 0 };
    let mut out = Vec::new();
    let mut cur = Work { id: 0, round, flags, runs: Vec::new(), first: Vec::new(), pin: None };
    let mut cur_pages = 0u32;
    let mut flush = |cur: &mut Work, cur_pages: &mut u32, out: &mut Vec<Work>| {
        if !cur.runs.is_empty() {
            cur.id = *next_id;
            *next_id += 1;
            out.push(std::mem::replace(
                cur,
                Work { id: 0, round, flags, runs: Vec::new(), first: Vec::new(), pin: None },
            ));
        }
        *cur_pages = 0;
    };
    for (rb, &base_idx) in bm.regions.iter().zip(first_index) {
        let mut i = 0u64;
        while i < rb.pages {
            let w = rb.bits[(i / 64) as usize];
            if w == 0 && i.is_multiple_of(64) {
                i += 64;
                continue;
            }
            if !rb.get(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < rb.pages && rb.get(i) && (i - start) < u64::from(batch_pages - cur_pages) {
                i += 1;
            }
            let n = (i - start) as u32;
            cur.runs.push(PageRun { gpa: rb.gpa + start * PAGE_SIZE as u64, pages: n });
            cur.first.push(base_idx + start);
            cur_pages += n;
            if cur_pages >= batch_pages || cur.runs.len() >= MAX_BATCH_RUNS as usize {
                flush(&mut cur, &mut cur_pages, &mut out);
            }
        }
    }
    flush(&mut cur, &mut cur_pages, &mut out);
    out
}

struct Engine<'a> {
    cfg: &'a MigrationConfig,
    sh: Arc<Shared>,
    chans: Vec<Chan>,
    ev_rx: mpsc::Receiver<Event>,
    first_index: Vec<u64>,
    next_id: u64,
    stats: MigrationStats,
    progress: &'a (dyn Fn(&Progress) + Sync),
    lost: Vec<u16>,
    pending_lost: Vec<u16>,
    fault_done: bool,
    data_done: bool,
    ev_tx: mpsc::Sender<Event>,
    ending: Arc<AtomicBool>,
    started: Instant,
    bw: f64,
    sent_pages: u64,
    /// When the stall detector last looked.
    stalls_checked: Instant,
}

impl<'a> Engine<'a> {
    fn send_control(&self, m: &Msg) -> Result<(), MigrateError> {
        let mut t = self.chans[0].tx.lock().map_err(|_| MigrateError::Internal("control lock"))?;
        t.send_control(&m.encode()).map_err(|e| MigrateError::Channel(0, e.to_string()))
    }

    fn fault(&mut self, at: FaultPoint) -> Result<(), MigrateError> {
        if self.fault_done {
            return Ok(());
        }
        if let Some((p, a)) = self.cfg.fault {
            if p == at {
                self.fault_done = true;
                match a {
                    FaultAction::KillChannel(i) => {
                        if let Some(c) = self.chans.get(i as usize) {
                            (c.killer)();
                        }
                    }
                    FaultAction::Cancel => self.cfg.cancel.cancel(),
                    FaultAction::CorruptControl => {
                        let mut t = self.chans[0].tx.lock().map_err(|_| MigrateError::Internal("control lock"))?;
                        let _ = t.send_control(&[0xEE, 1, 2, 3]);
                    }
                }
            }
        }
        Ok(())
    }

    /// The stall detector (see [`MigrationConfig::stall_timeout`]): drop a data channel whose
    /// oldest unacknowledged batch and last acknowledgement are both older than its limit while
    /// another live channel answers (acknowledged within half the limit, or owes nothing).
    /// Everything stalling at once is left to the transport's timeouts (a paused destination is
    /// not a broken path). A false alarm costs a failover, never the migration.
    fn check_stalls(&mut self) -> Result<(), MigrateError> {
        let (Some(min), true) = (self.cfg.stall_timeout, self.cfg.failover) else { return Ok(()) };
        let now = Instant::now();
        // Limits are a second or more: looking every 50 ms is enough, and keeps the per-channel
        // locks off the path of every acknowledgement event.
        if now.duration_since(self.stalls_checked) < Duration::from_millis(50) {
            return Ok(());
        }
        self.stalls_checked = now;
        // One look at each live channel: (index, oldest unacknowledged batch, last ack, usual gap).
        let snap: Vec<(u16, Option<Instant>, Instant, Option<f64>)> = (0..self.chans.len() as u16)
            .filter(|&i| {
                !self.chans[i as usize].shared.dead.load(Ordering::SeqCst)
                    && !self.lost.contains(&i)
                    && !self.pending_lost.contains(&i)
            })
            .filter_map(|i| {
                let cs = &self.chans[i as usize].shared;
                let oldest = cs.inflight.lock().ok()?.values().map(|v| v.1).min();
                let (last, gap) = cs.acks.lock().map(|c| (c.last, c.gap_s)).ok()?;
                Some((i, oldest, last, gap))
            })
            .collect();
        // A channel's limit: max(min, 8x its usual gap); before its first acknowledgement, 8x the
        // slowest usual gap of the others (a uniformly slow multipath session is not stalled).
        let slowest = snap.iter().filter_map(|s| s.3).fold(0.0, f64::max);
        let limit_of = |gap: Option<f64>| min.max(Duration::from_secs_f64(8.0 * gap.unwrap_or(slowest)));
        let quiet = |last: Instant, gap: Option<f64>| now.duration_since(last) >= limit_of(gap);
        let owing: Vec<_> = snap.iter().filter(|s| s.1.is_some()).collect();
        if owing.len() > 1 && owing.iter().all(|s| quiet(s.2, s.3)) {
            // Every channel that owes acknowledgements is silent: the destination (or the whole
            // network) paused, not one path. Leave it to the transport's timeouts.
            return Ok(());
        }
        let mut stalled = Vec::new();
        for s in snap.iter().filter(|s| s.0 != 0) {
            let limit = limit_of(s.3);
            // Owes acknowledgements, and both its oldest batch and its last ack are past its limit.
            if s.1.is_none_or(|o| now.duration_since(o) < limit) || !quiet(s.2, s.3) {
                continue;
            }
            // Another channel is answering: it was acknowledged lately, or owes nothing (the
            // queue ran dry and the stalled channel holds the last batches).
            let others_answer =
                snap.iter().filter(|o| o.0 != s.0).any(|o| o.1.is_none() || now.duration_since(o.2) < limit / 2);
            if others_answer {
                stalled.push((s.0, now.duration_since(s.2)));
            }
        }
        for (i, quiet) in stalled {
            let why = format!("stalled: no acknowledgement for {} ms while other channels progress", quiet.as_millis());
            self.channel_failed(i, why)?;
        }
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.cfg.cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        Ok(())
    }

    /// Wait for the next event, checking cancel; `deadline` bounds the wait.
    fn next_event(&mut self, deadline: Instant) -> Result<Event, MigrateError> {
        loop {
            self.check_cancel()?;
            self.check_stalls()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrateError::Timeout("waiting for the destination"));
            }
            match self.ev_rx.recv_timeout(left.min(Duration::from_millis(20))) {
                Ok(e) => return Ok(e),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(MigrateError::Internal("event channel")),
            }
        }
    }

    /// Handle a channel failure: abort, or (failover) wait for the destination to confirm it
    /// dropped the channel, then put its unacknowledged batches back in the queue.
    fn channel_failed(&mut self, ch: u16, why: String) -> Result<(), MigrateError> {
        self.channel_failed_tell(ch, why, true)
    }

    /// [`Engine::channel_failed`]; `tell`: ask the destination to close its end (not when the
    /// destination reported the loss itself: a late `ChannelDrop` could hit a rejoined channel).
    fn channel_failed_tell(&mut self, ch: u16, why: String, tell: bool) -> Result<(), MigrateError> {
        if self.lost.contains(&ch) || self.pending_lost.contains(&ch) {
            return Ok(());
        }
        self.chans[ch as usize].shared.dead.store(true, Ordering::SeqCst);
        if ch != 0 && self.data_done {
            // Every page is acknowledged: a data channel is no longer needed.
            self.stats.events.push(format!("channel {ch} closed after the last batch: {why}"));
            self.lost.push(ch);
            return Ok(());
        }
        let alive = self.chans.iter().filter(|c| !c.shared.dead.load(Ordering::SeqCst)).count();
        self.stats.events.push(format!("channel {ch} failed: {why}"));
        if ch == 0 || !self.cfg.failover || alive == 0 {
            return Err(MigrateError::Channel(ch, why));
        }
        (self.chans[ch as usize].killer)();
        self.pending_lost.push(ch);
        // Ask the destination to close its end now rather than after its own timeout; it answers
        // ChannelLost once that channel's receiver has stopped. If channel 0 is gone too, the
        // next control exchange reports it.
        if tell {
            let _ = self.send_control(&Msg::ChannelDrop { channel: ch });
        }
        Ok(())
    }

    fn requeue_lost(&mut self, ch: u16) -> Result<(), MigrateError> {
        if !self.pending_lost.contains(&ch) {
            // The destination lost a channel the source still thinks alive: same thing.
            self.channel_failed_tell(ch, "destination lost it".into(), false)?;
        }
        self.pending_lost.retain(|&c| c != ch);
        self.lost.push(ch);
        let cs = &self.chans[ch as usize].shared;
        let items: Vec<Work> =
            cs.inflight.lock().map(|mut m| m.drain().map(|(_, v)| v.0).collect()).unwrap_or_default();
        let n = items.len();
        let alive: Vec<u16> = (0..self.chans.len() as u16)
            .filter(|&i| !self.chans[i as usize].shared.dead.load(Ordering::SeqCst))
            .collect();
        {
            let mut q = self.sh.queue.lock().map_err(|_| MigrateError::Internal("queue"))?;
            for w in items {
                q.items.push_front(w);
            }
            if self.cfg.scheduling == Scheduling::RoundRobin && !alive.is_empty() {
                // Re-pin the lost channel's batches round-robin over the survivors.
                for (k, w) in q.items.iter_mut().filter(|w| w.pin == Some(ch) || w.pin.is_none()).enumerate() {
                    w.pin = Some(alive[k % alive.len()]);
                }
            }
        }
        self.sh.cv.notify_all();
        self.stats.events.push(format!("channel {ch}: {n} unacknowledged batches resent on the surviving channels"));
        if let Some(rj) = self.cfg.rejoin.clone() {
            let (ev, stop, every) = (self.ev_tx.clone(), self.ending.clone(), self.cfg.rejoin_interval);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(every);
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(c) = (rj.0)(ch) {
                        if stop.load(Ordering::SeqCst) || ev.send(Event::Rejoined(ch, c)).is_err() {
                            return;
                        }
                        return;
                    }
                }
            });
        }
        Ok(())
    }

    /// A lost channel is back: start its threads and let it take work again.
    fn rejoined(&mut self, ch: u16, c: Channel) {
        if (ch as usize) >= self.chans.len() || !self.lost.contains(&ch) || self.data_done {
            (c.killer)();
            return;
        }
        for t in self.chans[ch as usize].threads.drain(..) {
            let _ = t.join();
        }
        self.chans[ch as usize] = spawn_chan(ch, c, &self.sh, &self.ev_tx);
        self.lost.retain(|&x| x != ch);
        self.stats.events.push(format!("channel {ch} rejoined after {:.1} s", self.started.elapsed().as_secs_f64()));
    }

    /// Handle a control message that arrived while pages move.
    fn control_during_round(&mut self, b: &[u8]) -> Result<(), MigrateError> {
        match Msg::decode(b)? {
            Msg::Refuse(r) => Err(MigrateError::Refused(r)),
            Msg::ChannelLost { channel } if (channel as usize) < self.chans.len() => self.requeue_lost(channel),
            other => Err(MigrateError::Unexpected(format!("{other:?} during a round"))),
        }
    }

    /// Send one round and wait until every batch is acknowledged (the round barrier).
    fn run_round(&mut self, bm: &DirtyBitmap, round: u32) -> Result<(u64, Duration), MigrateError> {
        let mut works = plan_batches(bm, &self.first_index, round, self.cfg.batch_pages, &mut self.next_id);
        if self.cfg.scheduling == Scheduling::RoundRobin {
            let alive: Vec<u16> = (0..self.chans.len() as u16)
                .filter(|&i| !self.chans[i as usize].shared.dead.load(Ordering::SeqCst))
                .collect();
            if !alive.is_empty() {
                for (k, w) in works.iter_mut().enumerate() {
                    w.pin = Some(alive[k % alive.len()]);
                }
            }
        }
        let total_pages: u64 = works.iter().map(Work::pages).sum();
        let n = works.len();
        let t0 = Instant::now();
        {
            let mut q = self.sh.queue.lock().map_err(|_| MigrateError::Internal("queue"))?;
            q.items.extend(works);
        }
        self.sh.cv.notify_all();
        let mut acked = 0usize;
        let mut acked_pages = 0u64;
        let mut last_report = Instant::now();
        let deadline_step = self.cfg.reply_timeout;
        let mut deadline = Instant::now() + deadline_step;
        while acked < n || !self.pending_lost.is_empty() {
            match self.next_event(deadline)? {
                Event::Acked { pages, .. } => {
                    acked += 1;
                    acked_pages += pages;
                    deadline = Instant::now() + deadline_step;
                    if acked == 1 {
                        self.fault(FaultPoint::InRound(round))?;
                    }
                }
                Event::Control(m) => self.control_during_round(&m)?,
                Event::Failed(ch, why) => self.channel_failed(ch, why)?,
                Event::Aborted(why) => return Err(MigrateError::DestinationAborted(why)),
                Event::Rejoined(ch, c) => self.rejoined(ch, c),
            }
            if last_report.elapsed() > Duration::from_millis(100) {
                last_report = Instant::now();
                self.report(Status::Active, round, (total_pages - acked_pages) * PAGE_SIZE as u64, Duration::ZERO, 0.0);
            }
        }
        self.sent_pages += total_pages;
        Ok((total_pages, t0.elapsed()))
    }

    fn transferred(&self) -> u64 {
        self.chans.iter().map(|c| c.shared.wire.load(Ordering::Relaxed)).sum()
    }

    fn report(&self, status: Status, round: u32, remaining: u64, expected: Duration, dirty_rate: f64) {
        (self.progress)(&Progress {
            status,
            round,
            guest_bytes: self.stats.guest_bytes,
            remaining_bytes: remaining,
            pages_sent: self.sent_pages,
            transferred_bytes: self.transferred(),
            expected_downtime: expected,
            bandwidth_bps: self.bw,
            dirty_rate_bps: dirty_rate,
            throttle_pct: self.stats.throttle_pct,
        });
    }

    fn wait_control(&mut self, what: &'static str) -> Result<Msg, MigrateError> {
        let deadline = Instant::now() + self.cfg.reply_timeout;
        loop {
            match self.next_event(deadline)? {
                Event::Control(m) => match Msg::decode(&m)? {
                    Msg::ChannelLost { channel } if (channel as usize) < self.chans.len() => {
                        if self.data_done {
                            self.channel_failed(channel, "destination lost it".into())?;
                        } else {
                            self.requeue_lost(channel)?;
                        }
                    }
                    Msg::Refuse(r) => return Err(MigrateError::Refused(r)),
                    m => return Ok(m),
                },
                Event::Failed(ch, why) => self.channel_failed(ch, why)?,
                Event::Aborted(why) => return Err(MigrateError::DestinationAborted(why)),
                Event::Rejoined(ch, c) => self.rejoined(ch, c),
                Event::Acked { .. } => {}
            }
            let _ = what;
        }
    }
}

fn spawn_chan(i: u16, ch: Channel, sh: &Arc<Shared>, ev_tx: &mpsc::Sender<Event>) -> Chan {
    let cs = Arc::new(ChanShared {
        inflight: Mutex::new(HashMap::new()),
        slots: Condvar::new(),
        dead: AtomicBool::new(false),
        wire: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        pages: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        compressed: AtomicU64::new(0),
        acks: Mutex::new(AckClock { last: Instant::now(), gap_s: None }),
        hist: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap_or_else(|_| {
            hdrhistogram::Histogram::new(2).unwrap_or_else(|_| unreachable!("2 significant digits is valid"))
        })),
    });
    let tx = Arc::new(Mutex::new(ch.tx));
    let mut threads = Vec::new();
    {
        let (sh, cs, tx, ev) = (sh.clone(), cs.clone(), tx.clone(), ev_tx.clone());
        threads.push(std::thread::spawn(move || sender_loop(i, sh, cs, tx, ev)));
    }
    {
        let (cs, ev, rx) = (cs.clone(), ev_tx.clone(), ch.rx);
        threads.push(std::thread::spawn(move || reader_loop(i, rx, cs, ev)));
    }
    Chan { tx, killer: ch.killer, shared: cs, backend: ch.info.backend.to_string(), threads }
}

/// Migrate `vm` over `channels` (channel 0 carries control). On success the destination runs the
/// VM and the source's copy stays paused for the caller to release. On any failure before commit
/// the VM runs on the source with its memory intact, and the error says why.
pub fn migrate(
    vm: &mut dyn SourceVm,
    channels: Vec<Channel>,
    cfg: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrationStats, MigrateError> {
    let started = Instant::now();
    let was_running = vm.is_running();
    let shape = vm.shape();
    let guest_bytes = shape.memory_bytes();
    let mut first_index = Vec::new();
    let mut acc = 0u64;
    for &(_, len) in &shape.regions {
        first_index.push(acc);
        acc += len / PAGE_SIZE as u64;
    }
    let total_pages = acc;
    if channels.is_empty() {
        return Err(MigrateError::Config("no channels"));
    }
    let sh = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        cv: Condvar::new(),
        table: PageTable::new(total_pages as usize, 0),
        mem: vm.memory(),
        window: cfg.window.max(1),
    });
    let (ev_tx, ev_rx) = mpsc::channel();
    let nch = channels.len();
    let mut chans = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        chans.push(spawn_chan(i as u16, ch, &sh, &ev_tx));
    }
    let mut eng = Engine {
        cfg,
        sh,
        chans,
        ev_rx,
        first_index,
        next_id: 1,
        stats: MigrationStats {
            status: Status::Setup,
            total: Duration::ZERO,
            setup: Duration::ZERO,
            downtime: Duration::ZERO,
            expected_downtime: Duration::ZERO,
            rounds: 0,
            guest_bytes,
            transferred_bytes: 0,
            zero_pages: 0,
            data_pages: 0,
            compressed_batches: 0,
            pages_per_round: Vec::new(),
            dirty_rate_bps: 0.0,
            throughput_bps: 0.0,
            throttle_pct: 100,
            channels: Vec::new(),
            verified: false,
            events: Vec::new(),
        },
        progress,
        lost: Vec::new(),
        pending_lost: Vec::new(),
        fault_done: false,
        data_done: false,
        ev_tx: ev_tx.clone(),
        ending: Arc::new(AtomicBool::new(false)),
        started,
        bw: 0.0,
        sent_pages: 0,
        stalls_checked: Instant::now(),
    };
    let mut paused_at: Option<Instant> = None;
    let mut commit_sent = false;
    let result = run(&mut eng, vm, &shape, nch, total_pages, &mut paused_at, &mut commit_sent);
    // Tear down: stop senders and rejoin attempts, cut channels, join threads.
    eng.ending.store(true, Ordering::SeqCst);
    while let Ok(ev) = eng.ev_rx.try_recv() {
        if let Event::Rejoined(_, c) = ev {
            (c.killer)();
        }
    }
    if let Ok(mut q) = eng.sh.queue.lock() {
        q.closed = true;
        q.items.clear();
    }
    eng.sh.cv.notify_all();
    if result.is_err() && !commit_sent {
        // Best effort: tell the destination why, so it discards at once.
        if let Ok(mut t) = eng.chans[0].tx.try_lock() {
            let reason = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            let _ = t.send_abort(1, &reason);
        }
    } else if let Ok(mut t) = eng.chans[0].tx.try_lock() {
        let _ = t.close();
    }
    for c in &eng.chans {
        c.shared.dead.store(true, Ordering::SeqCst);
        c.shared.slots.notify_all();
        (c.killer)();
    }
    for c in &mut eng.chans {
        for t in c.threads.drain(..) {
            let _ = t.join();
        }
    }
    vm.set_throttle(100);
    let mut stats = eng.stats;
    stats.total = started.elapsed();
    stats.transferred_bytes = eng.chans.iter().map(|c| c.shared.wire.load(Ordering::Relaxed)).sum();
    stats.zero_pages = eng.chans.iter().map(|c| c.shared.zero.load(Ordering::Relaxed)).sum();
    stats.data_pages = eng.chans.iter().map(|c| c.shared.pages.load(Ordering::Relaxed)).sum::<u64>() - stats.zero_pages;
    stats.compressed_batches = eng.chans.iter().map(|c| c.shared.compressed.load(Ordering::Relaxed)).sum();
    stats.throughput_bps = guest_bytes as f64 / stats.total.as_secs_f64().max(1e-9);
    stats.channels = eng
        .chans
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let pct = |p: f64| c.shared.hist.lock().map(|h| h.value_at_quantile(p)).unwrap_or(0);
            ChannelStats {
                index: i as u16,
                backend: c.backend.clone(),
                batches: c.shared.batches.load(Ordering::Relaxed),
                pages: c.shared.pages.load(Ordering::Relaxed),
                wire_bytes: c.shared.wire.load(Ordering::Relaxed),
                latency_us: [pct(0.5), pct(0.9), pct(0.99), pct(1.0)],
                failed: eng.lost.contains(&(i as u16)) || eng.pending_lost.contains(&(i as u16)),
            }
        })
        .collect();
    match result {
        Ok(()) => {
            stats.status = Status::Completed;
            vm.stop_dirty_log();
            Ok(stats)
        }
        Err(e) if commit_sent && !matches!(e, MigrateError::DestinationAborted(_) | MigrateError::Refused(_)) => {
            // Ownership is unknown: keep the copy paused, never resume it here.
            stats.status = Status::Uncertain;
            stats.events.push(format!("commit sent but not confirmed: {e}"));
            Err(MigrateError::Uncertain(Box::new(stats)))
        }
        Err(e) => {
            vm.stop_dirty_log();
            if paused_at.is_some() && was_running {
                if let Err(re) = vm.resume() {
                    return Err(MigrateError::Vm(format!("{e}; and resuming the source failed: {re}")));
                }
            }
            let _ = eng.started;
            Err(e)
        }
    }
}

fn run(
    eng: &mut Engine<'_>,
    vm: &mut dyn SourceVm,
    shape: &crate::vm::VmShape,
    nch: usize,
    total_pages: u64,
    paused_at: &mut Option<Instant>,
    commit_sent: &mut bool,
) -> Result<(), MigrateError> {
    let cfg = eng.cfg;
    eng.report(Status::Setup, 0, eng.stats.guest_bytes, Duration::ZERO, 0.0);
    eng.send_control(&Msg::Prepare {
        version: MIGRATION_VERSION,
        shape: shape.clone(),
        channels: nch as u16,
        verify_full: cfg.verify_full,
    })?;
    match eng.wait_control("prepare")? {
        Msg::PrepareOk => {}
        other => return Err(MigrateError::Unexpected(format!("{other:?} instead of PrepareOk"))),
    }
    eng.fault(FaultPoint::AfterPrepare)?;
    vm.start_dirty_log().map_err(|e| MigrateError::Vm(e.to_string()))?;
    eng.stats.setup = eng.started.elapsed();
    // Round 0: every page (zero pages cost one bit each).
    let mut bm = DirtyBitmap {
        regions: shape.regions.iter().map(|&(gpa, len)| RegionBitmap::full(gpa, len / PAGE_SIZE as u64)).collect(),
    };
    let mut round = 0u32;
    let mut send_time = Duration::ZERO;
    let mut send_bytes = 0f64;
    let mut dirty_rate = 0.0;
    let mut prev_dirty = u64::MAX;
    let mut stalls = 0;
    let expected;
    loop {
        eng.report(Status::Active, round, bm.bytes(), Duration::ZERO, dirty_rate);
        let (pages, took) = eng.run_round(&bm, round)?;
        eng.stats.pages_per_round.push(pages);
        eng.send_control(&Msg::RoundEnd { round, pages })?;
        // Bandwidth: data-page bytes per second of sending, over all rounds so far.
        let data_pages_now: u64 = eng
            .chans
            .iter()
            .map(|c| c.shared.pages.load(Ordering::Relaxed) - c.shared.zero.load(Ordering::Relaxed))
            .sum();
        send_time += took;
        send_bytes = send_bytes.max(0.0);
        let _ = send_bytes;
        eng.bw = (data_pages_now * PAGE_SIZE as u64) as f64 / send_time.as_secs_f64().max(1e-6);
        // The pages dirtied while this round was sending.
        let dirty = vm.take_dirty().map_err(|e| MigrateError::Vm(e.to_string()))?;
        let dcount = dirty.count();
        dirty_rate = dirty.bytes() as f64 / took.as_secs_f64().max(1e-6);
        eng.stats.dirty_rate_bps = dirty_rate;
        let exp = Duration::from_secs_f64(dirty.bytes() as f64 / eng.bw.max(1.0));
        eng.stats.rounds = round + 1;
        eng.report(Status::Active, round, dirty.bytes(), exp, dirty_rate);
        if exp <= cfg.downtime_limit {
            expected = exp;
            bm = dirty;
            break;
        }
        let over_rounds = round + 1 >= cfg.max_rounds;
        let over_time = eng.started.elapsed() >= cfg.timeout;
        if over_rounds || over_time {
            match cfg.policy {
                ConvergePolicy::Abort => {
                    vm.return_dirty(&dirty);
                    return Err(MigrateError::NotConverging {
                        rounds: round + 1,
                        dirty_rate_bps: dirty_rate,
                        bandwidth_bps: eng.bw,
                    });
                }
                ConvergePolicy::ForceSwitchover => {
                    eng.stats.events.push(format!(
                        "forced switchover after {} rounds (expected downtime {:?})",
                        round + 1,
                        exp
                    ));
                    expected = exp;
                    bm = dirty;
                    break;
                }
            }
        }
        // Auto-converge: the dirty set is not shrinking enough, slow the guest a step.
        if dcount * 10 >= prev_dirty.saturating_mul(9) || dirty_rate > 0.5 * eng.bw {
            stalls += 1;
        } else {
            stalls = 0;
        }
        prev_dirty = dcount;
        if cfg.auto_converge && stalls >= 1 && eng.stats.throttle_pct > cfg.throttle_min {
            let t = eng.stats.throttle_pct.saturating_sub(cfg.throttle_step).max(cfg.throttle_min);
            eng.stats.throttle_pct = t;
            vm.set_throttle(t);
            eng.stats.events.push(format!(
                "round {round}: throttled guest to {t}% (dirty rate {:.0} MB/s, bandwidth {:.0} MB/s)",
                dirty_rate / 1e6,
                eng.bw / 1e6
            ));
        }
        bm = dirty;
        round += 1;
    }
    eng.stats.expected_downtime = expected;
    // Switchover.
    round += 1;
    let t_pause = Instant::now();
    vm.pause().map_err(|e| MigrateError::Vm(e.to_string()))?;
    *paused_at = Some(t_pause);
    eng.fault(FaultPoint::AtSwitchover)?;
    let last = vm.take_dirty().map_err(|e| MigrateError::Vm(e.to_string()))?;
    bm.merge(&last);
    eng.report(Status::Switchover, round, bm.bytes(), expected, dirty_rate);
    eng.send_control(&Msg::Switchover { round })?;
    let (pages, _) = if bm.count() > 0 { eng.run_round(&bm, round)? } else { (0, Duration::ZERO) };
    eng.stats.pages_per_round.push(pages);
    eng.stats.rounds = round + 1;
    eng.data_done = true;
    let state = vm.save_state().map_err(|e| MigrateError::Vm(e.to_string()))?;
    for (i, chunk) in state.chunks(MAX_CHUNK).enumerate() {
        eng.send_control(&Msg::StateChunk { offset: (i * MAX_CHUNK) as u64, data: chunk.to_vec() })?;
    }
    eng.fault(FaultPoint::BeforeComplete)?;
    eng.check_cancel()?;
    let d = eng.sh.table.digest();
    eng.send_control(&Msg::Complete {
        state_len: state.len() as u64,
        state_crc: crc32fast::hash(&state),
        digest: d,
        pages: total_pages,
    })?;
    match eng.wait_control("ready")? {
        Msg::Ready => {}
        other => return Err(MigrateError::Unexpected(format!("{other:?} instead of Ready"))),
    }
    eng.stats.verified = true;
    eng.fault(FaultPoint::BeforeCommit)?;
    eng.check_cancel()?;
    // Point of no return for the source. A failed send means the kernel took none of the
    // message's bytes, so the destination cannot have it; only after a successful send is the
    // outcome unknown until `Resumed` (or an explicit abort, which the destination never sends
    // once it has the commit).
    eng.send_control(&Msg::Commit)?;
    *commit_sent = true;
    match eng.wait_control("resumed")? {
        Msg::Resumed => {}
        other => return Err(MigrateError::Unexpected(format!("{other:?} instead of Resumed"))),
    }
    eng.stats.downtime = t_pause.elapsed();
    eng.report(Status::Completed, round, 0, expected, dirty_rate);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_exactly_the_dirty_pages() {
        let mut a = RegionBitmap::new(0, 130);
        let mut b = RegionBitmap::new(1 << 30, 1000);
        for i in [0u64, 1, 2, 63, 64, 65, 129] {
            a.set(i);
        }
        for i in 100..700 {
            b.set(i);
        }
        b.set(999);
        let bm = DirtyBitmap { regions: vec![a.clone(), b.clone()] };
        let mut id = 1;
        let w = plan_batches(&bm, &[0, 130], 3, 256, &mut id);
        let mut seen = std::collections::HashSet::new();
        for x in &w {
            assert!(x.pages() <= 256);
            assert_eq!(x.round, 3);
            assert_eq!(x.flags, 0);
            for (r, &f) in x.runs.iter().zip(&x.first) {
                for p in 0..u64::from(r.pages) {
                    assert!(seen.insert(f + p), "page twice");
                }
            }
        }
        let want: std::collections::HashSet<u64> =
            (0..130).filter(|&i| a.get(i)).chain((0..1000).filter(|&i| b.get(i)).map(|i| i + 130)).collect();
        assert_eq!(seen, want);
        let w0 = plan_batches(&bm, &[0, 130], 0, 256, &mut id);
        assert!(w0.iter().all(|x| x.flags == BATCH_DEST_ZEROED));
    }

    #[test]
    fn state_crc_is_crc32_ieee() {
        // The wire's `state_crc` is CRC-32 (IEEE), the check value of which is this.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }
}
