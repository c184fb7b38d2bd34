//! The migration protocol as two sans-IO state machines, in the way of
//! `ferry_transport::handshake` (and quinn-proto): [`source::SourceSession`] and
//! [`target::TargetSession`] take events (a control message, a batch sent or acknowledged, a
//! channel lost or back, a VM operation done, a timer, cancel) with the time passed in, and
//! answer with actions (send this message, queue these batches, pause, resume, verify, commit,
//! release). They hold no thread, socket, clock or VM; `crate::source::migrate` and
//! `crate::target::receive` are the threaded drivers that own those, feed the events and carry
//! out the actions. Page bytes never pass through a session: the session decides *what* to send
//! (batches of page runs), the driver's sender and receiver threads move the bytes.
//!
//! The control messages and their encoding are in [`crate::protocol`] (pure, capped).
//!
//! ```text
//!  source                                             destination
//!  Preparing                                           AwaitPrepare
//!    | Prepare(version, vm id, regions, channels, verify)  |  checks it can host the VM,
//!    |---------------------------------------------------->|  creates it paused, zeroed
//!    |                                                     |  CreatingVm, AwaitChannels
//!    |                         PrepareOk  |  Refuse(reason)|
//!    |<----------------------------------------------------|  Receiving
//!  (shared-nothing: a VM with disks)                       |
//!  PreparingDisks: Disks(names, sizes)                     |  partial copies created
//!    |---------------------------------------------------->|  (.NAME.ferry-partial)
//!    |                         DisksOk  |  Refuse(reason)  |
//!    |<----------------------------------------------------|
//!  CopyingDisks: DiskBlocks(seq, disk, blocks) on every    |  written, then DiskAck(seq)
//!    channel: allocated blocks, then dirty ones, until in  |  on the same channel
//!    sync; mirrored on through pre-copy and the pause      |
//!    |====================================================>|
//!  Round(0): every page (batches over all channels)        |
//!    |====================================================>|  ack per batch once written
//!    | RoundEnd(0) ... all acked (barrier) ... Round(1) ...|
//!  Converging: dirty pages taken, expected downtime vs the limit
//!    |                                                     |
//!  Switchover: [pause source] Switchover(final round)      |  no older round accepted now
//!    | final round batches, all acked                      |
//!  SavingState: StateChunk(offset, bytes)...               |
//!    (shared-nothing: all disk blocks acked) DiskDigests   |
//!    | Complete(state len, state crc, image digest, pages) |  no batch accepted any more;
//!    |---------------------------------------------------->|  Verifying, Restoring
//!  AwaitReady                Ready  |  Refuse(reason)    |
//!    |<----------------------------------------------------|  Ready
//!  Committing: Commit                                      |  ownership passes here:
//!    |---------------------------------------------------->|  Committed: (name the disks,)
//!    |                                                     |  resume the VM
//!    |                                   Resumed           |
//!    |<----------------------------------------------------|
//!  Done: [source releases the VM; removes its disk files]  |  Done
//! ```
//!
//! Round rule (overlapping rounds are never in flight): the source sends no batch of round N+1
//! before every batch of round N is acknowledged, and the destination acknowledges a batch only
//! once its pages are in guest memory. So no older copy of a page can land after a newer one. The
//! destination enforces it too ([`target::RoundGate`]), before a batch's pages are written: a
//! batch whose round is older than one it has already seen (or than the final round once
//! `Switchover` came), or any batch after `Complete` (guest memory is sealed from then on), is
//! refused unwritten, a protocol violation that aborts the migration.
//!
//! Before `Commit` reaches the destination the source owns the VM: any failure, the destination
//! discards, the source resumes. Once the destination has `Commit` it owns the VM; if it cannot
//! resume it, it discards its copy and then aborts, and the source resumes its own. If the channel
//! dies after `Commit` was sent but before `Resumed` arrived, the source cannot know which side
//! holds the VM: it keeps its copy paused and reports `Uncertain` (never resumes it by itself).
//!
//! Losing a data channel (failover): its unacknowledged batches are resent on the others only
//! after the destination says `ChannelLost` (its receiver for that channel has stopped, so no old
//! copy can land late). When the source notices first (a send error, or a channel that stopped
//! acknowledging while the others progress, see [`estimate::stalled_channels`]), it sends
//! `ChannelDrop` so the destination closes its end at once instead of waiting for its own TCP
//! timeout:
//!
//! ```text
//!    | ChannelDrop(i)          (source gave up on i)       |  close channel i, its
//!    |---------------------------------------------------->|  receiver stops
//!    |                         ChannelLost(i)              |
//!    |<----------------------------------------------------|
//!    | resend i's unacknowledged batches on the others     |
//! ```
//!
//! Convergence, auto-converge, the stall detector and the expected downtime are pure functions of
//! measured rates in [`estimate`], tested against simulated links.

pub mod estimate;
pub mod source;
pub mod target;

#[cfg(any(test, feature = "testing"))]
pub mod sim;
