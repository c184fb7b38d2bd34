//! Test helpers: a destination that admits and answers sessions, and a namespace testbed.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_multichannel::{server_exchange, Admission, Interface};
use ferry_transport::handshake::{Caps, Psk, ServerConfig};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::{Channel, TransportError};

pub fn psk() -> Psk {
    Psk::new(b"multichannel test key, 32 bytes!".to_vec()).unwrap()
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
            enter_netns(&ns);
        }
        let cfg = ServerConfig { psk: psk(), caps: Caps::ALL, timeout: Duration::from_secs(5) };
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

/// Move the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/testbed.sh");

/// Two namespaces joined by veth pairs (scripts/testbed.sh), removed on drop.
pub struct Testbed {
    pub name: String,
}

fn script(args: &[&str]) -> Result<String, String> {
    let o = Command::new("bash").arg(SCRIPT).args(args).output().map_err(|e| format!("running {SCRIPT}: {e}"))?;
    if !o.status.success() {
        return Err(format!("testbed.sh {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

impl Testbed {
    /// Bring up `nics` unlimited links; `Err(reason)` when this machine cannot.
    pub fn up(nics: u32) -> Result<Self, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("needs root for network namespaces".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("the ip command is missing".into());
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("mc{}x{}", std::process::id() % 1_000_000, N.fetch_add(1, Ordering::SeqCst));
        script(&["up", "--name", &name, "--nics", &nics.to_string(), "--rate", "none"])?;
        Ok(Self { name })
    }

    pub fn src(&self) -> String {
        format!("{}-src", self.name)
    }

    pub fn dst(&self) -> String {
        format!("{}-dst", self.name)
    }

    pub fn link(&self, nic: u32, up: bool) {
        script(&[if up { "link-up" } else { "link-down" }, "--name", &self.name, "--nic", &nic.to_string()]).unwrap();
    }

    /// `ferry-ifaces --hex` run in namespace `ns` (`ip netns exec` mounts that namespace's
    /// sysfs, so speed and MTU are seen), decoded.
    pub fn discover_in(&self, ns: &str) -> Vec<Interface> {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry-ifaces"), "--hex"])
            .output()
            .unwrap();
        assert!(o.status.success(), "ferry-ifaces in {ns}: {}", String::from_utf8_lossy(&o.stderr));
        let hex = String::from_utf8(o.stdout).unwrap();
        let hex = hex.trim();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        ferry_multichannel::codec::decode_list(&bytes).unwrap()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = script(&["down", "--name", &self.name]) {
            eprintln!("removing testbed {}: {e}", self.name);
        }
    }
}

/// `Testbed::up`, or print SKIP and return `None`.
pub fn testbed_or_skip(test: &str, nics: u32) -> Option<Testbed> {
    match Testbed::up(nics) {
        Ok(t) => Some(t),
        Err(reason) => {
            eprintln!("SKIP: {test}: {reason}");
            None
        }
    }
}
