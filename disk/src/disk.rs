//! [`Disk`]: one virtual disk of a VM, the door every guest read and write goes through.
//!
//! A guest write goes to the image file, then marks its blocks in the disk's dirty-block log (when
//! logging). While a mirror is attached in write-blocking mode, the write also goes to the
//! mirror's target before it returns, under the mirror lock that the copier holds while it copies
//! a chunk, so a copied block and a mirrored write never interleave. A mirror that fails never
//! fails the guest: its error is kept for the copier (who aborts the move) and the block is
//! marked.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::dirty::DirtyBlocks;
use crate::image;
use crate::sink::BlockSink;
use crate::{DiskError, BLOCK_BYTES};

/// The file a disk reads and writes now.
#[derive(Debug)]
pub(crate) struct Backing {
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
}

/// The target of a write-blocking mirror.
pub(crate) struct MirrorTarget {
    pub(crate) sink: Box<dyn BlockSink>,
    /// The first error of a mirrored guest write (the copier reports it).
    pub(crate) failed: Option<io::Error>,
}

/// One virtual disk: a raw sparse image file, its size, its dirty-block log.
pub struct Disk {
    name: String,
    size_bytes: u64,
    backing: RwLock<Backing>,
    log: DirtyBlocks,
    mirror: Mutex<Option<MirrorTarget>>,
    write_blocking: AtomicBool,
    /// A move (local or shared-nothing) owns the dirty log.
    busy: AtomicBool,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("name", &self.name).field("size_bytes", &self.size_bytes).finish_non_exhaustive()
    }
}

impl Disk {
    /// Open the image at `path` as a disk; its size is the file's size. The name (unique per
    /// VM) is the file name, which a move keeps.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let io = |err| DiskError::Io { path: path.to_path_buf(), err };
        let file = image::open_rw(path).map_err(io)?;
        let size_bytes = file.metadata().map_err(io)?.len();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| DiskError::BadPath(path.to_path_buf()))?
            .to_string();
        Ok(Self {
            name,
            size_bytes,
            backing: RwLock::new(Backing { file: Arc::new(file), path: path.to_path_buf() }),
            log: DirtyBlocks::new(size_bytes.div_ceil(BLOCK_BYTES)),
            mirror: Mutex::new(None),
            write_blocking: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        })
    }

    /// The disk's name (its file name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes (need not be a multiple of [`BLOCK_BYTES`]: the last block is short).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Blocks, the last one possibly short.
    pub fn blocks(&self) -> u64 {
        self.log.blocks()
    }

    /// The bytes of block `b` (`BLOCK_BYTES`, or less for the tail block).
    pub fn block_len(&self, b: u64) -> u64 {
        (self.size_bytes - (b * BLOCK_BYTES).min(self.size_bytes)).min(BLOCK_BYTES)
    }

    /// The image file the disk uses now.
    pub fn path(&self) -> PathBuf {
        self.backing().path.clone()
    }

    /// The dirty-block log.
    pub fn dirty_log(&self) -> &DirtyBlocks {
        &self.log
    }

    /// Bytes the image occupies on its file system.
    pub fn allocated_bytes(&self) -> Result<u64, DiskError> {
        let b = self.backing();
        image::allocated_bytes(&b.file).map_err(|err| DiskError::Io { path: b.path.clone(), err })
    }

    pub(crate) fn backing(&self) -> RwLockReadGuard<'_, Backing> {
        self.backing.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn mirror_lock(&self) -> MutexGuard<'_, Option<MirrorTarget>> {
        self.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, off: u64, len: usize) -> Result<(), DiskError> {
        if off.checked_add(len as u64).is_none_or(|end| end > self.size_bytes) {
            return Err(DiskError::OutOfRange { off, len: len as u64, size_bytes: self.size_bytes });
        }
        Ok(())
    }

    /// A guest read.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(off, buf.len())?;
        let b = self.backing();
        image::read_full_at(&b.file, buf, off).map_err(|err| DiskError::Io { path: b.path.clone(), err })
    }

    /// A guest write: to the image, then marked in the dirty log; in write-blocking mirror mode
    /// to the mirror's target too before it returns.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check(off, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let first = off / BLOCK_BYTES;
        let count = (off + data.len() as u64 - 1) / BLOCK_BYTES - first + 1;
        let b = self.backing();
        let io = |err| DiskError::Io { path: b.path.clone(), err };
        if self.write_blocking.load(Ordering::SeqCst) {
            let mut m = self.mirror_lock();
            b.file.write_all_at(data, off).map_err(io)?;
            match m.as_mut() {
                Some(t) if t.failed.is_none() => {
                    if let Err(e) = t.sink.write_at(off, data) {
                        t.failed = Some(e);
                        self.log.mark(first, count);
                    }
                }
                _ => self.log.mark(first, count),
            }
            return Ok(());
        }
        b.file.write_all_at(data, off).map_err(io)?;
        self.log.mark(first, count);
        Ok(())
    }

    /// Claim the disk for a move (one at a time); released by [`Disk::release`].
    pub(crate) fn claim(&self) -> Result<(), DiskError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(DiskError::Busy(self.name.clone()));
        }
        Ok(())
    }

    pub(crate) fn release(&self) {
        self.busy.store(false, Ordering::SeqCst);
    }

    /// Attach a mirror target (the copier writes to it; guest writes too once write-blocking).
    pub(crate) fn attach_mirror(&self, sink: Box<dyn BlockSink>) {
        let mut m = self.mirror_lock();
        *m = Some(MirrorTarget { sink, failed: None });
    }

    /// Mirror guest writes synchronously to the attached target from now on (QEMU's
    /// write-blocking mode): a write no longer dirties a block, so the copy converges whatever
    /// the guest's write rate; the guest's writes take as long as both writes.
    pub(crate) fn set_write_blocking(&self) {
        let _m = self.mirror_lock();
        self.write_blocking.store(true, Ordering::SeqCst);
    }

    /// Detach the mirror (back to writes on the image only); returns its sink and error.
    pub(crate) fn detach_mirror(&self) -> Option<MirrorTarget> {
        let mut m = self.mirror_lock();
        self.write_blocking.store(false, Ordering::SeqCst);
        m.take()
    }

    /// Is a write-blocking mirror attached?
    pub fn is_write_blocking(&self) -> bool {
        self.write_blocking.load(Ordering::SeqCst)
    }

    /// Switch the disk to another image file (same size, same contents; the guest is paused).
    pub(crate) fn switch_to(&self, file: Arc<File>, path: PathBuf) {
        let mut b = self.backing.write().unwrap_or_else(|e| e.into_inner());
        *b = Backing { file, path };
    }
}
