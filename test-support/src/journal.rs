//! Reading an agent's migration journal (`GET /v1/migrations`, as JSON).

use serde_json::Value;

/// Most journal intervals `[started_at, finished_at)` open at once. RFC 3339 UTC strings of one
/// format sort as times; at equal times an end comes before a start. Entries without both times
/// are left out.
pub fn max_concurrent(migrations: &[Value]) -> usize {
    let mut ev: Vec<(&str, i32)> = Vec::new();
    for m in migrations {
        let (Some(s), Some(f)) = (m["started_at"].as_str(), m["finished_at"].as_str()) else { continue };
        ev.push((s, 1));
        ev.push((f, -1));
    }
    ev.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        now += d;
        max = max.max(now);
    }
    max as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlaps_are_counted_and_touching_intervals_are_not() {
        let m = |s: &str, f: &str| json!({"started_at": s, "finished_at": f});
        let j = [
            m("2026-01-01T00:00:00.000Z", "2026-01-01T00:00:02.000Z"),
            m("2026-01-01T00:00:01.000Z", "2026-01-01T00:00:03.000Z"),
            m("2026-01-01T00:00:03.000Z", "2026-01-01T00:00:04.000Z"),
            json!({"started_at": "2026-01-01T00:00:01.500Z", "finished_at": null}),
        ];
        assert_eq!(max_concurrent(&j), 2);
        assert_eq!(max_concurrent(&j[2..]), 1);
        assert_eq!(max_concurrent(&[]), 0);
    }
}
