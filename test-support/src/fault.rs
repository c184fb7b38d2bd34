//! Fault injection for the live tests, outside the engine's types: the source's channels are
//! wrapped, and the wrappers act when a given protocol step goes by (a control message sent or
//! received, an acknowledgement of a round). The engine cannot tell them from real channels.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_memory::{MemorySink, MemorySource};
use ferry_migrate::protocol::Msg;
use ferry_migrate::source::CancelToken;
use ferry_transport::wire::{Ack, PageRun, PAGE_SIZE};
use ferry_transport::{Channel, ChannelRx, ChannelTx, Incoming, Killer, SentBatch};

type Result<T> = std::result::Result<T, ferry_transport::TransportError>;

/// A protocol step at which a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Right after the destination accepted the VM (`PrepareOk` received).
    AfterPrepare,
    /// At the first acknowledgement of round N.
    InRound(u32),
    /// After the source paused, as it announces the final round (`Switchover` sent).
    AtSwitchover,
    /// After the final round, as `Complete` goes out.
    BeforeComplete,
    /// After `Ready` arrived, before `Commit` is sent.
    BeforeCommit,
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Cut channel N.
    KillChannel(u16),
    /// Cut every channel (as if the destination process died).
    KillAll,
    /// Cancel the migration.
    Cancel,
    /// Send a control message that does not decode.
    CorruptControl,
}

/// What the wrapped channels do besides a fault at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misbehave {
    /// Nothing else.
    #[default]
    None,
    /// Channel `channel` goes silent after `after_acks` acknowledgements, as if its path hung:
    /// no error, no close, nothing more read (the destination keeps receiving and
    /// acknowledging, the source never hears of it) until the source cuts the channel.
    Stall {
        /// Data channel index.
        channel: u16,
        /// Acknowledgements it passes first.
        after_acks: u64,
    },
    /// Round 0's pages at or above `from_gpa` travel as zero pages: the destination's image
    /// differs from the source's, and verification must catch it.
    CorruptFrom {
        /// First guest-physical address whose pages are lost on the way.
        from_gpa: u64,
    },
    /// The destination's `Resumed` never reaches the source (the confirmation of a commit is lost).
    LoseResumed,
}

struct Injector {
    point: Option<FaultPoint>,
    action: Option<FaultAction>,
    fired: AtomicBool,
    killers: Vec<Killer>,
    tx0: Arc<Mutex<Box<dyn ChannelTx>>>,
    cancel: CancelToken,
}

impl Injector {
    fn at(&self, p: FaultPoint) {
        if self.point != Some(p) || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.action {
            Some(FaultAction::KillChannel(i)) => {
                if let Some(k) = self.killers.get(i as usize) {
                    k();
                }
            }
            Some(FaultAction::KillAll) => self.killers.iter().for_each(|k| k()),
            Some(FaultAction::Cancel) => self.cancel.cancel(),
            Some(FaultAction::CorruptControl) => {
                if let Ok(mut t) = self.tx0.lock() {
                    let _ = t.send_control(&[0xEE, 1, 2, 3]);
                }
            }
            None => {}
        }
    }
}

struct FaultTx {
    inner: Arc<Mutex<Box<dyn ChannelTx>>>,
    inj: Arc<Injector>,
    misbehave: Misbehave,
}

impl ChannelTx for FaultTx {
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.inner.lock().unwrap().send_batch(id, round, flags, runs, src)
    }

    fn send_batch_mapped(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        data_map: &[u8],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        if let Misbehave::CorruptFrom { from_gpa } = self.misbehave {
            if round == 0 {
                let mut map = data_map.to_vec();
                let mut k = 0usize;
                for r in runs {
                    for p in 0..u64::from(r.pages) {
                        if r.gpa + p * PAGE_SIZE as u64 >= from_gpa {
                            map[k / 8] &= !(1 << (k % 8));
                        }
                        k += 1;
                    }
                }
                return self.inner.lock().unwrap().send_batch_mapped(id, round, flags, runs, &map, src);
            }
        }
        self.inner.lock().unwrap().send_batch_mapped(id, round, flags, runs, data_map, src)
    }

    fn send_control(&mut self, msg: &[u8]) -> Result<()> {
        match Msg::decode(msg) {
            Ok(Msg::Switchover { .. }) => self.inj.at(FaultPoint::AtSwitchover),
            Ok(Msg::Complete { .. }) => self.inj.at(FaultPoint::BeforeComplete),
            _ => {}
        }
        self.inner.lock().unwrap().send_control(msg)
    }

    fn send_ack(&mut self, ack: Ack) -> Result<()> {
        self.inner.lock().unwrap().send_ack(ack)
    }

    fn send_abort(&mut self, code: u16, reason: &str) -> Result<()> {
        self.inner.lock().unwrap().send_abort(code, reason)
    }

    fn end_round(&mut self) -> Result<()> {
        self.inner.lock().unwrap().end_round()
    }

    fn close(&mut self) -> Result<()> {
        self.inner.lock().unwrap().close()
    }
}

struct FaultRx {
    inner: Box<dyn ChannelRx>,
    index: u16,
    inj: Arc<Injector>,
    misbehave: Misbehave,
    acks: AtomicU64,
    killed: Arc<AtomicBool>,
}

impl ChannelRx for FaultRx {
    fn memory_sealer(&self) -> Option<Killer> {
        // A wrapped rdma channel still stops one-sided writes at Complete.
        self.inner.memory_sealer()
    }

    fn recv(&mut self, sink: &dyn MemorySink) -> Result<Incoming> {
        loop {
            if let Misbehave::Stall { channel, after_acks } = self.misbehave {
                if channel == self.index && self.acks.load(Ordering::SeqCst) >= after_acks {
                    // Hung path: nothing more until the source cuts the channel.
                    while !self.killed.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return Ok(Incoming::Closed);
                }
            }
            let got = self.inner.recv(sink)?;
            match &got {
                Incoming::Ack(a) => {
                    self.acks.fetch_add(1, Ordering::SeqCst);
                    self.inj.at(FaultPoint::InRound(a.round));
                }
                Incoming::Control(m) if self.index == 0 => match Msg::decode(m) {
                    Ok(Msg::PrepareOk) => self.inj.at(FaultPoint::AfterPrepare),
                    Ok(Msg::Ready) => self.inj.at(FaultPoint::BeforeCommit),
                    Ok(Msg::Resumed) if self.misbehave == Misbehave::LoseResumed => continue,
                    _ => {}
                },
                _ => {}
            }
            return Ok(got);
        }
    }
}

/// Wrap the source's channels: `fault` fires once at its step; `misbehave` applies throughout.
/// `cancel` is the migration's cancel token (for [`FaultAction::Cancel`]).
pub fn inject(
    channels: Vec<Channel>,
    fault: Option<(FaultPoint, FaultAction)>,
    misbehave: Misbehave,
    cancel: &CancelToken,
) -> Vec<Channel> {
    let mut channels = channels;
    let killed: Vec<Arc<AtomicBool>> = channels.iter().map(|_| Arc::new(AtomicBool::new(false))).collect();
    let killers: Vec<Killer> = channels
        .iter()
        .zip(&killed)
        .map(|(c, flag)| {
            let (inner, flag) = (c.killer.clone(), flag.clone());
            Arc::new(move || {
                flag.store(true, Ordering::SeqCst);
                inner();
            }) as Killer
        })
        .collect();
    // Channel 0's sending half is shared with the injector (to send a corrupt message).
    let first = channels.remove(0);
    let tx0: Arc<Mutex<Box<dyn ChannelTx>>> = Arc::new(Mutex::new(first.tx));
    let inj = Arc::new(Injector {
        point: fault.map(|f| f.0),
        action: fault.map(|f| f.1),
        fired: AtomicBool::new(false),
        killers: killers.clone(),
        tx0: tx0.clone(),
        cancel: cancel.clone(),
    });
    let mut out = Vec::new();
    let rest = std::iter::once((tx0, first.rx, first.info, 0usize))
        .chain(channels.into_iter().enumerate().map(|(i, c)| (Arc::new(Mutex::new(c.tx)), c.rx, c.info, i + 1)));
    for (tx, rx, info, i) in rest {
        out.push(Channel {
            tx: Box::new(FaultTx { inner: tx, inj: inj.clone(), misbehave }),
            rx: Box::new(FaultRx {
                inner: rx,
                index: i as u16,
                inj: inj.clone(),
                misbehave,
                acks: AtomicU64::new(0),
                killed: killed[i].clone(),
            }),
            info,
            killer: killers[i].clone(),
        });
    }
    out
}
