//! The destination's side of the protocol as a sans-IO state machine (see [`super`] for the
//! sequence). States, in order:
//!
//! | state | waits for | next |
//! |---|---|---|
//! | `AwaitPrepare` | `Prepare` | `CreatingVm`, or refused |
//! | `CreatingVm` | the VM created ([`TargetSession::handle_vm_created`]) | `AwaitChannels`, or refused |
//! | `AwaitChannels` | the session's other channels ([`TargetSession::handle_channels`]) | `Receiving` (sends `PrepareOk`) |
//! | `Receiving` | batches, `RoundEnd`, `Switchover`, `StateChunk`, `ChannelDrop`, `Disks`, `DiskDigests`, `Complete` | `Verifying` |
//! | `Verifying` | the disks' digests ([`TargetSession::handle_disk_digests`], with disks) and the image digest ([`TargetSession::handle_digest`]) | `Restoring`, or refused |
//! | `Restoring` | the state restored ([`TargetSession::handle_restored`]) | `Ready` (sends `Ready`) |
//! | `Ready` | `Commit` | `Committed`: the VM is ours |
//! | `Committed` | the disks committed ([`TargetSession::handle_disks_committed`], with disks), the VM resumed ([`TargetSession::handle_resumed`]) | `Done` (sends `Resumed`) |
//!
//! Disks (shared-nothing): `Disks` (in `Receiving`, once, before any round but 0 began) makes the
//! driver create a partial copy of each ([`TargetAction::PrepareDisks`]; `DisksOk`, or refused);
//! the driver's receivers write `DiskBlocks` from any channel into them until `Complete` seals
//! the session (a block after it is a protocol violation). `Complete` of a move with disks must
//! follow `DiskDigests`; the disks' keyed digests must match before the image's is even looked
//! at; at `Commit` the partial copies get their names ([`TargetAction::CommitDisks`]) before the
//! VM resumes, and a failure there is handled as a resume failure (the copies go, the source is
//! told to resume its own, on its own disks).
//!
//! Any failure before `Committed` ends in `Failed` with [`TargetAction::Fail`]: the driver
//! discards the VM and tells the source. After `Commit` the session fails only if the VM cannot
//! be resumed ([`TargetSession::handle_resumed`]); otherwise the VM runs here whatever happens to
//! the channels.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{DiskDesc, Msg, MAX_STATE, MIGRATION_VERSION};
use crate::vm::VmShape;
use crate::MigrateError;

/// Where the destination's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting for `Prepare`.
    AwaitPrepare,
    /// The driver creates the VM.
    CreatingVm,
    /// The driver collects the session's other channels.
    AwaitChannels,
    /// Pages arrive.
    Receiving,
    /// The driver computes the image digest.
    Verifying,
    /// The driver restores the VM state.
    Restoring,
    /// Verified and restored; waiting for `Commit`.
    Ready,
    /// `Commit` taken: the VM is ours; the driver resumes it.
    Committed,
    /// The VM runs here.
    Done,
    /// Discarded.
    Failed,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum TargetAction {
    /// Send a control message on channel 0.
    Send(Msg),
    /// Create the VM, paused, zeroed; answer with [`TargetSession::handle_vm_created`].
    CreateVm(VmShape),
    /// Collect the session's other channels (`channels` in all, channel 0 included); answer with
    /// [`TargetSession::handle_channels`].
    AwaitChannels(usize),
    /// The source dropped this data channel: close it; its receiver stops and reports the loss.
    CloseChannel(u16),
    /// Compute the image digest (re-reading all memory if `full`); answer with
    /// [`TargetSession::handle_digest`].
    Verify {
        /// Re-read all guest memory rather than trust the hashes taken at receipt.
        full: bool,
    },
    /// Create a partial copy of each disk (hidden names, nothing a disk yet); answer with
    /// [`TargetSession::handle_disks_prepared`].
    PrepareDisks(Vec<DiskDesc>),
    /// Give every partial copy its disk name (all or none); answer with
    /// [`TargetSession::handle_disks_committed`].
    CommitDisks,
    /// Load the VM state; answer with [`TargetSession::handle_restored`].
    Restore(Vec<u8>),
    /// Ownership is ours: resume the VM; answer with [`TargetSession::handle_resumed`].
    Resume,
    /// Give up: discard the VM and tell the source why (never after commit).
    Fail(MigrateError),
    /// The VM runs here; the migration is over.
    Finish,
}

/// Why a batch may not be written (a protocol violation: the migration aborts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// A batch of an older round than one already seen.
    #[error("batch of round {round} after round {seen} began: round rule violated")]
    Stale {
        /// The batch's round.
        round: u32,
        /// The newest round seen.
        seen: u32,
    },
    /// A batch after `Complete`: the image is being (or was) verified.
    #[error("batch of round {0} after Complete: guest memory is sealed")]
    AfterComplete(u32),
}

/// The round rule on the receive path, shared by the session and the receiver threads (atomics,
/// no lock). A receiver asks [`RoundGate::admit`] once it has a batch's header and before it
/// writes any page (through `MemorySink::admit_batch`), and calls [`RoundGate::landed`] once the
/// receive is over (pages written, or the receive failed), before acknowledging. A batch of a
/// round older than the newest seen, older than the final round once `Switchover` came, or
/// arriving after `Complete`, is refused unwritten.
///
/// `Complete` seals memory: no batch is admitted after it, and it reports
/// how many admitted batches were still being written. A correct source sends `Complete` only
/// once every batch is acknowledged, and a receiver calls `landed` before it acknowledges, so
/// that count is zero; if it is not, the source broke the protocol and the session fails. So
/// from `Complete` on, nothing writes guest memory while it is verified and resumed.
#[derive(Debug, Default)]
pub struct RoundGate {
    max: AtomicU32,
    /// Admitted batches still being written (low bits) and the sealed flag ([`SEALED`]).
    writers: AtomicU64,
}

/// The sealed flag in [`RoundGate`]'s writer count.
const SEALED: u64 = 1 << 63;

/// How long the destination waits in `Ready` for `Commit` by default: well under the source's
/// wait for the answer to `Commit` (30 s), so a `Commit` lost on the way ends in the
/// destination's abort, which the source trusts (sealed frames), and the source resumes its VM
/// instead of keeping it paused as `uncertain`. The source sends `Commit` the moment `Ready`
/// arrives: one trip on a live channel.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

impl RoundGate {
    /// May a batch of `round` be written? On `Ok` the caller is a writer until it calls
    /// [`RoundGate::landed`].
    pub fn admit(&self, round: u32) -> Result<(), GateError> {
        let r = self.writers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w & SEALED == 0).then_some(w + 1));
        if r.is_err() {
            return Err(GateError::AfterComplete(round));
        }
        let seen = self.max.fetch_max(round, Ordering::SeqCst);
        if round < seen {
            self.landed();
            return Err(GateError::Stale { round, seen });
        }
        Ok(())
    }

    /// An admitted batch's receive is over (its pages are written, or the receive failed).
    pub fn landed(&self) {
        let _ = self.writers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w & !SEALED > 0).then(|| w - 1));
    }

    /// The newest round seen (or announced).
    pub fn round(&self) -> u32 {
        self.max.load(Ordering::SeqCst)
    }

    /// Whether memory is sealed (`Complete` came).
    pub fn sealed(&self) -> bool {
        self.writers.load(Ordering::SeqCst) & SEALED != 0
    }

    fn raise(&self, round: u32) {
        self.max.fetch_max(round, Ordering::SeqCst);
    }

    /// Seal: admit no batch from now on. Returns the admitted batches still being written.
    pub(crate) fn close(&self) -> u64 {
        self.writers.fetch_or(SEALED, Ordering::SeqCst) & !SEALED
    }
}

/// The destination's session.
#[derive(Debug)]
pub struct TargetSession {
    state: TargetState,
    actions: VecDeque<TargetAction>,
    gate: Arc<RoundGate>,
    idle_timeout: Duration,
    last_heard: Instant,
    /// Longest wait in `Ready` for `Commit`.
    commit_timeout: Duration,
    /// When `Ready` was sent.
    ready_at: Option<Instant>,
    shape: Option<VmShape>,
    channels: usize,
    verify_full: bool,
    total_pages: u64,
    blob: Vec<u8>,
    want_digest: u64,
    lost: Vec<u16>,
    rejoined: Vec<u16>,
    verified: bool,
    disks: Vec<DiskDesc>,
    disks_ready: bool,
    want_disk_digests: Option<Vec<u64>>,
    disks_verified: bool,
}

impl TargetSession {
    /// A session waiting for `Prepare`; silence from the source longer than `idle_timeout` fails it,
    /// and so does a `Commit` that does not come within the commit timeout of `Ready`.
    pub fn new(idle_timeout: Duration, now: Instant) -> Self {
        Self {
            state: TargetState::AwaitPrepare,
            actions: VecDeque::new(),
            gate: Arc::new(RoundGate::default()),
            idle_timeout,
            last_heard: now,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            ready_at: None,
            shape: None,
            channels: 0,
            verify_full: false,
            total_pages: 0,
            blob: Vec::new(),
            want_digest: 0,
            lost: Vec::new(),
            rejoined: Vec::new(),
            verified: false,
            disks: Vec::new(),
            disks_ready: false,
            want_disk_digests: None,
            disks_verified: false,
        }
    }

    /// Wait at most `t` in `Ready` for `Commit` (default [`DEFAULT_COMMIT_TIMEOUT`]).
    pub fn with_commit_timeout(mut self, t: Duration) -> Self {
        self.commit_timeout = t;
        self
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<TargetAction> {
        self.actions.pop_front()
    }

    /// The state.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// The round gate the receivers consult.
    pub fn gate(&self) -> &Arc<RoundGate> {
        &self.gate
    }

    /// The VM's shape (from `Prepare`).
    pub fn shape(&self) -> Option<&VmShape> {
        self.shape.as_ref()
    }

    /// Disks the source announced.
    pub fn disks(&self) -> &[DiskDesc] {
        &self.disks
    }

    /// Channels the session uses.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Channels lost and not back.
    pub fn lost_channels(&self) -> &[u16] {
        &self.lost
    }

    /// Channels that came back after a loss.
    pub fn rejoined_channels(&self) -> &[u16] {
        &self.rejoined
    }

    /// The image verified and the state restored.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// `Commit` was taken: the VM is ours.
    pub fn committed(&self) -> bool {
        matches!(self.state, TargetState::Committed | TargetState::Done)
    }

    /// Over (done or failed).
    pub fn is_over(&self) -> bool {
        matches!(self.state, TargetState::Done | TargetState::Failed)
    }

    /// When [`TargetSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_over() || self.committed() {
            return None;
        }
        let idle = self.last_heard + self.idle_timeout;
        Some(match (self.state, self.ready_at) {
            (TargetState::Ready, Some(r)) => idle.min(r + self.commit_timeout),
            _ => idle,
        })
    }

    fn fail(&mut self, e: MigrateError) {
        if self.is_over() || self.committed() {
            return;
        }
        self.state = TargetState::Failed;
        self.actions.push_back(TargetAction::Fail(e));
    }

    fn refuse(&mut self, reason: String, e: MigrateError) {
        self.actions.push_back(TargetAction::Send(Msg::Refuse(reason)));
        self.fail(e);
    }

    /// The source was heard from (a batch landed, say).
    pub fn handle_activity(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Time passed: fail if the source has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            if self.state == TargetState::Ready {
                // The VM is still the source's: no Commit came (dropped on the way, say). We
                // discard ours and the driver tells the source, whose copy then resumes; a
                // Commit arriving later changes nothing (the session is over).
                return self.fail(MigrateError::Timeout("Commit did not follow Ready"));
            }
            self.fail(MigrateError::Timeout("source went silent"));
        }
    }

    /// A control message arrived on channel 0.
    pub fn handle_control(&mut self, bytes: &[u8], now: Instant) {
        if self.is_over() {
            return;
        }
        self.handle_activity(now);
        match Msg::decode(bytes) {
            Ok(m) => self.handle_msg(m),
            Err(e) if self.committed() => {
                let _ = e; // ours already: nothing the source says matters now
            }
            Err(e) => self.fail(e.into()),
        }
    }

    fn handle_msg(&mut self, m: Msg) {
        use TargetState as S;
        match (self.state, m) {
            (S::AwaitPrepare, Msg::Prepare { version, shape, channels, verify_full }) => {
                if version != MIGRATION_VERSION {
                    let r = format!("migration protocol version {version} not supported");
                    return self.refuse(r.clone(), MigrateError::Refused(r));
                }
                self.total_pages = shape.regions.iter().map(|r| r.1 / ferry_transport::wire::PAGE_SIZE as u64).sum();
                self.channels = channels as usize;
                self.verify_full = verify_full;
                self.shape = Some(shape.clone());
                self.state = S::CreatingVm;
                self.actions.push_back(TargetAction::CreateVm(shape));
            }
            (S::AwaitPrepare, other) => self.fail(MigrateError::Unexpected(format!("{other:?} before Prepare"))),
            (S::Receiving, Msg::RoundEnd { .. }) => {}
            (S::Receiving, Msg::Switchover { round }) => self.gate.raise(round),
            (S::Receiving | S::Verifying | S::Restoring | S::Ready, Msg::ChannelDrop { channel })
                if channel != 0 && (channel as usize) < self.channels =>
            {
                // Close our end: the receiver stops and reports; ChannelLost follows from
                // handle_channel_lost (once per loss).
                self.actions.push_back(TargetAction::CloseChannel(channel));
            }
            (S::Receiving, Msg::StateChunk { offset, data }) => {
                if offset != self.blob.len() as u64 || self.blob.len() as u64 + data.len() as u64 > MAX_STATE {
                    return self.fail(MigrateError::Unexpected("state chunk out of order or too large".into()));
                }
                self.blob.extend_from_slice(&data);
            }
            (S::Receiving, Msg::Disks { disks }) => {
                if !self.disks.is_empty() || self.gate.round() > 0 {
                    return self.fail(MigrateError::Unexpected("Disks twice, or after pre-copy began".into()));
                }
                self.disks = disks.clone();
                self.actions.push_back(TargetAction::PrepareDisks(disks));
            }
            (S::Receiving, Msg::DiskDigests { digests }) => {
                if !self.disks_ready || digests.len() != self.disks.len() || self.want_disk_digests.is_some() {
                    let r = format!("{} disk digests for {} disks", digests.len(), self.disks.len());
                    return self.refuse(r.clone(), MigrateError::Unexpected(r));
                }
                self.want_disk_digests = Some(digests);
            }
            (S::Receiving, Msg::Complete { state_len, state_crc, digest, pages }) => {
                // No batch may land from here on: what is verified is what runs.
                let writing = self.gate.close();
                if !self.disks.is_empty() && self.want_disk_digests.is_none() {
                    let r = "Complete without the disks' digests".to_string();
                    return self.refuse(r.clone(), MigrateError::Verify(r));
                }
                if writing > 0 {
                    let r = format!("Complete while {writing} batch(es) were still being written");
                    return self.refuse(r.clone(), MigrateError::Unexpected(r));
                }
                if pages != self.total_pages {
                    let r = format!("source has {pages} pages, destination {}", self.total_pages);
                    return self.refuse(r.clone(), MigrateError::Verify(r));
                }
                if self.blob.len() as u64 != state_len || crc32fast::hash(&self.blob) != state_crc {
                    let r = "VM state blob incomplete or corrupt".to_string();
                    return self.refuse(r.clone(), MigrateError::Verify(r));
                }
                self.want_digest = digest;
                self.state = S::Verifying;
                self.actions.push_back(TargetAction::Verify { full: self.verify_full });
            }
            (S::Ready, Msg::Commit) => {
                // Ownership is ours from here on: never fail after this point.
                self.state = S::Committed;
                if self.disks.is_empty() {
                    self.actions.push_back(TargetAction::Resume);
                } else {
                    self.actions.push_back(TargetAction::CommitDisks);
                }
            }
            (S::Committed | S::Done, _) => {} // ours: a late or repeated message changes nothing
            (_, other) => self.fail(MigrateError::Unexpected(format!("{other:?} at the destination"))),
        }
    }

    /// The partial copies of the disks exist (answer `DisksOk`), or not (refused).
    pub fn handle_disks_prepared(&mut self, r: Result<(), String>) {
        if self.state != TargetState::Receiving || self.disks_ready || self.disks.is_empty() {
            return;
        }
        match r {
            Ok(()) => {
                self.disks_ready = true;
                self.actions.push_back(TargetAction::Send(Msg::DisksOk));
            }
            Err(e) => {
                let r = format!("cannot receive the disks: {e}");
                self.refuse(r.clone(), MigrateError::Disk(r));
            }
        }
    }

    /// Writing a disk's blocks failed (the file system full, an I/O error): refused, the
    /// partial copies go.
    pub fn handle_disk_failed(&mut self, why: String) {
        if self.committed() {
            return;
        }
        let r = format!("disk: {why}");
        self.refuse(r, MigrateError::Disk(why));
    }

    /// The disks' digests at the check (after their blocks were made durable), or why they
    /// could not be taken. With disks, the driver answers this before
    /// [`TargetSession::handle_digest`].
    pub fn handle_disk_digests(&mut self, r: Result<Vec<u64>, String>) {
        if self.state != TargetState::Verifying || self.disks.is_empty() {
            return;
        }
        let got = match r {
            Ok(g) => g,
            Err(e) => return self.refuse(format!("disk: {e}"), MigrateError::Disk(e)),
        };
        let want = self.want_disk_digests.clone().unwrap_or_default();
        if let Some(i) = (0..self.disks.len()).find(|&i| got.get(i) != want.get(i)) {
            let r = format!(
                "disk {} digest mismatch: the destination's copy differs from the source's",
                self.disks[i].name
            );
            return self.refuse(r.clone(), MigrateError::Verify(r));
        }
        self.disks_verified = true;
    }

    /// The disks have their names (the VM may resume on them), or naming them failed: then the
    /// copies are gone and the session fails as if the VM did not resume (the source resumes
    /// its own, on its own disks).
    pub fn handle_disks_committed(&mut self, r: Result<(), String>) {
        if self.state != TargetState::Committed {
            return;
        }
        match r {
            Ok(()) => self.actions.push_back(TargetAction::Resume),
            Err(e) => {
                self.state = TargetState::Failed;
                self.actions.push_back(TargetAction::Fail(MigrateError::ResumeFailed(format!("disks: {e}"))));
            }
        }
    }

    /// The VM was created (or could not be).
    pub fn handle_vm_created(&mut self, r: Result<(), String>) {
        if self.state != TargetState::CreatingVm {
            return;
        }
        match r {
            Ok(()) => {
                self.state = TargetState::AwaitChannels;
                self.actions.push_back(TargetAction::AwaitChannels(self.channels));
            }
            Err(e) => {
                let id = self.shape.as_ref().map(|s| s.vm_id.clone()).unwrap_or_default();
                let r = format!("cannot host VM {id:?}: {e}");
                self.refuse(r.clone(), MigrateError::Refused(r));
            }
        }
    }

    /// The session's channels are all here (`true`), or did not all arrive in time.
    pub fn handle_channels(&mut self, all_here: bool, now: Instant) {
        if self.state != TargetState::AwaitChannels {
            return;
        }
        self.handle_activity(now);
        if all_here {
            self.state = TargetState::Receiving;
            self.actions.push_back(TargetAction::Send(Msg::PrepareOk));
        } else {
            let r = "the session's other channels did not all arrive".to_string();
            self.refuse(r.clone(), MigrateError::Refused(r));
        }
    }

    /// A channel failed or was closed by the source (`closed`).
    pub fn handle_channel_lost(&mut self, ch: u16, why: String, closed: bool) {
        if self.is_over() || self.committed() {
            return;
        }
        if ch == 0 {
            let why = if closed { "source closed the control channel".into() } else { why };
            return self.fail(MigrateError::Channel(0, why));
        }
        if (ch as usize) >= self.channels || self.lost.contains(&ch) {
            return;
        }
        self.lost.push(ch);
        self.actions.push_back(TargetAction::Send(Msg::ChannelLost { channel: ch }));
    }

    /// A receiver saw a protocol violation (a stale batch, pages on the wrong channel).
    pub fn handle_violation(&mut self, ch: u16, why: String) {
        let _ = ch;
        self.fail(MigrateError::Unexpected(why));
    }

    /// A lost channel connected again: may it carry pages? (Only while pages still move.)
    pub fn handle_rejoin(&mut self, ch: u16) -> bool {
        if self.state != TargetState::Receiving || !self.lost.contains(&ch) {
            return false;
        }
        self.lost.retain(|&x| x != ch);
        self.rejoined.push(ch);
        true
    }

    /// The image digest the driver computed.
    pub fn handle_digest(&mut self, got: u64) {
        if self.state != TargetState::Verifying {
            return;
        }
        if !self.disks.is_empty() && !self.disks_verified {
            let r = "the disks were not verified".to_string();
            return self.refuse(r.clone(), MigrateError::Verify(r));
        }
        if got != self.want_digest {
            let r = "image digest mismatch: the destination's memory differs from the source's".to_string();
            return self.refuse(r.clone(), MigrateError::Verify(r));
        }
        self.state = TargetState::Restoring;
        self.actions.push_back(TargetAction::Restore(std::mem::take(&mut self.blob)));
    }

    /// The VM state was restored (or not).
    pub fn handle_restored(&mut self, r: Result<(), String>, now: Instant) {
        if self.state != TargetState::Restoring {
            return;
        }
        match r {
            Ok(()) => {
                self.verified = true;
                self.state = TargetState::Ready;
                self.ready_at = Some(now);
                self.actions.push_back(TargetAction::Send(Msg::Ready));
            }
            Err(e) => {
                let r = format!("restoring VM state failed: {e}");
                self.refuse(r.clone(), MigrateError::Vm(r));
            }
        }
    }

    /// The VM was resumed after commit, or could not be: then the session fails with
    /// [`MigrateError::ResumeFailed`] (the only failure after `Commit`): the driver discards the
    /// VM here first, then tells the source (an abort), which resumes its own copy, so the VM
    /// runs in exactly one place (or, if the abort is lost, the source keeps it paused and
    /// reports the commit unconfirmed).
    pub fn handle_resumed(&mut self, r: Result<(), String>) {
        if self.state != TargetState::Committed {
            return;
        }
        match r {
            Ok(()) => {
                self.state = TargetState::Done;
                self.actions.push_back(TargetAction::Send(Msg::Resumed));
                self.actions.push_back(TargetAction::Finish);
            }
            Err(e) => {
                self.state = TargetState::Failed;
                self.actions.push_back(TargetAction::Fail(MigrateError::ResumeFailed(e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(version: u8) -> Vec<u8> {
        Msg::Prepare {
            version,
            shape: VmShape { vm_id: "t".into(), regions: vec![(0, 4096 * 8)] },
            channels: 2,
            verify_full: false,
        }
        .encode()
    }

    fn drain(s: &mut TargetSession) -> Vec<TargetAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// Prepared, VM created, every channel in: receiving round 0.
    fn receiving(now: Instant) -> TargetSession {
        let mut s = TargetSession::new(Duration::from_secs(5), now);
        s.handle_control(&prepare(MIGRATION_VERSION), now);
        s.handle_vm_created(Ok(()));
        s.handle_channels(true, now);
        s
    }

    fn ready(now: Instant) -> TargetSession {
        let mut s = receiving(now);
        let blob = b"state".to_vec();
        s.handle_control(&Msg::StateChunk { offset: 0, data: blob.clone() }.encode(), now);
        let crc = crc32fast::hash(&blob);
        s.handle_control(&Msg::Complete { state_len: 5, state_crc: crc, digest: 42, pages: 8 }.encode(), now);
        s.handle_digest(42);
        s.handle_restored(Ok(()), now);
        drain(&mut s);
        s
    }

    /// A Commit that never comes (dropped on the way): the destination gives up at the commit
    /// timeout, before it owns anything, and fails (the driver discards and aborts, the source
    /// resumes); a Commit arriving after that changes nothing.
    #[test]
    fn no_commit_within_the_commit_timeout_fails_before_owning() {
        let now = Instant::now();
        let mut s = ready(now).with_commit_timeout(Duration::from_secs(2));
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(2)));
        s.handle_timeout(now + Duration::from_millis(1999));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(now + Duration::from_secs(2));
        let a = drain(&mut s);
        assert!(matches!(&a[..], [TargetAction::Fail(MigrateError::Timeout(w))] if w.contains("Commit")), "{a:?}");
        assert!(!s.committed() && s.is_over());
        s.handle_control(&Msg::Commit.encode(), now + Duration::from_secs(3));
        assert!(drain(&mut s).is_empty() && !s.committed());
        // Activity while in Ready does not stretch the wait for Commit.
        let mut s = ready(now).with_commit_timeout(Duration::from_secs(2));
        s.handle_activity(now + Duration::from_secs(1));
        s.handle_timeout(now + Duration::from_secs(2));
        assert!(matches!(drain(&mut s)[..], [TargetAction::Fail(_)]));
    }

    #[test]
    fn happy_path_commits_only_after_verify() {
        let now = Instant::now();
        let mut s = ready(now);
        assert_eq!(s.state(), TargetState::Ready);
        assert!(s.verified());
        s.handle_control(&Msg::Commit.encode(), now);
        assert!(matches!(drain(&mut s)[..], [TargetAction::Resume]));
        s.handle_resumed(Ok(()));
        assert!(matches!(drain(&mut s)[..], [TargetAction::Send(Msg::Resumed), TargetAction::Finish]));
        // After commit nothing fails the session, not even silence or a dead control channel.
        s.handle_channel_lost(0, "gone".into(), true);
        s.handle_timeout(now + Duration::from_secs(100));
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_commit_whose_resume_fails_is_a_failure() {
        let now = Instant::now();
        let mut s = ready(now);
        s.handle_control(&Msg::Commit.encode(), now);
        assert!(matches!(drain(&mut s)[..], [TargetAction::Resume]));
        s.handle_resumed(Err("vcpu would not start".into()));
        let a = drain(&mut s);
        assert!(matches!(&a[..], [TargetAction::Fail(MigrateError::ResumeFailed(e))] if e.contains("vcpu")), "{a:?}");
        assert!(!s.committed() && s.is_over());
    }

    #[test]
    fn commit_before_ready_fails() {
        let now = Instant::now();
        let mut s = receiving(now);
        drain(&mut s);
        s.handle_control(&Msg::Commit.encode(), now);
        assert!(matches!(drain(&mut s)[..], [TargetAction::Fail(MigrateError::Unexpected(_))]));
        assert!(!s.committed());
    }

    #[test]
    fn digest_mismatch_refuses() {
        let now = Instant::now();
        let mut s = receiving(now);
        s.handle_control(&Msg::Complete { state_len: 0, state_crc: 0, digest: 1, pages: 8 }.encode(), now);
        s.handle_digest(2);
        let a = drain(&mut s);
        assert!(matches!(a.last(), Some(TargetAction::Fail(MigrateError::Verify(_)))), "{a:?}");
        assert_eq!(s.state(), TargetState::Failed);
    }

    #[test]
    fn wrong_version_is_refused() {
        let now = Instant::now();
        let mut s = TargetSession::new(Duration::from_secs(5), now);
        s.handle_control(&prepare(MIGRATION_VERSION + 1), now);
        let a = drain(&mut s);
        assert!(matches!(&a[..], [TargetAction::Send(Msg::Refuse(_)), TargetAction::Fail(MigrateError::Refused(_))]));
    }

    #[test]
    fn gate_refuses_stale_rounds_and_batches_after_complete() {
        let now = Instant::now();
        let mut s = receiving(now);
        let g = s.gate().clone();
        assert!(g.admit(0).is_ok());
        assert!(g.admit(1).is_ok());
        assert_eq!(g.admit(0), Err(GateError::Stale { round: 0, seen: 1 }));
        s.handle_control(&Msg::Switchover { round: 3 }.encode(), now);
        assert!(g.admit(2).is_err());
        assert!(g.admit(3).is_ok());
        // Every admitted batch has landed (the refused ones never counted).
        for _ in 0..3 {
            g.landed();
        }
        assert!(!g.sealed());
        s.handle_control(&Msg::Complete { state_len: 0, state_crc: 0, digest: 1, pages: 8 }.encode(), now);
        assert!(g.sealed());
        assert_eq!(g.admit(3), Err(GateError::AfterComplete(3)));
        assert!(matches!(drain(&mut s).last(), Some(TargetAction::Verify { .. })));
    }

    #[test]
    fn complete_while_a_batch_is_being_written_fails() {
        let now = Instant::now();
        let mut s = receiving(now);
        drain(&mut s);
        let g = s.gate().clone();
        assert!(g.admit(0).is_ok()); // admitted, not landed
        s.handle_control(&Msg::Complete { state_len: 0, state_crc: 0, digest: 1, pages: 8 }.encode(), now);
        let a = drain(&mut s);
        assert!(matches!(a.last(), Some(TargetAction::Fail(MigrateError::Unexpected(_)))), "{a:?}");
        // Sealed all the same: nothing more is admitted, and a late landing does not unseal.
        g.landed();
        assert!(g.sealed());
        assert!(g.admit(0).is_err());
    }

    #[test]
    fn lost_channels_are_reported_once_and_may_rejoin_while_receiving() {
        let now = Instant::now();
        let mut s = receiving(now);
        drain(&mut s);
        s.handle_channel_lost(1, "x".into(), false);
        s.handle_channel_lost(1, "x".into(), true);
        assert!(matches!(drain(&mut s)[..], [TargetAction::Send(Msg::ChannelLost { channel: 1 })]));
        assert!(!s.handle_rejoin(0));
        assert!(s.handle_rejoin(1));
        assert_eq!(s.rejoined_channels(), &[1]);
        s.handle_channel_lost(0, "x".into(), false);
        assert!(matches!(drain(&mut s)[..], [TargetAction::Fail(MigrateError::Channel(0, _))]));
    }

    #[test]
    fn silence_times_out_but_activity_keeps_it_alive() {
        let now = Instant::now();
        let mut s = TargetSession::new(Duration::from_secs(5), now);
        s.handle_activity(now + Duration::from_secs(4));
        s.handle_timeout(now + Duration::from_secs(8));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(now + Duration::from_secs(9));
        assert!(matches!(drain(&mut s)[..], [TargetAction::Fail(MigrateError::Timeout(_))]));
    }
}
