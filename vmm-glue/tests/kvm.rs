//! Integration tests of the KVM VMM. They need a working /dev/kvm; where there is none they print
//! `SKIP: <reason>` and return.

use std::time::{Duration, Instant};

use ferry_memory::MemoryMap;
use ferry_migrate::vm::{SourceVm, TargetFactory, TargetVm, VmShape};
use ferry_test_support::kvm_or_skip;
use ferry_transport::wire::PAGE_SIZE;
use ferry_vmm_glue::kvm::guest::{self, expected_checksum};
use ferry_vmm_glue::kvm::{GuestConfig, KvmFactory, KvmVm};

fn cfg(id: &str, ws_pages: u64) -> GuestConfig {
    GuestConfig { vm_id: id.into(), mem_bytes: 16 << 20, slot_bytes: 8 << 20, ws_pages, ..Default::default() }
}

/// Wait until the guest has reported at least `passes` passes; the passes reached.
fn wait_passes(vm: &KvmVm, passes: u64) -> u64 {
    if let Err(e) = vm.wait_passes(passes, Duration::from_secs(20)) {
        panic!("{e} (want {passes}); exits {}", vm.exits());
    }
    vm.report().passes
}

fn check_consistent(vm: &KvmVm, c: &GuestConfig) {
    let r = vm.report();
    assert_eq!(r.errors, 0, "guest reported corruption: {:?}", r.error_records);
    assert_eq!(
        r.checksum,
        expected_checksum(c.ws_base, c.ws_pages, c.stride, r.passes),
        "checksum at {} passes",
        r.passes
    );
}

/// Copy all guest memory of a paused source into a paused target of the same shape.
fn copy_memory(src: &MemoryMap, dst: &MemoryMap) {
    let mut page = vec![0u8; PAGE_SIZE];
    for (s, d) in src.regions().iter().zip(dst.regions()) {
        assert_eq!((s.gpa, s.len), (d.gpa, d.len));
        for off in (0..s.len as u64).step_by(PAGE_SIZE) {
            src.lookup(s.gpa + off, PAGE_SIZE).expect("in the source").read_into(0, &mut page);
            dst.lookup(d.gpa + off, PAGE_SIZE).expect("in the target").write_from(0, &page);
        }
    }
}

#[test]
fn guest_runs_and_counter_advances() {
    if !kvm_or_skip("guest_runs_and_counter_advances") {
        return;
    }
    let c = cfg("runs", 64);
    let mut vm = KvmVm::boot(&c).unwrap();
    eprintln!("caps: {:?}; saved MSRs: {:x?}", vm.caps(), vm.saved_msrs());
    vm.start().unwrap();
    let t0 = Instant::now();
    let p1 = wait_passes(&vm, 3);
    let p2 = wait_passes(&vm, p1 + 20);
    let dt = t0.elapsed();
    vm.stop().unwrap();
    assert!(p2 > p1);
    check_consistent(&vm, &c);
    let r = vm.report();
    // The guest stores its counter, then reports it: a pause can fall between the two.
    let in_memory = vm.guest_passes().unwrap();
    assert!(in_memory == r.passes || in_memory == r.passes + 1, "memory {in_memory}, reported {}", r.passes);
    eprintln!("{} passes of {} pages in {:?} ({} exits)", r.passes, c.ws_pages, dt, vm.exits());
}

#[test]
fn dirty_log_reports_exactly_the_pages_the_guest_writes() {
    if !kvm_or_skip("dirty_log_reports_exactly_the_pages_the_guest_writes") {
        return;
    }
    // A working set in the second slot, away from everything else.
    let c = GuestConfig { ws_base: (8 << 20) + 5 * PAGE_SIZE as u64, ..cfg("dirty", 40) };
    let mut vm = KvmVm::boot(&c).unwrap();
    vm.start().unwrap();
    wait_passes(&vm, 2);
    vm.start_dirty_log().unwrap();
    let _ = vm.take_dirty().unwrap(); // whatever was dirtied while logging started
    let p = vm.report().passes;
    wait_passes(&vm, p + 3);
    let t = Instant::now();
    vm.pause().unwrap();
    let took = Instant::now();
    let d = vm.take_dirty().unwrap();
    let take_cost = took.elapsed();
    let mut want: Vec<u64> = (0..c.ws_pages).map(|i| c.ws_base + i * PAGE_SIZE as u64).collect();
    want.push(guest::PARAMS);
    want.sort();
    let mut got = Vec::new();
    for r in &d.regions {
        for i in 0..r.pages {
            if r.get(i) {
                got.push(r.gpa + i * PAGE_SIZE as u64);
            }
        }
    }
    assert_eq!(got, want, "dirty pages = working set + parameter block");
    eprintln!("pause {:?}, take_dirty of 16 MiB in {take_cost:?}", took - t);

    // Paused: nothing is dirtied.
    assert_eq!(vm.take_dirty().unwrap().count(), 0);
    // The VMM's own writes are reported.
    vm.set_delay(0).unwrap();
    let d = vm.take_dirty().unwrap();
    assert_eq!(d.count(), 1);
    assert!(d.regions[0].get(guest::PARAMS / PAGE_SIZE as u64));
    // Pages given back are reported again, once.
    vm.return_dirty(&d);
    assert_eq!(vm.take_dirty().unwrap(), d);
    assert_eq!(vm.take_dirty().unwrap().count(), 0);
    vm.start().unwrap();
    let p = vm.report().passes;
    wait_passes(&vm, p + 2);
    vm.pause().unwrap();
    vm.stop_dirty_log();
    check_consistent(&vm, &c);
}

#[test]
fn pause_really_stops_the_guest() {
    if !kvm_or_skip("pause_really_stops_the_guest") {
        return;
    }
    let c = cfg("pause", 32);
    let mut vm = KvmVm::boot(&c).unwrap();
    vm.start().unwrap();
    assert!(vm.save_state().is_err(), "state of a running VM is refused");
    let mut lat = Vec::new();
    for round in 0..20 {
        let p = vm.report().passes;
        wait_passes(&vm, p + 2);
        let t = Instant::now();
        vm.pause().unwrap();
        lat.push(t.elapsed());
        assert!(!vm.is_running());
        let mem = vm.guest_passes().unwrap();
        let rep = vm.report();
        if round % 5 == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(vm.guest_passes().unwrap(), mem, "guest memory changed while paused");
        assert_eq!(vm.report(), rep, "guest reported while paused");
        let t = Instant::now();
        vm.start().unwrap();
        let p = vm.report().passes;
        wait_passes(&vm, p + 1);
        if round == 0 {
            eprintln!("resume to next report: {:?}", t.elapsed());
        }
    }
    vm.pause().unwrap();
    check_consistent(&vm, &c);
    lat.sort();
    eprintln!("pause latency: min {:?} median {:?} max {:?}", lat[0], lat[lat.len() / 2], lat[lat.len() - 1]);
}

/// Run a guest on A, pause, move memory and state to a fresh B from the factory; returns B
/// (paused, restored) and A's last report.
fn move_to_fresh(c: &GuestConfig, factory: &KvmFactory, passes: u64) -> (KvmVm, ferry_vmm_glue::kvm::GuestReport) {
    let mut a = KvmVm::boot(c).unwrap();
    factory.adopt(&mut a).unwrap();
    let shape = a.shape();
    a.start().unwrap();
    wait_passes(&a, passes);
    let t = Instant::now();
    a.pause().unwrap();
    let paused = t.elapsed();
    let t = Instant::now();
    let blob = a.save_state().unwrap();
    let save = t.elapsed();
    let decoded = ferry_vmm_glue::kvm::state::decode(&blob).unwrap();
    assert_eq!(decoded.vcpu.lapic.is_some(), c.irqchip, "LAPIC saved iff there is an in-kernel irqchip");
    assert_eq!(decoded.irqchips.is_some(), c.irqchip);
    assert!(decoded.vcpu.xsave.is_some() || decoded.vcpu.fpu.is_some());
    assert!(!decoded.vcpu.msrs.is_empty());
    let at_pause = a.report();
    assert!(matches!(factory.create_vm(&shape), Err(ferry_vmm_glue::kvm::KvmError::Duplicate(_))));
    // B cannot take A's id while A lives; give B a fresh id with the same regions.
    let shape_b = VmShape { vm_id: format!("{}-b", shape.vm_id), ..shape.clone() };
    let mut b = factory.create_vm(&shape_b).unwrap();
    assert!(!b.is_running());
    copy_memory(&SourceVm::memory(&a), &TargetVm::memory(&b));
    drop(a);
    let t = Instant::now();
    b.restore_state(&blob).unwrap();
    eprintln!("pause {paused:?}, save_state {save:?} ({} bytes), restore_state {:?}", blob.len(), t.elapsed());
    (b, at_pause)
}

#[test]
fn state_moves_to_a_fresh_vm_and_the_guest_continues() {
    if !kvm_or_skip("state_moves_to_a_fresh_vm_and_the_guest_continues") {
        return;
    }
    for irqchip in [true, false] {
        let c = GuestConfig { irqchip, ..cfg(&format!("move-me-{irqchip}"), 256) };
        let factory = KvmFactory::new(1 << 30).with_irqchip(irqchip);
        move_and_continue(&c, &factory);
    }
    // A state with a LAPIC cannot land on a VM without an irqchip.
    let c = cfg("lapic-mismatch", 16);
    let mut a = KvmVm::boot(&c).unwrap();
    let blob = a.save_state().unwrap();
    let f = KvmFactory::new(1 << 30).with_irqchip(false);
    let mut t = f.create_vm(&VmShape { vm_id: "other".into(), ..a.shape() }).unwrap();
    assert!(t.restore_state(&blob).is_err());
}

fn move_and_continue(c: &GuestConfig, factory: &KvmFactory) {
    let (mut b, at_pause) = move_to_fresh(c, factory, 5);
    assert_eq!(b.report(), at_pause, "device state travelled with the vCPU state");
    TargetVm::resume(&mut b).unwrap();
    let p = wait_passes(&b, at_pause.passes + 1);
    // The first report on B is the pass right after A's last one.
    assert_eq!(b.report().reports, at_pause.reports + (p - at_pause.passes));
    wait_passes(&b, at_pause.passes + 10);
    b.pause().unwrap();
    check_consistent(&b, c);
    eprintln!("A stopped at {} passes; B continued to {}", at_pause.passes, b.report().passes);
}

#[test]
fn a_stale_page_after_the_move_is_detected() {
    if !kvm_or_skip("a_stale_page_after_the_move_is_detected") {
        return;
    }
    let c = cfg("stale", 64);
    let factory = KvmFactory::new(1 << 30);
    let (mut b, at_pause) = move_to_fresh(&c, &factory, 4);
    // Page 10 of the working set as an older round would have delivered it (two passes old).
    let page = c.ws_base + 10 * PAGE_SIZE as u64;
    for off in (0..PAGE_SIZE as u64).step_by(c.stride as usize) {
        b.write_u64(page + off, guest::stamp(page + off, at_pause.passes - 1)).unwrap();
    }
    // And one word of page 20 lost (zero).
    let lost = c.ws_base + 20 * PAGE_SIZE as u64 + c.stride;
    b.write_u64(lost, 0).unwrap();
    TargetVm::resume(&mut b).unwrap();
    wait_passes(&b, at_pause.passes + 2);
    b.pause().unwrap();
    let r = b.report();
    let words = PAGE_SIZE as u64 / c.stride;
    assert_eq!(r.errors, words + 1, "every stale word and the lost one reported: {:?}", r.error_records);
    assert_eq!(r.error_records[0], (page, guest::stamp(page, at_pause.passes - 1), at_pause.passes - 1));
    assert!(r.error_records.iter().any(|e| e.0 == lost && e.1 == 0));
}

#[test]
fn garbage_state_is_an_error_not_a_panic() {
    if !kvm_or_skip("garbage_state_is_an_error_not_a_panic") {
        return;
    }
    let factory = KvmFactory::new(1 << 30);
    let shape = VmShape { vm_id: "garbage".into(), regions: vec![(0, 4 << 20)] };
    let mut t = factory.create(&shape).unwrap();
    assert!(t.restore_state(b"").is_err());
    assert!(t.restore_state(&[0xa5; 5000]).is_err());
    // A well-formed blob with values KVM refuses (CR0.PG without PE, EFER.LMA without paging):
    let mut st = ferry_vmm_glue::kvm::state::VmState::default();
    st.vcpu.sregs.cr0 = 0x8000_0000;
    st.vcpu.sregs.efer = 0x400;
    st.vcpu.fpu = Some(Default::default());
    st.vcpu.xsave = Some(Box::new([0xffff_ffff; 1024]));
    let e = t.restore_state(&ferry_vmm_glue::kvm::state::encode(&st));
    eprintln!("bad sregs: {e:?}");
    assert!(e.is_err());
}

#[test]
fn factory_refuses_bad_shapes() {
    if !kvm_or_skip("factory_refuses_bad_shapes") {
        return;
    }
    let f = KvmFactory::new(64 << 20);
    let bad = [
        vec![],
        vec![(0, 128 << 20)],                   // more than the host allows
        vec![(0x800, 1 << 20)],                 // unaligned
        vec![(0, 2 << 20), (1 << 20, 2 << 20)], // overlap
        vec![(u64::MAX - 4095, 4096)],          // overflow
    ];
    for regions in bad {
        let shape = VmShape { vm_id: "bad".into(), regions: regions.clone() };
        assert!(f.create(&shape).is_err(), "{regions:x?} accepted");
    }
    let ok = VmShape { vm_id: "ok".into(), regions: vec![(0, 2 << 20), (4 << 20, 2 << 20)] };
    let t = f.create(&ok).unwrap();
    assert!(f.create(&ok).is_err(), "duplicate id");
    drop(t);
    assert!(f.create(&ok).is_ok(), "id free again after drop");
}

#[test]
fn throttle_slows_the_guest() {
    if !kvm_or_skip("throttle_slows_the_guest") {
        return;
    }
    let c = cfg("throttle", 256);
    let mut vm = KvmVm::boot(&c).unwrap();
    vm.start().unwrap();
    wait_passes(&vm, 2);
    let rate = |vm: &KvmVm| {
        let p0 = vm.report().passes;
        std::thread::sleep(Duration::from_millis(300));
        (vm.report().passes - p0) as f64 / 0.3
    };
    let full = rate(&vm);
    vm.set_throttle(20);
    let slow = rate(&vm);
    vm.set_throttle(100);
    eprintln!("passes/s: full {full:.0}, throttled to 20%: {slow:.0}");
    assert!(slow < full * 0.6, "throttle had no effect: {full} -> {slow}");
    vm.pause().unwrap();
    check_consistent(&vm, &c);
}

#[test]
fn memory_map_outlives_the_vm() {
    if !kvm_or_skip("memory_map_outlives_the_vm") {
        return;
    }
    let c = cfg("outlives", 16);
    let vm = KvmVm::boot(&c).unwrap();
    let gpa = 8 << 20; // inside the second slot
    vm.write_u64(gpa, 0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(vm.read_u64(gpa).unwrap(), 0x0123_4567_89ab_cdef);
    let map = vm.memory_map();
    let magic = vm.read_u64(guest::PARAMS + guest::P_MAGIC).unwrap();
    drop(vm); // vCPU thread stopped, VM fd closed; the map still holds the slots' memory
    let mut w = [0u8; 8];
    map.lookup(gpa, 8).expect("inside the map").read_into(0, &mut w);
    assert_eq!(u64::from_ne_bytes(w), 0x0123_4567_89ab_cdef);
    map.lookup(guest::PARAMS + guest::P_MAGIC, 8).expect("inside the map").read_into(0, &mut w);
    assert_eq!(u64::from_ne_bytes(w), magic);
}
