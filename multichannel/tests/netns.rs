//! Discovery, exchange, planning and session opening between two network namespaces joined by
//! three veth pairs (scripts/testbed.sh). Prints SKIP where namespaces cannot be made.

use std::net::{IpAddr, SocketAddr};

use ferry_multichannel::*;
use ferry_test_support::sessions::{psk, serve};
use ferry_test_support::testbed::{enter_netns, testbed_or_skip, Side, Testbed};
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig};
use ferry_transport::tcp::{self, TcpOptions};
use ferry_transport::{HandshakeError, TransportError};

/// The interfaces `ferry-ifaces` sees on one side of the testbed.
fn discover_on(tb: &Testbed, side: Side) -> Vec<Interface> {
    ferry_test_support::sessions::discover_in(env!("CARGO_BIN_EXE_ferry-ifaces"), &tb.netns(side))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn nic_addr(list: &[Interface], name: &str) -> Option<IfAddr> {
    list.iter().find(|i| i.name == name).and_then(|i| i.addrs.iter().find(|a| a.ip.is_ipv4()).copied())
}

#[test]
fn discovery_and_plans_in_namespaces() {
    let Some(tb) = testbed_or_skip("discovery_and_plans_in_namespaces", 3) else { return };
    let src = discover_on(&tb, Side::Src);
    let dst = discover_on(&tb, Side::Dst);
    for (list, host) in [(&src, 1), (&dst, 2)] {
        // Only lo and the testbed's NICs: eth0 stays in the root namespace.
        let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, vec!["lo", "nic0", "nic1", "nic2"]);
        for n in 0..3 {
            let i = list.iter().find(|i| i.name == format!("nic{n}")).unwrap();
            assert_eq!(i.addrs, vec![IfAddr { ip: ip(&format!("198.18.{n}.{host}")), prefix: 24 }]);
            assert!(i.usable() && !i.loopback && !i.rdma);
            assert_eq!(i.mtu, Some(1500));
            assert!(i.speed_mbps.is_some(), "veth reports a speed: {i:?}");
        }
    }
    // Unconfigured: nicN <-> nicN.
    let p = plan(&src, &dst, &NetworkPolicy::default()).unwrap();
    let pairs: Vec<_> =
        p.paths.iter().map(|x| (x.local_if.as_str(), x.local, x.remote_if.as_str(), x.remote)).collect();
    assert_eq!(
        pairs,
        (0..3)
            .map(|n| (
                ["nic0", "nic1", "nic2"][n],
                ip(&format!("198.18.{n}.1")),
                ["nic0", "nic1", "nic2"][n],
                ip(&format!("198.18.{n}.2"))
            ))
            .collect::<Vec<_>>()
    );
    // Two subnets, in priority order.
    let p = plan(&src, &dst, &"198.18.0.0/24:2,198.18.2.0/24:1".parse().unwrap()).unwrap();
    let order: Vec<_> = p.paths.iter().map(|x| (x.local_if.as_str(), x.priority)).collect();
    assert_eq!(order, vec![("nic2", 1), ("nic0", 2)]);
    // A subnet nobody has is reported, not replaced.
    let p = plan(&src, &dst, &"198.18.1.0/24,198.19.77.0/24".parse().unwrap()).unwrap();
    assert_eq!(p.paths.len(), 1);
    assert_eq!(p.unusable.len(), 1);
    assert_eq!(p.unusable[0].to_string(), "198.19.77.0/24: no local address in it");

    // A link taken down: it drops out of the unconfigured plan, and a policy naming it says so.
    tb.link_down(1).unwrap();
    let src_down = discover_on(&tb, Side::Src);
    let dst_down = discover_on(&tb, Side::Dst);
    assert!(!src_down.iter().find(|i| i.name == "nic1").unwrap().usable());
    let p = plan(&src_down, &dst_down, &NetworkPolicy::default()).unwrap();
    assert_eq!(p.paths.iter().map(|x| x.local_if.as_str()).collect::<Vec<_>>(), vec!["nic0", "nic2"]);
    let e = plan(&src_down, &dst_down, &"198.18.1.0/24".parse().unwrap()).unwrap_err();
    assert!(e.to_string().contains("local interface down (nic1)"), "{e}");
    tb.link_up(1).unwrap();

    // Discovery from a thread that setns-ed into a namespace sees that namespace's addresses
    // (sysfs still shows the root namespace, so values read there are not trusted).
    let ns = tb.netns(Side::Src);
    let in_thread = std::thread::spawn(move || {
        enter_netns(&ns).unwrap();
        discover().unwrap()
    })
    .join()
    .unwrap();
    for n in 0..3 {
        assert_eq!(nic_addr(&in_thread, &format!("nic{n}")).map(|a| a.ip), Some(ip(&format!("198.18.{n}.1"))));
    }
    assert!(in_thread.iter().all(|i| i.name != "eth0"));
}

#[test]
fn open_session_across_namespaces() {
    let Some(tb) = testbed_or_skip("open_session_across_namespaces", 3) else { return };
    let src = discover_on(&tb, Side::Src);
    let dst = discover_on(&tb, Side::Dst);
    // Destination: 3 session channels, then 2 strangers refused.
    let (addr, server) = serve(Some(tb.netns(Side::Dst)), dst.clone(), 3, 2);
    let ns = tb.netns(Side::Src);
    let src2 = src.clone();
    let (chans, plan, stranger, wrong_channel) = std::thread::spawn(move || {
        enter_netns(&ns).unwrap();
        let first = SocketAddr::new(ip("198.18.0.2"), addr.port());
        let (chans, plan) =
            open_session_with(first, psk(), &TcpOptions::default(), &NetworkPolicy::default(), &src2).unwrap();
        let cfg = |session, channel| ClientConfig {
            creds: psk().into(),
            binding: ChannelBinding { session, channel },
            caps: Caps::ALL,
            timeout: std::time::Duration::from_secs(5),
            encryption: Default::default(),
        };
        // A channel claiming an unknown session, on nic2.
        let o = TcpOptions { bind: Some(SocketAddr::new(ip("198.18.2.1"), 0)), ..TcpOptions::default() };
        let to = SocketAddr::new(ip("198.18.2.2"), addr.port());
        let stranger = tcp::connect(to, &o, cfg(random_bytes(), 1)).map(drop);
        // A second channel 1 of the real session.
        let session = chans[0].info.established.binding.session;
        let wrong_channel = tcp::connect(to, &o, cfg(session, 1)).map(drop);
        (chans, plan, stranger, wrong_channel)
    })
    .join()
    .unwrap();
    assert!(plan.unusable.is_empty());
    assert_eq!(chans.len(), 3);
    let session = chans[0].info.established.binding.session;
    for (n, c) in chans.iter().enumerate() {
        // Channel n runs on nicN: bound to 198.18.n.1, connected to 198.18.n.2.
        assert_eq!(c.info.established.binding, ChannelBinding { session, channel: n as u16 });
        assert_eq!(c.info.local.unwrap().ip(), ip(&format!("198.18.{n}.1")), "channel {n}");
        assert_eq!(c.info.peer.unwrap(), SocketAddr::new(ip(&format!("198.18.{n}.2")), addr.port()));
        assert_eq!(plan.channels[n].path, Some(n));
    }
    for (e, want) in [(stranger, "no migration session"), (wrong_channel, "already joined")] {
        let e = e.unwrap_err();
        assert!(matches!(&e, TransportError::Handshake(HandshakeError::Rejected(r)) if r.contains(want)), "{e}");
    }
    let served = server.join().unwrap();
    assert_eq!(served.source_ifaces, src, "the destination got the source's list");
    assert_eq!(served.channels.len(), 3);
    assert_eq!(served.refused.len(), 2);
    for (n, c) in served.channels.iter().enumerate() {
        assert_eq!(c.info.established.binding.session, session);
        assert_eq!(c.info.local.unwrap().ip(), ip(&format!("198.18.{n}.2")));
    }
}
