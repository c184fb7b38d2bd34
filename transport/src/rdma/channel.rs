//! The two halves of an RDMA channel. See the module docs of [`crate::rdma`] for the protocol.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::BasicCompletionQueue;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use super::verbs::{self, lock, Device, Qp, Wc, Wr};
use super::{RemoteRegion, TAG_CLOSE, TAG_CLOSED, TAG_OPEN, TAG_SEALED, TAG_USER};
use crate::channel::{check_send_request, ChannelRx, ChannelTx, Incoming, ReceivedBatch, SentBatch};
use crate::error::{RdmaError, Result, TransportError, WireError};
use crate::stream::StreamTx;
use crate::wire::{
    Ack, BatchFixed, BatchHeader, Encoding, FrameHeader, FrameKind, PageRun, BATCH_DEST_ZEROED, BATCH_FIXED_LEN,
    HEADER_LEN, MAX_CONTROL_LEN, PAGE_SIZE,
};
use ferry_memory::volatile::page_is_zero;
use ferry_memory::{AnonMemory, MemorySink, MemorySource, Region};

/// Size of one batch announcement buffer (frame header + largest batch header is 12,456 bytes).
pub(crate) const MSG_BUF: usize = 16 << 10;
/// Default for the most work requests posted in one `ibv_post_send` (the last one signaled).
pub(crate) const CHUNK: usize = 64;

/// State shared by the two halves and the control reader thread.
pub(crate) struct Shared {
    pub table: Mutex<TableState>,
    pub cond: Condvar,
    pub killed: AtomicBool,
}

#[derive(Default)]
pub(crate) struct TableState {
    /// The destination's windows of the round open on this channel (`None`: no round open).
    pub remote: Option<Vec<RemoteRegion>>,
    /// The last table received (kept after its round closed: fault injection writes with it).
    pub last: Option<Vec<RemoteRegion>>,
    /// The first table received (fault injection, as `last`).
    pub first: Option<Vec<RemoteRegion>>,
    /// Rounds the destination confirmed closed (`Control[TAG_CLOSED]`).
    pub closes: u64,
    /// The destination sealed its guest memory (`Control[TAG_SEALED]`, sent at `Complete`): it
    /// takes no page on this channel any more, so no batch is sent.
    pub sealed: bool,
    /// Announcements we may still send (receives the peer has posted for us).
    pub credits: u64,
    /// Receives the peer posted in all (credits never exceed it).
    pub credit_cap: u32,
    pub dead: Option<String>,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(TableState::default()),
            cond: Condvar::new(),
            killed: AtomicBool::new(false),
        })
    }

    pub fn set_dead(&self, why: String) {
        let mut t = lock(&self.table);
        if t.dead.is_none() {
            t.dead = Some(why);
        }
        self.cond.notify_all();
    }
}

/// Resources both halves hold; the last one to go shuts the control socket down (which ends
/// the reader thread) before the queue pair, CQs and memory regions are destroyed.
pub(crate) struct Conn {
    pub sock: TcpStream,
    pub qp: Arc<Mutex<Qp>>,
    pub dev: Device,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        lock(&self.qp).set_error();
    }
}

/// Waits with a short spin, then yields, then sleeps growing to 1 ms (receivers: 2 ms): the
/// backoff restarts at every event, so a busy channel polls tightly, while an idle one (or one
/// under soft-RoCE, where a batch takes many milliseconds) leaves the CPU to the kernel, which
/// moves the data there (rxe runs in softirq context on the same cores).
struct Backoff(u32, bool);

impl Backoff {
    fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        if self.1 {
            std::hint::spin_loop();
            if self.0.is_multiple_of(64) {
                std::thread::yield_now();
            }
        } else if self.0 < 16 {
            std::hint::spin_loop();
        } else if self.0 < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(u64::from((self.0 - 60) * 10).min(1000)));
        }
    }

    fn timeout(&mut self) -> Duration {
        self.0 = self.0.saturating_add(1);
        if self.1 {
            return Duration::ZERO;
        }
        Duration::from_micros(u64::from(self.0.saturating_mul(20).clamp(10, 2000)))
    }
}

/// How a sending half may use its queue pair.
pub(crate) struct TxLimits {
    /// Batches flow from the connecting side only.
    pub may_send_batches: bool,
    /// Announcements outstanding at once.
    pub max_inflight: usize,
    /// Send queue depth.
    pub sq_depth: usize,
    /// No completion for this long fails the channel.
    pub stall_timeout: Duration,
    /// Poll without sleeping.
    pub busy_poll: bool,
    /// Most work requests per post.
    pub post_chunk: usize,
}

struct SrcMr {
    host: usize,
    len: usize,
    mr: Arc<MemoryRegion>,
}

/// Sending half.
pub struct RdmaTx {
    pub(crate) conn: Arc<Conn>,
    pub(crate) ctl: Arc<Mutex<StreamTx>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) send_cq: Arc<BasicCompletionQueue>,
    /// Batches flow from the connecting side to the accepting side only.
    pub(crate) may_send_batches: bool,
    pub(crate) max_inflight: usize,
    pub(crate) sq_depth: usize,
    pub(crate) stall_timeout: Duration,
    busy_poll: bool,
    post_chunk: usize,
    // Registered buffers for batch announcements, one per in-flight batch.
    // (Fields drop in order: the region is deregistered before its memory is unmapped.)
    pub(crate) msgbuf_mr: Arc<MemoryRegion>,
    pub(crate) msgbuf: AnonMemory,
    src_mrs: Vec<SrcMr>,
    /// The round whose memory windows this channel holds, with their table.
    open: Option<(u32, Vec<RemoteRegion>)>,
    /// `Control[TAG_CLOSE]` sent and its confirmation not yet seen: the destination's count of
    /// closed rounds before it.
    closing: Option<u64>,
    /// Signaled work requests not yet completed: (wr_id, work requests it covers, ends a batch).
    pending: VecDeque<(u64, usize, bool)>,
    sq_used: usize,
    inflight_batches: usize,
    next_wr: u64,
    batches: u64,
    wrs: Vec<Wr>,
    wcs: Vec<Wc>,
}

impl RdmaTx {
    pub(crate) fn new(
        conn: Arc<Conn>,
        ctl: Arc<Mutex<StreamTx>>,
        shared: Arc<Shared>,
        send_cq: Arc<BasicCompletionQueue>,
        limits: TxLimits,
    ) -> Result<Self> {
        let TxLimits { may_send_batches, max_inflight, sq_depth, stall_timeout, busy_poll, post_chunk } = limits;
        let msgbuf = AnonMemory::new(max_inflight * MSG_BUF, true)
            .map_err(|_| RdmaError::Memory("cannot map announcement buffers"))?;
        // SAFETY: msgbuf is a private mapping that this value owns; the region is declared before
        // it, so it is deregistered before the memory is unmapped. Local access only (no rkey is
        // handed out); the device reads a slot only while its SEND is outstanding.
        let msgbuf_mr =
            unsafe { verbs::register(&conn.dev.pd, msgbuf.slice().as_ptr().as_ptr() as usize, msgbuf.len(), false) }?;
        Ok(Self {
            conn,
            ctl,
            shared,
            send_cq,
            may_send_batches,
            max_inflight,
            sq_depth,
            stall_timeout,
            busy_poll,
            post_chunk: post_chunk.clamp(1, 1024),
            msgbuf,
            msgbuf_mr,
            src_mrs: Vec::new(),
            open: None,
            closing: None,
            pending: VecDeque::new(),
            sq_used: 0,
            inflight_batches: 0,
            next_wr: 1,
            batches: 0,
            wrs: Vec::new(),
            wcs: Vec::new(),
        })
    }

    fn check_alive(&self) -> Result<()> {
        if self.shared.killed.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        Ok(())
    }

    /// Refuse to write once the destination said it sealed its memory.
    fn check_not_sealed(&self) -> Result<()> {
        if lock(&self.shared.table).sealed {
            return Err(RdmaError::Sealed.into());
        }
        Ok(())
    }

    /// Reap completions; with `block`, wait until at least one signaled request completed.
    /// Outstanding work that makes no progress for `stall_timeout` (or for a second after the
    /// control stream died) fails the channel: a peer whose queue pair broke without telling
    /// (soft-RoCE keeps quiet) must not hang the sender.
    fn reap(&mut self, block: bool) -> Result<()> {
        let mut b = Backoff(0, self.busy_poll);
        let since = std::time::Instant::now();
        loop {
            self.wcs.clear();
            verbs::poll(&self.send_cq, &mut self.wcs)?;
            let got = !self.wcs.is_empty();
            for i in 0..self.wcs.len() {
                let id = self.wcs[i].wr_id;
                // Signaled completions arrive in posting order on a reliable-connected QP.
                while let Some(&(wr, covers, ends_batch)) = self.pending.front() {
                    self.pending.pop_front();
                    self.sq_used -= covers;
                    if ends_batch {
                        self.inflight_batches -= 1;
                    }
                    if wr == id {
                        break;
                    }
                }
            }
            if got || !block {
                return Ok(());
            }
            if self.pending.is_empty() {
                return Ok(());
            }
            self.check_alive()?;
            let waited = since.elapsed();
            let dead = lock(&self.shared.table).dead.is_some();
            if waited > self.stall_timeout || (dead && waited > Duration::from_secs(1)) {
                lock(&self.conn.qp).set_error();
                return Err(RdmaError::Stalled { secs: waited.as_secs_f32(), control_alive: !dead }.into());
            }
            b.wait();
        }
    }

    /// Wait until everything posted has completed (the peer holds all our batches).
    fn drain(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Post `self.wrs` in chunks, each chunk's last request signaled, waiting for room.
    fn post_all(&mut self, last_ends_batch: bool) -> Result<()> {
        let wrs = std::mem::take(&mut self.wrs);
        let mut res = Ok(());
        let n = wrs.len();
        let mut start = 0;
        while start < n {
            let end = (start + self.post_chunk).min(n);
            let k = end - start;
            while self.sq_used + k > self.sq_depth {
                if let Err(e) = self.reap(true) {
                    res = Err(e);
                    break;
                }
            }
            if res.is_err() {
                break;
            }
            let mut chunk: Vec<Wr> = wrs[start..end].to_vec();
            let id = self.next_wr;
            self.next_wr += 1;
            if let Some(last) = chunk.last_mut() {
                last.signaled = true;
                last.wr_id = id;
            }
            let ends_batch = last_ends_batch && end == n;
            // SAFETY: every local range lies in a region registered with its lkey (guest memory
            // resolved through the MemorySource, whose pointers stay valid while it lives and
            // whose pages the device pinned, or our announcement buffer).
            if let Err(e) = unsafe { lock(&self.conn.qp).post_send(&chunk) } {
                res = Err(e.into());
                break;
            }
            self.pending.push_back((id, k, ends_batch));
            self.sq_used += k;
            if ends_batch {
                self.inflight_batches += 1;
            }
            start = end;
        }
        self.wrs = wrs;
        self.wrs.clear();
        res
    }

    /// Wait for the reader thread to satisfy `ready` (the destination answers on the control
    /// stream), at most `stall_timeout`.
    fn wait_table(&self, what: &'static str, ready: impl Fn(&TableState) -> bool) -> Result<()> {
        let since = Instant::now();
        let mut t = lock(&self.shared.table);
        loop {
            if ready(&t) {
                return Ok(());
            }
            if let Some(d) = &t.dead {
                return Err(TransportError::Rdma(RdmaError::BadPeer(if d.is_empty() {
                    "control channel closed while waiting for the destination's memory windows"
                } else {
                    "control channel failed while waiting for the destination's memory windows"
                })));
            }
            self.check_alive()?;
            if since.elapsed() > self.stall_timeout {
                return Err(RdmaError::BadPeer(what).into());
            }
            t = self
                .shared
                .cond
                .wait_timeout(t, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// The destination's memory windows for `round`: those held if that round is open here, else
    /// the open round (if any) is closed and the destination asked to bind windows for `round`
    /// (`Control[TAG_OPEN]`), waiting for their table.
    fn windows_for(&mut self, round: u32) -> Result<Vec<RemoteRegion>> {
        if let Some((r, t)) = &self.open {
            if *r == round {
                return Ok(t.clone());
            }
        }
        self.end_round_inner()?;
        self.check_not_sealed()?;
        let mut m = vec![TAG_OPEN];
        m.extend_from_slice(&round.to_le_bytes());
        lock(&self.ctl).send_control(&m)?;
        self.wait_table("no memory windows from the destination in time", |t| t.remote.is_some() || t.sealed)?;
        self.check_not_sealed()?;
        let t = lock(&self.shared.table).remote.clone().unwrap_or_default();
        self.open = Some((round, t.clone()));
        Ok(t)
    }

    /// Start closing the open round: wait until every batch posted completed (the destination
    /// holds them) and ask the destination to invalidate the round's windows
    /// (`Control[TAG_CLOSE]`), without waiting for its answer.
    fn begin_close(&mut self) -> Result<()> {
        if self.open.is_none() || self.closing.is_some() {
            return Ok(());
        }
        self.drain()?;
        let before = lock(&self.shared.table).closes;
        lock(&self.ctl).send_control(&[TAG_CLOSE])?;
        self.closing = Some(before);
        self.open = None;
        Ok(())
    }

    /// Close the open round ([`RdmaTx::begin_close`]) and wait for the destination's
    /// confirmation that its windows are deallocated (`Control[TAG_CLOSED]`).
    fn end_round_inner(&mut self) -> Result<()> {
        self.begin_close()?;
        let Some(before) = self.closing else { return Ok(()) };
        self.wait_table("the destination did not confirm closing its memory windows in time", |t| t.closes > before)?;
        self.closing = None;
        Ok(())
    }

    fn source_mr(&mut self, r: &Region) -> Result<u32> {
        let host = r.host.as_ptr() as usize;
        if let Some(m) = self.src_mrs.iter().find(|m| m.host == host && m.len == r.len) {
            return Ok(m.mr.lkey());
        }
        // SAFETY: the region comes from the MemorySource, whose contract keeps it mapped and
        // readable while the source lives; the device only reads it (no remote access), and it
        // pins the pages, so a later unmap cannot redirect the device into other memory.
        let mr = unsafe { verbs::register(&self.conn.dev.pd, host, r.len, false) }?;
        let lkey = mr.lkey();
        self.src_mrs.push(SrcMr { host, len: r.len, mr });
        Ok(lkey)
    }

    /// Take one credit, waiting for the destination to return some.
    fn take_credit(&self) -> Result<()> {
        let mut t = lock(&self.shared.table);
        loop {
            if t.credits > 0 {
                t.credits -= 1;
                return Ok(());
            }
            if t.dead.is_some() {
                return Err(TransportError::Closed);
            }
            self.check_alive()?;
            t = self
                .shared
                .cond
                .wait_timeout(t, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Post a batch announcement (SEND of `msg`, at most [`MSG_BUF`] bytes), after `self.wrs`.
    fn post_announcement(&mut self, msg: &[u8]) -> Result<()> {
        if msg.len() > MSG_BUF {
            return Err(TransportError::InvalidBatch("batch header larger than the announcement buffer"));
        }
        self.take_credit()?;
        // Wait for a free announcement slot (slot n % K was last used by batch n - K).
        while self.inflight_batches >= self.max_inflight {
            self.reap(true)?;
        }
        let slot = (self.batches % self.max_inflight as u64) as usize;
        self.batches += 1;
        // SAFETY: slot < max_inflight, so the slot lies inside msgbuf; no posted work request
        // reads this slot (its previous batch completed above).
        let p = unsafe { self.msgbuf.slice().as_ptr().as_ptr().add(slot * MSG_BUF) };
        // SAFETY: msg.len() <= MSG_BUF bytes fit the slot; msg is ordinary memory.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), p, msg.len()) };
        self.wrs.push(Wr {
            wr_id: 0,
            signaled: false,
            lkey: self.msgbuf_mr.lkey(),
            addr: p as u64,
            len: msg.len() as u32,
            remote: None,
        });
        self.post_all(true)
    }

    /// Send raw bytes as a batch announcement (tests: a peer that breaks the protocol).
    pub(crate) fn send_raw_announcement(&mut self, msg: &[u8]) -> Result<()> {
        self.wrs.clear();
        self.post_announcement(msg)
    }

    fn send_batch_inner(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        let total = check_send_request(runs, flags)?;
        if !self.may_send_batches {
            return Err(TransportError::InvalidBatch("rdma channels carry batches from the connecting side only"));
        }
        self.check_alive()?;
        self.check_not_sealed()?;
        let remote = self.windows_for(round)?;
        let regions = src.regions();
        if regions.is_empty() {
            return Err(RdmaError::Memory("the memory source lists no regions to register").into());
        }
        let mut map = vec![0u8; (total as usize).div_ceil(8)];
        self.wrs.clear();
        let mut i = 0usize;
        let mut data_bytes = 0u64;
        for r in runs {
            if r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(TransportError::InvalidBatch("unaligned run"));
            }
            let bad = TransportError::BadAddress { gpa: r.gpa, len: r.len() };
            let end = r.gpa.checked_add(r.len() as u64).ok_or(TransportError::InvalidBatch("run wraps around"))?;
            let base = src
                .source_slice(r.gpa, r.len())
                .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                .as_ptr();
            let lreg = regions
                .iter()
                .find(|g| g.gpa <= r.gpa && end <= g.gpa + g.len as u64)
                .copied()
                .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?;
            let lkey = self.source_mr(&lreg)?;
            let rreg = remote.iter().find(|g| g.gpa <= r.gpa && end <= g.gpa + g.len).copied().ok_or(bad)?;
            let mut open: Option<(u64, u64, u32)> = None; // (local addr, remote addr, len)
            for p in 0..r.pages as usize {
                // SAFETY: p < r.pages, so the page lies inside the run the source vouched for.
                let page = unsafe { base.add(p * PAGE_SIZE) };
                // SAFETY: page aligned (gpa aligned, regions page aligned), 4096 bytes valid.
                if unsafe { page_is_zero(page) } {
                    if let Some((l, ra, n)) = open.take() {
                        self.wrs.push(Wr {
                            wr_id: 0,
                            signaled: false,
                            lkey,
                            addr: l,
                            len: n,
                            remote: Some((rreg.rkey, ra)),
                        });
                    }
                } else {
                    map[i / 8] |= 1 << (i % 8);
                    data_bytes += PAGE_SIZE as u64;
                    let gpa = r.gpa + (p * PAGE_SIZE) as u64;
                    match &mut open {
                        Some((_, _, n)) => *n += PAGE_SIZE as u32,
                        None => open = Some((page.as_ptr() as u64, rreg.addr + (gpa - rreg.gpa), PAGE_SIZE as u32)),
                    }
                }
                i += 1;
            }
            if let Some((l, ra, n)) = open.take() {
                self.wrs.push(Wr { wr_id: 0, signaled: false, lkey, addr: l, len: n, remote: Some((rreg.rkey, ra)) });
            }
        }
        let data_pages: u32 = map.iter().map(|b| b.count_ones()).sum();
        let header = BatchHeader {
            id,
            round,
            encoding: Encoding::Raw,
            flags,
            runs: runs.to_vec(),
            data_map: map,
            data_len: data_bytes as u32,
        };
        let mut msg = Vec::with_capacity(HEADER_LEN + header.encoded_len());
        msg.extend_from_slice(
            &FrameHeader::new(FrameKind::PageBatch, header.encoded_len() + data_bytes as usize).encode(),
        );
        header.encode_into(&mut msg);
        let res = self.post_announcement(&msg);
        if let Err(e) = res {
            self.wrs.clear();
            return Err(e);
        }
        // Reap what is done without waiting, so the queue does not fill with stale entries.
        self.reap(false)?;
        Ok(SentBatch {
            pages: total,
            data_pages,
            zero_pages: total - data_pages,
            wire_bytes: msg.len() as u64 + data_bytes,
            compressed: false,
        })
    }
}

impl ChannelTx for RdmaTx {
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.send_batch_inner(id, round, flags, runs, src)
    }

    fn send_control(&mut self, msg: &[u8]) -> Result<()> {
        if msg.len() >= MAX_CONTROL_LEN as usize {
            return Err(TransportError::InvalidBatch("control message longer than 1 MiB - 1 (rdma tags it)"));
        }
        // Control messages stay ordered after the batches sent before them: wait until the peer
        // holds them all (a send completion on RC means the receiver has the announcement).
        self.drain()?;
        let mut m = Vec::with_capacity(msg.len() + 1);
        m.push(TAG_USER);
        m.extend_from_slice(msg);
        lock(&self.ctl).send_control(&m)
    }

    fn send_ack(&mut self, ack: Ack) -> Result<()> {
        lock(&self.ctl).send_ack(ack)
    }

    fn send_abort(&mut self, code: u16, reason: &str) -> Result<()> {
        lock(&self.ctl).send_abort(code, reason)
    }

    fn begin_end_round(&mut self) -> Result<()> {
        self.begin_close()
    }

    fn end_round(&mut self) -> Result<()> {
        self.end_round_inner()
    }

    fn close(&mut self) -> Result<()> {
        self.drain()?;
        self.end_round_inner()?;
        lock(&self.ctl).close()
    }
}

/// The sink registered on the first receive: (host, len) per region (its regions are in
/// [`SinkRegions`]).
struct RegisteredSink {
    key: Vec<(usize, usize)>,
}

/// Time and count of window binds and invalidations in this process (soft-RoCE suite reports).
static WINDOW_OPENS: AtomicU64 = AtomicU64::new(0);
static WINDOW_OPEN_NS: AtomicU64 = AtomicU64::new(0);
static WINDOW_CLOSES: AtomicU64 = AtomicU64::new(0);
static WINDOW_CLOSE_NS: AtomicU64 = AtomicU64::new(0);
/// Window sets bound now (rounds open on some channel of a destination in this process).
static WINDOWS_BOUND: AtomicU64 = AtomicU64::new(0);
/// Memory seals (guest memory closed for good on a channel, its queue pair moved to the error
/// state), and those whose queue pair refused the error state.
static SEALS: AtomicU64 = AtomicU64::new(0);
static SEAL_QP_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Window rounds opened and closed by destinations in this process, and their total time.
pub(crate) fn window_counters() -> super::WindowStats {
    super::WindowStats {
        opens: WINDOW_OPENS.load(Ordering::Relaxed),
        open_time: Duration::from_nanos(WINDOW_OPEN_NS.load(Ordering::Relaxed)),
        closes: WINDOW_CLOSES.load(Ordering::Relaxed),
        close_time: Duration::from_nanos(WINDOW_CLOSE_NS.load(Ordering::Relaxed)),
        bound_now: WINDOWS_BOUND.load(Ordering::SeqCst),
        seals: SEALS.load(Ordering::SeqCst),
        seal_qp_failures: SEAL_QP_FAILURES.load(Ordering::SeqCst),
    }
}

/// The destination's guest memory on this channel: its regions, registered for local writes and
/// window binds only (their own rkeys grant no remote access), and the type-2 memory windows of
/// the open round, the only way the peer can write them.
#[derive(Default)]
pub(crate) struct SinkRegions {
    sealed: bool,
    /// The round the source asked windows for before the sink was registered.
    want_open: Option<u32>,
    /// The open round's windows, one per region. (Declared before `mrs`: windows are
    /// deallocated, and so invalidated, before their regions are deregistered.)
    mws: Vec<verbs::Mw>,
    mrs: Vec<Arc<MemoryRegion>>,
    /// (gpa, host address, length) per registered region.
    base: Vec<(u64, usize, usize)>,
}

impl Drop for SinkRegions {
    fn drop(&mut self) {
        // The windows go with the channel (fields drop in order after this).
        if !self.mws.is_empty() {
            WINDOWS_BOUND.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The destination's window control, shared by the receiving half (registration on the first
/// receive), the control reader (`TAG_OPEN` / `TAG_CLOSE` from the source) and the memory sealer.
pub(crate) struct Windows {
    pub state: Mutex<SinkRegions>,
    /// Set once the memory is sealed (`state.sealed`), readable without the lock: the receiving
    /// half then takes the flushed receives of the queue pair in the error state as the end.
    pub sealed: AtomicBool,
    /// This is the destination's side of the channel (the source has no windows to seal).
    pub destination: bool,
    pub qp: Arc<Mutex<Qp>>,
    pub pd: Arc<ProtectionDomain>,
    /// The send CQ: on the destination only window binds complete there.
    pub send_cq: Arc<BasicCompletionQueue>,
    pub ctl: Arc<Mutex<StreamTx>>,
    pub timeout: Duration,
    /// Most binds posted at once (at most the send queue's depth).
    pub bind_chunk: usize,
}

impl Windows {
    /// Bind fresh windows over every region for `round` and send their table.
    fn open_locked(&self, st: &mut SinkRegions, round: u32) -> Result<()> {
        let t0 = Instant::now();
        self.close_locked(st);
        let mut mws = Vec::with_capacity(st.base.len());
        for _ in &st.base {
            mws.push(verbs::Mw::alloc(&self.pd)?);
        }
        {
            let mut binds: Vec<(&mut verbs::Mw, &MemoryRegion, u64, u64)> = mws
                .iter_mut()
                .zip(&st.mrs)
                .zip(&st.base)
                .map(|((w, mr), &(_, host, len))| (w, &**mr, host as u64, len as u64))
                .collect();
            // In chunks, so a guest with many regions never overfills the send queue.
            for chunk in binds.chunks_mut(self.bind_chunk.max(1)) {
                // SAFETY: each range is exactly its registered region; the rkeys go only to the
                // authenticated peer of this channel, over its sealed control stream, and die
                // when the windows are dropped (round closed, memory sealed, channel gone). Guest
                // memory is written raw under ferry_memory's access contract, never read through
                // references.
                unsafe { Qp::bind_windows(&self.qp, &self.send_cq, chunk, self.timeout) }?;
            }
        }
        let table: Vec<RemoteRegion> = st
            .base
            .iter()
            .zip(&mws)
            .map(|(&(gpa, host, len), w)| RemoteRegion { gpa, addr: host as u64, len: len as u64, rkey: w.rkey() })
            .collect();
        st.mws = mws;
        if !st.mws.is_empty() {
            WINDOWS_BOUND.fetch_add(1, Ordering::SeqCst);
        }
        WINDOW_OPENS.fetch_add(1, Ordering::Relaxed);
        WINDOW_OPEN_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let _ = round;
        lock(&self.ctl).send_control(&super::encode_table(&table))
    }

    /// `Control[TAG_OPEN]`: the source starts writing `round`.
    pub fn request_open(&self, round: u32) -> Result<()> {
        let mut st = lock(&self.state);
        if st.sealed {
            return Err(RdmaError::BadPeer("memory windows asked for after the guest memory was sealed").into());
        }
        if st.base.is_empty() {
            st.want_open = Some(round);
            return Ok(());
        }
        self.close_locked(&mut st);
        self.open_locked(&mut st, round)
    }

    /// Deallocate the open round's windows: the device refuses their rkeys from here on.
    fn close_locked(&self, st: &mut SinkRegions) {
        if st.mws.is_empty() {
            return;
        }
        let t0 = Instant::now();
        st.mws.clear();
        WINDOWS_BOUND.fetch_sub(1, Ordering::SeqCst);
        WINDOW_CLOSES.fetch_add(1, Ordering::Relaxed);
        WINDOW_CLOSE_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// `Control[TAG_CLOSE]`: the source's writes of the round all completed; invalidate, confirm.
    pub fn close(&self) -> Result<()> {
        let mut st = lock(&self.state);
        st.want_open = None;
        self.close_locked(&mut st);
        drop(st);
        lock(&self.ctl).send_control(&[TAG_CLOSED])
    }

    /// The memory sealer (the destination calls it at `Complete`, before its final check, and
    /// when the channel ends): the queue pair goes to the error state (its responder drops every
    /// packet from now on), the windows are deallocated, the regions deregistered, no window is
    /// bound again, and the source is told (`Control[TAG_SEALED]`, so its next batch fails with
    /// [`RdmaError::Sealed`] instead of writing into a queue pair that drops it). Idempotent.
    pub fn seal(&self) {
        if !self.destination {
            return;
        }
        let mut st = lock(&self.state);
        if st.sealed {
            return;
        }
        st.sealed = true;
        self.sealed.store(true, Ordering::SeqCst);
        st.want_open = None;
        // First the queue pair: from its return no packet of the peer is taken, so nothing can
        // land while the windows and regions go.
        if lock(&self.qp).enter_error_state().is_err() {
            SEAL_QP_FAILURES.fetch_add(1, Ordering::SeqCst);
        }
        self.close_locked(&mut st);
        st.mrs.clear();
        SEALS.fetch_add(1, Ordering::SeqCst);
        drop(st);
        // The control stream may be gone already (a channel that ended): nothing to tell then.
        let _ = lock(&self.ctl).send_control(&[TAG_SEALED]);
    }
}

/// Receiving half.
pub struct RdmaRx {
    pub(crate) conn: Arc<Conn>,
    pub(crate) ctl: Arc<Mutex<StreamTx>>,
    pub(crate) events: Receiver<Result<Incoming>>,
    pub(crate) recv_cq: Arc<BasicCompletionQueue>,
    pub(crate) may_receive_batches: bool,
    pub(crate) rq_depth: usize,
    pub(crate) busy_poll: bool,
    // (Fields drop in order: the region is deregistered before its memory is unmapped.)
    pub(crate) recvbuf_mr: Arc<MemoryRegion>,
    pub(crate) recvbuf: AnonMemory,
    /// The registered sink: (host, len) per region.
    sink: Option<RegisteredSink>,
    /// Its regions and memory windows.
    windows: Arc<Windows>,
    pending: Option<Result<Incoming>>,
    ready: VecDeque<Result<Incoming>>,
    /// Receives reposted whose credit has not been returned yet.
    unreturned: u32,
    ended: bool,
    msg: Vec<u8>,
    wcs: Vec<Wc>,
}

impl RdmaRx {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        conn: Arc<Conn>,
        ctl: Arc<Mutex<StreamTx>>,
        windows: Arc<Windows>,
        events: Receiver<Result<Incoming>>,
        recv_cq: Arc<BasicCompletionQueue>,
        may_receive_batches: bool,
        rq_depth: usize,
        busy_poll: bool,
    ) -> Result<Self> {
        let recvbuf =
            AnonMemory::new(rq_depth * MSG_BUF, true).map_err(|_| RdmaError::Memory("cannot map receive buffers"))?;
        // SAFETY: recvbuf is a private mapping owned by this value; the device writes it only
        // through receives we post, and we read a buffer only after its receive completed.
        let recvbuf_mr =
            unsafe { verbs::register(&conn.dev.pd, recvbuf.slice().as_ptr().as_ptr() as usize, recvbuf.len(), false) }?;
        let rx = Self {
            conn,
            ctl,
            events,
            recv_cq,
            may_receive_batches,
            rq_depth,
            busy_poll,
            recvbuf,
            recvbuf_mr,
            sink: None,
            windows,
            pending: None,
            ready: VecDeque::new(),
            unreturned: 0,
            ended: false,
            msg: Vec::with_capacity(MSG_BUF),
            wcs: Vec::new(),
        };
        for slot in 0..rq_depth {
            rx.post_slot(slot as u64)?;
        }
        Ok(rx)
    }

    fn slot_ptr(&self, slot: u64) -> Option<NonNull<u8>> {
        if slot as usize >= self.rq_depth {
            return None;
        }
        // SAFETY: slot < rq_depth, so the slot lies inside recvbuf.
        Some(unsafe { self.recvbuf.slice().as_ptr().add(slot as usize * MSG_BUF) })
    }

    fn post_slot(&self, slot: u64) -> Result<()> {
        let p = self.slot_ptr(slot).ok_or(RdmaError::BadPeer("completion for an unknown receive"))?;
        // SAFETY: the slot lies in recvbuf, registered with recvbuf_mr; recvbuf lives as long as
        // self, and we read the slot only after its receive completed.
        unsafe { lock(&self.conn.qp).post_recv(slot, self.recvbuf_mr.lkey(), p.as_ptr() as u64, MSG_BUF as u32) }?;
        Ok(())
    }

    /// Register the sink's regions and publish the region table (first receive with a sink that
    /// lists regions), or check that the sink is the one registered. A sink that lists no
    /// regions (a control-only receive, before the guest memory exists) registers nothing; a
    /// batch arriving then fails its address check.
    fn ensure_sink(&mut self, sink: &dyn MemorySink) -> Result<()> {
        if !self.may_receive_batches {
            return Ok(());
        }
        let regions = sink.regions();
        if regions.is_empty() {
            return Ok(());
        }
        let key: Vec<(usize, usize)> = regions.iter().map(|r| (r.host.as_ptr() as usize, r.len)).collect();
        if let Some(reg) = &self.sink {
            if reg.key != key {
                return Err(RdmaError::Memory("a different sink than the one registered on the first receive").into());
            }
            return Ok(());
        }
        let windows = Arc::clone(&self.windows);
        let mut st = lock(&windows.state);
        if st.sealed {
            // Sealed before any batch came: nothing is registered, and a batch announcement
            // finds no registered sink and is refused.
            return Ok(());
        }
        if regions.len() > super::MAX_REGIONS {
            return Err(RdmaError::Memory("more guest memory regions than the region table holds").into());
        }
        let mut mrs = Vec::with_capacity(regions.len());
        let mut base = Vec::with_capacity(regions.len());
        for r in regions {
            let host = r.host.as_ptr() as usize;
            // SAFETY: the region comes from the MemorySink, whose contract keeps it mapped and
            // writable while the sink is borrowed (the device writes it raw, under ferry_memory's
            // access contract). Registered without remote access: the peer writes only through
            // the windows bound over it per round, and those are deallocated before the region
            // (field order of SinkRegions). The device pins the pages: a later unmap cannot
            // redirect remote writes into other memory of this process.
            let mr = unsafe { verbs::register_for_windows(&self.conn.dev.pd, host, r.len) }?;
            base.push((r.gpa, host, r.len));
            mrs.push(mr);
        }
        st.mrs = mrs;
        st.base = base;
        self.sink = Some(RegisteredSink { key });
        if let Some(round) = st.want_open.take() {
            windows.open_locked(&mut st, round)?;
        }
        Ok(())
    }

    /// Check one batch announcement and finish the batch (zero pages if the destination is
    /// not known to be zeroed).
    fn finish_batch(&self, msg: &[u8], sink: &dyn MemorySink) -> Result<ReceivedBatch> {
        if !self.may_receive_batches || self.sink.is_none() {
            return Err(WireError::Unexpected(FrameKind::PageBatch).into());
        }
        let hb: &[u8; HEADER_LEN] =
            msg.get(..HEADER_LEN).and_then(|s| s.try_into().ok()).ok_or(TransportError::Truncated)?;
        let fh = FrameHeader::decode(hb)?;
        if fh.kind != FrameKind::PageBatch {
            return Err(WireError::Unexpected(fh.kind).into());
        }
        let rest = &msg[HEADER_LEN..];
        if rest.len() < BATCH_FIXED_LEN {
            return Err(TransportError::Truncated);
        }
        let f = BatchFixed::decode(rest)?;
        if f.frame_len() != fh.len as usize {
            return Err(WireError::BadBatch("frame length does not match the batch").into());
        }
        let want = BATCH_FIXED_LEN + f.var_len();
        if rest.len() < want {
            return Err(TransportError::Truncated);
        }
        if rest.len() > want {
            return Err(WireError::BadBatch("announcement longer than its batch header").into());
        }
        let h = BatchHeader::decode_var(&f, &rest[BATCH_FIXED_LEN..])?;
        if h.encoding != Encoding::Raw {
            return Err(TransportError::NotNegotiated("zstd"));
        }
        if h.data_len as usize != h.data_pages() as usize * PAGE_SIZE {
            return Err(WireError::BadBatch("data length does not match the bitmap").into());
        }
        // The data pages landed one-sided before this announcement; the receiver's word still
        // comes before the zero pages are written and before the batch counts as received.
        sink.admit_batch(h.round).map_err(TransportError::BatchRefused)?;
        let mut bases = Vec::with_capacity(h.runs.len());
        for r in &h.runs {
            bases.push(
                sink.sink_slice(r.gpa, r.len())
                    .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                    .as_ptr(),
            );
        }
        if h.flags & BATCH_DEST_ZEROED == 0 {
            let mut i = 0;
            for (r, base) in h.runs.iter().zip(&bases) {
                for p in 0..r.pages as usize {
                    if !h.is_data(i) {
                        // SAFETY: p < pages: inside the run the sink vouched for; a raw write under
                        // ferry_memory's access contract (the peer writes only data pages of this batch).
                        unsafe { base.as_ptr().add(p * PAGE_SIZE).write_bytes(0, PAGE_SIZE) };
                    }
                    i += 1;
                }
            }
        }
        Ok(ReceivedBatch {
            id: h.id,
            round: h.round,
            pages: h.total_pages(),
            data_pages: h.data_pages(),
            wire_bytes: (msg.len() + h.data_len as usize) as u64,
            runs: h.runs,
        })
    }

    /// Move completed receives into `ready`, in order.
    fn poll_batch(&mut self, sink: &dyn MemorySink) {
        self.wcs.clear();
        let polled = verbs::poll(&self.recv_cq, &mut self.wcs);
        let wcs = std::mem::take(&mut self.wcs);
        for wc in &wcs {
            let r = self.take_message(wc).and_then(|()| {
                let msg = std::mem::take(&mut self.msg);
                let res = self.finish_batch(&msg, sink);
                self.msg = msg;
                res
            });
            self.ready.push_back(r.map(Incoming::Batch));
        }
        self.wcs = wcs;
        match polled {
            // Sealed: the queue pair is in the error state on purpose and flushes the receives
            // still posted; they carry nothing (any announcement after the seal is refused).
            Err(RdmaError::WorkCompletion { status: verbs::WC_WR_FLUSH_ERR, .. })
                if self.windows.sealed.load(Ordering::SeqCst) => {}
            Err(e) => self.ready.push_back(Err(e.into())),
            Ok(()) => {}
        }
    }

    fn take_message(&mut self, wc: &Wc) -> Result<()> {
        let p = self.slot_ptr(wc.wr_id).ok_or(RdmaError::BadPeer("completion for an unknown receive"))?;
        let n = (wc.byte_len as usize).min(MSG_BUF);
        self.msg.clear();
        self.msg.resize(n, 0);
        // SAFETY: the receive into this slot completed, the device no longer writes it; n is at
        // most the slot size.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), self.msg.as_mut_ptr(), n) };
        if self.windows.sealed.load(Ordering::SeqCst) {
            // No receive is posted again on a sealed channel (its queue pair is in the error state).
            return Ok(());
        }
        self.post_slot(wc.wr_id)?;
        self.unreturned += 1;
        if self.unreturned as usize >= (self.rq_depth / 4).max(1) {
            let mut m = [super::TAG_CREDIT, 0, 0, 0, 0];
            m[1..].copy_from_slice(&self.unreturned.to_le_bytes());
            lock(&self.ctl).send_control(&m)?;
            self.unreturned = 0;
        }
        Ok(())
    }
}

impl ChannelRx for RdmaRx {
    fn memory_sealer(&self) -> Option<crate::channel::Killer> {
        let windows = Arc::clone(&self.windows);
        // The queue pair goes to the error state (its responder takes no packet any more), the
        // windows are deallocated (their rkeys dead), the regions deregistered; no window is
        // bound again (`Windows::seal`).
        Some(Arc::new(move || windows.seal()))
    }

    fn recv(&mut self, sink: &dyn MemorySink) -> Result<Incoming> {
        if self.ended {
            return Err(TransportError::Closed);
        }
        self.ensure_sink(sink)?;
        let mut b = Backoff(0, self.busy_poll);
        loop {
            self.poll_batch(sink);
            if let Some(r) = self.ready.pop_front() {
                return r;
            }
            if let Some(ev) = self.pending.take() {
                if matches!(ev, Ok(Incoming::Closed) | Err(_)) {
                    self.ended = true;
                }
                return ev;
            }
            let ev = match self.events.recv_timeout(b.timeout()) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    self.ended = true;
                    return Err(TransportError::Closed);
                }
            };
            // A control frame may overtake an announcement whose completion is just being
            // written: look at the CQ once more and deliver the batch first.
            self.poll_batch(sink);
            if let Some(r) = self.ready.pop_front() {
                self.pending = Some(ev);
                return r;
            }
            if matches!(ev, Ok(Incoming::Closed) | Err(_)) {
                self.ended = true;
            }
            return ev;
        }
    }
}
