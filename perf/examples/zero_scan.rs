//! How fast the sender's per-page work runs over resident guest memory of the standard mix, in
//! GB/s: the old two passes (zero check, then hash) against one `scan::scan_page` pass, and
//! `scan::scan_slice` over the whole mapping (what the engine runs per batch).
//! `cargo run --release -p ferry-perf --example zero_scan`.

use ferry_memory::scan::{scan_page, scan_slice};
use ferry_memory::volatile::page_is_zero;
use ferry_memory::AnonMemory;
use ferry_vmm_glue::pagemix::{fill_page, Mix};
use std::time::Instant;
fn main() {
    let len = std::env::args().nth(1).and_then(|s| s.parse::<usize>().ok()).unwrap_or(1024) << 20;
    let m = AnonMemory::new(len, false).expect("mmap");
    let mix = Mix::default();
    let mut buf = vec![0u8; 4096];
    for (i, off) in (0..len).step_by(4096).enumerate() {
        fill_page(&mut buf, mix.kind(1, i as u64), 1, i as u64);
        m.write_from(off, &buf);
    }
    let base = m.slice().as_ptr();
    for _ in 0..3 {
        let t = Instant::now();
        let mut x = 0u64;
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len: a whole page inside the mapping, page aligned.
            let p = unsafe { base.add(off) };
            // SAFETY: as above; volatile reads only.
            x ^= if unsafe { page_is_zero(p) } { 1 } else { unsafe { scan_page(p) }.hash };
        }
        let old = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        let mut y = 0u64;
        for off in (0..len).step_by(4096) {
            // SAFETY: as above.
            let s = unsafe { scan_page(base.add(off)) };
            y ^= if s.zero { 1 } else { s.hash };
        }
        let new = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        let mut z = 0u64;
        assert!(scan_slice(m.slice(), |_, s| z ^= if s.zero { 1 } else { s.hash }));
        let run = len as f64 / t.elapsed().as_secs_f64() / 1e9;
        assert_eq!(y, z);
        println!("zero check + hash: {old:.2} GB/s; one scan: {new:.2} GB/s; run scan: {run:.2} GB/s ({x:x} {y:x})");
    }
}
