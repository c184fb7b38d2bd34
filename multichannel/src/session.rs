//! Sessions over many NICs: the exchange on channel 0, opening the planned channels, and the
//! destination's admission of channels.
//!
//! Source:
//! ```no_run
//! # use ferry_multichannel::*;
//! # use ferry_transport::{handshake::{random_bytes, Psk}, tcp::TcpOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let psk = Psk::new(random_bytes::<32>().to_vec())?; // the same key on every host
//! let policy: NetworkPolicy = "198.18.1.0/24:1,198.18.2.0/24:2".parse()?;
//! let (channels, plan) = open_session("198.18.1.2:7700".parse()?, &psk, &TcpOptions::default(), &policy)?;
//! for u in &plan.unusable {
//!     eprintln!("migration network unusable: {u}");
//! }
//! // channels[0] carries the migration protocol; plan.channels[i] says where channel i runs.
//! # Ok(()) }
//! ```
//!
//! Destination (listening on `0.0.0.0:port`): admit channels with [`Admission::admit`]; on a new
//! channel 0 call [`answer_session`] (or [`server_exchange`]) before the migration protocol.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ferry_memory::NoSink;
use ferry_transport::endpoint::{Connector, Path};
use ferry_transport::handshake::{random_bytes, Caps, ChannelBinding, ClientConfig, Established, SessionId};
use ferry_transport::Credentials;
use ferry_transport::{Channel, Incoming};

use crate::codec::ExchangeMsg;
use crate::error::{McError, Result};
use crate::iface::{discover, Interface};
use crate::plan::{plan, Plan};
use crate::policy::{NetworkPolicy, Unusable, UnusableReason};

/// Most channels a session may have.
pub const MAX_CHANNELS: usize = 256;
/// Time allowed for the peer's half of the exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for each channel's handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the destination answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAnswer {
    /// The port its listener accepts further channels on.
    pub port: u16,
    /// Its interfaces.
    pub interfaces: Vec<Interface>,
}

/// Run `f`; if it has not returned after `t`, cut the channel (so a blocked `recv` fails).
/// Returns `Err(Timeout)` if the cut happened, even if `f` then succeeded.
fn with_deadline<T>(ch: &mut Channel, t: Duration, f: impl FnOnce(&mut Channel) -> Result<T>) -> Result<T> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let fired = Arc::new(AtomicBool::new(false));
    let (killer, fired2) = (ch.killer.clone(), fired.clone());
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(t) {
            fired2.store(true, Ordering::SeqCst);
            killer();
        }
    });
    let r = f(ch);
    drop(done_tx);
    let _ = watchdog.join();
    if fired.load(Ordering::SeqCst) {
        return Err(McError::Timeout(t));
    }
    r
}

/// Wait for the next exchange message on `ch`.
fn recv_msg(ch: &mut Channel) -> Result<ExchangeMsg> {
    match ch.rx.recv(&NoSink).map_err(McError::Channel)? {
        Incoming::Control(m) => Ok(ExchangeMsg::decode(&m)?),
        Incoming::Batch(_) => Err(McError::Unexpected("page batch")),
        Incoming::Ack(_) => Err(McError::Unexpected("batch acknowledgement")),
        Incoming::Closed => Err(McError::PeerClosed),
    }
}

fn send_msg(ch: &mut Channel, m: &ExchangeMsg) -> Result<()> {
    let b = m.encode()?;
    ch.tx.send_control(&b).map_err(McError::Channel)
}

/// Refuse with `e`'s text (best effort), then return `e`.
fn refuse(ch: &mut Channel, e: McError) -> McError {
    if let Ok(b) = ExchangeMsg::Refuse(e.to_string()).encode() {
        let _ = ch.tx.send_control(&b);
    }
    e
}

/// Source side of the exchange on channel 0: send `local`, wait (up to [`EXCHANGE_TIMEOUT`])
/// for the destination's answer.
pub fn client_exchange(ch: &mut Channel, local: &[Interface]) -> Result<PeerAnswer> {
    client_exchange_within(ch, local, EXCHANGE_TIMEOUT)
}

/// [`client_exchange`] with its own time limit (on expiry the channel is cut).
pub fn client_exchange_within(ch: &mut Channel, local: &[Interface], timeout: Duration) -> Result<PeerAnswer> {
    send_msg(ch, &ExchangeMsg::Offer { interfaces: local.to_vec() })?;
    with_deadline(ch, timeout, |ch| match recv_msg(ch) {
        Ok(ExchangeMsg::Answer { port, interfaces }) => Ok(PeerAnswer { port, interfaces }),
        Ok(ExchangeMsg::Refuse(r)) => Err(McError::Refused(r)),
        Ok(ExchangeMsg::Offer { .. }) => {
            Err(refuse(ch, McError::Unexpected("offer (both sides think they are the source)")))
        }
        Err(e @ McError::Codec(_)) => Err(refuse(ch, e)),
        Err(e) => Err(e),
    })
}

/// Destination side of the exchange on channel 0: wait for the source's list, answer with
/// `local` and the `port` further channels connect to. Returns the source's interfaces.
/// Bad input is answered with a refusal and returned as an error. Waits up to
/// [`EXCHANGE_TIMEOUT`].
pub fn server_exchange(ch: &mut Channel, local: &[Interface], port: u16) -> Result<Vec<Interface>> {
    server_exchange_within(ch, local, port, EXCHANGE_TIMEOUT)
}

/// [`server_exchange`] with its own time limit (on expiry the channel is cut).
pub fn server_exchange_within(
    ch: &mut Channel,
    local: &[Interface],
    port: u16,
    timeout: Duration,
) -> Result<Vec<Interface>> {
    let theirs = with_deadline(ch, timeout, |ch| match recv_msg(ch) {
        Ok(ExchangeMsg::Offer { interfaces }) => Ok(interfaces),
        Ok(ExchangeMsg::Refuse(r)) => Err(McError::Refused(r)),
        Ok(ExchangeMsg::Answer { .. }) => {
            Err(refuse(ch, McError::Unexpected("answer (both sides think they are the destination)")))
        }
        Err(e @ McError::Codec(_)) => Err(refuse(ch, e)),
        Err(e) => Err(e),
    })?;
    send_msg(ch, &ExchangeMsg::Answer { port, interfaces: local.to_vec() })?;
    Ok(theirs)
}

/// Destination side when the caller has already read the source's first control message and
/// found it to be an exchange offer ([`crate::codec::is_exchange`]): decode it and answer with
/// this host's interfaces and `port`. Returns the source's interfaces.
pub fn answer_offer(ch: &mut Channel, offer: &[u8], port: u16) -> Result<Vec<Interface>> {
    let theirs = match ExchangeMsg::decode(offer) {
        Ok(ExchangeMsg::Offer { interfaces }) => interfaces,
        Ok(_) => return Err(refuse(ch, McError::Unexpected("an exchange message other than an offer first"))),
        Err(e) => return Err(refuse(ch, e.into())),
    };
    let local = match discover() {
        Ok(l) => l,
        Err(e) => return Err(refuse(ch, e)),
    };
    send_msg(ch, &ExchangeMsg::Answer { port, interfaces: local })?;
    Ok(theirs)
}

/// Destination side for a server: discover this host's interfaces and answer the exchange on a
/// freshly accepted channel 0 (call before handing it to the migration receiver). `port` is the
/// port the server listens on (on every address).
pub fn answer_session(ch0: &mut Channel, port: u16) -> Result<Vec<Interface>> {
    let local = match discover() {
        Ok(l) => l,
        Err(e) => return Err(refuse(ch0, e)),
    };
    server_exchange(ch0, &local, port)
}

/// Open a session to the destination at `first`: channel 0 to `first`, the interface exchange,
/// the plan, then the remaining channels bound to their planned local addresses. Channel `i` of
/// the result is `plan.channels[i]`. Configured networks that could not be used (or whose
/// channels failed to connect) are in `plan.unusable`: report them.
pub fn open_session(
    first: SocketAddr,
    creds: impl Into<Credentials>,
    opts: &dyn Connector,
    policy: &NetworkPolicy,
) -> Result<(Vec<Channel>, Plan)> {
    open_session_with(first, creds, opts, policy, &discover()?)
}

/// [`open_session`] with this host's interface list given (tests, or a caller that filtered it).
pub fn open_session_with(
    first: SocketAddr,
    creds: impl Into<Credentials>,
    opts: &dyn Connector,
    policy: &NetworkPolicy,
    local: &[Interface],
) -> Result<(Vec<Channel>, Plan)> {
    let creds: Credentials = creds.into();
    let session: SessionId = random_bytes();
    let cfg = |channel: u16| ClientConfig {
        creds: creds.clone(),
        binding: ChannelBinding { session, channel },
        caps: Caps::ALL,
        timeout: HANDSHAKE_TIMEOUT,
        encryption: Default::default(),
    };
    let mut ch0 = opts.connect(&Path::to(first), cfg(0)).map_err(|source| McError::Connect {
        index: 0,
        local: None,
        remote: first,
        source,
    })?;
    let answer = client_exchange(&mut ch0, local)?;
    let mut p = match plan(local, &answer.interfaces, policy) {
        Ok(p) => p,
        Err(e) => {
            let _ = ch0.tx.send_abort(1, &e.to_string());
            return Err(e);
        }
    };
    let specs = p.channel_specs(first, ch0.info.local, answer.port);
    if specs.len() > MAX_CHANNELS {
        let _ = ch0.tx.send_abort(1, "too many channels planned");
        return Err(McError::TooManyChannels(specs.len()));
    }
    let mut channels = vec![ch0];
    let mut opened = vec![specs[0].clone()];
    let mut failed_paths: Vec<usize> = Vec::new();
    for s in &specs[1..] {
        if s.path.is_some_and(|i| failed_paths.contains(&i)) {
            continue;
        }
        let index = channels.len() as u16;
        let path = Path { remote: s.remote, local: s.local, device: s.device.clone() };
        match opts.connect(&path, cfg(index)) {
            Ok(c) => {
                channels.push(c);
                opened.push(crate::plan::ChannelSpec { index, ..s.clone() });
            }
            Err(source) => {
                let err = McError::Connect { index, local: s.local, remote: s.remote, source };
                let Some(i) = s.path else { return Err(err) };
                if policy.strict {
                    let _ = channels[0].tx.send_abort(1, &err.to_string());
                    return Err(err);
                }
                // Report the path's network as unusable; its other channels are not tried.
                failed_paths.push(i);
                let path = &p.paths[i];
                let network = policy
                    .networks
                    .iter()
                    .find(|e| e.network.matches(&path.local_if, path.local))
                    .map(|e| e.network.clone())
                    .unwrap_or(crate::policy::Network::Interface(path.local_if.clone()));
                p.unusable.push(Unusable { network, reason: UnusableReason::ConnectFailed(err.to_string()) });
            }
        }
    }
    p.channels = opened;
    Ok((channels, p))
}

/// The destination's admission of channels: channel 0 opens a session; other channels join only
/// a session that is open, each index at most once. Share it (it is cheap to clone) between the
/// accept loop and the sessions, and [`Admission::close`] a session when it ends.
#[derive(Clone, Default)]
pub struct Admission {
    open: Arc<Mutex<HashMap<SessionId, HashSet<u16>>>>,
}

impl Admission {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decide on an authenticated channel (pass to `TcpAcceptor::accept` / `handshake`).
    /// Admitting registers the channel.
    pub fn admit(&self, est: &Established) -> std::result::Result<(), String> {
        let b = est.binding;
        let mut m = self.open.lock().map_err(|_| "admission registry poisoned".to_string())?;
        match (b.channel, m.get_mut(&b.session)) {
            (0, None) => {
                m.insert(b.session, HashSet::from([0]));
                Ok(())
            }
            (0, Some(_)) => Err("session already open".into()),
            (i, Some(joined)) => {
                if usize::from(i) >= MAX_CHANNELS {
                    Err(format!("channel index {i} beyond the session limit"))
                } else if joined.insert(i) {
                    Ok(())
                } else {
                    Err(format!("channel {i} already joined this session"))
                }
            }
            (_, None) => Err("no migration session with that id".into()),
        }
    }

    /// Whether `session` is open.
    pub fn is_open(&self, session: &SessionId) -> bool {
        self.open.lock().map(|m| m.contains_key(session)).unwrap_or(false)
    }

    /// Forget a session (its remaining channels are then refused).
    pub fn close(&self, session: &SessionId) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(session);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.open.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Admission").field("open_sessions", &n).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_transport::handshake::ChannelBinding;

    fn est(session: u8, channel: u16) -> Established {
        Established {
            version: 2,
            caps: Caps(0),
            binding: ChannelBinding { session: [session; 16], channel },
            encryption: Default::default(),
            peer_cert: None,
        }
    }

    #[test]
    fn admission_rules() {
        let a = Admission::new();
        assert_eq!(a.admit(&est(1, 1)), Err("no migration session with that id".into()));
        assert_eq!(a.admit(&est(1, 0)), Ok(()));
        assert!(a.is_open(&[1; 16]));
        assert_eq!(a.admit(&est(1, 0)), Err("session already open".into()));
        assert_eq!(a.admit(&est(1, 1)), Ok(()));
        assert!(a.admit(&est(1, 1)).unwrap_err().contains("already joined"));
        assert!(a.admit(&est(1, 999)).unwrap_err().contains("limit"));
        assert!(a.admit(&est(2, 3)).is_err());
        a.close(&[1; 16]);
        assert!(a.admit(&est(1, 2)).is_err());
    }
}
