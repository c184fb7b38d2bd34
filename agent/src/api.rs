//! The agent's HTTP/JSON API: the types both `ferryd` and `ferry` speak.
//!
//! Local API (unix socket, mode 0600), under `/v1`:
//!
//! | verb and path | body | answer |
//! |---|---|---|
//! | `GET /v1/host` | | [`HostInfo`] |
//! | `PATCH /v1/host` | [`HostPatch`] | [`HostInfo`] |
//! | `GET /v1/host/networks` | | list of [`Network`], by priority |
//! | `POST /v1/host/networks` | [`Network`] | list of [`Network`] (201) |
//! | `DELETE /v1/host/networks` | [`NetworkRemove`] | list of [`Network`] |
//! | `GET /v1/vms` | | list of [`VmInfo`] |
//! | `POST /v1/vms` | [`CreateVm`] | [`VmInfo`] (201) |
//! | `GET /v1/vms/{name}` | | [`VmInfo`] |
//! | `POST /v1/vms/{name}/pause`, `/resume` | | [`VmInfo`] |
//! | `DELETE /v1/vms/{name}` | | 204 |
//! | `POST /v1/moves` | [`MoveRequest`] (`kind`: `live` or `quick`; `include_storage`: shared-nothing) | [`MoveAccepted`] (202) |
//! | `POST /v1/preflight` | [`PreflightRequest`] | [`PreflightReport`] |
//! | `GET /v1/migrations` | | list of [`MigrationInfo`], newest first |
//! | `GET /v1/migrations/{id}` | | [`MigrationInfo`] |
//! | `POST /v1/migrations/{id}/cancel` | | [`MigrationInfo`] |
//!
//! Peer API (the `listen` TCP address, every request signed with the key file's key, see
//! [`crate::peer`]): `POST /peer/v1/incoming` ([`IncomingRequest`] -> [`IncomingAccepted`]),
//! `POST /peer/v1/incoming/{id}/abort` ([`IncomingAbort`]: a quick move the source gave up
//! before the handover), `GET /peer/v1/vms/{name}` ([`PeerVm`]), `GET /peer/v1/migrations/{id}`
//! ([`MigrationInfo`]), `POST /peer/v1/preflight` ([`IncomingRequest`] -> [`DestinationReport`]).
//!
//! Every error is `{"error": {"code": "...", "message": "..."}}` ([`ErrorBody`]) with an HTTP
//! status that says who is at fault (4xx: the request; 5xx: this host).

use serde::{Deserialize, Serialize};

/// Which guest a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// The synthetic guest (page mixture and a writer thread).
    Synthetic,
    /// A KVM guest running Ferry's guest program.
    Kvm,
}

impl GuestKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Synthetic => "synthetic",
            GuestKind::Kvm => "kvm",
        }
    }
}

impl std::str::FromStr for GuestKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "synthetic" => Ok(GuestKind::Synthetic),
            "kvm" => Ok(GuestKind::Kvm),
            _ => Err(format!("unknown guest {s:?} (synthetic, kvm)")),
        }
    }
}

/// A JSON error: a code a script can match, a sentence a person can read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiErrorDetail {
    /// Stable code (`bad_request`, `not_found`, `conflict`, `busy`, `unreachable`,
    /// `unauthorized`, `internal`, ...).
    pub code: String,
    /// What went wrong, in a sentence.
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiErrorDetail,
}

/// Host settings and load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostInfo {
    /// Host name.
    pub name: String,
    /// Peer and migration address.
    pub listen: String,
    /// Live migrations allowed at once (outgoing and incoming together).
    pub max_live_migrations: usize,
    /// Storage migrations allowed at once (`ferry vm move-storage`; a separate limit).
    pub max_storage_migrations: usize,
    /// `tcp`, `compression` or `smb`.
    pub performance_option: String,
    /// Migration networks in order (`subnet priority N`).
    pub networks: Vec<String>,
    /// Any network may carry migrations.
    pub use_any_network: bool,
    /// Protection of outgoing live moves: `aead`, `integrity` or `off` (the last two only over
    /// networks marked trusted on both hosts; elsewhere `aead`).
    #[serde(default = "aead")]
    pub encryption: String,
    /// The shared directory of quick moves, if any.
    #[serde(default)]
    pub shared_storage: Option<String>,
    /// Live migrations holding a slot now.
    pub active_migrations: usize,
    /// Moves waiting for a slot.
    pub queued_migrations: usize,
    /// VMs owned by this host.
    pub vms: usize,
    /// Storage migrations running now.
    #[serde(default)]
    pub active_storage_migrations: usize,
    /// Storage migrations waiting for a slot.
    #[serde(default)]
    pub queued_storage_migrations: usize,
    /// `memory_reserve_bytes` of the config: memory a standby VMM keeps faulted in for the next
    /// incoming live migration (0: none).
    #[serde(default)]
    pub memory_reserve_bytes: u64,
    /// Of it, faulted in and ready now.
    #[serde(default)]
    pub memory_reserve_ready_bytes: u64,
    /// How this host proves who it is to peers: `psk` (key_file) or `tls` (tls_dir).
    #[serde(default)]
    pub credentials: String,
    /// Where they come from (`key file PATH`, `host certificates in DIR`).
    #[serde(default)]
    pub credentials_source: String,
    /// Disk space promised to the incoming shared-nothing moves admitted and not ended: what
    /// each still has to write of its disks (counted against the free space when the next
    /// one is admitted).
    #[serde(default)]
    pub disk_reserved_bytes: u64,
}

/// A change of host settings at run time (every field optional; all or nothing changes). The
/// change persists (state database) and applies to the next move; a raised limit admits
/// queued moves at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostPatch {
    /// New limit (1 ..= 64).
    #[serde(default)]
    pub max_live_migrations: Option<usize>,
    /// `tcp`, `compression` or `smb`.
    #[serde(default)]
    pub performance_option: Option<String>,
    /// Any network may carry migrations.
    #[serde(default)]
    pub use_any_network: Option<bool>,
    /// `aead`, `integrity` or `off` (the last two need a network marked trusted).
    #[serde(default)]
    pub encryption: Option<String>,
}

/// A migration network (`GET`/`POST /v1/host/networks`).
pub use crate::config::NetworkEntry as Network;

/// `DELETE /v1/host/networks`: which network to remove.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkRemove {
    /// The subnet, as listed.
    pub subnet: String,
}

/// Create a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Name, unique on the host (letters, digits, `-`, `_`, `.`; 1 ..= 64).
    pub name: String,
    /// Guest memory (a multiple of 4 KiB; 2 MiB ..= 3 GiB for KVM).
    pub memory_bytes: u64,
    /// Guest kind.
    pub guest: GuestKind,
    /// Working set the guest rewrites (default: a quarter of memory, at most 64 MiB).
    #[serde(default)]
    pub working_set_bytes: Option<u64>,
    /// Synthetic guest: how fast it rewrites its working set (default 16 MiB/s; 0: flat out).
    #[serde(default)]
    pub dirty_rate_bytes_per_s: Option<u64>,
    /// Virtual disks: raw sparse images created (empty) in the VM's storage directory.
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    /// Bytes at the start of each disk the guest rewrites (synthetic: its disk writer; KVM: the
    /// guest program's request slots of 4 KiB; default 1 MiB, at most the disk; 0: no writes).
    #[serde(default)]
    pub disk_working_set_bytes: Option<u64>,
    /// Synthetic guest: disk bytes written per second over all disks (default 1 MiB/s; 0:
    /// flat out).
    #[serde(default)]
    pub disk_write_rate_bytes_per_s: Option<u64>,
}

/// A disk of a new VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// Name, unique in the VM (as VM names); the image file is `NAME.img`.
    pub name: String,
    /// Size in bytes (64 KiB ..= 16 TiB; any size, not only multiples of 64 KiB or 512).
    pub size_bytes: u64,
}

/// A disk of a VM as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskInfo {
    /// Name (the image's file name).
    pub name: String,
    /// The image file the VM uses now.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes the image occupies (it is sparse).
    pub allocated_bytes: u64,
}

/// `POST /v1/vms/{name}/move-storage`: move every disk of the VM to `path` while it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MoveStorageRequest {
    /// An existing directory on this host (absolute path).
    pub path: String,
}

/// A VM as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// Guest kind.
    pub guest: GuestKind,
    /// Guest memory.
    pub memory_bytes: u64,
    /// `running`, `paused`, `migrating`, `lost` (its VMM process is gone), ...
    pub state: String,
    /// Ownership epoch: 1 at creation, one more at each host that took it over.
    pub epoch: u64,
    /// The VMM process.
    pub pid: u32,
    /// The guest's progress counter (KVM: passes; synthetic: pages written).
    pub guest_counter: u64,
    /// The migration this VM arrived with, if it did.
    pub arrived_with: Option<String>,
    /// After arrival: the image was verified.
    pub arrived_verified: Option<bool>,
    /// After arrival: the guest check (`ok` or the problem).
    pub guest_check: Option<String>,
    /// Its disks.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// After a live arrival: its memory came from the standby VMM's reserve, faulted in ahead
    /// (`None`: no reserve was used).
    #[serde(default)]
    pub arrived_from_reserve: Option<bool>,
}

/// Kind of move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// Live migration (pre-copy, milliseconds of pause).
    #[default]
    Live,
    /// Quick migration: pause, save state and memory to the shared storage (`shared_storage`
    /// in both hosts' configs), hand ownership over there, load and resume at the destination.
    Quick,
}

impl MoveKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            MoveKind::Live => "live",
            MoveKind::Quick => "quick",
        }
    }
}

/// `POST /v1/moves`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The VM.
    pub vm: String,
    /// The destination agent's `listen` address.
    pub to: String,
    /// Live or quick.
    #[serde(default)]
    pub kind: MoveKind,
    /// Transport option: `tcp`, `zstd` or `zstd-always` (default: the host's performance option).
    #[serde(default)]
    pub option: Option<String>,
    /// Channels (1 ..= 16, default 2).
    #[serde(default)]
    pub channels: Option<u16>,
    /// Downtime limit (1 ..= 60000 ms, default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Frame protection: `aead`, `integrity` or `off` (default: the host's `encryption`
    /// setting). `integrity` and `off` asked here are refused unless the network is marked
    /// trusted on both hosts (live moves only).
    #[serde(default)]
    pub encryption: Option<String>,
    /// Live moves: the VM's disks travel with it on the migration session (shared-nothing live
    /// migration; journal kind `shared-nothing`). Without it a VM with disks is refused
    /// (`has_disks`): the destination has no copy of them.
    #[serde(default)]
    pub include_storage: bool,
    /// With `include_storage`: keep the source's disk files after the destination runs the VM
    /// (Hyper-V's `-RetainVhdCopiesOnSource`); by default they are removed then.
    #[serde(default)]
    pub retain_source_disks: bool,
}

/// The answer to a move: its migration id, at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MoveAccepted {
    /// Migration id.
    pub id: String,
    /// `queued`.
    pub status: String,
}

/// One state change of a migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationEvent {
    /// The new status.
    pub status: String,
    /// When (RFC 3339).
    pub at: String,
    /// What happened, if there is more to say.
    pub detail: Option<String>,
}

/// A migration, from the journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationInfo {
    /// Migration id (the same on both hosts).
    pub id: String,
    /// VM name.
    pub vm: String,
    /// `outgoing` or `incoming`.
    pub direction: String,
    /// `live`, `quick`, `shared-nothing` (a live move carrying the VM's disks) or `storage`.
    #[serde(default = "live")]
    pub kind: String,
    /// The other agent (its `listen` address, or its name for incoming).
    pub peer: String,
    /// `queued`, `setup`, `active`, `switchover`, `completed`, `failed`, `cancelled`, `uncertain`.
    pub status: String,
    /// When the move was asked (RFC 3339).
    pub queued_at: String,
    /// When it got its slot of the host-wide limit (RFC 3339).
    pub started_at: Option<String>,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The destination verified the image.
    pub verified: bool,
    /// Start to end, engine measured.
    pub total_ms: Option<f64>,
    /// Pause to resume, engine measured.
    pub downtime_ms: Option<f64>,
    /// Bytes on the wire so far.
    pub transferred_bytes: u64,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Bytes still to send (while active).
    pub remaining_bytes: u64,
    /// Current round.
    pub round: u32,
    /// Expected downtime now (while active).
    pub expected_downtime_ms: f64,
    /// Payload bandwidth now.
    pub bandwidth_bytes_per_s: f64,
    /// How its frames are protected (`aead`, `integrity`, `off`; null for quick and storage
    /// moves, which send no frames).
    #[serde(default)]
    pub encryption: Option<String>,
    /// Engine statistics once it ended.
    pub stats: Option<serde_json::Value>,
    /// Every state change.
    pub events: Vec<MigrationEvent>,
}

fn live() -> String {
    "live".into()
}

fn aead() -> String {
    "aead".into()
}

impl MigrationInfo {
    /// A final status: nothing more will change.
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// Peer request: host this incoming VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// Migration id.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Guest kind.
    pub guest: GuestKind,
    /// Guest memory.
    pub memory_bytes: u64,
    /// The VM's epoch at the source.
    pub epoch: u64,
    /// The source agent's name.
    pub source: String,
    /// Live or quick.
    #[serde(default)]
    pub kind: MoveKind,
    /// Quick: a file the source created in its shared directory; the destination finds it in
    /// its own only if both share that directory.
    #[serde(default)]
    pub probe: Option<String>,
    /// Multichannel (`smb`): channels arrive on every NIC of the destination.
    #[serde(default)]
    pub multichannel: bool,
    /// The frame protection the source proposes (`None`: `aead`). The destination accepts
    /// `integrity` and `off` only on a network it marks trusted.
    #[serde(default)]
    pub encryption: Option<String>,
    /// The move itself asked for `encryption`: a destination that does not accept it refuses
    /// the move (`untrusted_network`). Otherwise (the source host's setting) it answers `aead`.
    #[serde(default)]
    pub encryption_asked: bool,
    /// Shared-nothing: the disks that arrive with the VM (in the source's order); empty: none.
    #[serde(default)]
    pub disks: Vec<IncomingDisk>,
}

/// A disk arriving with a VM (shared-nothing).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingDisk {
    /// File name at the source (`NAME.img`); the copy gets the same name at the destination.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes the source image occupies now (what the destination must have room for).
    pub allocated_bytes: u64,
}

/// Peer answer: where the migration channels go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncomingAccepted {
    /// The incoming VMM's migration address (live moves).
    pub migration_addr: String,
    /// The destination host's name (quick moves name it in the ownership record).
    #[serde(default)]
    pub host: String,
    /// The protection its migration server accepts for this move (the one the source
    /// proposed, or `aead`; `None`: `aead`). Channels asking another are refused in the handshake.
    #[serde(default)]
    pub encryption: Option<String>,
}

/// Peer answer: does this host own the VM?
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerVm {
    /// This host owns it and it runs here.
    pub owned: bool,
    /// Its epoch here.
    pub epoch: u64,
    /// The migration it arrived with.
    pub arrived_with: Option<String>,
    /// After arrival: the image was verified (quick: the loaded memory's digest equals the
    /// source's).
    #[serde(default)]
    pub verified: Option<bool>,
    /// After a quick arrival: image load to resume, in milliseconds.
    #[serde(default)]
    pub load_ms: Option<f64>,
}

/// Peer request: the source gave up a quick move before handing the VM over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IncomingAbort {
    /// Why.
    pub reason: String,
}

/// `POST /v1/preflight`: could this move run now, and how (the way Hyper-V's `Compare-VM`
/// answers before a move)?
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PreflightRequest {
    /// The VM.
    pub vm: String,
    /// The destination agent's `listen` address.
    pub to: String,
    /// Live or quick.
    #[serde(default)]
    pub kind: MoveKind,
    /// Transport option (default: the host's performance option).
    #[serde(default)]
    pub option: Option<String>,
    /// Channels (1 ..= 16, default 2).
    #[serde(default)]
    pub channels: Option<u16>,
    /// Frame protection the move would ask for (default: the host's setting).
    #[serde(default)]
    pub encryption: Option<String>,
    /// The move would carry the VM's disks (shared-nothing): can the destination take them?
    #[serde(default)]
    pub include_storage: bool,
}

/// One reason a move cannot run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incompatibility {
    /// Stable code (`no_network`, `unreachable`, `key_mismatch`, `no_memory`, `no_kvm`,
    /// `name_taken`, `no_shared_storage`, `not_shared`, `bad_name`, `refused`, `has_disks`,
    /// `no_disk_space`, `disk_exists`, `untrusted_network`).
    pub code: String,
    /// What stands in the way, in a sentence.
    pub message: String,
}

/// What the destination says about hosting a VM (peer answer to `POST /peer/v1/preflight`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DestinationReport {
    /// Its name.
    pub name: String,
    /// Its limit.
    pub max_live_migrations: usize,
    /// Live migrations holding a slot there now.
    pub active_migrations: usize,
    /// Moves waiting there.
    pub queued_migrations: usize,
    /// Memory it can give (`MemAvailable` less a 256 MiB margin).
    pub memory_available_bytes: u64,
    /// KVM guests can run there.
    pub kvm: bool,
    /// It has shared storage (quick moves).
    pub shared_storage: bool,
    /// The protection it would accept for the move (live moves; `None`: `aead`).
    #[serde(default)]
    pub encryption: Option<String>,
    /// Shared-nothing: the directory the VM's disks would arrive in (null: the request
    /// carried no disks).
    #[serde(default)]
    pub disk_dir: Option<String>,
    /// Shared-nothing: bytes free there (for an unprivileged writer).
    #[serde(default)]
    pub disk_available_bytes: u64,
    /// Shared-nothing: bytes the VM's disks occupy at the source (what must fit).
    #[serde(default)]
    pub disk_needed_bytes: u64,
    /// What stands in the way there.
    pub incompatibilities: Vec<Incompatibility>,
}

/// The preflight report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreflightReport {
    /// The VM.
    pub vm: String,
    /// The destination address.
    pub to: String,
    /// Live or quick.
    pub kind: MoveKind,
    /// The move would carry the VM's disks (shared-nothing).
    #[serde(default)]
    pub include_storage: bool,
    /// No incompatibility.
    pub compatible: bool,
    /// The migration network the move would take (`any network` when `use_any_network`), or
    /// null if none pairs.
    pub network: Option<String>,
    /// The transport option it would use (live moves).
    pub option: String,
    /// The channels it would open (live moves).
    pub channels: u16,
    /// The frame protection it would use (live moves; null for quick moves, which send no
    /// frames), as both hosts agree on it.
    pub encryption: Option<String>,
    /// Why that protection (the setting or request, and the trusted networks it needs).
    pub encryption_reason: String,
    /// How the hosts authenticate each other (`psk: ...` or `tls: ...`, and what is checked).
    #[serde(default)]
    pub credentials: String,
    /// The move would wait for a slot here or there (not an incompatibility).
    pub would_queue: bool,
    /// What the destination said (null if it could not be asked).
    pub destination: Option<DestinationReport>,
    /// Every reason the move cannot run now.
    pub incompatibilities: Vec<Incompatibility>,
}
