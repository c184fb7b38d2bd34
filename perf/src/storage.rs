//! `migration-bench storage`: storage live migration of a synthetic guest's disks, compared with
//! a reference measured in the same run.
//!
//! Kind `local` (storage live migration on one host): N disk images of `--disk-size`, each with
//! `--allocated` percent of its 1 MiB groups allocated (the rest holes; one block in 16 of the
//! allocated ones written zeros), are moved from one directory to another while the guest runs,
//! idle or writing `--disk-rate` over `--working-set` of each disk. The reference is
//! `cp --sparse=always` of the same files into a third directory followed by `sync --data` of each
//! copy (the move makes its copies durable before it removes the originals, so the reference
//! does too); `cp_ms` is the copy alone. Every disk is then checked sector by sector against
//! what the guest wrote (`verified`), and the copy must be no more allocated than the original
//! (`sparse`). The source images are written and synced before anything is timed, so both the
//! move and `cp` read them from the page cache.
//!
//! Kind `shared-nothing` (another host: disks and memory on one migration session): on the
//! namespace testbed (`--links`, by default one 1 Gbit link, then 4 x 500 Mbit with
//! multichannel), the same disks and a guest of `--memory` move between two processes
//! (`migration-bench live-src`/`live-dst` with disks), idle and busy (disk writes at
//! `--disk-rate` and memory dirtied at `--dirty-rate`). The reference is iperf3 on every link of
//! the same testbed, one stream per link, summed: `reference_ms` is (allocated disk bytes +
//! non-zero memory bytes) at that rate. Each disk is compared byte for byte with the
//! destination's copy and checked sector by sector against what the guest wrote (`verified`).
//! As in `migration-bench live`, the destination takes guest memory from a reserve faulted in
//! before the migration is asked for.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use ferry_disk::{move_storage, CancelToken, MirrorMode, MoveOptions};
use ferry_migrate::vm::SourceVm;
use ferry_vmm_glue::guestdisk::{create_image, DiskSpec};
use ferry_vmm_glue::synthetic::{SyntheticConfig, SyntheticVm};
use serde::Serialize;

use crate::report::Table;
use crate::units::{format_size, parse_size};
use crate::{BenchError, Result};

/// Which kind of storage migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Same host, another directory.
    Local,
    /// Another host (the namespace testbed): disks and memory on one session.
    SharedNothing,
}

/// Guest activity during the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// No disk writes.
    Idle,
    /// The disk writer at `--disk-rate`.
    Busy,
    /// Idle, then busy.
    Both,
}

/// Mirror mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Background, write-blocking when passes stop converging.
    Auto,
    /// Background passes only.
    Background,
    /// Write-blocking from the first dirty pass.
    WriteBlocking,
}

/// Arguments of `migration-bench storage`.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Kind of move.
    #[arg(long, value_enum, default_value = "local")]
    pub kind: Kind,
    /// Size of each disk (any size; need not be a multiple of the 64 KiB block).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub disk_size: u64,
    /// Percent of each disk allocated (in 1 MiB groups; the rest are holes).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub allocated: u8,
    /// Disks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub disks: u32,
    /// Workload(s).
    #[arg(long, value_enum, default_value = "both")]
    pub workload: Workload,
    /// Disk write rate of the busy guest per second, over all disks (like 20MiB).
    #[arg(long, default_value = "20MiB", value_parser = parse_size)]
    pub disk_rate: u64,
    /// Bytes at the start of each disk the busy guest rewrites.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub working_set: u64,
    /// Guest memory (not moved by a local move; the guest runs with it).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub memory: u64,
    /// Directory for the images, the copies and the reference copies (a real file system, not
    /// tmpfs: the bench measures disk moves). Default: the system temp directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Mirror mode.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// Do not fdatasync the copies (and the reference does not sync either).
    #[arg(long)]
    pub no_sync: bool,
    /// Run every move this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// One JSON object per move instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Shared-nothing: the testbeds, each `NxRATE` (NICs x rate per NIC), comma separated.
    #[arg(long, default_value = "1x1gbit,4x500mbit")]
    pub links: String,
    /// Shared-nothing: memory dirty rate of the busy guest per second.
    #[arg(long, default_value = "100MiB", value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Shared-nothing: memory working set of the busy guest.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub memory_working_set: u64,
    /// Shared-nothing: downtime limit, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub downtime_ms: u64,
    /// Shared-nothing: seconds of each iperf3 reference.
    #[arg(long, default_value_t = 5)]
    pub reference_seconds: u32,
    /// Shared-nothing: give up on a migration after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// One disk of a move, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRecord {
    /// Disk name.
    pub name: String,
    /// Size.
    pub disk_bytes: u64,
    /// Bytes the original occupied when the move started.
    pub allocated_bytes: u64,
    /// Bytes the original occupied at the switch (the busy guest fills holes).
    pub final_allocated_bytes: u64,
    /// Bytes the copy occupies at the switch.
    pub new_allocated_bytes: u64,
    /// Bytes the copier wrote.
    pub written_bytes: u64,
    /// Zero bytes left as holes.
    pub zero_bytes: u64,
    /// Sectors that differ from what the guest wrote (0 when verified).
    pub bad_sectors: u64,
    /// Every sector as the guest wrote it.
    pub verified: bool,
    /// The copy occupies no more than the original at the switch.
    pub sparse: bool,
    /// The original was removed after the switch.
    pub source_removed: bool,
}

/// One move, as reported (`--json` prints one per line).
#[derive(Debug, Clone, Serialize)]
pub struct StorageRecord {
    /// `"storage"`.
    pub bench: String,
    /// `"local"`.
    pub kind: String,
    /// Repetition.
    pub run: u32,
    /// `idle` or `busy`.
    pub workload: String,
    /// Disk write rate of the guest (0 idle).
    pub disk_write_rate_bytes_per_s: u64,
    /// Disks.
    pub disk_count: u32,
    /// Sum of the disk sizes.
    pub disk_bytes: u64,
    /// Sum of the bytes the originals occupied.
    pub allocated_bytes: u64,
    /// Guest memory.
    pub guest_bytes: u64,
    /// Start to resume.
    pub total_ms: f64,
    /// The guest's pause.
    pub downtime_ms: f64,
    /// Dirty passes before the pause.
    pub passes: u32,
    /// Write-blocking mode was used.
    pub write_blocking: bool,
    /// Bytes copied in the pause.
    pub paused_bytes: u64,
    /// Bytes the guest wrote during the move.
    pub guest_written_bytes: u64,
    /// `"cp"`.
    pub reference: String,
    /// What the reference ran.
    pub reference_args: String,
    /// `cp --sparse=always` of every disk, plus `sync --data` of each copy unless `--no-sync`.
    pub reference_ms: f64,
    /// `cp` alone.
    pub cp_ms: f64,
    /// `total_ms / reference_ms`.
    pub total_vs_reference: f64,
    /// `total_ms / cp_ms`.
    pub total_vs_cp: f64,
    /// Per disk.
    pub disks: Vec<DiskRecord>,
    /// Every disk verified, sparse, and the guest never saw a write error.
    pub verified: bool,
    /// Error of the move, if it failed.
    pub error: Option<String>,
}

/// A work directory removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| BenchError::io(format!("creating {}", p.display()), e))
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| BenchError::io(what, e))?;
    if !out.status.success() {
        return Err(BenchError::Command {
            what: what.into(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Run the bench; returns the records (and whether all verified).
pub fn run(a: &StorageArgs) -> Result<Vec<StorageRecord>> {
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = WorkDir(base.join(format!("ferry-storage-bench-{}", std::process::id())));
    let workloads: &[&str] = match a.workload {
        Workload::Idle => &["idle"],
        Workload::Busy => &["busy"],
        Workload::Both => &["idle", "busy"],
    };
    let mut records = Vec::new();
    for run in 0..a.repeat {
        for &wl in workloads {
            let dir = work.0.join(format!("{wl}-{run}"));
            let (src, dst, refd) = (dir.join("src"), dir.join("dst"), dir.join("ref"));
            for d in [&src, &dst, &refd] {
                mkdir(d)?;
            }
            let specs: Vec<DiskSpec> = (0..a.disks)
                .map(|i| DiskSpec {
                    path: src.join(format!("disk{i}.img")),
                    size_bytes: a.disk_size,
                    allocated_pct: a.allocated,
                    seed: u64::from(i) + 1 + u64::from(run) * 100,
                })
                .collect();
            for s in &specs {
                create_image(s).map_err(|e| BenchError::io(format!("creating {}", s.path.display()), e))?;
                let f = std::fs::File::open(&s.path).map_err(|e| BenchError::io("opening an image", e))?;
                f.sync_all().map_err(|e| BenchError::io("syncing an image", e))?;
            }
            // The reference: cp --sparse=always (and sync --data) of the same files.
            let t = Instant::now();
            for s in &specs {
                run_cmd(Command::new("cp").arg("--sparse=always").arg(&s.path).arg(&refd), "cp --sparse=always")?;
            }
            let cp = t.elapsed();
            if !a.no_sync {
                let mut c = Command::new("sync");
                c.arg("--data");
                for s in &specs {
                    c.arg(refd.join(s.path.file_name().unwrap_or_default()));
                }
                run_cmd(&mut c, "sync --data")?;
            }
            let reference = t.elapsed();
            let _ = std::fs::remove_dir_all(&refd);
            let busy = wl == "busy";
            let cfg = SyntheticConfig {
                vm_id: format!("storage-bench-{wl}-{run}"),
                memory_bytes: a.memory,
                disks: specs.clone(),
                disk_working_set_bytes: if busy { a.working_set } else { 0 },
                disk_write_rate_bytes_per_s: a.disk_rate,
                ..Default::default()
            };
            let mut vm = SyntheticVm::new(&cfg).map_err(|e| BenchError::Usage(format!("building the guest: {e}")))?;
            vm.resume().map_err(|e| BenchError::Usage(format!("starting the guest: {e}")))?;
            if busy {
                std::thread::sleep(Duration::from_millis(500));
            }
            let disks = vm.disks().to_vec();
            let opts = MoveOptions {
                sync: !a.no_sync,
                mode: match a.mode {
                    ModeArg::Auto => MirrorMode::Auto,
                    ModeArg::Background => MirrorMode::Background,
                    ModeArg::WriteBlocking => MirrorMode::WriteBlocking,
                },
                ..Default::default()
            };
            let written0 = vm.disk_writes().1;
            let r = move_storage(&disks, &dst, &mut vm, &opts, &CancelToken::new(), &mut |_| {});
            let guest_written_bytes = vm.disk_writes().1 - written0;
            vm.pause().map_err(|e| BenchError::Usage(format!("pausing the guest: {e}")))?;
            let bad = vm.check_disks().map_err(|e| BenchError::Usage(format!("checking the disks: {e}")))?;
            let write_errors = vm.disk_write_errors();
            let (st, error) = match r {
                Ok(st) => (Some(st), None),
                Err(e) => (None, Some(e.to_string())),
            };
            let mut drecs = Vec::new();
            for (i, d) in disks.iter().enumerate() {
                let s = st.as_ref().and_then(|st| st.disks.get(i));
                let alloc = s.map_or(0, |s| s.allocated_bytes);
                let new_alloc = s.map_or(0, |s| s.new_allocated_bytes);
                drecs.push(DiskRecord {
                    name: d.name().to_string(),
                    disk_bytes: d.size_bytes(),
                    allocated_bytes: alloc,
                    final_allocated_bytes: s.map_or(0, |s| s.final_allocated_bytes),
                    new_allocated_bytes: new_alloc,
                    written_bytes: s.map_or(0, |s| s.written_bytes),
                    zero_bytes: s.map_or(0, |s| s.zero_bytes),
                    bad_sectors: bad[i],
                    verified: bad[i] == 0 && s.is_some(),
                    sparse: s.is_some_and(|s| new_alloc <= s.final_allocated_bytes),
                    source_removed: s.is_some_and(|s| s.source_removed),
                });
            }
            drop(vm);
            let total_ms = st.as_ref().map_or(0.0, |s| ms(s.total));
            let rec = StorageRecord {
                bench: "storage".into(),
                kind: "local".into(),
                run,
                workload: wl.into(),
                disk_write_rate_bytes_per_s: if busy { a.disk_rate } else { 0 },
                disk_count: a.disks,
                disk_bytes: drecs.iter().map(|d| d.disk_bytes).sum(),
                allocated_bytes: drecs.iter().map(|d| d.allocated_bytes).sum(),
                guest_bytes: a.memory,
                total_ms,
                downtime_ms: st.as_ref().map_or(0.0, |s| ms(s.downtime)),
                passes: st.as_ref().map_or(0, |s| s.passes),
                write_blocking: st.as_ref().is_some_and(|s| s.write_blocking),
                paused_bytes: st.as_ref().map_or(0, |s| s.paused_bytes),
                guest_written_bytes,
                reference: "cp".into(),
                reference_args: if a.no_sync {
                    "cp --sparse=always SRC DIR".into()
                } else {
                    "cp --sparse=always SRC DIR; sync --data COPY".into()
                },
                reference_ms: ms(reference),
                cp_ms: ms(cp),
                total_vs_reference: total_ms / ms(reference).max(1e-3),
                total_vs_cp: total_ms / ms(cp).max(1e-3),
                verified: error.is_none() && write_errors == 0 && drecs.iter().all(|d| d.verified && d.sparse),
                disks: drecs,
                error,
            };
            let _ = std::fs::remove_dir_all(&dir);
            if a.json {
                crate::report::emit(&serde_json::to_string(&rec).unwrap_or_default());
            }
            records.push(rec);
        }
    }
    Ok(records)
}

/// The table of storage moves.
pub fn table(records: &[StorageRecord]) -> String {
    let mut t = Table::new(&[
        "kind",
        "workload",
        "disks",
        "allocated",
        "total ms",
        "reference",
        "ref ms",
        "x ref",
        "cp ms",
        "x cp",
        "downtime ms",
        "passes",
        "write-blocking",
        "verified",
    ]);
    for r in records {
        t.row(vec![
            r.kind.clone(),
            if r.workload == "busy" {
                format!("busy {}/s", format_size(r.disk_write_rate_bytes_per_s))
            } else {
                r.workload.clone()
            },
            format!("{} x {}", r.disk_count, format_size(r.disk_bytes / u64::from(r.disk_count.max(1)))),
            format_size(r.allocated_bytes),
            format!("{:.0}", r.total_ms),
            r.reference.clone(),
            format!("{:.0}", r.reference_ms),
            format!("{:.2}", r.total_vs_reference),
            format!("{:.0}", r.cp_ms),
            format!("{:.2}", r.total_vs_cp),
            format!("{:.1}", r.downtime_ms),
            r.passes.to_string(),
            if r.write_blocking { "yes".into() } else { "no".into() },
            if r.verified { "yes".into() } else { r.error.clone().unwrap_or_else(|| "NO".into()) },
        ]);
    }
    let mut out = t.render();
    if let Some(r) = records.first() {
        out.push_str(&format!("reference: {}\n", r.reference_args));
    }
    out
}

/// One disk of a shared-nothing move.
#[derive(Debug, Clone, Serialize)]
pub struct SnDiskRecord {
    /// Disk name.
    pub name: String,
    /// Size.
    pub disk_bytes: u64,
    /// Bytes the source occupied when the move started.
    pub allocated_bytes: u64,
    /// Bytes the destination's copy occupies.
    pub dst_allocated_bytes: u64,
    /// Blocks sent with data, and as zeros (holes at the destination).
    pub data_blocks: u64,
    /// Blocks sent as zeros.
    pub zero_blocks: u64,
    /// The destination verified its keyed digest, its copy is byte-identical to the source's,
    /// and every sector is what the guest wrote.
    pub verified: bool,
    /// The source's file was removed after the commit.
    pub source_removed: bool,
}

/// One shared-nothing move (`--json` prints one per line).
#[derive(Debug, Clone, Serialize)]
pub struct SnRecord {
    /// `"storage"`.
    pub bench: String,
    /// `"shared-nothing"`.
    pub kind: String,
    /// Repetition.
    pub run: u32,
    /// `idle` or `busy`.
    pub workload: String,
    /// The testbed: NICs x rate.
    pub links: String,
    /// Channels the session opened.
    pub channels: usize,
    /// Disk write rate of the guest (0 idle).
    pub disk_write_rate_bytes_per_s: u64,
    /// Memory dirty rate of the guest (0 idle).
    pub dirty_rate_bytes_per_s: u64,
    /// Sum of the disk sizes.
    pub disk_bytes: u64,
    /// Sum of the bytes the source disks occupied.
    pub allocated_bytes: u64,
    /// Guest memory.
    pub guest_bytes: u64,
    /// Non-zero guest memory.
    pub nonzero_guest_bytes: u64,
    /// Start to the destination running the VM.
    pub total_ms: f64,
    /// The guest's pause.
    pub downtime_ms: f64,
    /// Rounds of memory pre-copy.
    pub rounds: u32,
    /// `"iperf3"`.
    pub reference: String,
    /// iperf3, one stream per link, summed: TCP payload bytes per second.
    pub reference_bytes_per_s: f64,
    /// (allocated + non-zero memory bytes) at the reference rate.
    pub reference_ms: f64,
    /// `total_ms / reference_ms`.
    pub total_vs_reference: f64,
    /// Per disk.
    pub disks: Vec<SnDiskRecord>,
    /// Memory and every disk verified.
    pub verified: bool,
    /// Error of the move, if it failed.
    pub error: Option<String>,
}

fn parse_links(s: &str) -> Result<Vec<(u32, String)>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, rate) = p
                .split_once('x')
                .ok_or_else(|| BenchError::Usage(format!("--links {p:?}: want NxRATE, like 4x500mbit")))?;
            let n: u32 = n.parse().map_err(|_| BenchError::Usage(format!("--links {p:?}: NICs must be a number")))?;
            if !(1..=8).contains(&n) {
                return Err(BenchError::Usage(format!("--links {p:?}: 1 to 8 NICs")));
            }
            Ok((n, rate.to_string()))
        })
        .collect()
}

/// Run the shared-nothing bench.
pub fn run_shared_nothing(a: &StorageArgs) -> Result<Vec<SnRecord>> {
    use crate::live::{self, DiskChildArgs, DstMemory, LiveChildArgs, Place, Workload as LiveWorkload};
    use crate::testbed::{self, Side, Testbed};
    use std::net::IpAddr;
    let links = parse_links(&a.links)?;
    testbed::check_permitted()
        .map_err(|why| BenchError::Usage(format!("shared-nothing needs network namespaces: {why}")))?;
    crate::iperf::ensure_iperf3()?;
    testbed::install_interrupt_cleanup();
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding this program", e))?;
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = WorkDir(base.join(format!("ferry-sn-bench-{}", std::process::id())));
    let workloads: &[LiveWorkload] = match a.workload {
        Workload::Idle => &[LiveWorkload::Idle],
        Workload::Busy => &[LiveWorkload::Busy],
        Workload::Both => &[LiveWorkload::Idle, LiveWorkload::Busy],
    };
    const WRITE: usize = 256 * 4096;
    let mut records = Vec::new();
    for (nics, rate) in &links {
        let rates = vec![rate.clone(); *nics as usize];
        let tb = Testbed::up(&testbed::unique_name("fs"), &rates)?;
        for run in 0..a.repeat {
            for &wl in workloads {
                // The reference, in the same run: iperf3 on each link, one at a time, summed.
                let mut reference_bytes_per_s = 0.0;
                for nic in 0..tb.nics() {
                    let dst = IpAddr::V4(Testbed::addr(Side::Dst, nic));
                    let (d, s) = (tb.netns(Side::Dst), tb.netns(Side::Src));
                    let r =
                        crate::iperf::measure(Some(&d), Some(&s), dst, 5201 + nic as u16, a.reference_seconds, WRITE)?;
                    reference_bytes_per_s += r.bytes_per_s;
                }
                let dir = work.0.join(format!("{nics}x{rate}-{}-{run}", wl.as_str()));
                mkdir(&dir)?;
                let busy = wl == LiveWorkload::Busy;
                let args = LiveChildArgs {
                    size: a.memory,
                    mix: Default::default(),
                    image: None,
                    seed: 7 + u64::from(run),
                    workload: wl,
                    working_set: a.memory_working_set.min(a.memory),
                    dirty_rate: a.dirty_rate,
                    option: "tcp".parse().map_err(|e| BenchError::Usage(format!("{e}")))?,
                    encryption: Default::default(),
                    tls_dir: None,
                    channels: 1,
                    downtime_ms: a.downtime_ms,
                    verify_full: false,
                    dst_memory: DstMemory::Reserve,
                    zstd_level: 1,
                    batch_pages: 256,
                    multichannel: true,
                    scheduling: "adaptive".into(),
                    policy: None,
                    disks: DiskChildArgs {
                        disk_size: Some(a.disk_size),
                        disk_count: a.disks,
                        disk_allocated: a.allocated,
                        disk_rate: Some(a.disk_rate),
                        disk_working_set: Some(a.working_set.min(a.disk_size)),
                        disk_dir: Some(dir.clone()),
                    },
                };
                let label = format!("shared-nothing {} {nics}x{rate}", wl.as_str());
                let (s, d) = live::run(&exe, &args, Duration::from_secs(a.timeout), &label, Place::Testbed(&tb, &[]))?;
                let m = &s.migration;
                let allocated_bytes: u64 = m.disks.iter().map(|d| d.allocated_bytes).sum();
                let ideal_s = (allocated_bytes + s.nonzero_guest_bytes) as f64 / reference_bytes_per_s.max(1.0);
                let total_ms = ms(m.total);
                let disks: Vec<SnDiskRecord> = m
                    .disks
                    .iter()
                    .map(|ds| {
                        let c = s.disks.iter().find(|c| c.name == ds.name);
                        SnDiskRecord {
                            name: ds.name.clone(),
                            disk_bytes: ds.size_bytes,
                            allocated_bytes: ds.allocated_bytes,
                            dst_allocated_bytes: c.map_or(0, |c| c.dst_allocated_bytes),
                            data_blocks: ds.data_blocks,
                            zero_blocks: ds.zero_blocks,
                            verified: ds.verified && c.is_some_and(|c| c.identical),
                            source_removed: ds.source_removed,
                        }
                    })
                    .collect();
                let error = s.error.clone().or_else(|| d.error.clone());
                let rec = SnRecord {
                    bench: "storage".into(),
                    kind: "shared-nothing".into(),
                    run,
                    workload: wl.as_str().into(),
                    links: format!("{nics} x {rate}"),
                    channels: m.channels.len(),
                    disk_write_rate_bytes_per_s: if busy { a.disk_rate } else { 0 },
                    dirty_rate_bytes_per_s: if busy { a.dirty_rate } else { 0 },
                    disk_bytes: u64::from(a.disks) * a.disk_size,
                    allocated_bytes,
                    guest_bytes: a.memory,
                    nonzero_guest_bytes: s.nonzero_guest_bytes,
                    total_ms,
                    downtime_ms: ms(m.downtime),
                    rounds: m.rounds,
                    reference: "iperf3".into(),
                    reference_bytes_per_s,
                    reference_ms: ideal_s * 1e3,
                    total_vs_reference: total_ms / (ideal_s * 1e3).max(1e-3),
                    verified: error.is_none()
                        && m.verified
                        && d.verified
                        && disks.len() == a.disks as usize
                        && disks.iter().all(|d| d.verified),
                    disks,
                    error,
                };
                let _ = std::fs::remove_dir_all(&dir);
                if a.json {
                    crate::report::emit(&serde_json::to_string(&rec).unwrap_or_default());
                }
                records.push(rec);
            }
        }
        tb.down()?;
    }
    Ok(records)
}

/// The table of shared-nothing moves.
pub fn sn_table(records: &[SnRecord]) -> String {
    let mut t = Table::new(&[
        "links",
        "workload",
        "ch",
        "disks",
        "allocated",
        "memory (non-zero)",
        "total ms",
        "iperf3 MB/s",
        "ref ms",
        "x ref",
        "downtime ms",
        "rounds",
        "verified",
    ]);
    for r in records {
        t.row(vec![
            r.links.clone(),
            if r.workload == "busy" {
                format!(
                    "busy {}/s disk, {}/s mem",
                    format_size(r.disk_write_rate_bytes_per_s),
                    format_size(r.dirty_rate_bytes_per_s)
                )
            } else {
                r.workload.clone()
            },
            r.channels.to_string(),
            format!("{} x {}", r.disks.len(), format_size(r.disk_bytes / (r.disks.len().max(1) as u64))),
            format_size(r.allocated_bytes),
            format!("{} ({})", format_size(r.guest_bytes), format_size(r.nonzero_guest_bytes)),
            format!("{:.0}", r.total_ms),
            format!("{:.0}", r.reference_bytes_per_s / 1e6),
            format!("{:.0}", r.reference_ms),
            format!("{:.2}", r.total_vs_reference),
            format!("{:.1}", r.downtime_ms),
            r.rounds.to_string(),
            if r.verified { "yes".into() } else { r.error.clone().unwrap_or_else(|| "NO".into()) },
        ]);
    }
    let mut out = t.render();
    out.push_str("reference: iperf3 -c ADDR -l 1MiB, one stream per link of the testbed, summed; ref ms = (allocated disk + non-zero memory bytes) at that rate\n");
    out
}
