//! Guest memory as guest-physical regions backed by host mappings, and the traits a channel uses
//! to read pages from the source's guest and write them into the destination's.
//!
//! A [`MemoryMap`] keeps its mappings alive (it holds their counted handles), and hands out its
//! memory only as [`VolatileSlice`]s that borrow it; see the [crate docs](crate) for ownership
//! and for the access contract.

use std::sync::Arc;

use crate::anon::AnonMemory;
use crate::volatile::VolatileSlice;
use crate::PAGE_SIZE;

/// Where a sender reads guest pages.
///
/// # Safety
/// An implementation promises that a slice it returns, and every region [`MemorySource::regions`]
/// lists, stays mapped, readable and writable for as long as the borrow of `self` it came from
/// (a backend may register the regions with a device for that long). The memory may change
/// concurrently (the guest runs): callers follow the crate's access contract.
pub unsafe trait MemorySource: Send + Sync {
    /// `len` bytes at `gpa`, all within one region, or `None`.
    fn source_slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>>;

    /// The regions behind this source, for backends that register memory with a device (`rdma`).
    /// Empty if the implementation does not list them (such a source cannot be sent over rdma).
    fn regions(&self) -> &[Region] {
        &[]
    }
}

/// Where a receiver writes guest pages.
///
/// # Safety
/// As for [`MemorySource`]: slices and listed regions stay mapped, readable and writable for as
/// long as the borrow of `self` they came from.
pub unsafe trait MemorySink: Send + Sync {
    /// `len` bytes at `gpa`, all within one region, or `None`.
    fn sink_slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>>;

    /// The regions behind this sink, for backends that register memory with a device (`rdma`).
    /// Empty if the implementation does not list them (such a sink cannot receive over rdma).
    fn regions(&self) -> &[Region] {
        &[]
    }

    /// May a batch of `round` be written? A stream backend asks once it has decoded a batch's
    /// header and before it writes any of the batch's pages (or resolves their addresses), so a
    /// refused batch leaves memory untouched; a one-sided backend (`rdma`), whose pages land
    /// before the batch is announced, asks when the announcement arrives. A refusal (the reason)
    /// fails the receive with `TransportError::BatchRefused`. The destination's engine uses it
    /// for the round rule and to seal memory once the image is verified; by default every batch
    /// is admitted.
    fn admit_batch(&self, round: u32) -> Result<(), String> {
        let _ = round;
        Ok(())
    }
}

/// One guest-physical region: a descriptor. Its host address is only dereferenced by `unsafe`
/// code that holds the map (or the memory) it came from.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Host address of the start.
    pub host: std::ptr::NonNull<u8>,
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

/// Something that keeps mappings alive while a [`MemoryMap`] over them exists (an
/// `Arc<AnonMemory>`, or a VMM's own mapping object).
pub type MappingOwner = Arc<dyn Send + Sync>;

/// A set of guest-physical regions, sorted, page aligned and disjoint, with counted handles to
/// the mappings behind them: the memory stays mapped while the map (or a clone) lives.
#[derive(Clone)]
pub struct MemoryMap {
    regions: Vec<Region>,
    /// Never read: held so the mappings outlive the map.
    _owners: Vec<MappingOwner>,
}

impl std::fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMap").field("regions", &self.regions).field("owners", &self._owners.len()).finish()
    }
}

// SAFETY: the regions are kept mapped by the owners (or by the promise of `MemoryMap::new`'s
// caller); every access through them follows the crate's access contract, so sharing the map
// between threads creates no reference to guest memory.
unsafe impl Send for MemoryMap {}
// SAFETY: as above; the map itself is immutable after construction.
unsafe impl Sync for MemoryMap {}

fn check(mut regions: Vec<Region>) -> Result<Vec<Region>, MemoryError> {
    regions.sort_by_key(|r| r.gpa);
    for r in &regions {
        if !r.gpa.is_multiple_of(PAGE_SIZE as u64) || !r.len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned(r.gpa));
        }
    }
    for w in regions.windows(2) {
        if w[0].gpa.checked_add(w[0].len as u64).is_none_or(|end| end > w[1].gpa) {
            return Err(MemoryError::Overlap(w[0].gpa, w[1].gpa));
        }
    }
    Ok(regions)
}

impl MemoryMap {
    /// A map of foreign memory that nothing in the map keeps alive.
    ///
    /// # Safety
    /// Every region's host range must stay mapped, readable and writable for as long as the map
    /// (or a clone) lives, and be accessed by others only under the crate's access contract.
    pub unsafe fn new(regions: Vec<Region>) -> Result<Self, MemoryError> {
        Ok(Self { regions: check(regions)?, _owners: Vec::new() })
    }

    /// A map of foreign memory kept mapped by `owner` (a VMM's mapping object): the map holds
    /// `owner` until its last clone drops.
    ///
    /// # Safety
    /// Every region's host range must stay mapped, readable and writable for as long as `owner`
    /// lives, and be accessed by others only under the crate's access contract.
    pub unsafe fn with_owner(regions: Vec<Region>, owner: MappingOwner) -> Result<Self, MemoryError> {
        Ok(Self { regions: check(regions)?, _owners: vec![owner] })
    }

    /// A map of anonymous memories, each placed at its guest-physical address; the map holds
    /// each `Arc`, so no memory is unmapped while the map lives.
    pub fn from_anon(parts: impl IntoIterator<Item = (u64, Arc<AnonMemory>)>) -> Result<Self, MemoryError> {
        let (regions, owners): (Vec<Region>, Vec<MappingOwner>) =
            parts.into_iter().map(|(gpa, m)| (m.region_at(gpa), m as MappingOwner)).unzip();
        Ok(Self { regions: check(regions)?, _owners: owners })
    }

    /// A map with no memory (for reading a channel where only control frames may arrive).
    pub fn empty() -> Self {
        Self { regions: Vec::new(), _owners: Vec::new() }
    }

    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len as u64).sum()
    }

    /// `len` bytes at `gpa` if the range lies inside one region.
    #[inline]
    pub fn lookup(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let i = self.regions.partition_point(|r| r.gpa + r.len as u64 <= gpa);
        let r = self.regions.get(i)?;
        let off = gpa.checked_sub(r.gpa)?;
        let end = off.checked_add(len as u64)?;
        if end > r.len as u64 {
            return None;
        }
        // SAFETY: off + len <= r.len, so the range stays inside the region, which the owners
        // (or the unsafe constructor's caller) keep mapped while `self` is borrowed.
        Some(unsafe { VolatileSlice::new(r.host.add(off as usize), len) })
    }
}

// SAFETY: slices and regions come from the map, which keeps them mapped while it is borrowed.
unsafe impl MemorySource for MemoryMap {
    #[inline]
    fn source_slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>> {
        self.lookup(gpa, len)
    }

    fn regions(&self) -> &[Region] {
        &self.regions
    }
}

// SAFETY: as above.
unsafe impl MemorySink for MemoryMap {
    #[inline]
    fn sink_slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>> {
        self.lookup(gpa, len)
    }

    fn regions(&self) -> &[Region] {
        &self.regions
    }
}

/// A sink that takes no pages: for reading a channel where only control frames may arrive (a
/// page batch then fails with `BadAddress` and nothing is written).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

// SAFETY: never returns memory.
unsafe impl MemorySink for NoSink {
    fn sink_slice(&self, _gpa: u64, _len: usize) -> Option<VolatileSlice<'_>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_and_lookup() {
        let m = Arc::new(AnonMemory::new(3 * PAGE_SIZE, false).unwrap());
        let map = m.map_at(0x10000).unwrap();
        let p = map.lookup(0x10000 + PAGE_SIZE as u64, PAGE_SIZE).unwrap();
        assert!(p.is_zero_page());
        m.write_from(PAGE_SIZE + 4088, &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(!p.is_zero_page());
        assert!(map.lookup(0x10000 + 2 * PAGE_SIZE as u64, PAGE_SIZE + 1).is_none());
        assert!(map.lookup(0xfff0, 32).is_none());
        assert!(map.lookup(u64::MAX - 4, 8).is_none());
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let m = AnonMemory::new(2 * PAGE_SIZE, false).unwrap();
        let r = m.region_at(0);
        let r2 = Region { gpa: PAGE_SIZE as u64, ..r };
        // SAFETY: the map is dropped at once; never used for I/O.
        assert!(matches!(unsafe { MemoryMap::new(vec![r, r2]) }, Err(MemoryError::Overlap(..))));
        let a = Arc::new(m);
        assert!(matches!(MemoryMap::from_anon([(0, a.clone()), (PAGE_SIZE as u64, a)]), Err(MemoryError::Overlap(..))));
    }

    #[test]
    fn a_foreign_map_keeps_its_owner() {
        let m = Arc::new(AnonMemory::new(PAGE_SIZE, false).unwrap());
        m.write_from(0, &[9u8; 8]);
        let r = m.region_at(0x2000);
        let weak = Arc::downgrade(&m);
        // SAFETY: `r` lies inside `m`, which the map holds as its owner.
        let map = unsafe { MemoryMap::with_owner(vec![r], m) }.unwrap();
        assert_eq!(map.lookup(0x2000, 8).unwrap().read_u8(7), 9);
        drop(map);
        assert!(weak.upgrade().is_none());
    }
}
