//! The conformance suite against the `tcp` and `zstd` backends on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferry_test_support::conformance::{self, Backend, RawPeer, TEST_KEY};
use ferry_transport::crypto::Sealer;
use ferry_transport::endpoint::{Acceptor, Connector, Path};
use ferry_transport::handshake::{
    random_bytes, Caps, ChannelBinding, ClientConfig, ClientHandshake, Established, Psk, ServerConfig, Step,
};
use ferry_transport::tcp::{self, TcpAcceptor, TcpOptions};
use ferry_transport::wire::{FrameHeader, HEADER_LEN};
use ferry_transport::{Channel, Encryption, TransportError};

struct Tcp {
    zstd: bool,
    mode: Encryption,
}

fn binding() -> ChannelBinding {
    ChannelBinding { session: [1; 16], channel: 0 }
}

fn client_cfg(psk: Psk) -> ClientConfig {
    ClientConfig {
        creds: psk.into(),
        binding: binding(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}

impl Tcp {
    fn client(&self, psk: Psk) -> ClientConfig {
        ClientConfig { encryption: self.mode, ..client_cfg(psk) }
    }
}

impl Tcp {
    fn opts(&self) -> TcpOptions {
        if self.zstd {
            TcpOptions::zstd()
        } else {
            TcpOptions::default()
        }
    }

    fn acceptor(&self, psk: Psk) -> TcpAcceptor {
        let caps = if self.zstd { Caps::ALL } else { Caps(0) };
        let hs = ServerConfig { creds: psk.into(), caps, timeout: Duration::from_secs(5), encryption: self.mode };
        TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), self.opts(), hs).unwrap()
    }
}

struct Raw(TcpStream, Sealer);

impl RawPeer for Raw {
    fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        let sealed = self.1.seal_encoded(b);
        self.0.write_all(&sealed)
    }
    fn seal(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        Some(self.1.seal_encoded(frame))
    }
    fn write_wire(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write_all(b)
    }
    fn close(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

fn read_frame(s: &mut TcpStream) -> (ferry_transport::wire::FrameKind, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = FrameHeader::decode(&h).unwrap();
    let mut p = vec![0; h.len as usize];
    s.read_exact(&mut p).unwrap();
    (h.kind, p)
}

impl Backend for Tcp {
    fn name(&self) -> &'static str {
        if self.zstd {
            "zstd"
        } else {
            "tcp"
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
        let acc = self.acceptor(server);
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
            let c = tcp::connect(addr, &self.opts(), self.client(client));
            // a failed client closes its socket, so the server's handshake ends too
            (c, srv.join().unwrap())
        })
    }

    fn raw_pair(&self) -> Result<(Box<dyn RawPeer>, Channel), TransportError> {
        let acc = self.acceptor(Psk::new(TEST_KEY).unwrap());
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
            let mut s = TcpStream::connect(addr).unwrap();
            let now = Instant::now();
            let (mut m, hello) = ClientHandshake::start(self.client(Psk::new(TEST_KEY).unwrap()), random_bytes(), now);
            s.write_all(&hello).unwrap();
            loop {
                let (k, p) = read_frame(&mut s);
                match m.handle_frame(k, &p, Instant::now()).unwrap() {
                    Step::Send(f) => s.write_all(&f).unwrap(),
                    Step::Done(_) => break,
                    Step::Verified(_) => unreachable!(),
                }
            }
            let ch = srv.join().unwrap()?;
            let sealer = m.take_keys().expect("keys after the handshake").sealer();
            Ok((Box::new(Raw(s, sealer)) as Box<dyn RawPeer>, ch))
        })
    }

    fn zstd(&self) -> bool {
        self.zstd
    }

    fn encryption(&self) -> Encryption {
        self.mode
    }
}

macro_rules! suite {
    ($m:ident, $zstd:expr) => {
        mod $m {
            use super::*;
            suite!(@modes $zstd);
        }
    };
    (@modes $zstd:expr) => {
        mod aead {
            use super::*;
            suite!(@tests $zstd, Encryption::Aead);
        }
        mod integrity {
            use super::*;
            suite!(@tests $zstd, Encryption::Integrity);
        }
        mod off {
            use super::*;
            suite!(@tests $zstd, Encryption::Off);
        }
    };
    (@tests $zstd:expr, $mode:expr) => {
            #[test]
            fn round_trip_mixed() {
                conformance::round_trip_mixed(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn peer_closes_mid_batch() {
                conformance::peer_closes_mid_batch(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn slow_reader_backpressure() {
                conformance::slow_reader_backpressure(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn malformed_frames() {
                conformance::malformed_frames(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn wrong_key() {
                conformance::wrong_key(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn control_and_abort() {
                conformance::control_and_abort(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn tampered_frames() {
                conformance::tampered_frames(&Tcp { zstd: $zstd, mode: $mode });
            }
            #[test]
            fn refused_batch() {
                conformance::refused_batch(&Tcp { zstd: $zstd, mode: $mode });
            }
    };
}

suite!(tcp_backend, false);
suite!(zstd_backend, true);

#[test]
fn rejected_session_gets_a_reason() {
    let t = Tcp { zstd: false, mode: Encryption::Aead };
    let acc = t.acceptor(Psk::new(TEST_KEY).unwrap());
    let addr = acc.local_addr().unwrap();
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| acc.accept(&|_| Err("no migration with that session id".into())));
        let e = tcp::connect(addr, &t.opts(), client_cfg(Psk::new(TEST_KEY).unwrap())).unwrap_err();
        assert!(e.to_string().contains("no migration with that session id"), "{e}");
        assert!(srv.join().unwrap().is_err());
    });
}

#[test]
fn silent_client_times_out_and_acceptor_survives() {
    let t = Tcp { zstd: false, mode: Encryption::Aead };
    let hs = ServerConfig {
        creds: Psk::new(TEST_KEY).unwrap().into(),
        caps: Caps(0),
        timeout: Duration::from_millis(300),
        encryption: Default::default(),
    };
    let acc = TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), t.opts(), hs).unwrap();
    let addr = acc.local_addr().unwrap();
    let _silent = TcpStream::connect(addr).unwrap();
    let e = acc.accept(&|_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    // a good client still gets in afterwards
    std::thread::scope(|sc| {
        let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
        tcp::connect(addr, &t.opts(), client_cfg(Psk::new(TEST_KEY).unwrap())).unwrap();
        srv.join().unwrap().unwrap();
    });
}

/// Through the endpoint traits: an idle listener yields nothing within the wait and stays usable;
/// a channel opened by the options' connector arrives with its binding, leaves from the path's
/// local address, and never negotiates the `rdma` capability on a stream, even where both sides
/// list it.
#[test]
fn endpoint_traits_open_bound_channels_without_rdma() {
    let hs = ServerConfig {
        creds: Psk::new(TEST_KEY).unwrap().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let acc: Box<dyn Acceptor> =
        Box::new(TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::zstd(), hs).unwrap());
    assert_eq!(acc.transport(), "tcp");
    assert!(acc.accept_within(Duration::from_millis(20), &|_| Ok(())).unwrap().is_none());
    let addr = acc.local_addr().unwrap();
    let binding = ChannelBinding { session: random_bytes(), channel: 3 };
    let connector: &dyn Connector = &TcpOptions::zstd();
    assert_eq!(connector.transport(), "zstd");
    assert_eq!((&TcpOptions::default() as &dyn Connector).transport(), "tcp");
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
            assert!(ch.info.established.caps.contains(Caps::ZSTD));
            assert!(!ch.info.established.caps.contains(Caps::RDMA), "{:?}", ch.info.established.caps);
            assert_eq!(ch.info.backend, "zstd");
        }
        assert_eq!(s.info.peer.map(|a| a.ip()), Some(from.ip()), "the channel left from the path's local address");
    });
}

/// Both ends must run the same encryption mode: the destination refuses another one in the
/// handshake, and the source's error names both.
#[test]
fn encryption_mode_mismatch_is_refused_with_both_modes_named() {
    for (client, server) in [(Encryption::Off, Encryption::Aead), (Encryption::Aead, Encryption::Integrity)] {
        let t = Tcp { zstd: false, mode: server };
        let acc = t.acceptor(Psk::new(TEST_KEY).unwrap());
        let addr = acc.local_addr().unwrap();
        std::thread::scope(|sc| {
            let srv = sc.spawn(|| acc.accept(&|_| Ok(())));
            let cfg = ClientConfig { encryption: client, ..client_cfg(Psk::new(TEST_KEY).unwrap()) };
            let e = tcp::connect(addr, &t.opts(), cfg).unwrap_err().to_string();
            assert!(e.contains("encryption mode mismatch"), "{e}");
            assert!(e.contains(client.as_str()) && e.contains(server.as_str()), "{e}");
            let se = srv.join().unwrap().unwrap_err().to_string();
            assert!(se.contains("encryption mode mismatch"), "{se}");
        });
    }
}
