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
