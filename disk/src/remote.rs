//! Shared-nothing building blocks: the destination's side of a disk transfer
//! ([`DiskReceiver`]: blocks into partial copies, digests, commit by name, nothing left behind
//! otherwise) and the source's ([`DiskSender`]: what to send next, from the allocated extents
//! and then the dirty-block log, each batch a transaction until the peer has it).
//!
//! `ferry-migrate` carries them on the migration session (its `disks` module and the sessions'
//! rules): the source's blocks go as `DiskBlocks` on every channel beside page batches, every
//! disk in sync before memory pre-copy starts, the last dirty blocks in the switchover pause, and
//! the disks' keyed digests ([`DiskSender::start_keyed`], [`DiskReceiver::prepare_keyed`]) are
//! verified with the memory image; the destination commits the disks
//! ([`DiskReceiver::commit`]) when it commits the VM, and the source removes (or retains) its
//! files once the destination runs it. These types keep the rules that do not depend on the
//! wire: names from the peer are checked, lengths are exact, holes stay holes, a partial copy
//! never has a disk's name, a digest mismatch commits nothing, one block is never in flight
//! twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::{DigestKey, DiskDigest};
use crate::dirty::BlockSet;
use crate::disk::Disk;
use crate::sink::{BlockSink, FileSink, FileWriter};
use crate::{image, DiskError, BLOCK_BYTES};

/// Most disks one VM may bring.
pub const MAX_DISKS: usize = 64;
/// Largest disk accepted (64 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// Errors of a disk transfer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A disk operation failed (the destination's file system full, an I/O error).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The peer sent something impossible.
    #[error("bad disk transfer: {0}")]
    Bad(String),
    /// A disk's digest differs from the source's.
    #[error("disk {disk}: digest {got:#018x} differs from the source's {want:#018x}")]
    Mismatch {
        /// Disk name.
        disk: String,
        /// The destination's.
        got: u64,
        /// The source's.
        want: u64,
    },
}

/// Check a disk name from the peer: a plain file name (no path, not hidden, at most 200 bytes).
pub fn check_name(name: &str) -> Result<(), RemoteError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
        && Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name);
    if !ok {
        return Err(RemoteError::Bad(format!("{name:?} is not a plain disk file name")));
    }
    Ok(())
}

struct Incoming {
    name: String,
    size_bytes: u64,
    sink: FileSink,
    writer: FileWriter,
    digest: DiskDigest,
}

/// The destination's disks while they arrive: partial copies in `dir` until
/// [`DiskReceiver::commit`]; dropped uncommitted (any failure, a cancel), it removes them.
pub struct DiskReceiver {
    dir: PathBuf,
    disks: Vec<Incoming>,
}

impl std::fmt::Debug for DiskReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReceiver").field("dir", &self.dir).field("disks", &self.disks.len()).finish()
    }
}

impl DiskReceiver {
    /// Prepare to receive `disks` (name, size) into `dir`: checks every name and size, refuses
    /// a name that exists in `dir`, creates the sparse partial copies.
    pub fn prepare(dir: &Path, disks: &[(String, u64)]) -> Result<Self, RemoteError> {
        Self::prepare_keyed(dir, disks, &DigestKey::UNKEYED)
    }

    /// [`DiskReceiver::prepare`] with the digests keyed by `key` (a migration's session key).
    pub fn prepare_keyed(dir: &Path, disks: &[(String, u64)], key: &DigestKey) -> Result<Self, RemoteError> {
        if disks.len() > MAX_DISKS {
            return Err(RemoteError::Bad(format!("{} disks (at most {MAX_DISKS})", disks.len())));
        }
        let mut seen = std::collections::HashSet::new();
        for (name, size) in disks {
            check_name(name)?;
            if *size > MAX_DISK_BYTES {
                return Err(RemoteError::Bad(format!("disk {name} of {size} bytes (at most {MAX_DISK_BYTES})")));
            }
            if !seen.insert(name.as_str()) {
                return Err(RemoteError::Bad(format!("two disks named {name}")));
            }
            if std::fs::symlink_metadata(dir.join(name)).is_ok() {
                return Err(RemoteError::Bad(format!("{} exists on the destination", dir.join(name).display())));
            }
        }
        let mut r = Self { dir: dir.to_path_buf(), disks: Vec::new() };
        for (name, size) in disks {
            let sink = FileSink::create(dir, name, *size)
                .map_err(|err| DiskError::Io { path: crate::sink::partial_path(dir, name), err })?;
            let writer = sink.writer();
            r.disks.push(Incoming {
                name: name.clone(),
                size_bytes: *size,
                sink,
                writer,
                digest: DiskDigest::keyed(size.div_ceil(BLOCK_BYTES), key),
            });
        }
        Ok(r)
    }

    fn disk(&mut self, d: u16) -> Result<&mut Incoming, RemoteError> {
        let n = self.disks.len();
        self.disks.get_mut(usize::from(d)).ok_or_else(|| RemoteError::Bad(format!("disk {d} of {n}")))
    }

    /// Block `b` of disk `d` holds `data` (exactly the block's length; all-zero data is
    /// punched, not written).
    pub fn write_block(&mut self, d: u16, b: u64, data: &[u8]) -> Result<(), RemoteError> {
        let inc = self.disk(d)?;
        let blocks = inc.size_bytes.div_ceil(BLOCK_BYTES);
        if b >= blocks {
            return Err(RemoteError::Bad(format!("block {b} of disk {} ({blocks} blocks)", inc.name)));
        }
        let len = (inc.size_bytes - b * BLOCK_BYTES).min(BLOCK_BYTES);
        if data.len() as u64 != len {
            return Err(RemoteError::Bad(format!("block {b} of disk {}: {} bytes, not {len}", inc.name, data.len())));
        }
        let target = |err| DiskError::Target { disk: inc.name.clone(), err };
        if image::is_zero(data) {
            inc.writer.zero(b * BLOCK_BYTES, len).map_err(target)?;
            inc.digest.set_zero(b);
        } else {
            inc.writer.write_at(b * BLOCK_BYTES, data).map_err(target)?;
            // Writeback starts now, so the sync before commit has little left to do.
            inc.writer.start_writeback(b * BLOCK_BYTES, len).map_err(target)?;
            inc.digest.set(b, data);
        }
        Ok(())
    }

    /// Block `b` of disk `d` is zero (a hole, or a block the guest zeroed).
    pub fn zero_block(&mut self, d: u16, b: u64) -> Result<(), RemoteError> {
        let inc = self.disk(d)?;
        let len = inc.size_bytes.saturating_sub(b * BLOCK_BYTES).min(BLOCK_BYTES);
        if len == 0 {
            return Err(RemoteError::Bad(format!("block {b} past disk {}", inc.name)));
        }
        inc.writer.zero(b * BLOCK_BYTES, len).map_err(|err| DiskError::Target { disk: inc.name.clone(), err })?;
        inc.digest.set_zero(b);
        Ok(())
    }

    /// Every disk's digest as received so far (in disk order).
    pub fn digests(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.digest.digest()).collect()
    }

    /// Disks being received.
    pub fn len(&self) -> usize {
        self.disks.len()
    }

    /// No disk.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Compare every disk's digest with the source's (in disk order).
    pub fn verify(&self, source: &[u64]) -> Result<(), RemoteError> {
        if source.len() != self.disks.len() {
            return Err(RemoteError::Bad(format!("{} digests for {} disks", source.len(), self.disks.len())));
        }
        for (inc, &want) in self.disks.iter().zip(source) {
            let got = inc.digest.digest();
            if got != want {
                return Err(RemoteError::Mismatch { disk: inc.name.clone(), got, want });
            }
        }
        Ok(())
    }

    /// Make every block durable.
    pub fn sync(&mut self) -> Result<(), RemoteError> {
        for inc in &mut self.disks {
            inc.writer.sync().map_err(|err| DiskError::Target { disk: inc.name.clone(), err })?;
        }
        Ok(())
    }

    /// Give every copy its disk name (never replacing a file); all or none. Returns the paths.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, RemoteError> {
        let mut done: Vec<PathBuf> = Vec::new();
        for inc in &mut self.disks {
            let to = self.dir.join(&inc.name);
            if let Err(err) = inc.sink.commit(&to) {
                for p in &done {
                    let _ = std::fs::remove_file(p);
                }
                return Err(DiskError::Io { path: to, err }.into());
            }
            done.push(to);
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(done)
    }
}

/// What the source sends next for one disk: first every allocated extent (once), then the
/// dirty blocks, each take held until [`DiskSender::acked`] (or given back with
/// [`DiskSender::lost`]). Keeps the source's digest of what the destination has.
pub struct DiskSender {
    disk: Arc<Disk>,
    backlog: Vec<(u64, u64)>,
    in_flight: BlockSet,
    digest: DiskDigest,
}

impl std::fmt::Debug for DiskSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSender").field("disk", &self.disk.name()).finish_non_exhaustive()
    }
}

/// One block to send: its index and bytes (`None`: zero, send as a hole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutBlock {
    /// Block index.
    pub block: u64,
    /// Bytes (the block's length), or `None` for zeros.
    pub data: Option<Vec<u8>>,
}

impl DiskSender {
    /// Start: the dirty log starts now and the allocated extents are the backlog.
    pub fn start(disk: Arc<Disk>) -> Result<Self, DiskError> {
        Self::start_keyed(disk, &DigestKey::UNKEYED)
    }

    /// [`DiskSender::start`] with the digest keyed by `key` (a migration's session key). The
    /// sender owns the disk's dirty log (one move at a time: [`DiskError::Busy`] otherwise)
    /// until it is stopped or dropped.
    pub fn start_keyed(disk: Arc<Disk>, key: &DigestKey) -> Result<Self, DiskError> {
        disk.claim()?;
        let extents = {
            let b = disk.backing();
            image::allocated_extents(&b.file, disk.size_bytes())
                .map_err(|err| DiskError::Io { path: b.path.clone(), err })
        };
        let extents = match extents {
            Ok(e) => e,
            Err(e) => {
                disk.release();
                return Err(e);
            }
        };
        disk.dirty_log().start();
        let mut backlog: Vec<(u64, u64)> = Vec::new();
        for (s, l) in extents {
            let (first, end) = (s / BLOCK_BYTES, (s + l).div_ceil(BLOCK_BYTES));
            match backlog.last_mut() {
                Some(last) if last.0 + last.1 >= first => last.1 = end.max(last.0 + last.1) - last.0,
                _ => backlog.push((first, end - first)),
            }
        }
        backlog.reverse(); // popped from the end, in order
        let blocks = disk.blocks();
        Ok(Self { disk, backlog, in_flight: BlockSet::new(blocks), digest: DiskDigest::keyed(blocks, key) })
    }

    /// Blocks of the first copy (the allocated extents) not sent yet.
    pub fn backlog_blocks(&self) -> u64 {
        self.backlog.iter().map(|r| r.1).sum()
    }

    /// Blocks still to send from the extents, and dirty blocks pending.
    pub fn remaining_blocks(&self) -> u64 {
        self.backlog.iter().map(|r| r.1).sum::<u64>() + self.disk.dirty_log().pending()
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Blocks sent and not yet acknowledged (nor lost).
    pub fn in_flight_blocks(&self) -> u64 {
        self.in_flight.count()
    }

    /// Up to `max` blocks to send next (the backlog first, then the dirty log). A dirty block
    /// whose previous copy is still in flight stays dirty until that copy is acknowledged: one
    /// block is never in flight twice, so an older copy can never land after a newer one
    /// whatever channels they take.
    pub fn next(&mut self, max: u64) -> Result<Vec<OutBlock>, DiskError> {
        let mut picks: Vec<u64> = Vec::new();
        while (picks.len() as u64) < max {
            let Some(run) = self.backlog.last_mut() else { break };
            picks.push(run.0);
            run.0 += 1;
            run.1 -= 1;
            if run.1 == 0 {
                self.backlog.pop();
            }
        }
        if (picks.len() as u64) < max && self.backlog.is_empty() {
            let take = self.disk.dirty_log().take();
            let mut back = BlockSet::new(self.disk.blocks());
            for (first, n) in take.set().runs() {
                for b in first..first + n {
                    if self.in_flight.contains(b) {
                        back.insert(b);
                    } else if (picks.len() as u64) < max && !picks.contains(&b) {
                        picks.push(b);
                    } else if !picks.contains(&b) {
                        back.insert(b);
                    }
                }
            }
            take.commit();
            self.disk.dirty_log().give_back(&back);
        }
        let mut out = Vec::with_capacity(picks.len());
        for b in picks {
            let n = self.disk.block_len(b) as usize;
            let mut buf = vec![0u8; n];
            self.disk.read_at(b * BLOCK_BYTES, &mut buf)?;
            self.in_flight.insert(b);
            if image::is_zero(&buf) {
                self.digest.set_zero(b);
                out.push(OutBlock { block: b, data: None });
            } else {
                self.digest.set(b, &buf);
                out.push(OutBlock { block: b, data: Some(buf) });
            }
        }
        Ok(out)
    }

    /// The peer has these blocks.
    pub fn acked(&mut self, blocks: &[u64]) {
        let mut s = BlockSet::new(self.disk.blocks());
        for &b in blocks {
            s.insert(b);
        }
        self.in_flight = subtract(&self.in_flight, &s);
    }

    /// These blocks did not arrive (a channel lost): they are dirty again.
    pub fn lost(&mut self, blocks: &[u64]) {
        let mut s = BlockSet::new(self.disk.blocks());
        for &b in blocks {
            s.insert(b);
        }
        self.disk.dirty_log().give_back(&s);
        self.in_flight = subtract(&self.in_flight, &s);
    }

    /// The digest of the disk as the destination has it once every block sent is acknowledged.
    pub fn digest(&self) -> u64 {
        self.digest.digest()
    }

    /// Stop the dirty log and give the disk back (after the switch, or on abort; dropping the
    /// sender does the same).
    pub fn stop(self) {}
}

impl Drop for DiskSender {
    fn drop(&mut self) {
        self.disk.dirty_log().stop();
        self.disk.release();
    }
}

fn subtract(a: &BlockSet, b: &BlockSet) -> BlockSet {
    let mut out = BlockSet::new(a.blocks());
    for (i, (x, y)) in a.words().iter().zip(b.words()).enumerate() {
        let w = x & !y;
        for bit in 0..64 {
            if w & (1 << bit) != 0 {
                out.insert(i as u64 * 64 + bit);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn source(dir: &Path, size: u64) -> Arc<Disk> {
        let p = dir.join("root.img");
        let f = image::create_sparse(&p, size).unwrap();
        for b in (0..size.div_ceil(BLOCK_BYTES)).step_by(3) {
            let len = BLOCK_BYTES.min(size - b * BLOCK_BYTES) as usize;
            f.write_all_at(&vec![(b % 251) as u8 | 1; len], b * BLOCK_BYTES).unwrap();
        }
        f.write_all_at(&vec![0u8; BLOCK_BYTES as usize], BLOCK_BYTES).unwrap(); // allocated zeros
        Arc::new(Disk::open(&p).unwrap())
    }

    /// Send everything the sender has, `batch` blocks at a time; `lose` every n-th batch.
    fn pump(s: &mut DiskSender, r: &mut DiskReceiver, batch: u64, lose: Option<usize>) {
        let mut n = 0;
        loop {
            let out = s.next(batch).unwrap();
            if out.is_empty() {
                break;
            }
            n += 1;
            let ids: Vec<u64> = out.iter().map(|o| o.block).collect();
            if lose.is_some_and(|k| n % k == 0) {
                s.lost(&ids);
                continue;
            }
            for o in out {
                match o.data {
                    Some(d) => r.write_block(0, o.block, &d).unwrap(),
                    None => r.zero_block(0, o.block).unwrap(),
                }
            }
            s.acked(&ids);
        }
    }

    #[test]
    fn a_disk_arrives_whole_sparse_and_verified_and_commits_by_name() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let size = 40 * BLOCK_BYTES + 1234;
        let disk = source(src.path(), size);
        let mut s = DiskSender::start(disk.clone()).unwrap();
        let mut r = DiskReceiver::prepare(dst.path(), &[("root.img".into(), size)]).unwrap();
        pump(&mut s, &mut r, 5, Some(3)); // every third batch lost: resent from the dirty log
                                          // The guest writes on; the dirty blocks follow (one becomes zero: punched).
        disk.write_at(7 * BLOCK_BYTES + 5, &[3; 70_000]).unwrap();
        disk.write_at(0, &vec![0u8; BLOCK_BYTES as usize]).unwrap();
        disk.write_at(size - 1, &[8]).unwrap();
        pump(&mut s, &mut r, 4, None);
        assert_eq!(s.remaining_blocks(), 0);
        assert_eq!(s.digest(), DiskDigest::of_disk(&disk).unwrap().digest(), "the sender's digest is the disk's");
        r.verify(&[s.digest()]).unwrap();
        r.sync().unwrap();
        let paths = r.commit().unwrap();
        assert_eq!(paths, vec![dst.path().join("root.img")]);
        assert_eq!(std::fs::read(&paths[0]).unwrap(), std::fs::read(disk.path()).unwrap());
        let (a, b) = (
            std::fs::metadata(&paths[0]).unwrap().len(),
            image::allocated_bytes(&std::fs::File::open(&paths[0]).unwrap()).unwrap(),
        );
        assert_eq!(a, size);
        assert!(b < disk.allocated_bytes().unwrap(), "zero blocks stay holes: {b}");
        s.stop();
        assert!(!disk.dirty_log().is_logging());
    }

    #[test]
    fn nothing_passes_as_a_disk_after_a_fault() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let size = 20 * BLOCK_BYTES + 1;
        let disk = source(src.path(), size);
        let before = std::fs::read(disk.path()).unwrap();
        let listing = |p: &Path| std::fs::read_dir(p).unwrap().count();
        // The channel dies mid-transfer: the receiver is dropped.
        let mut s = DiskSender::start(disk.clone()).unwrap();
        let mut r = DiskReceiver::prepare(dst.path(), &[("root.img".into(), size)]).unwrap();
        let out = s.next(3).unwrap();
        for o in &out {
            if let Some(d) = &o.data {
                r.write_block(0, o.block, d).unwrap();
            }
        }
        assert_eq!(listing(dst.path()), 1, "a partial copy, hidden");
        drop(r);
        assert_eq!(listing(dst.path()), 0, "dropped: nothing left");
        s.stop();
        // A digest that does not match commits nothing.
        let mut s = DiskSender::start(disk.clone()).unwrap();
        let mut r = DiskReceiver::prepare(dst.path(), &[("root.img".into(), size)]).unwrap();
        pump(&mut s, &mut r, 8, None);
        r.write_block(0, 2, &vec![1u8; BLOCK_BYTES as usize]).unwrap(); // corrupted on the way
        assert!(matches!(r.verify(&[s.digest()]), Err(RemoteError::Mismatch { .. })));
        drop(r);
        assert_eq!(listing(dst.path()), 0);
        s.stop();
        assert_eq!(std::fs::read(disk.path()).unwrap(), before, "the source disk is untouched");
        // Bad input from the peer: a clear error, no file.
        for name in ["", ".x", "a/b", "..", "x\0y"] {
            assert!(DiskReceiver::prepare(dst.path(), &[(name.into(), 1)]).is_err(), "{name:?}");
        }
        assert!(DiskReceiver::prepare(dst.path(), &[("a".into(), MAX_DISK_BYTES + 1)]).is_err());
        assert!(DiskReceiver::prepare(dst.path(), &[("a".into(), 1), ("a".into(), 1)]).is_err());
        let mut r = DiskReceiver::prepare(dst.path(), &[("a".into(), 1000)]).unwrap();
        assert!(r.write_block(0, 0, &[1; 999]).is_err(), "a short block");
        assert!(r.write_block(0, 1, &[1; 1]).is_err(), "past the end");
        assert!(r.write_block(1, 0, &[1; 1000]).is_err(), "no such disk");
        assert!(r.verify(&[1, 2]).is_err());
        drop(r);
        assert_eq!(listing(dst.path()), 0);
    }

    #[test]
    fn a_full_destination_leaves_nothing() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let Some(tmpfs) =
            ferry_test_support::tmpfs::SmallTmpfs::mount(dst.path(), "256k", "a_full_destination_leaves_nothing")
        else {
            return;
        };
        let mnt = tmpfs.path().to_path_buf();
        let size = 30 * BLOCK_BYTES;
        let disk = source(src.path(), size);
        let mut s = DiskSender::start(disk).unwrap();
        let mut r = DiskReceiver::prepare(&mnt, &[("root.img".into(), size)]).unwrap();
        let mut err = None;
        'outer: loop {
            let out = s.next(4).unwrap();
            if out.is_empty() {
                break;
            }
            for o in out {
                if let Some(d) = o.data {
                    if let Err(e) = r.write_block(0, o.block, &d) {
                        err = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        match err {
            Some(RemoteError::Disk(DiskError::Target { err, .. })) => assert_eq!(err.raw_os_error(), Some(28)),
            other => panic!("{other:?}"),
        }
        drop(r);
        assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    }
}
