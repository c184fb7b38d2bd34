//! Errors of the multichannel layer.

use crate::policy::Unusable;

/// Why an interface list or exchange message does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The message ends before its fixed layout does.
    #[error("truncated interface-exchange message")]
    Truncated,
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after the interface-exchange message")]
    Trailing(usize),
    /// The first byte is not one of the exchange's tags (0x40..=0x4f).
    #[error("tag {0:#04x} is not an interface-exchange message (a migration message before the exchange?)")]
    NotExchange(u8),
    /// An exchange tag this version does not know.
    #[error("unknown interface-exchange tag {0:#04x}")]
    UnknownTag(u8),
    /// The magic after the tag is wrong.
    #[error("bad interface-exchange magic")]
    BadMagic,
    /// A version this build does not speak.
    #[error("unsupported interface-exchange version {0}")]
    UnsupportedVersion(u8),
    /// A count or length beyond its cap.
    #[error("{what}: {len} exceeds the cap of {cap}")]
    TooLong {
        /// What was counted.
        what: &'static str,
        /// Announced (or attempted) count.
        len: usize,
        /// Cap.
        cap: usize,
    },
    /// A field with a value that cannot be.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Errors of discovery, exchange, planning and session setup.
#[derive(Debug, thiserror::Error)]
pub enum McError {
    /// Listing this host's interfaces failed.
    #[error("listing network interfaces: {0}")]
    Discover(#[source] nix::Error),
    /// A network policy string does not parse.
    #[error("bad network policy {input:?}: {reason}")]
    Policy {
        /// The offending part.
        input: String,
        /// Why.
        reason: String,
    },
    /// The peer sent something that is not a valid exchange message.
    #[error("interface exchange: {0}")]
    Codec(#[from] CodecError),
    /// The channel failed during the exchange.
    #[error("interface exchange on channel 0: {0}")]
    Channel(#[source] ferry_transport::TransportError),
    /// The peer sent a frame other than a control message during the exchange.
    #[error("interface exchange: unexpected {0} from the peer")]
    Unexpected(&'static str),
    /// The peer closed the channel during the exchange.
    #[error("interface exchange: the peer closed channel 0")]
    PeerClosed,
    /// The peer refused the exchange.
    #[error("the peer refused the interface exchange: {0}")]
    Refused(String),
    /// No answer within the time allowed.
    #[error("interface exchange timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The policy names networks that cannot be used (strict policy), or no path at all is usable.
    #[error("unusable migration networks: {}", Unusable::list(.0))]
    Unusable(Vec<Unusable>),
    /// Opening channel `index` of the session failed.
    #[error("opening channel {index} ({local:?} -> {remote}): {source}")]
    Connect {
        /// Channel index.
        index: u16,
        /// Local address bound.
        local: Option<std::net::SocketAddr>,
        /// Destination.
        remote: std::net::SocketAddr,
        /// Why.
        #[source]
        source: ferry_transport::TransportError,
    },
    /// More channels than a session may have.
    #[error("the plan needs {0} channels, more than the {max} a session may have", max = crate::session::MAX_CHANNELS)]
    TooManyChannels(usize),
}

/// Result of this crate.
pub type Result<T, E = McError> = std::result::Result<T, E>;
