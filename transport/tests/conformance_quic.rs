//! The conformance suite against the `quic` backend on loopback: `quic` (a connection per
//! channel) and `quic:4` shared (the pair under test is the fourth stream of one connection whose
//! other three channels stay open), plus what is particular to QUIC: the listener through the
//! endpoint traits, a rejected session, a stranger that completes TLS without the key.
#![cfg(feature = "quic")]

use std::sync::Mutex;
use std::time::Duration;

use ferry_test_support::conformance::{self, Backend, RawPeer, TEST_KEY};
use ferry_transport::endpoint::{Acceptor, Connector, Path};
use ferry_transport::error::HandshakeError;
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Established, Psk, ServerConfig};
use ferry_transport::quic::{QuicAcceptor, QuicOptions, RawStream};
use ferry_transport::{Channel, TransportError};

struct Quic {
    /// Channels of one session share a connection; the pair under test is channel `streams - 1`.
    streams: u16,
    /// Channels opened before the pair under test, kept open while it is used.
    others: Mutex<Vec<(Channel, Channel)>>,
}

impl Quic {
    fn new(streams: u16) -> Self {
        Self { streams, others: Mutex::new(Vec::new()) }
    }

    fn opts(&self) -> QuicOptions {
        if self.streams > 1 {
            QuicOptions::shared()
        } else {
            QuicOptions::default()
        }
    }
}

fn client_cfg(psk: Psk, session: [u8; 16], channel: u16) -> ClientConfig {
    ClientConfig {
        creds: psk.into(),
        binding: ChannelBinding { session, channel },
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}

fn acceptor(psk: Psk) -> QuicAcceptor {
    let hs = ServerConfig {
        creds: psk.into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    QuicAcceptor::bind("127.0.0.1:0".parse().unwrap(), QuicOptions::default(), hs).unwrap()
}

fn accept(acc: &QuicAcceptor) -> Result<Channel, TransportError> {
    loop {
        if let Some(ch) = acc.accept_within(Duration::from_millis(200), &|_| Ok(()))? {
            return Ok(ch);
        }
    }
}

struct Raw(RawStream);

impl RawPeer for Raw {
    fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write_raw(b).map_err(std::io::Error::other)
    }
    fn close(&mut self) {
        self.0.close();
    }
}

impl Backend for Quic {
    fn name(&self) -> &'static str {
        if self.streams > 1 {
            "quic:4 (streams)"
        } else {
            "quic"
        }
    }

    fn pair(&self) -> Result<(Channel, Channel), TransportError> {
        let (c, s) = self.pair_keys(Psk::new(TEST_KEY).unwrap(), Psk::new(TEST_KEY).unwrap());
        Ok((c?, s?))
    }

    fn pair_keys(
        &self,
        client: Psk,
        server: Psk,
    ) -> (Result<Channel, TransportError>, Result<Channel, TransportError>) {
        let acc = acceptor(server);
        let addr = acc.local_addr().unwrap();
        let opts = self.opts();
        let session = random_bytes();
        let path = Path::to(addr);
        std::thread::scope(|sc| {
            for i in 0..self.streams - 1 {
                let srv = sc.spawn(|| accept(&acc));
                let c = opts.connect(&path, client_cfg(client.clone(), session, i));
                match (c, srv.join().unwrap()) {
                    (Ok(c), Ok(s)) => self.others.lock().unwrap().push((c, s)),
                    (c, s) => return (c, s),
                }
            }
            let srv = sc.spawn(|| accept(&acc));
            let c = opts.connect(&path, client_cfg(client, session, self.streams - 1));
            if let (Ok(c), Some((o, _))) = (&c, self.others.lock().unwrap().last()) {
                assert_eq!(c.info.local, o.info.local, "the channels of a session share one connection");
            }
            (c, srv.join().unwrap())
        })
    }

    fn raw_pair(&self) -> Result<(Box<dyn RawPeer>, Channel), TransportError> {
        let acc = acceptor(Psk::new(TEST_KEY).unwrap());
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| accept(&acc));
            let raw = RawStream::connect(addr, client_cfg(Psk::new(TEST_KEY).unwrap(), random_bytes(), 0))?;
            let ch = srv.join().unwrap()?;
            Ok((Box::new(Raw(raw)) as Box<dyn RawPeer>, ch))
        })
    }

    fn zstd(&self) -> bool {
        false
    }
}

macro_rules! suite {
    ($m:ident, $streams:expr) => {
        mod $m {
            use super::*;
            #[test]
            fn round_trip_mixed() {
                conformance::round_trip_mixed(&Quic::new($streams));
            }
            #[test]
            fn peer_closes_mid_batch() {
                conformance::peer_closes_mid_batch(&Quic::new($streams));
            }
            #[test]
            fn slow_reader_backpressure() {
                conformance::slow_reader_backpressure(&Quic::new($streams));
            }
            #[test]
            fn malformed_frames() {
                conformance::malformed_frames(&Quic::new($streams));
            }
            #[test]
            fn wrong_key() {
                conformance::wrong_key(&Quic::new($streams));
            }
            #[test]
            fn control_and_abort() {
                conformance::control_and_abort(&Quic::new($streams));
            }
            #[test]
            fn refused_batch() {
                conformance::refused_batch(&Quic::new($streams));
            }
        }
    };
}

suite!(quic_backend, 1);
suite!(quic_four_streams, 4);

#[test]
fn rejected_session_gets_a_reason() {
    let acc = acceptor(Psk::new(TEST_KEY).unwrap());
    let addr = acc.local_addr().unwrap();
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| loop {
            match acc.accept_within(Duration::from_millis(200), &|_| Err("no migration with that session id".into())) {
                Ok(None) => continue,
                r => break r,
            }
        });
        let cfg = client_cfg(Psk::new(TEST_KEY).unwrap(), random_bytes(), 0);
        let e = QuicOptions::default().connect(&Path::to(addr), cfg).unwrap_err();
        assert!(e.to_string().contains("no migration with that session id"), "{e}");
        assert!(srv.join().unwrap().is_err());
    });
}

/// A client that completes TLS but holds another key is refused on both sides (its proof is
/// made under its own key bound to the TLS session), and the listener still takes a genuine
/// channel afterwards. An idle listener yields nothing within the wait.
#[test]
fn stranger_is_refused_and_acceptor_survives() {
    let hs = ServerConfig {
        creds: Psk::new(TEST_KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_millis(300),
        encryption: Default::default(),
    };
    let acc = QuicAcceptor::bind("127.0.0.1:0".parse().unwrap(), QuicOptions::default(), hs).unwrap();
    assert!(acc.accept_within(Duration::from_millis(20), &|_| Ok(())).unwrap().is_none());
    let addr = acc.local_addr().unwrap();
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| accept(&acc));
        let cfg = client_cfg(Psk::new(b"not-the-key-at-all-0123456789abc".to_vec()).unwrap(), random_bytes(), 0);
        let e = QuicOptions::default().connect(&Path::to(addr), cfg).unwrap_err();
        assert!(matches!(e, TransportError::Handshake(HandshakeError::BadMac)), "{e}");
        assert!(srv.join().unwrap().is_err(), "the stranger was accepted");
    });
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| accept(&acc));
        let cfg = client_cfg(Psk::new(TEST_KEY).unwrap(), random_bytes(), 0);
        QuicOptions::default().connect(&Path::to(addr), cfg).unwrap();
        srv.join().unwrap().unwrap();
    });
}

/// Through the endpoint traits: the channel arrives with its binding, no capability (pages raw
/// on QUIC), from the path's local address, and the backend says `quic`.
#[test]
fn endpoint_traits_open_bound_channels() {
    let hs = ServerConfig {
        creds: Psk::new(TEST_KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let acc: Box<dyn Acceptor> =
        Box::new(QuicAcceptor::bind("127.0.0.1:0".parse().unwrap(), QuicOptions::default(), hs).unwrap());
    assert_eq!(acc.transport(), "quic");
    let addr = acc.local_addr().unwrap();
    let binding = ChannelBinding { session: random_bytes(), channel: 3 };
    let connector: &dyn Connector = &QuicOptions::default();
    assert_eq!(connector.transport(), "quic");
    let from = "127.0.0.2:0".parse().unwrap();
    let path = Path { remote: addr, local: Some(from), device: None };
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| loop {
            let admit = |e: &Established| if e.binding == binding { Ok(()) } else { Err("wrong binding".into()) };
            if let Some(ch) = acc.accept_within(Duration::from_millis(100), &admit).unwrap() {
                break ch;
            }
        });
        let cfg = ClientConfig {
            creds: Psk::new(TEST_KEY).unwrap().into(),
            binding,
            caps: Caps::ALL,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let c = connector.connect(&path, cfg).unwrap();
        let s = srv.join().unwrap();
        for ch in [&c, &s] {
            assert_eq!(ch.info.established.binding, binding);
            assert_eq!(ch.info.established.caps, Caps(0));
            assert_eq!(ch.info.backend, "quic");
        }
        assert_eq!(s.info.peer.map(|a| a.ip()), Some(from.ip()), "the channel left from the path's local address");
    });
}
