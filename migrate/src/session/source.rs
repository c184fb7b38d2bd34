//! The source's side of the protocol as a sans-IO state machine (see [`super`] for the
//! sequence). States, in order:
//!
//! | state | waits for | next |
//! |---|---|---|
//! | `Preparing` | `PrepareOk` | `Round(0)` (after the dirty log started), or `PreparingDisks` |
//! | `PreparingDisks` | `DisksOk` (sends `Disks` first) | `CopyingDisks` |
//! | `CopyingDisks` | every disk copied and in sync ([`SourceSession::handle_disks_synced`]) | `Round(0)` |
//! | `Round(n)` | every batch of round n acknowledged, lost channels confirmed | `Converging` |
//! | `Converging` | the dirty pages ([`SourceSession::handle_dirty`]) | `Round(n+1)`, `Switchover`, or not converging |
//! | `Switchover` | the VM paused, the last dirty pages | `FinalRound` |
//! | `FinalRound` | every batch of the final round acknowledged, the disks flushed | `SavingState` |
//! | `SavingState` | the VM state and image digest ([`SourceSession::handle_state`]) | `AwaitReady` (sends state, `Complete`) |
//! | `AwaitReady` | `Ready` | `Committing` (sends `Commit`) |
//! | `Committing` | `Resumed` | `Done` |
//!
//! Any failure before `Commit` was sent ends in `Failed`: [`SourceAction::Resume`] (if the VM was
//! paused), then [`SourceAction::Finish`]. A failure after `Commit` was sent ends in `Uncertain`:
//! the VM stays paused, never resumed here.
//!
//! A shared-nothing move ([`SourceSession::with_disks`]) copies the disks first, as libvirt's
//! `--copy-storage-all` does: `Disks` after `PrepareOk`, then [`SourceAction::StartDisks`] (the
//! driver sends every allocated block and then dirty blocks as `DiskBlocks` on every channel,
//! and keeps mirroring guest writes while memory moves); memory pre-copy starts only once every
//! disk is in sync. In the switchover pause [`SourceAction::FlushDisks`] sends the last dirty
//! blocks beside the final memory round; `DiskDigests` goes right before `Complete`. The
//! source's disk files are the disks until the destination confirms it runs the VM
//! (`Resumed`): only then [`SourceAction::RemoveSourceDisks`] (unless they are retained). A
//! disk failure at any step before `Commit` ([`SourceSession::handle_disk_failed`]) aborts like
//! any other: the VM keeps running on its source disks, which the move only ever read.
//!
//! The session plans the batches of each round ([`plan_batches`]) and hands them to the driver
//! ([`SourceAction::Queue`]); the driver's sender threads pull them, report each one sent
//! ([`SourceSession::handle_sent`]) and acknowledged ([`SourceSession::handle_acked`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ferry_transport::wire::{PageRun, BATCH_DEST_ZEROED, MAX_BATCH_RUNS, PAGE_SIZE};

use super::estimate::{
    final_round_time, live_rate, share_by_rate, stalled_channels, ChannelMeter, ChannelView, Converge, ConvergeConfig,
    Decision, RoundMeasure, RATE_WINDOW,
};
use crate::protocol::{DiskDesc, Msg, MAX_CHUNK, MAX_STATE, MIGRATION_VERSION};
use crate::stats::{Progress, Status};
use crate::vm::{DirtyBitmap, RegionBitmap, VmShape};
use crate::MigrateError;

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

/// The session's part of the configuration (see `crate::source::MigrationConfig`).
#[derive(Debug, Clone, Copy)]
pub struct SourceConfig {
    /// Convergence.
    pub converge: ConvergeConfig,
    /// Pages per batch.
    pub batch_pages: u32,
    /// Ask the destination to re-read all memory for the final check.
    pub verify_full: bool,
    /// Resend a failed channel's batches on the others instead of aborting.
    pub failover: bool,
    /// How long to wait for any single answer of the destination.
    pub reply_timeout: Duration,
    /// How batches are spread over channels.
    pub scheduling: Scheduling,
    /// Try to re-open lost channels.
    pub rejoin: bool,
    /// Stall detector's shortest limit (`None`: off).
    pub stall_timeout: Option<Duration>,
}

/// One batch of work: page runs of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Batch id (unique in the migration).
    pub id: u64,
    /// Round.
    pub round: u32,
    /// Batch flags (`BATCH_DEST_ZEROED` in round 0).
    pub flags: u8,
    /// Page runs.
    pub runs: Vec<PageRun>,
    /// Global page index of each run's first page.
    pub first: Vec<u64>,
    /// The channel this batch goes to: a rule in round-robin mode; in adaptive mode (shares of
    /// the final round) a preference: a channel with nothing else to send takes it.
    pub pin: Option<u16>,
}

impl Batch {
    /// Pages in the batch.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }
}

/// Split a dirty bitmap into batches of at most `batch_pages` pages (and `MAX_BATCH_RUNS` runs).
pub fn plan_batches(
    bm: &DirtyBitmap,
    first_index: &[u64],
    round: u32,
    batch_pages: u32,
    next_id: &mut u64,
) -> Vec<Batch> {
    let batch_pages = batch_pages.max(1);
    let flags = if round == 0 { BATCH_DEST_ZEROED } else { 0 };
    let empty = || Batch { id: 0, round, flags, runs: Vec::new(), first: Vec::new(), pin: None };
    let mut out = Vec::new();
    let mut cur = empty();
    let mut cur_pages = 0u32;
    let mut flush = |cur: &mut Batch, cur_pages: &mut u32, out: &mut Vec<Batch>| {
        if !cur.runs.is_empty() {
            cur.id = *next_id;
            *next_id += 1;
            out.push(std::mem::replace(cur, empty()));
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

/// Where the source's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// `Prepare` sent, waiting for `PrepareOk` (then the dirty log starts).
    Preparing,
    /// `Disks` sent, waiting for `DisksOk`.
    PreparingDisks,
    /// The disks are copied (and mirrored) until they are in sync.
    CopyingDisks,
    /// A pre-copy round is in flight.
    Round(u32),
    /// Round done, `RoundEnd` sent: waiting for the dirty pages.
    Converging(u32),
    /// Pausing the VM, taking the last dirty pages.
    Switchover(u32),
    /// The final round is in flight (VM paused).
    FinalRound(u32),
    /// Waiting for the VM state and the image digest.
    SavingState,
    /// `Complete` sent.
    AwaitReady,
    /// `Commit` sent: from here on the source never resumes the VM.
    Committing,
    /// The destination runs the VM.
    Done,
    /// Aborted; the VM runs on the source.
    Failed,
    /// `Commit` sent but not confirmed: the VM stays paused here.
    Uncertain,
}

/// How the migration ended.
#[derive(Debug)]
pub enum Outcome {
    /// The destination runs the VM; the source's copy stays paused for the caller to release.
    Completed,
    /// Aborted before commit: the VM runs on the source (resumed if it was paused).
    Failed(MigrateError),
    /// Commit sent but not confirmed: who runs the VM is unknown; the source copy stays paused.
    Uncertain(MigrateError),
}

/// What the driver must do next.
#[derive(Debug)]
pub enum SourceAction {
    /// Send a control message on channel 0; report a failure with
    /// [`SourceSession::handle_send_failed`].
    Send(Msg),
    /// Start dirty tracking; answer with [`SourceSession::handle_dirty_log`].
    StartDirtyLog,
    /// Read and clear the dirty pages; answer with [`SourceSession::handle_dirty`].
    TakeDirty,
    /// Give back dirty pages taken but not delivered.
    ReturnDirty(DirtyBitmap),
    /// Slow the guest to this percent.
    SetThrottle(u8),
    /// Pause the VM; answer with [`SourceSession::handle_paused`].
    Pause,
    /// Save the VM state and read the image digest; answer with [`SourceSession::handle_state`].
    SaveState,
    /// Put these batches on the send queue.
    Queue(Vec<Batch>),
    /// Cut this channel (both halves).
    KillChannel(u16),
    /// The destination stopped this channel's receiver: put the channel's unacknowledged
    /// batches back on the queue for the others (re-pinned over `alive` in round-robin mode).
    Requeue {
        /// The lost channel.
        channel: u16,
        /// Channels alive.
        alive: Vec<u16>,
    },
    /// Try to re-open this lost channel; report it back with [`SourceSession::handle_rejoined`].
    Rejoin(u16),
    /// Report progress (the driver fills in `transferred_bytes`).
    Progress(Progress),
    /// Stop dirty tracking.
    StopDirtyLog,
    /// Let the VM run again on the source (only ever before `Commit` was sent).
    Resume,
    /// Start copying every disk (allocated blocks, then dirty blocks, mirrored from then on);
    /// answer with [`SourceSession::handle_disks_synced`] once every disk is in sync.
    StartDisks,
    /// The VM is paused: send the disks' last dirty blocks and wait for every acknowledgement;
    /// answer with [`SourceSession::handle_disks_flushed`] (each disk's digest).
    FlushDisks,
    /// The destination runs the VM on its copies: remove the source's disk files.
    RemoveSourceDisks,
    /// The migration is over.
    Finish(Outcome),
}

/// Numbers the session keeps (the driver adds the channels' counters).
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    /// Time to `PrepareOk` and the dirty log started.
    pub setup: Duration,
    /// Pause to `Resumed`.
    pub downtime: Duration,
    /// The pause expected at switchover.
    pub expected_downtime: Duration,
    /// Rounds done (the final one included).
    pub rounds: u32,
    /// Pages per round.
    pub pages_per_round: Vec<u64>,
    /// Last dirty rate measured, bytes per second.
    pub dirty_rate_bytes_per_s: f64,
    /// Last delivery rate measured (guest data bytes per second over the live channels).
    pub bandwidth_bytes_per_s: f64,
    /// Guest throttle, percent.
    pub throttle_pct: u8,
    /// The destination verified the image.
    pub verified: bool,
    /// What happened on the way.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    pages: u64,
    data_bytes: u64,
    /// Bytes it took on the wire (`None`: not reported yet).
    wire_bytes: Option<u64>,
    /// The channel it was sent on and when (`None`: queued).
    on: Option<(u16, Instant)>,
}

/// The source's session.
#[derive(Debug)]
pub struct SourceSession {
    cfg: SourceConfig,
    state: SourceState,
    actions: VecDeque<SourceAction>,
    shape: VmShape,
    first_index: Vec<u64>,
    total_pages: u64,
    channels: usize,
    was_running: bool,
    started: Instant,
    next_id: u64,
    // Round in flight.
    outstanding: HashMap<u64, Outstanding>,
    round_pages: u64,
    acked_pages: u64,
    round_started: Instant,
    last_ack: Instant,
    last_report: Instant,
    sent_pages: u64,
    // Channels.
    meters: Vec<ChannelMeter>,
    dead: Vec<bool>,
    lost: Vec<u16>,
    pending_lost: Vec<u16>,
    data_done: bool,
    // Convergence.
    converge: Converge,
    final_bm: Option<DirtyBitmap>,
    dirty_log: bool,
    paused_at: Option<Instant>,
    commit_sent: bool,
    reply_deadline: Option<Instant>,
    stalls_checked: Instant,
    stats: SessionStats,
    // Disks (shared-nothing).
    disks: Vec<DiskDesc>,
    retain_source_disks: bool,
    /// The disks' digests once flushed in the pause (`None`: not yet).
    disk_digests: Option<Vec<u64>>,
    disks_synced: bool,
}

impl SourceSession {
    /// Start a migration of a VM of `shape` over `channels` channels: sends `Prepare`.
    /// `was_running`: the VM runs now (it is resumed after a failure only then).
    pub fn new(cfg: SourceConfig, shape: VmShape, channels: usize, was_running: bool, now: Instant) -> Self {
        let mut first_index = Vec::new();
        let mut acc = 0u64;
        for &(_, len) in &shape.regions {
            first_index.push(acc);
            acc += len / PAGE_SIZE as u64;
        }
        let mut s = Self {
            cfg,
            state: SourceState::Preparing,
            actions: VecDeque::new(),
            first_index,
            total_pages: acc,
            channels,
            was_running,
            started: now,
            next_id: 1,
            outstanding: HashMap::new(),
            round_pages: 0,
            acked_pages: 0,
            round_started: now,
            last_ack: now,
            last_report: now,
            sent_pages: 0,
            meters: (0..channels).map(|_| ChannelMeter::new(now)).collect(),
            dead: vec![false; channels],
            lost: Vec::new(),
            pending_lost: Vec::new(),
            data_done: false,
            converge: Converge::default(),
            final_bm: None,
            dirty_log: false,
            paused_at: None,
            commit_sent: false,
            reply_deadline: None,
            stalls_checked: now,
            stats: SessionStats { throttle_pct: 100, ..Default::default() },
            shape,
            disks: Vec::new(),
            retain_source_disks: false,
            disk_digests: None,
            disks_synced: false,
        };
        if channels == 0 {
            s.fail(MigrateError::Config("no channels"));
            return s;
        }
        s.progress(Status::Setup, 0, s.guest_bytes(), Duration::ZERO, 0.0);
        s.send(Msg::Prepare {
            version: MIGRATION_VERSION,
            shape: s.shape.clone(),
            channels: channels as u16,
            verify_full: cfg.verify_full,
        });
        s.reply_deadline = Some(now + cfg.reply_timeout);
        s
    }

    /// A shared-nothing move: the VM's `disks` travel too (copied and in sync before memory
    /// pre-copy, last blocks in the pause, verified with the image). `retain`: keep the source's
    /// files after the destination committed (Hyper-V's `-RetainVhdCopiesOnSource`). Call right
    /// after [`SourceSession::new`], before any event.
    pub fn with_disks(mut self, disks: Vec<DiskDesc>, retain: bool) -> Self {
        self.disks = disks;
        self.retain_source_disks = retain;
        self
    }

    /// Disks the move brings.
    pub fn disks(&self) -> &[DiskDesc] {
        &self.disks
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// The state.
    pub fn state(&self) -> SourceState {
        self.state
    }

    /// Numbers so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// `Commit` has gone out: the source must never resume the VM by itself now.
    pub fn commit_sent(&self) -> bool {
        self.commit_sent
    }

    /// Channels lost (or being given up).
    pub fn failed_channels(&self) -> Vec<u16> {
        self.lost.iter().chain(&self.pending_lost).copied().collect()
    }

    /// Over (done, failed or uncertain).
    pub fn is_over(&self) -> bool {
        matches!(self.state, SourceState::Done | SourceState::Failed | SourceState::Uncertain)
    }

    /// Pages sent in all rounds finished so far.
    pub fn pages_sent(&self) -> u64 {
        self.sent_pages
    }

    fn guest_bytes(&self) -> u64 {
        self.shape.memory_bytes()
    }

    fn send(&mut self, m: Msg) {
        self.actions.push_back(SourceAction::Send(m));
    }

    fn progress(&mut self, status: Status, round: u32, remaining: u64, expected: Duration, dirty_rate: f64) {
        self.actions.push_back(SourceAction::Progress(Progress {
            status,
            round,
            guest_bytes: self.guest_bytes(),
            remaining_bytes: remaining,
            pages_sent: self.sent_pages,
            transferred_bytes: 0,
            expected_downtime: expected,
            bandwidth_bytes_per_s: self.stats.bandwidth_bytes_per_s,
            dirty_rate_bytes_per_s: dirty_rate,
            throttle_pct: self.stats.throttle_pct,
        }));
    }

    /// When [`SourceSession::handle_timeout`] must be called at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_over() {
            return None;
        }
        let stall = self.cfg.stall_timeout.map(|_| self.stalls_checked + Duration::from_millis(50));
        match (self.reply_deadline, stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fail(&mut self, e: MigrateError) {
        if self.is_over() {
            return;
        }
        self.reply_deadline = None;
        if self.commit_sent && !matches!(e, MigrateError::DestinationAborted(_) | MigrateError::Refused(_)) {
            // Ownership is unknown: keep the copy paused, never resume it here.
            self.state = SourceState::Uncertain;
            self.stats.events.push(format!("commit sent but not confirmed: {e}"));
            self.actions.push_back(SourceAction::Finish(Outcome::Uncertain(e)));
            return;
        }
        self.state = SourceState::Failed;
        if self.dirty_log {
            self.actions.push_back(SourceAction::StopDirtyLog);
        }
        if self.paused_at.is_some() && self.was_running {
            self.actions.push_back(SourceAction::Resume);
        }
        self.actions.push_back(SourceAction::Finish(Outcome::Failed(e)));
    }

    /// Cancel asked: abort (ignored once `Commit` was sent).
    pub fn handle_cancel(&mut self) {
        if !self.commit_sent {
            self.fail(MigrateError::Cancelled);
        }
    }

    /// Time passed: the destination's silence, stalled channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_over() {
            return;
        }
        if self.reply_deadline.is_some_and(|d| now >= d) {
            return self.fail(MigrateError::Timeout("waiting for the destination"));
        }
        let (Some(min), true) = (self.cfg.stall_timeout, self.cfg.failover) else { return };
        // Limits are a second or more: looking every 50 ms is enough.
        if now.saturating_duration_since(self.stalls_checked) < Duration::from_millis(50) {
            return;
        }
        self.stalls_checked = now;
        let mut oldest: Vec<Option<Instant>> = vec![None; self.channels];
        for o in self.outstanding.values() {
            if let Some((ch, at)) = o.on {
                let e = &mut oldest[ch as usize];
                *e = Some(e.map_or(at, |x: Instant| x.min(at)));
            }
        }
        let live: Vec<ChannelView> = (0..self.channels as u16)
            .filter(|&i| self.is_live(i))
            .map(|i| ChannelView {
                index: i,
                oldest_unacked: oldest[i as usize],
                last_ack: self.meters[i as usize].last_ack,
                gap_s: self.meters[i as usize].gap_s,
            })
            .collect();
        for (i, quiet) in stalled_channels(now, min, &live) {
            let why = format!("stalled: no acknowledgement for {} ms while other channels progress", quiet.as_millis());
            self.channel_failed(i, why, true, now);
        }
    }

    fn is_live(&self, i: u16) -> bool {
        !self.dead[i as usize] && !self.lost.contains(&i) && !self.pending_lost.contains(&i)
    }

    fn alive(&self) -> Vec<u16> {
        (0..self.channels as u16).filter(|&i| !self.dead[i as usize]).collect()
    }

    /// A control message arrived on channel 0.
    pub fn handle_control(&mut self, bytes: &[u8], now: Instant) {
        if self.is_over() {
            return;
        }
        let m = match Msg::decode(bytes) {
            Ok(m) => m,
            Err(e) => return self.fail(e.into()),
        };
        use SourceState as S;
        match (self.state, m) {
            (_, Msg::Refuse(r)) => self.fail(MigrateError::Refused(r)),
            (_, Msg::ChannelLost { channel }) if (channel as usize) < self.channels => {
                if self.data_done {
                    self.channel_failed(channel, "destination lost it".into(), false, now);
                } else {
                    self.requeue_lost(channel, now);
                }
            }
            (S::Preparing, Msg::PrepareOk) if !self.disks.is_empty() => {
                self.state = S::PreparingDisks;
                self.send(Msg::Disks { disks: self.disks.clone() });
                self.reply_deadline = Some(now + self.cfg.reply_timeout);
            }
            (S::Preparing, Msg::PrepareOk) => {
                self.reply_deadline = None;
                self.actions.push_back(SourceAction::StartDirtyLog);
            }
            (S::Preparing, other) => self.fail(MigrateError::Unexpected(format!("{other:?} instead of PrepareOk"))),
            (S::PreparingDisks, Msg::DisksOk) => {
                // The disk copy answers for itself (acknowledgements with their own deadline).
                self.reply_deadline = None;
                self.state = S::CopyingDisks;
                self.actions.push_back(SourceAction::StartDisks);
            }
            (S::PreparingDisks, other) => self.fail(MigrateError::Unexpected(format!("{other:?} instead of DisksOk"))),
            (S::AwaitReady, Msg::Ready) => {
                self.stats.verified = true;
                // Point of no return for the source. A failed send means the kernel took none
                // of the message's bytes, so the destination cannot have it (the driver reports
                // that with handle_send_failed); after a successful send the outcome is unknown
                // until `Resumed` (or an explicit abort, which the destination never sends once
                // it has the commit).
                self.state = S::Committing;
                self.commit_sent = true;
                self.send(Msg::Commit);
                self.reply_deadline = Some(now + self.cfg.reply_timeout);
            }
            (S::AwaitReady, other) => self.fail(MigrateError::Unexpected(format!("{other:?} instead of Ready"))),
            (S::Committing, Msg::Resumed) => {
                self.reply_deadline = None;
                self.state = S::Done;
                if let Some(p) = self.paused_at {
                    self.stats.downtime = now.saturating_duration_since(p);
                }
                let (round, exp, dr) = (
                    self.stats.rounds.saturating_sub(1),
                    self.stats.expected_downtime,
                    self.stats.dirty_rate_bytes_per_s,
                );
                self.progress(Status::Completed, round, 0, exp, dr);
                self.actions.push_back(SourceAction::StopDirtyLog);
                // The destination runs the VM on its copies: only now may the source's go.
                if !self.disks.is_empty() && !self.retain_source_disks {
                    self.actions.push_back(SourceAction::RemoveSourceDisks);
                }
                self.actions.push_back(SourceAction::Finish(Outcome::Completed));
            }
            (S::Committing, other) => self.fail(MigrateError::Unexpected(format!("{other:?} instead of Resumed"))),
            (_, other) => self.fail(MigrateError::Unexpected(format!("{other:?} during a round"))),
        }
    }

    /// Sending a control message failed (the destination did not get it).
    pub fn handle_send_failed(&mut self, why: String) {
        if self.state == SourceState::Committing {
            // The commit never left: the VM is still ours.
            self.commit_sent = false;
        }
        self.fail(MigrateError::Channel(0, why));
    }

    /// The destination aborted (it never does once it has the commit).
    pub fn handle_aborted(&mut self, why: String) {
        self.fail(MigrateError::DestinationAborted(why));
    }

    /// Every disk is copied and in sync (`Ok`), or the copy failed: memory pre-copy starts now.
    pub fn handle_disks_synced(&mut self, r: Result<(), String>, now: Instant) {
        if self.state != SourceState::CopyingDisks || self.disks_synced || self.is_over() {
            return;
        }
        if let Err(e) = r {
            return self.fail(MigrateError::Disk(e));
        }
        self.stats.events.push(format!(
            "{} disk(s) in sync after {:.1} s; memory pre-copy starts",
            self.disks.len(),
            now.saturating_duration_since(self.started).as_secs_f64()
        ));
        self.disks_synced = true;
        self.actions.push_back(SourceAction::StartDirtyLog);
    }

    /// The disks' last blocks are acknowledged (with each disk's digest, in order), or the
    /// flush failed.
    pub fn handle_disks_flushed(&mut self, r: Result<Vec<u64>, String>, now: Instant) {
        if !matches!(self.state, SourceState::FinalRound(_)) || self.disk_digests.is_some() {
            return;
        }
        match r {
            Ok(d) if d.len() == self.disks.len() => {
                self.disk_digests = Some(d);
                self.check_round_done(now);
            }
            Ok(d) => self.fail(MigrateError::Internal(if d.is_empty() { "no disk digests" } else { "disk digests" })),
            Err(e) => self.fail(MigrateError::Disk(e)),
        }
    }

    /// A disk could not be read or sent, or the destination did not acknowledge its blocks in
    /// time: the move aborts (before `Commit`; the source's disks were only read).
    pub fn handle_disk_failed(&mut self, why: String) {
        if !self.commit_sent {
            self.fail(MigrateError::Disk(why));
        }
    }

    /// The dirty log started (or not).
    pub fn handle_dirty_log(&mut self, r: Result<(), String>, now: Instant) {
        let synced = self.state == SourceState::CopyingDisks && self.disks_synced;
        if !(self.state == SourceState::Preparing || synced) || self.is_over() {
            return;
        }
        if let Err(e) = r {
            return self.fail(MigrateError::Vm(e));
        }
        self.dirty_log = true;
        self.stats.setup = now.saturating_duration_since(self.started);
        // Round 0: every page (zero pages cost one bit each).
        let bm = DirtyBitmap {
            regions: self
                .shape
                .regions
                .iter()
                .map(|&(gpa, len)| RegionBitmap::full(gpa, len / PAGE_SIZE as u64))
                .collect(),
        };
        self.progress(Status::Active, 0, bm.bytes(), Duration::ZERO, 0.0);
        self.start_round(&bm, 0, now);
    }

    fn start_round(&mut self, bm: &DirtyBitmap, round: u32, now: Instant) {
        self.state = if self.paused_at.is_some() { SourceState::FinalRound(round) } else { SourceState::Round(round) };
        let mut batches = plan_batches(bm, &self.first_index, round, self.cfg.batch_pages, &mut self.next_id);
        if self.cfg.scheduling == Scheduling::RoundRobin {
            let alive = self.alive();
            if !alive.is_empty() {
                for (k, b) in batches.iter_mut().enumerate() {
                    b.pin = Some(alive[k % alive.len()]);
                }
            }
        } else if self.paused_at.is_some() {
            // The final round: each live channel gets a share in proportion to its rate, so a
            // slow link does not pull a whole window the fast ones then wait for (what the
            // expected downtime assumed; see estimate::final_round_time).
            let (live, rates) = self.live_rates();
            if live.len() > 1 && rates.len() == live.len() {
                let sizes: Vec<u64> = batches.iter().map(|b| b.pages() * PAGE_SIZE as u64).collect();
                for (b, at) in batches.iter_mut().zip(share_by_rate(&sizes, &rates)) {
                    b.pin = Some(live[at]);
                }
            }
        }
        self.outstanding = batches
            .iter()
            .map(|b| (b.id, Outstanding { pages: b.pages(), data_bytes: 0, wire_bytes: None, on: None }))
            .collect();
        self.round_pages = batches.iter().map(Batch::pages).sum();
        self.acked_pages = 0;
        self.round_started = now;
        self.last_ack = now;
        self.reply_deadline = Some(now + self.cfg.reply_timeout);
        if !batches.is_empty() {
            self.actions.push_back(SourceAction::Queue(batches));
        }
        self.check_round_done(now);
    }

    /// A sender is about to put batch `id` on channel `ch`; `data_pages` of its pages carry data.
    pub fn handle_sent(&mut self, ch: u16, id: u64, data_pages: u64, now: Instant) {
        if (ch as usize) >= self.channels || !self.is_live(ch) {
            return; // a late report from a channel given up: its batches are requeued
        }
        if let Some(o) = self.outstanding.get_mut(&id) {
            o.data_bytes = data_pages * PAGE_SIZE as u64;
            o.wire_bytes = None;
            o.on = Some((ch, now));
        }
    }

    /// Batch `id` went out on the wire in `wire_bytes` (compressed or not).
    pub fn handle_wire(&mut self, id: u64, wire_bytes: u64) {
        if let Some(o) = self.outstanding.get_mut(&id) {
            o.wire_bytes = Some(wire_bytes);
        }
    }

    /// Batch `id` was acknowledged on channel `ch` (its pages are in the destination's memory).
    pub fn handle_acked(&mut self, ch: u16, id: u64, now: Instant) {
        if self.is_over() || (ch as usize) >= self.channels {
            return;
        }
        // Stale or repeated: ignored.
        let Some(o) = self.outstanding.remove(&id) else { return };
        // Not reported yet (the ack overtook the sender's report): count it uncompressed.
        self.meters[ch as usize].ack(now, o.data_bytes, o.wire_bytes.unwrap_or(o.data_bytes));
        self.acked_pages += o.pages;
        self.last_ack = now;
        self.reply_deadline = Some(now + self.cfg.reply_timeout);
        if now.saturating_duration_since(self.last_report) > Duration::from_millis(100) {
            self.last_report = now;
            let round = match self.state {
                SourceState::Round(r) | SourceState::FinalRound(r) => r,
                _ => 0,
            };
            let left = (self.round_pages - self.acked_pages) * PAGE_SIZE as u64;
            self.progress(Status::Active, round, left, Duration::ZERO, 0.0);
        }
        self.check_round_done(now);
    }

    fn check_round_done(&mut self, now: Instant) {
        if !self.outstanding.is_empty() || !self.pending_lost.is_empty() || self.is_over() {
            return;
        }
        match self.state {
            SourceState::Round(round) => {
                self.sent_pages += self.round_pages;
                self.stats.pages_per_round.push(self.round_pages);
                self.stats.rounds = round + 1;
                // Measure each channel over the end of this round (at most RATE_WINDOW).
                let start =
                    self.round_started.max(self.last_ack.checked_sub(RATE_WINDOW).unwrap_or(self.round_started));
                for m in &mut self.meters {
                    m.measure(start, round > 0);
                }
                self.send(Msg::RoundEnd { round, pages: self.round_pages });
                self.state = SourceState::Converging(round);
                self.reply_deadline = None;
                self.actions.push_back(SourceAction::TakeDirty);
            }
            SourceState::FinalRound(_) if !self.disks.is_empty() && self.disk_digests.is_none() => {}
            SourceState::FinalRound(round) => {
                self.sent_pages += self.round_pages;
                self.stats.pages_per_round.push(self.round_pages);
                self.stats.rounds = round + 1;
                self.data_done = true;
                self.state = SourceState::SavingState;
                self.reply_deadline = None;
                self.actions.push_back(SourceAction::SaveState);
            }
            _ => {}
        }
        let _ = now;
    }

    /// The delivery rate of the live channels now (guest data bytes per second).
    pub fn live_rate_bytes_per_s(&self) -> Option<f64> {
        live_rate((0..self.channels as u16).filter(|&i| self.is_live(i)).map(|i| &self.meters[i as usize]))
    }

    /// Each channel's last measured delivery rate (guest data bytes per second), by index.
    pub fn channel_rates(&self) -> Vec<Option<f64>> {
        self.meters.iter().map(ChannelMeter::rate_bytes_per_s).collect()
    }

    /// The live channels and their measured rates (a channel not yet measured counts at the
    /// slowest measured rate).
    fn live_rates(&self) -> (Vec<u16>, Vec<f64>) {
        let live: Vec<u16> = (0..self.channels as u16).filter(|&i| self.is_live(i)).collect();
        let known: Vec<f64> = live.iter().filter_map(|&i| self.meters[i as usize].rate_bytes_per_s()).collect();
        let Some(slowest) = known.iter().copied().reduce(f64::min) else { return (live, Vec::new()) };
        let rates = live.iter().map(|&i| self.meters[i as usize].rate_bytes_per_s().unwrap_or(slowest)).collect();
        (live, rates)
    }

    /// The pause if the VM stopped now with `bytes` dirty: the final round over the live
    /// channels at their latest rates.
    pub fn expected_downtime(&self, bytes: u64) -> Duration {
        let (_, rates) = self.live_rates();
        final_round_time(bytes, u64::from(self.cfg.batch_pages) * PAGE_SIZE as u64, &rates)
    }

    /// The dirty pages, read and cleared (after a round, or right after the pause).
    pub fn handle_dirty(&mut self, r: Result<DirtyBitmap, String>, now: Instant) {
        let dirty = match r {
            Ok(d) => d,
            Err(e) => return self.fail(MigrateError::Vm(e)),
        };
        match self.state {
            SourceState::Converging(round) => self.converge(round, dirty, now),
            SourceState::Switchover(round) => {
                let mut bm = self.final_bm.take().unwrap_or_default();
                bm.merge(&dirty);
                if bm.regions.is_empty() {
                    bm = dirty;
                }
                let (exp, dr) = (self.stats.expected_downtime, self.stats.dirty_rate_bytes_per_s);
                self.progress(Status::Switchover, round, bm.bytes(), exp, dr);
                self.send(Msg::Switchover { round });
                if !self.disks.is_empty() {
                    self.actions.push_back(SourceAction::FlushDisks);
                }
                self.start_round(&bm, round, now);
            }
            _ => {}
        }
    }

    fn converge(&mut self, round: u32, dirty: DirtyBitmap, now: Instant) {
        let took = self.last_ack.saturating_duration_since(self.round_started);
        let rate = self.live_rate_bytes_per_s().unwrap_or(0.0);
        self.stats.bandwidth_bytes_per_s = rate;
        let m = RoundMeasure {
            round,
            dirty_pages: dirty.count(),
            dirty_bytes: dirty.bytes(),
            took,
            rate_bytes_per_s: rate,
            expected: self.expected_downtime(dirty.bytes()),
            elapsed: now.saturating_duration_since(self.started),
        };
        let dr = m.dirty_rate_bytes_per_s();
        self.stats.dirty_rate_bytes_per_s = dr;
        self.progress(Status::Active, round, m.dirty_bytes, m.expected, dr);
        match self.converge.decide(&self.cfg.converge, &m) {
            Decision::Switchover { expected } => self.switchover(round + 1, dirty, expected),
            Decision::ForcedSwitchover { expected } => {
                self.stats.events.push(format!(
                    "forced switchover after {} rounds (expected downtime {:?})",
                    round + 1,
                    expected
                ));
                self.switchover(round + 1, dirty, expected);
            }
            Decision::NotConverging => {
                self.actions.push_back(SourceAction::ReturnDirty(dirty));
                self.fail(MigrateError::NotConverging {
                    rounds: round + 1,
                    dirty_rate_bytes_per_s: dr,
                    bandwidth_bytes_per_s: rate,
                });
            }
            Decision::Continue { throttle } => {
                if let Some(t) = throttle {
                    self.stats.throttle_pct = t;
                    self.actions.push_back(SourceAction::SetThrottle(t));
                    self.stats.events.push(format!(
                        "round {round}: throttled guest to {t}% (dirty rate {:.0} MB/s, bandwidth {:.0} MB/s)",
                        dr / 1e6,
                        rate / 1e6
                    ));
                }
                self.start_round(&dirty, round + 1, now);
            }
        }
    }

    fn switchover(&mut self, round: u32, dirty: DirtyBitmap, expected: Duration) {
        self.stats.expected_downtime = expected;
        self.final_bm = Some(dirty);
        self.state = SourceState::Switchover(round);
        self.actions.push_back(SourceAction::Pause);
    }

    /// The VM paused (or not).
    pub fn handle_paused(&mut self, r: Result<(), String>, now: Instant) {
        if !matches!(self.state, SourceState::Switchover(_)) {
            return;
        }
        if let Err(e) = r {
            return self.fail(MigrateError::Vm(e));
        }
        self.paused_at = Some(now);
        self.actions.push_back(SourceAction::TakeDirty);
    }

    /// The VM state and the image digest (the hash of every page as last sent).
    pub fn handle_state(&mut self, r: Result<Vec<u8>, String>, digest: u64, now: Instant) {
        if self.state != SourceState::SavingState {
            return;
        }
        let state = match r {
            Ok(s) => s,
            Err(e) => return self.fail(MigrateError::Vm(e)),
        };
        if state.len() as u64 > MAX_STATE {
            let e = format!("VM state of {} bytes exceeds the protocol's cap of {MAX_STATE} bytes", state.len());
            return self.fail(MigrateError::Vm(e));
        }
        for (i, chunk) in state.chunks(MAX_CHUNK).enumerate() {
            self.send(Msg::StateChunk { offset: (i * MAX_CHUNK) as u64, data: chunk.to_vec() });
        }
        if let Some(digests) = self.disk_digests.clone() {
            self.send(Msg::DiskDigests { digests });
        }
        self.send(Msg::Complete {
            state_len: state.len() as u64,
            state_crc: crc32fast::hash(&state),
            digest,
            pages: self.total_pages,
        });
        self.state = SourceState::AwaitReady;
        self.reply_deadline = Some(now + self.cfg.reply_timeout);
    }

    /// A channel failed (send or receive error, or closed by the destination).
    pub fn handle_channel_failed(&mut self, ch: u16, why: String, now: Instant) {
        if (ch as usize) < self.channels {
            self.channel_failed(ch, why, true, now);
        }
    }

    /// `tell`: ask the destination to close its end (not when the destination reported the loss
    /// itself: a late `ChannelDrop` could hit a rejoined channel).
    fn channel_failed(&mut self, ch: u16, why: String, tell: bool, now: Instant) {
        if self.is_over() || self.lost.contains(&ch) || self.pending_lost.contains(&ch) {
            return;
        }
        self.dead[ch as usize] = true;
        if ch != 0 && self.data_done {
            // Every page is acknowledged: a data channel is no longer needed.
            self.stats.events.push(format!("channel {ch} closed after the last batch: {why}"));
            self.lost.push(ch);
            return;
        }
        let alive = self.dead.iter().filter(|d| !**d).count();
        self.stats.events.push(format!("channel {ch} failed: {why}"));
        if ch == 0 || !self.cfg.failover || alive == 0 {
            return self.fail(MigrateError::Channel(ch, why));
        }
        self.actions.push_back(SourceAction::KillChannel(ch));
        self.pending_lost.push(ch);
        // Ask the destination to close its end now rather than after its own timeout; it
        // answers ChannelLost once that channel's receiver has stopped.
        if tell {
            self.send(Msg::ChannelDrop { channel: ch });
        }
        let _ = now;
    }

    fn requeue_lost(&mut self, ch: u16, now: Instant) {
        if !self.pending_lost.contains(&ch) {
            // The destination lost a channel the source still thinks alive: same thing.
            self.channel_failed(ch, "destination lost it".into(), false, now);
            if self.is_over() || !self.pending_lost.contains(&ch) {
                return;
            }
        }
        self.pending_lost.retain(|&c| c != ch);
        self.lost.push(ch);
        let mut n = 0;
        for o in self.outstanding.values_mut() {
            if o.on.is_some_and(|(c, _)| c == ch) {
                o.on = None;
                n += 1;
            }
        }
        let alive = self.alive();
        self.actions.push_back(SourceAction::Requeue { channel: ch, alive });
        self.stats.events.push(format!("channel {ch}: {n} unacknowledged batches resent on the surviving channels"));
        if self.cfg.rejoin {
            self.actions.push_back(SourceAction::Rejoin(ch));
        }
        self.check_round_done(now);
    }

    /// A lost channel was re-opened: may it carry work again? (`false`: the driver closes it.)
    pub fn handle_rejoined(&mut self, ch: u16, now: Instant) -> bool {
        if (ch as usize) >= self.channels || !self.lost.contains(&ch) || self.data_done || self.is_over() {
            return false;
        }
        self.lost.retain(|&x| x != ch);
        self.dead[ch as usize] = false;
        self.meters[ch as usize] = ChannelMeter::new(now);
        self.stats.events.push(format!(
            "channel {ch} rejoined after {:.1} s",
            now.saturating_duration_since(self.started).as_secs_f64()
        ));
        true
    }
}

/// The session's configuration from the engine's.
impl From<&crate::source::MigrationConfig> for SourceConfig {
    fn from(c: &crate::source::MigrationConfig) -> Self {
        Self {
            converge: c.converge,
            batch_pages: c.batch_pages,
            verify_full: c.verify_full,
            failover: c.failover,
            reply_timeout: c.reply_timeout,
            scheduling: c.scheduling,
            rejoin: c.rejoin.is_some(),
            stall_timeout: c.stall_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_crc_is_crc32_ieee() {
        // The wire's `state_crc` is CRC-32 (IEEE), the check value of which is this.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

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
}
