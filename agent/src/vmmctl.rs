//! The local protocol between `ferryd` and its VMM processes (`ferry-vmm`, one per VM).
//!
//! Each VMM process listens on a unix socket (mode 0600) in the agent's state directory. A
//! request is one JSON line, the answer one JSON line, one request per connection. The VMM keeps
//! everything the agent needs to find out after a restart (its state and the last migration's
//! outcome), so `ferryd` can die and a new one adopts the VM by asking [`VmmRequest::Status`].
//!
//! ```text
//! ferryd                         ferry-vmm (source)                 ferry-vmm (target)
//!   | {"op":"migrate",...} -------> |  engine: channels to `to` -------> | MigrationServer (1 session)
//!   | {"op":"wait",...} ----------> |  answers at the next change       |
//!   |   (or after timeout_ms)       |  (progress / outcome)             |
//!   | {"op":"stop"} once released > |  exits                            | runs the VM after commit
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Largest answer line read from a VMM process.
const MAX_LINE_BYTES: usize = 1 << 20;

/// What the agent asks a VMM process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VmmRequest {
    /// Where the VM and its migration are.
    Status,
    /// The status once what the agent watches (the VM's state, whether it listens, the
    /// migration's status and end) changed after the `after`th change (the status's
    /// `changes`), or after `timeout_ms` (at most [`MAX_WAIT_MS`]): the agent learns of a
    /// migration's end at once instead of at its next poll.
    Wait(WaitOrder),
    /// Stop the guest.
    Pause,
    /// Let the guest run again.
    Resume,
    /// Stop the VM and end the process.
    Stop,
    /// Live-migrate the VM to a destination VMM (returns at once; poll [`VmmRequest::Status`]).
    Migrate(MigrateOrder),
    /// Cancel the running migration (before commit the VM keeps running here).
    Cancel,
    /// Quick-migrate the VM through the shared directory (returns at once; poll
    /// [`VmmRequest::Status`]).
    QuickSave(QuickOrder),
    /// Move every disk of the running VM to another directory (`ferry_disk::move_storage`;
    /// returns at once; poll [`VmmRequest::Status`]; [`VmmRequest::Cancel`] cancels it).
    MoveStorage(StorageOrder),
    /// Pause the guest, check every disk against what the guest wrote, resume it if it ran
    /// (the result is the status's `disk_check`).
    CheckDisks,
    /// A standby VMM (started with `--standby`, its memory reserve faulted in ahead of time)
    /// becomes the receiving VMM of one incoming live migration (answers at once; poll
    /// [`VmmRequest::Status`] until it listens).
    Assign(AssignOrder),
}

/// Longest a [`VmmRequest::Wait`] waits.
pub const MAX_WAIT_MS: u64 = 5_000;

/// See [`VmmRequest::Wait`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaitOrder {
    /// Answer once the VMM counted more changes than this.
    pub after: u64,
    /// Answer after this long in any case.
    pub timeout_ms: u64,
}

/// A storage live migration the agent orders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StorageOrder {
    /// Migration id (the agent's journal key).
    pub id: String,
    /// The directory the disks move to.
    pub dir: std::path::PathBuf,
}

/// A disk of the VMM's VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskStatus {
    /// Name (the image's file name).
    pub name: String,
    /// The image file in use.
    pub path: String,
    /// Size.
    pub size_bytes: u64,
    /// Bytes the image occupies.
    pub allocated_bytes: u64,
}

/// What a standby VMM receives: the VM's identity and where its channels arrive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssignOrder {
    /// VM name.
    pub name: String,
    /// `synthetic` or `kvm`.
    pub guest: crate::api::GuestKind,
    /// Guest memory (the destination refuses a larger guest).
    pub memory_bytes: u64,
    /// Listen for the migration on this IP (a free port).
    pub receive_on: std::net::IpAddr,
    /// The VM's control socket path: the standby VMM moves its socket there.
    pub socket: std::path::PathBuf,
    /// The only frame protection its migration server accepts (decided with the source's
    /// agent when the migration was admitted).
    #[serde(default, with = "crate::config::encryption_name")]
    pub encryption: ferry_transport::Encryption,
    /// Shared-nothing: where the VM's disks arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_disks: Option<ReceiveDisks>,
    /// With `integrity` or `off`: the networks this host trusts; every channel must come from
    /// and arrive at addresses on them (see `ferry-vmm --trusted-network`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_networks: Vec<String>,
    /// With host certificates: the name the source's certificate must carry (see
    /// `ferry-vmm --expect-peer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
}

/// Where the disks of an incoming shared-nothing move go: partial copies in `dir` (hidden
/// names) that the engine names at `Commit`; the VMM opens `dir/NAME` for each of `names`, in
/// the source's order, right before the VM resumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiveDisks {
    /// The VM's disk directory on this host.
    pub dir: std::path::PathBuf,
    /// The disks' file names, in the source's order.
    pub names: Vec<String>,
}

/// A quick migration the agent orders: pause, save the image to the shared directory, hand the
/// ownership record to `to` (`ferry_migrate::quick`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuickOrder {
    /// Migration id (the agent's journal key).
    pub id: String,
    /// The shared directory (the same path on both hosts).
    pub dir: std::path::PathBuf,
    /// This host's name in the ownership record.
    pub from: String,
    /// The destination host's name in the ownership record.
    pub to: String,
}

/// A live migration the agent orders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateOrder {
    /// Migration id (the agent's journal key).
    pub id: String,
    /// The destination VMM's migration address.
    pub to: SocketAddr,
    /// Channels (TCP connections).
    pub channels: u16,
    /// Transport option (`ferry_transport::option::TransportOption` by name).
    pub option: String,
    /// Downtime limit in milliseconds.
    pub downtime_ms: u64,
    /// Multichannel (`smb`): the interface exchange on channel 0, then channels on every NIC
    /// the hosts share under this policy; `None`: `channels` connections to `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multichannel: Option<MultichannelOrder>,
    /// Shared-nothing: the VM's disks travel on the session (without it a VMM whose VM has
    /// disks refuses the migration: they would stay behind).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_storage: bool,
    /// Shared-nothing: keep the disk files here after the destination runs the VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain_source_disks: bool,
    /// Frame protection the channels ask for (the destination agreed to it at admission).
    #[serde(default, with = "crate::config::encryption_name")]
    pub encryption: ferry_transport::Encryption,
    /// With host certificates: the name (DNS or IP) the destination's certificate must carry,
    /// the host the move was asked to go to (`None`: any host of the CA; unused with a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
}

/// How a multichannel session pairs NICs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MultichannelOrder {
    /// The migration networks as a `ferry_multichannel::NetworkPolicy` string (empty: any
    /// network both hosts share).
    pub policy: String,
    /// Channels per paired NIC.
    pub channels_per_path: u16,
}

/// Where a VMM process's VM is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmmState {
    /// A standby VMM: no VM yet, its memory reserve kept for the next incoming migration.
    Standby,
    /// Waiting for an incoming migration.
    Receiving,
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
    /// An outgoing migration runs.
    Migrating,
    /// The VM moved away (the destination committed): nothing runs here.
    Released,
    /// Commit was sent but not confirmed: the copy here stays paused until the agent asks the
    /// destination who owns the VM.
    Uncertain,
    /// The incoming migration failed: nothing runs here.
    Failed,
}

/// An outgoing migration as the VMM sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    /// Migration id.
    pub id: String,
    /// Engine status (`setup`, `active`, `switchover`, `completed`, `failed`, `cancelled`,
    /// `uncertain`).
    pub status: String,
    /// The engine returned.
    pub done: bool,
    /// Current round.
    pub round: u32,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Bytes on the wire so far.
    pub transferred_bytes: u64,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Expected downtime now.
    pub expected_downtime_ms: f64,
    /// Measured payload bandwidth.
    pub bandwidth_bytes_per_s: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Final statistics: the engine's `MigrationStats` in its serde form (`total_ms`,
    /// `downtime_ms`, `verified`, ...).
    pub stats: Option<serde_json::Value>,
}

/// What a VMM process answers to [`VmmRequest::Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmmStatus {
    /// VM name.
    pub name: String,
    /// `synthetic` or `kvm`.
    pub guest: String,
    /// Guest memory.
    pub memory_bytes: u64,
    /// The VMM's process id.
    pub pid: u32,
    /// Where the VM is.
    pub state: VmmState,
    /// Receiving: the address the migration channels connect to.
    pub listen: Option<SocketAddr>,
    /// The last outgoing migration.
    pub migration: Option<MigrationReport>,
    /// After an incoming migration: the destination verified the image.
    pub received_verified: Option<bool>,
    /// After an incoming migration: what the guest check found (`ok` or the problem).
    pub guest_check: Option<String>,
    /// The guest's progress counter (KVM: passes; synthetic: pages written).
    pub guest_counter: u64,
    /// Why the VMM failed (state `failed`).
    pub error: Option<String>,
    /// After an incoming quick migration: image load to resume, in milliseconds.
    #[serde(default)]
    pub quick_load_ms: Option<f64>,
    /// The VM's disks.
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// Disk errors the guest saw so far (synthetic: failed writes; KVM: words it found wrong
    /// and requests that failed), while the VM is here.
    #[serde(default)]
    pub disk_guest_errors: Option<u64>,
    /// The last [`VmmRequest::CheckDisks`]: per disk, sectors that differ from what the guest
    /// wrote (`None`: not checked).
    #[serde(default)]
    pub disk_check: Option<Vec<u64>>,
    /// Bytes of faulted-in memory the VMM's reserve holds ready (a standby VMM, or a receiving
    /// VMM that was one).
    #[serde(default)]
    pub reserve_bytes: u64,
    /// After an incoming migration: every region of the guest's memory came from the reserve
    /// (`None`: the VMM had no reserve).
    #[serde(default)]
    pub from_reserve: Option<bool>,
    /// Changes of what [`VmmRequest::Wait`] waits for, counted from 1; 0: a VMM (or a
    /// standby VMM) that does not answer `wait`: poll it.
    #[serde(default)]
    pub changes: u64,
}

/// One answer line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmmResponse {
    /// The request was done.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The status after the request.
    pub status: Option<VmmStatus>,
}

/// Errors talking to a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmCtlError {
    /// The process is not there (socket missing or nobody listening).
    #[error("VMM process unreachable at {path}: {source}")]
    Unreachable {
        /// Socket path.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// It answered something that is not a response.
    #[error("VMM process answered badly: {0}")]
    BadAnswer(String),
    /// It refused the request.
    #[error("{0}")]
    Refused(String),
    /// No answer in time.
    #[error("VMM process did not answer within {0:?}")]
    Timeout(Duration),
}

/// Send one request to the VMM process at `socket` and read its answer.
pub async fn call(socket: &Path, req: &VmmRequest) -> Result<VmmResponse, VmmCtlError> {
    let limit = Duration::from_secs(10);
    tokio::time::timeout(limit, call_inner(socket, req)).await.map_err(|_| VmmCtlError::Timeout(limit))?
}

async fn call_inner(socket: &Path, req: &VmmRequest) -> Result<VmmResponse, VmmCtlError> {
    let unreachable = |source| VmmCtlError::Unreachable { path: socket.display().to_string(), source };
    let mut s = tokio::net::UnixStream::connect(socket).await.map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).map_err(|e| VmmCtlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(unreachable)?;
    let mut r = BufReader::new(s).take(MAX_LINE_BYTES as u64);
    let mut answer = String::new();
    r.read_line(&mut answer).await.map_err(unreachable)?;
    let resp: VmmResponse = serde_json::from_str(&answer).map_err(|e| VmmCtlError::BadAnswer(e.to_string()))?;
    if !resp.ok {
        return Err(VmmCtlError::Refused(resp.error.unwrap_or_else(|| "refused".into())));
    }
    Ok(resp)
}

/// [`call`] for a status.
pub async fn status(socket: &Path) -> Result<VmmStatus, VmmCtlError> {
    call(socket, &VmmRequest::Status).await?.status.ok_or_else(|| VmmCtlError::BadAnswer("no status".into()))
}

/// The status once it changed after `seen` (its `changes`), or after `timeout`: a
/// [`VmmRequest::Wait`]. A VMM that cannot be waited on (`seen.changes` is 0: it predates
/// `wait`) is asked for its status after `timeout` instead.
pub async fn wait_change(socket: &Path, seen: Option<&VmmStatus>, timeout: Duration) -> Result<VmmStatus, VmmCtlError> {
    match seen {
        Some(st) if st.changes > 0 => {
            let timeout_ms = (timeout.as_millis() as u64).min(MAX_WAIT_MS);
            call(socket, &VmmRequest::Wait(WaitOrder { after: st.changes, timeout_ms }))
                .await?
                .status
                .ok_or_else(|| VmmCtlError::BadAnswer("no status".into()))
        }
        Some(_) => {
            tokio::time::sleep(timeout).await;
            status(socket).await
        }
        None => status(socket).await,
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = VmmRequest::Migrate(MigrateOrder {
            id: "m1".into(),
            to: "127.0.0.1:9".parse().unwrap(),
            channels: 2,
            option: "tcp".into(),
            downtime_ms: 300,
            multichannel: None,
            peer_name: None,
            include_storage: false,
            retain_source_disks: false,
            encryption: ferry_transport::Encryption::Off,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"migrate","id":"m1","to":"127.0.0.1:9","channels":2,"option":"tcp","downtime_ms":300,"encryption":"off"}"#
        );
        // An order without the key (an older agent) asks for aead.
        let old = r#"{"op":"migrate","id":"m1","to":"127.0.0.1:9","channels":2,"option":"tcp","downtime_ms":300}"#;
        match serde_json::from_str::<VmmRequest>(old).unwrap() {
            VmmRequest::Migrate(o) => assert_eq!(o.encryption, ferry_transport::Encryption::Aead),
            other => panic!("{other:?}"),
        }
        assert_eq!(serde_json::from_str::<VmmRequest>(&s).unwrap(), r);
        assert_eq!(serde_json::to_string(&VmmRequest::Status).unwrap(), r#"{"op":"status"}"#);
        assert_eq!(
            serde_json::to_string(&VmmRequest::Wait(WaitOrder { after: 3, timeout_ms: 100 })).unwrap(),
            r#"{"op":"wait","after":3,"timeout_ms":100}"#
        );
        assert!(serde_json::from_str::<VmmRequest>(r#"{"op":"format_disk"}"#).is_err());
    }
}
