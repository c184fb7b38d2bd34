//! Sizes as people write them (`64MiB`, `1.5GiB`, `4096`), for every command line and config
//! file of the workspace.

/// Parse a size in bytes: a number (decimals allowed) with an optional unit, `B`, `K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024) or `KB`/`MB`/`GB`/`TB` (powers of 1000), case
/// insensitive. Zero is a size; callers add their own bounds (page multiple, limits).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?} does not start with a number (like 1GiB, 64MiB)"));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| format!("size {s:?}: {num:?} is not a number"))?;
        let b = v * mult as f64;
        // 2^64 as f64: anything at or above it does not fit.
        if !b.is_finite() || b >= 18_446_744_073_709_551_616.0 {
            return Err(format!("size {s:?} is too large"));
        }
        Ok(b.round() as u64)
    } else {
        let v: u64 = num.parse().map_err(|_| format!("size {s:?}: {num:?} is not a number"))?;
        v.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn units_decimals_and_errors() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes(" 2 gib "), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5K"), Ok(1536));
        assert_eq!(parse_bytes("3MB"), Ok(3_000_000));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown size unit"));
        assert!(parse_bytes("99999999999TiB").unwrap_err().contains("too large"));
        assert!(parse_bytes("1e30").is_err());
        assert!(parse_bytes("1.2.3M").is_err());
    }
}
