//! ferry-migrate: the migration engine.
//!
//! - [`vm`]: the traits the engine consumes (source VM, target VM and factory, dirty log);
//!   `vmm-glue` implements them, `migrate` never depends on a VMM.
//! - [`protocol`]: the control messages (pure encode/decode, every length capped).
//! - [`session`]: the protocol as two sans-IO state machines (source and target; states and the
//!   sequence diagram are there), and the pure estimates (rates, expected downtime, convergence,
//!   stall detector).
//! - [`source`]: the source's threaded driver: pre-copy rounds sharded over all channels.
//! - [`target`]: the destination's threaded driver: receive into guest memory, verify, commit.
//! - [`server`]: the destination's service, routing channels from every listener (tcp, rdma) to
//!   their sessions; the source's session connector, over any transport.
//! - [`scheduler`]: the host-wide concurrency limit.
//! - [`stats`]: query-migrate style statistics and progress events.
//! - [`disks`]: the disks of a shared-nothing move in the drivers (the source's disk pump, the
//!   destination's partial copies); blocks ride on every channel of the session.
//! - [`quick`]: quick migration (pause, save to a shared directory, hand ownership over, load).

pub mod disks;
pub mod protocol;
pub mod quick;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod source;
pub mod stats;
pub mod target;
pub mod vm;

pub use protocol::ProtocolError;

/// Why a migration failed. Before commit, the source VM keeps running whatever the error.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A channel failed.
    #[error("channel {0} failed: {1}")]
    Channel(u16, String),
    /// Connecting a channel failed.
    #[error("connecting channel {0}: {1}")]
    Connect(u16, String),
    /// The peer broke the migration protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A message at the wrong time.
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// The destination aborted the migration (before taking ownership).
    #[error("destination aborted: {0}")]
    DestinationAborted(String),
    /// The destination refused.
    #[error("destination refused: {0}")]
    Refused(String),
    /// The image did not verify.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A VM operation failed.
    #[error("VM: {0}")]
    Vm(String),
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Timed out.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The guest dirties memory faster than it can be sent.
    #[error(
        "not converging after {rounds} rounds: dirty rate {dirty_rate_bytes_per_s:.0} B/s, bandwidth {bandwidth_bytes_per_s:.0} B/s"
    )]
    NotConverging {
        /// Rounds done.
        rounds: u32,
        /// Dirty rate.
        dirty_rate_bytes_per_s: f64,
        /// Bandwidth.
        bandwidth_bytes_per_s: f64,
    },
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(&'static str),
    /// Commit was sent but not confirmed: who owns the VM is unknown; the source copy stays
    /// paused.
    #[error("commit not confirmed; the source keeps its copy paused")]
    Uncertain(Box<stats::MigrationStats>),
    /// The destination took ownership (`Commit`) but the VM did not resume there. The
    /// destination discards its copy and sends the source an abort, on which the source resumes
    /// its own copy (if that abort is lost, the source keeps its copy paused and reports the
    /// commit unconfirmed): the VM runs in at most one place, and never nowhere silently.
    #[error(
        "committed, but the VM did not resume here ({0}); its copy here is discarded and the source is told to resume its own"
    )]
    ResumeFailed(String),
    /// A disk of a shared-nothing move could not be read, sent, written or verified (the
    /// destination's file system full, a disk that did not keep up, an I/O error).
    #[error("disk: {0}")]
    Disk(String),
    /// A bug.
    #[error("internal: {0}")]
    Internal(&'static str),
}
