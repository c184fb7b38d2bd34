//! `migration-bench live` (the default job): live migration of a synthetic guest (a page mixture,
//! or a raw memory image with `--image`) between two processes with the real engine, one run per
//! workload and transport option. The processes are driven by [`crate::driver`]; each run becomes
//! one [`LiveRecord`], which carries the engine's [`MigrationStats`] as they serialize.
//!
//! ```text
//!  driver                      live-dst                          live-src
//!   | spawn -----------------> listen, "LISTENING addr"
//!   | spawn --------------------------------------------------> map + fill guest, start writer,
//!   |                                                           "READY"
//!   | "GO addr" ----------------------------------------------> connect N channels, migrate
//!   |                          receive, verify, commit, resume   "PROGRESS {..}" lines
//!   |                          "RESULT {..}"                     "RESULT {..}"
//! ```
//!
//! Every timing is compared with an iperf3 single stream measured in the same run; CPU time and
//! peak RSS are each process's own (getrusage), and guest memory resident in each process is read
//! from /proc/self/smaps so that the engine's extra memory can be told apart from the guest's.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_memory::reserve::MemoryReserve;
use ferry_memory::MemoryMap;
use ferry_migrate::server::{connect_simple, MigrationServer};
use ferry_migrate::source::{migrate, ConvergeConfig, MigrationConfig, Scheduling};
use ferry_migrate::stats::{MigrationStats, Progress, Status};
use ferry_migrate::target::{TargetConfig, TargetOutcome};
use ferry_migrate::vm::SourceVm;
use ferry_multichannel::policy::NetworkPolicy;
use ferry_transport::endpoint::{Acceptor, Connector};
use ferry_transport::handshake::{random_bytes, Caps, ServerConfig};
use ferry_transport::option::TransportOption;
use ferry_transport::tcp::{TcpAcceptor, TcpOptions};
use ferry_transport::wire::PAGE_SIZE;
use ferry_transport::Encryption;
use ferry_vmm_glue::pagemix::{Mix, PageKind};
use ferry_vmm_glue::synthetic::{read_image_page, SyntheticConfig, SyntheticFactory, SyntheticTarget, SyntheticVm};
use serde::{Deserialize, Serialize};

use crate::driver::{
    creds, die_with_parent, drive_pair, hex, parse_result, read_go, read_line, read_result, say, say_result,
};
use crate::error::{BenchError, Result};
use crate::procstat::Usage;
use crate::units::parse_size;

/// Guest workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Nothing writes guest memory.
    Idle,
    /// A writer rewrites the working set at the dirty rate.
    Busy,
}

impl Workload {
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Busy => "busy",
        }
    }
}

/// Regions of the bench guest.
const LAYOUT_REGIONS: usize = 3;

/// Where the destination's guest memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DstMemory {
    /// Fresh memory mapped at prepare; the receive path takes the page faults.
    Cold,
    /// Fresh memory mapped and faulted in at prepare (counted in setup and total).
    Prefault,
    /// Carved from the destination agent's reserve, faulted in before the migration was asked
    /// for (like QEMU `-incoming` with `-mem-prealloc`); the fill time is reported apart.
    Reserve,
}

impl DstMemory {
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            DstMemory::Cold => "cold",
            DstMemory::Prefault => "prefault",
            DstMemory::Reserve => "reserve",
        }
    }
}

/// What one migration run is (passed to both children on the command line).
#[derive(Debug, Clone, clap::Args)]
pub struct LiveChildArgs {
    /// Guest memory.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Page mixture.
    #[arg(long)]
    pub mix: Mix,
    /// Guest memory from this raw image instead of the mixture (`size` is its length, rounded
    /// up to whole pages).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Seed of the contents.
    #[arg(long)]
    pub seed: u64,
    /// Workload.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Working set of the busy writer.
    #[arg(long, value_parser = parse_size)]
    pub working_set: u64,
    /// Dirty rate of the busy writer, bytes per second.
    #[arg(long, value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Transport option.
    #[arg(long)]
    pub option: TransportOption,
    /// Protection of every frame after the handshake (`aead`, `integrity`, `off`; both sides).
    #[arg(long, default_value = "aead")]
    pub encryption: Encryption,
    /// Authenticate with host certificates (`ca.pem`, `cert.pem`, `key.pem` in this directory,
    /// used by both ends) instead of the key the driver hands its children.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Channels.
    #[arg(long)]
    pub channels: usize,
    /// Downtime limit in milliseconds.
    #[arg(long)]
    pub downtime_ms: u64,
    /// Destination re-reads all memory for the final check.
    #[arg(long)]
    pub verify_full: bool,
    /// Where the destination's guest memory comes from.
    #[arg(long, value_enum)]
    pub dst_memory: DstMemory,
    /// zstd level.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Pages per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_pages: u32,
    /// Open the session with multichannel discovery (every NIC both hosts share) instead of
    /// `channels` channels to one address.
    #[arg(long)]
    pub multichannel: bool,
    /// Batch scheduling over channels: `adaptive` or `rr` (round-robin).
    #[arg(long, default_value = "adaptive")]
    pub scheduling: String,
    /// Multichannel network policy (like `198.18.1.0/24:1,198.18.2.0/24:2`).
    #[arg(long)]
    pub policy: Option<String>,
    /// Disks of a shared-nothing move (none by default).
    #[command(flatten)]
    pub disks: DiskChildArgs,
}

/// The guest's disks in a shared-nothing run (`migration-bench storage --kind shared-nothing`):
/// the source creates them in `DIR/src`, the destination receives them into `DIR/dst` (one
/// machine, so the source can compare both when the move is over).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiskChildArgs {
    /// Size of each disk (none: no disks).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Disks.
    #[arg(long, default_value_t = 1)]
    pub disk_count: u32,
    /// Percent of each disk allocated (1 MiB groups).
    #[arg(long, default_value_t = 50)]
    pub disk_allocated: u8,
    /// The busy guest's disk write rate over all disks, bytes per second (none: as fast as it
    /// can).
    #[arg(long, value_parser = parse_size)]
    pub disk_rate: Option<u64>,
    /// Bytes at the start of each disk the busy guest rewrites (none: no disk writes).
    #[arg(long, value_parser = parse_size)]
    pub disk_working_set: Option<u64>,
    /// Directory of the disks (`src` and `dst` under it).
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
}

impl DiskChildArgs {
    fn to_args(&self) -> Vec<String> {
        let Some(size) = self.disk_size else { return Vec::new() };
        let mut v: Vec<String> = vec![
            "--disk-size".into(),
            size.to_string(),
            "--disk-count".into(),
            self.disk_count.to_string(),
            "--disk-allocated".into(),
            self.disk_allocated.to_string(),
        ];
        if let Some(r) = self.disk_rate {
            v.push("--disk-rate".into());
            v.push(r.to_string());
        }
        if let Some(w) = self.disk_working_set {
            v.push("--disk-working-set".into());
            v.push(w.to_string());
        }
        if let Some(d) = &self.disk_dir {
            v.push("--disk-dir".into());
            v.push(d.display().to_string());
        }
        v
    }

    /// The disks the source creates.
    fn specs(&self) -> Result<Vec<ferry_vmm_glue::guestdisk::DiskSpec>> {
        let Some(size_bytes) = self.disk_size else { return Ok(Vec::new()) };
        let Some(dir) = &self.disk_dir else { return Err(BenchError::Usage("--disk-size needs --disk-dir".into())) };
        Ok((0..self.disk_count)
            .map(|i| ferry_vmm_glue::guestdisk::DiskSpec {
                path: dir.join("src").join(format!("disk{i}.img")),
                size_bytes,
                allocated_pct: self.disk_allocated,
                seed: u64::from(i) + 1,
            })
            .collect())
    }
}

/// One disk of a shared-nothing run, as the source found it after the move.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DiskCheck {
    /// Disk name.
    pub name: String,
    /// The destination's copy holds exactly the source's bytes (read through the paused VM's
    /// open disk, also after its file was removed), and every sector is what the guest wrote.
    pub identical: bool,
    /// Bytes the destination's copy occupies.
    pub dst_allocated_bytes: u64,
}

impl LiveChildArgs {
    fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--size".into(),
            self.size.to_string(),
            "--mix".into(),
            self.mix.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--workload".into(),
            self.workload.as_str().into(),
            "--working-set".into(),
            self.working_set.to_string(),
            "--dirty-rate".into(),
            self.dirty_rate.to_string(),
            "--option".into(),
            self.option.to_string(),
            "--encryption".into(),
            self.encryption.to_string(),
        ];
        if let Some(d) = &self.tls_dir {
            v.extend(["--tls-dir".into(), d.display().to_string()]);
        }
        v.extend([
            "--channels".into(),
            self.channels.to_string(),
            "--downtime-ms".into(),
            self.downtime_ms.to_string(),
            "--zstd-level".into(),
            self.zstd_level.to_string(),
            "--batch-pages".into(),
            self.batch_pages.to_string(),
        ]);
        if self.verify_full {
            v.push("--verify-full".into());
        }
        if let Some(p) = &self.image {
            v.push("--image".into());
            v.push(p.display().to_string());
        }
        v.push("--dst-memory".into());
        v.push(self.dst_memory.as_str().into());
        if self.multichannel {
            v.push("--multichannel".into());
        }
        v.push("--scheduling".into());
        v.push(self.scheduling.clone());
        if let Some(p) = &self.policy {
            v.push("--policy".into());
            v.push(p.clone());
        }
        v.extend(self.disks.to_args());
        v
    }
}

/// What the source process reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LiveSrcReport {
    /// The engine's statistics (status `failed` and nothing else if it returned an error).
    pub migration: MigrationStats,
    /// Error, if the migration failed.
    pub error: Option<String>,
    /// CPU seconds during the migration.
    pub cpu_s: f64,
    /// Peak RSS.
    pub peak_rss_bytes: u64,
    /// Guest memory resident in this process (non-zero pages of the guest).
    pub guest_resident_bytes: u64,
    /// Non-zero guest bytes (what must cross the wire at least once).
    pub nonzero_guest_bytes: u64,
    /// Seconds filling guest memory before the run.
    pub fill_seconds: f64,
    /// The source's guest runs at the end (a failed migration resumed it).
    #[serde(default)]
    pub source_running: bool,
    /// With a failed migration of an idle guest of the page mixture: every page of the source's
    /// guest still holds what it was filled with.
    #[serde(default)]
    pub source_intact: Option<bool>,
    /// Shared-nothing: each disk compared with the destination's copy after the move.
    #[serde(default)]
    pub disks: Vec<DiskCheck>,
}

/// What the destination process reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LiveDstReport {
    /// Received and committed.
    pub ok: bool,
    /// Error.
    pub error: Option<String>,
    /// Pages received.
    pub pages: u64,
    /// Bytes from the wire.
    pub wire_bytes: u64,
    /// Milliseconds spent verifying at switchover.
    pub verify_ms: f64,
    /// Verified.
    pub verified: bool,
    /// CPU seconds from the first connection to the end.
    pub cpu_s: f64,
    /// Peak RSS.
    pub peak_rss_bytes: u64,
    /// Guest memory resident at the end.
    pub guest_resident_bytes: u64,
    /// Seconds the reserve took to fill before the destination listened (0 without one).
    pub reserve_fill_s: f64,
    /// With a reserve: every region came from it.
    pub reserve_hit: Option<bool>,
    /// With `--image` and an idle guest: every received page equals the image file's page.
    pub image_matches: Option<bool>,
    /// What the destination saw on its channels after `Commit` (frames that failed their tag).
    #[serde(default)]
    pub events: Vec<String>,
}

/// Bytes of this process's resident memory inside the given regions (from /proc/self/smaps).
pub fn resident_in(map: &MemoryMap) -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let ranges: Vec<(usize, usize)> =
        map.regions().iter().map(|r| (r.host.as_ptr() as usize, r.host.as_ptr() as usize + r.len)).collect();
    let mut total = 0u64;
    let mut inside = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                    inside = ranges.iter().any(|&(s, e)| a >= s && b <= e);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    total
}

fn src_report(r: std::result::Result<MigrationStats, String>) -> LiveSrcReport {
    match r {
        Ok(migration) => LiveSrcReport { migration, ..LiveSrcReport::default() },
        Err(e) => LiveSrcReport {
            migration: MigrationStats { status: Status::Failed, throttle_pct: 100, ..MigrationStats::default() },
            error: Some(e),
            ..LiveSrcReport::default()
        },
    }
}

/// Every page of an idle guest of the mixture holds what it was filled with.
fn holds_the_mixture(vm: &SyntheticVm, a: &LiveChildArgs) -> bool {
    let (mut got, mut want) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    (0..vm.pages()).all(|i| {
        vm.read_page(i, &mut got);
        match a.mix.kind(a.seed, i) {
            PageKind::Zero => got.iter().all(|&b| b == 0),
            k => {
                ferry_vmm_glue::pagemix::fill_page(&mut want, k, a.seed, i);
                got == want
            }
        }
    })
}

/// Non-zero bytes of the guest (what must cross the wire at least once).
fn nonzero_bytes(vm: &SyntheticVm, a: &LiveChildArgs) -> u64 {
    let pages = if a.image.is_some() {
        let mut page = vec![0u8; PAGE_SIZE];
        (0..vm.pages())
            .filter(|&i| {
                vm.read_page(i, &mut page);
                page.iter().any(|&b| b != 0)
            })
            .count()
    } else {
        (0..a.size / PAGE_SIZE as u64).filter(|&i| a.mix.kind(a.seed, i) != PageKind::Zero).count()
    };
    pages as u64 * PAGE_SIZE as u64
}

/// The connector of `option` with frames protected by `encryption`. The tcp options seal (or
/// not) as asked; quic is always encrypted by its TLS 1.3, so it takes `aead` only (see
/// [`encryption_applies`]).
pub fn connector(option: TransportOption, zstd_level: i32, encryption: Encryption) -> Result<Box<dyn Connector>> {
    if option.is_tcp() {
        Ok(Box::new(TcpOptions { encryption: Some(encryption), ..option.tcp_options(zstd_level) }))
    } else if encryption_applies(option, encryption) {
        Ok(option.connector(zstd_level))
    } else {
        Err(BenchError::Usage(format!(
            "{option} is always encrypted (TLS 1.3): --encryption {encryption} applies to tcp, zstd and zstd-always"
        )))
    }
}

/// Whether `option` can run with `encryption`: every mode on the tcp options, `aead` only on
/// quic (TLS 1.3 seals every packet whatever Ferry's frames do).
pub fn encryption_applies(option: TransportOption, encryption: Encryption) -> bool {
    option.is_tcp() || encryption == Encryption::Aead
}

/// The source process.
pub fn src_main(a: &LiveChildArgs) -> Result<()> {
    die_with_parent();
    let psk = creds(a.tls_dir.as_deref())?;
    let opts = connector(a.option, a.zstd_level, a.encryption)?;
    let t = Instant::now();
    let busy = a.workload == Workload::Busy;
    let specs = a.disks.specs()?;
    for s in &specs {
        if let Some(d) = s.path.parent() {
            std::fs::create_dir_all(d).map_err(|e| BenchError::io(format!("creating {}", d.display()), e))?;
        }
        ferry_vmm_glue::guestdisk::create_image(s)
            .map_err(|e| BenchError::io(format!("creating {}", s.path.display()), e))?;
        let f = std::fs::File::open(&s.path).map_err(|e| BenchError::io("opening an image", e))?;
        f.sync_all().map_err(|e| BenchError::io("syncing an image", e))?;
    }
    let cfg = SyntheticConfig {
        vm_id: format!("bench-{}", hex(&random_bytes::<4>())),
        memory_bytes: a.size,
        regions: LAYOUT_REGIONS,
        mix: a.mix,
        seed: a.seed,
        image: a.image.clone(),
        working_set_bytes: if busy { a.working_set } else { 0 },
        dirty_rate_bytes_per_s: a.dirty_rate,
        disks: specs.clone(),
        disk_working_set_bytes: if busy { a.disks.disk_working_set.unwrap_or(0) } else { 0 },
        disk_write_rate_bytes_per_s: a.disks.disk_rate.unwrap_or(0),
    };
    let mut vm = SyntheticVm::new(&cfg).map_err(|e| BenchError::Usage(format!("building the guest: {e}")))?;
    let fill_seconds = t.elapsed().as_secs_f64();
    if vm.pages() * PAGE_SIZE as u64 != a.size {
        return Err(BenchError::Usage(format!(
            "the guest has {} bytes, the driver said {}",
            vm.pages() * PAGE_SIZE as u64,
            a.size
        )));
    }
    let nonzero = nonzero_bytes(&vm, a);
    vm.resume().map_err(|e| BenchError::Usage(format!("starting the guest: {e}")))?;
    say("READY")?;
    let addr = read_go()?;
    if busy {
        // Let the writer reach its pace before the clock starts.
        std::thread::sleep(Duration::from_millis(300));
    }
    let u0 = Usage::current()?;
    let last = Mutex::new(Instant::now() - Duration::from_secs(1));
    let progress = |p: &Progress| {
        let Ok(mut l) = last.lock() else { return };
        if l.elapsed() < Duration::from_millis(100) && p.status == Status::Active {
            return;
        }
        *l = Instant::now();
        if let Ok(json) = serde_json::to_string(p) {
            let _ = say(&format!("PROGRESS {json}"));
        }
    };
    let scheduling = match a.scheduling.as_str() {
        "adaptive" => Scheduling::Adaptive,
        "rr" => Scheduling::RoundRobin,
        o => return Err(BenchError::Usage(format!("unknown scheduling {o:?} (adaptive, rr)"))),
    };
    let mcfg = MigrationConfig {
        converge: ConvergeConfig { downtime_limit: Duration::from_millis(a.downtime_ms), ..Default::default() },
        verify_full: a.verify_full,
        scheduling,
        batch_pages: a.batch_pages,
        ..MigrationConfig::default()
    };
    let mut plan_lines = Vec::new();
    let chans = if a.multichannel {
        let policy: NetworkPolicy = match &a.policy {
            Some(p) => p.parse().map_err(|e| BenchError::Usage(format!("--policy: {e}")))?,
            None => NetworkPolicy::default(),
        };
        ferry_multichannel::session::open_session(addr, &psk, &*opts, &policy)
            .map(|(c, plan)| {
                for p in &plan.paths {
                    plan_lines.push(format!(
                        "path {} {} -> {} {} ({} channel(s), {} Mbit/s)",
                        p.local_if,
                        p.local,
                        p.remote_if,
                        p.remote,
                        p.channels,
                        p.speed_mbps.map_or("?".into(), |v| v.to_string())
                    ));
                }
                for u in &plan.unusable {
                    plan_lines.push(format!("unusable: {u:?}"));
                }
                c
            })
            .map_err(|e| e.to_string())
    } else {
        connect_simple(addr, a.channels, &*opts, &psk).map_err(|e| e.to_string())
    };
    let r = chans.and_then(|ch| migrate(&mut vm, ch, &mcfg, &progress).map_err(|e| e.to_string()));
    let u = Usage::current()?.since(&u0);
    let mut rep = src_report(r);
    rep.migration.events.splice(0..0, plan_lines);
    rep.cpu_s = u.cpu_s();
    rep.peak_rss_bytes = u.peak_rss_bytes;
    rep.guest_resident_bytes = resident_in(&vm.memory());
    rep.nonzero_guest_bytes = nonzero;
    rep.fill_seconds = fill_seconds;
    rep.source_running = vm.is_running();
    if rep.error.is_some() && !busy && a.image.is_none() {
        rep.source_intact = Some(holds_the_mixture(&vm, a));
    }
    if rep.error.is_none() && !specs.is_empty() {
        rep.disks = check_moved_disks(&vm, a.disks.disk_dir.as_deref().unwrap_or(Path::new(".")));
    }
    say_result(&rep)
}

/// After a shared-nothing move (the source paused): each destination copy against the source
/// VM's disk, byte for byte, and the guest's own sector check.
fn check_moved_disks(vm: &SyntheticVm, dir: &Path) -> Vec<DiskCheck> {
    let bad = vm.check_disks().unwrap_or_default();
    vm.disks()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = dir.join("dst").join(d.name());
            let mut identical = bad.get(i) == Some(&0);
            let mut dst_allocated_bytes = 0;
            match std::fs::File::open(&p) {
                Ok(f) => {
                    use std::os::unix::fs::FileExt;
                    dst_allocated_bytes = ferry_disk::image::allocated_bytes(&f).unwrap_or(0);
                    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
                    let mut off = 0u64;
                    identical &= f.metadata().map(|m| m.len()).ok() == Some(d.size_bytes());
                    while identical && off < d.size_bytes() {
                        let n = (d.size_bytes() - off).min(1 << 20) as usize;
                        identical = d.read_at(off, &mut a[..n]).is_ok()
                            && f.read_exact_at(&mut b[..n], off).is_ok()
                            && a[..n] == b[..n];
                        off += n as u64;
                    }
                }
                Err(_) => identical = false,
            }
            DiskCheck { name: d.name().to_string(), identical, dst_allocated_bytes }
        })
        .collect()
}

/// The destination process.
pub fn dst_main(a: &LiveChildArgs, listen: SocketAddr) -> Result<()> {
    die_with_parent();
    let psk = creds(a.tls_dir.as_deref())?;
    let hs = ServerConfig { creds: psk, caps: Caps::ALL, timeout: Duration::from_secs(10), encryption: a.encryption };
    // A tcp listener takes every tcp option (zstd negotiated per channel); quic listens on UDP.
    let acc: Box<dyn Acceptor> = if a.option.is_tcp() {
        Box::new(TcpAcceptor::bind(listen, TcpOptions::default(), hs)?)
    } else {
        a.option.bind(listen, a.zstd_level, hs)?
    };
    let mut factory = SyntheticFactory::new(a.size.saturating_mul(2).max(1 << 20), a.dst_memory == DstMemory::Prefault);
    let mut reserve_fill_s = 0.0;
    let reserve = (a.dst_memory == DstMemory::Reserve).then(|| {
        // The guest's regions each start on a 2 MiB boundary of the reserve: room for the rounding.
        Arc::new(MemoryReserve::new(a.size as usize + LAYOUT_REGIONS * (2 << 20)))
    });
    if let Some(r) = &reserve {
        let t = Instant::now();
        r.fill().map_err(|e| BenchError::Usage(format!("filling the memory reserve: {e}")))?;
        reserve_fill_s = t.elapsed().as_secs_f64();
        factory = factory.with_reserve(r.clone());
    }
    let disk_dir = a.disks.disk_dir.as_ref().filter(|_| a.disks.disk_size.is_some()).map(|d| d.join("dst"));
    if let Some(d) = &disk_dir {
        std::fs::create_dir_all(d).map_err(|e| BenchError::io(format!("creating {}", d.display()), e))?;
    }
    let srv = MigrationServer::new(acc, Arc::new(factory), TargetConfig { disk_dir, ..TargetConfig::default() });
    let srv = ferry_test_support::server::spawn(srv, Some(1)).map_err(|e| BenchError::Usage(e.to_string()))?;
    say(&format!("LISTENING {}", srv.addr))?;
    let u0 = Usage::current()?;
    let outcome = srv.outcomes.recv();
    let _ = srv.thread.join();
    let u = Usage::current()?.since(&u0);
    let reserve_hit = reserve.as_ref().map(|r| r.stats()).map(|s| s.hits > 0 && s.misses == 0);
    let failed = |error: String| LiveDstReport {
        ok: false,
        error: Some(error),
        pages: 0,
        wire_bytes: 0,
        verify_ms: 0.0,
        verified: false,
        cpu_s: u.cpu_s(),
        peak_rss_bytes: u.peak_rss_bytes,
        guest_resident_bytes: 0,
        reserve_fill_s,
        reserve_hit,
        image_matches: None,
        events: Vec::new(),
    };
    let rep = match outcome {
        Ok(Ok(o)) => {
            let guest_resident_bytes = resident_in(&o.vm.memory());
            let stats = o.stats.clone();
            let image_matches = match (&a.image, a.workload) {
                (Some(path), Workload::Idle) => Some(matches_image(o, path)?),
                _ => None,
            };
            LiveDstReport {
                ok: true,
                error: None,
                pages: stats.pages,
                wire_bytes: stats.wire_bytes,
                verify_ms: stats.verify.as_secs_f64() * 1e3,
                verified: stats.verified,
                cpu_s: u.cpu_s(),
                peak_rss_bytes: u.peak_rss_bytes,
                guest_resident_bytes,
                reserve_fill_s,
                reserve_hit,
                image_matches,
                events: stats.events,
            }
        }
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => return Err(BenchError::Usage("the migration server ended without an outcome".into())),
    };
    say_result(&rep)
}

/// Every page of the received guest equals the image file's page (the file's tail, short of a
/// page, compared as if zero-padded).
fn matches_image(o: TargetOutcome, path: &Path) -> Result<bool> {
    let any: Box<dyn std::any::Any> = o.vm.into_any();
    let vm = any
        .downcast::<SyntheticTarget>()
        .map_err(|_| BenchError::Usage("the received VM is not a synthetic guest".into()))?;
    let f = std::fs::File::open(path).map_err(|e| BenchError::io(format!("opening {}", path.display()), e))?;
    same_as_image(&vm, std::io::BufReader::with_capacity(1 << 20, f))
        .map_err(|e| BenchError::io(format!("reading {}", path.display()), e))
}

/// Every page of `vm` equals the next page of `image`.
fn same_as_image(vm: &SyntheticTarget, mut image: impl std::io::Read) -> std::io::Result<bool> {
    let (mut want, mut got) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for i in 0..vm.pages() {
        read_image_page(&mut image, &mut want)?;
        vm.read_page(i, &mut got);
        if got != want {
            return Ok(false);
        }
    }
    Ok(true)
}

fn draw_progress(p: &serde_json::Value, label: &str) {
    let total = p["guest_bytes"].as_f64().unwrap_or(1.0).max(1.0);
    let sent = p["pages_sent"].as_f64().unwrap_or(0.0) * 4096.0;
    let frac = (sent / total).min(1.0);
    let w = 30;
    let fill = (frac * w as f64) as usize;
    eprint!(
        "\r{label:<14} [{}{}] {:>3.0}% round {:<2} {:>6.2} Gbit/s  dirty {:>6.1} MB/s  expected downtime {:>6.1} ms  {:<10}",
        "#".repeat(fill),
        " ".repeat(w - fill),
        frac * 100.0,
        p["round"].as_u64().unwrap_or(0),
        p["bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0) * 8.0 / 1e9,
        p["dirty_rate_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
        p["expected_downtime_ms"].as_f64().unwrap_or(0.0),
        p["status"].as_str().unwrap_or(""),
    );
    let _ = std::io::stderr().flush();
}

/// A change to one link of the testbed at a given time after the migration starts.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkEvent {
    /// Seconds after GO.
    pub at_s: f64,
    /// NIC index.
    pub nic: u32,
    /// `Some(rate)`: set the rate; `None`: take the link down.
    pub rate: Option<crate::units::Rate>,
}

impl std::str::FromStr for LinkEvent {
    type Err = String;

    /// `2s:nic1:rate=100mbit` or `1.5s:nic2:down`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 {
            return Err(format!("link event {s:?} is not TIME:nicN:rate=R or TIME:nicN:down"));
        }
        let at_s: f64 = parts[0]
            .trim_end_matches('s')
            .parse()
            .map_err(|_| format!("bad time {:?} in link event (like 2s or 1.5s)", parts[0]))?;
        if !(0.0..=3600.0).contains(&at_s) {
            return Err(format!("time {at_s} out of range"));
        }
        let nic: u32 = parts[1]
            .strip_prefix("nic")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad NIC {:?} in link event (like nic1)", parts[1]))?;
        let rate = match parts[2] {
            "down" => None,
            r => Some(crate::units::parse_rate(
                r.strip_prefix("rate=").ok_or_else(|| format!("bad action {r:?} (rate=R or down)"))?,
            )?),
        };
        Ok(LinkEvent { at_s, nic, rate })
    }
}

impl std::fmt::Display for LinkEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rate {
            Some(r) => write!(f, "{}s:nic{}:rate={}", self.at_s, self.nic, r),
            None => write!(f, "{}s:nic{}:down", self.at_s, self.nic),
        }
    }
}

/// Where a run happens: loopback, or a testbed (namespaces `<name>-src`/`-dst`, NIC 0 first).
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// Both processes on 127.0.0.1.
    Loopback,
    /// In the testbed, with link events applied during the run.
    Testbed(&'a crate::testbed::Testbed, &'a [LinkEvent]),
}

/// Run one migration between two fresh processes.
pub fn run(
    exe: &Path,
    a: &LiveChildArgs,
    timeout: Duration,
    label: &str,
    place: Place<'_>,
) -> Result<(LiveSrcReport, LiveDstReport)> {
    run_with(exe, a, timeout, label, place, &mut Ok)
}

/// [`run`], with `interpose` called once the destination listens, before the source is told
/// where to connect: it gets the destination's address and returns the address the source
/// should use (itself, or a relay's). Attacks on the listener start there (`--flood`, the
/// hostile-client tests), and a man in the middle puts itself between the two.
pub fn run_with(
    exe: &Path,
    a: &LiveChildArgs,
    timeout: Duration,
    label: &str,
    place: Place<'_>,
    interpose: &mut dyn FnMut(SocketAddr) -> Result<SocketAddr>,
) -> Result<(LiveSrcReport, LiveDstReport)> {
    use crate::testbed::{Side, Testbed};
    let args = a.to_args();
    let (src_ns, dst_ns, listen) = match place {
        Place::Loopback => (None, None, "127.0.0.1:0".to_string()),
        Place::Testbed(tb, _) => (Some(tb.netns(Side::Src)), Some(tb.netns(Side::Dst)), "0.0.0.0:0".to_string()),
    };
    let tty = std::io::stderr().is_terminal();
    drive_pair(exe, "live", &args, src_ns.as_deref(), dst_ns.as_deref(), &listen, timeout, |io| {
        let mut addr = read_line(&mut io.dout, "LISTENING ", "destination")?;
        if let Place::Testbed(..) = place {
            // Listening on every address: the source starts on NIC 0.
            let port = addr.rsplit(':').next().unwrap_or("0").to_string();
            addr = format!("{}:{port}", Testbed::addr(Side::Dst, 0));
        }
        read_line(&mut io.sout, "READY", "source")?;
        let to: SocketAddr = addr.parse().map_err(|_| BenchError::Usage(format!("destination address {addr:?}")))?;
        let addr = interpose(to)?;
        writeln!(io.sin, "GO {addr}").map_err(|e| BenchError::io("telling the source to go", e))?;
        if let Place::Testbed(tb, events) = place {
            apply_link_events(tb.name().to_string(), events.to_vec());
        }
        let s = loop {
            let mut line = String::new();
            let n = io.sout.read_line(&mut line).map_err(|e| BenchError::io("reading the source", e))?;
            if n == 0 {
                return Err(BenchError::Child { role: "source", detail: "exited without a result".into() });
            }
            if let Some(p) = line.trim().strip_prefix("PROGRESS ") {
                if tty {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(p) {
                        draw_progress(&v, label);
                    }
                }
            } else if let Some(r) = line.trim().strip_prefix("RESULT ") {
                break r.to_string();
            }
        };
        if tty {
            eprint!("\r{:150}\r", "");
        }
        let s: LiveSrcReport = parse_result(&s, "source")?;
        let d: LiveDstReport = read_result(&mut io.dout, "destination")?;
        Ok((s, d))
    })
}

/// Apply link events in the background, each at its time after now.
fn apply_link_events(name: String, events: Vec<LinkEvent>) {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        for e in events {
            let at = Duration::from_secs_f64(e.at_s);
            if let Some(d) = at.checked_sub(t0.elapsed()) {
                std::thread::sleep(d);
            }
            let nic = e.nic.to_string();
            let r = match e.rate {
                Some(rate) => crate::testbed::run_script(&[
                    "set-rate",
                    "--name",
                    &name,
                    "--nic",
                    &nic,
                    "--rate",
                    &rate.to_string(),
                ]),
                None => crate::testbed::run_script(&["link-down", "--name", &name, "--nic", &nic]),
            };
            if let Err(err) = r {
                eprintln!("migration-bench: link event {e}: {err}");
            }
        }
    });
}

/// One result of `migration-bench live` (README.md lists its JSON fields).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LiveRecord {
    /// Always "live".
    pub bench: String,
    /// Index of the repetition (`--repeat`), from 0.
    pub run: u32,
    /// Transport option.
    pub option: String,
    /// Protection of the frames: `aead`, `integrity` or `off` (quic: `aead`, by TLS 1.3).
    pub encryption: String,
    /// Channels asked for (on a testbed: the channels the session opened).
    pub channels: usize,
    /// `idle` or `busy`.
    pub workload: String,
    /// The raw image the guest's memory came from (`None`: the page mixture).
    pub image: Option<String>,
    /// Guest memory.
    pub guest_bytes: u64,
    /// Non-zero guest bytes.
    pub nonzero_guest_bytes: u64,
    /// The engine's statistics as the source reported them (`ferry_migrate::stats`).
    pub migration: MigrationStats,
    /// Error of either side, if any.
    pub error: Option<String>,
    /// Both sides verified the image against the source's digest.
    pub verified: bool,
    /// With `--image` and an idle guest: the destination's guest equals the image file.
    pub image_matches: Option<bool>,
    /// `"iperf3"` or `"none"`.
    pub reference: String,
    /// iperf3 single stream, same run, TCP payload bytes per second.
    pub reference_bytes_per_s: Option<f64>,
    /// The iperf3 client's arguments that measured it (`-l` is Ferry's write size).
    pub reference_args: Option<String>,
    /// `total_ms / (nonzero_guest_bytes / reference_bytes_per_s)`: 1.0 = as fast as iperf3 moving
    /// only the non-zero bytes.
    pub total_vs_reference: Option<f64>,
    /// Source CPU seconds.
    pub src_cpu_s: f64,
    /// Destination CPU seconds.
    pub dst_cpu_s: f64,
    /// Peak RSS per side.
    pub peak_rss_bytes: PeakRss,
    /// Peak RSS of both sides minus twice the guest memory: what the engine, buffers and tables
    /// cost beyond the guest (negative if part of the guest was never touched).
    pub extra_memory_bytes: i64,
    /// Batch scheduling: `adaptive` or `rr`.
    pub scheduling: String,
    /// Destination guest memory: `cold`, `prefault` or `reserve`.
    pub dst_memory: String,
    /// Seconds the destination's reserve took to fill before the migration (not in total_ms).
    pub dst_reserve_fill_s: f64,
    /// With a reserve: every region came from it (else the destination mapped cold memory).
    pub dst_reserve_hit: Option<bool>,
    /// `loopback` or `netns`.
    pub testbed: String,
    /// NICs of the testbed (0 on loopback).
    pub nics: u32,
    /// Rate limit of each NIC at the start, bits per second.
    pub link_rates_bits_per_s: Vec<u64>,
    /// iperf3 single stream on each link, same run, summed (TCP payload bytes per second).
    pub aggregate_reference_bytes_per_s: Option<f64>,
    /// Bytes on the wire per second while pages moved (total minus setup).
    pub wire_throughput_bytes_per_s: f64,
    /// `wire_throughput_bytes_per_s / aggregate_reference_bytes_per_s`.
    pub ratio_to_aggregate: Option<f64>,
    /// Idle connections held against the destination's listener during the migration
    /// (`--flood`; 0: quiet).
    #[serde(default)]
    pub flood_connections: usize,
    /// With `--flood`: connections the flood opened (first opens and reopens of what the
    /// listener closed).
    #[serde(default)]
    pub flood_opened: u64,
    /// With `--flood`, on the flooded run: its `total_ms` over the quiet run's just before.
    #[serde(default)]
    pub flood_vs_quiet: Option<f64>,
}

impl LiveRecord {
    /// Verified by both sides and, with an image, equal to it.
    pub fn ok(&self) -> bool {
        self.verified && self.image_matches != Some(false)
    }
}

/// Peak RSS of each side.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PeakRss {
    /// Source.
    pub src: u64,
    /// Destination.
    pub dst: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Combine the two reports and the reference measured before the run.
pub fn record(
    a: &LiveChildArgs,
    s: &LiveSrcReport,
    d: &LiveDstReport,
    reference: Option<&crate::iperf::IperfResult>,
) -> LiveRecord {
    let m = &s.migration;
    let extra = s.peak_rss_bytes as i64 + d.peak_rss_bytes as i64 - 2 * a.size as i64;
    let total_s = m.total.as_secs_f64();
    let moving_s = m.total.saturating_sub(m.setup).as_secs_f64();
    let reference_bytes_per_s = reference.map(|r| r.bytes_per_s);
    LiveRecord {
        bench: "live".into(),
        run: 0,
        option: a.option.to_string(),
        encryption: a.encryption.to_string(),
        channels: if m.channels.is_empty() { a.channels } else { m.channels.len() },
        workload: a.workload.as_str().into(),
        image: a.image.as_ref().map(|p| p.display().to_string()),
        guest_bytes: a.size,
        nonzero_guest_bytes: s.nonzero_guest_bytes,
        migration: m.clone(),
        error: s.error.clone().or_else(|| d.error.clone()),
        verified: m.verified && d.verified,
        image_matches: d.image_matches,
        reference: if reference.is_some() { "iperf3".into() } else { "none".into() },
        reference_bytes_per_s,
        reference_args: reference.map(|r| r.args.clone()),
        total_vs_reference: reference_bytes_per_s
            .filter(|r| *r > 0.0 && total_s > 0.0)
            .map(|r| total_s / (s.nonzero_guest_bytes as f64 / r)),
        src_cpu_s: s.cpu_s,
        dst_cpu_s: d.cpu_s,
        peak_rss_bytes: PeakRss { src: s.peak_rss_bytes, dst: d.peak_rss_bytes },
        extra_memory_bytes: extra,
        scheduling: a.scheduling.clone(),
        dst_memory: a.dst_memory.as_str().into(),
        dst_reserve_fill_s: d.reserve_fill_s,
        dst_reserve_hit: d.reserve_hit,
        testbed: "loopback".into(),
        nics: 0,
        link_rates_bits_per_s: vec![],
        aggregate_reference_bytes_per_s: None,
        wire_throughput_bytes_per_s: if moving_s > 0.0 { m.transferred_bytes as f64 / moving_s } else { 0.0 },
        ratio_to_aggregate: None,
        flood_connections: 0,
        flood_opened: 0,
        flood_vs_quiet: None,
    }
}

/// Median total, ratio and downtime of each (workload, option, encryption, channels,
/// scheduling, memory, flood).
fn medians_table(records: &[LiveRecord]) -> crate::report::Table {
    use crate::report::median;
    let mut t = crate::report::Table::new(&[
        "workload",
        "option",
        "enc",
        "sched",
        "ch",
        "dst mem",
        "flood",
        "runs",
        "total ms",
        "vs iperf3",
        "downtime ms",
        "all verified",
    ]);
    let key = |r: &LiveRecord| {
        (
            r.workload.clone(),
            r.option.clone(),
            r.encryption.clone(),
            r.scheduling.clone(),
            r.channels,
            r.dst_memory.clone(),
            r.flood_connections,
        )
    };
    let mut keys = Vec::new();
    for r in records {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    for k in keys {
        let of: Vec<&LiveRecord> = records.iter().filter(|r| key(r) == k).collect();
        let med = |f: &dyn Fn(&LiveRecord) -> Option<f64>| median(of.iter().filter_map(|r| f(r)).collect());
        t.row(vec![
            k.0.clone(),
            k.1.clone(),
            k.2.clone(),
            k.3.clone(),
            k.4.to_string(),
            k.5.clone(),
            k.6.to_string(),
            of.len().to_string(),
            med(&|r| Some(ms(r.migration.total))).map_or("-".into(), |v| format!("{v:.0}")),
            med(&|r| r.total_vs_reference).map_or("-".into(), |v| format!("{v:.2}x")),
            med(&|r| Some(ms(r.migration.downtime))).map_or("-".into(), |v| format!("{v:.1}")),
            if of.iter().all(|r| r.ok()) { "yes".into() } else { "NO".into() },
        ]);
    }
    t
}

/// What protection costs: each run's total time over the run with encryption `off` of the same
/// repetition, workload, option, channels, scheduling and flood (measured in the same command),
/// with both sides' CPU seconds. `None` when no run pairs with an `off` one.
pub fn encryption_cost(records: &[LiveRecord]) -> Option<crate::report::Table> {
    let mut t = crate::report::Table::new(&[
        "workload",
        "option",
        "ch",
        "run",
        "enc",
        "total ms",
        "off ms",
        "enc / off",
        "src+dst cpu s",
        "off cpu s",
    ]);
    let mut any = false;
    for r in records.iter().filter(|r| r.encryption != "off") {
        let Some(off) = records.iter().find(|o| {
            o.encryption == "off"
                && (o.run, &o.workload, &o.option, o.channels, &o.scheduling, o.flood_connections)
                    == (r.run, &r.workload, &r.option, r.channels, &r.scheduling, r.flood_connections)
        }) else {
            continue;
        };
        any = true;
        let (a, b) = (ms(r.migration.total), ms(off.migration.total));
        t.row(vec![
            r.workload.clone(),
            r.option.clone(),
            r.channels.to_string(),
            r.run.to_string(),
            r.encryption.clone(),
            format!("{a:.0}"),
            format!("{b:.0}"),
            if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() },
            format!("{:.2}", r.src_cpu_s + r.dst_cpu_s),
            format!("{:.2}", off.src_cpu_s + off.dst_cpu_s),
        ]);
    }
    any.then_some(t)
}

/// The table of a live run.
pub fn table(records: &[LiveRecord]) -> String {
    let mut t = crate::report::Table::new(&[
        "workload",
        "option",
        "enc",
        "sched",
        "ch",
        "dst mem",
        "total ms",
        "vs iperf3",
        "vs links",
        "downtime ms",
        "rounds",
        "GB wire",
        "Gbit/s guest",
        "src cpu",
        "dst cpu",
        "extra MiB",
        "verified",
    ]);
    for r in records {
        t.row(vec![
            r.workload.clone(),
            r.option.clone(),
            r.encryption.clone(),
            r.scheduling.clone(),
            r.channels.to_string(),
            match r.dst_reserve_hit {
                Some(false) => format!("{} (missed)", r.dst_memory),
                _ => r.dst_memory.clone(),
            },
            format!("{:.0}", ms(r.migration.total)),
            r.total_vs_reference.map_or("-".into(), |v| format!("{v:.2}x")),
            r.ratio_to_aggregate.map_or("-".into(), |v| format!("{v:.2}")),
            format!("{:.1}", ms(r.migration.downtime)),
            r.migration.rounds.to_string(),
            format!("{:.2}", r.migration.transferred_bytes as f64 / 1e9),
            format!("{:.2}", r.migration.throughput_bytes_per_s * 8.0 / 1e9),
            format!("{:.2}", r.src_cpu_s),
            format!("{:.2}", r.dst_cpu_s),
            format!("{:.0}", r.extra_memory_bytes as f64 / (1 << 20) as f64),
            match (r.verified, r.image_matches) {
                (true, Some(false)) => "NO (differs from the image)".into(),
                (true, _) => "yes".into(),
                (false, _) => format!("NO ({})", r.error.clone().unwrap_or_default()),
            },
        ]);
    }
    let mut out = t.render();
    let mut lt = crate::report::Table::new(&[
        "workload", "option", "enc", "ch", "channel", "batches", "MB wire", "p50 us", "p90 us", "p99 us", "max us",
    ]);
    for r in records {
        for c in &r.migration.channels {
            lt.row(vec![
                r.workload.clone(),
                r.option.clone(),
                r.encryption.clone(),
                r.channels.to_string(),
                c.index.to_string(),
                c.batches.to_string(),
                format!("{:.1}", c.wire_bytes as f64 / 1e6),
                c.latency_us[0].to_string(),
                c.latency_us[1].to_string(),
                c.latency_us[2].to_string(),
                c.latency_us[3].to_string(),
            ]);
        }
    }
    if records.iter().any(|r| r.run > 0) {
        out.push_str("\nmedians over the repetitions:\n");
        out.push_str(&medians_table(records).render());
    }
    if let Some(c) = encryption_cost(records) {
        out.push_str("\nwhat protection costs (total time over the same run with encryption off, same command):\n");
        out.push_str(&c.render());
    }
    out.push_str("\nbatch latency per channel (send to ack):\n");
    out.push_str(&lt.render());
    for r in records.iter().filter(|r| !r.migration.events.is_empty()) {
        out.push_str(&format!(
            "\nevents ({} {} {} {} {}):\n",
            r.workload, r.option, r.encryption, r.scheduling, r.channels
        ));
        for e in &r.migration.events {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migrate::vm::{TargetFactory, VmShape};

    #[test]
    fn an_image_check_sees_one_differing_byte() {
        let f = SyntheticFactory::new(1 << 20, false);
        let shape = VmShape { vm_id: "img".into(), regions: vec![(0, 8 * PAGE_SIZE as u64)] };
        let any: Box<dyn std::any::Any> = f.create(&shape).unwrap().into_any();
        let vm = any.downcast::<SyntheticTarget>().unwrap();
        // Fresh memory is zero: an all-zero image (even a short one) matches, any other does not.
        assert!(same_as_image(&vm, &[0u8; 5 * PAGE_SIZE + 7][..]).unwrap());
        let mut img = vec![0u8; 8 * PAGE_SIZE];
        img[6 * PAGE_SIZE + 100] = 1;
        assert!(!same_as_image(&vm, &img[..]).unwrap());
    }
}
