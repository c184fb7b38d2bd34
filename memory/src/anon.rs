//! Anonymous host memory: what the synthetic and KVM guests run on, and the reserve's slabs.
//!
//! An [`AnonMemory`] owns one mapping and unmaps it on drop. Put it in an `Arc` to make maps of it
//! ([`AnonMemory::map_at`]): each map holds a clone of that `Arc`, so the mapping lives until the
//! last map and the last owner are gone.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::map::{MemoryError, MemoryMap, Region};
use crate::volatile::{populate_write, VolatileSlice};
use crate::PAGE_SIZE;

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

/// Anonymous host memory for a guest (or a benchmark's page set), unmapped on drop.
pub struct AnonMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl std::fmt::Debug for AnonMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnonMemory").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

// SAFETY: the mapping is plain memory owned by this value; it is only accessed under the crate's
// access contract (volatile or raw-pointer access, no references).
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

    /// Host address of the mapping, for the reserve's `mremap` (crate-internal: outside, the
    /// address is reached through [`AnonMemory::slice`], which borrows `self`).
    pub(crate) fn raw(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The whole mapping, borrowed.
    pub fn slice(&self) -> VolatileSlice<'_> {
        // SAFETY: the mapping is ours for as long as `self` is borrowed.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
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

    /// A one-region map of this memory at guest-physical `gpa`. The map holds a clone of the
    /// `Arc`: the memory stays mapped while either lives.
    pub fn map_at(self: &Arc<Self>, gpa: u64) -> Result<MemoryMap, MemoryError> {
        MemoryMap::from_anon([(gpa, self.clone())])
    }

    /// The region descriptor of this mapping at `gpa`.
    pub(crate) fn region_at(&self, gpa: u64) -> Region {
        Region { gpa, host: self.ptr, len: self.len }
    }

    /// Read a byte (tests and checks; volatile).
    pub fn read_byte(&self, off: usize) -> u8 {
        self.slice().read_u8(off)
    }

    /// Copy bytes out (volatile).
    pub fn read_into(&self, off: usize, dst: &mut [u8]) {
        self.slice().read_into(off, dst)
    }

    /// Write bytes (volatile).
    pub fn write_from(&self, off: usize, src: &[u8]) {
        self.slice().write_from(off, src)
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created; no map refers to it (maps
        // hold an `Arc` of it, so it is only dropped after the last map).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_mappings_start_on_a_huge_page_boundary() {
        for len in [2 << 20, (3 << 20) + PAGE_SIZE, 64 << 20] {
            let m = AnonMemory::new(len, false).unwrap();
            assert_eq!(m.slice().as_ptr().as_ptr() as usize % (2 << 20), 0, "{len}");
            m.write_from(m.len() - 8, &[1; 8]);
            assert_eq!(m.read_byte(m.len() - 1), 1);
        }
        let small = AnonMemory::new(PAGE_SIZE, false).unwrap();
        assert_eq!(small.len(), PAGE_SIZE);
    }

    #[test]
    fn a_map_keeps_the_memory_mapped_after_its_owner_is_dropped() {
        let m = Arc::new(AnonMemory::new(3 * PAGE_SIZE, false).unwrap());
        m.write_from(2 * PAGE_SIZE, &0xfeed_f00d_u64.to_ne_bytes());
        let map = m.map_at(0x4000).unwrap();
        let weak = Arc::downgrade(&m);
        drop(m);
        assert!(weak.upgrade().is_some(), "the map holds the mapping");
        let clone = map.clone();
        drop(map);
        let mut w = [0u8; 8];
        clone.lookup(0x4000 + 2 * PAGE_SIZE as u64, PAGE_SIZE).expect("inside").read_into(0, &mut w);
        assert_eq!(u64::from_ne_bytes(w), 0xfeed_f00d);
        drop(clone);
        assert!(weak.upgrade().is_none(), "unmapped after the last map");
    }
}
