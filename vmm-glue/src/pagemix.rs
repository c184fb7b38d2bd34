//! Deterministic page contents for tests and benchmarks: zero pages, text-like pages (compress
//! about 5-10x with zstd, like the heap of a running service) and random pages (incompressible,
//! like encrypted or already compressed data), mixed in given proportions.
//!
//! Kinds are chosen per group of [`GROUP_PAGES`] pages (real memory is clustered: a zeroed heap
//! arena, a file cache, a JIT region), deterministically from the seed and the page index, so a
//! source and a checker regenerate the same image independently.

use ferry_transport::wire::PAGE_SIZE;

/// Pages that share a kind.
pub const GROUP_PAGES: u64 = 8;

/// Kind of a generated page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zeros.
    Zero,
    /// Text-like, compressible.
    Text,
    /// Random, incompressible.
    Random,
}

/// Proportions of page kinds, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Percent zero pages.
    pub zero: u8,
    /// Percent text-like pages.
    pub text: u8,
    /// Percent random pages.
    pub random: u8,
}

impl Default for Mix {
    /// The standard mixture: 40 % zero, 30 % text, 30 % random.
    fn default() -> Self {
        Self { zero: 40, text: 30, random: 30 }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    /// Parses `zero=40,text=30,random=30` (missing kinds are 0; the sum must be 100).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = Mix { zero: 0, text: 0, random: 0 };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("mix part {part:?} is not kind=percent"))?;
            let v: u8 = v.trim().parse().map_err(|_| format!("mix percent {v:?} is not a number 0-100"))?;
            match k.trim() {
                "zero" => m.zero = v,
                "text" => m.text = v,
                "random" => m.random = v,
                other => return Err(format!("unknown page kind {other:?} (zero, text, random)")),
            }
        }
        if u32::from(m.zero) + u32::from(m.text) + u32::from(m.random) != 100 {
            return Err(format!(
                "mix percentages add up to {}, not 100",
                u32::from(m.zero) + u32::from(m.text) + u32::from(m.random)
            ));
        }
        Ok(m)
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "zero={},text={},random={}", self.zero, self.text, self.random)
    }
}

/// SplitMix64 step.
#[inline]
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Mix {
    /// Kind of page `index` under `seed`.
    pub fn kind(&self, seed: u64, index: u64) -> PageKind {
        let mut s = seed ^ (index / GROUP_PAGES).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let r = (splitmix(&mut s) % 100) as u8;
        if r < self.zero {
            PageKind::Zero
        } else if r < self.zero + self.text {
            PageKind::Text
        } else {
            PageKind::Random
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "migration",
    "page",
    "memory",
    "guest",
    "host",
    "round",
    "dirty",
    "channel",
    "batch",
    "kernel",
    "buffer",
    "request",
    "session",
    "value",
    "error",
    "return",
    "struct",
    "index",
    "thread",
    "queue",
    "timer",
    "socket",
    "config",
    "device",
    "region",
    "offset",
    "length",
    "status",
    "commit",
    "resume",
    "pause",
    "state",
    "vector",
    "string",
    "result",
    "option",
    "server",
    "client",
    "cache",
    "table",
    "entry",
    "lock",
    "user",
    "file",
    "path",
    "node",
    "list",
    "hash",
    "map",
    "key",
    "data",
    "time",
    "log",
    "info",
    "debug",
    "trace",
    "warn",
    "id",
    "name",
];

/// Fill `page` (4096 bytes) with the content of page `index` of kind `kind` under `seed`.
pub fn fill_page(page: &mut [u8], kind: PageKind, seed: u64, index: u64) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    // Mix seed and index into a random point of the SplitMix sequence, so that pages do not share
    // stretches of one sequence.
    let mut s = seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x5555;
    let mut s = splitmix(&mut s);
    match kind {
        PageKind::Zero => page.fill(0),
        PageKind::Random => {
            for c in page.chunks_exact_mut(8) {
                c.copy_from_slice(&splitmix(&mut s).to_le_bytes());
            }
        }
        PageKind::Text => {
            let mut pos = 0;
            let mut r = splitmix(&mut s);
            let mut bits = 64;
            while pos < PAGE_SIZE {
                if bits < 16 {
                    r = splitmix(&mut s);
                    bits = 64;
                }
                let w = WORDS[(r & 63) as usize % WORDS.len()].as_bytes();
                let sep: &[u8] = match (r >> 6) & 15 {
                    0 => b"\n",
                    1 => b"=",
                    2 => {
                        // a number: the noise that keeps text from compressing too well
                        let d = b'0' + ((r >> 10) % 10) as u8;
                        page[pos] = d;
                        pos += 1;
                        if pos >= PAGE_SIZE {
                            break;
                        }
                        b" "
                    }
                    _ => b" ",
                };
                r >>= 16;
                bits -= 16;
                for &b in w.iter().chain(sep) {
                    if pos >= PAGE_SIZE {
                        break;
                    }
                    page[pos] = b;
                    pos += 1;
                }
            }
        }
    }
}

/// Expected content of page `index` under a mix.
pub fn expected_page(mix: &Mix, seed: u64, index: u64, page: &mut [u8]) {
    fill_page(page, mix.kind(seed, index), seed, index);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        assert_eq!("zero=40,text=30,random=30".parse::<Mix>().unwrap(), Mix::default());
        assert_eq!("random=100".parse::<Mix>().unwrap(), Mix { zero: 0, text: 0, random: 100 });
        assert!("zero=50".parse::<Mix>().is_err());
        assert!("foo=100".parse::<Mix>().is_err());
        assert!("zero=x".parse::<Mix>().is_err());
    }

    #[test]
    fn proportions_and_compressibility() {
        let mix = Mix::default();
        let n = 40_000u64;
        let mut counts = [0u64; 3];
        for i in 0..n {
            counts[mix.kind(1, i) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([40.0, 30.0, 30.0]) {
            let pct = *c as f64 * 100.0 / n as f64;
            assert!((pct - want).abs() < 3.0, "{counts:?}");
        }
        let mut text = vec![0u8; PAGE_SIZE * 64];
        for (i, p) in text.chunks_exact_mut(PAGE_SIZE).enumerate() {
            fill_page(p, PageKind::Text, 3, i as u64);
        }
        let z = zstd::bulk::compress(&text, 1).unwrap();
        let ratio = text.len() as f64 / z.len() as f64;
        assert!((3.0..20.0).contains(&ratio), "text ratio {ratio}");
        let mut rnd = vec![0u8; PAGE_SIZE * 16];
        for (i, p) in rnd.chunks_exact_mut(PAGE_SIZE).enumerate() {
            fill_page(p, PageKind::Random, 3, i as u64);
        }
        assert!(zstd::bulk::compress(&rnd, 1).unwrap().len() > rnd.len() * 99 / 100);
    }
}
