//! Storage live migration on one host: every disk of a running VM copied to another directory,
//! the VM switched to the copies in a pause of milliseconds, the old files removed after.
//!
//! ```text
//!  claim disks; refuse if DIR/NAME exists         (nothing written yet)
//!  create DIR/.NAME.ferry-partial (sparse), attach it as the mirror target, start the dirty log
//!  copy allocated extents (zero blocks skipped)   guest runs; its writes mark blocks dirty
//!  dirty passes until the dirty bytes <= switch   auto: write-blocking once passes stop shrinking
//!  fdatasync the copies once, then passes again   (writeback of every chunk is started as it is
//!                                                  written, so these syncs find little to do)
//!  PAUSE  copy the last dirty blocks, link DIR/NAME -> copy (never replacing)  <- commit point
//!         switch each disk to its copy; detach mirrors
//!  RESUME fdatasync the copies, fsync DIR, then remove the old files (unless retained; kept if
//!         the sync failed)
//! ```
//!
//! The syncs are out of the pause (a journal commit on a busy disk took 40-80 ms): a crash
//! between the resume and the removal finds the originals intact, at most the copies' last
//! blocks unsynced, as a guest write not yet flushed may be on any disk.
//!
//! Before the commit point any failure (I/O error, disk full, cancel, a pause that fails)
//! detaches the mirrors, removes the partial copies (and any final name already linked), resumes
//! the guest if it was paused and returns the error: the VM runs on its original files, which
//! the move never writes. The commit is the hard links of every disk: a disk whose link fails
//! unlinks the ones done before it.
//!
//! Convergence: in background mode a guest write only marks its block, and each pass copies the
//! blocks marked since the last one; a guest writing faster than the copy would never converge,
//! so [`MirrorMode::Auto`] switches to write-blocking mode (every guest write also written to
//! the copy before it completes, and no longer marked) after `max_background_passes` passes or
//! as soon as a pass leaves more dirty bytes than it started with. From then on the dirty set
//! only shrinks.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disk::Disk;
use crate::mirror::{copy_allocated, copy_dirty, CopyCounts};
use crate::sink::{BlockSink, FileSink};
use crate::{DiskError, BLOCK_BYTES};

/// Error of a VM operation (pause, resume) as the VMM reports it.
pub type VmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a move needs from the VM: stop its guest (no disk write in flight once `pause` returns)
/// and let it run again.
pub trait Quiesce {
    /// Pause the guest; no disk write happens until `resume`.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Let the guest run again.
    fn resume(&mut self) -> Result<(), VmError>;
}

/// A cancel flag shared between the move and whoever may cancel it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel: the move stops at its next check and undoes what it did (before its commit).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Cancelled?
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How guest writes are mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMode {
    /// Writes mark blocks; passes copy them (never blocks the guest; may not converge).
    Background,
    /// Writes go to both files from the start of the dirty passes.
    WriteBlocking,
    /// Background, then write-blocking when passes stop converging (the default).
    Auto,
}

/// Knobs of a move.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// Keep the old files after the switch (as Hyper-V's `-RetainVhdCopiesOnSource`).
    pub retain_source: bool,
    /// Mirror mode.
    pub mode: MirrorMode,
    /// Background passes before [`MirrorMode::Auto`] turns write-blocking.
    pub max_background_passes: u32,
    /// Pause when at most this many dirty bytes are left over all disks.
    pub switch_bytes: u64,
    /// Bytes read and written per copy step (a multiple of [`BLOCK_BYTES`]).
    pub chunk_bytes: u64,
    /// fdatasync the copies before the switch (the old files are removed after it).
    pub sync: bool,
}

impl Default for MoveOptions {
    fn default() -> Self {
        Self {
            retain_source: false,
            mode: MirrorMode::Auto,
            max_background_passes: 8,
            switch_bytes: 4 << 20,
            chunk_bytes: 1 << 20,
            sync: true,
        }
    }
}

/// Steps of a move, reported as they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Partial copies created, mirrors attached, logs started.
    Prepared,
    /// Copying allocated extents.
    Copy,
    /// A dirty pass (numbered from 1).
    DirtyPass(u32),
    /// Guest writes are now mirrored synchronously.
    WriteBlocking,
    /// The copies are being synced.
    Sync,
    /// The guest is paused for the switch.
    Paused,
    /// The VM runs on the new files (past the commit point).
    Committed,
}

/// Why a move failed. Before [`Phase::Committed`] the VM is on its original files.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// A disk operation failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Cancelled.
    #[error("storage move cancelled")]
    Cancelled,
    /// The VM could not be paused or resumed.
    #[error("VM: {0}")]
    Vm(String),
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// Background passes never converged (only in [`MirrorMode::Background`]).
    #[error("not converging after {passes} passes: {dirty_bytes} bytes still dirty")]
    NotConverging {
        /// Passes done.
        passes: u32,
        /// Dirty bytes left.
        dirty_bytes: u64,
    },
    /// The switch happened but the guest did not resume: it is paused on the new files.
    #[error("moved, but the VM did not resume: {0}")]
    ResumeAfterCommit(String),
}

/// One disk's part of a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMoveStats {
    /// Disk name.
    pub name: String,
    /// Old and new path.
    pub from: PathBuf,
    /// New path.
    pub to: PathBuf,
    /// Disk size.
    pub size_bytes: u64,
    /// Bytes the old file occupied when the move started.
    pub allocated_bytes: u64,
    /// Bytes the old file occupied at the switch (the guest may have filled holes meanwhile).
    pub final_allocated_bytes: u64,
    /// Bytes the new file occupies at the switch.
    pub new_allocated_bytes: u64,
    /// Bytes read from the old file and written to the new one (all passes).
    pub read_bytes: u64,
    /// Bytes written to the new file by the copier (mirrored guest writes not counted).
    pub written_bytes: u64,
    /// Zero bytes left as holes.
    pub zero_bytes: u64,
    /// The old file was removed.
    pub source_removed: bool,
}

/// What a move did.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveStats {
    /// Per disk.
    pub disks: Vec<DiskMoveStats>,
    /// Start to the copies synced after the resume (the removal of old files not included).
    pub total: Duration,
    /// The guest's pause.
    pub downtime: Duration,
    /// Dirty passes before the pause.
    pub passes: u32,
    /// Write-blocking mode was used.
    pub write_blocking: bool,
    /// Bytes copied in the pause.
    pub paused_bytes: u64,
    /// The copies could not be synced after the switch: the VM runs on them, the originals
    /// were kept.
    pub post_switch_error: Option<String>,
}

/// Move every disk of a running VM to `dir` (see the module doc). `progress` sees each phase as
/// it starts.
pub fn move_storage(
    disks: &[Arc<Disk>],
    dir: &Path,
    vm: &mut dyn Quiesce,
    opts: &MoveOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(Phase),
) -> Result<MoveStats, MoveError> {
    move_storage_with(disks, dir, vm, opts, cancel, progress, &|_, s| s)
}

/// [`move_storage`], with every copy's sink passed through `wrap` first (the seam tests use to
/// inject I/O errors).
#[allow(clippy::type_complexity)]
pub fn move_storage_with(
    disks: &[Arc<Disk>],
    dir: &Path,
    vm: &mut dyn Quiesce,
    opts: &MoveOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(Phase),
    wrap: &dyn Fn(&Disk, Box<dyn BlockSink>) -> Box<dyn BlockSink>,
) -> Result<MoveStats, MoveError> {
    let start = Instant::now();
    if opts.chunk_bytes == 0 || !opts.chunk_bytes.is_multiple_of(BLOCK_BYTES) {
        return Err(MoveError::Invalid(format!("chunk_bytes must be a non-zero multiple of {BLOCK_BYTES}")));
    }
    if !dir.is_dir() {
        return Err(MoveError::Invalid(format!("{} is not a directory", dir.display())));
    }
    let mut names = std::collections::HashSet::new();
    for d in disks {
        if !names.insert(d.name().to_string()) {
            return Err(MoveError::Invalid(format!("two disks are named {}", d.name())));
        }
        let to = dir.join(d.name());
        if to.exists() || std::fs::symlink_metadata(&to).is_ok() {
            return Err(MoveError::Invalid(format!("{} exists already", to.display())));
        }
    }
    // Claim every disk (one move at a time per disk); released however this ends.
    let mut claimed = Vec::new();
    let release = |c: &[Arc<Disk>]| c.iter().for_each(|d| d.release());
    for d in disks {
        if let Err(e) = d.claim() {
            release(&claimed);
            return Err(e.into());
        }
        claimed.push(d.clone());
    }
    let mut job = Job { disks, dir, sinks: Vec::new(), linked: Vec::new(), paused: false };
    let r = job.run(vm, opts, cancel, progress, wrap, start);
    if r.is_err() {
        job.undo(vm);
    }
    release(&claimed);
    r
}

struct Job<'a> {
    disks: &'a [Arc<Disk>],
    dir: &'a Path,
    sinks: Vec<FileSink>,
    linked: Vec<PathBuf>,
    paused: bool,
}

impl Job<'_> {
    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        vm: &mut dyn Quiesce,
        opts: &MoveOptions,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(Phase),
        wrap: &dyn Fn(&Disk, Box<dyn BlockSink>) -> Box<dyn BlockSink>,
        start: Instant,
    ) -> Result<MoveStats, MoveError> {
        let mut stats: Vec<DiskMoveStats> = Vec::new();
        for d in self.disks {
            let sink = FileSink::create(self.dir, d.name(), d.size_bytes())
                .map_err(|err| DiskError::Io { path: crate::sink::partial_path(self.dir, d.name()), err })?;
            d.attach_mirror(wrap(d, Box::new(sink.writer())));
            self.sinks.push(sink);
            d.dirty_log().start();
            stats.push(DiskMoveStats {
                name: d.name().to_string(),
                from: d.path(),
                to: self.dir.join(d.name()),
                size_bytes: d.size_bytes(),
                allocated_bytes: d.allocated_bytes()?,
                final_allocated_bytes: 0,
                new_allocated_bytes: 0,
                read_bytes: 0,
                written_bytes: 0,
                zero_bytes: 0,
                source_removed: false,
            });
        }
        progress(Phase::Prepared);
        let check = |_: &CopyCounts| -> Result<(), DiskError> {
            if cancel.is_cancelled() {
                return Err(DiskError::Cancelled);
            }
            Ok(())
        };
        let cancelled = |e: DiskError| match e {
            DiskError::Cancelled => MoveError::Cancelled,
            e => MoveError::Disk(e),
        };
        let mut buf = vec![0u8; opts.chunk_bytes as usize];
        progress(Phase::Copy);
        check(&CopyCounts::default()).map_err(cancelled)?;
        for (d, s) in self.disks.iter().zip(&mut stats) {
            let c = copy_allocated(d, &mut buf, opts.sync, &mut { check }).map_err(cancelled)?;
            add(s, c);
        }
        // Dirty passes until the rest fits in the pause.
        let dirty_bytes =
            |disks: &[Arc<Disk>]| disks.iter().map(|d| d.dirty_log().pending() * BLOCK_BYTES).sum::<u64>();
        let mut passes = 0u32;
        let mut write_blocking = false;
        let mut synced = false;
        loop {
            let before = dirty_bytes(self.disks);
            if before <= opts.switch_bytes {
                if !opts.sync || synced {
                    break;
                }
                // Once, the first time the rest fits: what the pause then syncs is only what
                // the passes wrote since (its writeback already started).
                progress(Phase::Sync);
                for (d, s) in self.disks.iter().zip(&mut self.sinks) {
                    let target = |err| DiskError::Target { disk: d.name().to_string(), err };
                    // The long sync without the mirror lock (write-blocking guest writes go on),
                    // then the sink's own under it (little left by then).
                    s.file().sync_data().map_err(target)?;
                    if let Some(t) = d.mirror_lock().as_mut() {
                        t.sink.sync().map_err(target)?;
                    }
                }
                synced = true;
                continue; // the sync took time: look again
            }
            if (opts.mode == MirrorMode::WriteBlocking && !write_blocking)
                || (opts.mode == MirrorMode::Auto && !write_blocking && passes >= opts.max_background_passes)
            {
                progress(Phase::WriteBlocking);
                self.disks.iter().for_each(|d| d.set_write_blocking());
                write_blocking = true;
            }
            if opts.mode == MirrorMode::Background && passes >= 1000 {
                return Err(MoveError::NotConverging { passes, dirty_bytes: before });
            }
            passes += 1;
            progress(Phase::DirtyPass(passes));
            check(&CopyCounts::default()).map_err(cancelled)?;
            for (d, s) in self.disks.iter().zip(&mut stats) {
                add(s, copy_dirty(d, &mut buf, opts.sync, &mut { check }).map_err(cancelled)?);
            }
            if opts.mode == MirrorMode::Auto && !write_blocking && dirty_bytes(self.disks) >= before {
                progress(Phase::WriteBlocking);
                self.disks.iter().for_each(|d| d.set_write_blocking());
                write_blocking = true;
            }
        }
        // The pause.
        progress(Phase::Paused);
        let pause_start = Instant::now();
        vm.pause().map_err(|e| MoveError::Vm(e.to_string()))?;
        self.paused = true;
        let mut paused_bytes = 0;
        for (d, s) in self.disks.iter().zip(&mut stats) {
            let c = copy_dirty(d, &mut buf, opts.sync, &mut { check }).map_err(cancelled)?;
            paused_bytes += c.read_bytes;
            add(s, c);
        }
        for d in self.disks {
            if let Some(t) = d.mirror_lock().as_mut() {
                if let Some(e) = t.failed.take() {
                    return Err(DiskError::Target { disk: d.name().to_string(), err: e }.into());
                }
            }
        }
        check(&CopyCounts::default()).map_err(cancelled)?;
        // Commit: every copy gets its final name, or none does.
        for (d, s) in self.disks.iter().zip(&mut self.sinks) {
            let to = self.dir.join(d.name());
            s.commit(&to).map_err(|err| DiskError::Io { path: to.clone(), err })?;
            self.linked.push(to);
        }
        // Past the commit point: switch, detach, resume.
        let files: Vec<_> = self.sinks.iter().map(|s| s.file()).collect();
        for ((d, s), ds) in self.disks.iter().zip(&self.sinks).zip(&mut stats) {
            d.switch_to(s.file(), self.dir.join(d.name()));
            d.detach_mirror();
            d.dirty_log().stop();
            ds.new_allocated_bytes = d.allocated_bytes().unwrap_or(0);
        }
        self.linked.clear();
        self.sinks.clear();
        progress(Phase::Committed);
        self.paused = false;
        let resumed = vm.resume();
        let downtime = pause_start.elapsed();
        // The copies (the last blocks, the names) durable before the originals go: a crash
        // before this point still finds the originals.
        let mut post_switch_error = None;
        if opts.sync {
            for (f, s) in files.iter().zip(&stats) {
                if let Err(e) = f.sync_data() {
                    post_switch_error.get_or_insert(format!("syncing {}: {e}", s.to.display()));
                }
            }
            if let Err(e) = std::fs::File::open(self.dir).and_then(|d| d.sync_all()) {
                post_switch_error.get_or_insert(format!("syncing {}: {e}", self.dir.display()));
            }
        }
        let total = start.elapsed();
        for s in &mut stats {
            // The old file no longer changes: what it occupies at the switch.
            s.final_allocated_bytes = std::fs::metadata(&s.from).map_or(0, |m| m.blocks() * 512);
            if !opts.retain_source && post_switch_error.is_none() {
                s.source_removed = std::fs::remove_file(&s.from).is_ok();
            }
        }
        resumed.map_err(|e| MoveError::ResumeAfterCommit(e.to_string()))?;
        Ok(MoveStats { disks: stats, total, downtime, passes, write_blocking, paused_bytes, post_switch_error })
    }

    /// Undo everything before the commit point: the VM stays on its original files.
    fn undo(&mut self, vm: &mut dyn Quiesce) {
        for d in self.disks {
            d.detach_mirror();
            d.dirty_log().stop();
        }
        for p in self.linked.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        for s in self.sinks.drain(..) {
            let _ = s.discard();
        }
        if self.paused {
            self.paused = false;
            let _ = vm.resume();
        }
    }
}

fn add(s: &mut DiskMoveStats, c: CopyCounts) {
    s.read_bytes += c.read_bytes;
    s.written_bytes += c.written_bytes;
    s.zero_bytes += c.zero_bytes;
}
