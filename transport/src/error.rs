//! Errors of the transport layer.

use crate::wire::FrameKind;

/// A frame or message that breaks the wire protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with the magic bytes.
    #[error("bad frame magic (not a Ferry peer, or the stream lost sync)")]
    BadMagic,
    /// The header checksum does not match.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The peer speaks a version we do not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown flags set.
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u16),
    /// A length beyond the cap for its kind.
    #[error("{kind:?} frame announces {len} bytes, more than the cap of {cap}")]
    TooLong {
        /// Frame kind.
        kind: FrameKind,
        /// Announced length.
        len: u32,
        /// Cap.
        cap: u32,
    },
    /// A message shorter than its fixed layout.
    #[error("truncated message")]
    Truncated,
    /// Unknown data encoding.
    #[error("unknown batch encoding {0}")]
    UnknownEncoding(u8),
    /// A batch whose fields contradict each other.
    #[error("malformed page batch: {0}")]
    BadBatch(&'static str),
    /// A frame that is not allowed at this point of the conversation.
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's MAC does not verify: it does not hold the key (or replayed an old handshake).
    #[error("authentication failed: the peer does not prove knowledge of the pre-shared key")]
    BadMac,
    /// No version in common.
    #[error("no protocol version in common (peer offers {min}..={max})")]
    NoCommonVersion {
        /// Peer's oldest version.
        min: u8,
        /// Peer's newest version.
        max: u8,
    },
    /// The server chose something the client did not offer.
    #[error("server chose version {0}, which was not offered")]
    BadChoice(u8),
    /// The peer refused the channel.
    #[error("the peer refused the channel: {0}")]
    Rejected(String),
    /// The handshake took too long.
    #[error("handshake timed out")]
    Timeout,
    /// The pre-shared key is too short or not random.
    #[error("weak pre-shared key: {0}")]
    WeakKey(String),
    /// The client asked for an encryption mode this build does not know.
    #[error("unknown encryption mode {0} in the hello")]
    UnknownMode(u8),
    /// The two ends are configured for different encryption modes.
    #[error("encryption mode mismatch: the source asks for {client}, this destination requires {server}")]
    ModeMismatch {
        /// What the client asked for.
        client: crate::crypto::Encryption,
        /// What the server requires.
        server: crate::crypto::Encryption,
    },
    /// The TLS handshake failed (host certificates): the peer's certificate was refused here
    /// (unknown CA, expired, wrong name), or ours there (the alert it sent).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The two ends authenticate differently (host certificates against a pre-shared key).
    #[error("{0}")]
    Credentials(String),
    /// Malformed handshake message.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Why a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("key file {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// Others may read or write the key file.
    #[error("key file {path} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {path})")]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Neither hex nor base64.
    #[error("the key is neither hex nor base64 (make one with: head -c 32 /dev/urandom | base64)")]
    Encoding,
    /// Decoded, but too short or not random.
    #[error("{0} (make one with: head -c 32 /dev/urandom | base64)")]
    Weak(HandshakeError),
    /// A certificate or private key file that cannot be used.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Errors of a channel.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An operating system error on the channel's socket.
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the wire protocol.
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// A sealed frame failed its authentication tag: altered, injected, replayed, reordered or
    /// moved from another channel. The channel is dead.
    #[error("frame failed authentication (altered, injected, replayed, reordered or from another channel)")]
    Unauthenticated,
    /// The peer closed the channel in the middle of a frame.
    #[error("peer closed the channel in the middle of a frame")]
    Truncated,
    /// The peer aborted.
    #[error("peer aborted (code {code}): {reason}")]
    PeerAborted {
        /// Code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// A batch names guest memory that does not exist on this side.
    #[error("batch names guest memory that is not mapped here: gpa {gpa:#x} + {len} bytes")]
    BadAddress {
        /// Start.
        gpa: u64,
        /// Length.
        len: usize,
    },
    /// The receiving side refused a batch before writing any of its pages
    /// ([`ferry_memory::MemorySink::admit_batch`]: an older round, or memory sealed).
    #[error("batch refused: {0}")]
    BatchRefused(String),
    /// A batch asked for more than the protocol allows.
    #[error("invalid batch: {0}")]
    InvalidBatch(&'static str),
    /// Compressed data did not decode to what the header announced.
    #[error("compressed batch does not decode: {0}")]
    Decompress(String),
    /// A capability was used without being negotiated.
    #[error("{0} used without being negotiated")]
    NotNegotiated(&'static str),
    /// The channel is closed.
    #[error("channel closed")]
    Closed,
    /// The RDMA backend failed (verbs call, work completion error, queue pair in error).
    #[error("rdma: {0}")]
    Rdma(#[from] RdmaError),
}

/// Errors of the RDMA backend (defined here, without the `rdma` feature's dependencies, so that
/// the layers above can match on them in every build).
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No usable RDMA device (none named so, or libibverbs not present).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{op} failed: {detail}")]
    Verbs {
        /// The verb.
        op: &'static str,
        /// What the library said.
        detail: String,
    },
    /// A work request completed with an error (the queue pair is now in the error state).
    #[error("work request {wr_id} completed with status {status} ({name}), vendor error {vendor_err:#x}")]
    WorkCompletion {
        /// Work request id.
        wr_id: u64,
        /// `ibv_wc_status` value.
        status: u32,
        /// Its name.
        name: &'static str,
        /// Vendor error.
        vendor_err: u32,
    },
    /// Outstanding work requests made no progress.
    #[error("no RDMA completion for {secs:.1} s (control stream {})", if *control_alive { "alive" } else { "gone" })]
    Stalled {
        /// Seconds waited.
        secs: f32,
        /// Whether the control stream was still up.
        control_alive: bool,
    },
    /// The peer's queue pair or region table is unusable.
    #[error("bad peer setup: {0}")]
    BadPeer(&'static str),
    /// The memory given to the channel cannot be used with RDMA.
    #[error("memory: {0}")]
    Memory(&'static str),
    /// The destination sealed its guest memory (it does at `Complete`, before its final check,
    /// or when the channel ended): its queue pair is in the error state and it takes no page on
    /// this channel any more.
    #[error("the destination sealed its guest memory (Complete or channel end): its queue pair is in the error state and no page is accepted")]
    Sealed,
}

/// Result of the transport layer.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
