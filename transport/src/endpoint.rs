//! How channels are opened, whatever the transport: an [`Acceptor`] on the destination yields
//! authenticated channels with their session binding; a [`Connector`] on the source opens one.
//!
//! Every backend implements both: [`crate::tcp::TcpAcceptor`] and [`crate::tcp::TcpOptions`]
//! (`tcp`, `zstd`), `quic::QuicAcceptor` and `quic::QuicOptions` (cargo feature `quic`),
//! `rdma::RdmaAcceptor` and `rdma::RdmaOptions` (cargo feature `rdma`). The
//! layer above (the migration server) routes channels by their binding only, so one service can
//! listen on several transports at once and a session's channels are found wherever they arrive.
//!
//! ```no_run
//! use ferry_transport::endpoint::{Acceptor, Connector, Path};
//! use ferry_transport::handshake::*;
//! use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let psk = Psk::new(random_bytes::<32>().to_vec())?;
//! let timeout = std::time::Duration::from_secs(5);
//! let hs = ServerConfig { creds: psk.clone().into(), caps: Caps::ALL, timeout, encryption: Default::default() };
//! let acceptors: Vec<Box<dyn Acceptor>> = vec![Box::new(TcpAcceptor::bind("127.0.0.1:0".parse()?, TcpOptions::default(), hs)?)];
//! // Source side: the options value picks the backend.
//! let connector: &dyn Connector = &TcpOptions::zstd();
//! let to = Path::to(acceptors[0].local_addr()?);
//! let binding = ChannelBinding { session: random_bytes(), channel: 0 };
//! let cfg = ClientConfig { creds: psk.into(), binding, caps: Caps::ALL, timeout, encryption: Default::default() };
//! let ch = connector.connect(&to, cfg)?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::channel::{Channel, Killer};
use crate::error::Result;
use crate::handshake::{ClientConfig, Established};

/// Decides whether an authenticated channel is welcome (`Err(reason)` refuses it in the
/// handshake, and the peer sees the reason).
pub type Admit<'a> = &'a dyn Fn(&Established) -> std::result::Result<(), String>;

/// A transport's listening endpoint on the destination.
pub trait Acceptor: Send + Sync {
    /// Transport name (`tcp`, `rdma`): what the listener serves, for logs and errors.
    fn transport(&self) -> &'static str;

    /// The address peers connect to.
    fn local_addr(&self) -> Result<SocketAddr>;

    /// Wait up to `wait` for the next connection, authenticate it, ask `admit`, and set the
    /// channel up. `Ok(None)`: nothing arrived in time. An error concerns that one connection
    /// (refused, failed handshake or setup) or the listener's accept; the acceptor stays usable.
    fn accept_within(&self, wait: Duration, admit: Admit<'_>) -> Result<Option<Channel>>;

    /// Wait up to `wait` for the next connection and return it unauthenticated, so that the
    /// handshake runs elsewhere (a listener's accept thread must never wait on a peer). `Ok(None)`:
    /// nothing arrived in time. An error is the listener's accept failing (out of file
    /// descriptors, say): the caller backs off and tries again.
    fn accept_pending(&self, wait: Duration) -> Result<Option<Box<dyn PendingChannel>>>;
}

impl<A: Acceptor + ?Sized> Acceptor for Box<A> {
    fn transport(&self) -> &'static str {
        (**self).transport()
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        (**self).local_addr()
    }

    fn accept_within(&self, wait: Duration, admit: Admit<'_>) -> Result<Option<Channel>> {
        (**self).accept_within(wait, admit)
    }

    fn accept_pending(&self, wait: Duration) -> Result<Option<Box<dyn PendingChannel>>> {
        (**self).accept_pending(wait)
    }
}

/// A connection accepted by an [`Acceptor`] and not yet authenticated.
pub trait PendingChannel: Send {
    /// Where it comes from (`None` if the socket no longer knows).
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// The local address it reached (`None` where the transport does not say).
    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// A handle that closes the connection from any thread: a handshake in progress on it fails
    /// at once (deadlines, eviction, shutdown).
    fn closer(&self) -> Result<Killer>;

    /// Authenticate the peer, ask `admit`, and set the channel up, giving up at `deadline` (a
    /// wall-clock bound on the whole handshake, however slowly the peer sends).
    fn establish(self: Box<Self>, deadline: Instant, admit: Admit<'_>) -> Result<Channel>;
}

/// Where a source opens one channel: the destination's address, and which local address or
/// interface the channel leaves from (to put it on a chosen NIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Destination address.
    pub remote: SocketAddr,
    /// Local address to bind (chooses the NIC).
    pub local: Option<SocketAddr>,
    /// Interface to bind (`SO_BINDTODEVICE`).
    pub device: Option<String>,
}

impl Path {
    /// A path to `remote` from wherever the routing table says.
    pub fn to(remote: SocketAddr) -> Self {
        Self { remote, local: None, device: None }
    }
}

/// The source side of a transport: its options value opens channels (so the transport option
/// a user picked is the connector that is used).
pub trait Connector: Send + Sync {
    /// Transport name (`tcp`, `zstd`, `rdma`).
    fn transport(&self) -> &'static str;

    /// Open one channel on `path` and run the client handshake with `hs` (its binding names the
    /// session and channel index). `path`'s local address and interface take precedence over
    /// any the options name.
    fn connect(&self, path: &Path, hs: ClientConfig) -> Result<Channel>;
}
