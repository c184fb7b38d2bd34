//! The block mirror's copier: allocated extents in chunks, then the dirty blocks, each chunk read
//! from the disk's current image and written to the mirror target under the mirror lock.
//!
//! The lock is what makes write-blocking mode correct: a guest write mirrored synchronously does
//! not mark its block, so a chunk read before it and written after it would leave the target
//! stale. Holding the lock over read and write of a chunk (1 MiB by default) keeps the two
//! apart; in background mode it is uncontended. Zeros are not written (checked per 4 KiB, the
//! file system's block): on the first copy into a fresh sparse file they are skipped (left as
//! holes), on a dirty pass they are punched.

use crate::disk::Disk;
use crate::image;
use crate::{DiskError, BLOCK_BYTES};

/// The unit of zero detection inside a block: the file system's block, so that a sector the
/// guest wrote into a hole does not allocate its whole 64 KiB block in the copy.
pub const ZERO_UNIT_BYTES: usize = 4096;

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// Bytes written to the target.
    pub written_bytes: u64,
    /// Zero bytes skipped or punched (in units of [`ZERO_UNIT_BYTES`]).
    pub zero_bytes: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
}

impl CopyCounts {
    /// Add another count.
    pub fn add(&mut self, o: CopyCounts) {
        self.written_bytes += o.written_bytes;
        self.zero_bytes += o.zero_bytes;
        self.read_bytes += o.read_bytes;
    }
}

/// Copy `[off, off + len)` of `disk` (block aligned at `off`; `len` clipped to the disk) to its
/// mirror target. `fresh`: the target range was never written (zero blocks are skipped, not
/// punched). `writeback`: start writing the range back to storage once written. `buf` must hold
/// `len` bytes.
pub fn copy_range(
    disk: &Disk,
    off: u64,
    len: u64,
    buf: &mut [u8],
    fresh: bool,
    writeback: bool,
) -> Result<CopyCounts, DiskError> {
    let len = len.min(disk.size_bytes().saturating_sub(off));
    let mut counts = CopyCounts::default();
    if len == 0 {
        return Ok(counts);
    }
    let buf = &mut buf[..len as usize];
    let mut m = disk.mirror_lock();
    let Some(t) = m.as_mut() else {
        return Err(DiskError::NoMirror(disk.name().to_string()));
    };
    if let Some(e) = t.failed.take() {
        return Err(DiskError::Target { disk: disk.name().to_string(), err: e });
    }
    {
        let b = disk.backing();
        image::read_full_at(&b.file, buf, off).map_err(|err| DiskError::Io { path: b.path.clone(), err })?;
    }
    counts.read_bytes = len;
    let target = |err| DiskError::Target { disk: disk.name().to_string(), err };
    // Runs of non-zero units are written in one call, runs of zero units skipped or punched
    // (as one call each); units of ZERO_UNIT_BYTES keep a small write into a hole small.
    let mut pos = 0usize;
    while pos < buf.len() {
        let unit_end = |p: usize| (p + ZERO_UNIT_BYTES).min(buf.len());
        let zero = image::is_zero(&buf[pos..unit_end(pos)]);
        let mut end = unit_end(pos);
        while end < buf.len() && image::is_zero(&buf[end..unit_end(end)]) == zero {
            end = unit_end(end);
        }
        if zero {
            if !fresh {
                t.sink.zero(off + pos as u64, (end - pos) as u64).map_err(target)?;
            }
            counts.zero_bytes += (end - pos) as u64;
        } else {
            t.sink.write_at(off + pos as u64, &buf[pos..end]).map_err(target)?;
            counts.written_bytes += (end - pos) as u64;
        }
        pos = end;
    }
    if writeback && counts.written_bytes > 0 {
        t.sink.start_writeback(off, len).map_err(target)?;
    }
    Ok(counts)
}

/// Copy the allocated extents of `disk` (found with `SEEK_DATA`/`SEEK_HOLE` now) to its fresh
/// mirror target, in chunks of `buf.len()` bytes (a multiple of [`BLOCK_BYTES`]); `between` runs
/// after each chunk and may stop the copy with an error (cancel). `writeback`: see [`copy_range`].
pub fn copy_allocated(
    disk: &Disk,
    buf: &mut [u8],
    writeback: bool,
    between: &mut dyn FnMut(&CopyCounts) -> Result<(), DiskError>,
) -> Result<CopyCounts, DiskError> {
    let extents = {
        let b = disk.backing();
        image::allocated_extents(&b.file, disk.size_bytes())
            .map_err(|err| DiskError::Io { path: b.path.clone(), err })?
    };
    let chunk = (buf.len() as u64 / BLOCK_BYTES).max(1) * BLOCK_BYTES;
    let mut counts = CopyCounts::default();
    let mut done_to = 0u64; // extents may share a block: copy each block once
    for (start, len) in extents {
        let mut off = (start / BLOCK_BYTES * BLOCK_BYTES).max(done_to);
        let end = (start + len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        while off < end {
            let n = chunk.min(end - off);
            counts.add(copy_range(disk, off, n, buf, true, writeback)?);
            off += n;
            done_to = off;
            between(&counts)?;
        }
    }
    Ok(counts)
}

/// One dirty pass: take the disk's dirty blocks and copy them (zero blocks punched). The take is
/// committed only when every block reached the target; on an error its blocks go back to the log.
pub fn copy_dirty(
    disk: &Disk,
    buf: &mut [u8],
    writeback: bool,
    between: &mut dyn FnMut(&CopyCounts) -> Result<(), DiskError>,
) -> Result<CopyCounts, DiskError> {
    let take = disk.dirty_log().take();
    let max_blocks = (buf.len() as u64 / BLOCK_BYTES).max(1);
    let mut counts = CopyCounts::default();
    for (first, n) in take.set().runs() {
        let mut b = first;
        while b < first + n {
            let k = max_blocks.min(first + n - b);
            counts.add(copy_range(disk, b * BLOCK_BYTES, k * BLOCK_BYTES, buf, false, writeback)?);
            b += k;
            between(&counts)?;
        }
    }
    take.commit();
    Ok(counts)
}
