//! What the engine needs from a VM. `migrate` defines these traits; `vmm-glue` implements them
//! (the synthetic guest, the KVM VMM). `migrate` never depends on a VMM.

use ferry_memory::MemoryMap;
use ferry_transport::wire::PAGE_SIZE;

/// Error of a VM operation, from whatever VMM implements the traits.
pub type VmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shape of a VM: what a destination must be able to host before any page moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    /// VM identity (unique per host).
    pub vm_id: String,
    /// Guest-physical regions: (gpa, length in bytes), page aligned.
    pub regions: Vec<(u64, u64)>,
}

impl VmShape {
    /// Total guest memory.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }
}

/// Dirty pages of one region: one bit per page, bit `i` of word `i / 64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBitmap {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// Pages in the region.
    pub pages: u64,
    /// The bits (`pages.div_ceil(64)` words; bits past `pages` are zero).
    pub bits: Vec<u64>,
}

impl RegionBitmap {
    /// An empty bitmap for a region.
    pub fn new(gpa: u64, pages: u64) -> Self {
        Self { gpa, pages, bits: vec![0; pages.div_ceil(64) as usize] }
    }

    /// A bitmap with every page set.
    pub fn full(gpa: u64, pages: u64) -> Self {
        let mut b = Self::new(gpa, pages);
        for i in 0..pages {
            b.set(i);
        }
        b
    }

    /// Mark page `i`.
    pub fn set(&mut self, i: u64) {
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Is page `i` marked?
    pub fn get(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// OR another bitmap of the same region into this one.
    pub fn merge(&mut self, o: &RegionBitmap) {
        for (a, b) in self.bits.iter_mut().zip(&o.bits) {
            *a |= *b;
        }
    }
}

/// Dirty pages of a whole VM, one bitmap per region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    /// Per region, in the order of [`VmShape::regions`].
    pub regions: Vec<RegionBitmap>,
}

impl DirtyBitmap {
    /// Pages marked over all regions.
    pub fn count(&self) -> u64 {
        self.regions.iter().map(RegionBitmap::count).sum()
    }

    /// Bytes marked.
    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE as u64
    }

    /// OR another bitmap of the same shape into this one.
    pub fn merge(&mut self, o: &DirtyBitmap) {
        for (a, b) in self.regions.iter_mut().zip(&o.regions) {
            a.merge(b);
        }
    }
}

/// A running VM on the source host, as the engine drives it.
pub trait SourceVm: Send {
    /// Shape (identity and memory layout).
    fn shape(&self) -> VmShape;
    /// Guest memory (the guest may write it while the engine reads it). The map shares the VM's
    /// mappings: it stays valid even if the VM is dropped first.
    fn memory(&self) -> MemoryMap;
    /// Start dirty tracking; pages written from now on are reported by [`SourceVm::take_dirty`].
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// Read and clear the pages dirtied since the last call (or since the start). The engine
    /// keeps what it took until the peer has acknowledged those pages, and gives it back with
    /// [`SourceVm::return_dirty`] if they could not be delivered.
    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError>;
    /// Give back pages taken but not delivered: they are reported again by the next take.
    fn return_dirty(&mut self, pages: &DirtyBitmap);
    /// Stop dirty tracking.
    fn stop_dirty_log(&mut self);
    /// Stop the guest (vCPUs, writers, devices): its memory no longer changes.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Let the guest run again.
    fn resume(&mut self) -> Result<(), VmError>;
    /// Is the guest running?
    fn is_running(&self) -> bool;
    /// Serialize vCPU and device state (only while paused).
    fn save_state(&mut self) -> Result<Vec<u8>, VmError>;
    /// Slow the guest down to `percent` of its speed (100 = no throttle) for auto-converge.
    fn set_throttle(&mut self, percent: u8);
    /// The VM's disks, for a shared-nothing move (every guest write goes through them; their
    /// files are the disks until the destination committed). None by default: memory only.
    fn disks(&self) -> Vec<std::sync::Arc<ferry_disk::Disk>> {
        Vec::new()
    }
}

/// A VM being received on the destination host. It does not run until [`TargetVm::resume`].
pub trait TargetVm: Send {
    /// Guest memory to receive into (starts zeroed). The map shares the VM's mappings: it stays
    /// valid even if the VM is dropped first.
    fn memory(&self) -> MemoryMap;
    /// Load vCPU and device state.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError>;
    /// Start the guest (after commit).
    fn resume(&mut self) -> Result<(), VmError>;
    /// The concrete VM, for the caller that knows which VMM made it (after commit).
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// Creates VMs on the destination host.
pub trait TargetFactory: Send + Sync {
    /// Check that a VM of this shape can be hosted here (memory available, no VM with that id)
    /// and create it, paused, with zeroed memory.
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError>;
}
