//! How fast this machine seals and opens AES-256-GCM on one core, against a plain copy of the
//! same bytes in the same run: the floor under `--encryption aead`'s cost (see the README,
//! "what encryption costs"). aws-lc-rs (what Ferry seals with) and ring (the other well-kept
//! Rust AEAD) side by side, each over a buffer that stays in cache (`hot`, 128 KiB: a sealed
//! frame's span) and over 1 GiB read once per pass (`cold`, like guest memory).
//!
//! `cargo run --release -p ferry-transport --example aead_speed [-- --passes N]`
//!
//! Prints a table and one JSON object per row (`bytes_per_s`, and `vs_copy`: the copy's rate over
//! the AEAD's, the AEAD's cost in copies of the same bytes).

use std::time::Instant;

const HOT_BYTES: usize = 128 << 10;
const COLD_BYTES: usize = 1 << 30;
const SPAN: usize = 128 << 10;

/// One AEAD under test: seal or open `buf` in place, the `i`th span (a distinct nonce each).
trait Aead {
    fn name(&self) -> &'static str;
    fn seal(&self, i: u64, buf: &mut [u8]) -> [u8; 16];
    fn open(&self, i: u64, buf: &mut [u8], tag: [u8; 16]);
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

struct AwsLc(aws_lc_rs::aead::LessSafeKey);

impl Aead for AwsLc {
    fn name(&self) -> &'static str {
        "aws-lc-rs"
    }
    fn seal(&self, i: u64, buf: &mut [u8]) -> [u8; 16] {
        use aws_lc_rs::aead::{Aad, Nonce};
        let tag = self.0.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::empty(), buf);
        tag.expect("seal").as_ref().try_into().expect("16-byte tag")
    }
    fn open(&self, i: u64, buf: &mut [u8], tag: [u8; 16]) {
        use aws_lc_rs::aead::{Aad, Nonce};
        let nonce = Nonce::assume_unique_for_key(nonce(i));
        self.0.open_in_place_separate_tag(nonce, Aad::empty(), &tag, buf).expect("open");
    }
}

struct Ring(ring::aead::LessSafeKey);

impl Aead for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }
    fn seal(&self, i: u64, buf: &mut [u8]) -> [u8; 16] {
        use ring::aead::{Aad, Nonce};
        let tag = self.0.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::empty(), buf);
        tag.expect("seal").as_ref().try_into().expect("16-byte tag")
    }
    fn open(&self, i: u64, buf: &mut [u8], tag: [u8; 16]) {
        use ring::aead::{Aad, Nonce};
        let nonce = Nonce::assume_unique_for_key(nonce(i));
        self.0.open_in_place_separate_tag(nonce, Aad::empty(), ring::aead::Tag::from(tag), buf, 0..).expect("open");
    }
}

struct Row {
    what: String,
    memory: &'static str,
    bytes_per_s: f64,
}

/// Bytes per second of `f` over `bytes`, best of `passes`.
fn rate(passes: usize, bytes: usize, mut f: impl FnMut()) -> f64 {
    (0..passes)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let mut passes = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().map(|v| v.parse::<usize>())) {
            ("--passes", Some(Ok(n))) if n > 0 => passes = n,
            _ => {
                eprintln!("usage: aead_speed [--passes N (at least 1)]");
                std::process::exit(2);
            }
        }
    }
    let key = [0x42u8; 32];
    let aws = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key).expect("key");
    let rng = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key");
    let aeads: [Box<dyn Aead>; 2] =
        [Box::new(AwsLc(aws_lc_rs::aead::LessSafeKey::new(aws))), Box::new(Ring(ring::aead::LessSafeKey::new(rng)))];
    // Bytes that do not compress or repeat (as a random guest page), touched once before timing.
    let mut cold: Vec<u8> =
        (0..COLD_BYTES as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
    let mut hot = cold[..HOT_BYTES].to_vec();
    let mut copy_to = vec![0u8; COLD_BYTES];
    let mut rows = Vec::new();

    // The reference: a copy of the same bytes (what a plain send or receive costs in the kernel).
    let hot_reps = COLD_BYTES / HOT_BYTES;
    let mut dst = vec![0u8; HOT_BYTES];
    let r = rate(passes, COLD_BYTES, || {
        for _ in 0..hot_reps {
            dst.copy_from_slice(std::hint::black_box(&hot));
            std::hint::black_box(&mut dst);
        }
    });
    rows.push(Row { what: "copy".into(), memory: "hot", bytes_per_s: r });
    let r = rate(passes, COLD_BYTES, || {
        copy_to.copy_from_slice(std::hint::black_box(&cold));
        std::hint::black_box(&mut copy_to);
    });
    rows.push(Row { what: "copy".into(), memory: "cold", bytes_per_s: r });

    for a in &aeads {
        let r = rate(passes, COLD_BYTES, || {
            for i in 0..hot_reps as u64 {
                std::hint::black_box(a.seal(i, &mut hot));
            }
        });
        rows.push(Row { what: format!("{} seal", a.name()), memory: "hot", bytes_per_s: r });
        let mut tags = vec![[0u8; 16]; COLD_BYTES / SPAN];
        let r = rate(passes, COLD_BYTES, || {
            for (i, (span, tag)) in cold.chunks_mut(SPAN).zip(tags.iter_mut()).enumerate() {
                *tag = a.seal(i as u64, span);
            }
        });
        rows.push(Row { what: format!("{} seal", a.name()), memory: "cold", bytes_per_s: r });
        // Open what the last pass sealed (each pass sealed the previous one's output again:
        // open once, then seal back, so every timed open checks a real tag).
        let mut opened = 0.0f64;
        for _ in 0..passes {
            let t = Instant::now();
            for (i, (span, tag)) in cold.chunks_mut(SPAN).zip(tags.iter()).enumerate() {
                a.open(i as u64, span, *tag);
            }
            opened = opened.max(COLD_BYTES as f64 / t.elapsed().as_secs_f64());
            for (i, (span, tag)) in cold.chunks_mut(SPAN).zip(tags.iter_mut()).enumerate() {
                *tag = a.seal(i as u64, span);
            }
        }
        rows.push(Row { what: format!("{} open", a.name()), memory: "cold", bytes_per_s: opened });
    }

    let copy =
        |memory: &str| rows.iter().find(|r| r.what == "copy" && r.memory == memory).map_or(1.0, |r| r.bytes_per_s);
    println!("AES-256-GCM on one core, {passes} passes over 1 GiB each (best), spans of {} KiB", SPAN >> 10);
    println!("{:<16} {:>6} {:>12} {:>8}", "what", "memory", "GB/s", "vs copy");
    println!("{:<16} {:>6} {:>12} {:>8}", "-".repeat(16), "------", "-".repeat(12), "-------");
    for r in &rows {
        println!(
            "{:<16} {:>6} {:>12.2} {:>7.2}x",
            r.what,
            r.memory,
            r.bytes_per_s / 1e9,
            copy(r.memory) / r.bytes_per_s
        );
    }
    for r in &rows {
        println!(
            "{{\"what\":\"{}\",\"memory\":\"{}\",\"bytes_per_s\":{:.0},\"vs_copy\":{:.3}}}",
            r.what,
            r.memory,
            r.bytes_per_s,
            copy(r.memory) / r.bytes_per_s
        );
    }
}
