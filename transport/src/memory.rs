//! Guest memory as the transport sees it: guest-physical regions backed by host mappings.
//!
//! The source's guest may write its memory while pages are sent, so this module never builds a
//! `&[u8]` over guest memory: senders pass raw pointers to the kernel (`writev`) or copy with
//! volatile word reads into a staging buffer. The destination's guest is not running while pages
//! arrive, and within one round every page is in at most one batch, so receivers write into it
//! through raw pointers (`readv` straight to the GPA, no intermediate copy).

use std::ptr::NonNull;

use crate::wire::PAGE_SIZE;

/// Where a sender reads guest pages.
///
/// # Safety
/// An implementation promises that a pointer it returns for `(gpa, len)` is valid for reads of
/// `len` bytes for as long as the implementing value lives. The memory may change concurrently
/// (the guest runs): callers only use volatile reads or pass the pointer to the kernel.
pub unsafe trait MemorySource: Send + Sync {
    /// Host address of `len` bytes at `gpa`, all within one region, or `None`.
    fn source_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>>;

    /// The regions behind this source, for backends that register memory with a device (`rdma`).
    /// Empty if the implementation does not list them (such a source cannot be sent over rdma).
    fn regions(&self) -> &[Region] {
        &[]
    }
}

/// Where a receiver writes guest pages.
///
/// # Safety
/// An implementation promises that a pointer it returns for `(gpa, len)` is valid for writes of
/// `len` bytes for as long as the implementing value lives, and that nothing else reads or writes
/// that memory while a receiver writes it (the destination guest is not running).
pub unsafe trait MemorySink: Send + Sync {
    /// Host address of `len` bytes at `gpa`, all within one region, or `None`.
    fn sink_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>>;

    /// The regions behind this sink, for backends that register memory with a device (`rdma`).
    /// Empty if the implementation does not list them (such a sink cannot receive over rdma).
    fn regions(&self) -> &[Region] {
        &[]
    }
}

/// One guest-physical region.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Host address of the start.
    pub host: NonNull<u8>,
    /// Length in bytes (a multiple of the page size).
    pub len: usize,
}

/// Why a memory map cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// A region that is not page aligned.
    #[error("region at gpa {0:#x} is not page aligned")]
    Unaligned(u64),
    /// Two regions overlap.
    #[error("regions at gpa {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    /// mmap failed.
    #[error("mapping {len} bytes failed: {err}")]
    Map {
        /// Bytes asked for.
        len: usize,
        /// OS error.
        err: String,
    },
}

/// A set of guest-physical regions, sorted, page aligned and disjoint.
#[derive(Debug, Clone)]
pub struct MemoryMap {
    regions: Vec<Region>,
}

// SAFETY: a MemoryMap only holds addresses; what may be done through them is governed by the
// MemorySource/MemorySink contracts, which are what `MemoryMap::new`'s caller promised.
unsafe impl Send for MemoryMap {}
// SAFETY: as above; the map itself is immutable after construction.
unsafe impl Sync for MemoryMap {}

impl MemoryMap {
    /// Build a map.
    ///
    /// # Safety
    /// Every region's host range must stay mapped, readable and writable for as long as the
    /// `MemoryMap` (or a clone) lives, and the caller must uphold the [`MemorySink`] contract
    /// (no concurrent access) whenever the map is used as a sink.
    pub unsafe fn new(mut regions: Vec<Region>) -> Result<Self, MemoryError> {
        regions.sort_by_key(|r| r.gpa);
        for r in &regions {
            if r.gpa % PAGE_SIZE as u64 != 0 || r.len % PAGE_SIZE != 0 {
                return Err(MemoryError::Unaligned(r.gpa));
            }
        }
        for w in regions.windows(2) {
            if w[0].gpa + w[0].len as u64 > w[1].gpa {
                return Err(MemoryError::Overlap(w[0].gpa, w[1].gpa));
            }
        }
        Ok(Self { regions })
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len as u64).sum()
    }

    /// Host pointer for `len` bytes at `gpa` if the range lies inside one region.
    pub fn lookup(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let i = self.regions.partition_point(|r| r.gpa + r.len as u64 <= gpa);
        let r = self.regions.get(i)?;
        let off = gpa.checked_sub(r.gpa)?;
        let end = off.checked_add(len as u64)?;
        if end > r.len as u64 {
            return None;
        }
        // SAFETY: off + len <= r.len, so the result stays inside the region's mapping.
        Some(unsafe { r.host.add(off as usize) })
    }
}

// SAFETY: pointers come from regions the constructor's caller promised valid for the map's life.
unsafe impl MemorySource for MemoryMap {
    fn source_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        self.lookup(gpa, len)
    }

    fn regions(&self) -> &[Region] {
        &self.regions
    }
}

// SAFETY: as above; exclusivity while used as a sink was promised by the constructor's caller.
unsafe impl MemorySink for MemoryMap {
    fn sink_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        self.lookup(gpa, len)
    }

    fn regions(&self) -> &[Region] {
        &self.regions
    }
}

/// Is the 4 KiB page at `p` all zeros? Reads with volatile 8-byte loads, 64 bytes at a time,
/// stopping at the first non-zero block (most data pages stop at the first block).
///
/// # Safety
/// `p` must be 8-byte aligned and valid for reads of 4096 bytes.
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
/// `p` must be page aligned and `p..p + len` part of one or more private anonymous mappings of
/// this process.
pub unsafe fn populate_write(p: NonNull<u8>, len: usize) -> bool {
    // SAFETY: the caller vouches for the range; the advice only faults pages in.
    unsafe {
        libc::madvise(p.as_ptr() as *mut libc::c_void, len, 23 /* MADV_POPULATE_WRITE */) == 0
    }
}

/// Copy `dst.len()` bytes (a multiple of 8) from guest memory at `src` with volatile word reads.
///
/// # Safety
/// `src` must be 8-byte aligned and valid for reads of `dst.len()` bytes.
pub unsafe fn copy_from_guest(dst: &mut [u8], src: NonNull<u8>) {
    debug_assert!(dst.len().is_multiple_of(8));
    let s = src.as_ptr() as *const u64;
    for (i, chunk) in dst.chunks_exact_mut(8).enumerate() {
        // SAFETY: i * 8 + 8 <= dst.len(), inside the range the caller vouched for.
        let v = unsafe { s.add(i).read_volatile() };
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Map `len` bytes (a multiple of 4 KiB); mappings of 2 MiB or more start on a 2 MiB boundary
/// (over-mapped, then trimmed), so transparent huge pages can back all of them on any kernel.
fn map_aligned(len: usize, prot: i32, flags: i32) -> Result<NonNull<u8>, MemoryError> {
    const HUGE: usize = 2 << 20;
    let extra = if len >= HUGE { HUGE } else { 0 };
    // SAFETY: anonymous mapping with no address hint; the result is checked below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len + extra, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Map { len, err: std::io::Error::last_os_error().to_string() });
    }
    let start = p as usize;
    let aligned = if extra > 0 { start.div_ceil(HUGE) * HUGE } else { start };
    let (head, tail) = (aligned - start, extra - (aligned - start));
    if head > 0 {
        // SAFETY: [start, aligned) is the front of the mapping just made, unused.
        unsafe { libc::munmap(p, head) };
    }
    if tail > 0 {
        // SAFETY: [aligned + len, start + len + extra) is the back of the mapping just made, unused.
        unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) };
    }
    NonNull::new(aligned as *mut u8).ok_or(MemoryError::Map { len, err: "null mapping".into() })
}

/// A sink that takes no pages: for reading a channel where only control frames may arrive (a
/// page batch then fails with `BadAddress` and nothing is written).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

// SAFETY: never returns a pointer.
unsafe impl MemorySink for NoSink {
    fn sink_ptr(&self, _gpa: u64, _len: usize) -> Option<NonNull<u8>> {
        None
    }
}

/// Anonymous host memory for a guest (or a benchmark's page set), unmapped on drop.
pub struct AnonMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through raw pointers
// under the MemorySource/MemorySink contracts.
unsafe impl Send for AnonMemory {}
// SAFETY: as above.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// Map `len` bytes (rounded up to pages) of zeroed memory. `populate` faults it in now
    /// (MAP_POPULATE) so that receiving into it later costs no page faults; huge pages are asked
    /// for with MADV_HUGEPAGE either way.
    pub fn new(len: usize, populate: bool) -> Result<Self, MemoryError> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        let p = map_aligned(len, libc::PROT_READ | libc::PROT_WRITE, flags)?;
        // SAFETY: p is a fresh mapping of len bytes; madvise only gives a hint and may fail.
        unsafe { libc::madvise(p.as_ptr() as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        Ok(Self { ptr: p, len })
    }

    /// An address range of `len` bytes (a multiple of 4 KiB) mapped inaccessible, for pieces of
    /// other mappings to be moved into with `mremap` (the memory reserve joins slabs this way).
    pub(crate) fn reserve_range(len: usize) -> Result<Self, MemoryError> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        Ok(Self { ptr: map_aligned(len, libc::PROT_NONE, flags)?, len })
    }

    /// Split after `at` bytes (a multiple of 4 KiB, inside the mapping): two values that each own
    /// their part of the mapping (munmap of a part is allowed). `None` for an empty rest.
    pub(crate) fn split_at(self, at: usize) -> (Self, Option<Self>) {
        assert!(at.is_multiple_of(PAGE_SIZE) && at > 0 && at <= self.len);
        let me = std::mem::ManuallyDrop::new(self);
        let rest = (at < me.len).then(|| Self {
            // SAFETY: at < len, inside this mapping, so not null.
            ptr: unsafe { NonNull::new_unchecked(me.ptr.as_ptr().add(at)) },
            len: me.len - at,
        });
        (Self { ptr: me.ptr, len: at }, rest)
    }

    /// Host address.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty (at least one page), provided for API completeness.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fault every page in for writing now, so that later receives cost no page faults. Cheaper
    /// than letting the receive path fault page by page. 2 MiB per call: the kernel holds the
    /// address-space lock while it populates, and a thread preempted in one long call would hold
    /// up every mmap of the process.
    pub fn prefault(&self) {
        const STEP: usize = 2 << 20;
        for off in (0..self.len).step_by(STEP) {
            // SAFETY: off < len: inside this mapping, page aligned, so not null.
            let p = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) };
            // SAFETY: [p, p + n) lies inside this private anonymous mapping.
            if !unsafe { populate_write(p, STEP.min(self.len - off)) } {
                // Old kernel: one write per page instead.
                for off in (0..self.len).step_by(PAGE_SIZE) {
                    // SAFETY: off < len, inside this mapping; writing a zero byte keeps it zeroed.
                    unsafe { self.ptr.as_ptr().add(off).write_volatile(0) };
                }
                return;
            }
        }
    }

    /// A one-region map of this memory at guest-physical `gpa`.
    ///
    /// # Safety
    /// The map must not outlive `self`, and the [`MemorySink`] exclusivity contract must hold
    /// while it is used as a sink.
    pub unsafe fn map_at(&self, gpa: u64) -> Result<MemoryMap, MemoryError> {
        // SAFETY: forwarded to the caller's promise above.
        unsafe { MemoryMap::new(vec![Region { gpa, host: self.ptr, len: self.len }]) }
    }

    /// Read a byte (tests and checks; volatile).
    pub fn read_byte(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: off < len, inside this mapping.
        unsafe { self.ptr.as_ptr().add(off).read_volatile() }
    }

    /// Copy bytes out (volatile).
    pub fn read_into(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len && off.is_multiple_of(8) && dst.len().is_multiple_of(8));
        // SAFETY: range checked above; offset keeps 8-byte alignment of the page-aligned mapping.
        unsafe { copy_from_guest(dst, self.ptr.add(off)) }
    }

    /// Write bytes (volatile, word by word).
    pub fn write_from(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len && off.is_multiple_of(8) && src.len().is_multiple_of(8));
        let d = self.ptr.as_ptr() as *mut u64;
        for (i, c) in src.chunks_exact(8).enumerate() {
            let v = u64::from_ne_bytes(c.try_into().expect("chunks_exact(8)"));
            // SAFETY: off/8 + i is inside the mapping by the assert above.
            unsafe { d.add(off / 8 + i).write_volatile(v) };
        }
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_and_lookup() {
        let m = AnonMemory::new(3 * PAGE_SIZE, false).unwrap();
        // SAFETY: m outlives map in this test; nothing else touches m concurrently.
        let map = unsafe { m.map_at(0x10000) }.unwrap();
        let p = map.lookup(0x10000 + PAGE_SIZE as u64, PAGE_SIZE).unwrap();
        // SAFETY: p points at a full page of m.
        assert!(unsafe { page_is_zero(p) });
        m.write_from(PAGE_SIZE + 4088, &[0, 0, 0, 0, 0, 0, 0, 1]);
        // SAFETY: as above.
        assert!(!unsafe { page_is_zero(p) });
        assert!(map.lookup(0x10000 + 2 * PAGE_SIZE as u64, PAGE_SIZE + 1).is_none());
        assert!(map.lookup(0xfff0, 32).is_none());
        assert!(map.lookup(u64::MAX - 4, 8).is_none());
    }

    #[test]
    fn large_mappings_start_on_a_huge_page_boundary() {
        for len in [2 << 20, (3 << 20) + PAGE_SIZE, 64 << 20] {
            let m = AnonMemory::new(len, false).unwrap();
            assert_eq!(m.as_ptr().as_ptr() as usize % (2 << 20), 0, "{len}");
            m.write_from(m.len() - 8, &[1; 8]);
            assert_eq!(m.read_byte(m.len() - 1), 1);
        }
        let small = AnonMemory::new(PAGE_SIZE, false).unwrap();
        assert_eq!(small.len(), PAGE_SIZE);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let m = AnonMemory::new(2 * PAGE_SIZE, false).unwrap();
        let r = Region { gpa: 0, host: m.as_ptr(), len: 2 * PAGE_SIZE };
        let r2 = Region { gpa: PAGE_SIZE as u64, ..r };
        // SAFETY: the map is dropped at once; never used for I/O.
        assert!(matches!(unsafe { MemoryMap::new(vec![r, r2]) }, Err(MemoryError::Overlap(..))));
    }
}
