//! Image verification: the per-page hashes come from one volatile pass over each page
//! ([`ferry_transport::scan`]); the digest folds the table of page hashes in page order.

pub use ferry_transport::scan::{scan_page, scan_run, zero_page_hash, PageScan};

/// Digest over a table of page hashes (order matters).
pub fn digest(table: &[std::sync::atomic::AtomicU64]) -> u64 {
    use std::sync::atomic::Ordering;
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for (i, e) in table.iter().enumerate() {
        h = (h ^ e.load(Ordering::Relaxed) ^ i as u64).wrapping_mul(0x100_0000_01B3).rotate_left(23);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn digest_depends_on_order_and_every_entry() {
        let t = |v: &[u64]| digest(&v.iter().map(|&x| AtomicU64::new(x)).collect::<Vec<_>>());
        let base = t(&[1, 2, 3, 4]);
        assert_ne!(base, t(&[2, 1, 3, 4]));
        assert_ne!(base, t(&[1, 2, 3, 5]));
        assert_ne!(base, t(&[1, 2, 3]));
        assert_eq!(base, t(&[1, 2, 3, 4]));
    }
}
