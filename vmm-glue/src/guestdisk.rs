//! The synthetic guest's disks: raw sparse images with a known initial pattern, a writer that
//! writes stamped sectors at a set rate over a working set, and a check that every sector of a
//! disk holds what it must (after a move, on any path).
//!
//! Initial contents, per 1 MiB group of an image: a group is allocated or a hole (spread by the
//! seed, `allocated_pct` of them allocated); in an allocated group one 64 KiB block in 16 is
//! written with zeros (allocated but zero: a copy must leave it a hole) and the rest is data
//! derived from (seed, sector). The last group is cut at the image's size, which need not be a
//! multiple of anything. A sector the writer wrote holds the stamp of (disk, sector, generation),
//! and the writer keeps the last generation of each working-set sector, so [`check_disk`] knows
//! what each of the disk's bytes must be without a copy of the disk.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::pagemix::splitmix;
use ferry_disk::{image, Disk};

/// Bytes a disk writer writes at once, and the unit of the check.
pub const SECTOR_BYTES: u64 = 4096;
const GROUP_BYTES: u64 = 1 << 20;
const ZERO_BLOCK_EVERY: u64 = 16;
const STAMP_MAGIC: u64 = 0x4b53_4944_5952_5246; // "FRRYDISK"

/// One disk of a synthetic guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// Size in bytes (any size).
    pub size_bytes: u64,
    /// Percent of 1 MiB groups allocated with data.
    pub allocated_pct: u8,
    /// Seed of the contents.
    pub seed: u64,
}

fn group_allocated(spec: &DiskSpec, g: u64) -> bool {
    let mut s = spec.seed ^ g.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix(&mut s) % 100 < u64::from(spec.allocated_pct)
}

/// The initial contents of `sector` (a full sector; the caller cuts the tail), or `None` for
/// zeros.
fn initial_sector(spec: &DiskSpec, sector: u64, out: &mut [u8]) -> bool {
    let off = sector * SECTOR_BYTES;
    if !group_allocated(spec, off / GROUP_BYTES) || (off / ferry_disk::BLOCK_BYTES) % ZERO_BLOCK_EVERY == 5 {
        return false;
    }
    let mut s = spec.seed.rotate_left(29) ^ sector;
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    true
}

/// Is `[off, off + len)` of the initial image allocated (data or written zeros)?
fn allocated_at(spec: &DiskSpec, off: u64) -> bool {
    group_allocated(spec, off / GROUP_BYTES)
}

/// Create the image of `spec` (fails if the file exists): holes stay holes.
pub fn create_image(spec: &DiskSpec) -> io::Result<()> {
    let f = image::create_sparse(&spec.path, spec.size_bytes)?;
    let mut buf = vec![0u8; GROUP_BYTES as usize];
    let mut off = 0;
    while off < spec.size_bytes {
        let len = GROUP_BYTES.min(spec.size_bytes - off) as usize;
        if allocated_at(spec, off) {
            for (i, s) in
                buf[..len.next_multiple_of(SECTOR_BYTES as usize)].chunks_exact_mut(SECTOR_BYTES as usize).enumerate()
            {
                if !initial_sector(spec, off / SECTOR_BYTES + i as u64, s) {
                    s.fill(0);
                }
            }
            f.write_all_at(&buf[..len], off)?;
        }
        off += GROUP_BYTES;
    }
    Ok(())
}

fn stamp(out: &mut [u8], disk: u64, sector: u64, generation: u64) {
    let mut s = disk.rotate_left(48) ^ sector ^ generation.rotate_left(17);
    for c in out[32..].chunks_exact_mut(8) {
        c.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    out[0..8].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&disk.to_le_bytes());
    out[16..24].copy_from_slice(&sector.to_le_bytes());
    out[24..32].copy_from_slice(&generation.to_le_bytes());
}

/// The disk writer's state: the generation of each working-set sector of each disk (0 = never).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskWriterState {
    /// The next generation.
    pub generation: u64,
    /// The writer's random state.
    pub rng: u64,
    /// Per disk, per working-set sector.
    pub gens: Vec<Vec<u64>>,
}

impl DiskWriterState {
    /// A writer over `sectors[d]` sectors of disk `d`.
    pub fn new(seed: u64, sectors: &[u64]) -> Self {
        Self { generation: 0, rng: seed ^ 0x5eed_d15c, gens: sectors.iter().map(|&n| vec![0; n as usize]).collect() }
    }

    /// Write one stamped sector to one of `disks` (chosen at random). Returns the bytes written.
    pub fn write_one(&mut self, disks: &[Arc<Disk>], buf: &mut [u8]) -> Result<u64, ferry_disk::DiskError> {
        let total: u64 = self.gens.iter().map(|g| g.len() as u64).sum();
        if total == 0 {
            return Ok(0);
        }
        let mut pick = splitmix(&mut self.rng) % total;
        let mut d = 0;
        while pick >= self.gens[d].len() as u64 {
            pick -= self.gens[d].len() as u64;
            d += 1;
        }
        self.generation += 1;
        let disk = &disks[d];
        let off = pick * SECTOR_BYTES;
        let len = SECTOR_BYTES.min(disk.size_bytes() - off) as usize;
        stamp(buf, d as u64, pick, self.generation);
        disk.write_at(off, &buf[..len])?;
        self.gens[d][pick as usize] = self.generation;
        Ok(len as u64)
    }
}

/// Counts shared with whoever watches the writer.
#[derive(Debug, Default)]
pub struct DiskWriterCounters {
    /// Sectors written.
    pub writes: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Writes that failed (the writer stops at the first).
    pub errors: AtomicU64,
}

/// Check every sector of `disk` (read through its current file) against the initial pattern of
/// `spec` and the stamps in `gens` (the writer's generations of this disk, index `d`). Returns
/// the number of sectors that differ. Call with the guest paused.
pub fn check_disk(disk: &Disk, d: u64, spec: &DiskSpec, gens: &[u64]) -> Result<u64, ferry_disk::DiskError> {
    let size = disk.size_bytes();
    let mut bad = 0;
    let mut chunk = vec![0u8; GROUP_BYTES as usize];
    let mut want = vec![0u8; SECTOR_BYTES as usize];
    let mut off = 0;
    while off < size {
        let len = GROUP_BYTES.min(size - off) as usize;
        disk.read_at(off, &mut chunk[..len])?;
        for (i, got) in chunk[..len].chunks(SECTOR_BYTES as usize).enumerate() {
            let sector = off / SECTOR_BYTES + i as u64;
            match gens.get(sector as usize).copied().filter(|&g| g > 0) {
                Some(g) => stamp(&mut want, d, sector, g),
                None => {
                    if !initial_sector(spec, sector, &mut want) {
                        want.fill(0);
                    }
                }
            }
            if got != &want[..got.len()] {
                bad += 1;
            }
        }
        off += GROUP_BYTES;
    }
    Ok(bad)
}

/// Open each spec's image as a [`Disk`].
pub fn open_disks(specs: &[DiskSpec]) -> Result<Vec<Arc<Disk>>, ferry_disk::DiskError> {
    specs.iter().map(|s| Disk::open(&s.path).map(Arc::new)).collect()
}

/// The working-set sectors of each disk: `ws_bytes` per disk, at most the disk.
pub fn working_set_sectors(specs: &[DiskSpec], ws_bytes: u64) -> Vec<u64> {
    specs.iter().map(|s| ws_bytes.min(s.size_bytes).div_ceil(SECTOR_BYTES)).collect()
}

/// Shared handle on the writer's state.
pub type SharedDiskState = Arc<Mutex<DiskWriterState>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_sparse_odd_sized_and_checkable() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DiskSpec {
            path: dir.path().join("d.img"),
            size_bytes: 9 * GROUP_BYTES + 12_345,
            allocated_pct: 50,
            seed: 3,
        };
        create_image(&spec).unwrap();
        let disk = Arc::new(Disk::open(&spec.path).unwrap());
        assert_eq!(disk.size_bytes(), spec.size_bytes);
        let alloc = disk.allocated_bytes().unwrap();
        assert!(alloc > 0 && alloc < spec.size_bytes, "half allocated: {alloc} of {}", spec.size_bytes);
        let ws = working_set_sectors(std::slice::from_ref(&spec), u64::MAX);
        let mut st = DiskWriterState::new(1, &ws);
        assert_eq!(check_disk(&disk, 0, &spec, &st.gens[0]).unwrap(), 0);
        let mut buf = vec![0u8; SECTOR_BYTES as usize];
        for _ in 0..500 {
            st.write_one(std::slice::from_ref(&disk), &mut buf).unwrap();
        }
        assert_eq!(check_disk(&disk, 0, &spec, &st.gens[0]).unwrap(), 0, "stamps are tracked");
        // A sector the writer's state does not know about is caught.
        let mut old = st.gens[0].clone();
        let i = old.iter().position(|&g| g > 0).unwrap();
        old[i] = 0;
        assert_eq!(check_disk(&disk, 0, &spec, &old).unwrap(), 1);
        let mut last = [0u8];
        disk.read_at(spec.size_bytes - 1, &mut last).unwrap();
        disk.write_at(spec.size_bytes - 1, &[!last[0]]).unwrap();
        assert_eq!(check_disk(&disk, 0, &spec, &st.gens[0]).unwrap(), 1, "a changed tail byte is caught");
    }
}
