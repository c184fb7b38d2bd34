//! A disk's digest: one 64-bit hash per block and a running digest over them (the memory
//! image's [`PageTable`], reused), so a shared-nothing destination can prove that each disk it
//! received equals the source's before it commits, as it proves the memory image.
//!
//! A block hashes as if zero-padded to [`BLOCK_BYTES`] (the tail block too), and a hole hashes
//! as zeros, so a table starts with every entry [`zero_block_hash`] and only blocks that hold
//! data need hashing. The source keeps its table up to date with every block it sends; the
//! destination with every block it writes; at the switchover they compare digests.

use ferry_memory::digest::PageTable;
use ferry_memory::scan::HashKey;

use crate::BLOCK_BYTES;

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The key of a disk digest: the block hash's starting value and word keys, and the key that
/// finishes the digest. A shared-nothing move keys it from the session's image key (as the
/// memory image's digest is keyed), so nobody without the pre-shared key can compute a block's
/// hash or choose other contents that hash alike; [`DigestKey::UNKEYED`] is public (tests, the
/// local move's own checks). Like the page hash it is a keyed hash, not a proven MAC: frames are
/// authenticated by the channels' AEAD.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey {
    seed: u64,
    step: u64,
    zero: u64,
    table: HashKey,
}

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.step == 0 { "DigestKey(unkeyed)" } else { "DigestKey(<secret>)" })
    }
}

impl DigestKey {
    /// The public key.
    pub const UNKEYED: DigestKey = DigestKey { seed: 0x243F_6A88_85A3_08D3, step: 0, zero: 0, table: HashKey::UNKEYED };

    /// A key from a 32-byte secret (a migration's image key). The secret is first bent by a
    /// constant so disk hashes never equal page hashes under the same secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let mut bent = *secret;
        for (b, d) in bent.iter_mut().zip(b"ferry disk digest: domain bend!!") {
            *b ^= d;
        }
        let mut w = [0u64; 4];
        for (i, c) in bent.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let seed = mix(w[0] ^ w[1].rotate_left(21) ^ w[2].rotate_left(42) ^ w[3].rotate_left(63) ^ MUL);
        let step = mix(w[3] ^ w[2].rotate_left(13) ^ w[1].rotate_left(29) ^ w[0].rotate_left(47) ^ seed) | 1;
        let mut k = Self { seed, step, zero: 0, table: HashKey::from_secret(&bent) };
        k.zero = k.hash_uncached(&[]);
        k
    }

    /// Hash of a block's bytes (zero-padded to [`BLOCK_BYTES`]; `data` may be shorter).
    pub fn block_hash(&self, data: &[u8]) -> u64 {
        if data.is_empty() {
            return self.zero_block_hash();
        }
        self.hash_uncached(data)
    }

    /// Hash of a block of zeros (a hole).
    pub fn zero_block_hash(&self) -> u64 {
        if self.step == 0 {
            return zero_block_hash();
        }
        self.zero
    }

    fn hash_uncached(&self, data: &[u8]) -> u64 {
        let mut h = self.seed;
        let mut i = 0u64;
        let mut word = |h: &mut u64, w: u64| {
            i += 1;
            *h = (*h ^ w ^ self.step.wrapping_mul(i)).wrapping_mul(MUL).rotate_left(23);
        };
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            word(&mut h, u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let rest = chunks.remainder();
        let words_done = data.len() / 8;
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            word(&mut h, u64::from_le_bytes(b));
        }
        // Zero padding: a zero word still steps the hash, so the padded length counts.
        for _ in words_done + usize::from(!rest.is_empty())..(BLOCK_BYTES as usize / 8) {
            word(&mut h, 0);
        }
        h ^ (h >> 29)
    }
}

/// Hash of a block's bytes under the public key (zero-padded to [`BLOCK_BYTES`]; `data` may be
/// shorter).
pub fn block_hash(data: &[u8]) -> u64 {
    DigestKey::UNKEYED.hash_uncached(data)
}

/// Hash of a block of zeros (a hole) under the public key.
pub fn zero_block_hash() -> u64 {
    static H: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *H.get_or_init(|| DigestKey::UNKEYED.hash_uncached(&[]))
}

/// A disk's block hashes and digest.
#[derive(Debug)]
pub struct DiskDigest {
    table: PageTable,
    key: DigestKey,
}

impl DiskDigest {
    /// A disk of `blocks` blocks, all zero, under the public key.
    pub fn new(blocks: u64) -> Self {
        Self::keyed(blocks, &DigestKey::UNKEYED)
    }

    /// A disk of `blocks` blocks, all zero, under `key`.
    pub fn keyed(blocks: u64, key: &DigestKey) -> Self {
        Self { table: PageTable::with_key(blocks as usize, key.zero_block_hash(), &key.table), key: key.clone() }
    }

    /// Block `b` now holds `data` (zero-padded).
    pub fn set(&self, b: u64, data: &[u8]) {
        self.table.set(b as usize, self.key.block_hash(data));
    }

    /// Block `b` is now zero.
    pub fn set_zero(&self, b: u64) {
        self.table.set(b as usize, self.key.zero_block_hash());
    }

    /// The digest (O(1)).
    pub fn digest(&self) -> u64 {
        self.table.digest()
    }

    /// Hash every block of `disk` as it is now (a full read; holes found with `SEEK_DATA` are
    /// not read).
    pub fn of_disk(disk: &crate::Disk) -> Result<Self, crate::DiskError> {
        Self::of_disk_keyed(disk, &DigestKey::UNKEYED)
    }

    /// [`DiskDigest::of_disk`] under `key`.
    pub fn of_disk_keyed(disk: &crate::Disk, key: &DigestKey) -> Result<Self, crate::DiskError> {
        let d = Self::keyed(disk.blocks(), key);
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
    fn a_keyed_digest_differs_by_key_and_keeps_the_rules() {
        let (a, b) = (DigestKey::from_secret(&[1; 32]), DigestKey::from_secret(&[2; 32]));
        let data = vec![7u8; 1000];
        assert_ne!(a.block_hash(&data), b.block_hash(&data), "the key changes every hash");
        assert_ne!(a.block_hash(&data), block_hash(&data));
        assert_eq!(a.block_hash(&vec![0u8; BLOCK_BYTES as usize]), a.zero_block_hash(), "holes hash as zeros");
        assert_eq!(a.block_hash(&[0u8; 999]), a.zero_block_hash());
        let (da, db) = (DiskDigest::keyed(4, &a), DiskDigest::keyed(4, &b));
        assert_ne!(da.digest(), db.digest(), "even an empty disk's digest needs the key");
        da.set(3, &data);
        let d2 = DiskDigest::keyed(4, &a);
        d2.set(3, &data);
        assert_eq!(da.digest(), d2.digest());
        d2.set_zero(3);
        assert_ne!(da.digest(), d2.digest());
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
