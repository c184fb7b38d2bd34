//! [`VolatileSlice`]: a borrowed view of guest memory, and the raw helpers of the hot paths.
//!
//! The access contract (volatile or raw-pointer access only, never a reference) is written once,
//! in the [crate docs](crate#access-volatile-never-a-reference).

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::PAGE_SIZE;

/// `len` bytes of guest memory, valid for as long as the borrow `'a` of the map (or mapping) it
/// came from. Reads and writes are volatile; see the [crate docs](crate#access-volatile-never-a-reference).
#[derive(Clone, Copy)]
pub struct VolatileSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

impl std::fmt::Debug for VolatileSlice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileSlice").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

// SAFETY: the slice is an address range whose validity is tied to `'a`; every access through it is
// volatile or raw (crate contract), so sharing it between threads creates no reference.
unsafe impl Send for VolatileSlice<'_> {}
// SAFETY: as above.
unsafe impl Sync for VolatileSlice<'_> {}

impl<'a> VolatileSlice<'a> {
    /// A slice over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped, readable and writable for all of `'a`, and accessed by
    /// anyone else only under the crate's access contract (no references over it).
    #[inline]
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len, _borrow: PhantomData }
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte. Valid for `'a`; dereferencing it (or passing it to the
    /// kernel or a device) is `unsafe` and must follow the crate's access contract.
    #[inline]
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// `len` bytes at `off`, or `None` past the end.
    #[inline]
    pub fn subslice(&self, off: usize, len: usize) -> Option<VolatileSlice<'a>> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: off + len <= self.len: inside this slice, valid for 'a.
        Some(unsafe { Self::new(self.ptr.add(off), len) })
    }

    /// Read the byte at `off`. Panics past the end.
    pub fn read_u8(&self, off: usize) -> u8 {
        assert!(off < self.len, "read at {off} past a slice of {}", self.len);
        // SAFETY: off < len, inside the slice; volatile read (crate contract).
        unsafe { self.ptr.add(off).read_volatile() }
    }

    /// Write the byte at `off`. Panics past the end.
    pub fn write_u8(&self, off: usize, v: u8) {
        assert!(off < self.len, "write at {off} past a slice of {}", self.len);
        // SAFETY: off < len, inside the slice; volatile write (crate contract).
        unsafe { self.ptr.add(off).write_volatile(v) }
    }

    /// Copy `dst.len()` bytes from `off` into `dst` with volatile reads (8 bytes at a time where
    /// both are 8-byte aligned). Panics past the end.
    pub fn read_into(&self, off: usize, dst: &mut [u8]) {
        assert!(off.checked_add(dst.len()).is_some_and(|e| e <= self.len), "read past the slice");
        // SAFETY: bounds checked above.
        let src = unsafe { self.ptr.add(off) };
        if (src.as_ptr() as usize).is_multiple_of(8) && dst.len().is_multiple_of(8) {
            // SAFETY: 8-byte aligned, dst.len() bytes valid (checked above).
            unsafe { copy_from_guest(dst, src) };
        } else {
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < dst.len(), inside the checked range.
                *d = unsafe { src.add(i).read_volatile() };
            }
        }
    }

    /// Copy `src` to `off` with volatile writes (8 bytes at a time where aligned). Panics past
    /// the end.
    pub fn write_from(&self, off: usize, src: &[u8]) {
        assert!(off.checked_add(src.len()).is_some_and(|e| e <= self.len), "write past the slice");
        // SAFETY: bounds checked above.
        let dst = unsafe { self.ptr.add(off) };
        if (dst.as_ptr() as usize).is_multiple_of(8) && src.len().is_multiple_of(8) {
            let d = dst.as_ptr() as *mut u64;
            for (i, c) in src.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(c.try_into().expect("chunks_exact(8)"));
                // SAFETY: word i lies in the checked range; aligned.
                unsafe { d.add(i).write_volatile(v) };
            }
        } else {
            for (i, &b) in src.iter().enumerate() {
                // SAFETY: i < src.len(), inside the checked range.
                unsafe { dst.add(i).write_volatile(b) };
            }
        }
    }

    /// Is this slice one page of zeros? False for a slice that is not one aligned page.
    #[inline]
    pub fn is_zero_page(&self) -> bool {
        if self.len != PAGE_SIZE || !(self.ptr.as_ptr() as usize).is_multiple_of(8) {
            return false;
        }
        // SAFETY: one page, 8-byte aligned, valid for 'a.
        unsafe { page_is_zero(self.ptr) }
    }

    /// Fault the slice in for writing without changing its contents (`MADV_POPULATE_WRITE`,
    /// Linux 5.14+). False if the kernel refused (older kernel, or the slice is not page aligned).
    pub fn populate_write(&self) -> bool {
        if !(self.ptr.as_ptr() as usize).is_multiple_of(PAGE_SIZE) {
            return false;
        }
        // SAFETY: the range is mapped for 'a; populating faults pages in and never changes
        // what they hold.
        unsafe { populate_write(self.ptr, self.len) }
    }
}

/// Is the 4 KiB page at `p` all zeros? Reads with volatile 8-byte loads, 64 bytes at a time,
/// stopping at the first non-zero block (most data pages stop at the first block).
///
/// # Safety
/// `p` must be 8-byte aligned and valid for reads of 4096 bytes.
#[inline]
pub unsafe fn page_is_zero(p: NonNull<u8>) -> bool {
    let w = p.as_ptr() as *const u64;
    let mut i = 0;
    while i < PAGE_SIZE / 8 {
        // SAFETY: i + 7 < 512 words = 4096 bytes, inside the page the caller vouched for.
        let acc = unsafe {
            w.add(i).read_volatile()
                | w.add(i + 1).read_volatile()
                | w.add(i + 2).read_volatile()
                | w.add(i + 3).read_volatile()
                | w.add(i + 4).read_volatile()
                | w.add(i + 5).read_volatile()
                | w.add(i + 6).read_volatile()
                | w.add(i + 7).read_volatile()
        };
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    true
}

/// Fault `len` bytes at `p` in for writing without changing their contents (MADV_POPULATE_WRITE,
/// Linux 5.14+; cheap where pages are already present). False if the kernel refused.
///
/// # Safety
/// `p` must be page aligned and `p..p + len` mapped for as long as the call runs.
pub unsafe fn populate_write(p: NonNull<u8>, len: usize) -> bool {
    // SAFETY: the caller vouches for the range; the advice only faults pages in.
    unsafe {
        libc::madvise(p.as_ptr() as *mut libc::c_void, len, 23 /* MADV_POPULATE_WRITE */) == 0
    }
}

/// Copy `dst.len()` bytes (a multiple of 8) from guest memory at `src` with volatile reads:
/// 32-byte vector reads where the CPU has AVX2 (the sealing send path copies every data page
/// once with this; word by word it ran at about 8 GB/s and cost as much CPU as the encryption
/// itself, measured 2026-12-01) when `src` is 32-byte aligned (guest pages are), 8-byte word
/// reads otherwise and for the tail.
///
/// # Safety
/// `src` must be 8-byte aligned and valid for reads of `dst.len()` bytes.
#[inline]
pub unsafe fn copy_from_guest(dst: &mut [u8], src: NonNull<u8>) {
    debug_assert!(dst.len().is_multiple_of(8));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= 128 && (src.as_ptr() as usize).is_multiple_of(32) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected; the caller's promise for `src`, passed on.
        done = unsafe { copy_from_guest_avx2(dst, src.as_ptr()) };
    }
    let s = src.as_ptr() as *const u64;
    for i in done / 8..dst.len() / 8 {
        // SAFETY: i * 8 + 8 <= dst.len(), inside the range the caller vouched for.
        let v = unsafe { s.add(i).read_volatile() };
        dst[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

/// The AVX2 body of [`copy_from_guest`]: copies whole 128-byte blocks, returns how many bytes.
///
/// # Safety
/// The CPU must support AVX2; `src` 32-byte aligned and valid for reads of `dst.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_from_guest_avx2(dst: &mut [u8], src: *const u8) -> usize {
    use std::arch::x86_64::*;
    let n = dst.len() / 128 * 128;
    let d = dst.as_mut_ptr();
    let mut off = 0;
    while off < n {
        // SAFETY: off + 128 <= n <= dst.len(): inside the source range the caller vouched for
        // (volatile 32-byte reads, aligned as `src` is) and inside `dst` (unaligned stores).
        unsafe {
            let s = src.add(off) as *const __m256i;
            let (a, b, c, e) =
                (s.read_volatile(), s.add(1).read_volatile(), s.add(2).read_volatile(), s.add(3).read_volatile());
            let o = d.add(off) as *mut __m256i;
            _mm256_storeu_si256(o, a);
            _mm256_storeu_si256(o.add(1), b);
            _mm256_storeu_si256(o.add(2), c);
            _mm256_storeu_si256(o.add(3), e);
        }
        off += 128;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnonMemory;

    #[test]
    fn bounds_unaligned_access_and_zero_pages() {
        let m = AnonMemory::new(2 * PAGE_SIZE, false).unwrap();
        let s = m.slice();
        assert!(s.subslice(PAGE_SIZE, PAGE_SIZE + 1).is_none());
        assert!(s.subslice(usize::MAX, 2).is_none());
        let p1 = s.subslice(PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(p1.is_zero_page());
        p1.write_from(3, &[1, 2, 3]); // unaligned: byte path
        let mut b = [0u8; 5];
        p1.read_into(2, &mut b);
        assert_eq!(b, [0, 1, 2, 3, 0]);
        assert!(!p1.is_zero_page());
        assert!(s.subslice(0, PAGE_SIZE).unwrap().is_zero_page());
        assert!(!s.is_zero_page(), "two pages are not one page");
        let _ = s.populate_write(); // may be refused by old kernels; contents stay either way
        assert_eq!(p1.read_u8(4), 2, "populating keeps contents");
    }

    #[test]
    fn copy_from_guest_copies_every_length_and_alignment() {
        let m = AnonMemory::new(2 * PAGE_SIZE, false).unwrap();
        let s = m.slice();
        let pattern: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i * 31 % 253) as u8).collect();
        s.write_from(0, &pattern);
        // Aligned (vector body and word tail), 8-aligned only (word path), short (< one block).
        for (off, len) in [(0, 2 * PAGE_SIZE), (0, 4096 + 8 * 13), (64, 1000), (8, 4096), (32, 120), (40, 8), (0, 0)] {
            let mut dst = vec![0xEEu8; len];
            // SAFETY: off + len <= 2 pages of the mapping, off is 8-byte aligned.
            unsafe { copy_from_guest(&mut dst, s.subslice(off, len.max(1)).unwrap().ptr) };
            assert_eq!(dst, pattern[off..off + len], "offset {off}, {len} bytes");
        }
    }

    #[test]
    #[should_panic(expected = "past the slice")]
    fn a_read_past_the_end_panics() {
        let m = AnonMemory::new(PAGE_SIZE, false).unwrap();
        m.slice().read_into(PAGE_SIZE - 4, &mut [0u8; 8]);
    }
}
