//! Sizes and rates as written on the command line.

use std::fmt;
use std::str::FromStr;

use ferry_transport::wire::PAGE_SIZE;

/// Largest page set a benchmark accepts (each of the two processes maps this much).
pub const MAX_SIZE: u64 = 64 << 30;

/// Parse a size: a number with an optional unit, `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`
/// (powers of 1024) or `KB`/`MB`/`GB`/`TB` (powers of 1000). It must be a positive multiple of the
/// page size (4 KiB) and at most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = ferry_memory::size::parse_bytes(s)?;
    if bytes == 0 {
        return Err(format!("size {s:?} is zero"));
    }
    if bytes > MAX_SIZE {
        return Err(format!("size {s:?} is larger than {} GiB", MAX_SIZE >> 30));
    }
    if bytes % PAGE_SIZE as u64 != 0 {
        return Err(format!("size {s:?} ({bytes} bytes) is not a multiple of the 4 KiB page size"));
    }
    Ok(bytes)
}

/// Human-readable binary size (`1 GiB`, `64 MiB`, `12345 B`).
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (u, m) in UNITS {
        if b >= m {
            return if b % m == 0 { format!("{} {u}", b / m) } else { format!("{:.1} {u}", b as f64 / m as f64) };
        }
    }
    format!("{b} B")
}

/// A link rate, in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate {
    /// Bits per second.
    pub bits_per_s: u64,
}

impl Rate {
    /// Lowest rate accepted (tc's tbf is not meant for less).
    pub const MIN_BITS: u64 = 8_000;
    /// Highest rate accepted.
    pub const MAX_BITS: u64 = 1_000_000_000_000;

    /// Bytes per second.
    pub fn bytes_per_s(self) -> u64 {
        self.bits_per_s / 8
    }
}

impl FromStr for Rate {
    type Err = String;

    /// Parse a tc-style bit rate: `500mbit`, `1gbit`, `2.5gbit`, `64kbit`, `8000bit`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            "tbit" => 1_000_000_000_000,
            _ => return Err(format!("rate {s:?}: expected a number and bit, kbit, mbit, gbit or tbit (like 1gbit)")),
        };
        if num.is_empty() {
            return Err(format!("rate {s:?} does not start with a number (like 500mbit)"));
        }
        let v: f64 = num.parse().map_err(|_| format!("rate {s:?}: {num:?} is not a number"))?;
        let bits = v * mult as f64;
        if !bits.is_finite() || bits < Self::MIN_BITS as f64 || bits > Self::MAX_BITS as f64 {
            return Err(format!("rate {s:?} is outside 8kbit..1tbit"));
        }
        Ok(Rate { bits_per_s: bits.round() as u64 })
    }
}

impl fmt::Display for Rate {
    /// tc syntax, exact: `1gbit`, `500mbit`, `2500mbit`, `123456bit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_s;
        for (u, m) in [("tbit", 1_000_000_000_000u64), ("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000)] {
            if b % m == 0 {
                return write!(f, "{}{u}", b / m);
            }
        }
        write!(f, "{b}bit")
    }
}

/// Parse a rate for clap.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse()
}

/// Bytes per second as Gbit/s.
pub fn gbit(bytes_per_s: f64) -> f64 {
    bytes_per_s * 8.0 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0.5GiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096000KB"), Ok(4_096_000_000));
        for bad in ["", "GiB", "0", "1000", "1XiB", "-1GiB", "1.2.3GiB", "100TiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
    }

    #[test]
    fn rates() {
        assert_eq!("1gbit".parse::<Rate>(), Ok(Rate { bits_per_s: 1_000_000_000 }));
        assert_eq!("2.5gbit".parse::<Rate>().map(|r| r.to_string()), Ok("2500mbit".into()));
        assert_eq!("500Mbit".parse::<Rate>().map(|r| r.bytes_per_s()), Ok(62_500_000));
        for bad in ["", "1", "1gb", "fast", "0gbit", "1kbit", "5tbit", "nanbit", "1e3mbit"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
    }
}
