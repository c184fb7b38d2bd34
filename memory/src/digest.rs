//! The image digest: the per-page hashes come from one volatile pass over each page
//! ([`crate::scan`]); [`PageTable`] keeps them with a running digest, which source and
//! destination compare at switchover (the exchange itself is the migration protocol's, in
//! `ferry-migrate`).
//!
//! The digest is a sum over pages of a mixed term of (page index, page hash), kept up to date as
//! entries change: replacing an entry adds the difference of its two terms. Reading it at
//! switchover is O(1), so the downtime does not grow with guest memory (folding a table of 2 M
//! entries took ~4 ms per side at 8 GiB). A changed page changes its term pseudo-randomly; two
//! changes cancel with probability 2^-64. A migration keys both the page hashes and the final
//! step ([`PageTable::with_key`]), so the digest that decides commit cannot be recomputed by
//! anyone without the session's key.

use std::sync::atomic::{AtomicU64, Ordering};

fn term(i: usize, h: u64) -> u64 {
    let mut z = h ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One hash per guest page (in region order) and the image digest over them.
pub struct PageTable {
    hashes: Vec<AtomicU64>,
    sum: AtomicU64,
    fin: u64,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable").field("pages", &self.hashes.len()).finish_non_exhaustive()
    }
}

impl PageTable {
    /// `pages` entries, all `init`.
    pub fn new(pages: usize, init: u64) -> Self {
        let sum = (0..pages).fold(0u64, |s, i| s.wrapping_add(term(i, init)));
        Self { hashes: (0..pages).map(|_| AtomicU64::new(init)).collect(), sum: AtomicU64::new(sum), fin: 0 }
    }

    /// [`PageTable::new`] whose digest is finished with `key` (the key the page hashes are
    /// taken with, [`crate::scan::HashKey`]).
    pub fn with_key(pages: usize, init: u64, key: &crate::scan::HashKey) -> Self {
        Self { fin: key.fin, ..Self::new(pages, init) }
    }

    /// Pages.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// No pages.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Set page `i`'s hash (ignored past the end). Concurrent sets stay consistent: each swap
    /// removes exactly the term the previous one added.
    pub fn set(&self, i: usize, h: u64) {
        if let Some(e) = self.hashes.get(i) {
            let old = e.swap(h, Ordering::AcqRel);
            if old != h {
                self.sum.fetch_add(term(i, h).wrapping_sub(term(i, old)), Ordering::AcqRel);
            }
        }
    }

    /// Page `i`'s hash.
    pub fn get(&self, i: usize) -> Option<u64> {
        self.hashes.get(i).map(|e| e.load(Ordering::Acquire))
    }

    /// The image digest (O(1)).
    pub fn digest(&self) -> u64 {
        finish(self.sum.load(Ordering::Acquire) ^ self.fin, self.hashes.len())
    }

    /// The digest computed from every entry again (O(pages); checks the running sum).
    pub fn recompute(&self) -> u64 {
        let sum =
            self.hashes.iter().enumerate().fold(0u64, |s, (i, e)| s.wrapping_add(term(i, e.load(Ordering::Acquire))));
        finish(sum ^ self.fin, self.hashes.len())
    }
}

fn finish(sum: u64, pages: usize) -> u64 {
    term(pages, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_position_and_every_entry_and_tracks_updates() {
        let t = |v: &[u64]| {
            let t = PageTable::new(v.len(), 0);
            for (i, &h) in v.iter().enumerate() {
                t.set(i, h);
            }
            assert_eq!(t.digest(), t.recompute());
            t.digest()
        };
        let base = t(&[1, 2, 3, 4]);
        assert_ne!(base, t(&[2, 1, 3, 4]));
        assert_ne!(base, t(&[1, 2, 3, 5]));
        assert_ne!(base, t(&[1, 2, 3]));
        assert_ne!(base, t(&[1, 2, 3, 4, 0]));
        assert_eq!(base, t(&[1, 2, 3, 4]));
        // Updates in any order, repeated, land at the same digest as a fresh table.
        let x = PageTable::new(4, 9);
        for (i, h) in [(3, 7), (0, 1), (3, 4), (1, 2), (2, 3), (0, 1)] {
            x.set(i, h);
        }
        assert_eq!(x.digest(), base);
        assert_eq!(x.recompute(), base);
    }

    #[test]
    fn a_keyed_table_has_another_digest() {
        let k = crate::scan::HashKey::from_secret(&[9; 32]);
        let (a, b) = (PageTable::new(8, 1), PageTable::with_key(8, 1, &k));
        assert_ne!(a.digest(), b.digest());
        b.set(3, 77);
        assert_eq!(b.digest(), b.recompute());
    }

    #[test]
    fn concurrent_sets_keep_the_sum_consistent() {
        let t = std::sync::Arc::new(PageTable::new(64, 0));
        let hs: Vec<_> = (0..4u64)
            .map(|k| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for n in 0..20_000u64 {
                        t.set(((n * 7 + k) % 64) as usize, n.wrapping_mul(k + 1));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(t.digest(), t.recompute());
    }
}
