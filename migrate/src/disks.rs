//! Disks of a shared-nothing move in the threaded drivers: the source's [`DiskPump`] (what
//! each channel's disk thread sends next, what is in flight, when the disks are in sync or
//! flushed) and the destination's [`DiskSide`] (the partial copies behind the session's seal).
//! The rules (when to copy, when memory may start, what the pause waits for, when the source's
//! files go) are the session's: see [`crate::session::source`] and [`crate::session::target`].
//!
//! Blocks travel as `DiskBlocks` control messages (up to [`MAX_DISK_BLOCKS`] 64 KiB blocks,
//! zero blocks as a flag) on every channel of the session, so they are sealed like every frame,
//! spread over every NIC of a multichannel session, and work over every transport, rdma's
//! two-sided control path included. Each is acknowledged by `DiskAck` on its channel once
//! written. A block is never in flight twice (a dirty block waits for its previous copy's
//! acknowledgement: [`ferry_disk::remote::DiskSender::next`]), so an older copy never lands
//! after a newer one whatever channels they take; the blocks of a lost channel become dirty
//! again only once the destination confirmed that channel's receiver stopped (`ChannelLost`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_disk::digest::DigestKey;
use ferry_disk::remote::{DiskReceiver, DiskSender};
use ferry_disk::Disk;

use crate::protocol::{DiskBlock, DiskDesc, Msg, MAX_DISK_BLOCKS};

/// Unacknowledged `DiskBlocks` messages per channel.
pub const DISK_WINDOW: usize = 8;
/// Dirty blocks (all disks) at or under which the disks count as in sync and memory pre-copy
/// may start (2 MiB: what a guest writing 20 MiB/s dirties in 100 ms).
pub const SYNC_BLOCKS: u64 = 32;
/// Once the first copy is done, how long the dirty blocks may stay over [`SYNC_BLOCKS`]
/// before the disks count as in sync anyway (a guest rewriting a working set faster than the
/// link carries it never gets under; its dirty blocks then go on being mirrored while memory
/// moves, and what is left goes in the pause).
pub const SYNC_WAIT: Duration = Duration::from_secs(3);

/// One disk's numbers after a move.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DiskStats {
    /// Disk name (its file name).
    pub name: String,
    /// Size.
    pub size_bytes: u64,
    /// Bytes the source image occupied when the move started.
    pub allocated_bytes: u64,
    /// Blocks sent with data (all passes).
    pub data_blocks: u64,
    /// Blocks sent as zeros (holes at the destination).
    pub zero_blocks: u64,
    /// The destination verified it (its keyed digest matched before commit).
    pub verified: bool,
    /// The source's file was removed after the destination committed.
    pub source_removed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing to send yet.
    Idle,
    /// Copying and mirroring (before and during memory pre-copy).
    Copy,
    /// The VM is paused: the last dirty blocks.
    Flush,
    /// Over.
    Stopped,
}

struct InFlight {
    ch: u16,
    disk: u16,
    blocks: Vec<u64>,
    at: Instant,
}

struct Pump {
    mode: Mode,
    disks: Vec<Arc<Disk>>,
    senders: Vec<DiskSender>,
    inflight: HashMap<u64, InFlight>,
    per_chan: HashMap<u16, usize>,
    next_seq: u64,
    cursor: usize,
    stats: Vec<DiskStats>,
    /// When the first copy of every disk was done.
    copied_at: Option<Instant>,
}

/// The source's disks while they move.
pub struct DiskPump {
    st: Mutex<Pump>,
    cv: Condvar,
    key: DigestKey,
}

impl std::fmt::Debug for DiskPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskPump(..)")
    }
}

impl DiskPump {
    /// The disks of a VM; nothing moves before [`DiskPump::start`]. `key`: the session's.
    pub fn new(disks: Vec<Arc<Disk>>, key: DigestKey) -> Self {
        let stats = disks
            .iter()
            .map(|d| DiskStats {
                name: d.name().to_string(),
                size_bytes: d.size_bytes(),
                allocated_bytes: d.allocated_bytes().unwrap_or(0),
                ..Default::default()
            })
            .collect();
        Self {
            st: Mutex::new(Pump {
                mode: Mode::Idle,
                disks,
                senders: Vec::new(),
                inflight: HashMap::new(),
                per_chan: HashMap::new(),
                next_seq: 1,
                cursor: 0,
                stats,
                copied_at: None,
            }),
            cv: Condvar::new(),
            key,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pump> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the session announces.
    pub fn descs(&self) -> Vec<DiskDesc> {
        self.lock().disks.iter().map(|d| DiskDesc { name: d.name().to_string(), size_bytes: d.size_bytes() }).collect()
    }

    /// Start every disk's dirty log and copy (the allocated extents first).
    pub fn start(&self) -> Result<(), String> {
        let mut st = self.lock();
        let mut senders = Vec::new();
        for d in st.disks.clone() {
            senders.push(DiskSender::start_keyed(d, &self.key).map_err(|e| e.to_string())?);
        }
        st.senders = senders;
        st.mode = Mode::Copy;
        self.cv.notify_all();
        Ok(())
    }

    /// The VM is paused: send what is left.
    pub fn flush(&self) {
        let mut st = self.lock();
        if st.mode == Mode::Copy {
            st.mode = Mode::Flush;
        }
        self.cv.notify_all();
    }

    /// Stop: the dirty logs stop and the disks are released (their files untouched).
    pub fn stop(&self) {
        let mut st = self.lock();
        st.mode = Mode::Stopped;
        st.senders.clear();
        self.cv.notify_all();
    }

    /// Every disk copied once and at most [`SYNC_BLOCKS`] dirty (`Some(true)`), or copied once
    /// and still over it [`SYNC_WAIT`] later (`Some(false)`): memory may start. `None`: not yet.
    pub fn in_sync(&self, now: Instant) -> Option<bool> {
        let mut st = self.lock();
        if st.mode != Mode::Copy || st.senders.iter().any(|s| s.backlog_blocks() > 0) {
            return None;
        }
        if st.senders.iter().map(DiskSender::remaining_blocks).sum::<u64>() <= SYNC_BLOCKS {
            return Some(true);
        }
        let since = *st.copied_at.get_or_insert(now);
        (now.saturating_duration_since(since) >= SYNC_WAIT).then_some(false)
    }

    /// Dirty blocks pending over all disks.
    pub fn dirty_blocks(&self) -> u64 {
        self.lock().senders.iter().map(DiskSender::remaining_blocks).sum()
    }

    /// In the pause, every block sent and acknowledged: each disk's digest.
    pub fn flushed(&self) -> Option<Vec<u64>> {
        let st = self.lock();
        let done = st.mode == Mode::Flush
            && st.inflight.is_empty()
            && st.senders.iter().all(|s| s.remaining_blocks() == 0 && s.in_flight_blocks() == 0);
        done.then(|| st.senders.iter().map(DiskSender::digest).collect())
    }

    /// The oldest unacknowledged message's age.
    pub fn oldest_unacked(&self, now: Instant) -> Option<Duration> {
        self.lock().inflight.values().map(|f| now.saturating_duration_since(f.at)).max()
    }

    /// `DiskAck` for `seq` came on channel `ch`.
    pub fn acked(&self, ch: u16, seq: u64) -> Result<(), String> {
        let mut st = self.lock();
        let Some(f) = st.inflight.remove(&seq) else { return Err(format!("DiskAck {seq} for nothing in flight")) };
        if f.ch != ch {
            return Err(format!("DiskAck {seq} on channel {ch}, sent on {}", f.ch));
        }
        if let Some(n) = st.per_chan.get_mut(&ch) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = st.senders.get_mut(f.disk as usize) {
            s.acked(&f.blocks);
        }
        self.cv.notify_all();
        Ok(())
    }

    /// The destination stopped channel `ch`'s receiver: its unacknowledged blocks are dirty
    /// again (sent on the others).
    pub fn channel_lost(&self, ch: u16) {
        let mut st = self.lock();
        let lost: Vec<u64> = st.inflight.iter().filter(|(_, f)| f.ch == ch).map(|(k, _)| *k).collect();
        for seq in lost {
            if let Some(f) = st.inflight.remove(&seq) {
                if let Some(s) = st.senders.get_mut(f.disk as usize) {
                    s.lost(&f.blocks);
                }
            }
        }
        st.per_chan.remove(&ch);
        self.cv.notify_all();
    }

    /// Per disk numbers.
    pub fn stats(&self) -> Vec<DiskStats> {
        self.lock().stats.clone()
    }

    /// The disks (for removal after the commit).
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        self.lock().disks.clone()
    }

    /// Mark the stats after the move.
    pub fn mark(&self, verified: bool, removed: &[bool]) {
        let mut st = self.lock();
        for (i, s) in st.stats.iter_mut().enumerate() {
            s.verified = verified;
            s.source_removed = removed.get(i).copied().unwrap_or(false);
        }
    }

    /// The next message for channel `ch`, waiting while there is nothing (or its window is
    /// full); `Ok(None)` once stopped or `dead()`.
    pub fn next_for(&self, ch: u16, dead: &dyn Fn() -> bool) -> Result<Option<Vec<u8>>, String> {
        let mut st = self.lock();
        loop {
            if st.mode == Mode::Stopped || dead() {
                return Ok(None);
            }
            let room = st.per_chan.get(&ch).copied().unwrap_or(0) < DISK_WINDOW;
            if matches!(st.mode, Mode::Copy | Mode::Flush) && room {
                if let Some(m) = Self::take(&mut st, ch)? {
                    return Ok(Some(m));
                }
            }
            // Guest writes do not wake the pump: look again soon (at once on acks and modes).
            let wait = if st.mode == Mode::Flush { Duration::from_millis(2) } else { Duration::from_millis(10) };
            st = self.cv.wait_timeout(st, wait).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn take(st: &mut Pump, ch: u16) -> Result<Option<Vec<u8>>, String> {
        let n = st.senders.len();
        for k in 0..n {
            let d = (st.cursor + k) % n;
            let out = st.senders[d].next(MAX_DISK_BLOCKS as u64).map_err(|e| e.to_string())?;
            if out.is_empty() {
                continue;
            }
            st.cursor = (d + 1) % n;
            let seq = st.next_seq;
            st.next_seq += 1;
            let blocks: Vec<u64> = out.iter().map(|o| o.block).collect();
            let stats = &mut st.stats[d];
            for o in &out {
                if o.data.is_some() {
                    stats.data_blocks += 1;
                } else {
                    stats.zero_blocks += 1;
                }
            }
            let msg = Msg::DiskBlocks {
                seq,
                disk: d as u16,
                blocks: out.into_iter().map(|o| DiskBlock { block: o.block, data: o.data }).collect(),
            };
            st.inflight.insert(seq, InFlight { ch, disk: d as u16, blocks, at: Instant::now() });
            *st.per_chan.entry(ch).or_insert(0) += 1;
            return Ok(Some(msg.encode()));
        }
        Ok(None)
    }
}

/// The destination's disks while they arrive (behind the session: created at `Disks`, written
/// by every receiver until `Complete`, committed at `Commit`, removed otherwise).
#[derive(Debug, Default)]
pub struct DiskSide {
    rx: Mutex<Option<DiskReceiver>>,
    /// Digests taken: no block may be written any more.
    sealed: std::sync::atomic::AtomicBool,
}

impl DiskSide {
    fn lock(&self) -> MutexGuard<'_, Option<DiskReceiver>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create the partial copies in `dir`.
    pub fn prepare(&self, dir: Option<&std::path::Path>, disks: &[DiskDesc], key: &DigestKey) -> Result<(), String> {
        let Some(dir) = dir else { return Err("this destination has no disk directory".into()) };
        let list: Vec<(String, u64)> = disks.iter().map(|d| (d.name.clone(), d.size_bytes)).collect();
        let r = DiskReceiver::prepare_keyed(dir, &list, key).map_err(|e| e.to_string())?;
        *self.lock() = Some(r);
        Ok(())
    }

    /// Write the blocks of one message (`Err`: the peer's fault, `Ok(Err)`: ours, e.g. a
    /// full file system).
    pub fn write(&self, disk: u16, blocks: &[DiskBlock]) -> Result<Result<(), String>, String> {
        let mut g = self.lock();
        if self.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("disk blocks after the disks were verified".into());
        }
        let Some(r) = g.as_mut() else { return Err("disk blocks before the disks were announced".into()) };
        for b in blocks {
            let res = match &b.data {
                Some(d) => r.write_block(disk, b.block, d),
                None => r.zero_block(disk, b.block),
            };
            match res {
                Ok(()) => {}
                Err(ferry_disk::remote::RemoteError::Bad(why)) => return Err(why),
                Err(e) => return Ok(Err(e.to_string())),
            }
        }
        Ok(Ok(()))
    }

    /// Make every block durable and return each disk's digest.
    pub fn sync_and_digests(&self) -> Result<Vec<u64>, String> {
        let mut g = self.lock();
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(r) = g.as_mut() else { return Err("no disks".into()) };
        r.sync().map_err(|e| e.to_string())?;
        Ok(r.digests())
    }

    /// Give every copy its name (all or none).
    pub fn commit(&self) -> Result<Vec<PathBuf>, String> {
        let Some(r) = self.lock().take() else { return Err("no disks".into()) };
        r.commit().map_err(|e| e.to_string())
    }

    /// Remove the partial copies (any failure before commit).
    pub fn discard(&self) {
        drop(self.lock().take());
    }
}
