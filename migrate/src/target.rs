//! The destination side of a live migration, the threaded driver of
//! [`crate::session::target::TargetSession`]: it owns the channels, their receiver threads and
//! the new VM; it feeds the session events and carries out its actions. Pages are received on
//! every channel straight into the new VM's memory, through the session's [`RoundGate`]: a
//! receiver asks it once it has a batch's header and before it writes any page, so a batch of a
//! stale round, or any batch once `Complete` came, is refused unwritten (and aborts the
//! migration). The VM is taken over only at `Commit`; until then any failure discards it.
//!
//! # Why the hashes taken at arrival can be trusted at the final check
//!
//! Each receiver hashes a batch's pages once they are written, before it acknowledges the
//! batch; the final check compares the digest of those hashes with the source's (or re-reads
//! every page first when `verify_full` asks for it). The hashes describe memory as it is at the
//! check because nothing writes a page after its hash was taken and before the check:
//! - stream channels write only inside a receive, and only for a batch the gate admitted;
//!   `Complete` seals the gate (channel 0's receiver seals it as soon as it reads `Complete`,
//!   before it reads the next frame), and the session fails if an admitted batch was still
//!   being written then. A correct source sends `Complete` only after every ack, and a receiver
//!   stops counting as a writer before it acks, so nothing is written from `Complete` on.
//! - within a round a correct source sends each page once; a batch resent after a channel loss
//!   goes out only once the destination reported that channel's receiver stopped. So no two
//!   receivers write one page at once (which could leave the later hash of an earlier write).
//!   A source that breaks this is authenticated and could send any content anyway.
//! - rdma writes memory one-sided, outside any announced batch: a session with an rdma channel
//!   always re-reads every page at the check. Before that check every channel's memory sealer
//!   runs: each queue pair goes to the error state (its responder drops every packet), the
//!   round's memory windows are deallocated and the guest memory deregistered, so no one-sided
//!   write lands from the check on (and none between rounds: the source closes a round's
//!   windows on every channel, and waits for the destination's confirmation, before it takes
//!   the dirty pages or saves the state).
//!
//! # Disks (shared-nothing)
//!
//! `DiskBlocks` may come on any channel: the receiver that reads one writes its blocks into
//! the partial copies ([`crate::disks::DiskSide`]) and answers `DiskAck` on the same channel.
//! Blocks are refused (a protocol violation) before `Disks` was accepted, once `Complete` sealed
//! the session, and once the disks' digests were taken; a write that fails here (a full file
//! system) refuses the migration and the partial copies are removed. At `Commit` the copies get
//! their names before the VM resumes; if the VM then does not resume, they are removed too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_memory::digest::PageTable;
use ferry_memory::scan::{scan_slice_keyed, zero_page_hash_keyed, HashKey};
use ferry_memory::{MemoryMap, MemorySink, MemorySource, NoSink, Region, VolatileSlice};
use ferry_transport::error::TransportError;
use ferry_transport::wire::{PageRun, PAGE_SIZE};
use ferry_transport::{Channel, ChannelRx, ChannelTx, Incoming, Killer};

use crate::disks::DiskSide;
use crate::protocol::Msg;
use crate::session::target::{RoundGate, TargetAction, TargetSession};
use crate::vm::{TargetFactory, TargetVm, VmShape};
use crate::MigrateError;

/// Destination configuration.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// How long to wait for the session's other channels after `Prepare`.
    pub channel_wait: Duration,
    /// Silence from the source longer than this aborts.
    pub idle_timeout: Duration,
    /// During round 0, fault guest memory in on a helper thread just ahead of where batches
    /// land, so the receive path does not take the page faults of cold memory itself (cheap when
    /// the memory is already present, as with a reserve).
    pub fault_ahead: bool,
    /// Longest wait for `Commit` after `Ready`; then the VM is discarded here and the source
    /// told to resume its own (see [`crate::session::target::DEFAULT_COMMIT_TIMEOUT`]).
    pub commit_timeout: Duration,
    /// Where the disks of a shared-nothing move go (partial copies `.NAME.ferry-partial` until
    /// the commit names them). `None`: a source that brings disks is refused.
    pub disk_dir: Option<std::path::PathBuf>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            channel_wait: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            fault_ahead: true,
            commit_timeout: crate::session::target::DEFAULT_COMMIT_TIMEOUT,
            disk_dir: None,
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
    /// What happened on the channels after `Commit`, when the VM was already ours and nothing
    /// could change that (a frame that failed its tag: altered, injected or replayed on the way).
    pub events: Vec<String>,
    /// Disk blocks written (shared-nothing), all passes.
    #[cfg_attr(feature = "serde", serde(default))]
    pub disk_blocks: u64,
}

/// A VM received and committed: it runs here now.
pub struct TargetOutcome {
    /// The VM (resumed).
    pub vm: Box<dyn TargetVm>,
    /// Its disks (shared-nothing), committed under their names in
    /// [`TargetConfig::disk_dir`], in the source's order.
    pub disks: Vec<std::path::PathBuf>,
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
    /// A receiver saw a protocol violation.
    Violation(u16, String),
    /// Writing disk blocks failed here (a full file system, an I/O error).
    DiskFailed(String),
}

struct Shared {
    map: MemoryMap,
    regions: Vec<(u64, u64, u64)>, // gpa, len, first page index
    table: PageTable,
    /// Keys the page hashes (channel 0's image key, as on the source).
    hash_key: HashKey,
    gate: Arc<RoundGate>,
    pages: AtomicU64,
    batches: AtomicU64,
    wire: AtomicU64,
    dead: AtomicBool,
    /// Highest guest-physical end address a batch has written (round 0 goes up through memory).
    frontier: AtomicU64,
    /// The disks' partial copies (shared-nothing).
    disks: Arc<DiskSide>,
    /// Disk blocks written.
    disk_blocks: AtomicU64,
}

impl Shared {
    fn index_of(&self, gpa: u64) -> Option<u64> {
        let i = self.regions.partition_point(|r| r.0 + r.1 <= gpa);
        let r = self.regions.get(i)?;
        (gpa >= r.0).then(|| r.2 + (gpa - r.0) / PAGE_SIZE as u64)
    }

    /// Hash the pages of one received run into the table (one lookup per run, not per page).
    fn hash_run(&self, r: &PageRun) {
        let (Some(first), Some(run)) = (self.index_of(r.gpa), self.map.source_slice(r.gpa, r.len())) else { return };
        scan_slice_keyed(run, &self.hash_key, |p, s| self.table.set(first as usize + p, s.hash));
    }

    /// The image digest; `full`: re-read every page first rather than trust the hashes taken
    /// at receipt.
    fn digest(&self, full: bool) -> u64 {
        if full {
            const CHUNK: u64 = 1 << 20; // pages per run
            for &(g, l, _) in &self.regions {
                let pages = l / PAGE_SIZE as u64;
                for c in (0..pages).step_by(CHUNK as usize) {
                    let n = (pages - c).min(CHUNK) as u32;
                    self.hash_run(&PageRun { gpa: g + c * PAGE_SIZE as u64, pages: n });
                }
            }
        }
        self.table.digest()
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
            if sh.dead.load(Ordering::SeqCst) || sh.gate.round() > 0 {
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
            if let Some(s) = sh.map.sink_slice(at, n as usize) {
                s.populate_write();
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

/// What a receiver writes into: the new VM's memory behind the session's round gate, so a batch
/// is refused before any of its pages is written (stale round, or memory sealed at `Complete`).
struct GatedSink<'a> {
    map: &'a MemoryMap,
    gate: &'a RoundGate,
    /// Batches admitted and not yet handed to the receive loop (each counts as a writer until it
    /// lands). A stream backend admits one batch per receive; rdma may admit several announcements
    /// in one poll and hand them over one receive at a time.
    admitted: AtomicU64,
}

// SAFETY: every slice and region comes from the wrapped map, under its own promise.
unsafe impl MemorySink for GatedSink<'_> {
    fn sink_slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>> {
        self.map.sink_slice(gpa, len)
    }

    fn regions(&self) -> &[Region] {
        MemorySink::regions(self.map)
    }

    fn admit_batch(&self, round: u32) -> Result<(), String> {
        self.gate.admit(round).map_err(|e| e.to_string())?;
        self.admitted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl GatedSink<'_> {
    /// One receive is over: the batch it handed over (or the one it failed on) stops counting as
    /// a writer.
    fn landed(&self) {
        if self.admitted.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            self.gate.landed();
        }
    }
}

fn rx_loop(
    idx: u16,
    mut rx: Box<dyn ChannelRx>,
    tx: Arc<Mutex<Box<dyn ChannelTx>>>,
    sh: Arc<Shared>,
    ev: mpsc::Sender<Event>,
) {
    let sink = GatedSink { map: &sh.map, gate: &sh.gate, admitted: AtomicU64::new(0) };
    loop {
        if sh.dead.load(Ordering::SeqCst) {
            return;
        }
        let got = rx.recv(&sink);
        if !matches!(got, Ok(Incoming::Batch(_))) {
            sink.landed();
        }
        match got {
            Ok(Incoming::Batch(b)) => {
                // The gate admitted the batch before its pages were written (the round rule:
                // never let an older round's copy land after a newer one). Hash what landed, then
                // stop counting as a writer, then acknowledge: the source sends Complete only
                // after every ack, so by then no batch is being written or hashed.
                for r in &b.runs {
                    sh.hash_run(r);
                }
                sink.landed();
                if let Some(r) = b.runs.last() {
                    sh.frontier.fetch_max(r.gpa + r.len() as u64, Ordering::Relaxed);
                }
                sh.pages.fetch_add(u64::from(b.pages), Ordering::Relaxed);
                sh.wire.fetch_add(b.wire_bytes, Ordering::Relaxed);
                sh.batches.fetch_add(1, Ordering::Relaxed);
                let r = tx.lock().map(|mut t| t.send_ack(b.ack()));
                if let Ok(Err(e)) = r {
                    let _ = ev.send(Event::Failed(idx, format!("ack: {e}")));
                    return;
                }
            }
            Ok(Incoming::Control(m)) if crate::protocol::is_disk_blocks(&m) => {
                // Disk blocks ride on any channel, until Complete seals the session.
                let (seq, r) = match Msg::decode(&m) {
                    Ok(Msg::DiskBlocks { seq, disk, blocks }) if !sh.gate.sealed() => {
                        let n = blocks.len() as u64;
                        let r = sh.disks.write(disk, &blocks);
                        if matches!(r, Ok(Ok(()))) {
                            sh.disk_blocks.fetch_add(n, Ordering::Relaxed);
                        }
                        (seq, r)
                    }
                    Ok(_) => (0, Err("disk blocks after Complete".to_string())),
                    Err(e) => (0, Err(e.to_string())),
                };
                match r {
                    Ok(Ok(())) => {
                        let r = tx.lock().map(|mut t| t.send_control(&Msg::DiskAck { seq }.encode()));
                        if let Ok(Err(e)) = r {
                            let _ = ev.send(Event::Failed(idx, format!("disk ack: {e}")));
                            return;
                        }
                    }
                    Ok(Err(ours)) => {
                        let _ = ev.send(Event::DiskFailed(ours));
                        return;
                    }
                    Err(theirs) => {
                        let _ = ev.send(Event::Violation(idx, format!("channel {idx}: {theirs}")));
                        return;
                    }
                }
            }
            Ok(Incoming::Control(m)) => {
                if idx != 0 {
                    let _ = ev.send(Event::Violation(idx, "control message on a data channel".into()));
                    return;
                }
                // Complete seals memory here, before the next frame of this channel is read (the
                // session seals it too, when it handles the message: a batch queued right behind
                // Complete must not slip in meanwhile).
                if crate::protocol::is_complete(&m) {
                    sh.gate.close();
                }
                let _ = ev.send(Event::Control(m));
            }
            Ok(Incoming::Ack(_)) => {
                let _ = ev.send(Event::Violation(idx, "the source sent an ack".into()));
                return;
            }
            Ok(Incoming::Closed) => {
                let _ = ev.send(Event::Closed(idx));
                return;
            }
            Err(TransportError::BatchRefused(why)) => {
                let _ = ev.send(Event::Violation(idx, format!("channel {idx}: {why}")));
                return;
            }
            // A frame that fails its tag was altered, injected, replayed or reordered on the
            // way: that is an attack on the session, not a lost path, so the migration aborts
            // (no failover).
            Err(e @ TransportError::Unauthenticated) => {
                let _ = ev.send(Event::Violation(idx, format!("channel {idx}: {e}")));
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

/// The driver's side of a received migration: what it owns while the session runs.
struct Driver<'a> {
    factory: &'a dyn TargetFactory,
    cfg: &'a TargetConfig,
    more: &'a mpsc::Receiver<Channel>,
    session_id: ferry_transport::handshake::SessionId,
    tx0: Arc<Mutex<Box<dyn ChannelTx>>>,
    rx0: Option<Box<dyn ChannelRx>>,
    killers: Killers,
    vm: Option<Box<dyn TargetVm>>,
    sh: Option<Arc<Shared>>,
    ev_tx: mpsc::Sender<Event>,
    threads: Vec<JoinHandle<()>>,
    stats: TargetStats,
    /// A channel of the session writes memory one-sided (rdma).
    one_sided: bool,
    /// Memory sealers of the channels that have them (rdma): called before the final check.
    sealers: Vec<Killer>,
    /// Channel 0's image key, which keys the page hashes and the digest.
    hash_key: HashKey,
    /// The same key for the disks' digests.
    disk_key: ferry_disk::digest::DigestKey,
    /// The disks' partial copies (shared with the receivers once they run).
    disks: Arc<DiskSide>,
    /// The disks committed.
    disk_paths: Vec<std::path::PathBuf>,
}

impl Driver<'_> {
    fn send0(&self, m: &Msg) -> Result<(), String> {
        match self.tx0.lock() {
            Ok(mut t) => t.send_control(&m.encode()).map_err(|e| e.to_string()),
            Err(_) => Err("control lock".into()),
        }
    }

    /// Carry out one action; `Some` when the migration is over.
    fn execute(&mut self, s: &mut TargetSession, a: TargetAction) -> Option<Result<(), MigrateError>> {
        match a {
            TargetAction::Send(m) => {
                if let Err(e) = self.send0(&m) {
                    s.handle_channel_lost(0, e, false);
                }
            }
            TargetAction::CreateVm(shape) => match self.factory.create(&shape) {
                Ok(vm) => {
                    self.vm = Some(vm);
                    s.handle_vm_created(Ok(()));
                }
                Err(e) => s.handle_vm_created(Err(e.to_string())),
            },
            TargetAction::AwaitChannels(n) => {
                let all = self.collect_channels(s, n);
                s.handle_channels(all, Instant::now());
            }
            TargetAction::CloseChannel(c) => kill(&self.killers, Some(c)),
            TargetAction::Verify { full } => {
                // Complete came: no one-sided write may land from now on (rdma moves each queue
                // pair to the error state, deallocates its windows and deregisters the memory),
                // so the check below reads what will run.
                for seal in &self.sealers {
                    seal();
                }
                let t = Instant::now();
                if !s.disks().is_empty() {
                    // Sealed first: no disk block is written after its digest is taken.
                    s.handle_disk_digests(self.disks.sync_and_digests());
                }
                // One-sided (rdma) writes land outside any announced batch: re-read everything.
                let digest = self.sh.as_ref().map_or(0, |sh| sh.digest(full || self.one_sided));
                self.stats.verify = t.elapsed();
                s.handle_digest(digest);
            }
            TargetAction::Restore(blob) => {
                let r = match self.vm.as_mut() {
                    Some(vm) => vm.restore_state(&blob).map_err(|e| e.to_string()),
                    None => Err("no VM".into()),
                };
                s.handle_restored(r, Instant::now());
            }
            TargetAction::Resume => {
                let r = match self.vm.as_mut() {
                    Some(vm) => vm.resume().map_err(|e| format!("resume after commit: {e}")),
                    None => Err("no VM".into()),
                };
                s.handle_resumed(r);
            }
            TargetAction::PrepareDisks(d) => {
                let r = self.disks.prepare(self.cfg.disk_dir.as_deref(), &d, &self.disk_key);
                s.handle_disks_prepared(r);
            }
            TargetAction::CommitDisks => {
                let r = self.disks.commit().map(|p| self.disk_paths = p);
                s.handle_disks_committed(r);
            }
            TargetAction::Fail(e) => return Some(Err(e)),
            TargetAction::Finish => return Some(Ok(())),
        }
        None
    }

    /// Wait for the session's other channels, then start a receiver on each.
    fn collect_channels(&mut self, s: &TargetSession, nch: usize) -> bool {
        let (Some(vm), Some(shape), Some(rx0)) = (self.vm.as_ref(), s.shape(), self.rx0.take()) else { return false };
        let mut channels: Vec<Option<Channel>> = (0..nch).map(|_| None).collect();
        let deadline = Instant::now() + self.cfg.channel_wait;
        let mut have = 1;
        while have < nch {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(c) = self.more.recv_timeout(left) else { return false };
            let b = c.info.established.binding;
            let i = b.channel as usize;
            if b.session != self.session_id || i == 0 || i >= nch || channels[i].is_some() {
                (c.killer)();
                continue;
            }
            self.one_sided |= c.info.backend == "rdma";
            channels[i] = Some(c);
            have += 1;
        }
        let mut regions = Vec::new();
        let mut acc = 0u64;
        for &(g, l) in &shape.regions {
            regions.push((g, l, acc));
            acc += l / PAGE_SIZE as u64;
        }
        let sh = Arc::new(Shared {
            map: vm.memory(),
            regions,
            table: PageTable::with_key(acc as usize, zero_page_hash_keyed(&self.hash_key), &self.hash_key),
            hash_key: self.hash_key.clone(),
            gate: s.gate().clone(),
            pages: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            wire: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            frontier: AtomicU64::new(0),
            disks: self.disks.clone(),
            disk_blocks: AtomicU64::new(0),
        });
        self.sh = Some(sh.clone());
        self.spawn_rx(0, rx0, self.tx0.clone());
        for (i, c) in channels.into_iter().enumerate().skip(1).filter_map(|(i, c)| Some((i, c?))) {
            if let Ok(mut k) = self.killers.lock() {
                k.push((i as u16, c.killer.clone()));
            }
            self.spawn_rx(i as u16, c.rx, Arc::new(Mutex::new(c.tx)));
        }
        if self.cfg.fault_ahead {
            self.threads.push(std::thread::spawn(move || fault_ahead(&sh)));
        }
        true
    }

    fn spawn_rx(&mut self, i: u16, rx: Box<dyn ChannelRx>, tx: Arc<Mutex<Box<dyn ChannelTx>>>) {
        let Some(sh) = self.sh.clone() else { return };
        if let Some(seal) = rx.memory_sealer() {
            self.sealers.push(seal);
        }
        let ev = self.ev_tx.clone();
        self.threads.push(std::thread::spawn(move || rx_loop(i, rx, tx, sh, ev)));
    }

    /// A lost channel may come back (same session, same index) while pages move.
    fn take_rejoins(&mut self, s: &mut TargetSession) {
        while let Ok(c) = self.more.try_recv() {
            let b = c.info.established.binding;
            if b.session != self.session_id || !s.handle_rejoin(b.channel) {
                (c.killer)();
                continue;
            }
            if let Ok(mut k) = self.killers.lock() {
                k.push((b.channel, c.killer.clone()));
            }
            self.one_sided |= c.info.backend == "rdma";
            self.spawn_rx(b.channel, c.rx, Arc::new(Mutex::new(c.tx)));
        }
    }
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
    let Channel { tx, rx, info, killer } = ch0;
    let (ev_tx, ev_rx) = mpsc::channel();
    let mut d = Driver {
        factory,
        cfg,
        more,
        session_id: info.established.binding.session,
        tx0: Arc::new(Mutex::new(tx)),
        rx0: Some(rx),
        killers: Arc::new(Mutex::new(vec![(0, killer)])),
        vm: None,
        sh: None,
        ev_tx,
        threads: Vec::new(),
        stats: TargetStats::default(),
        one_sided: info.backend == "rdma",
        sealers: Vec::new(),
        hash_key: HashKey::from_secret(info.image_key.bytes()),
        disk_key: ferry_disk::digest::DigestKey::from_secret(info.image_key.bytes()),
        disks: Arc::new(DiskSide::default()),
        disk_paths: Vec::new(),
    };
    let mut s = TargetSession::new(cfg.idle_timeout, Instant::now()).with_commit_timeout(cfg.commit_timeout);
    s.handle_control(&m, Instant::now());
    let mut batches_seen = 0u64;
    let result = loop {
        let mut over = None;
        while let Some(a) = s.poll_action() {
            if let Some(r) = d.execute(&mut s, a) {
                over = Some(r);
                break;
            }
        }
        if let Some(r) = over {
            break r;
        }
        d.take_rejoins(&mut s);
        let now = Instant::now();
        match ev_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Control(m)) => s.handle_control(&m, now),
            Ok(Event::Failed(i, why)) => s.handle_channel_lost(i, why, false),
            Ok(Event::Closed(i)) => s.handle_channel_lost(i, "closed by the source".into(), true),
            Ok(Event::Violation(i, why)) => {
                if s.committed() {
                    d.stats.events.push(after_commit(&why));
                }
                s.handle_violation(i, why)
            }
            Ok(Event::DiskFailed(why)) => s.handle_disk_failed(why),
            Err(_) => {}
        }
        // Pages landing count as hearing from the source.
        let b =
            d.sh.as_ref().map_or(0, |sh| sh.batches.load(Ordering::Relaxed) + sh.disk_blocks.load(Ordering::Relaxed));
        if b != batches_seen {
            batches_seen = b;
            s.handle_activity(Instant::now());
        }
        s.handle_timeout(Instant::now());
    };
    let committed = s.committed();
    let stop_receivers = |d: &Driver<'_>| {
        if let Some(sh) = &d.sh {
            sh.dead.store(true, Ordering::SeqCst);
        }
    };
    if result.is_err() {
        stop_receivers(&d);
    }
    if result.is_ok() {
        if let Ok(mut t) = d.tx0.lock() {
            let _ = t.close();
        }
        // Give the source a moment to read Resumed before the sockets go away; what the
        // receivers saw meanwhile is recorded (the VM is ours whatever it was).
        let until = Instant::now() + Duration::from_millis(200);
        while let Ok(e) = ev_rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            match e {
                Event::Violation(_, why) => d.stats.events.push(after_commit(&why)),
                // The source has read Resumed and closed its end.
                Event::Closed(0) | Event::Failed(0, _) => break,
                _ => {}
            }
        }
        // (Channel 0's receiver ran until here, so what followed Commit on it was read.)
        stop_receivers(&d);
    } else if !committed {
        if matches!(result, Err(MigrateError::ResumeFailed(_))) {
            // Committed but not running: the copy here goes before the source is told to
            // resume its own, so the VM never runs twice.
            drop(d.vm.take());
        }
        if let Ok(mut t) = d.tx0.try_lock() {
            let _ = t.send_abort(1, &result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
        }
    }
    kill(&d.killers, None);
    for t in d.threads.drain(..) {
        let _ = t.join();
    }
    if matches!(result, Err(MigrateError::ResumeFailed(_))) {
        // Committed but not running here: the source resumes on its own disks, so these copies
        // must not pass as disks either.
        for p in d.disk_paths.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
    if !committed {
        // Nothing half-written passes as a disk: the partial copies go (named ones too, if
        // naming them failed halfway: the commit is all or none).
        d.disks.discard();
    }
    let mut stats = std::mem::take(&mut d.stats);
    if let Some(shape) = s.shape() {
        stats.vm_id = shape.vm_id.clone();
        stats.guest_bytes = shape.memory_bytes();
    }
    stats.channels = s.channels();
    stats.lost_channels = s.lost_channels().to_vec();
    stats.rejoined_channels = s.rejoined_channels().to_vec();
    stats.verified = s.verified();
    if let Some(sh) = &d.sh {
        stats.pages = sh.pages.load(Ordering::Relaxed);
        stats.batches = sh.batches.load(Ordering::Relaxed);
        stats.wire_bytes = sh.wire.load(Ordering::Relaxed);
        stats.disk_blocks = sh.disk_blocks.load(Ordering::Relaxed);
    }
    match (result, d.vm.take()) {
        // Committed: the VM is ours even if the confirmation failed.
        (_, Some(vm)) if committed => Ok(TargetOutcome { vm, disks: std::mem::take(&mut d.disk_paths), stats }),
        (Err(e), _) => Err(e),
        (Ok(()), _) => Err(MigrateError::Internal("finished without a VM")),
    }
}

/// An event after `Commit`, as [`TargetStats::events`] records it.
fn after_commit(why: &str) -> String {
    format!("after Commit (the VM is ours, the migration stands): {why}")
}

/// The shape carried by a prepare (for callers that want to look before receiving).
pub fn shape_of(msg: &[u8]) -> Option<VmShape> {
    match Msg::decode(msg) {
        Ok(Msg::Prepare { shape, .. }) => Some(shape),
        _ => None,
    }
}
