//! Durable state in SQLite (`STATE_DIR/ferryd.db`): the VMs this host owns, with an ownership
//! epoch and their VMM process, and a journal of every migration with each state change and its
//! time. After a restart the agent reads it back: the VMs to adopt, the migrations in flight.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use crate::api::{GuestKind, MigrationEvent, MigrationInfo};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a Unix-epoch millisecond time.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A VM row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    /// Name.
    pub name: String,
    /// Guest kind.
    pub guest: GuestKind,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Ownership epoch.
    pub epoch: u64,
    /// VMM process id.
    pub pid: u32,
    /// VMM control socket.
    pub socket: String,
    /// 1: owned and running here; 0: an incoming VM not committed yet.
    pub owned: bool,
    /// The migration it arrived with.
    pub arrived_with: Option<String>,
}

/// The database.
pub struct Store {
    db: Connection,
}

impl Store {
    /// Open (creating) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(dir.join("ferryd.db"))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS vms (
                 name TEXT PRIMARY KEY, guest TEXT NOT NULL, memory_bytes INTEGER NOT NULL,
                 epoch INTEGER NOT NULL, pid INTEGER NOT NULL, socket TEXT NOT NULL,
                 owned INTEGER NOT NULL, arrived_with TEXT);
             CREATE TABLE IF NOT EXISTS migrations (
                 id TEXT PRIMARY KEY, vm TEXT NOT NULL, direction TEXT NOT NULL, peer TEXT NOT NULL,
                 status TEXT NOT NULL, queued_at INTEGER NOT NULL, started_at INTEGER,
                 finished_at INTEGER, error TEXT, stats TEXT);
             CREATE TABLE IF NOT EXISTS migration_events (
                 id TEXT NOT NULL, status TEXT NOT NULL, at INTEGER NOT NULL, detail TEXT);
             CREATE INDEX IF NOT EXISTS migration_events_id ON migration_events(id);
             CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        // Journals written before quick moves have no kind: they were live.
        let has_kind: i64 =
            db.query_row("SELECT COUNT(*) FROM pragma_table_info('migrations') WHERE name = 'kind'", [], |r| r.get(0))?;
        if has_kind == 0 {
            db.execute_batch("ALTER TABLE migrations ADD COLUMN kind TEXT NOT NULL DEFAULT 'live';")?;
        }
        // Journals written before the protection was recorded: unknown (NULL).
        let has_encryption: i64 =
            db.query_row("SELECT COUNT(*) FROM pragma_table_info('migrations') WHERE name = 'encryption'", [], |r| {
                r.get(0)
            })?;
        if has_encryption == 0 {
            db.execute_batch("ALTER TABLE migrations ADD COLUMN encryption TEXT;")?;
        }
        // Journals written before incoming moves promised disk space: none.
        let has_disk: i64 = db.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('migrations') WHERE name = 'disk_reserved_bytes'",
            [],
            |r| r.get(0),
        )?;
        if has_disk == 0 {
            db.execute_batch("ALTER TABLE migrations ADD COLUMN disk_reserved_bytes INTEGER;")?;
        }
        Ok(Self { db })
    }

    /// Run `f` as one transaction: every write of it lands, or none (one commit, so one sync
    /// of the journal on disk instead of one per statement). Nests.
    pub fn atomically<T>(&self, f: impl FnOnce(&Self) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.db.execute_batch("SAVEPOINT ferry_atomically")?;
        match f(self) {
            Ok(v) => {
                self.db.execute_batch("RELEASE ferry_atomically")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK TO ferry_atomically; RELEASE ferry_atomically");
                Err(e)
            }
        }
    }

    /// The host settings changed at run time, if they ever were.
    pub fn settings(&self) -> Result<Option<crate::config::Settings>, StoreError> {
        let v: Option<String> =
            self.db.query_row("SELECT value FROM settings WHERE key = 'host'", [], |r| r.get(0)).optional()?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Keep the host settings (they win over the config file at the next start).
    pub fn put_settings(&self, s: &crate::config::Settings) -> Result<(), StoreError> {
        let v = serde_json::to_string(s).unwrap_or_default();
        self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('host', ?1)", params![v])?;
        Ok(())
    }

    /// Insert or replace a VM.
    pub fn put_vm(&self, v: &VmRow) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT OR REPLACE INTO vms (name, guest, memory_bytes, epoch, pid, socket, owned, arrived_with)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                v.name,
                v.guest.name(),
                v.memory_bytes as i64,
                v.epoch as i64,
                v.pid,
                v.socket,
                v.owned,
                v.arrived_with
            ],
        )?;
        Ok(())
    }

    /// Forget a VM (deleted, or it moved away).
    pub fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM vms WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Every VM row.
    pub fn vms(&self) -> Result<Vec<VmRow>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT name, guest, memory_bytes, epoch, pid, socket, owned, arrived_with FROM vms ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            let guest: String = r.get(1)?;
            Ok(VmRow {
                name: r.get(0)?,
                guest: guest.parse().unwrap_or(GuestKind::Synthetic),
                memory_bytes: r.get::<_, i64>(2)? as u64,
                epoch: r.get::<_, i64>(3)? as u64,
                pid: r.get(4)?,
                socket: r.get(5)?,
                owned: r.get(6)?,
                arrived_with: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Journal a new live migration.
    /// `started`: it holds a slot already (an admitted incoming migration).
    pub fn new_migration(
        &self,
        id: &str,
        vm: &str,
        direction: &str,
        peer: &str,
        status: &str,
        started: bool,
    ) -> Result<(), StoreError> {
        self.new_migration_of_kind(id, vm, direction, peer, status, started, "live")
    }

    /// Journal a new migration of `kind` (`live`, `quick`).
    #[allow(clippy::too_many_arguments)]
    pub fn new_migration_of_kind(
        &self,
        id: &str,
        vm: &str,
        direction: &str,
        peer: &str,
        status: &str,
        started: bool,
        kind: &str,
    ) -> Result<(), StoreError> {
        let t = now_ms();
        self.atomically(|s| {
            s.db.execute(
                "INSERT INTO migrations (id, vm, direction, peer, status, queued_at, started_at, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![id, vm, direction, peer, status, t, started.then_some(t), kind],
            )?;
            s.db.execute("INSERT INTO migration_events (id, status, at) VALUES (?1, ?2, ?3)", params![id, status, t])?;
            Ok(())
        })
    }

    /// A state change. `started` marks the moment it got its slot; final statuses set the end.
    pub fn set_status(&self, id: &str, status: &str, detail: Option<&str>, started: bool) -> Result<(), StoreError> {
        let t = now_ms();
        let fin = matches!(status, "completed" | "failed" | "cancelled");
        self.atomically(|s| {
            s.db.execute(
                "UPDATE migrations SET status = ?2,
                     started_at = CASE WHEN ?3 THEN ?4 ELSE started_at END,
                     finished_at = CASE WHEN ?5 THEN ?4 ELSE finished_at END,
                     error = COALESCE(?6, error)
                 WHERE id = ?1",
                params![id, status, started, t, fin, if fin && status != "completed" { detail } else { None }],
            )?;
            s.db.execute(
                "INSERT INTO migration_events (id, status, at, detail) VALUES (?1, ?2, ?3, ?4)",
                params![id, status, t, detail],
            )?;
            Ok(())
        })
    }

    /// Record how a migration's frames are protected (`aead`, `integrity`, `off`).
    pub fn set_encryption(&self, id: &str, mode: &str) -> Result<(), StoreError> {
        self.db.execute("UPDATE migrations SET encryption = ?2 WHERE id = ?1", params![id, mode])?;
        Ok(())
    }

    /// Record the disk space an incoming shared-nothing move was promised at admission (kept
    /// across a restart of the agent while the move is in flight).
    pub fn set_disk_reserved(&self, id: &str, bytes: u64) -> Result<(), StoreError> {
        self.db.execute("UPDATE migrations SET disk_reserved_bytes = ?2 WHERE id = ?1", params![id, bytes as i64])?;
        Ok(())
    }

    /// The disk space migration `id` was promised (0: none, or not journaled).
    pub fn disk_reserved_of(&self, id: &str) -> Result<u64, StoreError> {
        let v: Option<Option<i64>> = self
            .db
            .query_row("SELECT disk_reserved_bytes FROM migrations WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?;
        Ok(v.flatten().unwrap_or(0).max(0) as u64)
    }

    /// Keep the engine's statistics with the migration.
    pub fn set_stats(&self, id: &str, stats: &serde_json::Value) -> Result<(), StoreError> {
        self.db.execute("UPDATE migrations SET stats = ?2 WHERE id = ?1", params![id, stats.to_string()])?;
        Ok(())
    }

    /// The current status of a migration.
    pub fn status_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.db.query_row("SELECT status FROM migrations WHERE id = ?1", params![id], |r| r.get(0)).optional()?)
    }

    /// One migration, with its events.
    pub fn migration(&self, id: &str) -> Result<Option<MigrationInfo>, StoreError> {
        let m = self
            .db
            .query_row(
                "SELECT id, vm, direction, peer, status, queued_at, started_at, finished_at, error, stats, kind, encryption
                 FROM migrations WHERE id = ?1",
                params![id],
                row_to_info,
            )
            .optional()?;
        let Some(mut m) = m else { return Ok(None) };
        m.events = self.events(id)?;
        Ok(Some(m))
    }

    /// Every migration, newest first (at most `limit`).
    pub fn migrations(&self, limit: usize) -> Result<Vec<MigrationInfo>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT id, vm, direction, peer, status, queued_at, started_at, finished_at, error, stats, kind, encryption
             FROM migrations ORDER BY queued_at DESC, rowid DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit as i64], row_to_info)?;
        let mut out: Vec<MigrationInfo> = rows.collect::<Result<_, _>>()?;
        for m in &mut out {
            m.events = self.events(&m.id)?;
        }
        Ok(out)
    }

    /// Migrations without a final status (in flight when the agent stopped).
    pub fn unfinished(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        Ok(self.migrations(100_000)?.into_iter().filter(|m| !m.is_final()).collect())
    }

    fn events(&self, id: &str) -> Result<Vec<MigrationEvent>, StoreError> {
        let mut st = self.db.prepare("SELECT status, at, detail FROM migration_events WHERE id = ?1 ORDER BY rowid")?;
        let rows = st.query_map(params![id], |r| {
            Ok(MigrationEvent { status: r.get(0)?, at: rfc3339(r.get(1)?), detail: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_to_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<MigrationInfo> {
    let stats: Option<String> = r.get(9)?;
    let stats: Option<serde_json::Value> = stats.and_then(|s| serde_json::from_str(&s).ok());
    let f = |k: &str| stats.as_ref().and_then(|s| s.get(k)).and_then(|v| v.as_f64());
    Ok(MigrationInfo {
        id: r.get(0)?,
        vm: r.get(1)?,
        direction: r.get(2)?,
        kind: r.get(10)?,
        encryption: r.get(11)?,
        peer: r.get(3)?,
        status: r.get(4)?,
        queued_at: rfc3339(r.get(5)?),
        started_at: r.get::<_, Option<i64>>(6)?.map(rfc3339),
        finished_at: r.get::<_, Option<i64>>(7)?.map(rfc3339),
        error: r.get(8)?,
        verified: stats.as_ref().and_then(|s| s.get("verified")).and_then(|v| v.as_bool()).unwrap_or(false),
        total_ms: f("total_ms"),
        downtime_ms: f("downtime_ms"),
        transferred_bytes: f("transferred_bytes").unwrap_or(0.0) as u64,
        guest_bytes: f("guest_bytes").unwrap_or(0.0) as u64,
        remaining_bytes: 0,
        round: f("rounds").unwrap_or(0.0) as u32,
        expected_downtime_ms: f("expected_downtime_ms").unwrap_or(0.0),
        bandwidth_bytes_per_s: 0.0,
        stats,
        events: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keeps_every_state_change_with_its_time() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::open(&dir).unwrap();
        s.new_migration("m1", "vm1", "outgoing", "127.0.0.1:1", "queued", false).unwrap();
        s.set_status("m1", "setup", None, true).unwrap();
        s.set_status("m1", "failed", Some("destination refused"), false).unwrap();
        let m = s.migration("m1").unwrap().unwrap();
        assert_eq!(m.status, "failed");
        assert_eq!(m.error.as_deref(), Some("destination refused"));
        assert!(m.started_at.is_some() && m.finished_at.is_some());
        let st: Vec<&str> = m.events.iter().map(|e| e.status.as_str()).collect();
        assert_eq!(st, ["queued", "setup", "failed"]);
        assert!(m.queued_at.ends_with('Z') && m.queued_at.contains('T'), "{}", m.queued_at);
        assert!(s.unfinished().unwrap().is_empty());
        // A transaction that fails leaves nothing of itself; one that succeeds keeps all.
        let r = s.atomically(|s| {
            s.new_migration("m2", "vm2", "incoming", "a", "setup", true)?;
            s.set_encryption("m2", "aead")?;
            s.db.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        });
        assert!(r.is_err());
        assert!(s.migration("m2").unwrap().is_none(), "rolled back");
        s.atomically(|s| {
            s.new_migration("m3", "vm3", "incoming", "a", "setup", true)?;
            s.set_encryption("m3", "aead")
        })
        .unwrap();
        assert_eq!(s.migration("m3").unwrap().unwrap().encryption.as_deref(), Some("aead"));
        assert_eq!(s.disk_reserved_of("m3").unwrap(), 0);
        s.set_disk_reserved("m3", 5 << 20).unwrap();
        assert_eq!(s.disk_reserved_of("m3").unwrap(), 5 << 20);
        assert_eq!(s.disk_reserved_of("nope").unwrap(), 0);
        s.set_status("m3", "completed", None, false).unwrap();
        assert_eq!(m.encryption, None, "not recorded yet");
        s.set_encryption("m1", "integrity").unwrap();
        // Reopened, the journal is still there.
        drop(s);
        let s = Store::open(&dir).unwrap();
        let all = s.migrations(10).unwrap();
        assert_eq!(all.len(), 2);
        let m1 = all.iter().find(|m| m.id == "m1").unwrap();
        assert_eq!(m1.encryption.as_deref(), Some("integrity"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
