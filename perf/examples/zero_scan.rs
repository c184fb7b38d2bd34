//! How fast the sender's zero-page check (`memory::page_is_zero`) scans resident zero pages of
//! cold memory, in GB/s: `cargo run --release -p ferry-perf --example zero_scan`.
use ferry_transport::memory::{page_is_zero, AnonMemory};
use std::time::Instant;
fn main() {
    let len = 1usize << 30;
    let m = AnonMemory::new(len, false).expect("mmap");
    m.prefault();
    for _ in 0..3 {
        let t = Instant::now();
        let mut zero = 0usize;
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len: a whole page inside the mapping, page aligned.
            if unsafe { page_is_zero(m.as_ptr().add(off)) } {
                zero += 1;
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!("page_is_zero: {zero} pages, {:.2} GB/s", len as f64 / s / 1e9);
    }
}
