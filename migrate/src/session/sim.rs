//! Simulations without sockets, threads or clocks (cargo feature `testing`, and `cargo test`):
//!
//! - [`Pair`]: both sessions against each other over a modelled network that a test (or the
//!   `session_sequence` fuzz target) drives step by step with arbitrary [`Op`]s: deliver, drop,
//!   duplicate or reorder control messages, batches and acknowledgements, lose and rejoin
//!   channels, let the guest write, let time pass, cancel, fail VM operations. After every step
//!   it checks the ownership invariants ([`Pair::check`]).
//!   [`Pair::with_disks`] adds a model disk (a shared-nothing move): the driver's disk copy is
//!   modelled at the session's level (copied and in sync, flushed in the pause, verified,
//!   named at commit), and the checks add: the source's disk files are removed only once the
//!   destination runs the VM, a destination disk is named only with a verified image, and the
//!   disk committed equals the paused source's.
//! - [`LinkSim`]: the source session over simulated links of given rates that may slow down or
//!   die at a given time, with compressed batches and a guest dirtying a working set, to check
//!   the expected downtime against the pause that actually follows.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_transport::wire::PAGE_SIZE;

use super::estimate::ConvergeConfig;
use super::source::{Batch, Outcome, Scheduling, SourceAction, SourceConfig, SourceSession};
use super::target::{TargetAction, TargetSession, TargetState};
use crate::protocol::{DiskDesc, Msg};
use crate::vm::{DirtyBitmap, RegionBitmap, VmShape};
use ferry_memory::digest::PageTable;

/// One step of a [`Pair`] run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Deliver the next control message to the destination.
    DeliverToTarget,
    /// Deliver the next control message to the source.
    DeliverToSource,
    /// Drop the next control message to the destination.
    DropToTarget,
    /// Drop the next control message to the source.
    DropToSource,
    /// Duplicate the next control message to the destination.
    DuplicateToTarget,
    /// Duplicate the next control message to the source.
    DuplicateToSource,
    /// Swap the next two control messages to the destination.
    ReorderToTarget,
    /// Channel `n`'s sender takes the next batch it may and sends it.
    Send(u8),
    /// The next batch on channel `n` lands at the destination.
    DeliverBatch(u8),
    /// The next batch on channel `n` lands twice.
    DuplicateBatch(u8),
    /// The next batch on channel `n` is lost (the channel is broken from here on).
    DropBatch(u8),
    /// The next acknowledgement on channel `n` reaches the source.
    DeliverAck(u8),
    /// Channel `n` breaks: both ends notice.
    LoseChannel(u8),
    /// Channel `n` is re-opened (if asked for).
    Rejoin(u8),
    /// The guest writes page `n` (if it runs on the source).
    GuestWrite(u16),
    /// Time passes.
    Advance(u16),
    /// The operator cancels.
    Cancel,
    /// The next VM operation fails.
    FailVmOp,
}

impl Op {
    /// Decode one step from two bytes (for the fuzz target).
    pub fn from_bytes(a: u8, b: u8) -> Op {
        match a % 18 {
            0 => Op::DeliverToTarget,
            1 => Op::DeliverToSource,
            2 => Op::DropToTarget,
            3 => Op::DropToSource,
            4 => Op::DuplicateToTarget,
            5 => Op::DuplicateToSource,
            6 => Op::ReorderToTarget,
            7 => Op::Send(b),
            8 => Op::DeliverBatch(b),
            9 => Op::DuplicateBatch(b),
            10 => Op::DropBatch(b),
            11 => Op::DeliverAck(b),
            12 => Op::LoseChannel(b),
            13 => Op::Rejoin(b),
            14 => Op::GuestWrite(u16::from(b) * 7),
            15 => Op::Advance(u16::from(b) * 40),
            16 => Op::Cancel,
            _ => Op::FailVmOp,
        }
    }
}

/// A batch on the wire: its pages with the versions read when it was sent.
#[derive(Debug, Clone)]
struct Wire {
    batch: Batch,
    pages: Vec<(u64, u64)>,
}

/// Both sessions, a modelled network between them and a model guest (one version number per
/// page: the source's memory, the destination's copy, the source's page table as sent).
#[derive(Debug)]
pub struct Pair {
    now: Instant,
    /// The source's session.
    pub src: SourceSession,
    /// The destination's session.
    pub dst: TargetSession,
    nch: usize,
    mem: Vec<u64>,
    dirty: Vec<bool>,
    dirty_log: bool,
    table: PageTable,
    dst_mem: Option<Vec<u64>>,
    src_running: bool,
    dst_running: bool,
    fail_vm: bool,
    to_dst: VecDeque<Msg>,
    to_src: VecDeque<Msg>,
    queue: VecDeque<Batch>,
    /// Per channel: batches sent and not acknowledged (the driver's in-flight map).
    inflight: Vec<Vec<Batch>>,
    /// Per channel: batches on the wire.
    wire: Vec<VecDeque<Wire>>,
    /// Per channel: acknowledgements on the wire.
    acks: Vec<VecDeque<u64>>,
    alive: Vec<bool>,
    rejoin_asked: Vec<bool>,
    max_admitted: u32,
    /// How the source ended.
    pub src_outcome: Option<Outcome>,
    /// How the destination ended (`true`: it runs the VM).
    pub dst_outcome: Option<bool>,
    /// Model disk (shared-nothing): one version per block at the source; `None`: no disks.
    disk: Option<Vec<u64>>,
    /// The destination's partial copy, and whether it has its name.
    dst_disk: Option<Vec<u64>>,
    dst_disk_named: bool,
    /// The source's disk file still exists.
    src_disk_file: bool,
}

const PAGES: u64 = 96;

impl Pair {
    /// A guest of 96 pages in two regions, over `channels` channels (1 to 4).
    pub fn new(channels: usize) -> Pair {
        Self::build(channels, None)
    }

    fn build(channels: usize, disk: Option<bool>) -> Pair {
        let now = Instant::now();
        let nch = channels.clamp(1, 4);
        let shape = VmShape { vm_id: "sim".into(), regions: vec![(0, 64 * 4096), (1 << 20, 32 * 4096)] };
        let cfg = SourceConfig {
            converge: ConvergeConfig { max_rounds: 6, ..ConvergeConfig::default() },
            batch_pages: 8,
            verify_full: false,
            failover: true,
            reply_timeout: Duration::from_secs(5),
            scheduling: Scheduling::Adaptive,
            rejoin: true,
            stall_timeout: Some(Duration::from_secs(1)),
        };
        let mut src = SourceSession::new(cfg, shape, nch, true, now);
        if let Some(retain) = disk {
            src = src.with_disks(vec![DiskDesc { name: "root.img".into(), size_bytes: 16 * 65536 - 5 }], retain);
        }
        let mut p = Pair {
            now,
            src,
            dst: TargetSession::new(Duration::from_secs(10), now),
            nch,
            mem: (0..PAGES).map(|i| i + 1).collect(),
            dirty: vec![false; PAGES as usize],
            dirty_log: false,
            table: PageTable::new(PAGES as usize, 0),
            dst_mem: None,
            src_running: true,
            dst_running: false,
            fail_vm: false,
            to_dst: VecDeque::new(),
            to_src: VecDeque::new(),
            queue: VecDeque::new(),
            inflight: vec![Vec::new(); nch],
            wire: vec![VecDeque::new(); nch],
            acks: vec![VecDeque::new(); nch],
            alive: vec![true; nch],
            rejoin_asked: vec![false; nch],
            max_admitted: 0,
            src_outcome: None,
            dst_outcome: None,
            disk: disk.map(|_| (0..16).map(|i| i * 3 + 1).collect()),
            dst_disk: None,
            dst_disk_named: false,
            src_disk_file: true,
        };
        p.pump();
        p
    }

    /// [`Pair::new`] for a VM with one disk of 16 blocks (a shared-nothing move); `retain`: keep
    /// the source's file after the commit.
    pub fn with_disks(channels: usize, retain: bool) -> Pair {
        Self::build(channels, Some(retain))
    }

    fn disk_digest(d: &[u64]) -> u64 {
        let t = PageTable::new(d.len(), 0);
        for (i, v) in d.iter().enumerate() {
            t.set(i, *v);
        }
        t.digest()
    }

    fn vm_ok(&mut self) -> Result<(), String> {
        if std::mem::take(&mut self.fail_vm) {
            Err("injected VM failure".into())
        } else {
            Ok(())
        }
    }

    fn page_of(gpa: u64) -> u64 {
        if gpa >= 1 << 20 {
            64 + (gpa - (1 << 20)) / PAGE_SIZE as u64
        } else {
            gpa / PAGE_SIZE as u64
        }
    }

    fn bitmap(&self) -> DirtyBitmap {
        let mut a = RegionBitmap::new(0, 64);
        let mut b = RegionBitmap::new(1 << 20, 32);
        for (i, _) in self.dirty.iter().enumerate().filter(|d| *d.1) {
            if i < 64 {
                a.set(i as u64);
            } else {
                b.set(i as u64 - 64);
            }
        }
        DirtyBitmap { regions: vec![a, b] }
    }

    /// Cut channel `c` at both ends: what was on its wire is gone.
    fn cut(&mut self, c: usize) {
        if !self.alive[c] {
            return;
        }
        self.alive[c] = false;
        self.wire[c].clear();
        self.acks[c].clear();
        let now = self.now;
        self.dst.handle_channel_lost(c as u16, "cut".into(), false);
        self.src.handle_channel_failed(c as u16, "cut".into(), now);
    }

    /// Carry out every pending action of both sessions.
    fn pump(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.src.poll_action() {
                any = true;
                self.src_action(a);
                self.check();
            }
            while let Some(a) = self.dst.poll_action() {
                any = true;
                self.dst_action(a);
                self.check();
            }
            if !any {
                return;
            }
        }
    }

    fn src_action(&mut self, a: SourceAction) {
        let now = self.now;
        match a {
            SourceAction::Send(m) => {
                if self.alive[0] {
                    self.to_dst.push_back(m);
                } else {
                    self.src.handle_send_failed("channel 0 is down".into());
                }
            }
            SourceAction::StartDirtyLog => {
                let r = self.vm_ok();
                if r.is_ok() {
                    self.dirty_log = true;
                    self.dirty.iter_mut().for_each(|d| *d = false);
                }
                self.src.handle_dirty_log(r, now);
            }
            SourceAction::TakeDirty => {
                let r = self.vm_ok().map(|()| {
                    let bm = self.bitmap();
                    self.dirty.iter_mut().for_each(|d| *d = false);
                    bm
                });
                self.src.handle_dirty(r, now);
            }
            SourceAction::ReturnDirty(bm) => {
                for (r, base) in bm.regions.iter().zip([0u64, 64]) {
                    for i in (0..r.pages).filter(|&i| r.get(i)) {
                        self.dirty[(base + i) as usize] = true;
                    }
                }
            }
            SourceAction::SetThrottle(_) | SourceAction::Progress(_) => {}
            SourceAction::Pause => {
                let r = self.vm_ok();
                if r.is_ok() {
                    self.src_running = false;
                }
                self.src.handle_paused(r, now);
            }
            SourceAction::SaveState => {
                let r = self.vm_ok().map(|()| b"cpu state".to_vec());
                self.src.handle_state(r, self.table.digest(), now);
            }
            SourceAction::Queue(b) => self.queue.extend(b),
            SourceAction::KillChannel(c) => self.cut(c as usize),
            SourceAction::Requeue { channel, .. } => {
                let back: Vec<Batch> = std::mem::take(&mut self.inflight[channel as usize]);
                for mut b in back.into_iter().rev() {
                    b.pin = None;
                    self.queue.push_front(b);
                }
            }
            SourceAction::Rejoin(c) => self.rejoin_asked[c as usize] = true,
            SourceAction::StopDirtyLog => self.dirty_log = false,
            SourceAction::StartDisks => {
                // The driver's copy: every block lands at the destination's partial copy.
                let r = self.vm_ok().and_then(|()| match (&self.disk, self.dst_disk.as_mut()) {
                    (Some(d), Some(dst)) => {
                        dst.clone_from(d);
                        Ok(())
                    }
                    _ => Err("no partial copy at the destination".into()),
                });
                self.src.handle_disks_synced(r, now);
            }
            SourceAction::FlushDisks => {
                assert!(!self.src_running, "disks flushed while the guest runs");
                let r = self.vm_ok().and_then(|()| match (&self.disk, self.dst_disk.as_mut()) {
                    (Some(d), Some(dst)) if !self.dst.is_over() => {
                        dst.clone_from(d);
                        Ok(vec![Self::disk_digest(d)])
                    }
                    _ => Err("the destination's copy is gone".into()),
                });
                self.src.handle_disks_flushed(r, now);
            }
            SourceAction::RemoveSourceDisks => {
                assert!(
                    self.dst_running && self.dst_disk_named,
                    "source disks removed before the destination ran the VM"
                );
                self.src_disk_file = false;
            }
            SourceAction::Resume => {
                assert!(!self.dst.committed(), "the source resumed a VM the destination committed");
                assert!(!self.src.commit_sent() || self.dst_outcome.is_some(), "resumed after commit went out");
                self.src_running = true;
            }
            SourceAction::Finish(o) => {
                if matches!(o, Outcome::Completed) {
                    assert!(self.dst.committed(), "the source completed but the destination never committed");
                }
                if matches!(o, Outcome::Failed(_)) && !self.src.commit_sent() && self.alive[0] {
                    // The driver's abort reaches the destination.
                    self.dst.handle_channel_lost(0, "source aborted".into(), false);
                }
                self.src_outcome = Some(o);
            }
        }
    }

    fn dst_action(&mut self, a: TargetAction) {
        let now = self.now;
        match a {
            TargetAction::Send(m) => {
                if self.alive[0] {
                    self.to_src.push_back(m);
                } else {
                    self.dst.handle_channel_lost(0, "channel 0 is down".into(), false);
                }
            }
            TargetAction::CreateVm(_) => {
                let r = self.vm_ok();
                if r.is_ok() {
                    self.dst_mem = Some(vec![0; PAGES as usize]);
                }
                self.dst.handle_vm_created(r);
            }
            TargetAction::AwaitChannels(_) => {
                let all = self.alive.iter().all(|a| *a);
                self.dst.handle_channels(all, now);
            }
            TargetAction::CloseChannel(c) => self.cut(c as usize),
            TargetAction::PrepareDisks(d) => {
                assert_eq!(d.len(), 1);
                let r = self.vm_ok();
                if r.is_ok() {
                    self.dst_disk = Some(vec![0; 16]);
                }
                self.dst.handle_disks_prepared(r);
            }
            TargetAction::CommitDisks => {
                assert!(self.dst.verified(), "disks named without a verified image");
                assert!(!self.src_running, "disks named while the source runs");
                assert_eq!(self.dst_disk, self.disk, "committed a disk that differs from the source's");
                let r = self.vm_ok();
                self.dst_disk_named = r.is_ok();
                self.dst.handle_disks_committed(r);
            }
            TargetAction::Verify { .. } => {
                if self.disk.is_some() {
                    let d = self.dst_disk.as_deref().map(Self::disk_digest);
                    self.dst.handle_disk_digests(d.map(|d| vec![d]).ok_or_else(|| "no disks".to_string()));
                }
                let t = PageTable::new(PAGES as usize, 0);
                for (i, v) in self.dst_mem.iter().flatten().enumerate() {
                    t.set(i, *v);
                }
                self.dst.handle_digest(t.digest());
            }
            TargetAction::Restore(_) => {
                let r = self.vm_ok();
                self.dst.handle_restored(r, now);
            }
            TargetAction::Resume => {
                // Ownership passed: the image must be exactly the paused source's.
                assert!(self.dst.verified(), "resumed an unverified image");
                assert!(!self.src_running, "the destination resumed while the source runs");
                assert_eq!(self.dst_mem.as_ref(), Some(&self.mem), "committed an image that differs from the source's");
                self.dst_running = true;
                self.dst.handle_resumed(Ok(()));
            }
            TargetAction::Fail(_) => {
                self.dst_mem = None;
                // The driver removes the partial copies (and named ones of a failed resume).
                self.dst_disk = None;
                self.dst_disk_named = false;
                if self.alive[0] && !self.src.is_over() {
                    self.src.handle_aborted("destination gave up".into());
                }
                self.dst_outcome = Some(false);
            }
            TargetAction::Finish => self.dst_outcome = Some(true),
        }
    }

    /// The ownership invariants, checked after every step.
    pub fn check(&self) {
        assert!(!(self.src_running && self.dst_running), "two running copies");
        if self.disk.is_some() {
            assert!(self.src_disk_file || self.dst_disk_named, "no disk left anywhere");
            assert!(!self.dst_disk_named || self.dst.committed(), "a disk named at an uncommitted destination");
        }
        if self.dst_running {
            assert!(self.dst.verified() && self.dst.committed(), "the destination runs without a verified commit");
        }
        if self.dst.committed() {
            assert!(!self.src_running, "the source runs after the destination committed");
        }
    }

    /// Run one step.
    pub fn step(&mut self, op: Op) {
        // Every step takes a little time (measured rates need some).
        self.now += Duration::from_micros(500);
        let ch = |n: u8| n as usize % self.nch;
        match op {
            Op::DeliverToTarget => {
                if let Some(m) = self.to_dst.pop_front() {
                    let now = self.now;
                    self.dst.handle_control(&m.encode(), now);
                }
            }
            Op::DeliverToSource => {
                if let Some(m) = self.to_src.pop_front() {
                    let now = self.now;
                    self.src.handle_control(&m.encode(), now);
                }
            }
            Op::DropToTarget => {
                self.to_dst.pop_front();
            }
            Op::DropToSource => {
                self.to_src.pop_front();
            }
            Op::DuplicateToTarget => {
                if let Some(m) = self.to_dst.front().cloned() {
                    self.to_dst.push_front(m);
                }
            }
            Op::DuplicateToSource => {
                if let Some(m) = self.to_src.front().cloned() {
                    self.to_src.push_front(m);
                }
            }
            Op::ReorderToTarget => {
                if self.to_dst.len() >= 2 {
                    self.to_dst.swap(0, 1);
                }
            }
            Op::Send(n) => {
                let c = ch(n);
                if !self.alive[c] || self.inflight[c].len() >= 4 {
                    return;
                }
                let Some(pos) = self.queue.iter().position(|b| b.pin.is_none_or(|p| p as usize == c)) else { return };
                let Some(b) = self.queue.remove(pos) else { return };
                // Scan as the sender does: record each page's version as sent.
                let mut pages = Vec::new();
                for (r, &first) in b.runs.iter().zip(&b.first) {
                    for p in 0..u64::from(r.pages) {
                        let idx = Self::page_of(r.gpa) + p;
                        debug_assert_eq!(idx, first + p);
                        self.table.set(idx as usize, self.mem[idx as usize]);
                        pages.push((idx, self.mem[idx as usize]));
                    }
                }
                let now = self.now;
                self.src.handle_sent(c as u16, b.id, pages.len() as u64, now);
                self.src.handle_wire(b.id, pages.len() as u64 * PAGE_SIZE as u64 / 2);
                self.inflight[c].push(b.clone());
                self.wire[c].push_back(Wire { batch: b, pages });
            }
            Op::DeliverBatch(n) | Op::DuplicateBatch(n) => {
                let c = ch(n);
                let Some(w) = self.wire[c].pop_front() else { return };
                let times = if matches!(op, Op::DuplicateBatch(_)) { 2 } else { 1 };
                for _ in 0..times {
                    self.land(c, &w);
                }
            }
            Op::DropBatch(n) => {
                let c = ch(n);
                if self.wire[c].pop_front().is_some() {
                    // A stream that loses bytes is broken: later batches never parse.
                    self.wire[c].clear();
                }
            }
            Op::DeliverAck(n) => {
                let c = ch(n);
                if let Some(id) = self.acks[c].pop_front() {
                    // The driver's reader: only a batch still in flight on this channel counts.
                    if let Some(pos) = self.inflight[c].iter().position(|b| b.id == id) {
                        self.inflight[c].remove(pos);
                        let now = self.now;
                        self.src.handle_acked(c as u16, id, now);
                    }
                }
            }
            Op::LoseChannel(n) => self.cut(ch(n)),
            Op::Rejoin(n) => {
                let c = ch(n);
                if self.alive[c] || !self.rejoin_asked[c] {
                    return;
                }
                self.rejoin_asked[c] = false;
                let now = self.now;
                let welcome = self.dst.handle_rejoin(c as u16);
                if self.src.handle_rejoined(c as u16, now) {
                    if welcome {
                        self.alive[c] = true;
                        self.inflight[c].clear();
                    } else {
                        self.src.handle_channel_failed(c as u16, "refused".into(), now);
                    }
                } else if welcome {
                    self.dst.handle_channel_lost(c as u16, "closed by the source".into(), true);
                }
            }
            Op::GuestWrite(p) => {
                let p = u64::from(p) % PAGES;
                if self.src_running {
                    if let Some(d) = self.disk.as_mut() {
                        // The disk's writes are mirrored by the driver's pump while it copies.
                        let b = (p % 16) as usize;
                        d[b] += 1000;
                        if let Some(dst) = self.dst_disk.as_mut().filter(|_| !self.dst.is_over()) {
                            dst[b] = d[b];
                        }
                    }
                    self.mem[p as usize] += 1000;
                    if self.dirty_log {
                        self.dirty[p as usize] = true;
                    }
                }
            }
            Op::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                let now = self.now;
                self.src.handle_timeout(now);
                self.dst.handle_timeout(now);
            }
            Op::Cancel => self.src.handle_cancel(),
            Op::FailVmOp => self.fail_vm = true,
        }
        self.pump();
        self.check();
    }

    fn land(&mut self, c: usize, w: &Wire) {
        if self.dst.is_over() || self.dst.committed() {
            return; // the receivers are gone
        }
        let Some(mem) = self.dst_mem.as_mut() else { return };
        // The round rule is checked before any page is written (as the receivers do); a
        // refused batch is never written, and aborts the migration.
        match self.dst.gate().admit(w.batch.round) {
            Ok(()) => {
                for &(i, v) in &w.pages {
                    mem[i as usize] = v;
                }
                self.dst.gate().landed();
                assert!(w.batch.round >= self.max_admitted, "a stale round's batch was accepted");
                assert!(
                    matches!(self.dst.state(), TargetState::Receiving),
                    "a batch was accepted in {:?}",
                    self.dst.state()
                );
                self.max_admitted = w.batch.round;
                self.acks[c].push_back(w.batch.id);
            }
            Err(e) => self.dst.handle_violation(c as u16, e.to_string()),
        }
    }

    /// Run the happy path to its end: deliver everything in order, round-robin over channels.
    pub fn run_to_end(&mut self, max_steps: usize) {
        for i in 0..max_steps {
            if self.src.is_over() && self.dst.is_over() {
                return;
            }
            let c = (i % self.nch) as u8;
            for op in [Op::Send(c), Op::DeliverBatch(c), Op::DeliverAck(c), Op::DeliverToTarget, Op::DeliverToSource] {
                self.step(op);
            }
        }
    }

    /// The source's model guest runs.
    pub fn source_running(&self) -> bool {
        self.src_running
    }

    /// The destination's model guest runs.
    pub fn target_running(&self) -> bool {
        self.dst_running
    }
}

/// A simulated link: its rate, and optionally a change of rate (slower, or 0: dead) at a time.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Bytes per second on the wire.
    pub rate_bytes_per_s: f64,
    /// From this time on (since the start) the link runs at the second rate (0: it died).
    pub change: Option<(Duration, f64)>,
}

impl Link {
    fn rate_at(&self, t: Duration) -> f64 {
        match self.change {
            Some((at, r)) if t >= at => r,
            _ => self.rate_bytes_per_s,
        }
    }
}

/// The simulated guest: pages of three kinds by index (zero, text that compresses `text_ratio`
/// times, random), and a writer rewriting the first `ws_pages` pages round and round at
/// `dirty_pages_per_s` (times the throttle); a written page compresses `ws_ratio` times.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// Pages.
    pub pages: u64,
    /// Working set (pages from 0).
    pub ws_pages: u64,
    /// Pages written per second (unthrottled).
    pub dirty_pages_per_s: f64,
    /// Compression ratio of text pages.
    pub text_ratio: f64,
    /// Compression ratio of pages the writer wrote.
    pub ws_ratio: f64,
}

/// What a [`LinkSim`] run gave.
#[derive(Debug, Clone)]
pub struct SimRun {
    /// How it ended (`Completed`, or the error).
    pub outcome: String,
    /// The pause the session expected at switchover.
    pub expected: Duration,
    /// The pause that followed (pause to `Resumed`).
    pub downtime: Duration,
    /// Rounds.
    pub rounds: u32,
    /// What the session noted on the way.
    pub events: Vec<String>,
    /// Each channel's rate as the session knew it at the pause.
    pub rates_at_pause: Vec<Option<f64>>,
    /// How long the final round took.
    pub final_round: Duration,
}

/// The source session over simulated links (1 ms steps), a model destination answering its
/// control messages after `latency`, and a model guest.
pub fn run_links(links: &[Link], guest: Guest, compress: bool, limit: Duration) -> SimRun {
    let dt = Duration::from_millis(1);
    let latency = Duration::from_millis(1);
    let window = 16usize;
    let t0 = Instant::now();
    let n = links.len();
    let pages_per_region = guest.pages / 2;
    let shape = VmShape {
        vm_id: "links".into(),
        regions: vec![(0, pages_per_region * 4096), (1 << 40, (guest.pages - pages_per_region) * 4096)],
    };
    let cfg = SourceConfig {
        converge: ConvergeConfig { downtime_limit: limit, ..ConvergeConfig::default() },
        batch_pages: 256,
        verify_full: false,
        failover: true,
        reply_timeout: Duration::from_secs(30),
        scheduling: Scheduling::Adaptive,
        rejoin: false,
        stall_timeout: Some(Duration::from_secs(1)),
    };
    let mut s = SourceSession::new(cfg, shape, n, true, t0);
    let mut written = vec![false; guest.pages as usize];
    let mut dirty = vec![false; guest.pages as usize];
    let mut logging = false;
    let mut running = true;
    let mut throttle = 100u8;
    let mut cursor = 0u64;
    let mut owed = 0.0f64;
    let mut queue: VecDeque<Batch> = VecDeque::new();
    // Per channel: batches in flight (with wire bytes left to send), acknowledgements due.
    let mut pipe: Vec<VecDeque<(Batch, f64)>> = vec![VecDeque::new(); n];
    let mut acks: Vec<VecDeque<(Duration, u64)>> = vec![VecDeque::new(); n];
    let mut dead = vec![false; n];
    let mut to_src: VecDeque<(Duration, Msg)> = VecDeque::new();
    let page_of = |gpa: u64| {
        if gpa >= 1 << 40 {
            pages_per_region + (gpa - (1 << 40)) / 4096
        } else {
            gpa / 4096
        }
    };
    let mut t = Duration::ZERO;
    let mut rates_at_pause = Vec::new();
    let (mut paused, mut final_round) = (Duration::ZERO, Duration::ZERO);
    let outcome = 'run: loop {
        let now = t0 + t;
        while let Some(a) = s.poll_action() {
            match a {
                SourceAction::Send(m) => {
                    let reply = match m {
                        Msg::Prepare { .. } => Some(Msg::PrepareOk),
                        Msg::Complete { .. } => Some(Msg::Ready),
                        Msg::Commit => Some(Msg::Resumed),
                        Msg::ChannelDrop { channel } => Some(Msg::ChannelLost { channel }),
                        _ => None,
                    };
                    if let Some(r) = reply {
                        to_src.push_back((t + 2 * latency, r));
                    }
                }
                SourceAction::StartDirtyLog => {
                    logging = true;
                    s.handle_dirty_log(Ok(()), now);
                }
                SourceAction::TakeDirty => {
                    let mut regions = vec![
                        RegionBitmap::new(0, pages_per_region),
                        RegionBitmap::new(1 << 40, guest.pages - pages_per_region),
                    ];
                    for (i, d) in dirty.iter_mut().enumerate() {
                        if std::mem::take(d) {
                            let i = i as u64;
                            if i < pages_per_region {
                                regions[0].set(i);
                            } else {
                                regions[1].set(i - pages_per_region);
                            }
                        }
                    }
                    s.handle_dirty(Ok(DirtyBitmap { regions }), now);
                }
                SourceAction::ReturnDirty(_)
                | SourceAction::Progress(_)
                | SourceAction::StopDirtyLog
                | SourceAction::Rejoin(_) => {}
                // The link simulation moves memory only (no disks).
                SourceAction::StartDisks | SourceAction::FlushDisks | SourceAction::RemoveSourceDisks => {}
                SourceAction::SetThrottle(p) => throttle = p,
                SourceAction::Pause => {
                    running = false;
                    rates_at_pause = s.channel_rates();
                    paused = t;
                    s.handle_paused(Ok(()), now);
                }
                SourceAction::SaveState => {
                    final_round = t.saturating_sub(paused);
                    s.handle_state(Ok(vec![0; 4096]), 0, now)
                }
                SourceAction::Queue(b) => queue.extend(b),
                SourceAction::KillChannel(c) => {
                    dead[c as usize] = true;
                    acks[c as usize].clear();
                }
                SourceAction::Requeue { channel, .. } => {
                    for (mut b, _) in std::mem::take(&mut pipe[channel as usize]).into_iter().rev() {
                        b.pin = None;
                        queue.push_front(b);
                    }
                    for b in queue.iter_mut().filter(|b| b.pin == Some(channel)) {
                        b.pin = None;
                    }
                }
                SourceAction::Resume => running = true,
                SourceAction::Finish(o) => {
                    break 'run match o {
                        Outcome::Completed => "Completed".to_string(),
                        Outcome::Failed(e) | Outcome::Uncertain(e) => e.to_string(),
                    }
                }
            }
        }
        if t > Duration::from_secs(600) {
            break "simulation ran out of time".to_string();
        }
        // The guest writes.
        if running {
            owed += guest.dirty_pages_per_s * f64::from(throttle) / 100.0 * dt.as_secs_f64();
            while owed >= 1.0 && guest.ws_pages > 0 {
                owed -= 1.0;
                written[cursor as usize] = true;
                if logging {
                    dirty[cursor as usize] = true;
                }
                cursor = (cursor + 1) % guest.ws_pages;
            }
        }
        // Senders pull while they have room in their window (a link that died still pulls
        // until its window is full: nothing tells it the link is gone).
        for c in 0..n {
            while !dead[c] && pipe[c].len() < window {
                let own = queue.iter().position(|b| b.pin.is_none_or(|p| p as usize == c));
                let steal = if pipe[c].is_empty() { queue.len().checked_sub(1) } else { None };
                let Some(pos) = own.or(steal) else { break };
                let Some(b) = queue.remove(pos) else { break };
                let mut wire = 64.0;
                let mut data = 0;
                for r in &b.runs {
                    for p in 0..u64::from(r.pages) {
                        let i = page_of(r.gpa) + p;
                        let (is_data, ratio) = if written[i as usize] {
                            (true, guest.ws_ratio)
                        } else {
                            match i % 10 {
                                0..=3 => (false, 1.0),
                                4..=6 => (true, guest.text_ratio),
                                _ => (true, 1.0),
                            }
                        };
                        if is_data {
                            data += 1;
                            wire += 4096.0 / if compress { ratio } else { 1.0 };
                        }
                    }
                }
                s.handle_sent(c as u16, b.id, data, now);
                s.handle_wire(b.id, wire as u64);
                pipe[c].push_back((b, wire));
            }
        }
        // Links move bytes; a batch fully sent is acknowledged after the latency.
        for c in 0..n {
            if dead[c] {
                continue;
            }
            let mut budget = links[c].rate_at(t) * dt.as_secs_f64();
            while budget > 0.0 {
                let Some(front) = pipe[c].iter_mut().find(|f| f.1 > 0.0) else { break };
                let used = front.1.min(budget);
                front.1 -= used;
                budget -= used;
                if front.1 <= 0.0 {
                    acks[c].push_back((t + latency, front.0.id));
                }
            }
        }
        t += dt;
        let now = t0 + t;
        for c in 0..n {
            while acks[c].front().is_some_and(|a| a.0 <= t) {
                let Some((_, id)) = acks[c].pop_front() else { break };
                pipe[c].retain(|b| b.0.id != id);
                s.handle_acked(c as u16, id, now);
            }
        }
        while to_src.front().is_some_and(|m| m.0 <= t) {
            let Some((_, m)) = to_src.pop_front() else { break };
            s.handle_control(&m.encode(), now);
        }
        s.handle_timeout(now);
    };
    let st = s.stats();
    SimRun {
        outcome,
        expected: st.expected_downtime,
        downtime: st.downtime,
        rounds: st.rounds,
        events: st.events.clone(),
        rates_at_pause,
        final_round,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_delivery_completes() {
        for n in 1..=3 {
            let mut p = Pair::new(n);
            p.run_to_end(2000);
            assert!(matches!(p.src_outcome, Some(Outcome::Completed)), "{n} channels: {:?}", p.src_outcome);
            assert_eq!(p.dst_outcome, Some(true));
            assert!(p.target_running() && !p.source_running());
        }
    }

    #[test]
    fn a_vm_with_disks_moves_them_first_and_removes_the_source_files_last() {
        for retain in [false, true] {
            for n in 1..=3 {
                let mut p = Pair::with_disks(n, retain);
                p.step(Op::DeliverToTarget); // Prepare
                p.step(Op::DeliverToSource); // PrepareOk
                assert_eq!(p.src.state(), super::super::source::SourceState::PreparingDisks);
                for _ in 0..3 {
                    p.step(Op::GuestWrite(3));
                }
                p.run_to_end(2000);
                assert!(matches!(p.src_outcome, Some(Outcome::Completed)), "{n} channels: {:?}", p.src_outcome);
                assert!(p.target_running() && p.dst_disk_named);
                assert_eq!(p.src_disk_file, retain, "retain {retain}");
            }
        }
    }

    #[test]
    fn a_disk_failure_anywhere_keeps_the_vm_and_its_disk_on_the_source() {
        // A VM operation failing at each step of a move with disks (disk copy, prepare, flush,
        // commit of the disks included): the source keeps the VM and its file, or the
        // destination runs it on a named disk; never neither.
        for k in 0..40 {
            let mut p = Pair::with_disks(2, false);
            let mut i = 0;
            for step in 0..4000 {
                if p.src.is_over() && p.dst.is_over() {
                    break;
                }
                if step % 3 == 0 {
                    i += 1;
                    if i == k {
                        p.step(Op::FailVmOp);
                    }
                }
                let c = (step % 2) as u8;
                for op in
                    [Op::Send(c), Op::DeliverBatch(c), Op::DeliverAck(c), Op::DeliverToTarget, Op::DeliverToSource]
                {
                    p.step(op);
                }
            }
            match p.src_outcome {
                Some(Outcome::Completed) => assert!(p.target_running() && p.dst_disk_named && !p.src_disk_file),
                Some(Outcome::Failed(_)) => assert!(p.source_running() && p.src_disk_file && !p.dst_disk_named),
                ref o => panic!("step {k}: {o:?}"),
            }
        }
    }

    #[test]
    fn a_guest_writing_during_precopy_still_moves_exactly() {
        let mut p = Pair::new(2);
        for i in 0..40u16 {
            p.step(Op::GuestWrite(i * 3));
            p.step(Op::Send((i % 2) as u8));
            p.step(Op::DeliverToTarget);
            p.step(Op::DeliverBatch((i % 2) as u8));
            p.step(Op::DeliverAck((i % 2) as u8));
            p.step(Op::DeliverToSource);
        }
        p.run_to_end(2000);
        assert!(matches!(p.src_outcome, Some(Outcome::Completed)), "{:?}", p.src_outcome);
    }

    #[test]
    fn a_lost_channel_fails_over() {
        let mut p = Pair::new(3);
        for op in [Op::DeliverToTarget, Op::DeliverToSource, Op::Send(1), Op::Send(1), Op::LoseChannel(1)] {
            p.step(op);
        }
        p.run_to_end(2000);
        assert!(matches!(p.src_outcome, Some(Outcome::Completed)), "{:?}", p.src_outcome);
    }

    #[test]
    fn a_lost_commit_confirmation_leaves_the_source_paused() {
        let mut p = Pair::new(1);
        // Everything up to Commit, then drop Resumed.
        for i in 0..2000 {
            if p.src.commit_sent() {
                break;
            }
            let _ = i;
            for op in [Op::Send(0), Op::DeliverBatch(0), Op::DeliverAck(0), Op::DeliverToTarget, Op::DeliverToSource] {
                p.step(op);
            }
        }
        assert!(p.src.commit_sent());
        p.step(Op::DeliverToTarget); // Commit
        p.step(Op::DropToSource); // Resumed
        p.step(Op::LoseChannel(0));
        assert!(matches!(p.src_outcome, Some(Outcome::Uncertain(_))), "{:?}", p.src_outcome);
        assert!(p.target_running() && !p.source_running());
    }

    const MIB: u64 = 1 << 20;

    /// The 3-NIC testbed of the report (1 Gbit, 500 Mbit, 200 Mbit), a busy guest (working set
    /// rewritten at 100 MiB/s), the downtime limit 300 ms.
    fn testbed(change: Option<(usize, Duration, f64)>) -> Vec<Link> {
        let mut l: Vec<Link> =
            [125e6, 62.5e6, 25e6].iter().map(|&r| Link { rate_bytes_per_s: r, change: None }).collect();
        if let Some((i, at, r)) = change {
            l[i].change = Some((at, r));
        }
        l
    }

    fn busy(size_mib: u64) -> Guest {
        Guest {
            pages: size_mib * MIB / 4096,
            ws_pages: 64 * MIB / 4096,
            dirty_pages_per_s: (100 * MIB / 4096) as f64,
            text_ratio: 3.0,
            ws_ratio: 1.3,
        }
    }

    fn holds(r: &SimRun, limit: Duration) {
        eprintln!(
            "expected {:?}, paused {:?}, {} rounds, rates at the pause {:?}",
            r.expected, r.downtime, r.rounds, r.rates_at_pause
        );
        assert_eq!(r.outcome, "Completed", "{r:?}");
        assert!(r.downtime <= limit, "paused {:?} under a {limit:?} limit: {r:?}", r.downtime);
        // The estimate is what happened, within a few steps of the simulation.
        assert!(r.downtime <= r.expected + Duration::from_millis(10), "{r:?}");
    }

    #[test]
    fn the_limit_holds_when_a_link_is_cut_mid_round_with_zstd() {
        // The reported case: one link cut at 1.3 s, compressed batches; 324 ms under 300 before.
        let limit = Duration::from_millis(300);
        // (Channel 0 carries control: losing it aborts the migration, it does not fail over.)
        for cut in 1..3 {
            let r = run_links(&testbed(Some((cut, Duration::from_millis(1300), 0.0))), busy(2048), true, limit);
            holds(&r, limit);
            assert!(r.events.iter().any(|e| e.contains("stalled")), "link {cut} cut but never dropped: {r:?}");
        }
    }

    #[test]
    fn the_limit_holds_when_a_link_slows_mid_round() {
        let limit = Duration::from_millis(300);
        for compress in [false, true] {
            let r = run_links(&testbed(Some((0, Duration::from_millis(1300), 12.5e6))), busy(2048), compress, limit);
            holds(&r, limit);
        }
    }

    #[test]
    fn the_limit_holds_on_steady_links_compressed_or_not() {
        let limit = Duration::from_millis(300);
        for compress in [false, true] {
            holds(&run_links(&testbed(None), busy(256), compress, limit), limit);
        }
        // One fast link.
        let one = [Link { rate_bytes_per_s: 1e9, change: None }];
        holds(&run_links(&one, busy(256), false, limit), limit);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_sequences_keep_the_invariants(
            nch in 1usize..4,
            disks in 0u8..3,
            ops in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..400),
        ) {
            let mut p = if disks == 0 { Pair::new(nch) } else { Pair::with_disks(nch, disks == 2) };
            for (a, b) in ops {
                p.step(Op::from_bytes(a, b));
            }
            // And whatever happened, finishing in order never breaks them either.
            p.run_to_end(300);
            p.check();
        }
    }
}
