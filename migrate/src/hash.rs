//! Page hashes for image verification, read through volatile loads (the source guest may be
//! writing the page; a torn read only makes the page dirty again, and it is re-sent and re-hashed).

use ferry_transport::wire::PAGE_SIZE;

const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5];

/// Hash of one 4 KiB page (four independent multiply-rotate lanes, then mixed).
///
/// # Safety
/// `p` must be 8-byte aligned and valid for reads of 4096 bytes.
pub unsafe fn page_hash(p: *const u8) -> u64 {
    let w = p as *const u64;
    let mut l = [K[0], K[1], K[2], K[3]];
    let mut i = 0;
    while i < PAGE_SIZE / 8 {
        for (j, lane) in l.iter_mut().enumerate() {
            // SAFETY: i + j < 512 words = 4096 bytes, inside the caller's page.
            let v = unsafe { w.add(i + j).read_volatile() };
            *lane = (*lane ^ v).wrapping_mul(K[j] | 1).rotate_left(29);
        }
        i += 4;
    }
    let mut h = l[0] ^ l[1].rotate_left(17) ^ l[2].rotate_left(31) ^ l[3].rotate_left(47);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^ (h >> 29)
}

/// The hash every zero page has.
pub fn zero_page_hash() -> u64 {
    static ZERO: [u64; PAGE_SIZE / 8] = [0; PAGE_SIZE / 8];
    // SAFETY: ZERO is a static, aligned, 4096 bytes.
    unsafe { page_hash(ZERO.as_ptr() as *const u8) }
}

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

    #[test]
    fn differs_on_any_word() {
        let mut a = vec![0u64; 512];
        // SAFETY: a Vec<u64> of 512 words is 4096 aligned bytes.
        let h0 = unsafe { page_hash(a.as_ptr() as *const u8) };
        assert_eq!(h0, zero_page_hash());
        for i in [0, 1, 2, 3, 255, 511] {
            a[i] = 1;
            // SAFETY: as above.
            assert_ne!(unsafe { page_hash(a.as_ptr() as *const u8) }, h0, "word {i}");
            a[i] = 0;
        }
    }
}
