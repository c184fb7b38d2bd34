//! Raw sparse image files: create one, find its allocated extents (`SEEK_DATA`/`SEEK_HOLE`),
//! punch holes, count what it really occupies (`st_blocks`), check for zeros.
//!
//! A raw image is the guest's disk byte for byte; a hole reads as zeros and occupies nothing.
//! Ferry never fills a hole with written zeros: a copy skips zero blocks (the destination file
//! is created sparse, so they stay holes) and a block that becomes zero where data was is
//! punched (`FALLOC_FL_PUNCH_HOLE`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Create a new sparse image of `size_bytes` (fails if `path` exists; nothing is allocated).
pub fn create_sparse(path: &Path, size_bytes: u64) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
    f.set_len(size_bytes)?;
    Ok(f)
}

/// Open an existing image for reading and writing.
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Bytes the file really occupies on its file system (`st_blocks * 512`).
pub fn allocated_bytes(f: &File) -> io::Result<u64> {
    Ok(f.metadata()?.blocks() * 512)
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(off) else {
        return Ok(None);
    };
    // SAFETY: lseek on a descriptor the `File` owns for the duration of the call; it only moves
    // that descriptor's offset (Ferry always uses positional reads and writes, never the offset).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or no hole) at or after `off`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The allocated extents of the first `size_bytes` of `f` as (offset, length), in order, found
/// with `SEEK_DATA`/`SEEK_HOLE`. On a file system without them the kernel reports the whole file
/// as one extent, which is still correct (only slower to copy).
pub fn allocated_extents(f: &File, size_bytes: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size_bytes {
        let Some(data) = seek(f, pos, libc::SEEK_DATA)? else { break };
        if data >= size_bytes {
            break;
        }
        let hole = seek(f, data, libc::SEEK_HOLE)?.unwrap_or(size_bytes).min(size_bytes);
        if hole <= data {
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Make `[off, off + len)` of `f` read as zeros and free its blocks (the size does not change).
pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range past what off_t holds"));
    };
    // SAFETY: fallocate on a descriptor the `File` owns; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Start writing the dirty pages of `[off, off + len)` back without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
pub fn start_writeback(f: &File, off: u64, len: u64) -> io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: sync_file_range on a descriptor the `File` owns; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Is every byte zero? (64 bytes per step, which the compiler vectorizes.)
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Read exactly `buf.len()` bytes at `off` (a short file reads as zeros past its end).
pub fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => {
                buf[got..].fill(0);
                return Ok(());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_and_holes_on_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        let size = 10 * 1024 * 1024 + 12_345; // not a multiple of anything
        let f = create_sparse(&p, size).unwrap();
        assert_eq!(allocated_bytes(&f).unwrap(), 0, "a new image allocates nothing");
        assert!(allocated_extents(&f, size).unwrap().is_empty());
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 100], size - 100).unwrap();
        let ex = allocated_extents(&f, size).unwrap();
        assert_eq!(ex.len(), 2, "{ex:?}");
        assert!(ex[0].0 <= 1 << 20 && ex[0].0 + ex[0].1 >= (1 << 20) + 4096);
        assert!(ex[1].0 + ex[1].1 == size, "the tail extent ends at the size: {ex:?}");
        let before = allocated_bytes(&f).unwrap();
        assert!(before > 0 && before < 1 << 20);
        punch_hole(&f, 1 << 20, 4096).unwrap();
        let mut b = [9u8; 4096];
        read_full_at(&f, &mut b, 1 << 20).unwrap();
        assert!(is_zero(&b));
        assert!(allocated_bytes(&f).unwrap() < before);
        assert!(create_sparse(&p, 1).is_err(), "never clobbers an existing file");
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 65_536 + 7];
        assert!(is_zero(&v));
        v[65_536 + 6] = 1;
        assert!(!is_zero(&v));
        v[65_536 + 6] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
