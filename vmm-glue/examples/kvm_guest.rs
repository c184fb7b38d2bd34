//! Run Ferry's KVM guest and print what it does: `cargo run --release -p ferry-vmm-glue --example
//! kvm_guest -- [mem_mib] [ws_pages] [stride] [seconds]`.
//!
//! Prints the KVM capabilities, the guest's pass rate and dirty rate, the cost of a dirty-log
//! read, pause/resume latency and the state size.

use std::time::{Duration, Instant};

use ferry_migrate::vm::SourceVm;
use ferry_vmm_glue::kvm::{kvm_usable, GuestConfig, KvmVm};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let caps = match kvm_usable() {
        Ok(c) => c,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    println!("{caps:?}");
    let mem_mib = arg(1, 256);
    let cfg = GuestConfig {
        vm_id: "probe".into(),
        mem_bytes: mem_mib << 20,
        slot_bytes: 512 << 20,
        ws_pages: arg(2, 16384),
        stride: arg(3, 512),
        ..Default::default()
    };
    let secs = arg(4, 2);
    let mut vm = KvmVm::boot(&cfg).expect("boot");
    vm.start().expect("start");
    if std::env::var_os("NO_DIRTY_LOG").is_none() {
        vm.start_dirty_log().expect("dirty log");
    }
    let t0 = Instant::now();
    let mut takes = Vec::new();
    let mut dirty = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let d = vm.take_dirty().expect("take");
        takes.push(t.elapsed());
        dirty += d.count();
    }
    let el = t0.elapsed().as_secs_f64();
    let r = vm.report();
    println!(
        "{} MiB guest, ws {} pages ({} MiB), stride {}: {} passes in {el:.2}s = {:.1} passes/s, {:.0} MiB/s of pages rewritten, {} exits",
        mem_mib,
        cfg.ws_pages,
        (cfg.ws_pages * 4096) >> 20,
        cfg.stride,
        r.passes,
        r.passes as f64 / el,
        r.passes as f64 * cfg.ws_pages as f64 * 4096.0 / el / 1048576.0,
        vm.exits()
    );
    takes.sort();
    println!(
        "dirty log: {dirty} pages over {} takes; take cost median {:?} max {:?}",
        takes.len(),
        takes[takes.len() / 2],
        takes[takes.len() - 1]
    );
    let mut p = Vec::new();
    let mut s = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        vm.pause().expect("pause");
        p.push(t.elapsed());
        let t = Instant::now();
        let st = vm.save_state().expect("save");
        s.push((t.elapsed(), st.len()));
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().expect("pause");
    p.sort();
    s.sort();
    println!(
        "pause: median {:?} max {:?}; save_state: median {:?} ({} bytes)",
        p[p.len() / 2],
        p[p.len() - 1],
        s[s.len() / 2].0,
        s[0].1
    );
    let r = vm.report();
    println!("errors reported by the guest: {}", r.errors);
}
