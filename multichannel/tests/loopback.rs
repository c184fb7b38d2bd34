//! The exchange and session opener over real channels on loopback (no namespaces needed).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferry_multichannel::*;
use ferry_test_support::sessions::{psk, serve};
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Psk};
use ferry_transport::tcp::{self, TcpOptions};
use ferry_transport::HandshakeError;
use ferry_transport::TransportError;

/// The peer's view of loopback: 127.0.0.2 (the kernel answers any 127/8 address).
fn peer_lo() -> Interface {
    Interface {
        name: "lo".into(),
        addrs: vec![IfAddr { ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), prefix: 8 }],
        speed_mbps: None,
        mtu: Some(65536),
        up: true,
        running: true,
        loopback: true,
        rdma: false,
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn client(session: [u8; 16], channel: u16, key: &Psk) -> ClientConfig {
    ClientConfig {
        creds: key.clone().into(),
        binding: ChannelBinding { session, channel },
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    }
}

#[test]
fn exchange_over_a_real_channel() {
    let mine = discover().unwrap();
    let (addr, h) = serve(None, vec![peer_lo()], 1, 0);
    let mut ch = tcp::connect(local(addr.port()), &TcpOptions::default(), client(random_bytes(), 0, &psk())).unwrap();
    let ans = client_exchange(&mut ch, &mine).unwrap();
    assert_eq!(ans, PeerAnswer { port: addr.port(), interfaces: vec![peer_lo()] });
    let served = h.join().unwrap();
    assert_eq!(served.source_ifaces, mine);
}

#[test]
fn garbage_is_refused_with_a_reason() {
    // A migration message (Prepare's tag 1) where the offer should be.
    let (addr, h) = std::thread::spawn(|| {
        let cfg = ferry_transport::handshake::ServerConfig {
            creds: psk().into(),
            caps: Caps::ALL,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let acc = tcp::TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), cfg).unwrap();
        let a = acc.local_addr().unwrap();
        (
            a,
            std::thread::spawn(move || {
                let mut ch = acc.accept(&|_| Ok(())).unwrap();
                server_exchange(&mut ch, &[peer_lo()], a.port())
            }),
        )
    })
    .join()
    .unwrap();
    let mut ch = tcp::connect(addr, &TcpOptions::default(), client(random_bytes(), 0, &psk())).unwrap();
    ch.tx.send_control(&[1, 1, 0, 0]).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("not an interface-exchange message"), "{e}");
    match ch.rx.recv(&ferry_memory::NoSink) {
        Ok(ferry_transport::Incoming::Control(m)) => {
            let ExchangeMsg::Refuse(r) = ExchangeMsg::decode(&m).unwrap() else { panic!("not a refusal") };
            assert!(r.contains("tag 0x01"), "{r}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn open_session_over_loopback_and_strangers_are_refused() {
    let policy = NetworkPolicy::default().with_channels_per_path(2).unwrap();
    let policy = NetworkPolicy { networks: "lo".parse::<NetworkPolicy>().unwrap().networks, ..policy };
    // 3 channels (0 to the first address, 2 on the lo path), then 3 strangers.
    let (addr, h) = serve(None, vec![peer_lo()], 3, 3);
    let (chans, plan) = open_session(local(addr.port()), psk(), &TcpOptions::default(), &policy).unwrap();
    assert!(plan.unusable.is_empty(), "{:?}", plan.unusable);
    assert_eq!(plan.paths.len(), 1);
    assert_eq!(chans.len(), 3);
    assert_eq!(plan.channels.len(), 3);
    let session = chans[0].info.established.binding.session;
    for (i, c) in chans.iter().enumerate() {
        assert_eq!(c.info.established.binding, ChannelBinding { session, channel: i as u16 });
        assert_eq!(plan.channels[i].index, i as u16);
    }
    assert_eq!(plan.channels[0].path, None); // 127.0.0.1 is not the path's remote (127.0.0.2)
    for c in &chans[1..] {
        assert_eq!(c.info.local.unwrap().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.info.peer.unwrap(), SocketAddr::from(([127, 0, 0, 2], addr.port())));
    }
    // A stranger claiming an unknown session, a second channel 0 of the session, a wrong key.
    let to = local(addr.port());
    let e = tcp::connect(to, &TcpOptions::default(), client(random_bytes(), 1, &psk())).unwrap_err();
    assert!(
        matches!(&e, TransportError::Handshake(HandshakeError::Rejected(r)) if r.contains("no migration session")),
        "{e}"
    );
    let e = tcp::connect(to, &TcpOptions::default(), client(session, 0, &psk())).unwrap_err();
    assert!(matches!(&e, TransportError::Handshake(HandshakeError::Rejected(r)) if r.contains("already open")), "{e}");
    let bad = Psk::new(b"another key of 32 bytes, not it!".to_vec()).unwrap();
    assert!(tcp::connect(to, &TcpOptions::default(), client(session, 3, &bad)).is_err());
    let served = h.join().unwrap();
    assert_eq!(served.channels.len(), 3);
    assert_eq!(served.refused.len(), 3);
    assert!(served.channels.iter().all(|c| c.info.established.binding.session == session));
}

#[test]
fn a_policy_nobody_can_use_is_an_error_and_the_session_is_not_opened() {
    let policy: NetworkPolicy = "198.19.250.0/24".parse().unwrap();
    let (addr, h) = serve(None, vec![peer_lo()], 1, 0);
    let e = open_session(local(addr.port()), psk(), &TcpOptions::default(), &policy).unwrap_err();
    assert!(e.to_string().contains("198.19.250.0/24: no local address"), "{e}");
    drop(h.join().unwrap());
}

#[test]
fn without_shared_networks_channel_zeros_route_carries_the_session() {
    // Unconfigured, the peer's only interface is loopback: no path; 2 channels to the first address.
    let policy = NetworkPolicy::default().with_channels_per_path(2).unwrap();
    let (addr, h) = serve(None, vec![peer_lo()], 2, 0);
    let (chans, plan) = open_session(local(addr.port()), psk(), &TcpOptions::default(), &policy).unwrap();
    assert!(plan.paths.is_empty() && plan.unusable.is_empty());
    assert_eq!(chans.len(), 2);
    assert!(chans.iter().all(|c| c.info.peer == Some(local(addr.port()))));
    assert_eq!(plan.channels[1].path, None);
    assert_eq!(h.join().unwrap().channels.len(), 2);
}

#[test]
fn a_silent_peer_times_out() {
    let cfg = ferry_transport::handshake::ServerConfig {
        creds: psk().into(),
        caps: Caps::ALL,
        timeout: Duration::from_secs(5),
        encryption: Default::default(),
    };
    let acc = tcp::TcpAcceptor::bind("127.0.0.1:0".parse().unwrap(), TcpOptions::default(), cfg).unwrap();
    let a = acc.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let mut ch = acc.accept(&|_| Ok(())).unwrap();
        let t = std::time::Instant::now();
        let r = server_exchange_within(&mut ch, &[peer_lo()], a.port(), Duration::from_millis(300));
        (r, t.elapsed())
    });
    // Connect and say nothing.
    let _ch = tcp::connect(a, &TcpOptions::default(), client(random_bytes(), 0, &psk())).unwrap();
    let (r, took) = h.join().unwrap();
    assert!(matches!(r, Err(McError::Timeout(_))), "{r:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}
