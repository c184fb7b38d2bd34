//! `migration-bench`: Ferry's benchmarks, as commands that print a table or JSON lines.
//!
//! ```text
//! migration-bench                      (the default job: `live` with its defaults)
//! migration-bench live [--size 2GiB | --image FILE] [--workload idle|busy|both]
//!                      [--options tcp,zstd,tcp:2,tcp:4] [--working-set 256MiB] [--dirty-rate 100MiB]
//!                      [--downtime-ms 300] [--encryption aead,integrity,off] [--tls-dir DIR] [--flood 500] [--json]
//! migration-bench storage [--kind local] [--disk-size 4GiB] [--allocated 50] [--disks 1]
//!                         [--workload idle|busy|both] [--disk-rate 20MiB] [--dir DIR] [--json]
//! migration-bench stream [--size 1GiB] [--mix zero=40,text=30,random=30] [--option tcp,zstd]
//!                        [--zstd-level 1] [--encryption aead,off] [--tls-dir DIR] [--link-rate 1gbit] [--json]
//! migration-bench agent [--part single|many|both] [--size 2GiB] [--vms 8] [--vm-size 512MiB]
//!                       [--limits 1,2,4] [--channels 2] [--repeat 1] [--json]
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_perf::iperf::{self, IperfResult};
use ferry_perf::live::{self, DstMemory, LiveChildArgs};
use ferry_perf::report::{emit, stream_table, StreamRecord};
use ferry_perf::storage::{self, StorageArgs};
use ferry_perf::stream::{self, ChildArgs, Placement, StreamConfig};
use ferry_perf::testbed::{self, Side, Testbed};
use ferry_perf::units::{format_size, parse_rate, parse_size, Rate, MAX_SIZE};
use ferry_perf::{BenchError, Result};
use ferry_test_support::flood::{loopback_sources, IdleFlood};
use ferry_transport::option::TransportOption;
use ferry_transport::wire::{MAX_BATCH_PAGES, PAGE_SIZE};
use ferry_transport::Encryption;
use ferry_vmm_glue::pagemix::Mix;

#[derive(Debug, Parser)]
#[command(
    name = "migration-bench",
    version,
    about = "Ferry's migration benchmarks (tables, or JSON lines with --json)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Live-migrate a synthetic guest between two processes with each transport option, idle and
    /// busy, compared with an iperf3 single stream measured in the same run (the default job).
    Live(LiveArgs),
    /// (internal) The source process of `live`.
    #[command(hide = true)]
    LiveSrc(LiveChildArgs),
    /// (internal) The destination process of `live`.
    #[command(hide = true)]
    LiveDst {
        #[command(flatten)]
        args: LiveChildArgs,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Moves through two host agents (`ferryd` on loopback): one idle guest beside the library
    /// path (`live`) in the same run, and N VMs at once under each `max_live_migrations`.
    Agent(AgentArgs),
    /// Stream a page set from a source process to a destination process over one channel and
    /// compare with a single-stream iperf3 between the same endpoints, measured in the same run.
    Stream(StreamArgs),
    /// (internal) The source process of `stream`.
    #[command(hide = true)]
    StreamSrc(ChildArgs),
    /// Storage live migration: a synthetic guest's disks moved while it runs (idle, then writing),
    /// compared with `cp --sparse=always` of the same files in the same run.
    Storage(StorageArgs),
    /// (internal) The destination process of `stream`.
    #[command(hide = true)]
    StreamDst {
        #[command(flatten)]
        args: ChildArgs,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(Debug, clap::Args)]
struct StreamArgs {
    /// Guest memory to stream (B, KiB, MiB, GiB; a multiple of 4 KiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Page mixture in percent (kinds: zero, text, random; they add up to 100).
    #[arg(long, default_value = "zero=40,text=30,random=30")]
    mix: Mix,
    /// Transport options to measure, one after the other (tcp, zstd, zstd-always, quic,
    /// quic-streams; comma-separated).
    #[arg(long, default_value = "tcp,zstd", value_delimiter = ',')]
    option: Vec<TransportOption>,
    /// Authenticate with host certificates instead of a key: `ca.pem`, `cert.pem` and `key.pem`
    /// in this directory, used by both ends (`ferry tls-certs` makes them).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Protection of the frames, one run per mode to compare (comma-separated): `aead` (the
    /// default), `integrity`, `off`. quic runs `aead` only (TLS 1.3).
    #[arg(long, default_value = "aead", value_delimiter = ',')]
    encryption: Vec<Encryption>,
    /// zstd compression level (negative levels are faster).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-131_072..=22))]
    zstd_level: i32,
    /// Run the two processes in two network namespaces joined by a veth limited to this rate
    /// with tc tbf (like 1gbit, 500mbit); default: both on loopback.
    #[arg(long, value_parser = parse_rate)]
    link_rate: Option<Rate>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Seed of the page contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pages per batch (1..=1024).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH_PAGES)))]
    batch_pages: u32,
    /// Most batches sent and not yet acknowledged.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    window: u32,
    /// Seconds of the iperf3 reference (whole seconds).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    reference_seconds: u32,
    /// Skip the iperf3 reference (`reference_bytes_per_s` and `ratio` are then null).
    #[arg(long)]
    no_reference: bool,
    /// Repeat the whole measurement (reference, then each option) this many times; the table
    /// adds the median of each option. On a shared machine the reference drifts: repeat.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Kill a run that takes longer than this many seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

/// Refuse sizes this machine cannot hold twice (source and destination each map the page set).
fn check_memory(size: u64) -> Result<()> {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let avail_kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    if let Some(kib) = avail_kib {
        let avail = kib * 1024;
        if size.saturating_mul(2) > avail / 10 * 9 {
            return Err(BenchError::Usage(format!(
                "--size {} needs twice that in memory (source and destination); {} is available",
                format_size(size),
                format_size(avail)
            )));
        }
    }
    Ok(())
}

fn reference(a: &StreamArgs, place: Placement<'_>) -> Result<Option<IperfResult>> {
    if a.no_reference {
        return Ok(None);
    }
    // iperf3 writes what Ferry writes at once: one batch.
    let write = a.batch_pages as usize * PAGE_SIZE;
    let r = match place {
        Placement::Loopback => iperf::measure_loopback(a.reference_seconds, write)?,
        Placement::Netns(tb) => {
            // A fresh namespace has every port free.
            let dst = IpAddr::V4(Testbed::addr(Side::Dst, 0));
            let (d, s) = (tb.netns(Side::Dst), tb.netns(Side::Src));
            iperf::measure(Some(&d), Some(&s), dst, 5201, a.reference_seconds, write)?
        }
    };
    Ok(Some(r))
}

fn storage_cmd(a: &StorageArgs) -> Result<bool> {
    if a.kind == storage::Kind::SharedNothing {
        let records = storage::run_shared_nothing(a)?;
        if !a.json {
            emit(storage::sn_table(&records).trim_end());
        }
        return Ok(records.iter().all(|r| r.verified));
    }
    let records = storage::run(a)?;
    if !a.json {
        emit(storage::table(&records).trim_end());
    }
    Ok(records.iter().all(|r| r.verified))
}

/// `--tls-dir` refused here, before any child starts, with the file and the reason.
fn check_tls_dir(dir: Option<&std::path::Path>) -> Result<()> {
    if let Some(d) = dir {
        ferry_transport::TlsCredentials::from_dir(d)
            .map_err(|e| BenchError::Usage(format!("--tls-dir {}: {e}", d.display())))?;
    }
    Ok(())
}

fn stream_cmd(a: StreamArgs) -> Result<bool> {
    let mut options: Vec<TransportOption> = Vec::new();
    for o in &a.option {
        if !options.contains(o) {
            options.push(*o);
        }
    }
    if options.is_empty() {
        return Err(BenchError::Usage("--option is empty".into()));
    }
    let encryptions = dedup(&a.encryption);
    if encryptions.is_empty() {
        return Err(BenchError::Usage("--encryption is empty".into()));
    }
    let base = StreamConfig {
        size: a.size,
        mix: a.mix,
        seed: a.seed,
        option: options[0],
        zstd_level: a.zstd_level,
        encryption: Encryption::Aead,
        tls_dir: a.tls_dir.clone(),
        batch_pages: a.batch_pages,
        window: a.window,
    };
    base.validate()?;
    check_tls_dir(a.tls_dir.as_deref())?;
    if let [e] = encryptions[..] {
        if let Some(o) = options.iter().find(|o| !live::encryption_applies(**o, e)) {
            return Err(BenchError::Usage(format!(
                "{o} is always encrypted (TLS 1.3): --encryption {e} applies to tcp, zstd and zstd-always"
            )));
        }
    }
    check_memory(a.size)?;
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    testbed::install_interrupt_cleanup();
    if !a.no_reference {
        iperf::ensure_iperf3()?;
    }
    let tb = match a.link_rate {
        Some(rate) => {
            testbed::check_permitted()
                .map_err(|why| BenchError::Usage(format!("--link-rate needs network namespaces: {why}")))?;
            Some(Testbed::up(&testbed::unique_name("fb"), &[rate])?)
        }
        None => None,
    };
    let place = tb.as_ref().map_or(Placement::Loopback, Placement::Netns);
    let timeout = Duration::from_secs(a.timeout);
    let mut records = Vec::new();
    for run in 0..a.repeat {
        // The reference right before the runs it is compared with: the machine is shared.
        let reference = reference(&a, place)?;
        for (opt, enc) in options.iter().flat_map(|o| encryptions.iter().map(move |e| (*o, *e))) {
            if !live::encryption_applies(opt, enc) {
                if run == 0 {
                    eprintln!("migration-bench: {opt} is always encrypted (TLS 1.3): --encryption {enc} skipped");
                }
                continue;
            }
            let cfg = StreamConfig { option: opt, encryption: enc, ..base.clone() };
            let (s, d) = stream::run(&exe, &cfg, place, timeout)?;
            let throughput = if s.seconds > 0.0 { a.size as f64 / s.seconds } else { 0.0 };
            let reference_bytes_per_s = reference.as_ref().map(|r| r.bytes_per_s);
            let rec = StreamRecord {
                bench: "stream".into(),
                option: opt.to_string(),
                zstd_level: opt.compresses().then_some(a.zstd_level),
                encryption: enc.to_string(),
                mix: a.mix.to_string(),
                seed: a.seed,
                run,
                testbed: if tb.is_some() { "netns".into() } else { "loopback".into() },
                link_rate_bits_per_s: a.link_rate.map(|r| r.bits_per_s),
                bytes: d.pages * PAGE_SIZE as u64,
                wire_bytes: s.wire_bytes,
                seconds: s.seconds,
                throughput_bytes_per_s: throughput,
                src_cpu_s: s.cpu_s,
                dst_cpu_s: d.cpu_s,
                src_peak_rss_bytes: s.peak_rss_bytes,
                dst_peak_rss_bytes: d.peak_rss_bytes,
                reference: if reference.is_some() { "iperf3".into() } else { "none".into() },
                reference_bytes_per_s,
                reference_args: reference.as_ref().map(|r| r.args.clone()),
                ratio: reference_bytes_per_s.filter(|r| *r > 0.0).map(|r| throughput / r),
                verified: d.verified,
                batches: s.batches,
                compressed_batches: s.compressed_batches,
                data_pages: s.data_pages,
                zero_pages: s.zero_pages,
                batch_pages: a.batch_pages,
                window: a.window,
            };
            if !d.verified {
                eprintln!(
                    "migration-bench: {} {}: the destination's image does not match: {} pages received of {}, {} pages differ (first: {:?})",
                    opt,
                    enc,
                    d.pages,
                    a.size / PAGE_SIZE as u64,
                    d.mismatched_pages,
                    d.first_mismatch
                );
            }
            if a.json {
                emit(&rec.to_json());
            }
            records.push(rec);
        }
    }
    if let Some(tb) = tb {
        tb.down()?;
    }
    if !a.json {
        emit(stream_table(&records).trim_end());
    }
    Ok(records.iter().all(|r| r.verified))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkloadArg {
    Idle,
    Busy,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AgentPart {
    Single,
    Many,
    Both,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Which part: `single` (one idle guest through the agents beside the library path), `many`
    /// (N VMs under each limit), or both.
    #[arg(long, value_enum, default_value = "both")]
    part: AgentPart,
    /// Guest memory of `single` (a multiple of 4 KiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// VMs of `many`.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    vms: u32,
    /// Memory of each VM of `many` (the agent's default working set and dirty rate).
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    vm_size: u64,
    /// `max_live_migrations` values of `many`, comma-separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=64))]
    limits: Vec<u32>,
    /// TCP channels of every move (and of the library path).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    channels: u16,
    /// Run everything this many times (`single` alternates library and agent).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Destination guest memory of both paths: `reserve` (the agents' `memory_reserve_bytes`,
    /// a standby VMM with the guest's memory faulted in before the move; the library's
    /// `--dst-memory reserve`) or `cold` (fresh memory: the receive path takes the page faults).
    #[arg(long, value_enum, default_value = "reserve")]
    dst_memory: DstMemory,
    /// One JSON object per run instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LiveArgs {
    /// Guest memory (a multiple of 4 KiB).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    size: u64,
    /// Page mixture in percent (kinds: zero, text, random).
    #[arg(long, default_value = "zero=40,text=30,random=30")]
    mix: Mix,
    /// Guest memory loaded from this raw image file (a memory dump) instead of the mixture; its
    /// size, rounded up to whole pages, is the guest's size (`--size` and `--mix` are then unused).
    #[arg(long, conflicts_with_all = ["size", "mix"])]
    image: Option<PathBuf>,
    /// Workload(s): idle guest, busy guest (a writer rewriting the working set), or both.
    #[arg(long, value_enum, default_value = "both")]
    workload: WorkloadArg,
    /// Working set of the busy guest.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    working_set: u64,
    /// Dirty rate of the busy guest per second (like 100MiB).
    #[arg(long, default_value = "100MiB", value_parser = parse_size)]
    dirty_rate: u64,
    /// Transport options with channel counts: `tcp`, `zstd`, `tcp:4` (4 channels), `quic:4` (4 QUIC
    /// connections), `quic-streams:4` (4 streams of one QUIC connection), comma-separated.
    #[arg(long, visible_alias = "option", default_value = "tcp,zstd,tcp:2,tcp:4")]
    options: String,
    /// Protection of every frame after the handshake, one run per mode to compare
    /// (comma-separated): `aead` (AES-256-GCM, the default), `integrity` (authenticated, not
    /// encrypted), `off` (trusted networks only). quic is always TLS-encrypted: it runs `aead`
    /// only. With `off` among them the table adds each mode's cost (time over `off`'s).
    #[arg(long, default_value = "aead", value_delimiter = ',')]
    encryption: Vec<Encryption>,
    /// Authenticate with host certificates instead of a key: `ca.pem`, `cert.pem` and `key.pem`
    /// in this directory, used by both ends (`ferry tls-certs` makes them).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Downtime limit in milliseconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    downtime_ms: u64,
    /// The destination re-reads all of guest memory for the final check (counted in downtime).
    #[arg(long)]
    verify_full: bool,
    /// Run every migration this many times (the table adds medians; on a shared machine the
    /// reference and the runs drift: repeat).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Destination guest memory: `reserve` (the agent's memory reserve, faulted in before the
    /// migration is asked for; fill time reported apart), `prefault` (mapped and faulted in at
    /// prepare, counted in setup) or `cold` (the receive path takes the page faults).
    #[arg(long, value_enum, default_value = "reserve")]
    dst_memory: DstMemory,
    /// zstd level.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-131_072..=22))]
    zstd_level: i32,
    /// Pages per batch (the unit a channel pulls, sends and has acknowledged).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch_pages: u32,
    /// Seed of the page contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per migration instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds of the iperf3 reference (on loopback measured right before each migration; on a
    /// testbed once per link).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=60))]
    reference_seconds: u32,
    /// Skip the iperf3 reference.
    #[arg(long)]
    no_reference: bool,
    /// Kill a migration that takes longer than this many seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    /// Run source and destination in two namespaces joined by K rate-limited NICs, and open the
    /// session with multichannel discovery: `nics=4,rate=500mbit` (or `rates=1gbit/500mbit/..`).
    #[arg(long)]
    testbed: Option<String>,
    /// Change a link during each migration: `2s:nic1:rate=100mbit` or `1.5s:nic2:down` (repeat).
    #[arg(long = "link-event", value_parser = parse_link_event)]
    link_events: Vec<live::LinkEvent>,
    /// Batch scheduling over channels: adaptive (by what each delivers), rr (round-robin), both.
    #[arg(long, default_value = "adaptive", value_parser = ["adaptive", "rr", "both"])]
    scheduling: String,
    /// Multichannel network policy (testbed only), like `198.18.1.0/24:1,198.18.2.0/24:2`.
    #[arg(long)]
    policy: Option<String>,
    /// Run every migration twice, quiet and then while this many idle connections (an attacker
    /// without a key, from 64 loopback addresses, reopening what the listener closes) are held
    /// against the destination's listener; the flooded run reports `flood_vs_quiet` (loopback
    /// only).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    flood: u64,
}

/// `v` without repeats, in order.
fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in v {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    out
}

fn parse_link_event(s: &str) -> std::result::Result<live::LinkEvent, String> {
    s.parse()
}

/// `nics=4,rate=500mbit` or `rates=1gbit/500mbit`.
fn parse_testbed(s: &str) -> Result<Vec<Rate>> {
    let mut nics: Option<usize> = None;
    let mut rates: Vec<Rate> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| BenchError::Usage(format!("--testbed part {part:?} is not key=value")))?;
        match k {
            "nics" => {
                nics = Some(v.parse().map_err(|_| BenchError::Usage(format!("--testbed nics={v} is not a number")))?)
            }
            "rate" => rates = vec![parse_rate(v).map_err(BenchError::Usage)?],
            "rates" => {
                rates =
                    v.split('/').map(parse_rate).collect::<std::result::Result<_, _>>().map_err(BenchError::Usage)?
            }
            other => return Err(BenchError::Usage(format!("unknown --testbed key {other:?} (nics, rate, rates)"))),
        }
    }
    let n = nics.unwrap_or(rates.len().max(1));
    if !(1..=8).contains(&n) {
        return Err(BenchError::Usage(format!("--testbed nics={n}: 1..=8")));
    }
    match rates.len() {
        0 => Err(BenchError::Usage("--testbed needs rate= or rates=".into())),
        1 => Ok(vec![rates[0]; n]),
        k if k == n => Ok(rates),
        k => Err(BenchError::Usage(format!("--testbed: {k} rates for {n} NICs"))),
    }
}

impl Default for LiveArgs {
    fn default() -> Self {
        // The embedded default job: the same as `migration-bench live` with no flags.
        match Cli::try_parse_from(["migration-bench", "live"]) {
            Ok(Cli { cmd: Some(Cmd::Live(a)) }) => a,
            _ => unreachable!("the default live arguments parse"),
        }
    }
}

fn parse_options(s: &str) -> Result<Vec<(TransportOption, usize)>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (o, n) = match part.split_once(':') {
            Some((o, n)) => {
                let n: usize = n.parse().map_err(|_| BenchError::Usage(format!("bad channel count in {part:?}")))?;
                (o, n)
            }
            None => (part, 1),
        };
        if !(1..=64).contains(&n) {
            return Err(BenchError::Usage(format!("channels must be 1..=64 in {part:?}")));
        }
        let o: TransportOption = o.parse().map_err(|e| BenchError::Usage(format!("--options: {e}")))?;
        v.push((o, n));
    }
    if v.is_empty() {
        return Err(BenchError::Usage("--options is empty".into()));
    }
    Ok(v)
}

/// The guest size of a raw image: its length rounded up to whole pages.
fn image_size(path: &std::path::Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| BenchError::Usage(format!("--image {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(BenchError::Usage(format!("--image {}: not a regular file", path.display())));
    }
    let size = meta.len().div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    if size == 0 || size > MAX_SIZE {
        return Err(BenchError::Usage(format!(
            "--image {}: {} bytes; a guest image has 1 byte to {}",
            path.display(),
            meta.len(),
            format_size(MAX_SIZE)
        )));
    }
    Ok(size)
}

fn live_cmd(mut a: LiveArgs) -> Result<bool> {
    let options = parse_options(&a.options)?;
    if let Some(p) = &a.image {
        // The children open it by this path, from wherever they run.
        let p = std::fs::canonicalize(p).map_err(|e| BenchError::Usage(format!("--image {}: {e}", p.display())))?;
        a.size = image_size(&p)?;
        a.image = Some(p);
    }
    if a.size == 0 || a.size % PAGE_SIZE as u64 != 0 {
        return Err(BenchError::Usage("--size must be a positive multiple of 4 KiB".into()));
    }
    if a.working_set > a.size {
        return Err(BenchError::Usage("--working-set is larger than the guest (--size or the --image file)".into()));
    }
    check_memory(a.size)?;
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    testbed::install_interrupt_cleanup();
    let mut rates: Vec<Rate> = Vec::new();
    let tb = match &a.testbed {
        Some(spec) => {
            rates = parse_testbed(spec)?;
            testbed::check_permitted()
                .map_err(|why| BenchError::Usage(format!("--testbed needs network namespaces: {why}")))?;
            Some(Testbed::up(&testbed::unique_name("fl"), &rates)?)
        }
        None => {
            if !a.link_events.is_empty() {
                return Err(BenchError::Usage("--link-event needs --testbed".into()));
            }
            None
        }
    };
    if let Some(tb) = &tb {
        if let Some(e) = a.link_events.iter().find(|e| e.nic >= tb.nics()) {
            return Err(BenchError::Usage(format!("--link-event {e}: the testbed has {} NICs", tb.nics())));
        }
    }
    // iperf3 writes what Ferry writes at once: one batch.
    let write = a.batch_pages as usize * PAGE_SIZE;
    let mut refs: Vec<f64> = Vec::new();
    let (mut reference, aggregate): (Option<IperfResult>, Option<f64>) = if a.no_reference {
        (None, None)
    } else {
        iperf::ensure_iperf3()?;
        match &tb {
            // Measured before each migration (below).
            None => (None, None),
            Some(tb) => {
                // One iperf3 stream per link, one link at a time; their sum is the aggregate.
                let mut sum = 0.0;
                let mut first = None;
                for nic in 0..tb.nics() {
                    let dst = IpAddr::V4(Testbed::addr(Side::Dst, nic));
                    let (d, s) = (tb.netns(Side::Dst), tb.netns(Side::Src));
                    let r = iperf::measure(Some(&d), Some(&s), dst, 5201 + nic as u16, a.reference_seconds, write)?;
                    sum += r.bytes_per_s;
                    first.get_or_insert(r);
                }
                (first, Some(sum))
            }
        }
    };
    let place = match &tb {
        Some(tb) => live::Place::Testbed(tb, &a.link_events),
        None => live::Place::Loopback,
    };
    let schedulings: Vec<&str> = match a.scheduling.as_str() {
        "both" => vec!["adaptive", "rr"],
        s => vec![s],
    };
    let workloads = match a.workload {
        WorkloadArg::Idle => vec![live::Workload::Idle],
        WorkloadArg::Busy => vec![live::Workload::Busy],
        WorkloadArg::Both => vec![live::Workload::Idle, live::Workload::Busy],
    };
    check_tls_dir(a.tls_dir.as_deref())?;
    let encryptions = dedup(&a.encryption);
    if encryptions.is_empty() {
        return Err(BenchError::Usage("--encryption is empty".into()));
    }
    for (o, _) in &options {
        if let Some(e) = encryptions.iter().find(|e| !live::encryption_applies(*o, **e)) {
            if encryptions.len() == 1 {
                return Err(BenchError::Usage(format!(
                    "{o} is always encrypted (TLS 1.3): --encryption {e} applies to tcp, zstd and zstd-always"
                )));
            }
            eprintln!("migration-bench: {o} is always encrypted (TLS 1.3): it runs with aead only");
        }
    }
    let mut records = Vec::new();
    for run in 0..a.repeat {
        for &w in &workloads {
            for (o, n) in &options {
                for &sched in &schedulings {
                    for &enc in encryptions.iter().filter(|e| live::encryption_applies(*o, **e)) {
                        let args = LiveChildArgs {
                            size: a.size,
                            mix: a.mix,
                            image: a.image.clone(),
                            seed: a.seed,
                            workload: w,
                            working_set: a.working_set,
                            dirty_rate: a.dirty_rate,
                            option: *o,
                            encryption: enc,
                            tls_dir: a.tls_dir.clone(),
                            channels: *n,
                            downtime_ms: a.downtime_ms,
                            verify_full: a.verify_full,
                            dst_memory: a.dst_memory,
                            zstd_level: a.zstd_level,
                            batch_pages: a.batch_pages,
                            multichannel: tb.is_some(),
                            scheduling: sched.to_string(),
                            policy: a.policy.clone(),
                            disks: Default::default(),
                        };
                        if let Some(tb) = &tb {
                            // Every run starts from the configured rates with every link up.
                            for (nic, r) in rates.iter().enumerate() {
                                let nic = nic.to_string();
                                let _ = testbed::run_script(&["link-up", "--name", tb.name(), "--nic", &nic]);
                                testbed::run_script(&[
                                    "set-rate",
                                    "--name",
                                    tb.name(),
                                    "--nic",
                                    &nic,
                                    "--rate",
                                    &r.to_string(),
                                ])?;
                            }
                        }
                        // On loopback the reference is measured right before each migration: on a shared
                        // machine iperf3 itself drifts by 1.5x within a minute.
                        if tb.is_none() && !a.no_reference {
                            let r = iperf::measure_loopback(a.reference_seconds, write)?;
                            refs.push(r.bytes_per_s);
                            reference = Some(r);
                        }
                        let floods: &[usize] = if a.flood > 0 { &[0, a.flood as usize] } else { &[0] };
                        let mut quiet_ms = None;
                        for &flood in floods {
                            let label = format!(
                                "{} {}:{} {} {}{}",
                                w.as_str(),
                                o,
                                n,
                                enc,
                                sched,
                                if flood > 0 { " flood" } else { "" }
                            );
                            if flood > 0 && tb.is_some() {
                                return Err(BenchError::Usage("--flood runs on loopback only".into()));
                            }
                            let mut flooding = None;
                            let (s, d) = live::run_with(
                                &exe,
                                &args,
                                Duration::from_secs(a.timeout),
                                &label,
                                place,
                                &mut |to| {
                                    if flood > 0 {
                                        let f =
                                            IdleFlood::start(to, flood, loopback_sources(64), Duration::from_secs(1));
                                        // The legitimate source connects once the flood holds its connections.
                                        if !f.wait_opened(flood as u64, Duration::from_secs(60)) {
                                            eprintln!(
                                                "migration-bench: the flood opened fewer than {flood} connections"
                                            );
                                        }
                                        flooding = Some(f);
                                    }
                                    Ok(to)
                                },
                            )?;
                            let fs = flooding.map(IdleFlood::stop);
                            let mut rec = live::record(&args, &s, &d, reference.as_ref());
                            rec.run = run;
                            let total_ms = rec.migration.total.as_secs_f64() * 1e3;
                            if let Some(fs) = fs {
                                rec.flood_connections = fs.connections;
                                rec.flood_opened = fs.opened;
                                rec.flood_vs_quiet = quiet_ms.filter(|q: &f64| *q > 0.0).map(|q| total_ms / q);
                            } else {
                                quiet_ms = Some(total_ms);
                            }
                            if let Some(tb) = &tb {
                                rec.testbed = "netns".into();
                                rec.nics = tb.nics();
                                rec.link_rates_bits_per_s = rates.iter().map(|r| r.bits_per_s).collect();
                                rec.aggregate_reference_bytes_per_s = aggregate;
                                rec.ratio_to_aggregate =
                                    aggregate.filter(|x| *x > 0.0).map(|x| rec.wire_throughput_bytes_per_s / x);
                                rec.total_vs_reference = None;
                                for e in &a.link_events {
                                    rec.migration.events.push(format!("link event {e}"));
                                }
                            }
                            if a.json {
                                emit(&serde_json::to_string(&rec).map_err(|e| BenchError::Usage(e.to_string()))?);
                            }
                            records.push(rec);
                        }
                    }
                }
            }
        }
    }
    if let Some(tb) = tb {
        if !a.json {
            if let Some(g) = aggregate {
                emit(&format!(
                    "aggregate reference: iperf3 on each of {} links, summed: {:.2} Gbit/s ({})",
                    tb.nics(),
                    g * 8.0 / 1e9,
                    reference.as_ref().map_or(String::new(), |r| format!("iperf3 {}", r.args))
                ));
            }
        }
        tb.down()?;
    }
    if !a.json {
        if let (Some(lo), Some(hi)) = (refs.iter().copied().reduce(f64::min), refs.iter().copied().reduce(f64::max)) {
            emit(&format!(
                "reference: iperf3 single stream on loopback, {} s right before each migration: {:.2}-{:.2} Gbit/s ({})",
                a.reference_seconds,
                lo * 8.0 / 1e9,
                hi * 8.0 / 1e9,
                reference.as_ref().map_or(String::new(), |r| format!("iperf3 {}", r.args))
            ));
        }
        emit(live::table(&records).trim_end());
        if a.flood > 0 {
            let ratios: Vec<f64> = records.iter().filter_map(|r| r.flood_vs_quiet).collect();
            let opened: u64 = records.iter().map(|r| r.flood_opened).sum();
            emit(&format!(
                "flood: {} idle connections held during each flooded migration ({} opened in all); total time flooded / quiet, per pair: {} (median {})",
                a.flood,
                opened,
                ratios.iter().map(|x| format!("{x:.2}x")).collect::<Vec<_>>().join(" "),
                ferry_perf::report::median(ratios.clone()).map_or("-".into(), |m| format!("{m:.2}x"))
            ));
        }
    }
    Ok(records.iter().all(|r| r.ok()))
}

fn agent_cmd(a: AgentArgs) -> Result<bool> {
    use ferry_perf::agent;
    for (what, size) in [("--size", a.size), ("--vm-size", a.vm_size)] {
        if size < (2 << 20) || size % PAGE_SIZE as u64 != 0 {
            return Err(BenchError::Usage(format!("{what} must be a multiple of 4 KiB, at least 2 MiB")));
        }
    }
    if a.dst_memory == DstMemory::Prefault {
        return Err(BenchError::Usage("--dst-memory: the agent bench compares reserve or cold".into()));
    }
    let reserve = a.dst_memory == DstMemory::Reserve;
    let single = a.part != AgentPart::Many;
    let many = a.part != AgentPart::Single;
    if single {
        check_memory(a.size)?;
    }
    if many {
        check_memory(a.vm_size.saturating_mul(u64::from(a.vms)))?;
    }
    testbed::install_interrupt_cleanup();
    let bins = agent::find_or_build()?;
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    let mut ok = true;
    let mut singles = Vec::new();
    let mut manys = Vec::new();
    for run in 0..a.repeat {
        if single {
            let args = LiveChildArgs {
                size: a.size,
                mix: Mix::default(),
                image: None,
                seed: 1,
                workload: live::Workload::Idle,
                // Unused by an idle guest (the child's parser wants sizes above zero).
                working_set: PAGE_SIZE as u64,
                dirty_rate: PAGE_SIZE as u64,
                option: TransportOption::Tcp,
                // The agents' default.
                encryption: Encryption::Aead,
                tls_dir: None,
                channels: usize::from(a.channels),
                downtime_ms: 300,
                verify_full: false,
                // As the agents' destination: a reserve filled ahead, or cold memory.
                dst_memory: a.dst_memory,
                zstd_level: 1,
                batch_pages: 256,
                multichannel: false,
                scheduling: "adaptive".into(),
                policy: None,
                disks: Default::default(),
            };
            let (s, d) = live::run(&exe, &args, Duration::from_secs(1800), "library", live::Place::Loopback)?;
            if let Some(e) = s.error.as_ref().or(d.error.as_ref()) {
                return Err(BenchError::Child { role: "library path", detail: e.clone() });
            }
            let lib_ms = s.migration.total.as_secs_f64() * 1e3;
            let (ag_ms, eng_ms, ag_down, ag_verified) = agent::agent_single(&bins, a.size, a.channels, reserve)?;
            let r = agent::AgentSingleRecord {
                bench: "agent".into(),
                part: "single".into(),
                run,
                guest_bytes: a.size,
                channels: a.channels,
                dst_memory: a.dst_memory.as_str().into(),
                library_total_ms: lib_ms,
                library_downtime_ms: s.migration.downtime.as_secs_f64() * 1e3,
                agent_total_ms: ag_ms,
                agent_engine_total_ms: eng_ms,
                agent_downtime_ms: ag_down,
                overhead_ratio: ag_ms / lib_ms,
                engine_ratio: eng_ms / lib_ms,
                verified: d.verified && ag_verified,
            };
            ok &= r.verified;
            if a.json {
                emit(&serde_json::to_string(&r).unwrap_or_default());
            }
            singles.push(r);
        }
        if many {
            for &limit in &a.limits {
                let mut r = agent::agent_many(&bins, a.vms, a.vm_size, limit, a.channels, reserve)?;
                r.run = run;
                ok &= r.verified;
                if a.json {
                    emit(&serde_json::to_string(&r).unwrap_or_default());
                }
                manys.push(r);
            }
        }
    }
    if !a.json {
        if !singles.is_empty() {
            println!(
                "One idle synthetic guest, tcp:{}, destination memory {}: library path (engine total) vs. through two \
                 agents (POST move to running on B); overhead = agent / library (target <= 1.05x)",
                a.channels,
                a.dst_memory.as_str()
            );
            print!("{}", agent::single_table(&singles));
        }
        if !manys.is_empty() {
            if !singles.is_empty() {
                println!();
            }
            println!(
                "{} VMs of {} moved at once through two agents, tcp:{}, under max_live_migrations = limit \
                 (memory reserve: {})",
                a.vms,
                format_size(a.vm_size),
                a.channels,
                if reserve { "one VM" } else { "none" }
            );
            print!("{}", agent::many_table(&manys));
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = cli.cmd.unwrap_or_else(|| Cmd::Live(LiveArgs::default()));
    let (who, r) = match cmd {
        Cmd::Live(a) => ("migration-bench", live_cmd(a)),
        Cmd::LiveSrc(a) => ("migration-bench live-src", live::src_main(&a).map(|()| true)),
        Cmd::LiveDst { args, listen } => ("migration-bench live-dst", live::dst_main(&args, listen).map(|()| true)),
        Cmd::Stream(a) => ("migration-bench", stream_cmd(a)),
        Cmd::Storage(a) => ("migration-bench storage", storage_cmd(&a)),
        Cmd::Agent(a) => ("migration-bench agent", agent_cmd(a)),
        Cmd::StreamSrc(a) => ("migration-bench stream-src", stream::src_main(&a).map(|()| true)),
        Cmd::StreamDst { args, listen } => {
            ("migration-bench stream-dst", stream::dst_main(&args, listen).map(|()| true))
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{who}: verification failed");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("{who}: error: {e}");
            ExitCode::from(if matches!(e, BenchError::Usage(_)) { 2 } else { 1 })
        }
    }
}
