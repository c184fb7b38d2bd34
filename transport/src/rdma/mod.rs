//! The `rdma` backend: pages move by one-sided RDMA WRITE from the source's registered guest
//! memory straight into the destination's registered guest memory; no copy on either side.
//!
//! Built with the cargo feature `rdma` (off by default: the default build needs no RDMA
//! libraries). Tested on soft-RoCE (`rdma_rxe`) inside a qemu VM: `scripts/softroce/run.sh`.
//!
//! # Channel
//!
//! One channel = one authenticated TCP control stream (the ordinary [`crate::tcp`] handshake,
//! with [`Caps::RDMA`] required) + one reliable-connected (RC) queue pair.
//!
//! ```text
//!  source (connects)                               destination (accepts)
//!     |  TCP: Ferry handshake (PSK, session binding, caps incl. RDMA)  |
//!     |<-------------------------------------------------------------->|
//!     |  Control[TAG_QP]: qpn, psn, gid, mtu   (both ways)             |
//!     |<-------------------------------------------------------------->|
//!     |      both QPs: INIT -> RTR -> RTS                              |
//!     |                                        guest memory registered | (first recv(): local
//!     |                                        for MW binds only       |  write + MW_BIND)
//!     |  round R's first batch: Control[TAG_OPEN](R)                   |
//!     |--------------------------------------------------------------->|  bind a type-2 window
//!     |  Control[TAG_REGIONS]: (gpa, addr, len, window rkey) per region|  per region (new rkey)
//!     |<---------------------------------------------------------------|
//!     |  QP: RDMA WRITE data spans ... SEND(batch announcement)        |
//!     |--------------------------------------------------------------->|  recv() -> Batch
//!     |  TCP: BatchAck / Control[TAG_USER] / Goodbye / Abort           |
//!     |<-------------------------------------------------------------->|
//!     |  round barrier (end_round): drain, Control[TAG_CLOSE]          |
//!     |--------------------------------------------------------------->|  windows deallocated
//!     |  Control[TAG_CLOSED]                                           |  (rkeys dead)
//!     |<---------------------------------------------------------------|
//!     |  (end_round returns; only now the source takes the dirty pages |
//!     |   or saves the state: the next round opens fresh windows)      |
//!     |  ... Complete (channel 0, TCP)                                 |
//!     |--------------------------------------------------------------->|  memory sealer, every
//!     |                                                                |  channel: QP -> ERR,
//!     |  Control[TAG_SEALED]                                           |  windows deallocated,
//!     |<---------------------------------------------------------------|  regions deregistered;
//!     |                                                                |  then the final check
//! ```
//!
//! - **Memory windows, one round at a time (issue 13).** The destination registers the regions
//!   of the [`MemorySink`] it is given on its first `recv` (all of them, once:
//!   `MemorySink::regions`) for local writes and memory-window binds only: a region's own rkey
//!   grants the peer nothing. The peer writes guest memory only through type-2 memory windows,
//!   one per region, bound on this channel's queue pair (a window bound to one QP refuses every
//!   other QP), with a new rkey each time. They exist only while a round is open on the channel:
//!   the source's first `send_batch` of round R sends `Control[TAG_OPEN](R)` and waits for the
//!   table (gpa, address, length, window rkey per region; sent over the authenticated control
//!   stream); at the round barrier the layer above calls [`crate::channel::ChannelTx::end_round`]
//!   (the migration source does, on every channel, once every batch of the round is
//!   acknowledged and before it takes the dirty pages or saves the state): the source waits for
//!   its posted work to complete, sends `Control[TAG_CLOSE]`, the destination deallocates the
//!   windows (the device refuses their rkeys from then on) and answers `Control[TAG_CLOSED]`,
//!   which `end_round` waits for. The migration source takes the dirty pages or saves the state
//!   only once `end_round` returned on every live channel (it asks all of them first,
//!   [`crate::channel::ChannelTx::begin_end_round`], then waits on each: one round trip per
//!   barrier), so when the source's round ends no window of it exists on the destination. Between
//!   the round's last acknowledgement and that confirmation the source does nothing. So between
//!   rounds, and after the final round, no window exists: a write with an earlier round's rkey
//!   fails with a remote access error, lands nowhere, and breaks the channel (both queue pairs
//!   go to the error state), which aborts the migration like any lost channel.
//! - **Sealed at `Complete` (issue 13).** The receiving half's memory sealer
//!   ([`crate::channel::ChannelRx::memory_sealer`]; the destination calls it on every channel
//!   when `Complete` arrives, before its final check) moves the channel's queue pair to the
//!   error state (`ibv_modify_qp` to `IBV_QPS_ERR`: its responder drops every packet, whatever
//!   rkey it names), deallocates any window still bound, deregisters the regions, refuses every
//!   later `TAG_OPEN` and tells the source (`Control[TAG_SEALED]`): the source's next
//!   `send_batch` fails with [`RdmaError::Sealed`], and a one-sided write issued anyway fails at
//!   the source when its retries run out (or stalls until `completion_timeout`). The receiving
//!   half takes the receives the error state flushes as the end, not as an error. A
//!   destination's channel that ends (Goodbye, error, killer) is sealed the same way, so no
//!   window outlives its control stream. [`window_stats`] counts windows bound now and seals;
//!   [`RdmaChannel::qp_state`] asks the device for a queue pair's state. A later `recv` with a
//!   different sink is refused. Windows are allocated fresh at each open (deallocating is the
//!   invalidation: a system call that is final when it returns, where `IBV_WR_LOCAL_INV` would
//!   need a completion); the bind is an `IBV_WR_BIND_MW` on the destination's send queue, which
//!   carries nothing else. Binding touches no page table, unlike registering (measured on
//!   soft-RoCE: README, Known limitations). Devices without type-2 windows cannot take rdma
//!   channels. Registering up front at accept time would need the guest memory before the
//!   channel exists; the first receive is the moment the layer above hands it over.
//! - **Source memory** is registered lazily, region by region, on first use, and cached by the
//!   region's host address and length for the life of the channel (read access only).
//! - **A batch** is: zero detection on the source (volatile reads), one RDMA WRITE per run of
//!   contiguous data pages (local address in the source's region, remote address from the
//!   table), then a SEND of the batch announcement (frame header + [`crate::wire::BatchHeader`], the same
//!   encoding as on a stream, without the data). RC ordering guarantees the writes have landed
//!   when the announcement's receive completes; `recv` validates it (magic, CRC, caps on every
//!   length, runs inside the sink) and returns [`Incoming::Batch`]. Zero pages are never
//!   written: with `BATCH_DEST_ZEROED` nothing happens, otherwise the destination zeroes them
//!   itself (the announcement's bitmap says which) instead of moving 4 KiB of zeros.
//! - **Bounds and backpressure.** At most `max_inflight_batches` announcements outstanding (each
//!   has its own registered 16 KiB buffer), at most `sq_depth` work requests in the send queue
//!   (posted in chunks of 64, the last one of each signaled), `rq_depth` receives posted. The
//!   sender holds one credit per receive the destination posted (told in the queue pair
//!   exchange) and spends one per announcement; the destination reposts a receive when its
//!   `recv` consumes an announcement and returns credits in `Control[TAG_CREDIT]` every
//!   `rq_depth / 4`. A destination that stops reading stops returning credits and `send_batch`
//!   blocks: receiver-not-ready NAKs never happen in normal operation, so the QP retries them
//!   only a few times and a peer that sends them anyway fails the channel instead of hanging it.
//! - **Round barrier cost.** `end_round` is a control round trip plus the deallocation (on all
//!   channels at once in a migration); the next round's first batch waits for a round trip plus
//!   the binds (`rdma::window_stats` counts their time; `conformance_rdma` `windows_per_round`
//!   prints them with the whole `end_round`; `rdma_bw --round-batches N` measures the
//!   throughput with a round every N batches).
//! - **Endpoints.** [`RdmaAcceptor`] and [`RdmaOptions`] are this backend's
//!   [`crate::endpoint::Acceptor`] and [`crate::endpoint::Connector`]: a migration server
//!   listening on rdma beside tcp routes their channels like any other. The acceptor refuses, in
//!   the handshake, a client that does not offer [`Caps::RDMA`]; a tcp listener never offers it,
//!   so an rdma client there fails before any queue pair exists.
//! - **Control** messages of the layer above, acks, goodbye and abort go on the TCP stream.
//!   Control messages carry a one-byte tag (so the limit is `MAX_CONTROL_LEN - 1`), and
//!   `send_control` first waits for every batch posted before it to complete, so the peer sees
//!   control messages after the batches sent before them, as on a stream. Batches flow from the
//!   connecting side to the accepting side; acks and control flow both ways.
//! - **Protection.** The TCP control stream is sealed like any stream channel (the handshake's
//!   keys and mode; [`crate::crypto`]): region tables, credits, acks and control messages are
//!   authenticated (and encrypted with `aead`). The pages themselves cannot be: a one-sided RDMA
//!   WRITE lands in guest memory with no receive-side step to open a tag, and the announcement
//!   SEND goes on the queue pair in clear. They are checked instead by the image digest that
//!   decides commit (sessions with an rdma channel re-read all memory for it), so a page an
//!   attacker wrote changes the digest and the destination refuses to commit. RDMA pages are not
//!   encrypted; use `tcp` with `aead` where the link is not trusted.
//! - **Failures.** A work completion with an error status (remote access error, retry exceeded,
//!   flush after the QP entered the error state), a verbs call that fails, or a broken control
//!   stream becomes a [`TransportError`] (`Rdma(..)`, `Closed`, ...), never a panic. The
//!   channel's killer shuts the control stream and moves the QP to the error state.
//!   [`RdmaChannel::qp_fault`] moves only the QP to the error state (fault injection).
//! - **Stalls.** Soft-RoCE does not always fail the work requests aimed at a peer whose queue
//!   pair went to the error state (the requester can wait forever), so outstanding work that
//!   completes nothing for `completion_timeout` (or for a second once the control stream died)
//!   fails the channel with [`RdmaError::Stalled`].
//! - **Waiting.** Completions are polled with a short spin, then yields, then sleeps growing to
//!   1-2 ms, restarting at every event (soft-RoCE does its work in the kernel on the same CPUs;
//!   a hard busy poll would slow it). Event-driven waits (completion channels) are a later
//!   improvement.
//!
//! # Crate choice
//!
//! - `ibverbs` (published release): no one-sided RDMA WRITE in its safe API, and it builds
//!   rdma-core from source. Not usable for this design.
//! - `rdma-sys`: raw bindgen bindings; needs `libibverbs-dev`/`librdmacm-dev` and libclang at
//!   build time and links libibverbs directly, so every binary of the crate needs rdma-core
//!   installed to even start; and all of the verbs plumbing would be ours to write unsafely.
//! - `sideway` (chosen): maintained wrappers over the full verbs API, including RDMA WRITE /
//!   WRITE_WITH_IMM / READ on basic and extended QPs and rdma_cm; libibverbs is loaded with
//!   `dlopen` at run time (through `rdma-mummy-sys`), so our binaries start on machines without
//!   rdma-core and report "no device" instead of failing to load. It needs cmake, a C compiler
//!   and libclang to build (installed by `scripts/softroce/deps.sh`), hence the feature gate.
//!   Its `reg_mr` is `unsafe` with raw addresses, which is exactly what registering guest memory
//!   needs. Costs: a young API (0.4) and some panicking conversions on unknown enum values,
//!   which this module avoids (it reads statuses as integers).
//!
//! # Hardware tests
//!
//! Tests need `FERRY_RDMA_DEVICE` (e.g. `rxe0`; optional `FERRY_RDMA_GID` index); without it
//! they print `SKIP: <reason>` and return. With it set, a missing device is a failure.

mod channel;
mod verbs;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use channel::{RdmaRx, RdmaTx};
pub use verbs::QpState;

use crate::channel::{Channel, ChannelInfo, ChannelRx, ChannelTx, Incoming, Killer};
use crate::crypto::ChannelKeys;
use crate::endpoint::{Acceptor, Admit, Connector, Path, PendingChannel};
use crate::error::{RdmaError, Result, TransportError, WireError};
use crate::handshake::{Caps, ClientConfig, Established, ServerConfig};
use crate::stream::{StreamRx, StreamTx};
use crate::tcp::{self, TcpAcceptor, TcpOptions};
use crate::wire::{BatchFixed, FrameHeader, FrameKind, BATCH_FIXED_LEN, HEADER_LEN};
use ferry_memory::{MemorySink, VolatileSlice};

/// Control tag: a control message of the layer above.
pub(crate) const TAG_USER: u8 = 0;
/// Control tag: the destination's region table.
pub(crate) const TAG_REGIONS: u8 = 1;
/// Control tag: queue pair info.
pub(crate) const TAG_QP: u8 = 2;
/// Control tag: receive credits returned by the destination (u32 count).
pub(crate) const TAG_CREDIT: u8 = 3;
/// Control tag: the source asks for memory windows for a round (u32 round).
pub(crate) const TAG_OPEN: u8 = 4;
/// Control tag: the source's writes of the open round completed; invalidate its windows.
pub(crate) const TAG_CLOSE: u8 = 5;
/// Control tag: the destination invalidated the round's windows.
pub(crate) const TAG_CLOSED: u8 = 6;
/// Control tag: the destination sealed its guest memory (queue pair in the error state).
pub(crate) const TAG_SEALED: u8 = 7;
/// Most regions in a region table.
pub(crate) const MAX_REGIONS: usize = 4096;
const REGION_LEN: usize = 8 + 8 + 8 + 4;

/// One destination region as the source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteRegion {
    pub gpa: u64,
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

pub(crate) fn encode_table(t: &[RemoteRegion]) -> Vec<u8> {
    let mut m = Vec::with_capacity(5 + t.len() * REGION_LEN);
    m.push(TAG_REGIONS);
    m.extend_from_slice(&(t.len() as u32).to_le_bytes());
    for r in t {
        m.extend_from_slice(&r.gpa.to_le_bytes());
        m.extend_from_slice(&r.addr.to_le_bytes());
        m.extend_from_slice(&r.len.to_le_bytes());
        m.extend_from_slice(&r.rkey.to_le_bytes());
    }
    m
}

/// Decode a region table (without its tag). Capped, aligned, non-empty, disjoint.
pub(crate) fn decode_table(b: &[u8]) -> Result<Vec<RemoteRegion>, RdmaError> {
    let n = b
        .get(..4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize)
        .ok_or(RdmaError::BadPeer("truncated region table"))?;
    if n == 0 || n > MAX_REGIONS {
        return Err(RdmaError::BadPeer("region count out of range"));
    }
    if b.len() != 4 + n * REGION_LEN {
        return Err(RdmaError::BadPeer("region table length does not match its count"));
    }
    let u64at = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(x)
    };
    let page = crate::wire::PAGE_SIZE as u64;
    let mut t = Vec::with_capacity(n);
    for i in 0..n {
        let o = 4 + i * REGION_LEN;
        let r = RemoteRegion {
            gpa: u64at(o),
            addr: u64at(o + 8),
            len: u64at(o + 16),
            rkey: u32::from_le_bytes([b[o + 24], b[o + 25], b[o + 26], b[o + 27]]),
        };
        if r.len == 0 || !r.len.is_multiple_of(page) || !r.gpa.is_multiple_of(page) {
            return Err(RdmaError::BadPeer("region not page aligned"));
        }
        if r.gpa.checked_add(r.len).is_none() || r.addr.checked_add(r.len).is_none() {
            return Err(RdmaError::BadPeer("region wraps around"));
        }
        t.push(r);
    }
    t.sort_by_key(|r| r.gpa);
    for w in t.windows(2) {
        if w[0].gpa + w[0].len > w[1].gpa {
            return Err(RdmaError::BadPeer("regions overlap"));
        }
    }
    Ok(t)
}

/// Options of an RDMA channel.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Verbs device name (`rxe0`, `mlx5_0`, ...).
    pub device: String,
    /// Device port.
    pub port: u8,
    /// GID index; `None` picks the first IPv4-mapped GID (RoCE v2), else the first non-zero one.
    pub gid_index: Option<u8>,
    /// Options of the TCP control stream.
    pub tcp: TcpOptions,
    /// Batches whose announcement may be outstanding at once.
    pub max_inflight_batches: usize,
    /// Send queue depth (capped by the device).
    pub sq_depth: u32,
    /// Receives posted for announcements.
    pub rq_depth: u32,
    /// Time allowed for the queue pair exchange after the handshake.
    pub setup_timeout: Duration,
    /// Outstanding RDMA work that completes nothing for this long fails the channel.
    pub completion_timeout: Duration,
    /// Poll completions without ever sleeping (lowest latency; costs a core per waiting half).
    pub busy_poll: bool,
    /// Most work requests handed to the device in one post (the last of each is signaled).
    pub post_chunk: usize,
}

impl RdmaOptions {
    /// Defaults for `device`.
    pub fn new(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            port: 1,
            gid_index: None,
            tcp: TcpOptions::default(),
            max_inflight_batches: 8,
            sq_depth: 1024,
            rq_depth: 32,
            setup_timeout: Duration::from_secs(5),
            completion_timeout: Duration::from_secs(10),
            busy_poll: false,
            post_chunk: channel::CHUNK,
        }
    }

    /// Options from the environment: `FERRY_RDMA_DEVICE` (required), `FERRY_RDMA_GID` (index),
    /// `FERRY_RDMA_INFLIGHT`, `FERRY_RDMA_POST_CHUNK`, `FERRY_RDMA_BUSY_POLL=1`.
    pub fn from_env() -> Option<Self> {
        let dev = std::env::var("FERRY_RDMA_DEVICE").ok().filter(|s| !s.is_empty())?;
        let mut o = Self::new(dev);
        o.gid_index = std::env::var("FERRY_RDMA_GID").ok().and_then(|s| s.parse().ok());
        if let Some(n) = std::env::var("FERRY_RDMA_INFLIGHT").ok().and_then(|s| s.parse().ok()) {
            o.max_inflight_batches = n;
        }
        if let Some(n) = std::env::var("FERRY_RDMA_POST_CHUNK").ok().and_then(|s| s.parse().ok()) {
            o.post_chunk = n;
        }
        o.busy_poll = std::env::var("FERRY_RDMA_BUSY_POLL").is_ok_and(|v| v == "1");
        Some(o)
    }
}

/// Why RDMA tests cannot run here (`None`: they can). Tests print `SKIP: <reason>` for `Some`.
/// When `FERRY_RDMA_DEVICE` is set the device must work: the tests then fail instead of skipping.
pub fn skip_reason() -> Option<String> {
    if RdmaOptions::from_env().is_none() {
        return Some(
            "FERRY_RDMA_DEVICE is not set (no RDMA device on this host; scripts/softroce/run.sh runs these tests on soft-RoCE)"
                .into(),
        );
    }
    None
}

/// Check that the device of `opts` opens and has a usable port and GID.
pub fn probe(opts: &RdmaOptions) -> Result<String, RdmaError> {
    let d = verbs::open(&opts.device, opts.port, opts.gid_index)?;
    Ok(format!(
        "{} port {} gid[{}] {} mtu {} max_qp_wr {}",
        opts.device,
        d.port,
        d.gid_index,
        std::net::Ipv6Addr::from(d.gid),
        128u32 << d.mtu,
        d.max_qp_wr
    ))
}

/// What registering memory for remote writes costs on a device ([`registration_cost`]).
#[derive(Debug, Clone, Copy)]
pub struct RegistrationCost {
    /// Bytes registered each time.
    pub bytes: usize,
    /// The first registration of the (resident) memory.
    pub first_reg: Duration,
    /// Registrations after it, median of the repeats (what registering again at every round
    /// would cost).
    pub again_reg: Duration,
    /// Deregistrations, median.
    pub dereg: Duration,
}

/// Measure registering `bytes` of resident anonymous memory for remote writes on the device of
/// `opts`, and deregistering it, `repeats` times (the cost a per-round registration of guest
/// memory would pay; see README, Known limitations). Prints nothing; asserts nothing about time.
pub fn registration_cost(opts: &RdmaOptions, bytes: usize, repeats: usize) -> Result<RegistrationCost> {
    let dev = verbs::open(&opts.device, opts.port, opts.gid_index)?;
    let mem = ferry_memory::AnonMemory::new(bytes, true).map_err(|_| RdmaError::Memory("cannot map memory"))?;
    mem.prefault();
    let addr = mem.slice().as_ptr().as_ptr() as usize;
    let mut regs = Vec::new();
    let mut deregs = Vec::new();
    for _ in 0..repeats.max(2) {
        let t = Instant::now();
        // SAFETY: `mem` stays mapped until after the region is dropped below; nothing reads it
        // through references, and no queue pair exists that could learn the rkey.
        let mr = unsafe { verbs::register(&dev.pd, addr, bytes, true) }?;
        regs.push(t.elapsed());
        let t = Instant::now();
        drop(mr);
        deregs.push(t.elapsed());
    }
    let first_reg = regs[0];
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut again = regs[1..].to_vec();
    Ok(RegistrationCost { bytes, first_reg, again_reg: median(&mut again), dereg: median(&mut deregs) })
}

/// Memory-window rounds bound and invalidated by destinations in this process and the time they
/// took (the per-round price of issue 13's "memory writable only while a round is open").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Rounds whose windows were bound (one window per guest memory region each).
    pub opens: u64,
    /// Total time of those binds (allocate, post, wait for the completions).
    pub open_time: Duration,
    /// Rounds whose windows were invalidated (deallocated).
    pub closes: u64,
    /// Total time of those invalidations.
    pub close_time: Duration,
    /// Window sets bound right now (one per channel with a round open): 0 whenever no round is
    /// open on any channel of a destination in this process.
    pub bound_now: u64,
    /// Channels whose destination memory was sealed (queue pair moved to the error state,
    /// windows deallocated, regions deregistered): at `Complete` and when a channel ends.
    pub seals: u64,
    /// Seals whose queue pair refused the error state (its windows and regions went anyway).
    pub seal_qp_failures: u64,
}

/// The process-wide [`WindowStats`] so far.
pub fn window_stats() -> WindowStats {
    channel::window_counters()
}

/// An established RDMA channel with its fault injector.
pub struct RdmaChannel {
    /// The channel.
    pub channel: Channel,
    /// Moves this side's queue pair to the error state (the control stream stays up): every
    /// outstanding and later RDMA operation fails, as on a real QP error.
    pub qp_fault: Killer,
    /// A source that writes where it should not (tests).
    #[doc(hidden)]
    pub probe: WriteProbe,
    /// Asks the device for this side's queue pair state (tests: `Error` after a seal).
    pub qp_state: QpStateQuery,
}

/// Asks the device for the state of one channel's queue pair (`ibv_query_qp`); usable from any
/// thread while the channel's halves live (and after: the queue pair lives as long as this).
#[derive(Clone)]
pub struct QpStateQuery(Arc<dyn Fn() -> std::result::Result<QpState, RdmaError> + Send + Sync>);

impl QpStateQuery {
    /// The queue pair's state now.
    pub fn query(&self) -> std::result::Result<QpState, RdmaError> {
        (self.0)()
    }
}

/// Fault injection on the source side: one RDMA WRITE outside the protocol, with the rkey of the
/// last window table the destination sent (which may belong to a closed round).
#[doc(hidden)]
pub struct WriteProbe {
    conn: Arc<channel::Conn>,
    shared: Arc<channel::Shared>,
    send_cq: Arc<sideway::ibverbs::completion::BasicCompletionQueue>,
    // (Fields drop in order: the region is deregistered before its memory is unmapped.)
    mr: Arc<sideway::ibverbs::memory_region::MemoryRegion>,
    buf: ferry_memory::AnonMemory,
}

impl WriteProbe {
    fn new(
        conn: Arc<channel::Conn>,
        shared: Arc<channel::Shared>,
        send_cq: Arc<sideway::ibverbs::completion::BasicCompletionQueue>,
    ) -> Result<Self> {
        let buf = ferry_memory::AnonMemory::new(crate::wire::PAGE_SIZE, true)
            .map_err(|_| RdmaError::Memory("cannot map the probe page"))?;
        // SAFETY: buf is a private mapping owned by this value and dropped after the region;
        // local access only.
        let mr = unsafe { verbs::register(&conn.dev.pd, buf.slice().as_ptr().as_ptr() as usize, buf.len(), false) }?;
        Ok(Self { conn, shared, send_cq, mr, buf })
    }

    /// Write one page of `byte` at guest address `gpa` with the last table's rkey, outside any
    /// batch, and wait (up to 10 s) for the completion: `Ok` if the destination's device took the
    /// write, the work completion's error otherwise (a remote access error when the window is
    /// gone; the queue pair is in the error state afterwards). Call only while the channel's
    /// sending half is idle (this polls its completion queue).
    pub fn write_last(&self, gpa: u64, byte: u8) -> Result<()> {
        let table = verbs::lock(&self.shared.table).last.clone().ok_or(RdmaError::BadPeer("no window table yet"))?;
        self.write_with(&table, gpa, byte)
    }

    /// [`WriteProbe::write_last`] with the first table this channel received (its first round's
    /// windows).
    pub fn write_first(&self, gpa: u64, byte: u8) -> Result<()> {
        let table = verbs::lock(&self.shared.table).first.clone().ok_or(RdmaError::BadPeer("no window table yet"))?;
        self.write_with(&table, gpa, byte)
    }

    fn write_with(&self, table: &[RemoteRegion], gpa: u64, byte: u8) -> Result<()> {
        let r = table
            .iter()
            .find(|r| r.gpa <= gpa && gpa + crate::wire::PAGE_SIZE as u64 <= r.gpa + r.len)
            .copied()
            .ok_or(TransportError::BadAddress { gpa, len: crate::wire::PAGE_SIZE })?;
        let p = self.buf.slice().as_ptr().as_ptr();
        // SAFETY: one page inside our own mapping; no work request reads it now.
        unsafe { p.write_bytes(byte, crate::wire::PAGE_SIZE) };
        const PROBE: u64 = u64::MAX - 7;
        let wr = verbs::Wr {
            wr_id: PROBE,
            signaled: true,
            lkey: self.mr.lkey(),
            addr: p as u64,
            len: crate::wire::PAGE_SIZE as u32,
            remote: Some((r.rkey, r.addr + (gpa - r.gpa))),
        };
        // SAFETY: the local page lies in `mr` and lives as long as self; the remote range is
        // checked by the destination's device against the rkey.
        unsafe { verbs::lock(&self.conn.qp).post_send(&[wr]) }?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut wcs = Vec::new();
        loop {
            wcs.clear();
            verbs::poll(&self.send_cq, &mut wcs)?;
            if wcs.iter().any(|w| w.wr_id == PROBE) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RdmaError::Stalled { secs: 10.0, control_alive: true }.into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A memory sink with no memory (setup reads no batches).
struct NoMemory;

// SAFETY: returns no memory at all.
unsafe impl MemorySink for NoMemory {
    fn sink_slice(&self, _gpa: u64, _len: usize) -> Option<VolatileSlice<'_>> {
        None
    }
}

/// Read the peer's queue pair info, bounded by `timeout` (the socket is shut down by a watchdog
/// if the peer stays silent).
fn read_qp_info(rx: &mut StreamRx, sock: &TcpStream, timeout: Duration) -> Result<verbs::QpInfo> {
    let s = sock.try_clone()?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    });
    let r = rx.recv(&NoMemory);
    let _ = done_tx.send(());
    let _ = watchdog.join();
    match r {
        Ok(Incoming::Control(m)) if m.first() == Some(&TAG_QP) => Ok(verbs::QpInfo::decode(&m[1..])?),
        Ok(Incoming::Control(_)) => Err(RdmaError::BadPeer("expected queue pair info").into()),
        Ok(Incoming::Closed) => Err(TransportError::Closed),
        Ok(_) => Err(RdmaError::BadPeer("expected queue pair info").into()),
        Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::NotConnected => {
            Err(RdmaError::BadPeer("no queue pair info in time").into())
        }
        Err(e) => Err(e),
    }
}

/// The control reader: frames from the TCP stream to the receiving half; region tables to the
/// sending half.
fn reader(
    mut rx: StreamRx,
    shared: Arc<channel::Shared>,
    windows: Arc<channel::Windows>,
    source: bool,
    out: mpsc::Sender<Result<Incoming>>,
) {
    loop {
        let r = rx.recv(&NoMemory);
        let (item, stop) = match r {
            Ok(Incoming::Control(m)) => match m.first() {
                Some(&TAG_USER) => (Ok(Incoming::Control(m[1..].to_vec())), false),
                Some(&TAG_REGIONS) if source => match decode_table(&m[1..]) {
                    Ok(t) => {
                        let mut g = verbs::lock(&shared.table);
                        if g.remote.is_some() {
                            drop(g);
                            (Err(RdmaError::BadPeer("second window table while a round is open").into()), true)
                        } else {
                            g.last = Some(t.clone());
                            g.first.get_or_insert_with(|| t.clone());
                            g.remote = Some(t);
                            shared.cond.notify_all();
                            continue;
                        }
                    }
                    Err(e) => (Err(e.into()), true),
                },
                Some(&TAG_CLOSED) if source && m.len() == 1 => {
                    let mut g = verbs::lock(&shared.table);
                    g.remote = None;
                    g.closes += 1;
                    shared.cond.notify_all();
                    continue;
                }
                Some(&TAG_SEALED) if source && m.len() == 1 => {
                    let mut g = verbs::lock(&shared.table);
                    g.sealed = true;
                    shared.cond.notify_all();
                    continue;
                }
                Some(&TAG_OPEN) if !source && m.len() == 5 => {
                    match windows.request_open(u32::from_le_bytes([m[1], m[2], m[3], m[4]])) {
                        Ok(()) => continue,
                        Err(e) => (Err(e), true),
                    }
                }
                Some(&TAG_CLOSE) if !source && m.len() == 1 => match windows.close() {
                    Ok(()) => continue,
                    Err(e) => (Err(e), true),
                },
                Some(&TAG_CREDIT) if m.len() == 5 => {
                    let n = u32::from_le_bytes([m[1], m[2], m[3], m[4]]);
                    let mut g = verbs::lock(&shared.table);
                    g.credits = g.credits.saturating_add(u64::from(n));
                    if g.credits > u64::from(g.credit_cap) {
                        drop(g);
                        (Err(RdmaError::BadPeer("more credits than posted receives").into()), true)
                    } else {
                        shared.cond.notify_all();
                        continue;
                    }
                }
                _ => (Err(RdmaError::BadPeer("unknown control tag").into()), true),
            },
            Ok(Incoming::Batch(_)) => (Err(WireError::Unexpected(FrameKind::PageBatch).into()), true),
            Ok(Incoming::Closed) => (Ok(Incoming::Closed), true),
            Ok(a @ Incoming::Ack(_)) => (Ok(a), false),
            Err(e) => (Err(e), true),
        };
        if stop {
            // The destination's channel ends (Goodbye, error, killed): its memory is sealed
            // before the end is handed over, so no window of it outlives the control stream.
            windows.seal();
            shared.set_dead(match &item {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            });
        }
        if out.send(item).is_err() || stop {
            if !stop {
                shared.set_dead(String::new());
            }
            return;
        }
    }
}

/// The concrete pieces of a channel.
struct Parts {
    tx: RdmaTx,
    rx: RdmaRx,
    info: ChannelInfo,
    killer: Killer,
    qp_fault: Killer,
    probe: WriteProbe,
    qp_state: QpStateQuery,
}

impl Parts {
    fn into_channel(self) -> RdmaChannel {
        let tx: Box<dyn ChannelTx> = Box::new(self.tx);
        let rx: Box<dyn ChannelRx> = Box::new(self.rx);
        RdmaChannel {
            channel: Channel { tx, rx, info: self.info, killer: self.killer },
            qp_fault: self.qp_fault,
            probe: self.probe,
            qp_state: self.qp_state,
        }
    }
}

fn build(sock: TcpStream, est: Established, keys: ChannelKeys, opts: &RdmaOptions, source: bool) -> Result<Parts> {
    if !est.caps.contains(Caps::RDMA) {
        return Err(TransportError::NotNegotiated("rdma"));
    }
    let local = sock.local_addr().ok();
    let peer = sock.peer_addr().ok();
    let mut ctl_tx = StreamTx::new(sock.try_clone()?, None, keys.sealer())?;
    let mut ctl_rx = StreamRx::new(sock.try_clone()?, false, keys.opener())?;
    let dev = verbs::open(&opts.device, opts.port, opts.gid_index)?;
    let sq_depth = opts.sq_depth.clamp(2, dev.max_qp_wr);
    let rq_depth = opts.rq_depth.clamp(2, dev.max_qp_wr);
    let max_inflight = opts.max_inflight_batches.clamp(1, rq_depth as usize);
    let (mut qp, cqs) = verbs::create_qp(&dev, sq_depth, rq_depth)?;
    let mine = qp.info(&dev, rq_depth);
    let mut m = vec![TAG_QP];
    m.extend_from_slice(&mine.encode());
    ctl_tx.send_control(&m)?;
    let theirs = read_qp_info(&mut ctl_rx, &sock, opts.setup_timeout)?;
    qp.connect(&dev, &theirs)?;
    let qp = Arc::new(Mutex::new(qp));
    let conn = Arc::new(channel::Conn { sock: sock.try_clone()?, qp: Arc::clone(&qp), dev });
    let shared = channel::Shared::new();
    {
        let mut t = verbs::lock(&shared.table);
        t.credits = u64::from(theirs.recvs);
        t.credit_cap = theirs.recvs;
    }
    let ctl = Arc::new(Mutex::new(ctl_tx));
    let (ev_tx, ev_rx) = mpsc::channel();
    let windows = Arc::new(channel::Windows {
        state: Mutex::default(),
        sealed: std::sync::atomic::AtomicBool::new(false),
        destination: !source,
        qp: Arc::clone(&qp),
        pd: Arc::clone(&conn.dev.pd),
        send_cq: Arc::clone(&cqs.send),
        ctl: Arc::clone(&ctl),
        timeout: opts.completion_timeout,
        bind_chunk: (sq_depth as usize).min(32),
    });
    // Receives are posted (RdmaRx::new) before the peer can learn our region table.
    let rx = RdmaRx::new(
        Arc::clone(&conn),
        Arc::clone(&ctl),
        Arc::clone(&windows),
        ev_rx,
        cqs.recv,
        !source,
        rq_depth as usize,
        opts.busy_poll,
    )?;
    let limits = channel::TxLimits {
        may_send_batches: source,
        max_inflight,
        sq_depth: sq_depth as usize,
        stall_timeout: opts.completion_timeout,
        busy_poll: opts.busy_poll,
        post_chunk: opts.post_chunk,
    };
    let probe = WriteProbe::new(Arc::clone(&conn), Arc::clone(&shared), Arc::clone(&cqs.send))?;
    let tx = RdmaTx::new(Arc::clone(&conn), ctl, Arc::clone(&shared), cqs.send, limits)?;
    let kill_windows = Arc::clone(&windows);
    {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("ferry-rdma-ctl".into())
            .spawn(move || reader(ctl_rx, shared, windows, source, ev_tx))
            .map_err(TransportError::Io)?;
    }
    let kill_sock = sock.try_clone()?;
    let kill_qp = Arc::clone(&qp);
    let kill_shared = Arc::clone(&shared);
    let killer: Killer = Arc::new(move || {
        kill_shared.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = kill_sock.shutdown(std::net::Shutdown::Both);
        verbs::lock(&kill_qp).set_error();
        // A destination's windows and regions go with the channel (a no-op on the source).
        kill_windows.seal();
        kill_shared.set_dead("killed".into());
    });
    let state_qp = Arc::clone(&qp);
    let qp_state = QpStateQuery(Arc::new(move || verbs::lock(&state_qp).query_state()));
    let fault_qp = Arc::clone(&qp);
    let qp_fault: Killer = Arc::new(move || verbs::lock(&fault_qp).set_error());
    let info = ChannelInfo { established: est, backend: "rdma", local, peer, image_key: keys.image.clone() };
    Ok(Parts { tx, rx, info, killer, qp_fault, probe, qp_state })
}

/// Connect an RDMA channel: TCP control stream to `addr` (handshake with [`Caps::RDMA`]), then
/// the queue pair exchange. The connecting side sends batches.
pub fn connect(addr: SocketAddr, opts: &RdmaOptions, mut hs: ClientConfig) -> Result<RdmaChannel> {
    hs.caps = Caps(hs.caps.0 | Caps::RDMA.0);
    let (s, est, keys) = tcp::connect_stream(addr, &opts.tcp, hs)?;
    Ok(build(s, est, keys, opts, true)?.into_channel())
}

impl Connector for RdmaOptions {
    fn transport(&self) -> &'static str {
        "rdma"
    }

    /// The control stream leaves from `path`'s local address or interface; the queue pair is on
    /// the verbs device of these options.
    fn connect(&self, path: &Path, hs: ClientConfig) -> Result<Channel> {
        let tcp = TcpOptions {
            bind: path.local.or(self.tcp.bind),
            device: path.device.clone().or_else(|| self.tcp.device.clone()),
            ..self.tcp.clone()
        };
        let o = RdmaOptions { tcp, ..self.clone() };
        connect(path.remote, &o, hs).map(|c| c.channel)
    }
}

/// Accepts RDMA channels (the destination side).
pub struct RdmaAcceptor {
    tcp: TcpAcceptor,
    opts: RdmaOptions,
}

impl RdmaAcceptor {
    /// Listen on `addr` for control streams; `hs.caps` gets [`Caps::RDMA`] added, and a client
    /// that does not offer it is refused in the handshake (it would expect pages on the stream).
    pub fn bind(addr: SocketAddr, opts: RdmaOptions, mut hs: ServerConfig) -> Result<Self> {
        hs.caps = Caps(hs.caps.0 | Caps::RDMA.0);
        Ok(Self { tcp: TcpAcceptor::bind_offering(addr, opts.tcp.clone(), hs)?, opts })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accept one channel (see [`TcpAcceptor::accept`] for `admit`).
    pub fn accept(&self, admit: Admit<'_>) -> Result<RdmaChannel> {
        let (s, est, keys) = self.tcp.accept_stream(&|e| rdma_only(e).and_then(|()| admit(e)))?;
        Ok(build(s, est, keys, &self.opts, false)?.into_channel())
    }
}

/// Refuses a channel whose handshake did not negotiate [`Caps::RDMA`].
fn rdma_only(e: &Established) -> std::result::Result<(), String> {
    if e.caps.contains(Caps::RDMA) {
        Ok(())
    } else {
        Err("this listener serves rdma channels: the client did not offer rdma".into())
    }
}

impl Acceptor for RdmaAcceptor {
    fn transport(&self) -> &'static str {
        "rdma"
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        self.tcp.local_addr()
    }

    fn accept_within(&self, wait: Duration, admit: Admit<'_>) -> Result<Option<Channel>> {
        let Some(s) = self.tcp.accept_socket(Some(wait))? else { return Ok(None) };
        let (s, est, keys) = self.tcp.handshake_stream(s, &|e| rdma_only(e).and_then(|()| admit(e)))?;
        Ok(Some(build(s, est, keys, &self.opts, false)?.into_channel().channel))
    }

    fn accept_pending(&self, wait: Duration) -> Result<Option<Box<dyn PendingChannel>>> {
        Ok(self
            .tcp
            .accept_pending_tcp(wait)?
            .map(|tcp| Box::new(RdmaPending { tcp, opts: self.opts.clone() }) as Box<dyn PendingChannel>))
    }
}

/// An RDMA control stream accepted and not yet authenticated.
struct RdmaPending {
    tcp: tcp::TcpPending,
    opts: RdmaOptions,
}

impl PendingChannel for RdmaPending {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.tcp.peer_addr()
    }

    fn closer(&self) -> Result<Killer> {
        self.tcp.closer()
    }

    /// The handshake gives up at `deadline`; the queue pair exchange after it has its own
    /// `setup_timeout`.
    fn establish(self: Box<Self>, deadline: Instant, admit: Admit<'_>) -> Result<Channel> {
        let (s, est, keys) = self.tcp.establish_stream(deadline, &|e| rdma_only(e).and_then(|()| admit(e)))?;
        Ok(build(s, est, keys, &self.opts, false)?.into_channel().channel)
    }
}

/// A source that completed a genuine handshake and queue pair exchange and then sends what the
/// conformance suite tells it: a complete page batch frame is announced on the queue pair (its
/// data section is dropped: an RDMA source would have written it with RDMA WRITE), a partial
/// batch frame is not sent at all (the source vanished before announcing it), anything else is
/// written raw on the control stream.
#[doc(hidden)]
pub struct RawRdmaPeer {
    tx: RdmaTx,
    sock: TcpStream,
    _rx: RdmaRx,
    ctl: Arc<Mutex<StreamTx>>,
}

impl RawRdmaPeer {
    /// Connect like [`connect`], keeping raw access.
    pub fn connect(addr: SocketAddr, opts: &RdmaOptions, mut hs: ClientConfig) -> Result<Self> {
        hs.caps = Caps(hs.caps.0 | Caps::RDMA.0);
        let (s, est, keys) = tcp::connect_stream(addr, &opts.tcp, hs)?;
        let sock = s.try_clone()?;
        let p = build(s, est, keys, opts, true)?;
        let ctl = Arc::clone(&p.tx.ctl);
        Ok(Self { tx: p.tx, sock, _rx: p.rx, ctl })
    }
}

impl RawRdmaPeer {
    /// Send `b` as the conformance suite means it (see the type's docs).
    pub fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        let h = b
            .get(..HEADER_LEN)
            .and_then(|x| <&[u8; HEADER_LEN]>::try_from(x).ok())
            .and_then(|x| FrameHeader::decode(x).ok());
        if let Some(h) = h.filter(|h| h.kind == FrameKind::PageBatch) {
            if HEADER_LEN + h.len as usize != b.len() {
                return Ok(()); // partial batch: never announced
            }
            let ann = match BatchFixed::decode(&b[HEADER_LEN..]) {
                Ok(f) => &b[..(HEADER_LEN + BATCH_FIXED_LEN + f.var_len()).min(b.len())],
                Err(_) => b,
            };
            return self.tx.send_raw_announcement(ann).map_err(std::io::Error::other);
        }
        // Frames on the control stream are sealed like the channel's own.
        let sealed = verbs::lock(&self.ctl).sealer_mut().seal_encoded(b);
        self.sock.write_all(&sealed)
    }

    /// Close the control stream.
    pub fn close(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
