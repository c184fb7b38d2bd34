//! ferry-transport: Ferry's wire protocol, channel handshake and channel backends.
//!
//! - [`wire`]: frames, page batches, control messages; pure and fuzzed; every length capped.
//! - [`handshake`]: sans-IO mutual authentication (HMAC-SHA256 over fresh nonces) binding a
//!   channel to a session and channel index, with version and capability negotiation.
//! - [`memory`]: guest memory as regions of host mappings; sources and sinks for page batches.
//! - [`channel`]: the channel traits every backend implements.
//! - [`endpoint`]: how channels are opened: an `Acceptor` per listening transport (yields
//!   authenticated channels with their session binding), a `Connector` per transport option.
//! - [`scan`]: one pass over a page: zero or not, and its hash.
//! - [`reserve`]: destination memory faulted in before migrations arrive.
//! - [`option`]: the transport options by name (`tcp`, `zstd`, `zstd-always`), as every command
//!   line spells them.
//! - [`tcp`]: the `tcp` and `zstd` backends over one TCP stream per channel.
//! - `rdma` (cargo feature `rdma`): the RDMA verbs backend, one-sided RDMA WRITE into the
//!   destination's registered guest memory.
//!
//! ```no_run
//! use ferry_transport::{handshake::*, tcp, memory::AnonMemory, wire::{PageRun, BATCH_DEST_ZEROED}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let psk = Psk::new(b"a key of at least sixteen bytes".to_vec())?;
//! let binding = ChannelBinding { session: random_bytes(), channel: 0 };
//! let cfg = ClientConfig { psk, binding, caps: Caps::ALL, timeout: std::time::Duration::from_secs(5) };
//! let mut ch = tcp::connect("127.0.0.1:7700".parse()?, &tcp::TcpOptions::zstd(), cfg)?;
//! let mem = AnonMemory::new(1 << 20, false)?;
//! // SAFETY: `mem` outlives `map`.
//! let map = unsafe { mem.map_at(0) }?;
//! ch.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &[PageRun { gpa: 0, pages: 256 }], &map)?;
//! # Ok(()) }
//! ```

pub mod channel;
pub mod endpoint;
pub mod error;
pub mod handshake;
pub mod memory;
pub mod option;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod reserve;
pub mod scan;
pub mod stream;
pub mod tcp;
pub mod wire;

pub use channel::{Channel, ChannelInfo, ChannelRx, ChannelTx, Incoming, Killer, ReceivedBatch, SentBatch};
pub use error::{HandshakeError, RdmaError, Result, TransportError, WireError};
