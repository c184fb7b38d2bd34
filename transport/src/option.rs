//! The transport options a user picks by name on every command line (`migration-bench`, `ferry`):
//! one type, parsed with [`FromStr`] and printed with [`Display`](fmt::Display) in the same spelling,
//! and the connector and listener each stands for ([`TransportOption::connector`],
//! [`TransportOption::bind`]). `quic` opens a QUIC connection per channel; `quic-streams` carries
//! a session's channels as streams of one connection (measured slower on 2 cores, kept to compare).
//!
//! ```
//! use ferry_transport::option::TransportOption;
//! let o: TransportOption = "zstd-always".parse().unwrap();
//! assert_eq!(o.to_string(), "zstd-always");
//! assert!("carrier-pigeon".parse::<TransportOption>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use std::net::SocketAddr;

use crate::endpoint::{Acceptor, Connector};
use crate::error::Result;
use crate::handshake::{Caps, ServerConfig};
use crate::tcp::{TcpAcceptor, TcpOptions};

/// A transport option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportOption {
    /// One TCP stream per channel, pages raw.
    Tcp,
    /// The same stream, batches compressed with zstd where that pays: per batch, compressed or
    /// raw by which has been delivering guest bytes faster.
    Zstd,
    /// zstd on every batch (raw only where compressing saves less than 1/8).
    ZstdAlways,
    /// QUIC (quinn, TLS 1.3): a connection per channel, pages raw (cargo feature `quic`).
    #[cfg(feature = "quic")]
    Quic,
    /// QUIC with every channel of a session as a stream of one connection (to compare with
    /// [`Self::Quic`]: `quic:4` against `quic-streams:4`).
    #[cfg(feature = "quic")]
    QuicStreams,
}

impl TransportOption {
    /// Every option, in the order help texts list them.
    #[cfg(not(feature = "quic"))]
    pub const ALL: [TransportOption; 3] = [Self::Tcp, Self::Zstd, Self::ZstdAlways];
    /// Every option, in the order help texts list them.
    #[cfg(feature = "quic")]
    pub const ALL: [TransportOption; 5] = [Self::Tcp, Self::Zstd, Self::ZstdAlways, Self::Quic, Self::QuicStreams];

    /// The option's name, as parsed and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Zstd => "zstd",
            Self::ZstdAlways => "zstd-always",
            #[cfg(feature = "quic")]
            Self::Quic => "quic",
            #[cfg(feature = "quic")]
            Self::QuicStreams => "quic-streams",
        }
    }

    /// Whether batches may go compressed.
    pub fn compresses(self) -> bool {
        matches!(self, Self::Zstd | Self::ZstdAlways)
    }

    /// Whether the option runs over TCP (`tcp`, `zstd`, `zstd-always`): [`Self::tcp_options`]
    /// are its settings. Other options have their own connector and acceptor.
    pub fn is_tcp(self) -> bool {
        self.compresses() || self == Self::Tcp
    }

    /// The connector (source side) of this option.
    pub fn connector(self, zstd_level: i32) -> Box<dyn Connector> {
        match self {
            #[cfg(feature = "quic")]
            Self::Quic => Box::new(crate::quic::QuicOptions::default()),
            #[cfg(feature = "quic")]
            Self::QuicStreams => Box::new(crate::quic::QuicOptions::shared()),
            _ => Box::new(self.tcp_options(zstd_level)),
        }
    }

    /// A listener (destination side) of this option on `addr`, with handshake settings `hs`
    /// (its capabilities narrowed to [`Self::caps`]).
    pub fn bind(self, addr: SocketAddr, zstd_level: i32, mut hs: ServerConfig) -> Result<Box<dyn Acceptor>> {
        hs.caps = hs.caps.intersect(self.caps());
        Ok(match self {
            #[cfg(feature = "quic")]
            Self::Quic | Self::QuicStreams => Box::new(crate::quic::QuicAcceptor::bind(addr, Default::default(), hs)?),
            _ => Box::new(TcpAcceptor::bind(addr, self.tcp_options(zstd_level), hs)?),
        })
    }

    /// The TCP options of this transport option (`zstd_level` for the zstd ones; the defaults for
    /// an option that does not run over TCP, see [`Self::is_tcp`]).
    pub fn tcp_options(self, zstd_level: i32) -> TcpOptions {
        match self {
            Self::Tcp => TcpOptions::default(),
            #[cfg(feature = "quic")]
            Self::Quic | Self::QuicStreams => TcpOptions::default(),
            Self::Zstd => TcpOptions { zstd_level: Some(zstd_level), ..TcpOptions::default() },
            Self::ZstdAlways => TcpOptions { zstd_level: Some(zstd_level), adaptive: false, ..TcpOptions::default() },
        }
    }

    /// What a destination offering only this option accepts in the handshake.
    pub fn caps(self) -> Caps {
        if self.compresses() {
            Caps::ALL
        } else {
            Caps(0)
        }
    }
}

impl fmt::Display for TransportOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a transport option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport option {0:?} (tcp, zstd, zstd-always, quic, quic-streams)")]
pub struct UnknownOption(pub String);

impl FromStr for TransportOption {
    type Err = UnknownOption;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownOption> {
        Self::ALL.into_iter().find(|o| o.as_str() == s.trim()).ok_or_else(|| UnknownOption(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for o in TransportOption::ALL {
            assert_eq!(o.to_string().parse::<TransportOption>(), Ok(o));
        }
        assert_eq!(" zstd ".parse::<TransportOption>(), Ok(TransportOption::Zstd));
        let e = "rdma-over-pigeons".parse::<TransportOption>().unwrap_err();
        assert!(e.to_string().contains("rdma-over-pigeons"), "{e}");
        assert!("".parse::<TransportOption>().is_err());
        assert!("TCP".parse::<TransportOption>().is_err());
    }

    #[test]
    fn options_map_to_tcp_settings() {
        assert_eq!(TransportOption::Tcp.tcp_options(3).zstd_level, None);
        let z = TransportOption::Zstd.tcp_options(3);
        assert_eq!((z.zstd_level, z.adaptive), (Some(3), true));
        let a = TransportOption::ZstdAlways.tcp_options(-1);
        assert_eq!((a.zstd_level, a.adaptive), (Some(-1), false));
        assert_eq!(TransportOption::Tcp.caps(), Caps(0));
        assert_eq!(TransportOption::Zstd.caps(), Caps::ALL);
        assert!(TransportOption::Tcp.is_tcp() && TransportOption::ZstdAlways.is_tcp());
    }

    #[cfg(feature = "quic")]
    #[test]
    fn quic_is_an_option_of_its_own() {
        let q: TransportOption = "quic".parse().unwrap();
        assert_eq!(q, TransportOption::Quic);
        assert!(!q.is_tcp() && !q.compresses());
        assert_eq!(q.caps(), Caps(0));
        assert_eq!(q.connector(3).transport(), "quic");
        assert_eq!(TransportOption::Zstd.connector(3).transport(), "zstd");
        assert_eq!("quic-streams".parse(), Ok(TransportOption::QuicStreams));
    }
}
