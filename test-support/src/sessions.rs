//! Multichannel sessions without the engine: a destination that admits channels and answers the
//! interface exchange, and interface discovery inside a testbed namespace.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_multichannel::{server_exchange, Admission, Interface};
use ferry_transport::handshake::{Caps, Psk, ServerConfig};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::{Channel, TransportError};

/// The key both ends of these sessions use.
pub fn psk() -> Psk {
    Psk::new(b"multichannel test key, 32 bytes!".to_vec()).expect("a valid key")
}

/// What the destination saw.
pub struct Served {
    /// Admitted channels, in accept order.
    pub channels: Vec<Channel>,
    /// The source's interfaces from the exchange on channel 0.
    pub source_ifaces: Vec<Interface>,
    /// Connections refused or failed (their errors).
    pub refused: Vec<TransportError>,
}

/// Listen on `0.0.0.0:0` (in the calling thread's namespace, after `enter`), answer the exchange
/// with `ifaces`, and accept `admitted` channels plus `strangers` refused connections.
pub fn serve(
    enter: Option<String>,
    ifaces: Vec<Interface>,
    admitted: usize,
    strangers: usize,
) -> (SocketAddr, JoinHandle<Served>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        if let Some(ns) = enter {
            crate::testbed::enter_netns(&ns).expect("entering the namespace");
        }
        let cfg = ServerConfig {
            creds: psk().into(),
            caps: Caps::ALL,
            timeout: Duration::from_secs(5),
            encryption: Default::default(),
        };
        let acc = TcpAcceptor::bind("0.0.0.0:0".parse().unwrap(), TcpOptions::default(), cfg).unwrap();
        let port = acc.local_addr().unwrap().port();
        tx.send(port).unwrap();
        let adm = Admission::new();
        let mut out = Served { channels: Vec::new(), source_ifaces: Vec::new(), refused: Vec::new() };
        while out.channels.len() < admitted || out.refused.len() < strangers {
            match acc.accept(&|e| adm.admit(e)) {
                Ok(mut ch) => {
                    if ch.info.established.binding.channel == 0 {
                        out.source_ifaces = server_exchange(&mut ch, &ifaces, port).unwrap();
                    }
                    out.channels.push(ch);
                }
                Err(e) => out.refused.push(e),
            }
        }
        out
    });
    let port = rx.recv_timeout(Duration::from_secs(10)).expect("server thread started");
    (SocketAddr::from(([0, 0, 0, 0], port)), h)
}

/// `ferry-ifaces --hex` (the program at `exe`) run in namespace `ns`, decoded (`ip netns exec`
/// mounts that namespace's sysfs, so speed and MTU are seen).
pub fn discover_in(exe: &str, ns: &str) -> Vec<Interface> {
    let o = Command::new("ip").args(["netns", "exec", ns, exe, "--hex"]).output().expect("running ip netns exec");
    assert!(o.status.success(), "ferry-ifaces in {ns}: {}", String::from_utf8_lossy(&o.stderr));
    let hex = String::from_utf8(o.stdout).expect("hex output");
    let hex = hex.trim();
    let bytes: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits")).collect();
    ferry_multichannel::codec::decode_list(&bytes).expect("an interface list")
}
