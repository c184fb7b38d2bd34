//! ferry-transport: Ferry's wire protocol, channel handshake and channel backends.
//!
//! The transport knows channels, frames and bytes. Guest memory is not its concern: a sender
//! reads pages through a [`ferry_memory::MemorySource`] and a receiver writes them through a
//! [`ferry_memory::MemorySink`] (both borrowed for the call), under the access contract written
//! in `ferry-memory`'s crate docs.
//!
//! - [`wire`]: frames, page batches, control messages; pure and fuzzed; every length capped.
//! - [`handshake`]: sans-IO mutual authentication (HMAC-SHA256 over fresh nonces) binding a
//!   channel to a session and channel index, with version, capability and encryption-mode
//!   negotiation; keys of at least 32 random bytes ([`handshake::Psk`]).
//! - [`crypto`]: per-channel traffic keys (HKDF-SHA256) and the sealing of every frame after the
//!   handshake (AES-256-GCM: `aead` by default, `integrity`, or `off` on trusted networks).
//! - [`channel`]: the channel traits every backend implements.
//! - [`endpoint`]: how channels are opened: an `Acceptor` per listening transport (yields
//!   authenticated channels with their session binding), a `Connector` per transport option.
//! - [`option`]: the transport options by name (`tcp`, `zstd`, `zstd-always`, `quic`), as every command
//!   line spells them.
//! - [`tls`]: host certificates (mutual TLS 1.3 with rustls) as an alternative to the key: the
//!   TLS session's exporter secret becomes the key of Ferry's handshake ([`tls::Credentials`]).
//! - [`tcp`]: the `tcp` and `zstd` backends over one TCP stream per channel.
//! - `quic` (cargo feature `quic`, on by default): channels as QUIC streams (quinn, TLS 1.3 with
//!   rustls and `aws-lc-rs`), Ferry's handshake bound to the TLS session.
//! - `rdma` (cargo feature `rdma`): the RDMA verbs backend, one-sided RDMA WRITE into the
//!   destination's registered guest memory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ferry_memory::AnonMemory;
//! use ferry_transport::{handshake::*, tcp, wire::{PageRun, BATCH_DEST_ZEROED}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let psk = Psk::new(random_bytes::<32>().to_vec())?; // the same key on both hosts
//! let binding = ChannelBinding { session: random_bytes(), channel: 0 };
//! let cfg = ClientConfig {
//!     creds: psk.into(),
//!     binding,
//!     caps: Caps::ALL,
//!     timeout: std::time::Duration::from_secs(5),
//!     encryption: ferry_transport::Encryption::Aead,
//! };
//! let mut ch = tcp::connect("127.0.0.1:7700".parse()?, &tcp::TcpOptions::zstd(), cfg)?;
//! let mem = Arc::new(AnonMemory::new(1 << 20, false)?);
//! let map = mem.map_at(0)?; // holds the memory mapped while it lives
//! ch.tx.send_batch(0, 0, BATCH_DEST_ZEROED, &[PageRun { gpa: 0, pages: 256 }], &map)?;
//! # Ok(()) }
//! ```

pub mod channel;
pub mod crypto;
pub mod endpoint;
pub mod error;
pub mod handshake;
pub mod option;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod stream;
pub mod tcp;
pub mod tls;
pub mod wire;

pub use channel::{Channel, ChannelInfo, ChannelRx, ChannelTx, Incoming, Killer, ReceivedBatch, SentBatch};
pub use crypto::{Encryption, ImageKey};
pub use error::{HandshakeError, KeyError, RdmaError, Result, TransportError, WireError};
pub use tls::{Credentials, TlsCredentials};
