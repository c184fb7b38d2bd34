//! Synthetic guests for migration tests, and checks on what arrived.

use ferry_memory::MemoryMap;
use ferry_migrate::target::TargetOutcome;
use ferry_migrate::vm::{SourceVm, TargetVm, VmError};
use ferry_transport::wire::PAGE_SIZE;
use ferry_vmm_glue::synthetic::{SyntheticConfig, SyntheticTarget, SyntheticVm};

/// A running synthetic guest of `mb` MiB in 3 regions whose writer rewrites `ws_mb` MiB at
/// `rate_mib_per_s` MiB/s (0 MiB: idle).
pub fn guest(id: &str, mb: u64, ws_mb: u64, rate_mib_per_s: u64, seed: u64) -> SyntheticVm {
    let cfg = SyntheticConfig {
        vm_id: id.into(),
        memory_bytes: mb << 20,
        regions: 3,
        working_set_bytes: ws_mb << 20,
        dirty_rate_bytes_per_s: rate_mib_per_s << 20,
        seed,
        ..Default::default()
    };
    let mut vm = SyntheticVm::new(&cfg).expect("a synthetic guest");
    vm.resume().expect("the synthetic guest starts");
    vm
}

/// Source and destination hold the same bytes in every page (panics on the first difference).
pub fn same_memory(src: &SyntheticVm, dst: &SyntheticTarget) {
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    assert_eq!(src.pages(), dst.pages());
    for i in 0..src.pages() {
        src.read_page(i, &mut a);
        dst.read_page(i, &mut b);
        assert!(a == b, "page {i} differs after migration");
    }
}

/// The received VM as the synthetic target it is (for tests whose factories are synthetic).
pub fn into_synthetic(o: TargetOutcome) -> SyntheticTarget {
    let any: Box<dyn std::any::Any> = o.vm.into_any();
    *any.downcast::<SyntheticTarget>().expect("a synthetic target")
}

/// A destination VM that loads and verifies like the one it wraps but whose vCPUs never start:
/// for the failure of a resume after commit.
pub struct NoResume(pub Box<dyn TargetVm>);

impl TargetVm for NoResume {
    fn memory(&self) -> MemoryMap {
        self.0.memory()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.0.restore_state(state)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Err("the vCPUs would not start".into())
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self.0.into_any()
    }
}
