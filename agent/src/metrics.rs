//! `/metrics` in the Prometheus (OpenMetrics) text format, built at each scrape from the host's
//! slots and the journal, so the numbers survive a restart of the agent.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ferry_migrations_active` | gauge | |
//! | `ferry_migrations_queued` | gauge | |
//! | `ferry_max_live_migrations` | gauge | |
//! | `ferry_vms` | gauge | |
//! | `ferry_storage_migrations_active`, `ferry_storage_migrations_queued`, `ferry_max_storage_migrations` | gauge | |
//! | `ferry_migrations_total` | counter | `direction` (`outgoing`, `incoming`, `local`: storage moves), `status`, `reason` (failed ones: `unreachable`, `refused`, `busy`, `cancelled`, `verify`, `engine`, `agent_restart`, `other`) |
//! | `ferry_migrations_by_encryption_total` | counter | `direction`, `status`, `encryption` (`aead`, `integrity`, `off`: live moves that ended) |
//! | `ferry_storage_migration_downtime_milliseconds` | histogram | (completed storage moves) |
//! | `ferry_migration_downtime_milliseconds` | histogram | (completed outgoing) |
//! | `ferry_migration_total_milliseconds` | histogram | (completed outgoing) |
//! | `ferry_channel_wire_bytes_total` | counter | `channel` |
//! | `ferry_channel_failures_total` | counter | |
//! | `ferry_disk_bytes_moved_total` | counter | `kind` (`storage`: bytes written to the copies; `shared-nothing`: disk data sent, outgoing) |

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::MigrationInfo;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    direction: String,
    status: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EncryptionLabels {
    direction: String,
    status: String,
    encryption: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Disk bytes a completed move carried (`None`: it moved no disk).
fn disk_bytes_moved(m: &MigrationInfo) -> Option<u64> {
    let stats = m.stats.as_ref()?;
    match (m.kind.as_str(), m.direction.as_str()) {
        ("storage", _) => stats.get("transferred_bytes")?.as_u64(),
        ("shared-nothing", "outgoing") => {
            let blocks: u64 = stats
                .get("disks")?
                .as_array()?
                .iter()
                .filter_map(|d| d.get("data_blocks").and_then(|b| b.as_u64()))
                .sum();
            Some(blocks.saturating_mul(ferry_disk::BLOCK_BYTES))
        }
        _ => None,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: String,
}

/// Why a migration failed, as a short label (from its journal error).
pub fn reason(m: &MigrationInfo) -> &'static str {
    let e = m.error.as_deref().unwrap_or("").to_ascii_lowercase();
    match m.status.as_str() {
        "completed" => "",
        "cancelled" => "cancelled",
        _ if e.contains("cannot reach") || e.contains("did not answer") => "unreachable",
        _ if e.contains("busy") || e.contains("at most") => "busy",
        _ if e.contains("different key") || e.contains("refused") || e.contains("unauthorized") => "refused",
        _ if e.contains("verif") => "verify",
        _ if e.contains("agent restarted") => "agent_restart",
        _ if e.contains("channel") || e.contains("converg") || e.contains("timed out") => "engine",
        _ => "other",
    }
}

/// Host numbers of the moment.
pub struct Now {
    /// Slots held.
    pub active: usize,
    /// Moves waiting.
    pub queued: usize,
    /// The limit.
    pub limit: usize,
    /// VMs owned.
    pub vms: usize,
    /// Storage moves running.
    pub storage_active: usize,
    /// Storage moves waiting.
    pub storage_queued: usize,
    /// `max_storage_migrations`.
    pub storage_limit: usize,
}

/// The exposition text.
pub fn render(now: &Now, journal: &[MigrationInfo]) -> String {
    let mut reg = Registry::default();
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: usize| {
        let g: Gauge = Gauge::default();
        g.set(v as i64);
        reg.register(name, help, g);
    };
    gauge(&mut reg, "ferry_migrations_active", "Live migrations holding a slot of the host-wide limit", now.active);
    gauge(&mut reg, "ferry_migrations_queued", "Moves waiting for a slot", now.queued);
    gauge(&mut reg, "ferry_max_live_migrations", "The host-wide limit", now.limit);
    gauge(&mut reg, "ferry_vms", "VMs this host owns", now.vms);
    gauge(&mut reg, "ferry_storage_migrations_active", "Storage moves holding a slot", now.storage_active);
    gauge(&mut reg, "ferry_storage_migrations_queued", "Storage moves waiting for a slot", now.storage_queued);
    gauge(&mut reg, "ferry_max_storage_migrations", "The storage move limit", now.storage_limit);
    let by = Family::<MigrationLabels, Counter>::default();
    let by_encryption = Family::<EncryptionLabels, Counter>::default();
    let downtime = Histogram::new(exponential_buckets(1.0, 2.0, 16));
    let total = Histogram::new(exponential_buckets(10.0, 2.0, 16));
    let storage_downtime = Histogram::new(exponential_buckets(0.125, 2.0, 16));
    let chan = Family::<ChannelLabels, Counter>::default();
    let chan_failures: Counter = Counter::default();
    let disk_bytes = Family::<KindLabels, Counter>::default();
    for m in journal.iter().filter(|m| m.is_final()) {
        if let Some(b) = disk_bytes_moved(m).filter(|_| m.status == "completed") {
            disk_bytes.get_or_create(&KindLabels { kind: m.kind.clone() }).inc_by(b);
        }
        by.get_or_create(&MigrationLabels {
            direction: m.direction.clone(),
            status: m.status.clone(),
            reason: reason(m).into(),
        })
        .inc();
        if let Some(e) = &m.encryption {
            by_encryption
                .get_or_create(&EncryptionLabels {
                    direction: m.direction.clone(),
                    status: m.status.clone(),
                    encryption: e.clone(),
                })
                .inc();
        }
        if m.status == "completed" && m.kind == "storage" {
            if let Some(d) = m.downtime_ms {
                storage_downtime.observe(d);
            }
        }
        if m.status == "completed" && m.direction == "outgoing" {
            if let Some(d) = m.downtime_ms {
                downtime.observe(d);
            }
            if let Some(t) = m.total_ms {
                total.observe(t);
            }
        }
        let channels = m.stats.as_ref().and_then(|s| s.get("channels")).and_then(|c| c.as_array());
        for c in channels.into_iter().flatten() {
            let idx = c.get("index").and_then(|v| v.as_u64()).unwrap_or(0);
            let bytes = c.get("wire_bytes").and_then(|v| v.as_u64()).unwrap_or(0);
            chan.get_or_create(&ChannelLabels { channel: idx.to_string() }).inc_by(bytes);
            if c.get("failed").and_then(|v| v.as_bool()).unwrap_or(false) {
                chan_failures.inc();
            }
        }
    }
    reg.register("ferry_migrations", "Migrations that ended, by direction, status and reason", by);
    reg.register(
        "ferry_migrations_by_encryption",
        "Live migrations that ended, by direction, status and frame protection",
        by_encryption,
    );
    reg.register("ferry_migration_downtime_milliseconds", "Downtime of completed outgoing migrations", downtime);
    reg.register("ferry_migration_total_milliseconds", "Total time of completed outgoing migrations", total);
    reg.register("ferry_storage_migration_downtime_milliseconds", "Pause of completed storage moves", storage_downtime);
    reg.register("ferry_channel_wire_bytes", "Bytes on the wire per channel index (outgoing)", chan);
    reg.register("ferry_channel_failures", "Channels that failed during a migration", chan_failures);
    reg.register("ferry_disk_bytes_moved", "Disk bytes completed moves carried, by kind", disk_bytes);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}
