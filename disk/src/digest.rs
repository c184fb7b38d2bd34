//! A disk's digest: one 64-bit hash per block and a running digest over them (the memory
//! image's [`PageTable`], reused), so a shared-nothing destination can prove that each disk it
//! received equals the source's before it commits, as it proves the memory image.
//!
//! A block hashes as if zero-padded to [`BLOCK_BYTES`] (the tail block too), and a hole hashes
//! as zeros, so a table starts with every entry [`zero_block_hash`] and only blocks that hold
//! data need hashing. The source keeps its table up to date with every block it sends; the
//! destination with every block it writes; at the switchover they compare digests.

use ferry_memory::digest::PageTable;

use crate::BLOCK_BYTES;

/// Hash of a block's bytes (zero-padded to [`BLOCK_BYTES`]; `data` may be shorter).
pub fn block_hash(data: &[u8]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    }
    let rest = chunks.remainder();
    let words_done = data.len() / 8;
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    }
    // Zero padding: a zero word still steps the hash, so the padded length counts.
    for _ in words_done + usize::from(!rest.is_empty())..(BLOCK_BYTES as usize / 8) {
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23);
    }
    h ^ (h >> 29)
}

/// Hash of a block of zeros (a hole).
pub fn zero_block_hash() -> u64 {
    static H: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *H.get_or_init(|| block_hash(&[]))
}

/// A disk's block hashes and digest.
#[derive(Debug)]
pub struct DiskDigest {
    table: PageTable,
}

impl DiskDigest {
    /// A disk of `blocks` blocks, all zero.
    pub fn new(blocks: u64) -> Self {
        Self { table: PageTable::new(blocks as usize, zero_block_hash()) }
    }

    /// Block `b` now holds `data` (zero-padded).
    pub fn set(&self, b: u64, data: &[u8]) {
        self.table.set(b as usize, block_hash(data));
    }

    /// Block `b` is now zero.
    pub fn set_zero(&self, b: u64) {
        self.table.set(b as usize, zero_block_hash());
    }

    /// The digest (O(1)).
    pub fn digest(&self) -> u64 {
        self.table.digest()
    }

    /// Hash every block of `disk` as it is now (a full read; holes found with `SEEK_DATA` are
    /// not read).
    pub fn of_disk(disk: &crate::Disk) -> Result<Self, crate::DiskError> {
        let d = Self::new(disk.blocks());
        let extents = {
            let b = disk.backing();
            crate::image::allocated_extents(&b.file, disk.size_bytes())
                .map_err(|err| crate::DiskError::Io { path: b.path.clone(), err })?
        };
        let mut buf = vec![0u8; BLOCK_BYTES as usize];
        let mut done_to = 0;
        for (start, len) in extents {
            let first = (start / BLOCK_BYTES).max(done_to);
            let end = (start + len).div_ceil(BLOCK_BYTES);
            for b in first..end {
                let n = disk.block_len(b) as usize;
                disk.read_at(b * BLOCK_BYTES, &mut buf[..n])?;
                d.set(b, &buf[..n]);
            }
            done_to = end;
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_hash_as_zeros_and_every_byte_counts() {
        assert_eq!(block_hash(&vec![0u8; BLOCK_BYTES as usize]), zero_block_hash());
        assert_eq!(block_hash(&[0u8; 999]), zero_block_hash(), "a short zero tail is a hole");
        let mut b = vec![0u8; 1000];
        b[999] = 1;
        let h = block_hash(&b);
        assert_ne!(h, zero_block_hash());
        b[999] = 0;
        b[998] = 1;
        assert_ne!(block_hash(&b), h, "position counts");
        let d = DiskDigest::new(5);
        let z = d.digest();
        d.set(4, &b);
        assert_ne!(d.digest(), z);
        d.set_zero(4);
        assert_eq!(d.digest(), z);
    }

    #[test]
    fn digest_of_a_disk_matches_the_blocks_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let size = 5 * BLOCK_BYTES + 77;
        let f = crate::image::create_sparse(&p, size).unwrap();
        drop(f);
        let disk = crate::Disk::open(&p).unwrap();
        let want = DiskDigest::new(disk.blocks());
        assert_eq!(DiskDigest::of_disk(&disk).unwrap().digest(), want.digest());
        disk.write_at(size - 5, &[1, 2, 3, 4, 5]).unwrap();
        disk.write_at(BLOCK_BYTES, &[9; 10]).unwrap();
        let mut tail = vec![0u8; 77];
        tail[72..].copy_from_slice(&[1, 2, 3, 4, 5]);
        want.set(5, &tail);
        let mut b1 = vec![0u8; BLOCK_BYTES as usize];
        b1[..10].fill(9);
        want.set(1, &b1);
        assert_eq!(DiskDigest::of_disk(&disk).unwrap().digest(), want.digest());
    }
}
