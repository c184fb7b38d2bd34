//! Compression speed and ratio of the page mixture's text-like and random pages by zstd level,
//! 1 MiB at a time like the `zstd` option's batches (one core). Explains what `migration-bench
//! stream --option zstd` can reach: `cargo run --release -p ferry-perf --example zstd_speed`.
use ferry_vmm_glue::pagemix::{fill_page, PageKind};
use std::time::Instant;
fn main() {
    let pages = 256 * 64;
    let mut text = vec![0u8; pages * 4096];
    for (i, p) in text.chunks_exact_mut(4096).enumerate() {
        fill_page(p, PageKind::Text, 1, i as u64);
    }
    let mut rnd = vec![0u8; pages * 4096];
    for (i, p) in rnd.chunks_exact_mut(4096).enumerate() {
        fill_page(p, PageKind::Random, 1, i as u64);
    }
    let mut out = vec![0u8; 2 << 20];
    for (name, data) in [("text", &text), ("random", &rnd)] {
        for level in [-5, -3, -1, 1, 2, 3] {
            let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
            let t = Instant::now();
            let mut total = 0;
            for chunk in data.chunks(1 << 20) {
                total += c.compress_to_buffer(chunk, &mut out[..]).expect("zstd");
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{name} level {level}: {:.0} MB/s ratio {:.2}",
                data.len() as f64 / s / 1e6,
                data.len() as f64 / total as f64
            );
        }
    }
}
