//! ferry-agent: the host agent (`ferryd`), its CLI (`ferry`) and the per-VM process
//! (`ferry-vmm`).
//!
//! - [`config`]: the TOML configuration, refused at start with the key and the reason.
//! - [`api`]: the HTTP/JSON API's types and routes (local on a unix socket, peer on TCP).
//! - [`daemon`]: the agent: VMs, moves, the host-wide limit, adoption after a restart.
//! - [`limit`]: host-wide slots, FIFO, cancel, admission of incoming migrations.
//! - [`metrics`]: `/metrics` in the Prometheus text format, from the slots and the journal.
//! - [`store`]: SQLite: owned VMs with their epoch, the migration journal.
//! - [`peer`]: signing of peer requests with the hosts' key.
//! - [`vmmctl`]: the agent's protocol with its VMM processes; [`vmm`]: the VMM process.
//! - [`client`]: the HTTP client `ferry` and `ferryd` use.
//!
//! What runs where: the agent decides when a migration may start, asks the destination agent
//! to admit it, and watches it; the engine (`ferry_migrate`) runs in the VMM processes, where
//! the guest memory is. Killing `ferryd` leaves every VMM process running; the next `ferryd`
//! adopts them from the journal.

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod limit;
pub mod metrics;
pub mod peer;
pub mod store;
pub mod vmm;
pub mod vmmctl;

/// "64MiB", "1GiB", "4096", "512KiB" (KB/MB/GB read as binary units too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (like 64MiB or 1GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} in {s:?} (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}
