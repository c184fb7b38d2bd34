//! The source side of a live migration, the threaded driver of
//! [`crate::session::source::SourceSession`]: it owns the VM, the channels, their threads and
//! the clock, feeds the session events and carries out its actions. The session decides what to
//! send and when to pause, commit or give up; this module moves the bytes.
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

use ferry_memory::digest::PageTable;
use ferry_memory::scan::{scan_slice_keyed, HashKey};
use ferry_memory::{MemoryMap, MemorySource, NoSink};
use ferry_transport::{Channel, ChannelRx, ChannelTx, Incoming, Killer, TransportError};

use crate::disks::DiskPump;
use crate::session::source::{Batch, Outcome, SourceAction, SourceConfig, SourceSession, SourceState};
use crate::stats::{ChannelStats, MigrationStats, Progress, Status};
use crate::vm::SourceVm;
use crate::MigrateError;

pub use crate::session::estimate::{ConvergeConfig, ConvergePolicy};
pub use crate::session::source::Scheduling;

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
    /// When to switch over and what to do when the guest does not converge (downtime limit,
    /// rounds, timeout, policy, auto-converge); the expected downtime is estimated from the rate
    /// the live channels delivered most recently: see [`crate::session::estimate`].
    pub converge: ConvergeConfig,
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
    /// Shared-nothing moves (a VM with disks, [`SourceVm::disks`]): keep the source's disk
    /// files after the destination committed (Hyper-V's `-RetainVhdCopiesOnSource`); by default
    /// they are removed once the destination runs the VM.
    pub retain_source_disks: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            converge: ConvergeConfig::default(),
            batch_pages: 256,
            window: 16,
            verify_full: false,
            failover: true,
            reply_timeout: Duration::from_secs(30),
            cancel: CancelToken::new(),
            scheduling: Scheduling::Adaptive,
            rejoin: None,
            rejoin_interval: Duration::from_millis(500),
            stall_timeout: Some(Duration::from_secs(1)),
            retain_source_disks: false,
        }
    }
}

enum Event {
    /// A sender is about to send batch `id` on channel `ch`.
    Sent {
        ch: u16,
        id: u64,
        data_pages: u64,
    },
    /// Batch `id` went out in `wire_bytes`.
    Wire {
        id: u64,
        wire_bytes: u64,
    },
    Acked {
        ch: u16,
        id: u64,
    },
    Control(Vec<u8>),
    Failed(u16, String),
    /// The destination said it gives up (it never does so after taking ownership).
    Aborted(String),
    /// A lost channel was re-opened.
    Rejoined(u16, Channel),
    /// Disk blocks were acknowledged (the engine looks whether the disks are in sync or flushed).
    DiskAcked,
    /// The disk copy failed (a read error, a destination that broke the disk protocol).
    DiskFailed(String),
}

#[derive(Default)]
struct Queue {
    items: std::collections::VecDeque<Batch>,
    closed: bool,
}

struct ChanShared {
    inflight: Mutex<HashMap<u64, (Batch, Instant)>>,
    slots: Condvar,
    dead: AtomicBool,
    wire: AtomicU64,
    batches: AtomicU64,
    pages: AtomicU64,
    zero: AtomicU64,
    compressed: AtomicU64,
    hist: Mutex<hdrhistogram::Histogram<u64>>,
}

struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    table: PageTable,
    /// Keys the page hashes (from channel 0's image key): nobody without the pre-shared key can
    /// compute them, so nobody can forge pages that hash alike.
    hash_key: HashKey,
    mem: MemoryMap,
    window: usize,
    /// Pins are preferences (adaptive scheduling), not rules (round-robin).
    steal: bool,
    /// The VM's disks (shared-nothing), sent by a disk thread per channel.
    pump: Option<Arc<DiskPump>>,
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
                let pos = q.items.iter().position(|w| w.pin.is_none_or(|p| p == idx)).or_else(|| {
                    // Adaptive: a channel that has sent all its own and has nothing in flight
                    // takes the last queued batch of another's share of the final round (the one
                    // its owner would send last), one at a time.
                    let idle = sh.steal && cs.inflight.lock().is_ok_and(|m| m.is_empty());
                    idle.then(|| q.items.len().checked_sub(1)).flatten()
                });
                if let Some(w) = pos.and_then(|p| q.items.remove(p)) {
                    break w;
                }
                // Others' shares queued: look again soon (this channel may become idle).
                let wait =
                    if q.items.is_empty() || !sh.steal { Duration::from_millis(100) } else { Duration::from_millis(1) };
                q = match sh.cv.wait_timeout(q, wait) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        };
        // Hash before sending: the ack may arrive before this thread runs again, and the table
        // must be complete when the last ack of the final round is counted. A page the guest
        // changes between hash and send is dirty again and will be re-sent and re-hashed.
        let data_map = scan_work(&sh, &work);
        let data_pages: u64 = data_map.iter().map(|b| u64::from(b.count_ones())).sum();
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
            // Reported before the bytes leave, so the acknowledgement can never overtake it.
            let _ = ev.send(Event::Sent { ch: idx, id: work.id, data_pages });
        }
        let res = match tx.lock() {
            Ok(mut t) => t.send_batch_mapped(work.id, work.round, work.flags, &work.runs, &data_map, &sh.mem),
            Err(_) => return,
        };
        match res {
            Ok(sb) => {
                let _ = ev.send(Event::Wire { id: work.id, wire_bytes: sb.wire_bytes });
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
fn scan_work(sh: &Shared, w: &Batch) -> Vec<u8> {
    let total: usize = w.runs.iter().map(|r| r.pages as usize).sum();
    let mut map = vec![0u8; total.div_ceil(8)];
    let mut i = 0usize;
    for (r, &first) in w.runs.iter().zip(&w.first) {
        // A run outside our own regions is unreachable for a run planned from them; the
        // transport refuses it.
        if let Some(run) = sh.mem.source_slice(r.gpa, r.len()) {
            scan_slice_keyed(run, &sh.hash_key, |p, s| {
                let k = i + p;
                if !s.zero {
                    map[k / 8] |= 1 << (k % 8);
                }
                sh.table.set((first + p as u64) as usize, s.hash);
            });
        }
        i += r.pages as usize;
    }
    map
}

fn reader_loop(
    idx: u16,
    mut rx: Box<dyn ChannelRx>,
    cs: Arc<ChanShared>,
    pump: Option<Arc<DiskPump>>,
    ev: mpsc::Sender<Event>,
) {
    loop {
        match rx.recv(&NoSink) {
            Ok(Incoming::Ack(a)) => {
                let entry = cs.inflight.lock().ok().and_then(|mut m| m.remove(&a.id));
                cs.slots.notify_all();
                if let Some((_, t)) = entry {
                    let lat = t.elapsed();
                    if let Ok(mut h) = cs.hist.lock() {
                        h.saturating_record(lat.as_micros() as u64);
                    }
                    let _ = ev.send(Event::Acked { ch: idx, id: a.id });
                }
            }
            Ok(Incoming::Control(m)) if crate::protocol::is_disk_ack(&m) => {
                let r = match (&pump, crate::protocol::Msg::decode(&m)) {
                    (Some(p), Ok(crate::protocol::Msg::DiskAck { seq })) => p.acked(idx, seq),
                    (None, _) => Err("DiskAck without disks".into()),
                    (_, Err(e)) => Err(e.to_string()),
                    (_, Ok(_)) => Err("not a DiskAck".into()),
                };
                let _ = ev.send(match r {
                    Ok(()) => Event::DiskAcked,
                    Err(e) => Event::DiskFailed(format!("channel {idx}: {e}")),
                });
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

struct Engine<'a> {
    cfg: &'a MigrationConfig,
    session: SourceSession,
    sh: Arc<Shared>,
    chans: Vec<Chan>,
    ev_rx: mpsc::Receiver<Event>,
    ev_tx: mpsc::Sender<Event>,
    progress: &'a (dyn Fn(&Progress) + Sync),
    ending: Arc<AtomicBool>,
    /// Resuming the source after a failure failed too.
    resume_failed: Option<String>,
    /// The disks are being flushed in the pause.
    flushing: bool,
    /// The source's disk files were removed after the commit (per disk).
    removed: Vec<bool>,
    /// Events of the disk driver (added to the session's).
    disk_events: Vec<String>,
}

impl Engine<'_> {
    fn transferred(&self) -> u64 {
        self.chans.iter().map(|c| c.shared.wire.load(Ordering::Relaxed)).sum()
    }

    /// Run the session to its end: carry out its actions, feed it events, time and cancel.
    fn drive(&mut self, vm: &mut dyn SourceVm) -> Outcome {
        loop {
            while let Some(a) = self.session.poll_action() {
                if let Some(out) = self.execute(a, vm) {
                    return out;
                }
            }
            if self.cfg.cancel.is_cancelled() && !self.session.commit_sent() {
                self.session.handle_cancel();
                continue;
            }
            let now = Instant::now();
            let wait = self
                .session
                .poll_timeout()
                .map_or(Duration::from_millis(20), |t| t.saturating_duration_since(now))
                .min(Duration::from_millis(20));
            match self.ev_rx.recv_timeout(wait) {
                Ok(ev) => {
                    // A cancel asked before this event came in wins over it (never after commit).
                    if self.cfg.cancel.is_cancelled() {
                        self.session.handle_cancel();
                    }
                    self.feed(ev);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Outcome::Failed(MigrateError::Internal("event channel"));
                }
            }
            self.check_disks();
            self.session.handle_timeout(Instant::now());
        }
    }

    /// Tell the session when the disks are in sync or flushed, or stuck.
    fn check_disks(&mut self) {
        let Some(p) = self.sh.pump.clone() else { return };
        let now = Instant::now();
        if self.session.state() == SourceState::CopyingDisks {
            match p.in_sync(now) {
                Some(true) => self.session.handle_disks_synced(Ok(()), now),
                Some(false) => {
                    self.disk_events.push(format!(
                        "disks copied; {} dirty blocks did not get under {} in {} s (the guest rewrites them faster than the link carries them): memory starts, the disks stay mirrored",
                        p.dirty_blocks(),
                        crate::disks::SYNC_BLOCKS,
                        crate::disks::SYNC_WAIT.as_secs()
                    ));
                    self.session.handle_disks_synced(Ok(()), now);
                }
                None => {}
            }
        }
        if self.flushing {
            if let Some(d) = p.flushed() {
                self.flushing = false;
                self.session.handle_disks_flushed(Ok(d), now);
            }
        }
        if p.oldest_unacked(now).is_some_and(|age| age > self.cfg.reply_timeout) {
            self.session.handle_disk_failed(format!(
                "disk blocks unacknowledged for more than {} s",
                self.cfg.reply_timeout.as_secs()
            ));
        }
    }

    fn feed(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::DiskAcked => {}
            Event::DiskFailed(why) => self.session.handle_disk_failed(why),
            Event::Sent { ch, id, data_pages } => self.session.handle_sent(ch, id, data_pages, now),
            Event::Wire { id, wire_bytes } => self.session.handle_wire(id, wire_bytes),
            Event::Acked { ch, id } => self.session.handle_acked(ch, id, now),
            Event::Control(m) => self.session.handle_control(&m, now),
            Event::Failed(ch, why) => self.session.handle_channel_failed(ch, why, now),
            Event::Aborted(why) => self.session.handle_aborted(why),
            Event::Rejoined(ch, c) => {
                if self.session.handle_rejoined(ch, now) {
                    for t in self.chans[ch as usize].threads.drain(..) {
                        let _ = t.join();
                    }
                    self.chans[ch as usize] = spawn_chan(ch, c, &self.sh, &self.ev_tx);
                } else {
                    (c.killer)();
                }
            }
        }
    }

    /// The round barrier (every batch acknowledged; the session asks for the dirty pages or the
    /// state next): each live channel closes the destination's one-sided write access of the
    /// round ([`ChannelTx::end_round`]: rdma invalidates its memory windows), so between rounds
    /// and from the final round on no page can land on any channel. A channel that cannot is
    /// failed like any broken channel.
    ///
    /// The close is asked on every channel first and then waited for on each, so the barrier
    /// costs one control round trip however many channels there are. A dead channel is skipped:
    /// its killer already cut it, and the destination seals a channel's memory when it ends.
    fn end_round(&self) {
        let fail = |i: usize, c: &Chan, e: ferry_transport::TransportError| {
            c.shared.dead.store(true, Ordering::SeqCst);
            c.shared.slots.notify_all();
            (c.killer)();
            let _ = self.ev_tx.send(Event::Failed(i as u16, format!("closing the round: {e}")));
        };
        for phase in [false, true] {
            for (i, c) in self.chans.iter().enumerate() {
                if c.shared.dead.load(Ordering::SeqCst) {
                    continue;
                }
                let r = match c.tx.lock() {
                    Ok(mut t) if phase => t.end_round(),
                    Ok(mut t) => t.begin_end_round(),
                    Err(_) => continue,
                };
                if let Err(e) = r {
                    fail(i, c, e);
                }
            }
        }
    }

    fn execute(&mut self, a: SourceAction, vm: &mut dyn SourceVm) -> Option<Outcome> {
        let s = |r: Result<(), crate::vm::VmError>| r.map_err(|e| e.to_string());
        match a {
            SourceAction::Send(m) => {
                let r = match self.chans[0].tx.lock() {
                    Ok(mut t) => t.send_control(&m.encode()).map_err(|e| e.to_string()),
                    Err(_) => Err("control lock".to_string()),
                };
                if let Err(e) = r {
                    self.session.handle_send_failed(e);
                }
            }
            SourceAction::StartDirtyLog => {
                let r = s(vm.start_dirty_log());
                self.session.handle_dirty_log(r, Instant::now());
            }
            SourceAction::TakeDirty => {
                self.end_round();
                let r = vm.take_dirty().map_err(|e| e.to_string());
                self.session.handle_dirty(r, Instant::now());
            }
            SourceAction::ReturnDirty(bm) => vm.return_dirty(&bm),
            SourceAction::SetThrottle(t) => vm.set_throttle(t),
            SourceAction::Pause => {
                let r = s(vm.pause());
                self.session.handle_paused(r, Instant::now());
            }
            SourceAction::SaveState => {
                self.end_round();
                let r = vm.save_state().map_err(|e| e.to_string());
                let digest = self.sh.table.digest();
                self.session.handle_state(r, digest, Instant::now());
            }
            SourceAction::Queue(batches) => {
                if let Ok(mut q) = self.sh.queue.lock() {
                    q.items.extend(batches);
                }
                self.sh.cv.notify_all();
            }
            SourceAction::KillChannel(ch) => {
                let c = &self.chans[ch as usize];
                c.shared.dead.store(true, Ordering::SeqCst);
                c.shared.slots.notify_all();
                (c.killer)();
            }
            SourceAction::Requeue { channel, alive } => {
                if let Some(p) = &self.sh.pump {
                    p.channel_lost(channel);
                }
                self.requeue(channel, &alive);
            }
            SourceAction::StartDisks => {
                let r = self.sh.pump.as_ref().map_or(Err("no disks".to_string()), |p| p.start());
                if let Err(e) = r {
                    self.session.handle_disks_synced(Err(e), Instant::now());
                }
            }
            SourceAction::FlushDisks => {
                if let Some(p) = &self.sh.pump {
                    p.flush();
                    self.flushing = true;
                }
            }
            SourceAction::RemoveSourceDisks => {
                // The destination runs the VM on its copies (Resumed): the files here go. A
                // file that cannot be removed is reported, not a failure: the VM moved.
                let disks = self.sh.pump.as_ref().map(|p| p.disks()).unwrap_or_default();
                self.removed = disks
                    .iter()
                    .map(|d| match std::fs::remove_file(d.path()) {
                        Ok(()) => true,
                        Err(e) => {
                            self.session_event(format!("source disk {} not removed: {e}", d.path().display()));
                            false
                        }
                    })
                    .collect();
            }
            SourceAction::Rejoin(ch) => self.start_rejoin(ch),
            SourceAction::Progress(mut p) => {
                p.transferred_bytes = self.transferred();
                (self.progress)(&p);
            }
            SourceAction::StopDirtyLog => vm.stop_dirty_log(),
            SourceAction::Resume => {
                if let Err(e) = vm.resume() {
                    self.resume_failed = Some(e.to_string());
                }
            }
            SourceAction::Finish(out) => return Some(out),
        }
        None
    }

    fn session_event(&mut self, e: String) {
        self.disk_events.push(e);
    }

    /// Put a lost channel's unacknowledged batches back on the queue (the destination has
    /// stopped its receiver, so no old copy can land late).
    fn requeue(&mut self, ch: u16, alive: &[u16]) {
        let cs = &self.chans[ch as usize].shared;
        cs.dead.store(true, Ordering::SeqCst);
        let items: Vec<Batch> =
            cs.inflight.lock().map(|mut m| m.drain().map(|(_, v)| v.0).collect()).unwrap_or_default();
        if let Ok(mut q) = self.sh.queue.lock() {
            for w in items {
                q.items.push_front(w);
            }
            if self.cfg.scheduling == Scheduling::RoundRobin && !alive.is_empty() {
                // Re-pin the lost channel's batches round-robin over the survivors.
                for (k, w) in q.items.iter_mut().filter(|w| w.pin == Some(ch) || w.pin.is_none()).enumerate() {
                    w.pin = Some(alive[k % alive.len()]);
                }
            } else {
                // Adaptive: the lost channel's share of a final round goes to whoever pulls first.
                for w in q.items.iter_mut().filter(|w| w.pin == Some(ch)) {
                    w.pin = None;
                }
            }
        }
        self.sh.cv.notify_all();
    }

    fn start_rejoin(&self, ch: u16) {
        let Some(rj) = self.cfg.rejoin.clone() else { return };
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
    if channels.is_empty() {
        return Err(MigrateError::Config("no channels"));
    }
    let total_pages: u64 = shape.regions.iter().map(|r| r.1 / ferry_transport::wire::PAGE_SIZE as u64).sum();
    let encryption = channels[0].info.established.encryption.to_string();
    let hash_key = HashKey::from_secret(channels[0].info.image_key.bytes());
    let disks = vm.disks();
    let pump = (!disks.is_empty()).then(|| {
        Arc::new(DiskPump::new(disks, ferry_disk::digest::DigestKey::from_secret(channels[0].info.image_key.bytes())))
    });
    let sh = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        cv: Condvar::new(),
        table: PageTable::with_key(total_pages as usize, 0, &hash_key),
        hash_key,
        mem: vm.memory(),
        window: cfg.window.max(1),
        steal: cfg.scheduling == Scheduling::Adaptive,
        pump: pump.clone(),
    });
    let (ev_tx, ev_rx) = mpsc::channel();
    let nch = channels.len();
    let mut chans = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        chans.push(spawn_chan(i as u16, ch, &sh, &ev_tx));
    }
    let mut session = SourceSession::new(SourceConfig::from(cfg), shape, nch, was_running, started);
    if let Some(p) = &pump {
        session = session.with_disks(p.descs(), cfg.retain_source_disks);
    }
    let mut eng = Engine {
        cfg,
        session,
        sh,
        chans,
        ev_rx,
        ev_tx,
        progress,
        ending: Arc::new(AtomicBool::new(false)),
        resume_failed: None,
        flushing: false,
        removed: Vec::new(),
        disk_events: Vec::new(),
    };
    let outcome = eng.drive(vm);
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
    // The disks' dirty logs stop and the disks are released; on any failure their files are
    // exactly as the guest left them (the move only read them).
    if let Some(p) = &eng.sh.pump {
        p.stop();
    }
    eng.sh.cv.notify_all();
    if let Outcome::Failed(e) = &outcome {
        if !eng.session.commit_sent() {
            // Best effort: tell the destination why, so it discards at once.
            if let Ok(mut t) = eng.chans[0].tx.try_lock() {
                let _ = t.send_abort(1, &e.to_string());
            }
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
    let mut ss = eng.session.stats().clone();
    ss.events.append(&mut eng.disk_events);
    let failed = eng.session.failed_channels();
    let counter = |f: fn(&ChanShared) -> &AtomicU64| -> u64 {
        eng.chans.iter().map(|c| f(&c.shared).load(Ordering::Relaxed)).sum()
    };
    let total = started.elapsed();
    let zero_pages = counter(|c| &c.zero);
    let mut stats = MigrationStats {
        status: Status::Completed,
        total,
        setup: ss.setup,
        downtime: ss.downtime,
        expected_downtime: ss.expected_downtime,
        rounds: ss.rounds,
        guest_bytes,
        transferred_bytes: counter(|c| &c.wire),
        zero_pages,
        data_pages: counter(|c| &c.pages) - zero_pages,
        compressed_batches: counter(|c| &c.compressed),
        pages_per_round: ss.pages_per_round,
        dirty_rate_bytes_per_s: ss.dirty_rate_bytes_per_s,
        throughput_bytes_per_s: guest_bytes as f64 / total.as_secs_f64().max(1e-9),
        throttle_pct: ss.throttle_pct,
        channels: Vec::new(),
        verified: ss.verified,
        encryption,
        events: ss.events,
        disks: Vec::new(),
    };
    if let Some(p) = &eng.sh.pump {
        p.mark(ss.verified, &eng.removed);
        stats.disks = p.stats();
    }
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
                failed: failed.contains(&(i as u16)),
            }
        })
        .collect();
    match outcome {
        Outcome::Completed => Ok(stats),
        Outcome::Uncertain(_) => {
            stats.status = Status::Uncertain;
            Err(MigrateError::Uncertain(Box::new(stats)))
        }
        Outcome::Failed(e) => match eng.resume_failed {
            Some(re) => Err(MigrateError::Vm(format!("{e}; and resuming the source failed: {re}"))),
            None => Err(e),
        },
    }
}

/// A channel's disk thread: sends what the pump gives it (between the page batches of its
/// channel's sender), until the pump stops or the channel dies.
fn disk_loop(idx: u16, pump: &DiskPump, cs: &ChanShared, tx: &Mutex<Box<dyn ChannelTx>>, ev: &mpsc::Sender<Event>) {
    loop {
        match pump.next_for(idx, &|| cs.dead.load(Ordering::SeqCst)) {
            Ok(Some(m)) => {
                let r = match tx.lock() {
                    Ok(mut t) => t.send_control(&m),
                    Err(_) => return,
                };
                match r {
                    Ok(()) => {
                        cs.wire.fetch_add(m.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        cs.dead.store(true, Ordering::SeqCst);
                        let _ = ev.send(Event::Failed(idx, format!("send disk blocks: {e}")));
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = ev.send(Event::DiskFailed(e));
                return;
            }
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
        let (cs, ev, rx, pump) = (cs.clone(), ev_tx.clone(), ch.rx, sh.pump.clone());
        threads.push(std::thread::spawn(move || reader_loop(i, rx, cs, pump, ev)));
    }
    if let Some(pump) = sh.pump.clone() {
        let (cs, ev, tx) = (cs.clone(), ev_tx.clone(), tx.clone());
        threads.push(std::thread::spawn(move || disk_loop(i, &pump, &cs, &tx, &ev)));
    }
    Chan { tx, killer: ch.killer, shared: cs, backend: ch.info.backend.to_string(), threads }
}
