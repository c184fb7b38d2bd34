//! A [`MigrationServer`] on its own thread, as tests and the benchmark's destination process
//! run it: each migration's outcome arrives on a channel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_migrate::server::MigrationServer;
use ferry_migrate::target::TargetConfig;
use ferry_migrate::vm::TargetFactory;
use ferry_migrate::MigrateError;
use ferry_transport::handshake::{Caps, ServerConfig};
use ferry_transport::quic::{QuicAcceptor, QuicOptions};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::Credentials;

pub use ferry_migrate::server::RunningServer;

/// Serve `srv` on a new thread until `max` migrations have finished (`None`: until stopped).
pub fn spawn(srv: MigrationServer, max: Option<usize>) -> Result<RunningServer, MigrateError> {
    srv.spawn(max)
}

/// A server on `127.0.0.1` (a free port) with `creds` (a key or host certificates) and these TCP options, receiving into
/// `factory`'s VMs, on its own thread until `max` migrations have finished. Panics if it cannot
/// listen (a test helper).
pub fn loopback(
    creds: impl Into<Credentials>,
    tcp: TcpOptions,
    factory: Arc<dyn TargetFactory>,
    cfg: TargetConfig,
    max: Option<usize>,
) -> RunningServer {
    let hs = handshake(creds);
    let acc = TcpAcceptor::bind(SocketAddr::from(([127, 0, 0, 1], 0)), tcp, hs).expect("listening on loopback");
    spawn(MigrationServer::new(acc, factory, cfg), max).expect("the server's address")
}

/// [`loopback`] over QUIC (default options, default target settings): a server on
/// `127.0.0.1` (a free UDP port) with `creds`.
pub fn quic_loopback(
    creds: impl Into<Credentials>,
    factory: Arc<dyn TargetFactory>,
    max: Option<usize>,
) -> RunningServer {
    let acc = QuicAcceptor::bind(SocketAddr::from(([127, 0, 0, 1], 0)), QuicOptions::default(), handshake(creds))
        .expect("listening on loopback");
    spawn(MigrationServer::new(acc, factory, TargetConfig::default()), max).expect("the server's address")
}

/// A test server's handshake: `creds`, every capability, 5 s to finish, `aead`.
fn handshake(creds: impl Into<Credentials>) -> ServerConfig {
    ServerConfig {
        creds: creds.into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}
