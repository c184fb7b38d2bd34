//! A small VMM on KVM that runs Ferry's own guest program, and implements the engine's VM traits
//! ([`SourceVm`], [`TargetVm`], [`TargetFactory`]) for it.
//!
//! - Guest memory: anonymous mappings ([`AnonMemory`]), one KVM memory slot per region
//!   (regions of at most [`GuestConfig::slot_bytes`]), guest-physical from 0. Each mapping is
//!   held by an `Arc` shared with every [`MemoryMap`] the VM hands out, so a map stays valid after
//!   the VM is dropped (KVM itself lets go of the memory when the VM fd closes).
//! - Dirty log: `KVM_MEM_LOG_DIRTY_PAGES` on every slot and `KVM_GET_DIRTY_LOG` (which reads and
//!   clears), ORed with the pages the VMM itself wrote and with pages the engine gave back
//!   ([`SourceVm::return_dirty`]).
//! - One vCPU on its own thread (module `vcpu`); pause kicks it out of `KVM_RUN` with a signal and
//!   waits until it is parked.
//! - State: registers, special registers, XSAVE (or FPU), XCRs, debug registers, the MSRs KVM
//!   lists that are readable, vCPU events, MP state, the port device, the block device's
//!   registers, and, with an in-kernel
//!   irqchip ([`GuestConfig::irqchip`], [`KvmFactory::with_irqchip`]), the LAPIC, both PICs and
//!   the IOAPIC ([`state`]). The guest program uses no interrupts; the irqchip is there so that
//!   its state is carried like a real VM's.
//! - Disks: a paravirtual block device on I/O ports ([`block`]) over the VM's
//!   [`ferry_disk::Disk`]s ([`KvmVm::attach_disks`]; a destination gets them from its factory,
//!   [`KvmFactory::with_disks`]), which the guest program writes and verifies when
//!   [`GuestConfig::disk_slots`] is set.
//! - The guest program and its layout: [`guest`].

pub mod block;
pub mod guest;
pub mod state;
mod vcpu;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ferry_disk::Disk;
use ferry_memory::reserve::MemoryReserve;
use ferry_memory::{AnonMemory, MemoryError, MemoryMap, VolatileSlice};
use ferry_migrate::vm::{DirtyBitmap, RegionBitmap, SourceVm, TargetFactory, TargetVm, VmError, VmShape};
use ferry_transport::wire::PAGE_SIZE;
use kvm_bindings::{
    kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use self::state::{StateError, VmState};
use self::vcpu::Runner;

/// Errors of the KVM VMM (the doc comment of each variant says what went wrong).
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm cannot be opened or a VM cannot be created.
    #[error("cannot use /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability this VMM needs.
    #[error("KVM lacks capability {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was done.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest configuration is not valid.
    #[error("invalid guest configuration: {0}")]
    Config(String),
    /// A VM shape this host cannot host.
    #[error("cannot host VM shape: {0}")]
    Shape(String),
    /// A VM with this id already exists here.
    #[error("a VM with id {0:?} already exists on this host")]
    Duplicate(String),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The operation needs a paused VM.
    #[error("VM is running; pause it first")]
    Running,
    /// The vCPU thread stopped for good.
    #[error("vCPU stopped: {0}")]
    VcpuDead(String),
    /// The vCPU did not park in time.
    #[error("vCPU did not stop within 5 s")]
    PauseTimeout,
    /// A thread or signal could not be set up.
    #[error("vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A saved state that cannot be loaded.
    #[error("bad VM state: {0}")]
    State(#[from] StateError),
    /// An address outside guest memory.
    #[error("guest address {0:#x} is outside guest memory")]
    Address(u64),
    /// The guest did not make the expected progress in time.
    #[error("guest stuck at {passes} passes after {waited:?}")]
    Stuck {
        /// Passes reached.
        passes: u64,
        /// How long we waited.
        waited: std::time::Duration,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// What KVM on this host offers (the capabilities this VMM looks at).
#[derive(Debug, Clone, Default)]
pub struct Caps {
    /// KVM API version.
    pub api_version: i32,
    /// KVM_CAP_USER_MEMORY.
    pub user_memory: bool,
    /// KVM_CAP_NR_MEMSLOTS.
    pub memslots: usize,
    /// KVM_CAP_IMMEDIATE_EXIT.
    pub immediate_exit: bool,
    /// KVM_CAP_VCPU_EVENTS.
    pub vcpu_events: bool,
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XSAVE2 (size of the XSAVE area, 0 if absent).
    pub xsave2_size: i32,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// KVM_CAP_DEBUGREGS.
    pub debugregs: bool,
    /// KVM_CAP_MP_STATE.
    pub mp_state: bool,
    /// KVM_CAP_IRQCHIP.
    pub irqchip: bool,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (not used; reported).
    pub manual_dirty_log_protect: bool,
    /// KVM_CAP_DIRTY_LOG_RING (not used; reported).
    pub dirty_log_ring: bool,
    /// MSRs KVM lists as saveable.
    pub msr_index_count: usize,
}

impl Caps {
    /// Probe KVM.
    pub fn probe(kvm: &Kvm) -> Self {
        Self {
            api_version: kvm.get_api_version(),
            user_memory: kvm.check_extension(Cap::UserMemory),
            memslots: kvm.get_nr_memslots(),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            xsave: kvm.check_extension(Cap::Xsave),
            xsave2_size: kvm.check_extension_int(Cap::Xsave2),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            mp_state: kvm.check_extension(Cap::MpState),
            irqchip: kvm.check_extension(Cap::Irqchip),
            manual_dirty_log_protect: kvm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into())
                > 0,
            dirty_log_ring: kvm.check_extension(Cap::DirtyLogRing),
            msr_index_count: kvm.get_msr_index_list().map(|l| l.as_slice().len()).unwrap_or(0),
        }
    }

    /// Use the XSAVE ioctls (4 KiB legacy area) rather than the FPU ones?
    fn use_xsave(&self) -> bool {
        self.xsave && self.xsave2_size <= 4096
    }
}

/// Can this host run the KVM guest? `Err` says why not (for tests that print SKIP). Setting
/// `FERRY_NO_KVM` in the environment makes it say no (to exercise the SKIP path).
pub fn kvm_usable() -> Result<Caps, String> {
    if std::env::var_os("FERRY_NO_KVM").is_some() {
        return Err("FERRY_NO_KVM is set".into());
    }
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let caps = Caps::probe(&kvm);
    if !caps.user_memory {
        return Err("KVM lacks KVM_CAP_USER_MEMORY".into());
    }
    if !caps.immediate_exit {
        return Err("KVM lacks KVM_CAP_IMMEDIATE_EXIT".into());
    }
    kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    Ok(caps)
}

/// The guest: memory size and layout, and what the guest program does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// VM identity.
    pub vm_id: String,
    /// Guest memory in bytes (a multiple of 4 KiB, 2 MiB ..= 3 GiB).
    pub mem_bytes: u64,
    /// Largest memory slot (memory is split into slots of at most this size).
    pub slot_bytes: u64,
    /// First page of the working set (page aligned, >= 1 MiB).
    pub ws_base: u64,
    /// Pages in the working set.
    pub ws_pages: u64,
    /// Bytes between stamped words in a page (8 ..= 4096, a multiple of 8).
    pub stride: u64,
    /// PAUSE iterations after each page (0 = as fast as it can).
    pub delay: u64,
    /// Run the program at CPL 3 (native speed on PVM; see [`guest`]) rather than CPL 0.
    pub user_mode: bool,
    /// Create an in-kernel irqchip (LAPIC, PICs, IOAPIC), whose state then travels too. The
    /// destination's factory must be set the same way ([`KvmFactory::with_irqchip`]).
    pub irqchip: bool,
    /// Disk requests the guest program cycles over on disk 0 after each pass (0: no disk I/O).
    /// Pass `g` reads request slot `(g - 1) % disk_slots`, checks it holds what generation
    /// `g - disk_slots` wrote (zeros before), and writes it stamped with `g` ([`guest`]).
    pub disk_slots: u64,
    /// Sectors (512 bytes) per disk request (1 ..= [`block::MAX_REQUEST_SECTORS`]).
    pub disk_request_sectors: u32,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            vm_id: "kvm-guest".into(),
            mem_bytes: 64 << 20,
            slot_bytes: 32 << 20,
            ws_base: guest::WS_MIN,
            ws_pages: 256,
            stride: 512,
            delay: 0,
            user_mode: true,
            irqchip: true,
            disk_slots: 0,
            disk_request_sectors: 8,
        }
    }
}

impl GuestConfig {
    /// Largest guest memory (the identity map would reach further, but 3 GiB keeps clear of the
    /// 32-bit hole).
    pub const MAX_MEM: u64 = 3 << 30;

    fn validate(&self) -> Result<(), KvmError> {
        let page = PAGE_SIZE as u64;
        let bad = |s: String| Err(KvmError::Config(s));
        if !self.mem_bytes.is_multiple_of(page) || self.mem_bytes < (2 << 20) || self.mem_bytes > Self::MAX_MEM {
            return bad(format!("memory {} bytes (need a page multiple in 2 MiB ..= 3 GiB)", self.mem_bytes));
        }
        if !self.slot_bytes.is_multiple_of(page) || self.slot_bytes == 0 {
            return bad(format!("slot size {} bytes", self.slot_bytes));
        }
        if self.mem_bytes.div_ceil(self.slot_bytes) > 256 {
            return bad("more than 256 slots".into());
        }
        if !self.ws_base.is_multiple_of(page) || self.ws_base < guest::WS_MIN || self.ws_pages == 0 {
            return bad(format!("working set at {:#x}, {} pages", self.ws_base, self.ws_pages));
        }
        match self.ws_pages.checked_mul(page).and_then(|l| l.checked_add(self.ws_base)) {
            Some(end) if end <= self.mem_bytes => {}
            _ => return bad("working set runs past guest memory".into()),
        }
        if !self.stride.is_multiple_of(8) || self.stride == 0 || self.stride > page {
            return bad(format!("stride {}", self.stride));
        }
        if self.disk_slots > 0 {
            if !(1..=block::MAX_REQUEST_SECTORS).contains(&self.disk_request_sectors) {
                return bad(format!("{} sectors per disk request", self.disk_request_sectors));
            }
            if self.disk_slots.checked_mul(u64::from(self.disk_request_sectors) * block::SECTOR_BYTES).is_none() {
                return bad(format!("{} disk slots", self.disk_slots));
            }
        }
        Ok(())
    }

    /// The regions (slots) of this guest.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        let mut gpa = 0;
        while gpa < self.mem_bytes {
            let len = self.slot_bytes.min(self.mem_bytes - gpa);
            v.push((gpa, len));
            gpa += len;
        }
        v
    }
}

/// What the guest has reported so far (from the VMM's port device).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// Passes completed, as last reported.
    pub passes: u64,
    /// Checksum, as last reported.
    pub checksum: u64,
    /// Reports received (since this VM was created or restored).
    pub reports: u64,
    /// Verification failures reported.
    pub errors: u64,
    /// The first failures: (address, value found, generation found).
    pub error_records: Vec<(u64, u64, u64)>,
    /// Disk words the guest found wrong (reported through the block device).
    pub disk_errors: u64,
    /// The first of them: (disk offset, value found).
    pub disk_error_records: Vec<(u64, u64)>,
    /// Disk requests done by the block device: reads, writes.
    pub disk_reads: u64,
    /// Disk writes done.
    pub disk_writes: u64,
    /// Disk commands the device refused or that failed.
    pub disk_failed: u64,
}

struct Slot {
    slot: u32,
    gpa: u64,
    /// Shared with every [`MemoryMap`] handed out: unmapped after the VM and the last map.
    mem: Arc<AnonMemory>,
}

/// MSRs worth saving, where KVM lists them and they read back.
const MSR_CANDIDATES: &[u32] = &[
    0x10,        // IA32_TIME_STAMP_COUNTER
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// A VM on KVM running Ferry's guest program (or waiting, paused, to receive one).
pub struct KvmVm {
    // Field order is drop order: the vCPU thread stops before memory is unmapped.
    runner: Runner,
    vm: VmFd,
    slots: Vec<Slot>,
    id: String,
    caps: Caps,
    msrs: Vec<u32>,
    irqchip: bool,
    logging: bool,
    /// Pages the VMM wrote (boot, the block device's reads): shared with the vCPU thread.
    vmm_dirty: Arc<Mutex<DirtyBitmap>>,
    returned: Option<DirtyBitmap>,
    registry: Option<Arc<Mutex<HashSet<String>>>>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").field("id", &self.id).field("regions", &self.shape().regions).finish()
    }
}

impl KvmVm {
    /// A paused VM with zeroed memory in the given regions and one vCPU (CPUID set), not booted.
    pub fn new_empty(vm_id: &str, regions: &[(u64, u64)], irqchip: bool) -> Result<Self, KvmError> {
        Self::new_empty_from(vm_id, regions, irqchip, None)
    }

    /// [`KvmVm::new_empty`], taking guest memory from `reserve` when it holds enough.
    pub fn new_empty_from(
        vm_id: &str,
        regions: &[(u64, u64)],
        irqchip: bool,
        reserve: Option<&MemoryReserve>,
    ) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let caps = Caps::probe(&kvm);
        if !caps.user_memory {
            return Err(KvmError::MissingCap("KVM_CAP_USER_MEMORY"));
        }
        if !caps.immediate_exit {
            return Err(KvmError::MissingCap("KVM_CAP_IMMEDIATE_EXIT"));
        }
        check_regions(regions, caps.memslots)?;
        let vm = kvm.create_vm().map_err(KvmError::Open)?;
        if irqchip {
            if !caps.irqchip {
                return Err(KvmError::MissingCap("KVM_CAP_IRQCHIP"));
            }
            vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        }
        let mut slots = Vec::with_capacity(regions.len());
        for (i, &(gpa, len)) in regions.iter().enumerate() {
            let mem = match reserve.and_then(|r| r.take(len as usize)) {
                Some(m) => m,
                None => AnonMemory::new(len as usize, false)?,
            };
            slots.push(Slot { slot: i as u32, gpa, mem: Arc::new(mem) });
        }
        let mut this_slots = Vec::new();
        for s in slots {
            set_slot(&vm, &s, false)?;
            this_slots.push(s);
        }
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        // Keep the candidate MSRs that KVM lists and that read back one by one.
        let listed = kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
        let mut msrs = Vec::new();
        for &m in MSR_CANDIDATES {
            if !listed.contains(&m) {
                continue;
            }
            if let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry { index: m, ..Default::default() }]) {
                if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
                    msrs.push(m);
                }
            }
        }
        let shape_regions: Vec<RegionBitmap> =
            regions.iter().map(|&(gpa, len)| RegionBitmap::new(gpa, len / PAGE_SIZE as u64)).collect();
        let vmm_dirty = Arc::new(Mutex::new(DirtyBitmap { regions: shape_regions }));
        let mem = MemoryMap::from_anon(this_slots.iter().map(|s| (s.gpa, s.mem.clone())))?;
        Ok(Self {
            runner: Runner::new(vcpu, block::BlockDevice::new(mem, vmm_dirty.clone()))?,
            vm,
            slots: this_slots,
            id: vm_id.to_string(),
            caps,
            msrs,
            irqchip,
            logging: false,
            vmm_dirty,
            returned: None,
            registry: None,
        })
    }

    /// Build a VM for `cfg`, load the guest program, page tables and parameters, and set the vCPU
    /// up in long mode at the program's entry. The VM is paused: call [`KvmVm::start`].
    pub fn boot(cfg: &GuestConfig) -> Result<Self, KvmError> {
        cfg.validate()?;
        let vm = Self::new_empty(&cfg.vm_id, &cfg.regions(), cfg.irqchip)?;
        for (gpa, v) in guest::page_table_entries(cfg.mem_bytes) {
            vm.write_u64(gpa, v)?;
        }
        for (i, e) in guest::GDT_ENTRIES.iter().enumerate() {
            vm.write_u64(guest::GDT + 8 * i as u64, *e)?;
        }
        let p = guest::PARAMS;
        vm.write_u64(p + guest::P_MAGIC, guest::MAGIC)?;
        vm.write_u64(p + guest::P_WS_BASE, cfg.ws_base)?;
        vm.write_u64(p + guest::P_WS_PAGES, cfg.ws_pages)?;
        vm.write_u64(p + guest::P_STRIDE, cfg.stride)?;
        vm.write_u64(p + guest::P_DELAY, cfg.delay)?;
        vm.write_u64(p + guest::P_DISK_BUF, guest::DISK_BUF)?;
        vm.write_u64(p + guest::P_DISK_SLOTS, cfg.disk_slots)?;
        vm.write_u64(p + guest::P_DISK_COUNT, u64::from(cfg.disk_request_sectors))?;
        vm.write_bytes(guest::CODE, guest::PROGRAM)?;
        let vcpu = vcpu::lock(&vm.runner.vcpu);
        let mut s = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: if cfg.user_mode { 0x18 | 3 } else { 0x08 },
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: if cfg.user_mode { 3 } else { 0 },
            db: 0,
            s: 1,
            l: 1, // 64-bit
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data_sel = if cfg.user_mode { 0x20 | 3 } else { 0x10 };
        let data = kvm_segment { selector: data_sel, type_: 0x3, db: 1, l: 0, ..code };
        s.cs = code;
        s.ds = data;
        s.es = data;
        s.fs = data;
        s.gs = data;
        s.ss = data;
        s.gdt.base = guest::GDT;
        s.gdt.limit = (8 * guest::GDT_ENTRIES.len() - 1) as u16;
        s.cr3 = guest::PML4;
        s.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        s.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000; // PE MP ET NE WP PG
        s.efer = 0x100 | 0x400; // LME, LMA
        vcpu.set_sregs(&s).map_err(ioctl("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: guest::CODE,
            rflags: if cfg.user_mode { 0x3002 } else { 0x2 },
            rsp: 0x1_0000,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        drop(vcpu);
        // Boot-time writes are not "dirty": dirty tracking starts later, and the engine's first
        // round sends all memory.
        vm.clear_vmm_dirty();
        Ok(vm)
    }

    /// Start (or resume) the guest.
    pub fn start(&mut self) -> Result<(), KvmError> {
        self.runner.resume()
    }

    /// Stop the guest; when this returns, no vCPU runs.
    pub fn stop(&mut self) -> Result<(), KvmError> {
        self.runner.pause()
    }

    /// VM identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// KVM capabilities seen when the VM was created.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// MSRs saved with the state.
    pub fn saved_msrs(&self) -> &[u32] {
        &self.msrs
    }

    /// KVM exits served so far.
    pub fn exits(&self) -> u64 {
        self.runner.shared.exits.load(Ordering::Relaxed)
    }

    /// Why the vCPU stopped for good, if it did.
    pub fn vcpu_failure(&self) -> Option<String> {
        self.runner.dead()
    }

    /// Wait until the guest has reported at least `passes` passes over its memory: `Stuck` after
    /// `timeout`, `VcpuDead` if the vCPU stopped for good.
    pub fn wait_passes(&self, passes: u64, timeout: std::time::Duration) -> Result<(), KvmError> {
        let t0 = std::time::Instant::now();
        loop {
            let now = self.report().passes;
            if now >= passes {
                return Ok(());
            }
            if let Some(why) = self.vcpu_failure() {
                return Err(KvmError::VcpuDead(why));
            }
            if t0.elapsed() >= timeout {
                return Err(KvmError::Stuck { passes: now, waited: t0.elapsed() });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// What the guest has reported.
    pub fn report(&self) -> GuestReport {
        let d = vcpu::lock(&self.runner.shared.device).clone();
        let b = vcpu::lock(&self.runner.shared.block).state.clone();
        GuestReport {
            passes: d.passes,
            checksum: d.checksum,
            reports: d.reports,
            errors: d.errors,
            error_records: d.error_records.iter().map(|&(a, f)| (a, f, guest::generation_of(a, f))).collect(),
            disk_errors: b.disk_errors,
            disk_error_records: b.error_records,
            disk_reads: b.reads,
            disk_writes: b.writes,
            disk_failed: b.failed,
        }
    }

    /// Give the VM its disks (index `i` is the block device's disk `i`; the guest program uses
    /// disk 0). Replaces the disks it had; a request in flight finishes on the old ones.
    pub fn attach_disks(&self, disks: Vec<Arc<Disk>>) {
        vcpu::lock(&self.runner.shared.block).disks = disks;
    }

    /// The VM's disks.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        vcpu::lock(&self.runner.shared.block).disks.clone()
    }

    /// The last disk generation the guest program published as written (see
    /// [`block::check_guest_disk`]).
    pub fn guest_disk_generation(&self) -> Result<u64, KvmError> {
        self.read_u64(guest::PARAMS + guest::P_DISK_GEN)
    }

    /// `len` bytes of guest memory at `gpa`, inside one slot.
    fn guest_slice(&self, gpa: u64, len: u64) -> Result<VolatileSlice<'_>, KvmError> {
        self.slots
            .iter()
            .filter(|s| gpa >= s.gpa)
            .find_map(|s| s.mem.slice().subslice(usize::try_from(gpa - s.gpa).ok()?, usize::try_from(len).ok()?))
            .ok_or(KvmError::Address(gpa))
    }

    fn mark_vmm_dirty(&self, gpa: u64, len: u64) {
        mark_dirty(&self.vmm_dirty, gpa, len);
    }

    fn clear_vmm_dirty(&self) {
        let mut d = vcpu::lock(&self.vmm_dirty);
        for r in d.regions.iter_mut() {
            r.bits.fill(0);
        }
    }

    /// Write a 64-bit word of guest memory (volatile; counted as dirty). `gpa` must be 8-aligned.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), KvmError> {
        if !gpa.is_multiple_of(8) {
            return Err(KvmError::Address(gpa));
        }
        // One volatile 8-byte store (aligned: mappings are page aligned and gpa is 8-aligned).
        self.guest_slice(gpa, 8)?.write_from(0, &v.to_ne_bytes());
        self.mark_vmm_dirty(gpa, 8);
        Ok(())
    }

    /// Read a 64-bit word of guest memory (volatile). `gpa` must be 8-aligned.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, KvmError> {
        if !gpa.is_multiple_of(8) {
            return Err(KvmError::Address(gpa));
        }
        let mut b = [0u8; 8];
        self.guest_slice(gpa, 8)?.read_into(0, &mut b);
        Ok(u64::from_ne_bytes(b))
    }

    /// Write bytes into guest memory (volatile, byte by byte; counted as dirty).
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<(), KvmError> {
        self.guest_slice(gpa, data.len() as u64)?.write_from(0, data);
        self.mark_vmm_dirty(gpa, data.len() as u64);
        Ok(())
    }

    /// Change the guest's pace while it runs (PAUSE iterations per page; read at each pass).
    pub fn set_delay(&self, delay: u64) -> Result<(), KvmError> {
        self.write_u64(guest::PARAMS + guest::P_DELAY, delay)
    }

    /// Passes the guest completed, as it wrote them in its parameter block.
    pub fn guest_passes(&self) -> Result<u64, KvmError> {
        self.read_u64(guest::PARAMS + guest::P_PASSES)
    }

    fn set_logging(&mut self, on: bool) -> Result<(), KvmError> {
        for s in &self.slots {
            set_slot(&self.vm, s, on)?;
        }
        self.logging = on;
        Ok(())
    }

    fn empty_bitmap(&self) -> DirtyBitmap {
        DirtyBitmap {
            regions: self.slots.iter().map(|s| RegionBitmap::new(s.gpa, (s.mem.len() / PAGE_SIZE) as u64)).collect(),
        }
    }

    /// Read and clear: KVM's log | the VMM's own writes | pages given back.
    pub fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, KvmError> {
        let mut out = self.empty_bitmap();
        if self.logging {
            for (s, r) in self.slots.iter().zip(out.regions.iter_mut()) {
                let bits = self.vm.get_dirty_log(s.slot, s.mem.len()).map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
                for (a, b) in r.bits.iter_mut().zip(bits) {
                    *a |= b;
                }
            }
        }
        {
            let mut d = vcpu::lock(&self.vmm_dirty);
            out.merge(&d);
            for r in d.regions.iter_mut() {
                r.bits.fill(0);
            }
        }
        if let Some(r) = self.returned.take() {
            out.merge(&r);
        }
        Ok(out)
    }

    /// Capture vCPU and device state (the VM must be paused).
    pub fn capture_state(&self) -> Result<VmState, KvmError> {
        if !self.runner.is_stopped() {
            return Err(KvmError::Running);
        }
        let v = vcpu::lock(&self.runner.vcpu);
        let mut st = VmState::default();
        let c = &mut st.vcpu;
        c.regs = v.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        c.sregs = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        if self.caps.use_xsave() {
            c.xsave = Some(Box::new(v.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?.region));
        } else {
            c.fpu = Some(v.get_fpu().map_err(ioctl("KVM_GET_FPU"))?);
        }
        if self.caps.xcrs {
            c.xcrs = Some(v.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?);
        }
        if self.caps.debugregs {
            c.debugregs = Some(v.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?);
        }
        if !self.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                self.msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut m = Msrs::from_entries(&entries).map_err(|_| KvmError::Config("too many MSRs".into()))?;
            let n = v.get_msrs(&mut m).map_err(ioctl("KVM_GET_MSRS"))?;
            c.msrs = m.as_slice()[..n.min(entries.len())].iter().map(|e| (e.index, e.data)).collect();
        }
        if self.caps.vcpu_events {
            c.events = Some(v.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?);
        }
        if self.caps.mp_state {
            c.mp_state = Some(v.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?);
        }
        if self.irqchip {
            c.lapic = Some(Box::new(v.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?));
            let mut chips = Box::new([kvm_bindings::kvm_irqchip::default(); 3]);
            for (id, chip) in chips.iter_mut().enumerate() {
                chip.chip_id = id as u32; // PIC master, PIC slave, IOAPIC
                self.vm.get_irqchip(chip).map_err(ioctl("KVM_GET_IRQCHIP"))?;
            }
            st.irqchips = Some(chips);
        }
        st.device = vcpu::lock(&self.runner.shared.device).clone();
        st.block = vcpu::lock(&self.runner.shared.block).state.clone();
        Ok(st)
    }

    /// Load vCPU and device state (the VM must be paused).
    pub fn apply_state(&mut self, st: &VmState) -> Result<(), KvmError> {
        if !self.runner.is_stopped() {
            return Err(KvmError::Running);
        }
        let v = vcpu::lock(&self.runner.vcpu);
        let c = &st.vcpu;
        v.set_sregs(&c.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        v.set_regs(&c.regs).map_err(ioctl("KVM_SET_REGS"))?;
        match (&c.xsave, &c.fpu) {
            (Some(region), _) if self.caps.use_xsave() => {
                let x = kvm_bindings::kvm_xsave { region: **region, ..Default::default() };
                // SAFETY: this process never enables dynamically sized XSAVE features
                // (arch_prctl), and use_xsave() checked KVM_CAP_XSAVE2 <= 4096, so KVM reads
                // exactly size_of::<kvm_xsave>() bytes, which `x` holds.
                unsafe { v.set_xsave(&x) }.map_err(ioctl("KVM_SET_XSAVE"))?;
            }
            (_, Some(f)) => v.set_fpu(f).map_err(ioctl("KVM_SET_FPU"))?,
            (Some(_), None) => return Err(KvmError::State(StateError::Missing("fpu (host has no XSAVE)"))),
            (None, None) => return Err(KvmError::State(StateError::Missing("xsave or fpu"))),
        }
        if let (Some(x), true) = (&c.xcrs, self.caps.xcrs) {
            v.set_xcrs(x).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        if let (Some(x), true) = (&c.debugregs, self.caps.debugregs) {
            v.set_debug_regs(x).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        }
        match (&c.lapic, &st.irqchips, self.irqchip) {
            (Some(l), Some(chips), true) => {
                for (id, chip) in chips.iter().enumerate() {
                    if chip.chip_id != id as u32 {
                        return Err(KvmError::State(StateError::Missing("interrupt controller ids")));
                    }
                    self.vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
                }
                v.set_lapic(l).map_err(ioctl("KVM_SET_LAPIC"))?;
            }
            (None, None, _) => {}
            (_, _, false) => {
                return Err(KvmError::State(StateError::Missing("in-kernel irqchip here for the saved LAPIC")))
            }
            _ => return Err(KvmError::State(StateError::Missing("LAPIC or interrupt controllers"))),
        }
        if let Some((i, _)) = c.msrs.iter().find(|(i, _)| !MSR_CANDIDATES.contains(i)) {
            return Err(KvmError::Config(format!("saved state sets MSR {i:#x}, which this VMM does not restore")));
        }
        if !c.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                c.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
            let m = Msrs::from_entries(&entries).map_err(|_| KvmError::Config("too many MSRs".into()))?;
            let n = v.set_msrs(&m).map_err(ioctl("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(KvmError::Ioctl {
                    op: "KVM_SET_MSRS (refused an MSR)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        if let (Some(x), true) = (&c.events, self.caps.vcpu_events) {
            v.set_vcpu_events(x).map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        }
        if let (Some(x), true) = (&c.mp_state, self.caps.mp_state) {
            v.set_mp_state(*x).map_err(ioctl("KVM_SET_MP_STATE"))?;
        }
        *vcpu::lock(&self.runner.shared.device) = st.device.clone();
        vcpu::lock(&self.runner.shared.block).state = st.block.clone();
        Ok(())
    }

    /// The memory map over all slots. It shares the slots' mappings: they stay mapped while the
    /// map (or a clone) lives, even after the VM is dropped.
    pub fn memory_map(&self) -> MemoryMap {
        // Regions were checked disjoint and page aligned at creation, so this cannot fail.
        MemoryMap::from_anon(self.slots.iter().map(|s| (s.gpa, s.mem.clone()))).unwrap_or_else(|_| MemoryMap::empty())
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if let Some(r) = &self.registry {
            vcpu::lock(r).remove(&self.id);
        }
    }
}

/// Mark the pages of `[gpa, gpa + len)` in `dirty` (the VMM wrote them).
fn mark_dirty(dirty: &Mutex<DirtyBitmap>, gpa: u64, len: u64) {
    let Some(end) = gpa.checked_add(len).filter(|_| len > 0) else {
        return;
    };
    let mut d = vcpu::lock(dirty);
    for r in d.regions.iter_mut() {
        let rend = r.gpa + r.pages * PAGE_SIZE as u64;
        let (lo, hi) = (gpa.max(r.gpa), end.min(rend));
        if lo < hi {
            for p in (lo - r.gpa) / PAGE_SIZE as u64..=(hi - 1 - r.gpa) / PAGE_SIZE as u64 {
                r.set(p);
            }
        }
    }
}

fn check_regions(regions: &[(u64, u64)], memslots: usize) -> Result<(), KvmError> {
    let page = PAGE_SIZE as u64;
    if regions.is_empty() {
        return Err(KvmError::Shape("no memory regions".into()));
    }
    if regions.len() > memslots.clamp(1, 256) {
        return Err(KvmError::Shape(format!("{} regions, KVM has {} slots", regions.len(), memslots)));
    }
    let mut sorted = regions.to_vec();
    sorted.sort();
    let mut end = 0u64;
    for (i, &(gpa, len)) in sorted.iter().enumerate() {
        if gpa % page != 0 || len % page != 0 || len == 0 {
            return Err(KvmError::Shape(format!("region {gpa:#x}+{len:#x} not page aligned or empty")));
        }
        let e = gpa.checked_add(len).ok_or_else(|| KvmError::Shape(format!("region {gpa:#x} overflows")))?;
        if e > 1 << 40 {
            return Err(KvmError::Shape(format!("region {gpa:#x}+{len:#x} beyond 1 TiB")));
        }
        if i > 0 && gpa < end {
            return Err(KvmError::Shape(format!("region {gpa:#x} overlaps the one before")));
        }
        end = e;
    }
    Ok(())
}

fn set_slot(vm: &VmFd, s: &Slot, log: bool) -> Result<(), KvmError> {
    let region = kvm_userspace_memory_region {
        slot: s.slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: s.gpa,
        memory_size: s.mem.len() as u64,
        userspace_addr: s.mem.slice().as_ptr().as_ptr() as u64,
    };
    // SAFETY: the host range is an anonymous mapping owned by the VM (in `slots`), which is
    // dropped only after the vCPU thread stopped and the VM fd is closed (field order of KvmVm).
    unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
}

fn boxed(e: KvmError) -> VmError {
    Box::new(e)
}

impl SourceVm for KvmVm {
    fn shape(&self) -> VmShape {
        VmShape { vm_id: self.id.clone(), regions: self.slots.iter().map(|s| (s.gpa, s.mem.len() as u64)).collect() }
    }

    fn memory(&self) -> MemoryMap {
        self.memory_map()
    }

    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.returned = None;
        self.clear_vmm_dirty();
        self.set_logging(true).map_err(boxed)
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        self.take_dirty_pages().map_err(boxed)
    }

    fn return_dirty(&mut self, pages: &DirtyBitmap) {
        let r = self.returned.get_or_insert_with(|| DirtyBitmap {
            regions: self.slots.iter().map(|s| RegionBitmap::new(s.gpa, (s.mem.len() / PAGE_SIZE) as u64)).collect(),
        });
        // Only bitmaps of this VM's shape are merged (region by region, matching gpa and size).
        for (a, b) in r.regions.iter_mut().zip(&pages.regions) {
            if a.gpa == b.gpa && a.pages == b.pages {
                a.merge(b);
            }
        }
    }

    fn stop_dirty_log(&mut self) {
        let _ = self.set_logging(false);
        self.returned = None;
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.runner.pause().map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.runner.resume().map_err(boxed)
    }

    fn is_running(&self) -> bool {
        self.runner.is_running()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(state::encode(&self.capture_state().map_err(boxed)?))
    }

    fn set_throttle(&mut self, percent: u8) {
        self.runner.shared.throttle.store(percent.clamp(1, 100), Ordering::Relaxed);
    }
}

impl ferry_disk::Quiesce for KvmVm {
    fn pause(&mut self) -> Result<(), ferry_disk::local::VmError> {
        self.runner.pause().map_err(|e| Box::new(e) as ferry_disk::local::VmError)
    }

    fn resume(&mut self) -> Result<(), ferry_disk::local::VmError> {
        self.runner.resume().map_err(|e| Box::new(e) as ferry_disk::local::VmError)
    }
}

impl TargetVm for KvmVm {
    fn memory(&self) -> MemoryMap {
        self.memory_map()
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), VmError> {
        let st = state::decode(blob).map_err(|e| boxed(e.into()))?;
        self.apply_state(&st).map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.runner.resume().map_err(boxed)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// Opens the disks of an incoming VM (by its shape: its id), for its block device: the files
/// the source uses, on storage both hosts share (a live migration moves no disk).
pub type DiskOpener = Arc<dyn Fn(&VmShape) -> Result<Vec<Arc<Disk>>, String> + Send + Sync>;

#[derive(Clone)]
struct Opener(DiskOpener);

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskOpener")
    }
}

/// Creates paused, zeroed KVM VMs on the destination host.
#[derive(Debug, Clone)]
pub struct KvmFactory {
    live: Arc<Mutex<HashSet<String>>>,
    max_bytes: u64,
    irqchip: bool,
    reserve: Option<Arc<MemoryReserve>>,
    disks: Option<Opener>,
}

impl KvmFactory {
    /// A factory that hosts VMs of at most `max_bytes` of memory each.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            live: Arc::new(Mutex::new(HashSet::new())),
            max_bytes,
            irqchip: GuestConfig::default().irqchip,
            reserve: None,
            disks: None,
        }
    }

    /// Give each incoming VM the disks `open` returns for it (attached before it resumes).
    pub fn with_disks(mut self, open: DiskOpener) -> Self {
        self.disks = Some(Opener(open));
        self
    }

    /// Take guest memory of incoming VMs from `reserve` (faulted in ahead of time) when it holds
    /// enough; cold memory otherwise.
    pub fn with_reserve(mut self, reserve: Arc<MemoryReserve>) -> Self {
        self.reserve = Some(reserve);
        self
    }

    /// Create VMs with (or without) an in-kernel irqchip, as the sources are.
    pub fn with_irqchip(mut self, irqchip: bool) -> Self {
        self.irqchip = irqchip;
        self
    }

    /// Create a VM (the concrete type, for callers that keep running it after the migration).
    pub fn create_vm(&self, shape: &VmShape) -> Result<KvmVm, KvmError> {
        if shape.vm_id.is_empty() || shape.vm_id.len() > 255 {
            return Err(KvmError::Shape("vm id must be 1..=255 bytes".into()));
        }
        let total = shape.regions.iter().try_fold(0u64, |a, r| a.checked_add(r.1));
        match total {
            Some(t) if t <= self.max_bytes => {}
            _ => return Err(KvmError::Shape(format!("more memory than this host allows ({} bytes)", self.max_bytes))),
        }
        if !vcpu::lock(&self.live).insert(shape.vm_id.clone()) {
            return Err(KvmError::Duplicate(shape.vm_id.clone()));
        }
        let disks = match &self.disks {
            Some(Opener(open)) => match open(shape) {
                Ok(d) => d,
                Err(e) => {
                    vcpu::lock(&self.live).remove(&shape.vm_id);
                    return Err(KvmError::Config(format!("disks of {}: {e}", shape.vm_id)));
                }
            },
            None => Vec::new(),
        };
        match KvmVm::new_empty_from(&shape.vm_id, &shape.regions, self.irqchip, self.reserve.as_deref()) {
            Ok(mut vm) => {
                vm.registry = Some(self.live.clone());
                vm.attach_disks(disks);
                Ok(vm)
            }
            Err(e) => {
                vcpu::lock(&self.live).remove(&shape.vm_id);
                Err(e)
            }
        }
    }

    /// Register a VM that was not created by this factory (e.g. booted here), so that its id
    /// counts as taken while it lives.
    pub fn adopt(&self, vm: &mut KvmVm) -> Result<(), KvmError> {
        if !vcpu::lock(&self.live).insert(vm.id.clone()) {
            return Err(KvmError::Duplicate(vm.id.clone()));
        }
        vm.registry = Some(self.live.clone());
        Ok(())
    }
}

impl TargetFactory for KvmFactory {
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError> {
        Ok(Box::new(self.create_vm(shape).map_err(boxed)?))
    }
}
