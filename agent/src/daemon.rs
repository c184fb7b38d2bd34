//! `ferryd`: the host agent. It owns this host's VMs (each in its own `ferry-vmm` process),
//! keeps the journal, enforces the host-wide limit, and serves the local API (unix socket) and
//! the peer API (the `listen` TCP address).
//!
//! A move, as the source agent runs it:
//!
//! ```text
//! queued --(slot of the host-wide limit)--> setup --(peer: POST /peer/v1/incoming, the
//! destination admits under its own limit and starts an incoming ferry-vmm)--> the source VMM
//! runs the engine to the destination VMM: active, switchover --> completed | failed | cancelled
//! ```
//!
//! A shared-nothing move (`include_storage`, journal kind `shared-nothing`) is a live move
//! whose VM brings its disks: the destination admits it only with room for them in its
//! `disk_dir` (`no_disk_space` otherwise), its VMM receives them into partial copies that the
//! engine names at `Commit` and opens them before the guest resumes; the source's files go
//! once the destination runs the VM (unless `retain_source_disks`). Any failure before the
//! commit leaves the VM running here on its own files, and the destination removes what
//! arrived.
//!
//! A quick move (`kind: quick`) has the same queue, slot and admission; then the source VMM
//! saves the VM to the shared directory and hands the ownership record there to the
//! destination, whose VMM (started waiting for that record) loads and resumes it.
//!
//! A storage move (`kind: storage`, direction `local`, `POST /v1/vms/NAME/move-storage`) waits
//! for a slot of its own limit (`max_storage_migrations`), then the VM's VMM copies its disks
//! to the new directory while the guest runs (`ferry_disk::move_storage`): setup, copy,
//! dirty_pass, (write_blocking,) sync, switchover, committed --> completed | failed |
//! cancelled. Before the switch any failure or a cancel leaves the VM on its original files.
//!
//! Ownership: until the destination's engine commits, the source owns the VM (any failure
//! leaves it running here). After `completed` the source forgets it and stops its VMM; the
//! destination records it with the next ownership epoch. An `uncertain` outcome (commit sent,
//! confirmation lost) is resolved by asking the destination agent, never by guessing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tracing::{info, warn, Instrument};

use crate::api::*;
use crate::client::{self, Endpoint, TLS_FAILED};
use crate::config::{parse_encryption, Config, HostCredentials, Settings, Subnet};
use crate::limit::{Cancel, Limit, Slot};
use crate::peer;
use crate::store::{now_ms, Store, VmRow};
use crate::vmmctl::{
    self, MigrateOrder, MigrationReport, QuickOrder, StorageOrder, VmmCtlError, VmmRequest, VmmState, VmmStatus,
};
use ferry_transport::tls::TlsCredentials;
use ferry_transport::Encryption;

/// Peer checks (about one a second) a live move's destination agent may miss in a row before the
/// move is cancelled.
const PEER_MISSES: u32 = 3;

/// An API error: HTTP status, code, sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn bad(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ApiErrorDetail { code: self.code.into(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad("the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}")))
}

/// A VM this agent knows (owned, or arriving).
#[derive(Debug, Clone)]
struct VmEntry {
    row: VmRow,
    /// The migration moving it now.
    busy: Option<String>,
}

/// What is left on this host of a migration whose end is being settled with the destination.
#[derive(Debug, Clone, Copy)]
enum Here {
    /// Commit sent, confirmation lost: the VM is paused here and may resume.
    Paused,
    /// The VMM reported the move done while the agent was away: nothing runs here.
    Released,
    /// The VMM process died during the move: nothing runs here.
    Gone,
}

impl Here {
    fn why_uncertain(self) -> &'static str {
        match self {
            Here::Paused => "commit sent, its confirmation lost",
            Here::Released => "the VMM released the VM while the agent was away",
            Here::Gone => "the VMM process died during the move",
        }
    }
}

/// Live numbers of a running migration (the journal keeps the state changes).
#[derive(Debug, Clone, Default)]
struct Live {
    report: MigrationReport,
    cancel: Option<Arc<Cancel>>,
    /// Incoming quick move: the source gave up before the handover, and why.
    abort: Option<String>,
}

/// The agent.
pub struct Agent {
    cfg: Config,
    /// Limit, option and networks: the config's, or as changed at run time (and kept).
    settings: Mutex<Settings>,
    store: Mutex<Store>,
    vms: Mutex<HashMap<String, VmEntry>>,
    live: Mutex<HashMap<String, Live>>,
    limit: Arc<Limit>,
    /// Storage moves (`max_storage_migrations`): a limit of their own, FIFO, cancelable.
    storage_limit: Arc<Limit>,
    vmm_exe: PathBuf,
    /// State changes and progress, for `GET /v1/events` (JSON texts).
    events: tokio::sync::broadcast::Sender<String>,
    /// The standby VMM's control socket (`memory_reserve_bytes` > 0): the next incoming live
    /// migration is received into its reserve.
    standby: Mutex<Option<PathBuf>>,
    /// A standby VMM is being started.
    standby_starting: std::sync::atomic::AtomicBool,
    /// Disk space promised to incoming shared-nothing moves, by migration id (see
    /// [`Agent::disk_room`]).
    disk_promised: Arc<Mutex<HashMap<String, DiskPromise>>>,
    /// With host certificates: the credentials as last read (read again when their files
    /// change, see [`Agent::tls_now`]).
    tls: Option<Mutex<TlsCredentials>>,
}

/// Disk space an admitted incoming shared-nothing move was promised: `need` bytes (its disks'
/// allocated bytes at the source) in `dir` (its VM's directory, holding only its copies).
#[derive(Debug, Clone)]
struct DiskPromise {
    dir: PathBuf,
    need: u64,
}

impl DiskPromise {
    /// What it still has to write: the promise less what its copies occupy already (that is
    /// no longer free, so counting it again would count it twice).
    fn outstanding(&self) -> u64 {
        self.need.saturating_sub(allocated_in(&self.dir))
    }
}

/// Bytes the files in `dir` occupy on disk.
fn allocated_in(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.blocks() * 512).sum()
}

/// A promise of disk space, held for as long as its incoming move runs: dropping it (the
/// move ended: completed, failed or cancelled, or it was not admitted after all) gives the
/// space back.
struct DiskClaim {
    promised: Arc<Mutex<HashMap<String, DiskPromise>>>,
    id: String,
}

impl Drop for DiskClaim {
    fn drop(&mut self) {
        lock(&self.promised).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_id() -> String {
    let b: [u8; 8] = ferry_transport::handshake::random_bytes();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !n.starts_with('.')
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// State directory, sockets, database.
    #[error("{0}")]
    Setup(String),
}

impl Agent {
    /// A migration just journaled as queued: announce it on the event stream and track it as
    /// live (cancelable from now on). Returns its cancel flag.
    fn open_queued(&self, id: &str) -> Arc<Cancel> {
        let ev = serde_json::json!({"type": "state", "id": id, "status": "queued", "detail": null,
                                    "at": crate::store::rfc3339(now_ms())});
        let _ = self.events.send(ev.to_string());
        let cancel = Arc::new(Cancel::default());
        lock(&self.live).insert(
            id.to_string(),
            Live { report: MigrationReport::default(), cancel: Some(cancel.clone()), abort: None },
        );
        cancel
    }

    /// Set up state (directory, database) and adopt the VMs still running from before.
    pub async fn start(cfg: Config, vmm_exe: PathBuf) -> Result<Arc<Self>, StartError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| StartError::Setup(format!("{what}: {e}"));
        std::fs::create_dir_all(cfg.state_dir.join("vms")).map_err(|e| setup("creating state_dir", &e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| setup("restricting state_dir", &e))?;
        let store = Store::open(&cfg.state_dir).map_err(|e| setup("opening the journal", &e))?;
        let settings = match store.settings().map_err(|e| setup("reading the settings", &e))? {
            Some(s) => {
                s.check().map_err(|e| setup("the settings kept in the state database", &e))?;
                info!("using the host settings changed at run time (they win over the config file)");
                s
            }
            None => cfg.settings(),
        };
        let limit = Limit::new(settings.max_live_migrations);
        let storage_limit = Limit::new(cfg.max_storage_migrations);
        let tls = match &cfg.credentials {
            HostCredentials::Tls { creds, .. } => Some(Mutex::new(creds.clone())),
            HostCredentials::Key { .. } => None,
        };
        let agent = Arc::new(Self {
            cfg,
            settings: Mutex::new(settings),
            store: Mutex::new(store),
            vms: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            limit,
            storage_limit,
            vmm_exe,
            events: tokio::sync::broadcast::channel(1024).0,
            standby: Mutex::new(None),
            standby_starting: Default::default(),
            disk_promised: Default::default(),
            tls,
        });
        agent.adopt().await.map_err(|e| setup("adopting VMs", &e.message))?;
        agent.stop_old_standbys().await;
        agent.clone().refill_standby();
        Ok(agent)
    }

    /// With host certificates: the credentials as they are on disk now. Their files are
    /// checked (modification time, inode, length) for each new peer connection, in both
    /// directions: a new `crl.pem` or a renewed certificate counts without a restart. Files
    /// that changed but cannot be used are logged, and the credentials read before stay.
    fn tls_now(&self) -> Option<TlsCredentials> {
        let cell = self.tls.as_ref()?;
        let mut held = lock(cell);
        if held.changed_on_disk() {
            match held.refreshed() {
                Ok(fresh) => {
                    info!(tls_dir = %self.cfg.credentials.describe(), "host certificates read again (changed on disk)");
                    *held = fresh;
                }
                Err(e) => {
                    warn!(error = %e, "host certificates changed on disk but cannot be used; keeping those read before")
                }
            }
        }
        Some(held.clone())
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn journal(&self, id: &str, status: &str, detail: Option<&str>, started: bool) {
        self.journal_with(id, status, detail, started, |_| Ok(()));
    }

    /// [`Self::journal`], with `also`'s writes in the same commit.
    fn journal_with(
        &self,
        id: &str,
        status: &str,
        detail: Option<&str>,
        started: bool,
        also: impl FnOnce(&Store) -> Result<(), crate::store::StoreError>,
    ) {
        info!(migration = id, status, detail, "migration state");
        let ev = serde_json::json!({"type": "state", "id": id, "status": status, "detail": detail,
                                    "at": crate::store::rfc3339(now_ms())});
        // Nobody listening is fine.
        let _ = self.events.send(ev.to_string());
        let written = self.store().atomically(|store| {
            also(store)?;
            store.set_status(id, status, detail, started)
        });
        if let Err(e) = written {
            warn!(migration = id, "journal: {e}");
        }
    }

    /// After a restart: VMM processes still running are adopted; what moved or failed while
    /// nobody watched is written into the journal.
    async fn adopt(self: &Arc<Self>) -> ApiResult<()> {
        let rows = self.store().vms()?;
        for row in rows {
            let socket = PathBuf::from(&row.socket);
            match vmmctl::status(&socket).await {
                Ok(st) => self.adopt_one(row, st).await,
                Err(e) => {
                    // An outgoing move in flight may have committed before the process died:
                    // only the destination can say.
                    let moving = match row.owned {
                        true => self
                            .store()
                            .unfinished()?
                            .into_iter()
                            .find(|m| m.vm == row.name && m.direction == "outgoing"),
                        false => None,
                    };
                    if let Some(m) = moving {
                        warn!(
                            vm = row.name,
                            migration = m.id,
                            "VMM process gone ({e}) during a move; asking the destination"
                        );
                        self.resolve_later(m.id, row, m.peer, Here::Gone);
                        continue;
                    }
                    warn!(vm = row.name, "VMM process gone ({e}); forgetting the VM");
                    self.store().remove_vm(&row.name)?;
                    if let Some(id) = &row.arrived_with {
                        if !row.owned {
                            self.journal(id, "failed", Some("the incoming VMM process died"), false);
                        }
                    }
                }
            }
        }
        // Whatever is still unfinished was queued or setting up when the agent stopped.
        let unfinished = self.store().unfinished()?;
        let known: Vec<String> = lock(&self.live).keys().cloned().collect();
        for m in unfinished {
            if !known.contains(&m.id) {
                let why = format!("the agent restarted while the migration was {}", m.status);
                self.journal(&m.id, "failed", Some(&why), false);
            }
        }
        Ok(())
    }

    async fn adopt_one(self: &Arc<Self>, mut row: VmRow, st: VmmStatus) {
        let socket = PathBuf::from(&row.socket);
        row.pid = st.pid;
        info!(vm = row.name, state = ?st.state, pid = st.pid, "adopting VMM process");
        match (row.owned, st.state) {
            (true, VmmState::Released) => {
                // It moved away while nobody watched. A move the journal still has in flight
                // is settled by the destination agent (its VMM's report is kept as the
                // statistics); one already journaled only needs its process stopped.
                let in_flight = st.migration.as_ref().and_then(|m| {
                    let j = self.store().migration(&m.id).ok().flatten()?;
                    (!j.is_final()).then_some((m.clone(), j.peer))
                });
                match in_flight {
                    Some((m, peer)) => {
                        if let Some(s) = &m.stats {
                            if let Err(e) = self.store().set_stats(&m.id, s) {
                                warn!("journal: {e}");
                            }
                        }
                        self.resolve_later(m.id, row, peer, Here::Released);
                    }
                    None => {
                        let _ = vmmctl::call(&socket, &VmmRequest::Stop).await;
                        let _ = self.store().remove_vm(&row.name);
                    }
                }
            }
            (true, VmmState::Migrating)
                if st.migration.as_ref().is_some_and(|m| self.journaled_kind(&m.id).as_deref() == Some("storage")) =>
            {
                // A storage move in flight: watch it to its end under a storage slot.
                let id = st.migration.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(id.clone()) });
                let cancel = Arc::new(Cancel::default());
                lock(&self.live).insert(id.clone(), Live { cancel: Some(cancel.clone()), ..Live::default() });
                let slot = self.storage_limit.force();
                let a = self.clone();
                let span = tracing::info_span!("migration", id = %id, vm = %row.name, direction = "local");
                tokio::spawn(
                    async move {
                        let r = a.watch_outgoing(&id, &row, "", Some(&cancel), false).await;
                        a.finish_storage(&id, &row, r);
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            (true, VmmState::Migrating) | (true, VmmState::Uncertain) => {
                let id = st.migration.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                let journaled = self.store().migration(&id).ok().flatten();
                let live_move = journaled.as_ref().is_none_or(|m| m.kind != "quick");
                let peer = journaled.map(|m| m.peer).unwrap_or_default();
                lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(id.clone()) });
                lock(&self.live).insert(id.clone(), Live::default());
                let slot = self.limit.force();
                let a = self.clone();
                let span = tracing::info_span!("migration", id = %id, vm = %row.name, direction = "outgoing");
                tokio::spawn(
                    async move {
                        let r = a.watch_outgoing(&id, &row, &peer, None, live_move).await;
                        a.finish_outgoing(&id, &row, &peer, r).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            (true, _) => {
                // A storage move that ended while nobody watched: journal its outcome.
                if let Some(m) = st.migration.as_ref().filter(|m| m.done) {
                    let open = self.store().migration(&m.id).ok().flatten().filter(|j| !j.is_final());
                    if open.is_some_and(|j| j.kind == "storage") {
                        self.finish_outgoing_record(&m.id, m);
                    }
                }
                lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: None });
                let _ = self.store().put_vm(&row);
            }
            (false, _) => {
                let id = row.arrived_with.clone().unwrap_or_default();
                lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(id.clone()) });
                lock(&self.live).insert(id.clone(), Live::default());
                let slot = self.limit.force();
                // Its disk space stays promised until it ends (the journal kept how much).
                let need = self.store().disk_reserved_of(&id).unwrap_or(0);
                let claim = (need > 0).then(|| {
                    let dir = self.cfg.disk_dir.join(&row.name);
                    lock(&self.disk_promised).insert(id.clone(), DiskPromise { dir, need });
                    DiskClaim { promised: self.disk_promised.clone(), id: id.clone() }
                });
                let a = self.clone();
                let span = tracing::info_span!("migration", id = %id, vm = %row.name, direction = "incoming");
                tokio::spawn(async move { a.watch_incoming(id, row, slot, claim).await }.instrument(span));
            }
        }
    }

    fn journaled_kind(&self, id: &str) -> Option<String> {
        self.store().migration(id).ok().flatten().map(|m| m.kind)
    }

    fn vm_socket(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(format!("{name}.sock"))
    }

    /// Start a VMM process and wait until it answers in `want` state (or fails).
    async fn spawn_vmm(
        &self,
        name: &str,
        guest: GuestKind,
        extra: &[String],
        memory_bytes: u64,
    ) -> ApiResult<VmmStatus> {
        let socket = self.vm_socket(name);
        let log = self.cfg.state_dir.join("vms").join(format!("{name}.log"));
        let mut args = vec![
            "--name".to_string(),
            name.to_string(),
            "--guest".into(),
            guest.name().into(),
            "--memory-bytes".into(),
            memory_bytes.to_string(),
        ];
        args.extend_from_slice(extra);
        // A quick arrival listens on nothing: it waits for the ownership record.
        let quick = extra.iter().any(|a| a == "--quick-dir");
        self.spawn_process(&socket, &log, &args, |st| match st.state {
            VmmState::Receiving => st.listen.is_some() || quick,
            _ => true,
        })
        .await
    }

    /// Start a VMM process (`ferry-vmm --socket S --key-file K|--tls-dir D ARGS`, output appended to `log`)
    /// and wait until its status is `ready`.
    async fn spawn_process(
        &self,
        socket: &Path,
        log: &Path,
        args: &[String],
        ready: impl Fn(&VmmStatus) -> bool,
    ) -> ApiResult<VmmStatus> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| ApiError::internal(format!("VMM log {}: {e}", log.display())))?;
        let logf2 = logf.try_clone().map_err(|e| ApiError::internal(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&self.vmm_exe);
        cmd.arg("--socket")
            .arg(socket)
            .args(self.cfg.credentials.vmm_args())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .kill_on_drop(false);
        let mut child =
            cmd.spawn().map_err(|e| ApiError::internal(format!("starting {}: {e}", self.vmm_exe.display())))?;
        let t0 = Instant::now();
        loop {
            if let Ok(Some(code)) = child.try_wait() {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "vmm_failed",
                    format!("the VMM process exited ({code}): {last}"),
                ));
            }
            if let Ok(st) = vmmctl::status(socket).await {
                if ready(&st) {
                    // Reap it whenever it exits (it outlives us if we go first).
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                    return Ok(st);
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.start_kill();
                return Err(ApiError::internal("the VMM process did not answer within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the standby VMMs a previous agent left (their reserves are not ours to count).
    async fn stop_old_standbys(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.state_dir.join("vms")) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let standby = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".standby-"));
            if standby && p.extension().is_some_and(|x| x == "sock") {
                let _ = vmmctl::call(&p, &VmmRequest::Stop).await;
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// The networks a receiving VMM checks each channel against: with `integrity` or `off`,
    /// the ones this host trusts (a channel elsewhere is refused); with `aead`, none.
    fn trusted_for(&self, mode: Encryption) -> Vec<String> {
        if mode == Encryption::Aead {
            return Vec::new();
        }
        self.settings().networks.iter().filter(|n| n.trusted).map(|n| n.subnet.clone()).collect()
    }

    /// With `memory_reserve_bytes`, start a standby VMM (in the background) unless one is kept.
    fn refill_standby(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        let bytes = self.cfg.memory_reserve_bytes;
        if bytes == 0 || lock(&self.standby).is_some() || self.standby_starting.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(async move {
            let id = new_id();
            let socket = self.cfg.state_dir.join("vms").join(format!(".standby-{id}.sock"));
            let log = self.cfg.state_dir.join("vms").join(format!(".standby-{id}.log"));
            let extra = ["--standby".to_string(), "--reserve-bytes".into(), bytes.to_string()];
            match self.spawn_process(&socket, &log, &extra, |_| true).await {
                Ok(_) => {
                    info!(reserve_bytes = bytes, socket = %socket.display(), "standby VMM started");
                    *lock(&self.standby) = Some(socket);
                }
                Err(e) => warn!(error = %e.message, "the standby VMM did not start; incoming VMs map cold memory"),
            }
            self.standby_starting.store(false, Ordering::SeqCst);
        });
    }

    /// Take the standby VMM for an incoming VM of `memory_bytes` if its reserve is filled and
    /// holds the VM; `None`: spawn a fresh (cold) VMM.
    async fn take_standby(&self, memory_bytes: u64) -> Option<PathBuf> {
        let socket = lock(&self.standby).take()?;
        match vmmctl::status(&socket).await {
            Ok(st) if st.state == VmmState::Standby && st.reserve_bytes >= crate::vmm::reserve_need(memory_bytes) => {
                Some(socket)
            }
            Ok(st) if st.state == VmmState::Standby => {
                // Still filling, or too small for this VM: keep it for the next one.
                *lock(&self.standby) = Some(socket);
                None
            }
            _ => {
                // Failed or gone: a new one replaces it.
                let _ = vmmctl::call(&socket, &VmmRequest::Stop).await;
                None
            }
        }
    }

    /// The standby VMM at `standby` becomes the receiving VMM of `req` (listening on `on`);
    /// its status once it listens.
    async fn assign_standby(
        &self,
        standby: &Path,
        req: &IncomingRequest,
        on: std::net::IpAddr,
        receive_disks: &Option<vmmctl::ReceiveDisks>,
        encryption: Encryption,
    ) -> Result<VmmStatus, VmmCtlError> {
        let socket = self.vm_socket(&req.vm);
        let order = vmmctl::AssignOrder {
            name: req.vm.clone(),
            guest: req.guest,
            memory_bytes: req.memory_bytes,
            receive_on: on,
            socket: socket.clone(),
            receive_disks: receive_disks.clone(),
            encryption,
            trusted_networks: self.trusted_for(encryption),
            peer_name: self.tls.as_ref().map(|_| req.source.clone()),
        };
        let r = vmmctl::call(standby, &VmmRequest::Assign(order)).await;
        if r.is_err() {
            let _ = vmmctl::call(standby, &VmmRequest::Stop).await;
        }
        let st = r?.status.ok_or_else(|| VmmCtlError::BadAnswer("no status".into()))?;
        // Its log follows the VM's name, as a fresh VMM's does.
        let log = |s: &Path| s.with_extension("log");
        let _ = std::fs::rename(log(standby), log(&socket));
        Ok(st)
    }

    async fn vm_info(&self, e: &VmEntry) -> VmInfo {
        let st = vmmctl::status(Path::new(&e.row.socket)).await;
        let disks = st
            .as_ref()
            .map(|s| {
                s.disks
                    .iter()
                    .map(|d| DiskInfo {
                        name: d.name.clone(),
                        path: d.path.clone(),
                        size_bytes: d.size_bytes,
                        allocated_bytes: d.allocated_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (state, pid, counter, verified, check, from_reserve) = match st {
            Ok(s) => {
                let state = match s.state {
                    VmmState::Running => "running",
                    VmmState::Paused => "paused",
                    VmmState::Migrating => "migrating",
                    VmmState::Receiving => "arriving",
                    VmmState::Released => "moved",
                    VmmState::Uncertain => "uncertain",
                    VmmState::Failed => "failed",
                    VmmState::Standby => "standby",
                };
                (state.to_string(), s.pid, s.guest_counter, s.received_verified, s.guest_check, s.from_reserve)
            }
            Err(_) => ("lost".into(), e.row.pid, 0, None, None, None),
        };
        VmInfo {
            name: e.row.name.clone(),
            guest: e.row.guest,
            memory_bytes: e.row.memory_bytes,
            state,
            epoch: e.row.epoch,
            pid,
            guest_counter: counter,
            arrived_with: e.row.arrived_with.clone(),
            arrived_verified: verified,
            guest_check: check,
            disks,
            arrived_from_reserve: from_reserve,
        }
    }

    fn owned(&self, name: &str) -> ApiResult<VmEntry> {
        match lock(&self.vms).get(name) {
            Some(e) if e.row.owned => Ok(e.clone()),
            _ => Err(ApiError::not_found(format!("no VM named {name:?} on this host"))),
        }
    }

    fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Change the settings: `f` edits a copy; the result is checked, kept in the state
    /// database, and only then used (a refused change changes nothing).
    fn change_settings(&self, f: impl FnOnce(&mut Settings) -> ApiResult<()>) -> ApiResult<Settings> {
        let mut g = lock(&self.settings);
        let mut next = g.clone();
        f(&mut next)?;
        next.networks.sort_by_key(|n| n.priority);
        next.check().map_err(|e| ApiError::bad(e.to_string()))?;
        self.store().put_settings(&next)?;
        if next.max_live_migrations != g.max_live_migrations {
            self.limit.set_limit(next.max_live_migrations);
        }
        info!(settings = ?next, "host settings changed");
        *g = next.clone();
        Ok(next)
    }

    fn host_info(&self) -> HostInfo {
        let (limit, active, queued) = self.limit.snapshot();
        let (_, storage_active, storage_queued) = self.storage_limit.snapshot();
        let set = self.settings();
        HostInfo {
            name: self.cfg.name.clone(),
            listen: self.cfg.listen.to_string(),
            max_live_migrations: limit,
            max_storage_migrations: self.cfg.max_storage_migrations,
            performance_option: set.performance_option.clone(),
            networks: set
                .subnets()
                .iter()
                .map(|(s, p)| {
                    let trusted = set.networks.iter().any(|n| n.trusted && Subnet::parse(&n.subnet).ok() == Some(*s));
                    format!("{s} priority {p}{}", if trusted { " trusted" } else { "" })
                })
                .collect(),
            use_any_network: set.any_network(),
            encryption: set.encryption.to_string(),
            shared_storage: self.cfg.shared_storage.as_ref().map(|p| p.display().to_string()),
            active_migrations: active,
            queued_migrations: queued,
            vms: lock(&self.vms).values().filter(|e| e.row.owned).count(),
            active_storage_migrations: storage_active,
            queued_storage_migrations: storage_queued,
            memory_reserve_bytes: self.cfg.memory_reserve_bytes,
            memory_reserve_ready_bytes: 0,
            credentials: self.cfg.credentials.kind().into(),
            credentials_source: self.cfg.credentials.describe(),
            disk_reserved_bytes: lock(&self.disk_promised).values().map(DiskPromise::outstanding).sum(),
        }
    }

    /// [`Self::host_info`] with the standby VMM's reserve as it is now.
    async fn host_info_now(&self) -> HostInfo {
        let mut h = self.host_info();
        let standby = lock(&self.standby).clone();
        if let Some(s) = standby {
            if let Ok(st) = vmmctl::status(&s).await {
                h.memory_reserve_ready_bytes = st.reserve_bytes;
            }
        }
        h
    }

    fn migration_info(&self, id: &str) -> ApiResult<MigrationInfo> {
        let mut m = self.store().migration(id)?.ok_or_else(|| ApiError::not_found(format!("no migration {id:?}")))?;
        if let Some(l) = lock(&self.live).get(id) {
            if !m.is_final() {
                let r = &l.report;
                m.round = r.round;
                m.remaining_bytes = r.remaining_bytes;
                m.transferred_bytes = r.transferred_bytes;
                m.guest_bytes = r.guest_bytes;
                m.expected_downtime_ms = r.expected_downtime_ms;
                m.bandwidth_bytes_per_s = r.bandwidth_bytes_per_s;
            }
        }
        Ok(m)
    }

    // ---- moves (source side) ----

    async fn start_move(self: &Arc<Self>, req: MoveRequest) -> ApiResult<MoveAccepted> {
        if req.kind == MoveKind::Quick {
            if self.cfg.shared_storage.is_none() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no_shared_storage",
                    format!(
                        "a quick move needs shared storage: host {} has no shared_storage in its config \
                         (a directory both hosts mount at the same path)",
                        self.cfg.name
                    ),
                ));
            }
            for (what, n) in [("host name", &self.cfg.name), ("VM name", &req.vm)] {
                ferry_migrate::quick::check_name(n)
                    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_name", format!("{what}: {e}")))?;
            }
        }
        let settings = self.settings();
        let (option, channels, to) = self.route(&settings, req.option.as_deref(), req.channels, &req.to)?;
        let downtime_ms = req.downtime_ms.unwrap_or(300);
        if !(1..=60_000).contains(&downtime_ms) {
            return Err(ApiError::bad(format!("downtime_ms {downtime_ms} is not in 1 ..= 60000")));
        }
        settings
            .network_allows(to.ip())
            .map_err(|why| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_network", why))?;
        let asked = parse_asked(req.encryption.as_deref())?;
        let protection = match req.kind {
            MoveKind::Quick if asked.is_some() => {
                return Err(ApiError::bad(
                    "encryption applies to live moves: a quick move sends no frames (the image goes through \
                     the shared storage)",
                ))
            }
            MoveKind::Quick => None,
            MoveKind::Live => Some(
                settings
                    .protection_for(asked, to.ip(), settings.multichannel(), &self.cfg.name)
                    .map_err(|why| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "untrusted_network", why))?,
            ),
        };
        if req.retain_source_disks && !req.include_storage {
            return Err(ApiError::bad("retain_source_disks needs include_storage"));
        }
        // Its disks follow it only on a live move that includes storage: the destination has
        // no copy of them.
        let disk_count = match self.owned(&req.vm) {
            Ok(e) => vmmctl::status(Path::new(&e.row.socket)).await.map(|st| st.disks.len()).unwrap_or(0),
            Err(_) => 0,
        };
        if let Some(why) = disks_stay_behind(&req.vm, disk_count, req.kind, req.include_storage) {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "has_disks", why));
        }
        let kind_name = move_kind_name(req.kind, disk_count > 0);
        let id = new_id();
        let row = {
            let mut vms = lock(&self.vms);
            let e = match vms.get_mut(&req.vm) {
                Some(e) if e.row.owned => e,
                _ => return Err(ApiError::not_found(format!("no VM named {:?} on this host", req.vm))),
            };
            if let Some(m) = &e.busy {
                return Err(ApiError::conflict(format!("VM {:?} is already moving (migration {m})", req.vm)));
            }
            e.busy = Some(id.clone());
            e.row.clone()
        };
        let journaled = self.store().atomically(|store| {
            store.new_migration_of_kind(&id, &req.vm, "outgoing", &req.to, "queued", false, kind_name)?;
            match &protection {
                Some(p) => store.set_encryption(&id, p.mode.as_str()),
                None => Ok(()),
            }
        });
        if let Err(e) = journaled {
            self.unbusy(&req.vm);
            return Err(e.into());
        }
        let cancel = self.open_queued(&id);
        let a = self.clone();
        let span = tracing::info_span!("migration", id = %id, vm = %req.vm, direction = "outgoing");
        let multichannel = settings.multichannel().then(|| crate::vmmctl::MultichannelOrder {
            policy: settings.policy_string(),
            channels_per_path: channels,
        });
        let (encryption, asked) = protection.as_ref().map(|p| (p.mode, p.asked)).unwrap_or_default();
        if let Some(p) = &protection {
            info!(parent: &span, encryption = p.mode.as_str(), why = %p.why, "frame protection");
        }
        let order = MigrateOrder {
            id: id.clone(),
            to,
            channels,
            option,
            downtime_ms,
            multichannel,
            include_storage: disk_count > 0,
            retain_source_disks: req.retain_source_disks,
            encryption,
            peer_name: Some(to.ip().to_string()),
        };
        let id2 = id.clone();
        let kind = req.kind;
        tokio::spawn(async move { a.run_move(id2, row, order, kind, asked, cancel).await }.instrument(span));
        Ok(MoveAccepted { id, status: "queued".into() })
    }

    // ---- storage moves (this host) ----

    async fn start_storage_move(self: &Arc<Self>, name: &str, req: MoveStorageRequest) -> ApiResult<MoveAccepted> {
        let dir = PathBuf::from(&req.path);
        let unprocessable = |code: &'static str, m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, m);
        if !dir.is_absolute() {
            return Err(ApiError::bad(format!("path {:?} is not absolute", req.path)));
        }
        if !dir.is_dir() {
            return Err(unprocessable("bad_path", format!("{} is not a directory on this host", dir.display())));
        }
        let e = self.owned(name)?;
        let st = vmmctl::status(Path::new(&e.row.socket))
            .await
            .map_err(|err| ApiError::internal(format!("asking the VMM of {name}: {err}")))?;
        if st.disks.is_empty() {
            return Err(unprocessable("no_disks", format!("VM {name:?} has no disks")));
        }
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        for d in &st.disks {
            let here = Path::new(&d.path).parent().and_then(|p| p.canonicalize().ok());
            if here.as_deref() == Some(canon.as_path()) {
                return Err(unprocessable("same_path", format!("disk {} is already in {}", d.name, dir.display())));
            }
            if dir.join(&d.name).exists() {
                return Err(ApiError::conflict(format!("{} exists already", dir.join(&d.name).display())));
            }
        }
        let id = new_id();
        let row = {
            let mut vms = lock(&self.vms);
            let e = match vms.get_mut(name) {
                Some(e) if e.row.owned => e,
                _ => return Err(ApiError::not_found(format!("no VM named {name:?} on this host"))),
            };
            if let Some(m) = &e.busy {
                return Err(ApiError::conflict(format!("VM {name:?} is already moving (migration {m})")));
            }
            e.busy = Some(id.clone());
            e.row.clone()
        };
        let dir_text = dir.display().to_string();
        if let Err(err) = self.store().new_migration_of_kind(&id, name, "local", &dir_text, "queued", false, "storage")
        {
            self.unbusy(name);
            return Err(err.into());
        }
        let cancel = self.open_queued(&id);
        let a = self.clone();
        let span = tracing::info_span!("migration", id = %id, vm = %name, direction = "local");
        let id2 = id.clone();
        tokio::spawn(async move { a.run_storage_move(id2, row, dir, cancel).await }.instrument(span));
        Ok(MoveAccepted { id, status: "queued".into() })
    }

    async fn run_storage_move(self: Arc<Self>, id: String, row: VmRow, dir: PathBuf, cancel: Arc<Cancel>) {
        info!(to = %dir.display(), "storage move queued");
        let Some(slot) = self.storage_limit.acquire(&id, &cancel).await else {
            self.end_move(&id, &row.name, "cancelled", Some("cancelled while queued"));
            return;
        };
        self.journal(&id, "setup", None, true);
        let order = StorageOrder { id: id.clone(), dir };
        let r = match vmmctl::call(Path::new(&row.socket), &VmmRequest::MoveStorage(order)).await {
            Err(e) => Err(("failed".to_string(), format!("the VMM refused the storage move: {e}"))),
            Ok(_) => self.watch_outgoing(&id, &row, "", Some(&cancel), false).await,
        };
        self.finish_storage(&id, &row, r);
        drop(slot);
    }

    /// Journal a storage move's outcome (the VM stays here whatever it was).
    fn finish_storage(&self, id: &str, row: &VmRow, r: Result<MigrationReport, (String, String)>) {
        match r {
            Err((status, why)) => self.end_move(id, &row.name, &status, Some(&why)),
            Ok(m) => {
                self.finish_outgoing_record(id, &m);
                self.unbusy(&row.name);
                lock(&self.live).remove(id);
            }
        }
    }

    async fn run_move(
        self: Arc<Self>,
        id: String,
        row: VmRow,
        order: MigrateOrder,
        kind: MoveKind,
        encryption_asked: bool,
        cancel: Arc<Cancel>,
    ) {
        info!(to = %order.to, kind = kind.name(), "move queued");
        let peer = order.to.to_string();
        let Some(slot) = self.limit.acquire(&id, &cancel).await else {
            self.end_move(&id, &row.name, "cancelled", Some("cancelled while queued"));
            return;
        };
        // The journal's `setup` is written (a disk sync) while the destination admits a live
        // move; both are done before the VMM is ordered, and before any later journal entry.
        let setup = {
            let (a, id) = (self.clone(), id.clone());
            tokio::task::spawn_blocking(move || a.journal(&id, "setup", None, true))
        };
        let r = match kind {
            MoveKind::Live => self.move_in_slot(&id, &row, order, encryption_asked, &cancel, setup).await,
            MoveKind::Quick => {
                let _ = setup.await;
                self.quick_in_slot(&id, &row, &peer, &cancel).await
            }
        };
        self.finish_outgoing(&id, &row, &peer, r).await;
        drop(slot);
    }

    /// A quick move holding its slot: the destination admits it (and proves it sees the same
    /// shared directory), the source VMM saves the VM there and hands the ownership record
    /// over. Before that handover this host owns the VM; any failure resumes it here and tells
    /// the destination to give up. `Ok` is the VMM's final report.
    /// What the destination is asked to admit for `row`: one plain move of `kind` (no probe,
    /// one channel, no disks, the destination's default protection); callers set the rest.
    fn incoming_request(&self, id: &str, row: &VmRow, kind: MoveKind) -> IncomingRequest {
        IncomingRequest {
            id: id.to_string(),
            vm: row.name.clone(),
            guest: row.guest,
            memory_bytes: row.memory_bytes,
            epoch: row.epoch,
            source: self.cfg.name.clone(),
            kind,
            probe: None,
            multichannel: false,
            disks: Vec::new(),
            encryption: None,
            encryption_asked: false,
        }
    }

    async fn quick_in_slot(
        self: &Arc<Self>,
        id: &str,
        row: &VmRow,
        peer: &str,
        cancel: &Arc<Cancel>,
    ) -> Result<MigrationReport, (String, String)> {
        let fail = |status: &str, why: String| (status.to_string(), why);
        let Some(dir) = self.cfg.shared_storage.clone() else {
            return Err(fail("failed", "no shared_storage configured".into()));
        };
        // A file only a host sharing this directory can see.
        let probe = format!(".ferry-probe-{id}");
        let probe_path = dir.join(&probe);
        std::fs::write(&probe_path, self.cfg.name.as_bytes())
            .map_err(|e| fail("failed", format!("cannot write to shared storage {}: {e}", dir.display())))?;
        let req = IncomingRequest { probe: Some(probe), ..self.incoming_request(id, row, MoveKind::Quick) };
        let admitted = self.ask_admission(&req, peer, cancel).await;
        let _ = std::fs::remove_file(&probe_path);
        let accepted = admitted?;
        let shared = ferry_migrate::quick::SharedDir::new(&dir);
        let registered = match shared.register(&row.name, &self.cfg.name, ferry_migrate::quick::VmRunState::Running) {
            Ok(_) => Ok(()),
            // Left by an earlier attempt of this host that stopped before the handover.
            Err(ferry_migrate::quick::QuickError::Exists(_)) => match shared.record(&row.name) {
                Ok(r) if r.owner == self.cfg.name && r.state == ferry_migrate::quick::VmRunState::Running => Ok(()),
                Ok(r) => Err(format!(
                    "the shared directory already has a record of VM {:?} (owner {}, {:?}, epoch {}): \
                     another host's VM of that name is moving, or a move was left unfinished",
                    row.name, r.owner, r.state, r.epoch
                )),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let order = VmmRequest::QuickSave(QuickOrder {
            id: id.to_string(),
            dir: dir.clone(),
            from: self.cfg.name.clone(),
            to: accepted.host.clone(),
        });
        let r = match registered {
            Err(why) => Err(fail("failed", why)),
            Ok(()) if cancel.is_cancelled() => Err(fail("cancelled", "cancelled before the VM was saved".into())),
            Ok(()) => match vmmctl::call(Path::new(&row.socket), &order).await {
                Err(e) => Err(fail("failed", format!("the VMM refused the quick migration: {e}"))),
                // A cancel reaches the VMM, which stops before the handover (or finds it done).
                Ok(_) => self.watch_outgoing(id, row, peer, Some(cancel), false).await,
            },
        };
        let handed_over = matches!(&r, Ok(m) if m.status == "completed");
        if !handed_over {
            // Still the owner: drop the record, and tell the destination not to wait.
            let _ = shared.unregister(&row.name, &self.cfg.name);
            let reason = match &r {
                Err((_, why)) => why.clone(),
                Ok(m) => m.error.clone().unwrap_or_else(|| m.status.clone()),
            };
            let body = serde_json::to_vec(&IncomingAbort { reason }).unwrap_or_default();
            if let Err((_, why)) =
                self.peer_call("POST", peer, &format!("/peer/v1/incoming/{id}/abort"), Some(body)).await
            {
                warn!("telling the destination to give up: {why}");
            }
        }
        r
    }

    /// Ask the destination to admit a migration; while it is busy, ask again (up to 300 s).
    async fn ask_admission(
        &self,
        req: &IncomingRequest,
        peer: &str,
        cancel: &Arc<Cancel>,
    ) -> Result<IncomingAccepted, (String, String)> {
        let fail = |status: &str, why: String| (status.to_string(), why);
        let body = serde_json::to_vec(req).map_err(|e| fail("failed", e.to_string()))?;
        let t0 = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Err(fail("cancelled", "cancelled before the destination admitted it".into()));
            }
            match self.peer_call("POST", peer, "/peer/v1/incoming", Some(body.clone())).await {
                Ok(v) => {
                    return serde_json::from_value(v)
                        .map_err(|e| fail("failed", format!("destination answered badly: {e}")))
                }
                Err((Some(503), why)) if t0.elapsed() < Duration::from_secs(300) => {
                    info!("destination busy: {why}");
                    cancel.wait(Duration::from_millis(200)).await;
                }
                Err((_, why)) => return Err(fail("failed", format!("destination {peer} refused: {why}"))),
            }
        }
    }

    /// Ask the destination, order the VMM, watch it. `Ok` is the VMM's final report.
    async fn move_in_slot(
        self: &Arc<Self>,
        id: &str,
        row: &VmRow,
        mut order: MigrateOrder,
        encryption_asked: bool,
        cancel: &Arc<Cancel>,
        setup: tokio::task::JoinHandle<()>,
    ) -> Result<MigrationReport, (String, String)> {
        let fail = |status: &str, why: String| (status.to_string(), why);
        let peer = order.to.to_string();
        let admission = async {
            // Shared-nothing: the disks as they are now (the destination needs room for them).
            let disks = match order.include_storage {
                false => Vec::new(),
                true => match vmmctl::status(Path::new(&row.socket)).await {
                    Ok(st) => incoming_disks(&st.disks),
                    Err(e) => return Err(fail("failed", format!("asking the VMM for its disks: {e}"))),
                },
            };
            let req = IncomingRequest {
                multichannel: order.multichannel.is_some(),
                disks,
                encryption: Some(order.encryption.to_string()),
                encryption_asked,
                ..self.incoming_request(id, row, MoveKind::Live)
            };
            // The destination admits under its own limit; while it is busy, ask again.
            self.ask_admission(&req, &peer, cancel).await
        };
        let (_, accepted) = tokio::join!(setup, admission);
        let accepted = accepted?;
        // It accepts what was proposed, or aead where it does not trust its side (only when
        // the move did not ask for the mode itself); anything else is a peer not to follow.
        let agreed = match accepted.encryption.as_deref().map(str::parse::<Encryption>).transpose() {
            Ok(m) => m.unwrap_or(Encryption::Aead),
            Err(e) => return Err(fail("failed", format!("destination answered a bad protection: {e}"))),
        };
        if agreed != order.encryption {
            if agreed != Encryption::Aead || encryption_asked {
                return Err(fail(
                    "failed",
                    format!("destination agreed to encryption {agreed}, not the {} this move uses", order.encryption),
                ));
            }
            info!(proposed = order.encryption.as_str(), "the destination does not trust its side: aead");
            order.encryption = agreed;
            if let Err(e) = self.store().set_encryption(id, agreed.as_str()) {
                warn!(error = %e, "journaling the protection");
            }
        }
        order.to = match accepted.migration_addr.parse() {
            Ok(a) => a,
            Err(_) => {
                return Err(fail("failed", format!("destination gave a bad address {:?}", accepted.migration_addr)))
            }
        };
        let socket = PathBuf::from(&row.socket);
        if let Err(e) = vmmctl::call(&socket, &VmmRequest::Migrate(order)).await {
            return Err(fail("failed", format!("the VMM refused the migration: {e}")));
        }
        self.watch_outgoing(id, row, &peer, Some(cancel), true).await
    }

    /// Watch the source VMM until its migration ended; journal each state change. The VMM
    /// answers at each change of the migration's status (so its end is seen at once), and
    /// otherwise every 100 ms with its progress.
    ///
    /// With `watch_peer` (live moves) it also asks the destination agent about once a second
    /// whether it still expects the VM: a destination whose agent is gone (killed, restarted
    /// and forgot it) could not supervise the VM there, so after [`PEER_MISSES`] answers
    /// missed in a row the migration is cancelled (before commit the VM keeps running here)
    /// and recorded as failed with that reason.
    async fn watch_outgoing(
        &self,
        id: &str,
        row: &VmRow,
        peer: &str,
        cancel: Option<&Arc<Cancel>>,
        watch_peer: bool,
    ) -> Result<MigrationReport, (String, String)> {
        let socket = PathBuf::from(&row.socket);
        let mut last = self.store().status_of(id).ok().flatten().unwrap_or_default();
        let mut cancel_sent = false;
        let mut misses = 0;
        let mut peer_misses = 0;
        let mut peer_lost: Option<String> = None;
        let mut peer_checked = Instant::now();
        let mut seen: Option<VmmStatus> = None;
        loop {
            match vmmctl::wait_change(&socket, seen.as_ref(), Duration::from_millis(100)).await {
                Ok(st) => {
                    misses = 0;
                    seen = Some(st.clone());
                    let Some(m) = st.migration.filter(|m| m.id == id) else {
                        return Err(("failed".into(), "the VMM does not know this migration".into()));
                    };
                    // A final status is journaled only with the outcome (stats, verified), by
                    // `finish_outgoing`: the VMM's last progress report may say `completed` a
                    // moment before its outcome is ready, and a caller polling the journal
                    // would take that as the end.
                    let final_status = matches!(m.status.as_str(), "completed" | "failed" | "cancelled" | "uncertain");
                    if m.status != last && !m.done && !final_status {
                        self.journal(id, &m.status, None, false);
                        last = m.status.clone();
                    }
                    let changed = lock(&self.live).get_mut(id).map(|l| {
                        let c = l.report != m;
                        l.report = m.clone();
                        c
                    });
                    if changed == Some(true) && !m.done {
                        let ev = serde_json::json!({"type": "progress", "id": id, "status": m.status, "round": m.round,
                            "transferred_bytes": m.transferred_bytes, "remaining_bytes": m.remaining_bytes,
                            "guest_bytes": m.guest_bytes, "expected_downtime_ms": m.expected_downtime_ms,
                            "bandwidth_bytes_per_s": m.bandwidth_bytes_per_s});
                        let _ = self.events.send(ev.to_string());
                    }
                    if m.done {
                        if let Some(why) = peer_lost.filter(|_| m.status == "cancelled") {
                            return Err(("failed".into(), why));
                        }
                        return Ok(m);
                    }
                }
                Err(e) => {
                    misses += 1;
                    if misses > 20 {
                        return Err(("failed".into(), format!("lost the VMM process: {e}")));
                    }
                    seen = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if watch_peer && peer_lost.is_none() && peer_checked.elapsed() >= Duration::from_secs(1) {
                peer_checked = Instant::now();
                match self.peer_expects(id, &row.name, peer).await {
                    Ok(()) => peer_misses = 0,
                    Err(why) => {
                        peer_misses += 1;
                        warn!(misses = peer_misses, "the destination agent: {why}");
                        if peer_misses >= PEER_MISSES {
                            let why = format!("the destination agent {peer} is gone ({why}): cancelled before commit");
                            warn!("{why}");
                            if let Err(e) = vmmctl::call(&socket, &VmmRequest::Cancel).await {
                                warn!("cancel: {e}");
                            }
                            peer_lost = Some(why);
                        }
                    }
                }
            }
            if let Some(c) = cancel {
                if c.is_cancelled() && !cancel_sent {
                    cancel_sent = true;
                    if let Err(e) = vmmctl::call(&socket, &VmmRequest::Cancel).await {
                        warn!("cancel: {e}");
                    }
                }
            }
        }
    }

    /// Does the destination agent answer, and expect this VM with migration `id`?
    async fn peer_expects(&self, id: &str, vm: &str, peer: &str) -> Result<(), String> {
        let path = format!("/peer/v1/vms/{vm}");
        match self.peer_call_within("GET", peer, &path, None, Duration::from_secs(5)).await {
            Ok(v) => match serde_json::from_value::<PeerVm>(v) {
                Ok(p) if p.arrived_with.as_deref() == Some(id) => Ok(()),
                Ok(_) => Err("it has another VM of that name".into()),
                Err(e) => Err(format!("bad answer: {e}")),
            },
            Err((_, why)) => Err(why),
        }
    }

    fn finish_outgoing_record(&self, id: &str, m: &MigrationReport) {
        if let Some(s) = &m.stats {
            if let Err(e) = self.store().set_stats(id, s) {
                warn!("journal: {e}");
            }
        }
        let status = match m.status.as_str() {
            "completed" => "completed",
            "cancelled" => "cancelled",
            "uncertain" => "uncertain",
            _ => "failed",
        };
        self.journal(id, status, m.error.as_deref(), false);
    }

    async fn finish_outgoing(&self, id: &str, row: &VmRow, peer: &str, r: Result<MigrationReport, (String, String)>) {
        match r {
            Err((status, why)) => self.end_move(id, &row.name, &status, Some(&why)),
            Ok(mut m) if m.status == "completed" => {
                let quick = m.stats.as_ref().and_then(|s| s.get("kind")).and_then(|k| k.as_str()) == Some("quick");
                if quick {
                    // The record names the destination: it owns the VM (saved). It is done once
                    // its agent loaded and runs it; its answer says whether the digests matched.
                    match self.await_quick_loaded(id, row, peer).await {
                        Ok(p) => {
                            if let Some(s) = m.stats.as_mut().and_then(|s| s.as_object_mut()) {
                                let save_ms = s.get("downtime_ms").and_then(|v| v.as_f64()).unwrap_or(0.0);
                                let load_ms = p.load_ms.unwrap_or(0.0);
                                s.insert("verified".into(), p.verified.unwrap_or(false).into());
                                s.insert("load_ms".into(), load_ms.into());
                                s.insert("downtime_ms".into(), (save_ms + load_ms).into());
                            }
                        }
                        Err(why) => {
                            m.status = "failed".into();
                            m.error = Some(why);
                        }
                    }
                } else {
                    // The destination confirmed `Resumed`: it owns the VM. Report the move done
                    // only once its agent lists the VM too, so a caller that sees `completed`
                    // finds it there (its agent learns of the commit from its own VMM a moment
                    // later).
                    self.await_peer_adopted(id, row, peer).await;
                }
                self.finish_outgoing_record(id, &m);
                // Either way the VM is no longer this host's (after a failed quick load the
                // destination owns the saved image).
                self.release(row).await;
                lock(&self.live).remove(id);
            }
            Ok(m) if m.status == "uncertain" => {
                self.finish_outgoing_record(id, &m);
                self.resolve_uncertain(id, row, peer).await;
            }
            Ok(mut m) => {
                if m.status == "failed" && !peer.is_empty() {
                    // The engine here often sees only the broken channel; the destination knows
                    // why it gave up (its disk full, say).
                    if let Some(why) = self.peer_failure(id, peer).await {
                        m.error = Some(format!("{}; destination: {why}", m.error.unwrap_or_default()));
                    }
                }
                self.finish_outgoing_record(id, &m);
                self.unbusy(&row.name);
                lock(&self.live).remove(id);
            }
        }
    }

    /// Why the destination's side of migration `id` failed, if its agent says so within about
    /// 2 s (it journals its side a moment after the engine there gave up).
    async fn peer_failure(&self, id: &str, peer: &str) -> Option<String> {
        let path = format!("/peer/v1/migrations/{id}");
        for _ in 0..20 {
            let v = self.peer_call_within("GET", peer, &path, None, Duration::from_secs(2)).await.ok()?;
            let m: MigrationInfo = serde_json::from_value(v).ok()?;
            if m.is_final() {
                return m.error;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Wait (at most about 10 s) until the destination agent lists the VM as its own, arrived
    /// with migration `id`. Ownership has already passed; this only orders what callers see.
    async fn await_peer_adopted(&self, id: &str, row: &VmRow, peer: &str) {
        let path = format!("/peer/v1/vms/{}", row.name);
        for _ in 0..100 {
            if let Ok(v) = self.peer_call("GET", peer, &path, None).await {
                let p: Option<PeerVm> = serde_json::from_value(v).ok();
                if p.is_some_and(|p| p.owned && p.arrived_with.as_deref() == Some(id)) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        warn!("the destination agent has not listed the VM yet; reporting the move done anyway");
    }

    /// After a quick handover: wait until the destination agent runs the VM (`Ok`, with its
    /// answer) or says its load failed (`Err`, why). It owns the VM either way.
    async fn await_quick_loaded(&self, id: &str, row: &VmRow, peer: &str) -> Result<PeerVm, String> {
        let path = format!("/peer/v1/vms/{}", row.name);
        let t0 = Instant::now();
        let mut last = String::from("no answer");
        while t0.elapsed() < Duration::from_secs(900) {
            match self.peer_call("GET", peer, &path, None).await {
                Ok(v) => match serde_json::from_value::<PeerVm>(v) {
                    Ok(p) if p.arrived_with.as_deref() == Some(id) && p.owned => return Ok(p),
                    Ok(p) if p.arrived_with.as_deref() == Some(id) => {}
                    Ok(_) => return Err("the destination runs another VM of that name".into()),
                    Err(e) => last = format!("bad answer: {e}"),
                },
                Err((Some(404), _)) => {
                    let why = self
                        .peer_call("GET", peer, &format!("/peer/v1/migrations/{id}"), None)
                        .await
                        .ok()
                        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                        .unwrap_or_else(|| "the destination could not load the VM".into());
                    return Err(format!("handed over, but the destination failed to load it: {why}"));
                }
                Err((_, why)) => last = why,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("handed over, but the destination has not loaded the VM in 900 s ({last})"))
    }

    /// The VM runs on the destination now: forget it here and stop the process.
    async fn release(&self, row: &VmRow) {
        let _ = vmmctl::call(Path::new(&row.socket), &VmmRequest::Stop).await;
        lock(&self.vms).remove(&row.name);
        if let Err(e) = self.store().remove_vm(&row.name) {
            warn!("journal: {e}");
        }
    }

    /// After a restart: settle migration `id` of `row`, whose end this agent did not see, by
    /// asking the destination (in the background; the journal says `uncertain` meanwhile).
    fn resolve_later(self: &Arc<Self>, id: String, row: VmRow, peer: String, here: Here) {
        info!(migration = id, vm = row.name, ?here, "the agent restarted during this move; asking the destination");
        self.journal(&id, "uncertain", Some(here.why_uncertain()), false);
        lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(id.clone()) });
        lock(&self.live).insert(id.clone(), Live::default());
        let a = self.clone();
        let span = tracing::info_span!("migration", id = %id, vm = %row.name, direction = "outgoing");
        tokio::spawn(async move { a.resolve_by_peer(&id, &row, &peer, here).await }.instrument(span));
    }

    /// Commit was sent, its confirmation lost: ask the destination who owns the VM.
    async fn resolve_uncertain(&self, id: &str, row: &VmRow, peer: &str) {
        self.resolve_by_peer(id, row, peer, Here::Paused).await
    }

    /// Ask the destination who owns the VM of migration `id` and journal the answer: the
    /// destination's word decides, never a guess. While it does not answer (about a minute),
    /// the journal stays `uncertain` and the copy here (if any) stays paused.
    async fn resolve_by_peer(&self, id: &str, row: &VmRow, peer: &str, here: Here) {
        let path = format!("/peer/v1/vms/{}", row.name);
        for attempt in 0..60 {
            let peer_has = match self.peer_call("GET", peer, &path, None).await {
                Ok(v) => serde_json::from_value::<PeerVm>(v).ok(),
                Err((Some(404), _)) => None,
                Err((_, why)) => {
                    warn!(attempt, "asking the destination who owns the VM: {why}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let this_move = peer_has.as_ref().filter(|p| p.arrived_with.as_deref() == Some(id));
            match this_move {
                // Still arriving there: its outcome is not known yet.
                Some(p) if !p.owned => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Some(_) => {
                    self.journal(id, "completed", Some("the destination confirmed it owns the VM"), false);
                    self.release(row).await;
                }
                None => {
                    let knows = if peer_has.is_some() { "does not run the VM" } else { "does not know the VM" };
                    match here {
                        Here::Paused => {
                            let _ = vmmctl::call(Path::new(&row.socket), &VmmRequest::Resume).await;
                            let why = format!("commit unconfirmed and the destination {knows}: resumed here");
                            self.journal(id, "failed", Some(&why), false);
                            self.unbusy(&row.name);
                        }
                        Here::Released | Here::Gone => {
                            let why = format!("{} and the destination {knows}: the VM is lost", here.why_uncertain());
                            self.journal(id, "failed", Some(&why), false);
                            self.release(row).await;
                        }
                    }
                }
            }
            lock(&self.live).remove(id);
            return;
        }
        warn!("the destination did not answer; status uncertain");
    }

    fn unbusy(&self, name: &str) {
        if let Some(e) = lock(&self.vms).get_mut(name) {
            e.busy = None;
        }
    }

    fn end_move(&self, id: &str, vm: &str, status: &str, why: Option<&str>) {
        self.journal(id, status, why, false);
        self.unbusy(vm);
        lock(&self.live).remove(id);
    }

    async fn cancel(&self, id: &str) -> ApiResult<MigrationInfo> {
        let m = self.migration_info(id)?;
        if m.is_final() {
            return Err(ApiError::conflict(format!("migration {id} already ended ({})", m.status)));
        }
        if m.direction == "incoming" {
            return Err(ApiError::conflict("cancel an incoming migration at its source host"));
        }
        match lock(&self.live).get(id).and_then(|l| l.cancel.clone()) {
            Some(c) => c.cancel(),
            None => return Err(ApiError::conflict(format!("migration {id} cannot be cancelled now ({})", m.status))),
        }
        // Wait a moment for a queued move to leave the line, so the answer says so.
        for _ in 0..50 {
            let m = self.migration_info(id)?;
            if m.is_final() {
                return Ok(m);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.migration_info(id)
    }

    /// How this host proves itself to the peer at `to`, in a sentence (preflight).
    fn credentials_for(&self, to: &str) -> String {
        match &self.cfg.credentials {
            HostCredentials::Key { file, .. } => format!("psk: the key in {}", file.display()),
            HostCredentials::Tls { dir, .. } => format!(
                "tls: host certificates in {}; the destination's certificate must chain to its ca.pem and name {}",
                dir.display(),
                to.rsplit_once(':').map_or(to, |(h, _)| h)
            ),
        }
    }

    /// A signed request to a peer agent. `Err((http status, sentence))`.
    async fn peer_call(
        &self,
        method: &str,
        peer: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<serde_json::Value, (Option<u16>, String)> {
        self.peer_call_within(method, peer, path, body, Duration::from_secs(90)).await
    }

    /// [`Agent::peer_call`] with its own time limit.
    async fn peer_call_within(
        &self,
        method: &str,
        peer: &str,
        path: &str,
        body: Option<Vec<u8>>,
        within: Duration,
    ) -> Result<serde_json::Value, (Option<u16>, String)> {
        let (ep, headers) = match &self.cfg.credentials {
            HostCredentials::Key { key, .. } => {
                let b = body.as_deref().unwrap_or_default();
                let auth = peer::sign(key.bytes(), now_ms(), method, path, b);
                (Endpoint::Tcp(peer.to_string()), vec![(peer::AUTH_HEADER, auth)])
            }
            // The peer's certificate must name the host called (the address's host part).
            HostCredentials::Tls { creds, .. } => {
                let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
                let creds = self.tls_now().unwrap_or_else(|| creds.clone());
                let creds = creds.expect_peer(host).map_err(|e| (None, format!("{TLS_FAILED} {peer}: {e}")))?;
                (Endpoint::Tls { addr: peer.to_string(), config: creds.client(), name: creds.server_name() }, vec![])
            }
        };
        let (status, out) =
            client::request(&ep, method, path, body, &headers, within).await.map_err(|e| (None, e.to_string()))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&out).map_err(|e| (Some(status), format!("bad answer: {e}")));
        }
        let why = serde_json::from_slice::<ErrorBody>(&out)
            .map(|e| format!("{} ({})", e.error.message, e.error.code))
            .unwrap_or_else(|_| format!("HTTP {status}"));
        Err((Some(status), why))
    }

    // ---- incoming (destination side) ----

    async fn admit(self: &Arc<Self>, req: IncomingRequest) -> ApiResult<IncomingAccepted> {
        if !valid_name(&req.vm) {
            return Err(ApiError::bad(format!("bad VM name {:?}", req.vm)));
        }
        check_memory(req.guest, req.memory_bytes)?;
        if lock(&self.vms).contains_key(&req.vm) {
            return Err(ApiError::conflict(format!("a VM named {:?} is already on host {}", req.vm, self.cfg.name)));
        }
        let encryption = match req.kind {
            MoveKind::Live => Some(self.incoming_protection(&req)?),
            MoveKind::Quick => None,
        };
        // A live arrival goes into the standby VMM's reserve when it holds the VM (that memory
        // is already taken from the host: no further check).
        let standby = match req.kind {
            MoveKind::Live => self.take_standby(req.memory_bytes).await,
            MoveKind::Quick => None,
        };
        let keep_standby = |s: Option<PathBuf>| {
            if let Some(s) = s {
                lock(&self.standby).get_or_insert(s);
            }
        };
        if let Some(give) = self.memory_can_give(standby.is_none()) {
            if give < req.memory_bytes {
                keep_standby(standby);
                return Err(ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "no_memory",
                    format!(
                        "host {} can give {} MiB; the VM needs {} MiB",
                        self.cfg.name,
                        give >> 20,
                        req.memory_bytes >> 20
                    ),
                ));
            }
        }
        let quick = match req.kind {
            MoveKind::Live => None,
            MoveKind::Quick => Some(self.quick_admissible(&req)?),
        };
        let disk_room = match self.disk_room(&req, true) {
            Ok(r) => r,
            Err(e) => {
                keep_standby(standby);
                return Err(e);
            }
        };
        let slot = match self.limit.try_admit() {
            Ok(s) => s,
            Err(why) => {
                keep_standby(standby);
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", why));
            }
        };
        let row = VmRow {
            name: req.vm.clone(),
            guest: req.guest,
            memory_bytes: req.memory_bytes,
            epoch: req.epoch + 1,
            pid: 0,
            socket: self.vm_socket(&req.vm).display().to_string(),
            owned: false,
            arrived_with: Some(req.id.clone()),
        };
        // Reserve the name before the process starts.
        lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(req.id.clone()) });
        let receive_disks = disk_room.as_ref().map(|r| vmmctl::ReceiveDisks {
            dir: r.dir.clone(),
            names: req.disks.iter().map(|d| d.name.clone()).collect(),
        });
        if let Some(r) = &receive_disks {
            if let Err(e) = std::fs::create_dir_all(&r.dir) {
                lock(&self.vms).remove(&row.name);
                keep_standby(standby);
                return Err(ApiError::internal(format!("creating {}: {e}", r.dir.display())));
            }
        }
        let mode = encryption.unwrap_or_default();
        let trusted: Vec<String> = match &quick {
            None => self.trusted_for(mode).into_iter().flat_map(|s| ["--trusted-network".to_string(), s]).collect(),
            Some(_) => Vec::new(),
        };
        let mut extra = match &quick {
            // Multichannel: channels arrive on every NIC, so listen on all of them.
            None if req.multichannel => {
                let any: std::net::IpAddr = if self.cfg.listen.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                vec!["--receive-on".to_string(), any.to_string(), "--encryption".into(), mode.to_string()]
            }
            None => vec![
                "--receive-on".to_string(),
                self.cfg.listen.ip().to_string(),
                "--encryption".into(),
                mode.to_string(),
            ],
            Some(dir) => vec![
                "--quick-dir".to_string(),
                dir.display().to_string(),
                "--quick-host".into(),
                self.cfg.name.clone(),
                "--quick-id".into(),
                req.id.clone(),
            ],
        };
        let assigned = match (&standby, extra.get(1).and_then(|ip| ip.parse().ok())) {
            (Some(sb), Some(ip)) if quick.is_none() => {
                match self.assign_standby(sb, &req, ip, &receive_disks, mode).await {
                    Ok(st) => Some(st),
                    Err(e) => {
                        warn!(error = %e, "the standby VMM refused the VM; receiving into cold memory");
                        None
                    }
                }
            }
            _ => None,
        };
        if standby.is_some() && assigned.is_none() {
            // Gone or refused: a new one replaces it (a used one is replaced once its VM has
            // arrived, so its fill does not compete with the migration).
            self.clone().refill_standby();
        }
        extra.extend(trusted);
        // With certificates the VMM's channels must come from the host admitted here.
        if quick.is_none() && self.tls.is_some() {
            extra.extend(["--expect-peer".to_string(), req.source.clone()]);
        }
        if let Some(r) = &receive_disks {
            extra.extend(["--receive-disk-dir".to_string(), r.dir.display().to_string()]);
            for n in &r.names {
                extra.extend(["--receive-disk".to_string(), n.clone()]);
            }
        }
        let spawned = match assigned {
            Some(st) => Ok(st),
            None => self.spawn_vmm(&req.vm, req.guest, &extra, req.memory_bytes).await,
        };
        let st = match spawned {
            Ok(st) => st,
            Err(e) => {
                lock(&self.vms).remove(&row.name);
                self.remove_arrived_disks(&req.vm);
                return Err(e);
            }
        };
        let mut row = row;
        row.pid = st.pid;
        // One commit: the VM's row and its journal entry land together.
        self.store().atomically(|store| {
            store.put_vm(&row)?;
            store.new_migration_of_kind(
                &req.id,
                &req.vm,
                "incoming",
                &req.source,
                "setup",
                true,
                move_kind_name(req.kind, !req.disks.is_empty()),
            )?;
            if disk_room.is_some() {
                store.set_disk_reserved(&req.id, req.disks.iter().map(|d| d.allocated_bytes).sum())?;
            }
            match encryption {
                Some(m) => store.set_encryption(&req.id, m.as_str()),
                None => Ok(()),
            }
        })?;
        info!(migration = req.id, vm = req.vm, source = req.source, encryption = ?encryption, "incoming migration admitted");
        lock(&self.vms).insert(row.name.clone(), VmEntry { row: row.clone(), busy: Some(req.id.clone()) });
        lock(&self.live).insert(req.id.clone(), Live::default());
        // Channel 0 goes to the address the source reached this agent at.
        let addr = st.listen.map(|a| SocketAddr::new(self.cfg.listen.ip(), a.port()).to_string()).unwrap_or_default();
        let a = self.clone();
        let span = tracing::info_span!("migration", id = %req.id, vm = %req.vm, direction = "incoming");
        let claim = disk_room.and_then(|r| r.claim);
        tokio::spawn(async move { a.watch_incoming(req.id, row, slot, claim).await }.instrument(span));
        Ok(IncomingAccepted {
            migration_addr: addr,
            host: self.cfg.name.clone(),
            encryption: encryption.map(|m| m.to_string()),
        })
    }

    /// The protection this host's migration server accepts for a live arrival: what the
    /// source proposes where this host trusts the network its channels arrive on (the address
    /// the source reached; multichannel: every listed network), else `aead`, or, when the move
    /// itself asked for the mode, a refusal (`untrusted_network`).
    fn incoming_protection(&self, req: &IncomingRequest) -> ApiResult<Encryption> {
        let proposed = parse_asked(req.encryption.as_deref())?.unwrap_or(Encryption::Aead);
        match self.settings().accepts(proposed, self.cfg.listen.ip(), req.multichannel, &self.cfg.name) {
            Ok(()) => Ok(proposed),
            Err(why) if req.encryption_asked => {
                Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "untrusted_network", why))
            }
            Err(why) => {
                info!(migration = req.id, %why, "aead instead of the source's setting");
                Ok(Encryption::Aead)
            }
        }
    }

    /// May this host receive a quick move? `Ok`: the shared directory, which the source's
    /// probe file proves both hosts see.
    fn quick_admissible(&self, req: &IncomingRequest) -> ApiResult<PathBuf> {
        let refuse = |code, why: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, why);
        let Some(dir) = self.cfg.shared_storage.clone() else {
            return Err(refuse(
                "no_shared_storage",
                format!("host {} has no shared_storage in its config: it cannot take quick moves", self.cfg.name),
            ));
        };
        ferry_migrate::quick::check_name(&self.cfg.name)
            .map_err(|e| refuse("bad_name", format!("destination host name: {e}")))?;
        let probe = req.probe.as_deref().unwrap_or("");
        let well_formed = probe.starts_with(".ferry-probe-")
            && probe.len() <= 64
            && probe.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !well_formed {
            return Err(ApiError::bad("a quick move needs the source's probe file name"));
        }
        if !dir.join(probe).is_file() {
            return Err(refuse(
                "not_shared",
                format!(
                    "the source's probe file is not in {} on host {}: the hosts do not share that directory",
                    dir.display(),
                    self.cfg.name
                ),
            ));
        }
        Ok(dir)
    }

    /// Could this host take `req` now? Nothing changes here (a preflight).
    /// Guest memory this host can give one more VM: what the kernel has available (less 256 MiB
    /// for the host; `host`: counted, false when the memory is held already, by the standby VMM)
    /// and what is left of `max_vm_memory_bytes` after the VMs here and arriving. `None`: no
    /// limit known.
    fn memory_can_give(&self, host: bool) -> Option<u64> {
        let kernel = mem_available_bytes().filter(|_| host).map(|a| a.saturating_sub(256 << 20));
        let budget = self.cfg.max_vm_memory_bytes.map(|max| {
            let used: u64 = lock(&self.vms).values().map(|e| e.row.memory_bytes).sum();
            max.saturating_sub(used)
        });
        match (kernel, budget) {
            (Some(k), Some(b)) => Some(k.min(b)),
            (k, b) => k.or(b),
        }
    }

    fn destination_report(&self, req: &IncomingRequest) -> DestinationReport {
        let mut inc = Vec::new();
        let mut add = |code: &str, message: String| inc.push(Incompatibility { code: code.into(), message });
        if !valid_name(&req.vm) {
            add("bad_name", format!("bad VM name {:?}", req.vm));
        }
        if let Err(e) = check_memory(req.guest, req.memory_bytes) {
            add("refused", e.message);
        }
        if lock(&self.vms).contains_key(&req.vm) {
            add("name_taken", format!("a VM named {:?} is already on host {}", req.vm, self.cfg.name));
        }
        let give = self.memory_can_give(true);
        if let Some(give) = give {
            if give < req.memory_bytes {
                add(
                    "no_memory",
                    format!(
                        "host {} can give {} MiB; the VM needs {} MiB",
                        self.cfg.name,
                        give >> 20,
                        req.memory_bytes >> 20
                    ),
                );
            }
        }
        let kvm = ferry_vmm_glue::kvm::kvm_usable();
        if req.guest == GuestKind::Kvm {
            if let Err(why) = &kvm {
                add("no_kvm", format!("KVM is not usable on host {}: {why}", self.cfg.name));
            }
        }
        if req.kind == MoveKind::Quick {
            if let Err(e) = self.quick_admissible(req) {
                add(e.code, e.message);
            }
        }
        let room = self.disk_room(req, false);
        if let Err(e) = &room {
            add(e.code, e.message.clone());
        }
        let room = room.ok().flatten();
        let encryption = match req.kind {
            MoveKind::Quick => None,
            MoveKind::Live => match self.incoming_protection(req) {
                Ok(m) => Some(m.to_string()),
                Err(e) => {
                    add(e.code, e.message);
                    None
                }
            },
        };
        let (limit, active, queued) = self.limit.snapshot();
        DestinationReport {
            encryption,
            name: self.cfg.name.clone(),
            max_live_migrations: limit,
            active_migrations: active,
            queued_migrations: queued,
            memory_available_bytes: give.unwrap_or(0),
            kvm: kvm.is_ok(),
            shared_storage: self.cfg.shared_storage.is_some(),
            disk_dir: (!req.disks.is_empty()).then(|| self.cfg.disk_dir.join(&req.vm).display().to_string()),
            disk_available_bytes: room.as_ref().map_or(0, |r| r.available_bytes),
            disk_needed_bytes: req.disks.iter().map(|d| d.allocated_bytes).sum(),
            incompatibilities: inc,
        }
    }

    /// Shared-nothing: may `req`'s disks arrive here? `Ok(None)`: it brings none. Refused when
    /// a name is bad or taken in the VM's disk directory, or the file system there has less
    /// room than the disks occupy at the source (`no_disk_space`).
    /// Room for the disks of an incoming shared-nothing move in `disk_dir`: the free space
    /// less what the moves admitted before still have to write. With `claim` (admission) the
    /// room is promised to this move at once, under the same lock, so two moves admitted at
    /// the same time cannot both count the same free bytes; the promise lasts until the move
    /// ends (and is journaled, so a restarted agent keeps it for an arrival it adopts).
    fn disk_room(&self, req: &IncomingRequest, claim: bool) -> ApiResult<Option<DiskRoom>> {
        if req.disks.is_empty() {
            return Ok(None);
        }
        let refuse = |code, why: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, why);
        if req.kind != MoveKind::Live {
            return Err(ApiError::bad("only a live move carries disks"));
        }
        if req.disks.len() > MAX_DISKS {
            return Err(ApiError::bad(format!("{} disks: at most {MAX_DISKS}", req.disks.len())));
        }
        let dir = self.cfg.disk_dir.join(&req.vm);
        for (i, d) in req.disks.iter().enumerate() {
            if !valid_name(&d.name) || req.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(ApiError::bad(format!("bad or repeated disk name {:?}", d.name)));
            }
            let p = dir.join(&d.name);
            if std::fs::symlink_metadata(&p).is_ok() {
                return Err(refuse(
                    "disk_exists",
                    format!("{} exists on host {}: a disk never replaces a file", p.display(), self.cfg.name),
                ));
            }
        }
        let need: u64 = req.disks.iter().map(|d| d.allocated_bytes).sum();
        let mut promised = lock(&self.disk_promised);
        let free = free_bytes(&self.cfg.disk_dir)
            .map_err(|e| ApiError::internal(format!("free space of {}: {e}", self.cfg.disk_dir.display())))?;
        let others: Vec<&DiskPromise> = promised.iter().filter(|(id, _)| **id != req.id).map(|(_, p)| p).collect();
        let reserved: u64 = others.iter().map(|p| p.outstanding()).sum();
        let available_bytes = free.saturating_sub(reserved);
        if available_bytes < need {
            let of_others = match others.len() {
                0 => String::new(),
                n => {
                    format!(" ({} KiB of it promised to {n} incoming move(s) still copying)", reserved.min(free) >> 10)
                }
            };
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "no_disk_space",
                format!(
                    "host {} has {} KiB free in {}{of_others}; the VM's disks occupy {} KiB",
                    self.cfg.name,
                    available_bytes >> 10,
                    self.cfg.disk_dir.display(),
                    need >> 10
                ),
            ));
        }
        let claim = claim.then(|| {
            promised.insert(req.id.clone(), DiskPromise { dir: dir.clone(), need });
            DiskClaim { promised: self.disk_promised.clone(), id: req.id.clone() }
        });
        Ok(Some(DiskRoom { dir, available_bytes, claim }))
    }

    /// After an incoming shared-nothing move that did not end with the VM here: remove what
    /// its VMM may have left of the partial copies (a killed VMM leaves them) and the VM's disk
    /// directory if that leaves it empty. Files with a disk's own name are never touched: the
    /// engine names the copies only at commit, and removes them itself if the VM then does not
    /// resume.
    fn remove_arrived_disks(&self, vm: &str) {
        let dir = self.cfg.disk_dir.join(vm);
        let Ok(rd) = std::fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('.') && n.ends_with(".ferry-partial") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Only if empty.
        let _ = std::fs::remove_dir(&dir);
    }

    /// The option, channel count and destination of a move, checked the same way for a move and
    /// for its preflight (a preflight must not call compatible what the move would refuse).
    fn route(
        &self,
        settings: &Settings,
        option: Option<&str>,
        channels: Option<u16>,
        to: &str,
    ) -> ApiResult<(String, u16, SocketAddr)> {
        let option = option
            .unwrap_or(settings.default_transport())
            .parse::<ferry_transport::option::TransportOption>()
            .map_err(|e| ApiError::bad(e.to_string()))?;
        if !option.is_tcp() {
            // The agents listen on TCP only; quic runs in migration-bench and the library.
            return Err(ApiError::bad(format!(
                "option {option} is not served by the agent yet (tcp, zstd, zstd-always)"
            )));
        }
        let channels = channels.unwrap_or(2);
        if !(1..=16).contains(&channels) {
            return Err(ApiError::bad(format!("channels {channels} is not in 1 ..= 16")));
        }
        let to: SocketAddr = to
            .parse()
            .map_err(|_| ApiError::bad(format!("destination {to:?} is not an agent address like 198.18.0.2:7700")))?;
        if to == self.cfg.listen {
            return Err(ApiError::bad("the destination is this host"));
        }
        Ok((option.to_string(), channels, to))
    }

    /// `POST /v1/preflight`: ask the destination and check this host's side; nothing moves.
    async fn preflight(&self, req: PreflightRequest) -> ApiResult<PreflightReport> {
        let e = self.owned(&req.vm)?;
        let settings = self.settings();
        let (option, channels, to) = self.route(&settings, req.option.as_deref(), req.channels, &req.to)?;
        let mut inc = Vec::new();
        let mut add = |code: &str, message: String| inc.push(Incompatibility { code: code.into(), message });
        let network = if settings.any_network() {
            Some("any network (use_any_network)".to_string())
        } else {
            settings.subnets().iter().find(|(s, _)| s.contains(to.ip())).map(|(s, _)| s.to_string())
        };
        if let Err(why) = settings.network_allows(to.ip()) {
            add("no_network", why);
        }
        let asked = parse_asked(req.encryption.as_deref())?;
        let protection = match req.kind {
            MoveKind::Quick if asked.is_some() => {
                add("bad_request", "encryption applies to live moves: a quick move sends no frames".into());
                None
            }
            MoveKind::Quick => None,
            MoveKind::Live => match settings.protection_for(asked, to.ip(), settings.multichannel(), &self.cfg.name) {
                Ok(p) => Some(p),
                Err(why) => {
                    add("untrusted_network", why);
                    None
                }
            },
        };
        if let Some(m) = &e.busy {
            add("moving", format!("VM {:?} is moving now (migration {m})", req.vm));
        }
        let disks = vmmctl::status(Path::new(&e.row.socket)).await.map(|st| st.disks).unwrap_or_default();
        if let Some(why) = disks_stay_behind(&req.vm, disks.len(), req.kind, req.include_storage) {
            add("has_disks", why);
        }
        let carried = match (req.kind, req.include_storage) {
            (MoveKind::Live, true) => incoming_disks(&disks),
            _ => Vec::new(),
        };
        let mut probe = None;
        if req.kind == MoveKind::Quick {
            match &self.cfg.shared_storage {
                None => add(
                    "no_shared_storage",
                    format!("host {} has no shared_storage in its config: it cannot make quick moves", self.cfg.name),
                ),
                Some(dir) => {
                    let name = format!(".ferry-probe-{}", new_id());
                    match std::fs::write(dir.join(&name), self.cfg.name.as_bytes()) {
                        Ok(()) => probe = Some((dir.join(&name), name)),
                        Err(e) => add("no_shared_storage", format!("cannot write to {}: {e}", dir.display())),
                    }
                }
            }
            for (what, n) in [("host name", &self.cfg.name), ("VM name", &req.vm)] {
                if let Err(e) = ferry_migrate::quick::check_name(n) {
                    add("bad_name", format!("{what}: {e}"));
                }
            }
        }
        let ask = IncomingRequest {
            id: format!("preflight-{}", new_id()),
            vm: e.row.name.clone(),
            guest: e.row.guest,
            memory_bytes: e.row.memory_bytes,
            epoch: e.row.epoch,
            source: self.cfg.name.clone(),
            kind: req.kind,
            probe: probe.as_ref().map(|p| p.1.clone()),
            multichannel: settings.multichannel(),
            disks: carried,
            encryption: protection.as_ref().map(|p| p.mode.to_string()),
            encryption_asked: protection.as_ref().is_some_and(|p| p.asked),
        };
        let body = serde_json::to_vec(&ask).map_err(|e| ApiError::internal(e.to_string()))?;
        let answer = self.peer_call("POST", &req.to, "/peer/v1/preflight", Some(body)).await;
        if let Some((path, _)) = &probe {
            let _ = std::fs::remove_file(path);
        }
        let destination = match answer {
            Ok(v) => match serde_json::from_value::<DestinationReport>(v) {
                Ok(d) => Some(d),
                Err(e) => {
                    add("refused", format!("the destination answered badly: {e}"));
                    None
                }
            },
            Err((Some(401), why)) => {
                add("key_mismatch", format!("destination {} refused our signature: {why}", req.to));
                None
            }
            Err((None, why)) if why.starts_with(TLS_FAILED) => {
                add("certificate_refused", why);
                None
            }
            Err((Some(403), why)) if why.ends_with("(certificate_refused)") => {
                add("certificate_refused", format!("destination {} refused this host: {why}", req.to));
                None
            }
            Err((None, why)) => {
                add("unreachable", format!("destination {}: {why}", req.to));
                None
            }
            Err((_, why)) => {
                add("refused", format!("destination {}: {why}", req.to));
                None
            }
        };
        if let Some(d) = &destination {
            inc.extend(d.incompatibilities.iter().cloned());
        }
        // The protection both sides agree on: the destination's answer where it gave one.
        let (encryption, encryption_reason) = match (&protection, destination.as_ref().map(|d| &d.encryption)) {
            (None, _) if req.kind == MoveKind::Quick => (None, "a quick move sends no frames".to_string()),
            (None, _) => (None, "refused: see untrusted_network".to_string()),
            (Some(p), Some(Some(d))) if *d != p.mode.as_str() => (
                Some(d.clone()),
                format!("{d}: the destination does not trust its side for {} (the host's setting)", p.mode),
            ),
            (Some(p), Some(None)) if p.mode != Encryption::Aead => {
                (None, format!("{}: refused by the destination (see its incompatibilities)", p.mode))
            }
            (Some(p), _) => (Some(p.mode.to_string()), p.why.clone()),
        };
        let (limit, active, queued) = self.limit.snapshot();
        let would_queue = active >= limit
            || queued > 0
            || destination
                .as_ref()
                .is_some_and(|d| d.active_migrations >= d.max_live_migrations || d.queued_migrations > 0);
        let credentials = self.credentials_for(&req.to);
        Ok(PreflightReport {
            vm: req.vm,
            to: req.to,
            kind: req.kind,
            include_storage: req.include_storage,
            compatible: inc.is_empty(),
            network,
            option,
            channels,
            encryption,
            encryption_reason,
            credentials,
            would_queue,
            destination,
            incompatibilities: inc,
        })
    }

    /// The source gave up an incoming quick move before the handover.
    fn abort_incoming(&self, id: &str, reason: String) -> ApiResult<()> {
        match lock(&self.live).get_mut(id) {
            Some(l) => {
                l.abort = Some(reason);
                Ok(())
            }
            None => Err(ApiError::not_found(format!("no incoming migration {id:?} in flight"))),
        }
    }

    /// Watch an arrival to its end; `claim` (its disk space) is given back then.
    async fn watch_incoming(self: Arc<Self>, id: String, mut row: VmRow, slot: Slot, claim: Option<DiskClaim>) {
        let socket = PathBuf::from(&row.socket);
        let mut misses = 0;
        let mut seen: Option<VmmStatus> = None;
        let outcome = loop {
            // The VMM answers at its next change (or after the timeout, to look at an abort
            // from the source): the VM is listed here as soon as it runs, with no poll interval.
            match vmmctl::wait_change(&socket, seen.as_ref(), Duration::from_millis(200)).await {
                Ok(st) => {
                    misses = 0;
                    match st.state {
                        VmmState::Receiving => {
                            let abort = lock(&self.live).get(&id).and_then(|l| l.abort.clone());
                            if let Some(why) = abort {
                                break Err(format!("the source gave up before the handover: {why}"));
                            }
                            seen = Some(st);
                        }
                        VmmState::Failed => {
                            break Err(st.error.unwrap_or_else(|| "the incoming migration failed".into()))
                        }
                        _ => break Ok(st),
                    }
                }
                Err(e) => {
                    misses += 1;
                    // About 2 s without an answer.
                    if misses > 100 {
                        break Err(format!("lost the incoming VMM process: {e}"));
                    }
                    seen = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        match outcome {
            Ok(st) => {
                row.owned = true;
                row.pid = st.pid;
                let v = serde_json::json!({"verified": st.received_verified.unwrap_or(false), "guest_check": st.guest_check,
                                           "load_ms": st.quick_load_ms});
                let detail = format!(
                    "verified {}, guest check {}",
                    st.received_verified.unwrap_or(false),
                    st.guest_check.as_deref().unwrap_or("-")
                );
                // The VM is this host's from here: its row and the journal's end in one commit.
                self.journal_with(&id, "completed", Some(&detail), false, |store| {
                    store.put_vm(&row)?;
                    store.set_stats(&id, &v)
                });
                let name = row.name.clone();
                lock(&self.vms).insert(row.name.clone(), VmEntry { row, busy: None });
                // Listed here now: tell the event stream's readers at once.
                let ev = serde_json::json!({"type": "vm", "vm": name, "state": "running", "id": id});
                let _ = self.events.send(ev.to_string());
            }
            Err(why) => {
                let _ = vmmctl::call(&socket, &VmmRequest::Stop).await;
                lock(&self.vms).remove(&row.name);
                let _ = self.store().remove_vm(&row.name);
                self.remove_arrived_disks(&row.name);
                self.journal(&id, "failed", Some(&why), false);
            }
        }
        lock(&self.live).remove(&id);
        drop(claim);
        drop(slot);
        self.refill_standby();
    }

    // ---- VMs ----

    async fn create_vm(self: &Arc<Self>, req: CreateVm) -> ApiResult<VmInfo> {
        if !valid_name(&req.name) {
            return Err(ApiError::bad(format!(
                "bad VM name {:?}: 1 ..= 64 letters, digits, '-', '_', '.', not starting with '.'",
                req.name
            )));
        }
        check_memory(req.guest, req.memory_bytes)?;
        if req.guest == GuestKind::Kvm {
            ferry_vmm_glue::kvm::kvm_usable().map_err(|why| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_kvm", format!("KVM is not usable here: {why}"))
            })?;
        }
        let ws = req.working_set_bytes.unwrap_or((req.memory_bytes / 4).min(64 << 20));
        if !ws.is_multiple_of(4096) || ws > req.memory_bytes / 2 {
            return Err(ApiError::bad("working_set_bytes must be a multiple of 4 KiB and at most half the memory"));
        }
        let rate = req.dirty_rate_bytes_per_s.unwrap_or(16 << 20);
        check_disks(&req.disks)?;
        let disk_ws = req.disk_working_set_bytes.unwrap_or(1 << 20);
        let disk_rate = req.disk_write_rate_bytes_per_s.unwrap_or(1 << 20);
        let row = VmRow {
            name: req.name.clone(),
            guest: req.guest,
            memory_bytes: req.memory_bytes,
            epoch: 1,
            pid: 0,
            socket: self.vm_socket(&req.name).display().to_string(),
            owned: true,
            arrived_with: None,
        };
        {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&req.name) {
                return Err(ApiError::conflict(format!("a VM named {:?} already exists on this host", req.name)));
            }
            vms.insert(req.name.clone(), VmEntry { row: row.clone(), busy: Some("creating".into()) });
        }
        let mut extra = vec![
            "--working-set-bytes".to_string(),
            ws.to_string(),
            "--dirty-rate-bytes-per-s".into(),
            rate.to_string(),
        ];
        let images = match self.create_images(&req.name, &req.disks) {
            Ok(p) => p,
            Err(e) => {
                lock(&self.vms).remove(&req.name);
                return Err(e);
            }
        };
        if !images.is_empty() {
            for p in &images {
                extra.push("--disk".into());
                extra.push(p.display().to_string());
            }
            extra.extend([
                "--disk-working-set-bytes".into(),
                disk_ws.to_string(),
                "--disk-write-rate-bytes-per-s".into(),
                disk_rate.to_string(),
            ]);
        }
        let st = match self.spawn_vmm(&req.name, req.guest, &extra, req.memory_bytes).await {
            Ok(st) => st,
            Err(e) => {
                lock(&self.vms).remove(&req.name);
                for p in &images {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let mut row = row;
        row.pid = st.pid;
        self.store().put_vm(&row)?;
        let e = VmEntry { row, busy: None };
        lock(&self.vms).insert(req.name.clone(), e.clone());
        info!(vm = req.name, pid = st.pid, guest = req.guest.name(), "VM created");
        Ok(self.vm_info(&e).await)
    }

    /// Create the VM's disk images (sparse, empty) in its storage directory
    /// (`state_dir/disks/NAME/DISK.img`); none is replaced.
    fn create_images(&self, vm: &str, disks: &[DiskRequest]) -> ApiResult<Vec<PathBuf>> {
        if disks.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.cfg.disk_dir.join(vm);
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
        let mut made = Vec::new();
        for d in disks {
            let path = dir.join(format!("{}.img", d.name));
            if let Err(e) = ferry_disk::image::create_sparse(&path, d.size_bytes) {
                for p in &made {
                    let _ = std::fs::remove_file(p);
                }
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ApiError::conflict(format!("disk image {} exists already", path.display()))
                } else {
                    ApiError::internal(format!("creating {}: {e}", path.display()))
                });
            }
            made.push(path);
        }
        Ok(made)
    }

    async fn vm_op(&self, name: &str, op: VmmRequest) -> ApiResult<VmInfo> {
        let e = self.owned(name)?;
        if let Some(m) = &e.busy {
            return Err(ApiError::conflict(format!("VM {name:?} is moving (migration {m})")));
        }
        vmmctl::call(Path::new(&e.row.socket), &op).await.map_err(|err| match err {
            vmmctl::VmmCtlError::Refused(why) => ApiError::conflict(why),
            other => ApiError::internal(other.to_string()),
        })?;
        Ok(self.vm_info(&e).await)
    }

    async fn delete_vm(&self, name: &str) -> ApiResult<()> {
        let e = self.owned(name)?;
        if let Some(m) = &e.busy {
            return Err(ApiError::conflict(format!("VM {name:?} is moving (migration {m}): cancel it first")));
        }
        match vmmctl::call(Path::new(&e.row.socket), &VmmRequest::Stop).await {
            Ok(_) | Err(vmmctl::VmmCtlError::Unreachable { .. }) => {}
            Err(err) => return Err(ApiError::conflict(err.to_string())),
        }
        lock(&self.vms).remove(name);
        self.store().remove_vm(name)?;
        info!(vm = name, "VM deleted");
        Ok(())
    }
}

/// Most disks per VM.
const MAX_DISKS: usize = 16;

/// Where the disks of an incoming shared-nothing move go, and the room there.
struct DiskRoom {
    dir: PathBuf,
    available_bytes: u64,
    /// At admission: the space promised to the move.
    claim: Option<DiskClaim>,
}

/// Bytes an unprivileged writer may still write to the file system of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let v = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(v.blocks_available().saturating_mul(v.fragment_size()))
}

/// The disks of a VMM's VM as an incoming request names them.
fn incoming_disks(disks: &[vmmctl::DiskStatus]) -> Vec<IncomingDisk> {
    disks
        .iter()
        .map(|d| IncomingDisk { name: d.name.clone(), size_bytes: d.size_bytes, allocated_bytes: d.allocated_bytes })
        .collect()
}

/// Why a move of a VM with `disks` disks would leave them behind (`None`: it would not).
fn disks_stay_behind(vm: &str, disks: usize, kind: MoveKind, include_storage: bool) -> Option<String> {
    match (disks, kind, include_storage) {
        (0, _, _) | (_, MoveKind::Live, true) => None,
        (n, MoveKind::Live, false) => Some(format!(
            "VM {vm:?} has {n} disks, which a live move leaves behind: move it with --include-storage \
             (include_storage) to carry them (shared-nothing)"
        )),
        (n, MoveKind::Quick, _) => Some(format!(
            "VM {vm:?} has {n} disks, which a quick move does not carry (its disks are not on the shared \
             storage): move it live with --include-storage"
        )),
    }
}

/// The journal's kind of a move.
fn move_kind_name(kind: MoveKind, with_disks: bool) -> &'static str {
    match (kind, with_disks) {
        (MoveKind::Live, true) => "shared-nothing",
        (k, _) => k.name(),
    }
}

/// A mode given in a request (`None`: not given).
fn parse_asked(v: Option<&str>) -> ApiResult<Option<Encryption>> {
    v.map(|v| parse_encryption("encryption", v)).transpose().map_err(|e| ApiError::bad(e.to_string()))
}

fn check_disks(disks: &[DiskRequest]) -> ApiResult<()> {
    if disks.len() > MAX_DISKS {
        return Err(ApiError::bad(format!("{} disks: at most {MAX_DISKS}", disks.len())));
    }
    for (i, d) in disks.iter().enumerate() {
        if !valid_name(&d.name) {
            return Err(ApiError::bad(format!(
                "bad disk name {:?}: 1 ..= 64 letters, digits, '-', '_', '.', not starting with '.'",
                d.name
            )));
        }
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(ApiError::bad(format!("two disks named {:?}", d.name)));
        }
        if !(64 << 10..=16 << 40).contains(&d.size_bytes) {
            return Err(ApiError::bad(format!("disk {}: {} bytes, not in 64 KiB ..= 16 TiB", d.name, d.size_bytes)));
        }
    }
    Ok(())
}

fn check_memory(guest: GuestKind, bytes: u64) -> ApiResult<()> {
    let max = match guest {
        GuestKind::Kvm => ferry_vmm_glue::kvm::GuestConfig::MAX_MEM,
        GuestKind::Synthetic => 64 << 30,
    };
    if bytes < (2 << 20) || bytes > max || !bytes.is_multiple_of(4096) {
        return Err(ApiError::bad(format!(
            "memory {bytes} bytes: a {} guest takes a multiple of 4 KiB in 2 MiB ..= {} MiB",
            guest.name(),
            max >> 20
        )));
    }
    Ok(())
}

fn mem_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---- HTTP handlers ----

type Ag = State<Arc<Agent>>;

async fn h_host(State(a): Ag) -> Json<HostInfo> {
    Json(a.host_info_now().await)
}

async fn h_host_patch(State(a): Ag, body: Bytes) -> ApiResult<Json<HostInfo>> {
    let p: HostPatch = parse_json(&body)?;
    if p == HostPatch::default() {
        return Err(ApiError::bad(
            "nothing to change: give max_live_migrations, performance_option, use_any_network or encryption",
        ));
    }
    let encryption = parse_asked(p.encryption.as_deref())?;
    a.change_settings(|s| {
        if let Some(n) = p.max_live_migrations {
            s.max_live_migrations = n;
        }
        if let Some(o) = p.performance_option {
            s.performance_option = o;
        }
        if let Some(u) = p.use_any_network {
            s.use_any_network = Some(u);
        }
        if let Some(m) = encryption {
            s.encryption = m;
        }
        Ok(())
    })?;
    Ok(Json(a.host_info_now().await))
}

fn networks_of(s: &Settings) -> Vec<Network> {
    let mut v = s.networks.clone();
    v.sort_by_key(|n| n.priority);
    v
}

async fn h_networks(State(a): Ag) -> Json<Vec<Network>> {
    Json(networks_of(&a.settings()))
}

async fn h_network_add(State(a): Ag, body: Bytes) -> ApiResult<(StatusCode, Json<Vec<Network>>)> {
    let n: Network = parse_json(&body)?;
    let subnet = Subnet::parse(&n.subnet).map_err(|why| ApiError::bad(format!("subnet: {why}")))?;
    let s = a.change_settings(|s| {
        if s.networks.iter().any(|m| Subnet::parse(&m.subnet).ok() == Some(subnet)) {
            return Err(ApiError::conflict(format!("network {subnet} is listed already")));
        }
        s.networks.push(Network { subnet: subnet.to_string(), priority: n.priority, trusted: n.trusted });
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(networks_of(&s))))
}

async fn h_network_remove(State(a): Ag, body: Bytes) -> ApiResult<Json<Vec<Network>>> {
    let n: NetworkRemove = parse_json(&body)?;
    let subnet = Subnet::parse(&n.subnet).map_err(|why| ApiError::bad(format!("subnet: {why}")))?;
    let s = a.change_settings(|s| {
        let before = s.networks.len();
        s.networks.retain(|m| Subnet::parse(&m.subnet).ok() != Some(subnet));
        if s.networks.len() == before {
            return Err(ApiError::not_found(format!("network {subnet} is not listed")));
        }
        match (s.networks.is_empty(), s.use_any_network) {
            (true, Some(false)) => {
                return Err(ApiError::conflict(format!(
                    "{subnet} is the last migration network and use_any_network is false: no move could leave; \
                     add another network first, or set use_any_network true"
                )))
            }
            // Never widen silently: with no network left, the default would allow any.
            (true, None) => {
                return Err(ApiError::conflict(format!(
                    "{subnet} is the last migration network: without it any network would carry migrations; \
                     set use_any_network (true or false) first"
                )))
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(Json(networks_of(&s)))
}

async fn h_vms(State(a): Ag) -> Json<Vec<VmInfo>> {
    let entries: Vec<VmEntry> = lock(&a.vms).values().filter(|e| e.row.owned).cloned().collect();
    let mut out = Vec::new();
    for e in &entries {
        out.push(a.vm_info(e).await);
    }
    out.sort_by(|x, y| x.name.cmp(&y.name));
    Json(out)
}

async fn h_vm_create(State(a): Ag, body: Bytes) -> ApiResult<(StatusCode, Json<VmInfo>)> {
    let req: CreateVm = parse_json(&body)?;
    Ok((StatusCode::CREATED, Json(a.create_vm(req).await?)))
}

async fn h_vm(State(a): Ag, UrlPath(name): UrlPath<String>) -> ApiResult<Json<VmInfo>> {
    let e = a.owned(&name)?;
    Ok(Json(a.vm_info(&e).await))
}

async fn h_vm_pause(State(a): Ag, UrlPath(name): UrlPath<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.vm_op(&name, VmmRequest::Pause).await?))
}

async fn h_vm_resume(State(a): Ag, UrlPath(name): UrlPath<String>) -> ApiResult<Json<VmInfo>> {
    Ok(Json(a.vm_op(&name, VmmRequest::Resume).await?))
}

async fn h_vm_delete(State(a): Ag, UrlPath(name): UrlPath<String>) -> ApiResult<StatusCode> {
    a.delete_vm(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn h_move(State(a): Ag, body: Bytes) -> ApiResult<(StatusCode, Json<MoveAccepted>)> {
    let req: MoveRequest = parse_json(&body)?;
    Ok((StatusCode::ACCEPTED, Json(a.start_move(req).await?)))
}

async fn h_vm_move_storage(
    State(a): Ag,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<MoveAccepted>)> {
    let req: MoveStorageRequest = parse_json(&body)?;
    Ok((StatusCode::ACCEPTED, Json(a.start_storage_move(&name, req).await?)))
}

async fn h_migrations(State(a): Ag) -> ApiResult<Json<Vec<MigrationInfo>>> {
    let ids: Vec<String> = a.store().migrations(1000)?.into_iter().map(|m| m.id).collect();
    let mut out = Vec::new();
    for id in ids {
        out.push(a.migration_info(&id)?);
    }
    Ok(Json(out))
}

async fn h_migration(State(a): Ag, UrlPath(id): UrlPath<String>) -> ApiResult<Json<MigrationInfo>> {
    Ok(Json(a.migration_info(&id)?))
}

async fn h_cancel(State(a): Ag, UrlPath(id): UrlPath<String>) -> ApiResult<Json<MigrationInfo>> {
    Ok(Json(a.cancel(&id).await?))
}

async fn h_events(
    State(a): Ag,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let rx = a.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(text) => {
                    // The event's name is its `type` (its keys are not in a fixed order).
                    let kind = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["type"].as_str().map(String::from))
                        .unwrap_or_else(|| "state".into());
                    return Some((Ok(Event::default().event(kind).data(text)), rx));
                }
                // A slow reader misses some events; it keeps the stream.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn h_metrics(State(a): Ag) -> ApiResult<Response> {
    let (limit, active, queued) = a.limit.snapshot();
    let (storage_limit, storage_active, storage_queued) = a.storage_limit.snapshot();
    let now = crate::metrics::Now {
        active,
        queued,
        limit,
        vms: lock(&a.vms).values().filter(|e| e.row.owned).count(),
        storage_active,
        storage_queued,
        storage_limit,
    };
    let journal = a.store().migrations(100_000)?;
    let text = crate::metrics::render(&now, &journal);
    Ok(([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response())
}

async fn h_fallback(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such resource: {}", uri.path()))
}

/// Check a peer request: with the key its signature; with host certificates that the
/// caller's certificate is accepted by the host's credentials as they are now (CA, validity,
/// revocation: checked in the TLS handshake and again here, since a kept-open connection can
/// outlive a revocation) and names `from`, the host the request claims to come from (the source
/// of the move it is about). `from` is `None` only where the request names no host (then any
/// host of the CA may ask).
fn check_peer(
    a: &Agent,
    caller: &peer::Caller,
    from: Option<&str>,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
) -> ApiResult<()> {
    let key = match &a.cfg.credentials {
        HostCredentials::Key { key, .. } => key,
        HostCredentials::Tls { .. } => {
            let Some(cert) = caller.certificate() else {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "certificate_refused",
                    "the caller presented no certificate",
                ));
            };
            // The handshake checked the certificate when the connection opened; a connection
            // kept open may outlive that (a revocation list or CA renewed since). Checked again
            // against the credentials as they are on disk now, per request.
            if let Some(creds) = a.tls_now() {
                creds.verify_client(&caller.chain).map_err(|why| {
                    let why = format!("the caller's certificate is not accepted now: {why}");
                    warn!(peer = %caller.addr, "refused a peer request: {why}");
                    ApiError::new(StatusCode::FORBIDDEN, "certificate_refused", why)
                })?;
            }
            let Some(from) = from else { return Ok(()) };
            return ferry_transport::tls::certificate_names(cert, from).map_err(|why| {
                let why = format!(
                    "the caller's certificate does not name host {from:?}, the host the request comes from: {why}"
                );
                warn!(peer = %caller.addr, "refused a peer request: {why}");
                ApiError::new(StatusCode::FORBIDDEN, "certificate_refused", why)
            });
        }
    };
    let h = headers.get(peer::AUTH_HEADER).and_then(|v| v.to_str().ok());
    peer::verify(key.bytes(), h, now_ms(), method.as_str(), uri.path(), body).map_err(|why| {
        warn!("refused a peer request: {why}");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
    })
}

/// The host a migration recorded here is with (an incoming one's source), as a name a
/// certificate holds (an address without its port).
fn migration_peer(a: &Agent, id: &str) -> Option<String> {
    let m = a.store().migration(id).ok().flatten()?;
    let p = m.peer;
    Some(match p.parse::<SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => p,
    })
}

async fn h_peer_incoming(
    State(a): Ag,
    ConnectInfo(caller): ConnectInfo<peer::Caller>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> ApiResult<Json<IncomingAccepted>> {
    check_peer(&a, &caller, None, &headers, &method, &uri, &body)?;
    let req: IncomingRequest = parse_json(&body)?;
    check_peer(&a, &caller, Some(&req.source), &headers, &method, &uri, &body)?;
    Ok(Json(a.admit(req).await?))
}

async fn h_peer_abort(
    State(a): Ag,
    ConnectInfo(caller): ConnectInfo<peer::Caller>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    check_peer(&a, &caller, migration_peer(&a, &id).as_deref(), &headers, &method, &uri, &body)?;
    let req: IncomingAbort = parse_json(&body)?;
    a.abort_incoming(&id, req.reason)?;
    Ok(Json(serde_json::json!({})))
}

async fn h_peer_migration(
    State(a): Ag,
    ConnectInfo(caller): ConnectInfo<peer::Caller>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<MigrationInfo>> {
    check_peer(&a, &caller, migration_peer(&a, &id).as_deref(), &headers, &method, &uri, b"")?;
    Ok(Json(a.migration_info(&id)?))
}

async fn h_preflight(State(a): Ag, body: Bytes) -> ApiResult<Json<PreflightReport>> {
    let req: PreflightRequest = parse_json(&body)?;
    Ok(Json(a.preflight(req).await?))
}

async fn h_peer_preflight(
    State(a): Ag,
    ConnectInfo(caller): ConnectInfo<peer::Caller>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> ApiResult<Json<DestinationReport>> {
    check_peer(&a, &caller, None, &headers, &method, &uri, &body)?;
    let req: IncomingRequest = parse_json(&body)?;
    check_peer(&a, &caller, Some(&req.source), &headers, &method, &uri, &body)?;
    Ok(Json(a.destination_report(&req)))
}

async fn h_peer_vm(
    State(a): Ag,
    ConnectInfo(caller): ConnectInfo<peer::Caller>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<PeerVm>> {
    check_peer(&a, &caller, None, &headers, &method, &uri, b"")?;
    let e =
        lock(&a.vms).get(&name).cloned().ok_or_else(|| ApiError::not_found(format!("no VM named {name:?} here")))?;
    // With certificates a VM is shown to the host it arrived from only.
    if a.tls.is_some() {
        let Some(from) = e.row.arrived_with.as_deref().and_then(|id| migration_peer(&a, id)) else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "certificate_refused",
                format!("VM {name:?} did not arrive here: it is shown to the host it arrived from only"),
            ));
        };
        check_peer(&a, &caller, Some(&from), &headers, &method, &uri, b"")?;
    }
    let stats = e.row.arrived_with.as_ref().and_then(|id| a.store().migration(id).ok().flatten()).and_then(|m| m.stats);
    let verified = stats.as_ref().and_then(|s| s.get("verified")).and_then(|v| v.as_bool());
    let load_ms = stats.as_ref().and_then(|s| s.get("load_ms")).and_then(|v| v.as_f64());
    Ok(Json(PeerVm { owned: e.row.owned, epoch: e.row.epoch, arrived_with: e.row.arrived_with, verified, load_ms }))
}

/// The local API.
pub fn local_router(a: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/host", get(h_host).patch(h_host_patch))
        .route("/v1/host/networks", get(h_networks).post(h_network_add).delete(h_network_remove))
        .route("/v1/vms", get(h_vms).post(h_vm_create))
        .route("/v1/vms/{name}", get(h_vm).delete(h_vm_delete))
        .route("/v1/vms/{name}/pause", post(h_vm_pause))
        .route("/v1/vms/{name}/resume", post(h_vm_resume))
        .route("/v1/vms/{name}/move-storage", post(h_vm_move_storage))
        .route("/v1/moves", post(h_move))
        .route("/v1/preflight", post(h_preflight))
        .route("/v1/migrations", get(h_migrations))
        .route("/v1/migrations/{id}", get(h_migration))
        .route("/v1/migrations/{id}/cancel", post(h_cancel))
        .route("/v1/events", get(h_events))
        .route("/metrics", get(h_metrics))
        .fallback(h_fallback)
        .with_state(a)
}

/// The peer API.
pub fn peer_router(a: Arc<Agent>) -> Router {
    Router::new()
        .route("/peer/v1/incoming", post(h_peer_incoming))
        .route("/peer/v1/incoming/{id}/abort", post(h_peer_abort))
        .route("/peer/v1/migrations/{id}", get(h_peer_migration))
        .route("/peer/v1/preflight", post(h_peer_preflight))
        .route("/peer/v1/vms/{name}", get(h_peer_vm))
        .route("/metrics", get(h_metrics))
        .fallback(h_fallback)
        .with_state(a)
}

/// Bind both APIs and serve until a signal. VMs keep running when the agent stops.
pub async fn serve(a: Arc<Agent>) -> Result<(), StartError> {
    let cfg = &a.cfg;
    let setup = |what: String, e: &dyn std::fmt::Display| StartError::Setup(format!("{what}: {e}"));
    if let Some(dir) = cfg.api_socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| setup(format!("creating {}", dir.display()), &e))?;
    }
    if std::os::unix::net::UnixStream::connect(&cfg.api_socket).is_ok() {
        return Err(StartError::Setup(format!("another agent serves {} already", cfg.api_socket.display())));
    }
    let _ = std::fs::remove_file(&cfg.api_socket);
    let uds = tokio::net::UnixListener::bind(&cfg.api_socket)
        .map_err(|e| setup(format!("api_socket {}", cfg.api_socket.display()), &e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg.api_socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| setup("restricting api_socket".into(), &e))?;
    let tcp =
        tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| setup(format!("listen {}", cfg.listen), &e))?;
    info!(
        name = cfg.name,
        listen = %cfg.listen,
        api = %cfg.api_socket.display(),
        credentials = %cfg.credentials.describe(),
        "ferryd ready"
    );
    let local = axum::serve(uds, local_router(a.clone())).with_graceful_shutdown(shutdown());
    let peer = async {
        match &cfg.credentials {
            HostCredentials::Key { .. } => {
                let app = peer_router(a.clone()).into_make_service_with_connect_info::<peer::Caller>();
                axum::serve(tcp, app).with_graceful_shutdown(shutdown()).await
            }
            HostCredentials::Tls { creds, .. } => {
                let fallback = creds.clone();
                let agent = a.clone();
                // Each connection is served with the certificates as they are on disk then.
                let config = move || agent.tls_now().unwrap_or_else(|| fallback.clone()).server();
                let app = peer_router(a.clone()).into_make_service_with_connect_info::<peer::Caller>();
                axum::serve(peer::TlsListener::new(tcp, std::sync::Arc::new(config)), app)
                    .with_graceful_shutdown(shutdown())
                    .await
            }
        }
    };
    let r = tokio::try_join!(async { local.await }, peer);
    let _ = std::fs::remove_file(&cfg.api_socket);
    r.map(|_| ()).map_err(|e| setup("serving".into(), &e))
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("stopping; the VMs keep running and the next agent adopts them");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, size_bytes: u64) -> DiskRequest {
        DiskRequest { name: name.into(), size_bytes }
    }

    /// Every bad disk request of `POST /v1/vms` is refused as a bad request naming what is wrong;
    /// the edges of the size range and an odd size are taken.
    #[test]
    fn bad_disk_requests_are_refused_with_the_reason() {
        let refused = |disks: &[DiskRequest], want: &str| {
            let e = check_disks(disks).expect_err(want);
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "bad_request"));
            assert!(e.message.contains(want), "{:?} does not say {want:?}", e.message);
        };
        let many: Vec<DiskRequest> = (0..=MAX_DISKS).map(|i| disk(&format!("d{i}"), 1 << 20)).collect();
        refused(&many, &format!("at most {MAX_DISKS}"));
        refused(&[disk("", 1 << 20)], "bad disk name");
        refused(&[disk(".hidden", 1 << 20)], "bad disk name");
        refused(&[disk("a/b", 1 << 20)], "bad disk name");
        refused(&[disk("root", 1 << 20), disk("root", 2 << 20)], "two disks named");
        refused(&[disk("small", (64 << 10) - 1)], "not in 64 KiB ..= 16 TiB");
        refused(&[disk("huge", (16 << 40) + 1)], "not in 64 KiB ..= 16 TiB");
        check_disks(&[disk("min", 64 << 10), disk("max", 16 << 40), disk("odd", (8 << 20) + 3333)]).unwrap();
        check_disks(&many[..MAX_DISKS]).unwrap();
    }
}
