//! The VMM process (`ferry-vmm`): one VM per process, as QEMU runs under libvirt.
//!
//! It runs the guest (the synthetic guest or the KVM VMM of `ferry-vmm-glue`), serves the
//! agent's requests ([`crate::vmmctl`]) on a unix socket, and runs the migration engine where
//! the memory is: an outgoing move calls `ferry_migrate::source::migrate` on a thread of this
//! process (with `smb`, over a `ferry_multichannel` session: channels on every paired NIC);
//! an incoming VMM starts with no VM and a `MigrationServer` for exactly one session,
//! and runs the VM once the engine committed. A quick move saves the VM to the shared
//! directory (`ferry_migrate::quick`) with the digest of its paused memory beside it; an incoming
//! quick VMM waits for the ownership record to name its host, loads the image, and runs the VM
//! if the digests match. A storage move (`ferry_disk::move_storage`) copies the VM's disks to
//! another directory on a thread of this process while the guest runs, and switches the VM to
//! the copies in a pause of milliseconds. It starts its own process group (`setpgid`), so it
//! outlives the agent that spawned it.
//!
//! A standby VMM (`--standby --reserve-bytes N`, kept by an agent with `memory_reserve_bytes`)
//! starts with no VM: it faults in N bytes of guest memory (a `ferry_memory::reserve`) and waits
//! until the agent assigns it an incoming live migration; the received guest's memory is then
//! carved from that reserve, so the receive path takes no page faults. On this kind of machine
//! first-touch faults of fresh memory cost 0.5-3.5 s per GiB and dominate a cold receive.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_memory::digest::PageTable;
use ferry_memory::reserve::MemoryReserve;
use ferry_memory::scan::{scan_slice, zero_page_hash};
use ferry_memory::MemoryMap;
use ferry_migrate::quick::{quick_load_into, quick_save_cancellable, QuickError, SharedDir, VmRunState};
use ferry_migrate::server::{connect_simple, MigrationServer};
use ferry_migrate::source::{migrate, CancelToken, ConvergeConfig, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::{SourceVm, TargetVm};
use ferry_migrate::MigrateError;
use ferry_transport::handshake::{Caps, ServerConfig};
use ferry_transport::option::{TransportOption, UnknownOption};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::PAGE_SIZE;
use ferry_transport::Credentials;
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticConfig, SyntheticFactory, SyntheticTarget, SyntheticVm};

use crate::api::GuestKind;
use crate::vmmctl::{
    AssignOrder, DiskStatus, MigrateOrder, MigrationReport, QuickOrder, ReceiveDisks, StorageOrder, VmmRequest,
    VmmResponse, VmmState, VmmStatus,
};
use ferry_disk::Disk;
use ferry_vmm_glue::guestdisk::DiskSpec;
use ferry_vmm_glue::kvm::block::{check_guest_disk, SECTOR_BYTES};

/// zstd level of the compressing options (the bench's default).
const ZSTD_LEVEL: i32 = 1;

/// What the VMM process is started with.
#[derive(Debug, Clone)]
pub struct VmmArgs {
    /// Control socket path.
    pub socket: PathBuf,
    /// VM name.
    pub name: String,
    /// Guest kind.
    pub guest: GuestKind,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Working set the guest rewrites.
    pub working_set_bytes: u64,
    /// Synthetic guest: how fast it rewrites it (0: as fast as it can).
    pub dirty_rate_bytes_per_s: u64,
    /// The migration credentials (channels are authenticated with them): the key or the host
    /// certificates.
    pub creds: Credentials,
    /// Incoming: listen for the migration on this IP (a free port).
    pub receive_on: Option<IpAddr>,
    /// Incoming: the only frame protection the migration server accepts (a source asking
    /// another is refused in the handshake, which names both).
    pub encryption: ferry_transport::Encryption,
    /// Incoming by quick migration: load the VM from the shared directory once its record
    /// names this host.
    pub quick_load: Option<QuickLoad>,
    /// The VM's disks (image files that exist).
    pub disks: Vec<PathBuf>,
    /// Bytes at the start of each disk the guest rewrites (0: none).
    pub disk_working_set_bytes: u64,
    /// Synthetic guest: disk bytes written per second (0: flat out).
    pub disk_write_rate_bytes_per_s: u64,
    /// A standby VMM with a reserve of this many bytes: no VM until the agent assigns one
    /// ([`VmmRequest::Assign`]); the fields above describing the VM are unused until then.
    pub standby_reserve_bytes: Option<u64>,
    /// Incoming shared-nothing move: where its disks arrive (`None`: a source bringing disks
    /// is refused).
    pub receive_disks: Option<ReceiveDisks>,
    /// Incoming with frames not encrypted (`integrity`, `off`): the networks this host trusts.
    /// Every channel must come from an address on one of them and arrive at one, else it is
    /// refused in its handshake (the source is told why: a multichannel source drops that
    /// path and moves on the others, a refused channel 0 fails the move before anything was
    /// sent). Empty: no check (`aead`).
    pub trusted_networks: Vec<crate::config::Subnet>,
    /// Incoming with host certificates: the name the source's certificate must carry on every
    /// channel (its host name; `None`: any host of the CA).
    pub expect_peer: Option<String>,
}

/// Sectors per request of the KVM guest program's disk writes (4 KiB).
const KVM_DISK_REQUEST_SECTORS: u32 = 8;

/// An incoming quick migration: where the image comes from.
#[derive(Debug, Clone)]
pub struct QuickLoad {
    /// The shared directory.
    pub dir: PathBuf,
    /// This host's name in the ownership record.
    pub host: String,
    /// The migration id (names the source's digest file).
    pub id: String,
}

/// Errors of the VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The guest could not be built or started.
    #[error("guest: {0}")]
    Guest(String),
    /// The control socket or migration listener could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// The VM of this process.
enum Guest {
    Synthetic(SyntheticVm),
    Kvm(Box<KvmVm>),
}

/// What a storage move pauses and resumes.
struct GuestQuiesce<'a>(&'a mut Guest);

impl ferry_disk::Quiesce for GuestQuiesce<'_> {
    fn pause(&mut self) -> Result<(), ferry_disk::local::VmError> {
        self.0.source().pause()
    }

    fn resume(&mut self) -> Result<(), ferry_disk::local::VmError> {
        self.0.source().resume()
    }
}

/// The running migration's cancel switch.
enum Canceller {
    Live(CancelToken),
    Storage(ferry_disk::CancelToken),
}

impl Canceller {
    fn cancel(&self) {
        match self {
            Canceller::Live(c) => c.cancel(),
            Canceller::Storage(c) => c.cancel(),
        }
    }
}

impl Guest {
    fn disks(&self) -> Vec<Arc<Disk>> {
        match self {
            Guest::Synthetic(v) => v.disks().to_vec(),
            Guest::Kvm(v) => v.disks(),
        }
    }

    /// Disk errors the guest saw.
    fn disk_errors(&self) -> u64 {
        match self {
            Guest::Synthetic(v) => v.disk_write_errors(),
            Guest::Kvm(v) => {
                let r = v.report();
                r.disk_errors + r.disk_failed
            }
        }
    }

    /// Pause, check every disk against what the guest wrote, resume if it ran.
    fn check_disks(&mut self) -> Result<Vec<u64>, String> {
        let running = self.source().is_running();
        self.source().pause().map_err(|e| e.to_string())?;
        let r = match self {
            Guest::Synthetic(v) => v.check_disks().map_err(|e| e.to_string()),
            Guest::Kvm(v) => {
                let gen = v.guest_disk_generation().map_err(|e| e.to_string());
                let slots = v
                    .read_u64(ferry_vmm_glue::kvm::guest::PARAMS + ferry_vmm_glue::kvm::guest::P_DISK_SLOTS)
                    .map_err(|e| e.to_string());
                match (gen, slots) {
                    (Ok(gen), Ok(slots)) => v
                        .disks()
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            // The guest program writes disk 0 only; the others stay zero.
                            let (s, g) = if i == 0 { (slots, gen) } else { (0, 0) };
                            check_guest_disk(d, s, KVM_DISK_REQUEST_SECTORS, g).map_err(|e| e.to_string())
                        })
                        .collect(),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        };
        if running {
            self.source().resume().map_err(|e| e.to_string())?;
        }
        r
    }

    fn source(&mut self) -> &mut dyn SourceVm {
        match self {
            Guest::Synthetic(v) => v,
            Guest::Kvm(v) => v.as_mut(),
        }
    }

    fn counter(&self) -> u64 {
        match self {
            Guest::Synthetic(v) => v.writes(),
            Guest::Kvm(v) => v.report().passes,
        }
    }
}

/// A migration (live, quick or storage) of this VMM ended: its report says so, with the
/// statistics or the error.
fn finish(m: &mut Option<MigrationReport>, status: Status, stats: Option<serde_json::Value>, error: Option<String>) {
    if let Some(m) = m.as_mut() {
        m.status = status.name().into();
        m.done = true;
        m.stats = stats;
        m.error = error;
    }
}

struct Inner {
    vm: Option<Guest>,
    state: VmmState,
    listen: Option<SocketAddr>,
    migration: Option<MigrationReport>,
    cancel: Option<Canceller>,
    /// The VM's disks (the same handles the VM writes through; they follow a storage move).
    disks: Vec<Arc<Disk>>,
    disk_check: Option<Vec<u64>>,
    received_verified: Option<bool>,
    guest_check: Option<String>,
    error: Option<String>,
    counter_at_exit: u64,
    quick_load_ms: Option<f64>,
    /// A quick load is reading the image: the process must not stop now.
    loading: bool,
    /// After an incoming migration into a reserve: every region came from it.
    from_reserve: Option<bool>,
    /// Changes of what the agent watches (see [`Inner::watched`]) since the process started,
    /// from 1 (an older VMM reports 0: it cannot be waited on).
    changes: u64,
}

/// What the agent's watch of a VMM waits for a change of: where the VM is, whether it
/// listens, and the migration's status and end ([`VmmRequest::Wait`]).
type Watched = (VmmState, bool, Option<(String, bool)>, bool);

impl Inner {
    fn watched(&self) -> Watched {
        (self.state, self.listen.is_some(), self.migration.as_ref().map(|m| (m.status.clone(), m.done)), self.loading)
    }

    /// A received VM (live or quick) runs here, or why nothing runs.
    fn arrived(&mut self, result: Result<Received, String>) {
        match result {
            Ok(Received { vm, verified, check, disks }) => {
                self.disks = disks;
                self.vm = Some(vm);
                self.state = VmmState::Running;
                self.received_verified = Some(verified);
                self.guest_check = Some(check);
            }
            Err(e) => {
                self.state = VmmState::Failed;
                self.error = Some(e);
            }
        }
    }
}

struct Vmm {
    args: VmmArgs,
    inner: Mutex<Inner>,
    /// Notified when a lock holder changed what the agent watches.
    changed: Condvar,
    stop: AtomicBool,
}

/// The VMM's state, locked; when it is released having changed what the agent watches, the
/// change is counted and every [`VmmRequest::Wait`] wakes up at once.
struct VmmGuard<'a> {
    g: MutexGuard<'a, Inner>,
    before: Watched,
    changed: &'a Condvar,
}

impl std::ops::Deref for VmmGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.g
    }
}

impl std::ops::DerefMut for VmmGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.g
    }
}

impl Drop for VmmGuard<'_> {
    fn drop(&mut self) {
        if self.g.watched() != self.before {
            self.g.changes += 1;
            self.changed.notify_all();
        }
    }
}

impl Vmm {
    fn new(args: VmmArgs, inner: Inner) -> Self {
        Self { args, inner: Mutex::new(inner), changed: Condvar::new(), stop: AtomicBool::new(false) }
    }

    fn lock(&self) -> VmmGuard<'_> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        VmmGuard { before: g.watched(), g, changed: &self.changed }
    }

    /// Block until what the agent watches changed after the `after`th change, or `timeout`.
    fn wait_change(&self, after: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while g.changes <= after {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self.changed.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn status(&self) -> VmmStatus {
        let g = self.lock();
        VmmStatus {
            name: self.args.name.clone(),
            guest: self.args.guest.name().into(),
            memory_bytes: self.args.memory_bytes,
            pid: std::process::id(),
            state: g.state,
            listen: g.listen,
            migration: g.migration.clone(),
            received_verified: g.received_verified,
            guest_check: g.guest_check.clone(),
            guest_counter: g.vm.as_ref().map_or(g.counter_at_exit, Guest::counter),
            error: g.error.clone(),
            quick_load_ms: g.quick_load_ms,
            disks: g
                .disks
                .iter()
                .map(|d| DiskStatus {
                    name: d.name().to_string(),
                    path: d.path().display().to_string(),
                    size_bytes: d.size_bytes(),
                    allocated_bytes: d.allocated_bytes().unwrap_or(0),
                })
                .collect(),
            disk_guest_errors: g.vm.as_ref().map(Guest::disk_errors),
            disk_check: g.disk_check.clone(),
            reserve_bytes: 0,
            from_reserve: g.from_reserve,
            changes: g.changes,
        }
    }
}

fn build_guest(a: &VmmArgs) -> Result<Guest, VmmError> {
    match a.guest {
        GuestKind::Synthetic => {
            let mut disks = Vec::new();
            for (i, path) in a.disks.iter().enumerate() {
                let size_bytes = std::fs::metadata(path)
                    .map_err(|e| VmmError::Guest(format!("disk {}: {e}", path.display())))?
                    .len();
                // Created empty: the pattern with nothing allocated is all zeros.
                disks.push(DiskSpec { path: path.clone(), size_bytes, allocated_pct: 0, seed: i as u64 });
            }
            let cfg = SyntheticConfig {
                vm_id: a.name.clone(),
                memory_bytes: a.memory_bytes,
                working_set_bytes: a.working_set_bytes,
                dirty_rate_bytes_per_s: a.dirty_rate_bytes_per_s,
                disks,
                disk_working_set_bytes: a.disk_working_set_bytes,
                disk_write_rate_bytes_per_s: a.disk_write_rate_bytes_per_s,
                ..Default::default()
            };
            let mut vm = SyntheticVm::new(&cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
            vm.resume().map_err(|e| VmmError::Guest(e.to_string()))?;
            Ok(Guest::Synthetic(vm))
        }
        GuestKind::Kvm => {
            let disks = a
                .disks
                .iter()
                .map(|p| Disk::open(p).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| VmmError::Guest(e.to_string()))?;
            let req_bytes = u64::from(KVM_DISK_REQUEST_SECTORS) * SECTOR_BYTES;
            let disk_slots = disks.first().map_or(0, |d| a.disk_working_set_bytes.min(d.size_bytes()) / req_bytes);
            let cfg = GuestConfig {
                vm_id: a.name.clone(),
                mem_bytes: a.memory_bytes,
                slot_bytes: 256 << 20,
                ws_pages: (a.working_set_bytes / PAGE_SIZE as u64).max(1),
                disk_slots,
                disk_request_sectors: KVM_DISK_REQUEST_SECTORS,
                ..Default::default()
            };
            let mut vm = KvmVm::boot(&cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
            vm.attach_disks(disks);
            vm.start().map_err(|e| VmmError::Guest(e.to_string()))?;
            Ok(Guest::Kvm(Box::new(vm)))
        }
    }
}

/// Run the VMM process until the agent stops it (or an incoming migration fails).
pub fn run(args: VmmArgs) -> Result<(), VmmError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| VmmError::Io { what, source }
    };
    // Bind the control socket first, so the agent can always ask what happened.
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket).map_err(io("binding the control socket"))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting the control socket"))?;
    let mut args = args;
    let mut reserve = None;
    let mut assigned_by = None;
    if let Some(bytes) = args.standby_reserve_bytes {
        match standby(&listener, &args.socket, bytes)? {
            Some((order, r, conn)) => {
                args.name = order.name;
                args.guest = order.guest;
                args.memory_bytes = order.memory_bytes;
                args.receive_on = Some(order.receive_on);
                args.encryption = order.encryption;
                args.socket = order.socket;
                args.receive_disks = order.receive_disks;
                args.trusted_networks =
                    order.trusted_networks.iter().filter_map(|s| crate::config::Subnet::parse(s).ok()).collect();
                args.expect_peer = order.peer_name;
                reserve = Some(r);
                assigned_by = Some(conn);
            }
            None => {
                let _ = std::fs::remove_file(&args.socket);
                return Ok(());
            }
        }
    }
    // The control socket as this process bound it (a standby's moved, same file): at exit it
    // removes the path only if that is still its socket. A new VMM of the same VM name (the
    // agent starts one as soon as this one was told to stop) may have bound the path already.
    let own_socket = socket_id(&args.socket);
    let receiving = args.receive_on.is_some() || args.quick_load.is_some();
    let inner = Inner {
        vm: None,
        state: if receiving { VmmState::Receiving } else { VmmState::Paused },
        listen: None,
        migration: None,
        cancel: None,
        disks: Vec::new(),
        disk_check: None,
        received_verified: None,
        guest_check: None,
        error: None,
        counter_at_exit: 0,
        quick_load_ms: None,
        loading: false,
        from_reserve: None,
        changes: 1,
    };
    let vmm = Arc::new(Vmm::new(args.clone(), inner));
    match (args.receive_on, &args.quick_load) {
        (_, Some(q)) => start_quick_load(&vmm, q.clone()),
        (Some(ip), None) => start_receiver(&vmm, ip, reserve)?,
        (None, None) => {
            let g = build_guest(&args)?;
            let mut i = vmm.lock();
            i.disks = g.disks();
            i.vm = Some(g);
            i.state = VmmState::Running;
        }
    }
    if let Some(conn) = assigned_by {
        answer(conn, Ok(()), vmm.status());
    }
    listener.set_nonblocking(true).map_err(io("control socket"))?;
    while !vmm.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                // Served blocking (the listener's non-blocking mode is not inherited).
                let _ = s.set_nonblocking(false);
                let v = vmm.clone();
                std::thread::spawn(move || serve_one(&v, s));
            }
            // Sleep until a connection comes (an answer is not delayed by a fixed tick), and
            // look at the stop flag at least every 100 ms.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener, 100),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    if own_socket.is_some() && socket_id(&args.socket) == own_socket {
        let _ = std::fs::remove_file(&args.socket);
    }
    Ok(())
}

/// Device and inode of the file at `p`.
fn socket_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Block until `l` has a connection to accept, or `ms` milliseconds passed.
fn wait_readable(l: &UnixListener, ms: u16) {
    use nix::poll::{poll, PollFd, PollFlags};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, ms).is_err() {
        std::thread::sleep(Duration::from_millis(u64::from(ms)));
    }
}

/// A standby VMM: fault the reserve in (on a thread) and answer the agent until it assigns an
/// incoming migration (`Some`: the order, the reserve, and the connection to answer once the
/// receiver listens) or stops the process (`None`).
fn standby(
    listener: &UnixListener,
    socket: &Path,
    bytes: u64,
) -> Result<Option<(AssignOrder, Arc<MemoryReserve>, UnixStream)>, VmmError> {
    let reserve = Arc::new(MemoryReserve::new(usize::try_from(bytes).unwrap_or(usize::MAX)));
    // At the lowest priority: the host's running VMs and migrations come first.
    reserve.start_fill();
    // A standby holds no VM: it ends with the agent that started it (the next agent starts its
    // own), so its memory is never held by nobody.
    let assigned = Arc::new(AtomicBool::new(false));
    {
        let (assigned, socket, parent) = (assigned.clone(), socket.to_path_buf(), nix::unistd::getppid());
        std::thread::spawn(move || {
            while !assigned.load(Ordering::SeqCst) {
                if nix::unistd::getppid() != parent {
                    let _ = std::fs::remove_file(&socket);
                    std::process::exit(0);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let status = |reserve: &MemoryReserve| VmmStatus {
        name: String::new(),
        guest: String::new(),
        memory_bytes: 0,
        pid: std::process::id(),
        state: VmmState::Standby,
        listen: None,
        migration: None,
        received_verified: None,
        guest_check: None,
        guest_counter: 0,
        error: None,
        quick_load_ms: None,
        reserve_bytes: reserve.stats().ready_bytes,
        from_reserve: None,
        changes: 0,
        disks: Vec::new(),
        disk_guest_errors: None,
        disk_check: None,
    };
    loop {
        let (s, _) = listener.accept().map_err(|source| VmmError::Io { what: "control socket".into(), source })?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new((&s).take(64 << 10)).read_line(&mut line).is_err() {
            continue;
        }
        match serde_json::from_str::<VmmRequest>(&line) {
            Ok(VmmRequest::Status) => answer(s, Ok(()), status(&reserve)),
            Ok(VmmRequest::Stop) => {
                answer(s, Ok(()), status(&reserve));
                return Ok(None);
            }
            Ok(VmmRequest::Assign(order)) => {
                let st = status(&reserve);
                if st.reserve_bytes < bytes.min(reserve_need(order.memory_bytes)) {
                    answer(
                        s,
                        Err(format!("the memory reserve is not filled yet ({} bytes ready)", st.reserve_bytes)),
                        st,
                    );
                } else {
                    assigned.store(true, Ordering::SeqCst);
                    match std::fs::rename(socket, &order.socket) {
                        Ok(()) => return Ok(Some((order, reserve, s))),
                        Err(e) => {
                            assigned.store(false, Ordering::SeqCst);
                            let why = format!("moving the control socket to {}: {e}", order.socket.display());
                            answer(s, Err(why), st);
                        }
                    }
                }
            }
            Ok(_) => answer(s, Err("a standby VMM has no VM".into()), status(&reserve)),
            Err(e) => answer(s, Err(format!("bad request: {e}")), status(&reserve)),
        }
    }
}

/// Reserve bytes a guest of `memory_bytes` needs at most: each region is carved on a 2 MiB
/// boundary (three regions for a synthetic guest, 256 MiB slots for a KVM guest).
pub fn reserve_need(memory_bytes: u64) -> u64 {
    memory_bytes + 4 * (2 << 20)
}

fn answer(mut s: UnixStream, r: Result<(), String>, status: VmmStatus) {
    let resp = VmmResponse { ok: r.is_ok(), error: r.err(), status: Some(status) };
    if let Ok(mut line) = serde_json::to_vec(&resp) {
        line.push(b'\n');
        let _ = s.write_all(&line);
    }
}

fn start_receiver(vmm: &Arc<Vmm>, ip: IpAddr, reserve: Option<Arc<MemoryReserve>>) -> Result<(), VmmError> {
    let a = &vmm.args;
    // Certificates are read again if they changed since the VMM started (a new revocation
    // list, a renewed certificate), and the source must be the host the agent admitted.
    let creds = match &a.creds {
        Credentials::Tls(t) => {
            let t = t.refreshed().unwrap_or_else(|e| {
                tracing::warn!("host certificates changed but cannot be read again ({e}); using those read before");
                t.clone()
            });
            let t = match &a.expect_peer {
                Some(n) => t.expect_client(n).map_err(|e| VmmError::Io {
                    what: "expecting the source's certificate".into(),
                    source: std::io::Error::other(e.to_string()),
                })?,
                None => t,
            };
            Credentials::Tls(t)
        }
        c => c.clone(),
    };
    let hs = ServerConfig { creds, caps: Caps::ALL, timeout: Duration::from_secs(10), encryption: a.encryption };
    let acc = TcpAcceptor::bind(SocketAddr::new(ip, 0), TcpOptions::default(), hs).map_err(|e| VmmError::Io {
        what: format!("listening on {ip}"),
        source: std::io::Error::other(e.to_string()),
    })?;
    // The destination refuses a guest larger than announced.
    let limit = a.memory_bytes;
    let inner = match (a.guest, reserve.clone()) {
        (GuestKind::Synthetic, None) => Factory::Synthetic(SyntheticFactory::new(limit, false)),
        (GuestKind::Synthetic, Some(r)) => Factory::Synthetic(SyntheticFactory::new(limit, false).with_reserve(r)),
        (GuestKind::Kvm, None) => Factory::Kvm(KvmFactory::new(limit)),
        (GuestKind::Kvm, Some(r)) => Factory::Kvm(KvmFactory::new(limit).with_reserve(r)),
    };
    // Shared-nothing: the engine receives the disks into partial copies in that directory and
    // names them at `Commit`; the VM opens them right before it resumes.
    let cfg = TargetConfig { disk_dir: a.receive_disks.as_ref().map(|d| d.dir.clone()), ..TargetConfig::default() };
    let factory: Arc<dyn ferry_migrate::vm::TargetFactory> = match (inner, a.receive_disks.clone()) {
        (Factory::Synthetic(f), None) => Arc::new(f),
        (Factory::Kvm(f), None) => Arc::new(f),
        (inner, Some(disks)) => Arc::new(DiskArrivalFactory { inner, disks }),
    };
    let mut srv = MigrationServer::new(acc, factory, cfg);
    if !a.trusted_networks.is_empty() {
        srv = srv.with_channel_check(trusted_channels_only(a.trusted_networks.clone()));
    }
    let addr = srv.local_addr().map_err(|e| VmmError::Io {
        what: "migration listener".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    vmm.lock().listen = Some(addr);
    // The source connects right after its agent was admitted; a session that has not started
    // within this is not coming (a session that started runs to its end).
    let stop = srv.stopper();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        stop.store(true, Ordering::SeqCst);
    });
    let v = vmm.clone();
    std::thread::spawn(move || {
        let v2 = v.clone();
        srv.serve(
            Some(1),
            Arc::new(move |r| {
                // Every region carved from the reserve: the receive took no page faults.
                let used = reserve.as_ref().map(|r| r.stats()).map(|s| s.hits > 0 && s.misses == 0);
                v2.lock().from_reserve = used;
                arrived(&v2, r)
            }),
        );
        // A session that never came: the agent stops this process.
        let mut g = v.lock();
        if g.state == VmmState::Receiving {
            g.state = VmmState::Failed;
            g.error.get_or_insert_with(|| "no migration arrived".into());
        }
    });
    Ok(())
}

/// A channel whose frames are not encrypted is admitted only if it comes from an address on
/// one of `trusted` and arrives at one: the agent's admission looked at the address the
/// source reached only, while a multichannel source opens channels on every NIC it pairs.
fn trusted_channels_only(trusted: Vec<crate::config::Subnet>) -> ferry_migrate::server::ChannelCheck {
    Arc::new(move |ends: &ferry_migrate::server::ChannelEnds, est: &ferry_transport::handshake::Established| {
        if est.encryption == ferry_transport::Encryption::Aead {
            return Ok(());
        }
        for (what, addr) in [("source", ends.peer), ("destination", ends.local)] {
            let ok = addr.is_some_and(|a| trusted.iter().any(|s| s.contains(a.ip())));
            if !ok {
                let at = addr.map_or("an unknown address".to_string(), |a| a.ip().to_string());
                let nets: Vec<String> = trusted.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "channel {} refused: its {what} address {at} is not on a network the destination trusts \
                     ({}), and the session's frames are not encrypted ({})",
                    est.binding.channel,
                    nets.join(", "),
                    est.encryption
                ));
            }
        }
        Ok(())
    })
}

/// The incoming migration ended: run the committed VM, or record why nothing runs here.
fn arrived(vmm: &Vmm, r: Result<TargetOutcome, MigrateError>) {
    let result = r.map_err(|e| e.to_string()).and_then(|o| run_received(o.vm, o.stats.verified, false));
    let mut g = vmm.lock();
    g.arrived(result);
}

/// A VM that arrived and runs here.
struct Received {
    vm: Guest,
    verified: bool,
    /// What the guest check found (`ok` or the problem).
    check: String,
    /// Its disks (the handles it writes through).
    disks: Vec<Arc<Disk>>,
}

/// The factories of the incoming VMM.
enum Factory {
    Synthetic(SyntheticFactory),
    Kvm(KvmFactory),
}

/// The destination's factory of a shared-nothing move: its VMs open their disks when they
/// resume (after the engine named the copies at `Commit`, before the guest runs).
struct DiskArrivalFactory {
    inner: Factory,
    disks: ReceiveDisks,
}

impl ferry_migrate::vm::TargetFactory for DiskArrivalFactory {
    fn create(&self, shape: &ferry_migrate::vm::VmShape) -> Result<Box<dyn TargetVm>, ferry_migrate::vm::VmError> {
        let vm = match &self.inner {
            Factory::Synthetic(f) => Arriving::Other(f.create(shape)?),
            Factory::Kvm(f) => Arriving::Kvm(Box::new(f.create_vm(shape).map_err(|e| e.to_string())?)),
        };
        Ok(Box::new(WithDisks { vm, disks: self.disks.clone(), opened: Vec::new() }))
    }
}

enum Arriving {
    /// The KVM VM gets its disks on its block device before its vCPUs run.
    Kvm(Box<KvmVm>),
    /// The synthetic guest keeps its disks beside it (it does not write them here: its disk
    /// writer's state does not travel).
    Other(Box<dyn TargetVm>),
}

/// An arriving VM whose disks come with it.
struct WithDisks {
    vm: Arriving,
    disks: ReceiveDisks,
    opened: Vec<Arc<Disk>>,
}

impl TargetVm for WithDisks {
    fn memory(&self) -> MemoryMap {
        match &self.vm {
            Arriving::Kvm(v) => v.memory_map(),
            Arriving::Other(v) => v.memory(),
        }
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), ferry_migrate::vm::VmError> {
        match &mut self.vm {
            Arriving::Kvm(v) => TargetVm::restore_state(v.as_mut(), state),
            Arriving::Other(v) => v.restore_state(state),
        }
    }

    /// The engine committed the disks under their names: open them, then run the guest. A disk
    /// that does not open fails the resume, and the engine then removes the copies and tells
    /// the source to resume its own.
    fn resume(&mut self) -> Result<(), ferry_migrate::vm::VmError> {
        let mut opened = Vec::new();
        for name in &self.disks.names {
            let p = self.disks.dir.join(name);
            opened
                .push(Arc::new(Disk::open(&p).map_err(|e| format!("opening the arrived disk {}: {e}", p.display()))?));
        }
        self.opened = opened;
        match &mut self.vm {
            Arriving::Kvm(v) => {
                v.attach_disks(self.opened.clone());
                TargetVm::resume(v.as_mut())
            }
            Arriving::Other(v) => v.resume(),
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A received VM (committed, its state restored): check it and run it. `resume`: the VM's
/// vCPUs were not started yet (a quick load defers that until the image digest was taken).
fn run_received(vm: Box<dyn TargetVm>, verified: bool, resume: bool) -> Result<Received, String> {
    let any: Box<dyn std::any::Any> = vm.into_any();
    let (any, disks) = match any.downcast::<WithDisks>() {
        Ok(w) => {
            let w = *w;
            let inner: Box<dyn std::any::Any> = match w.vm {
                Arriving::Kvm(k) => k,
                Arriving::Other(v) => v.into_any(),
            };
            (inner, Some(w.opened))
        }
        Err(a) => (a, None),
    };
    let received = |vm: Guest, check: String| {
        let disks = disks.clone().unwrap_or_else(|| vm.disks());
        Received { vm, verified, check, disks }
    };
    let any = match any.downcast::<SyntheticTarget>() {
        Ok(t) => {
            let mut vm = t.into_vm().map_err(|e| e.to_string())?;
            // Paused still: prove no written page was lost or stale, then run it.
            let check = match check_stamps(&vm) {
                Ok(0) => "ok".to_string(),
                Ok(n) => format!("{n} pages lost or stale"),
                Err(e) => e.to_string(),
            };
            vm.resume().map_err(|e| e.to_string())?;
            return Ok(received(Guest::Synthetic(vm), check));
        }
        Err(a) => a,
    };
    match any.downcast::<KvmVm>() {
        Ok(mut k) => {
            if resume {
                TargetVm::resume(k.as_mut()).map_err(|e| e.to_string())?;
            }
            let check = match k.vcpu_failure() {
                None => "ok".to_string(),
                Some(w) => format!("vCPU stopped: {w}"),
            };
            Ok(received(Guest::Kvm(k), check))
        }
        Err(_) => Err("the received VM is of an unknown kind".into()),
    }
}

fn serve_one(vmm: &Arc<Vmm>, s: UnixStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new((&s).take(64 << 10));
    let resp = match r.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<VmmRequest>(&line) {
            Ok(req) => handle(vmm, req),
            Err(e) => Err(format!("bad request: {e}")),
        },
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let resp = match resp {
        Ok(()) => VmmResponse { ok: true, error: None, status: Some(vmm.status()) },
        Err(e) => VmmResponse { ok: false, error: Some(e), status: Some(vmm.status()) },
    };
    if let Ok(mut out) = serde_json::to_vec(&resp) {
        out.push(b'\n');
        let _ = (&s).write_all(&out);
    }
}

fn handle(vmm: &Arc<Vmm>, req: VmmRequest) -> Result<(), String> {
    match req {
        VmmRequest::Status => Ok(()),
        VmmRequest::Wait(w) => {
            vmm.wait_change(w.after, Duration::from_millis(w.timeout_ms.min(crate::vmmctl::MAX_WAIT_MS)));
            Ok(())
        }
        VmmRequest::Pause | VmmRequest::Resume => {
            let mut g = vmm.lock();
            let pause = req == VmmRequest::Pause;
            let st = g.state;
            let vm =
                g.vm.as_mut()
                    .ok_or_else(|| format!("no VM to {} here ({st:?})", if pause { "pause" } else { "resume" }))?;
            if !matches!(st, VmmState::Running | VmmState::Paused) {
                return Err(format!("the VM is {st:?}"));
            }
            if pause {
                vm.source().pause().map_err(|e| e.to_string())?;
                g.state = VmmState::Paused;
            } else {
                vm.source().resume().map_err(|e| e.to_string())?;
                g.state = VmmState::Running;
            }
            Ok(())
        }
        VmmRequest::Stop => {
            let mut g = vmm.lock();
            if g.state == VmmState::Migrating {
                return Err("a migration runs: cancel it first".into());
            }
            if g.loading {
                return Err("a quick migration is loading the VM here (this host owns it now)".into());
            }
            if let Some(vm) = g.vm.take() {
                g.counter_at_exit = vm.counter();
            }
            vmm.stop.store(true, Ordering::SeqCst);
            Ok(())
        }
        VmmRequest::Cancel => {
            let g = vmm.lock();
            match &g.cancel {
                Some(c) if g.state == VmmState::Migrating => {
                    c.cancel();
                    Ok(())
                }
                _ => Err("no migration runs".into()),
            }
        }
        VmmRequest::Migrate(order) => start_migration(vmm, order),
        VmmRequest::QuickSave(order) => start_quick_save(vmm, order),
        VmmRequest::MoveStorage(order) => start_storage_move(vmm, order),
        VmmRequest::CheckDisks => {
            let mut g = vmm.lock();
            if !matches!(g.state, VmmState::Running | VmmState::Paused) {
                return Err(format!("the VM is {:?}", g.state));
            }
            let vm = g.vm.as_mut().ok_or("no VM here")?;
            let r = vm.check_disks()?;
            g.disk_check = Some(r);
            Ok(())
        }
        VmmRequest::Assign(_) => Err("this VMM is not a standby VMM".into()),
    }
}

/// The name a storage move's phase has in the VMM's report (and the agent's journal).
fn phase_status(p: ferry_disk::Phase) -> &'static str {
    use ferry_disk::Phase;
    match p {
        Phase::Prepared => "setup",
        Phase::Copy => "copy",
        Phase::DirtyPass(_) => "dirty_pass",
        Phase::WriteBlocking => "write_blocking",
        Phase::Sync => "sync",
        Phase::Paused => "switchover",
        Phase::Committed => "committed",
    }
}

/// Storage live migration: every disk to `order.dir` while the guest runs. Before the commit
/// point any failure or a cancel leaves the VM on its original files and removes the partial
/// copies (`ferry_disk::local`).
fn start_storage_move(vmm: &Arc<Vmm>, order: StorageOrder) -> Result<(), String> {
    let mut g = vmm.lock();
    if g.state != VmmState::Running && g.state != VmmState::Paused {
        return Err(format!("the VM is {:?}, not running here", g.state));
    }
    if g.disks.is_empty() {
        return Err("the VM has no disks".into());
    }
    let disks = g.disks.clone();
    let mut vm = g.vm.take().ok_or("no VM here")?;
    let cancel = ferry_disk::CancelToken::new();
    g.cancel = Some(Canceller::Storage(cancel.clone()));
    g.state = VmmState::Migrating;
    let disk_bytes: u64 = disks.iter().map(|d| d.size_bytes()).sum();
    g.migration = Some(MigrationReport {
        id: order.id.clone(),
        status: "setup".into(),
        guest_bytes: disk_bytes,
        ..Default::default()
    });
    drop(g);
    let v = vmm.clone();
    std::thread::spawn(move || {
        let mut progress = |p: ferry_disk::Phase| {
            if let Some(m) = v.lock().migration.as_mut() {
                m.status = phase_status(p).into();
                if let ferry_disk::Phase::DirtyPass(n) = p {
                    m.round = n;
                }
            }
            if p == ferry_disk::Phase::Copy {
                hold_storage_copy_for_tests(&cancel);
            }
        };
        let opts = ferry_disk::MoveOptions::default();
        let r = ferry_disk::move_storage(&disks, &order.dir, &mut GuestQuiesce(&mut vm), &opts, &cancel, &mut progress);
        let mut g = v.lock();
        g.cancel = None;
        let (status, stats, error) = match r {
            Ok(st) => {
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let per_disk: Vec<serde_json::Value> = st
                    .disks
                    .iter()
                    .map(|d| {
                        serde_json::json!({"name": d.name, "from": d.from, "to": d.to, "size_bytes": d.size_bytes,
                            "allocated_bytes": d.allocated_bytes, "final_allocated_bytes": d.final_allocated_bytes,
                            "new_allocated_bytes": d.new_allocated_bytes, "read_bytes": d.read_bytes,
                            "written_bytes": d.written_bytes, "zero_bytes": d.zero_bytes,
                            "source_removed": d.source_removed})
                    })
                    .collect();
                let stats = serde_json::json!({
                    "kind": "storage", "status": "completed", "dir": order.dir,
                    "total_ms": ms(st.total), "downtime_ms": ms(st.downtime),
                    "passes": st.passes, "write_blocking": st.write_blocking, "paused_bytes": st.paused_bytes,
                    "guest_bytes": disk_bytes,
                    "transferred_bytes": st.disks.iter().map(|d| d.written_bytes).sum::<u64>(),
                    "read_bytes": st.disks.iter().map(|d| d.read_bytes).sum::<u64>(),
                    "post_switch_error": st.post_switch_error, "disks": per_disk,
                });
                (Status::Completed, Some(stats), None)
            }
            Err(ferry_disk::MoveError::Cancelled) => (Status::Cancelled, None, Some("storage move cancelled".into())),
            Err(e) => (Status::Failed, None, Some(format!("storage move: {e}"))),
        };
        let running = vm.source().is_running();
        g.vm = Some(vm);
        g.state = if running { VmmState::Running } else { VmmState::Paused };
        finish(&mut g.migration, status, stats, error);
    });
    Ok(())
}

/// Test hook, for the agent's storage tests only: with `FERRY_VMM_TEST_HOLD_STORAGE_COPY_UNTIL=PATH`
/// in its environment, a storage move that starts copying (its partial copies exist) waits
/// until `PATH` exists (at most 120 s), so a test can cancel it or queue another behind it at a
/// known point (a cancel ends the wait). Production never sets it; nothing else reads it.
fn hold_storage_copy_for_tests(cancel: &ferry_disk::CancelToken) {
    let Some(path) = std::env::var_os("FERRY_VMM_TEST_HOLD_STORAGE_COPY_UNTIL") else { return };
    let path = PathBuf::from(path);
    let t0 = Instant::now();
    while !path.exists() && !cancel.is_cancelled() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stats_json(s: &ferry_migrate::stats::MigrationStats) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn start_migration(vmm: &Arc<Vmm>, order: MigrateOrder) -> Result<(), String> {
    let option: TransportOption = order.option.parse().map_err(|e: UnknownOption| e.to_string())?;
    if !option.is_tcp() {
        return Err(format!("option {option} is not served by the agent yet"));
    }
    let mut opts = option.tcp_options(ZSTD_LEVEL);
    opts.encryption = Some(order.encryption);
    let mut g = vmm.lock();
    if g.state != VmmState::Running && g.state != VmmState::Paused {
        return Err(format!("the VM is {:?}, not running here", g.state));
    }
    // Shared-nothing: the disks travel on the session. Without it a VM with disks does not
    // move (its disks would stay behind, and the destination has no copy of them).
    let disks = match (order.include_storage, g.disks.is_empty()) {
        (true, _) => g.disks.clone(),
        (false, true) => Vec::new(),
        (false, false) => {
            return Err(format!("the VM has {} disks and the order does not include storage", g.disks.len()))
        }
    };
    let mut vm = g.vm.take().ok_or("no VM here")?;
    let cancel = CancelToken::new();
    g.cancel = Some(Canceller::Live(cancel.clone()));
    g.state = VmmState::Migrating;
    g.migration = Some(MigrationReport { id: order.id.clone(), status: "setup".into(), ..Default::default() });
    drop(g);
    let v = vmm.clone();
    std::thread::spawn(move || {
        let cfg = MigrationConfig {
            converge: ConvergeConfig { downtime_limit: Duration::from_millis(order.downtime_ms), ..Default::default() },
            cancel: cancel.clone(),
            retain_source_disks: order.retain_source_disks,
            ..Default::default()
        };
        let progress = |p: &ferry_migrate::stats::Progress| {
            let mut g = v.lock();
            if let Some(m) = g.migration.as_mut() {
                m.status = p.status.name().into();
                m.round = p.round;
                m.remaining_bytes = p.remaining_bytes;
                m.transferred_bytes = p.transferred_bytes;
                m.guest_bytes = p.guest_bytes;
                m.expected_downtime_ms = p.expected_downtime.as_secs_f64() * 1e3;
                m.bandwidth_bytes_per_s = p.bandwidth_bytes_per_s;
            }
        };
        let key = match (&v.args.creds, &order.peer_name) {
            (Credentials::Tls(t), Some(name)) => {
                let t = t.refreshed().unwrap_or_else(|e| {
                    tracing::warn!("host certificates changed but cannot be read again ({e}); using those read before");
                    t.clone()
                });
                t.expect_peer(name).map(Credentials::Tls)
            }
            (c, _) => Ok(c.clone()),
        };
        let mut plan_json = None;
        let opened =
            key.map_err(|e| MigrateError::Connect(0, e.to_string())).and_then(|key| match &order.multichannel {
                None => connect_simple(order.to, usize::from(order.channels.max(1)), &opts, &key),
                Some(mc) => open_multichannel(order.to, mc, &opts, &key).map(|(chans, plan)| {
                    plan_json = Some(plan);
                    chans
                }),
            });
        let r = opened
            .map(|chans| hold_disk_copy_for_tests(chans, !disks.is_empty(), &cancel))
            .and_then(|chans| migrate(&mut Carrying { vm: vm.source(), disks: disks.clone() }, chans, &cfg, &progress));
        hold_outcome_for_tests();
        let mut g = v.lock();
        g.cancel = None;
        let counter = vm.counter();
        let (status, stats, error) = match r {
            Ok(st) => {
                // The destination runs the VM now: release the copy here.
                g.counter_at_exit = counter;
                drop(vm);
                g.state = VmmState::Released;
                let mut stats = stats_json(&st);
                if let (Some(p), Some(o)) = (plan_json.take(), stats.as_object_mut()) {
                    o.insert("multichannel".into(), p);
                }
                (st.status, Some(stats), None)
            }
            Err(MigrateError::Uncertain(st)) => {
                g.vm = Some(vm);
                g.state = VmmState::Uncertain;
                (Status::Uncertain, Some(stats_json(&st)), Some(MigrateError::Uncertain(st).to_string()))
            }
            Err(e) => {
                let running = vm.source().is_running();
                g.vm = Some(vm);
                g.state = if running { VmmState::Running } else { VmmState::Paused };
                let status = if matches!(e, MigrateError::Cancelled) { Status::Cancelled } else { Status::Failed };
                (status, None, Some(e.to_string()))
            }
        };
        finish(&mut g.migration, status, stats, error);
    });
    Ok(())
}

/// The VM as the engine sees it on an outgoing live move: its disks are the ones the agent
/// ordered to carry (every disk with `include_storage`, none otherwise), whatever the guest
/// kind reports itself.
struct Carrying<'a> {
    vm: &'a mut dyn SourceVm,
    disks: Vec<Arc<Disk>>,
}

impl SourceVm for Carrying<'_> {
    fn shape(&self) -> ferry_migrate::vm::VmShape {
        self.vm.shape()
    }
    fn memory(&self) -> MemoryMap {
        self.vm.memory()
    }
    fn start_dirty_log(&mut self) -> Result<(), ferry_migrate::vm::VmError> {
        self.vm.start_dirty_log()
    }
    fn take_dirty(&mut self) -> Result<ferry_migrate::vm::DirtyBitmap, ferry_migrate::vm::VmError> {
        self.vm.take_dirty()
    }
    fn return_dirty(&mut self, pages: &ferry_migrate::vm::DirtyBitmap) {
        self.vm.return_dirty(pages)
    }
    fn stop_dirty_log(&mut self) {
        self.vm.stop_dirty_log()
    }
    fn pause(&mut self) -> Result<(), ferry_migrate::vm::VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), ferry_migrate::vm::VmError> {
        self.vm.resume()
    }
    fn is_running(&self) -> bool {
        self.vm.is_running()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, ferry_migrate::vm::VmError> {
        self.vm.save_state()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.vm.set_throttle(percent)
    }
    fn disks(&self) -> Vec<Arc<Disk>> {
        self.disks.clone()
    }
}

/// Test hook, for the agent's shared-nothing fault tests only: with
/// `FERRY_VMM_TEST_HOLD_DISK_COPY_UNTIL=PATH` in its environment, a source VMM moving disks
/// sends the first two `DiskBlocks` messages of the session (the destination's partial copies
/// exist and hold data) and holds every further one until `PATH` exists, the migration is
/// cancelled, or 120 s passed, so a test can cancel, kill or fill the destination at a known
/// point of the disk copy. Production never sets it; nothing else reads it.
fn hold_disk_copy_for_tests(
    mut chans: Vec<ferry_transport::Channel>,
    disks: bool,
    cancel: &CancelToken,
) -> Vec<ferry_transport::Channel> {
    let Some(path) = std::env::var_os("FERRY_VMM_TEST_HOLD_DISK_COPY_UNTIL").filter(|_| disks) else { return chans };
    let hold = Arc::new((PathBuf::from(path), cancel.clone(), std::sync::atomic::AtomicU64::new(0)));
    chans
        .drain(..)
        .map(|ferry_transport::Channel { tx, rx, info, killer }| ferry_transport::Channel {
            tx: Box::new(HoldDiskBlocks { inner: tx, hold: hold.clone() }),
            rx,
            info,
            killer,
        })
        .collect()
}

type Hold = (PathBuf, CancelToken, std::sync::atomic::AtomicU64);

/// See [`hold_disk_copy_for_tests`].
struct HoldDiskBlocks {
    inner: Box<dyn ferry_transport::ChannelTx>,
    hold: Arc<Hold>,
}

impl ferry_transport::ChannelTx for HoldDiskBlocks {
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[ferry_transport::wire::PageRun],
        src: &dyn ferry_memory::MemorySource,
    ) -> ferry_transport::error::Result<ferry_transport::SentBatch> {
        self.inner.send_batch(id, round, flags, runs, src)
    }
    fn send_batch_mapped(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[ferry_transport::wire::PageRun],
        data_map: &[u8],
        src: &dyn ferry_memory::MemorySource,
    ) -> ferry_transport::error::Result<ferry_transport::SentBatch> {
        self.inner.send_batch_mapped(id, round, flags, runs, data_map, src)
    }
    fn send_control(&mut self, msg: &[u8]) -> ferry_transport::error::Result<()> {
        let (path, cancel, sent) = &*self.hold;
        if ferry_migrate::protocol::is_disk_blocks(msg) && sent.fetch_add(1, Ordering::SeqCst) >= 2 {
            let t0 = Instant::now();
            while !path.exists() && !cancel.is_cancelled() && t0.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.inner.send_control(msg)
    }
    fn send_ack(&mut self, ack: ferry_transport::wire::Ack) -> ferry_transport::error::Result<()> {
        self.inner.send_ack(ack)
    }
    fn send_abort(&mut self, code: u16, reason: &str) -> ferry_transport::error::Result<()> {
        self.inner.send_abort(code, reason)
    }
    fn close(&mut self) -> ferry_transport::error::Result<()> {
        self.inner.close()
    }
}

/// The image digest of a guest's memory (`ferry_memory::digest`, the one live migration
/// compares), taken in one pass over every page. Source and destination of a quick migration
/// compute it the same way, each over its paused guest.
fn map_digest(map: &MemoryMap) -> u64 {
    let pages = (map.total_bytes() / PAGE_SIZE as u64) as usize;
    let table = PageTable::new(pages, zero_page_hash());
    let mut base = 0usize;
    for r in map.regions() {
        if let Some(s) = map.lookup(r.gpa, r.len) {
            scan_slice(s, |p, sc| table.set(base + p, sc.hash));
        }
        base += r.len / PAGE_SIZE;
    }
    table.digest()
}

/// The file in the shared directory where the source leaves its digest for the destination.
fn digest_path(dir: &Path, vm: &str, id: &str) -> PathBuf {
    dir.join(format!("{vm}.{id}.digest"))
}

fn write_digest(dir: &Path, vm: &str, id: &str, digest: u64) -> std::io::Result<()> {
    let p = digest_path(dir, vm, id);
    let tmp = p.with_extension("digest.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{digest:016x}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)
}

fn read_digest(dir: &Path, vm: &str, id: &str) -> Option<u64> {
    let mut s = String::new();
    std::fs::File::open(digest_path(dir, vm, id)).ok()?.take(64).read_to_string(&mut s).ok()?;
    u64::from_str_radix(s.trim(), 16).ok()
}

/// Quick migration, source side: pause, take the digest, save the image and hand the record
/// over (`ferry_migrate::quick::quick_save_cancellable`). Until the record names the
/// destination this host owns the VM: any failure, or a cancel (`VmmRequest::Cancel`, checked
/// before the pause, after the digest, between image chunks and right before the handover),
/// removes the image and the digest and resumes it here.
fn start_quick_save(vmm: &Arc<Vmm>, order: QuickOrder) -> Result<(), String> {
    let mut g = vmm.lock();
    if g.state != VmmState::Running && g.state != VmmState::Paused {
        return Err(format!("the VM is {:?}, not running here", g.state));
    }
    let mut vm = g.vm.take().ok_or("no VM here")?;
    // A cancel applies until the record names the destination (`quick_save_cancellable`).
    let cancel = CancelToken::new();
    g.cancel = Some(Canceller::Live(cancel.clone()));
    g.state = VmmState::Migrating;
    g.migration = Some(MigrationReport { id: order.id.clone(), status: "setup".into(), ..Default::default() });
    drop(g);
    let v = vmm.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let dir = SharedDir::new(&order.dir);
        let name = v.args.name.clone();
        let guest_bytes = v.args.memory_bytes;
        let was_running = vm.source().is_running();
        if let Some(m) = v.lock().migration.as_mut() {
            m.status = "switchover".into();
            m.guest_bytes = guest_bytes;
        }
        let cancelled = || if cancel.is_cancelled() { Err(QuickError::Cancelled.to_string()) } else { Ok(()) };
        let attempt = (|| -> Result<(ferry_migrate::quick::SaveReport, u64, Duration), String> {
            cancelled()?;
            vm.source().pause().map_err(|e| format!("pausing the VM: {e}"))?;
            let paused = t0.elapsed();
            let digest = map_digest(&vm.source().memory());
            cancelled()?;
            write_digest(&order.dir, &name, &order.id, digest)
                .map_err(|e| format!("writing the digest to {}: {e}", order.dir.display()))?;
            hold_save_for_tests();
            let s = quick_save_cancellable(&dir, vm.source(), &order.from, &order.to, &cancel)
                .map_err(|e| e.to_string())?;
            Ok((s, digest, paused))
        })();
        let mut g = v.lock();
        g.cancel = None;
        let counter = vm.counter();
        let (status, stats, error) = match attempt {
            Ok((s, digest, paused)) => {
                // The record names the destination: it owns the VM. Never resume it here.
                g.counter_at_exit = counter;
                drop(vm);
                g.state = VmmState::Released;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let stats = serde_json::json!({
                    "kind": "quick", "status": "completed",
                    "total_ms": ms(t0.elapsed()), "setup_ms": ms(paused),
                    "save_ms": ms(s.total), "downtime_ms": ms(s.total),
                    "guest_bytes": guest_bytes, "transferred_bytes": s.file_bytes,
                    "image_bytes": s.file_bytes, "pages_stored": s.pages_stored, "pages_total": s.pages_total,
                    "state_bytes": s.state_bytes, "digest": format!("{digest:016x}"), "verified": false,
                });
                (Status::Completed, Some(stats), None)
            }
            Err(e) => {
                // The record did not change (a failed save never commits): still the owner.
                let _ = std::fs::remove_file(digest_path(&order.dir, &name, &order.id));
                if was_running {
                    let _ = vm.source().resume();
                }
                let running = vm.source().is_running();
                g.vm = Some(vm);
                g.state = if running { VmmState::Running } else { VmmState::Paused };
                let status = if cancel.is_cancelled() { Status::Cancelled } else { Status::Failed };
                (status, None, Some(format!("quick save: {e}")))
            }
        };
        finish(&mut g.migration, status, stats, error);
    });
    Ok(())
}

/// A target VM whose start waits: `quick_load_into` resumes it, the VMM starts it only after
/// the digest of the loaded memory was taken.
struct Deferred(Box<dyn TargetVm>);

impl TargetVm for Deferred {
    fn memory(&self) -> MemoryMap {
        self.0.memory()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), ferry_migrate::vm::VmError> {
        self.0.restore_state(state)
    }
    fn resume(&mut self) -> Result<(), ferry_migrate::vm::VmError> {
        Ok(())
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self.0.into_any()
    }
}

/// How long an incoming quick migration waits for the source to hand the record over.
const QUICK_WAIT: Duration = Duration::from_secs(600);

/// Quick migration, destination side: wait until the record names this host (state saved),
/// load the image, compare digests, run the VM, and remove the record (the agents' journals
/// keep ownership from here).
fn start_quick_load(vmm: &Arc<Vmm>, q: QuickLoad) {
    let v = vmm.clone();
    std::thread::spawn(move || {
        let dir = SharedDir::new(&q.dir);
        let name = v.args.name.clone();
        let t0 = Instant::now();
        let fail = |why: String| {
            let mut g = v.lock();
            g.state = VmmState::Failed;
            g.loading = false;
            g.error = Some(why);
        };
        loop {
            if v.stop.load(Ordering::SeqCst) {
                return;
            }
            match dir.record(&name) {
                Ok(r) if r.owner == q.host && r.state == VmRunState::Saved => break,
                Ok(_) | Err(QuickError::BadRecord(_)) | Err(QuickError::Io { .. }) => {} // not yet, or mid-rename
                Err(e) => return fail(format!("reading the ownership record: {e}")),
            }
            if t0.elapsed() > QUICK_WAIT {
                return fail(format!("the VM was not handed over within {} s", QUICK_WAIT.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            let mut g = v.lock();
            if v.stop.load(Ordering::SeqCst) {
                return;
            }
            g.loading = true;
        }
        let limit = v.args.memory_bytes;
        let factory: Box<dyn ferry_migrate::vm::TargetFactory> = match v.args.guest {
            GuestKind::Synthetic => Box::new(SyntheticFactory::new(limit, false)),
            GuestKind::Kvm => Box::new(KvmFactory::new(limit)),
        };
        let t1 = Instant::now();
        let loaded = quick_load_into(&dir, &name, &q.host, |shape| factory.create(shape).map(Deferred));
        let (target, _report) = match loaded {
            Ok(x) => x,
            Err(e) => {
                return fail(format!(
                    "quick load: {e}; this host owns the saved VM, its image stays in {}",
                    q.dir.display()
                ))
            }
        };
        let digest = map_digest(&target.memory());
        let verified = read_digest(&q.dir, &name, &q.id) == Some(digest);
        let load_ms = t1.elapsed().as_secs_f64() * 1e3;
        let _ = std::fs::remove_file(digest_path(&q.dir, &name, &q.id));
        let result = run_received(target.0, verified, true);
        if let Err(e) = dir.unregister(&name, &q.host) {
            eprintln!("ferry-vmm: removing the ownership record: {e}");
        }
        let mut g = v.lock();
        g.loading = false;
        g.quick_load_ms = Some(load_ms);
        g.arrived(result);
    });
}

/// Test hook, for the agent's fault tests only: with `FERRY_VMM_TEST_HOLD_OUTCOME_UNTIL=PATH` in
/// its environment, a source VMM whose engine returned keeps reporting the migration as running
/// until `PATH` exists (at most 120 s), so a test can kill its agent at a known point after the
/// commit. Production never sets it; nothing else reads it.
fn hold_outcome_for_tests() {
    hold_for_tests("FERRY_VMM_TEST_HOLD_OUTCOME_UNTIL");
}

/// Test hook, like [`hold_outcome_for_tests`]: with `FERRY_VMM_TEST_HOLD_SAVE_UNTIL=PATH`, a
/// source VMM's quick save waits (the VM paused, its digest written, the image not yet) until
/// `PATH` exists, so a test can cancel it mid-save at a known point. Production never sets it.
fn hold_save_for_tests() {
    hold_for_tests("FERRY_VMM_TEST_HOLD_SAVE_UNTIL");
}

fn hold_for_tests(var: &str) {
    let Some(path) = std::env::var_os(var) else { return };
    let path = PathBuf::from(path);
    let t0 = std::time::Instant::now();
    while !path.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open a multichannel session (`smb`): channel 0 to `first`, the interface exchange, then
/// channels on every NIC pair the policy allows. Returns the channels and, as JSON, which NICs
/// were paired and which transport each channel uses (TCP: the VMM opens no RDMA channels; a
/// path whose both ends report an RDMA device says so in `rdma_capable`).
fn open_multichannel(
    first: SocketAddr,
    mc: &crate::vmmctl::MultichannelOrder,
    opts: &TcpOptions,
    key: &Credentials,
) -> Result<(Vec<ferry_transport::Channel>, serde_json::Value), MigrateError> {
    let policy: ferry_multichannel::NetworkPolicy = mc
        .policy
        .parse::<ferry_multichannel::NetworkPolicy>()
        .and_then(|p| p.with_channels_per_path(mc.channels_per_path.max(1)))
        .map_err(|e| MigrateError::Unexpected(format!("network policy: {e}")))?;
    let (chans, plan) = ferry_multichannel::open_session(first, key, opts, &policy)
        .map_err(|e| MigrateError::Connect(0, format!("multichannel: {e}")))?;
    let paths: Vec<serde_json::Value> = plan
        .paths
        .iter()
        .map(|p| {
            serde_json::json!({"local_if": p.local_if, "local": p.local.to_string(), "remote_if": p.remote_if,
                "remote": p.remote.to_string(), "channels": p.channels, "rdma_capable": p.rdma,
                "speed_mbps": p.speed_mbps})
        })
        .collect();
    let channels: Vec<serde_json::Value> = plan
        .channels
        .iter()
        .map(|c| {
            serde_json::json!({"index": c.index, "path": c.path, "remote": c.remote.to_string(),
                "local": c.local.map(|l| l.ip().to_string()), "transport": "tcp"})
        })
        .collect();
    let unusable: Vec<String> = plan.unusable.iter().map(|u| format!("{}: {:?}", u.network, u.reason)).collect();
    Ok((chans, serde_json::json!({"paths": paths, "channels": channels, "unusable": unusable})))
}
