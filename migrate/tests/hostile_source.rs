//! An authenticated source that breaks the protocol, against a live destination on loopback:
//! a batch of a stale round, a batch after `Complete`, a batch after the commit, and a
//! destination whose VM will not resume after the commit. The destination refuses each batch
//! before writing it (its guest memory, watched through a factory that keeps a handle on it, is
//! unchanged), aborts what is not committed, and a commit that does not resume is a failure
//! after which the source runs its own copy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_memory::digest::PageTable;
use ferry_memory::scan::{scan_slice_keyed, zero_page_hash_keyed, HashKey};
use ferry_memory::{MemoryMap, NoSink};
use ferry_migrate::protocol::{Msg, MIGRATION_VERSION};
use ferry_migrate::server::connect_simple;
use ferry_migrate::source::{migrate, MigrationConfig};
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::{SourceVm, TargetFactory, TargetVm, VmError, VmShape};
use ferry_migrate::MigrateError;
use ferry_test_support::guest::{guest, into_synthetic, NoResume};
use ferry_test_support::server;
use ferry_transport::handshake::Psk;
use ferry_transport::tcp::TcpOptions;
use ferry_transport::wire::{PageRun, PAGE_SIZE};
use ferry_transport::{Channel, Incoming, TransportError};
use ferry_vmm_glue::synthetic::{SyntheticFactory, SyntheticVm};

const KEY: &[u8] = b"hostile-source-test-key-0123456789";
/// Longest wait for any one outcome before the test counts it as a hang.
const PATIENCE: Duration = Duration::from_secs(120);

fn psk() -> Psk {
    Psk::new(KEY).unwrap()
}

/// A synthetic factory that keeps a handle on every VM's memory it creates (a map keeps its
/// memory mapped), so a test can look at the destination's memory after the VM is gone.
struct Spy {
    inner: SyntheticFactory,
    maps: Mutex<Vec<MemoryMap>>,
    /// Make every VM's resume fail.
    resume_fails: bool,
}

impl TargetFactory for Spy {
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError> {
        let vm = self.inner.create(shape)?;
        self.maps.lock().unwrap().push(vm.memory());
        Ok(if self.resume_fails { Box::new(NoResume(vm)) } else { vm })
    }
}

struct Dest {
    addr: SocketAddr,
    outcomes: std::sync::mpsc::Receiver<Result<TargetOutcome, MigrateError>>,
    spy: Arc<Spy>,
}

fn destination(resume_fails: bool) -> Dest {
    let spy =
        Arc::new(Spy { inner: SyntheticFactory::new(1 << 30, false), maps: Mutex::new(Vec::new()), resume_fails });
    let r = server::loopback(psk(), TcpOptions::default(), spy.clone(), TargetConfig::default(), Some(1));
    Dest { addr: r.addr, outcomes: r.outcomes, spy }
}

impl Dest {
    fn outcome(&self) -> Result<TargetOutcome, MigrateError> {
        self.outcomes.recv_timeout(PATIENCE).expect("the destination's outcome")
    }

    /// Page `i` of the destination's (possibly discarded) VM.
    fn page(&self, gpa: u64) -> Vec<u8> {
        let maps = self.spy.maps.lock().unwrap();
        let mut b = vec![0u8; PAGE_SIZE];
        maps[0].lookup(gpa, PAGE_SIZE).expect("page in the destination's memory").read_into(0, &mut b);
        b
    }
}

/// A source driven by hand: a paused synthetic guest and the session's channels.
struct Hand {
    vm: SyntheticVm,
    map: MemoryMap,
    ch: Vec<Channel>,
    next_id: u64,
}

impl Hand {
    /// Connect `channels` channels and get through Prepare.
    fn prepare(addr: SocketAddr, channels: usize, name: &str) -> Hand {
        let mut vm = guest(name, 1, 0, 0, 5);
        vm.pause().unwrap();
        let map = vm.memory();
        let mut ch = connect_simple(addr, channels, &TcpOptions::default(), psk()).expect("channels");
        let prepare = Msg::Prepare {
            version: MIGRATION_VERSION,
            shape: vm.shape(),
            channels: channels as u16,
            verify_full: false,
        };
        ch[0].tx.send_control(&prepare.encode()).unwrap();
        let mut h = Hand { vm, map, ch, next_id: 1 };
        assert_eq!(h.control(), Msg::PrepareOk);
        h
    }

    fn control(&mut self) -> Msg {
        match self.ch[0].rx.recv(&NoSink) {
            Ok(Incoming::Control(m)) => Msg::decode(&m).unwrap(),
            other => panic!("expected a control message, got {other:?}"),
        }
    }

    /// The first page of the first region.
    fn gpa0(&self) -> u64 {
        self.vm.shape().regions[0].0
    }

    fn fill(&self, gpa: u64, byte: u8) {
        self.map.lookup(gpa, PAGE_SIZE).unwrap().write_from(0, &[byte; PAGE_SIZE]);
    }

    fn send(&mut self, channel: usize, round: u32, runs: &[PageRun]) -> Result<(), TransportError> {
        self.next_id += 1;
        self.ch[channel].tx.send_batch(self.next_id, round, 0, runs, &self.map).map(|_| ())
    }

    fn ack(&mut self, channel: usize) {
        match self.ch[channel].rx.recv(&NoSink) {
            Ok(Incoming::Ack(_)) => {}
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Round 0 over every page (on channel 0), the state and Complete with the right digest;
    /// the destination answers Ready.
    fn complete(&mut self) {
        let shape = self.vm.shape();
        let pages = (shape.memory_bytes() / PAGE_SIZE as u64) as usize;
        // Keyed with channel 0's image key, as the engine's source does.
        let key = HashKey::from_secret(self.ch[0].info.image_key.bytes());
        let table = PageTable::with_key(pages, zero_page_hash_keyed(&key), &key);
        let mut first = 0usize;
        for &(gpa, len) in &shape.regions {
            let n = (len / PAGE_SIZE as u64) as u32;
            self.send(0, 0, &[PageRun { gpa, pages: n }]).unwrap();
            self.ack(0);
            scan_slice_keyed(self.map.lookup(gpa, len as usize).unwrap(), &key, |p, s| table.set(first + p, s.hash));
            first += n as usize;
        }
        let state = self.vm.save_state().unwrap();
        self.ch[0].tx.send_control(&Msg::StateChunk { offset: 0, data: state.clone() }.encode()).unwrap();
        let complete = Msg::Complete {
            state_len: state.len() as u64,
            state_crc: crc32fast::hash(&state),
            digest: table.digest(),
            pages: pages as u64,
        };
        self.ch[0].tx.send_control(&complete.encode()).unwrap();
        assert_eq!(self.control(), Msg::Ready);
    }

    /// Read channel 0 to its end: the destination's refusal (if any) and abort.
    fn refusal(&mut self) -> String {
        let mut said = String::new();
        loop {
            match self.ch[0].rx.recv(&NoSink) {
                Ok(Incoming::Control(m)) => said.push_str(&format!("{:?} ", Msg::decode(&m))),
                Ok(other) => said.push_str(&format!("{other:?} ")),
                Err(e) => return format!("{said}{e}"),
            }
        }
    }
}

/// A batch of round 0 after one of round 1 is refused before any of its pages is written: the
/// page keeps round 1's copy, and the migration aborts as a protocol violation.
#[test]
fn a_stale_batch_is_refused_before_it_is_written() {
    let d = destination(false);
    let mut h = Hand::prepare(d.addr, 1, "stale");
    let gpa = h.gpa0();
    h.fill(gpa, 0x11);
    h.send(0, 1, &[PageRun { gpa, pages: 1 }]).unwrap();
    h.ack(0);
    h.fill(gpa, 0x22);
    h.send(0, 0, &[PageRun { gpa, pages: 1 }]).unwrap();
    let said = h.refusal();
    assert!(said.contains("round rule"), "the source was not told why: {said}");
    let e = d.outcome().expect_err("a stale batch must abort the migration");
    assert!(matches!(&e, MigrateError::Unexpected(m) if m.contains("round 0 after round 1")), "{e}");
    assert_eq!(d.page(gpa), vec![0x11; PAGE_SIZE], "the stale batch was written");
}

/// Once the destination has `Complete` (here: it answered Ready), a batch on another channel is
/// refused unwritten and the migration aborts: what was verified is what would run.
#[test]
fn a_batch_after_complete_is_refused_and_memory_is_unchanged() {
    let d = destination(false);
    let mut h = Hand::prepare(d.addr, 2, "after-complete");
    h.complete();
    let gpa = h.gpa0();
    let before = d.page(gpa);
    h.fill(gpa, 0x5a);
    h.send(1, 0, &[PageRun { gpa, pages: 1 }]).unwrap();
    let said = h.refusal();
    assert!(said.contains("sealed"), "the source was not told why: {said}");
    let e = d.outcome().expect_err("a batch after Complete must abort the migration");
    assert!(e.to_string().contains("after Complete"), "{e}");
    assert_eq!(d.page(gpa), before, "a batch after Complete was written");
    assert_ne!(before, vec![0x5a; PAGE_SIZE]);
}

/// After the commit the VM runs at the destination; a batch sent then changes nothing.
#[test]
fn a_batch_after_the_commit_changes_nothing() {
    let d = destination(false);
    let mut h = Hand::prepare(d.addr, 2, "after-commit");
    h.complete();
    h.ch[0].tx.send_control(&Msg::Commit.encode()).unwrap();
    assert_eq!(h.control(), Msg::Resumed);
    let gpa = h.gpa0();
    let before = d.page(gpa);
    h.fill(gpa, 0x77);
    let _ = h.send(1, 0, &[PageRun { gpa, pages: 1 }]); // may find the channel closed
    let o = d.outcome().expect("committed: the VM runs here");
    let t = into_synthetic(o);
    let mut b = vec![0u8; PAGE_SIZE];
    t.read_page(0, &mut b);
    assert_eq!(b, before, "a batch after the commit was written");
}

/// The destination commits but its VM does not resume: the destination reports a failure (not
/// success) and discards its copy, and the source, told so, resumes its own: the VM runs on
/// the source, its memory intact.
#[test]
fn a_commit_whose_resume_fails_is_a_failure_and_the_source_runs() {
    let d = destination(true);
    let mut vm = guest("no-resume", 8, 0, 0, 9);
    let before: Vec<Vec<u8>> = (0..vm.pages())
        .map(|i| {
            let mut b = vec![0u8; PAGE_SIZE];
            vm.read_page(i, &mut b);
            b
        })
        .collect();
    let chans = connect_simple(d.addr, 1, &TcpOptions::default(), psk()).unwrap();
    let e = migrate(&mut vm, chans, &MigrationConfig::default(), &|_| {}).expect_err("the resume failed");
    assert!(
        matches!(&e, MigrateError::DestinationAborted(m) if m.contains("did not resume")),
        "the source should learn the destination's VM did not resume: {e}"
    );
    assert!(vm.is_running(), "the source must run its copy again");
    let mut b = vec![0u8; PAGE_SIZE];
    for (i, want) in before.iter().enumerate() {
        vm.read_page(i as u64, &mut b);
        assert!(&b == want, "source page {i} changed");
    }
    match d.outcome() {
        Err(MigrateError::ResumeFailed(m)) => assert!(m.contains("would not start"), "{m}"),
        other => panic!("expected ResumeFailed, got {:?}", other.map(|o| o.stats)),
    }
}
