//! A man-in-the-middle on the migration network: a TCP relay between a source and a destination
//! that reads Ferry's frames (the 16-byte header says each frame's length) and, once, in the
//! phase it is told, tampers with what the source sends: flips a byte of a frame, drops a
//! frame, injects a forged frame, or replays a frame. Everything else it relays unchanged, in
//! both directions. It holds no key: what it does is what an on-path attacker can do.
//!
//! Phases are recognised from frame kinds and sizes only, so they are found whether payloads are
//! sealed or not: `PreCopy` is the source's third page batch (round 0); `Switchover` is the VM
//! state (the first control message of the source over 40 bytes once pages moved: it is sent
//! with the VM paused, after `Switchover`); `Commit` is the source's first control message after
//! the destination's second (`PrepareOk`, then `Ready`).

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_transport::wire::{FrameHeader, FrameKind, HEADER_LEN};

/// When to strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// During pre-copy (round 0's third batch).
    PreCopy,
    /// At switchover (the first frame after the `Switchover` message).
    Switchover,
    /// At commit (the `Commit` message).
    Commit,
}

/// What to do to the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Flip one bit of its payload (the frame header stays valid).
    Flip,
    /// Do not relay it.
    Drop,
    /// Relay it, then a forged frame of the same kind (for a batch: the same pages, other bytes).
    Inject,
    /// Relay it twice.
    Replay,
    /// Strike nowhere: relay everything, and record the source's handshake frames (of its
    /// first connection) for [`Mitm::recorded`].
    Record,
}

#[derive(Default)]
struct State {
    batches: u32,
    /// Control messages the destination sent.
    dst_controls: u32,
    done: Option<String>,
    /// The source's handshake frames of the first connection (with [`Attack::Record`]).
    recorded: Vec<Vec<u8>>,
    connections: u32,
}

/// A running relay.
pub struct Mitm {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    accept: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read one frame (header and payload); `None` at a clean end of stream.
fn read_frame(r: &mut TcpStream) -> std::io::Result<Option<(FrameKind, Vec<u8>)>> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..])?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        got += n;
    }
    let fh = FrameHeader::decode(&h).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut frame = h.to_vec();
    frame.resize(HEADER_LEN + fh.len as usize, 0);
    r.read_exact(&mut frame[HEADER_LEN..])?;
    Ok(Some((fh.kind, frame)))
}

impl Mitm {
    /// Listen on `ip` (a free port) and relay every connection to `upstream`, striking once.
    pub fn start(ip: IpAddr, upstream: SocketAddr, phase: Phase, attack: Attack) -> std::io::Result<Mitm> {
        let l = TcpListener::bind(SocketAddr::new(ip, 0))?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State::default()));
        let (st, stt) = (stop.clone(), state.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let Ok(s) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                            continue;
                        };
                        let (c2, s2) = match (c.try_clone(), s.try_clone()) {
                            (Ok(a), Ok(b)) => (a, b),
                            _ => continue,
                        };
                        let (stt2, stt3) = (stt.clone(), stt.clone());
                        std::thread::spawn(move || pump_source(c, s, stt2, phase, attack));
                        std::thread::spawn(move || pump_destination(s2, c2, stt3));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Mitm { addr, stop, state, accept: Some(accept) })
    }

    /// Where the source should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the relay did, once it struck.
    pub fn struck(&self) -> Option<String> {
        lock(&self.state).done.clone()
    }

    /// The source's handshake frames it recorded ([`Attack::Record`]), as sent.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        lock(&self.state).recorded.clone()
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Destination to source: relayed unchanged, control messages counted.
fn pump_destination(mut from: TcpStream, mut to: TcpStream, state: Arc<Mutex<State>>) {
    while let Ok(Some((kind, frame))) = read_frame(&mut from) {
        if kind == FrameKind::Control {
            lock(&state).dst_controls += 1;
        }
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Source to destination: frame by frame, striking once in `phase`.
fn pump_source(mut from: TcpStream, mut to: TcpStream, state: Arc<Mutex<State>>, phase: Phase, attack: Attack) {
    let first = {
        let mut s = lock(&state);
        s.connections += 1;
        s.connections == 1
    };
    while let Ok(Some((kind, mut frame))) = read_frame(&mut from) {
        let strike = {
            let mut s = lock(&state);
            if attack == Attack::Record {
                if first && matches!(kind, FrameKind::ClientHello | FrameKind::ClientProof) {
                    s.recorded.push(frame.clone());
                }
                false
            } else {
                let payload_len = frame.len() - HEADER_LEN;
                if kind == FrameKind::PageBatch {
                    s.batches += 1;
                }
                let control = kind == FrameKind::Control;
                let hit = s.done.is_none()
                    && match phase {
                        Phase::PreCopy => kind == FrameKind::PageBatch && s.batches == 3,
                        Phase::Switchover => control && s.batches > 0 && payload_len > 40,
                        Phase::Commit => control && s.dst_controls >= 2,
                    };
                if hit {
                    s.done = Some(format!("{attack:?} on a {kind:?} frame of {} bytes at {phase:?}", frame.len()));
                }
                hit
            }
        };
        let mut out: Vec<Vec<u8>> = Vec::new();
        match (strike, attack) {
            (false, _) => out.push(frame),
            (true, Attack::Flip) => {
                let at = HEADER_LEN + (frame.len() - HEADER_LEN) / 2;
                if at < frame.len() {
                    frame[at] ^= 0x40;
                }
                out.push(frame);
            }
            (true, Attack::Drop) => {}
            (true, Attack::Inject) => {
                let mut forged = frame.clone();
                // Other bytes where the data is (the tail of a batch, the body of a message).
                let n = forged.len();
                for b in &mut forged[(HEADER_LEN + (n - HEADER_LEN) / 2)..] {
                    *b = !*b;
                }
                if kind == FrameKind::Control {
                    // Keep the message's tag: the forged message is of the same kind.
                    forged[HEADER_LEN] = frame[HEADER_LEN];
                }
                out.push(frame);
                out.push(forged);
            }
            (true, Attack::Replay) => {
                out.push(frame.clone());
                out.push(frame);
            }
            (true, Attack::Record) => out.push(frame),
        }
        for f in out {
            if to.write_all(&f).is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
