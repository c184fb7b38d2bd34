//! One pass over a guest page: is it all zero, and its 64-bit hash.
//!
//! The sender must know both for every page it sends (zero pages go as one bit; the hash goes into
//! the image checksum the destination verifies), and the destination hashes what it received. On
//! loopback this scan competes with the TCP copy for the same two cores, so it reads each page
//! once, with 32-byte vector loads where the CPU has AVX2 (a scalar path computes the same value,
//! so two hosts with different CPUs agree).
//!
//! The hash is an XXH3-style accumulation: eight 64-bit lanes, each 8-byte word `d` at a position
//! with key `k` adds `lo32(d ^ k) * hi32(d ^ k)` to its lane and the word itself to the neighbour
//! lane; keys change with the position, so moved words change the hash; a final fold mixes the
//! lanes. It detects corruption. A migration keys it ([`HashKey`], from a secret both ends derive
//! in the handshake and nobody else can): the lanes' and keys' starting values are secret, so
//! someone who sees or writes pages (one-sided RDMA writes are not sealed) cannot compute a page's
//! hash, nor the image digest, and cannot choose other contents that hash alike. It is a keyed
//! hash in UMAC's NH family, not a proven MAC; frames are authenticated by the channels' AEAD.
//!
//! Guest memory is only read with volatile loads: the source guest may be writing the page. A torn
//! read only makes the page dirty again, and it is re-sent and re-scanned in a later round.

use std::ptr::NonNull;

use crate::volatile::VolatileSlice;
use crate::PAGE_SIZE;

/// What one scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageScan {
    /// Every byte was zero.
    pub zero: bool,
    /// The page's hash ([`zero_page_hash`] for a zero page).
    pub hash: u64,
}

const LANE_INIT: [u64; 8] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x27D4_EB2F_1656_67C5,
    0x85EB_CA77_C2B2_AE63,
    0x94D0_49BB_1331_11EB,
    0xBF58_476D_1CE4_E5B9,
    0x2545_F491_4F6C_DD1D,
];
const KEY_INIT: [u64; 4] = [0x7C15_9E37_79B9_7F4A, 0xEB4F_C2B2_AE3D_27D4, 0x79F9_1656_67B1_9E37, 0x67C5_27D4_EB2F_1656];
/// Added to every key lane after each 32-byte chunk.
const KEY_STEP: u64 = 0x6A09_E667_F3BC_C909;
/// 32-byte chunks per page.
const CHUNKS: usize = PAGE_SIZE / 32;

/// The starting values of the page hash: public constants ([`HashKey::UNKEYED`]) or drawn from
/// a secret ([`HashKey::from_secret`]). Two hosts agree on a page's hash only with the same key.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey {
    lanes: [u64; 8],
    keys: [u64; 4],
    /// Mixed into the image digest's final step (see `crate::digest::PageTable::with_key`).
    pub(crate) fin: u64,
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if *self == Self::UNKEYED { "HashKey(unkeyed)" } else { "HashKey(<secret>)" })
    }
}

impl HashKey {
    /// The public constants (quick migration's image files, tests).
    pub const UNKEYED: HashKey = HashKey { lanes: LANE_INIT, keys: KEY_INIT, fin: 0 };

    /// A key from a 32-byte secret (a migration's image key): every starting value is a
    /// different mix of the whole secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let mut w = [0u64; 4];
        for (i, c) in secret.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        let mut n = 0u64;
        let mut next = || {
            // splitmix64 over the secret's words, each output depending on all four.
            n = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = n ^ w[0] ^ w[1].rotate_left(17) ^ w[2].rotate_left(31) ^ w[3].rotate_left(47);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let out = z ^ (z >> 31);
            w.rotate_left(1);
            w[3] ^= out;
            out
        };
        let mut k = Self::UNKEYED;
        k.lanes.iter_mut().for_each(|l| *l = next());
        k.keys.iter_mut().for_each(|l| *l = next());
        k.fin = next();
        k
    }
}

fn fold(acc: &[u64; 8]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &a in acc {
        h = (h ^ a).wrapping_mul(0x9FB2_1C65_1E98_DF25).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^ (h >> 29)
}

/// The scalar definition of the hash (and the path for CPUs without AVX2).
///
/// # Safety
/// `p` must be 32-byte aligned and valid for reads of 4096 bytes.
unsafe fn scan_scalar(p: *const u8, k: &HashKey) -> PageScan {
    let w = p as *const u64;
    let mut acc = k.lanes;
    let mut key = k.keys;
    let mut or = 0u64;
    for j in 0..CHUNKS {
        let mut d = [0u64; 4];
        for (l, v) in d.iter_mut().enumerate() {
            // SAFETY: j * 4 + l < 512 words = 4096 bytes, inside the caller's page.
            *v = unsafe { w.add(j * 4 + l).read_volatile() };
        }
        let a = (j & 1) * 4;
        for l in 0..4 {
            let dk = d[l] ^ key[l];
            acc[a + l] = acc[a + l].wrapping_add(d[l ^ 1]).wrapping_add((dk & 0xFFFF_FFFF).wrapping_mul(dk >> 32));
            or |= d[l];
        }
        for k in &mut key {
            *k = k.wrapping_add(KEY_STEP);
        }
    }
    PageScan { zero: or == 0, hash: fold(&acc) }
}

/// The same hash with AVX2: one 32-byte load per chunk, two accumulators.
///
/// # Safety
/// The CPU must support AVX2; `p` must be 32-byte aligned and valid for reads of 4096 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(p: *const u8, next: *const u8, k: &HashKey) -> PageScan {
    use std::arch::x86_64::*;
    let v = p as *const __m256i;
    // SAFETY: the key's lanes and keys hold 8 and 4 u64; unaligned loads of 32 bytes from them.
    let (mut acc0, mut acc1, mut key) = unsafe {
        (
            _mm256_loadu_si256(k.lanes.as_ptr() as *const __m256i),
            _mm256_loadu_si256(k.lanes.as_ptr().add(4) as *const __m256i),
            _mm256_loadu_si256(k.keys.as_ptr() as *const __m256i),
        )
    };
    let step = _mm256_set1_epi64x(KEY_STEP as i64);
    let mut or = _mm256_setzero_si256();
    let mut j = 0;
    while j < CHUNKS {
        // SAFETY: chunks j and j + 1 (< 128) are inside the caller's page, 32-byte aligned.
        let (d0, d1) = unsafe { (v.add(j).read_volatile(), v.add(j + 1).read_volatile()) };
        if !next.is_null() {
            // A hint only (never faults): the line of the next page at the same offset, so the
            // memory stream does not stall at the page boundary where hardware prefetch stops.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(j * 32) as *const i8);
        }
        let dk0 = _mm256_xor_si256(d0, key);
        let p0 = _mm256_mul_epu32(dk0, _mm256_srli_epi64::<32>(dk0));
        acc0 = _mm256_add_epi64(acc0, _mm256_add_epi64(_mm256_shuffle_epi32::<0x4E>(d0), p0));
        key = _mm256_add_epi64(key, step);
        let dk1 = _mm256_xor_si256(d1, key);
        let p1 = _mm256_mul_epu32(dk1, _mm256_srli_epi64::<32>(dk1));
        acc1 = _mm256_add_epi64(acc1, _mm256_add_epi64(_mm256_shuffle_epi32::<0x4E>(d1), p1));
        key = _mm256_add_epi64(key, step);
        or = _mm256_or_si256(or, _mm256_or_si256(d0, d1));
        j += 2;
    }
    let mut acc = [0u64; 8];
    // SAFETY: acc holds 8 u64 = two unaligned 32-byte stores.
    unsafe {
        _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, acc0);
        _mm256_storeu_si256(acc.as_mut_ptr().add(4) as *mut __m256i, acc1);
    }
    PageScan { zero: _mm256_testz_si256(or, or) == 1, hash: fold(&acc) }
}

/// Scan one page: zero or not, and its hash, in one pass of volatile reads.
///
/// # Safety
/// `p` must be page aligned and valid for reads of 4096 bytes (others may write it meanwhile).
pub unsafe fn scan_page(p: NonNull<u8>) -> PageScan {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected; the caller vouches for the page.
        return unsafe { scan_avx2(p.as_ptr(), std::ptr::null(), &HashKey::UNKEYED) };
    }
    // SAFETY: the caller vouches for the page.
    unsafe { scan_scalar(p.as_ptr(), &HashKey::UNKEYED) }
}

/// Scan the `pages` contiguous pages at `base` in order, calling `each(i, scan)` for page `i`.
/// Faster than page by page on memory that is not in cache: it prefetches the next page while it
/// scans one.
///
/// # Safety
/// `base` must be page aligned and valid for reads of `pages * 4096` bytes (others may write them).
pub unsafe fn scan_run(base: NonNull<u8>, pages: usize, each: impl FnMut(usize, PageScan)) {
    // SAFETY: the caller's promise, passed on.
    unsafe { scan_run_keyed(base, pages, &HashKey::UNKEYED, each) }
}

/// [`scan_run`] with the hash keyed by `key`.
///
/// # Safety
/// As [`scan_run`].
pub unsafe fn scan_run_keyed(base: NonNull<u8>, pages: usize, key: &HashKey, mut each: impl FnMut(usize, PageScan)) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        for i in 0..pages {
            let p = base.as_ptr().wrapping_add(i * PAGE_SIZE);
            let next = if i + 1 < pages { p.wrapping_add(PAGE_SIZE) } else { std::ptr::null() };
            // SAFETY: AVX2 was detected; page i < pages is inside the caller's run.
            each(i, unsafe { scan_avx2(p, next, key) });
        }
        return;
    }
    for i in 0..pages {
        // SAFETY: page i < pages is inside the caller's run.
        each(i, unsafe { scan_scalar(base.as_ptr().add(i * PAGE_SIZE), key) });
    }
}

/// Scan the whole pages of `s` in order, calling `each(i, scan)` for page `i` (see [`scan_run`]).
/// False, and nothing scanned, unless `s` starts page aligned and holds whole pages.
pub fn scan_slice(s: VolatileSlice<'_>, each: impl FnMut(usize, PageScan)) -> bool {
    scan_slice_keyed(s, &HashKey::UNKEYED, each)
}

/// [`scan_slice`] with the hash keyed by `key`.
pub fn scan_slice_keyed(s: VolatileSlice<'_>, key: &HashKey, each: impl FnMut(usize, PageScan)) -> bool {
    if !(s.as_ptr().as_ptr() as usize).is_multiple_of(PAGE_SIZE) || !s.len().is_multiple_of(PAGE_SIZE) {
        return false;
    }
    // SAFETY: page aligned whole pages, valid while `s` borrows its map; volatile reads only.
    unsafe { scan_run_keyed(s.as_ptr(), s.len() / PAGE_SIZE, key, each) };
    true
}

/// The hash every zero page has.
pub fn zero_page_hash() -> u64 {
    zero_page_hash_keyed(&HashKey::UNKEYED)
}

/// The hash every zero page has under `key`.
pub fn zero_page_hash_keyed(key: &HashKey) -> u64 {
    static ZERO: Page = Page([0; PAGE_SIZE]);
    // SAFETY: ZERO is a static, page aligned, 4096 bytes.
    unsafe { scan_scalar(ZERO.0.as_ptr(), key) }.hash
}

#[repr(align(4096))]
struct Page([u8; PAGE_SIZE]);

#[cfg(test)]
mod tests {
    use super::*;

    fn page(mut words: impl FnMut(usize) -> u64) -> Box<Page> {
        let mut p = Box::new(Page([0; PAGE_SIZE]));
        for (i, c) in p.0.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&words(i).to_ne_bytes());
        }
        p
    }

    fn scan(p: &Page) -> PageScan {
        // SAFETY: a Page is 4096 aligned bytes.
        unsafe { scan_page(NonNull::from(&p.0).cast()) }
    }

    #[test]
    fn zero_page() {
        let z = page(|_| 0);
        assert_eq!(scan(&z), PageScan { zero: true, hash: zero_page_hash() });
    }

    #[test]
    fn any_word_or_bit_changes_the_hash_and_zero_flag() {
        let z = page(|_| 0);
        let h0 = scan(&z).hash;
        for i in [0, 1, 2, 3, 4, 7, 255, 256, 510, 511] {
            for bit in [0, 31, 32, 63] {
                let p = page(|w| if w == i { 1 << bit } else { 0 });
                let s = scan(&p);
                assert!(!s.zero, "word {i} bit {bit}");
                assert_ne!(s.hash, h0, "word {i} bit {bit}");
            }
        }
    }

    #[test]
    fn moved_words_change_the_hash() {
        let a = page(|w| {
            if w == 10 {
                0xdead
            } else if w == 20 {
                0xbeef
            } else {
                0
            }
        });
        let b = page(|w| {
            if w == 20 {
                0xdead
            } else if w == 10 {
                0xbeef
            } else {
                0
            }
        });
        let c = page(|w| {
            if w == 10 + 8 {
                0xdead
            } else if w == 20 + 8 {
                0xbeef
            } else {
                0
            }
        });
        assert_ne!(scan(&a).hash, scan(&b).hash);
        assert_ne!(scan(&a).hash, scan(&c).hash);
    }

    #[test]
    fn vector_and_scalar_paths_agree() {
        let mut x = 0x1234_5678_9abc_def1u64;
        for n in 0..64 {
            let p = page(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if n % 4 == 0 {
                    x & 0xff
                } else {
                    x
                }
            });
            // SAFETY: a Page is 4096 aligned bytes.
            let s = unsafe { scan_scalar(p.0.as_ptr(), &HashKey::UNKEYED) };
            assert_eq!(scan(&p), s);
            let key = HashKey::from_secret(&[n as u8; 32]);
            // SAFETY: a Page is 4096 aligned bytes.
            let ks = unsafe { scan_scalar(p.0.as_ptr(), &key) };
            assert_ne!(ks.hash, s.hash, "keyed and unkeyed agree on page {n}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 detected; a Page is 4096 aligned bytes.
                assert_eq!(unsafe { scan_avx2(p.0.as_ptr(), std::ptr::null(), &HashKey::UNKEYED) }, s);
                // SAFETY: as above.
                assert_eq!(unsafe { scan_avx2(p.0.as_ptr(), std::ptr::null(), &key) }, ks);
            }
        }
    }

    #[test]
    fn keys_change_every_hash_and_the_zero_page_hash() {
        let (a, b) = (HashKey::from_secret(&[1; 32]), HashKey::from_secret(&[2; 32]));
        assert_ne!(a, b);
        assert_eq!(a, HashKey::from_secret(&[1; 32]), "deterministic: both ends derive the same");
        let mut one = [1u8; 32];
        one[31] = 3;
        assert_ne!(a, HashKey::from_secret(&one), "the last byte of the secret counts");
        let hz: std::collections::HashSet<u64> =
            [zero_page_hash(), zero_page_hash_keyed(&a), zero_page_hash_keyed(&b)].into_iter().collect();
        assert_eq!(hz.len(), 3);
        let p = page(|w| w as u64 * 3);
        // SAFETY: a Page is 4096 aligned bytes.
        let (x, y) = unsafe { (scan_scalar(p.0.as_ptr(), &a), scan_scalar(p.0.as_ptr(), &b)) };
        assert_ne!(x.hash, y.hash);
        assert_eq!(format!("{a:?}"), "HashKey(<secret>)");
    }

    #[test]
    fn hashes_of_distinct_pages_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..512 {
            for v in 1..=16u64 {
                assert!(seen.insert(scan(&page(|w| if w == i { v } else { 0 })).hash), "word {i} value {v}");
            }
        }
    }
}
