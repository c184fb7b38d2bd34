//! The VMM process (`ferry-vmm`): one VM per process, as QEMU runs under libvirt.
//!
//! It runs the guest (the synthetic guest or the KVM VMM of `ferry-vmm-glue`), serves the
//! agent's requests ([`crate::vmmctl`]) on a unix socket, and runs the migration engine where
//! the memory is: an outgoing move calls `ferry_migrate::source::migrate` on a thread of this
//! process; an incoming VMM starts with no VM and a `MigrationServer` for exactly one session,
//! and runs the VM once the engine committed. It starts its own session (`setsid`), so it
//! outlives the agent that spawned it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_migrate::server::{connect_simple, MigrationServer};
use ferry_migrate::source::{migrate, CancelToken, ConvergeConfig, MigrationConfig};
use ferry_migrate::stats::Status;
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_migrate::MigrateError;
use ferry_transport::handshake::{Caps, Psk, ServerConfig};
use ferry_transport::option::{TransportOption, UnknownOption};
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::PAGE_SIZE;
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};
use ferry_vmm_glue::synthetic::{check_stamps, SyntheticConfig, SyntheticFactory, SyntheticTarget, SyntheticVm};

use crate::api::GuestKind;
use crate::vmmctl::{MigrateOrder, MigrationReport, VmmRequest, VmmResponse, VmmState, VmmStatus};

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
    /// The migration key (channels are authenticated with it).
    pub key: Psk,
    /// Incoming: listen for the migration on this IP (a free port).
    pub receive_on: Option<IpAddr>,
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

impl Guest {
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

struct Inner {
    vm: Option<Guest>,
    state: VmmState,
    listen: Option<SocketAddr>,
    migration: Option<MigrationReport>,
    cancel: Option<CancelToken>,
    received_verified: Option<bool>,
    guest_check: Option<String>,
    error: Option<String>,
    counter_at_exit: u64,
}

struct Vmm {
    args: VmmArgs,
    inner: Mutex<Inner>,
    stop: AtomicBool,
}

impl Vmm {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        }
    }
}

fn build_guest(a: &VmmArgs) -> Result<Guest, VmmError> {
    match a.guest {
        GuestKind::Synthetic => {
            let cfg = SyntheticConfig {
                vm_id: a.name.clone(),
                memory_bytes: a.memory_bytes,
                working_set_bytes: a.working_set_bytes,
                dirty_rate_bytes_per_s: a.dirty_rate_bytes_per_s,
                ..Default::default()
            };
            let mut vm = SyntheticVm::new(&cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
            vm.resume().map_err(|e| VmmError::Guest(e.to_string()))?;
            Ok(Guest::Synthetic(vm))
        }
        GuestKind::Kvm => {
            let cfg = GuestConfig {
                vm_id: a.name.clone(),
                mem_bytes: a.memory_bytes,
                slot_bytes: 256 << 20,
                ws_pages: (a.working_set_bytes / PAGE_SIZE as u64).max(1),
                ..Default::default()
            };
            let mut vm = KvmVm::boot(&cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
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
    let receiving = args.receive_on;
    let inner = Inner {
        vm: None,
        state: if receiving.is_some() { VmmState::Receiving } else { VmmState::Paused },
        listen: None,
        migration: None,
        cancel: None,
        received_verified: None,
        guest_check: None,
        error: None,
        counter_at_exit: 0,
    };
    let vmm = Arc::new(Vmm { args: args.clone(), inner: Mutex::new(inner), stop: AtomicBool::new(false) });
    match receiving {
        Some(ip) => start_receiver(&vmm, ip)?,
        None => {
            let g = build_guest(&args)?;
            let mut i = vmm.lock();
            i.vm = Some(g);
            i.state = VmmState::Running;
        }
    }
    listener.set_nonblocking(true).map_err(io("control socket"))?;
    while !vmm.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let v = vmm.clone();
                std::thread::spawn(move || serve_one(&v, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

fn start_receiver(vmm: &Arc<Vmm>, ip: IpAddr) -> Result<(), VmmError> {
    let a = &vmm.args;
    let hs = ServerConfig { psk: a.key.clone(), caps: Caps::ALL, timeout: Duration::from_secs(10) };
    let acc = TcpAcceptor::bind(SocketAddr::new(ip, 0), TcpOptions::default(), hs).map_err(|e| VmmError::Io {
        what: format!("listening on {ip}"),
        source: std::io::Error::other(e.to_string()),
    })?;
    // The destination refuses a guest larger than announced.
    let limit = a.memory_bytes;
    let srv = match a.guest {
        GuestKind::Synthetic => {
            MigrationServer::new(acc, Arc::new(SyntheticFactory::new(limit, false)), TargetConfig::default())
        }
        GuestKind::Kvm => MigrationServer::new(acc, Arc::new(KvmFactory::new(limit)), TargetConfig::default()),
    };
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
        srv.serve(Some(1), Arc::new(move |r| arrived(&v2, r)));
        // A session that never came: the agent stops this process.
        let mut g = v.lock();
        if g.state == VmmState::Receiving {
            g.state = VmmState::Failed;
            g.error.get_or_insert_with(|| "no migration arrived".into());
        }
    });
    Ok(())
}

/// The incoming migration ended: run the committed VM, or record why nothing runs here.
fn arrived(vmm: &Vmm, r: Result<TargetOutcome, MigrateError>) {
    let result = r.map_err(|e| e.to_string()).and_then(|o| {
        let verified = o.stats.verified;
        let any: Box<dyn std::any::Any> = o.vm.into_any();
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
                return Ok((Guest::Synthetic(vm), verified, check));
            }
            Err(a) => a,
        };
        match any.downcast::<KvmVm>() {
            Ok(k) => {
                let check = match k.vcpu_failure() {
                    None => "ok".to_string(),
                    Some(w) => format!("vCPU stopped: {w}"),
                };
                Ok((Guest::Kvm(k), verified, check))
            }
            Err(_) => Err("the received VM is of an unknown kind".into()),
        }
    });
    let mut g = vmm.lock();
    match result {
        Ok((vm, verified, check)) => {
            g.vm = Some(vm);
            g.state = VmmState::Running;
            g.received_verified = Some(verified);
            g.guest_check = Some(check);
        }
        Err(e) => {
            g.state = VmmState::Failed;
            g.error = Some(e);
        }
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
    }
}

fn stats_json(s: &ferry_migrate::stats::MigrationStats) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn start_migration(vmm: &Arc<Vmm>, order: MigrateOrder) -> Result<(), String> {
    let option: TransportOption = order.option.parse().map_err(|e: UnknownOption| e.to_string())?;
    let opts = option.tcp_options(ZSTD_LEVEL);
    let mut g = vmm.lock();
    if g.state != VmmState::Running && g.state != VmmState::Paused {
        return Err(format!("the VM is {:?}, not running here", g.state));
    }
    let mut vm = g.vm.take().ok_or("no VM here")?;
    let cancel = CancelToken::new();
    g.cancel = Some(cancel.clone());
    g.state = VmmState::Migrating;
    g.migration = Some(MigrationReport { id: order.id.clone(), status: "setup".into(), ..Default::default() });
    drop(g);
    let v = vmm.clone();
    std::thread::spawn(move || {
        let cfg = MigrationConfig {
            converge: ConvergeConfig { downtime_limit: Duration::from_millis(order.downtime_ms), ..Default::default() },
            cancel,
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
        let key = v.args.key.clone();
        let r = connect_simple(order.to, usize::from(order.channels.max(1)), &opts, &key)
            .and_then(|chans| migrate(vm.source(), chans, &cfg, &progress));
        let mut g = v.lock();
        g.cancel = None;
        let counter = vm.counter();
        let (status, stats, error) = match r {
            Ok(st) => {
                // The destination runs the VM now: release the copy here.
                g.counter_at_exit = counter;
                drop(vm);
                g.state = VmmState::Released;
                (st.status, Some(stats_json(&st)), None)
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
        if let Some(m) = g.migration.as_mut() {
            m.status = status.name().into();
            m.done = true;
            m.stats = stats;
            m.error = error;
        }
    });
    Ok(())
}
