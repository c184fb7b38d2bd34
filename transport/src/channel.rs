//! The channel abstraction: one authenticated, session-bound, full-duplex path between two hosts
//! that carries control messages and page batches.
//!
//! A channel is split into a sending half ([`ChannelTx`]) and a receiving half ([`ChannelRx`]) so
//! that acknowledgements flow while pages flow, each half driven by its own thread. Several
//! channels carry one migration; the layer above spreads batches over them.
//!
//! Backends:
//! - stream (`tcp`, `zstd`): the batch header and then the payload on a byte stream; the receiver
//!   reads raw payload straight into guest memory at the batch's GPA.
//! - `rdma`: the same trait; pages move by one-sided RDMA WRITE into the destination's registered
//!   guest memory, and `recv` returns a batch once its completion arrives. The source sends from
//!   its registered guest memory (a [`MemorySource`] region is what gets registered).

use std::sync::Arc;

use crate::error::Result;
use crate::handshake::Established;
use crate::wire::{Ack, PageRun};
use ferry_memory::{MemorySink, MemorySource};

/// Check a batch a caller asks a backend to send: 1..=1024 pages in 1..=1024 runs, known flags.
/// Returns the total page count. Every backend's `send_batch` starts with this.
pub fn check_send_request(runs: &[PageRun], flags: u8) -> Result<u32> {
    let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    if runs.is_empty()
        || runs.len() > crate::wire::MAX_BATCH_RUNS as usize
        || total == 0
        || total > u64::from(crate::wire::MAX_BATCH_PAGES)
    {
        return Err(crate::error::TransportError::InvalidBatch("batch must hold 1..=1024 pages in 1..=1024 runs"));
    }
    if flags & !crate::wire::BATCH_DEST_ZEROED != 0 {
        return Err(crate::error::TransportError::InvalidBatch("unknown batch flags"));
    }
    Ok(total as u32)
}

/// Check a caller's data map against the batch's page count (see [`ChannelTx::send_batch_mapped`]).
pub fn check_data_map(pages: u32, map: &[u8]) -> Result<()> {
    let pages = pages as usize;
    if map.len() != pages.div_ceil(8) || (!pages.is_multiple_of(8) && map[map.len() - 1] >> (pages % 8) != 0) {
        return Err(crate::error::TransportError::InvalidBatch("data map does not match the batch's pages"));
    }
    Ok(())
}

/// What sending one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentBatch {
    /// Pages in the batch.
    pub pages: u32,
    /// Pages that carried data.
    pub data_pages: u32,
    /// Zero pages (sent as one bit each).
    pub zero_pages: u32,
    /// Bytes on the wire (headers included).
    pub wire_bytes: u64,
    /// Whether the data went compressed.
    pub compressed: bool,
}

/// A batch that has been written into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBatch {
    /// Batch id.
    pub id: u64,
    /// Round.
    pub round: u32,
    /// Pages in the batch.
    pub pages: u32,
    /// Pages that carried data.
    pub data_pages: u32,
    /// Bytes taken from the wire.
    pub wire_bytes: u64,
    /// The pages the batch wrote (so the layer above can hash or account for them).
    pub runs: Vec<PageRun>,
}

impl ReceivedBatch {
    /// The acknowledgement for this batch.
    pub fn ack(&self) -> Ack {
        Ack { id: self.id, round: self.round, pages: self.pages }
    }
}

/// What a receive returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A control message of the layer above.
    Control(Vec<u8>),
    /// A batch, already written into the sink.
    Batch(ReceivedBatch),
    /// An acknowledgement of a batch we sent.
    Ack(Ack),
    /// The peer closed the channel in order (Goodbye).
    Closed,
}

/// Sending half of a channel.
pub trait ChannelTx: Send {
    /// Send the pages of `runs` from `src`. Zero pages are detected here and sent as a bit.
    /// `flags` are `wire::BATCH_*` flags. Blocks while the peer does not keep up (backpressure).
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch>;
    /// [`ChannelTx::send_batch`] when the caller has already scanned the pages (to hash them, say):
    /// bit `i` of `data_map` (LSB first, counted over the runs in order) is set when page `i`
    /// carried data at the caller's scan, clear when it was zero. A backend may use it instead of
    /// scanning again; a page the guest writes after the scan is dirty and goes again in a later
    /// round. The map must be `pages.div_ceil(8)` bytes with no bit set past the last page.
    fn send_batch_mapped(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        data_map: &[u8],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        check_data_map(check_send_request(runs, flags)?, data_map)?;
        self.send_batch(id, round, flags, runs, src)
    }
    /// Send a control message (at most `wire::MAX_CONTROL_LEN` bytes).
    fn send_control(&mut self, msg: &[u8]) -> Result<()>;
    /// Acknowledge a received batch.
    fn send_ack(&mut self, ack: Ack) -> Result<()>;
    /// Tell the peer we give up, with a reason.
    fn send_abort(&mut self, code: u16, reason: &str) -> Result<()>;
    /// The round barrier: every batch sent so far is acknowledged and the next round has not
    /// begun. A backend whose peer's memory takes one-sided writes closes that access here: `rdma`
    /// has the destination invalidate the round's memory windows and confirm before this
    /// returns, so no write with the round's keys can land between rounds; its next
    /// `send_batch` opens fresh windows. A caller must not start the next round (take the dirty
    /// pages, save the state) before this returned on every channel. Nothing to do for the
    /// others (the default).
    fn end_round(&mut self) -> Result<()> {
        Ok(())
    }
    /// The first half of [`ChannelTx::end_round`]: ask the peer to close the round's access
    /// without waiting for its confirmation, which the following `end_round` waits for. A caller
    /// with several channels asks on all of them first and then waits on each, so the barrier
    /// costs one round trip instead of one per channel. Optional: `end_round` alone does both.
    fn begin_end_round(&mut self) -> Result<()> {
        Ok(())
    }
    /// Orderly close of the sending direction.
    fn close(&mut self) -> Result<()>;
}

/// Receiving half of a channel.
pub trait ChannelRx: Send {
    /// Receive the next frame; batches are written into `sink` before this returns.
    fn recv(&mut self, sink: &dyn MemorySink) -> Result<Incoming>;

    /// A handle that, once called (from any thread), lets the peer write no more memory on its
    /// own: `rdma` moves the channel's queue pair to the error state (it takes no packet from
    /// then on), deallocates the memory windows of the open round and deregisters the guest
    /// memory (a later one-sided write fails at the peer and lands nowhere), binds no window
    /// again and tells the peer, whose next batch fails. `None` for backends whose pages all pass through [`ChannelRx::recv`], where the
    /// sink's [`MemorySink::admit_batch`] already refuses them.
    fn memory_sealer(&self) -> Option<Killer> {
        None
    }
}

/// Facts about an established channel.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    /// Handshake outcome (version, capabilities, session binding).
    pub established: Established,
    /// Backend name (`tcp`, `zstd`, `rdma`).
    pub backend: &'static str,
    /// Local address, where there is one.
    pub local: Option<std::net::SocketAddr>,
    /// Peer address, where there is one.
    pub peer: Option<std::net::SocketAddr>,
    /// The channel's image key from the handshake (channel 0's keys a migration's image digest).
    pub image_key: crate::crypto::ImageKey,
}

/// Cuts a channel from outside (cancel, fault injection): both halves fail promptly.
pub type Killer = Arc<dyn Fn() + Send + Sync>;

/// An established channel.
pub struct Channel {
    /// Sending half.
    pub tx: Box<dyn ChannelTx>,
    /// Receiving half.
    pub rx: Box<dyn ChannelRx>,
    /// Facts.
    pub info: ChannelInfo,
    /// Cuts the channel.
    pub killer: Killer,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("info", &self.info).finish_non_exhaustive()
    }
}
