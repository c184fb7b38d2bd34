//! `migration-bench`: Ferry's benchmarks, as commands that print a table or JSON lines.
//!
//! ```text
//! migration-bench stream [--size 1GiB] [--mix zero=40,text=30,random=30] [--option tcp|zstd|all]
//!                        [--zstd-level 1] [--link-rate 1gbit] [--json]
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_perf::iperf::{self, IperfResult};
use ferry_perf::report::{emit, stream_table, StreamRecord};
use ferry_perf::stream::{self, ChildArgs, Placement, StreamConfig, TransportOption};
use ferry_perf::testbed::{self, Side, Testbed};
use ferry_perf::units::{format_size, parse_rate, parse_size, Rate};
use ferry_perf::{BenchError, Result};
use ferry_transport::pagemix::Mix;
use ferry_transport::wire::{MAX_BATCH_PAGES, PAGE_SIZE};

#[derive(Debug, Parser)]
#[command(
    name = "migration-bench",
    version,
    about = "Ferry's migration benchmarks (tables, or JSON lines with --json)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Stream a page set from a source process to a destination process over one channel and
    /// compare with a single-stream iperf3 between the same endpoints, measured in the same run.
    Stream(StreamArgs),
    /// (internal) The source process of `stream`.
    #[command(hide = true)]
    StreamSrc(ChildArgs),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OptionArg {
    /// One TCP stream, pages raw.
    Tcp,
    /// The same stream, zstd-compressed batches.
    Zstd,
    /// Both, one after the other.
    All,
}

fn parse_mix(s: &str) -> std::result::Result<Mix, String> {
    s.parse()
}

#[derive(Debug, clap::Args)]
struct StreamArgs {
    /// Guest memory to stream (B, KiB, MiB, GiB; a multiple of 4 KiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Page mixture in percent (kinds: zero, text, random; they add up to 100).
    #[arg(long, default_value = "zero=40,text=30,random=30", value_parser = parse_mix)]
    mix: Mix,
    /// Transport option(s) to measure.
    #[arg(long, value_enum, default_value = "all")]
    option: OptionArg,
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
    /// Skip the iperf3 reference (`reference_bps` and `ratio` are then null).
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
    let r = match place {
        Placement::Loopback => {
            let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
            iperf::measure(None, None, lo, iperf::free_port(lo)?, a.reference_seconds)?
        }
        Placement::Netns(tb) => {
            // A fresh namespace has every port free.
            let dst = IpAddr::V4(Testbed::addr(Side::Dst, 0));
            iperf::measure(Some(&tb.netns(Side::Dst)), Some(&tb.netns(Side::Src)), dst, 5201, a.reference_seconds)?
        }
    };
    Ok(Some(r))
}

fn stream_cmd(a: StreamArgs) -> Result<bool> {
    let options = match a.option {
        OptionArg::Tcp => vec![TransportOption::Tcp],
        OptionArg::Zstd => vec![TransportOption::Zstd],
        OptionArg::All => vec![TransportOption::Tcp, TransportOption::Zstd],
    };
    let base = StreamConfig {
        size: a.size,
        mix: a.mix,
        seed: a.seed,
        option: options[0],
        zstd_level: a.zstd_level,
        batch_pages: a.batch_pages,
        window: a.window,
    };
    base.validate()?;
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
        for &opt in &options {
            let cfg = StreamConfig { option: opt, ..base };
            let (s, d) = stream::run(&exe, &cfg, place, timeout)?;
            let throughput = if s.seconds > 0.0 { a.size as f64 / s.seconds } else { 0.0 };
            let reference_bps = reference.map(|r| r.bytes_per_s);
            let rec = StreamRecord {
                bench: "stream".into(),
                option: opt.as_str().into(),
                zstd_level: (opt == TransportOption::Zstd).then_some(a.zstd_level),
                mix: a.mix.to_string(),
                seed: a.seed,
                run,
                testbed: if tb.is_some() { "netns".into() } else { "loopback".into() },
                link_rate_bps: a.link_rate.map(Rate::bytes_per_s),
                bytes: d.pages * PAGE_SIZE as u64,
                wire_bytes: s.wire_bytes,
                seconds: s.seconds,
                throughput_bps: throughput,
                src_cpu_s: s.cpu_s,
                dst_cpu_s: d.cpu_s,
                src_peak_rss_bytes: s.peak_rss_bytes,
                dst_peak_rss_bytes: d.peak_rss_bytes,
                reference: if reference.is_some() { "iperf3".into() } else { "none".into() },
                reference_bps,
                ratio: reference_bps.filter(|r| *r > 0.0).map(|r| throughput / r),
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
                    "migration-bench: {}: the destination's image does not match: {} pages received of {}, {} pages differ (first: {:?})",
                    opt.as_str(),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (who, r) = match cli.cmd {
        Cmd::Stream(a) => ("migration-bench", stream_cmd(a)),
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
