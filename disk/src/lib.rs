//! ferry-disk: a VM's virtual disks and moving them while the VM runs.
//!
//! - [`image`]: raw sparse image files: create, allocated extents (`SEEK_DATA`/`SEEK_HOLE`),
//!   punch holes, `st_blocks`, zero check.
//! - [`dirty`]: the dirty-block log of a disk ([`DirtyBlocks`]), read and cleared as a
//!   transaction ([`DirtyTake`]: blocks go back unless committed).
//! - [`disk`]: [`Disk`], the door every guest read and write goes through (image, dirty log,
//!   mirror).
//! - [`sink`]: where copied blocks go ([`BlockSink`]); [`FileSink`], a partial copy under a
//!   hidden temporary name that becomes a disk only at commit.
//! - [`mirror`]: the copier (allocated extents, dirty passes; zero blocks left as holes).
//! - [`local`]: storage live migration on one host ([`move_storage`]): copy, mirror, converge,
//!   switch in a pause of milliseconds, remove the old files.
//! - [`digest`]: a disk's digest (a hash per block, holes hash as zeros; keyed with the
//!   session's key in a migration), for the destination of a shared-nothing move to verify each
//!   disk before it commits.
//! - [`remote`]: shared-nothing building blocks, carried by `ferry-migrate`'s session: the
//!   destination's [`remote::DiskReceiver`] (partial copies, names from the peer checked, digest,
//!   commit by name) and the source's [`remote::DiskSender`] (extents, then dirty blocks).
//!
//! # Why a crate of its own
//!
//! Disks are to storage migration what `ferry-memory` is to live migration: a resource the VMM
//! owns, the engine reads, and that has its own rules (holes stay holes, a copy is not a disk
//! until committed). The VMMs in `ferry-vmm-glue` write through [`Disk`]; the engine in
//! `ferry-migrate` sends its blocks in a shared-nothing move; neither should own the other's
//! code, and the local move needs no network at all. It depends only on `ferry-memory` (whose
//! digest table it reuses).
//!
//! # Blocks
//!
//! A disk is tracked and copied in blocks of [`BLOCK_BYTES`] (64 KiB: large enough that a 4 GiB
//! disk's log is 8 KiB and a copy moves large runs, small enough that one sector written rewrites
//! little). A disk's size need not be a multiple: its last block is short and every path
//! (log, copy, zero check, punch) clips at the size.
//!
//! # Ownership
//!
//! Until a move's commit point the original files are the disks: the move reads them and never
//! writes them, and a partial copy lives under a name no disk has (`.NAME.ferry-partial`); an
//! error, a cancel or a full file system removes it. At the commit each copy is hard-linked to
//! its final name (never replacing a file), and only after the VM runs on the copies are the
//! old files removed.

pub mod digest;
pub mod dirty;
pub mod disk;
pub mod image;
pub mod local;
pub mod mirror;
pub mod remote;
pub mod sink;

use std::path::PathBuf;

pub use dirty::{BlockSet, DirtyBlocks, DirtyTake};
pub use disk::Disk;
pub use local::{move_storage, CancelToken, MirrorMode, MoveError, MoveOptions, MoveStats, Phase, Quiesce};
pub use sink::{BlockSink, FileSink};

/// The unit of dirty tracking and copying.
pub const BLOCK_BYTES: u64 = 64 * 1024;

/// Errors of disk operations.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An image file operation failed.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// Writing a disk's copy failed (I/O error, file system full).
    #[error("copy of disk {disk}: {err}")]
    Target {
        /// The disk.
        disk: String,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// An access past the end of the disk.
    #[error("access of {len} bytes at {off} past the disk's {size_bytes} bytes")]
    OutOfRange {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size_bytes: u64,
    },
    /// A path without a usable file name.
    #[error("not a usable disk path: {}", .0.display())]
    BadPath(PathBuf),
    /// Another move owns the disk.
    #[error("disk {0} is already being moved")]
    Busy(String),
    /// A copy step without a mirror target.
    #[error("disk {0} has no mirror target")]
    NoMirror(String),
    /// The copy was cancelled.
    #[error("cancelled")]
    Cancelled,
}
