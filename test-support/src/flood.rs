//! A flood of idle connections against a listener, as an attacker without a key holds one: `n`
//! TCP connections that never say a word, spread over several source addresses, each reopened
//! (once a sweep) when the listener closes it. Tests and `migration-bench live --flood` run a
//! legitimate migration while it holds.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// What a flood did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// Connections it tries to hold.
    pub connections: usize,
    /// Connections opened (first opens and reopens).
    pub opened: u64,
    /// Connections the listener closed (found closed at a sweep).
    pub closed_by_listener: u64,
    /// Connects that failed.
    pub connect_failed: u64,
}

/// A running flood (stopped and its connections closed on [`IdleFlood::stop`] or drop).
pub struct IdleFlood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    thread: Option<JoinHandle<FloodStats>>,
}

/// `k` loopback source addresses, 127.1.0.1 onwards (all of 127.0.0.0/8 is loopback on Linux).
pub fn loopback_sources(k: usize) -> Vec<IpAddr> {
    (0..k).map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (1 + i % 250) as u8))).collect()
}

fn connect(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Whether the listener closed `s` (end of stream or an error; silence means open).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

impl IdleFlood {
    /// Open `n` idle connections to `to`, from `sources` in turn, and keep them open: every
    /// `sweep`, the ones the listener closed are opened again.
    pub fn start(to: SocketAddr, n: usize, sources: Vec<IpAddr>, sweep: Duration) -> IdleFlood {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let (st, op) = (stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            let mut stats = FloodStats { connections: n, ..Default::default() };
            let from = |i: usize| sources[i % sources.len().max(1)];
            let open = |i: usize, stats: &mut FloodStats| match connect(from(i), to) {
                Ok(s) => {
                    stats.opened += 1;
                    op.fetch_add(1, Ordering::SeqCst);
                    Some(s)
                }
                Err(_) => {
                    stats.connect_failed += 1;
                    None
                }
            };
            let mut conns: Vec<Option<TcpStream>> = Vec::with_capacity(n);
            for i in 0..n {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                conns.push(open(i, &mut stats));
            }
            while !st.load(Ordering::SeqCst) {
                let until = Instant::now() + sweep;
                while Instant::now() < until && !st.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                for (i, c) in conns.iter_mut().enumerate() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let gone = match c {
                        Some(s) => closed(s),
                        None => true,
                    };
                    if gone {
                        if c.is_some() {
                            stats.closed_by_listener += 1;
                        }
                        *c = open(i, &mut stats);
                    }
                }
            }
            // A last look: what the listener closed since the last sweep.
            stats.closed_by_listener += conns.iter_mut().flatten().map(closed).filter(|&c| c).count() as u64;
            stats
        });
        IdleFlood { stop, opened, thread: Some(thread) }
    }

    /// Wait until the flood has opened at least `n` connections (first opens and reopens), or
    /// `limit` passed; whether it has.
    pub fn wait_opened(&self, n: u64, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while self.opened.load(Ordering::SeqCst) < n {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Stop, close every connection, and say what the flood did.
    pub fn stop(mut self) -> FloodStats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
