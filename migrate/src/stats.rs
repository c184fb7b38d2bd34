//! Statistics of a migration (like QEMU's query-migrate) and progress events.
//!
//! With the cargo feature `serde` these (and the destination's
//! [`TargetStats`](crate::target::TargetStats)) serialize to JSON as they are, so no caller maps
//! them by hand. In JSON every duration is a number of milliseconds named `*_ms` (`total_ms`,
//! `downtime_ms`, ...), every rate says its unit (`dirty_rate_bytes_per_s`), and a status is its
//! lower-case name.

use std::time::Duration;

/// Serde glue: a [`Duration`] as a number of milliseconds (fractions allowed).
#[cfg(feature = "serde")]
pub(crate) mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as milliseconds (nanosecond precision).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_nanos() as f64 / 1e6)
    }

    /// Deserialize from milliseconds (finite, not negative, under 2^64 nanoseconds), rounded to
    /// the nanosecond.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        let ns = (v * 1e6).round();
        if !(0.0..u64::MAX as f64).contains(&ns) {
            return Err(serde::de::Error::custom(format!("{v} is not a duration in milliseconds")));
        }
        Ok(Duration::from_nanos(ns as u64))
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum Status {
    /// Waiting for a slot of the host-wide limit.
    #[default]
    Queued,
    /// Connecting and preparing the destination.
    Setup,
    /// Pre-copy rounds.
    Active,
    /// Source paused, final pages and state moving.
    Switchover,
    /// Destination runs the VM; source released it.
    Completed,
    /// Failed before commit: the source runs the VM.
    Failed,
    /// Cancelled before commit: the source runs the VM.
    Cancelled,
    /// Commit was sent but its confirmation never came: the source keeps its copy paused and
    /// does not resume it; an operator (or the agent) must ask the destination.
    Uncertain,
}

impl Status {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Switchover => "switchover",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Uncertain => "uncertain",
        }
    }
}

/// A progress event.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Progress {
    /// Status.
    pub status: Status,
    /// Current round.
    pub round: u32,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Bytes of pages still to send in this round or dirty.
    pub remaining_bytes: u64,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub transferred_bytes: u64,
    /// Expected downtime if we switched over now.
    #[cfg_attr(feature = "serde", serde(rename = "expected_downtime_ms", with = "ms"))]
    pub expected_downtime: Duration,
    /// Measured payload bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// Measured dirty rate, bytes/s.
    pub dirty_rate_bytes_per_s: f64,
    /// Throttle applied to the guest (100 = none).
    pub throttle_pct: u8,
}

/// Per-channel numbers.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ChannelStats {
    /// Channel index.
    pub index: u16,
    /// Backend.
    pub backend: String,
    /// Batches sent.
    pub batches: u64,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Batch latency (send to ack), microseconds: p50, p90, p99, max.
    pub latency_us: [u64; 4],
    /// Whether the channel failed during the migration.
    pub failed: bool,
}

/// The outcome of a migration. (`Default`: a migration that never started, status `queued`.)
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MigrationStats {
    /// Final status.
    pub status: Status,
    /// Start to end.
    #[cfg_attr(feature = "serde", serde(rename = "total_ms", with = "ms"))]
    pub total: Duration,
    /// Start to the first page sent (connect + prepare).
    #[cfg_attr(feature = "serde", serde(rename = "setup_ms", with = "ms"))]
    pub setup: Duration,
    /// Source pause to destination resume (as seen by the source: pause until `Resumed`).
    #[cfg_attr(feature = "serde", serde(rename = "downtime_ms", with = "ms"))]
    pub downtime: Duration,
    /// Downtime expected when switchover was decided.
    #[cfg_attr(feature = "serde", serde(rename = "expected_downtime_ms", with = "ms"))]
    pub expected_downtime: Duration,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Guest memory size.
    pub guest_bytes: u64,
    /// Bytes on the wire over all channels.
    pub transferred_bytes: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Pages sent with data.
    pub data_pages: u64,
    /// Pages sent compressed.
    pub compressed_batches: u64,
    /// Pages per round.
    pub pages_per_round: Vec<u64>,
    /// Last measured dirty rate, bytes/s.
    pub dirty_rate_bytes_per_s: f64,
    /// Guest bytes moved per second over the whole migration (guest_bytes / total).
    pub throughput_bytes_per_s: f64,
    /// Throttle in force at switchover.
    pub throttle_pct: u8,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// The destination verified the image against the source's digest.
    pub verified: bool,
    /// How the channels' frames were protected: `aead`, `integrity` or `off`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub encryption: String,
    /// Notable events (channel failures, throttling, ...).
    pub events: Vec<String>,
    /// Disks of a shared-nothing move, one per disk (empty for memory only).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "Vec::is_empty"))]
    pub disks: Vec<crate::disks::DiskStats>,
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    #[test]
    fn stats_serialize_with_units_in_names_and_round_trip() {
        let s = MigrationStats {
            status: Status::Completed,
            total: Duration::from_micros(1_500_250),
            downtime: Duration::from_millis(12),
            rounds: 3,
            dirty_rate_bytes_per_s: 1.5e6,
            throughput_bytes_per_s: 2.0e9,
            channels: vec![ChannelStats {
                index: 1,
                backend: "tcp".into(),
                latency_us: [1, 2, 3, 4],
                ..Default::default()
            }],
            events: vec!["plan".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["total_ms"], 1500.25);
        assert_eq!(v["downtime_ms"], 12.0);
        assert_eq!(v["dirty_rate_bytes_per_s"], 1.5e6);
        assert_eq!(v["throughput_bytes_per_s"], 2.0e9);
        assert_eq!(v["channels"][0]["backend"], "tcp");
        for k in ["total", "dirty_rate_bps", "throughput_bps"] {
            assert!(v.get(k).is_none(), "{k} in {v}");
        }
        let back: MigrationStats = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, s);
        let mut bad = v;
        bad["total_ms"] = serde_json::json!(-1.0);
        assert!(serde_json::from_value::<MigrationStats>(bad).is_err());
    }
}
