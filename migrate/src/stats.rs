//! Statistics of a migration (like QEMU's query-migrate) and progress events.

use std::time::Duration;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for a slot of the host-wide limit.
    Queued,
    /// Connecting and preparing the destination.
    Setup,
    /// Pre-copy rounds.
    Active,
    /// Source paused, final pages and state moving.
    Switchover,
    /// Destination runs the VM; source released it.
    Completed,
    /// Failed before commit: the source runs the VM.
    Failed,
    /// Cancelled before commit: the source runs the VM.
    Cancelled,
    /// Commit was sent but its confirmation never came: the source keeps its copy paused and
    /// does not resume it; an operator (or the agent) must ask the destination.
    Uncertain,
}

impl Status {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Switchover => "switchover",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Uncertain => "uncertain",
        }
    }
}

/// A progress event.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Status.
    pub status: Status,
    /// Current round.
    pub round: u32,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Bytes of pages still to send in this round or dirty.
    pub remaining_bytes: u64,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub transferred_bytes: u64,
    /// Expected downtime if we switched over now.
    pub expected_downtime: Duration,
    /// Measured payload bandwidth, bytes/s.
    pub bandwidth_bps: f64,
    /// Measured dirty rate, bytes/s.
    pub dirty_rate_bps: f64,
    /// Throttle applied to the guest (100 = none).
    pub throttle_pct: u8,
}

/// Per-channel numbers.
#[derive(Debug, Clone, Default)]
pub struct ChannelStats {
    /// Channel index.
    pub index: u16,
    /// Backend.
    pub backend: String,
    /// Batches sent.
    pub batches: u64,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Batch latency (send to ack), microseconds: p50, p90, p99, max.
    pub latency_us: [u64; 4],
    /// Whether the channel failed during the migration.
    pub failed: bool,
}

/// The outcome of a migration.
#[derive(Debug, Clone)]
pub struct MigrationStats {
    /// Final status.
    pub status: Status,
    /// Start to end.
    pub total: Duration,
    /// Start to the first page sent (connect + prepare).
    pub setup: Duration,
    /// Source pause to destination resume (as seen by the source: pause until `Resumed`).
    pub downtime: Duration,
    /// Downtime expected when switchover was decided.
    pub expected_downtime: Duration,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Guest memory size.
    pub guest_bytes: u64,
    /// Bytes on the wire over all channels.
    pub transferred_bytes: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent compressed.
    pub compressed_batches: u64,
    /// Pages per round.
    pub pages_per_round: Vec<u64>,
    /// Last measured dirty rate, bytes/s.
    pub dirty_rate_bps: f64,
    /// Guest bytes moved per second over the whole migration (guest_bytes / total).
    pub throughput_bps: f64,
    /// Throttle in force at switchover.
    pub throttle_pct: u8,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// The destination verified the image against the source's digest.
    pub verified: bool,
    /// Notable events (channel failures, throttling, ...).
    pub events: Vec<String>,
}
